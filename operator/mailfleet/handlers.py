"""The kopf side of the operator: `Operator`, whose thin handlers turn watch events into work-queue keys.

Nothing is decided here: reconcile/ decides, k8s/ writes. kopf brings the watches, the login, the
indexes (complete before the first handler runs, so no directory is built from half the Mailboxes),
and the run loop. The handlers write nothing through kopf itself: no finalizers, no
annotations on the user's objects; deletion is noticed from the watch (owned objects are removed by
Kubernetes' garbage collector through their owner references). The one finalizer, `mailfleet.io/move` on a
moving Mailbox, is the move's own (reconcile/finalizer.py).

`mailfleet operator` builds an Operator from its options and runs kopf with `Operator.registry`; tests do
the same with kopf.testing.KopfRunner.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import os
import sys
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Final

import aiohttp.web
import kopf

from mailfleet import api, k8s, kube_types, specs
from mailfleet.k8s.events import Recorder
from mailfleet.metrics import OperatorMetrics
from mailfleet.options import OperatorOptions, own_namespace
from mailfleet.reconcile import backup, domain, moves, schedule, usage
from mailfleet.reconcile.context import Context, DomainKey
from mailfleet.reconcile.passwords import PasswordHasher
from mailfleet.reconcile.routing import Router
from mailfleet.reconcile.workqueue import WorkQueue

log = logging.getLogger(__name__)

GROUP, VERSION = "mailfleet.io", "v1alpha1"
MANAGED: Final = {"app.kubernetes.io/managed-by": "mailfleet-operator"}
# A domain is reconciled again no sooner than twice its last reconcile took (reconcile/workqueue.py): at
# most a third of the operator's time goes to one domain's reconciles, the rest to the watch events they
# read (10,000 Mailboxes: about 20 reconciles of 1.5 s, not 35 of 1 s, and the directory complete sooner).
RECONCILE_SPACING: Final = 2.0
QUEUE_IDLE_TIMEOUT: Final = 0.5  # seconds; see startup


# Indexes: what reconcile/ reads instead of listing the API. Coroutines, as every handler below: kopf runs
# a plain function in a thread pool, and a hop there and back for each of ten thousand Mailbox events
# was a good part of the operator's time (py-spy: ThreadPoolExecutor.submit, call_soon_threadsafe).


def _snapshot(body: kopf.Body) -> dict[str, Any]:
    """What the reconcile reads of an object: its kind, some metadata, its spec and status (not its
    managedFields, annotations, ...). The strings that repeat from object to object (the namespace, the
    status's conditions: ten thousand Mailboxes say "Ready", "True", "Served" and the same message) are
    held once, not once an object as the watch's JSON decoder made them."""
    meta = body.metadata
    snapshot = {
        "apiVersion": _shared(body.get("apiVersion")),
        "kind": _shared(body.get("kind")),
        "metadata": {  # scalars; the name, uid and resourceVersion are each object's own
            key: _shared(meta.get(key)) if key in ("namespace", "creationTimestamp") else meta.get(key)
            for key in ("name", "namespace", "uid", "generation", "creationTimestamp", "resourceVersion")
        },
        "spec": _keys_shared(body.spec),
        "status": _shared_status(body.status),
    }
    if (move_to := meta.annotations.get(api.MOVE_TO_ANNOTATION)) is not None:  # a forced move (reconcile/moves.py)
        snapshot["metadata"]["annotations"] = {api.MOVE_TO_ANNOTATION: move_to}
    # A Mailbox being deleted (reconcile/moves.py cleans up its move, then lets its finalizer go); only when
    # there, not on each of ten thousand snapshots.
    for key in ("deletionTimestamp", "finalizers"):
        if meta.get(key):
            snapshot["metadata"][key] = _shared(meta.get(key))
    return snapshot


class _Status(dict[str, Any]):
    """A status held by index snapshots: one object for every snapshot whose status says the same (a dict
    subclass, so that the shared ones are held weakly, for as long as a snapshot holds them)."""


# Ten thousand Mailboxes served by one reconcile have one status: the same condition, node and
# generation (about 0.6 KiB a Mailbox held once, not ten thousand times).
_STATUSES: Final[weakref.WeakValueDictionary[str, _Status]] = weakref.WeakValueDictionary()


def _shared_status(status: Mapping[str, Any]) -> _Status:
    """A status of the same content as `status`, shared; nothing changes an index's snapshots."""
    copied = dict(status)  # kopf's Status view: its values are the JSON's own
    content = json.dumps(copied, sort_keys=True, separators=(",", ":"))
    found = _STATUSES.get(content)
    if found is None:
        found = _STATUSES[content] = _Status(_shared(copied))
    return found


def _shared(value: Any) -> Any:
    """A copy of `value` (JSON: mappings, lists, scalars) with its strings interned."""
    if isinstance(value, str):
        return sys.intern(value)
    if isinstance(value, dict):
        return {_shared(key): _shared(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shared(item) for item in value]
    return value


def _keys_shared(value: Any) -> Any:
    """A copy of `value` (JSON) whose mapping keys are interned ("address", "passwordSecretRef", ...: each
    object's JSON decoded its own), its other strings the JSON's own (each object's address is its own)."""
    if isinstance(value, Mapping):
        return {sys.intern(str(key)): _keys_shared(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_keys_shared(item) for item in value]
    return value


Snapshots = dict[tuple[str, str], dict[str, Any]]  # what an index of bodies returns: key -> snapshot


async def mailboxes_by_domain(namespace: str | None, body: kopf.Body, **_: Any) -> Snapshots:
    return {(str(namespace), specs.node.domain_of(body.spec.get("address"))): _snapshot(body)}


async def secrets_of_mailboxes(namespace: str | None, spec: kopf.Spec, **_: Any) -> dict[tuple[str, str], str]:
    refs = [spec.get("passwordSecretRef") or {}] + [app.get("secretRef") or {} for app in spec.get("appPasswords", [])]
    mail_domain = specs.node.domain_of(spec.get("address"))
    return {(str(namespace), str(ref["name"])): mail_domain for ref in refs if ref.get("name")}


async def domains_by_mail_domain(
    namespace: str | None, name: str, spec: kopf.Spec, **_: Any
) -> dict[tuple[str, str], str]:
    served = [spec.get("domain"), *(spec.get("aliasDomains") or [])]
    return {(str(namespace), str(d).lower()): name for d in served if d}


async def domains_by_namespace(namespace: str | None, name: str, **_: Any) -> dict[str, str]:
    return {str(namespace): name}


async def secrets_of_domains(namespace: str | None, name: str, spec: kopf.Spec, **_: Any) -> dict[tuple[str, str], str]:
    names = [
        (spec.get("tls") or {}).get("secretName"),
        ((spec.get("smtp") or {}).get("relaySecretRef") or {}).get("name"),
        ((spec.get("smtp") or {}).get("relayCASecretRef") or {}).get("name"),
    ]
    return {(str(namespace), str(secret)): name for secret in names if secret}


async def mailbackups_by_domain(namespace: str | None, body: kopf.Body, **_: Any) -> Snapshots:
    """With labels and annotations: the backup schedule tells its own by them."""
    snapshot = _snapshot(body)
    for key in ("labels", "annotations"):
        snapshot["metadata"][key] = dict(body.metadata.get(key) or {})
    return {(str(namespace), str(body.spec.get("domainRef"))): snapshot}


_INDEXES: Final = (  # (plural, function): kopf names each index after its function
    ("mailboxes", mailboxes_by_domain),
    ("mailboxes", secrets_of_mailboxes),
    ("maildomains", domains_by_mail_domain),
    ("maildomains", domains_by_namespace),
    ("maildomains", secrets_of_domains),
    ("mailbackups", mailbackups_by_domain),
)


class IndexView:
    """reconcile.context.View over kopf's indexes (live mappings kopf keeps up to date)."""

    def __init__(self, indices: Mapping[str, Any]) -> None:
        self._indices = indices

    def _get(self, index: str, key: object) -> list[Any]:
        found = self._indices[index]
        return list(found[key]) if key in found else []

    def mailboxes(self, namespace: str | None, mail_domain: str) -> list[kube_types.Mailbox]:
        found = self._get("mailboxes_by_domain", (namespace, mail_domain.lower()))
        return [body for body in found if "deletionTimestamp" not in body["metadata"]]

    def leaving(self, namespace: str | None, mail_domain: str | None = None) -> list[kube_types.Mailbox]:
        index = self._indices["mailboxes_by_domain"]
        keys = (
            [(namespace, mail_domain.lower())] if mail_domain is not None else [k for k in index if k[0] == namespace]
        )
        return [
            body
            for key in keys
            for body in self._get("mailboxes_by_domain", key)
            if "deletionTimestamp" in body["metadata"]
        ]

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


# The operator: its options, its handlers (on its own kopf registry), and once logged in, its work.

_OWNED: Final = (  # what the operator creates for a MailDomain, watched for drift
    ("apps", "v1", "statefulsets"),
    ("", "v1", "services"),
    ("", "v1", "configmaps"),
    ("", "v1", "serviceaccounts"),
    ("policy", "v1", "poddisruptionbudgets"),
    ("networking.k8s.io", "v1", "networkpolicies"),
)

_OWNED_KINDS: Final = (
    "ConfigMap",
    "NetworkPolicy",
    "PodDisruptionBudget",
    "Secret",
    "Service",
    "ServiceAccount",
    "StatefulSet",
)


@dataclasses.dataclass
class Running:
    """What exists from the login to the cleanup: the API client (in ctx), the work queue, the loops."""

    ctx: Context
    router: Router
    queue: WorkQueue[DomainKey]
    backups: backup.Runner
    metrics_runner: aiohttp.web.AppRunner | None
    resync_task: asyncio.Task[None]
    usage_task: asyncio.Task[None] | None  # None: no usage passes (usage_interval 0)
    schedule_task: asyncio.Task[None] | None  # None: no backup schedule (schedule_interval 0)


class Operator:
    """One operator run. `mailfleet operator` (or a test) builds it from OperatorOptions and runs kopf with
    its `registry`, where every handler is a method of this object: no state outside it.

    `clock` tells the backup schedule what time it is (tests: a fake clock)."""

    def __init__(self, options: OperatorOptions, *, clock: schedule.Clock = schedule.utc_now) -> None:
        self.options = options
        self.clock = clock
        self.registry = kopf.OperatorRegistry()
        self.indices: Mapping[str, Any] = {}  # kopf's indexes by name, from the startup on
        self._running: Running | None = None
        self._register()

    def _register(self) -> None:
        registry = self.registry
        for plural, index in _INDEXES:
            kopf.index(GROUP, VERSION, plural, registry=registry)(index)
        kopf.on.startup(registry=registry)(self.startup)
        kopf.on.login(registry=registry)(self.login)
        kopf.on.cleanup(registry=registry)(self.cleanup)
        kopf.on.event(GROUP, VERSION, "maildomains", registry=registry)(self.maildomain_event)
        kopf.on.event(GROUP, VERSION, "mailboxes", registry=registry)(self.mailbox_event)
        kopf.on.event(GROUP, VERSION, "mailbackups", registry=registry)(self.mailbackup_event)
        for group, version, plural in _OWNED:
            kopf.on.event(group, version, plural, labels=MANAGED, registry=registry, id=f"owned-{plural}")(
                self.owned_event
            )
        kopf.on.event("", "v1", "secrets", registry=registry)(self.secret_event)

    def running(self) -> Running:
        if self._running is None:
            raise RuntimeError("the operator has not logged in yet")
        return self._running

    # Its life: settings, login (which starts the queue), cleanup.

    async def startup(self, settings: kopf.OperatorSettings, **kwargs: Any) -> None:
        # Nothing of kopf's own bookkeeping goes on the user's objects (the handlers need none), and the
        # operator posts its own Events.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
        settings.persistence.finalizer = f"{GROUP}/finalizer"
        settings.posting.enabled = False
        settings.watching.server_timeout = 300
        # kopf keeps a worker (a task, its queue and its frames: a few KiB) for each object with recent
        # events until it has been idle this long (default 5 s). Applying ten thousand Mailboxes and their
        # Secrets kept thousands alive at once; a new event of an object whose worker has gone starts one.
        settings.queueing.idle_timeout = QUEUE_IDLE_TIMEOUT
        settings.watching.client_timeout = 330
        self.indices = {index.__name__: kwargs[index.__name__] for _, index in _INDEXES}

    async def login(self, **kwargs: Any) -> kopf.ConnectionInfo | None:
        try:
            info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
        except (OSError, KeyError, ValueError) as error:
            raise kopf.LoginError(
                f"cannot use the kubeconfig (KUBECONFIG={os.environ.get('KUBECONFIG')}): {error}"
            ) from error
        if info is None:
            raise kopf.LoginError("no service account and no kubeconfig (set KUBECONFIG)")
        if self._running is None:  # kopf logs in again when the credentials expire: start once
            self._running = await self._start(info)
        return info

    async def _start(self, info: kopf.ConnectionInfo) -> Running:
        options = self.options
        metrics = OperatorMetrics()
        client = k8s.Client(info)
        operator_namespace = own_namespace(options)
        if operator_namespace is None:
            log.warning(
                "the operator's namespace is not known (--operator-namespace, $MAILFLEET_OPERATOR_NAMESPACE): the "
                "nodes' NetworkPolicies admit it only from their own namespaces, not from another"
            )
        ctx = Context(
            client=client,
            recorder=Recorder(client),
            view=IndexView(self.indices),
            image=options.image,
            hasher=PasswordHasher(on_hash=metrics.passwords_hashed.inc),
            metrics=metrics,
            operator_namespace=operator_namespace,
            node_url=options.node_url,
        )

        async def work(key: DomainKey) -> None:
            await domain.reconcile(ctx, key)

        queue: WorkQueue[DomainKey] = WorkQueue(
            work,
            workers=options.workers,
            delay=options.delay,
            on_depth=metrics.queue_depth.set,
            spacing=RECONCILE_SPACING,
        )
        ctx.queue = queue
        queue.start()
        runner = None
        if options.metrics_port is not None:
            runner = await _serve_metrics(
                metrics, options.metrics_host, options.metrics_port, before=lambda: self._count_managed(ctx)
            )
        log.info("mailfleet operator started (node image %s)", options.image)
        usage_task = schedule_task = None
        if options.usage_interval > 0:
            usage_task = asyncio.create_task(usage.run(ctx, options.node_url, options.usage_interval))
        if options.schedule_interval > 0:
            schedule_task = asyncio.create_task(
                schedule.run(ctx, interval=options.schedule_interval, clock=self.clock, node_url=options.node_url)
            )
        backups = backup.Runner(
            ctx,
            backup.Settings(
                node_url=options.node_url,
                hold=options.backup_hold,
                poll=options.backup_poll,
                attempts=options.backup_attempts,
                retry=options.backup_retry,
            ),
        )
        resync_task = asyncio.create_task(self._resync(ctx))
        return Running(ctx, Router(ctx), queue, backups, runner, resync_task, usage_task, schedule_task)

    async def _resync(self, ctx: Context) -> None:
        """Reconcile every domain now and then: drift that no watch event showed (one missed while the
        operator was disconnected) is repaired all the same."""
        while True:
            await asyncio.sleep(self.options.resync)
            index = self.indices.get("domains_by_namespace") or {}
            for namespace in list(index):
                for name in set(index[namespace]):
                    ctx.enqueue((str(namespace), str(name)))

    def _count_managed(self, ctx: Context) -> None:
        if not self.indices:
            return
        metrics = ctx.metrics
        owned: collections.Counter[str] = sum(ctx.owned.values(), collections.Counter())
        for kind in _OWNED_KINDS:
            metrics.managed.labels(kind).set(owned[kind])
        metrics.managed.labels("MailDomain").set(len(_values(self.indices["domains_by_namespace"])))
        metrics.managed.labels("Mailbox").set(len(_values(self.indices["mailboxes_by_domain"])))

    async def cleanup(self, **_: Any) -> None:
        if self._running is None:
            return
        state, self._running = self._running, None
        tasks = [task for task in (state.resync_task, state.usage_task, state.schedule_task) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await state.backups.stop()  # a node paused for a VolumeSnapshot is told to resume
        await state.queue.stop()
        await moves.stop_copies(state.ctx)  # a first copy under way is asked again by the next operator
        await state.ctx.statuses.stop()  # unwritten statuses are decided again by the next operator's reconciles
        if state.metrics_runner is not None:
            await state.metrics_runner.cleanup()
        await state.ctx.client.close()

    # Watch events -> work-queue keys.

    async def maildomain_event(self, type: str, body: kopf.Body, **_: Any) -> None:
        self.running().router.domain_changed(type, body)

    async def mailbox_event(self, type: str, body: kopf.Body, **_: Any) -> None:
        state, snapshot = self.running(), _snapshot(body)
        state.ctx.statuses.shown(snapshot)  # type: ignore[arg-type]  # a Mailbox's JSON
        await state.router.mailbox_changed(type, snapshot)

    async def mailbackup_event(self, type: str | None, body: kopf.Body, **_: Any) -> None:
        """A MailBackup neither Completed nor Failed is taken (reconcile/backup.py), once at a time. A coroutine:
        kopf runs it in the operator's event loop, where the backups' tasks live."""
        state = self.running()
        state.backups.observe(type, body)
        if body.status.get("phase") == "Completed" and self.indices:
            # a MailDomain refused while the backup it restores from was not complete can go ahead now
            namespace = str(body.metadata.namespace)
            for name in IndexView(self.indices).domain_names(namespace):
                state.ctx.enqueue((namespace, name))

    async def owned_event(self, body: kopf.Body, **_: Any) -> None:
        self.running().router.owned_changed(body)

    async def secret_event(self, type: str | None, namespace: str | None, name: str, body: kopf.Body, **_: Any) -> None:
        """Owned Secrets (directory, DKIM key) for drift; others when a Mailbox or MailDomain names them,
        once remembered for the reconcile to read (k8s.secrets.Seen)."""
        state = self.running()
        if all(body.metadata.labels.get(k) == v for k, v in MANAGED.items()):
            state.router.owned_changed(body)
            return
        state.ctx.seen_secrets.observe(type, body)
        if self.indices:
            users = IndexView(self.indices).secret_users(str(namespace), name)
            if users:
                state.router.secret_changed(str(namespace), users)


async def _serve_metrics(
    metrics: OperatorMetrics, host: str, port: int, *, before: Callable[[], None]
) -> aiohttp.web.AppRunner:
    """/metrics on host:port; `before` brings the gauges up to date for each scrape."""

    async def serve(request: aiohttp.web.Request) -> aiohttp.web.Response:
        before()
        return aiohttp.web.Response(body=metrics.exposition(), content_type="text/plain", charset="utf-8")

    app = aiohttp.web.Application()
    app.router.add_get("/metrics", serve)
    runner = aiohttp.web.AppRunner(app, access_log=None)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, host, port).start()
    log.info("metrics on http://%s:%d/metrics", host, port)
    return runner


def _values(index: Mapping[Any, Any]) -> list[Any]:
    return [value for key in index for value in index[key]]
