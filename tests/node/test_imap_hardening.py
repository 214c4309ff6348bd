"""The IMAP server against hostile clients (issue 12), over real sockets: plaintext injected after
STARTTLS is thrown away, literals before login are small, an unauthenticated connection is hung up
on soon, a LOGIN that answers NO leaves the session unauthenticated, and FETCH of large messages to
a slow reader keeps the node's memory bounded."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.node.conftest import PASSWORD, NodeFactory, RunningNode
from tests.node.test_imap import USER, connect

MiB = 1024 * 1024


def rss() -> int:
    """The resident memory of this process, which runs the node in a thread (bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class Lines:
    """A raw client connection read line by line, that can switch to TLS."""

    def __init__(self, port: int) -> None:
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=10)
        self._buffer = b""

    def readline(self) -> bytes:
        while b"\r\n" not in self._buffer:
            data = self.sock.recv(65536)
            if not data:
                line, self._buffer = self._buffer, b""
                return line
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        return line

    def until_tagged(self, tag: bytes) -> list[bytes]:
        lines = [self.readline()]
        while lines[-1] and not lines[-1].startswith(tag + b" "):
            lines.append(self.readline())
        return lines

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def start_tls(self, context: ssl.SSLContext) -> None:
        assert not self._buffer, self._buffer
        self.sock = context.wrap_socket(self.sock, server_hostname="127.0.0.1")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@pytest.fixture
def lines(node: RunningNode) -> Iterator[Lines]:
    client = Lines(node.port("imap"))
    assert client.readline().startswith(b"* OK")
    yield client
    client.close()


# -- STARTTLS (RFC 3501 §6.2.1, RFC 2595 §3.1; CVE-2011-0411's class) --------------------------------


def test_plaintext_sent_with_starttls_is_thrown_away(lines: Lines, client_tls: ssl.SSLContext) -> None:
    # A man in the middle appends his own LOGIN to the victim's STARTTLS, in the same packet.
    lines.send(b'a STARTTLS\r\nb LOGIN user@example.com "' + PASSWORD.encode() + b'"\r\n')
    assert lines.readline().startswith(b"a OK")
    lines.start_tls(client_tls)
    lines.send(b"c SELECT INBOX\r\n")
    replies = lines.until_tagged(b"c")
    assert not any(line.startswith(b"b ") for line in replies), replies
    assert replies[-1].startswith(b"c BAD"), replies
    assert b"needs authentication" in replies[-1]


# -- literals before login (RFC 7888 §4, RFC 4469 TOOBIG) ----------------------------------------------


def test_a_large_literal_before_login_is_refused_unread(lines: Lines) -> None:
    lines.send(b"a LOGIN {60000000}\r\n")
    reply = lines.readline()
    assert reply.startswith(b"a NO [TOOBIG]"), reply  # no "+": the client must not send it
    lines.send(b"b NOOP\r\n")
    assert lines.readline().startswith(b"b OK")


def test_a_large_non_synchronizing_literal_before_login_ends_the_session(lines: Lines) -> None:
    lines.send(b"a LOGIN {60000000+}\r\n")
    assert lines.readline().startswith(b"* BYE [TOOBIG]")
    assert lines.readline() == b""  # closed, without reading 64 MiB


def test_large_literals_before_login_do_not_cost_the_node_memory(node: RunningNode) -> None:
    """Six unauthenticated connections each pushing a 60 MB LITERAL+ (issue 12 saw 124 -> 517 MB)."""
    before = rss()
    peak = before

    def push() -> None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", node.port("imap"))) as sock:
            sock.recv(4096)  # the greeting
            sock.sendall(b"a LOGIN {60000000+}\r\n")
            chunk = b"x" * MiB
            for _ in range(60):
                sock.sendall(chunk)

    pushers = [threading.Thread(target=push) for _ in range(6)]
    for thread in pushers:
        thread.start()
    while any(thread.is_alive() for thread in pushers):
        peak = max(peak, rss())
        time.sleep(0.01)
    growth = peak - before
    print(f"node RSS {before / MiB:.0f} MiB before, peak {peak / MiB:.0f} MiB (+{growth / MiB:.1f} MiB)")
    assert growth < 48 * MiB


# -- the pre-login timeout (RFC 3501 §5.4) -------------------------------------------------------------


def test_an_idle_unauthenticated_connection_is_hung_up_on(
    node_factory: NodeFactory, client_tls: ssl.SSLContext
) -> None:
    node = node_factory(imap={"login_timeout": 0.5})
    client = Lines(node.port("imap"))
    authenticated = connect(node, client_tls)
    try:
        assert client.readline().startswith(b"* OK")
        started = time.monotonic()
        assert client.readline().startswith(b"* BYE")
        assert client.readline() == b""
        assert time.monotonic() - started < 5
        time.sleep(0.6)  # past the login timeout: the autologout timer (30 minutes) applies after login
        assert authenticated.noop()[0] == "OK"
    finally:
        client.close()
        authenticated.logout()


# -- LOGIN is all or nothing -----------------------------------------------------------------------------


def test_a_login_that_fails_to_open_the_mailbox_leaves_the_session_unauthenticated(
    node: RunningNode, client_tls: ssl.SSLContext
) -> None:
    # A file where the mailbox directory would be: opening the account fails.
    domain_dir = node.files.data_dir / "mail" / "example.com"
    domain_dir.mkdir(parents=True, exist_ok=True)
    (domain_dir / "other").write_bytes(b"in the way")
    client = Lines(node.port("imap"))
    try:
        assert client.readline().startswith(b"* OK")
        client.send(b"a STARTTLS\r\n")
        assert client.readline().startswith(b"a OK")
        client.start_tls(client_tls)
        client.send(b'b LOGIN other@example.com "' + PASSWORD.encode() + b'"\r\n')
        assert client.until_tagged(b"b")[-1].startswith(b"b NO")
        client.send(b"c SELECT INBOX\r\n")
        reply = client.until_tagged(b"c")[-1]
        assert reply.startswith(b"c BAD") and b"needs authentication" in reply, reply
        client.send(b"d CAPABILITY\r\n")
        assert b"AUTH=PLAIN" in client.until_tagged(b"d")[0]  # still offers to log in
    finally:
        client.close()


# -- FETCH to a slow reader ------------------------------------------------------------------------------


def test_fetch_of_large_messages_to_a_slow_reader_keeps_memory_bounded(
    node: RunningNode, client_tls: ssl.SSLContext
) -> None:
    """Issue 12: `FETCH 1:* BODY.PEEK[]` over twelve 20 MB messages took the node from 387 MB to 1.76 GB."""
    client = connect(node, client_tls)
    body = b"".join(b"%07d " % n + b"y" * 68 + b"\r\n" for n in range(8 * MiB // 78))
    data = b"From: big@remote.test\r\nTo: " + USER.encode() + b"\r\nSubject: big\r\n\r\n" + body
    for _ in range(8):
        assert client.append("INBOX", "", None, data)[0] == "OK"
    client.select("INBOX")
    sock = client.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    before = rss()
    peak = before
    sock.sendall(b"f1 FETCH 1:* BODY.PEEK[]\r\n")
    total = 0
    tail = b""
    while b"\r\nf1 " not in tail or not tail.endswith(b"\r\n"):
        chunk = sock.recv(256 * 1024)
        assert chunk, "connection closed"
        total += len(chunk)
        tail = (tail + chunk)[-300:]
        peak = max(peak, rss())
        time.sleep(0.005)
    growth = peak - before
    print(f"node RSS {before / MiB:.0f} MiB before, peak {peak / MiB:.0f} MiB (+{growth / MiB:.1f} MiB)")
    assert b"\r\nf1 OK" in tail
    assert total > 8 * len(data)
    assert growth < 40 * MiB  # 64 MiB of messages were sent
    typ, fetched = client.fetch("8", "(BODY.PEEK[]<70.9000000> RFC822)")  # streamed as sent
    assert typ == "OK"
    assert [part[1] for part in fetched if isinstance(part, tuple)] == [data[70:], data]
    typ, fetched = client.fetch("8", "(RFC822.HEADER BODY.PEEK[TEXT]<0.20>)")  # read alone, not streamed
    assert typ == "OK"
    header, _, text = data.partition(b"\r\n\r\n")
    assert fetched == [
        (b"8 (RFC822.HEADER {%d}" % (len(header) + 4), header + b"\r\n\r\n"),
        b' BODY[TEXT]<0> "' + text[:20] + b'")',
    ]
    client.logout()
