"""The node's HTTP endpoints as kubelet and Prometheus see them: /healthz, /readyz, /metrics, /status."""

from __future__ import annotations

import json
import smtplib
from pathlib import Path

from mailnode import dkim
from tests.node.conftest import NodeFactory, RunningNode


def test_health_and_readiness(node: RunningNode) -> None:
    assert node.http_get("/healthz") == (200, b"ok\n")
    assert node.http_get("/readyz") == (200, b"ready\n")
    node.node.ready = False  # what a node reports while starting or stopping
    assert node.http_get("/readyz")[0] == 503
    assert node.http_get("/healthz")[0] == 200


def test_metrics_exposition(node: RunningNode) -> None:
    with smtplib.SMTP("127.0.0.1", node.port("smtp"), timeout=10) as client:
        client.sendmail("a@remote.test", ["user@example.com"], b"Subject: m\r\n\r\nmetrics\r\n")
        client.mail("a@remote.test")
        client.rcpt("ghost@example.com")
    status, body = node.http_get("/metrics")
    text = body.decode()
    assert status == 200
    assert 'mailnode_smtp_messages_accepted_total{listener="smtp"} 1.0' in text
    assert 'mailnode_smtp_messages_rejected_total{listener="smtp",reason="unknown_mailbox"} 1.0' in text
    assert 'mailnode_smtp_sessions_total{listener="smtp"} 1.0' in text
    assert "mailnode_store_messages 1.0" in text
    assert "mailnode_store_size_bytes " in text
    assert 'mailnode_directory_reloads_total{result="failure"} 0.0' in text
    assert "mailnode_ready 1.0" in text
    assert "user@example.com" not in text  # no per-address labels


def test_status(node: RunningNode) -> None:
    status, body = node.http_get("/status")
    data = json.loads(body)
    assert status == 200
    assert data["ready"] is True
    assert data["hostname"] == "mail.example.com"
    assert data["listeners"] == node.ports
    assert data["directory"]["mailboxes"] == 5
    assert data["store"] == {"bytes": 0, "messages": 0}


def test_status_lists_the_dkim_record_to_publish(node_factory: NodeFactory, tmp_path: Path) -> None:
    key_file = tmp_path / "example.com.pem"
    key_file.write_bytes(dkim.generate_key(1024))
    node = node_factory(domains=[{"domain": "example.com", "dkim": {"selector": "s1", "key_file": str(key_file)}}])
    data = json.loads(node.http_get("/status")[1])
    expected = dkim.record(key_file.read_bytes(), domain="example.com", selector="s1")
    assert data["dns_records"] == [{"type": "TXT", "name": "s1._domainkey.example.com", "value": expected.value}]


def test_usage_per_mailbox(node: RunningNode) -> None:
    with smtplib.SMTP("127.0.0.1", node.port("smtp"), timeout=10) as client:
        client.sendmail("a@remote.test", ["user@example.com"], b"Subject: one\r\n\r\nfirst\r\n")
        client.sendmail("a@remote.test", ["user@example.com"], b"Subject: two\r\n\r\nsecond\r\n")
    status, body = node.http_get("/usage")
    mailboxes = json.loads(body)["mailboxes"]
    assert status == 200
    assert mailboxes["user@example.com"]["messages"] == 2
    assert mailboxes["user@example.com"]["bytes"] == sum(len(m) for m in node.files.stored("user@example.com"))
    assert len(mailboxes) == 5  # every mailbox of the directory, with or without mail
    assert sum(u["messages"] for u in mailboxes.values()) == 2
