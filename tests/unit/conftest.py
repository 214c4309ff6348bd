"""Fixtures the unit tests share: for the outbound queue a fake clock, a Gateway and an open Spool on tmp_path;
for the store an open MailStore on tmp_path, and `fill`, which delivers numbered messages to one mailbox."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mailnode.gateway import Gateway
from mailnode.queue.spool import Spool
from mailnode.store.account import Account
from mailnode.store.mailstore import Delivery, MailStore

ADDRESS = "a@example.com"  # the mailbox `fill` delivers to


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


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[MailStore]:
    store = MailStore(tmp_path, gateway=Gateway())
    await store.open()
    yield store
    await store.close()


async def fill(store: MailStore, count: int) -> Account:
    """`count` messages ("Subject: i") delivered to ADDRESS's INBOX; its Account."""
    for i in range(count):
        await store.deliver([Delivery(ADDRESS, f"Subject: {i}\r\n\r\n{i}\r\n".encode())])
    return store.account(ADDRESS)
