"""Mailbox status writes, behind the reconciles that decide them: each Mailbox's Ready condition and
status.node (its home), with an Event when the Ready status or reason changes.

A reconcile of a domain decides a verdict for every one of its Mailboxes (reconcile/mailboxes.py) and
hands them here; it does not wait for them. Ten thousand new Mailboxes are ten thousand status writes and
ten thousand Events: written inside the reconcile, they held back the next directory write for seconds
while more Mailboxes waited for it. Here they are a keyed queue (reconcile/workqueue.py): the latest
verdict of each Mailbox is written, never two writes of one Mailbox at once, a failed write retried, and
a write that would say what the status says already is not made.

What was last written is remembered (by uid): the operator's watch shows its own writes late, and
comparing with a stale copy would write the same status (and post the same Event) twice.

status.phase and status.move (a mailbox move, reconcile/moves.py) are not queued: `write_move` writes them
at once and returns when the API server has them, since a move's step must be recorded before the next
one runs (an operator killed at any point resumes from the recorded step).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable
from typing import Final

from mailfleet import api, k8s, kube_types
from mailfleet.k8s.events import Recorder
from mailfleet.reconcile import conditions
from mailfleet.reconcile.conditions import Condition
from mailfleet.reconcile.kinds import MAILBOX, object_key
from mailfleet.reconcile.workqueue import WorkQueue

WRITERS: Final = 16  # concurrent Mailbox status writes


class Node(enum.Enum):
    KEEP = "keep"  # a Verdict that leaves status.node as it is


@dataclasses.dataclass(slots=True)  # a reconcile of ten thousand Mailboxes makes ten thousand
class Verdict:
    body: kube_types.Mailbox
    condition: Condition
    # status.node: the home's pod name, None for a mailbox in no directory (removed), or left as it is
    # (a refused domain: its StatefulSet still serves the mailbox where it was)
    node: str | Node | None = None


def _says(shown: kube_types.MailboxStatus, written: kube_types.MailboxStatus) -> bool:
    """Whether the status the watch shows is the one written (its conditions, generation and node)."""
    return (
        conditions.same(shown.get("conditions"), written.get("conditions") or [])
        and shown.get("observedGeneration") == written.get("observedGeneration")
        and shown.get("node") == written.get("node")
    )


@dataclasses.dataclass(frozen=True)
class _Change:
    conditions: list[kube_types.Condition]  # to write
    announce: bool  # the Ready status or reason changed: post an Event
    node: str | Node | None  # status.node


class MailboxStatuses:
    """The writer of every Mailbox status the operator writes. `submit` returns at once; `idle` waits
    until everything submitted is written (tests, and a stopping operator that wants to)."""

    def __init__(self, *, client: k8s.Client, recorder: Recorder, writers: int = WRITERS) -> None:
        self._client, self._recorder = client, recorder
        self.remembered: dict[str, kube_types.MailboxStatus] = {}  # uid -> the status last written
        self._pending: dict[str, Verdict] = {}  # uid -> the latest verdict not yet written
        self._queue: WorkQueue[str] = WorkQueue(
            self._write, workers=writers, delay=0.0, retry=1.0, retry_max=30.0, what="status write of Mailbox"
        )
        self._started = False
        # status.move as last written (None: removed), by uid, until the watch shows it (reconcile/moves.py)
        self.moves: dict[str, kube_types.MailboxMove | None] = {}
        # Mailboxes whose move was rolled back, by uid: the monotonic time before which none starts again.
        self.retry_moves_after: dict[str, float] = {}
        # The mailfleet.io/move-to value last reported as invalid (an Event), by uid.
        self.move_to_reported: dict[str, str] = {}
        # Mailboxes the watch shows being deleted (a deletionTimestamp), by uid: a move's task asks before
        # each step, and cleans up instead (reconcile/moves.py).
        self.leaving: set[str] = set()

    def move_of(self, body: kube_types.Mailbox) -> kube_types.MailboxMove | None:
        """The Mailbox's status.move: as last written here, else as the watch shows it (after a restart)."""
        key = object_key(body)
        shown = (body.get("status") or {}).get("move")
        if key not in self.moves:
            return shown
        written = self.moves[key]
        if shown == written:
            del self.moves[key]  # the watch shows the write now
        return written

    async def write_move(
        self, body: kube_types.Mailbox, move: kube_types.MailboxMove | None, *, node: str | None = None
    ) -> bool:
        """Write status.move (and phase Moving; None removes both) now, and status.node when given (the
        home a move flipped to: moves run beside the reconciles that write the verdicts). False when the
        Mailbox is gone."""
        meta = body["metadata"]
        status: kube_types.MailboxStatus = {"phase": "Moving" if move is not None else None, "move": move}
        if node is not None:
            status["node"] = node
        try:
            await self._client.patch(MAILBOX, meta["namespace"], meta["name"], {"status": status}, subresource="status")
        except k8s.ApiError as error:
            if error.not_found:
                return False
            raise
        self.moves[object_key(body)] = move
        if node is not None and (remembered := self.remembered.get(object_key(body))) is not None:
            self.remembered[object_key(body)] = {**remembered, "node": node}
        return True

    def submit(self, verdicts: Iterable[Verdict]) -> None:
        at = conditions.now()
        for verdict in verdicts:
            key = object_key(verdict.body)
            # A reconcile hands over a verdict for every Mailbox of its domain, and most say what the
            # status says already: those are not queued (unless an older verdict waits, which this replaces).
            if key not in self._pending and self._change(verdict, at) is None:
                continue
            self._pending[key] = verdict
            self._queue.add(key)
        if not self._started and self._pending:
            self._queue.start()  # here, not in __init__: in the event loop that writes
            self._started = True

    def shown(self, body: kube_types.Mailbox) -> None:
        """The watch shows the Mailbox `body`. A status written to it stays remembered until a reconcile's
        body shows it (a reconcile running now may still hold a body from before the write), but once the
        watch shows it, as the status `body` holds: the index's snapshots share one status per content
        (handlers.py), so ten thousand statuses written at the end of a large reconcile are not each held
        twice until the next reconcile."""
        key = object_key(body)
        if (body.get("metadata") or {}).get("deletionTimestamp"):
            self.leaving.add(key)
        written = self.remembered.get(key)
        shown = body.get("status")
        if written is not None and shown is not None and _says(shown, written):
            self.remembered[key] = shown

    def forget(self, body: kube_types.Mailbox) -> None:
        """The Mailbox was deleted: nothing more is written to it."""
        key = object_key(body)
        self._pending.pop(key, None)
        self.remembered.pop(key, None)
        self.moves.pop(key, None)
        self.retry_moves_after.pop(key, None)
        self.move_to_reported.pop(key, None)
        self.leaving.discard(key)

    def __len__(self) -> int:
        """Mailboxes with a verdict not yet written."""
        return len(self._pending)

    async def idle(self) -> None:
        await self._queue.idle()

    async def stop(self) -> None:
        await self._queue.stop()
        self._started = False

    async def _write(self, key: str) -> None:
        verdict = self._pending.get(key)
        if verdict is None:
            return
        change = self._change(verdict, conditions.now())
        if change is not None:
            await self._write_status(verdict, change)  # raises on API errors: the queue tries again
        if self._pending.get(key) is verdict:  # not replaced by a newer one meanwhile
            del self._pending[key]

    def _change(self, verdict: Verdict, at: str) -> _Change | None:
        """What to write to the Mailbox's status, or None when it says this already."""
        body, condition, node = verdict.body, verdict.condition, verdict.node
        key = object_key(body)
        status = self.remembered.get(key) or body.get("status") or {}
        if key in self.remembered and _says(body.get("status") or {}, status):
            del self.remembered[key]  # the watch shows the write now: nothing to remember
        generation = body["metadata"].get("generation")
        merged = conditions.merge(status.get("conditions"), [condition], generation=generation, at=at)
        same_node = node is Node.KEEP or status.get("node") == node
        if (
            conditions.same(status.get("conditions"), merged)
            and status.get("observedGeneration") == generation
            and same_node
        ):
            return None
        previous = conditions.find(status.get("conditions"), "Ready")
        announce = previous is None or (previous.get("status"), previous.get("reason")) != (
            condition.status,
            condition.reason,
        )
        return _Change(merged, announce, node)

    async def _write_status(self, verdict: Verdict, change: _Change) -> None:
        body, condition = verdict.body, verdict.condition
        meta = body["metadata"]
        written: kube_types.MailboxStatus = {"conditions": change.conditions}
        if (generation := meta.get("generation")) is not None:
            written["observedGeneration"] = generation
        if change.node is not Node.KEEP:
            written["node"] = change.node  # None removes it (a merge patch)
        try:
            await self._client.patch(
                MAILBOX, meta["namespace"], meta["name"], {"status": written}, subresource="status"
            )
        except k8s.ApiError as error:
            if error.not_found:
                return
            raise
        key = object_key(body)
        previous = self.remembered.get(key) or body.get("status") or {}
        remembered: kube_types.MailboxStatus = {**written}
        if change.node is Node.KEEP and "node" in previous:
            remembered["node"] = previous["node"]
        self.remembered[key] = remembered
        if change.announce:
            full: kube_types.Mailbox = {**body, "apiVersion": api.API_VERSION, "kind": "Mailbox"}
            await self._recorder.event(
                full,
                condition.reason,
                condition.message,
                type="Normal" if condition.status == "True" else "Warning",
                at=conditions.now(),
            )
