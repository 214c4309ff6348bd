"""Envelope syntax on the MX listener, over real sockets: paths that break RFC 5321 §4.1.2 (an
unterminated "<", NUL and other control characters) are refused with `501 5.1.7` (MAIL FROM) or
`501 5.1.3` (RCPT TO), non-ASCII addresses without SMTPUTF8 with `553 5.6.7` (RFC 6531 §3.5); after
each refusal the session goes on, and nothing refused reaches a stored message's Return-Path."""

from __future__ import annotations

import smtplib

import pytest

from tests.node.conftest import RunningNode

MESSAGE = b"From: alice@remote.test\r\nTo: user@example.com\r\nSubject: envelope\r\n\r\nHi.\r\n"


def mx(node: RunningNode) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", node.port("smtp"), timeout=10)
    client.ehlo("client.remote.test")
    return client


def command(client: smtplib.SMTP, line: bytes) -> tuple[int, bytes]:
    """One command sent byte for byte (smtplib's own commands are ASCII only)."""
    client.send(line + b"\r\n")
    return client.getreply()


def delivers_after(client: smtplib.SMTP) -> None:
    """The session goes on: a valid transaction on the same connection is accepted and stored."""
    assert client.rset()[0] == 250
    assert client.sendmail("alice@remote.test", ["user@example.com"], MESSAGE) == {}


@pytest.mark.parametrize(
    ("sender", "code", "status"),
    [
        (b"<unterminated@example.net", 501, b"5.1.7"),  # Postfix: 501 5.1.7 Bad sender address syntax
        (b"<unterminated@example.net SIZE=100", 501, b"5.1.7"),
        (b"<a\x00b@remote.test>", 501, b"5.1.7"),
        (b"<ab@remote.test\x00>", 501, b"5.1.7"),
        (b"<a\x07b@remote.test>", 501, b"5.1.7"),
        (b"<a b@remote.test>", 501, b"5.1.7"),
        (b"<a@b@remote.test>", 501, b"5.1.7"),
        (b"<a@remote.test>junk", 501, b"5.1.7"),
        (b"<<a@remote.test>>", 501, b"5.1.7"),
        ("<zoë@remote.test>".encode(), 553, b"5.6.7"),  # UTF-8, but no SMTPUTF8 parameter
        (b"<zo\xeb@remote.test>", 553, b"5.6.7"),  # raw 8-bit (Latin-1)
        ("<alice@rémote.test>".encode(), 553, b"5.6.7"),
    ],
)
def test_bad_sender_paths_are_refused_and_the_session_goes_on(
    node: RunningNode, sender: bytes, code: int, status: bytes
) -> None:
    with mx(node) as client:
        got, text = command(client, b"MAIL FROM:" + sender)
        assert (got, text[:5]) == (code, status), text
        assert command(client, b"MAIL FROM:<alice@remote.test>")[0] == 250
        assert client.rcpt("user@example.com")[0] == 250
        assert client.data(MESSAGE)[0] == 250
    [stored] = node.files.stored("user@example.com")
    assert stored.startswith(b"Return-Path: <alice@remote.test>\r\n")
    assert node.metric("mailnode_smtp_messages_rejected_total", listener="smtp", reason="bad_address") == 1


@pytest.mark.parametrize(
    ("recipient", "code", "status"),
    [
        (b"<user@example.com", 501, b"5.1.3"),
        (b"<us\x00er@example.com>", 501, b"5.1.3"),
        (b"<user@example.com\x00>", 501, b"5.1.3"),
        (b"<user @example.com>", 501, b"5.1.3"),
        ("<usér@example.com>".encode(), 553, b"5.6.7"),
        (b"<us\xe9r@example.com>", 553, b"5.6.7"),
    ],
)
def test_bad_recipient_paths_are_refused_and_the_session_goes_on(
    node: RunningNode, recipient: bytes, code: int, status: bytes
) -> None:
    with mx(node) as client:
        assert client.mail("alice@remote.test")[0] == 250
        got, text = command(client, b"RCPT TO:" + recipient)
        assert (got, text[:5]) == (code, status), text
        assert client.rcpt("user@example.com")[0] == 250  # the transaction goes on
        assert client.data(MESSAGE)[0] == 250
        delivers_after(client)
    assert len(node.files.stored("user@example.com")) == 2


def test_utf8_addresses_with_smtputf8_are_taken(node: RunningNode) -> None:
    """RFC 6531 §3.3: with SMTPUTF8 on MAIL FROM, both paths may be UTF-8; bytes that are not UTF-8
    still break the syntax."""
    with mx(node) as client:
        got, text = command(client, b"MAIL FROM:<zo\xeb@remote.test> SMTPUTF8")
        assert (got, text[:5]) == (501, b"5.1.7"), text
        got, text = command(client, "MAIL FROM:<zoë@rémote.test> SMTPUTF8".encode())
        assert got == 250, text
        got, text = command(client, "RCPT TO:<usér@example.com>".encode())
        assert (got, text[:5]) == (550, b"5.1.1"), text  # well formed, just unknown
        assert client.rcpt("user@example.com")[0] == 250
        assert client.data(MESSAGE)[0] == 250
    [stored] = node.files.stored("user@example.com")
    assert stored.startswith("Return-Path: <zoë@rémote.test>\r\n".encode())


def test_valid_paths_are_still_taken(node: RunningNode) -> None:
    """RFC 5321 §4.1.2: a source route is accepted (and ignored), a quoted local part and an address
    literal are paths too, and the null reverse-path of bounces stays valid."""
    with mx(node) as client:
        for sender in (
            b"<@relay.remote.test,@other.remote.test:alice@remote.test>",
            b'<"alice smith"@remote.test>',
            b"<alice@[192.0.2.1]>",
            b"<alice@[IPv6:2001:db8::1]>",
            b"<> SIZE=100",
            b"alice@remote.test",  # without angle brackets, as Postfix allows by default
        ):
            got, text = command(client, b"MAIL FROM:" + sender)
            assert got == 250, (sender, text)
            assert client.rset()[0] == 250
        delivers_after(client)
