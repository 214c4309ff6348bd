"""A Mailbox's status shows what its mailbox keeps (usedBytes, messages), as a real mail node counts it;
in a domain of three nodes, as its home counts it (every node is asked)."""

from __future__ import annotations

import asyncio
import functools
import smtplib
from typing import Any

from mailfleet.specs import placement
from mailwire import admin
from tests.node.conftest import NodeFactory
from tests.node.conftest import mailbox as directory_entry
from tests.node.conftest import node_factory as node_factory  # the fixture: a real node
from tests.operator.conftest import (
    MAILBOX,
    NAMESPACE,
    eventually,
    mailbox,
    maildomain,
    run_operator,
    secret,
    status_of,
)
from tests.operator.fakenode import FakeNode, internal_secret

PEOPLE = ("alice", "bob", "carol", "dave", "erin", "frank")


async def test_mailbox_usage_reaches_its_status(api, client, node_factory: NodeFactory) -> None:
    # The node of MailDomain example-com, here on 127.0.0.1 (in a cluster: its pod in the headless Service).
    node = node_factory([directory_entry("alice@example.com"), directory_entry("bob@example.com")], tls=False)
    async with run_operator(node_url=f"http://127.0.0.1:{node.port('http')}", usage_interval=0.1):
        await client.create(secret("password", password="pw"))
        await client.create(maildomain())
        for name in ("alice", "bob"):
            await client.create(mailbox(name, f"{name}@example.com", passwordSecretRef={"name": "password"}))
        await eventually(lambda: status_of(client, MAILBOX, "alice", status="True"))

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", node.port("smtp"), timeout=10) as smtp:
                smtp.sendmail("a@remote.test", ["alice@example.com"], b"Subject: 1\r\n\r\nfirst\r\n")
                smtp.sendmail("a@remote.test", ["alice@example.com"], b"Subject: 2\r\n\r\nsecond one\r\n")

        await asyncio.to_thread(send)
        stored = sum(len(message) for message in node.files.stored("alice@example.com"))

        async def counted() -> dict[str, Any] | None:
            obj = await client.get(MAILBOX, NAMESPACE, "alice")
            status = (obj or {}).get("status") or {}
            return obj if (status.get("usedBytes"), status.get("messages")) == (stored, 2) else None

        alice = await eventually(counted, what=f"alice: {stored} bytes in 2 messages")
        assert alice["status"]["conditions"][0]["reason"] == "Served"  # usage leaves the conditions alone
        await eventually(lambda: _usage(client, "bob", (0, 0)), what="bob: 0 bytes, 0 messages")


async def _usage(client: Any, name: str, expected: tuple[int, int]) -> bool:
    status = ((await client.get(MAILBOX, NAMESPACE, name)) or {}).get("status") or {}
    return (status.get("usedBytes"), status.get("messages")) == expected


async def test_usage_of_a_domain_of_three_comes_from_each_mailboxs_home(api, client) -> None:
    # Three fake nodes, one per ordinal, on 127.0.<ordinal>.1 and one port (the template has {ordinal});
    # each answers for every address with its own figures, so a status shows which node it came from.
    fakes = [FakeNode() for _ in range(3)]
    await client.create(internal_secret("example-com", fakes[0].token, namespace=NAMESPACE))
    url = await fakes[0].start()
    port = int(url.rpartition(":")[2])
    for ordinal, fake in enumerate(fakes):
        if ordinal:
            await fake.start(host=f"127.0.{ordinal}.1", port=port)
        fake.usage = {
            f"{name}@example.com": admin.MailboxUsage(bytes=1000 * (ordinal + 1), messages=ordinal + 1)
            for name in PEOPLE
        }
    try:
        async with run_operator(node_url=f"http://127.0.{{ordinal}}.1:{port}", usage_interval=0.1):
            await client.create(secret("password", password="pw"))
            await client.create(maildomain(replicas=3))
            for name in PEOPLE:
                await client.create(mailbox(name, f"{name}@example.com", "password"))
            for name in PEOPLE:
                home = placement.rendezvous(f"{name}@example.com", 3)
                await eventually(
                    functools.partial(_usage, client, name, (1000 * (home + 1), home + 1)),
                    what=f"{name}'s usage from node {home}",
                )
        assert all("GET /usage" in fake.endpoints() for fake in fakes)  # every node was asked
    finally:
        for fake in fakes:
            await fake.stop()
