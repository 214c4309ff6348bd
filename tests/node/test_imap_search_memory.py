"""SEARCH answered from memory (mailnode.imap.commands.search: the session's flags and the node's columns
of cached header fields), over imaplib on a real node: flag and header keys and their NOT/OR/AND/UID
combinations give the answers the messages call for, and once a folder's columns are made, a search
reads no message row and no file; a message added later has only its own row read, and is found."""

from __future__ import annotations

import imaplib
from collections.abc import Iterable
from typing import Any

import pytest

from mailnode.store.account import Account
from tests.node.conftest import NodeFactory, imap_inbox

USER = "user@example.com"
COUNT = 24


def _message(number: int) -> bytes:
    return (
        f"From: Sender {number % 3} <sender{number % 3}@example.org>\r\nTo: {USER}\r\n"
        f"Subject: Topic {number % 4} Straße\r\nMessage-ID: <m{number}@example.org>\r\n\r\nbody {number}\r\n"
    ).encode()


def _expected(query: str, numbers: Iterable[int]) -> list[int]:
    """The UIDs (message n has UID n) a query of QUERIES matches, decided here from how _message made them."""
    seen = {n for n in numbers if n % 2 == 0}
    every = set(numbers)
    sender0 = {n for n in every if n % 3 == 0}
    topic1 = {n for n in every if n % 4 == 1}
    answers = {
        "UNSEEN": every - seen,
        "SEEN": seen,
        'FROM "SENDER0@"': sender0,
        'SUBJECT "strasse"': every,
        'NOT FROM "sender0"': every - sender0,
        'OR FROM "sender0" SUBJECT "topic 1"': sender0 | topic1,
        'UNSEEN SUBJECT "Topic 1"': topic1 - seen,
        'UID 5:* FROM "sender0"': {n for n in sender0 if n >= 5},
        'TO ""': every,
        'CC ""': set(),
    }
    return sorted(answers[query])


QUERIES = [
    "UNSEEN", "SEEN", 'FROM "SENDER0@"', 'SUBJECT "strasse"', 'NOT FROM "sender0"',
    'OR FROM "sender0" SUBJECT "topic 1"', 'UNSEEN SUBJECT "Topic 1"', 'UID 5:* FROM "sender0"', 'TO ""', 'CC ""',
]  # fmt: skip


def _search(client: imaplib.IMAP4, query: str) -> list[int]:
    typ, data = client.uid("SEARCH", query)
    assert typ == "OK", (query, data)
    return sorted(int(uid) for uid in (data[0] or b"").split())


def test_searches_from_memory_read_no_row_and_find_what_is_added(
    node_factory: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = node_factory(imap={"allow_plaintext_login": True})
    with imap_inbox(node, USER) as client:
        for number in range(1, COUNT + 1):
            flags = "(\\Seen)" if number % 2 == 0 else None
            typ, _ = client.append("INBOX", flags, None, _message(number))
            assert typ == "OK"
        client.noop()
        # The first searches make the columns (reading the folder's rows once).
        assert {q: _search(client, q) for q in QUERIES} == {q: _expected(q, range(1, COUNT + 1)) for q in QUERIES}

        reads: list[list[int] | None] = []
        messages = Account.messages

        async def recorded(self: Account, name: str, uids: Iterable[int] | None = None) -> Any:
            wanted = None if uids is None else list(uids)
            reads.append(wanted)
            return await messages(self, name, wanted)

        def no_file(*args: object, **kwargs: object) -> None:
            raise AssertionError("a search from memory read a message file")

        monkeypatch.setattr(Account, "messages", recorded)
        with monkeypatch.context() as files:
            files.setattr(Account, "read", no_file)
            files.setattr(Account, "load", no_file)
            assert {q: _search(client, q) for q in QUERIES} == {q: _expected(q, range(1, COUNT + 1)) for q in QUERIES}
        assert reads == []

        # A message delivered by another session: this one hears of it, and the searches read its row alone (and
        # its header block, the first time its fields are wanted).
        with imap_inbox(node, USER) as other:
            typ, _ = other.append("INBOX", None, None, _message(COUNT + 1))
            assert typ == "OK"
        client.noop()
        assert {q: _search(client, q) for q in QUERIES} == {q: _expected(q, range(1, COUNT + 2)) for q in QUERIES}
        assert reads and all(read == [COUNT + 1] for read in reads), reads  # never the whole folder's rows
