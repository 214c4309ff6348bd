"""`mailfleet operator` as users run it: a process logging in with a kubeconfig, reconciling, serving its
metrics, and stopping cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import aiohttp

from tests.node.conftest import free_port
from tests.operator.conftest import (
    MAILBOX,
    MAILDOMAIN,
    NAMESPACE,
    eventually,
    mailbox,
    maildomain,
    secret,
    status_of,
)


async def test_the_operator_command_reconciles_and_serves_metrics(api, client, tmp_path):
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mailfleet.cli",
        "operator",
        "--namespace",
        NAMESPACE,
        "--metrics-port",
        str(port),
        "--image",
        "registry.test/mailnode:7",
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "operator.log").open("wb"),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        await client.create(secret("alice-password", password="alice-pw"))
        await client.create(maildomain())
        await client.create(mailbox("alice", "alice@example.com"))
        await client.create(mailbox("stray", "stray@nowhere.test"))
        await eventually(lambda: status_of(client, MAILBOX, "alice", status="True"), within=60)
        await eventually(lambda: status_of(client, MAILBOX, "stray", status="False", reason="DomainNotFound"))
        domain = await eventually(lambda: status_of(client, MAILDOMAIN, "example-com", "Degraded", status="False"))
        assert domain["status"]["mailboxes"] == 1

        async def metrics() -> str:
            async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as r:
                return await r.text()

        text = await eventually(metrics)
        lines = text.splitlines()
        assert any(
            line.startswith('mailfleet_operator_reconciles_total{kind="MailDomain",result="ok"}') for line in lines
        )
        assert 'mailfleet_operator_managed_objects{kind="Mailbox"} 2.0' in lines
        assert 'mailfleet_operator_managed_objects{kind="MailDomain"} 1.0' in lines
        assert 'mailfleet_operator_managed_objects{kind="StatefulSet"} 1.0' in lines
        assert 'mailfleet_operator_managed_objects{kind="Secret"} 3.0' in lines  # directory, DKIM key, internal token
        assert 'mailfleet_operator_managed_objects{kind="Service"} 2.0' in lines  # client, headless
        assert any(
            line.startswith('mailfleet_operator_object_writes_total{action="created",kind="StatefulSet"} 1.0')
            for line in lines
        )
        assert "mailfleet_operator_reconcile_duration_seconds_count" in text
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), timeout=30)
    log = (tmp_path / "operator.log").read_text()
    assert code == 0, log
    assert "registry.test/mailnode:7" in log  # the --image the operator started with
