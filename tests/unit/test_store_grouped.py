"""What the IMAP path asks of the store beside its commands' results (mailnode.store.mailstore and account):
- flag changes of one mailbox asked for together are committed together, and each is durable and
  announced once its caller hears back; one that fails fails alone;
- a delivery announces its new rows with the change, so listeners need not query them;
- a message's bytes are read from the page cache without a Gateway trip when it holds them, and
  not at all (None: the caller reads through the Gateway) for a file that is gone;
- FETCH's rows from a folder version (`load(known=...)`) are read without a query, and a known row
  whose file moved (a RENAME) is queried again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from mailnode.store import changes, index
from mailnode.store.mailstore import MailStore
from tests.unit.conftest import fill

ADDRESS = "a@example.com"


async def test_concurrent_flag_changes_share_commits_and_each_is_durable(store: MailStore) -> None:
    account = await fill(store, 8)
    heard: list[changes.Change] = []
    store.switchboard.subscribe(ADDRESS, heard.append)
    commits = 0
    write_group = store._write_group

    def counting(address: str, group: list[object]) -> list[object]:
        nonlocal commits
        commits += 1
        return write_group(address, group)  # type: ignore[arg-type]

    store._write_group = counting  # type: ignore[method-assign,assignment]
    results = await asyncio.gather(
        *(account.store_flags("INBOX", [uid], mode="+", flags=["\\Flagged"]) for uid in range(1, 9))
    )
    assert [[m.uid for m in changed] for changed, _ in results] == [[uid] for uid in range(1, 9)]
    assert commits < 8  # asked for together: fewer commits than changes
    assert sorted(uid for change in heard for uid in change.uids) == list(range(1, 9))
    modseqs = [changed[0].modseq for changed, _ in results]
    assert len(set(modseqs)) == 8  # each change its own mod-sequence (RFC 7162), in one transaction or not
    # Committed: a new connection to the index sees every flag.
    reader = index.Index(store.mailboxes.open(ADDRESS).path / "index.sqlite")
    try:
        assert {m.uid: m.flags for m in reader.messages("INBOX")} == {uid: "\\Flagged" for uid in range(1, 9)}
    finally:
        reader.close()


async def test_a_failing_change_in_a_group_fails_alone(store: MailStore) -> None:
    account = await fill(store, 3)

    def failing(mailbox: object) -> object:
        raise RuntimeError("this change fails")

    outcomes = await asyncio.gather(
        account.store_flags("INBOX", [1], mode="+", flags=["\\Seen"]),
        store.grouped(ADDRESS, failing),
        account.store_flags("INBOX", [2], mode="+", flags=["\\Seen"]),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], RuntimeError)
    assert not isinstance(outcomes[0], BaseException) and not isinstance(outcomes[2], BaseException)
    assert {m.uid: m.flags for m in await account.messages("INBOX")} == {1: "\\Seen", 2: "\\Seen", 3: ""}


async def test_a_delivery_announces_its_rows(store: MailStore) -> None:
    heard: list[changes.Change] = []
    store.switchboard.subscribe(ADDRESS, heard.append)
    account = await fill(store, 2)
    uidvalidity, uid = await account.append("INBOX", b"Subject: x\r\n\r\nx\r\n", flags="\\Draft", internal_date=1_000)
    assert uidvalidity and uid == 3
    assert [change.kind for change in heard] == ["added"] * 3
    [row] = heard[-1].rows
    assert row == (await account.messages("INBOX", uids=[3]))[0]
    assert (row.uid, row.flags, row.internal_date) == (3, "\\Draft", 1_000)


async def test_a_cached_read_gives_the_file_or_nothing(store: MailStore) -> None:
    account = await fill(store, 1)
    [message] = await account.messages("INBOX")
    data = account.read_cached(message)
    # Just written, the file is in the page cache (where RWF_NOWAIT exists: else the Gateway reads it).
    assert data in (None, b"Subject: 0\r\n\r\n0\r\n")
    assert await account.read([message]) == [b"Subject: 0\r\n\r\n0\r\n"]
    await account.expunge("INBOX", [message.uid])
    assert account.read_cached(message) is None


async def test_known_rows_are_not_queried_and_a_moved_file_is_found(store: MailStore) -> None:
    account = await fill(store, 2)
    rows = {m.uid: m for m in await account.messages("INBOX")}
    queries = 0
    mailbox = store.mailboxes.open(ADDRESS)
    messages = mailbox.reader.messages

    def counting(*args: object, **kwargs: object) -> list[index.Message]:
        nonlocal queries
        queries += 1
        return messages(*args, **kwargs)  # type: ignore[arg-type]

    with contextlib.ExitStack() as undo:
        mailbox.reader.messages = counting  # type: ignore[method-assign]
        undo.callback(lambda: setattr(mailbox.reader, "messages", messages))
        loaded = await account.load("INBOX", [1, 2], data=True, known=rows)
        assert queries == 0
        assert sorted((m.uid, data) for m, data in loaded) == [
            (1, b"Subject: 0\r\n\r\n0\r\n"),
            (2, b"Subject: 1\r\n\r\n1\r\n"),
        ]
        # A known row whose file is not where it says (moved since): queried, and read from where it is.
        stale = {1: rows[1]._replace(path=rows[1].path + ".gone")}
        loaded = await account.load("INBOX", [1], data=True, known=stale)
        assert queries == 1
        assert [(m.uid, data) for m, data in loaded] == [(1, b"Subject: 0\r\n\r\n0\r\n")]


async def test_selects_asked_for_together_share_a_read_made_after_they_asked(store: MailStore) -> None:
    account = await fill(store, 3)
    reads = 0
    shared_read = store.shared_read

    async def counting(key: tuple[str, str], read: Callable[[], object]) -> object:
        def counted() -> object:
            nonlocal reads
            reads += 1
            return read()

        return await shared_read(key, counted)

    store.shared_read = counting  # type: ignore[method-assign]
    account = store.account(ADDRESS)  # with the counting read
    first = asyncio.ensure_future(account.select("INBOX", take_recent=False))
    await asyncio.sleep(0)  # the first read has started
    await account.store_flags("INBOX", [2], mode="+", flags=["\\Seen"])  # committed before the next ones ask
    later = await asyncio.gather(*(account.select("INBOX", take_recent=False) for _ in range(5)))
    await first
    assert reads <= 2  # the first, and one for the five that asked together
    for selected in later:
        assert selected is not None and selected.messages is not None
        assert {m.uid: m.flags for m in selected.messages} == {1: "", 2: "\\Seen", 3: ""}  # what was there when asked
