"""A mailbox move that survives kills (docs/architecture.md "Moving a mailbox"): three `mailnode serve`
processes (tests.node.test_cluster_crash's cluster, with mail streaming to a mailbox on every node) and
the operator's driver, mailfleet.moving, moving user0 from node 0 to node 1 while:
- the driver is killed in the middle of COPYING (its call cancelled): it starts again from the Move it
  recorded;
- the source is SIGKILLed once it is frozen (recorded: CATCHING_UP): the driver's calls fail until it is
  back, its freeze is still on (kept on its volume), and the move goes on;
- the target is SIGKILLed once it is the home (recorded: THAWING): it comes back with the mailbox in
  place and its home override, and the move finishes.

Aspects: nothing is refused to a sender by a node that is up; afterwards every acknowledged message is in
its mailbox's home exactly once (user0's is node 1 now) and in no other node's store, every queue is
empty; beyond them a home holds only messages whose sender lost its connection to a killed node before
the 250 (stored before the kill, as RFC 5321 §6.1 allows), once too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import threading
import time
from pathlib import Path

import aiohttp

from mailfleet import moving, nodes
from tests.node.conftest import DOMAIN, ServeProcess, mailbox
from tests.node.test_cluster_crash import HOMES, TOKEN, queue, retry_all, start_cluster, stored_ids
from tests.node.test_move_load import Sender

MOVED = f"user0@{DOMAIN}"
NOW = "2026-12-07T17:00:00Z"
DEADLINE = 120.0  # seconds a step may keep failing while a killed node comes back (a loaded machine)


def test_a_move_resumes_after_the_driver_the_source_and_the_target_are_killed(
    tmp_path: Path, tls_files: tuple[Path, Path]
) -> None:
    cluster = start_cluster(tmp_path, tls_files)
    stop = threading.Event()
    senders = [Sender(f"via{i}", cluster[i].ports["smtp"], stop, tuple(HOMES)) for i in range(3)]
    try:
        for sender in senders:
            sender.start()
        moved = asyncio.run(kill_while_moving(cluster, senders))
        stop.set()
        for sender in senders:
            sender.join(60)
        assert moved.step is moving.Step.DONE
        assert [refusal for sender in senders for refusal in sender.refused] == []  # by a node that was up

        deadline = time.monotonic() + DEADLINE
        while any(queue(node) for node in cluster) and time.monotonic() < deadline:
            for node in cluster:
                retry_all(node)
            time.sleep(0.5)
        assert [queue(node) for node in cluster] == [[], [], []]
        homes = dict(HOMES, **{MOVED: 1})
        acked = {message_id: recipient for sender in senders for message_id, recipient in sender.acked.items()}
        assert sum(1 for recipient in acked.values() if recipient == MOVED) > 10
        unreached = {message_id for sender in senders for message_id in sender.unreached}
        for address, home in homes.items():
            wanted = {message_id for message_id, recipient in acked.items() if recipient == address}
            stored = collections.Counter(stored_ids(cluster[home], address))
            assert wanted <= stored.keys(), (address, wanted - stored.keys())  # every 250 is there
            assert set(stored.values()) == {1}, address  # each once
            # Beyond them only what a node stored before it was killed, its 250 lost with it.
            assert stored.keys() - wanted <= unreached, address
            for other in range(3):
                if other != home:
                    assert cluster[other].files.stored(address) == [], (address, other)
    finally:
        stop.set()
        for node in cluster:
            node.kill()


async def kill_while_moving(cluster: list[ServeProcess], senders: list[Sender]) -> moving.Move:
    domain = moving.AtURLs({i: f"http://127.0.0.1:{node.ports['http']}" for i, node in enumerate(cluster)}, token=TOKEN)

    async def publish_home(address: str, home: int) -> None:
        entries = [mailbox(a, home=home if a == address else h) for a, h in HOMES.items()]
        for node in cluster:
            node.files.write_directory(copy.deepcopy(entries))

    async def advance(move: moving.Move, session: aiohttp.ClientSession) -> moving.Move:
        """One step, asked again while a node is down (NodeError), as the operator's reconcile does."""
        deadline = time.monotonic() + DEADLINE
        while True:
            try:
                return await moving.advance(
                    move, nodes=domain, session=session, ordinals=range(3), publish_home=publish_home
                )
            except nodes.NodeError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    def sent_to_moved() -> int:
        return sum(1 for s in senders for recipient in list(s.acked.values()) if recipient == MOVED)

    async def flowing(more: int) -> None:
        """Until `more` messages more were acknowledged for the moved mailbox (mail keeps streaming)."""
        wanted = sent_to_moved() + more
        deadline = time.monotonic() + DEADLINE
        while sent_to_moved() < wanted:
            assert time.monotonic() < deadline, "mail stopped flowing"
            await asyncio.sleep(0.05)

    await flowing(5)
    move = moving.start(MOVED, source=0, target=1, now=NOW)
    async with aiohttp.ClientSession() as session:
        # The driver killed in the middle of COPYING: its call goes, the recorded Move stays.
        killed = asyncio.ensure_future(advance(move, session))
        await asyncio.sleep(0.05)
        killed.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await killed
    killed_at = {moving.Step.CATCHING_UP: 0, moving.Step.THAWING: 1}  # the source frozen; the target home
    async with aiohttp.ClientSession() as session:  # a new driver, from the recorded Move
        while move.step is not moving.Step.DONE:
            if (victim := killed_at.pop(move.step, None)) is not None:
                cluster[victim].kill()  # SIGKILL
                await flowing(3)  # the two others take its mail meanwhile
                cluster[victim].start()
            move = await advance(move, session)
    await flowing(5)
    return move
