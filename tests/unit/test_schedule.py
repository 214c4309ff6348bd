"""Scheduled backups as pure functions (mailfleet.reconcile.schedule): when a backup is due (cron, @daily,
missed runs, never at creation), the MailBackup it makes and its name, which scheduled backups retention
deletes (keepLast, maxAge, never the newest completed one, never one made by hand; hypothesis for the
invariants), staleness, the BackupsHealthy condition and status.lastBackup. Then the loop (Scheduler)
against a fake API and index: a due backup waits for one running and is made once, also when the index
lags and after a restart; the status patch's resourceVersion precondition; a condition that a domain
reconcile overwrote keeps its lastTransitionTime; metric series go with their domain."""

from __future__ import annotations

import copy
import datetime
from typing import Any, cast
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailfleet import api, k8s, kube_types
from mailfleet.k8s.events import Recorder
from mailfleet.metrics import OperatorMetrics
from mailfleet.reconcile import conditions, context, schedule, status
from mailfleet.reconcile.conditions import Condition
from mailfleet.reconcile.context import Context
from mailfleet.reconcile.passwords import PasswordHasher
from mailfleet.reconcile.schedule import Backup
from mailfleet.specs import backup as backup_specs
from mailfleet.specs.common import rfc3339

UTC = datetime.UTC
DAILY_3AM = "0 3 * * *"


def at(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=UTC)


def backup(
    name: str,
    *,
    scheduled: bool = True,
    phase: str | None = "Completed",
    completed: str | None = None,
    scheduled_at: str | None = None,
    error: str | None = None,
    method: str = "Archive",
) -> Backup:
    """A MailBackup as the index shows it, read as the schedule reads it."""
    metadata: kube_types.ObjectMeta = {"name": name, "namespace": "mail", "creationTimestamp": "2026-01-01T00:00:00Z"}
    if scheduled:
        metadata["labels"] = {backup_specs.SCHEDULED_LABEL: "true", backup_specs.DOMAIN_LABEL: "example-com"}
        metadata["annotations"] = {backup_specs.SCHEDULED_AT: scheduled_at or completed or "2026-01-01T00:00:00Z"}
    status: kube_types.MailBackupStatus = {}
    if phase is not None:
        status["phase"] = phase
    if completed is not None:
        status["completedAt"] = completed
    if error is not None:
        status["error"] = error
    return Backup.of({"metadata": metadata, "spec": {"domainRef": "example-com", "method": method}, "status": status})


def retention(keep_last: int = 7, max_age: str | None = None) -> api.RetentionSpec:
    return api.RetentionSpec(keep_last=keep_last, max_age=max_age)


def spec(schedule_: str = DAILY_3AM, method: str = "Archive", **fields: Any) -> api.BackupSpec:
    return api.BackupSpec.model_validate({"schedule": schedule_, "method": method, **fields})


# -- when a backup is due ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        ("2026-03-10T02:59:59", "2026-03-09T03:00:00"),
        ("2026-03-10T03:00:00", "2026-03-10T03:00:00"),  # on the minute: that minute
        ("2026-03-10T03:00:59.5", "2026-03-10T03:00:00"),
        ("2026-03-10T23:00:00", "2026-03-10T03:00:00"),
    ],
)
def test_the_latest_time_is_at_or_before_now(now: str, expected: str) -> None:
    assert schedule.latest(DAILY_3AM, at(now)) == at(expected)


def test_daily_is_midnight() -> None:
    assert schedule.latest("@daily", at("2026-03-10T12:00:00")) == at("2026-03-10T00:00:00")
    assert schedule.following("@daily", at("2026-03-10T00:00:00")) == at("2026-03-11T00:00:00")


def test_no_backup_at_creation_the_first_at_the_first_time_after_it() -> None:
    created = at("2026-03-10T10:00:00")
    assert schedule.due(DAILY_3AM, since=created, now=created) is None
    assert schedule.due(DAILY_3AM, since=created, now=at("2026-03-11T02:59:00")) is None
    assert schedule.due(DAILY_3AM, since=created, now=at("2026-03-11T03:00:10")) == at("2026-03-11T03:00:00")


def test_a_domain_created_on_a_scheduled_minute_waits_for_the_next() -> None:
    created = at("2026-03-10T03:00:00")
    assert schedule.due(DAILY_3AM, since=created, now=at("2026-03-10T03:00:30")) is None


def test_after_missed_runs_only_the_latest_is_due() -> None:
    last = at("2026-03-01T03:00:00")
    assert schedule.due(DAILY_3AM, since=last, now=at("2026-03-10T12:00:00")) == at("2026-03-10T03:00:00")
    assert schedule.due(DAILY_3AM, since=at("2026-03-10T03:00:00"), now=at("2026-03-10T12:00:00")) is None


def test_since_counts_from_the_newest_scheduled_backup_never_before_creation() -> None:
    created = at("2026-03-05T00:00:00")
    backups = [
        backup("a", scheduled_at="2026-03-06T03:00:00Z"),
        backup("b", scheduled_at="2026-03-08T03:00:00Z", phase="Failed"),
        backup("by-hand", scheduled=False, completed="2026-03-09T10:00:00Z"),  # not the schedule's
    ]
    assert schedule.since(backups, created) == at("2026-03-08T03:00:00")
    # Backups of an earlier domain of the same name: the new one starts afresh.
    assert schedule.since(backups, at("2026-03-09T00:00:00")) == at("2026-03-09T00:00:00")
    assert schedule.since([], created) == created


def test_an_unreadable_schedule_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        schedule.latest("61 * * * *", at("2026-03-10T00:00:00"))


def test_the_period_of_a_weekday_schedule_spans_the_weekend() -> None:
    weekdays = "0 9 * * 1-5"
    assert schedule.period(weekdays, at("2026-03-11T10:00:00")) == datetime.timedelta(days=1)  # Wednesday
    assert schedule.period(weekdays, at("2026-03-14T10:00:00")) == datetime.timedelta(days=3)  # Saturday
    assert schedule.period(weekdays, at("2026-03-16T10:00:00")) == datetime.timedelta(days=3)  # Monday
    assert schedule.period("@hourly", at("2026-03-16T10:20:00")) == datetime.timedelta(hours=1)


# -- the MailBackup it makes ------------------------------------------------------------------------


def test_the_name_is_the_domain_and_the_scheduled_minute_in_utc() -> None:
    cet = datetime.timezone(datetime.timedelta(hours=1))
    assert backup_specs.backup_name("example-com", at("2026-11-27T07:05:00")) == "example-com-202611270705"
    assert backup_specs.backup_name("example-com", datetime.datetime(2026, 11, 27, 8, 5, tzinfo=cet)) == (
        "example-com-202611270705"
    )


def test_the_scheduled_mailbackup() -> None:
    body = backup_specs.scheduled_backup("mail", "example-com", "VolumeSnapshot", at("2026-11-27T03:00:00"))
    parsed = api.MailBackup.model_validate(body)  # a valid MailBackup
    assert parsed.metadata.name == "example-com-202611270300"
    assert (parsed.spec.domain_ref, parsed.spec.method) == ("example-com", "VolumeSnapshot")
    assert parsed.metadata.labels == {
        "app.kubernetes.io/managed-by": "mailfleet-operator",
        "mailfleet.io/maildomain": "example-com",
        "mailfleet.io/scheduled": "true",
    }
    assert parsed.metadata.annotations == {"mailfleet.io/scheduled-at": "2026-11-27T03:00:00Z"}
    assert "ownerReferences" not in body["metadata"]  # a backup outlives its domain
    read = Backup.of(cast(kube_types.MailBackup, body))  # as the API server returns it
    assert read.scheduled and read.scheduled_at == at("2026-11-27T03:00:00") and not read.finished


# -- retention --------------------------------------------------------------------------------------


def names(expired: list[schedule.Expired]) -> list[str]:
    return sorted(item.backup.name for item in expired)


def test_keep_last_keeps_the_newest_completed() -> None:
    backups = [backup(f"b{day}", completed=f"2026-03-0{day}T03:10:00Z") for day in range(1, 6)]
    assert names(schedule.expired(backups, retention(keep_last=3), at("2026-03-06T00:00:00"))) == ["b1", "b2"]
    assert schedule.expired(backups, retention(keep_last=5), at("2026-03-06T00:00:00")) == []


def test_max_age_deletes_older_completed_ones_but_never_the_newest() -> None:
    backups = [backup(f"b{day}", completed=f"2026-03-0{day}T03:10:00Z") for day in range(1, 6)]
    now = at("2026-03-05T12:00:00")
    found = schedule.expired(backups, retention(keep_last=10, max_age="2d"), now)
    assert names(found) == ["b1", "b2", "b3"]  # b3 completed 2d8h50m ago, b4 1d8h50m ago
    assert all("maxAge" in item.why for item in found)
    # Everything older than maxAge: the newest completed one stays all the same.
    later = at("2026-04-01T00:00:00")
    assert names(schedule.expired(backups, retention(keep_last=10, max_age="1d"), later)) == ["b1", "b2", "b3", "b4"]


def test_max_age_counts_from_completion() -> None:
    backups = [backup("old", completed="2026-03-01T03:00:00Z"), backup("new", completed="2026-03-02T03:00:00Z")]
    assert schedule.expired(backups, retention(max_age="36h"), at("2026-03-02T15:00:00")) == []
    assert names(schedule.expired(backups, retention(max_age="36h"), at("2026-03-02T15:00:01"))) == ["old"]


def test_made_by_hand_running_and_pending_are_never_deleted() -> None:
    backups = [
        backup("hand-old", scheduled=False, completed="2026-01-01T00:00:00Z"),
        backup("hand-failed", scheduled=False, phase="Failed", completed="2026-01-01T00:00:00Z"),
        backup("running", phase="Running"),
        backup("pending", phase=None),
        backup("b1", completed="2026-03-01T03:00:00Z"),
        backup("b2", completed="2026-03-02T03:00:00Z"),
    ]
    assert names(schedule.expired(backups, retention(keep_last=1, max_age="1h"), at("2026-06-01T00:00:00"))) == ["b1"]


def test_failed_ones_beyond_keep_last_go() -> None:
    backups = [backup(f"f{day}", phase="Failed", completed=f"2026-03-0{day}T03:01:00Z") for day in range(1, 5)]
    backups.append(backup("ok", completed="2026-02-01T03:00:00Z"))
    found = schedule.expired(backups, retention(keep_last=2, max_age="1d"), at("2026-03-05T00:00:00"))
    assert names(found) == ["f1", "f2"]  # maxAge is about completed backups; the completed one is the newest


PHASES = st.sampled_from([None, "Pending", "Running", "Completed", "Failed"])


@st.composite
def backup_sets(draw: st.DrawFn) -> list[Backup]:
    count = draw(st.integers(min_value=0, max_value=12))
    result = []
    for i in range(count):
        phase = draw(PHASES)
        minutes = draw(st.integers(min_value=0, max_value=60 * 24 * 30))
        finished = at("2026-03-01T00:00:00") + datetime.timedelta(minutes=minutes)
        result.append(
            backup(
                f"b{i}",
                scheduled=draw(st.booleans()),
                phase=phase,
                completed=rfc3339(finished) if phase in ("Completed", "Failed") else None,
            )
        )
    return result


@given(
    backup_sets(),
    st.integers(min_value=1, max_value=5),
    st.one_of(st.none(), st.sampled_from(["1h", "1d", "7d", "20d"])),
    st.integers(min_value=0, max_value=60 * 24 * 40),
)
def test_retention_invariants(backups: list[Backup], keep: int, max_age: str | None, minutes: int) -> None:
    now = at("2026-03-01T00:00:00") + datetime.timedelta(minutes=minutes)
    found = schedule.expired(backups, retention(keep_last=keep, max_age=max_age), now)
    deleted = {item.backup.name for item in found}
    assert len(deleted) == len(found)
    # Only scheduled backups that finished.
    assert all(item.backup.scheduled and item.backup.finished for item in found)
    completed = schedule._newest_first(b for b in backups if b.scheduled and b.phase == "Completed")
    failed = schedule._newest_first(b for b in backups if b.scheduled and b.phase == "Failed")
    # Never the newest completed one; at most keepLast completed remain, and each one kept other than the
    # newest is within maxAge; nothing deleted that is within both.
    if completed:
        assert completed[0].name not in deleted
    kept = [b for b in completed if b.name not in deleted]
    assert len(kept) <= keep
    limit = datetime.timedelta(seconds=api.duration_seconds(max_age)) if max_age else None
    for rank, b in enumerate(completed):
        too_old = limit is not None and now - b.finished_at > limit
        assert (b.name in deleted) == (rank > 0 and (rank >= keep or too_old))
    # Failed: the newest keepLast stay.
    assert [b.name for b in failed if b.name not in deleted] == [b.name for b in failed[:keep]]


# -- status -----------------------------------------------------------------------------------------


def test_last_backup_is_the_newest_completed_scheduled_or_not() -> None:
    backups = [
        backup("example-com-202603010300", completed="2026-03-01T03:05:00Z", method="VolumeSnapshot"),
        backup("by-hand", scheduled=False, completed="2026-03-01T12:00:00Z"),
        backup("example-com-202603020300", phase="Failed", completed="2026-03-02T03:01:00Z"),
        backup("example-com-202603030300", phase="Running"),
    ]
    assert schedule.last_backup(backups) == {
        "name": "by-hand",
        "method": "Archive",
        "completedAt": "2026-03-01T12:00:00Z",
    }
    assert schedule.last_backup(backups[2:]) is None


def test_stale_after_two_periods_without_a_completed_backup() -> None:
    created = at("2026-03-01T10:00:00")
    completed = at("2026-03-05T03:05:00")
    assert not schedule.stale(DAILY_3AM, completed_at=completed, created=created, now=at("2026-03-07T03:05:00"))
    assert schedule.stale(DAILY_3AM, completed_at=completed, created=created, now=at("2026-03-07T03:06:00"))
    # None completed: counted from the domain's creation.
    assert not schedule.stale(DAILY_3AM, completed_at=None, created=created, now=at("2026-03-03T10:00:00"))
    assert schedule.stale(DAILY_3AM, completed_at=None, created=created, now=at("2026-03-03T10:01:00"))


def test_health_current() -> None:
    backups = [backup("example-com-202603050300", completed="2026-03-05T03:05:00Z")]
    condition = schedule.health(
        spec(), backups, created=at("2026-03-01T00:00:00"), now=at("2026-03-05T12:00:00"), snapshot_api=False
    )
    assert (condition.type, condition.status, condition.reason) == ("BackupsHealthy", "True", "BackupsCurrent")
    assert "example-com-202603050300" in condition.message


def test_health_of_a_new_domain_is_current_until_two_periods_pass() -> None:
    created = at("2026-03-01T10:00:00")
    young = schedule.health(spec(), [], created=created, now=at("2026-03-02T10:00:00"), snapshot_api=True)
    assert (young.status, young.reason) == ("True", "BackupsCurrent")
    assert "2026-03-02T03:00:00Z" in young.message  # when the first one is for
    old = schedule.health(spec(), [], created=created, now=at("2026-03-04T10:00:00"), snapshot_api=True)
    assert (old.status, old.reason) == ("False", "BackupsStale")
    assert "no backup has completed" in old.message


def test_health_failed_names_the_error() -> None:
    backups = [
        backup("example-com-202603040300", completed="2026-03-04T03:05:00Z"),
        backup("example-com-202603050300", phase="Failed", completed="2026-03-05T03:01:00Z", error="node 0: 503"),
    ]
    condition = schedule.health(
        spec(), backups, created=at("2026-03-01T00:00:00"), now=at("2026-03-05T12:00:00"), snapshot_api=True
    )
    assert (condition.status, condition.reason) == ("False", "BackupFailed")
    assert condition.message == "MailBackup example-com-202603050300 failed: node 0: 503"
    # A newer completed one (by hand, say) makes it current again.
    backups.append(backup("by-hand", scheduled=False, completed="2026-03-05T04:00:00Z"))
    again = schedule.health(
        spec(), backups, created=at("2026-03-01T00:00:00"), now=at("2026-03-05T12:00:00"), snapshot_api=True
    )
    assert again.reason == "BackupsCurrent"


def test_health_stale_outranks_failed_and_keeps_the_error() -> None:
    backups = [
        backup("example-com-202603010300", completed="2026-03-01T03:05:00Z"),
        backup("example-com-202603050300", phase="Failed", completed="2026-03-05T03:01:00Z", error="node 0: 503"),
    ]
    condition = schedule.health(
        spec(), backups, created=at("2026-02-01T00:00:00"), now=at("2026-03-05T12:00:00"), snapshot_api=True
    )
    assert (condition.status, condition.reason) == ("False", "BackupsStale")
    assert "example-com-202603010300" in condition.message and "4d8h ago" in condition.message
    assert "two schedule periods (2d)" in condition.message and "node 0: 503" in condition.message


def test_health_without_the_volume_snapshot_api() -> None:
    condition = schedule.health(
        spec(method="VolumeSnapshot"), [], created=at("2026-03-01T00:00:00"), now=at("2026-03-01T01:00:00"),
        snapshot_api=False,
    )  # fmt: skip
    assert (condition.status, condition.reason) == ("False", "VolumeSnapshotAPIMissing")
    assert "snapshot.storage.k8s.io/v1" in condition.message
    archive = schedule.health(
        spec(method="Archive"), [], created=at("2026-03-01T00:00:00"), now=at("2026-03-01T01:00:00"),
        snapshot_api=False,
    )  # fmt: skip
    assert archive.reason == "BackupsCurrent"


def test_health_of_an_unreadable_schedule() -> None:
    condition = schedule.health(
        spec("61 * * * *"), [], created=at("2026-03-01T00:00:00"), now=at("2026-03-02T00:00:00"), snapshot_api=True
    )
    assert (condition.status, condition.reason) == ("False", "InvalidSchedule")


def test_the_domain_reconcile_and_the_schedule_keep_each_others_conditions() -> None:
    """One status writer (reconcile/status.py), two sources: each replaces only what it owns."""
    assert schedule.CONDITION in status.BACKUPS.conditions
    healthy: kube_types.Condition = {
        "type": "BackupsHealthy", "status": "True", "reason": "BackupsCurrent", "message": "m",
        "lastTransitionTime": "T0", "observedGeneration": 1,
    }  # fmt: skip
    nodes_ready = Condition("Ready", "True", "NodesReady", "1/1 mail nodes ready")
    reconciled = status.merged(
        {"conditions": [healthy]}, status.Report(status.RECONCILE, [nodes_ready]), generation=2, at="T1"
    )
    assert [c["type"] for c in reconciled] == ["Ready", "BackupsHealthy"] and reconciled[1] == healthy
    without_backup = status.merged({"conditions": reconciled}, status.Report(status.BACKUPS, []), generation=2, at="T2")
    assert without_backup == reconciled[:1]  # spec.backup removed: its condition goes, Ready stays
    with pytest.raises(ValueError, match="does not own Ready"):
        status.Report(status.BACKUPS, [nodes_ready])


# -- the loop, against a fake API and a fake index ----------------------------------------------------


class FakeApi:
    """Stands in for the API client: MailDomains and MailBackups in memory, status patches applied and
    recorded, a 409 for a MailBackup that exists, and a 409 for the next status patch when told."""

    def __init__(self) -> None:
        self.domains: dict[str, dict[str, Any]] = {}
        self.backups: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.patches: list[dict[str, Any]] = []
        self.refuse_next_patch = False

    async def list(self, kind: k8s.Kind[Any], namespace: str) -> list[dict[str, Any]]:
        assert kind is context.MAILDOMAIN
        return [copy.deepcopy(body) for body in self.domains.values()]

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        if obj["kind"] == "Event":
            self.events.append(obj)
            return obj
        if obj["metadata"]["name"] in self.backups:
            raise k8s.ApiError(409, "AlreadyExists", "exists")
        self.backups[obj["metadata"]["name"]] = obj
        return obj

    async def patch(
        self, kind: k8s.Kind[Any], namespace: str, name: str, patch: dict[str, Any], **_: Any
    ) -> dict[str, Any]:
        self.patches.append(copy.deepcopy(patch))
        if self.refuse_next_patch:
            self.refuse_next_patch = False
            raise k8s.ApiError(409, "Conflict", "the object has been modified")
        status = self.domains[name].setdefault("status", {})
        for key, value in patch["status"].items():
            if value is None:
                status.pop(key, None)
            else:
                status[key] = value
        self.domains[name]["metadata"]["resourceVersion"] += "1"
        return self.domains[name]

    async def serves(self, kind: k8s.Kind[Any]) -> bool:
        return False


class FakeIndex:
    """kopf's index as the loop reads it: what the test puts there, however late."""

    def __init__(self) -> None:
        self.backups: list[dict[str, Any]] = []

    def namespaces(self) -> list[str]:
        return ["mail"]

    def backups_of(self, namespace: str, domain_name: str) -> list[dict[str, Any]]:
        return list(self.backups)


def scheduler(api_: FakeApi, index: FakeIndex, clock: list[datetime.datetime]) -> schedule.Scheduler:
    view = mock.Mock(namespaces=index.namespaces, backups=index.backups_of)
    ctx = Context(
        client=api_,  # type: ignore[arg-type]
        recorder=Recorder(api_),  # type: ignore[arg-type]
        view=view,
        image="x",
        hasher=PasswordHasher(),
        metrics=OperatorMetrics(),
    )
    return schedule.Scheduler(ctx, clock=lambda: clock[0])


def domain_body(**backup: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"domain": "example.com"}
    if backup:
        spec["backup"] = backup
    return {
        "apiVersion": "mailfleet.io/v1alpha1",
        "kind": "MailDomain",
        "metadata": {
            "name": "example-com",
            "namespace": "mail",
            "uid": "u1",
            "generation": 1,
            "resourceVersion": "7",
            "creationTimestamp": "2026-03-01T10:00:00Z",
        },
        "spec": spec,
    }


def raw_backup(name: str, phase: str | None, completed: str | None = None, scheduled: bool = False) -> dict[str, Any]:
    body = backup_specs.scheduled_backup("mail", "example-com", "Archive", at("2026-03-01T03:00:00"))
    body["metadata"]["name"] = name
    if not scheduled:
        body["metadata"]["labels"], body["metadata"]["annotations"] = {}, {}
    body["status"] = {k: v for k, v in {"phase": phase, "completedAt": completed}.items() if v}
    return body


async def test_a_due_backup_waits_for_the_running_one_and_is_made_once() -> None:
    api_, index, clock = FakeApi(), FakeIndex(), [at("2026-03-05T12:00:00")]
    api_.domains["example-com"] = domain_body(schedule=DAILY_3AM, method="Archive")
    index.backups = [raw_backup("by-hand", "Running")]
    loop = scheduler(api_, index, clock)
    await loop.sweep()
    assert api_.backups == {}  # a node takes one checkpoint at a time

    index.backups = [raw_backup("by-hand", "Completed", "2026-03-05T12:00:00Z")]
    await loop.sweep()
    assert list(api_.backups) == ["example-com-202603050300"]
    assert [e["reason"] for e in api_.events] == ["BackupScheduled"]
    await loop.sweep()  # the index has not shown it yet: made once all the same
    assert len(api_.backups) == 1 and len(api_.events) == 1

    restarted = scheduler(api_, index, clock)  # no memory; the MailBackup exists: a 409, nothing more
    await restarted.sweep()
    assert len(api_.events) == 1
    assert restarted.ctx.metrics.registry.get_sample_value("mailfleet_operator_scheduled_backups_total") == 0


async def test_the_status_patch_holds_the_listed_resource_version_and_a_conflict_is_written_next_time() -> None:
    api_, index, clock = FakeApi(), FakeIndex(), [at("2026-03-02T12:00:00")]
    api_.domains["example-com"] = domain_body(schedule=DAILY_3AM, method="Archive")
    api_.refuse_next_patch = True
    loop = scheduler(api_, index, clock)
    await loop.sweep()
    assert api_.patches[0]["metadata"] == {"resourceVersion": "7"}
    assert "status" not in api_.domains["example-com"]
    await loop.sweep()
    (written,) = api_.domains["example-com"]["status"]["conditions"]
    assert (written["type"], written["reason"]) == ("BackupsHealthy", "BackupsCurrent")
    await loop.sweep()
    assert len(api_.patches) == 2  # unchanged: not written again


async def test_a_condition_put_back_by_a_domain_reconcile_keeps_its_transition_time() -> None:
    api_, index, clock = FakeApi(), FakeIndex(), [at("2026-03-05T12:00:00")]
    api_.domains["example-com"] = domain_body(schedule=DAILY_3AM, method="Archive")
    index.backups = [raw_backup("by-hand", "Completed", "2026-03-01T12:00:00Z")]
    loop = scheduler(api_, index, clock)
    await loop.sweep()
    stale = conditions.find(api_.domains["example-com"]["status"]["conditions"], "BackupsHealthy")
    assert stale is not None and stale["reason"] == "BackupsStale"
    assert stale["lastTransitionTime"] == "2026-03-05T12:00:00Z"
    # A domain reconcile that read the status before this write wrote its own conditions over it.
    api_.domains["example-com"]["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    clock[0] = at("2026-03-05T12:10:00")
    await loop.sweep()
    ready, again = api_.domains["example-com"]["status"]["conditions"]
    assert ready == {"type": "Ready", "status": "True"}
    assert again["lastTransitionTime"] == "2026-03-05T12:00:00Z"  # stale since then, not since now


async def test_without_spec_backup_or_backups_nothing_is_written_and_series_go_with_the_domain() -> None:
    api_, index, clock = FakeApi(), FakeIndex(), [at("2026-03-05T12:00:00")]
    api_.domains["example-com"] = domain_body()
    loop = scheduler(api_, index, clock)
    await loop.sweep()
    assert api_.patches == [] and api_.backups == {}
    index.backups = [raw_backup("by-hand", "Completed", "2026-03-05T11:00:00Z")]
    await loop.sweep()
    assert api_.domains["example-com"]["status"] == {
        "lastBackup": {"name": "by-hand", "method": "Archive", "completedAt": "2026-03-05T11:00:00Z"}
    }
    registry = loop.ctx.metrics.registry
    labels = {"namespace": "mail", "maildomain": "example-com"}
    assert registry.get_sample_value("mailfleet_operator_last_backup_timestamp_seconds", labels) == (
        at("2026-03-05T11:00:00").timestamp()
    )
    assert registry.get_sample_value("mailfleet_operator_backups_stale", labels) is None  # no schedule
    del api_.domains["example-com"]
    await loop.sweep()
    assert registry.get_sample_value("mailfleet_operator_last_backup_timestamp_seconds", labels) is None
