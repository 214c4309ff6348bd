"""HTTP endpoints of a node: /healthz, /readyz, /metrics, /status.

Kubelet probes /healthz (the process answers) and /readyz (listeners up, store open); Prometheus
scrapes /metrics; /status is a JSON summary for people and the operator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import prometheus_client
from aiohttp import web

from mailnode.metrics import NodeMetrics


def build_app(
    *, metrics: NodeMetrics, ready: Callable[[], bool], status: Callable[[], dict[str, Any]]
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
        return web.json_response(status())

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/status", status_view)
    return app


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
