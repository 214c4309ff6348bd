"""Fixtures the outbound-queue tests share: a fake clock, a Gateway, and an open Spool on tmp_path."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mailnode.gateway import Gateway
from mailnode.queue.spool import Spool


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    gateway = Gateway()
    yield gateway
    gateway.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def spool(tmp_path: Path, gateway: Gateway, clock: FakeClock) -> AsyncIterator[Spool]:
    spool = Spool(tmp_path / "queue", gateway=gateway, clock=clock)
    await spool.open()
    yield spool
    if spool.is_open:
        await spool.close()
