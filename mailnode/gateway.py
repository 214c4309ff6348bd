"""The one way blocking work (files, SQLite, password hashing) leaves the event loop.

Every coroutine that needs to block calls `await gateway.run(fn, *args)`; the store, the
authenticator and the directory watcher share one node-wide Gateway so the thread count is bounded.
A trip costs its caller two turns of the event loop, which a busy node makes milliseconds: the one
read that skips it is a message file the page cache holds (Account.read_cached, RWF_NOWAIT), which
cannot block.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class Gateway:
    def __init__(self, *, workers: int = 4) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="mailnode-io")

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
