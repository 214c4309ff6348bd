"""Account (the store as IMAP sees it): folders, flags with modseq, expunge, copy and move with new
UIDs, append, rename (INBOX included), cached structures, and the switchboard's announcements."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mailnode.gateway import Gateway
from mailnode.store import changes
from mailnode.store.account import FolderError
from mailnode.store.mailstore import MailStore
from tests.unit.conftest import fill

ADDRESS = "a@example.com"


async def test_flags_modseq_and_announcements(store: MailStore) -> None:
    account = await fill(store, 3)
    heard: list[changes.Change] = []
    stop = store.switchboard.subscribe(ADDRESS, heard.append)
    before = await account.status("INBOX")
    assert before is not None
    assert (before.messages, before.unseen) == (3, 3)
    changed, failed = await account.store_flags("INBOX", [1, 2], mode="+", flags=["\\Seen", "$Label"])
    assert [(m.uid, m.flags) for m in changed] == [(1, "$Label \\Seen"), (2, "$Label \\Seen")]
    assert failed == []
    assert changed[1].modseq > changed[0].modseq > before.folder.highestmodseq
    after = await account.status("INBOX")
    assert after is not None
    assert after.unseen == 1
    assert after.folder.highestmodseq == changed[1].modseq
    # CONDSTORE: a message modified since the given modseq is not touched
    changed, failed = await account.store_flags(
        "INBOX", [1, 3], mode="-", flags=["\\seen"], unchanged_since=before.folder.highestmodseq
    )
    assert changed == []  # 3 had no \Seen: nothing to change
    assert failed == [1]
    assert heard[0].kind == "flags"
    assert heard[0].uids == (1, 2)
    stop()


async def test_copy_move_expunge(store: MailStore) -> None:
    account = await fill(store, 3)
    await account.create_folder("Archive")
    with pytest.raises(FolderError):
        await account.create_folder("Archive")
    uidvalidity, pairs = await account.copy("INBOX", [1, 3], "Archive")
    assert pairs == [(1, 1), (3, 2)]
    archive = await account.status("Archive")
    assert archive is not None
    assert archive.folder.uidvalidity == uidvalidity
    [first, _] = await account.messages("Archive")
    [data] = await account.read([first])
    assert data == b"Subject: 0\r\n\r\n0\r\n"
    _, moved = await account.copy("INBOX", [2], "Archive", move=True)
    assert moved == [(2, 3)]
    assert [m.uid for m in await account.messages("INBOX")] == [1, 3]
    assert await account.expunge("INBOX", [1, 3]) == [1, 3]
    assert await account.messages("INBOX") == []
    assert store.usage(ADDRESS).messages == 3
    with pytest.raises(FolderError, match="TRYCREATE"):
        await account.copy("Archive", [1], "Nowhere")


async def test_append_rename_delete(store: MailStore, tmp_path: Path) -> None:
    account = await fill(store, 2)
    await account.create_folder("Work")
    await account.create_folder("Work/2024")
    _, uid = await account.append("Work/2024", b"Subject: x\r\n\r\n", flags="\\Seen", internal_date=1000)
    assert uid == 1
    await account.rename_folder("Work", "Jobs")
    names = [f.name for f in await account.folders()]
    assert "Jobs/2024" in names and "Work" not in names
    [message] = await account.messages("Jobs/2024")
    assert (message.flags, message.internal_date) == ("\\Seen", 1000)
    assert (await account.read([message]))[0] == b"Subject: x\r\n\r\n"
    await account.rename_folder("INBOX", "Old")  # RFC 3501: moves INBOX's messages, INBOX stays
    assert len(await account.messages("Old")) == 2
    assert await account.messages("INBOX") == []
    await account.delete_folder("Old")
    assert "Old" not in [f.name for f in await account.folders()]
    with pytest.raises(FolderError):
        await account.delete_folder("INBOX")


async def test_structures_are_computed_once(store: MailStore) -> None:
    account = await fill(store, 2)
    messages = await account.messages("INBOX")
    calls: list[bytes] = []

    def compute(data: bytes) -> str:
        calls.append(data)
        return f"len={len(data)}"

    first = await account.structures("INBOX", messages, compute)
    second = await account.structures("INBOX", messages, compute)
    assert first == second == {1: "len=17", 2: "len=17"}
    assert len(calls) == 2


async def test_select_takes_recent_once(store: MailStore) -> None:
    account = await fill(store, 2)
    first = await account.select("INBOX", take_recent=True)
    second = await account.select("INBOX", take_recent=True)
    assert first is not None and second is not None
    assert first.first_recent == 1
    assert second.first_recent == 3


async def test_a_select_reading_its_rows_does_not_hold_up_the_mailboxs_writes(store: MailStore) -> None:
    account = await fill(store, 3)
    mailbox = store.mailboxes.open(ADDRESS)
    mailbox.read_lock.acquire()  # a long read in progress: SELECT's read of the rows must wait for it
    try:
        selecting = asyncio.create_task(account.select("INBOX", take_recent=True))
        await asyncio.sleep(0.2)  # SELECT reaches its read (before the fix, holding the write lock there)
        # A STORE of the same mailbox goes through meanwhile; it waited for the whole read before.
        changed, _ = await asyncio.wait_for(account.store_flags("INBOX", [2], mode="+", flags=["\\Seen"]), 60)
        assert [m.uid for m in changed] == [2]
        assert not selecting.done()
    finally:
        mailbox.read_lock.release()
    selected = await selecting
    assert selected is not None and selected.messages is not None
    assert [(m.uid, m.flags) for m in selected.messages] == [(1, ""), (2, "\\Seen"), (3, "")]
    assert selected.first_recent == 1
    again = await account.select("INBOX", take_recent=True)
    assert again is not None and again.first_recent == 4  # the mark moved past what the first one showed


async def test_append_checks_its_folder_in_the_batch_that_stores_it(store: MailStore) -> None:
    """APPEND reads nothing before its batch: the batch finds the folder missing (TRYCREATE, no folder made,
    the other appends of the batch stored) or reads its UIDVALIDITY beside the new UID; one Gateway trip."""
    account = await fill(store, 1)
    await account.create_folder("Work")
    folders = {folder.name: folder for folder in await account.folders()}
    trips: list[str] = []
    run = Gateway.run

    async def counted(self: Gateway, fn: object, /, *args: object, **kwargs: object) -> object:
        trips.append(getattr(fn, "__name__", repr(fn)))
        return await run(self, fn, *args, **kwargs)  # type: ignore[arg-type]

    Gateway.run = counted  # type: ignore[assignment,method-assign]
    try:
        work = account.append("Work", b"Subject: w\r\n\r\n", flags="", internal_date=None)
        gone = account.append("Gone", b"Subject: g\r\n\r\n", flags="", internal_date=None)
        inbox = account.append("INBOX", b"Subject: i\r\n\r\n", flags="", internal_date=None)
        results = await asyncio.gather(work, gone, inbox, return_exceptions=True)
    finally:
        Gateway.run = run  # type: ignore[method-assign]
    assert trips == ["_write_batch"], trips  # the three in one batch, and no read of a folder before it
    assert results[0] == (folders["Work"].uidvalidity, 1)
    assert isinstance(results[1], FolderError) and "TRYCREATE" in str(results[1])
    assert results[2] == (folders["INBOX"].uidvalidity, 2)
    assert [f.name for f in await account.folders() if f.name == "Gone"] == []
