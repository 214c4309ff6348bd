"""Hot reload of the mailbox directory while the node runs, as the operator updates its Secret.

Aspects: a mailbox added to the file starts receiving mail, a removed one is refused (550 5.1.1), a
suspended one is disabled (550 5.2.1), a changed password replaces the old one for AUTH; a broken
file (invalid YAML, a bad field) keeps the last good directory in force and says so in metrics and
/status until the file is fixed.
"""

from __future__ import annotations

import json
import smtplib
import ssl
import time
from collections.abc import Callable
from typing import Any

import yaml

from mailnode import passwords
from tests.node.conftest import DOMAIN, PASSWORD, NodeFactory, RunningNode, mailbox

USER, OTHER, NEW = f"user@{DOMAIN}", f"other@{DOMAIN}", f"new@{DOMAIN}"
RELOAD_TIMEOUT = 5.0  # the fixture polls the file every 0.1 s


def rcpt(node: RunningNode, address: str) -> tuple[int, str]:
    """The reply to RCPT TO:<address> in a fresh MX session."""
    with smtplib.SMTP("127.0.0.1", node.port("smtp"), local_hostname="client.test", timeout=10) as conn:
        assert conn.ehlo()[0] == 250
        assert conn.mail("sender@remote.test")[0] == 250
        code, text = conn.rcpt(address)
        conn.rset()
    return code, text.decode()


def status_code(reply: tuple[int, str]) -> str:
    """`550 5.1.1` from (550, '5.1.1 Mailbox unavailable ...')."""
    return f"{reply[0]} {reply[1].split(' ', 1)[0]}"


def directory_status(node: RunningNode) -> dict[str, Any]:
    code, body = node.http_get("/status")
    assert code == 200
    directory: dict[str, Any] = json.loads(body)["directory"]
    return directory


def reloads(node: RunningNode, result: str) -> float:
    return node.metric("mailnode_directory_reloads_total", result=result)


def eventually(check: Callable[[], Any], expected: Any, what: str, timeout: float = RELOAD_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while (seen := check()) != expected:
        assert time.monotonic() < deadline, f"after {timeout}s {what} is {seen!r}, expected {expected!r}"
        time.sleep(0.05)


def test_added_mailbox_receives_mail(node_factory: NodeFactory) -> None:
    node = node_factory([mailbox(USER), mailbox(OTHER)])
    before = directory_status(node)
    successes = reloads(node, "success")
    assert before["mailboxes"] == 2
    assert status_code(rcpt(node, NEW)) == "550 5.1.1"

    node.files.write_directory([mailbox(USER), mailbox(OTHER), mailbox(NEW)])

    eventually(lambda: status_code(rcpt(node, NEW)), "250 2.1.5", f"the reply to RCPT {NEW}")
    assert reloads(node, "success") > successes
    assert reloads(node, "failure") == 0
    after = directory_status(node)
    assert after["version"] != before["version"]
    assert after["mailboxes"] == 3
    assert after["last_error"] is None
    with smtplib.SMTP("127.0.0.1", node.port("smtp"), timeout=10) as conn:
        conn.sendmail("sender@remote.test", [NEW], b"Subject: welcome\r\n\r\nhello new\r\n")
    stored = node.files.stored(NEW)
    assert len(stored) == 1
    assert stored[0].endswith(b"\r\nSubject: welcome\r\n\r\nhello new\r\n")


def test_removed_mailbox_is_refused(node_factory: NodeFactory) -> None:
    node = node_factory([mailbox(USER), mailbox(OTHER)])
    assert status_code(rcpt(node, OTHER)) == "250 2.1.5"

    node.files.write_directory([mailbox(USER)])

    eventually(lambda: status_code(rcpt(node, OTHER)), "550 5.1.1", f"the reply to RCPT {OTHER}")
    assert status_code(rcpt(node, USER)) == "250 2.1.5"
    assert directory_status(node)["mailboxes"] == 1


def test_suspended_mailbox_is_disabled(node_factory: NodeFactory) -> None:
    node = node_factory([mailbox(USER), mailbox(OTHER)])
    assert status_code(rcpt(node, OTHER)) == "250 2.1.5"

    node.files.write_directory([mailbox(USER), mailbox(OTHER, suspended=True)])

    eventually(lambda: status_code(rcpt(node, OTHER)), "550 5.2.1", f"the reply to RCPT {OTHER}")
    assert status_code(rcpt(node, USER)) == "250 2.1.5"


def _broken_then_fixed(node: RunningNode, broken: str, problem: list[str]) -> None:
    """Write `broken`; the last good directory stays in force and the problem is reported; then fix it."""
    good = directory_status(node)
    failures, successes = reloads(node, "failure"), reloads(node, "success")
    assert node.metric("mailnode_directory_last_reload_success") == 1

    node.files.write_directory(broken)

    eventually(lambda: reloads(node, "failure"), failures + 1, "the count of failed reloads")
    assert node.metric("mailnode_directory_last_reload_success") == 0
    kept = directory_status(node)
    assert (kept["version"], kept["mailboxes"]) == (good["version"], good["mailboxes"])
    assert kept["last_error"] is not None
    for words in problem:
        assert words in kept["last_error"], kept["last_error"]
    assert status_code(rcpt(node, USER)) == "250 2.1.5"
    assert status_code(rcpt(node, OTHER)) == "250 2.1.5"
    assert status_code(rcpt(node, NEW)) == "550 5.1.1"
    assert reloads(node, "success") == successes
    # One report per distinct failure, not one per poll: five more polls of the same file add none.
    time.sleep(0.5)
    assert reloads(node, "failure") == failures + 1

    node.files.write_directory([mailbox(USER), mailbox(OTHER), mailbox(NEW)])

    eventually(lambda: node.metric("mailnode_directory_last_reload_success"), 1, "last_reload_success")
    assert reloads(node, "success") == successes + 1
    fixed = directory_status(node)
    assert fixed["last_error"] is None
    assert fixed["mailboxes"] == 3
    assert status_code(rcpt(node, NEW)) == "250 2.1.5"


def test_invalid_yaml_keeps_last_good_directory(node_factory: NodeFactory) -> None:
    node = node_factory([mailbox(USER), mailbox(OTHER)])
    _broken_then_fixed(node, f"mailboxes: [{{address: {NEW}\n", ["not valid YAML"])


def test_bad_quota_keeps_last_good_directory(node_factory: NodeFactory) -> None:
    node = node_factory([mailbox(USER), mailbox(OTHER)])
    broken = _yaml([mailbox(USER), mailbox(OTHER), mailbox(NEW, quota="lots")])
    _broken_then_fixed(node, broken, ["mailboxes.2.quota", "'lots' is not a size"])


def test_address_without_at_keeps_last_good_directory(node_factory: NodeFactory) -> None:
    node = node_factory([mailbox(USER), mailbox(OTHER)])
    broken = _yaml([mailbox(USER), mailbox(OTHER), mailbox("new.example.com")])
    _broken_then_fixed(node, broken, ["mailboxes.2.address", "not a mail address"])


def test_each_distinct_failure_is_reported(node_factory: NodeFactory) -> None:
    node = node_factory([mailbox(USER), mailbox(OTHER)])
    node.files.write_directory("mailboxes: [\n")
    eventually(lambda: reloads(node, "failure"), 1, "the count of failed reloads")
    assert "not valid YAML" in directory_status(node)["last_error"]

    node.files.write_directory(_yaml([mailbox(USER, quota="lots")]))

    eventually(lambda: reloads(node, "failure"), 2, "the count of failed reloads")
    assert "mailboxes.0.quota" in directory_status(node)["last_error"]
    assert node.metric("mailnode_directory_last_reload_success") == 0
    assert status_code(rcpt(node, OTHER)) == "250 2.1.5"


def _yaml(mailboxes: list[dict[str, Any]]) -> str:
    return yaml.safe_dump({"mailboxes": mailboxes})


def login(node: RunningNode, client_tls: ssl.SSLContext, password: str) -> tuple[int, str]:
    """The reply to AUTH as USER on the submission listener after STARTTLS."""
    with smtplib.SMTP("127.0.0.1", node.port("submission"), local_hostname="mua.test", timeout=10) as conn:
        conn.starttls(context=client_tls)
        reply: bytes | str
        try:
            code, reply = conn.login(USER, password)
        except smtplib.SMTPAuthenticationError as error:
            code, reply = error.smtp_code, error.smtp_error
    return code, reply.decode() if isinstance(reply, bytes) else reply


def test_changed_password_replaces_the_old_one(node_factory: NodeFactory, client_tls: ssl.SSLContext) -> None:
    new_password = "a new password for a new day"
    node = node_factory([mailbox(USER), mailbox(OTHER)])
    assert status_code(login(node, client_tls, PASSWORD)) == "235 2.7.0"
    assert status_code(login(node, client_tls, new_password)) == "535 5.7.8"
    version = directory_status(node)["version"]

    new_hash = passwords.hash_password(new_password)
    node.files.write_directory([mailbox(USER, password_hash=new_hash), mailbox(OTHER)])

    eventually(lambda: directory_status(node)["version"] != version, True, "a new directory version")
    assert status_code(login(node, client_tls, PASSWORD)) == "535 5.7.8"
    assert status_code(login(node, client_tls, new_password)) == "235 2.7.0"
