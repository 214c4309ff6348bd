"""swaks, the SMTP test client admins use, against a real node: inbound MX delivery, submission with
STARTTLS and AUTH (certificate verified), implicit TLS, and the refusals it reports."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.node.conftest import PASSWORD, RunningNode


@pytest.fixture
def swaks() -> str:
    return require_tool("swaks")


def run(swaks: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [swaks, "--server", "127.0.0.1", "--helo", "swaks.test", "--timeout", "20", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_mx_delivery(swaks: str, node: RunningNode) -> None:
    result = run(
        swaks,
        "--port",
        str(node.port("smtp")),
        "--from",
        "alice@remote.test",
        "--to",
        "user@example.com",
        "--header",
        "Subject: from swaks",
        "--body",
        "Sent by swaks.",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<-  250 2.0.0 Ok: stored as" in result.stdout
    [stored] = node.files.stored("user@example.com")
    assert b"Subject: from swaks" in stored
    assert b"Sent by swaks." in stored


def test_mx_unknown_user(swaks: str, node: RunningNode) -> None:
    result = run(swaks, "--port", str(node.port("smtp")), "--from", "a@remote.test", "--to", "ghost@example.com")
    assert result.returncode != 0
    assert "<** 550 5.1.1 Mailbox unavailable: no such user ghost@example.com" in result.stdout


def test_mx_relay_denied(swaks: str, node: RunningNode) -> None:
    result = run(swaks, "--port", str(node.port("smtp")), "--from", "a@remote.test", "--to", "b@elsewhere.test")
    assert result.returncode != 0
    assert "<** 554 5.7.1 Relay access denied" in result.stdout


def test_submission_starttls_auth(swaks: str, node: RunningNode, ca_file: Path) -> None:
    result = run(
        swaks,
        "--port",
        str(node.port("submission")),
        "--tls",
        "--tls-verify",
        "--tls-ca-path",
        str(ca_file),
        "--auth",
        "PLAIN",
        "--auth-user",
        "user@example.com",
        "--auth-password",
        PASSWORD,
        "--from",
        "user@example.com",
        "--to",
        "other@example.com",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<~  235 2.7.0 Authentication successful" in result.stdout
    assert len(node.files.stored("other@example.com")) == 1


def test_submissions_implicit_tls_auth_login(swaks: str, node: RunningNode, ca_file: Path) -> None:
    result = run(
        swaks,
        "--port",
        str(node.port("submissions")),
        "--tls-on-connect",
        "--tls-verify",
        "--tls-ca-path",
        str(ca_file),
        "--auth",
        "LOGIN",
        "--auth-user",
        "user@example.com",
        "--auth-password",
        PASSWORD,
        "--from",
        "alias@example.com",
        "--to",
        "other@example.com",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(node.files.stored("other@example.com")) == 1


def test_submission_wrong_password(swaks: str, node: RunningNode, ca_file: Path) -> None:
    result = run(
        swaks,
        "--port",
        str(node.port("submission")),
        "--tls",
        "--tls-ca-path",
        str(ca_file),
        "--auth",
        "PLAIN",
        "--auth-user",
        "user@example.com",
        "--auth-password",
        "wrong",
        "--from",
        "user@example.com",
        "--to",
        "other@example.com",
    )
    assert result.returncode != 0
    assert "<~* 535 5.7.8 Authentication credentials invalid" in result.stdout
    assert node.files.stored("other@example.com") == []
