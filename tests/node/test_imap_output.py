"""How the node's IMAP answers reach a client on the wire (mailnode.imap.session, "-- output --"): a
command's whole answer, its untagged lines and its tagged one, comes in one TLS record (one write by the
server, one system call) for SELECT and for a FETCH of several messages, small bodies included; and what
the session still has to say when the node stops reaches an idling client as `* BYE` before the close.

The record client below reads the socket a TLS record at a time and decrypts each alone, so it sees how
the server framed its writes whatever TCP did with them. The unit tests (tests/unit/test_imap_output.py)
check the same output path against a recording writer: one write per flush, the 64 KiB bound, the BYE of
a shutdown after what a command had answered. IDLE's updates reaching real clients are checked by
test_imap.py (test_delivery_wakes_idle) and test_imap_shared_state.py."""

from __future__ import annotations

import imaplib
import smtplib
import socket
import ssl
import threading

from tests.node.conftest import PASSWORD, RunningNode

USER = "user@example.com"
WAIT = 60.0  # seconds a read may take on a loaded machine before the test gives up


def deliver(node: RunningNode, count: int) -> None:
    with smtplib.SMTP("127.0.0.1", node.port("smtp"), timeout=WAIT) as client:
        for number in range(1, count + 1):
            client.sendmail("alice@remote.test", [USER], f"Subject: note {number}\r\n\r\nBody {number}.\r\n".encode())


class RecordClient:
    """An IMAPS client that reads TLS records one by one (RFC 8446 §5.1: a 5-byte header, its length in
    bytes 3-4) and decrypts each alone, counting the records that carried the server's data."""

    def __init__(self, node: RunningNode, context: ssl.SSLContext) -> None:
        self._sock = socket.create_connection(("127.0.0.1", node.port("imaps")), timeout=WAIT)
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname="127.0.0.1")
        self._raw = b""  # bytes read from the socket, not yet a whole record
        self._text = b""  # decrypted, not yet returned
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._send_pending()
                self._incoming.write(self._record())
        self._send_pending()

    def close(self) -> None:
        self._sock.close()

    def _send_pending(self) -> None:
        data = self._outgoing.read()
        if data:
            self._sock.sendall(data)

    def _record(self) -> bytes:
        while True:
            if len(self._raw) >= 5:
                end = 5 + int.from_bytes(self._raw[3:5], "big")
                if len(self._raw) >= end:
                    record, self._raw = self._raw[:end], self._raw[end:]
                    return record
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            self._raw += data

    def until(self, tag: bytes) -> tuple[bytes, int]:
        """Everything up to and including the first line that starts with `tag` + space, and the number
        of TLS records that carried data while it was read (records with only a session ticket do not)."""
        records = 0
        while True:
            at = 0
            while (end := self._text.find(b"\r\n", at)) >= 0:
                if self._text.startswith(tag + b" ", at):
                    answer, self._text = self._text[: end + 2], self._text[end + 2 :]
                    return answer, records
                at = end + 2
            self._incoming.write(self._record())
            got = b""
            while True:
                try:
                    got += self._tls.read(65536)
                except ssl.SSLWantReadError:
                    break
            if got:
                records += 1
                self._text += got

    def command(self, line: str) -> tuple[bytes, int]:
        """Send `t <line>`; the answer up to its tagged line, and how many records it came in."""
        self._tls.write(f"t {line}\r\n".encode())
        self._send_pending()
        return self.until(b"t")


def test_a_select_answer_arrives_in_one_tls_record(node: RunningNode, client_tls: ssl.SSLContext) -> None:
    deliver(node, 2)
    client = RecordClient(node, client_tls)
    try:
        greeting, _ = client.until(b"*")
        assert greeting.startswith(b"* OK ")
        assert client.command(f'LOGIN {USER} "{PASSWORD}"')[0].startswith(b"t OK ")
        answer, records = client.command("SELECT INBOX")
        lines = answer.split(b"\r\n")[:-1]
        assert lines[-1].startswith(b"t OK [READ-WRITE]"), answer
        assert b"* 2 EXISTS" in lines and b"* 2 RECENT" in lines
        assert len(lines) >= 8, answer  # FLAGS, PERMANENTFLAGS, EXISTS, RECENT, UNSEEN, UIDVALIDITY, UIDNEXT, ...
        assert records == 1, answer
    finally:
        client.close()


def test_a_fetch_of_several_messages_arrives_in_one_tls_record(node: RunningNode, client_tls: ssl.SSLContext) -> None:
    deliver(node, 3)
    client = RecordClient(node, client_tls)
    try:
        client.until(b"*")
        client.command(f'LOGIN {USER} "{PASSWORD}"')
        client.command("SELECT INBOX")
        answer, records = client.command("FETCH 1:* (UID FLAGS RFC822.SIZE)")  # answered from the folder's rows
        assert [line.split(b" (")[0] for line in answer.split(b"\r\n")[:-2]] == [
            b"* 1 FETCH",
            b"* 2 FETCH",
            b"* 3 FETCH",
        ]
        assert answer.endswith(b"t OK FETCH completed\r\n")
        assert records == 1, answer
        answer, records = client.command("UID FETCH 1:* (BODY.PEEK[])")  # the files read
        assert [answer.count(b"Body %d.\r\n" % n) for n in (1, 2, 3)] == [1, 1, 1], answer
        assert answer.endswith(b"t OK UID FETCH completed\r\n")
        assert records == 1, answer
    finally:
        client.close()


def test_a_stopping_node_says_bye_to_an_idling_client(node: RunningNode, client_tls: ssl.SSLContext) -> None:
    client = imaplib.IMAP4("127.0.0.1", node.port("imap"), timeout=WAIT)
    client.starttls(ssl_context=client_tls)
    client.login(USER, PASSWORD)
    client.select("INBOX")
    client.send(b"i1 IDLE\r\n")
    assert client.readline() == b"+ idling\r\n"
    stopping = threading.Thread(target=node.stop)  # returns once the sessions have ended: this one too
    stopping.start()
    try:
        assert client.readline() == b"* BYE [UNAVAILABLE] Server shutting down; try again later\r\n"
        assert client.readline() == b""  # and closed
    finally:
        client.shutdown()  # the node's TLS close waits for the client's
        stopping.join(WAIT)
    assert not stopping.is_alive()
