"""The outbound spool on a real file system: enqueued messages round-trip byte for byte under durable
names, concurrent enqueues share fsyncs and get unique ordered ids, the retry schedule runs on a fake
clock, recipient states survive a reopen, removal and deletion leave nothing behind, recovery removes
exactly what was never acknowledged, and a process killed at random moments loses no acknowledged
message and never makes a delivered recipient pending again."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import random
import signal
import sys
from pathlib import Path

import pytest

from mailnode.gateway import Gateway
from mailnode.queue.spool import QueuedMessage, Spool, UnknownMessage, expired, next_delay
from mailnode.store import durable
from tests.unit.conftest import FakeClock

REPO = Path(__file__).resolve().parents[2]


async def reopen(spool: Spool, gateway: Gateway, clock: FakeClock) -> Spool:
    await spool.close()
    again = Spool(spool.root, gateway=gateway, clock=clock)
    await again.open()
    return again


async def record(
    spool: Spool,
    id: str,
    address: str,
    *,
    delivered: bool = False,
    permanent: bool = False,
    error: str = "",
    next_attempt: float | None = None,
) -> QueuedMessage:
    return await spool.record_attempt(
        id, address, delivered=delivered, permanent=permanent, error=error, next_attempt=next_attempt
    )


async def fail_temporarily(spool: Spool, message: QueuedMessage, address: str) -> QueuedMessage:
    return await spool.record_attempt(
        message.id, address, delivered=False, permanent=False, error="451 4.3.0 try later", next_attempt=None
    )


# -- enqueue, list, read ------------------------------------------------------------------------------


async def test_enqueue_round_trip_survives_reopen(spool: Spool, gateway: Gateway, clock: FakeClock) -> None:
    data = b"From: a@example.com\r\nSubject: hi\r\n\r\nbody\r\n"
    message = await spool.enqueue("a@example.com", ["b@example.net", "c@example.org"], data)

    assert message.sender == "a@example.com"
    assert [r.address for r in message.recipients] == ["b@example.net", "c@example.org"]
    assert all(r.state == "pending" and r.attempts == 0 and r.next_attempt == clock.now for r in message.recipients)
    assert message.created == clock.now
    assert message.size == len(data)
    assert await spool.list() == [message]
    assert await spool.get(message.id) == message
    assert await spool.read(message.id) == data

    spool = await reopen(spool, gateway, clock)
    assert await spool.list() == [message]
    assert await spool.read(message.id) == data
    await spool.close()


async def test_a_hand_off_route_survives_reopen_and_old_envelopes_read_without_one(
    spool: Spool, gateway: Gateway, clock: FakeClock
) -> None:
    handed = await spool.enqueue("a@example.com", ["b@example.com"], b"data", route="node:1", handoff="0.tx")
    outbound = await spool.enqueue("a@example.com", ["c@example.net"], b"data")
    envelope = spool.root / "messages" / f"{outbound.id}.json"
    raw = json.loads(envelope.read_bytes())
    for recipient in raw["recipients"]:
        del recipient["route"]  # as written before clustering
    del raw["handoff"]  # as written before hand-off ids
    envelope.write_text(json.dumps(raw))

    spool = await reopen(spool, gateway, clock)
    by_id = {m.id: m for m in await spool.list()}
    assert by_id[handed.id].recipients[0].route == "node:1"
    assert by_id[handed.id].handoff == "0.tx"
    assert by_id[outbound.id].recipients[0].route == ""
    assert by_id[outbound.id].handoff == ""
    await spool.close()


async def test_null_sender_and_duplicate_recipients(spool: Spool) -> None:
    message = await spool.enqueue("", ["x@example.net", "x@example.net", "y@example.net"], b"bounce")
    assert message.sender == ""
    assert [r.address for r in message.recipients] == ["x@example.net", "y@example.net"]
    with pytest.raises(ValueError, match="recipient"):
        await spool.enqueue("a@example.com", [], b"nobody")
    assert await spool.list() == [message]


async def test_files_have_durable_names_and_no_tmp_is_left(spool: Spool) -> None:
    first = await spool.enqueue("a@example.com", ["b@example.net"], b"one")
    second = await spool.enqueue("", ["c@example.net"], b"two")

    assert list((spool.root / "tmp").iterdir()) == []
    names = sorted(p.name for p in (spool.root / "messages").iterdir())
    assert names == sorted(f"{m.id}.{ext}" for m in (first, second) for ext in ("eml", "json"))
    assert first.path.read_bytes() == b"one"
    envelope = json.loads((spool.root / "messages" / f"{second.id}.json").read_text())
    assert envelope["sender"] == ""
    assert [r["address"] for r in envelope["recipients"]] == ["c@example.net"]


async def test_concurrent_enqueues_get_unique_ordered_ids_and_share_fsyncs(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs = 0
    real_fsync_dir = durable.fsync_dir

    def counting_fsync_dir(path: Path) -> None:
        nonlocal fsyncs
        fsyncs += 1
        real_fsync_dir(path)

    monkeypatch.setattr(durable, "fsync_dir", counting_fsync_dir)
    bodies = [f"message {n}\r\n".encode() * (n + 1) for n in range(50)]
    messages = await asyncio.gather(
        *(spool.enqueue("a@example.com", [f"r{n}@example.net"], b) for n, b in enumerate(bodies))
    )

    ids = [m.id for m in messages]
    assert len(set(ids)) == 50
    assert ids == sorted(ids)  # gather starts them in order; ids follow enqueue order
    assert [m.id for m in await spool.list()] == ids
    for message, body in zip(messages, bodies, strict=True):
        assert await spool.read(message.id) == body
    # one at a time would take two directory fsyncs per message
    assert fsyncs < 20


async def test_one_failing_enqueue_does_not_fail_its_batch(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write_synced = durable.write_synced

    def disk_full_for_poison(path: Path, data: bytes) -> None:
        if data == b"poison":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_synced(path, data)

    monkeypatch.setattr(durable, "write_synced", disk_full_for_poison)
    results = await asyncio.gather(
        spool.enqueue("a@example.com", ["b@example.net"], b"good 1"),
        spool.enqueue("a@example.com", ["b@example.net"], b"poison"),
        spool.enqueue("a@example.com", ["b@example.net"], b"good 2"),
        return_exceptions=True,
    )

    assert isinstance(results[1], OSError)
    good = [r for r in results if isinstance(r, QueuedMessage)]
    assert [await spool.read(m.id) for m in good] == [b"good 1", b"good 2"]
    assert await spool.list() == good
    assert len(list((spool.root / "messages").iterdir())) == 4
    assert list((spool.root / "tmp").iterdir()) == []


# -- scheduling ---------------------------------------------------------------------------------------


def test_retry_schedule() -> None:
    assert [next_delay(n) for n in range(8)] == [0, 60, 300, 900, 3600, 3600, 3600, 3600]


def test_expired() -> None:
    message = QueuedMessage("1", "", (), created=1000.0, size=0, path=Path("1.eml"))
    assert not expired(message, 1000.0 + 5 * 86400 - 1, 5 * 86400)
    assert expired(message, 1000.0 + 5 * 86400, 5 * 86400)


async def test_due_follows_the_retry_schedule(spool: Spool, clock: FakeClock) -> None:
    start = clock.now
    message = await spool.enqueue("a@example.com", ["b@example.net"], b"x")
    assert await spool.due(start - 1) == []
    assert [m.id for m in await spool.due(start)] == [message.id]

    elapsed = 0.0
    for attempt, delay in enumerate([60, 300, 900, 3600, 3600], start=1):
        message = await fail_temporarily(spool, message, "b@example.net")
        elapsed += delay
        recipient = message.recipient("b@example.net")
        assert recipient.attempts == attempt
        assert recipient.next_attempt == start + elapsed
        assert await spool.due(start + elapsed - 1) == []
        assert await spool.due(start + elapsed) == [message]
        clock.now = start + elapsed


async def test_due_considers_only_pending_recipients(spool: Spool, clock: FakeClock) -> None:
    message = await spool.enqueue("a@example.com", ["b@example.net", "c@example.net"], b"x")
    await spool.record_attempt(
        message.id, "b@example.net", delivered=True, permanent=False, error="", next_attempt=None
    )
    await record(spool, message.id, "c@example.net", error="busy", next_attempt=clock.now + 10)
    assert await spool.due(clock.now + 9) == []
    assert len(await spool.due(clock.now + 10)) == 1


async def test_retry_now_makes_pending_recipients_due(spool: Spool, clock: FakeClock) -> None:
    message = await spool.enqueue("a@example.com", ["b@example.net", "c@example.net"], b"x")
    await spool.record_attempt(
        message.id, "b@example.net", delivered=True, permanent=False, error="", next_attempt=None
    )
    await fail_temporarily(spool, message, "c@example.net")
    clock.now += 5
    assert await spool.due(clock.now) == []

    message = await spool.retry_now(message.id)

    assert message.recipient("c@example.net").next_attempt == clock.now
    assert message.recipient("b@example.net").state == "delivered"
    assert await spool.due(clock.now) == [message]


# -- recipient states ---------------------------------------------------------------------------------


async def test_record_attempt_outcomes_are_committed(spool: Spool, gateway: Gateway, clock: FakeClock) -> None:
    addresses = ["ok@example.net", "gone@example.net", "later@example.net"]
    message = await spool.enqueue("a@example.com", addresses, b"x")
    await spool.record_attempt(
        message.id, "ok@example.net", delivered=True, permanent=False, error="250 2.0.0 queued as 1", next_attempt=None
    )
    await spool.record_attempt(
        message.id,
        "gone@example.net",
        delivered=False,
        permanent=True,
        error="550 5.1.1 no such user",
        next_attempt=None,
    )
    await spool.record_attempt(
        message.id,
        "later@example.net",
        delivered=False,
        permanent=False,
        error="451 4.7.1 greylisted",
        next_attempt=clock.now + 42,
    )

    spool = await reopen(spool, gateway, clock)
    reloaded = await spool.get(message.id)
    assert reloaded is not None
    states = {r.address: (r.state, r.attempts, r.last_error) for r in reloaded.recipients}
    assert states == {
        "ok@example.net": ("delivered", 1, "250 2.0.0 queued as 1"),
        "gone@example.net": ("failed", 1, "550 5.1.1 no such user"),
        "later@example.net": ("pending", 1, "451 4.7.1 greylisted"),
    }
    assert reloaded.recipient("later@example.net").next_attempt == clock.now + 42
    assert [r.address for r in reloaded.pending] == ["later@example.net"]

    with pytest.raises(ValueError, match="already delivered"):
        await spool.record_attempt(
            message.id, "ok@example.net", delivered=True, permanent=False, error="", next_attempt=None
        )
    with pytest.raises(KeyError):
        await spool.record_attempt(
            message.id, "who@example.net", delivered=True, permanent=False, error="", next_attempt=None
        )
    with pytest.raises(UnknownMessage):
        await record(spool, "0", "ok@example.net", delivered=True)
    assert await spool.get(message.id) == reloaded
    await spool.close()


async def test_concurrent_attempts_on_one_message_are_all_kept(spool: Spool) -> None:
    addresses = [f"r{n}@example.net" for n in range(10)]
    message = await spool.enqueue("a@example.com", addresses, b"x")
    await asyncio.gather(
        *(
            spool.record_attempt(message.id, a, delivered=True, permanent=False, error="", next_attempt=None)
            for a in addresses
        )
    )
    final = await spool.get(message.id)
    assert final is not None
    assert [r.state for r in final.recipients] == ["delivered"] * 10


# -- removal ------------------------------------------------------------------------------------------


async def test_remove_only_when_nothing_is_pending(spool: Spool) -> None:
    message = await spool.enqueue("a@example.com", ["b@example.net", "c@example.net"], b"x")
    other = await spool.enqueue("a@example.com", ["d@example.net"], b"y")
    await spool.record_attempt(
        message.id, "b@example.net", delivered=True, permanent=False, error="", next_attempt=None
    )
    with pytest.raises(ValueError, match="pending"):
        await spool.remove(message.id)

    await spool.record_attempt(
        message.id, "c@example.net", delivered=False, permanent=True, error="550", next_attempt=None
    )
    await spool.remove(message.id)

    assert await spool.list() == [other]
    assert await spool.get(message.id) is None
    with pytest.raises(UnknownMessage):
        await spool.read(message.id)
    with pytest.raises(UnknownMessage):
        await spool.remove(message.id)
    assert sorted(p.name for p in (spool.root / "messages").iterdir()) == [f"{other.id}.eml", f"{other.id}.json"]


async def test_delete_drops_a_message_with_pending_recipients(spool: Spool, gateway: Gateway, clock: FakeClock) -> None:
    message = await spool.enqueue("a@example.com", ["b@example.net"], b"x")
    deleted = await spool.delete(message.id)
    assert deleted == message
    assert await spool.list() == []
    assert list((spool.root / "messages").iterdir()) == []
    spool = await reopen(spool, gateway, clock)
    assert await spool.list() == []
    await spool.close()


# -- recovery -----------------------------------------------------------------------------------------


async def test_recovery_removes_exactly_what_was_never_acknowledged(
    spool: Spool, gateway: Gateway, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    kept = await spool.enqueue("a@example.com", ["b@example.net"], b"kept")
    lost = await spool.enqueue("a@example.com", ["c@example.net"], b"lost")
    await spool.close()
    messages = spool.root / "messages"
    # a crash mid-write: a file in tmp/
    (spool.root / "tmp" / "8999999999999999.eml.0").write_bytes(b"half")
    # a crash between the message rename and the envelope rename: never acknowledged
    (messages / "9000000000000000.eml").write_bytes(b"unacknowledged")
    # outside interference: an envelope whose message is gone
    lost.path.unlink()
    # outside corruption: an unreadable envelope is kept, with its message, for an operator
    (messages / "0000000000000001.json").write_text("{not json")
    (messages / "0000000000000001.eml").write_bytes(b"corrupt envelope")
    # a file the spool does not own
    (messages / "README").write_text("hands off")

    spool = Spool(spool.root, gateway=gateway, clock=clock)
    await spool.open()

    assert await spool.list() == [kept]
    assert await spool.read(kept.id) == b"kept"
    assert list((spool.root / "tmp").iterdir()) == []
    assert sorted(p.name for p in messages.iterdir()) == sorted(
        [f"{kept.id}.eml", f"{kept.id}.json", "0000000000000001.json", "0000000000000001.eml", "README"]
    )
    logged = [r.getMessage() for r in caplog.records]
    assert "queue envelope without its message removed" in logged
    assert "unreadable queue envelope left in place" in logged
    # new ids stay above every id seen on disk, whatever the wall clock says
    fresh = await spool.enqueue("a@example.com", ["b@example.net"], b"fresh")
    assert fresh.id > "9000000000000000"
    await spool.close()


async def test_unopened_spool_refuses_work(tmp_path: Path, gateway: Gateway) -> None:
    spool = Spool(tmp_path, gateway=gateway)
    with pytest.raises(RuntimeError, match="not open"):
        await spool.enqueue("a@example.com", ["b@example.net"], b"x")


# -- crashes ------------------------------------------------------------------------------------------

# The child plays submission server and delivery worker at once. It prints each fact only after the
# call that commits it has returned: E <id> <sha256> (enqueued), D <id> <address> (delivered),
# F <id> <address> (failed), R <id> (removed); r <id> before a remove, which may be cut short.
CHILD = """
import asyncio, hashlib, os, random, sys, time
from pathlib import Path
from mailnode.gateway import Gateway
from mailnode.queue.spool import Spool

def say(*words):
    print(*words, flush=True)

async def main(root, seed):
    rng = random.Random(seed)
    spool = Spool(Path(root), gateway=Gateway())
    await spool.open()
    for message in await spool.list():
        if not message.pending:
            say("r", message.id)
            await spool.remove(message.id)
            say("R", message.id)
    say("O")

    async def submit():
        data = os.urandom(rng.randint(1, 30000))
        recipients = [f"r{n}@example.net" for n in range(rng.randint(1, 3))]
        message = await spool.enqueue("s@example.com", recipients, data)
        say("E", message.id, hashlib.sha256(data).hexdigest())

    record = spool.record_attempt
    while True:
        await asyncio.gather(*(submit() for _ in range(rng.randint(1, 4))))
        for message in await spool.due(time.time()):
            address = message.pending[0].address
            roll = rng.random()
            if roll < 0.5:
                await record(message.id, address, delivered=True, permanent=False, error="250", next_attempt=None)
                say("D", message.id, address)
            elif roll < 0.6:
                await record(message.id, address, delivered=False, permanent=True, error="550", next_attempt=None)
                say("F", message.id, address)
            else:
                later = time.time()
                await record(message.id, address, delivered=False, permanent=False, error="451", next_attempt=later)
            current = await spool.get(message.id)
            if current is not None and not current.pending:
                say("r", message.id)  # removing: the message may be gone without an R
                await spool.remove(message.id)
                say("R", message.id)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def run_until_killed(root: Path, seed: int, facts: list[list[str]]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(root), str(seed), cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    opened = asyncio.Event()

    async def collect() -> None:
        assert child.stdout is not None
        async for raw in child.stdout:
            if raw.endswith(b"\n"):  # a line cut by the kill was never fully reported
                words = raw.decode().split()
                facts.append(words)
                if words == ["O"]:
                    opened.set()

    reader = asyncio.create_task(collect())
    await asyncio.wait_for(opened.wait(), 60)  # a Python start: 10 s ran out under load
    await asyncio.sleep(random.Random(seed).uniform(0.02, 0.4))
    child.send_signal(signal.SIGKILL)
    await child.wait()
    await reader
    assert child.returncode == -signal.SIGKILL


async def test_sigkill_at_random_moments_loses_nothing_acknowledged(tmp_path: Path, gateway: Gateway) -> None:
    root = tmp_path / "queue"
    enqueued: dict[str, str] = {}
    delivered: set[tuple[str, str]] = set()
    failed: set[tuple[str, str]] = set()
    removed: set[str] = set()
    removing: set[str] = set()
    for seed in range(6):
        facts: list[list[str]] = []
        await run_until_killed(root, seed, facts)
        for fact in facts:
            match fact:
                case ["E", id, digest]:
                    enqueued[id] = digest
                case ["D", id, address]:
                    delivered.add((id, address))
                case ["F", id, address]:
                    failed.add((id, address))
                case ["R", id]:
                    removed.add(id)
                case ["r", id]:
                    removing.add(id)

        spool = Spool(root, gateway=gateway)
        await spool.open()
        present = {m.id: m for m in await spool.list()}
        for id, digest in enqueued.items():
            if id in removed:
                assert id not in present
                continue
            if id in removing:
                if id not in present:
                    continue
                assert not present[id].pending
            assert id in present, f"acknowledged message {id} lost after kill {seed}"
            assert hashlib.sha256(await spool.read(id)).hexdigest() == digest
        for id, address in delivered:
            if id in present:
                assert present[id].recipient(address).state == "delivered"
        for id, address in failed:
            if id in present:
                assert present[id].recipient(address).state == "failed"
        names = {p.name for p in (root / "messages").iterdir()}
        assert names == {f"{id}.{ext}" for id in present for ext in ("eml", "json")}
        await spool.close()

    # the loop did real work: messages went in, recipients were delivered and messages removed
    assert len(enqueued) > 20 and delivered and removed
