"""APPEND of large messages against a real node (issue 12, defect 5): the message literal streams to a
file in the mailbox's tmp/ in small chunks instead of into memory, so a 40 MiB APPEND costs the node
far less than 40 MiB and the message is stored byte for byte; a client that hangs up mid-literal
leaves no file behind; an APPEND over quota is refused before the `+` continuation (RFC 3501 §7.5)
and a non-synchronising one after its literal is read (RFC 7888); a full disk answers NO [OVERQUOTA]
and leaves no temp file, and the session goes on."""

from __future__ import annotations

import errno
import re
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailnode.store import durable
from tests.node.conftest import PASSWORD, RunningNode
from tests.node.test_imap import USER, connect
from tests.node.test_imap_hardening import Lines, rss

MiB = 1024 * 1024


def _message(size: int) -> bytes:
    head = b"From: big@remote.test\r\nTo: " + USER.encode() + b"\r\nSubject: big\r\n\r\n"
    line_count, rest = divmod(size - len(head), 80)
    lines = b"".join(b"%08d " % n + bytes([0x41 + n % 26]) * 69 + b"\r\n" for n in range(line_count))
    return head + lines + b"z" * rest  # exactly `size` bytes


def _tmp(node: RunningNode, address: str = USER) -> Path:
    local, _, domain = address.partition("@")
    return node.files.data_dir / "mail" / domain / local / "INBOX" / "tmp"


def _login(node: RunningNode, client_tls: ssl.SSLContext, address: str = USER) -> Lines:
    """A raw connection, logged in as `address` after STARTTLS."""
    client = Lines(node.port("imap"))
    assert client.readline().startswith(b"* OK")
    client.send(b"t1 STARTTLS\r\n")
    assert client.until_tagged(b"t1")[-1].startswith(b"t1 OK")
    client.start_tls(client_tls)
    client.send(f'l1 LOGIN {address} "{PASSWORD}"\r\n'.encode())
    assert client.until_tagged(b"l1")[-1].startswith(b"l1 OK")
    return client


@pytest.fixture
def logged_in(node: RunningNode, client_tls: ssl.SSLContext) -> Iterator[Lines]:
    client = _login(node, client_tls)
    yield client
    client.close()


def test_a_40_mib_append_streams_to_disk_with_memory_bounded(node: RunningNode, client_tls: ssl.SSLContext) -> None:
    data = _message(40 * MiB)
    client = connect(node, client_tls)
    sock = client.socket()
    before = rss()
    peak = before
    sock.sendall(b"a1 APPEND INBOX (\\Flagged) {%d}\r\n" % len(data))
    assert sock.recv(1024).startswith(b"+")
    view = memoryview(data)
    for offset in range(0, len(data), MiB):
        sock.sendall(view[offset : offset + MiB])
        peak = max(peak, rss())
    sock.sendall(b"\r\n")
    reply = b""
    while not reply.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        assert chunk, "connection closed"
        reply += chunk
        peak = max(peak, rss())
    growth = peak - before
    print(f"node RSS {before / MiB:.0f} MiB before, peak {peak / MiB:.0f} MiB (+{growth / MiB:.1f} MiB)")
    assert re.match(rb"a1 OK \[APPENDUID \d+ 1\]", reply), reply
    assert growth < 16 * MiB, f"the node grew by {growth / MiB:.1f} MiB for a {len(data) / MiB:.0f} MiB APPEND"
    client.select("INBOX")
    typ, fetched = client.fetch("1", "(FLAGS BODY.PEEK[])")
    assert typ == "OK"
    [(meta, body)] = [part for part in fetched if isinstance(part, tuple)]
    assert b"\\Flagged" in meta
    assert body == data
    assert list(_tmp(node).iterdir()) == []
    client.logout()


def test_an_append_cut_off_mid_literal_leaves_no_file_in_tmp(node: RunningNode, logged_in: Lines) -> None:
    data = _message(8 * MiB)
    logged_in.send(b"a1 APPEND INBOX {%d}\r\n" % (len(data) * 2))
    assert logged_in.readline().startswith(b"+")
    logged_in.send(data)
    deadline = time.monotonic() + 20
    while not any(f.stat().st_size > MiB for f in _tmp(node).iterdir()):  # on its way to disk, not memory
        assert time.monotonic() < deadline, "the literal never reached tmp/"
        time.sleep(0.05)
    logged_in.sock.shutdown(socket.SHUT_RDWR)
    logged_in.close()
    deadline = time.monotonic() + 20
    while list(_tmp(node).iterdir()):
        assert time.monotonic() < deadline, list(_tmp(node).iterdir())
        time.sleep(0.05)
    assert node.files.stored(USER) == []


def test_an_append_over_quota_is_refused_before_the_continuation(node: RunningNode, client_tls: ssl.SSLContext) -> None:
    client = _login(node, client_tls, "small@example.com")  # a quota of 2000 bytes
    try:
        client.send(b"a1 APPEND INBOX {100000}\r\n")
        assert client.readline().startswith(b"a1 NO [OVERQUOTA]")  # no `+`: the literal is never sent
        client.send(b"a2 NOOP\r\n")
        assert client.until_tagged(b"a2")[-1].startswith(b"a2 OK")
        # RFC 7888: a non-synchronising literal comes anyway; it is read and thrown away, then refused.
        client.send(b"a3 APPEND INBOX {100000+}\r\n" + _message(100000) + b"\r\na4 NOOP\r\n")
        assert client.until_tagged(b"a3")[-1].startswith(b"a3 NO [OVERQUOTA]")
        assert client.until_tagged(b"a4")[-1].startswith(b"a4 OK")
        assert list(_tmp(node, "small@example.com").iterdir()) == []
    finally:
        client.close()


def test_a_full_disk_mid_literal_answers_overquota_and_leaves_no_temp_file(
    node: RunningNode, logged_in: Lines, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write_all = durable.write_all
    written = 0

    def fill_up(fd: int, data: bytes) -> None:
        nonlocal written
        if written + len(data) > 2 * MiB:
            raise OSError(errno.ENOSPC, "No space left on device")
        written += len(data)
        real_write_all(fd, data)

    monkeypatch.setattr(durable, "write_all", fill_up)
    data = _message(8 * MiB)
    logged_in.send(b"a1 APPEND INBOX {%d}\r\n" % len(data))
    assert logged_in.readline().startswith(b"+")
    logged_in.send(data + b"\r\n")
    assert logged_in.until_tagged(b"a1")[-1].startswith(b"a1 NO [OVERQUOTA]")
    assert written > 0  # it did start writing to disk
    assert list(_tmp(node).iterdir()) == []
    monkeypatch.undo()
    logged_in.send(b"a2 APPEND INBOX {%d}\r\n" % len(data))  # in sync, and a write goes through again
    assert logged_in.readline().startswith(b"+")
    logged_in.send(data + b"\r\n")
    assert logged_in.until_tagged(b"a2")[-1].startswith(b"a2 OK [APPENDUID")
    assert node.files.stored(USER) == [data]
