"""Mailbox moves on the emulated API (issue 15; reconcile/moves.py), the operator driving fake nodes
(tests/operator/fakenode.py FakeCluster) over HTTP: 3 -> 5 -> 2 replicas moves exactly the rendezvous
difference, at most spec.moves.parallel at once, the StatefulSet growing before and shrinking after the
moves; an operator stopped mid-move resumes from the step Mailbox.status records; a forced move by the
mailfleet.io/move-to annotation (and a bad one refused with an Event); a scale-down whose target node does
not answer waits, says so in Progressing, and loses nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mailfleet import k8s
from mailfleet.specs import placement
from tests.operator.conftest import (
    MAILBOX,
    MAILDOMAIN,
    NAMESPACE,
    STATEFULSET,
    condition,
    directory,
    events,
    eventually,
    mailbox,
    maildomain,
    run_operator,
    secret,
    settled,
)
from tests.operator.fakenode import FakeCluster, internal_secret

PEOPLE = [f"user{i:02d}" for i in range(12)]
ADDRESSES = [f"{name}@example.com" for name in PEOPLE]
# Generous: a move waits for the nodes, the reconciles and the status writes, on a loaded machine.
WITHIN = 120.0


@pytest.fixture
async def cluster(client: k8s.Client) -> AsyncIterator[FakeCluster]:
    fakes = FakeCluster(5)
    await client.create(internal_secret("example-com", fakes.nodes[0].token, namespace=NAMESPACE))
    await fakes.start()
    yield fakes
    await fakes.stop()


async def _domain(client: k8s.Client, replicas: int, *, people: list[str] = PEOPLE, **spec: Any) -> None:
    await client.create(secret("password", password="pw"))
    await client.create(maildomain(replicas=replicas, **spec))
    for name in people:
        await client.create(mailbox(name, f"{name}@example.com", "password"))


async def _nodes_ready(client: k8s.Client, replicas: int) -> None:
    """What the StatefulSet controller reports once `replicas` pods run the current spec and are ready."""
    sts = await eventually(lambda: _replicas_are(client, replicas), within=WITHIN, what=f"{replicas} replicas")
    revision = f"example-com-{sts['metadata'].get('generation')}"
    await client.patch(
        STATEFULSET,
        NAMESPACE,
        "example-com",
        {
            "status": {
                "observedGeneration": sts["metadata"].get("generation"),
                "replicas": replicas,
                "readyReplicas": replicas,
                "updatedReplicas": replicas,
                "currentRevision": revision,
                "updateRevision": revision,
            }
        },
        subresource="status",
    )


async def _replicas_are(client: k8s.Client, replicas: int) -> dict[str, Any] | None:
    sts = await client.get(STATEFULSET, NAMESPACE, "example-com")
    return sts if sts is not None and sts["spec"]["replicas"] == replicas else None


async def _placed_over(client: k8s.Client, replicas: int, placed: int) -> dict[str, Any] | None:
    sts = await _replicas_are(client, replicas)
    annotations = (sts or {}).get("metadata", {}).get("annotations") or {}
    return sts if annotations.get("mailfleet.io/placed-over") == str(placed) else None


async def _homes(client: k8s.Client, count: int = len(PEOPLE)) -> dict[str, int] | None:
    entries = await directory(client)
    if len(entries) != count:
        return None
    return {address: int(entry.get("home", 0)) for address, entry in entries.items()}


async def _settled_homes(client: k8s.Client, expected: dict[str, int]) -> dict[str, int] | None:
    """The directory's homes once they are `expected` and no Mailbox is moving."""
    homes = await _homes(client, len(expected))
    if homes != expected:
        return None
    for obj in await client.list(MAILBOX, NAMESPACE):
        if (obj.get("status") or {}).get("move") or (obj.get("status") or {}).get("phase"):
            return None
    return homes


def _max_in_flight(fakes: FakeCluster) -> int:
    """The most mailboxes copied somewhere and not yet dropped at their source, at any moment, from the
    order of the fake nodes' answers (a move starts with its first copy, ends with the drop)."""
    calls = sorted(
        (call.at, index, call)
        for node in fakes.nodes
        for index, call in enumerate(node.calls)
        if call.status < 300 and ("/moves/" in call.path or (call.method == "DELETE" and call.path.count("/") == 3))
    )
    moving: set[str] = set()
    most = 0
    for _, _, call in calls:
        address = call.path.rsplit("/", 1)[1]
        if call.method == "POST":
            moving.add(address)
        else:
            moving.discard(address)
        most = max(most, len(moving))
    return most


async def test_three_to_five_to_two_moves_exactly_the_rendezvous_difference(api, client, cluster):
    await _domain(client, 3, moves={"parallel": 3})
    async with run_operator(node_url=cluster.template) as operator:
        three = await eventually(lambda: _homes(client), within=WITHIN, what="every mailbox in the directory")
        assert three == {a: placement.rendezvous(a, 3) for a in ADDRESSES}
        cluster.place(three)
        await _nodes_ready(client, 3)

        # 3 -> 5: the StatefulSet grows first; nothing moves until the new nodes are ready.
        await client.patch(MAILDOMAIN, NAMESPACE, "example-com", {"spec": {"replicas": 5}})
        await eventually(lambda: _replicas_are(client, 5), within=WITHIN, what="the StatefulSet grown to 5")
        await settled(operator)
        assert cluster.moved() == set(), "a move started before the new nodes were ready"
        domain = await client.get(MAILDOMAIN, NAMESPACE, "example-com")
        assert condition(domain, "Progressing")["reason"] == "MovingMailboxes"
        assert "wait until every node is ready" in condition(domain, "Progressing")["message"]

        await _nodes_ready(client, 5)
        five = {a: placement.rendezvous(a, 5) for a in ADDRESSES}
        await eventually(lambda: _settled_homes(client, five), within=WITHIN, what="the homes over 5 nodes")
        up = {a for a in ADDRESSES if five[a] != three[a]}
        assert up and cluster.moved() == up  # exactly the mailboxes whose rendezvous home changed
        assert cluster.holders() == {a: [five[a]] for a in ADDRESSES}  # each stored once, on its new home
        assert 1 < _max_in_flight(cluster) <= 3  # spec.moves.parallel
        await eventually(lambda: _placed_over(client, 5, 5), within=WITHIN, what="the homes balanced over 5 nodes")
        for name in PEOPLE:
            moved = await client.get(MAILBOX, NAMESPACE, name)
            assert moved["status"]["node"] == f"example-com-{five[f'{name}@example.com']}"
        alice = PEOPLE[ADDRESSES.index(sorted(up)[0])]
        await eventually(lambda: events(client, alice, "MoveFinished"), within=WITHIN, what="MoveFinished")
        assert [e["reason"] for e in await events(client, alice) if e["reason"].startswith("Move")] == [
            "MoveStarted",
            "MoveFinished",
        ]
        metrics = operator.running().ctx.metrics
        assert metrics.moves.labels("done")._value.get() == len(up)

        # 5 -> 2: every mailbox on nodes 2..4 moves off first; the StatefulSet keeps 5 nodes meanwhile.
        seen_replicas: list[int] = []

        async def look(_: str) -> None:
            seen_replicas.append((await client.get(STATEFULSET, NAMESPACE, "example-com"))["spec"]["replicas"])

        for node in cluster.nodes:
            node.on_move = look
            node.calls.clear()
        await client.patch(MAILDOMAIN, NAMESPACE, "example-com", {"spec": {"replicas": 2}})
        two = {a: placement.rendezvous(a, 2) for a in ADDRESSES}
        await eventually(lambda: _settled_homes(client, two), within=WITHIN, what="the homes over 2 nodes")
        down = {a for a in ADDRESSES if five[a] >= 2}
        assert down and cluster.moved() == down
        assert cluster.holders() == {a: [two[a]] for a in ADDRESSES}
        assert seen_replicas and set(seen_replicas) == {5}  # every move ran while the StatefulSet had 5 nodes
        await eventually(lambda: _placed_over(client, 2, 2), within=WITHIN, what="the StatefulSet shrunk to 2")
        await _nodes_ready(client, 2)
        await eventually(
            lambda: _progressing_is(client, "UpToDate"), within=WITHIN, what="Progressing False once all moved"
        )
        assert metrics.moves.labels("done")._value.get() == len(up) + len(down)
        assert metrics.mailboxes_moving.labels(NAMESPACE, "example-com")._value.get() == 0


async def _progressing_is(client: k8s.Client, reason: str) -> dict[str, Any] | None:
    domain = await client.get(MAILDOMAIN, NAMESPACE, "example-com")
    return domain if condition(domain, "Progressing").get("reason") == reason else None


async def _move_of(client: k8s.Client, name: str, step: str | None = None) -> dict[str, Any] | None:
    obj = await client.get(MAILBOX, NAMESPACE, name)
    move = ((obj or {}).get("status") or {}).get("move")
    return move if move and (step is None or move.get("step") == step) else None


async def test_a_forced_move_and_an_operator_stopped_mid_move_resumes_from_the_recorded_step(api, client, cluster):
    people = PEOPLE[:4]
    await _domain(client, 3, people=people)
    alice, address = people[0], f"{people[0]}@example.com"
    home = placement.rendezvous(address, 3)
    target = (home + 1) % 3
    gate = asyncio.Event()
    cluster.nodes[target].gate = ("/moves final=True", gate)  # the catch-up waits for the test

    async with run_operator(node_url=cluster.template) as operator:
        homes = await eventually(lambda: _homes(client, len(people)), within=WITHIN, what="the directory")
        cluster.place(homes)
        await _nodes_ready(client, 3)
        await settled(operator)
        # A bad annotation: an Event, nothing moves.
        await client.patch(MAILBOX, NAMESPACE, alice, {"metadata": {"annotations": {"mailfleet.io/move-to": "7"}}})
        (bad,) = await eventually(lambda: events(client, alice, "InvalidMoveTo"), what="InvalidMoveTo")
        assert bad["type"] == "Warning" and "from 0 to 2" in bad["message"]
        await settled(operator)
        assert cluster.moved() == set()

        await client.patch(
            MAILBOX, NAMESPACE, alice, {"metadata": {"annotations": {"mailfleet.io/move-to": str(target)}}}
        )
        move = await eventually(lambda: _move_of(client, alice, "CatchingUp"), within=WITHIN, what="CatchingUp")
        assert (move["from"], move["to"]) == (home, target)
        obj = await client.get(MAILBOX, NAMESPACE, alice)
        assert obj["status"]["phase"] == "Moving" and obj["status"]["node"] == f"example-com-{home}"
        await eventually(lambda: _gate_reached(cluster, target), within=WITHIN, what="the catch-up asked of the target")
    # The operator stopped in the middle of the catch-up: the status says where it was.
    assert (await _move_of(client, alice, "CatchingUp")) is not None
    copies_before = len(cluster.nodes[target].copies)
    assert cluster.nodes[target].copies[0] == (address, False)
    gate.set()

    async with run_operator(node_url=cluster.template):
        await eventually(
            lambda: _settled_homes(client, {**homes, address: target}), within=WITHIN, what="alice on her new node"
        )
        # The Event comes after the status that ends the move: the operator runs until it is posted.
        await eventually(lambda: events(client, alice, "MoveFinished"), within=WITHIN, what="MoveFinished")
    # resumed at the recorded step, the catch-up: no first copy again
    assert copies_before < len(cluster.nodes[target].copies)
    assert {final for _, final in cluster.nodes[target].copies[copies_before:]} == {True}
    assert cluster.holders()[address] == [target]
    obj = await client.get(MAILBOX, NAMESPACE, alice)
    assert obj["status"]["node"] == f"example-com-{target}" and "move" not in obj["status"]
    reasons = [e["reason"] for e in await events(client, alice) if e["reason"].startswith("Move")]
    assert reasons == ["MoveStarted", "MoveFinished"]


async def _gate_reached(cluster: FakeCluster, ordinal: int) -> bool:
    return cluster.nodes[ordinal].gate_waiting > 0


async def test_a_scale_down_whose_target_node_does_not_answer_waits_and_loses_nothing(api, client, cluster):
    people = PEOPLE[:8]
    addresses = [f"{name}@example.com" for name in people]
    await _domain(client, 3, people=people, moves={"parallel": 4})
    async with run_operator(node_url=cluster.template):
        three = await eventually(lambda: _homes(client, len(people)), within=WITHIN, what="the directory")
        cluster.place(three)
        await _nodes_ready(client, 3)
        down = {a for a in addresses if three[a] == 2}
        blocked = {a for a in down if placement.rendezvous(a, 2) == 0}
        assert blocked, "some mailbox of node 2 goes to node 0"
        cluster.nodes[0].unavailable = 10**9  # node 0 answers 503 to everything

        await client.patch(MAILDOMAIN, NAMESPACE, "example-com", {"spec": {"replicas": 2}})
        domain = await eventually(
            lambda: _progressing_is(client, "ScaleDownBlocked"), within=WITHIN, what="ScaleDownBlocked"
        )
        message = condition(domain, "Progressing")["message"]
        assert "keeps 3 nodes" in message and "HTTP 503" in message
        assert (await client.get(STATEFULSET, NAMESPACE, "example-com"))["spec"]["replicas"] == 3
        stuck = await client.get(MAILBOX, NAMESPACE, sorted(blocked)[0].split("@")[0])
        assert stuck["status"]["node"] == "example-com-2" and "HTTP 503" in stuck["status"]["move"]["message"]
        assert all(cluster.holders()[a] == [2] for a in blocked)  # still where it was: nothing lost

        cluster.nodes[0].unavailable = 0
        two = {a: placement.rendezvous(a, 2) for a in addresses}
        await eventually(lambda: _settled_homes(client, two), within=WITHIN, what="every mailbox off node 2")
        await eventually(lambda: _replicas_are(client, 2), within=WITHIN, what="the StatefulSet shrunk to 2")
        assert cluster.holders() == {a: [two[a]] for a in addresses}


async def test_a_move_the_target_refuses_is_rolled_back_and_the_mailbox_stays(api, client, cluster):
    people = PEOPLE[:3]
    await _domain(client, 3, people=people)
    name, address = people[0], f"{people[0]}@example.com"
    home = placement.rendezvous(address, 3)
    target = (home + 1) % 3
    cluster.nodes[target].refuse_moves = (422, "the copy does not fit the quota")  # 4xx: lasting
    async with run_operator(node_url=cluster.template) as operator:
        homes = await eventually(lambda: _homes(client, len(people)), within=WITHIN, what="the directory")
        cluster.place(homes)
        await _nodes_ready(client, 3)
        await client.patch(
            MAILBOX, NAMESPACE, name, {"metadata": {"annotations": {"mailfleet.io/move-to": str(target)}}}
        )
        (failed,) = await eventually(lambda: events(client, name, "MoveFailed"), within=WITHIN, what="MoveFailed")
        assert failed["type"] == "Warning" and "the copy does not fit the quota" in failed["message"]
        assert f"stays on node {home}" in failed["message"]
        metrics = operator.running().ctx.metrics
        await eventually(
            lambda: _true(metrics.moves.labels("rolled_back")._value.get() == 1), within=WITHIN, what="rolled back"
        )
        await eventually(lambda: _settled_homes(client, homes), within=WITHIN, what="no move under way")
        assert cluster.holders()[address] == [home] and not cluster.nodes[home].frozen
        obj = await client.get(MAILBOX, NAMESPACE, name)
        assert obj["status"]["node"] == f"example-com-{home}"
        assert metrics.moves.labels("done")._value.get() == 0


async def _true(value: bool) -> bool:
    return value


async def test_a_long_first_copy_does_not_hold_up_the_domain(api, client, cluster):
    """The first copy of a big mailbox takes minutes; meanwhile the domain is reconciled as usual: a new
    Mailbox is served and Ready while the copy still runs, and the move goes on once the copy ends."""
    people = PEOPLE[:3]
    await _domain(client, 3, people=people)
    alice, address = people[0], f"{people[0]}@example.com"
    home = placement.rendezvous(address, 3)
    target = (home + 1) % 3
    gate = asyncio.Event()
    cluster.nodes[target].gate = ("/moves final=False", gate)  # the first copy "takes" until the test says

    async with run_operator(node_url=cluster.template) as operator:
        homes = await eventually(lambda: _homes(client, len(people)), within=WITHIN, what="the directory")
        cluster.place(homes)
        await _nodes_ready(client, 3)
        await settled(operator)
        await client.patch(
            MAILBOX, NAMESPACE, alice, {"metadata": {"annotations": {"mailfleet.io/move-to": str(target)}}}
        )
        await eventually(lambda: _gate_reached(cluster, target), within=WITHIN, what="the first copy asked")

        await client.create(mailbox("newcomer", "newcomer@example.com", "password"))
        with_newcomer = await eventually(
            lambda: _homes(client, len(people) + 1), within=WITHIN, what="the newcomer in the directory"
        )
        newcomer = await eventually(lambda: _ready(client, "newcomer"), within=WITHIN, what="the newcomer Ready")
        assert condition(newcomer, "Ready")["reason"] == "Served"
        assert (await _move_of(client, alice, "Copying")) is not None  # the copy still runs
        assert cluster.nodes[target].gate_waiting == 1

        gate.set()
        await eventually(
            lambda: _settled_homes(client, {**with_newcomer, address: target}),
            within=WITHIN,
            what="alice on her new node",
        )
    assert cluster.holders()[address] == [target]
    assert [final for moved, final in cluster.nodes[target].copies if moved == address].count(False) == 1


async def _ready(client: k8s.Client, name: str) -> dict[str, Any] | None:
    obj = await client.get(MAILBOX, NAMESPACE, name)
    return obj if condition(obj, "Ready").get("status") == "True" else None
