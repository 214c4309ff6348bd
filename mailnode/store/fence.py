"""WriteFence: the node-wide gate every durable write passes, so a checkpoint can hold them all.

One fence per node, shared by the MailStore (deliveries, IMAP changes) and the outbound Spool
(enqueues, envelope replacements, removals); reads never touch it. A writer wraps its change in
`async with fence.writing():`, which waits while the fence is paused and counts the writer as in
flight until it is done. `pause` closes the gate to new writers and waits until the ones in flight
have finished; `resume` opens it again.

The deadlock rule: enter `writing()` before taking any lock (the mailbox's write lock, a queued
message's lock), and never nest `writing()`. A writer waiting at the gate then holds nothing the
checkpoint needs, and a writer in flight never waits for the gate. The same holds for the store's pin
(Staging.unpinned_writing: folder RENAME and DELETE wait, before the gate, until no staged copy is
being linked).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class FenceTimeout(Exception):
    """The writes in flight did not finish within the drain timeout; the fence was opened again."""


class WriteFence:
    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._in_flight = 0
        self._waiting = 0
        self._drained = asyncio.Event()
        self._drained.set()

    @property
    def paused(self) -> bool:
        return not self._open.is_set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Writers held at the gate now."""
        return self._waiting

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        """Wait while paused, then count this write as in flight until the block ends. Entering an
        open fence does not suspend, so `if not fence.paused: async with fence.writing():` never waits."""
        if not self._open.is_set():
            self._waiting += 1
            try:
                while not self._open.is_set():  # paused again between the wake-up and now: wait again
                    await self._open.wait()
            finally:
                self._waiting -= 1
        self._in_flight += 1
        self._drained.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._drained.set()

    async def pause(self, drain_timeout: float) -> None:
        """Stop new writes and wait for those in flight. On timeout the fence is opened again and
        FenceTimeout is raised; cancelled, it opens again too. Raises RuntimeError when already paused."""
        if self.paused:
            raise RuntimeError("writes are already paused")
        self._open.clear()
        try:
            await asyncio.wait_for(self._drained.wait(), drain_timeout)
        except TimeoutError:
            self.resume()
            raise FenceTimeout(
                f"{self._in_flight} write(s) still in flight after {drain_timeout:g} s; writes resumed"
            ) from None
        except BaseException:
            self.resume()
            raise

    def resume(self) -> None:
        self._open.set()
