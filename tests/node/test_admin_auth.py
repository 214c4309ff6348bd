"""Who may change a node through its admin port (mailnode.admin.http.Guard), on a real node over HTTP and,
for clients on the pod network, on the app with a mocked peer address.

Aspects: with an internal token (internal.token_file), every request that changes state is refused 401
without the token or with a wrong one, counted by reason, and nothing is done; with the token it is
done; the probes, /metrics, /status, /usage, GET /queue and GET /backups/NAME answer without it. From
the pod network the token admits the operator's requests, a node without a token refuses them (403),
and the loopback-only requests stay loopback-only whatever the token. `mailnode queue retry --config`
reads the token from the node config ($MAILNODE_CONFIG too); `--url` alone is refused, `--token-file`
is not.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from mailnode.admin.http import BackupOps, build_app
from mailnode.backup import checkpoint as checkpoints
from mailnode.metrics import NodeMetrics
from tests.node.conftest import NodeFactory, RunningNode, mailbox
from tests.node.test_queue_commands import deferred, queue

TOKEN = "4q3G3nYtq5mZr0xg1v0Tt7mQkz3V9iQ8wF2sLq0bR8c"
REFUSED = "mailnode_admin_requests_refused_total"

# Every request that changes the node (GET /backup: streams all of the mail, after a checkpoint).
CHANGES = [
    ("POST", "/snapshot?hold=5", None),
    ("DELETE", "/snapshot", None),
    ("POST", "/backups", {"name": "refused-1"}),
    ("DELETE", "/backups/refused-1", None),
    ("POST", "/queue/0000000000000001/retry", None),
    ("DELETE", "/queue/0000000000000001", None),
    ("POST", "/restore", {"archive": "/nowhere.tar", "mailbox": "user@example.com", "as": "user@example.com"}),
    ("GET", "/backup", None),
]


def token_file(directory: Path, token: str = TOKEN) -> Path:
    """The token as the pod sees it: a file of the mounted Secret <domain>-internal."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "token"
    path.write_text(token + "\n")
    return path


@pytest.fixture
def guarded_node(node_factory: NodeFactory, tmp_path: Path, refusing_port: int) -> RunningNode:
    """A node that requires TOKEN, whose mail for remote.test stays queued (nothing answers there)."""
    return node_factory(
        [mailbox("user@example.com")],
        internal={"token_file": str(token_file(tmp_path / "internal"))},
        smtp={"transports": {"remote.test": f"127.0.0.1:{refusing_port}"}, "delivery_interval": 0.1},
    )


def ask(
    node: RunningNode, method: str, path: str, body: dict[str, Any] | None = None, *, token: str | None = None
) -> tuple[int, Any, dict[str, str]]:
    """(status, JSON answer or raw bytes, headers) of one request from loopback."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{node.port('http')}{path}", data=data, headers=headers, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw, answer_headers = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        status, raw, answer_headers = error.code, error.read(), dict(error.headers)
    try:
        return status, json.loads(raw), answer_headers
    except ValueError:
        return status, raw, answer_headers


def test_a_snapshot_needs_the_internal_token(guarded_node: RunningNode) -> None:
    node = guarded_node
    status, body, headers = ask(node, "POST", "/snapshot?hold=600")
    assert status == 401
    assert "internal token" in body["error"]
    assert headers["WWW-Authenticate"].startswith("Bearer ")  # RFC 6750 §3
    assert node.metric(REFUSED, reason="missing_token") == 1

    status, body, headers = ask(node, "POST", "/snapshot?hold=600", token="not-" + TOKEN)
    assert status == 401
    assert body == {"error": "the internal token is wrong"}
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert node.metric(REFUSED, reason="wrong_token") == 1
    assert node.metric("mailnode_writes_paused") == 0  # mail intake never stopped

    status, body, _ = ask(node, "POST", "/snapshot?hold=600", token=TOKEN)
    assert status == 200, body
    assert node.metric("mailnode_writes_paused") == 1
    assert ask(node, "DELETE", "/snapshot")[0] == 401  # resuming is a change too
    status, body, _ = ask(node, "DELETE", "/snapshot", token=TOKEN)
    assert status == 200 and body["paused_seconds"] >= 0
    assert node.metric("mailnode_writes_paused") == 0
    assert (node.metric(REFUSED, reason="missing_token"), node.metric(REFUSED, reason="wrong_token")) == (2, 1)


@pytest.mark.parametrize(("method", "path", "body"), CHANGES, ids=[f"{m} {p}" for m, p, _ in CHANGES])
def test_every_change_is_refused_without_the_token(
    guarded_node: RunningNode, method: str, path: str, body: dict[str, Any] | None
) -> None:
    status, answer, _ = ask(guarded_node, method, path, body)
    assert status == 401, answer
    assert "internal token" in answer["error"]
    assert guarded_node.metric(REFUSED, reason="missing_token") == 1
    assert ask(guarded_node, "GET", "/backups/refused-1")[0] == 404  # no archive was started
    assert guarded_node.metric("mailnode_writes_paused") == 0


def test_reading_needs_no_token(guarded_node: RunningNode) -> None:
    node = guarded_node
    assert node.http_get("/healthz") == (200, b"ok\n")
    assert node.http_get("/readyz") == (200, b"ready\n")
    status, metrics = node.http_get("/metrics")
    assert status == 200 and f'{REFUSED}{{reason="missing_token"}} 0.0' in metrics.decode()
    status, body = node.http_get("/status")
    assert status == 200 and json.loads(body)["ready"] is True
    status, body = node.http_get("/usage")
    assert status == 200 and "user@example.com" in json.loads(body)["mailboxes"]
    assert node.http_get("/queue") == (200, b"[]")
    status, body = node.http_get("/backups/none-such")
    assert status == 404 and "no backup named" in json.loads(body)["error"]
    assert sum(node.metric(REFUSED, reason=r) for r in ("missing_token", "wrong_token", "not_loopback")) == 0


# -- from the pod network (the operator's pod, or any other) ---------------------------------------------


async def from_the_pod_network(app: web.Application, method: str, path: str, *, token: str | None) -> web.Response:
    """The app's answer to a request from 10.0.0.7, as a pod on the pod network would make it."""
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        ("10.0.0.7", 40000) if name == "peername" else default
    )
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    request = make_mocked_request(method, path, app=app, transport=transport, headers=headers)
    match = await app.router.resolve(request)
    request._match_info = match
    response = await match.handler(request)
    assert isinstance(response, web.Response)
    return response


def backup_app(*, internal_token: str | None) -> tuple[web.Application, mock.Mock, NodeMetrics]:
    """The admin app over a checkpoint that is always busy (409: the request got through)."""
    checkpoint = mock.Mock()
    checkpoint.start = mock.AsyncMock(side_effect=checkpoints.Busy("a checkpoint is already in progress"))
    ops = BackupOps(checkpoint=checkpoint, jobs=mock.Mock(), restore=mock.AsyncMock(), max_hold=600)
    metrics = NodeMetrics()
    app = build_app(
        metrics=metrics, ready=lambda: True, status=mock.AsyncMock(), backups=ops, internal_token=internal_token
    )
    return app, checkpoint, metrics


async def test_the_token_admits_the_operator_from_the_pod_network() -> None:
    app, checkpoint, metrics = backup_app(internal_token=TOKEN)
    refused = await from_the_pod_network(app, "POST", "/snapshot?hold=600", token=None)
    assert refused.status == 401
    refused = await from_the_pod_network(app, "POST", "/snapshot?hold=600", token=TOKEN[:-1])
    assert refused.status == 401
    checkpoint.start.assert_not_called()
    admitted = await from_the_pod_network(app, "POST", "/snapshot?hold=600", token=TOKEN)
    assert admitted.status == 409  # the checkpoint's own answer
    checkpoint.start.assert_awaited_once_with(600.0)
    # Streaming every mailbox stays for the node itself, token or not.
    streamed = await from_the_pod_network(app, "GET", "/backup", token=TOKEN)
    assert streamed.status == 403 and streamed.text is not None and "loopback" in json.loads(streamed.text)["error"]
    checkpoint.staged.assert_not_called()
    counted = {r: metrics.registry.get_sample_value(REFUSED, {"reason": r}) for r in ("missing_token", "wrong_token")}
    assert counted == {"missing_token": 1, "wrong_token": 1}
    assert metrics.registry.get_sample_value(REFUSED, {"reason": "not_loopback"}) == 1


async def test_a_node_without_a_token_takes_changes_from_loopback_only() -> None:
    app, checkpoint, metrics = backup_app(internal_token=None)
    refused = await from_the_pod_network(app, "POST", "/snapshot?hold=600", token=TOKEN)
    assert refused.status == 403
    assert refused.text is not None and "no internal token" in json.loads(refused.text)["error"]
    checkpoint.start.assert_not_called()
    assert metrics.registry.get_sample_value(REFUSED, {"reason": "not_loopback"}) == 1


# -- the `mailnode` commands -------------------------------------------------------------------------


def mailnode(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailnode", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_queue_commands_send_the_token_of_the_node_config(
    guarded_node: RunningNode, client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    node = guarded_node
    message = deferred(node, client_tls)
    attempts = message["recipients"][0]["attempts"]
    url = f"http://127.0.0.1:{node.port('http')}"

    refused = mailnode("queue", "retry", message["id"], "--url", url)
    assert refused.returncode == 1
    assert "401" in refused.stderr and "internal token" in refused.stderr

    # --url as well: the test node's config says port 0 (the kernel chose); a pod's says 8080.
    retried = mailnode("queue", "retry", message["id"], "--config", str(node.files.config_file), "--url", url)
    assert retried.returncode == 0, retried.stderr
    assert "due now" in retried.stdout
    assert queue(node)[0]["recipients"][0]["attempts"] >= attempts

    with_file = mailnode(
        "queue", "retry", message["id"], "--url", url, "--token-file", str(tmp_path / "internal/token")
    )
    assert with_file.returncode == 0, with_file.stderr

    # In a pod, $MAILNODE_CONFIG names the node config: `kubectl exec <pod> -- mailnode queue delete ID`.
    deleted = mailnode(
        "queue", "delete", message["id"], "--url", url, env={"MAILNODE_CONFIG": str(node.files.config_file)}
    )
    assert deleted.returncode == 0, deleted.stderr
    assert queue(node) == []
