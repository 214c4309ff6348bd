"""A fake mail node: the admin endpoints the operator uses (GET /usage, and docs/backups.md's POST and
DELETE /snapshot, POST /backups, GET and DELETE /backups/<name>), over real HTTP on 127.0.0.1, recording
every call in order. It answers with the real node's models (mailwire.admin); tests/node/test_wire_contract.py
runs the operator's node client against it and against a real node, with the same assertions.

Like the node, it requires the domain's internal token (`token`, `Authorization: Bearer`) of every
request that changes state, and answers 401 without it or with another; the tests put the same token in
the domain's `<maildomain>-internal` Secret, which the operator keeps and reads it from.

The operator's tests (tests/operator/test_backup.py on kmock, tests/cluster/test_backup.py on a real API
server) point the operator's node URL at it. Switches make it refuse: `refuse_snapshot` answers every
checkpoint with an error, `unavailable` answers the next N calls 503, `archive_error` fails the archives.
`on_resume` runs when the operator resumes writes, before the node answers: the test looks at the
Kubernetes API from there (is the VolumeSnapshot there, is it cut?), which is the order that matters.

Mailbox moves (mailwire.admin "mailbox moves"): POST /moves/{address} (the target copies from its peer
`source`, kept aside until it is the home), POST and DELETE /mailboxes/{address}/freeze, PUT
/mailboxes/{address}/home, DELETE /mailboxes/{address} (409 when homed here). A node's mailboxes are the
keys of `usage`; `FakeCluster` serves several nodes under /<ordinal>/ of one port (the operator's node URL
`<url>/{ordinal}`), each one's peers the others. `on_move(call)` runs before each move request is answered
(the test looks at the StatefulSet from there); `gate` holds a move step until the test opens it.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import aiohttp.web
import pydantic

from mailwire import admin

STORE_NOT_OPEN = "the store is not open"
TOKEN = "fake-node-internal-token-0123456789abcdefABCDEF"


@dataclasses.dataclass(frozen=True)
class Call:
    method: str
    path: str
    query: dict[str, str]
    status: int  # what the fake answered
    at: float  # time.time() when it answered

    @property
    def endpoint(self) -> str:
        """ "POST /snapshot", "GET /backups/<name>"."""
        return f"{self.method} {self.path}"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


class FakeNode:
    def __init__(
        self, *, backup_dir: str = "/var/lib/mailnode/backups", max_hold: int = 60, token: str = TOKEN
    ) -> None:
        self.backup_dir, self.max_hold, self.token = backup_dir, max_hold, token
        self.calls: list[Call] = []
        self.refuse_snapshot: tuple[int, str] | None = None  # (HTTP status, error) for every POST /snapshot
        self.unavailable = 0  # answer this many next calls 503, as a node whose store is not open yet
        self.archive_error: str | None = None  # archives end Failed with this error
        self.archive_seconds = 0.2  # how long an archive takes to write
        self.on_resume: Callable[[], Awaitable[Any]] | None = None
        self.seen_at_resume: list[Any] = []  # what on_resume returned, at each DELETE /snapshot
        self.point_in_time: str | None = None  # of the last checkpoint
        # GET /usage; the checkpoints and archives count these mailboxes and messages
        self.usage: dict[str, admin.MailboxUsage] = {"alice@example.com": admin.MailboxUsage(bytes=2048, messages=2)}
        self.archives: dict[str, admin.Archive] = {}
        self.holds_expired = 0
        self._hold: asyncio.TimerHandle | None = None
        self._paused_at = 0.0
        self._runner: aiohttp.web.AppRunner | None = None
        self.url = ""
        # Mailbox moves
        self.ordinal = 0
        self.peers: dict[int, FakeNode] = {self.ordinal: self}  # ordinal -> node (FakeCluster fills it)
        self.kept: dict[str, admin.MailboxUsage] = {}  # copies made by a move, not served until home here
        self.frozen: dict[str, float] = {}  # address -> time.monotonic() when frozen
        self.homes: dict[str, int] = {}  # PUT /mailboxes/{address}/home
        self.refuse_moves: tuple[int, str] | None = None  # (HTTP status, error) for every POST /moves
        self.on_move: Callable[[str], Awaitable[Any]] | None = None  # before a move request is answered
        self.gate: tuple[str, asyncio.Event] | None = None  # ("/moves final=True", opened): held until set
        self.gate_waiting = 0  # requests held at the gate now
        self.copies: list[tuple[str, bool]] = []  # every POST /moves: (address, final)

    @property
    def paused(self) -> bool:
        return self._hold is not None

    def endpoints(self, *, ok_only: bool = False) -> list[str]:
        return [call.endpoint for call in self.calls if not ok_only or call.status < 300]

    def app(self) -> aiohttp.web.Application:
        app = aiohttp.web.Application(middlewares=[self._record])
        app.router.add_get("/usage", self._usage)
        app.router.add_post("/snapshot", self._checkpoint)
        app.router.add_delete("/snapshot", self._resume)
        app.router.add_post("/backups", self._start_archive)
        app.router.add_get("/backups/{name}", self._archive)
        app.router.add_delete("/backups/{name}", self._delete_archive)
        app.router.add_post("/moves/{address}", self._copy)
        app.router.add_post("/mailboxes/{address}/freeze", self._freeze)
        app.router.add_delete("/mailboxes/{address}/freeze", self._thaw)
        app.router.add_put("/mailboxes/{address}/home", self._set_home)
        app.router.add_delete("/mailboxes/{address}", self._drop)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = aiohttp.web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = aiohttp.web.TCPSite(self._runner, host, port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        if self._hold is not None:
            self._hold.cancel()
            self._hold = None
        if self._runner is not None:
            await self._runner.cleanup()

    @aiohttp.web.middleware
    async def _record(
        self,
        request: aiohttp.web.Request,
        handler: Callable[[aiohttp.web.Request], Awaitable[aiohttp.web.StreamResponse]],
    ) -> aiohttp.web.StreamResponse:
        changes = request.method not in ("GET", "HEAD")
        if changes and request.headers.get("Authorization") != f"Bearer {self.token}":
            response: aiohttp.web.StreamResponse = _error(401, "no or a wrong internal token")
        elif self.unavailable > 0:
            self.unavailable -= 1
            response = _error(503, STORE_NOT_OPEN)
        else:
            response = await handler(request)
        self.calls.append(Call(request.method, request.path, dict(request.query), response.status, time.time()))
        return response

    @property
    def _messages(self) -> int:
        return sum(used.messages for used in self.usage.values())

    async def _usage(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        return _answer(admin.Usage(mailboxes=self.usage))

    async def _checkpoint(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        if self.refuse_snapshot is not None:
            return _error(*self.refuse_snapshot)
        try:
            hold = float(request.query.get("hold", "60"))
        except ValueError:
            return _error(400, "hold must be a number of seconds")
        if not 1 <= hold <= self.max_hold:
            return _error(400, f"hold must be 1..{self.max_hold} seconds")
        if self._hold is not None:
            return _error(409, "a checkpoint is already in progress")
        self._hold = asyncio.get_running_loop().call_later(hold, self._expire)
        self._paused_at = time.monotonic()
        self.point_in_time = _now()
        until = datetime.datetime.fromisoformat(self.point_in_time) + datetime.timedelta(seconds=hold)
        return _answer(
            admin.Checkpoint(
                point_in_time=self.point_in_time,
                hold_until=until.isoformat(),
                mailboxes=len(self.usage),
                messages=self._messages,
                queued=0,
            )
        )

    def _expire(self) -> None:
        self._hold = None
        self.holds_expired += 1

    async def _resume(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        if not self.paused:
            return _error(409, "no checkpoint in progress")
        if self.on_resume is not None:
            self.seen_at_resume.append(await self.on_resume())
        hold, self._hold = self._hold, None
        if hold is None:  # ran out while on_resume looked
            return _error(409, "no checkpoint in progress")
        hold.cancel()
        return _answer(admin.Resumed(paused_seconds=round(time.monotonic() - self._paused_at, 3)))

    async def _start_archive(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        try:
            name = admin.BackupRequest.model_validate(await request.json()).name
        except pydantic.ValidationError as error:
            return _error(400, admin.problem(error))
        if name in self.archives:
            return _answer(self.archives[name])
        record = admin.Archive(name=name, state="Running", path=f"{self.backup_dir}/{name}.tar", point_in_time=_now())
        self.archives[name] = record
        asyncio.get_running_loop().call_later(self.archive_seconds, self._archive_written, name)
        return _answer(record, status=202)

    def _archive_written(self, name: str) -> None:
        record = self.archives.get(name)
        if record is None:
            return
        if self.archive_error is not None:
            self.archives[name] = record.model_copy(update={"state": "Failed", "error": self.archive_error})
        else:
            counts = {"mailboxes": len(self.usage), "messages": self._messages, "bytes": 4096}
            self.archives[name] = record.model_copy(update={"state": "Completed", **counts})

    async def _archive(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        name = request.match_info["name"]
        record = self.archives.get(name)
        if record is None:
            return _error(404, f"no backup named {name!r}")
        return _answer(record)

    async def _delete_archive(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        name = request.match_info["name"]
        record = self.archives.get(name)
        if record is None:
            return _error(404, f"no backup named {name!r}")
        if record.state == "Running":
            return _error(409, f"archive {name!r} is being written")
        del self.archives[name]
        return _answer(admin.DeletedArchive(**record.model_dump()))

    # -- mailbox moves ----------------------------------------------------------------------------------

    def homed_here(self, address: str) -> bool:
        home = self.homes.get(address)
        return home == self.ordinal if home is not None else address in self.usage

    async def _before_move(self, request: aiohttp.web.Request, what: str) -> None:
        if self.on_move is not None:
            await self.on_move(f"{request.method} {what}")
        if self.gate is not None and self.gate[0] == what:
            self.gate_waiting += 1
            try:
                await self.gate[1].wait()
            finally:
                self.gate_waiting -= 1

    async def _copy(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        address = request.match_info["address"]
        try:
            wanted = admin.MoveCopy.model_validate(await request.json())
        except pydantic.ValidationError as error:
            return _error(400, admin.problem(error))
        self.copies.append((address, wanted.final))
        await self._before_move(request, f"/moves final={wanted.final}")
        if self.refuse_moves is not None:
            return _error(*self.refuse_moves)
        if self.homed_here(address):  # FLIPPING asked again after the flip: the copy is the home
            used = self.usage[address]
            return _answer(admin.MoveCopied(mailbox=address, **_counts(used), **_fetched(0, 0)))
        source = self.peers.get(wanted.source)
        if source is None or address not in source.usage:
            return _error(502, f"node {wanted.source} has no mailbox {address}")
        if wanted.final and address not in source.frozen:
            return _error(409, f"{address} is not frozen on node {wanted.source}: the final copy needs the freeze")
        before = self.kept.get(address, admin.MailboxUsage(bytes=0, messages=0))
        copy = source.usage[address]
        self.kept[address] = copy
        fetched = _fetched(copy.messages - before.messages, copy.bytes - before.bytes)
        return _answer(admin.MoveCopied(mailbox=address, **_counts(copy), **fetched))

    async def _freeze(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        address = request.match_info["address"]
        try:
            hold = admin.Freeze.model_validate(await request.json()).hold_seconds
        except pydantic.ValidationError as error:
            return _error(400, admin.problem(error))
        await self._before_move(request, "/freeze")
        if address not in self.usage:
            return _error(404, f"no mailbox {address} here")
        self.frozen.setdefault(address, time.monotonic())
        until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=hold)
        return _answer(admin.Frozen(mailbox=address, hold_until=until.isoformat(), sessions_closed=0))

    async def _thaw(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        address = request.match_info["address"]
        await self._before_move(request, "/freeze")
        since = self.frozen.pop(address, None)
        if since is None:
            return _error(409, f"{address} is not frozen")
        return _answer(admin.Thawed(mailbox=address, frozen_seconds=round(time.monotonic() - since, 3)))

    async def _set_home(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        address = request.match_info["address"]
        try:
            home = admin.HomeOverride.model_validate(await request.json()).home
        except pydantic.ValidationError as error:
            return _error(400, admin.problem(error))
        await self._before_move(request, "/home")
        self.homes[address] = home
        if home == self.ordinal and address in self.kept:
            self.usage[address] = self.kept.pop(address)  # the copy is served now
        return _answer(admin.HomeSet(mailbox=address, home=home))

    async def _drop(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        address = request.match_info["address"]
        await self._before_move(request, "/mailboxes")
        if self.homed_here(address):
            return _error(409, f"{address} is homed on this node")
        dropped = self.usage.pop(address, None) or self.kept.pop(address, None)
        if dropped is None:
            return _error(404, f"no copy of {address} here")
        return _answer(admin.Dropped(mailbox=address, **_counts(dropped)))


def _counts(used: admin.MailboxUsage) -> dict[str, int]:
    return {"messages": used.messages, "bytes": used.bytes}


def _fetched(messages: int, size: int) -> dict[str, Any]:
    return {"fetched_messages": max(messages, 0), "fetched_bytes": max(size, 0), "seconds": 0.001}


class FakeCluster:
    """`size` fake nodes (ordinals 0..size-1, each the others' peer) under /<ordinal>/ of one port:
    `template` is the operator's node URL. Their mailboxes start empty (each node's `usage`)."""

    def __init__(self, size: int, *, token: str = TOKEN) -> None:
        self.nodes = [FakeNode(token=token) for _ in range(size)]
        for ordinal, node in enumerate(self.nodes):
            node.ordinal = ordinal
            node.usage = {}
            node.peers = dict(enumerate(self.nodes))
        self._runner: aiohttp.web.AppRunner | None = None
        self.url = ""

    @property
    def template(self) -> str:
        return f"{self.url}/{{ordinal}}"

    def place(self, homes: dict[str, int]) -> None:
        """Each mailbox stored on its home, with a few messages (its length: moves copy them)."""
        for address, home in homes.items():
            self.nodes[home].usage[address] = admin.MailboxUsage(bytes=100 * len(address), messages=len(address))

    def holders(self) -> dict[str, list[int]]:
        """address -> the nodes that store it (served or kept aside)."""
        found: dict[str, list[int]] = {}
        for node in self.nodes:
            for address in [*node.usage, *node.kept]:
                found.setdefault(address, []).append(node.ordinal)
        return found

    def moved(self) -> set[str]:
        """The mailboxes some node was asked to copy."""
        return {call.path.rsplit("/", 1)[1] for node in self.nodes for call in node.calls if call.method == "POST"
                and "/moves/" in call.path}  # fmt: skip

    async def start(self) -> str:
        app = aiohttp.web.Application()
        for ordinal, node in enumerate(self.nodes):
            app.add_subapp(f"/{ordinal}/", node.app())
        self._runner = aiohttp.web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = aiohttp.web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _answer(model: admin.Message, *, status: int = 200) -> aiohttp.web.Response:
    return aiohttp.web.json_response(model.to_json(), status=status)


def _error(status: int, message: str) -> aiohttp.web.Response:
    return _answer(admin.Error(error=message), status=status)


def internal_secret(domain: str, token: str, *, namespace: str) -> dict[str, Any]:
    """MailDomain `domain`'s internal Secret holding `token`: what the operator finds and keeps."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": f"{domain}-internal", "namespace": namespace},
        "type": "Opaque",
        "data": {"token": base64.b64encode(token.encode()).decode()},
    }


Served = TypeVar("Served", FakeNode, FakeCluster)


@contextmanager
def serving(node: Served) -> Iterator[Served]:
    """The fake node (or cluster) in a thread with its own event loop, for tests that are not coroutines
    (tests/cluster). Its `on_resume` then runs in that loop."""
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(node.start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="fake mail node", daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("the fake node did not start")
    try:
        yield node
    finally:
        asyncio.run_coroutine_threadsafe(node.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
