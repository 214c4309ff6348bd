"""Restoring one mailbox from an archive into the running node (POST /restore, `mailnode restore
--mailbox`): the archive is verified whole first, then the mailbox's messages are delivered into the
target mailbox through the store (folders created as needed, flags and internal dates kept), in
batches, each one index transaction. A message is skipped when its folder already holds one with the
same bytes (SHA-256), counting duplicates, so a restore can be run again and restores nothing twice.
Its calendars and contacts (`.dav/`) come back after the messages, by file (mailnode.store.davfiles.merge):
an item or collection the mailbox lacks is added, one it has is kept as it is. Quota is not applied:
restoring is an administrator's act.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
from collections.abc import Iterator
from pathlib import Path

from mailnode.backup import archive
from mailnode.config import Directory, normalize_address
from mailnode.gateway import Gateway
from mailnode.store import davfiles, maildir
from mailnode.store.account import Account, FolderError
from mailnode.store.mailstore import Delivery, MailStore

BATCH_MESSAGES = 200
BATCH_BYTES = 32 * 1024 * 1024


class RestoreError(Exception):
    """A restore that cannot be done (bad archive, address not in it, target not on this node); the
    message says which, for the client (HTTP 400)."""


@dataclasses.dataclass(frozen=True)
class Restored:
    mailbox: str
    restored: int
    skipped: int
    dav_restored: int = 0  # calendar and contact files written
    dav_kept: int = 0  # those the mailbox had already (kept as they are)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _next_batch(messages: Iterator[archive.ArchivedMessage]) -> list[tuple[archive.ArchivedMessage, str]]:
    """Blocking: the next messages from the archive with the SHA-256 of their bytes."""
    batch: list[tuple[archive.ArchivedMessage, str]] = []
    size = 0
    for message in messages:
        batch.append((message, _sha256(message.data)))
        size += len(message.data)
        if len(batch) >= BATCH_MESSAGES or size >= BATCH_BYTES:
            break
    return batch


class _Target:
    """The target mailbox's folders and, per folder touched, how many of its messages have each hash."""

    def __init__(self, account: Account, gateway: Gateway) -> None:
        self._account = account
        self._gateway = gateway
        self._folders: set[str] | None = None
        self._hashes: dict[str, collections.Counter[str]] = {}

    async def ensure_folder(self, name: str) -> None:
        if self._folders is None:
            self._folders = {f.name for f in await self._account.folders()}
        if name not in self._folders:
            with contextlib.suppress(FolderError):  # created meanwhile, by an IMAP session
                await self._account.create_folder(name)
            self._folders.add(name)

    async def hashes(self, folder: str) -> collections.Counter[str]:
        counts = self._hashes.get(folder)
        if counts is None:
            counts = self._hashes[folder] = collections.Counter()
            messages = await self._account.messages(folder)
            for start in range(0, len(messages), BATCH_MESSAGES):
                datas = await self._account.read(messages[start : start + BATCH_MESSAGES])
                counts.update(await self._gateway.run(lambda ds: [_sha256(d) for d in ds if d], datas))
        return counts


async def restore_mailbox(
    *, store: MailStore, gateway: Gateway, directory: Directory, archive_path: Path, mailbox: str, target: str
) -> Restored:
    """Verify the archive, then add `mailbox`'s messages from it to `target` (an address or alias of a
    mailbox in the node's directory). Raises RestoreError."""
    source = normalize_address(mailbox)
    resolved = directory.resolve(target).mailbox
    if resolved is None:
        raise RestoreError(f"{target} is not a mailbox of this node")
    try:
        summary = await gateway.run(archive.verify, archive_path)
    except archive.ArchiveError as error:  # its message names the archive and what is wrong
        raise RestoreError(str(error)) from None
    except OSError as error:
        raise RestoreError(f"{archive_path}: cannot read the archive: {error.strerror or error}") from None
    if source not in summary.mailboxes:
        held = ", ".join(sorted(summary.mailboxes)[:5]) or "no mailboxes"
        more = f" and {len(summary.mailboxes) - 5} more" if len(summary.mailboxes) > 5 else ""
        raise RestoreError(f"{source} is not in the archive {archive_path} (it holds {held}{more})")
    account = store.account(resolved.address)
    into = _Target(account, gateway)
    seen: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    restored = skipped = 0
    dav: list[tuple[str, bytes]] = []  # filled by the same pass, after the messages
    try:
        messages = await gateway.run(archive.mailbox_messages, archive_path, source, dav=dav)
    except archive.ArchiveError as error:
        raise RestoreError(str(error)) from None
    try:
        while batch := await gateway.run(_next_batch, messages):
            deliveries = []
            for message, digest in batch:
                seen[message.folder][digest] += 1
                if seen[message.folder][digest] <= (await into.hashes(message.folder))[digest]:
                    skipped += 1
                    continue
                await into.ensure_folder(message.folder)
                flags = " ".join(f for f in message.flags.split() if f != "\\Recent")
                deliveries.append(
                    Delivery(
                        resolved.address,
                        message.data,
                        folder=message.folder,
                        internal_date=message.internal_date,
                        flags=flags,
                    )
                )
            if deliveries:
                await store.deliver(deliveries)
                restored += len(deliveries)
    except archive.ArchiveError as error:  # changed on disk since it was verified
        raise RestoreError(f"{error} (restored {restored} message(s) before it)") from None
    finally:
        close = getattr(messages, "close", None)
        if close is not None:
            await gateway.run(close)
    dav_restored = dav_kept = 0
    if dav:
        try:
            home = maildir.mailbox_dir(store.root, resolved.address)
            dav_restored, dav_kept = await gateway.run(davfiles.merge, home, dav, user=resolved.address)
        except ValueError as error:  # the archive was verified: only a file changed since gets here
            raise RestoreError(f"{archive_path}: {error} (restored {restored} message(s) before it)") from None
    return Restored(resolved.address, restored, skipped, dav_restored, dav_kept)
