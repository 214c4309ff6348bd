"""KeyedLocks (mailnode.imap.session): one lock per key while tasks hold or wait for it, none kept after. The
caches' per-mailbox and per-folder locks (AnalysisCache.lock, SEARCH's columns) are keyed by what clients make
(a folder's UIDVALIDITY is new with every folder created): kept for ever, they grew with every key used."""

from __future__ import annotations

import asyncio

from mailnode.imap.session import KeyedLocks


def test_one_holder_per_key_and_nothing_kept_after() -> None:
    async def main() -> tuple[list[str], int, int]:
        locks: KeyedLocks[tuple[str, int]] = KeyedLocks()
        order: list[str] = []
        release = asyncio.Event()

        async def hold(name: str, key: tuple[str, int]) -> None:
            async with locks.hold(key):
                order.append(f"{name} in")
                await release.wait()
                order.append(f"{name} out")

        tasks = [asyncio.create_task(hold(name, ("a@example.com", 1))) for name in ("first", "second")]
        tasks.append(asyncio.create_task(hold("other", ("a@example.com", 2))))
        await asyncio.sleep(0)
        waiting = len(locks)  # two keys: the first holds, the second waits; the other key is held alone
        release.set()
        await asyncio.gather(*tasks)
        for uidvalidity in range(1000):  # a client's new folders, one after another
            async with locks.hold(("a@example.com", uidvalidity)):
                pass
        return order, waiting, len(locks)

    order, waiting, left = asyncio.run(main())
    assert order.index("first out") < order.index("second in")  # the same key: one at a time
    assert order.index("other in") < order.index("first out")  # another key: not held up
    assert waiting == 2 and left == 0


def test_a_cancelled_waiter_leaves_nothing_behind() -> None:
    async def main() -> int:
        locks: KeyedLocks[str] = KeyedLocks()
        async with locks.hold("a@example.com"):
            waiter = asyncio.create_task(_hold_once(locks, "a@example.com"))
            await asyncio.sleep(0)
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        return len(locks)

    assert asyncio.run(main()) == 0


async def _hold_once(locks: KeyedLocks[str], key: str) -> None:
    async with locks.hold(key):
        pass
