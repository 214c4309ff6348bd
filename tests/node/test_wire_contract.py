"""The node <-> operator contract, run from the operator's side: the operator's node client
(mailfleet.nodes: usage, checkpoint, resume, start_archive, archive, delete_archive) against a real mail
node on 127.0.0.1 and against tests/operator/fakenode.py, with the same assertions, so the fake the
operator's tests rely on cannot drift from the node it stands for.

Aspects: what GET /usage reports; a checkpoint's point in time, hold and counts, a second one refused
while the first holds (409, asked again later) and a bad hold refused for good (400); resuming, twice;
an archive started, started again (the same record), written, looked up and deleted, twice; every
change refused for good (401) without the domain's internal token.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import pytest

from mailfleet import nodes
from mailwire import admin
from tests.node.conftest import NodeFactory, mailbox
from tests.node.test_backup import deliver
from tests.operator.fakenode import TOKEN, FakeNode

ALICE, BOB = "alice@example.com", "bob@example.com"


class Node(NamedTuple):
    base: str  # the admin URL
    token: str  # the domain's internal token, which it requires of every change


@pytest.fixture(params=["fake", "real"])
async def node(request: Any, node_factory: NodeFactory, tmp_path: Path) -> AsyncIterator[Node]:
    """A node holding one message in each of ALICE's and BOB's mailboxes."""
    if request.param == "real":
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN)
        real = node_factory([mailbox(ALICE), mailbox(BOB)], tls=False, internal={"token_file": str(token_file)})
        deliver(real, "one", to=ALICE)
        deliver(real, "two", to=BOB)
        yield Node(f"http://127.0.0.1:{real.port('http')}", TOKEN)
        return
    fake = FakeNode(token=TOKEN)
    fake.usage = {address: admin.MailboxUsage(bytes=1234, messages=1) for address in (ALICE, BOB)}
    yield Node(await fake.start(), TOKEN)
    await fake.stop()


def _time(text: str | None) -> datetime.datetime:
    assert text is not None
    return datetime.datetime.fromisoformat(text)


async def test_usage_lists_every_mailbox_with_what_it_keeps(node: Node) -> None:
    async with aiohttp.ClientSession() as session:
        used = await nodes.usage(session, node.base, token=node.token)
    assert sorted(used) == [ALICE, BOB]
    assert all(u.messages == 1 and u.bytes > 0 for u in used.values())


async def test_a_checkpoint_holds_writes_until_resumed(node: Node) -> None:
    async with aiohttp.ClientSession() as session:
        before = datetime.datetime.now(datetime.UTC)
        taken = await nodes.checkpoint(session, node.base, token=node.token, hold=30)
        point_in_time = _time(taken.point_in_time)
        assert before <= point_in_time <= datetime.datetime.now(datetime.UTC)
        assert _time(taken.hold_until) == point_in_time + datetime.timedelta(seconds=30)
        assert (taken.mailboxes, taken.messages, taken.queued) == (2, 2, 0)

        with pytest.raises(nodes.NodeError) as busy:
            await nodes.checkpoint(session, node.base, token=node.token, hold=30)
        assert busy.value.status == 409 and not busy.value.lasting  # asked again once the hold ends

        paused = await nodes.resume(session, node.base, token=node.token)
        assert paused is not None and paused >= 0
        assert await nodes.resume(session, node.base, token=node.token) is None  # nothing to resume: 409

        with pytest.raises(nodes.NodeError) as refused:
            await nodes.checkpoint(session, node.base, token=node.token, hold=0)
        assert refused.value.status == 400 and refused.value.lasting


async def test_an_archive_is_written_looked_up_and_deleted(node: Node) -> None:
    async with aiohttp.ClientSession() as session:
        before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        assert await nodes.archive(session, node.base, "nightly-1", token=node.token) is None

        started = await nodes.start_archive(session, node.base, "nightly-1", token=node.token)
        assert started.name == "nightly-1" and started.state in ("Running", "Completed")
        assert started.path.endswith("/nightly-1.tar")
        again = await nodes.start_archive(
            session, node.base, "nightly-1", token=node.token
        )  # safe to repeat: the same archive
        assert (again.name, again.path) == (started.name, started.path)

        async with asyncio.timeout(30):
            while True:
                done = await nodes.archive(session, node.base, "nightly-1", token=node.token)
                assert done is not None
                if done.state != "Running":
                    break
                await asyncio.sleep(0.1)
        assert (done.name, done.state, done.path, done.error) == ("nightly-1", "Completed", started.path, None)
        assert (done.mailboxes, done.messages) == (2, 2)
        assert done.bytes is not None and done.bytes > 0
        assert before <= _time(done.point_in_time) <= datetime.datetime.now(datetime.UTC)

        assert await nodes.delete_archive(session, node.base, "nightly-1", token=node.token) is True
        assert await nodes.archive(session, node.base, "nightly-1", token=node.token) is None
        assert await nodes.delete_archive(session, node.base, "nightly-1", token=node.token) is False  # deleted already


async def test_every_change_needs_the_internal_token(node: Node) -> None:
    async with aiohttp.ClientSession() as session:
        for wrong in ("", "not-" + node.token):
            for change in (
                nodes.checkpoint(session, node.base, token=wrong, hold=30),
                nodes.resume(session, node.base, token=wrong),
                nodes.start_archive(session, node.base, "nightly-2", token=wrong),
                nodes.delete_archive(session, node.base, "nightly-2", token=wrong),
            ):
                with pytest.raises(nodes.NodeError) as refused:
                    await change
                assert refused.value.status == 401 and refused.value.lasting  # asking again will not help
        assert await nodes.archive(session, node.base, "nightly-2", token="") is None  # reading needs none
        assert sorted(await nodes.usage(session, node.base, token="")) == [ALICE, BOB]
