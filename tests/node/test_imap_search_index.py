"""SEARCH answered from the index (mailnode.imap.commands.search: the header fields clients search on,
cached per message) gives the same answers as SEARCH reading the message files, on the differential
test's corpus (tests/node/corpus.py: real-world shapes, encoded words, malformed headers), over imaplib
on a real node: when the fields are first computed, when they come from the node's memory, and after a
restart, when they come from the index alone (no header is decoded then)."""

from __future__ import annotations

import imaplib
import sqlite3

import pytest

from mailnode.imap import mime
from mailnode.imap.commands import search as search_command
from mailnode.store import maildir
from tests.node import corpus
from tests.node.conftest import NodeFactory, RunningNode, imap_inbox

USER = "user@example.com"

# Keys on the cached fields, alone and with flags, dates and sizes; the strings are the corpus's.
INDEXED = [
    'FROM "alice"', 'FROM "example.org"', 'FROM "Zoë"', 'FROM "李雷"', 'FROM "mallory, jr"', 'FROM ""',
    'TO "bob"', 'TO "lists.example.net"', 'CC "alice"', 'CC ""', 'BCC "bob"', 'SUBJECT "invoice"',
    'SUBJECT "meeting"', 'SUBJECT "Grüße"', 'SUBJECT ""', 'HEADER Subject "lorem"', 'HEADER FROM "postmaster"',
    "SENTBEFORE 10-Mar-2025", "SENTON 12-Mar-2025", "SENTSINCE 20-Mar-2025",
    'UNSEEN FROM "alice"', 'OR SUBJECT "invoice" TO "bob"', 'NOT FROM "alice"', 'FLAGGED SUBJECT "e"',
    'LARGER 2000 FROM "example"', 'SINCE 10-Apr-2025 SUBJECT "a"', "UNSEEN", "SMALLER 1000",
]  # fmt: skip
# Lone keys, answered by the fast loops; each also with ALL, which the general evaluator answers.
LONE = [
    "UNSEEN", "SEEN", "FLAGGED", "UNANSWERED", "DRAFT", "RECENT", "KEYWORD $Label1", "UNKEYWORD $label1",
    'FROM "alice"', 'SUBJECT "INVOICE"', 'HEADER To "Example"', 'CC ""',
]  # fmt: skip
# Keys that still read the files (other fields, the body): answered as before, beside the cache.
FROM_FILES = ['HEADER Message-ID "example.org"', 'BODY "lorem"', 'TEXT "invoice"', 'FROM "alice" BODY "ipsum"']


def _search(client: imaplib.IMAP4, query: str) -> list[int]:
    if query.isascii():
        typ, data = client.uid("SEARCH", query)
    else:  # KEY "text": the text as a UTF-8 literal, imaplib's last argument (typeshed has it as str)
        key, _, text = query.partition(" ")
        client.literal = text.strip('"').encode()  # type: ignore[assignment]
        typ, data = client.uid("SEARCH", "CHARSET", "UTF-8", key)
    assert typ == "OK", (query, data)
    return sorted(int(uid) for uid in (data[0] or b"").split())


def _answers(node: RunningNode, queries: list[str]) -> dict[str, list[int]]:
    with imap_inbox(node, USER) as client:
        return {query: _search(client, query) for query in queries}


def test_search_from_the_index_equals_search_from_the_files(
    node_factory: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = node_factory(imap={"allow_plaintext_login": True})
    messages = corpus.messages()
    with imap_inbox(node, USER) as client:
        for _, data, flags, when in messages:
            typ, _ = client.append("INBOX", f"({' '.join(flags)})", when, data)
            assert typ == "OK"
    # The file-based answers: with no field cached, every header key reads the message files.
    with monkeypatch.context() as files_only:
        files_only.setattr(search_command, "_INDEXED", frozenset())
        expected = _answers(node, INDEXED + FROM_FILES)
    assert any(expected[query] for query in INDEXED), "the corpus matches some of the searches"
    assert sum(1 for query in INDEXED if expected[query]) > len(INDEXED) // 2
    # Restarted (the file-based searches left the fields in the node's memory): computed on the first
    # search and cached, in the index and in memory, whence the next searches take them.
    node.stop()
    node = RunningNode(node.files)
    try:
        assert _answers(node, INDEXED + FROM_FILES) == expected
        assert _answers(node, INDEXED) == {query: expected[query] for query in INDEXED}
        lone = _answers(node, LONE + [f"{query} ALL" for query in LONE])
        assert {query: lone[query] for query in LONE} == {query: lone[f"{query} ALL"] for query in LONE}
        assert sum(1 for query in LONE if lone[query]) > len(LONE) // 2
    finally:
        node.stop()
    index_file = maildir.mailbox_dir(node.node.store.root, USER) / "index.sqlite"
    db = sqlite3.connect(index_file)
    try:
        cached = db.execute("SELECT COUNT(*) FROM messages WHERE search IS NOT NULL").fetchone()[0]
    finally:
        db.close()
    assert cached == len(messages)
    # Restarted again: nothing in memory, and no header is decoded: the fields come from the index.
    node = RunningNode(node.files)
    try:

        def no_decoding(*args: object) -> None:
            raise AssertionError("a header was decoded: the index should have had it")

        with monkeypatch.context() as index_only:
            index_only.setattr(mime, "header_value", no_decoding)
            assert _answers(node, INDEXED) == {query: expected[query] for query in INDEXED}
    finally:
        node.stop()
