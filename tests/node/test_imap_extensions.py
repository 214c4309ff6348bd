"""The IMAP extensions webmail and phones use, driven by imaplib over real sockets against a live node:
SORT and THREAD (RFC 5256), ESEARCH (RFC 4731), SEARCHRES (RFC 5182), LIST-STATUS (RFC 5819),
STATUS=SIZE (RFC 8438), BINARY (RFC 3516) and QRESYNC (RFC 7162), each advertised in CAPABILITY.
Their answers on a larger corpus are compared with Dovecot's in tests/node/test_imap_dovecot.py; here,
small mailboxes with answers known by hand."""

from __future__ import annotations

import base64
import contextlib
import imaplib
import re
import ssl
from collections.abc import Iterator
from typing import Any

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
    wanted = (b"SORT", b"THREAD=ORDEREDSUBJECT", b"THREAD=REFERENCES", b"ESEARCH", b"SEARCHRES", b"LIST-STATUS",
              b"STATUS=SIZE", b"BINARY", b"QRESYNC")  # fmt: skip
    for capability in wanted:
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
    imap.send(b"t1 THREAD REFERENCES UTF-8 SUBJECT nothing-has-this\r\n")
    assert imap.readline() == b"* THREAD\r\n"  # RFC 5256 §4: no threads, no space
    assert imap.readline().startswith(b"t1 OK")
    imap.send(b"t2 SORT (DATE) UTF-8 SUBJECT nothing-has-this\r\n")
    assert imap.readline() == b"* SORT\r\n"
    assert imap.readline().startswith(b"t2 OK")
    uids = uid_of(imap)
    expected = "({5})({3})({1} ({4})({2}))".format(*(None, *(uids[n] for n in range(1, 6))))
    assert imap.uid("THREAD", "REFERENCES", "UTF-8", "ALL") == ("OK", [expected.encode()])
    with pytest.raises(imaplib.IMAP4.error, match="BAD"):
        imap.thread("NOSUCH", "UTF-8", "ALL")


def esearch(imap: imaplib.IMAP4, *args: str) -> tuple[str, list[bytes]]:
    typ, data = imap._simple_command(*args)
    return typ, [line for line in imap._untagged_response(typ, data, "ESEARCH")[1] if line]


def test_esearch(imap: imaplib.IMAP4) -> None:
    uids = uid_of(imap)
    tag = rb'\(TAG "[^"]+"\) '
    typ, lines = esearch(imap, "SEARCH", "RETURN", "(MIN MAX COUNT ALL)", "SEEN")
    assert typ == "OK" and len(lines) == 1 and re.fullmatch(tag + rb"MIN 1 MAX 5 ALL 1,3,5 COUNT 3", lines[0])
    typ, lines = esearch(imap, "UID", "SEARCH", "RETURN", "()", "UNSEEN")  # () is ALL
    assert re.fullmatch(tag + f"UID ALL {uids[2]},{uids[4]}".encode(), lines[0])
    typ, lines = esearch(imap, "SEARCH", "RETURN", "(MIN MAX COUNT)", "SUBJECT", "nothing-has-this")
    assert re.fullmatch(tag + rb"COUNT 0", lines[0])  # MIN and MAX are left out of an empty result
    typ, lines = esearch(imap, "SEARCH", "RETURN", "(COUNT)", "MODSEQ", "1")
    assert re.fullmatch(tag + rb"COUNT 5 MODSEQ \d+", lines[0])
    # RFC 7162 §3.1: SEARCH MODSEQ enabled CONDSTORE: FETCH now reports MODSEQ unasked.
    assert b"MODSEQ" in bytes(imap.fetch("1", "(FLAGS)")[1][0] or b"")  # type: ignore[arg-type]
    with pytest.raises(imaplib.IMAP4.error, match="BAD"):
        esearch(imap, "SEARCH", "RETURN", "(NOSUCH)", "ALL")


def test_searchres(imap: imaplib.IMAP4) -> None:
    uids = uid_of(imap)
    assert esearch(imap, "SEARCH", "RETURN", "(SAVE)", "SEEN") == ("OK", [])  # SAVE alone: no ESEARCH
    typ, data = imap.fetch("$", "(UID)")
    assert typ == "OK" and [piece.split()[0] for piece in data if isinstance(piece, bytes)] == [b"1", b"3", b"5"]
    assert imap.uid("SEARCH", "UID", "$") == ("OK", [f"{uids[1]} {uids[3]} {uids[5]}".encode()])
    assert imap.search(None, "NOT", "$") == ("OK", [b"2 4"])
    assert imap.store("$", "+FLAGS", "(\\Flagged)")[0] == "OK"
    assert imap.search(None, "FLAGGED") == ("OK", [b"1 3 5"])
    assert imap.copy("$", "Archive")[0] == "OK"
    assert esearch(imap, "SEARCH", "RETURN", "(SAVE MIN MAX)", "SEEN")[0] == "OK"  # SAVE keeps only 1 and 5
    assert imap.search(None, "$") == ("OK", [b"1 5"])
    # An expunged message leaves `$`; `$` empty names no message, and is no error.
    assert imap.store("1", "+FLAGS", "(\\Deleted)")[0] == "OK" and imap.expunge()[0] == "OK"
    assert imap.search(None, "$") == ("OK", [b"4"])
    assert esearch(imap, "SEARCH", "RETURN", "(SAVE)", "SUBJECT", "nothing-has-this")[0] == "OK"
    assert imap.fetch("$", "(UID)") == ("OK", [None])
    imap.select("INBOX")  # a new selection forgets the saved result
    assert imap.search(None, "$") == ("OK", [b""])


def test_status_size_and_list_status(imap: imaplib.IMAP4) -> None:
    size = sum(len(note(n, s, sender=f, day=d, references=r)) for n, (s, f, d, r) in enumerate(NOTES, 1))
    assert imap.status("INBOX", "(SIZE MESSAGES)") == ("OK", [f"INBOX (SIZE {size} MESSAGES 5)".encode()])
    assert imap.create("Work/Plans")[0] == "OK"
    typ, data = imap._simple_command("LIST", '""', "*", "RETURN", "(STATUS (MESSAGES UNSEEN SIZE))")
    assert typ == "OK"
    listed = [line for line in imap._untagged_response(typ, data, "LIST")[1] if line]
    statuses = [line for line in imap._untagged_response(typ, data, "STATUS")[1] if line]
    assert len(listed) == len(statuses) >= 7  # INBOX, the special-use folders, Work and Work/Plans
    assert f"INBOX (MESSAGES 5 UNSEEN 2 SIZE {size})".encode() in statuses
    assert b"Work/Plans (MESSAGES 0 UNSEEN 0 SIZE 0)" in statuses
    typ, data = imap._simple_command("LIST", '""', "Work/%", "RETURN", "(STATUS (UIDNEXT))")
    assert [line for line in imap._untagged_response(typ, data, "STATUS")[1] if line] == [b"Work/Plans (UIDNEXT 1)"]


PAYLOAD = bytes(range(256)) * 3  # every octet, NUL and bare CR and LF among them


def test_binary(imap: imaplib.IMAP4) -> None:
    """FETCH BINARY decodes base64 and quoted-printable (a literal8 when the result holds NUL), BINARY.SIZE
    is that length, BINARY[] of the message decodes every part; APPEND takes a literal8."""
    encoded = base64.encodebytes(PAYLOAD).replace(b"\n", b"\r\n")
    message = (
        b"From: a@example.org\r\nSubject: binary\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"Gr=C3=BC=C3=9Fe=\r\n aus K=C3=B6ln\r\n--b\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n" + encoded + b"--b--\r\n"
    )
    assert imap.append("INBOX", None, None, message)[0] == "OK"
    imap.select("INBOX")
    typ, data = imap.fetch("6", "(BINARY.PEEK[1] BINARY.PEEK[2] BINARY.SIZE[2] BINARY.PEEK[2]<0.4> FLAGS)")
    assert typ == "OK"
    joined = b"".join(piece if isinstance(piece, bytes) else piece[0] + piece[1] for piece in data if piece)
    assert b"BINARY[1] {17}" + "Grüße aus Köln".encode() in joined  # the soft line break undone
    assert b"BINARY[2] ~{%d}" % len(PAYLOAD) in joined and PAYLOAD in joined
    assert b"BINARY.SIZE[2] %d" % len(PAYLOAD) in joined
    assert b"BINARY[2]<0> ~{4}\x00\x01\x02\x03" in joined and b"\\Seen" not in joined  # .PEEK: \Seen not set
    typ, data = imap.fetch("6", "(BINARY[])")
    whole = data[0][1] if isinstance(data[0], tuple) else b""
    assert whole.count(b"Content-Transfer-Encoding: binary\r\n") == 2 and PAYLOAD in whole
    assert b"\\Seen" in imap.fetch("6", "(FLAGS)")[1][0]  # type: ignore[operator]  # BINARY[] set it
    # APPEND with a literal8 (RFC 3516 §4.4): the message holds a NUL, its part is declared binary.
    raw = b"From: a@example.org\r\nSubject: raw\r\nContent-Transfer-Encoding: binary\r\n\r\nnul\x00here\r\n"
    imap.literal = None
    tag = imap._new_tag()
    imap.send(tag + b" APPEND INBOX ~{%d+}\r\n" % len(raw) + raw + b"\r\n")
    reply = imap.readline()
    while not reply.startswith(tag):
        reply = imap.readline()
    assert reply.startswith(tag + b" OK"), reply
    imap.noop()
    typ, data = imap.fetch("7", "(BINARY.PEEK[1] BINARY.SIZE[1])")
    assert typ == "OK" and data[0] and b"nul\x00here\r\n" in data[0][1] and b"BINARY.SIZE[1] 10" in data[1]  # type: ignore[operator]


def untagged(client: imaplib.IMAP4, typ: str, data: Any, name: str) -> list[bytes]:
    return [line for line in client._untagged_response(typ, data, name)[1] if isinstance(line, bytes)]


def test_qresync(imap: imaplib.IMAP4, node: RunningNode, client_tls: ssl.SSLContext) -> None:
    """A phone resyncs: it knew the folder at some mod-sequence; since, one message was flagged elsewhere
    and one expunged. SELECT (QRESYNC ...) and UID FETCH (CHANGEDSINCE ... VANISHED) tell it just that."""
    uids = uid_of(imap)
    uidvalidity = int(imap.response("UIDVALIDITY")[1][0] or b"0")
    typ, data = imap.status("INBOX", "(HIGHESTMODSEQ)")
    modseq = int(re.findall(rb"HIGHESTMODSEQ (\d+)", data[0] or b"")[0])
    assert imap.store("2", "+FLAGS", "(\\Flagged)")[0] == "OK"
    assert imap.store("3", "+FLAGS", "(\\Deleted)")[0] == "OK" and imap.expunge()[0] == "OK"
    phone = connect(node, client_tls)
    with pytest.raises(imaplib.IMAP4.error, match="QRESYNC"):  # RFC 7162 §3.2.5: ENABLE first
        phone._simple_command("SELECT", "INBOX", f"(QRESYNC ({uidvalidity} {modseq}))")
    typ, data = phone._simple_command("ENABLE", "QRESYNC")
    assert untagged(phone, typ, data, "ENABLED") == [b"QRESYNC"]
    known = f"{uids[1]}:{uids[5]}"
    typ, data = phone._simple_command("SELECT", "INBOX", f"(QRESYNC ({uidvalidity} {modseq} {known}))")
    assert typ == "OK"
    phone.state = "SELECTED"  # imaplib's select() would, without the QRESYNC parameter
    assert untagged(phone, typ, data, "VANISHED") == [f"(EARLIER) {uids[3]}".encode()]
    fetched = untagged(phone, typ, data, "FETCH")
    assert len(fetched) == 1 and f"UID {uids[2]} ".encode() in fetched[0] and b"\\Flagged" in fetched[0]
    assert b"MODSEQ (" in fetched[0]
    typ, data = phone._simple_command("UID", "FETCH", "1:*", "(FLAGS)", f"(CHANGEDSINCE {modseq} VANISHED)")
    assert typ == "OK" and untagged(phone, typ, data, "VANISHED") == [f"(EARLIER) {uids[3]}".encode()]
    assert len(untagged(phone, typ, data, "FETCH")) == 1
    # A wrong UIDVALIDITY: nothing to resync from, a plain SELECT.
    typ, data = phone._simple_command("SELECT", "INBOX", f"(QRESYNC ({uidvalidity + 1} {modseq}))")
    assert typ == "OK" and not untagged(phone, typ, data, "VANISHED") and not untagged(phone, typ, data, "FETCH")
    # Once QRESYNC is on, an expunge is reported as VANISHED, never EXPUNGE (RFC 7162 §3.2.10).
    assert phone.store("1", "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
    typ, data = phone._simple_command("EXPUNGE")
    assert typ == "OK" and untagged(phone, typ, data, "VANISHED") == [str(uids[1]).encode()]
    assert not untagged(phone, typ, data, "EXPUNGE")
    phone.logout()
