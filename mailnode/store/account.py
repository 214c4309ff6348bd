"""Account: one mailbox as the IMAP server sees it (folders, messages, flags, copies, expunges).

Every method is a coroutine that does its file and SQLite work in a Gateway thread under the
mailbox's lock, then announces the change on the store's switchboard, so other sessions on the same
mailbox learn of it. Message files never change once written: a COPY hard-links the file into the
destination folder (fsyncing that directory before the index row is committed), an EXPUNGE commits
the row's removal first and unlinks the file after, so a crash at any point leaves no row without a
file (recovery removes files without a row).

Changes pass the node's WriteFence first (before the mailbox lock): while a checkpoint holds writes
they wait, and reads go on. Two writes that only serve reads are skipped instead of waiting: a SELECT
while paused does not move the \\Recent mark, and a FETCH does not save the structure it computed.

While a staged copy pins the store (Staging.pin), an expunge's unlinks are deferred to the last unpin
(Staging.unlink_messages), and a folder RENAME or DELETE waits, before the fence, until no pin is held
(Staging.unpinned_writing): no file a staged index lists is removed or moved before it is linked.

Folder names pass maildir.folder_dir's checks before anything is touched (InvalidFolderName,
FolderNameTooLong). A RENAME is all or nothing, and survives a crash: a journal of the directory moves
is made durable first (Mailbox.journal_renames), the directories are renamed, the index is committed
in one transaction, and the journal goes; if the commit fails the directories go back at once, and
after a crash recovery moves them to match whatever the index holds (Mailbox.settle_renames).

A full volume (or file-system quota) makes a change fail with StorageFull and nothing changed, while
reads go on: SELECT then leaves the \\Recent mark where it is and FETCH does not save structures.
An EXPUNGE (or DELETE) whose index commit finds no space unlinks the files first and commits again,
which frees the space; a crash between the two leaves rows without files, which recovery drops
(Mailbox.recover), so the index and the files still agree.

MailStore makes Accounts (`MailStore.account`) and passes each what it needs of the store, so this
module does not import mailnode.store.mailstore.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal, Protocol, TypeVar, cast

from mailnode.gateway import Gateway
from mailnode.store import changes, durable, index, maildir
from mailnode.store.fence import WriteFence
from mailnode.store.mailboxes import Delivery, Mailbox, Mailboxes, Spooled, Stored
from mailnode.store.staging import Staging

Deliver = Callable[[Sequence[Delivery]], Awaitable[list[Stored]]]
"""MailStore.deliver: stores messages durably, group-committed with the other deliveries."""
Grouped = Callable[[str, Callable[[Mailbox], object]], Awaitable[object]]
"""MailStore.grouped: runs an index-only change of a mailbox, committed with the others asked for meanwhile."""
SharedRead = Callable[[tuple[str, str], Callable[[], object]], Awaitable[object]]
"""MailStore.shared_read: a read whose result the callers asking for the same key together share."""


class AccountFor(Protocol):
    """MailStore.account_for: keeps the quota totals in step with a change (negative for removals)."""

    def __call__(self, address: str, *, size: int, count: int) -> None: ...


Message = index.Message  # what the protocol servers see of a message row
Folder = index.Folder
InvalidFolderName = maildir.InvalidFolderName  # empty, an empty, '.' or '..' level, a control character
FolderNameTooLong = maildir.FolderNameTooLong  # too long for the file system once encoded

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)  # Linux 4.14 and later: a read that never waits for the disk


class FolderError(Exception):
    """A folder operation that cannot be done; the message says why (IMAP sends it with NO)."""


class StorageFull(Exception):
    """The volume or a file-system quota is full: the change was not made (reads still work)."""


def _highestmodseq(mailbox: Mailbox, name: str) -> int:
    """The folder's HIGHESTMODSEQ, read under the mailbox's lock right after a change: the mod-sequence the
    change took (changes.Change.modseqs of an expunge); 0 when the folder is gone."""
    folder = mailbox.index.folder(name)
    return 0 if folder is None else folder.highestmodseq


def _out_of_space(error: BaseException) -> bool:
    return durable.out_of_space(error) or index.out_of_space(error)


@contextlib.contextmanager
def _storage_full_refused() -> Iterator[None]:
    """Turn the disk's and SQLite's "no space" into StorageFull; other errors pass unchanged."""
    try:
        yield
    except Exception as error:
        if _out_of_space(error):
            raise StorageFull(str(error)) from error
        raise


@dataclasses.dataclass(frozen=True)
class Selected:
    folder: index.Folder
    messages: list[index.Message] | None  # None: not read, the caller's `unchanged` said it has them
    first_recent: int  # UIDs at or above this are \Recent for the selecting session


def _apply(mode: Literal["+", "-", ""], current: str, flags: Iterable[str]) -> str:
    have = set(current.split())
    given = {f for f in flags if f != "\\Recent"}
    if mode == "+":
        have |= given
    elif mode == "-":
        have -= {f for f in have if f.lower() in {g.lower() for g in given}}
    else:
        have = given
    return " ".join(sorted(have))


class MessageFile:
    """One message file held open, read in ranges through the Gateway: FETCH streams a large message
    from it instead of holding it in memory. Open, it stays readable when an expunge unlinks it."""

    def __init__(self, fd: int, size: int, *, gateway: Gateway) -> None:
        self.size = size
        self._fd = fd
        self._gateway = gateway

    async def read(self, offset: int, length: int) -> bytes:
        return await self._gateway.run(os.pread, self._fd, length, offset)


class MessageSpool:
    """A message received in chunks (APPEND's literal, RFC 3501 §6.3.11) into a file under the
    mailbox's INBOX/tmp/, so the session holds one chunk at a time, not the message; `Account.append`
    fsyncs it and the delivery path renames it into place. Each write runs in a Gateway thread and is
    not cut off by a cancelled caller (the descriptor is closed only after it). A volume that fills up
    raises StorageFull and removes the file; `discard` removes it in any case once the command is over
    (a no-op once delivered), and a crash leaves it in tmp/, which recovery empties."""

    def __init__(self, path: Path, fd: int, *, gateway: Gateway) -> None:
        self.path = path
        self.size = 0
        self._fd: int | None = fd
        self._gateway = gateway
        self._writing: asyncio.Future[None] | None = None

    async def write(self, chunk: bytes) -> None:
        if self._fd is None:
            raise ValueError("the spool is closed")
        self._writing = asyncio.ensure_future(self._gateway.run(durable.write_all, self._fd, chunk))
        try:
            with _storage_full_refused():
                await asyncio.shield(self._writing)
        except StorageFull:
            await self.discard()
            raise
        self.size += len(chunk)

    async def _settled(self) -> int | None:
        """The descriptor, once no write is running on it (None if closed)."""
        if self._writing is not None:
            with contextlib.suppress(Exception):
                await self._writing
            self._writing = None
        return self._fd

    async def finish(self) -> Spooled:
        """fsync and close the file: the message as delivery takes it."""
        fd = await self._settled()
        if fd is None:
            raise ValueError("the spool is closed")
        self._fd = None
        try:
            with _storage_full_refused():
                await self._gateway.run(_sync_and_close, fd)
        except BaseException:
            await self._gateway.run(functools.partial(self.path.unlink, missing_ok=True))
            raise
        return Spooled(self.path, self.size)

    async def discard(self) -> None:
        """Close and remove the file, if still there (after delivery it is not)."""
        fd = await self._settled()
        self._fd = None
        await self._gateway.run(_close_and_unlink, fd, self.path)


def _sync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _close_and_unlink(fd: int | None, path: Path) -> None:
    if fd is not None:
        os.close(fd)
    path.unlink(missing_ok=True)


class Account:
    def __init__(
        self,
        address: str,
        *,
        mailboxes: Mailboxes,
        gateway: Gateway,
        fence: WriteFence,
        staging: Staging,
        switchboard: changes.Switchboard,
        deliver: Deliver,
        grouped: Grouped,
        shared_read: SharedRead,
        account_for: AccountFor,
    ) -> None:
        self.address = address
        self._mailboxes = mailboxes
        self._gateway = gateway
        self._fence = fence
        self._staging = staging
        self.switchboard = switchboard
        self._deliver = deliver
        self._grouped = grouped
        self._shared_read = shared_read
        self._account_for = account_for

    async def _run(self, fn: Callable[[Mailbox], object], *, fenced: bool = True, moves: bool = False) -> object:
        """Run a change under the mailbox's write lock, in a Gateway thread, once the write fence lets
        it in (`fenced=False`: a read that needs the lock, such as a SELECT that writes nothing;
        `moves=True`: a change that moves or removes whole folders, which also waits until the store
        is not pinned)."""

        def locked() -> object:
            mailbox = self._mailboxes.open(self.address)
            with mailbox.lock:
                return fn(mailbox)

        with _storage_full_refused():
            if not fenced:
                return await self._gateway.run(locked)
            async with self._staging.unpinned_writing() if moves else self._fence.writing():
                return await self._gateway.run(locked)

    async def _read(self, fn: Callable[[index.Index], object]) -> object:
        """Run a query on the mailbox's read connection, beside any change in progress."""

        def read() -> object:
            mailbox = self._mailboxes.open(self.address)
            with mailbox.read_lock:
                return fn(mailbox.reader)

        return await self._gateway.run(read)

    def _publish(self, change: changes.Change) -> None:
        self.switchboard.publish(self.address, change)

    # -- folders ------------------------------------------------------------------------------------

    async def folders(self) -> list[index.Folder]:
        result = await self._read(lambda reader: reader.folders())
        assert isinstance(result, list)
        return result

    async def status(self, name: str) -> index.FolderStatus | None:
        result = await self._read(lambda reader: reader.status(name))
        assert result is None or isinstance(result, index.FolderStatus)
        return result

    async def create_folder(self, name: str) -> None:
        """Create a folder and its missing superiors (RFC 3501 §6.3.3), all or none."""

        def create(mailbox: Mailbox) -> None:
            maildir.check_folder_name(name)
            if mailbox.index.folder(name) is not None:
                raise FolderError(f"{name} already exists")
            levels = name.split(maildir.DELIMITER)
            missing = [
                ancestor
                for ancestor in (maildir.DELIMITER.join(levels[:depth]) for depth in range(1, len(levels) + 1))
                if mailbox.index.folder(ancestor) is None
            ]
            for folder in missing:
                maildir.ensure_folder(mailbox.path, folder)  # an empty Maildir left by a failure is harmless
            with mailbox.index.atomic():
                for folder in missing:
                    mailbox.index.create_folder(folder)
            mailbox.folders.update(missing)

        await self._run(create)

    async def delete_folder(self, name: str) -> None:
        def delete(mailbox: Mailbox) -> None:
            directory = maildir.folder_dir(mailbox.path, name)
            if name.upper() == maildir.INBOX:
                raise FolderError("INBOX cannot be deleted")
            if mailbox.index.folder(name) is None:
                raise FolderError(f"{name} does not exist")
            rows = mailbox.index.messages(name)
            size = sum(m.size for m in rows)
            # Never while pinned (moves=True), so the whole directory can go once the rows are gone.
            self._commit_freeing(
                mailbox, [mailbox.path / m.path for m in rows], lambda: mailbox.index.delete_folder(name)
            )
            mailbox.folders.discard(name)
            shutil.rmtree(directory, ignore_errors=True)
            self._account_for(self.address, size=-size, count=-len(rows))
            self._mailboxes.reserve.ensure()

        await self._run(delete, moves=True)

    async def rename_folder(self, old: str, new: str) -> None:
        """Rename a folder and its children, all or nothing; INBOX as RFC 3501 §6.3.5 says."""

        def rename(mailbox: Mailbox) -> None:
            maildir.check_folder_name(old)
            maildir.check_folder_name(new)
            if mailbox.index.folder(old) is None:
                raise FolderError(f"{old} does not exist")
            if mailbox.index.folder(new) is not None:
                raise FolderError(f"{new} already exists")
            if old.upper() == maildir.INBOX:
                self._rename_inbox_locked(mailbox, new)
            else:
                self._rename_locked(mailbox, old, new)

        await self._run(rename, moves=True)

    def _rename_locked(self, mailbox: Mailbox, old: str, new: str) -> None:
        names = [
            (f.name, new + f.name[len(old) :])
            for f in mailbox.index.folders()
            if f.name == old or f.name.startswith(old + maildir.DELIMITER)
        ]
        # Every new name checked (and every directory named) before anything moves.
        dirs = [(maildir.folder_dir(mailbox.path, b), maildir.folder_dir(mailbox.path, a)) for b, a in names]
        for _, after in names:
            if mailbox.index.folder(after) is not None:
                raise FolderError(f"{after} already exists")
        mailbox.settle_renames()  # a rename whose undo failed earlier is finished first
        moves = [(source, target) for source, target in dirs if source.exists()]
        path_moves: list[tuple[str, str]] = []
        for (before, _), (source, target) in zip(names, dirs, strict=True):
            old_prefix, new_prefix = f"{source.name}/", f"{target.name}/"
            path_moves += [(m.path, new_prefix + m.path[len(old_prefix) :]) for m in mailbox.index.messages(before)]
        # The journal is durable before the first directory moves: a crash from here on is settled by
        # recovery (Mailbox.settle_renames), which moves the directories to match the index.
        mailbox.journal_renames(old, new, moves)
        try:
            for source, target in moves:
                source.rename(target)
            durable.fsync_dir(mailbox.path)
            with mailbox.index.atomic():
                mailbox.index.rename_folder(old, new)
                mailbox.index.move_paths(path_moves)
        except Exception:
            # The index did not commit: settling moves the directories back, now rather than at the next
            # start. If that fails too, the journal stays for the next rename or start to settle.
            try:
                mailbox.settle_renames()
            except Exception:
                log.exception("could not undo a folder rename", extra={"fields": {"from": old, "to": new}})
            raise
        finally:
            mailbox.folders.clear()
        try:
            mailbox.end_renames()
        except OSError:  # the rename is done; a journal left behind is settled (a no-op) later
            log.exception("could not remove the rename journal", extra={"fields": {"from": old, "to": new}})

    def _rename_inbox_locked(self, mailbox: Mailbox, new: str) -> None:
        """RFC 3501 §6.3.5: renaming INBOX moves its messages to a new folder; INBOX stays, empty.
        One index transaction creates the folder, adds the copies and removes INBOX's rows; on a
        failure the links and the new directory go again."""
        directory = maildir.folder_dir(mailbox.path, new)
        created = not directory.exists()
        links: list[Path] = []
        try:
            maildir.ensure_folder(mailbox.path, new)
            with mailbox.index.atomic():
                mailbox.index.create_folder(new)
                uids = [m.uid for m in mailbox.index.messages(maildir.INBOX)]
                self._link_copies(mailbox, maildir.INBOX, uids, new, links)
                removed = mailbox.index.expunge(maildir.INBOX, uids)
        except BaseException:
            for link in links:
                link.unlink(missing_ok=True)
            if created:
                shutil.rmtree(directory, ignore_errors=True)
            mailbox.folders.discard(new)
            raise
        mailbox.folders.add(new)
        self._staging.unlink_messages(mailbox, [mailbox.path / rel for _, rel in removed])

    async def subscribe(self, name: str, subscribed: bool) -> None:
        def update(mailbox: Mailbox) -> None:
            if mailbox.index.folder(name) is None:
                raise FolderError(f"{name} does not exist")
            mailbox.index.set_subscribed(name, subscribed)

        await self._run(update)

    # -- messages -----------------------------------------------------------------------------------

    async def select(
        self, name: str, *, take_recent: bool, unchanged: Callable[[index.Folder], bool] | None = None
    ) -> Selected | None:
        """The folder and its rows, and the first UID that is \\Recent for the caller (EXAMINE, `take_recent`
        False: none), moving the mark past what it read. With `unchanged`, the folder's row is read first,
        alone, and the rows are not when `unchanged` says the caller has them as they are (on the loop)."""
        # While writes are paused a SELECT reads on without moving the \Recent mark: the session sees
        # the recent messages, and so may the next one (RFC 3501 §2.3.2: a message the server cannot
        # tell was announced to another session SHOULD be considered recent).
        writes = take_recent and not self._fence.paused

        # The folder and its rows are read first, on the read connection in one snapshot, and only then
        # is the \Recent mark moved, past what was read: a SELECT of a big folder does not hold the write
        # lock while it reads (every STORE, APPEND and EXPUNGE of the mailbox would wait behind it), and
        # a message stored after the snapshot stays recent for the next SELECT, as before.
        def read(mailbox: Mailbox) -> tuple[index.Folder, list[index.Message]] | None:
            with mailbox.read_lock, mailbox.reader.snapshot():
                folder = mailbox.reader.folder(name)
                if folder is None:
                    return None
                return folder, mailbox.reader.messages(name, shared=True)  # kept by the session

        folder: index.Folder | None = None
        messages: list[index.Message] | None = None
        if unchanged is not None:
            folder = cast(index.Folder | None, await self._read(lambda reader: reader.folder(name)))
            if folder is None:
                return None
        if folder is None or unchanged is None or not unchanged(folder):
            # SELECTs of the folder asked for while one reads share the next read (MailStore.shared_read).
            found = await self._shared_read((self.address, name), lambda: read(self._mailboxes.open(self.address)))
            if found is None:
                return None
            folder, messages = cast(tuple[index.Folder, list[index.Message]], found)
        first_recent = folder.first_recent if take_recent else folder.uidnext  # EXAMINE: none recent
        if writes:

            def take(mailbox: Mailbox) -> int:
                try:
                    return mailbox.index.take_recent(name, upto=folder.uidnext)
                except KeyError:
                    return folder.uidnext  # deleted since the read: nothing of it is recent any more
                except Exception as error:
                    if not _out_of_space(error):
                        raise
                    return folder.first_recent  # a full disk: read on, as while writes are paused

            taken = await self._run(take)
            assert isinstance(taken, int)
            first_recent = taken
        return Selected(folder, messages, first_recent)

    async def messages(self, name: str, uids: Iterable[int] | None = None) -> list[index.Message]:
        wanted = None if uids is None else list(uids)
        result = await self._read(lambda reader: reader.messages(name, uids=wanted))
        assert isinstance(result, list)
        return result

    async def load(
        self,
        name: str,
        uids: Sequence[int],
        *,
        data: bool,
        data_limit: int | None = None,
        known: Mapping[int, index.Message] | None = None,
    ) -> list[tuple[index.Message, bytes | None]]:
        """Rows of these UIDs and, with data=True, their files' bytes (None for a message larger than
        `data_limit`, which the caller streams instead): one Gateway trip for both. The rows in `known`
        (rows the caller read before: their path, size and date never change) are not queried, so a read
        of a few known messages does not wait for the mailbox's read connection; a known row whose file
        is not there is queried after all (a RENAME moves files)."""
        root = maildir.mailbox_dir(self._mailboxes.root, self.address)

        def query(wanted: list[int]) -> list[index.Message]:
            if not wanted:
                return []
            mailbox = self._mailboxes.open(self.address)
            with mailbox.read_lock:
                return mailbox.reader.messages(name, uids=wanted)

        def read_files(rows: list[index.Message], loaded: list[tuple[index.Message, bytes | None]]) -> list[int]:
            """Append (row, bytes) to `loaded`; returns the UIDs whose file was not found."""
            missing: list[int] = []
            for message in rows:
                if data_limit is not None and message.size > data_limit:
                    loaded.append((message, None))
                    continue
                try:
                    loaded.append((message, (root / message.path).read_bytes()))
                except FileNotFoundError:
                    missing.append(message.uid)
            return missing

        def load() -> list[tuple[index.Message, bytes | None]]:
            rows = [] if known is None else [known[uid] for uid in uids if uid in known]
            rows += query([uid for uid in uids if known is None or uid not in known])
            if not data:
                return [(m, None) for m in rows]
            loaded: list[tuple[index.Message, bytes | None]] = []
            moved = [uid for uid in read_files(rows, loaded) if known is not None and uid in known]
            read_files(query(moved), loaded)  # the others: expunged since the query, left out
            return loaded

        return await self._gateway.run(load)

    def read_cached(self, message: index.Message) -> bytes | None:
        """The message's bytes when the page cache holds all of them, read at once on the caller's thread:
        preadv2's RWF_NOWAIT (Linux) never waits for the disk, so this is the one file read that need not
        take a Gateway trip (two turns of a busy event loop for a read of microseconds). None when the file
        is not wholly cached, is gone (expunged, or moved by a RENAME), or RWF_NOWAIT is not supported:
        then the caller reads it through the Gateway."""
        if _NOWAIT is None:
            return None
        path = maildir.mailbox_dir(self._mailboxes.root, self.address) / message.path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            buffer = bytearray(message.size + 1)  # one byte more: a file longer than its row is read the slow way
            read = os.preadv(fd, [buffer], 0, _NOWAIT)
        except OSError:  # EAGAIN: not cached; EOPNOTSUPP: the file system cannot say
            return None
        finally:
            os.close(fd)
        if read != message.size:  # partly cached (a short read), or not the size the row says
            return None
        del buffer[read:]
        return bytes(buffer)

    async def read(self, messages: Sequence[index.Message], *, limits: Sequence[int] | None = None) -> list[bytes]:
        """The stored bytes of each message, or its first `limits[i]` bytes (one Gateway trip for all);
        b"" for a message another session expunged meanwhile."""
        root = maildir.mailbox_dir(self._mailboxes.root, self.address)

        def read_one(message: index.Message, limit: int) -> bytes:
            try:
                with (root / message.path).open("rb") as file:
                    return file.read(limit)
            except FileNotFoundError:
                return b""

        def read() -> list[bytes]:
            return [read_one(m, -1 if limits is None else limits[i]) for i, m in enumerate(messages)]

        return await self._gateway.run(read)

    @contextlib.asynccontextmanager
    async def open_message(self, message: index.Message) -> AsyncIterator[MessageFile | None]:
        """The message's file, open for ranged reads while the block runs; None if it was expunged."""
        gateway = self._gateway
        path = maildir.mailbox_dir(self._mailboxes.root, self.address) / message.path

        def open_file() -> tuple[int, int] | None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
            return fd, os.fstat(fd).st_size

        opened = await gateway.run(open_file)
        if opened is None:
            yield None
            return
        fd, size = opened
        try:
            yield MessageFile(fd, size, gateway=gateway)
        finally:
            os.close(fd)

    async def structures(
        self, name: str, messages: Sequence[index.Message], compute: Callable[[bytes], str]
    ) -> dict[int, str]:
        """The cached structure (e.g. MIME analysis as JSON) of each message, computed and saved for
        those that have none yet; a message expunged meanwhile is left out. One Gateway trip for all."""

        def load() -> tuple[dict[int, str], dict[int, str]]:
            mailbox = self._mailboxes.open(self.address)
            with mailbox.read_lock:
                cached = mailbox.reader.structures(name, (m.uid for m in messages))
            result: dict[int, str] = {}
            computed: dict[int, str] = {}
            for message in messages:
                structure = cached.get(message.uid)
                if structure is None:
                    try:
                        data = (mailbox.path / message.path).read_bytes()
                    except FileNotFoundError:  # expunged by another session meanwhile: left out
                        continue
                    structure = computed[message.uid] = compute(data)
                result[message.uid] = structure
            return result, computed

        def save(mailbox: Mailbox) -> None:
            mailbox.index.set_structures(name, computed)

        result, computed = await self._gateway.run(load)
        if computed and not self._fence.paused:  # a cache: while paused, computed again next time
            with contextlib.suppress(StorageFull):  # on a full disk too
                await self._run(save)
        return result

    async def search_fields(self, name: str, uids: Sequence[int]) -> dict[int, str]:
        """The header fields SEARCH cached in the index for these messages (those that have them)."""
        wanted = list(uids)
        result = await self._read(lambda reader: reader.search_fields(name, wanted))
        assert isinstance(result, dict)
        return result

    async def save_search_fields(self, name: str, fields: dict[int, str]) -> None:
        """Cache SEARCH's header fields in the index; skipped, like a structure, while writes are paused
        or the disk is full (computed again next time)."""

        def save(mailbox: Mailbox) -> None:
            mailbox.index.set_search_fields(name, fields)

        if fields and not self._fence.paused:
            with contextlib.suppress(StorageFull):
                await self._run(save)

    async def store_flags(
        self,
        name: str,
        uids: Sequence[int],
        *,
        mode: Literal["+", "-", ""],
        flags: Sequence[str],
        unchanged_since: int | None = None,
        origin: object | None = None,
    ) -> tuple[list[index.Message], list[int]]:
        def update(mailbox: Mailbox) -> tuple[list[index.Message], list[int]]:
            current = {m.uid: m.flags for m in mailbox.index.messages(name, uids=uids)}
            wanted = [(uid, _apply(mode, current[uid], flags)) for uid in uids if uid in current]
            try:
                return mailbox.index.set_flags(name, wanted, unchanged_since=unchanged_since)
            except Exception as error:
                # A full disk: give up the space reserve so that users can still mark mail \\Deleted
                # and expunge it (which makes room, and takes the reserve again).
                if not _out_of_space(error) or not self._mailboxes.reserve.release():
                    raise
            log.warning("disk full: space reserve released", extra={"fields": {"mailbox": self.address}})
            return mailbox.index.set_flags(name, wanted, unchanged_since=unchanged_since)

        # Group-committed: concurrent STOREs (and FETCHes setting \Seen) on the mailbox share one fsync.
        with _storage_full_refused():
            result = await self._grouped(self.address, update)
        assert isinstance(result, tuple)
        changed, failed = result
        if changed:
            self._publish(
                changes.Change(
                    name,
                    "flags",
                    tuple(m.uid for m in changed),
                    flags=tuple(m.flags for m in changed),
                    modseqs=tuple(m.modseq for m in changed),
                    origin=origin,
                )
            )
        return changed, failed

    def _commit_freeing(self, mailbox: Mailbox, paths: Sequence[Path], commit: Callable[[], _T]) -> _T:
        """Commit an index change that removes the rows of these files. When SQLite finds no space for
        it (a full disk), unlink the files first, which makes room, and commit again: a crash between
        the two leaves rows without files, which recovery drops, so files and index still agree. Not
        while a staged copy pins the store: its files must stay."""
        try:
            return commit()
        except Exception as error:
            if not _out_of_space(error) or self._staging.pinned:
                raise
        log.warning(
            "no space to commit a removal: unlinking the files first", extra={"fields": {"mailbox": self.address}}
        )
        for path in paths:
            path.unlink(missing_ok=True)
        return commit()

    def _expunge_locked(self, mailbox: Mailbox, name: str, uids: Sequence[int]) -> tuple[list[int], int]:
        """The expunge, under the mailbox's lock: the UIDs removed, and the folder's HIGHESTMODSEQ after it."""
        rows = mailbox.index.messages(name, uids=uids)
        removed = self._commit_freeing(
            mailbox, [mailbox.path / m.path for m in rows], lambda: mailbox.index.expunge(name, uids)
        )
        self._forget_files(mailbox, removed, rows)
        return [uid for uid, _ in removed], _highestmodseq(mailbox, name) if removed else 0

    def _forget_files(
        self, mailbox: Mailbox, removed: Sequence[tuple[int, str]], rows: Sequence[index.Message]
    ) -> None:
        """After the rows' removal is committed: unlink their files and count them out of the quota."""
        gone = {uid for uid, _ in removed}
        size = sum(m.size for m in rows if m.uid in gone)
        # Now, or at the last unpin while a staging is pinned.
        self._staging.unlink_messages(mailbox, [mailbox.path / rel for _, rel in removed])
        self._account_for(self.address, size=-size, count=-len(removed))
        if removed:
            self._mailboxes.reserve.ensure()  # if it was given up, and this made room

    async def expunge(self, name: str, uids: Sequence[int], *, origin: object | None = None) -> list[int]:
        """Remove these messages (the caller picks them, e.g. those flagged \\Deleted)."""
        result = await self._run(lambda m: self._expunge_locked(m, name, uids))
        removed, modseq = cast(tuple[list[int], int], result)
        if removed:
            self._publish(changes.Change(name, "expunged", tuple(removed), modseqs=(modseq,), origin=origin))
        return removed

    def _link_copies(
        self, mailbox: Mailbox, name: str, uids: Sequence[int], dest: str, links: list[Path]
    ) -> tuple[list[tuple[int, int]], int]:
        """Hard-link the messages into `dest`, fsync its directory and add their rows (in the caller's
        transaction, if any). Appends each link to `links`, for the caller to remove on a failure.
        Returns the (source uid, new uid) pairs and the bytes copied."""
        target = mailbox.index.folder(dest)
        if target is None:
            raise FolderError(f"[TRYCREATE] {dest} does not exist")
        target_dir = mailbox.ensure_folder(dest)
        sources = mailbox.index.messages(name, uids=uids)
        rows: list[index.NewMessage] = []
        for message in sources:
            link = target_dir / "cur" / durable.unique_name(message.size)
            os.link(mailbox.path / message.path, link)
            links.append(link)
            rows.append(
                index.NewMessage(
                    dest, str(link.relative_to(mailbox.path)), message.size, message.internal_date, message.flags
                )
            )
        durable.fsync_dir(target_dir / "cur")
        new_uids = mailbox.index.add(rows)
        return list(zip((m.uid for m in sources), new_uids, strict=True)), sum(m.size for m in sources)

    async def copy(
        self, name: str, uids: Sequence[int], dest: str, *, move: bool = False, origin: object | None = None
    ) -> tuple[int, list[tuple[int, int]]]:
        """Copy (or move, RFC 6851) messages into folder `dest`. Returns dest's UIDVALIDITY and the
        (source uid, new uid) pairs (RFC 4315 COPYUID)."""

        def copy(mailbox: Mailbox) -> tuple[int, list[tuple[int, int]], list[int], int]:
            links: list[Path] = []
            rows = mailbox.index.messages(name, uids=uids) if move else []
            try:
                with mailbox.index.atomic():  # a MOVE's copy and expunge: one commit
                    pairs, size = self._link_copies(mailbox, name, uids, dest, links)
                    removed = mailbox.index.expunge(name, [src for src, _ in pairs]) if move else []
            except BaseException:
                for link in links:
                    link.unlink(missing_ok=True)
                raise
            self._account_for(self.address, size=size, count=len(pairs))
            self._forget_files(mailbox, removed, rows)
            target = mailbox.index.folder(dest)
            assert target is not None
            modseq = _highestmodseq(mailbox, name) if removed else 0  # a MOVE's expunge took it
            return target.uidvalidity, pairs, [uid for uid, _ in removed], modseq

        result = await self._run(copy)
        assert isinstance(result, tuple)
        uidvalidity, pairs, expunged, modseq = result
        if pairs:
            self._publish(changes.Change(dest, "added", tuple(new for _, new in pairs), origin=origin))
        if expunged:
            self._publish(changes.Change(name, "expunged", tuple(expunged), modseqs=(modseq,), origin=origin))
        return uidvalidity, pairs

    async def spool(self) -> MessageSpool:
        """A file under the mailbox's INBOX/tmp/ to receive a large message into, chunk by chunk, then
        `append` it (any folder: the rename stays in the mailbox's file system). The caller discards it."""

        def create() -> tuple[Path, int]:
            mailbox = self._mailboxes.open(self.address)
            path = mailbox.ensure_folder(maildir.INBOX) / "tmp" / durable.unique_name(0)
            return path, durable.create_new(path)

        with _storage_full_refused():
            path, fd = await self._gateway.run(create)
        return MessageSpool(path, fd, gateway=self._gateway)

    async def append(
        self, name: str, message: bytes | MessageSpool, *, flags: str, internal_date: int | None
    ) -> tuple[int, int]:
        """Store a message (its bytes, or a spool it was received into) into an existing folder, durably
        (file and directory fsynced, index committed); returns (UIDVALIDITY, UID) for APPENDUID. The
        batch that stores it checks that the folder is there (FolderError, TRYCREATE) and reads its
        UIDVALIDITY in the same transaction: no read of the folder before, one trip to a thread fewer."""
        spooled = await message.finish() if isinstance(message, MessageSpool) else None
        data = b"" if isinstance(message, MessageSpool) else message
        delivery = Delivery(
            self.address, data, folder=name, internal_date=internal_date, flags=flags, spooled=spooled,
            existing_folder=True,
        )  # fmt: skip
        with _storage_full_refused():
            [stored] = await self._deliver([delivery])
        return stored.uidvalidity, stored.uid

    def path(self, message: index.Message) -> Path:
        return maildir.mailbox_dir(self._mailboxes.root, self.address) / message.path
