"""The mailbox store on a real file system: group-committed deliveries get unique increasing UIDs and
agree with the index, folders appear on first use, one failing delivery does not fail its batch
mates, recovery after a crash removes exactly what was never acknowledged (and the files a pinned store
kept for a staging), and a pinned store unlinks expunged files only at the last unpin and holds folder
renames until then."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from mailnode.gateway import Gateway
from mailnode.store.mailstore import Delivery, MailStore


def _index_rows(db: Path) -> list[tuple[str, int, str, int]]:
    with sqlite3.connect(db) as conn:
        return list(
            conn.execute(
                "SELECT f.name, m.uid, m.path, m.size FROM messages m"
                " JOIN folders f ON f.id = m.folder_id ORDER BY m.uid"
            )
        )


async def test_concurrent_deliveries_share_a_batch_and_get_increasing_uids(store: MailStore, tmp_path: Path) -> None:
    messages = [f"Subject: {i}\r\n\r\nbody {i}\r\n".encode() for i in range(60)]
    results = await asyncio.gather(*(store.deliver([Delivery("a@example.com", m)]) for m in messages))
    uids = [r[0].uid for r in results]
    assert sorted(uids) == list(range(1, 61))
    for [stored], message in zip(results, messages, strict=True):
        assert stored.path.read_bytes() == message
        assert stored.path.parent.name == "new"
    rows = _index_rows(tmp_path / "mail/example.com/a/index.sqlite")
    files = {
        str(p.relative_to(tmp_path / "mail/example.com/a"))
        for p in (tmp_path / "mail/example.com/a/INBOX/new").iterdir()
    }
    assert {row[2] for row in rows} == files
    assert store.usage("a@example.com").messages == 60
    assert store.usage("a@example.com").bytes == sum(map(len, messages))
    assert store.total_messages() == 60


async def test_folders_are_created_on_first_use(store: MailStore, tmp_path: Path) -> None:
    [stored] = await store.deliver([Delivery("a@example.com", b"x\r\n", folder="Sent")])
    assert stored.uid == 1
    for sub in ("cur", "new", "tmp"):
        assert (tmp_path / "mail/example.com/a/Sent" / sub).is_dir()
    assert [m.folder for m in await store.messages("a@example.com")] == ["Sent"]


async def test_a_failing_delivery_does_not_fail_the_others(store: MailStore, tmp_path: Path) -> None:
    blocked = tmp_path / "mail/example.com/blocked"
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("a file where the mailbox directory should be")
    good, bad = await asyncio.gather(
        store.deliver([Delivery("ok@example.com", b"fine\r\n")]),
        store.deliver([Delivery("blocked@example.com", b"doomed\r\n")]),
        return_exceptions=True,
    )
    assert isinstance(bad, OSError)
    assert not isinstance(good, BaseException)
    assert good[0].path.read_bytes() == b"fine\r\n"


async def test_recovery_removes_only_what_was_never_committed(tmp_path: Path) -> None:
    store = MailStore(tmp_path, gateway=Gateway())
    await store.open()
    [kept] = await store.deliver([Delivery("a@example.com", b"acknowledged\r\n")])
    await store.close()
    inbox = tmp_path / "mail/example.com/a/INBOX"
    (inbox / "tmp/123.half-written").write_bytes(b"half")
    (inbox / "new/456.renamed-not-committed").write_bytes(b"never acknowledged")

    reopened = MailStore(tmp_path, gateway=Gateway())
    await reopened.open()
    try:
        assert list((inbox / "tmp").iterdir()) == []
        assert [p.name for p in (inbox / "new").iterdir()] == [kept.path.name]
        assert reopened.usage("a@example.com").messages == 1
        [stored] = await reopened.deliver([Delivery("a@example.com", b"next\r\n")])
        assert stored.uid == 2  # UIDs are never reused
    finally:
        await reopened.close()


async def test_a_pinned_store_defers_expunged_files_and_holds_folder_renames(store: MailStore) -> None:
    expunged, kept = await store.deliver([Delivery("a@example.com", b"one\r\n"), Delivery("a@example.com", b"two\r\n")])
    account = store.account("a@example.com")
    await account.create_folder("Projects")
    store.staging.pin()  # as a staging does, inside its pause

    assert await account.expunge("INBOX", [expunged.uid]) == [expunged.uid]
    assert [m.uid for m in await account.messages("INBOX")] == [kept.uid]
    assert expunged.path.exists()  # the row is gone, the file stays until the pin goes
    rename = asyncio.create_task(account.rename_folder("Projects", "Renamed"))
    await asyncio.sleep(0)  # the rename runs up to its wait: nothing before it suspends
    assert store.staging.pin_waiting == 1 and not rename.done()

    await store.staging.unpin()
    await rename
    assert not store.staging.pinned
    assert not expunged.path.exists() and kept.path.exists()
    assert sorted(f.name for f in await account.folders()) == ["INBOX", "Renamed"]
    assert store.usage("a@example.com").messages == 1


async def test_files_expunged_while_pinned_are_removed_by_recovery(tmp_path: Path) -> None:
    store = MailStore(tmp_path, gateway=Gateway())
    await store.open()
    expunged, kept = await store.deliver([Delivery("a@example.com", b"one\r\n"), Delivery("a@example.com", b"two\r\n")])
    store.staging.pin()
    await store.account("a@example.com").expunge("INBOX", [expunged.uid])
    await store.close()  # the node stopped before the last unpin
    assert expunged.path.exists()

    reopened = MailStore(tmp_path, gateway=Gateway())
    await reopened.open()
    try:
        assert not expunged.path.exists() and kept.path.exists()
        assert reopened.usage("a@example.com").messages == 1
    finally:
        await reopened.close()


async def test_a_hand_off_delivered_twice_is_stored_once(store: MailStore, tmp_path: Path) -> None:
    """DESIGN.md "Clustering": a peer that retries a hand-off whose 250 it never heard (the home stored
    it, then crashed) must not make a second copy; the retry is answered as delivered."""
    message = b"Subject: once\r\n\r\nbody\r\n"
    [first] = await store.deliver([Delivery("a@example.com", message, handoff="1.abc")])
    [again] = await store.deliver([Delivery("a@example.com", message, handoff="1.abc")])
    assert again.duplicate and not first.duplicate
    [other] = await store.deliver([Delivery("b@example.com", message, handoff="1.abc")])  # per mailbox
    assert not other.duplicate
    rows = _index_rows(tmp_path / "mail/example.com/a/index.sqlite")
    assert [row[1] for row in rows] == [first.uid]
    assert len(list((tmp_path / "mail/example.com/a/INBOX/new").iterdir())) == 1
    assert store.usage("a@example.com").messages == 1
    # the same id twice in one batch: one copy too
    both = await asyncio.gather(*(store.deliver([Delivery("c@example.com", message, handoff="2.x")]) for _ in range(2)))
    assert sorted(r[0].duplicate for r in both) == [False, True]
    assert len(_index_rows(tmp_path / "mail/example.com/c/index.sqlite")) == 1
