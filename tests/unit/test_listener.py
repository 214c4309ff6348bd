"""mailnode.listener as plain functions: the PROXY protocol parser (haproxy's proxy-protocol.txt
examples, round trips of v2 headers, random bytes with hypothesis: only ProxyHeaderError, never a byte
read past the header), the connection gate's counting (IPv6 by /64) and the file-descriptor budget.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailnode import listener
from mailnode.metrics import NodeMetrics

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def read_header(stream: bytes) -> tuple[bytes, bytes]:
    """What the door reads of `stream` before parsing (as `needed` tells), and what it leaves."""
    read = b""
    while (more := listener.needed(read)) and len(read) < len(stream):
        read += stream[len(read) : len(read) + more]
    return read, stream[len(read) :]


@pytest.mark.parametrize(
    ("header", "source"),
    [
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n", ("192.168.0.1", 56324)),
        (b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 25\r\n", ("2001:db8::1", 65535)),
        (b"PROXY UNKNOWN\r\n", None),
        (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", None),
    ],
)
def test_v1_headers(header: bytes, source: tuple[str, int] | None) -> None:
    read, rest = read_header(header + b"\x16\x03\x01 a TLS ClientHello")
    assert read == header and rest.startswith(b"\x16")
    assert listener.parse(read) == listener.ProxyHeader(source, len(header))


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 192.168.0.1 192.168.0.11 056324 443\r\n",  # a leading zero
        b"PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n",
        b"PROXY TCP4 2001:db8::1 192.168.0.11 1 2\r\n",
        b"PROXY TCP4 192.168.0.1  192.168.0.11 1 2\r\n",
        b"PROXY UDP4 192.168.0.1 192.168.0.11 1 2\r\n",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 1 2",  # no CRLF
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PROXY TCP4 " + b"1" * 120 + b"\r\n",
    ],
)
def test_malformed_v1_headers(header: bytes) -> None:
    read, _ = read_header(header)
    assert len(read) <= listener.V1_MAX
    with pytest.raises(listener.ProxyHeaderError):
        listener.parse(read)


def v2(command: int, family: int, body: bytes) -> bytes:
    return SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


@given(
    source=st.ip_addresses(),
    port=st.integers(0, 65535),
    tlvs=st.binary(max_size=200),
    after=st.binary(max_size=50),
)
def test_v2_round_trip(
    source: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, tlvs: bytes, after: bytes
) -> None:
    family = 0x11 if source.version == 4 else 0x21
    body = source.packed + source.packed + struct.pack("!HH", port, 25) + tlvs
    header = v2(0x1, family, body)
    read, rest = read_header(header + after)
    assert (read, rest) == (header, after)
    assert listener.parse(read) == listener.ProxyHeader((str(source), port), len(header))


def test_v2_local_and_unspec_keep_the_peer() -> None:
    assert listener.parse(v2(0x0, 0x11, b"\x00" * 12)).source is None  # LOCAL: the proxy's health check
    assert listener.parse(v2(0x1, 0x00, b"")).source is None


@pytest.mark.parametrize(
    "header",
    [
        v2(0x1, 0x11, b"\x00" * 11),  # IPv4 addresses cut short
        v2(0x1, 0x31, b"\x00" * 216),  # AF_UNIX: not a TCP client
        v2(0x2, 0x11, b"\x00" * 12),  # an unknown command
        SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12,  # version 1 in a v2 header
        SIGNATURE + b"\x21\x11\xff\xff",  # longer than the bound
    ],
)
def test_malformed_v2_headers(header: bytes) -> None:
    read, _ = read_header(header)
    assert len(read) <= listener.V2_MAX
    with pytest.raises(listener.ProxyHeaderError):
        listener.parse(read)


@given(st.binary(max_size=2000))
def test_random_bytes_raise_only_the_parser_error(data: bytes) -> None:
    read, _ = read_header(data)
    assert len(read) <= listener.V2_MAX
    try:
        header = listener.parse(read)
    except listener.ProxyHeaderError:
        return
    assert header.length == len(read)  # never a byte read past the header


@given(st.sampled_from([b"PROXY ", SIGNATURE]), st.binary(max_size=300))
def test_random_bytes_after_a_signature_raise_only_the_parser_error(signature: bytes, data: bytes) -> None:
    read, _ = read_header(signature + data)
    try:
        header = listener.parse(read)
    except listener.ProxyHeaderError:
        return
    assert header.length == len(read)


# -- the gate --------------------------------------------------------------------------------------------


def test_gate_counts_per_client_and_in_total() -> None:
    metrics = NodeMetrics()
    gate = listener.ConnectionGate(listener="smtp", total=3, per_client=2, metrics=metrics)
    assert gate.admit("192.0.2.1") is None
    assert gate.admit("192.0.2.1") is None
    assert gate.admit("192.0.2.1") == listener.PER_CLIENT
    assert gate.admit("::ffff:192.0.2.1") == listener.PER_CLIENT  # the same client, IPv4-mapped
    assert gate.admit("192.0.2.2") is None
    assert gate.admit("192.0.2.3") == listener.TOTAL
    gate.release("192.0.2.1")
    assert gate.admit("192.0.2.1") is None
    sample = metrics.registry.get_sample_value
    assert sample("mailnode_connections_refused_total", {"listener": "smtp", "reason": "per_client"}) == 2
    assert sample("mailnode_connections_refused_total", {"listener": "smtp", "reason": "total"}) == 1
    assert sample("mailnode_connections_open", {"listener": "smtp"}) == 3


def test_ipv6_clients_count_by_64() -> None:
    gate = listener.ConnectionGate(listener="imap", total=10, per_client=1, metrics=NodeMetrics())
    assert gate.admit("2001:db8:1:2::1") is None
    assert gate.admit("2001:db8:1:2:ffff::9") == listener.PER_CLIENT
    assert gate.admit("2001:db8:1:3::1") is None


def test_client_release_is_given_back_once() -> None:
    released = []
    client = listener.Client("192.0.2.1", 1, release=lambda: released.append(1))
    client.closed()
    client.closed()
    assert released == [1]


def test_proxy_policy_trusts_only_its_ranges() -> None:
    policy = listener.ProxyPolicy(trusted=[ipaddress.ip_network("10.0.0.0/8")], timeout=1)
    assert policy.trusts("10.1.2.3") and policy.trusts("::ffff:10.1.2.3")
    assert not policy.trusts("192.0.2.1") and not policy.trusts("unknown")


def test_listener_totals_fit_the_file_descriptor_limit() -> None:
    totals = {"smtp": 1000, "imap": 1000}
    assert listener.fit_totals(totals, fd_limit=20000) == totals
    fitted = listener.fit_totals(totals, fd_limit=1024)
    assert sum(fitted.values()) <= 1024 - listener.FD_RESERVE
    assert fitted == {"smtp": 256, "imap": 256}
