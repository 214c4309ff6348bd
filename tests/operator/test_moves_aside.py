"""Mailbox moves running beside the reconciles (reconcile/moves.py, reconcile/movegate.py) on the emulated
API with fake nodes (tests/operator/fakenode.py FakeCluster): an operator stopped inside the one task that
runs a move from its freeze to its cleanup resumes from the recorded step and goes forward; a Mailbox
deleted mid-move leaves no copy behind on the target (before the flip) nor on the source (after it), its
deletion held by the mailfleet.io/move finalizer until then, also when the operator is restarted between
the deletion and the clean-up; a moving Mailbox deleted with its MailDomain is not held; backups and moves
take turns, so a mailbox is in exactly one node's backup point (a backup waits for a move inside its
window, a move waits to freeze while a backup takes its points)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mailfleet import k8s
from mailfleet.reconcile.finalizer import FINALIZER
from mailfleet.specs import placement
from tests.operator.conftest import (
    MAILBACKUP,
    MAILBOX,
    MAILDOMAIN,
    NAMESPACE,
    eventually,
    mailbackup,
    phase_of,
    run_operator,
    settled,
)
from tests.operator.fakenode import FakeCluster
from tests.operator.test_moves import (
    PEOPLE,
    WITHIN,
    _domain,
    _gate_reached,
    _homes,
    _move_of,
    _nodes_ready,
    _settled_homes,
    _true,
)
from tests.operator.test_moves import cluster as _cluster

cluster = _cluster  # the fixture: five fake nodes, the domain's internal Secret holding their token

PEOPLE3 = PEOPLE[:3]
NAME, ADDRESS = PEOPLE3[0], f"{PEOPLE3[0]}@example.com"
HOME = placement.rendezvous(ADDRESS, 3)
TARGET = (HOME + 1) % 3


def _fast(fakes: FakeCluster) -> dict[str, Any]:
    return {"node_url": fakes.template, "backup_poll": 0.05, "backup_retry": 0.05}


async def _ready_domain(client: k8s.Client, fakes: FakeCluster, operator: Any) -> dict[str, int]:
    homes = await eventually(lambda: _homes(client, len(PEOPLE3)), within=WITHIN, what="the directory")
    fakes.place(homes)
    await _nodes_ready(client, 3)
    await settled(operator)
    return homes


async def _force(client: k8s.Client, name: str, ordinal: int) -> None:
    await client.patch(MAILBOX, NAMESPACE, name, {"metadata": {"annotations": {"mailfleet.io/move-to": str(ordinal)}}})


async def _held(client: k8s.Client, fakes: FakeCluster, operator: Any, *, on: int, what: str) -> dict[str, int]:
    """The domain ready, alice forced to TARGET, and her move held where node `on`'s gate holds it; the homes."""
    homes = await _ready_domain(client, fakes, operator)
    await _force(client, NAME, TARGET)
    await eventually(lambda: _gate_reached(fakes, on), within=WITHIN, what=what)
    return homes


def _calls(fakes: FakeCluster, ordinal: int, method: str, suffix: str) -> list[float]:
    """When node `ordinal` answered `method` on a path ending in `suffix`, successfully."""
    return [
        c.at for c in fakes.nodes[ordinal].calls if c.method == method and c.path.endswith(suffix) and c.status < 300
    ]


@pytest.mark.parametrize(("gate", "on", "step"), [("/home", TARGET, "Flipping"), ("/mailboxes", HOME, "Cleaning")])
async def test_an_operator_stopped_inside_the_freeze_task_resumes_forward(api, client, cluster, gate, on, step):
    """Stopped while the flip's PUT home waits at the target (some nodes have the new home, some not), or
    while the drop waits at the source: the next operator goes on from the recorded step, without a
    first copy again, and the mailbox ends on its new home only, thawed."""
    opened = asyncio.Event()
    cluster.nodes[on].gate = (gate, opened)
    await _domain(client, 3, people=PEOPLE3)
    async with run_operator(node_url=cluster.template) as operator:
        homes = await _held(client, cluster, operator, on=on, what=f"the move held at {gate}")
        assert await _move_of(client, NAME, step) is not None
    first_copies = [final for moved, final in cluster.nodes[TARGET].copies if moved == ADDRESS].count(False)
    opened.set()
    async with run_operator(node_url=cluster.template):
        await eventually(
            lambda: _settled_homes(client, {**homes, ADDRESS: TARGET}), within=WITHIN, what="alice on her new node"
        )
    assert [final for moved, final in cluster.nodes[TARGET].copies if moved == ADDRESS].count(False) == first_copies
    assert cluster.holders()[ADDRESS] == [TARGET]
    assert not cluster.nodes[HOME].frozen
    obj = await client.get(MAILBOX, NAMESPACE, NAME)
    assert obj["status"]["node"] == f"example-com-{TARGET}"
    assert not obj["metadata"].get("finalizers")  # the move's, gone with it


@pytest.mark.parametrize(
    ("gate", "on", "step", "left"),
    [
        ("/moves final=True", TARGET, "CatchingUp", HOME),  # before the flip: the target's copy goes
        ("/home", TARGET, "Flipping", TARGET),  # flipped when the record fails: the source's old copy goes
        ("/mailboxes", HOME, "Cleaning", TARGET),  # the drop under way: the move ends as it would
    ],
)
async def test_a_mailbox_deleted_mid_move_leaves_no_copy_behind(api, client, cluster, gate, on, step, left):
    opened = asyncio.Event()
    cluster.nodes[on].gate = (gate, opened)
    await _domain(client, 3, people=PEOPLE3)
    async with run_operator(node_url=cluster.template) as operator:
        homes = await _held(client, cluster, operator, on=on, what=f"the move held at {gate}")
        assert await _move_of(client, NAME, step) is not None
        assert sorted(cluster.holders()[ADDRESS]) == sorted({HOME, TARGET})  # both nodes hold it now

        await client.delete(MAILBOX, NAMESPACE, NAME)
        rest = {a: h for a, h in homes.items() if a != ADDRESS}
        await eventually(lambda: _homes_are(client, rest), within=WITHIN, what="alice out of the directory")
        assert await _held_for_clean_up(client, NAME)  # the deletion waits for the clean-up
        opened.set()
        await eventually(lambda: _left_on(cluster, left), within=WITHIN, what=f"alice only on node {left}")
        await eventually(lambda: _gone(client, NAME), within=WITHIN, what="the Mailbox gone, its finalizer let go")
        await eventually(lambda: _settled_homes(client, rest), within=WITHIN, what="no Mailbox moving")
        metrics = operator.running().ctx.metrics
    assert metrics.moves.labels("done")._value.get() == 0


async def _left_on(fakes: FakeCluster, ordinal: int) -> bool:
    """The mailbox is stored on node `ordinal` only, its source thawed, and no clean-up still runs."""
    return fakes.holders().get(ADDRESS) == [ordinal] and not fakes.nodes[HOME].frozen


async def _homes_are(client: k8s.Client, expected: dict[str, int]) -> dict[str, int] | None:
    """The directory's homes once they are `expected` (a Mailbox being deleted may still be moving)."""
    homes = await _homes(client, len(expected))
    return homes if homes == expected else None


async def _gone(client: k8s.Client, name: str) -> bool:
    return await client.get(MAILBOX, NAMESPACE, name) is None


async def _held_for_clean_up(client: k8s.Client, name: str) -> dict[str, Any] | None:
    """The Mailbox, being deleted, still there: its move's finalizer holds it."""
    obj = await client.get(MAILBOX, NAMESPACE, name)
    if obj is None or not obj["metadata"].get("deletionTimestamp"):
        return None
    return obj if obj["metadata"].get("finalizers") == [FINALIZER] else None


@pytest.mark.parametrize(("gate", "step"), [("/moves final=False", "Copying"), ("/moves final=True", "CatchingUp")])
async def test_a_mailbox_deleted_before_an_operator_restart_is_cleaned_up_by_the_next(api, client, cluster, gate, step):
    """The operator stopped after the Mailbox's deletion and before the clean-up (the first copy, or the
    final one, held at the target): the finalizer keeps the Mailbox, being deleted, with its status.move;
    the next operator rolls the move back from the recorded step (the target's copy dropped, the source
    thawed), then lets the finalizer go, and the Mailbox is gone."""
    opened = asyncio.Event()
    cluster.nodes[TARGET].gate = (gate, opened)
    await _domain(client, 3, people=PEOPLE3)
    async with run_operator(node_url=cluster.template) as operator:
        homes = await _held(client, cluster, operator, on=TARGET, what=f"the move held at {gate}")
        assert await _move_of(client, NAME, step) is not None
        assert (await client.get(MAILBOX, NAMESPACE, NAME))["metadata"]["finalizers"] == [FINALIZER]
        await client.delete(MAILBOX, NAMESPACE, NAME)
        rest = {a: h for a, h in homes.items() if a != ADDRESS}
        await eventually(lambda: _homes_are(client, rest), within=WITHIN, what="alice out of the directory")
    left = await _held_for_clean_up(client, NAME)
    assert left is not None, "the deleted Mailbox is held by its move's finalizer"
    assert left["status"]["move"]["step"] == step
    # The stopped operator's copy request goes through now (the copy kept aside on the target).
    opened.set()
    await eventually(lambda: _true(cluster.nodes[TARGET].gate_waiting == 0), within=WITHIN, what="the gate left")
    assert TARGET in cluster.holders()[ADDRESS]

    async with run_operator(node_url=cluster.template) as operator:
        await eventually(lambda: _gone(client, NAME), within=WITHIN, what="the Mailbox gone, its finalizer let go")
        metrics = operator.running().ctx.metrics
    assert cluster.holders()[ADDRESS] == [HOME]
    assert not cluster.nodes[HOME].frozen
    assert metrics.moves.labels("abandoned")._value.get() == 1


@pytest.mark.parametrize("restarted", [False, True], ids=["running", "restarted"])
async def test_a_moving_mailbox_deleted_with_its_maildomain_is_not_held(api, client, cluster, restarted):
    """An uninstall (or a namespace deleted) deletes the MailDomain and its Mailboxes together: with the
    domain go its nodes, and nobody would clean up the move, so its finalizer goes at once (the copies
    stay on the volumes the StatefulSet leaves, with the domain's other mail); also when the operator
    was not running at the deletion and starts after it. Nothing is asked of the nodes meanwhile."""
    opened = asyncio.Event()  # opened at the end only (the fake nodes stop once no request waits)
    cluster.nodes[TARGET].gate = ("/moves final=True", opened)
    await _domain(client, 3, people=PEOPLE3)
    try:
        async with run_operator(node_url=cluster.template) as operator:
            await _held(client, cluster, operator, on=TARGET, what="the move held at the final copy")
            assert await _move_of(client, NAME, "CatchingUp") is not None
            if not restarted:
                await client.delete(MAILDOMAIN, NAMESPACE, "example-com")
                await client.delete(MAILBOX, NAMESPACE, NAME)
                await eventually(lambda: _gone(client, NAME), within=WITHIN, what="the Mailbox gone")
        if restarted:
            await client.delete(MAILDOMAIN, NAMESPACE, "example-com")
            await client.delete(MAILBOX, NAMESPACE, NAME)
            assert await _held_for_clean_up(client, NAME)  # no operator to let it go
            async with run_operator(node_url=cluster.template):
                await eventually(lambda: _gone(client, NAME), within=WITHIN, what="the Mailbox gone")
    finally:
        opened.set()


async def test_a_mailbox_deleted_while_its_move_waits_for_a_node_is_cleaned_up(api, client, cluster):
    """The flip's PUT home cannot reach a third node (503): the move's task ended, waiting to try again.
    The Mailbox deleted then: a reconcile finds the move it remembers and rolls it back, the target's
    kept-aside copy dropped."""
    address = next(a for a in (f"{n}@example.com" for n in PEOPLE3) if placement.rendezvous(a, 3) != 2)
    name, home, target = address.split("@")[0], placement.rendezvous(address, 3), 2
    third = 3 - home - target  # below the target: its PUT home comes first, and fails
    await _domain(client, 3, people=PEOPLE3)
    async with run_operator(node_url=cluster.template) as operator:
        homes = await _ready_domain(client, cluster, operator)
        cluster.nodes[third].unavailable = 10**9
        await _force(client, name, target)
        await eventually(lambda: _blocked_at(client, name, "Flipping"), within=WITHIN, what="the flip waiting")
        assert sorted(cluster.holders()[address]) == sorted({home, target})

        await client.delete(MAILBOX, NAMESPACE, name)
        rest = {a: h for a, h in homes.items() if a != address}
        await eventually(lambda: _homes_are(client, rest), within=WITHIN, what="the mailbox out of the directory")
        metrics = operator.running().ctx.metrics
        await eventually(
            lambda: _true(metrics.moves.labels("abandoned")._value.get() == 1), within=WITHIN, what="cleaned up"
        )
        await eventually(lambda: _gone(client, name), within=WITHIN, what="the Mailbox gone, its finalizer let go")
    assert cluster.holders()[address] == [home]
    assert not cluster.nodes[home].frozen


async def _blocked_at(client: k8s.Client, name: str, step: str) -> dict[str, Any] | None:
    move = await _move_of(client, name, step)
    return move if move is not None and "waiting for a node" in str(move.get("message")) else None


async def test_a_backup_waits_for_a_move_inside_its_window(api, client, cluster):
    """The move holds at its cleanup (both nodes hold the mailbox): a backup asked now takes no point
    until the old copy is dropped, so the mailbox is in exactly one node's archive."""
    opened = asyncio.Event()
    cluster.nodes[HOME].gate = ("/mailboxes", opened)
    await _domain(client, 3, people=PEOPLE3)
    async with run_operator(**_fast(cluster)) as operator:
        await _held(client, cluster, operator, on=HOME, what="the move held at its cleanup")
        await client.create(mailbackup("b1", method="Archive"))
        gate = operator.running().ctx.moving_of((NAMESPACE, "example-com")).gate
        await eventually(lambda: _true(gate.waiting == 1), within=WITHIN, what="the backup waiting for the move")
        assert all(not _calls(cluster, i, "POST", "/backups") for i in range(3))  # no point taken yet

        opened.set()
        done = await eventually(lambda: phase_of(client, "b1", "Completed"), within=WITHIN, what="the backup")
    dropped = max(_calls(cluster, HOME, "DELETE", f"/mailboxes/{ADDRESS}"))
    assert min(at for i in range(3) for at in _calls(cluster, i, "POST", "/backups")) >= dropped
    assert len(done["status"]["snapshots"]) == 3
    assert cluster.holders()[ADDRESS] == [TARGET]


async def test_a_move_waits_to_freeze_while_a_backup_takes_its_points(api, client, cluster):
    """A backup's archives are being written (node 0's held by the test): a move asked now copies, then
    waits, its status saying why, and freezes only once every node's point is taken."""
    cluster.nodes[0].archive_seconds = 10**6  # written when the test says
    await _domain(client, 3, people=PEOPLE3)
    async with run_operator(**_fast(cluster)) as operator:
        homes = await _ready_domain(client, cluster, operator)
        await client.create(mailbackup("b2", method="Archive"))
        await eventually(lambda: _true(bool(_calls(cluster, 0, "POST", "/backups"))), within=WITHIN, what="archive")
        await _force(client, NAME, TARGET)
        waiting = await eventually(lambda: _move_of(client, NAME, "Freezing"), within=WITHIN, what="Freezing")
        waiting = await eventually(
            lambda: _says(client, "waiting for a backup"), within=WITHIN, what="the move waiting for the backup"
        )
        assert not _calls(cluster, HOME, "POST", f"/mailboxes/{ADDRESS}/freeze")

        cluster.nodes[0]._archive_written("b2")
        await eventually(lambda: phase_of(client, "b2", "Completed"), within=WITHIN, what="the backup")
        await eventually(
            lambda: _settled_homes(client, {**homes, ADDRESS: TARGET}), within=WITHIN, what="alice on her new node"
        )
    last_point = max(at for i in range(3) for at in _calls(cluster, i, "GET", "/backups/b2"))
    assert min(_calls(cluster, HOME, "POST", f"/mailboxes/{ADDRESS}/freeze")) >= last_point
    assert waiting["step"] == "Freezing"
    assert (await client.get(MAILBACKUP, NAMESPACE, "b2"))["status"]["phase"] == "Completed"


async def _says(client: k8s.Client, text: str) -> dict[str, Any] | None:
    move = await _move_of(client, NAME)
    return move if move is not None and text in str(move.get("message")) else None
