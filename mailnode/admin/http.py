"""HTTP endpoints of a node: /healthz, /readyz, /metrics, /status, and the outbound queue.

Kubelet probes /healthz (the process answers) and /readyz (listeners up, store open); Prometheus
scrapes /metrics; /status is a JSON summary for people and the operator.

The outbound queue, for `mailnode queue` and the operator on call:

    GET    /queue             every queued message, oldest first (JSON)
    POST   /queue/{id}/retry  make the message's pending recipients due now
    DELETE /queue/{id}        drop the message, whatever its recipients' state, without a bounce

An unknown id answers 404 `{"error": ...}`. The admin port listens on the pod network in Kubernetes,
so the two requests that change state are accepted only from loopback clients (127.0.0.0/8, ::1):
anyone else gets 403 `{"error": ...}`; run `mailnode queue` inside the pod (`kubectl exec`).
"""

from __future__ import annotations

import datetime
import ipaddress
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import prometheus_client
from aiohttp import web

from mailnode.metrics import NodeMetrics
from mailnode.queue.spool import QueuedMessage, UnknownMessage


class QueueOps(Protocol):
    """What the queue endpoints need from the node's outbound queue (`mailnode.queue.spool.Spool`).
    `retry_now` and `delete` raise `UnknownMessage` (a KeyError) for an id not in the queue."""

    async def list(self) -> Sequence[QueuedMessage]: ...

    async def retry_now(self, id: str) -> QueuedMessage: ...

    async def delete(self, id: str) -> QueuedMessage: ...


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


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="seconds")


def message_json(message: QueuedMessage, now: float) -> dict[str, Any]:
    """One queued message as GET /queue shows it; `next_attempt` is null once a recipient is no longer
    pending (delivered or failed)."""
    return {
        "id": message.id,
        "sender": message.sender,
        "created": _iso(message.created),
        "age_seconds": round(max(0.0, now - message.created), 1),
        "size": message.size,
        "recipients": [
            {
                "address": r.address,
                "state": r.state,
                "attempts": r.attempts,
                "last_error": r.last_error,
                "next_attempt": _iso(r.next_attempt) if r.state == "pending" else None,
            }
            for r in message.recipients
        ],
    }


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status)


def build_app(
    *,
    metrics: NodeMetrics,
    ready: Callable[[], bool],
    status: Callable[[], dict[str, Any] | Awaitable[dict[str, Any]]],
    queue: QueueOps | None = None,
    usage: Callable[[], dict[str, Any]] | None = None,
) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def metrics_view(request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    async def status_view(request: web.Request) -> web.Response:
        result = status()
        if not isinstance(result, dict):
            result = await result
        return web.json_response(result)

    async def usage_view(request: web.Request) -> web.Response:
        assert usage is not None
        return web.json_response(usage())

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    if usage is not None:
        app.router.add_get("/usage", usage_view)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/status", status_view)
    if queue is not None:
        _add_queue_routes(app, queue)
    return app


def _add_queue_routes(app: web.Application, queue: QueueOps) -> None:
    async def list_view(request: web.Request) -> web.Response:
        try:
            messages = await queue.list()
        except RuntimeError as error:  # the spool is not open (starting or stopping)
            return _error(503, str(error))
        now = time.time()
        return web.json_response([message_json(m, now) for m in messages])

    async def change(request: web.Request, action: Callable[[str], Awaitable[QueuedMessage]]) -> web.Response:
        if not is_loopback(request.remote):
            return _error(403, "the queue can be changed only from the node itself (loopback)")
        id = request.match_info["id"]
        try:
            message = await action(id)
        except UnknownMessage:
            return _error(404, f"no message {id} in the queue")
        except RuntimeError as error:
            return _error(503, str(error))
        return web.json_response(message_json(message, time.time()))

    async def retry_view(request: web.Request) -> web.Response:
        return await change(request, queue.retry_now)

    async def delete_view(request: web.Request) -> web.Response:
        return await change(request, queue.delete)

    app.router.add_get("/queue", list_view)
    app.router.add_post("/queue/{id}/retry", retry_view)
    app.router.add_delete("/queue/{id}", delete_view)


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
