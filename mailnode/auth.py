"""Authentication of mailbox users, shared by SMTP submission (and IMAP): password or app password
checked off the event loop, and a growing delay for clients that keep failing.

A client address that fails n times in a row waits min(base * 2**(n-1), max) seconds before each
further failure is answered; a success, or `forget_after` seconds without failures, clears it.
"""

from __future__ import annotations

import asyncio
import collections
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
        if await self._gateway.run(_verify_any, hashes, password):
            self._failures.pop(remote, None)
            return entry
        count = self.failures(remote) + 1
        self._failures[remote] = (count, self._clock())
        self._failures.move_to_end(remote)
        while len(self._failures) > _MAX_TRACKED:
            self._failures.popitem(last=False)
        self._metrics.auth_failures.labels(protocol).inc()
        await self._sleep(self.delay_for(count))
        return None
