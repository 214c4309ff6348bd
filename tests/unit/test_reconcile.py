"""The operator's keyed work queue and its status bookkeeping (pure asyncio, no API server)."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from mailfleet import api, k8s, kube_types
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


async def test_a_key_rests_after_a_run_as_long_as_the_run_took_times_spacing() -> None:
    runs: list[tuple[float, float]] = []  # (start, end)
    started = asyncio.Event()

    async def work(key: str) -> None:
        begin = time.monotonic()
        started.set()
        await asyncio.sleep(0.2)
        runs.append((begin, time.monotonic()))

    queue: WorkQueue[str] = WorkQueue(work, delay=0, spacing=1.5)
    queue.start()
    queue.add("a")
    await asyncio.wait_for(started.wait(), 5)
    queue.add("a")  # while it runs
    await asyncio.wait_for(queue.idle(), 10)
    queue.add("a")  # after it ran
    await asyncio.wait_for(queue.idle(), 10)
    await queue.stop()
    assert len(runs) == 3
    for (begin, end), (next_begin, _) in itertools.pairwise(runs):
        assert next_begin >= end + 1.5 * (end - begin)


async def test_keys_run_in_the_order_they_became_due() -> None:
    order: list[int] = []

    async def work(key: int) -> None:
        order.append(key)

    queue: WorkQueue[int] = WorkQueue(work, workers=1, delay=0)
    for key in range(2000):  # ten thousand Mailboxes' status writes wait in this queue: picked in turn
        queue.add(key)
    queue.add(5)  # already waiting: keeps its place
    queue.start()
    await asyncio.wait_for(queue.idle(), 5)
    await queue.stop()
    assert order == list(range(2000))


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
    """Stands in for the API client: records the status patches a reconcile sends. `hold`, when set, keeps
    each patch waiting until it is set again; `refuse` answers that many patches with 503."""

    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []
        self.created: list[dict[str, Any]] = []
        self.hold: asyncio.Event | None = None
        self.refuse = 0
        self.arrived = asyncio.Event()  # set by each patch taken

    async def patch(self, kind: Any, namespace: str, name: str, body: dict[str, Any], **_: Any) -> dict[str, Any]:
        if self.refuse:
            self.refuse -= 1
            raise k8s.ApiError(503, "ServiceUnavailable", "etcd is busy")
        self.patches.append(body)
        self.arrived.set()
        if self.hold is not None:
            await self.hold.wait()
        return body

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.created.append(obj)
        return obj


async def written(ctx: Context, body: kube_types.Mailbox, condition: Condition) -> None:
    """A status handed to the writer, and the writer done with it."""
    mailboxes.write_status(ctx, body, condition)
    await asyncio.wait_for(ctx.statuses.idle(), 5)


def recording_context(client: _RecordingClient) -> Context:
    return Context(
        client=client,  # type: ignore[arg-type]
        recorder=Recorder(client),  # type: ignore[arg-type]
        view=None,  # type: ignore[arg-type]
        image="x",
        hasher=PasswordHasher(),
        metrics=OperatorMetrics(),
    )


async def test_a_mailbox_status_is_written_once_though_the_index_still_shows_the_old_one() -> None:
    client = _RecordingClient()
    ctx = recording_context(client)
    stale: kube_types.Mailbox = {
        "metadata": {"name": "alice", "namespace": "mail", "uid": "u1", "generation": 1},
        "status": {},
    }
    served = Condition("Ready", "True", "Served", "in the directory of MailDomain example-com")
    await written(ctx, stale, served)
    await written(ctx, stale, served)  # the index has not seen the first write yet
    assert len(client.patches) == 1
    assert [event["reason"] for event in client.created] == ["Served"]
    # A new generation is written, and so is a new reason (with its Event).
    await written(ctx, {**stale, "metadata": {**stale["metadata"], "generation": 2}}, served)
    await written(ctx, stale, Condition("Ready", "False", "SecretNotFound", "gone"))
    assert len(client.patches) == 3
    assert [event["reason"] for event in client.created] == ["Served", "SecretNotFound"]


def _ready_reason(patch: dict[str, Any]) -> str:
    return str(conditions.find(patch["status"]["conditions"], "Ready")["reason"])  # type: ignore[index]


async def test_the_latest_verdict_of_a_mailbox_is_written_and_never_two_at_once() -> None:
    client = _RecordingClient()
    client.hold = asyncio.Event()
    ctx = recording_context(client)
    body: kube_types.Mailbox = {"metadata": {"name": "alice", "namespace": "mail", "uid": "u1", "generation": 1}}
    mailboxes.write_status(ctx, body, Condition("Ready", "False", "SecretNotFound", "no Secret"))
    await asyncio.wait_for(client.arrived.wait(), 5)  # the first write is on its way
    # Decided while it is in flight: the second is overtaken by the third, which is written after it.
    mailboxes.write_status(ctx, body, Condition("Ready", "False", "SecretKeyNotFound", "no key"))
    mailboxes.write_status(ctx, body, Condition("Ready", "False", "AddressConflict", "taken"))
    await asyncio.sleep(0.05)
    assert len(client.patches) == 1
    client.hold.set()
    await asyncio.wait_for(ctx.statuses.idle(), 5)
    assert [_ready_reason(p) for p in client.patches] == ["SecretNotFound", "AddressConflict"]
    assert len(ctx.statuses) == 0
    await ctx.statuses.stop()


async def test_a_status_write_the_api_refuses_is_tried_again() -> None:
    client = _RecordingClient()
    client.refuse = 1
    ctx = recording_context(client)
    body: kube_types.Mailbox = {"metadata": {"name": "alice", "namespace": "mail", "uid": "u1", "generation": 1}}
    mailboxes.write_status(ctx, body, Condition("Ready", "False", "SecretNotFound", "no Secret"))
    await asyncio.wait_for(ctx.statuses.idle(), 10)
    assert [_ready_reason(p) for p in client.patches] == ["SecretNotFound"]
    assert [event["reason"] for event in client.created] == ["SecretNotFound"]
    await ctx.statuses.stop()


async def test_a_verdict_the_status_says_already_is_not_queued_and_a_shown_write_is_forgotten() -> None:
    client = _RecordingClient()
    ctx = recording_context(client)
    served = Condition("Ready", "True", "Served", "in the directory of MailDomain example-com")
    body: kube_types.Mailbox = {"metadata": {"name": "alice", "namespace": "mail", "uid": "u1", "generation": 1}}
    await written(ctx, body, served)
    assert len(ctx.statuses.remembered) == 1  # the watch has not shown the write yet
    shown: kube_types.Mailbox = {**body, "status": client.patches[0]["status"]}
    mailboxes.write_status(ctx, shown, served)  # the next reconcile's verdict, on the body the watch shows now
    assert len(ctx.statuses) == 0  # nothing to write: not even queued
    assert ctx.statuses.remembered == {}  # and nothing left to remember
    assert len(client.patches) == 1
    await ctx.statuses.stop()


def test_remembered_mailbox_models_share_their_fields_sets_and_read_as_validated() -> None:
    ctx = recording_context(_RecordingClient())
    models = []
    for n, extra in enumerate(({}, {}, {"aliases": ["a@example.com"]})):
        spec = {"address": f"u{n}@example.com", "passwordSecretRef": {"name": f"u{n}"}, **extra}
        body: kube_types.Mailbox = {
            "apiVersion": "mailfleet.io/v1alpha1",
            "kind": "Mailbox",
            "metadata": {"name": f"u{n}", "namespace": "mail", "uid": f"uid{n}", "generation": 1},
            "spec": spec,  # type: ignore[typeddict-item]
        }
        model, invalid = mailboxes._parse(ctx, body)
        assert model is not None and invalid == ""
        fresh = api.Mailbox.model_validate({**body, "metadata": {"name": f"u{n}", "namespace": "mail"}})
        assert model.spec == fresh.spec  # what the reconcile reads, unchanged
        assert model.spec.model_fields_set == fresh.spec.model_fields_set
        assert model.model_dump(exclude_unset=True, exclude={"status"}) == fresh.model_dump(
            exclude_unset=True, exclude={"status"}
        )
        models.append(model)
    first, second, third = models
    # one set per content, not one per model
    assert first.spec.model_fields_set is second.spec.model_fields_set
    assert first.metadata.model_fields_set is second.metadata.model_fields_set
    assert first.spec.password_secret_ref.model_fields_set is third.spec.password_secret_ref.model_fields_set
    assert third.spec.model_fields_set is not first.spec.model_fields_set  # it set aliases too
    assert "aliases" in third.spec.model_fields_set and "aliases" not in first.spec.model_fields_set
    copied = first.model_copy(update={"kind": "Mailbox"})  # a copy's set is its own: the shared one stays
    assert copied.model_fields_set is not first.model_fields_set
    assert mailboxes._parse(ctx, body)[0] is third  # remembered: not validated again


async def test_a_written_status_is_remembered_as_the_watch_shows_it() -> None:
    client = _RecordingClient()
    ctx = recording_context(client)
    served = Condition("Ready", "True", "Served", "in the directory of MailDomain example-com")
    body: kube_types.Mailbox = {"metadata": {"name": "alice", "namespace": "mail", "uid": "u1", "generation": 1}}
    await written(ctx, body, served)
    ctx.statuses.shown(body)  # an event from before the write: the written status is remembered
    assert ctx.statuses.remembered["u1"] == client.patches[0]["status"]
    shown: kube_types.Mailbox = {**body, "status": client.patches[0]["status"].copy()}
    ctx.statuses.shown(shown)
    assert ctx.statuses.remembered["u1"] is shown["status"]  # the watch's own copy, not a second one
    # A reconcile that read the Mailbox before the write still writes nothing.
    mailboxes.write_status(ctx, body, served)
    assert len(ctx.statuses) == 0
    await asyncio.wait_for(ctx.statuses.idle(), 5)
    assert len(client.patches) == 1
    await ctx.statuses.stop()
