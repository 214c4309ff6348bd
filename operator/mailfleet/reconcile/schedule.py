"""Scheduled backups (docs/backups.md, "In Kubernetes"): a MailBackup `<maildomain>-<YYYYMMDDHHMM>` when a
MailDomain's `spec.backup.schedule` comes due, retention of the scheduled ones, the domain's
`status.lastBackup` and `BackupsHealthy` condition, and their metrics.

The pure part (due times, names, what retention deletes, staleness, the condition) takes `now` and plain
data, and is tested as functions. `run` applies it every `Options.schedule_interval` seconds; handlers.py
starts it at login. It creates and deletes MailBackups (built by specs/backup.py) and reads their status;
running them is the backup runner's job. The domain's status is written through reconcile/status.py, the
one writer, as the `BACKUPS` source. Times are UTC, cron schedules too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Final

import aiohttp
import croniter
import prometheus_client as prom
import pydantic

from mailfleet import api, k8s, kube_types, nodes
from mailfleet.reconcile import backup as backup_runner
from mailfleet.reconcile import conditions, internal, status
from mailfleet.reconcile.conditions import Condition
from mailfleet.reconcile.context import MAILBACKUP, MAILDOMAIN, VOLUMESNAPSHOT, Context, DomainKey, object_key
from mailfleet.specs import backup as backup_specs
from mailfleet.specs.common import rfc3339

log = logging.getLogger(__name__)

CONDITION: Final = "BackupsHealthy"

Clock = Callable[[], datetime.datetime]


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# ---------------------------------------------------------------------------------------------------
# Cron times


def _cron(schedule: str, start: datetime.datetime) -> croniter.croniter:
    """Raises ValueError for a schedule cron cannot read (the CRD's pattern only checks its shape)."""
    return croniter.croniter(schedule, start)


def latest(schedule: str, now: datetime.datetime) -> datetime.datetime:
    """The latest time of the schedule at or before `now`."""
    minute = now.replace(second=0, microsecond=0) + datetime.timedelta(minutes=1)
    return _cron(schedule, minute).get_prev(datetime.datetime)  # strictly before the next minute


def following(schedule: str, after: datetime.datetime) -> datetime.datetime:
    """The first time of the schedule strictly after `after`."""
    return _cron(schedule, after).get_next(datetime.datetime)


def due(schedule: str, *, since: datetime.datetime, now: datetime.datetime) -> datetime.datetime | None:
    """The time a backup is due for: the latest time of the schedule in (since, now], else None. `since` is
    the time the newest scheduled backup was for, or the domain's creation: no backup comes at creation,
    the first comes at the first scheduled time after it, and after a downtime only the latest missed
    time gets one."""
    at = latest(schedule, now)
    return at if at > since else None


def period(schedule: str, now: datetime.datetime) -> datetime.timedelta:
    """The schedule's period around `now`: the longer of the gaps before and after its latest time (so a
    weekday schedule has a three-day period over a weekend, not a one-day one)."""
    at = latest(schedule, now)
    before = _cron(schedule, at).get_prev(datetime.datetime)
    return max(following(schedule, at) - at, at - before)


def parse_time(value: object) -> datetime.datetime | None:
    """An RFC 3339 timestamp as a UTC datetime; None when absent or unreadable."""
    if isinstance(value, datetime.datetime):
        found = value
    elif isinstance(value, str) and value:
        try:
            found = datetime.datetime.fromisoformat(value)
        except ValueError:
            return None
    else:
        return None
    return found.replace(tzinfo=datetime.UTC) if found.tzinfo is None else found.astimezone(datetime.UTC)


# ---------------------------------------------------------------------------------------------------
# MailBackups as the schedule sees them


@dataclasses.dataclass(frozen=True)
class Backup:
    """A MailBackup of a domain: what scheduling, retention and the status read of it."""

    name: str
    method: str | None
    scheduled: bool  # made by the schedule (label mailfleet.io/scheduled: "true"), so retention may delete it
    scheduled_at: datetime.datetime | None
    created: datetime.datetime | None
    phase: str | None  # None: not picked up yet (as Pending)
    completed_at: datetime.datetime | None  # when it completed or failed
    error: str | None
    snapshots: tuple[str, ...] = ()  # status.snapshots: VolumeSnapshot names, or "<pod>:<path>" of archives

    @classmethod
    def of(cls, body: kube_types.MailBackup) -> Backup:
        meta = body.get("metadata") or {}
        spec, status = body.get("spec") or {}, body.get("status") or {}
        return cls(
            name=str(meta.get("name")),
            method=spec.get("method"),
            scheduled=(meta.get("labels") or {}).get(backup_specs.SCHEDULED_LABEL) == "true",
            scheduled_at=parse_time((meta.get("annotations") or {}).get(backup_specs.SCHEDULED_AT)),
            created=parse_time(meta.get("creationTimestamp")),
            phase=status.get("phase"),
            completed_at=parse_time(status.get("completedAt")),
            error=status.get("error"),
            snapshots=tuple(str(s) for s in status.get("snapshots") or ()),
        )

    @property
    def finished(self) -> bool:
        return self.phase in ("Completed", "Failed")

    @property
    def for_time(self) -> datetime.datetime | None:
        """The scheduled time it was made for (its creation when the annotation is missing)."""
        return self.scheduled_at or self.created

    @property
    def finished_at(self) -> datetime.datetime:
        return self.completed_at or self.created or datetime.datetime.min.replace(tzinfo=datetime.UTC)


def _newest_first(backups: Iterable[Backup]) -> list[Backup]:
    return sorted(backups, key=lambda b: (b.finished_at, b.name), reverse=True)


def newest_completed(backups: Iterable[Backup]) -> Backup | None:
    return next(iter(_newest_first(b for b in backups if b.phase == "Completed")), None)


def newest_finished(backups: Iterable[Backup]) -> Backup | None:
    return next(iter(_newest_first(b for b in backups if b.finished)), None)


def since(backups: Iterable[Backup], created: datetime.datetime) -> datetime.datetime:
    """What `due` counts from: the time the newest scheduled backup was for, but never before the domain's
    creation (backups outlive their domain, and a new domain of the same name starts afresh)."""
    times = [b.for_time for b in backups if b.scheduled and b.for_time is not None]
    return max([created, *times])


# ---------------------------------------------------------------------------------------------------
# Retention


@dataclasses.dataclass(frozen=True)
class Expired:
    backup: Backup
    why: str


def expired(backups: Sequence[Backup], retention: api.RetentionSpec, now: datetime.datetime) -> list[Expired]:
    """The scheduled backups retention deletes: Completed ones beyond the newest `keepLast` or completed
    longer than `maxAge` ago, never the newest Completed one; Failed ones beyond the newest `keepLast`
    Failed ones. Pending and Running ones stay, and MailBackups made by hand are never deleted."""
    max_age = datetime.timedelta(seconds=api.duration_seconds(retention.max_age)) if retention.max_age else None
    keep = retention.keep_last
    scheduled = [b for b in backups if b.scheduled]
    result = []
    for index, backup in enumerate(_newest_first(b for b in scheduled if b.phase == "Completed")):
        if index == 0:
            continue
        if index >= keep:
            result.append(Expired(backup, f"beyond the newest {keep} completed (retention.keepLast)"))
        elif max_age is not None and now - backup.finished_at > max_age:
            result.append(Expired(backup, f"completed more than {retention.max_age} ago (retention.maxAge)"))
    for index, backup in enumerate(_newest_first(b for b in scheduled if b.phase == "Failed")):
        if index >= keep:
            result.append(Expired(backup, f"failed, and beyond the newest {keep} failed (retention.keepLast)"))
    return result


# ---------------------------------------------------------------------------------------------------
# Status


def stale(
    schedule: str, *, completed_at: datetime.datetime | None, created: datetime.datetime, now: datetime.datetime
) -> bool:
    """Whether the newest completed backup (completed at `completed_at`; None: none yet, counted from the
    domain's creation) is older than two schedule periods."""
    return now - (completed_at or created) > 2 * period(schedule, now)


def _duration(delta: datetime.timedelta) -> str:
    """2d3h, 5h12m, 45m, 30s: the two largest units."""
    seconds = max(0, int(delta.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s")) if n]
    return "".join(parts[:2]) or "0s"


def health(
    backup: api.BackupSpec,
    backups: Sequence[Backup],
    *,
    created: datetime.datetime,
    now: datetime.datetime,
    snapshot_api: bool,
) -> Condition:
    """The BackupsHealthy condition of a domain with `spec.backup`. The worst first: no VolumeSnapshot API
    for the VolumeSnapshot method, an unreadable schedule, stale backups (saying so even when the newest
    backup failed: that is the more urgent news, and the message carries the error), then a failed one."""
    if backup.method == "VolumeSnapshot" and not snapshot_api:
        return Condition(CONDITION, "False", "VolumeSnapshotAPIMissing", backup_runner.SNAPSHOT_API_MISSING)
    last = newest_completed(backups)
    try:
        is_stale = stale(backup.schedule, completed_at=last.finished_at if last else None, created=created, now=now)
        limit = 2 * period(backup.schedule, now)
    except ValueError as error:
        return Condition(CONDITION, "False", "InvalidSchedule", f"spec.backup.schedule: {error}")
    finished = newest_finished(backups)
    failure = ""
    if finished is not None and finished.phase == "Failed":
        failure = f"MailBackup {finished.name} failed: {finished.error or 'no error given'}"
    if is_stale:
        if last is None:
            message = f"no backup has completed since the domain was created, {_duration(now - created)} ago"
        else:
            message = f"the newest completed backup, {last.name}, completed {_duration(now - last.finished_at)} ago"
        message += f", longer than two schedule periods ({_duration(limit)})"
        return Condition(CONDITION, "False", "BackupsStale", f"{message}; {failure}" if failure else message)
    if failure:
        return Condition(CONDITION, "False", "BackupFailed", failure)
    if last is None:
        first = following(backup.schedule, created)
        return Condition(CONDITION, "True", "BackupsCurrent", f"no backup yet; the first is for {rfc3339(first)}")
    return Condition(
        CONDITION, "True", "BackupsCurrent", f"MailBackup {last.name} completed at {rfc3339(last.finished_at)}"
    )


def last_backup(backups: Iterable[Backup]) -> kube_types.LastBackup | None:
    """status.lastBackup: the newest Completed MailBackup of the domain, scheduled or not."""
    last = newest_completed(backups)
    if last is None:
        return None
    found: kube_types.LastBackup = {"name": last.name}
    if last.method is not None:
        found["method"] = last.method
    found["completedAt"] = rfc3339(last.finished_at)
    return found


# ---------------------------------------------------------------------------------------------------
# The loop


def backup_spec(body: kube_types.MailDomain) -> api.BackupSpec | None:
    """The MailDomain's spec.backup; None without one. Raises pydantic.ValidationError when it is invalid."""
    raw = (body.get("spec") or {}).get("backup")
    return None if raw is None else api.BackupSpec.model_validate(raw)


@dataclasses.dataclass
class Scheduler:
    """One pass (`sweep`) over every MailDomain: schedule, retention, status, metrics. It remembers what it
    did between passes, because kopf's index of MailBackups shows the operator's own writes late."""

    ctx: Context
    clock: Clock = utc_now
    # The scheduled time of the last MailBackup made, by MailDomain uid.
    made: dict[str, datetime.datetime] = dataclasses.field(default_factory=dict)
    # The BackupsHealthy condition last written, by MailDomain uid: a domain reconcile that read the status
    # before that write puts the older one back (its status patch holds the whole list of conditions);
    # the next pass writes it again, with its lastTransitionTime from here.
    written: dict[str, kube_types.Condition] = dataclasses.field(default_factory=dict)
    # The MailDomains with metric series.
    series: set[DomainKey] = dataclasses.field(default_factory=set)
    # Where node <ordinal> of a MailDomain answers (nodes.url): retention deletes archives there.
    node_url: str = nodes.IN_CLUSTER
    # Whether the VolumeSnapshot API is served, asked once per pass.
    _snapshot_api: bool | None = dataclasses.field(default=None, init=False)
    _session: aiohttp.ClientSession | None = dataclasses.field(default=None, init=False)

    async def sweep(self) -> None:
        now = self.clock()
        self._snapshot_api = None
        seen: set[DomainKey] = set()
        uids: set[str] = set()
        failed: set[str] = set()  # namespaces not listed: what is known of them is kept
        for namespace in self.ctx.view.namespaces():
            try:
                bodies = await self.ctx.client.list(MAILDOMAIN, namespace)
            except (k8s.ApiError, OSError, TimeoutError) as error:
                log.warning("backup schedule: cannot list the MailDomains of namespace %s: %s", namespace, error)
                failed.add(namespace)
                continue
            for body in bodies:
                seen.add((namespace, str(body["metadata"]["name"])))
                uids.add(object_key(body))
                try:
                    await self.domain(body, now)
                except (k8s.ApiError, OSError, TimeoutError) as error:
                    log.warning("backup schedule of MailDomain %s/%s: %s", namespace, body["metadata"]["name"], error)
        for key in self.series - seen:
            if key[0] not in failed:
                self._forget_series(key)
        if not failed:
            self.made = {uid: at for uid, at in self.made.items() if uid in uids}
            self.written = {uid: c for uid, c in self.written.items() if uid in uids}

    async def domain(self, body: kube_types.MailDomain, now: datetime.datetime) -> None:
        """Everything of one MailDomain (a body as listed): a backup when one is due, retention, status."""
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return
        namespace, name = str(meta["namespace"]), str(meta["name"])
        created = parse_time(meta.get("creationTimestamp")) or now
        backups = [Backup.of(b) for b in self.ctx.view.backups(namespace, name)]
        try:
            spec = backup_spec(body)
        except pydantic.ValidationError:
            return  # the domain's reconcile says what is wrong (Ready: InvalidSpec)
        if spec is not None:
            await self._schedule(body, spec, backups, created, now)
            backups = await self._retain(body, spec, backups, now)
        condition = None
        if spec is not None:
            snapshot_api = spec.method != "VolumeSnapshot" or await self._snapshot_api_served()
            condition = health(spec, backups, created=created, now=now, snapshot_api=snapshot_api)
        await self._write_status(body, condition, last_backup(backups), now)
        self._metrics((namespace, name), spec, backups, created, now)

    async def _snapshot_api_served(self) -> bool:
        if self._snapshot_api is None:
            self._snapshot_api = await self.ctx.client.serves(VOLUMESNAPSHOT)
        return self._snapshot_api

    async def _schedule(
        self,
        body: kube_types.MailDomain,
        spec: api.BackupSpec,
        backups: list[Backup],
        created: datetime.datetime,
        now: datetime.datetime,
    ) -> None:
        meta = body["metadata"]
        namespace, name, uid = str(meta["namespace"]), str(meta["name"]), object_key(body)
        try:
            at = due(spec.schedule, since=max(since(backups, created), self.made.get(uid, created)), now=now)
        except ValueError:
            return  # BackupsHealthy says so (InvalidSchedule)
        if at is None:
            return
        if busy := [b.name for b in backups if not b.finished]:
            # A node takes one checkpoint at a time: the backup waits for the next pass after these end.
            log.info("MailDomain %s/%s: a backup is due; waiting for %s to end", namespace, name, ", ".join(busy))
            return
        backup = backup_specs.scheduled_backup(namespace, name, spec.method, at)
        try:
            await self.ctx.client.create(backup)
        except k8s.ApiError as error:
            if not error.conflict:
                raise
            self.made[uid] = at  # made already, by this operator before a restart (or by another)
            return
        self.made[uid] = at
        self.ctx.metrics.scheduled_backups.inc()
        backup_name = backup["metadata"]["name"]
        await self.ctx.recorder.event(
            _maildomain(body),
            "BackupScheduled",
            f"created MailBackup {backup_name} ({spec.method}) for {rfc3339(at)} (schedule {spec.schedule!r})",
            at=rfc3339(now),
        )

    async def _retain(
        self, body: kube_types.MailDomain, spec: api.BackupSpec, backups: list[Backup], now: datetime.datetime
    ) -> list[Backup]:
        """Delete what retention lets go; the backups that remain."""
        doomed = expired(backups, spec.retention, now)
        namespace = str(body["metadata"]["namespace"])
        kept: set[str] = set()
        for item in doomed:
            name = item.backup.name
            try:
                archives = await self._delete_archives(namespace, str(body["metadata"]["name"]), item.backup)
            except nodes.NodeError as error:
                # the MailBackup stays, so the archive is not forgotten on the node: the next pass tries again
                log.warning("MailBackup %s/%s is kept for now: cannot delete its archive: %s", namespace, name, error)
                kept.add(name)
                continue
            snapshots = await self._delete_volume_snapshots(namespace, name)
            if not await self.ctx.client.delete(MAILBACKUP, namespace, name):
                continue  # gone already (the index shows deletions late)
            self.ctx.metrics.backups_deleted.inc()
            also = f" and its {snapshots} VolumeSnapshot{'s' * (snapshots != 1)}" if snapshots else ""
            also += f" and its {archives} archive{'s' * (archives != 1)}" if archives else ""
            await self.ctx.recorder.event(
                _maildomain(body), "BackupDeleted", f"deleted MailBackup {name}{also}: {item.why}", at=rfc3339(now)
            )
        gone = {item.backup.name for item in doomed} - kept
        return [b for b in backups if b.name not in gone]

    async def _delete_archives(self, namespace: str, domain: str, backup: Backup) -> int:
        """Delete the archives of an Archive MailBackup on the nodes that wrote them (status.snapshots holds
        "<pod>:<path>"); how many were there. NodeError when a node cannot be asked."""
        if backup.method != "Archive":
            return 0
        token = await internal.for_nodes(self.ctx.client, namespace, domain)
        deleted = 0
        for entry in backup.snapshots:
            pod = entry.partition(":")[0]
            ordinal = pod.rpartition("-")[2]
            if not ordinal.isdigit():
                continue  # not what the backup runner writes
            if self._session is None:
                self._session = aiohttp.ClientSession()
            base = nodes.url(self.node_url, namespace=namespace, name=domain, ordinal=int(ordinal))
            deleted += await nodes.delete_archive(self._session, base, backup.name, token=token)
        return deleted

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _delete_volume_snapshots(self, namespace: str, backup: str) -> int:
        """Delete the VolumeSnapshots of a MailBackup (label mailfleet.io/backup). Their owner reference
        would have Kubernetes delete them with it; deleting them here makes it so wherever owner references
        are not acted on. Nothing to do where the API is not served."""
        if not await self._snapshot_api_served():
            return 0
        deleted = 0
        for obj in await self.ctx.client.list(VOLUMESNAPSHOT, namespace):
            meta = obj.get("metadata") or {}
            if (meta.get("labels") or {}).get(backup_specs.BACKUP_LABEL) == backup:
                deleted += await self.ctx.client.delete(VOLUMESNAPSHOT, namespace, str(meta["name"]))
        return deleted

    async def _write_status(
        self,
        body: kube_types.MailDomain,
        condition: Condition | None,
        last: kube_types.LastBackup | None,
        now: datetime.datetime,
    ) -> None:
        """status.lastBackup and the BackupsHealthy condition (removed without spec.backup), through the one
        status writer, only if the domain is still as listed: if a domain reconcile wrote the status
        meanwhile, the next pass writes again from the new one instead of putting back the reconcile's
        older conditions."""
        uid = object_key(body)
        report = status.Report(status.BACKUPS, [] if condition is None else [condition], {"lastBackup": last})
        remembered = [self.written[uid]] if uid in self.written else []
        written = await status.write(
            self.ctx, body, report, at=rfc3339(now), remembered=remembered, only_if_unchanged=True
        )
        if written is None:
            return
        if condition is not None and (entry := conditions.find(written, CONDITION)) is not None:
            self.written[uid] = entry
        else:
            self.written.pop(uid, None)

    def _metrics(
        self,
        key: DomainKey,
        spec: api.BackupSpec | None,
        backups: Sequence[Backup],
        created: datetime.datetime,
        now: datetime.datetime,
    ) -> None:
        metrics = self.ctx.metrics
        last = newest_completed(backups)
        if last is not None:
            metrics.last_backup_timestamp.labels(*key).set(last.finished_at.timestamp())
        else:
            _remove(metrics.last_backup_timestamp, key)
        is_stale = None
        if spec is not None:
            try:
                is_stale = stale(
                    spec.schedule, completed_at=last.finished_at if last else None, created=created, now=now
                )
            except ValueError:
                is_stale = True  # an unreadable schedule makes no backups
        if is_stale is not None:
            metrics.backups_stale.labels(*key).set(int(is_stale))
        else:
            _remove(metrics.backups_stale, key)
        self.series.add(key)

    def _forget_series(self, key: DomainKey) -> None:
        _remove(self.ctx.metrics.last_backup_timestamp, key)
        _remove(self.ctx.metrics.backups_stale, key)
        self.series.discard(key)


def _remove(gauge: prom.Gauge, key: DomainKey) -> None:
    with contextlib.suppress(KeyError):  # no series
        gauge.remove(*key)


def _maildomain(body: kube_types.MailDomain) -> kube_types.MailDomain:
    """An Event's object: a listed item may lack apiVersion and kind."""
    return {**body, "apiVersion": api.API_VERSION, "kind": "MailDomain"}


async def run(ctx: Context, *, interval: float, clock: Clock = utc_now, node_url: str = nodes.IN_CLUSTER) -> None:
    """A pass every `interval` seconds until cancelled."""
    scheduler = Scheduler(ctx, clock, node_url=node_url)
    try:
        while True:
            await asyncio.sleep(interval)
            try:
                await scheduler.sweep()
            except Exception:  # a bug in one pass must not end the schedule
                log.exception("a pass of the backup schedule failed")
    finally:
        await scheduler.close()
