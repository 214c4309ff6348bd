"""A mailbox moved while mail streams in (docs/architecture.md "Moving a mailbox"): three real nodes
(tests.node.test_cluster_mail's Cluster), three SMTP clients sending to alice through the three nodes,
and an IMAP session in IDLE on her, while the operator's driver (mailfleet.moving) moves her from node 0
to node 1.

Aspects: no message is refused while the mailbox is frozen (its mail waits in the queues); afterwards
every acknowledged message is in her new home exactly once and in no other node's store, every queue is
empty; the IDLE session got `BYE [UNAVAILABLE]` at the freeze, and a new login (on the old home, proxied
now) sees every message.
"""

from __future__ import annotations

import asyncio
import collections
import imaplib
import re
import smtplib
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.node.conftest import DOMAIN, NodeFactory
from tests.node.test_cluster_mail import Cluster, queue
from tests.node.test_move import ALICE, drive, login, ok, three_nodes
from tests.node.test_outbound import wait_for

_MESSAGE_ID = re.compile(rb"\r\nMessage-ID: <([^<>\r\n]+)>\r\n")


@pytest.fixture
def cluster(node_factory: NodeFactory, tmp_path: Path) -> Iterator[Cluster]:
    yield from three_nodes(node_factory, tmp_path)


class Sender(threading.Thread):
    """Sends through one node, one connection a message, round-robin over `recipients`, until stopped;
    remembers what was acknowledged (250: message id -> recipient) and what was refused, and whether by an
    SMTP reply (a node that answered) or by the connection (a node down: nothing was acknowledged)."""

    def __init__(self, name: str, port: int, stop: threading.Event, recipients: tuple[str, ...] = (ALICE,)) -> None:
        super().__init__(daemon=True)
        self.name, self.port, self.stop, self.recipients = name, port, stop, recipients
        self.acked: dict[str, str] = {}
        self.refused: list[str] = []  # by an SMTP reply
        # Sent over a connection that broke (a node down or killed): not acknowledged, though a node killed
        # between its store's fsync and its 250 has stored it (RFC 5321 §6.1 allows that duplicate).
        self.unreached: list[str] = []

    def run(self) -> None:
        number = 0
        while not self.stop.is_set():
            message_id = f"{self.name}-{number}@remote.test"
            recipient = self.recipients[number % len(self.recipients)]
            number += 1
            data = (
                f"Message-ID: <{message_id}>\r\nFrom: <sender@remote.test>\r\nTo: <{recipient}>\r\n"
                f"Subject: moving {message_id}\r\n\r\nSent while a mailbox moves.\r\n"
            ).encode()
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=60) as client:
                    client.sendmail("sender@remote.test", [recipient], data)
                self.acked[message_id] = recipient
            except smtplib.SMTPResponseException as error:
                self.refused.append(f"{message_id}: {error}")
            except smtplib.SMTPRecipientsRefused as error:
                self.refused.append(f"{message_id}: {error.recipients}")
            except (smtplib.SMTPException, OSError):
                self.unreached.append(message_id)
            # A steady stream rather than a flood: what waits in the queues during the freeze stays a few
            # dozen messages, which the queues hand over in seconds afterwards.
            self.stop.wait(0.2)


class Idler(threading.Thread):
    """An IMAP session in IDLE on INBOX: every line it is sent until the connection ends."""

    def __init__(self, client: imaplib.IMAP4) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.lines: list[bytes] = []
        self.idling = threading.Event()

    def run(self) -> None:
        ok(self.client.select("INBOX"))
        self.client.send(b"i1 IDLE\r\n")
        while True:
            try:
                line = self.client.readline()
            except (OSError, imaplib.IMAP4.abort):
                return
            if not line:
                return
            self.lines.append(line)
            if line.startswith(b"* BYE"):  # as a client does: it closes, and logs in again later
                self.client.shutdown()
                return
            if line.startswith(b"+"):
                self.idling.set()


def test_mail_sent_during_a_move_arrives_once_and_idle_reconnects_to_the_new_home(
    cluster: Cluster, client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    node0, node1, node2 = cluster.nodes
    idler = Idler(login(node0, client_tls))
    idler.start()
    wait_for("IDLE to start", idler.idling.is_set, timeout=60)
    stop = threading.Event()
    senders = [Sender(f"via{i}", node.port("smtp"), stop) for i, node in enumerate(cluster.nodes)]
    for sender in senders:
        sender.start()
    wait_for("mail to flow", lambda: sum(len(s.acked) for s in senders) >= 15, timeout=120)

    recorded = asyncio.run(drive(cluster, ALICE, source=0, target=1))

    after_move = sum(len(s.acked) for s in senders)
    wait_for("mail to flow after the move", lambda: sum(len(s.acked) for s in senders) >= after_move + 15, timeout=120)
    stop.set()
    for sender in senders:
        sender.join(120)
    assert recorded[-1].step.value == "Done"
    assert [s.refused for s in senders] == [[], [], []]
    acked = [message_id for s in senders for message_id in s.acked]
    assert [s.unreached for s in senders] == [[], [], []]
    wait_for("every queue to empty", lambda: all(queue(node) == [] for node in cluster.nodes), timeout=120)
    stored = node1.files.stored(ALICE)
    found = collections.Counter(match.group(1).decode() for data in stored if (match := _MESSAGE_ID.search(data)))
    assert sorted(found) == sorted(acked)  # every acknowledged message, and nothing else
    assert set(found.values()) == {1}  # each exactly once
    for node in (node0, node2):
        assert not (node.files.data_dir / "mail" / DOMAIN / "alice").exists()

    idler.join(60)
    assert any(line.startswith(b"* BYE [UNAVAILABLE]") for line in idler.lines), idler.lines
    client = login(node0, client_tls)  # the old home: proxied to the new one now
    assert int(ok(client.select("INBOX"))[0]) == len(acked)
    client.logout()
    assert node0.metric("mailnode_frozen_mailboxes") == 0
