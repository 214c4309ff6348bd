"""Spool: the durable outbound queue of one node. The submission server enqueues (and answers `250` only
after `enqueue` returns); the delivery worker takes `due` messages, records every attempt per recipient
and removes a message once no recipient is pending; `mailnode queue` lists, retries and deletes.

On disk, under root (the node wires `<data_dir>/queue`):

    tmp/                 files being written; whatever is here when the spool opens is removed
    messages/<id>.eml    the message bytes, written once
    messages/<id>.json   the envelope and each recipient's state, replaced atomically on every change

Write order, which recovery relies on: a message file is written under tmp/, fsynced, renamed into
messages/ and the directory fsynced; only then is its envelope written the same way (tmp/, fsync, rename,
directory fsync), and only then does `enqueue` return. So an envelope on disk always has its message,
and a message without an envelope was never acknowledged. A state change replaces the envelope with a
rename over it: after a crash at any point a recipient has its last committed state, never a mix, so a
recipient recorded as delivered is not delivered again. Removal unlinks the envelope, fsyncs, then
unlinks the message file.

Concurrent enqueues are group-committed as in the mailbox store: one Gateway thread writes a whole batch
with two directory fsyncs. The spool assumes it is the only process using its directory; the envelopes
are read once by `open` and then served from memory.

Every change (an enqueued batch, an envelope replaced, a message removed) passes the node's WriteFence
(mailnode.store.fence) before it takes a message's lock, so a checkpoint can hold the queue with the
mailboxes; `copy_to` then hard-links the queue's files into a staged copy.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from mailnode.gateway import Gateway
from mailnode.store import durable
from mailnode.store.fence import WriteFence

log = logging.getLogger(__name__)
_T = TypeVar("_T")

State = Literal["pending", "delivered", "failed"]
_STATES: tuple[State, ...] = ("pending", "delivered", "failed")
_FORMAT = 1  # envelope file format version

# The retry schedule after the n-th failed attempt (n >= 1); the last delay repeats (hourly).
RETRY_DELAYS: tuple[float, ...] = (60.0, 300.0, 900.0, 3600.0)


def next_delay(attempts: int) -> float:
    """Seconds to wait before the next attempt, after `attempts` attempts: 0 before the first, then
    60, 300, 900, 3600, and hourly from then on."""
    if attempts <= 0:
        return 0.0
    return RETRY_DELAYS[min(attempts, len(RETRY_DELAYS)) - 1]


def expired(message: QueuedMessage, now: float, lifetime: float) -> bool:
    """True once a message has been queued for `lifetime` seconds: its pending recipients should fail
    (and bounce) instead of being retried."""
    return now - message.created >= lifetime


class UnknownMessage(KeyError):
    """No message with this id is in the spool (never was, or already removed or deleted)."""


@dataclasses.dataclass(frozen=True)
class Recipient:
    address: str
    state: State = "pending"
    attempts: int = 0
    last_error: str = ""  # the last reply or error text recorded for this recipient
    next_attempt: float = 0.0  # unix time; meaningful while pending
    # "" (outbound: by the address's domain, or the relay host), or "node:<ordinal>": a hand-off to the
    # mailbox's home node over LMTP (mailnode.queue.handoff).
    route: str = ""


@dataclasses.dataclass(frozen=True)
class QueuedMessage:
    """One queued message as last committed. Immutable: the spool hands out new values on change."""

    id: str  # unique in this spool, increasing with enqueue time (string order is time order)
    sender: str  # "" for the null sender (bounces)
    recipients: tuple[Recipient, ...]
    created: float
    size: int
    path: Path  # the message file
    # The cluster hand-off id its first attempt used (mailnode.queue.handoff.Handoff.id_for): every
    # retry sends the same, so the home stores it once. "" when not queued after a direct attempt.
    handoff: str = ""

    @property
    def pending(self) -> tuple[Recipient, ...]:
        return tuple(r for r in self.recipients if r.state == "pending")

    def recipient(self, address: str) -> Recipient:
        for r in self.recipients:
            if r.address == address:
                return r
        raise KeyError(f"{address} is not a recipient of {self.id}")

    def is_due(self, now: float) -> bool:
        return any(r.next_attempt <= now for r in self.pending)


@dataclasses.dataclass
class _Enqueue:
    message: QueuedMessage
    data: bytes
    future: asyncio.Future[None]


class Spool:
    def __init__(
        self,
        root: Path,
        *,
        gateway: Gateway,
        clock: Callable[[], float] = time.time,
        fence: WriteFence | None = None,
    ) -> None:
        self.root = root
        self.fence = fence or WriteFence()  # the node's, shared with the mailbox store
        self._tmp = root / "tmp"
        self._dir = root / "messages"
        self._gateway = gateway
        self._clock = clock
        self._messages: dict[str, QueuedMessage] = {}
        self._locks: dict[str, asyncio.Lock] = {}  # one per message: its state changes are serialised
        self._pending: builtins.list[_Enqueue] = []
        self._writer: asyncio.Task[None] | None = None
        self._last_id = 0
        self._tmp_names = itertools.count()
        self.is_open = False

    # -- life cycle ---------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the directories and recover from an unclean stop (see the module docstring)."""
        messages, last_id = await self._gateway.run(self._open_sync)
        self._messages = {m.id: m for m in messages}
        self._last_id = last_id
        self.is_open = True

    async def close(self) -> None:
        while self._writer is not None:
            await self._writer
        self.is_open = False

    def _open_sync(self) -> tuple[builtins.list[QueuedMessage], int]:
        durable.ensure_dir(self._tmp)
        durable.ensure_dir(self._dir)
        tmp_removed = 0
        for leftover in self._tmp.iterdir():
            if leftover.is_file():
                leftover.unlink()
                tmp_removed += 1
        names = {p.name for p in self._dir.iterdir()}
        messages: builtins.list[QueuedMessage] = []
        last_id = 0
        unacknowledged = lost = 0
        for name in sorted(names):
            stem, dot, suffix = name.partition(".")
            if not stem.isdigit() or not dot:
                continue
            last_id = max(last_id, int(stem))
            path = self._dir / name
            if suffix == "eml" and f"{stem}.json" not in names:
                # renamed into place but its envelope never was: never acknowledged
                path.unlink()
                unacknowledged += 1
            elif suffix == "json":
                try:
                    message = _from_json(json.loads(path.read_bytes()), self._dir)
                    if message.id != stem:
                        raise ValueError(f"envelope says id {message.id}")
                except (ValueError, KeyError, TypeError) as error:
                    # Cannot come from our own writes (they replace whole files); keep both files for
                    # an operator to look at, and do not deliver.
                    log.error(
                        "unreadable queue envelope left in place",
                        extra={"fields": {"path": str(path), "error": str(error)}},
                    )
                    continue
                if f"{stem}.eml" not in names:
                    # The write order makes this impossible short of outside interference.
                    log.error(
                        "queue envelope without its message removed",
                        extra={
                            "fields": {
                                "id": stem,
                                "sender": message.sender,
                                "pending": [r.address for r in message.pending],
                            }
                        },
                    )
                    path.unlink()
                    lost += 1
                    continue
                messages.append(message)
        if unacknowledged or lost:
            durable.fsync_dir(self._dir)
        if tmp_removed or unacknowledged or lost:
            log.warning(
                "recovered the outbound queue after an unclean stop",
                extra={
                    "fields": {
                        "tmp_removed": tmp_removed,
                        "unacknowledged_removed": unacknowledged,
                        "envelopes_without_message_removed": lost,
                    }
                },
            )
        return messages, last_id

    # -- queries --------------------------------------------------------------------------------------

    async def list(self) -> builtins.list[QueuedMessage]:
        """Every queued message, oldest first."""
        self._check_open()
        return sorted(self._messages.values(), key=lambda m: m.id)

    async def get(self, id: str) -> QueuedMessage | None:
        self._check_open()
        return self._messages.get(id)

    async def read(self, id: str) -> bytes:
        """The message bytes, as enqueued."""
        message = self._message(id)
        return await self._gateway.run(message.path.read_bytes)

    async def due(self, now: float) -> builtins.list[QueuedMessage]:
        """Messages with at least one pending recipient whose next attempt is at or before `now`."""
        self._check_open()
        return sorted((m for m in self._messages.values() if m.is_due(now)), key=lambda m: m.id)

    # -- enqueue -------------------------------------------------------------------------------------

    async def enqueue(
        self, sender: str, recipients: Sequence[str], data: bytes, *, route: str = "", handoff: str = ""
    ) -> QueuedMessage:
        """Queue a message durably, or raise. Returns only after the message file, its envelope and
        their directory are fsynced; every recipient is due at once, on `route` (see Recipient), with
        the hand-off id of an attempt already made (see QueuedMessage).
        Duplicate addresses are merged. Concurrent calls share fsyncs."""
        self._check_open()
        addresses = builtins.list(dict.fromkeys(recipients))
        if not addresses:
            raise ValueError("a queued message needs at least one recipient")
        now = self._clock()
        id = self._new_id()
        message = QueuedMessage(
            id=id,
            sender=sender,
            recipients=tuple(Recipient(address, next_attempt=now, route=route) for address in addresses),
            created=now,
            size=len(data),
            path=self._dir / f"{id}.eml",
            handoff=handoff,
        )
        loop = asyncio.get_running_loop()
        item = _Enqueue(message, data, loop.create_future())
        self._pending.append(item)
        if self._writer is None:
            self._writer = loop.create_task(self._write_pending())
        # shield: a client that hangs up mid-write must not cancel the batch other clients wait on
        await asyncio.shield(item.future)
        return message

    def _new_id(self) -> str:
        # Microseconds since the epoch, bumped to stay above every id already used in this spool.
        self._last_id = max(time.time_ns() // 1000, self._last_id + 1)
        return f"{self._last_id:016d}"

    async def _write_pending(self) -> None:
        try:
            while self._pending:
                async with self.fence.writing():  # while paused, enqueues gather in _pending
                    batch, self._pending = self._pending, []
                    try:
                        outcome = await self._gateway.run(self._write_batch, [(i.message, i.data) for i in batch])
                    except Exception as batch_error:  # a directory fsync failed: nothing in the batch counts
                        log.exception("queue write failed", extra={"fields": {"error": str(batch_error)}})
                        outcome = [batch_error] * len(batch)
                for item, failure in zip(batch, outcome, strict=True):
                    if failure is not None:
                        item.future.set_exception(failure)
                    else:
                        self._messages[item.message.id] = item.message
                        item.future.set_result(None)
        finally:
            self._writer = None

    def _write_batch(self, batch: builtins.list[tuple[QueuedMessage, bytes]]) -> builtins.list[Exception | None]:
        """Runs in a Gateway thread. Each message succeeds or fails on its own, except that a failed
        directory fsync fails the whole batch (the caller then fails every message in it)."""
        outcome: builtins.list[Exception | None] = []
        written: builtins.list[QueuedMessage] = []
        # Phase 1: every message file written, fsynced, renamed into messages/, and the names made durable.
        for message, data in batch:
            try:
                self._write_file(message.path, data)
                outcome.append(None)
                written.append(message)
            except Exception as error:  # e.g. disk full: this message fails, the others go on
                log.exception("queue write failed", extra={"fields": {"id": message.id, "error": str(error)}})
                outcome.append(error)
        if not written:
            return outcome
        try:
            durable.fsync_dir(self._dir)
            # Phase 2: the envelopes, the same way; a message counts once its envelope's name is durable.
            for position, (message, _) in enumerate(batch):
                if outcome[position] is not None:
                    continue
                try:
                    self._write_envelope(message)
                except Exception as error:
                    log.exception("queue write failed", extra={"fields": {"id": message.id, "error": str(error)}})
                    message.path.unlink(missing_ok=True)
                    outcome[position] = error
            durable.fsync_dir(self._dir)
        except BaseException:
            for message in written:  # best effort; `open` removes whatever is left
                self._envelope_path(message.id).unlink(missing_ok=True)
                message.path.unlink(missing_ok=True)
            raise
        return outcome

    # -- state changes ------------------------------------------------------------------------------

    async def record_attempt(
        self,
        id: str,
        address: str,
        *,
        delivered: bool,
        permanent: bool,
        error: str,
        next_attempt: float | None,
    ) -> QueuedMessage:
        """Commit the outcome of one delivery attempt to one pending recipient and return the message as
        now committed. Delivered -> "delivered"; not delivered and permanent -> "failed"; otherwise the
        recipient stays pending until `next_attempt` (default: now + next_delay(attempts)). `error` is
        kept as the recipient's last_error. Raises UnknownMessage, KeyError for an address that is not a
        recipient, ValueError for a recipient no longer pending."""

        def change(message: QueuedMessage) -> QueuedMessage:
            recipient = message.recipient(address)
            if recipient.state != "pending":
                raise ValueError(f"{address} of {id} is already {recipient.state}")
            attempts = recipient.attempts + 1
            if delivered:
                updated = dataclasses.replace(recipient, state="delivered", attempts=attempts, last_error=error)
            elif permanent:
                updated = dataclasses.replace(recipient, state="failed", attempts=attempts, last_error=error)
            else:
                when = next_attempt if next_attempt is not None else self._clock() + next_delay(attempts)
                updated = dataclasses.replace(recipient, attempts=attempts, last_error=error, next_attempt=when)
            return dataclasses.replace(
                message, recipients=tuple(updated if r is recipient else r for r in message.recipients)
            )

        return await self._update(id, change)

    async def retry_now(self, id: str) -> QueuedMessage:
        """Make every pending recipient due now (`mailnode queue retry`)."""
        now = self._clock()

        def change(message: QueuedMessage) -> QueuedMessage:
            return dataclasses.replace(
                message,
                recipients=tuple(
                    dataclasses.replace(r, next_attempt=now) if r.state == "pending" else r for r in message.recipients
                ),
            )

        return await self._update(id, change)

    async def remove(self, id: str) -> QueuedMessage:
        """Drop a message that has no pending recipient left (delivered or failed and bounced)."""

        def check(message: QueuedMessage) -> None:
            if message.pending:
                raise ValueError(f"{id} still has {len(message.pending)} pending recipient(s)")

        return await self._drop(id, check)

    async def delete(self, id: str) -> QueuedMessage:
        """Drop a message whatever its recipients' state (`mailnode queue delete`); no bounce is sent."""
        return await self._drop(id, lambda message: None)

    async def _update(self, id: str, change: Callable[[QueuedMessage], QueuedMessage]) -> QueuedMessage:
        self._check_open()

        async def commit() -> QueuedMessage:
            async with self.fence.writing(), self._lock(id):
                updated = change(self._message(id))
                await self._gateway.run(self._replace_envelope, updated)
                self._messages[id] = updated
                return updated

        # shield: once the write has started, memory must follow the disk even if the caller goes away
        return await asyncio.shield(commit())

    async def _drop(self, id: str, check: Callable[[QueuedMessage], None]) -> QueuedMessage:
        self._check_open()

        async def commit() -> QueuedMessage:
            async with self.fence.writing(), self._lock(id):
                message = self._message(id)
                check(message)
                await self._gateway.run(self._remove_files, message)
                del self._messages[id]
                self._locks.pop(id, None)
                return message

        return await asyncio.shield(commit())

    # -- checkpoints (mailnode.backup) -----------------------------------------------------------------

    async def copy_to(self, dest: Path) -> int:
        """Hard-link every message file and envelope into dest/messages/ (dest on the spool's file
        system). Envelopes are replaced by renames and message files never change, so the links keep
        what is committed now. Call with writes paused. Returns the number of messages."""
        self._check_open()
        return await self._gateway.run(self._copy_sync, dest)

    def _copy_sync(self, dest: Path) -> int:
        target = dest / "messages"
        target.mkdir(parents=True, exist_ok=True)
        envelopes = 0
        for path in sorted(self._dir.iterdir()):
            if path.suffix in (".eml", ".json") and path.is_file():
                os.link(path, target / path.name)
                envelopes += path.suffix == ".json"
        return envelopes

    # -- files (Gateway threads) --------------------------------------------------------------------

    def _envelope_path(self, id: str) -> Path:
        return self._dir / f"{id}.json"

    def _write_file(self, final: Path, data: bytes) -> None:
        """tmp/, fsync, rename over `final`; the caller fsyncs the directory."""
        tmp = self._tmp / f"{final.name}.{next(self._tmp_names)}"
        durable.write_synced(tmp, data)
        try:
            tmp.replace(final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _write_envelope(self, message: QueuedMessage) -> None:
        self._write_file(self._envelope_path(message.id), json.dumps(_to_json(message), ensure_ascii=False).encode())

    def _replace_envelope(self, message: QueuedMessage) -> None:
        self._write_envelope(message)
        durable.fsync_dir(self._dir)

    def _remove_files(self, message: QueuedMessage) -> None:
        # Envelope first: a crash in between leaves a message without envelope, which `open` removes.
        self._envelope_path(message.id).unlink(missing_ok=True)
        durable.fsync_dir(self._dir)
        message.path.unlink(missing_ok=True)

    # -- helpers ------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self.is_open:
            raise RuntimeError("the spool is not open")

    def _message(self, id: str) -> QueuedMessage:
        self._check_open()
        message = self._messages.get(id)
        if message is None:
            raise UnknownMessage(id)
        return message

    def _lock(self, id: str) -> asyncio.Lock:
        lock = self._locks.get(id)
        if lock is None:
            lock = self._locks[id] = asyncio.Lock()
        return lock


# -- the envelope file ------------------------------------------------------------------------------


def _to_json(message: QueuedMessage) -> dict[str, Any]:
    return {
        "format": _FORMAT,
        "id": message.id,
        "sender": message.sender,
        "created": message.created,
        "size": message.size,
        "recipients": [dataclasses.asdict(r) for r in message.recipients],
        "handoff": message.handoff,
    }


def _from_json(raw: Any, directory: Path) -> QueuedMessage:
    """Parse an envelope file, or raise ValueError/KeyError/TypeError."""
    if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
        raise ValueError("not a queue envelope of a known format")
    recipients = []
    for r in raw["recipients"]:
        state = r["state"]
        if state not in _STATES:
            raise ValueError(f"unknown recipient state {state!r}")
        recipients.append(
            Recipient(
                address=_typed(r["address"], str),
                state=state,
                attempts=_typed(r["attempts"], int),
                last_error=_typed(r["last_error"], str),
                next_attempt=float(r["next_attempt"]),
                route=_typed(r.get("route", ""), str),  # absent in envelopes written before clustering
            )
        )
    id = _typed(raw["id"], str)
    return QueuedMessage(
        id=id,
        sender=_typed(raw["sender"], str),
        recipients=tuple(recipients),
        created=float(raw["created"]),
        size=_typed(raw["size"], int),
        path=directory / f"{id}.eml",
        handoff=_typed(raw.get("handoff", ""), str),  # absent in envelopes written before hand-off ids
    )


def _typed(value: object, kind: type[_T]) -> _T:
    if not isinstance(value, kind):
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value
