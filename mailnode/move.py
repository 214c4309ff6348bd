"""A node's part in mailbox moves (docs/architecture.md "Moving a mailbox"; the endpoints and the step
order are mailwire.admin's "mailbox moves"; the operator's mailfleet.moving drives them). mailnode.node
makes one `Moves`; mailnode.admin.http serves its methods, each behind the internal token.

- On the source: `export` streams the mailbox (its index as committed now, the message files the
  target does not hold, and its calendars and contacts whole, under their DAV lock) as a tar; `freeze`
  holds the mailbox still (the store refuses deliveries, SMTP queues them, LMTP answers 4xx, its IMAP
  sessions end with BYE [UNAVAILABLE] and new logins get NO [UNAVAILABLE], DAV refuses writes with 503
  and Retry-After) until `thaw` or the hold runs out, kept on the volume across a restart; `drop` removes
  the copy left behind once the mailbox is homed elsewhere.
- On the target: `copy` pulls the export into a copy kept aside (mailnode.store.transfer), fetching only
  what it lacks; the copy is taken into place when the home flips here (`set_home`, or the directory file
  naming this node: mailnode.homes keeps the mailbox at its source until then).
- On every node: `set_home` takes the new home at once (mailnode.homes), and the queue is nudged so what
  waited for the mailbox goes to its new home now rather than after its retry delay.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import json
import logging
import secrets
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, BinaryIO, Final

import aiohttp
import prometheus_client as prom

from mailnode.backup import tarcodec
from mailnode.cluster import Cluster, UnknownPeer
from mailnode.config import Directory
from mailnode.gateway import Gateway
from mailnode.homes import Homes
from mailnode.metrics import NodeMetrics
from mailnode.store import davfiles, durable, transfer
from mailnode.store.mailstore import MailStore
from mailwire import admin

log = logging.getLogger(__name__)

FROZEN_FILE: Final = Path("moves") / "frozen.json"  # address -> {"until": UNIX seconds, "id": the freeze's}
OUTGOING: Final = Path("moves") / "outgoing"  # index copies being exported
SUMMARY: Final = "MOVE.json"  # the export's last member: what it held; its absence means a cut stream
# How long a freeze lets the IMAP sessions it ended finish the command they are in (a session waiting
# for its client, in IDLE, would wait for the client's TLS close): then they are cancelled.
SESSIONS_GRACE: Final = 1.0
# A pull of a large mailbox streams for minutes; a silent source for this long is gone.
PULL_TIMEOUT: Final = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)


class Refused(Exception):
    """A move request the node answers with `status` (4xx lasting, 409 or 5xx: try again)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="seconds")


class _Hold:
    """A freeze: until when, since when, and its id (kept while the freeze lasts without a gap, across a
    restart too: a final copy made under it needs no second one, mailnode.store.transfer.CopyState)."""

    def __init__(self, until: float, since: float, timer: asyncio.TimerHandle, id: str) -> None:
        self.until, self.since, self.timer, self.id = until, since, timer, id


class Unchanged(Exception):
    """A final export asked for under the freeze the caller's copy was made under: nothing can have changed."""


@dataclasses.dataclass(frozen=True)
class Export:
    """An export ready to stream (`stream(write)`), and the freeze it is made under (a final one)."""

    stream: Callable[[Callable[[bytes], Coroutine[Any, Any, None]]], Awaitable[None]]
    freeze: str | None


class Moves:
    def __init__(
        self,
        *,
        store: MailStore,
        cluster: Cluster,
        homes: Homes,
        directory: Callable[[], Directory],
        data_dir: Path,
        token: str | None,
        metrics: NodeMetrics,
        close_sessions: Callable[[str], list[asyncio.Task[Any]]],
        nudge: Callable[[], Coroutine[Any, Any, None]],
        gateway: Gateway | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`directory`: the directory file's (the homes it names, before `homes` changes them);
        `close_sessions(address)` ends that mailbox's IMAP sessions with BYE [UNAVAILABLE] and returns
        their tasks; `nudge` makes the queued hand-offs due now."""
        self._store = store
        self._cluster = cluster
        self.homes = homes
        self._file_directory = directory
        self._root = data_dir
        self._token = token
        self._close_sessions = close_sessions
        self._nudge = nudge
        # Exports and copies hold a thread for the whole stream: threads of their own, never the store's.
        self._gateway = gateway or Gateway(workers=4)
        self._clock = clock
        self._holds: dict[str, _Hold] = {}
        self._saving_holds = asyncio.Lock()  # one write of FROZEN_FILE at a time
        self._locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        r = metrics.registry
        self.exports = prom.Counter(
            "mailnode_move_exports", "Mailbox exports streamed to a move's target", ["final"], registry=r
        )
        self.copies = prom.Counter(
            "mailnode_move_copies", "Copies pulled for a move, by result", ["final", "result"], registry=r
        )
        self.fetched_bytes = prom.Counter(
            "mailnode_move_fetched_bytes", "Message bytes pulled from a move's source", registry=r
        )
        self.frozen_gauge = prom.Gauge("mailnode_frozen_mailboxes", "Mailboxes frozen for a move now", registry=r)
        self.taken = prom.Counter(
            "mailnode_move_copies_taken", "Copies taken into place when the home flipped here", registry=r
        )

    # -- life cycle -------------------------------------------------------------------------------------

    def directory(self) -> Directory:
        """The directory in force: the file's, with the homes moves changed (mailnode.homes)."""
        return self.homes.view(self._file_directory())

    async def start(self) -> None:
        """Before the listeners: the overrides and holds kept on the volume, the incoming copies; a copy
        whose home the directory file already names here is taken into place."""
        self._loop = asyncio.get_running_loop()
        await self._gateway.run(self._load)
        now = self._clock()
        for address, (until, id) in (await self._gateway.run(self._read_holds)).items():
            if until > now:
                self._store.frozen.add(address)
                self._hold(address, until, id=id)
        await self._after_reload()

    def _load(self) -> None:
        transfer.empty_trash(self._root)
        self.homes.load()
        for address, path in transfer.incoming(self._root):
            state = transfer.state(path)
            if state is not None:
                self.homes.set_pending(address, state.source)
        self.homes.forget_agreed(self._file_directory())

    async def stop(self) -> None:
        for hold in self._holds.values():
            hold.timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._session is not None:
            await self._session.close()
        self._gateway.close()

    def reloaded(self) -> None:
        """The directory file changed (called from the watcher's thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._spawn, self._after_reload())

    def _spawn(self, work: Coroutine[Any, Any, object]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _after_reload(self) -> None:
        """Overrides the file now agrees with are forgotten; final copies the file homes here are taken."""
        try:
            directory = self._file_directory()
            await self._gateway.run(self.homes.forget_agreed, directory)
            taken = False
            for address in self.homes.waiting_to_take(directory):
                copy = transfer.aside_dir(self._root, address)
                state = await self._gateway.run(transfer.state, copy)
                if state is not None and state.final:
                    async with self._locks[address]:
                        if address in self.homes.pending:
                            await self._take(address)
                            taken = True
            if taken:
                self._spawn(self._nudge())
        except Exception:
            log.exception("applying a directory reload to the moves failed")

    async def _take(self, address: str) -> None:
        """Under the address's lock: the incoming copy becomes the mailbox."""
        await self._store.take(address, transfer.aside_dir(self._root, address))
        self.homes.set_pending(address, None)
        self.taken.inc()
        log.info("moved mailbox taken into place", extra={"fields": {"mailbox": address}})

    def _entry(self, address: str) -> str:
        entry = self._file_directory().get(address)
        if entry is None:
            raise Refused(404, f"no mailbox {address} in this node's directory")
        return entry.address

    def _homed_here(self, address: str) -> bool:
        entry = self.directory().get(address)
        return entry is not None and self._cluster.is_home(entry) and address not in self.homes.pending

    # -- the source: export, freeze, thaw, drop ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def export(
        self, address: str, *, have: set[str], final: bool, unless_freeze: str | None = None
    ) -> AsyncIterator[Export]:
        """The mailbox as a tar: `index.sqlite` (committed now), every message file it lists but `have`,
        every file of `.dav/` that davfiles carries (under its DAV lock: a final export, made under the
        freeze, holds every write DAV accepted, mailnode.web.dav), then SUMMARY. Checks (Refused) and the
        index copy happen on entering; the yielded Export streams through `write`. `final`: the mailbox
        must be frozen, and every file listed is sent; Unchanged when the freeze is still `unless_freeze`,
        the one the caller's final copy was made under."""
        address = self._entry(address)
        hold = self._holds.get(address)
        if final and (hold is None or not self._store.is_frozen(address)):
            raise Refused(409, f"{address} is not frozen: a final copy is made only under the freeze")
        if final and hold is not None and unless_freeze == hold.id:
            raise Unchanged(address)
        outgoing = self._root / OUTGOING
        await self._gateway.run(durable.ensure_dir, outgoing)
        snapshot = outgoing / durable.unique_name(0)
        try:
            mailbox_path, files = await self._store.snapshot(address, snapshot)
        except Exception:
            snapshot.unlink(missing_ok=True)
            raise
        self.exports.labels(str(final).lower()).inc()

        async def stream(write: Callable[[bytes], Coroutine[Any, Any, None]]) -> None:
            loop = asyncio.get_running_loop()
            stop = threading.Event()

            def forward(chunk: bytes) -> None:
                if stop.is_set():
                    raise OSError("the export was cancelled")
                asyncio.run_coroutine_threadsafe(write(chunk), loop).result()

            def run() -> None:
                out = _Sink(forward)
                tar = tarcodec.TarWriter(out, total=0, progress=None)  # type: ignore[arg-type]
                tar.add_file(transfer.INDEX, str(snapshot))
                sent = skipped = 0
                for rel, _ in files:
                    if rel in have:
                        continue
                    try:
                        tar.add_file(rel, str(mailbox_path / rel))
                        sent += 1
                    except FileNotFoundError:
                        if final:  # under the freeze nothing is removed: a missing file is damage
                            raise
                        skipped += 1  # expunged since the index copy; the next copy's index lists it no more
                with davfiles.locked(mailbox_path, exclusive=False):
                    dav = davfiles.files(mailbox_path)
                    for rel, _ in dav:
                        tar.add_file(f"{davfiles.DIR}/{rel}", str(mailbox_path / davfiles.DIR / rel))
                summary = {"messages": len(files), "sent": sent, "skipped": skipped, "final": final, "dav": len(dav)}
                tar.add_bytes(SUMMARY, json.dumps(summary).encode(), int(time.time()))
                tar.close()

            try:
                await self._gateway.run(run)
            except BaseException:
                stop.set()
                raise

        try:
            yield Export(stream, hold.id if final and hold is not None else None)
        finally:
            await self._gateway.run(snapshot.unlink, True)

    async def freeze(self, address: str, *, hold_seconds: float) -> admin.Frozen:
        """Hold the mailbox still until `thaw` or `hold_seconds` from now (asking again extends it)."""
        address = self._entry(address)
        self._store.frozen.add(address)
        until = self._clock() + hold_seconds
        previous = self._holds.get(address)
        if previous is None:
            self._hold(address, until, id=secrets.token_hex(8))
        else:
            self._hold(address, until, id=previous.id, since=previous.since)
        await self._save_holds()
        tasks = self._close_sessions(address)
        if tasks:
            _, running = await asyncio.wait(tasks, timeout=SESSIONS_GRACE)
            for task in running:
                task.cancel()
            if running:  # a task may still wait for its client's TLS close, which the freeze need not
                await asyncio.wait(running, timeout=SESSIONS_GRACE)
        await self._store.settled(address)
        if previous is None:
            log.info("mailbox frozen for a move", extra={"fields": {"mailbox": address, "sessions": len(tasks)}})
        return admin.Frozen(mailbox=address, hold_until=_iso(until), sessions_closed=len(tasks))

    def _hold(self, address: str, until: float, *, id: str, since: float | None = None) -> None:
        assert self._loop is not None
        previous = self._holds.pop(address, None)
        if previous is not None:
            previous.timer.cancel()
        timer = self._loop.call_later(max(0.0, until - self._clock()), self._expired, address)
        self._holds[address] = _Hold(until, self._clock() if since is None else since, timer, id)
        self.frozen_gauge.set(len(self._holds))

    def _expired(self, address: str) -> None:
        log.warning("a move's freeze ran out; the mailbox takes mail again", extra={"fields": {"mailbox": address}})
        self._spawn(self._unfreeze(address))

    async def thaw(self, address: str) -> admin.Thawed:
        address = self._entry(address)
        if address not in self._holds:
            raise Refused(409, f"{address} is not frozen")
        seconds = await self._unfreeze(address)
        return admin.Thawed(mailbox=address, frozen_seconds=round(seconds, 3))

    async def _unfreeze(self, address: str) -> float:
        hold = self._holds.pop(address, None)
        self._store.frozen.discard(address)
        self.frozen_gauge.set(len(self._holds))
        if hold is None:
            return 0.0
        hold.timer.cancel()
        await self._save_holds()
        self._spawn(self._nudge())
        return max(0.0, self._clock() - hold.since)

    def _read_holds(self) -> dict[str, tuple[float, str]]:
        try:
            raw = json.loads((self._root / FROZEN_FILE).read_bytes())
            return {str(address): (float(hold["until"]), str(hold["id"])) for address, hold in raw.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError, KeyError, TypeError) as error:
            log.warning("frozen mailboxes unreadable; ignored", extra={"fields": {"error": str(error)}})
            return {}

    async def _save_holds(self) -> None:
        def save(holds: dict[str, dict[str, float | str]]) -> None:
            durable.ensure_dir((self._root / FROZEN_FILE).parent)
            durable.replace_synced(self._root / FROZEN_FILE, json.dumps(holds, sort_keys=True).encode())

        async with self._saving_holds:  # the holds as they are when the write starts: the last write wins
            holds: dict[str, dict[str, float | str]] = {
                address: {"until": hold.until, "id": hold.id} for address, hold in self._holds.items()
            }
            await self._gateway.run(save, holds)

    async def drop(self, address: str) -> admin.Dropped:
        """Remove what this node holds of a mailbox homed elsewhere: the mailbox directory left by a move,
        or a copy received for one that was given up."""
        address = self._entry(address)
        if self._homed_here(address):
            raise Refused(409, f"{address} is homed on this node: it is not dropped")
        async with self._locks[address]:
            messages = size = 0
            copy = transfer.aside_dir(self._root, address)
            found = False
            if await self._gateway.run(copy.exists):
                found = True
                messages, size = await self._gateway.run(transfer.usage, copy)
                await self._gateway.run(transfer.remove, self._root, copy)
                self.homes.set_pending(address, None)
            if await self._gateway.run(self._store.holds, address):
                found = True
                used = await self._store.drop(address)
                messages, size = messages + used.messages, size + used.bytes
            if address in self._holds:
                await self._unfreeze(address)
        if not found:
            raise Refused(404, f"this node holds no copy of {address}")
        self._spawn(self._gateway.run(transfer.empty_trash, self._root))
        log.info("moved mailbox's old copy dropped", extra={"fields": {"mailbox": address, "messages": messages}})
        return admin.Dropped(mailbox=address, messages=messages, bytes=size)

    # -- the target: copy ------------------------------------------------------------------------------

    async def copy(self, address: str, *, source: int, final: bool) -> admin.MoveCopied:
        """Pull the mailbox from node `source` into the copy kept aside. A node already the mailbox's home
        answers what it holds and fetches nothing (the move went past this step)."""
        address = self._entry(address)
        if source == self._cluster.ordinal:
            raise Refused(400, f"node {source} is this node: a move copies from another one")
        try:
            peer = self._cluster.peer(source)
        except UnknownPeer as error:
            raise Refused(400, str(error)) from None
        started = time.monotonic()
        async with self._locks[address]:
            if self._homed_here(address):
                used = self._store.usage(address)
                return admin.MoveCopied(
                    mailbox=address, messages=used.messages, bytes=used.bytes, fetched_messages=0, fetched_bytes=0,
                    seconds=round(time.monotonic() - started, 3),
                )  # fmt: skip
            copy = transfer.aside_dir(self._root, address)
            url = f"http://{peer.host}:{peer.http}/mailboxes/{urllib.parse.quote(address, safe='@')}/export"
            state = await self._gateway.run(transfer.state, copy)
            # Made under the source's freeze already: unless that freeze lapsed since, nothing changed.
            made_under = state.freeze if state is not None and state.final and state.source == source else None
            if final and made_under is not None and await self._unchanged(url, made_under):
                messages, size = await self._gateway.run(transfer.usage, copy)
                return admin.MoveCopied(
                    mailbox=address, messages=messages, bytes=size, fetched_messages=0, fetched_bytes=0,
                    seconds=round(time.monotonic() - started, 3),
                )  # fmt: skip
            await self._gateway.run(transfer.begin, copy, source=source)
            self.homes.set_pending(address, source)
            have = await self._gateway.run(transfer.held, copy)
            try:
                fetched, fetched_bytes, written, freeze = await self._pull(url, copy, have=have, final=final)
                messages, size = await self._gateway.run(
                    transfer.finish, copy, source=source, final=final, written=written, freeze=freeze
                )
            except Refused:
                self.copies.labels(str(final).lower(), "failed").inc()
                raise
            except (tarcodec.ArchiveError, OSError, ValueError) as error:
                self.copies.labels(str(final).lower(), "failed").inc()
                raise Refused(502, f"copying {address} from node {source} failed: {error}") from error
        self.copies.labels(str(final).lower(), "ok").inc()
        self.fetched_bytes.inc(fetched_bytes)
        seconds = time.monotonic() - started
        log.info(
            "mailbox copied for a move",
            extra={"fields": {"mailbox": address, "source": source, "final": final, "fetched": fetched,
                              "messages": messages, "seconds": round(seconds, 3)}},
        )  # fmt: skip
        return admin.MoveCopied(
            mailbox=address, messages=messages, bytes=size, fetched_messages=fetched, fetched_bytes=fetched_bytes,
            seconds=round(seconds, 3),
        )  # fmt: skip

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=PULL_TIMEOUT)
        return self._session

    async def _unchanged(self, url: str, freeze: str) -> bool:
        """Whether the source is still under the freeze `freeze` (answers 304 to the final export)."""
        headers = {"Authorization": f"Bearer {self._token or ''}", "If-None-Match": f'"{freeze}"'}
        try:
            async with self._client().get(url, params={"final": "1"}, headers=headers) as response:
                return response.status == 304
        except (aiohttp.ClientError, TimeoutError):
            return False  # the full copy that follows says what is wrong

    async def _pull(
        self, url: str, copy: Path, *, have: set[str], final: bool
    ) -> tuple[int, int, list[Path], str | None]:
        """(messages fetched, their bytes, the files written, the freeze the export was made under)."""
        headers = {"Authorization": f"Bearer {self._token or ''}", "Content-Type": "text/plain"}
        body = "\n".join(sorted(have)).encode()
        loop = asyncio.get_running_loop()
        try:
            async with self._client().get(
                url, params={"final": "1" if final else "0"}, data=body, headers=headers
            ) as response:
                if response.status != 200:
                    text = (await response.text())[:300]
                    with contextlib.suppress(ValueError, AttributeError):
                        text = str(json.loads(text).get("error", text))
                    # The source's refusal stays one for the caller: unknown there, not frozen (409).
                    status = response.status if response.status in (404, 409) else 502
                    raise Refused(status, f"the source answered {response.status}: {text}")
                raw = _Stream(response.content, loop)
                fetched, size, written = await self._gateway.run(_receive, raw, copy, url)
                return fetched, size, written, response.headers.get("ETag", "").strip('"') or None
        except aiohttp.ClientError as error:
            raise Refused(502, f"cannot reach the source ({url}): {error}") from error
        except TimeoutError as error:
            raise Refused(502, f"the source ({url}) went silent") from error

    # -- every node: the home ------------------------------------------------------------------------------

    async def set_home(self, address: str, home: int) -> admin.HomeSet:
        """The mailbox is homed at `home` from now on; here, a copy received for it is taken into place
        first, so it is served from the first moment this node is the home."""
        address = self._entry(address)
        if self._cluster.clustered:
            try:
                self._cluster.peer(home)
            except UnknownPeer as error:
                raise Refused(400, str(error)) from None
        async with self._locks[address]:
            if home == self._cluster.ordinal and address in self.homes.pending:
                await self._take(address)
            if self.homes.overrides.get(address) != home:
                await self._gateway.run(self.homes.set, address, home)
        self._spawn(self._nudge())  # not awaited: the freeze is on while the driver waits for this answer
        return admin.HomeSet(mailbox=address, home=home)


class _Sink:
    """A writable file for TarWriter whose bytes go to a function."""

    def __init__(self, forward: Callable[[bytes], None]) -> None:
        self._forward = forward

    def write(self, data: bytes) -> int:
        self._forward(bytes(data))
        return len(data)


class _Stream:
    """The HTTP body as a blocking file for the tar reader, read from a Gateway thread."""

    def __init__(self, content: aiohttp.StreamReader, loop: asyncio.AbstractEventLoop) -> None:
        self._content = content
        self._loop = loop

    def read(self, size: int = -1) -> bytes:
        return asyncio.run_coroutine_threadsafe(self._content.read(size), self._loop).result()


def _receive(raw: Any, copy: Path, label: str) -> tuple[int, int, list[Path]]:
    """Blocking: write an export's members into the incoming copy; (messages fetched, their bytes, the
    files written)."""
    source = tarcodec.Source(_as_binary(raw), label=label, progress=None, total=0)
    tar = tarcodec.TarReader(source)
    fetched = fetched_bytes = 0
    written: list[Path] = []
    got_index = got_summary = False
    transfer.dav_begin(copy)
    while (entry := tar.next()) is not None:
        if entry.name == transfer.INDEX:
            target = transfer.index_target(copy)
            tarcodec.copy_member(tar, target)
            written.append(target)
            got_index = True
        elif entry.name == SUMMARY:
            json.loads(tar.read_all())
            got_summary = True
        elif entry.name.startswith(f"{davfiles.DIR}/"):
            target = transfer.dav_target(copy, entry.name[len(davfiles.DIR) + 1 :])
            tarcodec.copy_member(tar, target)
            written.append(target)
        else:
            part = transfer.file_target(copy, entry.name)
            size, _ = tarcodec.copy_member(tar, part)
            written.append(transfer.settle_file(part))
            fetched += 1
            fetched_bytes += size
    if not (got_index and got_summary):
        raise tarcodec.ArchiveError(f"{label}: the export ended before its end")
    source.drain()  # the end-of-archive padding and the HTTP body's end, so the source's stream completes
    return fetched, fetched_bytes, written


def _as_binary(raw: Any) -> BinaryIO:
    return raw  # type: ignore[no-any-return]  # read() is all the tar reader uses
