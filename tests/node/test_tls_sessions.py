"""The node's TLS for many connections (mailnode.tls): a client's next connection resumes its session
(TLS 1.3 tickets); and with asyncio's per-connection read buffer cut to
ASYNCIO_TLS_BUFFER, messages much larger than it still go both ways intact (APPEND in, BODY[] out)."""

from __future__ import annotations

import contextlib
import imaplib
import socket
import ssl
from asyncio import sslproto

from mailnode import tls
from tests.node.conftest import PASSWORD, RunningNode

USER = "user@example.com"


def _imaps(port: int, context: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[bool, ssl.SSLSession]:
    """Connect, read the greeting, log in and out: whether the handshake resumed `session`, and the
    session to offer next time (its tickets arrive after the handshake, before LOGIN's answer)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as conn,
    ):
        reader = conn.makefile("rb")
        assert reader.readline().startswith(b"* OK")
        conn.sendall(f'a LOGIN "{USER}" "{PASSWORD}"\r\n'.encode())
        while not (line := reader.readline()).startswith(b"a "):
            assert line, "the node hung up"
        assert line.startswith(b"a OK"), line
        conn.sendall(b"b LOGOUT\r\n")
        while (line := reader.readline()) and not line.startswith(b"b "):
            pass
        reused, next_session = bool(conn.session_reused), conn.session
    assert next_session is not None
    return reused, next_session


def test_a_clients_next_connection_resumes_its_tls_session(node: RunningNode, client_tls: ssl.SSLContext) -> None:
    reused, session = _imaps(node.port("imaps"), client_tls, None)
    assert not reused
    for _ in range(2):
        reused, session = _imaps(node.port("imaps"), client_tls, session)
        assert reused


def test_asyncio_tls_buffers_are_trimmed_and_large_messages_pass(node: RunningNode, client_tls: ssl.SSLContext) -> None:
    assert sslproto.SSLProtocol.max_size == tls.ASYNCIO_TLS_BUFFER  # the node loaded its certificate
    line = b"A line of a large message, sent over TLS in many records.\r\n"
    message = b"From: a@example.org\r\nSubject: large\r\n\r\n" + line * (20 * tls.ASYNCIO_TLS_BUFFER // len(line))
    client = imaplib.IMAP4("127.0.0.1", node.port("imap"), timeout=60)
    try:
        client.starttls(ssl_context=client_tls)
        client.login(USER, PASSWORD)
        assert client.append("INBOX", None, None, message)[0] == "OK"
        client.select("INBOX")
        typ, data = client.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK"
        fetched = data[0]
        assert isinstance(fetched, tuple) and fetched[1] == message
    finally:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            client.logout()
