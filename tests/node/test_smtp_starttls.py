"""STARTTLS against clients that break RFC 3207 §4.2 (pipelining after STARTTLS), over a raw socket:
the node discards what was pipelined and still notices the client leaving, however much it sent."""

from __future__ import annotations

import socket

import pytest

from tests.node.conftest import RunningNode


@pytest.mark.parametrize("pipelined", [b"", b"NOOP\r\n", b"NOOP " + b"y" * 1000 + b"\r\n" * 3 + b"z" * 3000])
def test_a_client_that_leaves_after_starttls_is_let_go(node: RunningNode, pipelined: bytes) -> None:
    with socket.create_connection(("127.0.0.1", node.port("smtp")), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        sock.sendall(b"EHLO client.remote.test\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
        sock.sendall(b"STARTTLS\r\n" + pipelined)
        assert reader.readline().startswith(b"220 2.0.0 Ready to start TLS")
        sock.shutdown(socket.SHUT_WR)  # no handshake: the client is gone
        # The node closes its side (a read returns nothing) instead of holding the connection until
        # its idle timeout; a hang shows as socket.timeout here.
        assert reader.read() == b""
