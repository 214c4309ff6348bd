"""The authenticator: passwords and app passwords verified off the event loop, suspended users
refused, and the growing delay for a client address that keeps failing (fake time): parallel
connections from one address share it, and a success clears only the failures on its own account."""

from __future__ import annotations

import asyncio
import contextvars

from mailnode import auth as auth_module
from mailnode.auth import Authenticator
from mailnode.config import Directory, MailboxEntry
from mailnode.gateway import Gateway
from mailnode.metrics import NodeMetrics
from tests.conftest import cheap_hash

DOMAINS = {"example.com": "example.com"}


class FakeTime:
    """Fake time for the Authenticator's `clock` and `sleep`: each asyncio task has its own timeline,
    which advances only when that task sleeps, so parallel tasks' waits overlap as they would on a real
    clock and no test waits for real. A task started by gather begins at its parent's time."""

    def __init__(self, start: float = 100.0) -> None:
        self._now = contextvars.ContextVar("now", default=start)
        self.slept: list[float] = []

    def clock(self) -> float:
        return self._now.get()

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(seconds)
        await asyncio.sleep(0)

    def advance(self, seconds: float) -> None:
        self._now.set(self._now.get() + seconds)


def _authenticator(time: FakeTime) -> Authenticator:
    entries = [
        MailboxEntry(
            address="user@example.com",
            password_hash=cheap_hash("secret"),
            app_passwords=[{"name": "phone", "password_hash": cheap_hash("app")}],
        ),
        MailboxEntry(address="gone@example.com", password_hash=cheap_hash("secret"), suspended=True),
    ]
    directory = Directory(entries, domains=DOMAINS)
    return Authenticator(
        directory=lambda: directory,
        gateway=Gateway(workers=1),
        metrics=NodeMetrics(),
        base_delay=1.0,
        max_delay=8.0,
        forget_after=600,
        clock=time.clock,
        sleep=time.sleep,
    )


async def test_passwords_and_app_passwords() -> None:
    auth = _authenticator(FakeTime())
    assert (await auth.authenticate("user@example.com", "secret", remote="a", protocol="smtp")) is not None
    assert (await auth.authenticate("USER@example.com", "app", remote="a", protocol="smtp")) is not None
    assert (await auth.authenticate("user@example.com", "nope", remote="a", protocol="smtp")) is None
    assert (await auth.authenticate("gone@example.com", "secret", remote="a", protocol="smtp")) is None
    assert (await auth.authenticate("ghost@example.com", "secret", remote="a", protocol="smtp")) is None


async def test_failures_from_one_address_wait_longer_and_longer() -> None:
    time = FakeTime()
    slept = time.slept
    auth = _authenticator(time)
    for _ in range(6):
        await auth.authenticate("user@example.com", "wrong", remote="10.0.0.1", protocol="smtp")
    assert slept == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    await auth.authenticate("ghost@example.com", "wrong", remote="10.0.0.2", protocol="smtp")
    assert slept[-1] == 1.0  # another client address is not punished (on another account)
    await auth.authenticate("user@example.com", "wrong", remote="10.0.0.3", protocol="smtp")
    assert slept[-1] == 8.0  # but the account's own failures count wherever the next one comes from
    time.advance(601)
    await auth.authenticate("user@example.com", "wrong", remote="10.0.0.1", protocol="smtp")
    assert slept[-1] == 1.0  # forgotten after a quiet period
    await auth.authenticate("user@example.com", "wrong", remote="10.0.0.1", protocol="smtp")
    assert await auth.authenticate("user@example.com", "secret", remote="10.0.0.1", protocol="smtp")
    await auth.authenticate("user@example.com", "wrong", remote="10.0.0.1", protocol="smtp")
    assert slept[-1] == 1.0  # a success clears the count


def _throttled(time: FakeTime) -> Authenticator:
    """Accounts a@ to f@ with the password "secret"; delays 1, 2, 4, 8, 8 ... seconds."""
    entries = [
        MailboxEntry(address="a@example.com", password_hash=cheap_hash("secret")),
        MailboxEntry(address="b@example.com", password_hash=cheap_hash("secret")),
        *(MailboxEntry(address=f"{name}@example.com", password_hash=cheap_hash("secret")) for name in "cdef"),
    ]
    directory = Directory(entries, domains=DOMAINS)
    return Authenticator(
        directory=lambda: directory, gateway=Gateway(workers=2), metrics=NodeMetrics(), base_delay=1.0,
        max_delay=8.0, forget_after=600, clock=time.clock, sleep=time.sleep,
    )  # fmt: skip


async def test_parallel_guesses_from_one_address_queue_behind_one_another() -> None:
    time = FakeTime()
    auth = _throttled(time)
    start = time.clock()

    async def attempt(username: str, password: str, remote: str) -> float:
        await auth.authenticate(username, password, remote=remote, protocol="imap")
        return time.clock() - start  # when this client got its answer

    guesses = [attempt("a@example.com", f"guess{i}", "10.0.0.1") for i in range(24)]
    answered = await asyncio.gather(*guesses)
    # Postfix anvil / Dovecot auth penalty: the address's delays add up, whatever the connection count.
    assert max(answered) >= sum(auth.delay_for(n) for n in range(1, 25))
    # The 25th attempt, even with the right password, is not checked before the queue has drained.
    assert await auth.authenticate("a@example.com", "secret", remote="10.0.0.1", protocol="imap")
    assert time.clock() - start >= max(answered)
    # Another address is not held back by that queue.
    other_start = time.clock()
    assert await auth.authenticate("a@example.com", "secret", remote="10.0.0.2", protocol="imap")
    assert time.clock() == other_start


async def test_a_success_on_another_account_does_not_clear_the_failures() -> None:
    time = FakeTime()
    auth = _throttled(time)
    for _ in range(3):
        assert not await auth.authenticate("a@example.com", "wrong", remote="10.0.0.1", protocol="smtp")
    assert time.slept == [1.0, 2.0, 4.0]
    assert await auth.authenticate("b@example.com", "secret", remote="10.0.0.1", protocol="smtp")
    before = time.clock()
    assert not await auth.authenticate("a@example.com", "wrong", remote="10.0.0.1", protocol="smtp")
    assert time.clock() - before == auth.delay_for(4)  # the fourth failure in a row on a@, from 10.0.0.1
    # A success on a@ itself clears what 10.0.0.1 failed on a@.
    assert await auth.authenticate("a@example.com", "secret", remote="10.0.0.1", protocol="smtp")
    before = time.clock()
    assert not await auth.authenticate("a@example.com", "wrong", remote="10.0.0.1", protocol="smtp")
    assert time.clock() - before == auth.delay_for(1)


async def test_failures_on_one_account_from_many_addresses_lengthen_its_delay() -> None:
    time = FakeTime()
    auth = _throttled(time)
    for i in range(4):
        assert not await auth.authenticate("a@example.com", "wrong", remote=f"10.0.1.{i}", protocol="smtp")
    assert time.slept == [1.0, 2.0, 4.0, 8.0]  # each address failed once, but a@ four times
    before = time.clock()
    assert await auth.authenticate("a@example.com", "secret", remote="10.0.2.1", protocol="smtp")
    assert time.clock() == before  # its owner, from a clean address, is not held back
    before = time.clock()
    assert not await auth.authenticate("b@example.com", "wrong", remote="10.0.2.2", protocol="smtp")
    assert time.clock() - before == auth.delay_for(1)  # nor is another account


async def test_memory_is_bounded(monkeypatch) -> None:
    monkeypatch.setattr(auth_module, "_MAX_TRACKED", 3)
    auth = _throttled(FakeTime())
    for i, name in enumerate("abcdef"):
        await auth.authenticate(f"{name}@example.com", "wrong", remote=f"10.1.0.{i}", protocol="smtp")
    assert auth.tracked() == 3 * 3  # addresses, (address, account) pairs, accounts: the newest three each
    assert auth.failures("10.1.0.5") == 1
    assert auth.failures("10.1.0.0") == 0


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
