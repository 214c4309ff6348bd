"""The delivery worker against real aiosmtpd servers on 127.0.0.1: a delivered message arrives byte for byte
and leaves the spool; several messages to one domain share one connection; a 550 recipient fails and its
sender gets a bounce with the original headers and the remote status; a 451 recipient is retried on the
spool's schedule (fake clock) and then delivered; a message past its lifetime bounces with 4.4.7; a null MX
domain fails at once; a failed bounce is never bounced; a relay host gets all mail over STARTTLS with AUTH;
a recipient recorded delivered is not sent again after a restart."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import AuthResult, LoginPassword

from mailnode.metrics import NodeMetrics
from mailnode.queue import delivery, handoff, routing
from mailnode.queue.delivery import Deliverer
from mailnode.queue.spool import Spool, next_delay
from tests.unit.conftest import FakeClock

MESSAGE = (
    b"From: alice@local.test\r\nTo: bob@remote.test\r\nSubject: hello\r\nMessage-ID: <m1@local.test>\r\n\r\n"
    b"Hi Bob,\r\n.a line that starts with a dot\r\n\r\nAlice\r\n"
)


class Remote:
    """An aiosmtpd handler recording what arrived; `rcpt_replies` maps an address to its RCPT reply."""

    def __init__(self) -> None:
        self.connections = 0
        self.rcpt_replies: dict[str, str] = {}
        self.data_reply = "250 2.0.0 OK"
        self.received: list[tuple[str, list[str], bytes]] = []
        self.mail_options: list[list[str]] = []

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        self.mail_options.append(list(options))
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        reply = self.rcpt_replies.get(address, "250 2.1.5 OK")
        if reply.startswith("250"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_reply.startswith("250"):
            self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return self.data_reply


async def start_remote(remote: Remote, **smtp_options: Any) -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()

    def factory() -> AioSMTP:
        remote.connections += 1
        return AioSMTP(remote, hostname="mx.remote.test", **smtp_options)

    server = await loop.create_server(factory, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


RESOLVER = routing.StaticResolver(
    {
        ("remote.test", "MX"): ["10 mx.remote.test."],
        ("mx.remote.test", "A"): ["127.0.0.1"],
        ("nomail.test", "MX"): ["0 ."],
    }
)


class Local:
    """deliver_locally: local.test is this node's domain."""

    def __init__(self) -> None:
        self.delivered: list[tuple[str, bytes]] = []

    async def __call__(self, address: str, data: bytes) -> bool:
        if not address.endswith("@local.test"):
            return False
        self.delivered.append((address, data))
        return True


@pytest.fixture
async def remote() -> AsyncIterator[tuple[Remote, int]]:
    handler = Remote()
    server, port = await start_remote(handler)
    yield handler, port
    server.close()
    await server.wait_closed()


@pytest.fixture
def local() -> Local:
    return Local()


def deliverer(spool: Spool, port: int, local: Local, clock: FakeClock, **options: Any) -> Deliverer:
    return Deliverer(
        spool,
        hostname="node.local.test",
        resolver=RESOLVER,
        deliver_locally=local,
        clock=clock,
        port=port,
        timeout=5,
        **options,
    )


async def test_delivered_message_arrives_exactly_and_leaves_the_spool(spool, remote, local, clock):
    handler, port = remote
    metrics = NodeMetrics()
    await spool.enqueue("alice@local.test", ["bob@remote.test", "carol@remote.test"], MESSAGE)

    attempted = await deliverer(spool, port, local, clock, metrics=metrics).run_once()

    assert attempted == 2
    assert handler.received == [("alice@local.test", ["bob@remote.test", "carol@remote.test"], MESSAGE)]
    assert handler.mail_options == [[f"SIZE={len(MESSAGE)}"]]
    assert await spool.list() == []
    assert local.delivered == []
    exposition = metrics.exposition().decode()
    assert 'mailnode_delivery_attempts_total{result="delivered"} 2.0' in exposition
    assert "mailnode_queue_messages 0.0" in exposition


async def test_several_messages_to_one_domain_share_one_connection(spool, remote, local, clock):
    handler, port = remote
    for n in range(3):
        await spool.enqueue("alice@local.test", [f"user{n}@remote.test"], MESSAGE)

    assert await deliverer(spool, port, local, clock).run_once() == 3

    assert handler.connections == 1
    assert [rcpts for _, rcpts, _ in handler.received] == [[f"user{n}@remote.test"] for n in range(3)]
    assert await spool.list() == []


async def test_rejected_recipient_fails_and_the_sender_gets_a_bounce(spool, remote, local, clock):
    handler, port = remote
    handler.rcpt_replies["nobody@remote.test"] = "550 5.1.1 <nobody@remote.test>: no such user"
    await spool.enqueue("alice@local.test", ["bob@remote.test", "nobody@remote.test"], MESSAGE)

    await deliverer(spool, port, local, clock).run_once()

    assert handler.received == [("alice@local.test", ["bob@remote.test"], MESSAGE)]
    assert len(local.delivered) == 1
    address, bounce = local.delivered[0]
    assert address == "alice@local.test"
    assert b"Status: 5.1.1" in bounce
    assert b"Final-Recipient: rfc822; nobody@remote.test" in bounce
    assert b"Remote-MTA: dns; mx.remote.test" in bounce
    assert b"no such user" in bounce
    assert b"Subject: hello\r\nMessage-ID: <m1@local.test>\r\n" in bounce  # the original headers
    assert b"Hi Bob" not in bounce  # never the body
    assert await spool.list() == []


async def test_bounce_for_a_remote_sender_is_queued_with_the_null_sender(spool, remote, local, clock):
    handler, port = remote
    handler.rcpt_replies["nobody@remote.test"] = "550 5.1.1 no such user"
    await spool.enqueue("dave@elsewhere.test", ["nobody@remote.test"], MESSAGE)

    await deliverer(spool, port, local, clock).run_once()

    [queued] = await spool.list()
    assert queued.sender == ""
    assert [r.address for r in queued.recipients] == ["dave@elsewhere.test"]
    assert b"Status: 5.1.1" in await spool.read(queued.id)


async def test_temporary_rejection_is_retried_on_schedule_then_delivered(spool, remote, local, clock):
    handler, port = remote
    handler.rcpt_replies["bob@remote.test"] = "451 4.7.1 greylisted, try again"
    message = await spool.enqueue("alice@local.test", ["bob@remote.test"], MESSAGE)
    worker = deliverer(spool, port, local, clock)

    await worker.run_once()

    bob = (await spool.get(message.id)).recipient("bob@remote.test")
    assert bob.state == "pending"
    assert bob.attempts == 1
    assert bob.next_attempt == clock.now + next_delay(1)
    assert "451 4.7.1 greylisted" in bob.last_error
    assert handler.received == []

    del handler.rcpt_replies["bob@remote.test"]
    clock.now += next_delay(1) - 1
    assert await worker.run_once() == 0  # not due yet
    clock.now += 1
    assert await worker.run_once() == 1

    assert handler.received == [("alice@local.test", ["bob@remote.test"], MESSAGE)]
    assert await spool.list() == []
    assert local.delivered == []


async def test_temporary_rejection_of_data_defers(spool, remote, local, clock):
    handler, port = remote
    handler.data_reply = "452 4.3.1 insufficient storage"
    message = await spool.enqueue("alice@local.test", ["bob@remote.test"], MESSAGE)

    await deliverer(spool, port, local, clock).run_once()

    bob = (await spool.get(message.id)).recipient("bob@remote.test")
    assert (bob.state, bob.attempts) == ("pending", 1)
    assert "452 4.3.1" in bob.last_error


async def test_message_past_its_lifetime_bounces_with_4_4_7(spool, remote, local, clock):
    handler, port = remote
    handler.rcpt_replies["bob@remote.test"] = "451 4.3.0 try later"
    await spool.enqueue("alice@local.test", ["bob@remote.test"], MESSAGE)
    worker = deliverer(spool, port, local, clock, lifetime=3600)

    await worker.run_once()
    assert local.delivered == []
    clock.now += 3600
    await worker.run_once()

    [(address, bounce)] = local.delivered
    assert address == "alice@local.test"
    assert b"Status: 4.4.7" in bounce
    assert b"451 4.3.0 try later" in bounce
    assert await spool.list() == []


async def test_null_mx_domain_fails_at_once(spool, remote, local, clock):
    handler, port = remote
    await spool.enqueue("alice@local.test", ["someone@nomail.test"], MESSAGE)

    await deliverer(spool, port, local, clock).run_once()

    [(address, bounce)] = local.delivered
    assert b"Status: 5.1.10" in bounce
    assert handler.connections == 0
    assert await spool.list() == []


async def test_unreachable_server_defers(spool, local, clock):
    server, port = await start_remote(Remote())
    server.close()
    await server.wait_closed()
    message = await spool.enqueue("alice@local.test", ["bob@remote.test"], MESSAGE)

    await deliverer(spool, port, local, clock).run_once()

    bob = (await spool.get(message.id)).recipient("bob@remote.test")
    assert (bob.state, bob.attempts) == ("pending", 1)
    assert "4.4.1" in bob.last_error


async def test_a_failed_bounce_is_not_bounced(spool, remote, local, clock):
    handler, port = remote
    handler.rcpt_replies["dave@remote.test"] = "550 5.1.1 no such user"
    await spool.enqueue("", ["dave@remote.test"], MESSAGE)

    await deliverer(spool, port, local, clock).run_once()

    assert local.delivered == []
    assert await spool.list() == []  # removed, and nothing new queued


async def test_relay_host_gets_all_mail_over_starttls_with_auth(spool, local, clock, ca_file, tls_files):
    cert_file, key_file = tls_files
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert_file, key_file)
    logins: list[tuple[bytes, bytes, bool]] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        logins.append((auth_data.login, auth_data.password, session.ssl is not None))
        return AuthResult(success=auth_data == LoginPassword(b"user", b"pass"), handled=False)

    handler = Remote()
    server, port = await start_remote(
        handler, tls_context=server_tls, require_starttls=True, authenticator=authenticator, auth_required=True
    )
    relay = routing.RelayHost(host="localhost", port=port, username="user", password="pass", ca_file=ca_file)
    try:
        await spool.enqueue("alice@local.test", ["bob@remote.test", "eve@far.test"], MESSAGE)
        await spool.enqueue("alice@local.test", ["x@nomail.test"], MESSAGE)  # no DNS consulted for a relay

        worker = deliverer(spool, 1, local, clock, relay_host=relay)
        assert await worker.run_once() == 3
    finally:
        server.close()
        await server.wait_closed()

    assert logins == [(b"user", b"pass", True)]
    assert handler.connections == 1
    assert handler.received == [
        ("alice@local.test", ["bob@remote.test", "eve@far.test"], MESSAGE),
        ("alice@local.test", ["x@nomail.test"], MESSAGE),
    ]
    assert await spool.list() == []


async def test_relay_host_that_refuses_the_login_defers(spool, local, clock, tls_files, ca_file):
    cert_file, key_file = tls_files
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert_file, key_file)
    handler = Remote()
    server, port = await start_remote(
        handler,
        tls_context=server_tls,
        require_starttls=True,
        authenticator=lambda *args: AuthResult(success=False, handled=False),
        auth_required=True,
    )
    relay = routing.RelayHost(host="localhost", port=port, username="user", password="wrong", ca_file=ca_file)
    try:
        message = await spool.enqueue("alice@local.test", ["bob@remote.test"], MESSAGE)
        await deliverer(spool, 1, local, clock, relay_host=relay).run_once()
    finally:
        server.close()
        await server.wait_closed()

    bob = (await spool.get(message.id)).recipient("bob@remote.test")
    assert (bob.state, bob.attempts) == ("pending", 1)
    assert "refused the login" in bob.last_error
    assert handler.received == []


def test_a_relay_ca_file_that_cannot_be_loaded_is_named(tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    for ca_file in (tmp_path / "missing.pem", not_pem):
        with pytest.raises(ValueError, match=f"cannot load the CA bundle {ca_file}"):
            delivery.relay_tls_context(routing.RelayHost("relay.test", ca_file=ca_file))


async def test_a_relay_certificate_the_node_does_not_trust_defers_with_4_7_5(spool, local, clock, tls_files):
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(*tls_files)
    handler = Remote()
    server, port = await start_remote(handler, tls_context=server_tls, require_starttls=True)
    relay = routing.RelayHost(host="localhost", port=port)  # the system CAs: the test CA is not among them
    try:
        message = await spool.enqueue("alice@local.test", ["bob@remote.test"], MESSAGE)
        await deliverer(spool, 1, local, clock, relay_host=relay).run_once()
    finally:
        server.close()
        await server.wait_closed()
    bob = (await spool.get(message.id)).recipient("bob@remote.test")
    assert bob.state == "pending"
    assert bob.last_error.startswith(f"4.7.5 TLS certificate of localhost[localhost]:{port} not trusted: ")
    assert handler.received == []


async def test_recipient_recorded_delivered_is_not_sent_again_after_a_restart(spool, remote, gateway, local, clock):
    handler, port = remote
    message = await spool.enqueue("alice@local.test", ["bob@remote.test", "carol@remote.test"], MESSAGE)
    # A previous process delivered to bob, recorded it, and died before carol.
    await spool.record_attempt(
        message.id, "bob@remote.test", delivered=True, permanent=False, error="250 OK", next_attempt=None
    )
    await spool.close()
    reopened = Spool(spool.root, gateway=gateway, clock=clock)
    await reopened.open()
    try:
        assert await deliverer(reopened, port, local, clock).run_once() == 1
        assert handler.received == [("alice@local.test", ["carol@remote.test"], MESSAGE)]
        assert await reopened.list() == []
    finally:
        await reopened.close()


async def test_run_goes_on_after_a_failed_pass_and_stops_when_cancelled(spool, remote, local, clock):
    handler, port = remote
    worker = deliverer(spool, port, local, clock)
    passes = 0
    original = worker.run_once

    async def flaky() -> int:
        nonlocal passes
        passes += 1
        if passes == 1:
            raise RuntimeError("disk on fire")
        return await original()

    worker.run_once = flaky  # type: ignore[method-assign]
    slept = asyncio.Event()
    sleeps = 0

    async def sleep(seconds: float) -> None:
        nonlocal sleeps
        sleeps += 1
        if sleeps >= 3:
            slept.set()
        await asyncio.sleep(0)

    await spool.enqueue("alice@local.test", ["bob@remote.test"], MESSAGE)
    task = asyncio.create_task(worker.run(interval=5, sleep=sleep))
    await asyncio.wait_for(slept.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert passes >= 3
    assert handler.received == [("alice@local.test", ["bob@remote.test"], MESSAGE)]


# -- hand-offs to a home node (clustering) -------------------------------------------------------------


class FakeHandoff:
    """mailnode.queue.handoff.Handoff as the worker sees it: the home is down until `up` is set."""

    def __init__(self) -> None:
        self.up = False
        self.sent: list[tuple[int, str, list[str], bytes]] = []
        self.homes: dict[str, int] = {}
        self.ids: list[str] = []  # the hand-off id of every attempt

    def id_for(self, local: str) -> str:
        return f"0.{local}"

    def home_of(self, address: str) -> int | None:
        return self.homes.get(address)

    async def send(self, home: int, *, sender: str, recipients: list[str], data: bytes, id: str) -> dict[str, Any]:
        self.ids.append(id)
        if not self.up:
            return dict.fromkeys(recipients, handoff.Answer(421, "421 4.4.1 cannot connect to node 1"))
        self.sent.append((home, sender, recipients, data))
        return dict.fromkeys(recipients, handoff.Answer(250, "250 2.0.0 Ok: stored"))


async def test_a_hand_off_waits_for_its_home_past_the_queue_lifetime_then_arrives_once(spool, local, clock):
    home = FakeHandoff()
    metrics = NodeMetrics()
    worker = deliverer(spool, 1, local, clock, handoffs=home, lifetime=3600, metrics=metrics)
    await spool.enqueue("alice@local.test", ["bob@local.test"], MESSAGE, route=handoff.route_to(1), handoff="0.tx1")

    assert await worker.run_once() == 1
    [message] = await spool.list()
    assert message.handoff == "0.tx1"
    assert message.recipients[0].next_attempt == clock.now + delivery.HANDOFF_RETRY_DELAYS[0]
    assert "mailnode_handoff_queue_messages 1.0" in metrics.exposition().decode()
    clock.now += 2 * 86400  # the home down for two days, far past the outbound lifetime
    assert await worker.run_once() == 1
    [message] = await spool.list()
    assert message.pending and local.delivered == []  # no bounce

    home.up = True
    home.homes["bob@local.test"] = 2  # moved meanwhile: the directory's home now wins over the route
    clock.now += 3600
    await worker.run_once()
    assert home.sent == [(2, "alice@local.test", ["bob@local.test"], MESSAGE)]
    assert await spool.list() == []
    await worker.run_once()
    assert len(home.sent) == 1
    assert home.ids == ["0.tx1"] * 3  # every retry names the hand-off its first attempt made
    assert "mailnode_handoff_queue_messages 0.0" in metrics.exposition().decode()


async def test_a_hand_off_queued_without_an_attempt_uses_one_id_of_its_own(spool, local, clock):
    home = FakeHandoff()
    worker = deliverer(spool, 1, local, clock, handoffs=home)
    queued = await spool.enqueue("alice@local.test", ["bob@local.test"], MESSAGE, route=handoff.route_to(1))
    await worker.run_once()
    clock.now += 3600
    home.up = True
    await worker.run_once()
    assert home.ids == [f"0.q{queued.id}"] * 2
