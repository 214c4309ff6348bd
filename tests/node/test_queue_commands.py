"""The operator on call and the outbound queue: GET /queue and /status show a message that cannot be
delivered (its destination does not answer), and `mailnode queue list | retry | delete` show it, retry
it and drop it through the node's admin endpoints."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any
from unittest import mock

import pytest

from mailnode.admin.http import build_app, is_loopback
from mailnode.metrics import NodeMetrics
from tests.node.conftest import NodeFactory, RunningNode, mailbox, refused_from_the_pod_network
from tests.node.test_outbound import submit, wait_for


@pytest.fixture
def stuck_node(node_factory: NodeFactory, refusing_port: int) -> RunningNode:
    """A node whose route to remote.test leads to a port where nothing listens: mail stays deferred."""
    return node_factory(
        [mailbox("user@example.com")],
        smtp={"transports": {"remote.test": f"127.0.0.1:{refusing_port}"}, "delivery_interval": 0.1},
    )


def queue(node: RunningNode) -> list[dict[str, Any]]:
    status, body = node.http_get("/queue")
    assert status == 200
    result: list[dict[str, Any]] = json.loads(body)
    return result


def mailnode_queue(node: RunningNode, *args: str) -> subprocess.CompletedProcess[str]:
    url = f"http://127.0.0.1:{node.port('http')}"
    return subprocess.run(
        [sys.executable, "-m", "mailnode", "queue", args[0], "--url", url, *args[1:]],
        capture_output=True,
        text=True,
        timeout=60,
    )


def deferred(node: RunningNode, client_tls: ssl.SSLContext) -> dict[str, Any]:
    """Submit one message for friend@remote.test and return it as GET /queue shows it after the first
    (failed) attempt."""
    submit(node, client_tls, ["friend@remote.test"])

    def attempted() -> bool:
        messages = queue(node)
        return bool(messages) and messages[0]["recipients"][0]["attempts"] >= 1

    wait_for("the first delivery attempt", attempted)
    [message] = queue(node)
    return message


def test_the_queue_shows_a_deferred_message(stuck_node: RunningNode, client_tls: ssl.SSLContext) -> None:
    message = deferred(stuck_node, client_tls)
    assert message["sender"] == "user@example.com"
    assert message["size"] > 0
    assert message["age_seconds"] >= 0
    assert message["created"].endswith("+00:00")
    [recipient] = message["recipients"]
    assert recipient["address"] == "friend@remote.test"
    assert recipient["state"] == "pending"
    assert recipient["last_error"]
    assert recipient["next_attempt"] > message["created"]  # ISO 8601 in UTC sorts as time

    status = json.loads(stuck_node.http_get("/status")[1])
    assert status["queue"]["messages"] == 1
    assert status["queue"]["oldest_age_seconds"] >= 0
    assert status["ready"] is True  # the rest of /status is unchanged


def test_queue_list_retry_and_delete(stuck_node: RunningNode, client_tls: ssl.SSLContext) -> None:
    message = deferred(stuck_node, client_tls)
    id = message["id"]

    listed = mailnode_queue(stuck_node, "list")
    assert listed.returncode == 0, listed.stderr
    assert id in listed.stdout
    assert "friend@remote.test" in listed.stdout
    assert "pending" in listed.stdout

    as_json = mailnode_queue(stuck_node, "list", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert [m["id"] for m in json.loads(as_json.stdout)] == [id]

    attempts = message["recipients"][0]["attempts"]
    retried = mailnode_queue(stuck_node, "retry", id)
    assert retried.returncode == 0, retried.stderr
    wait_for("another attempt", lambda: queue(stuck_node)[0]["recipients"][0]["attempts"] > attempts)

    deleted = mailnode_queue(stuck_node, "delete", id)
    assert deleted.returncode == 0, deleted.stderr
    assert queue(stuck_node) == []
    assert json.loads(stuck_node.http_get("/status")[1])["queue"] == {"messages": 0, "oldest_age_seconds": 0.0}
    assert "empty" in mailnode_queue(stuck_node, "list").stdout


@pytest.mark.parametrize("command", ["retry", "delete"])
def test_an_unknown_id_is_an_error(stuck_node: RunningNode, command: str) -> None:
    result = mailnode_queue(stuck_node, command, "0000000000000001")
    assert result.returncode == 1
    assert "no message 0000000000000001" in result.stderr


def test_an_unreachable_node_is_an_error(refusing_port: int) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mailnode", "queue", "list", "--url", f"http://127.0.0.1:{refusing_port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "cannot reach the node" in result.stderr


def test_the_endpoints_answer_json_from_loopback(stuck_node: RunningNode, client_tls: ssl.SSLContext) -> None:
    id = deferred(stuck_node, client_tls)["id"]
    base = f"http://127.0.0.1:{stuck_node.port('http')}"

    def call(method: str, path: str) -> tuple[int, Any]:
        request = urllib.request.Request(base + path, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    status, body = call("POST", f"/queue/{id}/retry")
    assert status == 200
    assert body["id"] == id
    assert call("POST", "/queue/nope/retry") == (404, {"error": "no message nope in the queue"})
    assert call("DELETE", "/queue/nope")[0] == 404
    assert call("DELETE", f"/queue/{id}")[0] == 200
    assert call("DELETE", f"/queue/{id}")[0] == 404


@pytest.mark.parametrize(
    ("remote", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.3.4.5", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.7", False),
        ("192.168.1.2", False),
        ("fe80::1%eth0", False),
        ("::ffff:10.0.0.7", False),
        ("", False),
        (None, False),
        ("not an address", False),
    ],
)
def test_only_loopback_clients_may_change_the_queue(remote: str | None, allowed: bool) -> None:
    assert is_loopback(remote) is allowed


async def test_a_change_from_the_pod_network_is_refused() -> None:
    spool = mock.AsyncMock()
    app = build_app(metrics=NodeMetrics(), ready=lambda: True, status=mock.AsyncMock(), queue=spool)
    await refused_from_the_pod_network(app, [("POST", "/queue/1/retry"), ("DELETE", "/queue/1")])
    spool.retry_now.assert_not_called()
    spool.delete.assert_not_called()
