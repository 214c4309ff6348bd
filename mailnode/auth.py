"""Authentication of mailbox users, shared by SMTP submission (and IMAP): password or app password
checked off the event loop, and a growing delay for clients that keep failing.

A client address that fails n times in a row waits min(base * 2**(n-1), max) seconds before each
further failure is answered; a success, or `forget_after` seconds without failures, clears it.

Successful verifications are remembered for `cache_ttl` seconds (Dovecot's auth_cache does the same),
since mail clients reconnect all the time and argon2 costs a third of a CPU second on purpose. The
cache holds an HMAC of the password under a key made at start-up, never the password, and an entry
only counts while the mailbox's hash in the directory is the one it was verified against, so a
password change or a suspension takes effect at once.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable

from mailnode import passwords
from mailnode.config import Directory, MailboxEntry
from mailnode.gateway import Gateway
from mailnode.metrics import NodeMetrics

_MAX_TRACKED = 10_000


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
        self._forget_after = forget_after
        self._clock = clock
        self._sleep = sleep
        self._failures: collections.OrderedDict[str, tuple[int, float]] = collections.OrderedDict()
        self._cache_ttl = cache_ttl
        self._cache_key = secrets.token_bytes(32)
        # (address, the hashes it was verified against) -> (HMAC of the password, expiry)
        self._verified: collections.OrderedDict[tuple[str, tuple[str, ...]], tuple[bytes, float]] = (
            collections.OrderedDict()
        )

    def failures(self, remote: str) -> int:
        count, last = self._failures.get(remote, (0, 0.0))
        return count if self._clock() - last < self._forget_after else 0

    def delay_for(self, failures: int) -> float:
        return 0.0 if failures <= 0 else min(self._base_delay * 2 ** (failures - 1), self._max_delay)

    async def authenticate(self, username: str, password: str, *, remote: str, protocol: str) -> MailboxEntry | None:
        entry = self._directory().get(username)
        hashes: list[str | None] = [None]
        if entry is not None and not entry.suspended:
            hashes = [entry.password_hash, *(app.password_hash for app in entry.app_passwords)]
            key = (entry.address, tuple(h for h in hashes if h is not None))
            mac = hmac.new(self._cache_key, password.encode(), hashlib.sha256).digest()
            cached = self._verified.get(key)
            if cached is not None and cached[1] > self._clock() and hmac.compare_digest(cached[0], mac):
                self._failures.pop(remote, None)
                return entry
        if await self._gateway.run(_verify_any, hashes, password):
            self._failures.pop(remote, None)
            if entry is not None and self._cache_ttl > 0:
                self._verified[key] = (mac, self._clock() + self._cache_ttl)
                self._verified.move_to_end(key)
                while len(self._verified) > _MAX_TRACKED:
                    self._verified.popitem(last=False)
            return entry
        count = self.failures(remote) + 1
        self._failures[remote] = (count, self._clock())
        self._failures.move_to_end(remote)
        while len(self._failures) > _MAX_TRACKED:
            self._failures.popitem(last=False)
        self._metrics.auth_failures.labels(protocol).inc()
        await self._sleep(self.delay_for(count))
        return None
