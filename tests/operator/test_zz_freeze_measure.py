"""Throwaway measurement (not committed): the freeze of a forced move through the operator on the
emulated API with fake nodes, a domain of COUNT mailboxes; prints each move's freeze (the source's first
POST /freeze answered to its DELETE /freeze answered) and the operator process's CPU seconds."""

from __future__ import annotations

import os
import resource
import time

from mailfleet.specs import placement
from tests.operator.conftest import MAILBOX, NAMESPACE, eventually, run_operator, settled
from tests.operator.fakenode import FakeCluster, internal_secret
from tests.operator.test_moves import _domain, _homes, _nodes_ready, _settled_homes

COUNT = int(os.environ.get("COUNT", "300"))
MOVES = 3


async def test_measure_freeze(api, client):
    people = [f"u{i:04d}" for i in range(COUNT)]
    fakes = FakeCluster(3)
    await client.create(internal_secret("example-com", fakes.nodes[0].token, namespace=NAMESPACE))
    await fakes.start()
    try:
        await _domain(client, 3, people=people)
        async with run_operator(node_url=fakes.template) as operator:
            homes = await eventually(lambda: _homes(client, COUNT), within=600, what="directory")
            fakes.place(homes)
            await _nodes_ready(client, 3)
            await settled(operator)
            results = []
            for name in people[:MOVES]:
                address = f"{name}@example.com"
                source = homes[address]
                target = (source + 1) % 3
                for node in fakes.nodes:
                    node.calls.clear()
                cpu0 = time.process_time()
                await client.patch(MAILBOX, NAMESPACE, name, {"metadata": {"annotations": {"mailfleet.io/move-to": str(target)}}})
                homes = {**homes, address: target}
                await eventually(lambda: _settled_homes(client, homes), within=600, what="moved")
                calls = fakes.nodes[source].calls
                frozen = min(c.at for c in calls if c.method == "POST" and c.path.endswith(f"/mailboxes/{address}/freeze") and c.status == 200)
                thawed = max(c.at for c in calls if c.method == "DELETE" and c.path.endswith(f"/mailboxes/{address}/freeze") and c.status == 200)
                copy0 = min(c.at for c in fakes.nodes[target].calls if c.method == "POST" and c.path.endswith(f"/moves/{address}"))
                drop = max(c.at for c in calls if c.method == "DELETE" and c.path.endswith(f"/mailboxes/{address}"))
                results.append((thawed - frozen, drop - copy0, time.process_time() - cpu0))
            load = os.getloadavg()
            with open(os.environ.get("OUT", "/tmp/movesop/out.txt"), "a") as out:
                out.write(f"MEASURE count={COUNT} load={load[0]:.1f}\n")
                for freeze, whole, cpu in results:
                    out.write(f"MEASURE freeze={freeze:.3f}s copy-to-drop={whole:.3f}s cpu(test process)={cpu:.2f}s\n")
    finally:
        await fakes.stop()
