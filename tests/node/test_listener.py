"""The client listeners' door (mailnode.listener), seen from real clients over real sockets:

- connection limits: the connection over a listener's per-client or total limit reads SMTP `421 4.7.0`
  or IMAP `* BYE [UNAVAILABLE]` and is closed, counted in mailnode_connections_refused_total; /healthz
  answers meanwhile; a closed connection frees its place;
- PROXY protocol v1 and v2 before SMTP, IMAP and implicit TLS: the carried client address is the one in
  the Received header, the log, SPF, AUTH throttling and the per-client limit;
- a connection from an untrusted range, with a malformed header or without one in time is closed.
"""

from __future__ import annotations

import imaplib
import ipaddress
import json
import logging
import smtplib
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mailnode import logs
from tests.node.conftest import DOMAIN, PASSWORD, NodeFactory, RunningNode, mailbox

SMTP_PER_CLIENT = b"421 4.7.0 Too many connections from your address\r\n"
SMTP_TOTAL = b"421 4.7.0 Too many connections, try again later\r\n"
IMAP_PER_CLIENT = b"* BYE [UNAVAILABLE] Too many connections from your address\r\n"
IMAP_TOTAL = b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n"


def refused(node: RunningNode, listener: str, reason: str) -> float:
    return node.metric("mailnode_connections_refused_total", listener=listener, reason=reason)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


class Connections:
    """Raw client sockets, each having read its first line (the greeting, or the refusal)."""

    def __init__(self) -> None:
        self.open: list[socket.socket] = []

    def connect(self, port: int, *, source: str = "127.0.0.1", send: bytes = b"") -> tuple[socket.socket, bytes]:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        self.open.append(sock)
        if send:
            sock.sendall(send)
        return sock, read_line(sock)

    def close_all(self) -> None:
        for sock in self.open:
            sock.close()


def read_line(sock: socket.socket) -> bytes:
    """The first line; b"" when the server closed (or reset) the connection without a word."""
    data = b""
    while not data.endswith(b"\n"):
        try:
            piece = sock.recv(1)
        except ConnectionResetError:
            break
        if not piece:
            break
        data += piece
    return data


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def connections() -> Iterator[Connections]:
    held = Connections()
    yield held
    held.close_all()


# -- connection limits ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listener", "greeting", "refusal"), [("smtp", b"220 ", SMTP_PER_CLIENT), ("imap", b"* OK ", IMAP_PER_CLIENT)]
)
def test_the_connection_over_the_per_client_limit_is_refused(
    node_factory: NodeFactory, connections: Connections, listener: str, greeting: bytes, refusal: bytes
) -> None:
    node = node_factory(listen={"limits": {listener: {"total": 100, "per_client": 3}}})
    port = node.port(listener)
    held = []
    for _ in range(3):
        sock, line = connections.connect(port)
        assert line.startswith(greeting)
        held.append(sock)
    sock, line = connections.connect(port)
    assert line == refusal
    assert closed_by_server(sock)
    assert refused(node, listener, "per_client") == 1
    assert node.metric("mailnode_connections_open", listener=listener) == 3
    assert node.http_get("/healthz")[0] == 200
    # another address is still welcome (127.0.0.0/8 is loopback on Linux)
    _, line = connections.connect(port, source="127.0.0.2")
    assert line.startswith(greeting)
    # a closed connection frees its place
    held[0].close()
    wait_for(lambda: node.metric("mailnode_connections_open", listener=listener) == 3)
    _, line = connections.connect(port)
    assert line.startswith(greeting)


@pytest.mark.parametrize(
    ("listener", "greeting", "refusal"), [("smtp", b"220 ", SMTP_TOTAL), ("imap", b"* OK ", IMAP_TOTAL)]
)
def test_the_connection_over_the_listener_total_is_refused(
    node_factory: NodeFactory, connections: Connections, listener: str, greeting: bytes, refusal: bytes
) -> None:
    node = node_factory(listen={"limits": {listener: {"total": 2, "per_client": 10}}})
    port = node.port(listener)
    for source in ("127.0.0.1", "127.0.0.2"):
        assert connections.connect(port, source=source)[1].startswith(greeting)
    sock, line = connections.connect(port, source="127.0.0.3")
    assert line == refusal
    assert closed_by_server(sock)
    assert refused(node, listener, "total") == 1
    assert node.http_get("/healthz")[0] == 200
    if listener == "smtp":  # the limit is per listener: submission still greets
        assert connections.connect(node.port("submission"), source="127.0.0.3")[1].startswith(b"220 ")


def test_default_limit_holds_twenty_idle_smtp_connections_per_address(
    node: RunningNode, connections: Connections
) -> None:
    """The defaults (smtp: 20 per address, 1000 per listener): a flood from one address takes 20."""
    port = node.port("smtp")
    for _ in range(20):
        assert connections.connect(port)[1].startswith(b"220 ")
    assert connections.connect(port)[1] == SMTP_PER_CLIENT
    assert node.http_get("/healthz")[0] == 200
    assert node.http_get("/readyz")[0] == 200


def test_an_smtp_client_refused_by_the_gate_reads_421_in_smtplib(node_factory: NodeFactory) -> None:
    node = node_factory(listen={"limits": {"smtp": {"total": 1, "per_client": 1}}})
    with smtplib.SMTP("127.0.0.1", node.port("smtp"), timeout=10):
        with pytest.raises(smtplib.SMTPConnectError) as error:
            smtplib.SMTP("127.0.0.1", node.port("smtp"), timeout=10)
        assert error.value.smtp_code == 421


# -- PROXY protocol ------------------------------------------------------------------------------------------


def v1(source: str, port: int = 40000) -> bytes:
    family = "TCP4" if ipaddress.ip_address(source).version == 4 else "TCP6"
    destination = "192.0.2.1" if family == "TCP4" else "2001:db8::1"
    return f"PROXY {family} {source} {destination} {port} 25\r\n".encode()


def v2(source: str, port: int = 40000) -> bytes:
    address = ipaddress.ip_address(source)
    if address.version == 4:
        family, body = 0x11, address.packed + ipaddress.IPv4Address("192.0.2.1").packed
    else:
        family, body = 0x21, address.packed + ipaddress.IPv6Address("2001:db8::1").packed
    body += struct.pack("!HH", port, 25)
    body += b"\x05\x00\x03abc"  # a TLV (PP2_TYPE_UNIQUE_ID), as AWS NLB sends some: skipped
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


PROXY = {"proxy_protocol": {"enabled": True, "trusted": ["127.0.0.0/8"], "timeout": 2}}


class ProxiedSMTP(smtplib.SMTP):
    def __init__(self, header: bytes, *args: Any, **kwargs: Any) -> None:
        self.header = header
        super().__init__(*args, **kwargs)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = super()._get_socket(host, port, timeout)  # type: ignore[misc]
        sock.sendall(self.header)
        return sock  # type: ignore[no-any-return]


class ProxiedSMTPS(smtplib.SMTP_SSL):
    """SMTPS through a proxy: the header in the clear, then the TLS handshake."""

    def __init__(self, header: bytes, *args: Any, **kwargs: Any) -> None:
        self.header = header
        super().__init__(*args, **kwargs)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.create_connection((host, port), timeout)
        sock.sendall(self.header)
        return self.context.wrap_socket(sock, server_hostname=host)


class ProxiedIMAP(imaplib.IMAP4):
    def __init__(self, header: bytes, *args: Any, **kwargs: Any) -> None:
        self.header = header
        super().__init__(*args, **kwargs)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = super()._create_socket(timeout)  # type: ignore[misc]
        sock.sendall(self.header)
        return sock  # type: ignore[no-any-return]


class ProxiedIMAPS(imaplib.IMAP4_SSL):
    def __init__(self, header: bytes, *args: Any, **kwargs: Any) -> None:
        self.header = header
        super().__init__(*args, **kwargs)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = imaplib.IMAP4._create_socket(self, timeout)  # type: ignore[attr-defined]
        sock.sendall(self.header)
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[no-any-return]


MESSAGE = f"From: someone@remote.test\r\nTo: user@{DOMAIN}\r\nSubject: proxied\r\n\r\nhello\r\n"


@pytest.mark.parametrize(
    ("header", "client"),
    [(v1("203.0.113.7"), "203.0.113.7"), (v2("203.0.113.8"), "203.0.113.8"), (v2("2001:db8::7"), "2001:db8::7")],
    ids=["v1", "v2", "v2-ipv6"],
)
def test_smtp_behind_a_proxy_uses_the_carried_client_address(
    node_factory: NodeFactory, caplog: pytest.LogCaptureFixture, header: bytes, client: str
) -> None:
    node = node_factory(listen=PROXY)
    spf_ips: list[str] = []

    def spf(*, ip: str, sender: str, helo: str) -> str:  # no DNS: the address it is asked about
        spf_ips.append(ip)
        return "none"

    node.node._inbound.spf = spf  # type: ignore[method-assign]
    caplog.set_level(logging.INFO, logger="mailnode.smtp.server")
    with ProxiedSMTP(
        header, "127.0.0.1", node.port("smtp"), local_hostname="client.example", timeout=10
    ) as client_smtp:
        client_smtp.sendmail("someone@remote.test", [f"user@{DOMAIN}"], MESSAGE)
    wait_for(lambda: len(node.files.stored(f"user@{DOMAIN}")) == 1)
    stored = node.files.stored(f"user@{DOMAIN}")[0]
    assert f"([{client}])".encode() in stored
    assert b"127.0.0.1" not in stored
    assert spf_ips == [client]
    [record] = [r for r in caplog.records if r.getMessage() == "smtp transaction"]
    assert json.loads(logs.JSONFormatter().format(record))["client"] == client


def test_imap_login_failures_are_throttled_under_the_carried_address(node_factory: NodeFactory) -> None:
    node = node_factory(listen=PROXY, imap={"allow_plaintext_login": True})
    with (
        ProxiedIMAP(v1("198.51.100.9"), "127.0.0.1", node.port("imap"), timeout=10) as imap,
        pytest.raises(imaplib.IMAP4.error),
    ):
        imap.login(f"user@{DOMAIN}", "wrong password")
    assert node.node.authenticator.failures("198.51.100.9") == 1
    assert node.node.authenticator.failures("127.0.0.1") == 0
    with ProxiedIMAP(v2("198.51.100.10"), "127.0.0.1", node.port("imap"), timeout=10) as imap:
        assert imap.login(f"user@{DOMAIN}", PASSWORD)[0] == "OK"


def test_implicit_tls_after_the_proxy_header(node_factory: NodeFactory, ca_file: Any) -> None:
    node = node_factory([mailbox(f"user@{DOMAIN}"), mailbox(f"other@{DOMAIN}")], listen=PROXY)
    context = ssl.create_default_context(cafile=str(ca_file))
    with ProxiedIMAPS(v2("198.51.100.11"), "127.0.0.1", node.port("imaps"), ssl_context=context, timeout=10) as imap:
        assert imap.login(f"user@{DOMAIN}", PASSWORD)[0] == "OK"
    with ProxiedSMTPS(v1("198.51.100.12"), "127.0.0.1", node.port("submissions"), context=context, timeout=10) as s:
        s.login(f"user@{DOMAIN}", PASSWORD)
        s.sendmail(f"user@{DOMAIN}", [f"other@{DOMAIN}"], MESSAGE)
    wait_for(lambda: len(node.files.stored(f"other@{DOMAIN}")) == 1)
    assert b"([198.51.100.12])" in node.files.stored(f"other@{DOMAIN}")[0]


def test_the_per_client_limit_counts_the_carried_address(node_factory: NodeFactory, connections: Connections) -> None:
    node = node_factory(listen={**PROXY, "limits": {"smtp": {"total": 100, "per_client": 1}}})
    port = node.port("smtp")
    assert connections.connect(port, send=v1("203.0.113.1"))[1].startswith(b"220 ")
    assert connections.connect(port, send=v2("203.0.113.2"))[1].startswith(b"220 ")
    assert connections.connect(port, send=v1("203.0.113.1"))[1] == SMTP_PER_CLIENT


def test_a_connection_from_an_untrusted_range_is_closed(node_factory: NodeFactory, connections: Connections) -> None:
    node = node_factory(listen={"proxy_protocol": {"enabled": True, "trusted": ["192.0.2.0/24"]}})
    for listener in ("smtp", "imap"):
        sock, line = connections.connect(node.port(listener), send=v1("203.0.113.1"))
        assert line == b""
        assert refused(node, listener, "untrusted_proxy") == 1


@pytest.mark.parametrize(
    "garbage",
    [
        b"EHLO client.example\r\n",
        b"PROXY TCP4 203.0.113.1 nowhere 1 2\r\n",
        b"PROXY " + b"9" * 200,
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff",
    ],
    ids=["smtp-command", "bad-address", "too-long", "v2-too-long"],
)
def test_a_malformed_header_is_refused(node_factory: NodeFactory, connections: Connections, garbage: bytes) -> None:
    node = node_factory(listen=PROXY)
    sock, line = connections.connect(node.port("smtp"), send=garbage)
    assert line == b""
    assert refused(node, "smtp", "proxy_header") == 1
    assert node.metric("mailnode_connections_open", listener="smtp") == 0


def test_a_connection_without_a_header_in_time_is_closed(node_factory: NodeFactory, connections: Connections) -> None:
    node = node_factory(listen={"proxy_protocol": {"enabled": True, "trusted": ["127.0.0.1/32"], "timeout": 0.3}})
    started = time.monotonic()
    sock, line = connections.connect(node.port("imap"))
    assert line == b""
    assert time.monotonic() - started < 5
    assert refused(node, "imap", "proxy_header") == 1
