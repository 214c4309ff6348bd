"""The kopf side of the operator: thin handlers that turn watch events into work-queue keys.

Nothing is decided here: reconcile/ decides, k8s/ writes. kopf brings the watches, the login, the
indexes (complete before the first handler runs, so no directory is built from half the Mailboxes),
and the run loop. The handlers write nothing through kopf itself: no finalizers, no
annotations on the user's objects; deletion is noticed from the watch (owned objects are removed by
Kubernetes' garbage collector through their owner references).

`mailfleet operator` runs it; tests run it with kopf.testing.KopfRunner and `registry`.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any, Final

import aiohttp.web
import kopf

from mailfleet import k8s, kube_types, nodes, specs
from mailfleet.k8s.events import Recorder
from mailfleet.metrics import OperatorMetrics
from mailfleet.reconcile import backup, domain, schedule, usage
from mailfleet.reconcile.context import Context, DomainKey
from mailfleet.reconcile.passwords import PasswordHasher
from mailfleet.reconcile.routing import Router
from mailfleet.reconcile.workqueue import WorkQueue

log = logging.getLogger(__name__)

GROUP, VERSION = "mailfleet.io", "v1alpha1"
MANAGED: Final = {"app.kubernetes.io/managed-by": "mailfleet-operator"}

registry = kopf.OperatorRegistry()


@dataclasses.dataclass
class Options:
    """Set by `mailfleet operator` (or a test) before the operator starts; the environment gives the
    defaults, so a Deployment can set them too."""

    image: str = dataclasses.field(
        default_factory=lambda: os.environ.get("MAILFLEET_NODE_IMAGE", specs.common.DEFAULT_IMAGE)
    )
    metrics_port: int | None = dataclasses.field(
        default_factory=lambda: (
            int(os.environ["MAILFLEET_METRICS_PORT"]) if os.environ.get("MAILFLEET_METRICS_PORT") else None
        )
    )
    metrics_host: str = "0.0.0.0"
    workers: int = 4
    delay: float = 0.2  # seconds a changed domain waits for more changes before its reconcile
    resync: float = 300.0  # seconds between reconciles of an unchanged domain (drift the watch missed)
    usage_interval: float = 60.0  # seconds between passes copying mailbox usage into Mailbox statuses; 0: none
    node_url: str = nodes.IN_CLUSTER  # where a node answers ({pod} {ordinal} {service} {namespace} {name})
    backup_hold: int = 60  # seconds a node holds writes while its VolumeSnapshot is cut
    backup_poll: float = 1.0  # seconds between looks at a VolumeSnapshot or an archive in progress
    backup_attempts: int = 5  # tries of a node that does not answer before its MailBackup fails
    backup_retry: float = 2.0  # seconds before the second try, doubled for each next one
    schedule_interval: float = 30.0  # seconds between passes of the backup schedule and retention; 0: none
    clock: schedule.Clock = schedule.utc_now  # what time it is, for the backup schedule (tests: a fake clock)


options = Options()


def configure(new: Options) -> None:
    global options
    options = new


@dataclasses.dataclass
class _Running:
    ctx: Context
    router: Router
    queue: WorkQueue[DomainKey]
    metrics_runner: aiohttp.web.AppRunner | None
    resync_task: asyncio.Task[None]
    usage_task: asyncio.Task[None] | None
    backups: backup.Runner | None = None
    schedule_task: asyncio.Task[None] | None = None


_running: _Running | None = None
_indices: Mapping[str, Any] = {}


def running() -> _Running:
    if _running is None:
        raise RuntimeError("the operator has not logged in yet")
    return _running


# Indexes: what reconcile/ reads instead of listing the API.


def _snapshot(body: kopf.Body) -> dict[str, Any]:
    meta = body.metadata
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {
            key: copy.deepcopy(meta.get(key))
            for key in ("name", "namespace", "uid", "generation", "creationTimestamp", "resourceVersion")
        },
        "spec": copy.deepcopy(dict(body.spec)),
        "status": copy.deepcopy(dict(body.status)),
    }


@kopf.index(GROUP, VERSION, "mailboxes", registry=registry)
def mailboxes_by_domain(namespace: str | None, body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    return {(str(namespace), specs.node.domain_of(body.spec.get("address"))): _snapshot(body)}


@kopf.index(GROUP, VERSION, "mailboxes", registry=registry)
def secrets_of_mailboxes(namespace: str | None, spec: kopf.Spec, **_: Any) -> dict[tuple[str, str], str]:
    refs = [spec.get("passwordSecretRef") or {}] + [app.get("secretRef") or {} for app in spec.get("appPasswords", [])]
    mail_domain = specs.node.domain_of(spec.get("address"))
    return {(str(namespace), str(ref["name"])): mail_domain for ref in refs if ref.get("name")}


@kopf.index(GROUP, VERSION, "maildomains", registry=registry)
def domains_by_mail_domain(namespace: str | None, name: str, spec: kopf.Spec, **_: Any) -> dict[tuple[str, str], str]:
    served = [spec.get("domain"), *(spec.get("aliasDomains") or [])]
    return {(str(namespace), str(d).lower()): name for d in served if d}


@kopf.index(GROUP, VERSION, "maildomains", registry=registry)
def domains_by_namespace(namespace: str | None, name: str, **_: Any) -> dict[str, str]:
    return {str(namespace): name}


@kopf.index(GROUP, VERSION, "maildomains", registry=registry)
def secrets_of_domains(namespace: str | None, name: str, spec: kopf.Spec, **_: Any) -> dict[tuple[str, str], str]:
    names = [
        (spec.get("tls") or {}).get("secretName"),
        ((spec.get("smtp") or {}).get("relaySecretRef") or {}).get("name"),
    ]
    return {(str(namespace), str(secret)): name for secret in names if secret}


@kopf.index(GROUP, VERSION, "mailbackups", registry=registry)
def mailbackups_by_domain(namespace: str | None, body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """With labels and annotations: the backup schedule tells its own by them."""
    snapshot = _snapshot(body)
    for key in ("labels", "annotations"):
        snapshot["metadata"][key] = dict(body.metadata.get(key) or {})
    return {(str(namespace), str(body.spec.get("domainRef"))): snapshot}


class IndexView:
    """reconcile.context.View over kopf's indexes (live mappings kopf keeps up to date)."""

    def __init__(self, indices: Mapping[str, Any]) -> None:
        self._indices = indices

    def _get(self, index: str, key: object) -> list[Any]:
        found = self._indices[index]
        return list(found[key]) if key in found else []

    def mailboxes(self, namespace: str | None, mail_domain: str) -> list[kube_types.Mailbox]:
        return self._get("mailboxes_by_domain", (namespace, mail_domain.lower()))

    def serving(self, namespace: str | None, mail_domain: str) -> list[str]:
        return sorted(set(self._get("domains_by_mail_domain", (namespace, mail_domain.lower()))))

    def domain_names(self, namespace: str) -> list[str]:
        return sorted(set(self._get("domains_by_namespace", namespace)))

    def namespaces(self) -> list[str]:
        return sorted(str(namespace) for namespace in self._indices["domains_by_namespace"])

    def backups(self, namespace: str | None, domain_name: str) -> list[kube_types.MailBackup]:
        return self._get("mailbackups_by_domain", (namespace, domain_name))

    def secret_users(self, namespace: str | None, secret: str) -> list[str]:
        key = (namespace, secret)
        return sorted(set(self._get("secrets_of_mailboxes", key)) | set(self._get("secrets_of_domains", key)))


# The operator's life: settings, login (which starts the queue), cleanup.


@kopf.on.startup(registry=registry)
async def startup(settings: kopf.OperatorSettings, **kwargs: Any) -> None:
    global _indices
    # Nothing of kopf's own bookkeeping goes on the user's objects (the handlers need none), and the
    # operator posts its own Events.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.enabled = False
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    _indices = {name: kwargs[name] for name in _INDEXES}


_INDEXES: Final = (
    "mailboxes_by_domain",
    "secrets_of_mailboxes",
    "domains_by_mail_domain",
    "domains_by_namespace",
    "secrets_of_domains",
    "mailbackups_by_domain",
)


@kopf.on.login(registry=registry)
async def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    global _running
    try:
        info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    except (OSError, KeyError, ValueError) as error:
        raise kopf.LoginError(
            f"cannot use the kubeconfig (KUBECONFIG={os.environ.get('KUBECONFIG')}): {error}"
        ) from error
    if info is None:
        raise kopf.LoginError("no service account and no kubeconfig (set KUBECONFIG)")
    if _running is None:
        _running = await _start(info)
    return info


async def _start(info: kopf.ConnectionInfo) -> _Running:
    metrics = OperatorMetrics()
    client = k8s.Client(info)
    ctx = Context(
        client=client,
        recorder=Recorder(client),
        view=IndexView(_indices),
        image=options.image,
        hasher=PasswordHasher(on_hash=metrics.passwords_hashed.inc),
        metrics=metrics,
    )

    async def work(key: DomainKey) -> None:
        await domain.reconcile(ctx, key)

    queue: WorkQueue[DomainKey] = WorkQueue(
        work, workers=options.workers, delay=options.delay, on_depth=metrics.queue_depth.set
    )
    ctx.queue = queue
    queue.start()
    runner = None
    if options.metrics_port is not None:
        runner = await _serve_metrics(metrics, options.metrics_host, options.metrics_port)
    log.info("mailfleet operator started (node image %s)", options.image)
    usage_task = None
    if options.usage_interval > 0:
        usage_task = asyncio.create_task(usage.run(ctx, options.node_url, options.usage_interval))
    state = _Running(ctx, Router(ctx), queue, runner, asyncio.create_task(_resync(ctx, options.resync)), usage_task)
    state.backups = backup.Runner(
        ctx,
        backup.Settings(
            node_url=options.node_url,
            hold=options.backup_hold,
            poll=options.backup_poll,
            attempts=options.backup_attempts,
            retry=options.backup_retry,
        ),
    )
    if options.schedule_interval > 0:
        state.schedule_task = asyncio.create_task(
            schedule.run(ctx, interval=options.schedule_interval, clock=options.clock, node_url=options.node_url)
        )
    return state


async def _resync(ctx: Context, interval: float) -> None:
    """Reconcile every domain now and then: drift that no watch event showed (one missed while the
    operator was disconnected) is repaired all the same."""
    while True:
        await asyncio.sleep(interval)
        index = _indices.get("domains_by_namespace") or {}
        for namespace in list(index):
            for name in set(index[namespace]):
                ctx.enqueue((str(namespace), str(name)))


async def _serve_metrics(metrics: OperatorMetrics, host: str, port: int) -> aiohttp.web.AppRunner:
    async def serve(request: aiohttp.web.Request) -> aiohttp.web.Response:
        _count_managed(metrics)
        return aiohttp.web.Response(body=metrics.exposition(), content_type="text/plain", charset="utf-8")

    app = aiohttp.web.Application()
    app.router.add_get("/metrics", serve)
    runner = aiohttp.web.AppRunner(app, access_log=None)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, host, port).start()
    log.info("metrics on http://%s:%d/metrics", host, port)
    return runner


_OWNED_KINDS: Final = (
    "ConfigMap",
    "NetworkPolicy",
    "PodDisruptionBudget",
    "Secret",
    "Service",
    "ServiceAccount",
    "StatefulSet",
)


def _count_managed(metrics: OperatorMetrics) -> None:
    if not _indices or _running is None:
        return
    owned: collections.Counter[str] = sum(_running.ctx.owned.values(), collections.Counter())
    for kind in _OWNED_KINDS:
        metrics.managed.labels(kind).set(owned[kind])
    metrics.managed.labels("MailDomain").set(len(list(_values(_indices["domains_by_namespace"]))))
    metrics.managed.labels("Mailbox").set(len(list(_values(_indices["mailboxes_by_domain"]))))


def _values(index: Mapping[Any, Any]) -> list[Any]:
    return [value for key in index for value in index[key]]


@kopf.on.cleanup(registry=registry)
async def cleanup(**_: Any) -> None:
    global _running
    if _running is None:
        return
    state, _running = _running, None
    state.resync_task.cancel()
    if state.usage_task is not None:
        state.usage_task.cancel()
        await asyncio.gather(state.usage_task, return_exceptions=True)
    if state.schedule_task is not None:
        state.schedule_task.cancel()
        await asyncio.gather(state.schedule_task, return_exceptions=True)
    if state.backups is not None:
        await state.backups.stop()  # a node paused for a VolumeSnapshot is told to resume
    await state.queue.stop()
    if state.metrics_runner is not None:
        await state.metrics_runner.cleanup()
    await state.ctx.client.close()


# Watch events -> work-queue keys.


@kopf.on.event(GROUP, VERSION, "maildomains", registry=registry)
def maildomain_event(type: str, body: kopf.Body, **_: Any) -> None:
    running().router.domain_changed(type, body)


@kopf.on.event(GROUP, VERSION, "mailboxes", registry=registry)
async def mailbox_event(type: str, body: kopf.Body, **_: Any) -> None:
    await running().router.mailbox_changed(type, _snapshot(body))


@kopf.on.event(GROUP, VERSION, "mailbackups", registry=registry)
async def mailbackup_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    """A MailBackup neither Completed nor Failed is taken (reconcile/backup.py), once at a time. A coroutine:
    kopf runs it in the operator's event loop, where the backups' tasks live."""
    state = running()
    if state.backups is not None:
        state.backups.observe(type, body)
    if body.status.get("phase") == "Completed" and _indices:
        # a MailDomain refused while the backup it restores from was not complete can go ahead now
        for name in IndexView(_indices).domain_names(str(body.metadata.namespace)):
            state.ctx.enqueue((str(body.metadata.namespace), name))


def _owned(kind: tuple[str, str, str]) -> None:
    group, version, plural = kind

    @kopf.on.event(group, version, plural, labels=MANAGED, registry=registry, id=f"owned-{plural}")
    def owned_event(body: kopf.Body, **_: Any) -> None:
        running().router.owned_changed(body)


for _kind in [
    ("apps", "v1", "statefulsets"),
    ("", "v1", "services"),
    ("", "v1", "configmaps"),
    ("", "v1", "serviceaccounts"),
    ("policy", "v1", "poddisruptionbudgets"),
    ("networking.k8s.io", "v1", "networkpolicies"),
]:
    _owned(_kind)


@kopf.on.event("", "v1", "secrets", registry=registry)
def secret_event(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> None:
    """Owned Secrets (directory, DKIM key) for drift; others when a Mailbox or MailDomain names them."""
    state = running()
    if all(body.metadata.labels.get(k) == v for k, v in MANAGED.items()):
        state.router.owned_changed(body)
        return
    if _indices:
        users = IndexView(_indices).secret_users(str(namespace), name)
        if users:
            state.router.secret_changed(str(namespace), users)
