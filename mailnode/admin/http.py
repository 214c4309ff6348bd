"""HTTP endpoints of a node: /healthz, /readyz, /metrics, /status, and the outbound queue.

Kubelet probes /healthz (the process answers) and /readyz (listeners up, store open); Prometheus
scrapes /metrics; /status is a JSON summary for people and the operator. Every JSON request and answer
is a model of mailwire.admin (snake_case keys), the ones the operator and `mailnode` parse them with.

The outbound queue, for `mailnode queue` and the operator on call:

    GET    /queue             every queued message, oldest first (JSON)
    POST   /queue/{id}/retry  make the message's pending recipients due now (loopback)
    DELETE /queue/{id}        drop the message, whatever its recipients' state, without a bounce (loopback)

An unknown id answers 404 `{"error": ...}`.

Checkpoints and archives, as docs/backups.md specifies them (the operator calls the first five from
its own pod; the last two read or write mail wholesale and are for loopback clients only):

    POST   /snapshot[?hold=S]  pause writes and checkpoint every index (409 when one is in progress)
    DELETE /snapshot           resume writes
    POST   /backups            {"name": N}: write <backup dir>/N.tar in the background (202; 200 if known)
    GET    /backups/{name}     that archive's state
    DELETE /backups/{name}     remove that archive (retention; 409 while it is being written)
    GET    /backup             a fresh archive, streamed (loopback)
    POST   /restore            one mailbox from an archive in the pod into a mailbox of the node (loopback)

Mailbox moves (mailwire.admin "mailbox moves"; mailnode.move does the work), each with the internal token
from any client (the operator and the peer nodes call them):

    POST   /moves/{address}              pull the mailbox from node `source` (the target)
    GET    /mailboxes/{address}/export   the mailbox as a tar; the body lists the files the caller holds
                                         (final=1: only under the freeze, whose id is the ETag; 304
                                         to If-None-Match of the freeze still on)
    POST   /mailboxes/{address}/freeze   hold it still (the source); DELETE: thaw
    PUT    /mailboxes/{address}/home     its home from now on (every node)
    DELETE /mailboxes/{address}          drop this node's copy of a mailbox homed elsewhere (409 if here)

Who may do what (`Guard`): the port listens on the pod network, so every request that changes state
(or streams all of the mail: GET /backup) needs the domain's internal token, `Authorization: Bearer
<token>` (RFC 6750 §2.1), which the operator sends and `mailnode` reads from the node config; the ones
marked loopback must come from the node itself as well (127.0.0.0/8, ::1: `kubectl exec`). A node
without a token (`internal.token_file` unset: a bare `mailnode serve` for development) accepts them
from loopback clients only. Refusals answer 401 (no or a wrong token) or 403 (not from loopback) with
`{"error": ...}`, counted in mailnode_admin_requests_refused_total{reason}. The probes, /metrics,
/status, /usage, GET /queue and GET /backups/{name} only read, and stay open.
"""

from __future__ import annotations

import dataclasses
import datetime
import hmac
import ipaddress
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

import prometheus_client
import pydantic
from aiohttp import hdrs, web

from mailnode import move
from mailnode.backup import checkpoint as checkpoints
from mailnode.backup import jobs, restore
from mailnode.metrics import NodeMetrics
from mailnode.queue import handoff
from mailnode.queue.spool import QueuedMessage, UnknownMessage
from mailwire import admin

log = logging.getLogger(__name__)


class QueueOps(Protocol):
    """What the queue endpoints need from the node's outbound queue (`mailnode.queue.spool.Spool`).
    `retry_now` and `delete` raise `UnknownMessage` (a KeyError) for an id not in the queue."""

    async def list(self) -> Sequence[QueuedMessage]: ...

    async def retry_now(self, id: str) -> QueuedMessage: ...

    async def delete(self, id: str) -> QueuedMessage: ...


@dataclasses.dataclass(frozen=True)
class BackupOps:
    """What the checkpoint and archive endpoints need from the node."""

    checkpoint: checkpoints.Checkpoint
    jobs: jobs.BackupJobs
    # (archive path, mailbox in the archive, target address) -> the outcome; raises restore.RestoreError
    restore: Callable[[Path, str, str], Awaitable[restore.Restored]]
    max_hold: float


def is_loopback(remote: str | None) -> bool:
    """True for a client address in 127.0.0.0/8 or ::1 (also written as an IPv4-mapped IPv6 address)."""
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# RFC 6750 §3: a 401 names the scheme the client must use; `error="invalid_token"` when it sent a wrong one.
_CHALLENGE: Final = 'Bearer realm="mailnode"'


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (RFC 6750 §2.1; the scheme name is
    case-insensitive, RFC 9110 §11.1), or None for no header or another scheme."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


@dataclasses.dataclass(frozen=True)
class Guard:
    """Who may make a request that changes the node: `token` is the domain's internal token (None: the
    node has none, and accepts such requests from loopback clients only). Refusals are counted by reason."""

    token: str | None
    metrics: NodeMetrics

    def __call__(self, handler: Handler, *, loopback_only: str | None = None) -> Handler:
        """`handler`, answered only for a request `refusal` lets through. `loopback_only`: the route is for
        loopback clients whatever their token, and this says so to others."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            refused = self.refusal(request, loopback_only=loopback_only)
            return refused if refused is not None else await handler(request)

        return guarded

    def refusal(self, request: web.Request, *, loopback_only: str | None = None) -> web.Response | None:
        loopback = is_loopback(request.remote)
        if loopback_only is not None and not loopback:
            return self._refuse(403, "not_loopback", loopback_only)
        if self.token is None:
            if loopback:
                return None
            return self._refuse(
                403,
                "not_loopback",
                "this node has no internal token (internal.token_file): it accepts changes only from itself (loopback)",
            )
        presented = bearer_token(request.headers.get(hdrs.AUTHORIZATION))
        if presented is None:
            return self._refuse(
                401,
                "missing_token",
                "this request changes the node: send the domain's internal token (Authorization: Bearer; "
                "`mailnode` reads it from the node config's internal.token_file)",
                challenge=_CHALLENGE,
            )
        # Constant time: how long the comparison takes says nothing about how much of the token was right.
        if not hmac.compare_digest(presented.encode(), self.token.encode()):
            return self._refuse(
                401, "wrong_token", "the internal token is wrong", challenge=f'{_CHALLENGE}, error="invalid_token"'
            )
        return None

    def _refuse(self, status: int, reason: str, text: str, *, challenge: str | None = None) -> web.Response:
        self.metrics.admin_refused.labels(reason).inc()
        response = _error(status, text)
        if challenge is not None:
            response.headers[hdrs.WWW_AUTHENTICATE] = challenge
        return response


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="seconds")


def queued_message(message: QueuedMessage, now: float) -> admin.QueuedMessage:
    """One queued message as GET /queue shows it; `next_attempt` is null once a recipient is no longer
    pending (delivered or failed)."""
    return admin.QueuedMessage(
        id=message.id,
        sender=message.sender,
        created=_iso(message.created),
        age_seconds=round(max(0.0, now - message.created), 1),
        size=message.size,
        recipients=[
            admin.QueuedRecipient(
                address=r.address,
                state=r.state,
                attempts=r.attempts,
                last_error=r.last_error,
                next_attempt=_iso(r.next_attempt) if r.state == "pending" else None,
                home=handoff.ordinal_of(r.route),
            )
            for r in message.recipients
        ],
    )


def _answer(model: admin.Message, *, status: int = 200) -> web.Response:
    return web.json_response(model.to_json(), status=status)


def _error(status: int, text: str) -> web.Response:
    return _answer(admin.Error(error=text), status=status)


def build_app(
    *,
    metrics: NodeMetrics,
    ready: Callable[[], bool],
    status: Callable[[], Awaitable[admin.Status]],
    queue: QueueOps | None = None,
    usage: Callable[[], admin.Usage] | None = None,
    backups: BackupOps | None = None,
    internal_token: str | None = None,
    moves: move.Moves | None = None,
) -> web.Application:
    """The admin app; `internal_token`: see `Guard`."""
    guard = Guard(internal_token, metrics)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def metrics_view(request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    async def status_view(request: web.Request) -> web.Response:
        return _answer(await status())

    async def usage_view(request: web.Request) -> web.Response:
        assert usage is not None
        return _answer(usage())

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    if usage is not None:
        app.router.add_get("/usage", usage_view)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/status", status_view)
    if queue is not None:
        _add_queue_routes(app, queue, guard)
    if backups is not None:
        _add_backup_routes(app, backups, guard)
    if moves is not None:
        _add_move_routes(app, moves, guard)
    return app


Write = Callable[[bytes], Coroutine[Any, Any, None]]  # StreamResponse.write


async def _stream(
    request: web.Request,
    response: web.StreamResponse,
    produce: Callable[[Write], Awaitable[object]],
    *,
    failed: Callable[[Exception], None] | None = None,
) -> web.StreamResponse:
    """Send `response`'s status line, then what `produce` writes. Should it fail after the status line is
    sent, the connection ends without the last chunk, so the client sees an incomplete archive rather
    than a short one that looks whole."""
    await response.prepare(request)
    try:
        await produce(response.write)
    except Exception as error:
        if failed is not None:
            failed(error)
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response


def _add_queue_routes(app: web.Application, queue: QueueOps, guard: Guard) -> None:
    async def list_view(request: web.Request) -> web.Response:
        try:
            messages = await queue.list()
        except RuntimeError as error:  # the spool is not open (starting or stopping)
            return _error(503, str(error))
        now = time.time()
        return web.json_response(admin.QUEUE.dump_python([queued_message(m, now) for m in messages], mode="json"))

    async def change(request: web.Request, action: Callable[[str], Awaitable[QueuedMessage]]) -> web.Response:
        id = request.match_info["id"]
        try:
            message = await action(id)
        except UnknownMessage:
            return _error(404, f"no message {id} in the queue")
        except RuntimeError as error:
            return _error(503, str(error))
        return _answer(queued_message(message, time.time()))

    async def retry_view(request: web.Request) -> web.Response:
        return await change(request, queue.retry_now)

    async def delete_view(request: web.Request) -> web.Response:
        return await change(request, queue.delete)

    only_here = "the queue can be changed only from the node itself (loopback)"
    app.router.add_get("/queue", list_view)
    app.router.add_post("/queue/{id}/retry", guard(retry_view, loopback_only=only_here))
    app.router.add_delete("/queue/{id}", guard(delete_view, loopback_only=only_here))


async def _json_object(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body, or ValueError saying what is wrong with it."""
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"the body is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    return body


def _hold(request: web.Request, max_hold: float) -> float:
    """POST /snapshot's `hold`: seconds, 1..max_hold, default 60 (or max_hold when that is lower)."""
    raw = request.query.get("hold")
    if raw is None:
        return min(checkpoints.DEFAULT_HOLD, max_hold)
    try:
        hold = float(raw)
    except ValueError:
        hold = math.nan
    if not 1 <= hold <= max_hold:  # NaN fails too
        raise ValueError(f"hold must be a number of seconds from 1 to {max_hold:g} (got {raw!r})")
    return hold


def _add_backup_routes(app: web.Application, ops: BackupOps, guard: Guard) -> None:
    checkpoint = ops.checkpoint

    async def snapshot_start(request: web.Request) -> web.Response:
        try:
            hold = _hold(request, ops.max_hold)
        except ValueError as error:
            return _error(400, str(error))
        try:
            return _answer(await checkpoint.start(hold))
        except checkpoints.Busy as error:
            return _error(409, str(error))
        except checkpoints.Unavailable as error:
            return _error(503, str(error))
        except Exception as error:  # the store's: logged by the checkpoint, writes resumed
            return _error(500, f"checkpoint failed: {error}")

    async def snapshot_end(request: web.Request) -> web.Response:
        try:
            seconds = checkpoint.end()
        except checkpoints.NotHolding as error:
            return _error(409, str(error))
        return _answer(admin.Resumed(paused_seconds=round(seconds, 3)))

    async def backup_stream(request: web.Request) -> web.StreamResponse:
        response: web.StreamResponse | None = None
        try:
            async with checkpoint.staged() as staged:
                stamp = staged.point_in_time.strftime("%Y%m%dT%H%M%SZ")
                response = web.StreamResponse(
                    headers={
                        "Content-Type": "application/x-tar",
                        "Content-Disposition": f'attachment; filename="mailnode-{staged.node}-{stamp}.tar"',
                        admin.NODE_HEADER: staged.node,
                        admin.POINT_IN_TIME_HEADER: staged.point_in_time.isoformat(),
                        admin.MESSAGES_HEADER: str(staged.messages),
                        admin.BYTES_HEADER: str(staged.bytes),
                    }
                )
                # A failure is logged and counted by the writer; the client may have gone.
                return await _stream(request, response, lambda write: ops.jobs.stream(staged, write))
        except checkpoints.Unavailable as error:
            return _error(503, str(error))
        except Exception as error:
            if response is not None and response.prepared:  # the client went away at the very end
                return response
            log.warning("staging an archive failed", extra={"fields": {"error": str(error)}})
            return _error(500, f"staging the archive failed: {error}")

    async def backups_post(request: web.Request) -> web.Response:
        try:
            # The node's own check first: its message says what a backup name may be.
            body = admin.BackupRequest(name=jobs.check_name((await _json_object(request)).get("name")))
            record, started = await ops.jobs.submit(body.name)
        except ValueError as error:  # jobs.InvalidName too
            return _error(400, str(error))
        return _answer(record.to_wire(), status=202 if started else 200)

    async def backups_get(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        record = await ops.jobs.get(name)
        if record is None:
            return _error(404, f"no backup named {name!r}")
        return _answer(record.to_wire())

    async def backups_delete(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            record = await ops.jobs.delete(name)
        except jobs.BackupBusy as error:
            return _error(409, str(error))
        if record is None:
            return _error(404, f"no backup named {name!r}")
        return _answer(admin.DeletedArchive(**record.to_wire().model_dump()))

    async def restore_post(request: web.Request) -> web.Response:
        try:
            body = admin.RestoreRequest.model_validate(await _json_object(request))
            restored = await ops.restore(Path(body.archive), body.mailbox, body.target)
        except pydantic.ValidationError as error:
            return _error(400, admin.problem(error))
        except (ValueError, restore.RestoreError) as error:
            return _error(400, str(error))
        return _answer(
            admin.Restored(
                mailbox=restored.mailbox, restored=restored.restored, skipped=restored.skipped,
                dav_restored=restored.dav_restored, dav_kept=restored.dav_kept,
            )
        )  # fmt: skip

    app.router.add_post("/snapshot", guard(snapshot_start))
    app.router.add_delete("/snapshot", guard(snapshot_end))
    stream_here = "archives can be streamed only to the node itself (loopback): use kubectl port-forward"
    app.router.add_get("/backup", guard(backup_stream, loopback_only=stream_here))
    app.router.add_post("/backups", guard(backups_post))
    app.router.add_get("/backups/{name}", backups_get)
    app.router.add_delete("/backups/{name}", guard(backups_delete))
    restore_here = "a restore can be started only from the node itself (loopback)"
    app.router.add_post("/restore", guard(restore_post, loopback_only=restore_here))


def _add_move_routes(app: web.Application, moves: move.Moves, guard: Guard) -> None:
    async def answer(request: web.Request, work: Callable[[str], Awaitable[admin.Message]]) -> web.Response:
        try:
            return _answer(await work(request.match_info["address"]))
        except pydantic.ValidationError as error:
            return _error(400, admin.problem(error))
        except ValueError as error:
            return _error(400, str(error))
        except move.Refused as error:
            return _error(error.status, str(error))

    async def copy_post(request: web.Request) -> web.Response:
        async def work(address: str) -> admin.Message:
            body = admin.MoveCopy.model_validate(await _json_object(request))
            return await moves.copy(address, source=body.source, final=body.final)

        return await answer(request, work)

    async def freeze_post(request: web.Request) -> web.Response:
        async def work(address: str) -> admin.Message:
            body = admin.Freeze.model_validate(await _json_object(request) if request.can_read_body else {})
            return await moves.freeze(address, hold_seconds=body.hold_seconds)

        return await answer(request, work)

    async def freeze_delete(request: web.Request) -> web.Response:
        return await answer(request, moves.thaw)

    async def home_put(request: web.Request) -> web.Response:
        async def work(address: str) -> admin.Message:
            body = admin.HomeOverride.model_validate(await _json_object(request))
            return await moves.set_home(address, body.home)

        return await answer(request, work)

    async def mailbox_delete(request: web.Request) -> web.Response:
        return await answer(request, moves.drop)

    async def export_get(request: web.Request) -> web.StreamResponse:
        # The body: the message files the caller holds already, one path a line (not sent again).
        have = {line for line in (await request.read()).decode("utf-8", "replace").split("\n") if line}
        final = request.query.get("final") == "1"
        # RFC 9110 §13.1.2: the freeze (ETag of a final export) the caller's copy was made under.
        unless = request.headers.get(hdrs.IF_NONE_MATCH, "").strip().strip('"') or None
        response = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
        try:
            async with moves.export(
                request.match_info["address"], have=have, final=final, unless_freeze=unless
            ) as export:
                if export.freeze is not None:
                    response.headers[hdrs.ETAG] = f'"{export.freeze}"'
                return await _stream(  # a cut stream: the caller's copy is refused
                    request,
                    response,
                    export.stream,
                    failed=lambda error: log.warning("move export failed", extra={"fields": {"error": str(error)}}),
                )
        except move.Refused as error:
            return _error(error.status, str(error))
        except move.Unchanged:
            return web.Response(status=304)

    app.router.add_post("/moves/{address}", guard(copy_post))
    app.router.add_get("/mailboxes/{address}/export", guard(export_get))
    app.router.add_post("/mailboxes/{address}/freeze", guard(freeze_post))
    app.router.add_delete("/mailboxes/{address}/freeze", guard(freeze_delete))
    app.router.add_put("/mailboxes/{address}/home", guard(home_put))
    app.router.add_delete("/mailboxes/{address}", guard(mailbox_delete))


async def start(app: web.Application, *, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve `app`; returns the runner (for cleanup) and the bound port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host=host, port=port, reuse_address=True)
    await site.start()
    server = site._server
    assert server is not None
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, bound
