"""What every client listener does before its protocol speaks: the connection gate (a total limit per
listener and a limit per client address), the PROXY protocol header (v1 and v2) from trusted load
balancers, TLS for implicit-TLS listeners behind one, and the client address the node uses from then on.

mailnode.smtp.server and mailnode.imap.server start their listeners with `serve`; their protocols get a
`Client`, whose address is the one used for throttling, SPF, logs and the Received header, and call
`Client.closed()` when the connection is gone. mailnode.node sizes the limits to the file descriptors
the process may hold (`raise_fd_limit`, `fit_totals`).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import ipaddress
import logging
import resource
import ssl
import struct
from collections.abc import Callable, Sequence

from mailnode.metrics import NodeMetrics

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Refusal reasons: the `reason` label of mailnode_connections_refused_total.
PER_CLIENT = "per_client"
TOTAL = "total"
UNTRUSTED_PROXY = "untrusted_proxy"
PROXY_HEADER = "proxy_header"
REASONS = (PER_CLIENT, TOTAL, UNTRUSTED_PROXY, PROXY_HEADER)


# -- the connection gate -------------------------------------------------------------------------------


def client_key(host: str) -> str:
    """The group a client address counts in: the address itself for IPv4, its /64 for IPv6 (one
    subscriber usually holds a whole /64, as Postfix's smtpd_client_ipv6_prefix_length says)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class ConnectionGate:
    """Open connections of one listener: at most `total`, and at most `per_client` from one client
    address group (`client_key`). Refusals are counted by reason; the open ones in a gauge."""

    def __init__(self, *, listener: str, total: int, per_client: int, metrics: NodeMetrics) -> None:
        self.listener = listener
        self.total = total
        self.per_client = per_client
        self._open: collections.Counter[str] = collections.Counter()
        self._count = 0
        self._refused = metrics.connections_refused
        self._gauge = metrics.connections_open.labels(listener)
        for reason in REASONS:
            self._refused.labels(listener, reason)

    @property
    def open(self) -> int:
        return self._count

    def admit(self, host: str) -> str | None:
        """Count a new connection from `host` and return None, or return why it is refused."""
        key = client_key(host)
        if self._count >= self.total:
            reason = TOTAL
        elif self._open[key] >= self.per_client:
            reason = PER_CLIENT
        else:
            self._open[key] += 1
            self._count += 1
            self._gauge.inc()
            return None
        self.refused(reason)
        return reason

    def refused(self, reason: str) -> None:
        self._refused.labels(self.listener, reason).inc()

    def release(self, host: str) -> None:
        key = client_key(host)
        self._open[key] -= 1
        if self._open[key] <= 0:
            del self._open[key]
        self._count -= 1
        self._gauge.dec()


# -- the client ----------------------------------------------------------------------------------------


class Client:
    """The client of one admitted connection, as the node sees it: the address a PROXY header carried,
    else the socket's peer. `closed()` gives its place at the gate back (once)."""

    def __init__(self, host: str, port: int, *, release: Callable[[], None] = lambda: None) -> None:
        self.host = host
        self.port = port
        self._release: Callable[[], None] | None = release

    @property
    def peername(self) -> tuple[str, int]:
        return (self.host, self.port)

    def closed(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()

    @classmethod
    def of_transport(cls, transport: asyncio.BaseTransport) -> Client:
        """The socket's peer (a connection made without `serve`, as in unit tests)."""
        peer = transport.get_extra_info("peername")
        if not peer:
            return cls("unknown", 0)
        return cls(str(peer[0]), int(peer[1]))


# -- the PROXY protocol (haproxy's doc/proxy-protocol.txt) -------------------------------------------------


class ProxyHeaderError(ValueError):
    """Not a valid PROXY protocol header."""


@dataclasses.dataclass(frozen=True)
class ProxyHeader:
    """A parsed header: `source` is the client's (address, port), or None when the header says LOCAL
    (v2: the proxy's own health check) or UNKNOWN (v1): then the connection's own peer stands."""

    source: tuple[str, int] | None
    length: int  # bytes the header took


V1_PREFIX = b"PROXY "
V1_MAX = 107  # §2.1: "a receiver may reject ... a line longer than 107 characters" (CRLF included)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"  # §2.2: the 12-byte signature
V2_MAX = 16 + 1024  # fixed part plus addresses and TLVs (AWS NLB's and GCP's fit): a small bound of ours
MIN_READ = 15  # the shortest header ("PROXY UNKNOWN\r\n"): read before deciding which version it is


def needed(data: bytes) -> int:
    """How many more bytes to read so as not to read past the header (a v1 header's end is unknown
    until its CRLF: one byte at a time there). 0 once `data` holds a whole header, or a broken one:
    `parse` then says why."""
    if len(data) < MIN_READ:
        return MIN_READ - len(data)
    if data.startswith(V2_SIGNATURE):
        if len(data) < 16:
            return 16 - len(data)
        total = 16 + struct.unpack("!H", data[14:16])[0]
        return 0 if total > V2_MAX else max(0, total - len(data))
    if not data.startswith(V1_PREFIX) or b"\r\n" in data or len(data) >= V1_MAX:
        return 0
    return 1


def parse(data: bytes) -> ProxyHeader:
    """The header at the start of `data`, which holds at least the whole header (`needed` is 0).
    Raises ProxyHeaderError for anything else; nothing else is ever raised."""
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if data.startswith(V1_PREFIX):
        return _parse_v1(data)
    raise ProxyHeaderError("no PROXY protocol signature")


def _parse_v1(data: bytes) -> ProxyHeader:
    # §2.1: "PROXY" SP proto SP src SP dst SP sport SP dport CRLF, or "PROXY UNKNOWN" [anything] CRLF
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        raise ProxyHeaderError("v1 header without CRLF within 107 bytes")
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("v1 header is not ASCII") from None
    fields = line.split(" ")
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return ProxyHeader(None, end + 2)
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"malformed v1 header: {line[:V1_MAX]!r}")
    _, family, source, destination, source_port, destination_port = fields
    version = 4 if family == "TCP4" else 6
    for text in (source, destination):
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise ProxyHeaderError(f"v1 header: bad address {text!r}") from None
        if address.version != version:
            raise ProxyHeaderError(f"v1 header: {text!r} is not {family}")
    for text in (source_port, destination_port):
        # §2.1: ports in decimal without leading zeroes, 0..65535
        if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
            raise ProxyHeaderError(f"v1 header: bad port {text!r}")
    return ProxyHeader((source, int(source_port)), end + 2)


def _parse_v2(data: bytes) -> ProxyHeader:
    if len(data) < 16:
        raise ProxyHeaderError("v2 header shorter than 16 bytes")
    version_command, family, length = struct.unpack("!BBH", data[12:16])
    total = 16 + length
    if total > V2_MAX:
        raise ProxyHeaderError(f"v2 header of {total} bytes (at most {V2_MAX})")
    if len(data) < total:
        raise ProxyHeaderError("v2 header cut short")
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"v2 header: version {version_command >> 4}")
    command = version_command & 0x0F
    if command == 0x0:  # LOCAL: the proxy speaking for itself; the addresses are to be ignored
        return ProxyHeader(None, total)
    if command != 0x1:
        raise ProxyHeaderError(f"v2 header: command {command}")
    body = data[16:total]
    if family == 0x11:  # TCP over IPv4: 4 + 4 + 2 + 2 bytes
        if length < 12:
            raise ProxyHeaderError("v2 header: IPv4 addresses cut short")
        source = str(ipaddress.IPv4Address(body[0:4]))
        (port,) = struct.unpack("!H", body[8:10])
        return ProxyHeader((source, port), total)
    if family == 0x21:  # TCP over IPv6: 16 + 16 + 2 + 2 bytes
        if length < 36:
            raise ProxyHeaderError("v2 header: IPv6 addresses cut short")
        source = str(ipaddress.IPv6Address(body[0:16]))
        (port,) = struct.unpack("!H", body[32:34])
        return ProxyHeader((source, port), total)
    if family == 0x00:  # UNSPEC: the receiver uses the connection's own addresses
        return ProxyHeader(None, total)
    raise ProxyHeaderError(f"v2 header: address family 0x{family:02x} is not TCP")


@dataclasses.dataclass(frozen=True)
class ProxyPolicy:
    """PROXY protocol on a listener: only connections from `trusted` may (and must) send a header."""

    trusted: Sequence[IPNetwork]
    timeout: float

    def trusts(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted)


# -- one connection, from accept to its protocol ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Door:
    """What `serve` needs of a listener. `protocol(client)` makes the protocol the connection is handed
    to; `refusal(reason)` is the line (CRLF included) a refused client reads before the node hangs up."""

    gate: ConnectionGate
    protocol: Callable[[Client], asyncio.BaseProtocol]
    refusal: Callable[[str], bytes]
    proxy: ProxyPolicy | None
    tls: ssl.SSLContext | None  # implicit TLS


class _Doorman(asyncio.BufferedProtocol):
    """A connection until its protocol takes over: PROXY header (read exactly, never a byte past it:
    what follows may be a TLS ClientHello), TLS, the gate, then `transport.set_protocol`."""

    def __init__(self, door: Door) -> None:
        self._door = door
        self._transport: asyncio.Transport | None = None
        self._header = bytearray()
        self._buffer = bytearray(V1_MAX)
        self._timer: asyncio.TimerHandle | None = None
        self._upgrade: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        client = Client.of_transport(transport)
        proxy = self._door.proxy
        if proxy is None:
            self._admit(client)
        elif not proxy.trusts(client.host):
            # As HAProxy's accept-proxy: a PROXY listener takes nothing from elsewhere.
            self._door.gate.refused(UNTRUSTED_PROXY)
            log.info("connection from an untrusted proxy", extra={"fields": self._fields(client)})
            transport.close()
        else:
            self._timer = asyncio.get_running_loop().call_later(proxy.timeout, self._header_timeout, client)

    def _fields(self, client: Client) -> dict[str, object]:
        return {"listener": self._door.gate.listener, "client": client.host}

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buffer)[: max(1, needed(bytes(self._header)))]

    def buffer_updated(self, nbytes: int) -> None:
        assert self._transport is not None
        self._header += self._buffer[:nbytes]
        if needed(bytes(self._header)):
            return
        peer = Client.of_transport(self._transport)
        try:
            header = parse(bytes(self._header))
        except ProxyHeaderError as error:
            self._cancel_timer()
            self._door.gate.refused(PROXY_HEADER)
            log.info("bad PROXY protocol header", extra={"fields": {**self._fields(peer), "error": str(error)}})
            self._transport.close()
            return
        self._cancel_timer()
        client = peer if header.source is None else Client(*header.source)
        if self._door.tls is None:
            self._admit(client)
        else:
            self._transport.pause_reading()
            self._upgrade = asyncio.get_running_loop().create_task(self._start_tls(client))

    def _header_timeout(self, client: Client) -> None:
        self._timer = None
        self._door.gate.refused(PROXY_HEADER)
        log.info("no PROXY protocol header in time", extra={"fields": self._fields(client)})
        if self._transport is not None:
            self._transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _start_tls(self, client: Client) -> None:
        """Implicit TLS after the PROXY header (RFC 8314 §3.3 for submissions, RFC 8314 §3.2 for imaps)."""
        assert self._transport is not None and self._door.tls is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(self._transport, self, self._door.tls, server_side=True)
        except (OSError, TimeoutError) as error:
            log.info("TLS handshake failed", extra={"fields": {**self._fields(client), "error": str(error)}})
            self._transport.close()
            return
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._admit(client)

    def _admit(self, client: Client) -> None:
        transport = self._transport
        assert transport is not None
        gate = self._door.gate
        reason = gate.admit(client.host)
        if reason is not None:
            log.info("connection refused", extra={"fields": {**self._fields(client), "reason": reason}})
            transport.write(self._door.refusal(reason))
            transport.close()
            return
        host = client.host
        admitted = Client(client.host, client.port, release=lambda: gate.release(host))
        protocol = self._door.protocol(admitted)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        # Only before the hand-over: afterwards the connection's protocol hears of it.
        self._cancel_timer()
        if self._upgrade is not None and not self._upgrade.done():
            self._upgrade.cancel()


async def serve(door: Door, *, host: str, port: int) -> asyncio.Server:
    """Listen; every connection passes the door before its protocol. Without PROXY protocol an
    implicit-TLS listener does its handshake in the server (as before); with it, after the header."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: _Doorman(door),
        host=host,
        port=port,
        ssl=door.tls if door.proxy is None else None,
        reuse_address=True,
        backlog=512,
    )


# -- the file-descriptor budget ----------------------------------------------------------------------------

FD_RESERVE = 512  # the store's files, SQLite, outbound connections, HTTP, DNS: what is not a client


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as systemd and nginx's worker_rlimit_nofile do:
    the kernel default soft limit of 1024 is far below what a mail server holds). Returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:
            log.warning("could not raise the file descriptor limit", extra={"fields": {"error": str(error)}})
    return soft


def fit_totals(totals: dict[str, int], *, fd_limit: int, reserve: int = FD_RESERVE) -> dict[str, int]:
    """The listeners' totals, scaled down (in proportion) when together with `reserve` they exceed
    `fd_limit`: the node must keep descriptors for its health checks and its store."""
    wanted = sum(totals.values())
    room = max(len(totals), fd_limit - reserve)
    if wanted <= room:
        return dict(totals)
    return {name: max(1, total * room // wanted) for name, total in totals.items()}
