"""Mail in a cluster (DESIGN.md "Clustering"): two or three real nodes on 127.0.0.1, each with its own
data directory, the same directory with `home` set, and each other's LMTP ports as peers.

Aspects: mail sent to any node for a mailbox homed on another is stored at its home only, with the trace
headers added once; with the home down the sender still gets 250, the message waits in the accepting
node's queue (GET /queue, `mailnode queue list`, the hand-off gauge) and arrives exactly once when the
home is back; the LMTP port refuses (and counts) a peer without the internal token, and answers per
recipient; a remote home's permanent refusal of one recipient of several is a bounce to the sender, of
the only recipient the reply to DATA; aliases and forwards resolve as on one node.
"""

from __future__ import annotations

import base64
import email
import json
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.node.conftest import DOMAIN, NodeFactory, RunningNode, free_ports, mailbox
from tests.node.test_outbound import wait_for

TOKEN = "internal-token-of-example-com"
MESSAGE = (
    b"From: alice@example.com\r\nSubject: hello\r\n\r\n"
    b"A message longer than a hundred bytes, so that it never fits the quota of full@example.com.\r\n"
)
MAILBOXES = [
    mailbox(f"alice@{DOMAIN}", home=0),
    mailbox(f"bob@{DOMAIN}", home=1, aliases=[f"robert@{DOMAIN}"]),
    mailbox(f"full@{DOMAIN}", home=1, quota=100),
    mailbox(f"carol@{DOMAIN}", home=2, forward_to=[f"bob@{DOMAIN}"]),
]


class Cluster:
    """N nodes that name each other as peers; `start(i)` (re)starts node i on the same ports and files."""

    def __init__(
        self, factory: NodeFactory, tmp_path: Path, size: int, *, listen: dict[str, Any] | None = None
    ) -> None:
        """`listen`: more of each node's listen settings (tests/node/test_move*.py raise the LMTP limits)."""
        self.token_file = tmp_path / "internal-token"
        self.token_file.write_text(TOKEN + "\n")
        ports = free_ports(4 * size)  # known to the peers up front: below the range port 0 draws from
        self.lmtp, self.http = ports[:size], ports[size : 2 * size]
        self.imap_proxy, self.https = ports[2 * size : 3 * size], ports[3 * size :]
        peers = [
            {"host": "127.0.0.1", "lmtp": self.lmtp[i], "imap_proxy": self.imap_proxy[i], "http": self.http[i],
             "https": self.https[i]}
            for i in range(size)
        ]  # fmt: skip
        self.nodes: list[RunningNode] = []
        for i in range(size):
            self.nodes.append(
                factory(
                    MAILBOXES,
                    name=f"node{i}",
                    listen={
                        "lmtp": self.lmtp[i],
                        "imap_proxy": self.imap_proxy[i],
                        "http": self.http[i],
                        "https": self.https[i],  # DAV relays to the home's (tests/node/test_dav_carried.py)
                        **(listen or {}),
                    },
                    cluster={"ordinal": i, "peers": peers},
                    internal={"token_file": str(self.token_file)},
                    smtp={"delivery_interval": 0.1, "check_inbound": True},
                )
            )
        self.restarted: list[RunningNode] = []

    def restart(self, i: int) -> RunningNode:
        node = RunningNode(self.nodes[i].files)
        self.restarted.append(node)
        self.nodes[i] = node
        return node


@pytest.fixture
def cluster(node_factory: NodeFactory, tmp_path: Path) -> Any:
    made = Cluster(node_factory, tmp_path, 3)
    yield made
    for node in made.restarted:
        node.stop()


def send(
    node: RunningNode, recipients: list[str], data: bytes = MESSAGE, sender: str = "sender@remote.test"
) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", node.port("smtp"), timeout=30) as client:
        return client.sendmail(sender, recipients, data)


def queue(node: RunningNode) -> list[dict[str, Any]]:
    status, body = node.http_get("/queue")
    assert status == 200
    result: list[dict[str, Any]] = json.loads(body)
    return result


def test_mail_for_a_mailbox_homed_elsewhere_is_stored_at_its_home_with_one_trace(cluster: Cluster) -> None:
    node0, node1, node2 = cluster.nodes
    assert send(node0, [f"alice@{DOMAIN}", f"robert@{DOMAIN}"]) == {}
    [stored] = node1.files.stored(f"bob@{DOMAIN}")  # the alias, at bob's home
    assert stored.count(b"Received: ") == 1
    assert stored.count(b"Authentication-Results: ") == 1
    assert stored.startswith(b"Return-Path: <sender@remote.test>\r\n")
    assert stored.endswith(MESSAGE)
    assert len(node0.files.stored(f"alice@{DOMAIN}")) == 1
    assert node0.files.stored(f"bob@{DOMAIN}") == [] and node2.files.stored(f"bob@{DOMAIN}") == []
    assert node1.metric("mailnode_lmtp_deliveries_total", result="delivered") == 1
    assert node0.metric("mailnode_handoffs_total", result="delivered") == 1
    assert queue(node0) == []


def test_a_forward_reaches_the_home_of_its_target(cluster: Cluster) -> None:
    node0, node1, node2 = cluster.nodes
    # carol (home 2) forwards to bob (home 1); node 0 accepts and hands each copy to its own home
    assert send(node0, [f"carol@{DOMAIN}"]) == {}
    assert len(node2.files.stored(f"carol@{DOMAIN}")) == 1
    [forwarded] = node1.files.stored(f"bob@{DOMAIN}")
    assert forwarded.count(b"Received: ") == 1


def test_with_the_home_down_the_message_waits_in_the_queue_and_arrives_once(cluster: Cluster) -> None:
    node0, node1, _ = cluster.nodes
    node1.stop()
    assert send(node0, [f"bob@{DOMAIN}"]) == {}  # 250: in node 0's queue, fsynced
    [message] = queue(node0)
    [recipient] = message["recipients"]
    assert recipient["address"] == f"bob@{DOMAIN}" and recipient["state"] == "pending"
    assert recipient["home"] == 1
    wait_for("an attempt recorded", lambda: queue(node0)[0]["recipients"][0]["attempts"] >= 1)
    # the gauge is set just after the attempt is recorded: wait for it rather than race it
    wait_for("the gauge to count it", lambda: node0.metric("mailnode_handoff_queue_messages") == 1)
    url = f"http://127.0.0.1:{node0.port('http')}"
    listed = subprocess.run(
        [sys.executable, "-m", "mailnode", "queue", "list", "--url", url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert f"bob@{DOMAIN}  pending" in listed.stdout and "to node 1" in listed.stdout

    node1 = cluster.restart(1)
    retried = subprocess.run(
        [sys.executable, "-m", "mailnode", "queue", "retry", message["id"], "--url", url,
         "--token-file", str(cluster.token_file)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    # The queue's own retry (10 s after the failed attempt) may hand the message over first: then the
    # id is no longer queued and `retry` says so. Either way the message must arrive once.
    delivered_first = f"no message {message['id']} in the queue" in retried.stderr
    assert retried.returncode == 0 or delivered_first, retried.stderr
    wait_for("the queue to empty", lambda: queue(node0) == [])
    [stored] = node1.files.stored(f"bob@{DOMAIN}")
    assert stored.count(b"Received: ") == 1
    wait_for("the gauge to follow", lambda: node0.metric("mailnode_handoff_queue_messages") == 0)
    assert len(node1.files.stored(f"bob@{DOMAIN}")) == 1  # exactly once


def lmtp(node_port: int) -> smtplib.LMTP:
    client = smtplib.LMTP("127.0.0.1", node_port, timeout=30)
    client.ehlo("node0.test")  # LHLO
    return client


def auth(client: smtplib.LMTP, token: str) -> tuple[int, bytes]:
    blob = base64.b64encode(f"\0mailfleet-internal\0{token}".encode()).decode()
    return client.docmd("AUTH", f"PLAIN {blob}")


def test_lmtp_refuses_a_peer_without_the_internal_token_and_counts_it(cluster: Cluster) -> None:
    node1 = cluster.nodes[1]
    port = cluster.lmtp[1]
    with lmtp(port) as client:
        code, _ = client.docmd("MAIL", "FROM:<sender@remote.test>")
        assert code == 530
    with lmtp(port) as client:
        assert auth(client, "not-the-token")[0] == 535
        assert client.docmd("MAIL", "FROM:<sender@remote.test>")[0] == 530
    assert node1.metric("mailnode_lmtp_refused_total", reason="no_auth") == 2
    assert node1.metric("mailnode_lmtp_refused_total", reason="wrong_token") == 1
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:  # not LMTP: EHLO is refused
        assert client.ehlo()[0] == 500
    assert node1.files.stored(f"bob@{DOMAIN}") == []


def test_lmtp_answers_each_recipient_after_data(cluster: Cluster) -> None:
    node1 = cluster.nodes[1]
    with lmtp(cluster.lmtp[1]) as client:
        assert auth(client, TOKEN)[0] == 235
        assert client.docmd("MAIL", "FROM:<sender@remote.test>")[0] == 250
        assert client.docmd("RCPT", f"TO:<bob@{DOMAIN}>")[0] == 250
        assert client.docmd("RCPT", f"TO:<full@{DOMAIN}>")[0] == 250  # no SIZE: quota is judged at DATA
        assert client.docmd("RCPT", f"TO:<alice@{DOMAIN}>")[0] == 451  # homed on node 0, not here
        assert client.docmd("RCPT", f"TO:<nobody@{DOMAIN}>")[0] == 550
        assert client.docmd("DATA")[0] == 354
        client.send(MESSAGE + b".\r\n")
        first, second = client.getreply(), client.getreply()  # RFC 2033 §4.2: one per accepted RCPT
    assert first[0] == 250
    assert second[0] == 552 and b"5.2.2" in second[1]
    [stored] = node1.files.stored(f"bob@{DOMAIN}")
    assert stored == b"Return-Path: <sender@remote.test>\r\n" + MESSAGE  # no second Received
    assert node1.files.stored(f"full@{DOMAIN}") == []
    assert node1.metric("mailnode_lmtp_deliveries_total", result="refused") == 1


def test_a_hand_off_sent_twice_is_stored_once(cluster: Cluster) -> None:
    """A peer that never heard the 250 (the home crashed after its commit) sends the hand-off again
    under the same id: the home answers 250 and keeps one copy, without the internal header."""
    node1 = cluster.nodes[1]
    tagged = b"X-Mailfleet-Handoff: 0.18c2f3a9b01fe2d7\r\n" + MESSAGE
    for _ in range(2):
        with lmtp(cluster.lmtp[1]) as client:
            assert auth(client, TOKEN)[0] == 235
            assert client.docmd("MAIL", "FROM:<sender@remote.test>")[0] == 250
            assert client.docmd("RCPT", f"TO:<bob@{DOMAIN}>")[0] == 250
            assert client.docmd("DATA")[0] == 354
            client.send(tagged + b".\r\n")
            assert client.getreply()[0] == 250
    assert node1.files.stored(f"bob@{DOMAIN}") == [b"Return-Path: <sender@remote.test>\r\n" + MESSAGE]


def test_a_hand_off_header_from_a_client_does_not_suppress_mail(cluster: Cluster) -> None:
    """The header is read only as the first line on the internal port: a client's own, sent over SMTP
    twice, lies below the accepting node's trace headers and suppresses nothing."""
    node0, node1, _ = cluster.nodes
    smuggled = b"X-Mailfleet-Handoff: 0.18c2f3a9b01fe2d7\r\n" + MESSAGE
    assert send(node0, [f"bob@{DOMAIN}"], smuggled) == {}
    assert send(node0, [f"bob@{DOMAIN}"], smuggled) == {}
    stored = node1.files.stored(f"bob@{DOMAIN}")
    assert len(stored) == 2 and all(smuggled in message for message in stored)


def test_a_recipient_its_home_refuses_is_bounced_when_others_were_taken(cluster: Cluster) -> None:
    node0, node1, _ = cluster.nodes
    assert send(node0, [f"bob@{DOMAIN}", f"full@{DOMAIN}"], sender=f"alice@{DOMAIN}") == {}
    assert len(node1.files.stored(f"bob@{DOMAIN}")) == 1
    assert node1.files.stored(f"full@{DOMAIN}") == []
    wait_for("the bounce", lambda: len(node0.files.stored(f"alice@{DOMAIN}")) == 1)
    [bounce] = node0.files.stored(f"alice@{DOMAIN}")
    report = email.message_from_bytes(bounce)
    assert report.get_content_type() == "multipart/report"
    assert f"full@{DOMAIN}" in bounce.decode() and "5.2.2" in bounce.decode()
    assert f"Final-Recipient: rfc822; bob@{DOMAIN}" not in bounce.decode()
    wait_for("the queue to empty", lambda: queue(node0) == [])


def test_the_only_recipient_refused_by_its_home_is_refused_to_the_client(cluster: Cluster) -> None:
    node0, node1, _ = cluster.nodes
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(node0, [f"full@{DOMAIN}"], sender=f"alice@{DOMAIN}")
    assert refused.value.smtp_code == 552
    assert queue(node0) == [] and node0.files.stored(f"alice@{DOMAIN}") == []
