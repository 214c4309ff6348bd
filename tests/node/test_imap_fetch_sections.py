"""FETCH of a large message's sections over imaplib on a real node (mailnode.imap.commands.fetch): BODY[n],
BODY[n.MIME], BODY[TEXT], BODY[HEADER.FIELDS (...)], RFC822.HEADER, RFC822.TEXT and partial ranges of them
give the bytes mime.section takes from the whole message, while the node reads the file in ranges of at
most a chunk (or a header block), never the message whole."""

from __future__ import annotations

import base64
import imaplib

import pytest

from mailnode.imap import mime
from mailnode.imap.commands import fetch as fetch_command
from mailnode.store.account import MessageFile
from tests.node.conftest import NodeFactory, imap_inbox

USER = "user@example.com"


def _large_message() -> bytes:
    """A multipart message of about 1.5 MiB: a text part, a base64 attachment, and an attached message."""
    text = "".join(f"Line {n} of the text part, which says little at some length.\r\n" for n in range(4000))
    attachment = base64.encodebytes(bytes(range(256)) * 3000).replace(b"\n", b"\r\n").decode()
    inner = "".join(f"Inner line {n}.\r\n" for n in range(20000))
    return (
        f"From: Alice <alice@example.org>\r\nTo: {USER}\r\nSubject: Large sections\r\n"
        "Message-ID: <large@example.org>\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        "--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        f"{text}\r\n"
        '--b1\r\nContent-Type: application/octet-stream; name="blob.bin"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
        f"{attachment}\r\n"
        "--b1\r\nContent-Type: message/rfc822\r\n\r\n"
        "From: Bob <bob@example.org>\r\nSubject: Inner\r\n\r\n"
        f"{inner}\r\n"
        "--b1--\r\n"
    ).encode()


ITEMS = [
    ("BODY.PEEK[1]", "1", []), ("BODY.PEEK[2]", "2", []), ("BODY.PEEK[2.MIME]", "2.MIME", []),
    ("BODY.PEEK[3]", "3", []), ("BODY.PEEK[3.TEXT]", "3.TEXT", []), ("BODY.PEEK[3.HEADER]", "3.HEADER", []),
    ("BODY.PEEK[TEXT]", "TEXT", []), ("BODY.PEEK[HEADER]", "HEADER", []),
    ("BODY.PEEK[HEADER.FIELDS (Subject From)]", "HEADER.FIELDS", ["Subject", "From"]),
    ("BODY.PEEK[3.HEADER.FIELDS.NOT (Subject)]", "3.HEADER.FIELDS.NOT", ["Subject"]),
    ("BODY.PEEK[4]", "4", []), ("RFC822.HEADER", "HEADER", []),
]  # fmt: skip
PARTIAL = ("BODY.PEEK[2]<1000.300000>", "2", 1000, 300000)


def _fetched(client: imaplib.IMAP4, item: str) -> bytes:
    typ, data = client.uid("FETCH", "1", f"({item})")
    assert typ == "OK", (item, data)
    first = data[0]
    if isinstance(first, tuple):
        literal = first[1]
        assert isinstance(literal, bytes)
        return literal
    assert isinstance(first, bytes) and first.endswith(b' "")'), first  # only an empty section is not a literal
    return b""


def test_sections_of_a_large_message_are_read_in_chunks(
    node_factory: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = node_factory(imap={"allow_plaintext_login": True})
    data = _large_message()
    assert len(data) > 8 * fetch_command._CHUNK
    analysis = mime.analyze(data)
    header_size = analysis.root.body_start
    reads: list[int] = []
    read = MessageFile.read

    async def counted(self: MessageFile, offset: int, length: int) -> bytes:
        reads.append(length)
        return await read(self, offset, length)

    monkeypatch.setattr(MessageFile, "read", counted)
    with imap_inbox(node, USER) as client:
        typ, _ = client.append("INBOX", None, None, data)
        assert typ == "OK"
        client.noop()
        for item, spec, fields in ITEMS:
            expected = mime.section(data, analysis, spec, fields) or b""
            assert _fetched(client, item) == expected, item
        item, spec, offset, length = PARTIAL
        whole = mime.section(data, analysis, spec) or b""
        assert _fetched(client, item) == whole[offset : offset + length]
        typ, answer = client.uid("FETCH", "1", "(RFC822.TEXT)")
        assert typ == "OK" and isinstance(answer[0], tuple)
        assert answer[0][1] == mime.section(data, analysis, "TEXT")
    assert reads, "the large message was read through its open file"
    inner_header = mime.section(data, analysis, "3.HEADER") or b""
    assert max(reads) <= max(fetch_command._CHUNK, header_size, len(inner_header)), max(reads)
