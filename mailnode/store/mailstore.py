"""MailStore: the mailboxes of one node. Protocol servers deliver and query through it, never touching
files themselves.

Delivery is group-committed: concurrent `deliver` calls are gathered into one batch, which a Gateway
thread writes as (1) each message to tmp/, fsynced, renamed into new/; (2) every touched new/
directory fsynced once; (3) one index transaction per mailbox, committed. Only then do the callers'
awaits return, so an SMTP `250` always follows a durable file, a durable name and a committed row.

Crash recovery (`open`): files in tmp/ are removed, and files in new/ or cur/ without an index row
were renamed but never committed, hence never acknowledged, or were expunged while a staged copy
pinned the store (mailnode.store.staging); they are removed too. After that the index and the files
agree exactly.

A delivery with a cluster hand-off id (`Delivery.handoff`) that its mailbox has stored before is
answered as delivered (`Stored.duplicate`) without a second copy: the id is recorded in the same index
transaction as the message row (mailnode.store.index), so a home that crashes before its LMTP 250
reaches the peer stores the peer's retry no second time.

Every write passes the node's WriteFence (mailnode.store.fence), so a checkpoint can hold them: a
batch waits at the fence before it is taken, never while a lock is held.

A mailbox being moved to another node (mailnode.move) is `frozen` here for the final copy: `deliver`
refuses it (Frozen; SMTP queues such mail, LMTP answers 4xx), `settled` waits out the deliveries already
taken, `take` puts a received copy in place of the mailbox and `drop` removes the copy left behind
(mailnode.store.transfer has the files' side).

What backups need (WAL checkpoints, pins, staged copies) is `staging` (mailnode.store.staging); the open
mailboxes are `mailboxes` (mailnode.store.mailboxes), which Account and Staging are given too.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mailnode.gateway import Gateway
from mailnode.store import changes, durable, index, maildir, transfer
from mailnode.store.account import Account, FolderError
from mailnode.store.fence import WriteFence
from mailnode.store.mailboxes import Delivery as Delivery  # the protocol servers' name for it
from mailnode.store.mailboxes import Mailbox, Mailboxes, MailboxUsage, Stored
from mailnode.store.staging import Staging

log = logging.getLogger(__name__)


class Frozen(Exception):
    """A delivery to a mailbox frozen for a move: nothing was stored; try again once it is thawed (or at
    its new home)."""


class MailStore:
    def __init__(self, root: Path, *, gateway: Gateway, fence: WriteFence | None = None) -> None:
        self.root = root
        self._gateway = gateway
        self.fence = fence or WriteFence()  # shared with the outbound queue: one per node
        self.mailboxes = Mailboxes(root)
        self.staging = Staging(mailboxes=self.mailboxes, gateway=gateway, fence=self.fence)
        self._usage: dict[str, MailboxUsage] = collections.defaultdict(MailboxUsage)
        self._pending: list[tuple[Sequence[Delivery], asyncio.Future[list[Stored]]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.switchboard = changes.Switchboard()
        self.is_open = False
        self.frozen: set[str] = set()  # mailboxes being moved (mailnode.move): deliveries refused
        # Deliveries taken and not yet committed (or failed), with their mailboxes: what a freeze waits out.
        self._in_flight: dict[asyncio.Future[list[Stored]], frozenset[str]] = {}
        # Index changes waiting to be committed together (`grouped`), and the task committing them, by mailbox.
        self._groups: dict[str, list[tuple[Callable[[Mailbox], object], asyncio.Future[object]]]] = {}
        self._group_writers: dict[str, asyncio.Task[None]] = {}
        # Shared reads (`shared_read`): the one not started yet that callers join, and one at a time, by key.
        self._next_reads: dict[tuple[str, str], asyncio.Future[object]] = {}
        self._reading: dict[tuple[str, str], asyncio.Lock] = {}

    # -- life cycle ---------------------------------------------------------------------------------

    async def open(self) -> None:
        await self._gateway.run(self._open_sync)
        self.is_open = True

    def _open_sync(self) -> None:
        durable.ensure_dir(self.root / "mail")
        for address, path in maildir.mailbox_dirs(self.root):
            mailbox = self.mailboxes.open(address, path)
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

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer
        for writer in list(self._group_writers.values()):
            await writer
        await self._gateway.run(self.mailboxes.close)
        self.is_open = False

    # -- queries --------------------------------------------------------------------------------------

    def account(self, address: str) -> Account:
        """One mailbox as IMAP sees it: folders, flags, copies, expunges."""
        return Account(
            address,
            mailboxes=self.mailboxes,
            gateway=self._gateway,
            fence=self.fence,
            staging=self.staging,
            switchboard=self.switchboard,
            deliver=self.deliver,
            grouped=self.grouped,
            shared_read=self.shared_read,
            account_for=self.account_for,
        )

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
            mailbox = self.mailboxes.existing(address)
            if mailbox is None:
                return []
            with mailbox.read_lock:
                return mailbox.reader.messages(folder)

        return await self._gateway.run(read)

    def path_of(self, address: str, message: index.Message) -> Path:
        return maildir.mailbox_dir(self.root, address) / message.path

    # -- delivery -------------------------------------------------------------------------------------

    async def deliver(self, deliveries: Sequence[Delivery]) -> list[Stored]:
        """Store every delivery durably, or raise. Concurrent calls share fsyncs and commits."""
        if self.frozen and (held := self.frozen.intersection(d.address for d in deliveries)):
            raise Frozen(f"{', '.join(sorted(held))}: being moved to another node; try again shortly")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Stored]] = loop.create_future()
        self._in_flight[future] = frozenset(d.address for d in deliveries)
        future.add_done_callback(self._in_flight.pop)
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
                        if stored.duplicate:
                            continue
                        self.account_for(stored.address, size=delivery.size, count=1)
                        rows = () if stored.row is None else (stored.row,)
                        added = changes.Change(stored.folder, "added", (stored.uid,), rows=rows)
                        self.switchboard.publish(stored.address, added)
                    future.set_result(result)
        finally:
            self._writer = None

    def _write_batch(self, calls: list[Sequence[Delivery]]) -> list[list[Stored] | BaseException]:
        """Runs in a Gateway thread. Each call succeeds or fails on its own."""
        now = int(time.time())
        outcome: list[list[Stored] | BaseException] = []
        written: list[list[tuple[Mailbox, Delivery, Path]]] = []
        dirs: set[Path] = set()
        # Phase 1: every file written, fsynced and renamed into new/.
        for deliveries in calls:
            files: list[tuple[Mailbox, Delivery, Path]] = []
            try:
                for delivery in deliveries:
                    mailbox = self.mailboxes.open(delivery.address)
                    # Known to the mailbox (made or checked before): no wait for its read connection,
                    # which a SELECT of a big folder holds for a while.
                    if delivery.existing_folder and delivery.folder not in mailbox.folders:
                        with mailbox.read_lock:
                            if mailbox.reader.folder(delivery.folder) is None:
                                raise FolderError(f"[TRYCREATE] {delivery.folder} does not exist")
                    folder = mailbox.ensure_folder(delivery.folder)
                    if delivery.spooled is not None:  # written and fsynced already (Account.spool)
                        path = durable.move_new(delivery.spooled.path, folder / "new", delivery.spooled.size)
                    else:
                        path = durable.write_new(folder / "tmp", folder / "new", delivery.data)
                    files.append((mailbox, delivery, path))
                    dirs.add(folder / "new")
                outcome.append([])
            except FolderError as error:  # APPEND to a folder that is not there: nothing was written
                outcome.append(error)
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
            mailbox = self.mailboxes.open(address)
            rows = [
                index.NewMessage(
                    folder=d.folder,
                    path=str(p.relative_to(mailbox.path)),
                    size=d.size,
                    internal_date=d.internal_date or now,
                    flags=d.flags,
                    handoff=d.handoff,
                )
                for _, _, d, p in items
            ]
            try:
                with mailbox.lock:
                    uids = mailbox.index.deliver(rows, now=now)
                    # APPENDUID's UIDVALIDITY, for the APPENDs only: SMTP deliveries need no folder read
                    appended = {d.folder for _, _, d, _ in items if d.existing_folder}
                    folders = {name: mailbox.index.folder(name) for name in appended}
                    # The new rows, published with the change: the IMAP sessions on the folder need not
                    # query them (each would wait for the mailbox's read connection).
                    new_rows: dict[tuple[str, int], index.Message] = {}
                    for name in {d.folder for _, _, d, _ in items}:
                        wanted = [uid for (_, _, d, _), uid in zip(items, uids, strict=True) if d.folder == name]
                        for row in mailbox.index.messages(name, uids=[uid for uid in wanted if uid is not None]):
                            new_rows[(name, row.uid)] = row
            except Exception as error:
                log.exception("index commit failed", extra={"fields": {"mailbox": address, "error": str(error)}})
                for call_no, _, _, path in items:
                    path.unlink(missing_ok=True)
                    outcome[call_no] = error
                continue
            for (call_no, pos, d, p), uid in zip(items, uids, strict=True):
                if uid is None:  # a hand-off stored before: its new file has no row, and goes
                    p.unlink(missing_ok=True)  # (or, after a crash, recovery removes it)
                    results[(call_no, pos)] = Stored(address, d.folder, 0, p, duplicate=True)
                else:
                    found = folders.get(d.folder)
                    uidvalidity = 0 if found is None else found.uidvalidity
                    results[(call_no, pos)] = Stored(
                        address, d.folder, uid, p, uidvalidity=uidvalidity, row=new_rows.get((d.folder, uid))
                    )
        for call_no, files in enumerate(written):
            if not isinstance(outcome[call_no], BaseException):
                outcome[call_no] = [results[(call_no, pos)] for pos in range(len(files))]
        return outcome

    # -- shared reads ----------------------------------------------------------------------------------

    async def shared_read(self, key: tuple[str, str], read: Callable[[], object]) -> object:
        """`read()` in a Gateway thread, one at a time per key, its result shared by every caller that asked
        for the key before it started: callers that ask while one runs share the next one, so each gets
        what was there when it asked, or later (as its own read would). For a read of a big folder that
        sessions ask for together (a SELECT after sessions' cycles fell into step): one read, where each
        would wait for the read connection behind the others'. The first caller's `read` serves them all:
        the same key must mean the same read."""
        future = self._next_reads.get(key)
        if future is None:
            future = self._next_reads[key] = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().create_task(self._run_shared_read(key, read, future))
        # shield: a caller that goes away must not cancel the read the others wait on
        return await asyncio.shield(future)

    async def _run_shared_read(
        self, key: tuple[str, str], read: Callable[[], object], future: asyncio.Future[object]
    ) -> None:
        lock = self._reading.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                if self._next_reads.get(key) is future:  # started: who asks from now on shares the next
                    del self._next_reads[key]
                try:
                    future.set_result(await self._gateway.run(read))
                except Exception as error:
                    future.set_exception(error)
                except BaseException:
                    future.cancel()
                    raise
        finally:
            if not lock.locked() and key not in self._next_reads:
                self._reading.pop(key, None)

    # -- grouped index changes -------------------------------------------------------------------------

    async def grouped(self, address: str, change: Callable[[Mailbox], object]) -> object:
        """Run `change` in a Gateway thread under the mailbox's write lock, past the write fence, in one index
        transaction with the other changes to the mailbox asked for meanwhile: one commit, hence one fsync,
        for all of them (as deliveries share theirs), where each alone waited for the fsyncs of those before
        it. Returns once that commit is done. Only for changes that write nothing but the index (each in its
        own `atomic()`: a savepoint here, rolled back alone when it raises): a change whose files follow its
        commit (an expunge's unlinks) cannot know when that is. A change that raises fails alone; when the
        shared commit fails (a full disk), each change is run again alone, as if never grouped."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[object] = loop.create_future()
        self._groups.setdefault(address, []).append((change, future))
        if address not in self._group_writers:
            self._group_writers[address] = loop.create_task(self._write_groups(address))
        # shield: a client that hangs up must not cancel the commit other clients wait on
        return await asyncio.shield(future)

    async def _write_groups(self, address: str) -> None:
        try:
            while self._groups.get(address):
                async with self.fence.writing():  # taken once the fence lets it in, as a delivery batch
                    group = self._groups.pop(address)
                    try:
                        results = await self._gateway.run(self._write_group, address, [c for c, _ in group])
                    except Exception as error:  # the trip itself failed: every change of it fails
                        results = [error] * len(group)
                    except BaseException:  # cancelled (the node stops): so are the changes' callers
                        for _, future in group:
                            future.cancel()
                        raise
                for (_, future), result in zip(group, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._group_writers.pop(address, None)

    def _write_group(self, address: str, group: list[Callable[[Mailbox], object]]) -> list[object]:
        """Runs in a Gateway thread: the changes in one transaction; each result, or the exception it raised."""

        def attempt(change: Callable[[Mailbox], object]) -> object:
            try:
                return change(mailbox)
            except Exception as error:
                return error

        mailbox = self.mailboxes.open(address)
        with mailbox.lock:
            if len(group) == 1:
                return [attempt(group[0])]
            try:
                with mailbox.index.atomic():
                    return [attempt(change) for change in group]
            except Exception:  # the shared commit failed: nothing of it was committed; each alone then
                return [attempt(change) for change in group]

    # -- moves (mailnode.move) --------------------------------------------------------------------------

    def is_frozen(self, address: str) -> bool:
        return address in self.frozen

    async def settled(self, address: str) -> None:
        """Returns once the deliveries to `address` taken before its freeze are committed (or failed)."""
        taken = [future for future, addresses in self._in_flight.items() if address in addresses]
        if taken:
            await asyncio.wait(taken)

    async def snapshot(self, address: str, dest: Path) -> tuple[Path, list[tuple[str, int]]]:
        """The mailbox's index copied to `dest` as committed now (made if the mailbox is new): the
        mailbox's directory and (path, size) of each message file the copy lists."""

        def copy() -> tuple[Path, list[tuple[str, int]]]:
            mailbox = self.mailboxes.open(address)
            with mailbox.lock:
                return mailbox.path, transfer.snapshot(mailbox.path, mailbox.index, dest)

        return await self._gateway.run(copy)

    async def take(self, address: str, copy: Path) -> None:
        """Put the received copy `copy` (mailnode.store.transfer) in place of the mailbox: it is what is
        served from now on."""
        async with self.staging.unpinned_writing():
            usage = await self._gateway.run(self._take_sync, address, copy)
        self._usage[address] = usage

    def _take_sync(self, address: str, copy: Path) -> MailboxUsage:
        self.mailboxes.forget(address)
        destination = maildir.mailbox_dir(self.root, address)
        transfer.place(self.root, copy, destination)
        mailbox = self.mailboxes.open(address, destination)
        total, count = mailbox.index.usage()
        return MailboxUsage(total, count)

    def holds(self, address: str) -> bool:
        """Blocking: whether the mailbox has a directory on this node."""
        return maildir.mailbox_dir(self.root, address).exists()

    async def drop(self, address: str) -> MailboxUsage:
        """Remove the mailbox's directory (a copy left behind by a move): what it held."""
        async with self.staging.unpinned_writing():
            await self._gateway.run(self._drop_sync, address)
        return self._usage.pop(address, None) or MailboxUsage()

    def _drop_sync(self, address: str) -> None:
        self.mailboxes.forget(address)
        transfer.remove(self.root, maildir.mailbox_dir(self.root, address))
