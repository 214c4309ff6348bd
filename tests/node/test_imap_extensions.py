"""The IMAP extensions webmail and phones use, driven by imaplib over real sockets against a live node:
SORT and THREAD (RFC 5256), each advertised in CAPABILITY. Their answers on a larger corpus are compared
with Dovecot's in tests/node/test_imap_dovecot.py; here, small mailboxes with answers known by hand."""

from __future__ import annotations

import contextlib
import imaplib
import re
import ssl
from collections.abc import Iterator

import pytest

from tests.node.conftest import RunningNode
from tests.node.test_imap import USER, connect


def note(number: int, subject: str, *, sender: str, day: int, references: str = "") -> bytes:
    refs = f"References: {references}\r\n" if references else ""
    return (
        f"From: {sender}\r\nTo: {USER}\r\nSubject: {subject}\r\nDate: {day:02d} Mar 2025 10:00:00 +0000\r\n"
        f"Message-ID: <m{number}@example.org>\r\n{refs}\r\nbody {number}\r\n"
    ).encode()


# (subject, sender, day, references): 1 and 3 start threads, 2 and 4 answer 1, 5 answers a message not there.
NOTES = (
    ("Plan", "Zed <zed@example.org>", 5, ""),
    ("Re: Plan", "amy@example.org", 6, "<m1@example.org>"),
    ("Budget", "Bob <bob@example.org>", 2, ""),
    ("RE: Plan", "carl@example.org", 4, "<m1@example.org>"),
    ("Re: Gone", "dan@example.org", 1, "<m0@example.org>"),
)


@pytest.fixture
def imap(node: RunningNode, client_tls: ssl.SSLContext) -> Iterator[imaplib.IMAP4]:
    client = connect(node, client_tls)
    for number, (subject, sender, day, references) in enumerate(NOTES, 1):
        data = note(number, subject, sender=sender, day=day, references=references)
        flags = "(\\Seen)" if number % 2 else "()"
        assert client.append("INBOX", flags, f'"0{number}-Apr-2025 10:00:00 +0000"', data)[0] == "OK"
    client.select("INBOX")
    yield client
    with contextlib.suppress(imaplib.IMAP4.abort, OSError):
        client.logout()


def numbers(data: list[bytes | None]) -> list[int]:
    return [int(n) for piece in data if piece for n in piece.split()]


def uid_of(imap: imaplib.IMAP4) -> dict[int, int]:
    """Sequence number -> UID."""
    _, data = imap.fetch("1:*", "(UID)")
    pairs = (re.match(rb"(\d+) \(UID (\d+)\)", piece) for piece in data if isinstance(piece, bytes))
    return {int(m.group(1)): int(m.group(2)) for m in pairs if m}


def test_capabilities_name_the_extensions(imap: imaplib.IMAP4) -> None:
    caps = imap.capability()[1][0].split()
    for capability in (b"SORT", b"THREAD=ORDEREDSUBJECT", b"THREAD=REFERENCES"):
        assert capability in caps, capability


def test_sort(imap: imaplib.IMAP4) -> None:
    assert numbers(imap.sort("(DATE)", "UTF-8", "ALL")[1]) == [5, 3, 4, 1, 2]
    assert numbers(imap.sort("(REVERSE DATE)", "UTF-8", "ALL")[1]) == [2, 1, 4, 3, 5]
    assert numbers(imap.sort("(ARRIVAL)", "UTF-8", "ALL")[1]) == [1, 2, 3, 4, 5]
    assert numbers(imap.sort("(SUBJECT DATE)", "UTF-8", "ALL")[1]) == [3, 5, 4, 1, 2]  # BUDGET, GONE, PLAN
    assert numbers(imap.sort("(FROM)", "US-ASCII", "ALL")[1]) == [2, 3, 4, 5, 1]  # by the local part
    sizes = {n: len(note(n, s, sender=f, day=d, references=r)) for n, (s, f, d, r) in enumerate(NOTES, 1)}
    by_size = sorted((1, 3, 5), key=lambda n: (sizes[n], -n))
    assert numbers(imap.sort("(SIZE REVERSE ARRIVAL)", "UTF-8", "SEEN")[1]) == by_size
    typ, data = imap.uid("SORT", "(DATE)", "UTF-8", "UNSEEN")
    assert (typ, numbers(data)) == ("OK", [uid_of(imap)[n] for n in (4, 2)])


def test_sort_refusals(imap: imaplib.IMAP4) -> None:
    for args in (("(NOSUCH)", "UTF-8", "ALL"), ("(REVERSE)", "UTF-8", "ALL"), ("(DATE)", "UTF-8")):
        with pytest.raises(imaplib.IMAP4.error, match="BAD"):
            imap.sort(*args)
    typ, data = imap.sort("(DATE)", "X-NOSUCH", "ALL")  # RFC 5256 §3: as SEARCH, NO [BADCHARSET (...)]
    assert typ == "NO" and data[0].startswith(b"[BADCHARSET ("), data


def test_thread(imap: imaplib.IMAP4) -> None:
    typ, data = imap.thread("REFERENCES", "UTF-8", "ALL")
    assert (typ, data) == ("OK", [b"(5)(3)(1 (4)(2))"])
    typ, data = imap.thread("ORDEREDSUBJECT", "UTF-8", "ALL")
    assert (typ, data) == ("OK", [b"(5)(3)(4 (1)(2))"])  # GONE alone; PLAN's first by date is 4
    assert imap.thread("REFERENCES", "UTF-8", "SUBJECT", "Budget") == ("OK", [b"(3)"])
    uids = uid_of(imap)
    expected = "({5})({3})({1} ({4})({2}))".format(*(None, *(uids[n] for n in range(1, 6))))
    assert imap.uid("THREAD", "REFERENCES", "UTF-8", "ALL") == ("OK", [expected.encode()])
    with pytest.raises(imaplib.IMAP4.error, match="BAD"):
        imap.thread("NOSUCH", "UTF-8", "ALL")
