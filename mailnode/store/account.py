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

MailStore makes Accounts (`MailStore.account`) and passes each what it needs of the store, so this
module does not import mailnode.store.mailstore.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal, Protocol

from mailnode.gateway import Gateway
from mailnode.store import changes, durable, index, maildir
from mailnode.store.fence import WriteFence
from mailnode.store.mailboxes import Delivery, Mailbox, Mailboxes, Stored
from mailnode.store.staging import Staging

Deliver = Callable[[Sequence[Delivery]], Awaitable[list[Stored]]]
"""MailStore.deliver: stores messages durably, group-committed with the other deliveries."""


class AccountFor(Protocol):
    """MailStore.account_for: keeps the quota totals in step with a change (negative for removals)."""

    def __call__(self, address: str, *, size: int, count: int) -> None: ...


Message = index.Message  # what the protocol servers see of a message row
Folder = index.Folder


class FolderError(Exception):
    """A folder operation that cannot be done; the message says why (IMAP sends it with NO)."""


@dataclasses.dataclass(frozen=True)
class Selected:
    folder: index.Folder
    messages: list[index.Message]
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
        account_for: AccountFor,
    ) -> None:
        self.address = address
        self._mailboxes = mailboxes
        self._gateway = gateway
        self._fence = fence
        self._staging = staging
        self.switchboard = switchboard
        self._deliver = deliver
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
        def create(mailbox: Mailbox) -> None:
            if mailbox.index.folder(name) is not None:
                raise FolderError(f"{name} already exists")
            maildir.ensure_folder(mailbox.path, name)
            mailbox.index.create_folder(name)
            mailbox.folders.add(name)

        await self._run(create)

    async def delete_folder(self, name: str) -> None:
        def delete(mailbox: Mailbox) -> None:
            if name.upper() == maildir.INBOX:
                raise FolderError("INBOX cannot be deleted")
            if mailbox.index.folder(name) is None:
                raise FolderError(f"{name} does not exist")
            paths = mailbox.index.delete_folder(name)
            mailbox.folders.discard(name)
            size = 0
            for rel in paths:
                path = mailbox.path / rel
                size += path.stat().st_size if path.exists() else 0
            # Never while pinned (moves=True), so the whole directory can go now.
            shutil.rmtree(maildir.folder_dir(mailbox.path, name), ignore_errors=True)
            self._account_for(self.address, size=-size, count=-len(paths))

        await self._run(delete, moves=True)

    async def rename_folder(self, old: str, new: str) -> None:
        def rename(mailbox: Mailbox) -> None:
            if mailbox.index.folder(old) is None:
                raise FolderError(f"{old} does not exist")
            if mailbox.index.folder(new) is not None:
                raise FolderError(f"{new} already exists")
            if old.upper() == maildir.INBOX:
                # RFC 3501 §6.3.5: renaming INBOX moves its messages to the new folder; INBOX stays.
                maildir.ensure_folder(mailbox.path, new)
                mailbox.index.create_folder(new)
                mailbox.folders.add(new)
                uids = [m.uid for m in mailbox.index.messages(maildir.INBOX)]
                self._copy_locked(mailbox, maildir.INBOX, uids, new)
                self._expunge_locked(mailbox, maildir.INBOX, uids)
                return
            renames = [
                (f.name, new + f.name[len(old) :])
                for f in mailbox.index.folders()
                if f.name == old or f.name.startswith(old + "/")
            ]
            moves: list[tuple[str, str]] = []
            for before, after in renames:
                source, target = maildir.folder_dir(mailbox.path, before), maildir.folder_dir(mailbox.path, after)
                if source.exists():
                    source.rename(target)
                old_prefix, new_prefix = f"{source.name}/", f"{target.name}/"
                moves += [(m.path, new_prefix + m.path[len(old_prefix) :]) for m in mailbox.index.messages(before)]
            durable.fsync_dir(mailbox.path)
            mailbox.index.rename_folder(old, new)
            mailbox.index.move_paths(moves)
            mailbox.folders.clear()

        await self._run(rename, moves=True)

    async def subscribe(self, name: str, subscribed: bool) -> None:
        def update(mailbox: Mailbox) -> None:
            if mailbox.index.folder(name) is None:
                raise FolderError(f"{name} does not exist")
            mailbox.index.set_subscribed(name, subscribed)

        await self._run(update)

    # -- messages -----------------------------------------------------------------------------------

    async def select(self, name: str, *, take_recent: bool) -> Selected | None:
        # While writes are paused a SELECT reads on without moving the \Recent mark: the session sees
        # the recent messages, and so may the next one (RFC 3501 §2.3.2: a message the server cannot
        # tell was announced to another session SHOULD be considered recent).
        writes = take_recent and not self._fence.paused

        def select(mailbox: Mailbox) -> Selected | None:
            folder = mailbox.index.folder(name)
            if folder is None:
                return None
            if writes:
                first_recent = mailbox.index.take_recent(name)
            else:
                first_recent = folder.first_recent if take_recent else folder.uidnext
            with mailbox.read_lock:
                messages = mailbox.reader.messages(name)
            return Selected(folder, messages, first_recent)

        result = await self._run(select, fenced=writes)
        assert result is None or isinstance(result, Selected)
        return result

    async def messages(self, name: str, uids: Iterable[int] | None = None) -> list[index.Message]:
        wanted = None if uids is None else list(uids)
        result = await self._read(lambda reader: reader.messages(name, uids=wanted))
        assert isinstance(result, list)
        return result

    async def load(self, name: str, uids: Sequence[int], *, data: bool) -> list[tuple[index.Message, bytes | None]]:
        """Rows of these UIDs and, with data=True, their files' bytes: one Gateway trip for both."""
        root = maildir.mailbox_dir(self._mailboxes.root, self.address)

        def load() -> list[tuple[index.Message, bytes | None]]:
            mailbox = self._mailboxes.open(self.address)
            with mailbox.read_lock:
                rows = mailbox.reader.messages(name, uids=uids)
            if not data:
                return [(m, None) for m in rows]
            loaded: list[tuple[index.Message, bytes | None]] = []
            for message in rows:
                try:
                    loaded.append((message, (root / message.path).read_bytes()))
                except FileNotFoundError:  # expunged by another session since the query: left out
                    continue
            return loaded

        return await self._gateway.run(load)

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
            await self._run(save)
        return result

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
            return mailbox.index.set_flags(name, wanted, unchanged_since=unchanged_since)

        result = await self._run(update)
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

    def _expunge_locked(self, mailbox: Mailbox, name: str, uids: Sequence[int]) -> list[int]:
        removed = mailbox.index.expunge(name, uids)
        size = 0
        paths = [mailbox.path / rel for _, rel in removed]
        for path in paths:
            size += path.stat().st_size if path.exists() else 0
        self._staging.unlink_messages(mailbox, paths)  # now, or at the last unpin while a staging is pinned
        self._account_for(self.address, size=-size, count=-len(removed))
        return [uid for uid, _ in removed]

    async def expunge(self, name: str, uids: Sequence[int], *, origin: object | None = None) -> list[int]:
        """Remove these messages (the caller picks them, e.g. those flagged \\Deleted)."""
        result = await self._run(lambda m: self._expunge_locked(m, name, uids))
        assert isinstance(result, list)
        if result:
            self._publish(changes.Change(name, "expunged", tuple(result), origin=origin))
        return result

    def _copy_locked(self, mailbox: Mailbox, name: str, uids: Sequence[int], dest: str) -> list[tuple[int, int]]:
        target = mailbox.index.folder(dest)
        if target is None:
            raise FolderError(f"[TRYCREATE] {dest} does not exist")
        target_dir = mailbox.ensure_folder(dest)
        sources = mailbox.index.messages(name, uids=uids)
        rows: list[index.NewMessage] = []
        size = 0
        for message in sources:
            source = mailbox.path / message.path
            link = target_dir / "cur" / durable.unique_name(message.size)
            os.link(source, link)
            size += message.size
            rows.append(
                index.NewMessage(
                    dest, str(link.relative_to(mailbox.path)), message.size, message.internal_date, message.flags
                )
            )
        durable.fsync_dir(target_dir / "cur")
        new_uids = mailbox.index.add(rows)
        self._account_for(self.address, size=size, count=len(rows))
        return list(zip((m.uid for m in sources), new_uids, strict=True))

    async def copy(
        self, name: str, uids: Sequence[int], dest: str, *, move: bool = False, origin: object | None = None
    ) -> tuple[int, list[tuple[int, int]]]:
        """Copy (or move, RFC 6851) messages into folder `dest`. Returns dest's UIDVALIDITY and the
        (source uid, new uid) pairs (RFC 4315 COPYUID)."""

        def copy(mailbox: Mailbox) -> tuple[int, list[tuple[int, int]], list[int]]:
            pairs = self._copy_locked(mailbox, name, uids, dest)
            expunged = self._expunge_locked(mailbox, name, [src for src, _ in pairs]) if move else []
            target = mailbox.index.folder(dest)
            assert target is not None
            return target.uidvalidity, pairs, expunged

        result = await self._run(copy)
        assert isinstance(result, tuple)
        uidvalidity, pairs, expunged = result
        if pairs:
            self._publish(changes.Change(dest, "added", tuple(new for _, new in pairs), origin=origin))
        if expunged:
            self._publish(changes.Change(name, "expunged", tuple(expunged), origin=origin))
        return uidvalidity, pairs

    async def append(self, name: str, data: bytes, *, flags: str, internal_date: int | None) -> tuple[int, int]:
        """Store a message into an existing folder; returns (UIDVALIDITY, UID) for APPENDUID."""
        status = await self.status(name)
        if status is None:
            raise FolderError(f"[TRYCREATE] {name} does not exist")
        [stored] = await self._deliver(
            [Delivery(self.address, data, folder=name, internal_date=internal_date, flags=flags)]
        )
        return status.folder.uidvalidity, stored.uid

    def path(self, message: index.Message) -> Path:
        return maildir.mailbox_dir(self._mailboxes.root, self.address) / message.path
