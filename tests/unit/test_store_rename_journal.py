"""A node that dies in the middle of a folder RENAME loses no mail (issue 12): the rename journal
(`Mailbox.journal_renames`) is durable before the first directory moves, and recovery
(`Mailbox.recover`) reads it first, putting the directories where the index says they are: back when
the index still holds the old names, forward when it committed the new ones.

A crash is simulated by copying the data directory at the chosen moment (files, index and its WAL, as
a power cut would leave them) and opening a fresh store on the copy; every message of the renamed
folder, its children and INBOX must then read back whole under the names the index holds."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from mailnode.gateway import Gateway
from mailnode.store import account, index, mailboxes
from mailnode.store.mailstore import Delivery, MailStore

ADDRESS = "a@example.com"
FOLDERS = ("p", "p/one", "p/one/deep", "p/two")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[MailStore]:
    store = MailStore(tmp_path / "live", gateway=Gateway())
    await store.open()
    yield store
    await store.close()


def _body(folder: str) -> bytes:
    return f"Subject: {folder}\r\n\r\nthe mail of {folder}\r\n".encode()


async def _fill(store: MailStore) -> account.Account:
    await store.deliver([Delivery(ADDRESS, _body("INBOX")), Delivery(ADDRESS, _body("INBOX") + b"2\r\n")])
    user = store.account(ADDRESS)
    for folder in FOLDERS:
        await user.create_folder(folder)
        await user.append(folder, _body(folder), flags="\\Flagged", internal_date=None)
    return user


class Died(BaseException):
    """The node's death at the chosen moment."""


def _crash_copy_at(
    monkeypatch: pytest.MonkeyPatch, owner: object, name: str, live: Path, crashed: Path
) -> Callable[[], None]:
    """Replace owner.name by: copy the data directory to `crashed` (the disk at a power cut), then
    raise Died, which no handler of the store's catches (a process that dies runs none)."""

    def die(*_: object, **__: object) -> None:
        shutil.copytree(live, crashed)
        raise Died

    monkeypatch.setattr(owner, name, die)

    def check_died() -> None:
        assert crashed.is_dir(), f"{name} was never reached"

    return check_died


async def _reopened(crashed: Path) -> tuple[MailStore, account.Account]:
    store = MailStore(crashed, gateway=Gateway())
    await store.open()
    return store, store.account(ADDRESS)


async def _every_message_reads(user: account.Account, expected: dict[str, list[bytes]]) -> None:
    names = {f.name for f in await user.folders()}
    for folder, bodies in expected.items():
        assert folder in names, f"{folder} is gone: {sorted(names)}"
        messages = await user.messages(folder)
        loaded = await user.load(folder, [m.uid for m in messages], data=True)
        assert sorted(data or b"" for _, data in loaded) == sorted(bodies), folder
        for message in messages:
            async with user.open_message(message) as opened:
                assert opened is not None and await opened.read(0, message.size) in bodies


async def test_a_crash_after_the_directories_moved_and_before_the_index_commit_loses_nothing(
    store: MailStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = await _fill(store)
    died = _crash_copy_at(monkeypatch, index.Index, "rename_folder", store.root, tmp_path / "crashed")
    with pytest.raises(Died):
        await user.rename_folder("p", "q")
    died()
    monkeypatch.undo()
    reopened, user = await _reopened(tmp_path / "crashed")
    try:
        # The index never committed the rename: every folder is under its old name, every message reads.
        await _every_message_reads(
            user, {"INBOX": [_body("INBOX"), _body("INBOX") + b"2\r\n"]} | {f: [_body(f)] for f in FOLDERS}
        )
        assert not {"q", "q/one"} & {f.name for f in await user.folders()}
        assert reopened.usage(ADDRESS).messages == 2 + len(FOLDERS)
        await user.rename_folder("p", "q")  # and the rename can be done again
        await _every_message_reads(user, {"q" + f[1:]: [_body(f)] for f in FOLDERS})
    finally:
        await reopened.close()


async def test_a_crash_after_the_index_commit_and_before_the_journal_went_loses_nothing(
    store: MailStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = await _fill(store)
    died = _crash_copy_at(monkeypatch, mailboxes.Mailbox, "end_renames", store.root, tmp_path / "crashed")
    with pytest.raises(Died):
        await user.rename_folder("p", "q")
    died()
    monkeypatch.undo()
    reopened, user = await _reopened(tmp_path / "crashed")
    try:
        await _every_message_reads(user, {"q" + f[1:]: [_body(f)] for f in FOLDERS})
        assert not {"p", "p/one"} & {f.name for f in await user.folders()}
        assert reopened.usage(ADDRESS).messages == 2 + len(FOLDERS)
        assert not list((tmp_path / "crashed").rglob(mailboxes.RENAME_JOURNAL))
    finally:
        await reopened.close()


async def test_a_crash_in_the_middle_of_an_inbox_rename_loses_nothing(
    store: MailStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = await _fill(store)
    # RFC 3501 §6.3.5: INBOX's messages are linked into the new folder, then one commit moves the rows.
    died = _crash_copy_at(monkeypatch, index.Index, "expunge", store.root, tmp_path / "crashed")
    with pytest.raises(Died):
        await user.rename_folder("INBOX", "Old")
    died()
    monkeypatch.undo()
    reopened, user = await _reopened(tmp_path / "crashed")
    try:
        await _every_message_reads(user, {"INBOX": [_body("INBOX"), _body("INBOX") + b"2\r\n"]})
        assert "Old" not in {f.name for f in await user.folders()}
        await user.rename_folder("INBOX", "Old")
        await _every_message_reads(user, {"INBOX": [], "Old": [_body("INBOX"), _body("INBOX") + b"2\r\n"]})
    finally:
        await reopened.close()


async def test_a_failed_undo_is_finished_by_the_next_rename(store: MailStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A journal left behind while the node runs (the undo of a failed rename failed too) is settled
    before the next rename of that mailbox starts, not only at the next start."""
    user = await _fill(store)
    real_settle = mailboxes.Mailbox.settle_renames

    def fail_once(self: mailboxes.Mailbox) -> None:
        monkeypatch.setattr(mailboxes.Mailbox, "settle_renames", real_settle)
        raise OSError("injected: the undo failed")

    monkeypatch.setattr(index.Index, "move_paths", _raise_sqlite)
    monkeypatch.setattr(mailboxes.Mailbox, "settle_renames", fail_once)
    with pytest.raises(Exception, match="injected"):
        await user.rename_folder("p", "q")
    monkeypatch.setattr(index.Index, "move_paths", _real_move_paths)
    await user.rename_folder("p/two", "r")
    await _every_message_reads(user, {"p": [_body("p")], "p/one": [_body("p/one")], "r": [_body("p/two")]})


_real_move_paths = index.Index.move_paths


def _raise_sqlite(*_: object, **__: object) -> None:
    raise sqlite3.OperationalError("injected failure")
