"""Staging: what backups (mailnode.backup.checkpoint) need of the store, each through this small API:
`checkpoint` (every index's WAL folded into its main file, for a VolumeSnapshot), and staged copies in
two steps, `pin` + `copy_indexes` inside a pause of the writes, then `link_files` + `unpin` while mail
flows. MailStore owns one (`MailStore.staging`) and Account asks it before removing or moving files.

With writes paused, the store is pinned (`pin`) and `copy_indexes` copies every index with SQLite's
backup API (rows, not files: quick); then writes resume, and `link_files` hard-links the message files
each copied index lists, one mailbox per Gateway thread, while mail flows; `unpin` ends it. The pin is
what makes the second step safe: while any pin is held no message file a copied index may list is
removed or moved. An expunge (EXPUNGE, MOVE, CLOSE) commits its row's removal as always but leaves the
file (`unlink_messages`): its path is kept and unlinked when the last pin goes, from a Gateway thread,
under the mailbox's lock (not fenced: no index lists these files, so a snapshot cut meanwhile is
consistent with or without them). Folder RENAME (a directory rename moves every file) and DELETE wait
until no pin is held (`unpinned_writing`) before they pass the fence, the way writes wait at the fence
before taking a lock. A crash while pinned leaves the deferred files behind without index rows; the
store's recovery removes them with the other unacknowledged files (`Mailbox.recover`). New files
(deliveries, APPEND, COPY's links) are never in the way: a copied index lists none of them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import AsyncIterator, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from mailnode.gateway import Gateway
from mailnode.store import durable, index
from mailnode.store.fence import WriteFence
from mailnode.store.mailboxes import Mailbox, Mailboxes, MailboxUsage

log = logging.getLogger(__name__)

# Gateway threads that copy indexes or link files for a staged copy at once: at most half the node's
# store threads, so deliveries and IMAP are served meanwhile (a thread pool serves its queue in order),
# and no more than the CPUs (beyond them links only contend: 8 threads on 2 CPUs took 1.6x as long as 2).
STAGING_THREADS = max(1, min(8, os.cpu_count() or 1))


class StoreError(Exception):
    """A checkpoint or staged copy that could not be made; the message says why."""


@dataclasses.dataclass(frozen=True)
class IndexCopy:
    """One mailbox's index copied into a staged copy; the message files it lists are linked next."""

    address: str
    source: Path  # the mailbox's directory
    target: Path  # its directory in the staged copy, holding index.sqlite


class Staging:
    def __init__(self, *, mailboxes: Mailboxes, gateway: Gateway, fence: WriteFence) -> None:
        self._mailboxes = mailboxes
        self._gateway = gateway
        self._fence = fence
        # _pin_lock guards _pins and _deferred between the event loop (pin, unpin) and the Gateway
        # threads that expunge.
        self._pin_lock = threading.Lock()
        self._pins = 0
        self._deferred: list[tuple[Mailbox, Path]] = []  # files of expunged rows, unlinked at the last unpin
        self._releasing = 0  # unpins unlinking their deferred files now
        self._unpinned = asyncio.Event()  # set while no pin is held and no deferred unlink is running
        self._unpinned.set()
        self._pin_waiting = 0

    # -- pins -------------------------------------------------------------------------------------------

    @property
    def pinned(self) -> bool:
        """True while a staged copy's pin is held: no message file an index lists is removed or moved."""
        return self._pins > 0

    @property
    def pin_waiting(self) -> int:
        """Changes (folder RENAME, DELETE) waiting now for the pins to go."""
        return self._pin_waiting

    def pin(self) -> None:
        """Keep every message file where it is until the matching `unpin`: expunged files are unlinked
        later, folder renames and deletions wait. Call from the event loop with writes paused (so no
        expunge is between its commit and its unlink), before copying the indexes."""
        with self._pin_lock:
            self._pins += 1
        self._unpinned.clear()

    async def unpin(self) -> None:
        """Release a pin. The last one unlinks the files expunged meanwhile (a Gateway thread, under each
        mailbox's lock; an error is logged and the files are left for recovery to remove), then lets the
        waiting renames and deletions go on. The unlinking is not cancelled with the caller."""
        with self._pin_lock:
            if self._pins <= 0:
                raise RuntimeError("unpin without a pin")
            self._pins -= 1
            if self._pins:
                return
            deferred, self._deferred = self._deferred, []
            self._releasing += 1
        await asyncio.shield(asyncio.ensure_future(self._release(deferred)))

    async def _release(self, deferred: list[tuple[Mailbox, Path]]) -> None:
        try:
            if deferred:
                await self._gateway.run(_unlink_deferred, deferred)
        except Exception as error:
            log.exception("deferred unlinks failed", extra={"fields": {"files": len(deferred), "error": str(error)}})
        finally:
            with self._pin_lock:
                self._releasing -= 1
                done = self._pins == 0 and self._releasing == 0
            if done:
                self._unpinned.set()

    def unlink_messages(self, mailbox: Mailbox, paths: Sequence[Path]) -> None:
        """Unlink the files of rows just removed (a Gateway thread, under mailbox.lock, inside a fenced
        write), or, while pinned, keep them for the last `unpin`. A pin is only taken with writes
        paused, so no pin can come between this check and the unlinks."""
        with self._pin_lock:
            if self._pins:
                self._deferred.extend((mailbox, path) for path in paths)
                return
        for path in paths:
            path.unlink(missing_ok=True)

    @contextlib.asynccontextmanager
    async def unpinned_writing(self) -> AsyncIterator[None]:
        """`fence.writing()` for a change that moves or removes whole folders (RENAME, DELETE): it waits
        first until no pin is held (and the deferred unlinks are done), then at the fence, and waits
        again if a staging pinned the store meanwhile. Enter it before taking any lock, like the fence."""
        while True:
            if not self._unpinned.is_set():
                self._pin_waiting += 1
                try:
                    await self._unpinned.wait()
                finally:
                    self._pin_waiting -= 1
            async with self._fence.writing():
                # A pin is only taken with writes paused, i.e. never while this write is in flight.
                if self._unpinned.is_set():
                    yield
                    return

    # -- checkpoints and staged copies (only while the fence is paused) --------------------------------

    async def checkpoint(self) -> tuple[int, int]:
        """Fold every index's WAL into its main file and fsync it, so the volume holds each index whole.
        Call with writes paused. Returns (mailboxes, messages)."""
        return await self._gateway.run(self._checkpoint_sync)

    def _checkpoint_sync(self) -> tuple[int, int]:
        mailboxes = self._mailboxes.all()
        messages = 0
        for mailbox in mailboxes:
            # Both locks: no thread is between statements on either of the mailbox's connections, so
            # no read transaction keeps the WAL from being truncated.
            with mailbox.lock, mailbox.read_lock:
                count, done = mailbox.index.checkpoint_wal()
                messages += count
                if not done:
                    raise StoreError(f"the index of {mailbox.address} is busy; its WAL was not checkpointed")
                durable.fsync_file(mailbox.index.path)
            durable.fsync_dir(mailbox.path)
        return len(mailboxes), messages

    async def copy_indexes(self, dest: Path, *, threads: int = STAGING_THREADS) -> list[IndexCopy]:
        """Copy every mailbox's index under dest (laid out as the data directory: mail/<domain>/<local>/
        index.sqlite) with SQLite's backup API, `threads` mailboxes at a time. dest must be on the
        store's file system (the files are linked into it next). Call with writes paused and the store
        pinned, then `link_files` (writes may go on by then)."""
        if not self.pinned:
            raise StoreError("copying the indexes for a staged copy needs the store pinned")
        limit = asyncio.Semaphore(threads)

        async def one(mailbox: Mailbox) -> IndexCopy:
            async with limit:
                return await self._gateway.run(self._copy_index, mailbox, dest)

        return await _all([one(mailbox) for mailbox in self._mailboxes.all()])

    def _copy_index(self, mailbox: Mailbox, dest: Path) -> IndexCopy:
        target = dest / mailbox.path.relative_to(self._mailboxes.root)
        target.mkdir(parents=True, exist_ok=True)
        with mailbox.lock:
            mailbox.index.copy_to(target / "index.sqlite")
        return IndexCopy(mailbox.address, mailbox.path, target)

    async def link_files(
        self, copies: Sequence[IndexCopy], *, threads: int = STAGING_THREADS
    ) -> dict[str, MailboxUsage]:
        """Hard-link into each copy every message file its index lists (files never change once written,
        so a link is a copy), one mailbox per Gateway thread, `threads` at a time. Call pinned (writes
        need not be paused): the pin keeps every listed file in place, so a file missing is a StoreError.
        Returns when every thread is done, even when cancelled or failing, so nothing is linked into a
        copy its caller is removing. Returns what each copy holds."""
        if not self.pinned:
            raise StoreError("linking the files of a staged copy needs the store pinned")
        limit = asyncio.Semaphore(threads)
        stop = threading.Event()  # a mailbox failed, or the caller was cancelled: the others stop early

        async def one(copy: IndexCopy) -> MailboxUsage:
            async with limit:
                try:
                    return await self._gateway.run(_link_listed, copy, stop)
                except BaseException:
                    stop.set()
                    raise

        usages = await _all([one(copy) for copy in copies], stop=stop)
        return {copy.address: usage for copy, usage in zip(copies, usages, strict=True)}


def _unlink_deferred(deferred: list[tuple[Mailbox, Path]]) -> None:
    per_mailbox: dict[Mailbox, list[Path]] = collections.defaultdict(list)
    for mailbox, path in deferred:
        per_mailbox[mailbox].append(path)
    for mailbox, paths in per_mailbox.items():
        with mailbox.lock:
            for path in paths:
                path.unlink(missing_ok=True)


_T = TypeVar("_T")


class _Stopped(StoreError):
    """A mailbox's linking stopped because another one failed (or the staging was cancelled)."""


async def _all(jobs: list[Coroutine[Any, Any, _T]], stop: threading.Event | None = None) -> list[_T]:
    """Run jobs together and wait for every one of them, even when one fails (its error is raised, the
    first that is not a _Stopped) or the caller is cancelled (`stop` is set, then the jobs are waited
    for)."""
    gathered = asyncio.gather(*jobs, return_exceptions=True)
    try:
        results = await asyncio.shield(gathered)
    except asyncio.CancelledError:
        if stop is not None:
            stop.set()
        await asyncio.wait([gathered])
        raise
    errors = sorted((r for r in results if isinstance(r, BaseException)), key=lambda e: isinstance(e, _Stopped))
    if errors:
        raise errors[0]
    return cast(list[_T], results)


def _link_listed(copy: IndexCopy, stop: threading.Event) -> MailboxUsage:
    """Blocking: link every file the copied index lists from the mailbox into the copy (plain strings,
    not Paths: on 100,000 files pathlib took most of the time)."""
    with index.Reader(copy.target / "index.sqlite") as reader:
        rows = reader.files()
    usage = MailboxUsage()
    source, target = f"{copy.source}/", f"{copy.target}/"  # an index's paths are <folder>/<new|cur>/<name>
    made: set[str] = set()
    for rel, size in rows:
        if stop.is_set():
            raise _Stopped(f"{copy.address}: linking stopped")
        parent = rel.rpartition("/")[0]
        if parent not in made:
            Path(target + parent).mkdir(parents=True, exist_ok=True)
            made.add(parent)
        try:
            os.link(source + rel, target + rel)
        except FileNotFoundError:
            raise StoreError(
                f"{copy.address}: the staged index lists {rel}, which is no longer on disk; the staged copy "
                "is incomplete"
            ) from None
        usage.bytes += int(size)
        usage.messages += 1
    return usage
