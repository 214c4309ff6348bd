"""MailBackups and restores (docs/backups.md, "In Kubernetes"), with the operator run by kopf against the
emulator and a fake mail node (tests/operator/fakenode.py) over HTTP; the test plays the CSI snapshot
controller by writing the VolumeSnapshots' status.

- VolumeSnapshot: the node holds writes from its checkpoint until the snapshot is cut, and no longer;
  the backup completes once the snapshot is ready, with the node's point in time.
- Whatever goes wrong, no node is left paused and no VolumeSnapshot is kept; the error says why.
- Archive: each node writes its archive; the backup lists where.
- An operator that restarts takes a Running backup up where it was.
- Restore: the node claims are made from the snapshots before the StatefulSet; what cannot be restored is
  refused with nothing written.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mailfleet import handlers, k8s
from mailwire import admin
from tests.operator.conftest import (
    CONFIGMAP,
    MAILBACKUP,
    MAILDOMAIN,
    NAMESPACE,
    PERSISTENTVOLUMECLAIM,
    STATEFULSET,
    VOLUMESNAPSHOT,
    condition,
    events,
    eventually,
    mailbackup,
    maildomain,
    node_claim,
    phase_of,
    run_operator,
    serve_backup_kinds,
    settled,
    status_of,
)
from tests.operator.emulator import ApiServer
from tests.operator.fakenode import STORE_NOT_OPEN, FakeNode


def fast(node: FakeNode, **options: Any) -> dict[str, Any]:
    """Operator options: node 0 of every domain is the fake node; looks and retries without waiting."""
    return {"node_url": node.url, "backup_poll": 0.05, "backup_retry": 0.05, "backup_attempts": 3, **options}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def cut(client: k8s.Client, name: str, *, ready: bool) -> None:
    """What the CSI snapshot controller writes once the volume is cut, then once the snapshot is ready."""
    status = {"creationTime": _now(), "readyToUse": ready, "restoreSize": "1Gi"}
    await client.patch(VOLUMESNAPSHOT, NAMESPACE, name, {"status": status}, subresource="status")


@contextlib.asynccontextmanager
async def snapshot_controller(client: k8s.Client) -> AsyncIterator[None]:
    """Cuts every VolumeSnapshot that appears, at once, ready to use."""

    async def run() -> None:
        while True:
            for snapshot in await client.list(VOLUMESNAPSHOT, NAMESPACE):
                if not (snapshot.get("status") or {}).get("readyToUse"):
                    await cut(client, snapshot["metadata"]["name"], ready=True)
            await asyncio.sleep(0.05)

    task = asyncio.create_task(run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def domain_with_claim(client: k8s.Client, operator: handlers.Operator) -> None:
    """MailDomain example-com, built, and its node's claim (the emulator runs no StatefulSet controller)."""
    await client.create(maildomain())
    await settled(operator)
    await client.create(node_claim("data-example-com-0"))


async def set_status(client: k8s.Client, kind: k8s.Kind[Any], name: str, status: dict[str, Any]) -> None:
    await client.patch(kind, NAMESPACE, name, {"status": status}, subresource="status")


def backups_counted(operator: handlers.Operator, method: str, result: str) -> float:
    return float(operator.running().ctx.metrics.backups.labels(method, result)._value.get())


async def counted(operator: handlers.Operator, method: str, result: str) -> float:
    """The backups counter once it counts one: the operator counts right after it wrote the phase a
    client may already have read."""

    async def one() -> bool:
        return backups_counted(operator, method, result) >= 1

    await eventually(one, what=f"mailfleet backups {method} {result} counted")
    return backups_counted(operator, method, result)


# -- VolumeSnapshot --------------------------------------------------------------------------------


async def test_the_node_holds_writes_until_its_snapshot_is_cut(api: ApiServer, client, node: FakeNode) -> None:
    serve_backup_kinds(api)
    async with run_operator(**fast(node)) as operator:
        await domain_with_claim(client, operator)

        async def at_resume() -> bool:  # the order that matters, seen from the node
            snapshot = await client.get(VOLUMESNAPSHOT, NAMESPACE, "b1-0")
            return bool(snapshot and (snapshot.get("status") or {}).get("creationTime"))

        node.on_resume = at_resume
        await client.create(mailbackup("b1"))

        snapshot = await eventually(lambda: client.get(VOLUMESNAPSHOT, NAMESPACE, "b1-0"), what="VolumeSnapshot b1-0")
        assert node.paused and node.endpoints() == ["POST /snapshot"]
        assert node.calls[0].query == {"hold": "60"}
        backup = await client.get(MAILBACKUP, NAMESPACE, "b1")
        assert backup is not None and backup["status"]["phase"] == "Running" and backup["status"]["startedAt"]
        assert snapshot["spec"] == {"source": {"persistentVolumeClaimName": "data-example-com-0"}}
        assert snapshot["metadata"]["labels"] == {
            "app.kubernetes.io/managed-by": "mailfleet-operator",
            "mailfleet.io/backup": "b1",
            "mailfleet.io/maildomain": "example-com",
        }
        (owner,) = snapshot["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("MailBackup", "b1", backup["metadata"]["uid"])

        await asyncio.sleep(0.3)  # many looks at the snapshot: not cut yet, so the node keeps holding writes
        assert node.paused and node.endpoints() == ["POST /snapshot"]

        await cut(client, "b1-0", ready=False)

        async def resumed() -> bool:
            return not node.paused

        await eventually(resumed, what="DELETE /snapshot")
        assert node.endpoints() == ["POST /snapshot", "DELETE /snapshot"]
        assert node.seen_at_resume == [True]  # the snapshot was there, and cut, before writes resumed
        await asyncio.sleep(0.2)  # cut but not ready to use: not Completed yet
        assert await phase_of(client, "b1", "Running")

        await cut(client, "b1-0", ready=True)
        done = await eventually(lambda: phase_of(client, "b1", "Completed"))
        assert done["status"]["snapshots"] == ["b1-0"]
        assert done["status"]["pointInTime"] == node.point_in_time
        assert done["status"]["completedAt"] >= done["status"]["startedAt"]
        assert not done["status"].get("error")
        assert node.endpoints() == ["POST /snapshot", "DELETE /snapshot"] and node.holds_expired == 0
        # The Event is posted after the status that says Completed: waited for, not read at once.
        await eventually(lambda: events(client, "b1", "Completed"), what="the Completed Event")
        assert [e["reason"] for e in await events(client, "b1")] == ["Started", "Completed"]
        assert await counted(operator, "VolumeSnapshot", "completed") == 1


async def test_two_backups_of_a_domain_take_turns(api: ApiServer, client, node: FakeNode) -> None:
    serve_backup_kinds(api)
    async with run_operator(**fast(node)) as operator, snapshot_controller(client):
        await domain_with_claim(client, operator)
        await client.create(mailbackup("b1"))
        await client.create(mailbackup("b2"))
        for name in ("b1", "b2"):
            await eventually(lambda: phase_of(client, name, "Completed"), what=f"{name} Completed")  # noqa: B023
    # The node never saw a second checkpoint while it held one (it would have answered 409).
    assert node.endpoints() == ["POST /snapshot", "DELETE /snapshot"] * 2
    assert all(call.status == 200 for call in node.calls)


async def test_a_node_refusing_the_checkpoint_fails_the_backup_after_a_few_tries(
    api: ApiServer, client, node: FakeNode
) -> None:
    serve_backup_kinds(api)
    node.refuse_snapshot = (503, "writes in flight did not finish within 30 s")
    async with run_operator(**fast(node)) as operator:
        await domain_with_claim(client, operator)
        await client.create(mailbackup("b1"))
        failed = await eventually(lambda: phase_of(client, "b1", "Failed"))
        assert await counted(operator, "VolumeSnapshot", "failed") == 1
    error = failed["status"]["error"]
    assert error.startswith(f"node example-com-0: POST {node.url}/snapshot: HTTP 503: ")
    assert error.endswith("writes in flight did not finish within 30 s")
    assert failed["status"]["completedAt"] and not failed["status"].get("snapshots")
    assert node.endpoints() == ["POST /snapshot"] * 3  # backup_attempts
    assert not node.paused
    assert await client.list(VOLUMESNAPSHOT, NAMESPACE) == []
    (warning,) = await events(client, "b1", "Failed")
    assert (warning["type"], warning["message"]) == ("Warning", error)


async def test_a_snapshot_that_fails_resumes_the_node_and_is_not_kept(api: ApiServer, client, node: FakeNode) -> None:
    serve_backup_kinds(api)
    async with run_operator(**fast(node)) as operator:
        await domain_with_claim(client, operator)
        await client.create(mailbackup("b1"))
        await eventually(lambda: client.get(VOLUMESNAPSHOT, NAMESPACE, "b1-0"), what="VolumeSnapshot b1-0")
        error = {"time": _now(), "message": "Failed to create snapshot: the CSI driver said no"}
        await set_status(client, VOLUMESNAPSHOT, "b1-0", {"readyToUse": False, "error": error})
        failed = await eventually(lambda: phase_of(client, "b1", "Failed"))
    assert failed["status"]["error"] == "VolumeSnapshot b1-0: Failed to create snapshot: the CSI driver said no"
    assert node.endpoints() == ["POST /snapshot", "DELETE /snapshot"] and not node.paused
    assert await client.get(VOLUMESNAPSHOT, NAMESPACE, "b1-0") is None


async def test_deleting_a_running_backup_resumes_the_node(api: ApiServer, client, node: FakeNode) -> None:
    serve_backup_kinds(api)
    async with run_operator(**fast(node)) as operator:
        await domain_with_claim(client, operator)
        await client.create(mailbackup("b1"))
        await eventually(lambda: client.get(VOLUMESNAPSHOT, NAMESPACE, "b1-0"), what="VolumeSnapshot b1-0")
        assert node.paused
        await client.delete(MAILBACKUP, NAMESPACE, "b1")

        async def resumed() -> bool:
            return not node.paused

        await eventually(resumed, what="DELETE /snapshot")
        await asyncio.sleep(0.2)
        backups = operator.running().backups
        assert backups is not None and backups.running() == []
    assert node.endpoints() == ["POST /snapshot", "DELETE /snapshot"]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no VolumeSnapshot API", "the VolumeSnapshot API (snapshot.storage.k8s.io/v1 volumesnapshots) is not served"),
        ("no MailDomain", "MailDomain example-com not found"),
        ("no claim", "PersistentVolumeClaim data-example-com-0 does not exist: node 0 has no volume yet"),
    ],
)
async def test_a_backup_that_cannot_be_taken_fails_before_any_node_is_paused(
    api: ApiServer, client, node: FakeNode, case: str, expected: str
) -> None:
    serve_backup_kinds(api, volume_snapshots=case != "no VolumeSnapshot API")
    async with run_operator(**fast(node)) as operator:
        if case != "no MailDomain":
            await client.create(maildomain())
            await settled(operator)
        if case == "no VolumeSnapshot API":
            await client.create(node_claim("data-example-com-0"))
        await client.create(mailbackup("b1"))
        failed = await eventually(lambda: phase_of(client, "b1", "Failed"))
    assert failed["status"]["error"].startswith(expected)
    if case == "no VolumeSnapshot API":
        assert "install the CSI snapshot CRDs and snapshot controller" in failed["status"]["error"]
        assert "or use method: Archive" in failed["status"]["error"]
    assert node.calls == []
    assert [e["type"] for e in await events(client, "b1", "Failed")] == ["Warning"]


# -- Archive ---------------------------------------------------------------------------------------


async def test_an_archive_backup_lists_where_each_node_wrote_it(api: ApiServer, client, node: FakeNode) -> None:
    node.unavailable = 1  # the first call finds the node not ready: tried again
    async with run_operator(**fast(node)) as operator:
        await client.create(maildomain())
        await settled(operator)
        await client.create(mailbackup("b1", method="Archive"))
        done = await eventually(lambda: phase_of(client, "b1", "Completed"))
        assert await counted(operator, "Archive", "completed") == 1
    assert done["status"]["snapshots"] == ["example-com-0:/var/lib/mailnode/backups/b1.tar"]
    assert done["status"]["pointInTime"] == node.archives["b1"].point_in_time
    assert [(c.endpoint, c.status) for c in node.calls[:2]] == [("POST /backups", 503), ("POST /backups", 202)]
    assert set(node.endpoints()[2:]) == {"GET /backups/b1"}


async def test_an_archive_the_node_fails_fails_the_backup(api: ApiServer, client, node: FakeNode) -> None:
    node.archive_error = "[Errno 28] No space left on device"
    async with run_operator(**fast(node)) as operator:
        await client.create(maildomain())
        await settled(operator)
        await client.create(mailbackup("b1", method="Archive"))
        failed = await eventually(lambda: phase_of(client, "b1", "Failed"))
    assert failed["status"]["error"] == "node example-com-0: archive b1 failed: [Errno 28] No space left on device"


async def test_a_node_that_stays_unavailable_fails_the_backup_with_its_error(
    api: ApiServer, client, node: FakeNode
) -> None:
    node.unavailable = 100
    async with run_operator(**fast(node)) as operator:
        await client.create(maildomain())
        await settled(operator)
        await client.create(mailbackup("b1", method="Archive"))
        failed = await eventually(lambda: phase_of(client, "b1", "Failed"))
    assert failed["status"]["error"] == f"node example-com-0: POST {node.url}/backups: HTTP 503: {STORE_NOT_OPEN}"
    assert node.endpoints() == ["POST /backups"] * 3


# -- An operator that restarts ---------------------------------------------------------------------


async def test_a_restarted_operator_keeps_the_snapshots_already_cut(api: ApiServer, client, node: FakeNode) -> None:
    serve_backup_kinds(api)
    await client.create(maildomain())
    await client.create(node_claim("data-example-com-0"))
    backup = await client.create(mailbackup("b1"))
    await set_status(client, MAILBACKUP, "b1", {"phase": "Running", "startedAt": _now()})
    owner = {
        "apiVersion": "mailfleet.io/v1alpha1",
        "kind": "MailBackup",
        "name": "b1",
        "uid": backup["metadata"]["uid"],
    }
    await client.create(
        {
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshot",
            "metadata": {
                "name": "b1-0",
                "namespace": NAMESPACE,
                "annotations": {"mailfleet.io/point-in-time": "2026-11-27T07:00:00.123456+00:00"},
                "ownerReferences": [owner],
            },
            "spec": {"source": {"persistentVolumeClaimName": "data-example-com-0"}},
        }
    )
    await cut(client, "b1-0", ready=True)
    async with run_operator(**fast(node)):
        done = await eventually(lambda: phase_of(client, "b1", "Completed"))
    assert done["status"]["pointInTime"] == "2026-11-27T07:00:00.123456+00:00"
    assert done["status"]["snapshots"] == ["b1-0"]
    assert node.calls == []  # cut before the restart: no second checkpoint


async def test_a_restarted_operator_asks_again_for_a_running_archive(api: ApiServer, client, node: FakeNode) -> None:
    await client.create(maildomain())
    await client.create(mailbackup("b1", method="Archive"))
    await set_status(client, MAILBACKUP, "b1", {"phase": "Running", "startedAt": _now()})
    node.archives["b1"] = admin.Archive(name="b1", state="Completed", path="/backups/b1.tar", point_in_time=_now())
    async with run_operator(**fast(node)):
        done = await eventually(lambda: phase_of(client, "b1", "Completed"))
    assert done["status"]["snapshots"] == ["example-com-0:/backups/b1.tar"]
    assert [(c.endpoint, c.status) for c in node.calls] == [("POST /backups", 200)]


# -- Restore ---------------------------------------------------------------------------------------


async def completed_backup(client: k8s.Client, name: str = "b1", *, method: str = "VolumeSnapshot") -> None:
    """A Completed MailBackup of a MailDomain gone by now, with its ready VolumeSnapshot. Created with its
    status (the emulator keeps it; the status write after it is what a real API server needs): a running
    operator that saw it without a phase would take it (and fail it: its domain is gone)."""
    snapshots = [f"{name}-0"] if method == "VolumeSnapshot" else [f"old-0:/var/lib/mailnode/backups/{name}.tar"]
    status = {"phase": "Completed", "startedAt": _now(), "completedAt": _now(), "snapshots": snapshots}
    await client.create({**mailbackup(name, domain_ref="old", method=method), "status": status})
    await set_status(client, MAILBACKUP, name, status)
    if method == "VolumeSnapshot":
        await client.create(
            {
                "apiVersion": "snapshot.storage.k8s.io/v1",
                "kind": "VolumeSnapshot",
                "metadata": {"name": f"{name}-0", "namespace": NAMESPACE},
                "spec": {"source": {"persistentVolumeClaimName": "data-old-0"}},
            }
        )
        await cut(client, f"{name}-0", ready=True)


async def test_a_restored_domain_gets_its_claims_from_the_snapshots_before_its_statefulset(
    api: ApiServer, client
) -> None:
    serve_backup_kinds(api)
    await completed_backup(client)
    storage = {"size": "2Gi", "storageClassName": "fast"}
    async with run_operator() as operator:
        await client.create(maildomain(restore={"backupName": "b1"}, storage=storage))
        await settled(operator)
        statefulset = await client.get(STATEFULSET, NAMESPACE, "example-com")

        # Read at creation only: a StatefulSet deleted later is put back on the claims made, the backup gone.
        await client.delete(MAILBACKUP, NAMESPACE, "b1")
        await client.delete(STATEFULSET, NAMESPACE, "example-com")
        await eventually(lambda: client.get(STATEFULSET, NAMESPACE, "example-com"), what="the StatefulSet, put back")
        await eventually(lambda: status_of(client, MAILDOMAIN, "example-com", "Degraded", status="False"))
    claim = await client.get(PERSISTENTVOLUMECLAIM, NAMESPACE, "data-example-com-0")
    assert claim is not None
    assert claim["spec"]["dataSource"] == {
        "apiGroup": "snapshot.storage.k8s.io",
        "kind": "VolumeSnapshot",
        "name": "b1-0",
    }
    assert "ownerReferences" not in claim["metadata"]  # it outlives the StatefulSet, as its own claims do
    assert claim["metadata"]["labels"]["app.kubernetes.io/instance"] == "example-com"
    assert statefulset is not None
    template = statefulset["spec"]["volumeClaimTemplates"][0]["spec"]
    assert {k: v for k, v in claim["spec"].items() if k != "dataSource"} == template
    assert template["resources"]["requests"]["storage"] == "2Gi" and template["storageClassName"] == "fast"
    created = [(plural, name) for method, plural, name, sub in api.writes if method == "POST" and sub is None]
    assert created.index(("persistentvolumeclaims", "data-example-com-0")) < created.index(
        ("statefulsets", "example-com")
    )
    assert [plural for plural, _ in created].count("persistentvolumeclaims") == 1
    (restored,) = await events(client, "example-com", "Restored")
    assert restored["message"] == "created PersistentVolumeClaim data-example-com-0 from VolumeSnapshot b1-0"


@pytest.mark.parametrize(
    ("case", "reason", "message"),
    [
        (
            "missing",
            "RestoreBackupNotFound",
            "MailBackup b1 (spec.restore.backupName) does not exist in namespace mail",
        ),
        ("failed", "RestoreBackupNotCompleted", "MailBackup b1 (spec.restore.backupName) is Failed, not Completed"),
        ("archive", "RestoreBackupNotVolumeSnapshot", "MailBackup b1 (spec.restore.backupName) is an Archive backup;"),
        (
            "no VolumeSnapshot API",
            "VolumeSnapshotAPIMissing",
            "cannot restore MailBackup b1 (spec.restore.backupName):",
        ),
        ("claim exists", "RestoreClaimExists", "PersistentVolumeClaim data-example-com-0 already exists and was not"),
        (
            "snapshot gone",
            "RestoreSnapshotNotFound",
            "MailBackup b1 (spec.restore.backupName) has no VolumeSnapshot b1-0",
        ),
    ],
)
async def test_a_restore_that_cannot_be_done_is_refused_with_nothing_written(
    api: ApiServer, client, case: str, reason: str, message: str
) -> None:
    serve_backup_kinds(api, volume_snapshots=case != "no VolumeSnapshot API")
    if case == "failed":
        await client.create(mailbackup("b1", domain_ref="old"))
        await set_status(client, MAILBACKUP, "b1", {"phase": "Failed", "error": "MailDomain old not found"})
    elif case == "archive":
        await completed_backup(client, method="Archive")
    elif case == "no VolumeSnapshot API":
        await client.create(mailbackup("b1", domain_ref="old"))
        await set_status(client, MAILBACKUP, "b1", {"phase": "Completed", "snapshots": ["b1-0"]})
    elif case == "snapshot gone":
        await completed_backup(client)
        await client.delete(VOLUMESNAPSHOT, NAMESPACE, "b1-0")
    elif case == "claim exists":
        await completed_backup(client)
        await client.create(node_claim("data-example-com-0"))  # left by an earlier MailDomain of that name
    before = len(api.writes)
    async with run_operator():
        await client.create(maildomain(restore={"backupName": "b1"}))
        domain = await eventually(
            lambda: status_of(client, MAILDOMAIN, "example-com", "Degraded", status="True", reason=reason)
        )
        warnings = await eventually(lambda: events(client, "example-com", reason))
    assert condition(domain, "Ready")["status"] == "False" and condition(domain, "Ready")["reason"] == reason
    assert condition(domain, "Degraded")["message"].startswith(message)
    assert [(e["type"], e["message"]) for e in warnings] == [("Warning", condition(domain, "Degraded")["message"])]
    written = {(plural, sub) for method, plural, _, sub in api.writes[before:]}
    assert written <= {("maildomains", None), ("maildomains", "status"), ("events", None)}
    assert await client.get(STATEFULSET, NAMESPACE, "example-com") is None
    assert await client.get(CONFIGMAP, NAMESPACE, "example-com-config") is None


async def test_a_restore_waiting_for_its_backup_goes_ahead_when_the_backup_completes(api: ApiServer, client) -> None:
    """The MailDomain is refused while the backup is not Completed; the backup's completion (a MailBackup
    event) reconciles it again at once, not at the next resync (300 s here)."""
    serve_backup_kinds(api)
    await client.create(mailbackup("b1", domain_ref="old"))
    await set_status(client, MAILBACKUP, "b1", {"phase": "Failed", "error": "the node did not answer"})
    async with run_operator():
        await client.create(maildomain(restore={"backupName": "b1"}))
        await eventually(
            lambda: status_of(
                client, MAILDOMAIN, "example-com", "Degraded", status="True", reason="RestoreBackupNotCompleted"
            )
        )
        await client.delete(MAILBACKUP, NAMESPACE, "b1")
        await completed_backup(client)
        # within a tenth of the resync: the event, not the resync, brought it (generous for a loaded machine)
        await eventually(lambda: client.get(STATEFULSET, NAMESPACE, "example-com"), what="the StatefulSet", within=30)
    claim = await client.get(PERSISTENTVOLUMECLAIM, NAMESPACE, "data-example-com-0")
    assert claim is not None and claim["spec"]["dataSource"]["name"] == "b1-0"
