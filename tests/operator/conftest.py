"""Tier 3 of DESIGN.md: the operator, run for real by kopf (kopf.testing.KopfRunner, in a thread with its
own event loop) against kmock's Kubernetes emulator over HTTP (`emulator.ApiServer`)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import kopf
import pytest
import yaml
from kopf.testing import KopfRunner

from mailfleet import handlers, k8s, options
from mailfleet.reconcile import schedule
from tests.operator.emulator import RESOURCES, ApiServer
from tests.operator.fakenode import FakeNode, internal_secret

T = TypeVar("T")
NAMESPACE = "mail"


@pytest.fixture
def kmock_options() -> dict[str, Any]:
    """The emulator the `kmock` fixture starts: ours."""
    return {"cls": ApiServer}


@pytest.fixture
async def api(kmock: ApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ApiServer:
    """The emulated API server with the resources the operator uses, and a kubeconfig pointing at it
    (the operator logs in with it, as it would outside a cluster)."""
    for resource, info in RESOURCES.items():
        kmock.resources[resource] = info
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
        "users": [{"name": "tester", "user": {"token": "test"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester", "namespace": NAMESPACE}}],
        "current-context": "kmock",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(path))
    return kmock


@pytest.fixture
async def client(api: ApiServer) -> AsyncIterator[k8s.Client]:
    """What the test uses to act as a user (kubectl): real HTTP to the emulator."""
    info = kopf.ConnectionInfo(server=str(api.url).rstrip("/"), token="test")
    async with k8s.Client(info) as client:
        yield client


@contextlib.asynccontextmanager
async def run_operator(*, clock: schedule.Clock = schedule.utc_now, **fields: Any) -> AsyncIterator[handlers.Operator]:
    """The operator, running: kopf in its own thread and loop, as `mailfleet operator` would run it.
    `fields`: OperatorOptions fields; `clock`: the backup schedule's (a FakeClock)."""
    defaults: dict[str, Any] = {"image": "mailfleet-test:1", "delay": 0.05, "resync": 300.0, "usage_interval": 0}
    operator = handlers.Operator(options.OperatorOptions(**{**defaults, **fields}), clock=clock)
    runner = KopfRunner(
        ["run", "--standalone", "--all-namespaces", "--verbose"], registry=operator.registry, timeout=30
    )
    await asyncio.to_thread(runner.__enter__)
    try:
        yield operator
    finally:
        # Joining the thread blocks: do it off this loop, which serves the emulator the operator talks to.
        await asyncio.to_thread(runner.__exit__, None, None, None)


@pytest.fixture
async def operator(api: ApiServer) -> AsyncIterator[handlers.Operator]:
    async with run_operator() as running:
        yield running


async def eventually(probe: Callable[[], Awaitable[T | None]], *, within: float = 20.0, what: str = "") -> T:
    """The first truthy result of `probe`, polled; fails the test after `within` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    last: T | None = None
    while True:
        last = await probe()
        if last:
            return last
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {within} s waiting for {what or probe}; last: {last!r}")
        await asyncio.sleep(0.05)


async def settled(operator: handlers.Operator) -> None:
    """Until the operator has reconciled and its queue is empty, and still empty a moment later."""

    async def done() -> bool:
        try:
            state = operator.running()
        except RuntimeError:  # not logged in yet
            return False
        reconciled = state.ctx.metrics.reconciles.labels("MailDomain", "ok")._value.get()
        # The Mailbox statuses a reconcile decided are written behind it (reconcile/statuswrites.py).
        return reconciled > 0 and len(state.queue) == 0 and len(state.ctx.statuses) == 0

    await eventually(done, what="a reconcile, then an empty queue and every Mailbox status written")
    await asyncio.sleep(0.5)  # and no further events that would start another
    assert len(operator.running().queue) == 0


def secret(name: str, **values: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "type": "Opaque",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()},
    }


def maildomain(name: str = "example-com", domain: str = "example.com", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mailfleet.io/v1alpha1",
        "kind": "MailDomain",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"domain": domain, "replicas": 1, "dkim": {"selector": "mail"}, **spec},
    }


def mailbox(name: str, address: str, secret_name: str | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mailfleet.io/v1alpha1",
        "kind": "Mailbox",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"address": address, "passwordSecretRef": {"name": secret_name or f"{name}-password"}, **spec},
    }


MAILDOMAIN = k8s.kind_of("mailfleet.io/v1alpha1", "MailDomain")
MAILBOX = k8s.kind_of("mailfleet.io/v1alpha1", "Mailbox")
SECRET = k8s.kind_of("v1", "Secret")
CONFIGMAP = k8s.kind_of("v1", "ConfigMap")
STATEFULSET = k8s.kind_of("apps/v1", "StatefulSet")
EVENT = k8s.kind_of("v1", "Event")


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    """The condition of this type in obj's status ({} when there is none)."""
    for found in ((obj or {}).get("status") or {}).get("conditions") or []:
        if found.get("type") == type_:
            return dict(found)
    return {}


async def directory(client: k8s.Client, name: str = "example-com") -> dict[str, Any]:
    """The directory the operator wrote for a MailDomain, by address ({} while there is none)."""
    obj = await client.get(SECRET, NAMESPACE, f"{name}-directory")
    if obj is None:
        return {}
    data = yaml.safe_load(k8s.secret_values(obj)["directory.yaml"])
    return {entry["address"]: entry for entry in data.get("mailboxes") or []}


async def events(client: k8s.Client, name: str, reason: str | None = None) -> list[dict[str, Any]]:
    """Events about the object `name`, optionally of one reason."""
    return [
        event
        for event in await client.list(EVENT, NAMESPACE)
        if event["involvedObject"]["name"] == name and reason in (None, event["reason"])
    ]


async def status_of(
    client: k8s.Client, kind: k8s.Kind[Any], name: str, type_: str = "Ready", **expected: object
) -> dict[str, Any] | None:
    """The object once its condition `type_` has the expected fields (status, reason), else None."""
    obj = await client.get(kind, NAMESPACE, name)
    found = condition(obj, type_)
    return obj if found and all(found.get(k) == v for k, v in expected.items()) else None


# Backups (tests/operator/test_backup.py): the add-on VolumeSnapshot API, the node claims, MailBackups.

MAILBACKUP = k8s.kind_of("mailfleet.io/v1alpha1", "MailBackup")
VOLUMESNAPSHOT = k8s.kind_of("snapshot.storage.k8s.io/v1", "VolumeSnapshot")
PERSISTENTVOLUMECLAIM = k8s.kind_of("v1", "PersistentVolumeClaim")


def serve_backup_kinds(api: ApiServer, *, volume_snapshots: bool = True) -> None:
    """What the emulator serves beyond RESOURCES for backups: PersistentVolumeClaims, and (unless told
    not to, as a cluster without the CSI snapshot CRDs) VolumeSnapshots with their status subresource."""
    import kmock

    from tests.operator.emulator import VERBS

    api.resources["v1/persistentvolumeclaims"] = kmock.ResourceInfo(
        kind="PersistentVolumeClaim", namespaced=True, verbs=VERBS
    )
    if volume_snapshots:
        api.resources["snapshot.storage.k8s.io/v1/volumesnapshots"] = kmock.ResourceInfo(
            kind="VolumeSnapshot", namespaced=True, subresources={"status"}, verbs=VERBS
        )


def mailbackup(name: str, domain_ref: str = "example-com", method: str = "VolumeSnapshot") -> dict[str, Any]:
    return {
        "apiVersion": "mailfleet.io/v1alpha1",
        "kind": "MailBackup",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"domainRef": domain_ref, "method": method},
    }


def node_claim(name: str) -> dict[str, Any]:
    """A node's claim as the StatefulSet controller makes it (the emulator runs no controllers)."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }


async def phase_of(client: k8s.Client, name: str, phase: str) -> dict[str, Any] | None:
    """The MailBackup once its status.phase is `phase`, else None."""
    obj = await client.get(MAILBACKUP, NAMESPACE, name)
    return obj if ((obj or {}).get("status") or {}).get("phase") == phase else None


# Scheduled backups (tests/operator/test_schedule.py): a clock the test moves, MailBackups already run.


class FakeClock:
    """The operator's clock (run_operator(clock=...)): the time (UTC) the test sets; it starts at the real time."""

    def __init__(self) -> None:
        self.now = datetime.datetime.now(datetime.UTC)

    def __call__(self) -> datetime.datetime:
        return self.now

    def advance(self, **delta: float) -> datetime.datetime:
        self.now += datetime.timedelta(**delta)
        return self.now


def rfc3339(at: datetime.datetime) -> str:
    return at.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def finished_backup(
    client: k8s.Client,
    name: str,
    *,
    completed_at: datetime.datetime,
    phase: str = "Completed",
    scheduled: bool = False,
    method: str = "Archive",
    error: str | None = None,
) -> dict[str, Any]:
    """A MailBackup that has run (the test plays the backup runner): scheduled ones carry the schedule's
    label and annotation. Created with its status, so the operator's runner never takes it up, and the
    status written again through the subresource, as a real API server needs."""
    body = mailbackup(name, method=method)
    if scheduled:
        body["metadata"]["labels"] = {"mailfleet.io/scheduled": "true", "mailfleet.io/maildomain": "example-com"}
        body["metadata"]["annotations"] = {"mailfleet.io/scheduled-at": rfc3339(completed_at.replace(minute=0))}
    status: dict[str, Any] = {"phase": phase, "startedAt": rfc3339(completed_at), "completedAt": rfc3339(completed_at)}
    if error is not None:
        status["error"] = error
    body["status"] = status
    await client.create(body)
    return await client.patch(MAILBACKUP, NAMESPACE, name, {"status": status}, subresource="status")


@pytest.fixture
async def node(client: k8s.Client) -> AsyncIterator[FakeNode]:
    """A fake mail node (tests/operator/fakenode.py) on 127.0.0.1: the operator's node_url points at it.
    Its token is in MailDomain example-com's internal Secret, made before the domain (the operator keeps
    the token it finds there), as the nodes of a cluster have the token of their domain's Secret."""
    fake = FakeNode()
    await client.create(internal_secret("example-com", fake.token, namespace=NAMESPACE))
    await fake.start()
    yield fake
    await fake.stop()
