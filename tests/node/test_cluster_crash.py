"""A node of a cluster killed while mail streams in (DESIGN.md "Clustering"): three `mailnode serve`
processes on 127.0.0.1 that name each other as peers; SIGKILL one of them while clients send mail through
the other two to mailboxes homed on every node.

Aspects: while the node is down nothing is refused (every message is answered 250: what is for the dead
node's mailboxes waits in the accepting node's queue, fsynced); once it is back and the queues are
retried, every acknowledged message is in its recipient's home exactly once, byte for byte under the trace
headers, and in no other node's store; every queue is empty.
"""

from __future__ import annotations

import json
import re
import smtplib
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.node.conftest import DOMAIN, ServeProcess, free_ports, mailbox, write_node_files

TOKEN = "internal-token-of-example-com"
HOMES = {f"user{i}@{DOMAIN}": i for i in range(3)}
LISTENERS = ("smtp", "submission", "submissions", "imap", "imaps", "http", "lmtp", "imap_proxy")
STREAM_SECONDS = 3.0  # before the kill, while the node is down, and after it is back
_MESSAGE_ID = re.compile(rb"\r\nMessage-ID: <([^<>\r\n]+)>\r\n")


def message(message_id: str, recipient: str) -> bytes:
    return (
        f"Message-ID: <{message_id}>\r\nFrom: <sender@remote.test>\r\nTo: <{recipient}>\r\n"
        f"Subject: cluster crash {message_id}\r\n\r\nSent while a node of the cluster may be dead.\r\n"
    ).encode()


class Sender(threading.Thread):
    """Sends one message at a time through one node (one connection a message), each at most once,
    round-robin over the mailboxes; remembers what was acknowledged and every refusal."""

    def __init__(self, name: str, port: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.name, self.port, self.stop = name, port, stop
        self.acked: dict[str, tuple[str, bytes]] = {}  # message id -> (recipient, data)
        self.refused: list[str] = []

    def run(self) -> None:
        recipients = list(HOMES)
        number = 0
        while not self.stop.is_set():
            message_id = f"{self.name}-{number}@remote.test"
            recipient = recipients[number % len(recipients)]
            data = message(message_id, recipient)
            number += 1
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
                    client.sendmail("sender@remote.test", [recipient], data)
            except (smtplib.SMTPException, OSError) as error:
                self.refused.append(f"{message_id}: {error!r}")
                continue
            self.acked[message_id] = (recipient, data)


def start_cluster(tmp_path: Path, tls_files: tuple[Path, Path]) -> list[ServeProcess]:
    token_file = tmp_path / "internal-token"
    token_file.write_text(TOKEN + "\n")
    drawn = iter(free_ports(3 * len(LISTENERS)))
    ports = [{name: next(drawn) for name in LISTENERS} for _ in range(3)]
    peers = [{"host": "127.0.0.1", "lmtp": p["lmtp"], "imap_proxy": p["imap_proxy"], "http": p["http"]} for p in ports]
    mailboxes = [mailbox(address, home=home) for address, home in HOMES.items()]
    nodes = []
    for i in range(3):
        files = write_node_files(
            tmp_path / f"node{i}", mailboxes=mailboxes, tls=tls_files, ports=ports[i],
            cluster={"ordinal": i, "peers": peers}, internal={"token_file": str(token_file)},
            smtp={"delivery_interval": 0.2},
        )  # fmt: skip
        nodes.append(ServeProcess(files, ports[i]))
    for node in nodes:
        node.start()
    return nodes


def queue(node: ServeProcess) -> list[dict[str, object]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.ports['http']}/queue", timeout=10) as answer:
        result: list[dict[str, object]] = json.loads(answer.read())
        return result


def retry_all(node: ServeProcess) -> None:
    """`mailnode queue retry` of every queued message: the hand-off's backoff is tens of seconds."""
    for entry in queue(node):
        request = urllib.request.Request(
            f"http://127.0.0.1:{node.ports['http']}/queue/{entry['id']}/retry", method="POST",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=10):
                pass
        except urllib.error.HTTPError as error:
            if error.code != 404:  # 404: delivered between the listing and the retry
                raise


def stored_ids(node: ServeProcess, address: str) -> list[str]:
    ids = []
    for data in node.files.stored(address):
        match = _MESSAGE_ID.search(data)
        assert match is not None, data[:300]
        ids.append(match.group(1).decode())
    return ids


@pytest.mark.slow
@pytest.mark.parametrize("killed", [0, 1, 2])
def test_a_killed_node_loses_nothing_and_its_mail_arrives_once(
    tmp_path: Path, tls_files: tuple[Path, Path], killed: int
) -> None:
    nodes = start_cluster(tmp_path, tls_files)
    stop = threading.Event()
    try:
        senders = [Sender(f"via{i}", nodes[i].ports["smtp"], stop) for i in range(3) if i != killed]
        for sender in senders:
            sender.start()
        time.sleep(STREAM_SECONDS)
        nodes[killed].kill()  # SIGKILL, mid-stream
        time.sleep(STREAM_SECONDS)
        nodes[killed].start()
        time.sleep(STREAM_SECONDS)
        stop.set()
        for sender in senders:
            sender.join(60)
        # Nothing was refused because a peer was down.
        assert [refusal for sender in senders for refusal in sender.refused] == []

        deadline = time.monotonic() + 60
        while any(queue(node) for node in nodes) and time.monotonic() < deadline:
            for node in nodes:
                retry_all(node)
            time.sleep(0.5)
        assert [queue(node) for node in nodes] == [[], [], []]

        acked = {message_id: entry for sender in senders for message_id, entry in sender.acked.items()}
        assert len(acked) > 30  # mail really streamed through the kill
        assert any(HOMES[recipient] == killed for recipient, _ in acked.values())
        for address, home in HOMES.items():
            wanted = sorted(message_id for message_id, (recipient, _) in acked.items() if recipient == address)
            assert sorted(stored_ids(nodes[home], address)) == wanted, address  # each exactly once
            for other in range(3):
                if other != home:
                    assert nodes[other].files.stored(address) == [], (address, other)
        for data in (d for node in nodes for address in HOMES for d in node.files.stored(address)):
            message_id = _MESSAGE_ID.search(data)
            assert message_id is not None and data.endswith(acked[message_id.group(1).decode()][1])
    finally:
        stop.set()
        for node in nodes:
            node.kill()
