"""Sending to the world, end to end: an authenticated user submits mail for another domain; the node
signs it (DKIM), queues it durably and delivers it to the remote server (an aiosmtpd server in the test,
reached through a transport); a remote 5xx brings a bounce into the sender's INBOX; a mailbox's remote
forward_to goes out the same way."""

from __future__ import annotations

import asyncio
import json
import random
import re
import smtplib
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest
from aiosmtpd.controller import Controller

from mailnode import dkim
from tests.node.conftest import PASSWORD, NodeFactory, RunningNode, ServeProcess, free_port, mailbox

MESSAGE = b"From: User <user@example.com>\r\nTo: friend@remote.test\r\nSubject: hello out there\r\n\r\nHi!\r\n"


class RemoteMX:
    """The other side: accepts mail, except for recipients it is told to refuse."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []
        self.refuse: set[str] = set()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        if address in self.refuse:
            return f"550 5.1.1 <{address}>: Recipient address rejected: no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 queued"


@pytest.fixture
def remote() -> Iterator[tuple[RemoteMX, int]]:
    handler = RemoteMX()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    yield handler, port
    controller.stop()


@pytest.fixture
def sending_node(node_factory: NodeFactory, remote: tuple[RemoteMX, int], tmp_path: Path) -> RunningNode:
    key_file = tmp_path / "dkim.pem"
    key_file.write_bytes(dkim.generate_key(1024))
    return node_factory(
        [mailbox("user@example.com"), mailbox("forwarder@example.com", forward_to=["someone@remote.test"])],
        domains=[{"domain": "example.com", "dkim": {"selector": "s1", "key_file": str(key_file)}}],
        smtp={"transports": {"remote.test": f"127.0.0.1:{remote[1]}"}, "delivery_interval": 0.1},
    )


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def submit(node: RunningNode, client_tls: ssl.SSLContext, recipients: list[str], data: bytes = MESSAGE) -> None:
    with smtplib.SMTP("127.0.0.1", node.port("submission"), timeout=30) as client:
        client.starttls(context=client_tls)
        client.login("user@example.com", PASSWORD)
        assert client.sendmail("user@example.com", recipients, data) == {}


def test_remote_recipients_are_signed_queued_and_delivered(
    sending_node: RunningNode, remote: tuple[RemoteMX, int], client_tls: ssl.SSLContext
) -> None:
    mx, _ = remote
    submit(sending_node, client_tls, ["friend@remote.test", "user@example.com"])
    assert sending_node.files.stored("user@example.com")[0].endswith(MESSAGE)  # the local copy, at once
    wait_for("the remote server to receive it", lambda: bool(mx.received))
    sender, recipients, data = mx.received[0]
    assert (sender, recipients) == ("user@example.com", ["friend@remote.test"])
    assert data.endswith(MESSAGE)
    assert not data.startswith(b"Return-Path:")  # added only at final delivery
    record = dkim.record(Path(sending_node.node.config.domains[0].dkim.key_file).read_bytes(),  # type: ignore[union-attr]
                         domain="example.com", selector="s1")  # fmt: skip
    lookup = {record.name: record.value.encode()}
    assert dkimpy.verify(data, dnsfunc=lambda name, timeout=5: lookup.get(name.decode().rstrip(".")))
    # the remote server has the message before its 250 reaches the node, which then records it
    wait_for(
        "the delivery to be recorded",
        lambda: sending_node.metric("mailnode_delivery_attempts_total", result="delivered") == 1,
    )
    wait_for("the queue to empty", lambda: json.loads(sending_node.http_get("/queue")[1]) == [])


def test_a_remote_refusal_bounces_to_the_sender(
    sending_node: RunningNode, remote: tuple[RemoteMX, int], client_tls: ssl.SSLContext
) -> None:
    mx, _ = remote
    mx.refuse.add("nobody@remote.test")
    submit(sending_node, client_tls, ["nobody@remote.test"])
    wait_for("the bounce", lambda: bool(sending_node.files.stored("user@example.com")))
    [bounce] = sending_node.files.stored("user@example.com")
    assert b"Subject: Undelivered Mail Returned to Sender" in bounce
    assert b"Status: 5.1.1" in bounce
    assert b"Subject: hello out there" in bounce  # the original headers come back
    assert mx.received == []


def test_remote_forward_to_goes_out(sending_node: RunningNode, remote: tuple[RemoteMX, int]) -> None:
    mx, _ = remote
    with smtplib.SMTP("127.0.0.1", sending_node.port("smtp"), timeout=10) as client:
        client.sendmail("alice@elsewhere.test", ["forwarder@example.com"], MESSAGE)
    assert len(sending_node.files.stored("forwarder@example.com")) == 1  # the mailbox keeps its copy
    wait_for("the forward", lambda: bool(mx.received))
    assert mx.received[0][1] == ["someone@remote.test"]
    assert mx.received[0][2].endswith(MESSAGE)


def test_mx_still_refuses_to_relay(sending_node: RunningNode) -> None:
    with smtplib.SMTP("127.0.0.1", sending_node.port("smtp"), timeout=10) as client:
        client.ehlo("elsewhere.test")
        client.mail("alice@elsewhere.test")
        code, text = client.rcpt("friend@remote.test")
    assert (code, text[:5]) == (554, b"5.7.1")


class SlowRemoteMX(RemoteMX):
    """A remote server that takes a while to accept each message, so deliveries are in flight when the
    node is killed."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await asyncio.sleep(0.05)
        return await super().handle_DATA(server, session, envelope)


@pytest.mark.slow
def test_sigkill_during_delivery_loses_nothing(
    serve_process: Callable[..., ServeProcess], client_tls: ssl.SSLContext
) -> None:
    handler = SlowRemoteMX()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        node = serve_process(smtp={"transports": {"remote.test": f"127.0.0.1:{port}"}, "delivery_interval": 0.1})
        node.start()
        count = 40
        with smtplib.SMTP("127.0.0.1", node.ports["submission"], timeout=30) as client:
            client.starttls(context=client_tls)
            client.login("user@example.com", PASSWORD)
            for number in range(count):
                data = MESSAGE.replace(
                    b"Subject: hello", f"Message-ID: <k{number}@example.com>\r\nSubject: hello".encode()
                )
                assert client.sendmail("user@example.com", ["friend@remote.test"], data) == {}
        rng = random.Random(7)
        kills = 0
        for _ in range(4):  # kill the node while it is delivering, then start it again
            time.sleep(rng.uniform(0.05, 0.3))
            node.kill()
            kills += 1
            node.start()
        wait_for("every message to arrive", lambda: len({_message_id(d) for _, _, d in handler.received}) == count, 60)
        received = [_message_id(d) for _, _, d in handler.received]
        assert set(received) == {f"k{n}@example.com" for n in range(count)}  # nothing lost
        # A message can arrive twice only if the kill fell between the remote's 250 and the spool's
        # record of it (RFC 5321 §6.1): at most the deliveries in flight at each kill.
        assert len(received) - count <= kills * 4
        assert node.terminate() == 0
    finally:
        controller.stop()


def _message_id(data: bytes) -> str:
    found = re.search(rb"Message-ID: <([^>]+)>", data)
    return found.group(1).decode() if found else ""


def test_new_mail_goes_out_without_waiting_for_the_next_queue_run(
    node_factory: NodeFactory, remote: tuple[RemoteMX, int], client_tls: ssl.SSLContext
) -> None:
    mx, port = remote
    node = node_factory(smtp={"transports": {"remote.test": f"127.0.0.1:{port}"}, "delivery_interval": 3600})
    time.sleep(0.5)  # let the first (empty) queue run pass; the next one would be an hour away
    submit(node, client_tls, ["friend@remote.test"])
    wait_for("the message to arrive", lambda: bool(mx.received), timeout=15)
