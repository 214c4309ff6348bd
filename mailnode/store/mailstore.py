"""MailStore: the mailboxes of one node. Protocol servers deliver and query through it, never touching
files themselves.

Delivery is group-committed: concurrent `deliver` calls are gathered into one batch, which a Gateway
thread writes as (1) each message to tmp/, fsynced, renamed into new/; (2) every touched new/
directory fsynced once; (3) one index transaction per mailbox, committed. Only then do the callers'
awaits return, so an SMTP `250` always follows a durable file, a durable name and a committed row.

Crash recovery (`open`): files in tmp/ are removed, and files in new/ or cur/ without an index row
were renamed but never committed, hence never acknowledged, or were expunged while a staged copy
pinned the store (below); they are removed too. After that the index and the files agree exactly.

Every write passes the node's WriteFence (mailnode.store.fence), so a checkpoint can hold them: a
batch waits at the fence before it is taken, never while a lock is held. With writes paused,
`checkpoint` folds every index's WAL into its main file.

Staged copies (mailnode.backup) come in two steps. With writes paused, the store is pinned (`pin`)
and `copy_indexes` copies every index with SQLite's backup API (rows, not files: quick); then writes
resume, and `link_files` hard-links the message files each copied index lists, one mailbox per Gateway
thread, while mail flows; `unpin` ends it. The pin is what makes the second step safe: while any pin
is held no message file a copied index may list is removed or moved. An expunge (EXPUNGE, MOVE, CLOSE)
commits its row's removal as always but leaves the file: its path is kept and unlinked when the last
pin goes, from a Gateway thread, under the mailbox's lock (not fenced: no index lists these files,
so a snapshot cut meanwhile is consistent with or without them). Folder RENAME (a directory rename
moves every file) and DELETE wait until no pin is held (`unpinned_writing`) before they pass the
fence, the way writes wait at the fence before taking a lock. A crash while pinned leaves the deferred files behind
without index rows; `open` removes them with the other unacknowledged files (`_Mailbox.recover`).
New files (deliveries, APPEND, COPY's links) are never in the way: a copied index lists none of them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from mailnode.gateway import Gateway
from mailnode.store import changes, durable, index, maildir
from mailnode.store.account import Account
from mailnode.store.fence import WriteFence

log = logging.getLogger(__name__)

# Gateway threads that copy indexes or link files for a staged copy at once: at most half the node's
# store threads, so deliveries and IMAP are served meanwhile (a thread pool serves its queue in order),
# and no more than the CPUs (beyond them links only contend: 8 threads on 2 CPUs took 1.6x as long as 2).
STAGING_THREADS = max(1, min(8, os.cpu_count() or 1))


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One message for one mailbox folder. `data` is the whole message as stored (CRLF lines)."""

    address: str
    data: bytes
    folder: str = maildir.INBOX
    internal_date: int | None = None
    flags: str = ""  # space-separated IMAP flags (APPEND may set them)


@dataclasses.dataclass(frozen=True)
class Stored:
    address: str
    folder: str
    uid: int
    path: Path


@dataclasses.dataclass
class MailboxUsage:
    bytes: int = 0
    messages: int = 0


class _Mailbox:
    """An open mailbox: its directory and its index (used under `lock`, from Gateway threads)."""

    def __init__(self, address: str, path: Path) -> None:
        self.address = address
        self.path = path
        durable.ensure_dir(path)
        self.index = index.Index(path / "index.sqlite")
        self.lock = threading.RLock()  # one thread at a time uses the index connection (and writes)
        # A second connection for reads: in WAL mode they run beside a write that waits for its fsync.
        self.reader = index.Index(path / "index.sqlite")
        self.read_lock = threading.Lock()
        self.folders: set[str] = set()

    def ensure_folder(self, name: str) -> Path:
        if name not in self.folders:
            with self.lock:
                maildir.ensure_folder(self.path, name)
                self.index.create_folder(name)
                self.folders.add(name)
        return maildir.folder_dir(self.path, name)

    def recover(self) -> tuple[int, int, int]:
        """Make files and index agree after a crash: returns (tmp removed, orphans removed, rows dropped).
        Orphans are files in new/ or cur/ without a row: deliveries renamed but never committed, and the
        files of expunged messages whose unlink a pinned store deferred (MailStore.pin) when the node
        stopped before the last pin went."""
        tmp_removed = maildir.clear_tmp(self.path)
        on_disk = maildir.message_files(self.path)
        indexed = self.index.paths()
        orphans = on_disk - indexed
        for rel in orphans:
            (self.path / rel).unlink(missing_ok=True)
        missing = indexed - on_disk
        if missing:
            self.index.forget(missing)
        return tmp_removed, len(orphans), len(missing)


class StoreError(Exception):
    """A checkpoint or staged copy that could not be made; the message says why."""


@dataclasses.dataclass(frozen=True)
class IndexCopy:
    """One mailbox's index copied into a staged copy; the message files it lists are linked next."""

    address: str
    source: Path  # the mailbox's directory
    target: Path  # its directory in the staged copy, holding index.sqlite


class MailStore:
    def __init__(self, root: Path, *, gateway: Gateway, fence: WriteFence | None = None) -> None:
        self.root = root
        self._gateway = gateway
        self.fence = fence or WriteFence()  # shared with the outbound queue: one per node
        self._mailboxes: dict[str, _Mailbox] = {}
        self._usage: dict[str, MailboxUsage] = collections.defaultdict(MailboxUsage)
        self._lock = threading.Lock()  # guards _mailboxes between the writer and readers
        self._pending: list[tuple[Sequence[Delivery], asyncio.Future[list[Stored]]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.switchboard = changes.Switchboard()
        self.is_open = False
        # Pins of staged copies (see the module docstring). _pin_lock guards _pins and _deferred between
        # the event loop (pin, unpin) and the Gateway threads that expunge.
        self._pin_lock = threading.Lock()
        self._pins = 0
        self._deferred: list[tuple[_Mailbox, Path]] = []  # files of expunged rows, unlinked at the last unpin
        self._releasing = 0  # unpins unlinking their deferred files now
        self._unpinned = asyncio.Event()  # set while no pin is held and no deferred unlink is running
        self._unpinned.set()
        self._pin_waiting = 0

    # -- life cycle ---------------------------------------------------------------------------------

    async def open(self) -> None:
        await self._gateway.run(self._open_sync)
        self.is_open = True

    def _open_sync(self) -> None:
        durable.ensure_dir(self.root / "mail")
        for address, path in maildir.mailbox_dirs(self.root):
            mailbox = self._open_mailbox(address, path)
            tmp_removed, orphans, dropped = mailbox.recover()
            if tmp_removed or orphans or dropped:
                log.warning(
                    "recovered mailbox after an unclean stop",
                    extra={
                        "fields": {
                            "mailbox": address,
                            "tmp_removed": tmp_removed,
                            "unacknowledged_removed": orphans,
                            "missing_rows_dropped": dropped,
                        }
                    },
                )
            total, count = mailbox.index.usage()
            self._usage[address] = MailboxUsage(total, count)

    def _open_mailbox(self, address: str, path: Path | None = None) -> _Mailbox:
        with self._lock:
            mailbox = self._mailboxes.get(address)
            if mailbox is None:
                mailbox = _Mailbox(address, path or maildir.mailbox_dir(self.root, address))
                mailbox.ensure_folder(maildir.INBOX)
                self._mailboxes[address] = mailbox
            return mailbox

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer
        await self._gateway.run(self._close_sync)
        self.is_open = False

    def _close_sync(self) -> None:
        with self._lock:
            for mailbox in self._mailboxes.values():
                mailbox.index.close()
                mailbox.reader.close()
            self._mailboxes.clear()

    # -- queries --------------------------------------------------------------------------------------

    def account(self, address: str) -> Account:
        """One mailbox as IMAP sees it: folders, flags, copies, expunges."""
        return Account(self, address)

    def account_for(self, address: str, *, size: int, count: int) -> None:
        """Keep the in-memory quota totals in step with a change (negative for removals)."""
        usage = self._usage[address]
        usage.bytes += size
        usage.messages += count

    def usage(self, address: str) -> MailboxUsage:
        return self._usage.get(address) or MailboxUsage()

    def total_bytes(self) -> int:
        return sum(u.bytes for u in self._usage.values())

    def total_messages(self) -> int:
        return sum(u.messages for u in self._usage.values())

    async def messages(self, address: str, folder: str | None = None) -> list[index.Message]:
        def read() -> list[index.Message]:
            if address not in self._mailboxes and not maildir.mailbox_dir(self.root, address).exists():
                return []
            mailbox = self._open_mailbox(address)
            with mailbox.read_lock:
                return mailbox.reader.messages(folder)

        return await self._gateway.run(read)

    def path_of(self, address: str, message: index.Message) -> Path:
        return maildir.mailbox_dir(self.root, address) / message.path

    # -- delivery -------------------------------------------------------------------------------------

    async def deliver(self, deliveries: Sequence[Delivery]) -> list[Stored]:
        """Store every delivery durably, or raise. Concurrent calls share fsyncs and commits."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Stored]] = loop.create_future()
        self._pending.append((deliveries, future))
        if self._writer is None:
            self._writer = loop.create_task(self._write_pending())
        # shield: a client that hangs up mid-write must not cancel the batch other clients wait on
        return await asyncio.shield(future)

    async def _write_pending(self) -> None:
        try:
            while self._pending:
                # While writes are paused, deliveries keep gathering in _pending; the batch is taken
                # once the fence lets this write in, so it counts as in flight until it is committed.
                async with self.fence.writing():
                    batch, self._pending = self._pending, []
                    results = await self._gateway.run(self._write_batch, [d for d, _ in batch])
                for (deliveries, future), result in zip(batch, results, strict=True):
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                        continue
                    for stored, delivery in zip(result, deliveries, strict=True):
                        self.account_for(stored.address, size=len(delivery.data), count=1)
                        self.switchboard.publish(stored.address, changes.Change(stored.folder, "added", (stored.uid,)))
                    future.set_result(result)
        finally:
            self._writer = None

    def _write_batch(self, calls: list[Sequence[Delivery]]) -> list[list[Stored] | BaseException]:
        """Runs in a Gateway thread. Each call succeeds or fails on its own."""
        now = int(time.time())
        outcome: list[list[Stored] | BaseException] = []
        written: list[list[tuple[_Mailbox, Delivery, Path]]] = []
        dirs: set[Path] = set()
        # Phase 1: every file written, fsynced and renamed into new/.
        for deliveries in calls:
            files: list[tuple[_Mailbox, Delivery, Path]] = []
            try:
                for delivery in deliveries:
                    mailbox = self._open_mailbox(delivery.address)
                    folder = mailbox.ensure_folder(delivery.folder)
                    path = durable.write_new(folder / "tmp", folder / "new", delivery.data)
                    files.append((mailbox, delivery, path))
                    dirs.add(folder / "new")
                outcome.append([])
            except Exception as error:  # e.g. disk full: this call fails, the others go on
                log.exception("store write failed", extra={"fields": {"error": str(error)}})
                for _, _, path in files:
                    path.unlink(missing_ok=True)
                files = []
                outcome.append(error)
            written.append(files)
        # Phase 2: the new names made durable, one fsync per directory.
        for new_dir in dirs:
            durable.fsync_dir(new_dir)
        # Phase 3: one index transaction per mailbox.
        per_mailbox: dict[str, list[tuple[int, int, Delivery, Path]]] = collections.defaultdict(list)
        for call_no, files in enumerate(written):
            for pos, (mailbox, delivery, path) in enumerate(files):
                per_mailbox[mailbox.address].append((call_no, pos, delivery, path))
        results: dict[tuple[int, int], Stored] = {}
        for address, items in per_mailbox.items():
            mailbox = self._mailboxes[address]
            rows = [
                index.NewMessage(
                    folder=d.folder,
                    path=str(p.relative_to(mailbox.path)),
                    size=len(d.data),
                    internal_date=d.internal_date or now,
                    flags=d.flags,
                )
                for _, _, d, p in items
            ]
            try:
                with mailbox.lock:
                    uids = mailbox.index.add(rows)
            except Exception as error:
                log.exception("index commit failed", extra={"fields": {"mailbox": address, "error": str(error)}})
                for call_no, _, _, path in items:
                    path.unlink(missing_ok=True)
                    outcome[call_no] = error
                continue
            for (call_no, pos, d, p), uid in zip(items, uids, strict=True):
                results[(call_no, pos)] = Stored(address, d.folder, uid, p)
        for call_no, files in enumerate(written):
            if not isinstance(outcome[call_no], BaseException):
                outcome[call_no] = [results[(call_no, pos)] for pos in range(len(files))]
        return outcome

    # -- pins (staged copies) -------------------------------------------------------------------------

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
        mailbox's lock; an error is logged and the files are left for `open` to remove), then lets the
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

    async def _release(self, deferred: list[tuple[_Mailbox, Path]]) -> None:
        try:
            if deferred:
                await self._gateway.run(self._unlink_deferred, deferred)
        except Exception as error:
            log.exception("deferred unlinks failed", extra={"fields": {"files": len(deferred), "error": str(error)}})
        finally:
            with self._pin_lock:
                self._releasing -= 1
                done = self._pins == 0 and self._releasing == 0
            if done:
                self._unpinned.set()

    @staticmethod
    def _unlink_deferred(deferred: list[tuple[_Mailbox, Path]]) -> None:
        per_mailbox: dict[_Mailbox, list[Path]] = collections.defaultdict(list)
        for mailbox, path in deferred:
            per_mailbox[mailbox].append(path)
        for mailbox, paths in per_mailbox.items():
            with mailbox.lock:
                for path in paths:
                    path.unlink(missing_ok=True)

    def unlink_messages(self, mailbox: _Mailbox, paths: Sequence[Path]) -> None:
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
            async with self.fence.writing():
                # A pin is only taken with writes paused, i.e. never while this write is in flight.
                if self._unpinned.is_set():
                    yield
                    return

    # -- checkpoints (mailnode.backup; only while the fence is paused) --------------------------------

    def _open_mailboxes(self) -> list[_Mailbox]:
        with self._lock:
            return list(self._mailboxes.values())

    async def checkpoint(self) -> tuple[int, int]:
        """Fold every index's WAL into its main file (`PRAGMA wal_checkpoint(TRUNCATE)`) and fsync it,
        so the volume holds each index whole. Call with writes paused. Returns (mailboxes, messages)."""
        return await self._gateway.run(self._checkpoint_sync)

    def _checkpoint_sync(self) -> tuple[int, int]:
        mailboxes = self._open_mailboxes()
        messages = 0
        for mailbox in mailboxes:
            # Both locks: no thread is between statements on either of the mailbox's connections, so
            # no read transaction keeps the WAL from being truncated.
            with mailbox.lock, mailbox.read_lock:
                db = sqlite3.connect(mailbox.index.path, isolation_level=None)
                try:
                    messages += int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
                    busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                finally:
                    db.close()
                if busy:
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

        async def one(mailbox: _Mailbox) -> IndexCopy:
            async with limit:
                return await self._gateway.run(self._copy_index, mailbox, dest)

        return await _all([one(mailbox) for mailbox in self._open_mailboxes()])

    def _copy_index(self, mailbox: _Mailbox, dest: Path) -> IndexCopy:
        target = dest / mailbox.path.relative_to(self.root)
        target.mkdir(parents=True, exist_ok=True)
        with mailbox.lock:
            source = sqlite3.connect(mailbox.index.path, isolation_level=None)
            try:
                copy = sqlite3.connect(target / "index.sqlite", isolation_level=None)
                try:
                    # No journal, no fsync: a staged copy is thrown away when anything fails (and at start),
                    # and these are the writes inside the pause. The copy is the source's pages, WAL header too.
                    copy.execute("PRAGMA synchronous=OFF")
                    copy.execute("PRAGMA journal_mode=OFF")
                    source.backup(copy)
                finally:
                    copy.close()
            finally:
                source.close()
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
    db = sqlite3.connect(copy.target / "index.sqlite", isolation_level=None)
    try:
        rows = db.execute("SELECT path, size FROM messages").fetchall()
    finally:
        db.close()
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
