"""A keyed work queue, as controllers have: adding a key that is already waiting does nothing, a key
is never worked on twice at once, and a key added while it is being worked on runs once more afterwards.

This is what coalesces: ten thousand Mailbox events for one domain become a handful of reconciles of
that domain, each of which writes the directory Secret at most once.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

log = logging.getLogger(__name__)


class WorkQueue(Generic[K]):
    """`work(key)` runs for every added key after `delay` seconds (gathering more events for the same key
    meanwhile), in at most `workers` concurrent tasks. A failing key is retried with a growing delay
    (from `retry` up to `retry_max` seconds) until it succeeds or is added again.

    `spacing`: a key runs again no sooner than `spacing` times its last run's duration after that run
    ended. A reconcile of a domain with ten thousand Mailboxes costs a second or two, and events keep
    coming while it runs: back to back, its reconciles would take all of the operator's time, and the
    watch events they are waiting for would queue up behind them."""

    def __init__(
        self,
        work: Callable[[K], Awaitable[None]],
        *,
        workers: int = 4,
        delay: float = 0.2,
        retry: float = 1.0,
        retry_max: float = 60.0,
        on_depth: Callable[[int], None] | None = None,
        spacing: float = 0.0,
        what: str = "reconcile",
    ) -> None:
        self._work = work
        self._workers = workers
        self._delay, self._retry, self._retry_max = delay, retry, retry_max
        self._due: dict[K, float] = {}  # waiting keys and when they may run
        # (due, order, key) for every due time set, the earliest first; an entry whose due time is no
        # longer the key's (it ran, or was brought forward) is skipped: picking a key is O(log n), not a
        # scan of ten thousand waiting Mailbox keys.
        self._heap: list[tuple[float, int, K]] = []
        self._order = itertools.count()
        self._active: set[K] = set()
        self._again: dict[K, float] = {}  # keys added while active: when to run them next
        self._failures: dict[K, int] = {}
        self._spacing = spacing
        self._what = what  # names the work in the log: "reconcile of <key> failed"
        self._rested: dict[K, float] = {}  # key -> the earliest its next run may start (spacing)
        self._changed = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._on_depth = on_depth
        self._tasks: list[asyncio.Task[None]] = []

    def add(self, key: K) -> None:
        due = time.monotonic() + self._delay
        if (rested := self._rested.get(key)) is not None:
            due = max(due, rested)
        if key in self._active:
            self._again[key] = min(self._again.get(key, due), due)
            return
        self._set_due(key, due)
        self._idle.clear()
        self._changed.set()
        self._report()

    def __len__(self) -> int:
        return len(self._due) + len(self._active)

    async def idle(self) -> None:
        """Wait until nothing is waiting or running (tests and benchmarks use it)."""
        await self._idle.wait()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(), name=f"workqueue-{i}") for i in range(self._workers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def _report(self) -> None:
        if self._on_depth is not None:
            self._on_depth(len(self))

    def _set_due(self, key: K, due: float) -> None:
        """Run `key` at `due`, or earlier if it is already waiting for an earlier time."""
        if key in self._due and self._due[key] <= due:
            return
        self._due[key] = due
        heapq.heappush(self._heap, (due, next(self._order), key))

    def _next(self) -> tuple[K | None, float]:
        """The key to run now, or how long to wait for one."""
        while self._heap:
            due, _, key = self._heap[0]
            if self._due.get(key) != due:
                heapq.heappop(self._heap)  # stale: the key ran, or is due earlier
                continue
            wait = due - time.monotonic()
            return (key, 0.0) if wait <= 0 else (None, wait)
        return None, 3600.0

    async def _worker(self) -> None:
        while True:
            key, wait = self._next()
            if key is None:
                self._changed.clear()
                # asyncio.timeout, not wait_for: no inner task per wait (a worker cancelled while the
                # event wakes it could otherwise hang on Python 3.11 in wait_for's cancel-and-wait).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._changed.wait()
                continue
            del self._due[key]
            self._active.add(key)
            started = time.monotonic()
            try:
                await self._work(key)
            except asyncio.CancelledError:
                raise
            except Exception:
                failures = self._failures.get(key, 0) + 1
                self._failures[key] = failures
                delay = min(self._retry * 2 ** (failures - 1), self._retry_max)
                log.exception("%s of %s failed (attempt %d); retrying in %.0f s", self._what, key, failures, delay)
                self._again[key] = min(self._again.get(key, float("inf")), time.monotonic() + delay)
            else:
                self._failures.pop(key, None)
            finally:
                self._active.discard(key)
                if self._spacing:
                    ended = time.monotonic()
                    self._rested[key] = ended + self._spacing * (ended - started)
                if key in self._again:
                    self._set_due(key, max(self._again.pop(key), self._rested.get(key, 0.0)))
                    self._changed.set()
                if not self._due and not self._active:
                    self._idle.set()
                self._report()
