"""The authenticator: passwords and app passwords verified off the event loop, suspended users
refused, and the growing delay for a client address that keeps failing (fake time)."""

from __future__ import annotations

from mailnode.auth import Authenticator
from mailnode.config import Directory, MailboxEntry
from mailnode.gateway import Gateway
from mailnode.metrics import NodeMetrics
from tests.conftest import cheap_hash

DOMAINS = {"example.com": "example.com"}


def _authenticator(slept: list[float], now: list[float]) -> Authenticator:
    entries = [
        MailboxEntry(
            address="user@example.com",
            password_hash=cheap_hash("secret"),
            app_passwords=[{"name": "phone", "password_hash": cheap_hash("app")}],
        ),
        MailboxEntry(address="gone@example.com", password_hash=cheap_hash("secret"), suspended=True),
    ]
    directory = Directory(entries, domains=DOMAINS)

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    return Authenticator(
        directory=lambda: directory,
        gateway=Gateway(workers=1),
        metrics=NodeMetrics(),
        base_delay=1.0,
        max_delay=8.0,
        forget_after=600,
        clock=lambda: now[0],
        sleep=sleep,
    )


async def test_passwords_and_app_passwords() -> None:
    auth = _authenticator([], [0.0])
    assert (await auth.authenticate("user@example.com", "secret", remote="a", protocol="smtp")) is not None
    assert (await auth.authenticate("USER@example.com", "app", remote="a", protocol="smtp")) is not None
    assert (await auth.authenticate("user@example.com", "nope", remote="a", protocol="smtp")) is None
    assert (await auth.authenticate("gone@example.com", "secret", remote="a", protocol="smtp")) is None
    assert (await auth.authenticate("ghost@example.com", "secret", remote="a", protocol="smtp")) is None


async def test_failures_from_one_address_wait_longer_and_longer() -> None:
    slept: list[float] = []
    now = [100.0]
    auth = _authenticator(slept, now)
    for _ in range(6):
        await auth.authenticate("user@example.com", "wrong", remote="10.0.0.1", protocol="smtp")
    assert slept == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    await auth.authenticate("user@example.com", "wrong", remote="10.0.0.2", protocol="smtp")
    assert slept[-1] == 1.0  # another client address is not punished
    now[0] += 601
    await auth.authenticate("user@example.com", "wrong", remote="10.0.0.1", protocol="smtp")
    assert slept[-1] == 1.0  # forgotten after a quiet period
    await auth.authenticate("user@example.com", "wrong", remote="10.0.0.1", protocol="smtp")
    assert await auth.authenticate("user@example.com", "secret", remote="10.0.0.1", protocol="smtp")
    await auth.authenticate("user@example.com", "wrong", remote="10.0.0.1", protocol="smtp")
    assert slept[-1] == 1.0  # a success clears the count


class _CountingGateway(Gateway):
    def __init__(self) -> None:
        super().__init__(workers=1)
        self.runs = 0

    async def run(self, fn, /, *args, **kwargs):
        self.runs += 1
        return await super().run(fn, *args, **kwargs)


async def test_successful_checks_are_remembered_until_the_password_changes() -> None:
    now = [0.0]
    gateway = _CountingGateway()
    entry = MailboxEntry(address="user@example.com", password_hash=cheap_hash("secret"))
    directory = [Directory([entry], domains=DOMAINS)]
    auth = Authenticator(
        directory=lambda: directory[0], gateway=gateway, metrics=NodeMetrics(), base_delay=0, max_delay=0,
        cache_ttl=300, clock=lambda: now[0],
    )  # fmt: skip
    assert await auth.authenticate("user@example.com", "secret", remote="a", protocol="imap")
    assert await auth.authenticate("user@example.com", "secret", remote="a", protocol="imap")
    assert gateway.runs == 1  # the second check came from memory
    assert not await auth.authenticate("user@example.com", "wrong", remote="a", protocol="imap")
    now[0] += 301
    assert await auth.authenticate("user@example.com", "secret", remote="a", protocol="imap")
    assert gateway.runs == 3  # expired: verified again
    changed = MailboxEntry(address="user@example.com", password_hash=cheap_hash("new"))
    directory[0] = Directory([changed], domains=DOMAINS)
    assert not await auth.authenticate("user@example.com", "secret", remote="a", protocol="imap")
    assert await auth.authenticate("user@example.com", "new", remote="a", protocol="imap")
    suspended = MailboxEntry(address="user@example.com", password_hash=changed.password_hash, suspended=True)
    directory[0] = Directory([suspended], domains=DOMAINS)
    assert not await auth.authenticate("user@example.com", "new", remote="a", protocol="imap")
