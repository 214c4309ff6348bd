"""MTA-STS for outbound mail (mailnode.queue.mtasts, Deliverer): the policy file and TXT record parsed
as RFC 8461 says; MX patterns; policies fetched over verified HTTPS from a local policy server (trustme
certificates), cached by max_age, kept when DNS or the fetch fails, fetched again when the id changes,
never through a redirect or from a host with the wrong certificate; and the Deliverer under an enforce
policy: delivers only over STARTTLS with a verified certificate of an MX the policy names, and defers
(never plaintext) when the MX offers no STARTTLS, shows another certificate or is not named; testing
changes nothing."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trustme
from aiohttp import web

from mailnode.queue import mtasts, routing
from mailnode.queue.delivery import Deliverer
from mailnode.queue.spool import Spool
from tests.unit.conftest import FakeClock
from tests.unit.test_delivery import MESSAGE, Local, Remote, start_remote

POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mx.secure.test\r\nmx: *.backup.test\r\nmax_age: 86400\r\n"

# -- parsing --------------------------------------------------------------------------------------------


def test_parse_a_policy() -> None:
    policy = mtasts.parse(POLICY, id="abc")
    assert policy == mtasts.Policy(mode="enforce", mx=("mx.secure.test", "*.backup.test"), max_age=86400, id="abc")
    assert mtasts.parse(POLICY.replace("\r\n", "\n") + "extension: ignored\n").mx == policy.mx
    assert mtasts.parse(POLICY.replace("86400", "9999999999")).max_age == mtasts.MAX_AGE_LIMIT
    assert mtasts.parse("version: STSv1\nmode: none\nmax_age: 60\n").mx == ()


@pytest.mark.parametrize(
    "text",
    [
        POLICY.replace("STSv1", "STSv2"),
        POLICY.replace("enforce", "strict"),
        POLICY.replace("max_age: 86400", "max_age: soon"),
        "version: STSv1\nmode: enforce\nmax_age: 60\n",  # no mx
        "<html>not a policy</html>",
    ],
)
def test_parse_refuses(text: str) -> None:
    with pytest.raises(mtasts.PolicyError):
        mtasts.parse(text)


def test_record_id() -> None:
    assert mtasts.record_id(['"v=STSv1; id=20260101T0000"']) == "20260101T0000"
    assert mtasts.record_id(['"v=STSv1; " "id=abc"']) == "abc"  # a record in several strings
    assert mtasts.record_id(["v=STSv1; id=abc"]) == "abc"
    assert mtasts.record_id(['"v=spf1 -all"', '"v=STSv1; id=abc"']) == "abc"
    assert mtasts.record_id(['"v=STSv1; id=a"', '"v=STSv1; id=b"']) is None  # §3.1: two records, no policy
    assert mtasts.record_id(['"v=STSv1; id=not-alphanumeric"']) is None
    assert mtasts.record_id([]) is None


def test_mx_patterns() -> None:
    policy = mtasts.parse(POLICY)
    assert mtasts.mx_matches(policy, "mx.secure.test") and mtasts.mx_matches(policy, "MX.Secure.Test.")
    assert mtasts.mx_matches(policy, "mx1.backup.test")
    assert not mtasts.mx_matches(policy, "a.mx1.backup.test")  # the wildcard is one label
    assert not mtasts.mx_matches(policy, "backup.test")
    assert not mtasts.mx_matches(policy, "mx.secure.test.evil.test")


# -- fetching and caching -------------------------------------------------------------------------------


class Records:
    """A Resolver whose records the test changes as it goes."""

    def __init__(self, records: dict[tuple[str, str], list[str]]) -> None:
        self.records = records

    async def resolve(self, name: str, rdtype: str) -> list[str]:
        return await routing.StaticResolver(self.records).resolve(name, rdtype)


class PolicyServer:
    def __init__(self) -> None:
        self.text = POLICY
        self.status = 200
        self.fetches = 0
        self.hosts: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        self.hosts.append(request.host)
        if self.status == 301:
            raise web.HTTPMovedPermanently(location="https://elsewhere.test/policy.txt")
        return web.Response(text=self.text, status=self.status, content_type="text/plain")


@pytest.fixture
def certificates(ca: trustme.CA) -> Callable[[str], ssl.SSLContext]:
    def server(*names: str) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*names).configure_cert(context)
        return context

    return server


@pytest.fixture
async def policy_server(certificates: Callable[..., ssl.SSLContext]) -> AsyncIterator[tuple[PolicyServer, int]]:
    handler = PolicyServer()
    app = web.Application()
    app.router.add_get("/.well-known/mta-sts.txt", handler.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=certificates("mta-sts.secure.test"))
    await site.start()
    port = runner.addresses[0][1]
    yield handler, port
    await runner.cleanup()


def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def txt(id: str) -> list[str]:
    return [f'"v=STSv1; id={id}"']


def policies(records: Records, port: int, ca: trustme.CA, clock: FakeClock) -> mtasts.Policies:
    return mtasts.Policies(
        resolver=records, tls=client_tls(ca), connect_to=lambda host: ("127.0.0.1", port), clock=clock, timeout=30
    )


async def test_fetched_once_then_cached_by_max_age(
    policy_server: tuple[PolicyServer, int], ca: trustme.CA, clock: FakeClock
) -> None:
    server, port = policy_server
    records = Records({("_mta-sts.secure.test", "TXT"): txt("one")})
    found = policies(records, port, ca, clock)
    policy = await found.get("secure.test")
    assert policy is not None and policy.mode == "enforce" and policy.id == "one"
    assert server.hosts == ["mta-sts.secure.test"]  # the Host of RFC 8461 §3.3, not the address
    clock.now += mtasts.RECHECK_TXT + 1
    assert await found.get("secure.test") == policy  # the same id: not fetched again
    assert server.fetches == 1
    # the TXT record gone (or blocked): the cached policy stays in force until max_age (§5.1)
    del records.records[("_mta-sts.secure.test", "TXT")]
    records.records[("secure.test", "MX")] = ["10 mx.secure.test."]
    clock.now += mtasts.RECHECK_TXT + 1
    assert await found.get("secure.test") == policy
    clock.now += 86400
    assert await found.get("secure.test") is None
    # a new id fetches the new policy
    records.records[("_mta-sts.secure.test", "TXT")] = txt("two")
    server.text = POLICY.replace("enforce", "testing")
    changed = await found.get("secure.test")
    assert changed is not None and (changed.mode, changed.id) == ("testing", "two")
    assert server.fetches == 2


async def test_a_failed_fetch_keeps_the_cached_policy(
    policy_server: tuple[PolicyServer, int], ca: trustme.CA, clock: FakeClock
) -> None:
    server, port = policy_server
    records = Records({("_mta-sts.secure.test", "TXT"): txt("one")})
    found = policies(records, port, ca, clock)
    first = await found.get("secure.test")
    records.records[("_mta-sts.secure.test", "TXT")] = txt("two")
    server.status = 500
    clock.now += mtasts.RECHECK_TXT + 1
    assert await found.get("secure.test") == first


@pytest.mark.parametrize("trouble", ["redirect", "not found", "not a policy", "wrong certificate"])
async def test_no_policy_from_a_bad_answer(
    trouble: str,
    policy_server: tuple[PolicyServer, int],
    ca: trustme.CA,
    clock: FakeClock,
) -> None:
    server, port = policy_server
    domain = "secure.test"
    if trouble == "redirect":
        server.status = 301  # §3.3: redirects are not followed
    elif trouble == "not found":
        server.status = 404
    elif trouble == "not a policy":
        server.text = "hello"
    else:
        domain = "other.test"  # the server's certificate names mta-sts.secure.test only
    records = Records({(f"_mta-sts.{domain}", "TXT"): txt("one")})
    assert await policies(records, port, ca, clock).get(domain) is None


async def test_no_record_no_fetch(policy_server: tuple[PolicyServer, int], ca: trustme.CA, clock: FakeClock) -> None:
    server, port = policy_server
    records = Records({("secure.test", "MX"): ["10 mx.secure.test."]})
    assert await policies(records, port, ca, clock).get("secure.test") is None
    assert server.fetches == 0


# -- delivery under a policy ----------------------------------------------------------------------------


class TLSRemote(Remote):
    """Remembers whether each message came over TLS."""

    def __init__(self) -> None:
        super().__init__()
        self.over_tls: list[bool] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.over_tls.append(session.ssl is not None)
        return await super().handle_DATA(server, session, envelope)


async def deliver_to_secure_test(
    spool: Spool,
    clock: FakeClock,
    ca: trustme.CA,
    policy_port: int,
    *,
    mx_tls: ssl.SSLContext | None,
    mx_host: str = "mx.secure.test",
) -> tuple[TLSRemote, int]:
    """One message to bob@secure.test, whose MX is `mx_host` (STARTTLS with `mx_tls`, or none)."""
    handler = TLSRemote()
    options: dict[str, Any] = {} if mx_tls is None else {"tls_context": mx_tls, "require_starttls": False}
    mx, port = await start_remote(handler, **options)
    records = Records(
        {
            ("secure.test", "MX"): [f"10 {mx_host}."],
            (mx_host, "A"): ["127.0.0.1"],
            ("_mta-sts.secure.test", "TXT"): txt("one"),
        }
    )
    try:
        await spool.enqueue("alice@local.test", ["bob@secure.test"], MESSAGE)
        await Deliverer(
            spool, hostname="node.local.test", resolver=records, deliver_locally=Local(), clock=clock, port=port,
            timeout=5, mta_sts=policies(records, policy_port, ca, clock), sts_tls=client_tls(ca),
        ).run_once()  # fmt: skip
    finally:
        mx.close()
        await mx.wait_closed()
    return handler, port


async def last_error(spool: Spool) -> str:
    (message,) = await spool.list()
    (recipient,) = message.pending
    return recipient.last_error


async def test_enforce_delivers_over_verified_starttls(
    spool: Spool, clock: FakeClock, ca: trustme.CA, policy_server: tuple[PolicyServer, int], certificates: Any
) -> None:
    handler, _ = await deliver_to_secure_test(spool, clock, ca, policy_server[1], mx_tls=certificates("mx.secure.test"))
    assert [r[1] for r in handler.received] == [["bob@secure.test"]]
    assert handler.over_tls == [True]
    assert await spool.list() == []


async def test_enforce_never_sends_in_clear(
    spool: Spool, clock: FakeClock, ca: trustme.CA, policy_server: tuple[PolicyServer, int]
) -> None:
    handler, _ = await deliver_to_secure_test(spool, clock, ca, policy_server[1], mx_tls=None)
    assert handler.received == []
    assert (await last_error(spool)).startswith("4.7.4 ")  # deferred, not bounced


async def test_enforce_refuses_a_certificate_for_another_name(
    spool: Spool, clock: FakeClock, ca: trustme.CA, policy_server: tuple[PolicyServer, int], certificates: Any
) -> None:
    handler, _ = await deliver_to_secure_test(
        spool, clock, ca, policy_server[1], mx_tls=certificates("mx.elsewhere.test")
    )
    assert handler.received == []
    assert (await last_error(spool)).startswith("4.7.5 ")


async def test_enforce_refuses_an_mx_the_policy_does_not_name(
    spool: Spool, clock: FakeClock, ca: trustme.CA, policy_server: tuple[PolicyServer, int], certificates: Any
) -> None:
    handler, _ = await deliver_to_secure_test(
        spool, clock, ca, policy_server[1], mx_tls=certificates("mx.hijacked.test"), mx_host="mx.hijacked.test"
    )
    assert handler.received == [] and handler.connections == 0
    assert (await last_error(spool)).startswith("4.7.0 MTA-STS policy of secure.test (enforce)")


async def test_testing_mode_delivers_as_before(
    spool: Spool, clock: FakeClock, ca: trustme.CA, policy_server: tuple[PolicyServer, int]
) -> None:
    policy_server[0].text = POLICY.replace("enforce", "testing")
    handler, _ = await deliver_to_secure_test(spool, clock, ca, policy_server[1], mx_tls=None)
    assert handler.over_tls == [False]
    assert await spool.list() == []
