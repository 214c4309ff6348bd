"""Authentication of mailbox users, shared by SMTP submission and IMAP (LOGIN, AUTHENTICATE): password
or app password checked off the event loop, and throttling of clients that keep failing.

Throttling works as Dovecot's auth penalty and Postfix's anvil do, by client address, so that parallel
connections share one budget. Failures are counted per client address, per (address, account) and per
account. The n-th failure is answered after min(base * 2**(n-1), max) seconds, n being the larger of the
address's and the account's counts, and each address has one time line ("no attempt before"): once it
has a failure on record, every further attempt from it, on any connection and for any account, waits for
its turn, and reserves the next delay. 24 parallel connections therefore take the sum of 24 delays, not
one. A success clears only what that address failed on that account (a typo, then the right password),
so a success on an account of one's own does not wipe out the failures on someone else's. An address with
no failure on record is never held back (parallel logins from one office NAT stay parallel), and the
account count only lengthens the answer to a failure: an attack on an account from many addresses
never keeps its owner, with the right password from a clean address, out. Counts are forgotten
`forget_after` seconds after their last failure; each table keeps at most _MAX_TRACKED entries (least
recently used first out), so memory stays bounded whatever the number of addresses.

Successful verifications are remembered for `cache_ttl` seconds (Dovecot's auth_cache does the same),
since mail clients reconnect all the time and argon2 costs a third of a CPU second on purpose. The
cache holds an HMAC of the password under a key made at start-up, never the password, and an entry
only counts while the mailbox's hash in the directory is the one it was verified against, so a
password change or a suspension takes effect at once. A remembered check waits for its turn like any
other: the cache makes a check cheaper, never a guess faster.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from mailnode import passwords
from mailnode.config import Directory, MailboxEntry
from mailnode.gateway import Gateway
from mailnode.metrics import NodeMetrics

_MAX_TRACKED = 10_000  # per table: addresses, (address, account) pairs, accounts, remembered checks

K = TypeVar("K", bound=Hashable)
C = TypeVar("C", bound="_Failures")


@dataclasses.dataclass
class _Failures:
    count: int = 0
    last: float = 0.0  # when the last one happened


@dataclasses.dataclass
class _AddressFailures(_Failures):
    not_before: float = 0.0  # no attempt from this address starts, and no failure is answered, before this
    waiting: int = 0  # attempts that reserved a turn and have not finished


class _Table(Generic[K, C]):
    """Failure counts by key, forgotten `forget_after` seconds after the last failure; at most
    _MAX_TRACKED keys, the least recently used dropped first."""

    def __init__(self, make: Callable[[], C], *, forget_after: float) -> None:
        self._make = make
        self._forget_after = forget_after
        self._entries: collections.OrderedDict[K, C] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K, now: float) -> C:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = self._make()
            while len(self._entries) > _MAX_TRACKED:
                # An attempt still holding the dropped entry updates its own copy: harmless.
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
            if entry.count and now - entry.last >= self._forget_after:
                entry.count = 0
        return entry

    def count(self, key: K, now: float) -> int:
        entry = self._entries.get(key)
        return 0 if entry is None or now - entry.last >= self._forget_after else entry.count

    def pop(self, key: K) -> None:
        self._entries.pop(key, None)


def _verify_any(hashes: list[str | None], password: str) -> bool:
    return any(passwords.verify(h, password) for h in hashes)


class Authenticator:
    def __init__(
        self,
        *,
        directory: Callable[[], Directory],
        gateway: Gateway,
        metrics: NodeMetrics,
        base_delay: float,
        max_delay: float,
        forget_after: float = 900.0,
        cache_ttl: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._directory = directory
        self._gateway = gateway
        self._metrics = metrics
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._clock = clock
        self._sleep = sleep
        self._addresses: _Table[str, _AddressFailures] = _Table(_AddressFailures, forget_after=forget_after)
        self._pairs: _Table[tuple[str, str], _Failures] = _Table(_Failures, forget_after=forget_after)
        self._accounts: _Table[str, _Failures] = _Table(_Failures, forget_after=forget_after)
        self._cache_ttl = cache_ttl
        self._cache_key = secrets.token_bytes(32)
        # (address, the hashes it was verified against) -> (HMAC of the password, expiry)
        self._verified: collections.OrderedDict[tuple[str, tuple[str, ...]], tuple[bytes, float]] = (
            collections.OrderedDict()
        )

    def failures(self, remote: str) -> int:
        """The failures on record for a client address."""
        return self._addresses.count(remote, self._clock())

    def tracked(self) -> int:
        """How many failure counts are kept (addresses, pairs and accounts together)."""
        return len(self._addresses) + len(self._pairs) + len(self._accounts)

    def delay_for(self, failures: int) -> float:
        return 0.0 if failures <= 0 else min(self._base_delay * 2 ** (failures - 1), self._max_delay)

    async def authenticate(self, username: str, password: str, *, remote: str, protocol: str) -> MailboxEntry | None:
        known = self._directory().get(username)
        account = known.address if known is not None else username.strip().lower()
        now = self._clock()
        address = self._addresses.get(remote, now)
        pair = self._pairs.get((remote, account), now)
        target = self._accounts.get(account, now)
        start, turn_end = now, None
        if address.count:
            # The address has failed before: this attempt takes the next turn on its time line, as
            # long as the failure it may turn out to be (the ones waiting ahead of it count as failures).
            start = max(now, address.not_before)
            address.waiting += 1
            presumed = max(address.count + address.waiting, target.count + 1)
            turn_end = address.not_before = start + self.delay_for(presumed)
        try:
            if turn_end is not None and start > now:
                await self._sleep(start - now)
            entry = await self._verify(username, password)
        finally:
            if turn_end is not None:
                address.waiting -= 1
        now = self._clock()
        if entry is not None:
            # Only what this address failed on this account is forgiven.
            address.count = max(0, address.count - pair.count)
            target.count = max(0, target.count - pair.count)
            self._pairs.pop((remote, account))
            if turn_end is not None and address.not_before == turn_end:
                address.not_before = start  # nobody queued behind: give the unused turn back
            return entry
        for failures in (address, pair, target):
            failures.count += 1
            failures.last = now
        if turn_end is None:
            # The address's first failures: their answers still come one delay after another.
            delay = self.delay_for(max(address.count, target.count))
            turn_end = address.not_before = max(now, address.not_before) + delay
        self._metrics.auth_failures.labels(protocol).inc()
        await self._sleep(max(0.0, turn_end - now))
        return None

    async def _verify(self, username: str, password: str) -> MailboxEntry | None:
        """The mailbox if the password (or one of its app passwords) is right, from memory if it was
        checked recently; None for a wrong password or an unknown or suspended user."""
        entry = self._directory().get(username)
        hashes: list[str | None] = [None]  # verified all the same: unknown users take as long as known ones
        if entry is not None and not entry.suspended:
            hashes = [entry.password_hash, *(app.password_hash for app in entry.app_passwords)]
            key = (entry.address, tuple(h for h in hashes if h is not None))
            mac = hmac.new(self._cache_key, password.encode(), hashlib.sha256).digest()
            cached = self._verified.get(key)
            if cached is not None and cached[1] > self._clock() and hmac.compare_digest(cached[0], mac):
                return entry
        if not await self._gateway.run(_verify_any, hashes, password):
            return None
        if entry is not None and self._cache_ttl > 0:
            self._verified[key] = (mac, self._clock() + self._cache_ttl)
            self._verified.move_to_end(key)
            while len(self._verified) > _MAX_TRACKED:
                self._verified.popitem(last=False)
        return entry
