"""The store against hostile folder names and a full disk (issue 12): every name goes through
maildir.folder_dir, which refuses empty, '.', '..' and empty levels, control characters, reserved and
over-long names and never yields the mailbox directory; a RENAME (of a folder with children, and of
INBOX) whose index step fails leaves disk and index as they were; and with the volume full (ENOSPC and
SQLITE_FULL injected) APPEND fails with StorageFull, SELECT and FETCH's structures read on, flags can
still be set (the space reserve) and EXPUNGE commits by unlinking first."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest

from mailnode.store import account, durable, index, maildir
from mailnode.store.mailstore import Delivery, MailStore

ADDRESS = "a@example.com"


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.name.startswith("index.sqlite")}


async def _contents(user: account.Account, folder: str) -> list[bytes]:
    messages = await user.messages(folder)
    return [data or b"" for _, data in await user.load(folder, [m.uid for m in messages], data=True)]


# -- names ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["", "/", "/zz", "a/", "a//b", ".", "..", "a/./b", "a/../b", "../x", "a\x00b", "a\rb", "a\nb", "index.sqlite"],
)
def test_invalid_names_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(maildir.InvalidFolderName):
        maildir.folder_dir(tmp_path, name)


@pytest.mark.parametrize("name", ["INBOX", "a/b", "Ünïcödé/日本", ".hidden", "a.b", "x" * 255, "%2F"])
def test_valid_names_map_strictly_inside_the_mailbox(name: str, tmp_path: Path) -> None:
    path = maildir.folder_dir(tmp_path, name)
    assert path.parent == tmp_path and path.name not in ("", ".", "..")
    assert maildir.decode_name(path.name) == name


def test_names_too_long_once_encoded_are_refused(tmp_path: Path) -> None:
    with pytest.raises(maildir.FolderNameTooLong):
        maildir.folder_dir(tmp_path, "x" * 256)
    with pytest.raises(maildir.FolderNameTooLong):
        maildir.folder_dir(tmp_path, "日" * 30)  # 90 UTF-8 bytes, 270 percent-encoded


async def test_no_folder_operation_touches_the_mailbox_root(store: MailStore, tmp_path: Path) -> None:
    await store.deliver([Delivery(ADDRESS, b"Subject: keep\r\n\r\nkeep\r\n")])
    user = store.account(ADDRESS)
    before = _tree(tmp_path)
    for change in (
        user.create_folder("/zz"),
        user.delete_folder(""),
        user.rename_folder("INBOX", ""),
        user.create_folder("a/../../x"),
    ):
        with pytest.raises(maildir.InvalidFolderName):
            await change
    assert _tree(tmp_path) == before
    assert await _contents(user, "INBOX") == [b"Subject: keep\r\n\r\nkeep\r\n"]


# -- all-or-nothing RENAME ---------------------------------------------------------------------------------------


def _fail(*_: object, **__: object) -> None:
    raise sqlite3.OperationalError("injected failure")


async def test_a_rename_whose_index_step_fails_leaves_everything_as_before(
    store: MailStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = store.account(ADDRESS)
    for folder in ("p", "p/one", "p/two"):
        await user.create_folder(folder)
        await user.append(folder, f"Subject: {folder}\r\n\r\n{folder}\r\n".encode(), flags="", internal_date=None)
    before = _tree(tmp_path)
    monkeypatch.setattr(index.Index, "move_paths", _fail)
    with pytest.raises(sqlite3.OperationalError, match="injected"):
        await user.rename_folder("p", "q")
    assert _tree(tmp_path) == before
    assert {f.name for f in await user.folders()} >= {"p", "p/one", "p/two"}
    for folder in ("p", "p/one", "p/two"):
        assert await _contents(user, folder) == [f"Subject: {folder}\r\n\r\n{folder}\r\n".encode()]
    monkeypatch.undo()
    await user.rename_folder("p", "q")  # every child moves, not only the first
    assert {f.name for f in await user.folders()} & {"p", "p/one", "p/two", "q", "q/one", "q/two"} == {
        "q",
        "q/one",
        "q/two",
    }
    for folder in ("one", "two"):
        assert await _contents(user, f"q/{folder}") == [f"Subject: p/{folder}\r\n\r\np/{folder}\r\n".encode()]


async def test_an_overlong_child_name_refuses_the_rename_before_anything_moves(
    store: MailStore, tmp_path: Path
) -> None:
    user = store.account(ADDRESS)
    await user.create_folder("p/" + "c" * 200)
    before = _tree(tmp_path)
    with pytest.raises(maildir.FolderNameTooLong):
        await user.rename_folder("p", "q" * 60)
    assert _tree(tmp_path) == before


async def test_an_inbox_rename_that_fails_keeps_inbox_whole(
    store: MailStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.deliver(
        [Delivery(ADDRESS, b"Subject: 1\r\n\r\none\r\n"), Delivery(ADDRESS, b"Subject: 2\r\n\r\ntwo\r\n")]
    )
    user = store.account(ADDRESS)
    before = _tree(tmp_path)
    monkeypatch.setattr(index.Index, "expunge", _fail)
    with pytest.raises(sqlite3.OperationalError, match="injected"):
        await user.rename_folder("INBOX", "Old")
    assert _tree(tmp_path) == before
    assert "Old" not in {f.name for f in await user.folders()}
    assert len(await _contents(user, "INBOX")) == 2
    monkeypatch.undo()
    await user.rename_folder("INBOX", "Old")
    assert await _contents(user, "INBOX") == []
    assert len(await _contents(user, "Old")) == 2
    assert store.usage(ADDRESS).messages == 2


# -- a full disk -------------------------------------------------------------------------------------------------


def _no_space(*_: object, **__: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _sqlite_full(*_: object, **__: object) -> None:
    raise sqlite3.OperationalError("database or disk is full")


async def test_a_full_disk_refuses_writes_and_lets_reads_go_on(
    store: MailStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.deliver([Delivery(ADDRESS, b"Subject: 1\r\n\r\none\r\n")])
    user = store.account(ADDRESS)
    monkeypatch.setattr(durable, "write_synced", _no_space)
    with pytest.raises(account.StorageFull):
        await user.append("INBOX", b"Subject: 2\r\n\r\ntwo\r\n", flags="", internal_date=None)
    monkeypatch.setattr(index.Index, "create_folder", _sqlite_full)
    with pytest.raises(account.StorageFull):
        await user.create_folder("new")
    # SELECT would move the \Recent mark, FETCH would cache structures: both read on without writing.
    monkeypatch.setattr(index.Index, "take_recent", _sqlite_full)
    monkeypatch.setattr(index.Index, "set_structures", _sqlite_full)
    selected = await user.select("INBOX", take_recent=True)
    assert selected is not None and selected.messages is not None and [m.uid for m in selected.messages] == [1]
    structures = await user.structures("INBOX", selected.messages, lambda data: data.decode())
    assert structures == {1: "Subject: 1\r\n\r\none\r\n"}


async def test_flags_use_the_space_reserve_and_expunge_unlinks_first_on_a_full_disk(
    store: MailStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = await store.deliver([Delivery(ADDRESS, b"Subject: 1\r\n\r\none\r\n")])
    user = store.account(ADDRESS)
    reserve = tmp_path / "space.reserve"
    assert reserve.stat().st_size == 1 << 20
    real_set_flags = index.Index.set_flags
    calls = []

    def set_flags_on_a_full_disk(self: index.Index, *args: object, **kwargs: object) -> object:
        calls.append(reserve.exists())
        if reserve.exists():  # full until the reserve is given up
            _sqlite_full()
        return real_set_flags(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(index.Index, "set_flags", set_flags_on_a_full_disk)
    changed, _ = await user.store_flags("INBOX", [1], mode="+", flags=["\\Deleted"])
    assert [m.flags for m in changed] == ["\\Deleted"] and calls == [True, False]

    real_expunge = index.Index.expunge

    def expunge_on_a_full_disk(self: index.Index, name: str, uids: object) -> object:
        if stored[0].path.exists():  # no room until the message's file is gone
            _sqlite_full()
        return real_expunge(self, name, uids)  # type: ignore[arg-type]

    monkeypatch.setattr(index.Index, "expunge", expunge_on_a_full_disk)
    assert await user.expunge("INBOX", [1]) == [1]
    assert not stored[0].path.exists()
    assert await user.messages("INBOX") == []
    assert store.usage(ADDRESS).messages == 0
    assert reserve.exists()  # taken again once the expunge made room
