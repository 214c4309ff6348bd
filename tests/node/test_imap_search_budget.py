"""SEARCH over message bodies on a real node, driven by imaplib over real sockets: while one session
searches the text of large messages, the node goes on answering other sessions; a search that spends
its CPU budget is answered `NO [LIMIT]` (RFC 5530) with no partial result and the session goes on; a
message that declares `charset=punycode` (a Python codec, not a text charset) is searched as plain
text; and SEARCH's own CHARSET argument accepts the text charsets mail uses and refuses the rest."""

from __future__ import annotations

import contextlib
import imaplib
import threading
from collections.abc import Callable, Iterator

import pytest

from mailnode.imap import mime
from mailnode.imap.commands import search as search_command
from tests.node.conftest import PASSWORD, NodeFactory, RunningNode

USER = "user@example.com"


def large_message(number: int, *, size: int, charset: str = "utf-8", needle: str = "", body: str = "") -> bytes:
    """A text message of about `size` bytes: `body`, or else a paragraph repeated; then `needle`."""
    line = f"Paragraph of message {number}, which goes on and on without saying much.\r\n"
    body = (body or line * (size // len(line))) + needle + "\r\n"
    return (
        f"From: Alice <alice@remote.test>\r\nTo: {USER}\r\nSubject: large {number}\r\n"
        f"Message-ID: <large{number}@remote.test>\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset={charset}\r\n\r\n{body}"
    ).encode()


@pytest.fixture
def node(node_factory: NodeFactory) -> RunningNode:
    return node_factory(imap={"allow_plaintext_login": True})


@pytest.fixture
def connect(node: RunningNode) -> Iterator[Callable[[], imaplib.IMAP4]]:
    clients: list[imaplib.IMAP4] = []

    def make() -> imaplib.IMAP4:
        client = imaplib.IMAP4("127.0.0.1", node.port("imap"), timeout=60)
        client.login(USER, PASSWORD)
        clients.append(client)
        return client

    yield make
    for client in clients:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            client.logout()


def append(client: imaplib.IMAP4, *messages: bytes) -> None:
    for data in messages:
        typ, _ = client.append("INBOX", None, None, data)
        assert typ == "OK"


def test_a_long_body_search_leaves_other_sessions_answered(
    connect: Callable[[], imaplib.IMAP4], monkeypatch: pytest.MonkeyPatch
) -> None:
    searcher = connect()
    append(searcher, *(large_message(n, size=512 * 1024, needle="needle" if n == 3 else "") for n in range(6)))
    searcher.select("INBOX")
    # Hold the search inside its first message's body text until the other session has been answered.
    # A search evaluated on the event loop holds the loop with it, and nobody is answered until the hold
    # gives up (after 20 s) and the search has finished.
    inside, release = threading.Event(), threading.Event()
    decode = mime.text_for_search

    def held(data: bytes, analysis: mime.Analysis) -> str:
        inside.set()
        release.wait(20)
        release.set()
        return decode(data, analysis)

    monkeypatch.setattr(mime, "text_for_search", held)
    events: list[str] = []
    result: list[tuple[str, list[bytes | None]]] = []

    def search() -> None:
        result.append(searcher.uid("SEARCH", "TEXT", "needle"))
        events.append("search answered")

    thread = threading.Thread(target=search)
    thread.start()
    try:
        assert inside.wait(60), "the search never reached the message bodies"
        other = connect()
        assert other.noop()[0] == "OK"
        events.append("noop answered")
    finally:
        release.set()
        thread.join(120)
    assert events == ["noop answered", "search answered"]
    assert result == [("OK", [b"4"])]


def test_a_search_over_its_budget_is_answered_no_limit(
    connect: Callable[[], imaplib.IMAP4], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = connect()
    append(client, *(large_message(n, size=256 * 1024, needle="needle") for n in range(3)))
    client.select("INBOX")
    client.store("2", "+FLAGS", "\\Flagged")
    assert client.search(None, "TEXT", "needle") == ("OK", [b"1 2 3"])  # within the usual budget
    monkeypatch.setattr(search_command, "CPU_BUDGET", 1e-6)
    typ, data = client.search(None, "TEXT", "needle")
    assert (typ, data) == ("NO", [b"[LIMIT] Search took too long"])
    assert client.response("SEARCH") == ("SEARCH", [None])  # no partial result
    typ, data = client.uid("SEARCH", "BODY", "needle")
    assert typ == "NO"
    assert data[0].startswith(b"[LIMIT]")
    # Keys that read no message text are not budgeted, and the session goes on.
    assert client.search(None, "FLAGGED") == ("OK", [b"2"])
    assert client.noop()[0] == "OK"


def test_a_punycode_charset_is_searched_as_plain_text(connect: Callable[[], imaplib.IMAP4]) -> None:
    # Decoding a megabyte as punycode took 23 s, all of it on the event loop; a run of letters and no
    # hyphen is the slow case (the decoder inserts one character at a time into a growing string).
    client = connect()
    append(
        client,
        large_message(1, size=0, charset="punycode", body="b" * 300_000 + "\r\n", needle="needle"),
        large_message(2, size=1024, charset="x-unknown-charset", needle="needle"),
        large_message(3, size=1024, charset="rot13", needle="arrqyr"),  # "needle" in rot13
    )
    client.select("INBOX")
    assert client.search(None, "TEXT", "needle") == ("OK", [b"1 2"])
    assert client.search(None, "BODY", "arrqyr") == ("OK", [b"3"])


def test_search_charset_argument(connect: Callable[[], imaplib.IMAP4]) -> None:
    client = connect()
    append(client, large_message(1, size=100, needle="Grüße aus Köln"))
    client.select("INBOX")
    # RFC 3501 §6.4.4: the strings are in the charset CHARSET names.
    # imaplib sends its `literal` as the last argument; typeshed has it as str, but it must be bytes.
    client.literal = "Köln".encode("latin-1")  # type: ignore[assignment]
    assert client.search("ISO-8859-1", "BODY") == ("OK", [b"1"])
    client.literal = "Grüße".encode()  # type: ignore[assignment]
    assert client.search("UTF-8", "BODY") == ("OK", [b"1"])
    assert client.search("KOI8-R", "ALL") == ("OK", [b"1"])
    for charset in ("PUNYCODE", "X-BOGUS", "BASE64_CODEC"):
        typ, data = client.search(charset, "ALL")
        assert typ == "NO"
        assert data[0].startswith(b"[BADCHARSET (US-ASCII UTF-8 ")
