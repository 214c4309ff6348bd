"""A mailbox whose Mailbox was deleted during its move (docs/architecture.md "Mailbox moves"): the nodes'
directory files no longer name it, yet what the move made of it is still thawed on the source and
dropped on the target (mailnode/move.py), so the operator's clean-up works whether or not the nodes
reloaded the directory first. Three real nodes (tests.node.test_move's cluster) and the operator's
driver."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from typing import Any

import aiohttp

from mailfleet import moving, nodes
from tests.node.conftest import DOMAIN
from tests.node.test_cluster_mail import MAILBOXES, TOKEN, Cluster, send
from tests.node.test_move import ALICE, domain_nodes, drive
from tests.node.test_move import cluster as _cluster

cluster = _cluster  # the fixture: three nodes

RELOAD_WITHIN = 60.0  # seconds: a loaded machine


def _directory_size(node: Any) -> int:
    url = f"http://127.0.0.1:{node.port('http')}/status"
    with urllib.request.urlopen(url, timeout=10) as answer:
        return int(json.load(answer)["directory"]["mailboxes"])


def test_a_move_of_a_mailbox_gone_from_the_directory_is_still_rolled_back(cluster: Cluster) -> None:
    node0, node1, _ = cluster.nodes
    assert send(node0, [ALICE]) == {}
    asyncio.run(drive(cluster, ALICE, source=0, target=1, stop_at=moving.Step.FLIPPING))  # copied, frozen
    incoming = node1.files.data_dir / "moves" / "incoming" / DOMAIN / "alice"
    assert incoming.exists()

    rest = [entry for entry in MAILBOXES if entry["address"] != ALICE]
    for node in cluster.nodes:
        node.files.write_directory(rest)
    deadline = time.monotonic() + RELOAD_WITHIN
    while any(_directory_size(node) != len(rest) for node in cluster.nodes):
        assert time.monotonic() < deadline, "the nodes did not reload the directory"
        time.sleep(0.1)

    async def clean_up() -> tuple[Any, Any]:
        base = domain_nodes(cluster)
        async with aiohttp.ClientSession() as session:
            thawed = await nodes.thaw(session, base.url(0), ALICE, token=TOKEN)
            dropped = await nodes.drop_mailbox(session, base.url(1), ALICE, token=TOKEN)
            return thawed, dropped

    thawed, dropped = asyncio.run(clean_up())
    assert thawed is not None and dropped is not None and dropped.messages == 1
    assert not incoming.exists()
    assert len(node0.files.stored(ALICE)) == 1  # the source keeps the mail, as for any deleted Mailbox
