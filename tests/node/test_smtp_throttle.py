"""Login throttling seen from real clients (smtplib over submission, imaplib over IMAP STARTTLS): the
failures a client address piles up on one account survive its success on another account, whatever the
protocol, and a success on the account itself clears them. Counted, never timed: the delays
themselves are tested with fake time in tests/unit/test_auth.py."""

from __future__ import annotations

import imaplib
import smtplib
import ssl

import pytest

from tests.node.conftest import PASSWORD, RunningNode
from tests.node.test_submission import submission


def smtp_login(node: RunningNode, client_tls: ssl.SSLContext, user: str, password: str) -> bool:
    with submission(node, client_tls) as client:
        client.user, client.password = user, password
        try:
            client.auth("PLAIN", client.auth_plain)  # one attempt (login() would go on with LOGIN)
        except smtplib.SMTPAuthenticationError:
            return False
        return True


def imap_login(node: RunningNode, client_tls: ssl.SSLContext, user: str, password: str) -> bool:
    client = imaplib.IMAP4("127.0.0.1", node.port("imap"), timeout=30)
    try:
        client.starttls(ssl_context=client_tls)
        client.login(user, password)
    except imaplib.IMAP4.error:
        return False
    finally:
        client.shutdown()
    return True


@pytest.mark.parametrize("login", [smtp_login, imap_login])
def test_a_success_on_another_account_leaves_the_failures_on_record(
    node: RunningNode, client_tls: ssl.SSLContext, login
) -> None:
    for _ in range(3):
        assert not login(node, client_tls, "user@example.com", "wrong guess")
    assert node.node.authenticator.failures("127.0.0.1") == 3
    assert login(node, client_tls, "other@example.com", PASSWORD)  # the attacker's own account
    assert node.node.authenticator.failures("127.0.0.1") == 3  # still throttled for user@
    assert login(node, client_tls, "user@example.com", PASSWORD)  # the owner, after a typo or three
    assert node.node.authenticator.failures("127.0.0.1") == 0
