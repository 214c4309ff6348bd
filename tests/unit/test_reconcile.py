"""The operator's keyed work queue and its status bookkeeping (pure asyncio, no API server)."""

from __future__ import annotations

import asyncio
from typing import Any

from mailfleet import k8s, kube_types
from mailfleet.k8s.events import Recorder
from mailfleet.metrics import OperatorMetrics
from mailfleet.reconcile import conditions, mailboxes
from mailfleet.reconcile.conditions import Condition
from mailfleet.reconcile.context import Context
from mailfleet.reconcile.passwords import PasswordHasher
from mailfleet.reconcile.workqueue import WorkQueue


async def test_keys_added_while_waiting_run_once() -> None:
    runs: list[str] = []

    async def work(key: str) -> None:
        runs.append(key)

    queue: WorkQueue[str] = WorkQueue(work, delay=0.05)
    queue.start()
    for _ in range(100):
        queue.add("a")
    queue.add("b")
    await asyncio.wait_for(queue.idle(), 5)
    await queue.stop()
    assert sorted(runs) == ["a", "b"]


async def test_a_key_never_runs_twice_at_once_and_runs_again_when_added_meanwhile() -> None:
    running: set[str] = set()
    overlaps = 0
    runs = 0
    started = asyncio.Event()

    async def work(key: str) -> None:
        nonlocal overlaps, runs
        overlaps += key in running
        running.add(key)
        runs += 1
        started.set()
        await asyncio.sleep(0.05)
        running.discard(key)

    queue: WorkQueue[str] = WorkQueue(work, workers=4, delay=0)
    queue.start()
    queue.add("a")
    await asyncio.wait_for(started.wait(), 5)
    for _ in range(10):  # while "a" runs: one more run afterwards, not ten, and never alongside
        queue.add("a")
    await asyncio.wait_for(queue.idle(), 5)
    await queue.stop()
    assert (runs, overlaps) == (2, 0)


async def test_a_failing_key_is_retried_until_it_succeeds() -> None:
    attempts = 0

    async def work(key: str) -> None:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise RuntimeError("API unavailable")

    queue: WorkQueue[str] = WorkQueue(work, delay=0, retry=0.01)
    queue.start()
    queue.add("a")
    await asyncio.wait_for(queue.idle(), 5)
    await queue.stop()
    assert attempts == 3


def test_a_condition_keeps_its_transition_time_while_its_status_holds() -> None:
    first = conditions.merge([], [Condition("Ready", "False", "NodesNotReady", "0/1")], generation=1, at="T1")
    same = conditions.merge(first, [Condition("Ready", "False", "NodesNotReady", "0/1")], generation=1, at="T2")
    assert same == first and conditions.same(first, same)
    reworded = conditions.merge(first, [Condition("Ready", "False", "Unsupported", "no")], generation=2, at="T3")
    assert reworded[0]["lastTransitionTime"] == "T1" and reworded[0]["observedGeneration"] == 2
    flipped = conditions.merge(first, [Condition("Ready", "True", "NodesReady", "1/1")], generation=1, at="T4")
    assert flipped[0]["lastTransitionTime"] == "T4"


def test_an_object_differs_only_in_the_fields_the_operator_sets() -> None:
    desired = {"spec": {"ports": [{"port": 25}], "type": "ClusterIP"}}
    defaulted = {"spec": {"ports": [{"port": 25, "protocol": "TCP"}], "type": "ClusterIP", "clusterIP": "10.0.0.1"}}
    assert k8s.contains(defaulted, desired)
    assert not k8s.contains({"spec": {"ports": [{"port": 26}], "type": "ClusterIP"}}, desired)
    assert not k8s.contains({"spec": {"ports": [{"port": 25}, {"port": 587}], "type": "ClusterIP"}}, desired)


class _RecordingClient:
    """Stands in for the API client: records the status patches a reconcile sends."""

    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []
        self.created: list[dict[str, Any]] = []

    async def patch(self, kind: Any, namespace: str, name: str, body: dict[str, Any], **_: Any) -> dict[str, Any]:
        self.patches.append(body)
        return body

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.created.append(obj)
        return obj


async def test_a_mailbox_status_is_written_once_though_the_index_still_shows_the_old_one() -> None:
    client = _RecordingClient()
    ctx = Context(
        client=client,  # type: ignore[arg-type]
        recorder=Recorder(client),  # type: ignore[arg-type]
        view=None,  # type: ignore[arg-type]
        image="x",
        hasher=PasswordHasher(),
        metrics=OperatorMetrics(),
    )
    stale: kube_types.Mailbox = {
        "metadata": {"name": "alice", "namespace": "mail", "uid": "u1", "generation": 1},
        "status": {},
    }
    served = Condition("Ready", "True", "Served", "in the directory of MailDomain example-com")
    await mailboxes.write_status(ctx, stale, served)
    await mailboxes.write_status(ctx, stale, served)  # the index has not seen the first write yet
    assert len(client.patches) == 1
    assert [event["reason"] for event in client.created] == ["Served"]
    # A new generation is written, and so is a new reason (with its Event).
    await mailboxes.write_status(ctx, {**stale, "metadata": {**stale["metadata"], "generation": 2}}, served)
    await mailboxes.write_status(ctx, stale, Condition("Ready", "False", "SecretNotFound", "gone"))
    assert len(client.patches) == 3
    assert [event["reason"] for event in client.created] == ["Served", "SecretNotFound"]
