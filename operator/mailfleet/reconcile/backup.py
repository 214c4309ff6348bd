"""Running MailBackups (docs/backups.md, "In Kubernetes"): one asyncio task per MailBackup that is neither
Completed nor Failed, started by the MailBackup watch (handlers.py) and by nothing else.

A MailBackup runs once: Pending (startedAt) -> Running -> Completed (pointInTime, snapshots) or Failed
(error), written through its status subresource, with an Event at the start and at the end. Two backups
of one MailDomain never run at once (a node holds one checkpoint at a time). An operator that restarts
finds a Running backup on the watch and takes it up again: the VolumeSnapshots already cut are kept (the
node's point in time is on each one), an Archive is posted again (the node answers with the archive it
has). Whatever happens, a node paused for a VolumeSnapshot is told to resume; if even that fails, the
node resumes by itself when its hold runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, TypeVar

import aiohttp
import pydantic

from mailfleet import api, k8s, kube_types, nodes, specs
from mailfleet.reconcile import conditions, internal, movegate, moves
from mailfleet.reconcile.context import (
    MAILBACKUP,
    MAILDOMAIN,
    PERSISTENTVOLUMECLAIM,
    VOLUMESNAPSHOT,
    Context,
)
from mailfleet.specs import backup as backup_specs

log = logging.getLogger(__name__)

T = TypeVar("T")

DONE: Final = ("Completed", "Failed")
SNAPSHOT_API_MISSING: Final = (
    "the VolumeSnapshot API (snapshot.storage.k8s.io/v1 volumesnapshots) is not served by this cluster: install "
    "the CSI snapshot CRDs and snapshot controller (kubernetes-csi/external-snapshotter) and a CSI driver that "
    "can snapshot, or use method: Archive"
)
# A VolumeSnapshot must be cut this long before the node's hold runs out, or it is taken again.
HOLD_MARGIN: Final = 5.0
MAX_BACKOFF: Final = 30.0


@dataclasses.dataclass(frozen=True)
class Settings:
    node_url: str = nodes.IN_CLUSTER  # node <ordinal> of a MailDomain (nodes.url)
    hold: int = 60  # seconds a node holds writes for a VolumeSnapshot (within the node's backup.max_hold)
    poll: float = 1.0  # seconds between looks at a VolumeSnapshot or an archive in progress
    attempts: int = 5  # tries of a node (or the API server) that does not answer, before the backup fails
    retry: float = 2.0  # seconds before the second try; doubled for each next one (at most MAX_BACKOFF)
    timeout: float = 6 * 3600.0  # seconds a VolumeSnapshot may take to be ready, or an archive to be written
    # seconds a backup waits for the domain's mailbox moves to leave their window (reconcile/movegate.py)
    move_wait: float = 900.0


class Failed(Exception):
    """The backup cannot complete; `message` goes into status.error."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _Gone(Exception):
    """The MailBackup was deleted while it ran."""


@dataclasses.dataclass(frozen=True)
class Taken:
    point_in_time: str | None
    snapshots: list[str]


class Runner:
    """The MailBackups being taken, by namespace/name. `observe` each watch event; `stop` at the end."""

    def __init__(self, ctx: Context, settings: Settings) -> None:
        self.ctx, self.settings = ctx, settings
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._session: aiohttp.ClientSession | None = None

    def observe(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """A MailBackup event: start its task unless it is done, or already running."""
        meta = body.get("metadata") or {}
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        if event_type == "DELETED":
            task = self._tasks.get(key)
            if task is not None:
                task.cancel()  # its node is told to resume on the way out
            return
        if ((body.get("status") or {}).get("phase")) in DONE or key in self._tasks:
            return
        task = asyncio.create_task(self._run(str(meta.get("namespace")), str(meta.get("name"))), name=f"backup {key}")
        self._tasks[key] = task
        task.add_done_callback(lambda done: self._tasks.pop(key, None) if self._tasks.get(key) is done else None)

    def running(self) -> list[str]:
        return sorted(self._tasks)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def _run(self, namespace: str, name: str) -> None:
        """Take the backup; errors of the API server are retried (the backup resumes where it was)."""
        for attempt in range(self.settings.attempts):
            try:
                await self._take(namespace, name)
                return
            except _Gone:
                log.info("MailBackup %s/%s was deleted while it ran", namespace, name)
                return
            except (k8s.ApiError, aiohttp.ClientError, TimeoutError) as error:
                lasting = (
                    isinstance(error, k8s.ApiError) and 400 <= error.status < 500 and error.status not in (409, 429)
                )
                if lasting or attempt + 1 == self.settings.attempts:
                    log.error("MailBackup %s/%s: %s", namespace, name, error)
                    await self._record_failure(namespace, name, f"the Kubernetes API: {error}")
                    return
                log.warning("MailBackup %s/%s: %s; trying again", namespace, name, error)
                await asyncio.sleep(self._backoff(attempt))

    async def _record_failure(self, namespace: str, name: str, message: str) -> None:
        try:
            body = await self.ctx.client.get(MAILBACKUP, namespace, name)
            if body is not None and (body.get("status") or {}).get("phase") not in DONE:
                method = str((body.get("spec") or {}).get("method") or "VolumeSnapshot")
                await self._finish(body, method, None, Failed(message))
        except (k8s.ApiError, aiohttp.ClientError, TimeoutError, _Gone) as error:
            log.error("MailBackup %s/%s: cannot record the failure: %s", namespace, name, error)

    async def _take(self, namespace: str, name: str) -> None:
        body = await self.ctx.client.get(MAILBACKUP, namespace, name)
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            return
        status = body.get("status") or {}
        if status.get("phase") in DONE:
            return
        resuming = status.get("phase") == "Running"
        method = str((body.get("spec") or {}).get("method") or "VolumeSnapshot")
        if status.get("phase") is None:
            body = await self._patch(body, {"phase": "Pending", "startedAt": conditions.now()})
        try:
            try:
                backup = api.MailBackup.model_validate(body)
            except pydantic.ValidationError as error:
                raise Failed(f"invalid MailBackup: {api.validation_message(error)}") from error
            domain = await self._domain(namespace, backup.spec.domain_ref)
            try:
                token = await internal.for_nodes(self.ctx.client, namespace, domain.metadata.name)
            except nodes.NodeError as error:
                raise Failed(str(error)) from error
            async with self._locks.setdefault((namespace, domain.metadata.name), asyncio.Lock()):
                if resuming:
                    log.info("MailBackup %s/%s: resuming (%s)", namespace, name, method)
                else:
                    body = await self._patch(body, {"phase": "Running"})
                    await self.ctx.recorder.event(
                        body,
                        "Started",
                        f"backing up MailDomain {domain.metadata.name} ({method})",
                        at=conditions.now(),
                    )
                if backup.spec.method == "VolumeSnapshot":
                    taken = await self._volume_snapshots(backup, domain, token, resuming=resuming)
                else:
                    taken = await self._archives(backup, domain, token)
        except Failed as failure:
            await self._finish(body, method, None, failure)
            return
        await self._finish(body, method, taken, None)

    async def _domain(self, namespace: str, name: str) -> api.MailDomain:
        body = await self.ctx.client.get(MAILDOMAIN, namespace, name)
        if body is None:
            raise Failed(f"MailDomain {name} not found")
        try:
            return api.MailDomain.model_validate(body)
        except pydantic.ValidationError as error:
            raise Failed(f"MailDomain {name} is invalid: {api.validation_message(error)}") from error

    async def _patch(self, body: kube_types.MailBackup, status: Mapping[str, Any]) -> kube_types.MailBackup:
        """`status`: a merge patch of the status (None removes a field)."""
        meta = body["metadata"]
        try:
            return await self.ctx.client.patch(
                MAILBACKUP, meta["namespace"], meta["name"], {"status": dict(status)}, subresource="status"
            )
        except k8s.ApiError as error:
            if error.not_found:
                raise _Gone() from error
            raise

    async def _finish(
        self, body: kube_types.MailBackup, method: str, taken: Taken | None, failure: Failed | None
    ) -> None:
        at = conditions.now()
        status: dict[str, Any]
        if failure is not None:
            status = {"phase": "Failed", "completedAt": at, "error": failure.message}
        else:
            assert taken is not None
            status = {"phase": "Completed", "completedAt": at, "pointInTime": taken.point_in_time}
            status |= {"snapshots": taken.snapshots, "error": None}
        written = await self._patch(body, status)
        result = "failed" if failure is not None else "completed"
        self.ctx.metrics.backups.labels(method, result).inc()
        started = _parse_time((written.get("status") or {}).get("startedAt"))
        if started is not None:
            elapsed = (datetime.datetime.now(datetime.UTC) - started).total_seconds()
            self.ctx.metrics.backup_duration.labels(method).observe(max(elapsed, 0.0))
        if failure is not None:
            await self.ctx.recorder.event(written, "Failed", failure.message, type="Warning", at=at)
        else:
            assert taken is not None
            what = ", ".join(taken.snapshots)
            await self.ctx.recorder.event(written, "Completed", f"{what} (point in time {taken.point_in_time})", at=at)

    # -- The VolumeSnapshot method ------------------------------------------------------------------

    async def _volume_snapshots(
        self, backup: api.MailBackup, domain: api.MailDomain, token: str, *, resuming: bool
    ) -> Taken:
        client, namespace = self.ctx.client, specs.common.namespace(domain)
        if not await client.serves(VOLUMESNAPSHOT):
            raise Failed(SNAPSHOT_API_MISSING)
        names = [backup_specs.snapshot_name(backup.metadata.name, i) for i in range(domain.spec.replicas)]
        try:
            async with self._no_moves(domain):
                points = [
                    await self._snapshot_node(backup, domain, ordinal, token, resuming=resuming)
                    for ordinal in range(domain.spec.replicas)
                ]
            for name in names:
                await self._until_snapshot(namespace, name, ready=True, deadline=self._after(self.settings.timeout))
        except Failed:
            # A failed backup keeps no snapshots: they are not what the contract promises.
            for name in names:
                try:
                    await client.delete(VOLUMESNAPSHOT, namespace, name)
                except k8s.ApiError as error:
                    log.warning("could not delete VolumeSnapshot %s/%s of a failed backup: %s", namespace, name, error)
            raise
        return Taken(_earliest(points), names)

    async def _snapshot_node(
        self, backup: api.MailBackup, domain: api.MailDomain, ordinal: int, token: str, *, resuming: bool
    ) -> str:
        """Node `ordinal`'s volume, cut while the node holds writes: the node's point in time."""
        client, namespace = self.ctx.client, specs.common.namespace(domain)
        name = backup_specs.snapshot_name(backup.metadata.name, ordinal)
        existing = await client.get(VOLUMESNAPSHOT, namespace, name)
        if existing is not None:
            point = ((existing.get("metadata") or {}).get("annotations") or {}).get(
                backup_specs.POINT_IN_TIME_ANNOTATION
            )
            if _cut(existing) and point:
                return str(point)  # cut before the operator stopped
            # Made by an operator that stopped before it was cut: the node may no longer hold writes.
            await client.delete(VOLUMESNAPSHOT, namespace, name)
            await self._until_deleted(namespace, name)
        claim = backup_specs.claim_name(domain, ordinal)
        if await client.get(PERSISTENTVOLUMECLAIM, namespace, claim) is None:
            raise Failed(f"PersistentVolumeClaim {claim} does not exist: node {ordinal} has no volume yet")
        base = nodes.url(self.settings.node_url, namespace=namespace, name=domain.metadata.name, ordinal=ordinal)
        pod = f"{specs.common.statefulset_name(domain)}-{ordinal}"
        if resuming:
            await self._resume(pod, base, token)  # a hold the operator that stopped may have left
        hold = self.settings.hold
        checkpoint = await self._node(pod, lambda: nodes.checkpoint(self.session, base, token=token, hold=hold))
        deadline = self._after(hold - HOLD_MARGIN)
        try:
            await client.create(
                backup_specs.volume_snapshot(backup, domain, ordinal, point_in_time=checkpoint.point_in_time)
            )
            await self._until_snapshot(namespace, name, ready=False, deadline=deadline)
        finally:
            await self._resume(pod, base, token)
        return checkpoint.point_in_time

    async def _until_snapshot(self, namespace: str, name: str, *, ready: bool, deadline: float) -> None:
        """Until the VolumeSnapshot is cut (status.creationTime, or readyToUse), or ready to use."""
        while True:
            found = await self.ctx.client.get(VOLUMESNAPSHOT, namespace, name)
            if found is None:
                raise Failed(f"VolumeSnapshot {name} was deleted")
            error = (found.get("status") or {}).get("error")
            if error:
                message = error.get("message") if isinstance(error, Mapping) else error
                raise Failed(f"VolumeSnapshot {name}: {message or 'failed'}")
            if (found.get("status") or {}).get("readyToUse") is True or (not ready and _cut(found)):
                return
            if asyncio.get_running_loop().time() > deadline:
                if ready:
                    raise Failed(f"VolumeSnapshot {name} not ready to use after {self.settings.timeout:.0f} s")
                raise Failed(
                    f"VolumeSnapshot {name} was not cut within the {self.settings.hold} s the node holds writes "
                    "(is a CSI snapshot controller running?)"
                )
            await asyncio.sleep(self.settings.poll)

    async def _until_deleted(self, namespace: str, name: str) -> None:
        deadline = self._after(self.settings.hold)
        while await self.ctx.client.get(VOLUMESNAPSHOT, namespace, name) is not None:
            if asyncio.get_running_loop().time() > deadline:
                raise Failed(f"VolumeSnapshot {name}, left uncut by an earlier attempt, is still being deleted")
            await asyncio.sleep(self.settings.poll)

    async def _resume(self, pod: str, base: str, token: str) -> None:
        """DELETE /snapshot, a few quick tries; a node that does not answer resumes when its hold runs out."""
        for attempt in range(3):
            try:
                paused = await nodes.resume(self.session, base, token=token)
                log.info("node %s resumed writes (paused %s s)", pod, "?" if paused is None else f"{paused:.2f}")
                return
            except nodes.NodeError as error:
                if error.lasting or attempt == 2:
                    log.warning("node %s: %s; it resumes by itself when its hold runs out", pod, error)
                    return
                await asyncio.sleep(min(self.settings.retry, 1.0))

    # -- The Archive method ---------------------------------------------------------------------------

    async def _archives(self, backup: api.MailBackup, domain: api.MailDomain, token: str) -> Taken:
        namespace = specs.common.namespace(domain)
        snapshots, points = [], []
        async with self._no_moves(domain):  # each node's point is where its archive starts: all of them
            for ordinal in range(domain.spec.replicas):
                base = nodes.url(
                    self.settings.node_url, namespace=namespace, name=domain.metadata.name, ordinal=ordinal
                )
                pod = f"{specs.common.statefulset_name(domain)}-{ordinal}"
                record = await self._archive_node(pod, base, backup.metadata.name, token)
                snapshots.append(f"{pod}:{record.path}")
                points.append(record.point_in_time)
        return Taken(_earliest(points), snapshots)

    @contextlib.asynccontextmanager
    async def _no_moves(self, domain: api.MailDomain) -> AsyncIterator[None]:
        """While the nodes' points are taken: no mailbox move of the domain between its freeze and its
        cleanup, when both nodes may hold the mailbox (reconcile/movegate.py), so it is in exactly one
        node's point. A move inside that window is waited for; new ones wait until the points are taken."""
        key = (specs.common.namespace(domain), domain.metadata.name)
        try:
            async with self.ctx.moving_of(key).gate.backup(
                lambda: moves.recorded_inside(self.ctx, domain), within=self.settings.move_wait
            ):
                yield
        except movegate.StillMoving as error:
            raise Failed(
                f"mailbox moves stayed between their flip and their cleanup for {self.settings.move_wait:.0f} s "
                f"({error}): the mailboxes would be on two nodes' points, or none"
            ) from error

    async def _archive_node(self, pod: str, base: str, name: str, token: str) -> nodes.Archive:
        """The node's archive `name`, once written."""

        async def start() -> nodes.Archive:
            return await nodes.start_archive(self.session, base, name, token=token)

        async def look() -> nodes.Archive | None:
            return await nodes.archive(self.session, base, name, token=token)

        record = await self._node(pod, start)
        deadline = self._after(self.settings.timeout)
        while record.state == "Running":
            if asyncio.get_running_loop().time() > deadline:
                raise Failed(f"node {pod}: archive {name} not written after {self.settings.timeout:.0f} s")
            await asyncio.sleep(self.settings.poll)
            # None: the node forgot it (it restarted before it began writing): post it again.
            found = await self._node(pod, look)
            record = found if found is not None else await self._node(pod, start)
        if record.state == "Failed":
            raise Failed(f"node {pod}: archive {name} failed: {record.error or 'no reason given'}")
        return record

    # -- Helpers --------------------------------------------------------------------------------------

    async def _node(self, pod: str, call: Callable[[], Awaitable[T]]) -> T:
        """`call`, tried again with backoff while the node does not answer (or is busy: 409, 5xx)."""
        for attempt in range(self.settings.attempts):
            try:
                return await call()
            except nodes.NodeError as error:
                if error.lasting or attempt + 1 == self.settings.attempts:
                    raise Failed(f"node {pod}: {error}") from error
                log.info("node %s: %s; trying again", pod, error)
                await asyncio.sleep(self._backoff(attempt))
        raise AssertionError("unreachable")  # attempts >= 1

    def _backoff(self, attempt: int) -> float:
        return float(min(self.settings.retry * 2**attempt, MAX_BACKOFF))

    @staticmethod
    def _after(seconds: float) -> float:
        return asyncio.get_running_loop().time() + seconds


def _cut(snapshot: kube_types.VolumeSnapshot) -> bool:
    status = snapshot.get("status") or {}
    return bool(status.get("creationTime")) or status.get("readyToUse") is True


def _parse_time(value: object) -> datetime.datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=datetime.UTC)


def _earliest(points: Sequence[str | None]) -> str | None:
    """The earliest of the nodes' points in time (as the node wrote it): the backup holds each node's mail
    up to at least then."""
    known = [(parsed, point) for point in points if point and (parsed := _parse_time(point)) is not None]
    return min(known)[1] if known else None
