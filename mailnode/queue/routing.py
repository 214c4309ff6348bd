"""Routing: where the queue delivers mail for a domain, in the order to try (RFC 5321 §5.1).

The delivery loop calls `route` once per destination domain and tries each `Destination` in turn.
DNS comes through a `Resolver`: `DNSPythonResolver` for real runs, `StaticResolver` for tests and
local setups. A configured `RelayHost` (a smarthost) replaces DNS routing altogether.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from mailwire import config as wire_config

# How a destination's connection is secured: "opportunistic" for MX delivery (STARTTLS when offered,
# certificate not checked, RFC 7435); "mta-sts" for the MX hosts of a domain whose MTA-STS policy is
# enforce (STARTTLS required, certificate verified for the MX host name: RFC 8461 §4.2); a relay host's
# smtp.relay_host.tls otherwise.
TLSPolicy = Literal["opportunistic", "mta-sts"] | wire_config.RelayTLS


class ResolverError(Exception):
    """A DNS lookup gave no records."""


class NXDomain(ResolverError):
    """The name does not exist (RCODE NXDOMAIN, or a name that cannot exist)."""


class NoAnswer(ResolverError):
    """The name exists but has no records of the type asked for."""


class Timeout(ResolverError):
    """No usable answer: the servers timed out or failed (SERVFAIL, REFUSED). Worth trying later."""


class Resolver(Protocol):
    async def resolve(self, name: str, rdtype: str) -> list[str]:
        """The records of type `rdtype` ("MX", "A", "AAAA") for `name`: MX as "preference host"
        ("10 mx.example.com."), A and AAAA as addresses. Raises NXDomain, NoAnswer or Timeout."""
        ...


class RoutingError(Exception):
    """No destination for the domain; `status` is the RFC 3463 code for the recipients' DSN."""

    def __init__(self, message: str, *, status: str) -> None:
        super().__init__(message)
        self.status = status


class PermanentRoutingError(RoutingError):
    """The domain cannot receive mail: bounce now."""

    def __init__(self, message: str, *, status: str = "5.1.2") -> None:  # RFC 3463: bad destination system
        super().__init__(message, status=status)


class TemporaryRoutingError(RoutingError):
    """DNS did not answer well enough to decide: keep the mail and try later."""

    def __init__(self, message: str, *, status: str = "4.4.3") -> None:  # RFC 3463: directory server failure
        super().__init__(message, status=status)


@dataclasses.dataclass(frozen=True)
class RelayHost:
    """A smarthost that takes all outbound mail (e.g. a provider's submission port)."""

    host: str
    port: int = 587
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    # Never opportunistic: a downgrade to plaintext would give the credentials away. The config refuses
    # "none" unless allow_plaintext says so.
    tls: wire_config.RelayTLS = "starttls"
    ca_file: Path | None = None  # verify against this PEM bundle instead of the system CAs

    def __post_init__(self) -> None:
        if (self.username is None) != (self.password is None):
            raise ValueError("a relay host needs both a username and a password, or neither")


@dataclasses.dataclass(frozen=True)
class Destination:
    """One server to try. `addresses` are where to connect, in order: the addresses DNS gave for
    `host`, or for a relay host its configured name itself (the system resolver looks that up, so
    /etc/hosts applies). `host` is the name to verify the server's certificate against."""

    host: str
    addresses: list[str]
    port: int = 25
    preference: int | None = None  # the MX preference; None for a relay or an implicit MX
    tls: TLSPolicy = "opportunistic"
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)


async def route(
    domain: str, *, resolver: Resolver, relay_host: RelayHost | None = None, rng: random.Random | None = None
) -> list[Destination]:
    """The servers to try for mail to `domain`, best first.

    MX records by preference, equal preferences in random order (RFC 5321 §5.1; pass `rng` for a
    fixed order); each host's A then AAAA addresses; hosts without addresses are left out. No MX: the
    domain itself (implicit MX). An address literal (`[192.0.2.1]`, `[IPv6:2001:db8::1]`, RFC 5321
    §4.1.3) is delivered to directly. Raises PermanentRoutingError for a domain that does not exist,
    has a null MX (RFC 7505) or whose hosts have no addresses, TemporaryRoutingError when DNS failed.
    """
    if relay_host is not None:
        return [
            Destination(
                host=relay_host.host,
                addresses=[relay_host.host],
                port=relay_host.port,
                tls=relay_host.tls,
                username=relay_host.username,
                password=relay_host.password,
            )
        ]
    domain = domain.strip().rstrip(".").lower()
    if domain.startswith("[") and domain.endswith("]"):
        return [Destination(host=domain, addresses=[_address_literal(domain)])]
    if not domain:
        raise PermanentRoutingError("empty domain", status="5.1.2")

    try:
        records = await resolver.resolve(domain, "MX")
    except NXDomain:
        raise PermanentRoutingError(f"domain {domain} does not exist (NXDOMAIN)") from None
    except Timeout as error:
        raise TemporaryRoutingError(f"MX lookup for {domain} failed: {error}") from None
    except NoAnswer:
        records = []

    if not records:
        hosts: list[tuple[int | None, str]] = [(None, domain)]  # RFC 5321 §5.1: the implicit MX
    else:
        mxs = [_parse_mx(record) for record in records]
        if len(mxs) == 1 and mxs[0] is not None and mxs[0][1] == "":
            # RFC 7505 §3 and §4.2: "0 ." says the domain takes no mail; 5.1.10 is its status code
            raise PermanentRoutingError("domain does not accept mail (null MX)", status="5.1.10")
        usable = [mx for mx in mxs if mx is not None and mx[1]]  # a "." among other MXs leads nowhere
        if not usable:
            raise TemporaryRoutingError(f"no usable MX record for {domain}: {records!r}")
        hosts = list(_by_preference(usable, rng or random.Random()))

    destinations: list[Destination] = []
    failed_temporarily = False
    seen: set[str] = set()
    for preference, host in hosts:
        if host in seen:
            continue
        seen.add(host)
        addresses, timed_out = await _addresses(host, resolver)
        failed_temporarily |= timed_out
        if addresses:
            destinations.append(Destination(host=host, addresses=addresses, preference=preference))
    if destinations:
        return destinations
    if failed_temporarily:
        raise TemporaryRoutingError(f"address lookup for the mail servers of {domain} failed")
    if not records:
        raise PermanentRoutingError(f"domain {domain} has no MX and no address records")
    names = ", ".join(host for _, host in hosts)
    # RFC 3463: 5.4.4 unable to route
    raise PermanentRoutingError(f"the mail servers of {domain} have no addresses: {names}", status="5.4.4")


def _parse_mx(record: str) -> tuple[int, str] | None:
    """("10 mx.example.com." ->) (10, "mx.example.com"); the null MX "0 ." gives an empty host."""
    fields = record.split()
    if len(fields) != 2 or not fields[0].isdigit():
        return None
    return int(fields[0]), fields[1].rstrip(".").lower()


def _by_preference(mxs: list[tuple[int, str]], rng: random.Random) -> list[tuple[int | None, str]]:
    shuffled = list(mxs)
    rng.shuffle(shuffled)  # RFC 5321 §5.1: spread load over equal preferences
    return [(preference, host) for preference, host in sorted(shuffled, key=lambda mx: mx[0])]  # sort is stable


async def _addresses(host: str, resolver: Resolver) -> tuple[list[str], bool]:
    """`host`'s A then AAAA addresses, and whether a lookup timed out."""
    addresses: list[str] = []
    timed_out = False
    for rdtype in ("A", "AAAA"):
        try:
            addresses += await resolver.resolve(host, rdtype)
        except Timeout:
            timed_out = True
        except (NXDomain, NoAnswer):
            pass
    return addresses, timed_out


def _address_literal(domain: str) -> str:
    literal = domain[1:-1]
    if literal.lower().startswith("ipv6:"):
        literal = literal[5:]
    try:
        return str(ipaddress.ip_address(literal))
    except ValueError:
        raise PermanentRoutingError(f"bad address literal {domain}", status="5.1.2") from None


class DNSPythonResolver:
    """A Resolver on dnspython's asyncio resolver: the system's nameservers (/etc/resolv.conf) unless
    `nameservers` are given; `lifetime` bounds each lookup, retries included."""

    def __init__(self, nameservers: Sequence[str] | None = None, *, lifetime: float = 10.0) -> None:
        self._resolver = dns.asyncresolver.Resolver(configure=nameservers is None)
        if nameservers is not None:
            self._resolver.nameservers = list(nameservers)
        self._resolver.lifetime = lifetime

    async def resolve(self, name: str, rdtype: str) -> list[str]:
        try:
            qname = dns.name.from_text(name)  # absolute: no search domains
            answer = await self._resolver.resolve(qname, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            raise NXDomain(name) from None
        except dns.resolver.NoAnswer:
            raise NoAnswer(f"{name} {rdtype}") from None
        except (dns.exception.SyntaxError, dns.name.NameTooLong):
            raise NXDomain(f"{name} is not a valid domain name") from None
        except dns.exception.DNSException as error:  # timeouts, SERVFAIL/REFUSED (NoNameservers), the rest
            raise Timeout(f"{name} {rdtype}: {error}") from None
        if rdtype == "MX":
            return [f"{record.preference} {record.exchange.to_text()}" for record in answer]
        return [record.to_text() for record in answer]


class StaticResolver:
    """A Resolver from a table: `{("example.com", "MX"): ["10 mx.example.com"], ("mx.example.com",
    "A"): ["192.0.2.25"]}`. A name with no entry at all is NXDOMAIN; a known name without the type
    asked for has no answer."""

    def __init__(self, records: dict[tuple[str, str], list[str]]) -> None:
        self._records = {(_key(name), rdtype.upper()): list(values) for (name, rdtype), values in records.items()}
        self._names = {name for name, _ in self._records}

    async def resolve(self, name: str, rdtype: str) -> list[str]:
        key = (_key(name), rdtype.upper())
        if key[0] not in self._names:
            raise NXDomain(name)
        values = self._records.get(key)
        if not values:
            raise NoAnswer(f"{name} {rdtype}")
        return list(values)


def _key(name: str) -> str:
    return name.strip().rstrip(".").lower()
