"""Archives written by the node: `BackupJobs` runs POST /backups in the background and answers
GET /backups/{name}; `stream` writes GET /backup's archive into the HTTP response. Both write from a
staged copy (mailnode.backup.checkpoint) with `archive.write` in a thread of the backup Gateway, so
the node keeps serving meanwhile, and both keep the backup metrics and the last result for /status.

An archive named N is written as `<backup dir>/N.tar.partial`, fsynced, renamed to `N.tar` and the
directory fsynced: a `.tar` on disk is always complete. Records live in memory; after a restart a name
the node does not remember is looked up on disk: `N.tar` reads as Completed (its MANIFEST.json gives
the point in time and the counts), `N.tar.partial` as Failed (the node stopped while writing it). A job
that fails while the node runs removes its partial file (it may be what filled the disk); a node that
stops while writing one empties it but leaves the name, so the archive reads as Failed after the restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Literal

from mailnode.backup import archive
from mailnode.backup.checkpoint import Checkpoint, Staged
from mailnode.gateway import Gateway
from mailnode.metrics import NodeMetrics
from mailnode.store import durable
from mailwire import admin

log = logging.getLogger(__name__)

# A Kubernetes object name (RFC 1123 subdomain): the operator names backups after MailBackups.
NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
NAME_MAX = 253
FILE_STEM_MAX = 255 - len(".tar.partial")
RESTARTED = "the node restarted while writing the archive"
STOPPED = "the node stopped while writing the archive"

State = Literal["Running", "Completed", "Failed"]


class BackupBusy(Exception):
    """An archive that cannot be deleted now: it is being written."""


class InvalidName(ValueError):
    """A backup name that is not a lower-case RFC 1123 subdomain of at most 253 characters."""


def check_name(name: object) -> str:
    if not isinstance(name, str) or len(name) > NAME_MAX or not NAME.match(name):
        raise InvalidName(
            f"name must be lower-case letters, digits, '-' and '.', starting and ending with a letter or digit,"
            f" at most {NAME_MAX} characters (got {name!r})"
        )
    return name


def file_stem(name: str) -> str:
    """The archive's file name without `.tar`: the name itself, or, for a name too long for a file name
    of 255 bytes with `.tar.partial`, its start and a hash of the whole."""
    if len(name) <= FILE_STEM_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"{name[: FILE_STEM_MAX - len(digest) - 1]}-{digest}"


@dataclasses.dataclass
class Record:
    """One archive, as GET /backups/{name} shows it."""

    name: str
    state: State
    path: Path
    point_in_time: datetime.datetime | None = None
    mailboxes: int | None = None
    messages: int | None = None
    bytes: int | None = None  # the archive file's size
    error: str | None = None
    completed_at: datetime.datetime | None = None

    def to_wire(self) -> admin.Archive:
        return admin.Archive(
            name=self.name,
            state=self.state,
            path=str(self.path),
            point_in_time=self.point_in_time.isoformat() if self.point_in_time else None,
            mailboxes=self.mailboxes,
            messages=self.messages,
            bytes=self.bytes,
            error=self.error,
        )

    def complete(self, summary: archive.Summary, size: int, at: datetime.datetime) -> None:
        self.state = "Completed"
        self.point_in_time = summary.point_in_time
        self.mailboxes = len(summary.mailboxes)
        self.messages = sum(messages for messages, _ in summary.mailboxes.values())
        self.bytes = size
        self.completed_at = at


class _Cancellable(io.RawIOBase):
    """A file-like sink that stops the archive writer (with an OSError) once `cancelled` is set."""

    def __init__(self, write: Callable[[bytes], object], cancelled: threading.Event) -> None:
        self._write = write
        self._cancelled = cancelled
        self.written = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self._cancelled.is_set():
            raise OSError("archive writing cancelled")
        chunk = bytes(data)
        self._write(chunk)
        self.written += len(chunk)
        return len(chunk)


def _read_manifest(path: Path) -> dict[str, Any]:
    """MANIFEST.json of a complete archive (the last member; only the tar headers before it are read)."""
    with tarfile.open(path, "r:*") as tar:
        member = tar.next()
        found = None
        while member is not None:
            if member.name == archive.MANIFEST:
                found = tar.extractfile(member)
                break
            member = tar.next()
        if found is None:
            raise ValueError(f"{path} holds no {archive.MANIFEST}")
        manifest = json.loads(found.read())
    if not isinstance(manifest, dict):
        raise ValueError(f"{archive.MANIFEST} of {path} is not an object")
    return manifest


class BackupJobs:
    def __init__(
        self, *, directory: Path, checkpoint: Checkpoint, gateway: Gateway, metrics: NodeMetrics, node: str
    ) -> None:
        self.directory = directory
        self._checkpoint = checkpoint
        self._gateway = gateway  # the backup Gateway: archive writes take minutes, not the store's threads
        self._metrics = metrics
        self._node = node
        self._records: dict[str, Record] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancelled = threading.Event()  # set when the node stops: running writers give up
        self.last: admin.BackupResult | None = None  # the last archive finished (either way), for /status

    # -- POST /backups, GET /backups/{name} -------------------------------------------------------------

    def _paths(self, name: str) -> tuple[Path, Path]:
        final = self.directory / f"{file_stem(name)}.tar"
        return final, final.with_name(final.name + ".partial")

    async def submit(self, name: str) -> tuple[Record, bool]:
        """Start writing archive `name`, or return its record when it is known (running, finished, or
        on disk). Returns (record, started). Raises InvalidName."""
        check_name(name)
        known = await self.get(name)
        if known is not None:
            return known, False
        if name in self._records:  # submitted while we looked on disk
            return self._records[name], False
        final, _ = self._paths(name)
        record = self._records[name] = Record(name, "Running", final)
        self._tasks[name] = asyncio.create_task(self._run(record))
        return record, True

    async def get(self, name: str) -> Record | None:
        """The record of `name`: from memory, else from what is on disk; None when unknown."""
        record = self._records.get(name)
        if record is not None:
            return record
        try:
            check_name(name)
        except InvalidName:
            return None
        found = await self._gateway.run(self._from_disk, name)
        if found is not None:
            record = self._records.setdefault(name, found)
        return record

    async def delete(self, name: str) -> Record | None:
        """Remove archive `name` (DELETE /backups/{name}: the operator's retention): its file, or what is left
        of a failed one, and its record. None when unknown; BackupBusy while it is being written."""
        record = await self.get(name)
        if record is None:
            return None
        if record.state == "Running":
            raise BackupBusy(f"archive {name!r} is being written; delete it once it is finished")
        final, partial = self._paths(name)

        def remove() -> None:
            final.unlink(missing_ok=True)
            partial.unlink(missing_ok=True)
            if final.parent.is_dir():
                durable.fsync_dir(final.parent)

        await self._gateway.run(remove)
        self._records.pop(name, None)
        log.info("archive deleted", extra={"fields": {"name": name, "path": str(final)}})
        return record

    def _from_disk(self, name: str) -> Record | None:
        final, partial = self._paths(name)
        if final.is_file():
            try:
                manifest = _read_manifest(final)
                counts = manifest.get("mailboxes") or {}
                return Record(
                    name,
                    "Completed",
                    final,
                    point_in_time=datetime.datetime.fromisoformat(manifest["pointInTime"]),
                    mailboxes=len(counts),
                    messages=sum(int(c.get("messages", 0)) for c in counts.values()),
                    bytes=final.stat().st_size,
                )
            except (OSError, ValueError, KeyError, TypeError, AttributeError, tarfile.TarError) as error:
                return Record(name, "Failed", final, error=f"the archive cannot be read: {error}")
        if partial.is_file():
            return Record(name, "Failed", final, error=RESTARTED)
        return None

    async def _run(self, record: Record) -> None:
        try:
            async with self._checkpoint.staged() as staged:
                record.point_in_time = staged.point_in_time
                summary, size = await self._gateway.run(self._write_file, staged, record.path)
            record.complete(summary, size, self._succeeded(size, name=record.name, point_in_time=summary.point_in_time))
            log.info(
                "archive written",
                extra={"fields": {"name": record.name, "path": str(record.path), "bytes": size}},
            )
        except asyncio.CancelledError:
            record.state, record.error = "Failed", STOPPED
            raise
        except Exception as error:
            record.state, record.error = "Failed", str(error) or type(error).__name__
            self._failed(str(error), name=record.name)
            log.error("archive failed", extra={"fields": {"name": record.name, "error": record.error}})
        finally:
            self._tasks.pop(record.name, None)

    def _write_file(self, staged: Staged, final: Path) -> tuple[archive.Summary, int]:
        """Blocking: write the archive as final.partial, fsync, rename to final, fsync the directory."""
        durable.ensure_dir(final.parent)
        partial = final.with_name(final.name + ".partial")
        try:
            with partial.open("wb") as file:
                sink = _Cancellable(file.write, self._cancelled)
                with io.BufferedWriter(sink, buffer_size=1 << 20) as out:
                    summary = archive.write(staged.root, out, node=staged.node, point_in_time=staged.point_in_time)
                file.flush()
                os.fsync(file.fileno())
            partial.rename(final)
        except BaseException:
            if self._cancelled.is_set():  # the node is stopping: keep the name, free the space
                os.truncate(partial, 0)
            else:
                partial.unlink(missing_ok=True)
            raise
        durable.fsync_dir(final.parent)
        return summary, final.stat().st_size

    # -- GET /backup ----------------------------------------------------------------------------------------

    async def stream(self, staged: Staged, write: Callable[[bytes], Coroutine[Any, Any, None]]) -> archive.Summary:
        """Write the archive of `staged` through `write` (e.g. an HTTP response's), from a Gateway
        thread: each chunk of 1 MiB is handed to the event loop and written before the next is made,
        so a slow client slows the writer down instead of filling memory."""
        loop = asyncio.get_running_loop()
        stop = threading.Event()

        def forward(chunk: bytes) -> None:
            if self._cancelled.is_set():
                raise OSError("the node is stopping")
            asyncio.run_coroutine_threadsafe(write(chunk), loop).result()

        sink = _Cancellable(forward, stop)

        def run() -> archive.Summary:
            with io.BufferedWriter(sink, buffer_size=1 << 20) as out:
                return archive.write(staged.root, out, node=staged.node, point_in_time=staged.point_in_time)

        try:
            summary = await self._gateway.run(run)
        except BaseException as error:
            stop.set()
            self._failed(str(error), name=None)
            log.error("streamed archive failed", extra={"fields": {"error": str(error) or type(error).__name__}})
            raise
        self._succeeded(sink.written, name=None, point_in_time=staged.point_in_time)
        log.info("archive streamed", extra={"fields": {"bytes": sink.written}})
        return summary

    # -- bookkeeping ----------------------------------------------------------------------------------------

    def _succeeded(self, size: int, *, name: str | None, point_in_time: datetime.datetime) -> datetime.datetime:
        at = datetime.datetime.now(datetime.UTC)
        self._metrics.backups.labels("ok").inc()
        self._metrics.backup_last_success.set(at.timestamp())
        self._metrics.backup_bytes.set(size)
        self.last = admin.BackupResult(
            name=name,  # None: streamed through GET /backup
            state="Completed",
            completed_at=at.isoformat(),
            point_in_time=point_in_time.isoformat(),
            bytes=size,
            error=None,
        )
        return at

    def _failed(self, error: str, *, name: str | None) -> None:
        self._metrics.backups.labels("failed").inc()
        self.last = admin.BackupResult(
            name=name,
            state="Failed",
            completed_at=datetime.datetime.now(datetime.UTC).isoformat(),
            point_in_time=None,
            bytes=None,
            error=error,
        )

    async def close(self) -> None:
        """Stop running jobs when the node stops: each writer gives up at its next chunk and leaves its
        partial file, emptied, so that after the restart the archive reads as Failed."""
        self._cancelled.set()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
