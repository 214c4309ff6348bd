"""Submission (STARTTLS on the submission port, implicit TLS on submissions): AUTH only over TLS,
PLAIN and LOGIN, passwords and app passwords, bad credentials, sender ownership, local delivery and
the clear refusal of remote recipients."""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl

import pytest

from tests.conftest import cheap_hash
from tests.node.conftest import PASSWORD, NodeFactory, RunningNode, mailbox

MESSAGE = b"From: user@example.com\r\nTo: other@example.com\r\nSubject: hi\r\n\r\nHi.\r\n"


def submission(node: RunningNode, client_tls: ssl.SSLContext) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", node.port("submission"), timeout=30)
    client.ehlo("laptop")
    client.starttls(context=client_tls)
    client.ehlo("laptop")
    return client


def test_auth_is_offered_only_after_starttls(node: RunningNode, client_tls: ssl.SSLContext) -> None:
    with smtplib.SMTP("127.0.0.1", node.port("submission"), timeout=10) as client:
        client.ehlo("laptop")
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        assert client.docmd("AUTH", "PLAIN")[0] == 538
        code, text = client.mail("user@example.com")
        assert (code, text[:5]) == (530, b"5.7.0")
        client.starttls(context=client_tls)  # the certificate verifies against the test CA
        client.ehlo("laptop")
        assert client.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
        assert not client.has_extn("starttls")


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_login_and_send_to_a_local_mailbox(node: RunningNode, client_tls: ssl.SSLContext, mechanism: str) -> None:
    with submission(node, client_tls) as client:
        client.user, client.password = "user@example.com", PASSWORD
        code, text = client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
        assert (code, text) == (235, b"2.7.0 Authentication successful")
        assert client.sendmail("user@example.com", ["other@example.com"], MESSAGE) == {}
    [stored] = node.files.stored("other@example.com")
    assert stored.endswith(MESSAGE)
    assert b"with ESMTPSA id" in stored


def test_bad_credentials(node: RunningNode, client_tls: ssl.SSLContext) -> None:
    with submission(node, client_tls) as client:
        for user, password in [
            ("user@example.com", "wrong"),
            ("nobody@example.com", PASSWORD),
            ("suspended@example.com", PASSWORD),
        ]:
            client.user, client.password = user, password
            with pytest.raises(smtplib.SMTPAuthenticationError) as caught:
                client.auth("PLAIN", client.auth_plain)
            assert caught.value.smtp_code == 535
            assert caught.value.smtp_error[:5] == b"5.7.8"
        code, _ = client.mail("user@example.com")  # still not authenticated
        assert code == 530
    assert node.metric("mailnode_auth_failures_total", protocol="smtp") == 3


def test_malformed_auth_is_answered(node: RunningNode, client_tls: ssl.SSLContext) -> None:
    with submission(node, client_tls) as client:
        assert client.docmd("AUTH", "PLAIN not-base64!")[:2] == (501, b"5.5.2 Cannot decode base64")
        blob = base64.b64encode(b"no-separators").decode()
        assert client.docmd("AUTH", f"PLAIN {blob}")[0] == 501
        assert client.docmd("AUTH", "CRAM-MD5")[0] == 504
        client.login("user@example.com", PASSWORD)


def test_app_password(node_factory: NodeFactory, client_tls: ssl.SSLContext) -> None:
    app_hash = cheap_hash("phone-secret")
    node = node_factory([mailbox("user@example.com", app_passwords=[{"name": "phone", "password_hash": app_hash}])])
    with submission(node, client_tls) as client:
        assert client.login("user@example.com", "phone-secret")[0] == 235


@pytest.mark.parametrize("sender", ["user@example.com", "alias@example.com", "user@example.net", "USER@example.com"])
def test_user_may_send_as_own_addresses(node: RunningNode, client_tls: ssl.SSLContext, sender: str) -> None:
    with submission(node, client_tls) as client:
        client.login("user@example.com", PASSWORD)
        assert client.mail(sender)[0] == 250


@pytest.mark.parametrize("sender", ["other@example.com", "ceo@remote.test", "<>"])
def test_user_may_not_send_as_others(node: RunningNode, client_tls: ssl.SSLContext, sender: str) -> None:
    with submission(node, client_tls) as client:
        client.login("user@example.com", PASSWORD)
        code, text = client.docmd("MAIL", f"FROM:<{sender.strip('<>')}>")
        assert (code, text[:5]) == (553, b"5.7.1")
        assert b"not owned by user user@example.com" in text


def test_submissions_is_tls_from_the_first_byte(node: RunningNode, client_tls: ssl.SSLContext) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", node.port("submissions"), context=client_tls, timeout=30) as client:
        client.ehlo("laptop")
        assert "PLAIN" in client.esmtp_features["auth"]
        assert not client.has_extn("starttls")
        client.login("user@example.com", PASSWORD)
        assert client.sendmail("user@example.com", ["other@example.com"], MESSAGE) == {}
    assert b"with ESMTPSA id" in node.files.stored("other@example.com")[0]


def test_submissions_refuses_plaintext(node: RunningNode) -> None:
    with socket.create_connection(("127.0.0.1", node.port("submissions")), timeout=10) as sock:
        sock.sendall(b"EHLO laptop\r\n")  # not a TLS ClientHello: the handshake fails, the node hangs up
        try:
            answer = sock.recv(1024)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"220")
    # it is still serving TLS afterwards (here a client that does not trust the test CA refuses it)
    with pytest.raises(ssl.SSLCertVerificationError):
        smtplib.SMTP_SSL("127.0.0.1", node.port("submissions"), context=ssl.create_default_context(), timeout=10)


def test_without_a_certificate_submission_does_not_listen(node_factory: NodeFactory) -> None:
    node = node_factory(tls=False)
    assert "submission" not in node.ports
    assert "submissions" not in node.ports
    assert "smtp" in node.ports
