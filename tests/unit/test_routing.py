"""Routing against a table of DNS records: MX preference order (equal preferences shuffled, fixed by
a seeded rng), A then AAAA addresses, the implicit MX, the null MX, NXDOMAIN as permanent and DNS
failures as temporary, address literals, the relay host override, and the resolvers themselves."""

from __future__ import annotations

import random

import dns.asyncresolver
import pytest

from mailnode.queue import routing

RECORDS = {
    ("example.net", "MX"): ["20 mx2.example.net.", "10 mx1.example.net.", "30 backup.example.org."],
    ("mx1.example.net", "A"): ["192.0.2.1"],
    ("mx1.example.net", "AAAA"): ["2001:db8::1"],
    ("mx2.example.net", "AAAA"): ["2001:db8::2"],  # IPv6 only
    ("backup.example.org", "A"): ["198.51.100.7", "198.51.100.8"],
    ("implicit.test", "A"): ["203.0.113.5"],
    ("implicit.test", "AAAA"): ["2001:db8::5"],
    ("nomail.test", "MX"): ["0 ."],
    ("nomail.test", "A"): ["203.0.113.9"],
    ("txtonly.test", "TXT"): ["v=spf1 -all"],
    ("dangling.test", "MX"): ["10 gone.dangling.test"],
}


@pytest.fixture
def resolver() -> routing.StaticResolver:
    return routing.StaticResolver(RECORDS)


class FailingResolver:
    """StaticResolver, except that the lookups named in `timeouts` time out."""

    def __init__(self, records: dict[tuple[str, str], list[str]], timeouts: set[tuple[str, str]]) -> None:
        self._static = routing.StaticResolver(records)
        self._timeouts = timeouts

    async def resolve(self, name: str, rdtype: str) -> list[str]:
        if (name, rdtype) in self._timeouts:
            raise routing.Timeout(f"{name} {rdtype}: timed out")
        return await self._static.resolve(name, rdtype)


async def test_mx_hosts_in_preference_order_with_a_then_aaaa(resolver: routing.StaticResolver) -> None:
    destinations = await routing.route("example.net", resolver=resolver)
    assert [(d.host, d.preference, d.addresses, d.port) for d in destinations] == [
        ("mx1.example.net", 10, ["192.0.2.1", "2001:db8::1"], 25),
        ("mx2.example.net", 20, ["2001:db8::2"], 25),
        ("backup.example.org", 30, ["198.51.100.7", "198.51.100.8"], 25),
    ]
    assert all(d.tls == "opportunistic" and d.username is None for d in destinations)


async def test_domain_is_case_and_trailing_dot_insensitive(resolver: routing.StaticResolver) -> None:
    destinations = await routing.route("Example.NET.", resolver=resolver)
    assert destinations[0].host == "mx1.example.net"


async def test_equal_preferences_are_shuffled_reproducibly_with_an_rng() -> None:
    hosts = [f"mx{i}.equal.test" for i in range(6)]
    records = {("equal.test", "MX"): [f"10 {host}" for host in hosts] + ["5 first.equal.test"]}
    records |= {(host, "A"): [f"192.0.2.{i}"] for i, host in enumerate([*hosts, "first.equal.test"])}
    resolver = routing.StaticResolver(records)

    async def order(seed: int) -> list[str]:
        return [d.host for d in await routing.route("equal.test", resolver=resolver, rng=random.Random(seed))]

    orders = [await order(seed) for seed in range(10)]
    assert all(o[0] == "first.equal.test" and sorted(o[1:]) == hosts for o in orders)
    assert orders[3] == await order(3)
    assert len({tuple(o) for o in orders}) > 1  # the rng does decide


async def test_no_mx_means_the_domain_itself(resolver: routing.StaticResolver) -> None:
    destinations = await routing.route("implicit.test", resolver=resolver)
    assert [(d.host, d.preference, d.addresses) for d in destinations] == [
        ("implicit.test", None, ["203.0.113.5", "2001:db8::5"])
    ]


async def test_no_mx_and_no_address_is_permanent(resolver: routing.StaticResolver) -> None:
    with pytest.raises(routing.PermanentRoutingError) as raised:
        await routing.route("txtonly.test", resolver=resolver)
    assert raised.value.status.startswith("5.")


async def test_null_mx_is_permanent(resolver: routing.StaticResolver) -> None:
    with pytest.raises(routing.PermanentRoutingError, match=r"domain does not accept mail \(null MX\)") as raised:
        await routing.route("nomail.test", resolver=resolver)
    assert raised.value.status == "5.1.10"  # RFC 7505 §4.2


async def test_dot_among_other_mx_records_is_skipped() -> None:
    resolver = routing.StaticResolver(
        {("odd.test", "MX"): ["0 .", "10 mx.odd.test"], ("mx.odd.test", "A"): ["192.0.2.3"]}
    )
    destinations = await routing.route("odd.test", resolver=resolver)
    assert [d.host for d in destinations] == ["mx.odd.test"]


async def test_nxdomain_is_permanent(resolver: routing.StaticResolver) -> None:
    with pytest.raises(routing.PermanentRoutingError, match="does not exist") as raised:
        await routing.route("no-such-domain.test", resolver=resolver)
    assert raised.value.status == "5.1.2"


async def test_mx_hosts_without_addresses_are_permanent(resolver: routing.StaticResolver) -> None:
    with pytest.raises(routing.PermanentRoutingError, match=r"gone\.dangling\.test") as raised:
        await routing.route("dangling.test", resolver=resolver)
    assert raised.value.status == "5.4.4"


async def test_mx_timeout_is_temporary() -> None:
    resolver = FailingResolver(RECORDS, {("example.net", "MX")})
    with pytest.raises(routing.TemporaryRoutingError) as raised:
        await routing.route("example.net", resolver=resolver)
    assert raised.value.status.startswith("4.")


async def test_address_timeouts_skip_the_host_or_are_temporary() -> None:
    one_down = FailingResolver(RECORDS, {("mx1.example.net", "A"), ("mx1.example.net", "AAAA")})
    assert [d.host for d in await routing.route("example.net", resolver=one_down)] == [
        "mx2.example.net",
        "backup.example.org",
    ]
    half = FailingResolver(RECORDS, {("mx1.example.net", "AAAA")})
    assert (await routing.route("example.net", resolver=half))[0].addresses == ["192.0.2.1"]
    all_down = FailingResolver(RECORDS, {("implicit.test", "A"), ("implicit.test", "AAAA")})
    with pytest.raises(routing.TemporaryRoutingError):
        await routing.route("implicit.test", resolver=all_down)


async def test_relay_host_overrides_dns() -> None:
    relay = routing.RelayHost("smtp.provider.test", username="user", password="hunter2")
    nothing = routing.StaticResolver({})  # any lookup would be NXDOMAIN
    [destination] = await routing.route("example.net", resolver=nothing, relay_host=relay)
    assert destination.host == "smtp.provider.test"
    assert destination.addresses == ["smtp.provider.test"]
    assert destination.port == 587
    assert destination.tls == "starttls"  # required and verified unless configured otherwise
    assert (destination.username, destination.password) == ("user", "hunter2")
    assert "hunter2" not in repr(destination) and "hunter2" not in repr(relay)


def test_relay_host_needs_both_credentials_or_neither() -> None:
    assert routing.RelayHost("smarthost.test", 25, tls="starttls-unverified").username is None
    with pytest.raises(ValueError):
        routing.RelayHost("smarthost.test", username="user")


@pytest.mark.parametrize(
    ("domain", "address"),
    [("[192.0.2.44]", "192.0.2.44"), ("[IPv6:2001:DB8::44]", "2001:db8::44")],
)
async def test_address_literal_is_delivered_to_directly(domain: str, address: str) -> None:
    [destination] = await routing.route(domain, resolver=routing.StaticResolver({}))
    assert destination.addresses == [address] and destination.port == 25


async def test_bad_address_literal_is_permanent() -> None:
    with pytest.raises(routing.PermanentRoutingError):
        await routing.route("[not-an-address]", resolver=routing.StaticResolver({}))


async def test_static_resolver_tells_nxdomain_from_no_answer(resolver: routing.StaticResolver) -> None:
    assert await resolver.resolve("MX1.example.net.", "a") == ["192.0.2.1"]
    with pytest.raises(routing.NoAnswer):
        await resolver.resolve("mx2.example.net", "A")
    with pytest.raises(routing.NXDomain):
        await resolver.resolve("unknown.test", "A")


def test_dns_python_resolver_is_a_resolver() -> None:
    configured = routing.DNSPythonResolver(["192.0.2.53"], lifetime=3.0)
    assert isinstance(configured._resolver, dns.asyncresolver.Resolver)
    assert configured._resolver.nameservers == ["192.0.2.53"]
    assert configured._resolver.lifetime == 3.0
    resolver: routing.Resolver = configured  # mypy checks the Protocol
    assert resolver is configured
