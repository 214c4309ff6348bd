"""MailStore: the mailboxes of one node. Protocol servers deliver and query through it, never touching
files themselves.

Delivery is group-committed: concurrent `deliver` calls are gathered into one batch, which a Gateway
thread writes as (1) each message to tmp/, fsynced, renamed into new/; (2) every touched new/
directory fsynced once; (3) one index transaction per mailbox, committed. Only then do the callers'
awaits return, so an SMTP `250` always follows a durable file, a durable name and a committed row.

Crash recovery (`open`): files in tmp/ are removed, and files in new/ or cur/ without an index row
were renamed but never committed, hence never acknowledged; they are removed too. After that the
index and the files agree exactly.

Every write passes the node's WriteFence (mailnode.store.fence), so a checkpoint can hold them: a
batch waits at the fence before it is taken, never while a lock is held. With writes paused,
`checkpoint` folds every index's WAL into its main file and `copy_to` stages a consistent copy
(indexes through SQLite's backup API, message files hard-linked) for mailnode.backup.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from mailnode.gateway import Gateway
from mailnode.store import changes, durable, index, maildir
from mailnode.store.account import Account
from mailnode.store.fence import WriteFence

log = logging.getLogger(__name__)


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
        """Make files and index agree after a crash: returns (tmp removed, orphans removed, rows dropped)."""
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
                _fsync_file(mailbox.index.path)
            durable.fsync_dir(mailbox.path)
        return len(mailboxes), messages

    async def copy_to(self, dest: Path) -> dict[str, MailboxUsage]:
        """Stage a copy of every mailbox under dest (laid out as the data directory: mail/<domain>/
        <local>/index.sqlite and the message files): each index copied with SQLite's backup API, each
        file the copy lists hard-linked (files never change once written, so a link is a copy). dest
        must be on the store's file system. Call with writes paused. Returns what each copy holds."""
        return await self._gateway.run(self._copy_sync, dest)

    def _copy_sync(self, dest: Path) -> dict[str, MailboxUsage]:
        copied: dict[str, MailboxUsage] = {}
        for mailbox in self._open_mailboxes():
            target = dest / mailbox.path.relative_to(self.root)
            target.mkdir(parents=True, exist_ok=True)
            with mailbox.lock:
                source = sqlite3.connect(mailbox.index.path, isolation_level=None)
                try:
                    copy = sqlite3.connect(target / "index.sqlite", isolation_level=None)
                    try:
                        source.backup(copy)
                        rows = copy.execute("SELECT path, size FROM messages").fetchall()
                    finally:
                        copy.close()
                finally:
                    source.close()
                usage = copied[mailbox.address] = MailboxUsage()
                made: set[Path] = set()
                for rel, size in rows:
                    link = target / rel
                    if link.parent not in made:
                        link.parent.mkdir(parents=True, exist_ok=True)
                        made.add(link.parent)
                    try:
                        os.link(mailbox.path / rel, link)
                    except FileNotFoundError:
                        raise StoreError(f"{mailbox.address}: the index lists {rel}, which is not on disk") from None
                    usage.bytes += int(size)
                    usage.messages += 1
        return copied


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
