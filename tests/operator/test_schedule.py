"""Scheduled backups (docs/backups.md, "In Kubernetes"), with the operator run by kopf against the emulator
and a fake clock (Options.clock) that the test moves:

- no backup when a domain is created; one MailBackup when the schedule comes due, with the schedule's
  labels and annotation and an Event; one only, for the latest time, after missed times;
- retention deletes the oldest completed scheduled backups and their VolumeSnapshots, never one made by
  hand;
- status.lastBackup and the BackupsHealthy condition: current, stale once two periods pass, failed, no
  VolumeSnapshot API; no condition without spec.backup; a domain reconcile leaves them alone;
- with the backup runner and a fake node, a scheduled backup completes and becomes the lastBackup.

The test plays the backup runner where it needs finished backups (tests.operator.conftest.finished_backup);
the operator's own runner tries the backups the schedule makes, and fails them (no node answers) unless
the fake node does.
"""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

from mailfleet import handlers, k8s
from mailwire import admin
from tests.operator.conftest import (
    MAILBACKUP,
    MAILDOMAIN,
    NAMESPACE,
    VOLUMESNAPSHOT,
    FakeClock,
    condition,
    events,
    eventually,
    finished_backup,
    maildomain,
    rfc3339,
    run_operator,
    serve_backup_kinds,
    settled,
    status_of,
)
from tests.operator.emulator import ApiServer
from tests.operator.fakenode import FakeNode

SCHEDULE = "0 3 * * *"  # every day at 03:00 UTC
NOWHERE = "http://127.0.0.1:1"  # no node answers: the operator's runner fails the backups it tries


def fast(clock: FakeClock, **options: Any) -> dict[str, Any]:
    return {
        "clock": clock,
        "schedule_interval": 0.05,
        "node_url": NOWHERE,
        "backup_attempts": 1,
        "backup_retry": 0.05,
        **options,
    }


def backed_up(**backup: Any) -> dict[str, Any]:
    return maildomain(backup={"schedule": SCHEDULE, "method": "Archive", **backup})


def next_3am(after: datetime.datetime) -> datetime.datetime:
    at = after.replace(hour=3, minute=0, second=0, microsecond=0)
    return at if at > after else at + datetime.timedelta(days=1)


def last_3am(now: datetime.datetime) -> datetime.datetime:
    at = now.replace(hour=3, minute=0, second=0, microsecond=0)
    return at if at <= now else at - datetime.timedelta(days=1)


async def created_at(client: k8s.Client, name: str = "example-com") -> datetime.datetime:
    obj = await client.get(MAILDOMAIN, NAMESPACE, name)
    assert obj is not None
    return datetime.datetime.fromisoformat(obj["metadata"]["creationTimestamp"])


async def backup_names(client: k8s.Client) -> list[str]:
    return sorted(b["metadata"]["name"] for b in await client.list(MAILBACKUP, NAMESPACE))


def metric(operator: handlers.Operator, sample: str, **labels: str) -> float | None:
    """A sample the running operator exposes; None when it has no such series."""
    value = operator.running().ctx.metrics.registry.get_sample_value(sample, labels)
    return None if value is None else float(value)


async def metric_is(operator: handlers.Operator, value: float, sample: str, **labels: str) -> None:
    """Until the sample has the value (the operator sets it just after the status the test looked at)."""

    async def probe() -> bool:
        return metric(operator, sample, **labels) == value

    await eventually(probe, what=f"{sample}{labels} == {value}")


async def healthy(client: k8s.Client, **expected: object) -> dict[str, Any] | None:
    return await status_of(client, MAILDOMAIN, "example-com", "BackupsHealthy", **expected)


# -- the schedule -----------------------------------------------------------------------------------


async def test_a_due_schedule_makes_one_mailbackup(api, client) -> None:
    clock = FakeClock()
    async with run_operator(**fast(clock)) as operator:
        await client.create(backed_up())
        await eventually(lambda: healthy(client, status="True", reason="BackupsCurrent"), what="BackupsHealthy")
        assert await backup_names(client) == []  # none at creation
        due = next_3am(await created_at(client))
        clock.now = due - datetime.timedelta(seconds=1)
        await asyncio.sleep(0.3)
        assert await backup_names(client) == []  # not before its time

        clock.now = due + datetime.timedelta(seconds=30)
        name = f"example-com-{due:%Y%m%d%H%M}"
        await eventually(lambda: _names_are(client, [name]), what=f"MailBackup {name}")
        await asyncio.sleep(0.5)  # passes go on, the runner fails it: still one
        assert await backup_names(client) == [name]

        backup = await client.get(MAILBACKUP, NAMESPACE, name)
        assert backup is not None
        assert backup["spec"] == {"domainRef": "example-com", "method": "Archive"}
        assert backup["metadata"]["labels"] == {
            "app.kubernetes.io/managed-by": "mailfleet-operator",
            "mailfleet.io/maildomain": "example-com",
            "mailfleet.io/scheduled": "true",
        }
        assert backup["metadata"]["annotations"] == {"mailfleet.io/scheduled-at": rfc3339(due)}
        assert not backup["metadata"].get("ownerReferences")  # it outlives its domain
        (event,) = await events(client, "example-com", "BackupScheduled")
        assert name in event["message"] and event["involvedObject"]["kind"] == "MailDomain"
        await metric_is(operator, 1, "mailfleet_operator_scheduled_backups_total")


async def test_after_missed_times_one_backup_for_the_latest(api, client) -> None:
    clock = FakeClock()
    async with run_operator(**fast(clock)):
        await client.create(backed_up())
        await eventually(lambda: healthy(client), what="BackupsHealthy")
        clock.now = await created_at(client) + datetime.timedelta(days=5, hours=1)
        name = f"example-com-{last_3am(clock.now):%Y%m%d%H%M}"
        await eventually(lambda: _names_are(client, [name]), what=f"MailBackup {name} alone")
        await asyncio.sleep(0.5)
        assert await backup_names(client) == [name]
        assert len(await events(client, "example-com", "BackupScheduled")) == 1


async def _names_are(client: k8s.Client, expected: list[str]) -> bool:
    return await backup_names(client) == expected


# -- retention --------------------------------------------------------------------------------------


def volume_snapshot(backup: str) -> dict[str, Any]:
    return {
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": {
            "name": f"{backup}-0",
            "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/managed-by": "mailfleet-operator", "mailfleet.io/backup": backup},
        },
        "spec": {"source": {"persistentVolumeClaimName": "data-example-com-0"}},
    }


async def test_retention_deletes_the_oldest_scheduled_backups_and_their_snapshots(api: ApiServer, client) -> None:
    serve_backup_kinds(api)
    clock = FakeClock()
    days = [last_3am(clock.now) - datetime.timedelta(days=n) for n in (4, 3, 2, 1)]
    scheduled = [f"example-com-{day:%Y%m%d%H%M}" for day in days]
    # Everything exists before the domain, so the operator sees it whole at its first pass.
    for name in [*scheduled, "by-hand"]:
        await client.create(volume_snapshot(name))
    for name, day in zip(scheduled, days, strict=True):
        completed = day + datetime.timedelta(minutes=5)
        await finished_backup(client, name, completed_at=completed, scheduled=True, method="VolumeSnapshot")
    by_hand = clock.now - datetime.timedelta(days=30)  # older than all: never deleted all the same
    await finished_backup(client, "by-hand", completed_at=by_hand, method="VolumeSnapshot")
    await finished_backup(
        client, "failed-by-hand", completed_at=by_hand, phase="Failed", error="x", method="VolumeSnapshot"
    )

    async with run_operator(**fast(clock)) as operator:
        await client.create(backed_up(method="VolumeSnapshot", retention={"keepLast": 2}))
        kept = sorted(["by-hand", "failed-by-hand", *scheduled[2:]])
        await eventually(lambda: _names_are(client, kept), what=f"MailBackups {kept}")
        snapshots = sorted(s["metadata"]["name"] for s in await client.list(VOLUMESNAPSHOT, NAMESPACE))
        assert snapshots == sorted(f"{name}-0" for name in ["by-hand", *scheduled[2:]])
        deleted = await eventually(lambda: _events(client, "BackupDeleted", 2), what="2 BackupDeleted Events")
        assert sorted(e["message"].split()[2] for e in deleted) == scheduled[:2]
        assert all("and its 1 VolumeSnapshot" in e["message"] and "keepLast" in e["message"] for e in deleted)
        await metric_is(operator, 2, "mailfleet_operator_backups_deleted_total")
        domain = await eventually(lambda: _last_backup_is(client, scheduled[3]), what="lastBackup")
        assert domain["status"]["lastBackup"] == {
            "name": scheduled[3],
            "method": "VolumeSnapshot",
            "completedAt": rfc3339(days[3] + datetime.timedelta(minutes=5)),
        }


async def _events(client: k8s.Client, reason: str, count: int) -> list[dict[str, Any]] | None:
    found = await events(client, "example-com", reason)
    return found if len(found) == count else None


async def _last_backup_is(client: k8s.Client, name: str) -> dict[str, Any] | None:
    obj = await client.get(MAILDOMAIN, NAMESPACE, "example-com")
    return obj if ((obj or {}).get("status") or {}).get("lastBackup", {}).get("name") == name else None


# -- status -----------------------------------------------------------------------------------------


async def test_last_backup_and_backups_healthy_follow_the_backups(api, client) -> None:
    clock = FakeClock()
    key = {"namespace": NAMESPACE, "maildomain": "example-com"}
    async with run_operator(**fast(clock)) as operator:
        await client.create(backed_up())
        first = await eventually(lambda: healthy(client, status="True", reason="BackupsCurrent"), what="current")
        assert "no backup yet" in condition(first, "BackupsHealthy")["message"]
        await metric_is(operator, 0, "mailfleet_operator_backups_stale", **key)

        # A backup made by hand counts: lastBackup, and the condition names it.
        completed = clock.now - datetime.timedelta(hours=1)
        await finished_backup(client, "manual-1", completed_at=completed)
        current = await eventually(lambda: _last_backup_is(client, "manual-1"), what="lastBackup manual-1")
        assert current["status"]["lastBackup"] == {
            "name": "manual-1",
            "method": "Archive",
            "completedAt": rfc3339(completed),
        }
        await eventually(lambda: _message_names(client, "manual-1"), what="BackupsHealthy naming manual-1")
        await metric_is(operator, int(completed.timestamp()), "mailfleet_operator_last_backup_timestamp_seconds", **key)
        since = condition(await healthy(client), "BackupsHealthy")["lastTransitionTime"]

        # Three days on, nothing newer completed (the scheduled one the runner tries fails): stale.
        clock.advance(days=3)
        stale = await eventually(lambda: healthy(client, status="False", reason="BackupsStale"), what="stale")
        found = condition(stale, "BackupsHealthy")
        assert "manual-1" in found["message"] and "two schedule periods (2d)" in found["message"]
        assert found["lastTransitionTime"] == rfc3339(clock.now) != since  # the operator's clock
        await metric_is(operator, 1, "mailfleet_operator_backups_stale", **key)

        # A new completed backup: current again.
        await finished_backup(client, "manual-2", completed_at=clock.now - datetime.timedelta(hours=1))
        await eventually(lambda: healthy(client, status="True", reason="BackupsCurrent"), what="current again")
        await metric_is(operator, 0, "mailfleet_operator_backups_stale", **key)

        # The newest finished one failed: says why.
        await finished_backup(
            client,
            "manual-3",
            completed_at=clock.now - datetime.timedelta(minutes=30),
            phase="Failed",
            error="node 0: the store is not open",
        )
        failed = await eventually(lambda: healthy(client, status="False", reason="BackupFailed"), what="failed")
        assert (
            condition(failed, "BackupsHealthy")["message"]
            == "MailBackup manual-3 failed: node 0: the store is not open"
        )
        assert failed["status"]["lastBackup"]["name"] == "manual-2"


async def _message_names(client: k8s.Client, name: str) -> bool:
    return name in condition(await healthy(client), "BackupsHealthy").get("message", "")


async def test_the_volume_snapshot_method_without_the_api(api, client) -> None:
    async with run_operator(**fast(FakeClock())):
        await client.create(backed_up(method="VolumeSnapshot"))
        missing = await eventually(
            lambda: healthy(client, status="False", reason="VolumeSnapshotAPIMissing"), what="API missing"
        )
        assert "snapshot.storage.k8s.io/v1" in condition(missing, "BackupsHealthy")["message"]


async def test_without_spec_backup_last_backup_only_and_the_domain_reconcile_keeps_the_condition(api, client) -> None:
    clock = FakeClock()
    async with run_operator(**fast(clock)) as operator:
        await client.create(maildomain())
        await finished_backup(client, "manual-1", completed_at=clock.now - datetime.timedelta(hours=2))
        await eventually(lambda: _last_backup_is(client, "manual-1"), what="lastBackup without spec.backup")
        await asyncio.sleep(0.3)
        assert condition(await client.get(MAILDOMAIN, NAMESPACE, "example-com"), "BackupsHealthy") == {}

        await client.patch(MAILDOMAIN, NAMESPACE, "example-com", {"spec": {"backup": {"schedule": SCHEDULE}}})
        await eventually(lambda: healthy(client, reason="VolumeSnapshotAPIMissing"), what="BackupsHealthy")
        await client.patch(MAILDOMAIN, NAMESPACE, "example-com", {"spec": {"backup": None}})
        await eventually(lambda: _without_condition(client), what="BackupsHealthy removed")
        assert await _last_backup_is(client, "manual-1")

        added = await client.patch(MAILDOMAIN, NAMESPACE, "example-com", {"spec": {"backup": {"schedule": SCHEDULE}}})
        # Once the reconcile of that change is written (it may have read the status before the schedule
        # wrote BackupsHealthy, and put it back as it read it: the schedule's next pass writes it again).
        await eventually(lambda: _observed(client, added["metadata"]["generation"]), what="the reconcile")
        await settled(operator)  # and no other reconcile under way
        before = condition(await eventually(lambda: healthy(client), what="BackupsHealthy again"), "BackupsHealthy")
        await _stop_schedule(operator)
        # A domain reconcile (a spec change) writes Ready, Progressing and Degraded, and keeps BackupsHealthy.
        changed = await client.patch(MAILDOMAIN, NAMESPACE, "example-com", {"spec": {"dkim": {"selector": "s2"}}})
        generation = changed["metadata"]["generation"]
        reconciled = await eventually(lambda: _observed(client, generation), what=f"generation {generation}")
        assert condition(reconciled, "BackupsHealthy") == before
        assert condition(reconciled, "Ready") and reconciled["status"]["lastBackup"]["name"] == "manual-1"


async def _without_condition(client: k8s.Client) -> bool:
    return condition(await client.get(MAILDOMAIN, NAMESPACE, "example-com"), "BackupsHealthy") == {}


async def _observed(client: k8s.Client, generation: int) -> dict[str, Any] | None:
    obj = await client.get(MAILDOMAIN, NAMESPACE, "example-com")
    return obj if ((obj or {}).get("status") or {}).get("observedGeneration") == generation else None


async def _stop_schedule(operator: handlers.Operator) -> None:
    """Cancel the operator's schedule loop (in the operator's thread), so only a domain reconcile writes."""
    task = operator.running().schedule_task
    assert task is not None
    task.get_loop().call_soon_threadsafe(task.cancel)

    async def stopped() -> bool:
        return task.done()

    await eventually(stopped, what="the schedule loop stopped")


# -- with the backup runner ------------------------------------------------------------------------


async def test_a_scheduled_backup_runs_and_becomes_the_last_backup(api, client, node: FakeNode) -> None:
    clock = FakeClock()
    async with run_operator(**fast(clock, node_url=node.url, backup_poll=0.05)) as operator:
        await client.create(backed_up())
        await eventually(lambda: healthy(client), what="BackupsHealthy")
        due = next_3am(await created_at(client))
        clock.now = due + datetime.timedelta(minutes=1)
        name = f"example-com-{due:%Y%m%d%H%M}"
        domain = await eventually(lambda: _last_backup_is(client, name), within=30, what=f"lastBackup {name}")
        assert domain["status"]["lastBackup"]["method"] == "Archive"
        await eventually(lambda: _message_names(client, name), what=f"BackupsHealthy naming {name}")
        assert condition(await healthy(client), "BackupsHealthy")["reason"] == "BackupsCurrent"
        await metric_is(operator, 1, "mailfleet_operator_backups_total", method="Archive", result="completed")


async def test_retention_deletes_archives_on_the_node_and_waits_for_a_node_that_cannot_be_asked(
    api, client, node: FakeNode
) -> None:
    """An Archive backup's file is on the node's volume: retention asks the node to delete it (DELETE
    /backups/<name>) before it deletes the MailBackup, and keeps the MailBackup (so the archive is not
    forgotten) while the node does not answer."""
    clock = FakeClock()
    days = [last_3am(clock.now) - datetime.timedelta(days=n) for n in (3, 2, 1)]
    scheduled = [f"example-com-{day:%Y%m%d%H%M}" for day in days]
    for name, day in zip(scheduled, days, strict=True):
        await finished_backup(client, name, completed_at=day + datetime.timedelta(minutes=5), scheduled=True)
        path = f"{node.backup_dir}/{name}.tar"
        node.archives[name] = admin.Archive(name=name, state="Completed", path=path, point_in_time=rfc3339(day))
        snapshots = {"snapshots": [f"example-com-0:{path}"]}
        await client.patch(MAILBACKUP, NAMESPACE, name, {"status": snapshots}, subresource="status")
    node.unavailable = 10**6  # the node answers 503 to everything
    async with run_operator(**fast(clock, node_url=node.url)):
        await client.create(backed_up(retention={"keepLast": 1}))
        await eventually(lambda: _deletes_asked(node, 2), what="the node asked to delete two archives")
        assert sorted(b["metadata"]["name"] for b in await client.list(MAILBACKUP, NAMESPACE)) == scheduled
        node.unavailable = 0
        await eventually(lambda: _names_are(client, scheduled[2:]), what=f"MailBackups {scheduled[2:]}")
    assert sorted(node.archives) == scheduled[2:]
    deleted = [c.path for c in node.calls if c.method == "DELETE" and c.status == 200]
    assert sorted(deleted) == [f"/backups/{name}" for name in scheduled[:2]]
    messages = [e["message"] for e in await events(client, "example-com", "BackupDeleted")]
    assert sorted(m.split()[2] for m in messages) == scheduled[:2]
    assert all("and its 1 archive" in m for m in messages)


async def _deletes_asked(node: FakeNode, count: int) -> bool | None:
    asked = {c.path for c in node.calls if c.method == "DELETE" and c.path.startswith("/backups/")}
    return True if len(asked) >= count else None
