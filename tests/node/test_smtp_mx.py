"""The inbound MX listener, driven by smtplib and raw sockets: what it advertises, which recipients it
takes, how it refuses the others (code and enhanced status), size, line and recipient limits, aliases
and forwarding, and that malformed input is answered while the session goes on."""

from __future__ import annotations

import logging
import smtplib
import socket
import threading
import time

import pytest

from tests.node.conftest import DOMAIN, NodeFactory, RunningNode, mailbox

MESSAGE = b"From: Alice <alice@remote.test>\r\nTo: user@example.com\r\nSubject: hello\r\n\r\nHello there.\r\n"


def mx(node: RunningNode) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", node.port("smtp"), timeout=10)
    client.ehlo("client.remote.test")
    return client


def test_ehlo_advertises_the_extensions(node: RunningNode) -> None:
    with mx(node) as client:
        for extension in ("pipelining", "8bitmime", "smtputf8", "enhancedstatuscodes", "starttls"):
            assert client.has_extn(extension), extension
        assert client.esmtp_features["size"] == str(25 * 1024 * 1024)
        assert not client.has_extn("auth")


def test_mx_never_offers_auth_even_over_tls(node: RunningNode, client_tls) -> None:
    with mx(node) as client:
        client.starttls(context=client_tls)
        client.ehlo("client.remote.test")
        assert not client.has_extn("auth")
        code, text = client.docmd("AUTH", "PLAIN AHVzZXJAZXhhbXBsZS5jb20AcHc=")
        assert code == 502
        assert text.startswith(b"5.5.1")


def test_delivered_message_is_stored_with_trace_headers(node: RunningNode) -> None:
    with mx(node) as client:
        client.mail("alice@remote.test")
        client.rcpt("user@example.com")
        code, text = client.data(MESSAGE)
    assert code == 250
    assert text.startswith(b"2.0.0 Ok: stored as ")
    [stored] = node.files.stored("user@example.com")
    assert stored.endswith(MESSAGE)
    trace = stored[: -len(MESSAGE)].decode()
    assert trace.startswith(
        "Return-Path: <alice@remote.test>\r\n"
        "Authentication-Results: mail.example.com;\r\n\tspf=none smtp.mailfrom=alice@remote.test;\r\n\tdkim=none\r\n"
        "Received: from client.remote.test ([127.0.0.1])\r\n"
    )  # remote.test publishes no SPF record (no DNS answers here at all)
    assert "by mail.example.com (Mailfleet) with ESMTP id " in trace
    assert "for <user@example.com>;" in trace
    assert node.metric("mailnode_smtp_messages_accepted_total", listener="smtp") == 1
    assert node.metric("mailnode_smtp_received_bytes_total", listener="smtp") == len(MESSAGE)


@pytest.mark.parametrize(
    ("recipient", "code", "status", "reason"),
    [
        ("nobody@example.com", 550, b"5.1.1", "unknown_mailbox"),
        ("nobody@example.net", 550, b"5.1.1", "unknown_mailbox"),
        ("user@remote.test", 554, b"5.7.1", "relay_denied"),
        ("user@example.com.evil.test", 554, b"5.7.1", "relay_denied"),
        ("webmaster", 501, b"5.1.3", "bad_address"),
        ("postmaster", 550, b"5.1.1", "unknown_mailbox"),  # postmaster@example.com, not in this directory
        ("suspended@example.com", 550, b"5.2.1", "mailbox_disabled"),
    ],
)
def test_refused_recipients(node: RunningNode, recipient: str, code: int, status: bytes, reason: str) -> None:
    with mx(node) as client:
        client.mail("alice@remote.test")
        got_code, text = client.rcpt(recipient)
        assert (got_code, text[:5]) == (code, status)
        # the session goes on: a good recipient in the same transaction is still taken
        assert client.rcpt("user@example.com")[0] == 250
        assert client.data(MESSAGE)[0] == 250
    assert node.metric("mailnode_smtp_messages_rejected_total", listener="smtp", reason=reason) == 1


def test_aliases_alias_domains_and_subaddresses_reach_the_mailbox_once(node: RunningNode) -> None:
    with mx(node) as client:
        client.mail("alice@remote.test")
        for rcpt in ("alias@example.com", "user@example.net", "user+news@example.com", "USER@EXAMPLE.COM"):
            assert client.rcpt(rcpt)[0] == 250, rcpt
        assert client.data(MESSAGE)[0] == 250
    assert len(node.files.stored("user@example.com")) == 1


def test_forward_to_delivers_a_copy_to_local_targets_and_keeps_one(node: RunningNode) -> None:
    with mx(node) as client:
        client.sendmail("alice@remote.test", ["forwarder@example.com"], MESSAGE)
    assert [m.endswith(MESSAGE) for m in node.files.stored("forwarder@example.com")] == [True]
    assert [m.endswith(MESSAGE) for m in node.files.stored("other@example.com")] == [True]


def test_null_sender_is_accepted_for_bounces(node: RunningNode) -> None:
    with mx(node) as client:
        assert client.docmd("MAIL", "FROM:<>")[0] == 250
        assert client.rcpt("user@example.com")[0] == 250
        assert client.data(MESSAGE)[0] == 250
    assert node.files.stored("user@example.com")[0].startswith(b"Return-Path: <>\r\n")


def test_quota(node: RunningNode) -> None:
    body = b"Subject: big\r\n\r\n" + (b"x" * 178 + b"\r\n") * 10
    with mx(node) as client:
        # declared size over the quota: refused at RCPT
        client.mail("alice@remote.test", ["SIZE=5000"])
        assert client.rcpt("small@example.com")[:2] == (452, b"4.2.2 Mailbox full: small@example.com is over its quota")
        client.rset()
        client.sendmail("alice@remote.test", ["small@example.com"], body)  # fits: 1.8 kB of 2 kB
        client.mail("alice@remote.test")
        code, text = client.rcpt("small@example.com")  # now over quota
        assert (code, text[:5]) == (452, b"4.2.2")
    assert len(node.files.stored("small@example.com")) == 1
    assert node.metric("mailnode_smtp_messages_rejected_total", listener="smtp", reason="over_quota") == 2


def test_size_limit(node_factory: NodeFactory) -> None:
    node = node_factory(smtp={"max_message_size": 10_000})
    with mx(node) as client:
        assert client.esmtp_features["size"] == "10000"
        code, text = client.mail("alice@remote.test", ["SIZE=20000"])
        assert (code, text[:5]) == (552, b"5.3.4")
        client.mail("alice@remote.test")
        client.rcpt("user@example.com")
        code, text = client.data(b"Subject: big\r\n\r\n" + (b"y" * 900 + b"\r\n") * 12)
        assert (code, text[:5]) == (552, b"5.3.4")
        assert client.noop()[0] == 250  # and the session goes on
        assert client.sendmail("alice@remote.test", ["user@example.com"], MESSAGE) == {}
    assert len(node.files.stored("user@example.com")) == 1
    assert node.metric("mailnode_smtp_messages_rejected_total", listener="smtp", reason="message_too_big") == 2


def test_recipient_limit(node_factory: NodeFactory) -> None:
    node = node_factory([mailbox(f"u{i}@{DOMAIN}") for i in range(4)], smtp={"max_recipients": 3})
    with mx(node) as client:
        client.mail("alice@remote.test")
        assert [client.rcpt(f"u{i}@{DOMAIN}")[0] for i in range(3)] == [250, 250, 250]
        code, text = client.rcpt(f"u3@{DOMAIN}")
        assert (code, text[:5]) == (452, b"4.5.3")
        assert client.data(MESSAGE)[0] == 250
    assert [len(node.files.stored(f"u{i}@{DOMAIN}")) for i in range(4)] == [1, 1, 1, 0]


def test_line_too_long_in_data(node: RunningNode) -> None:
    with mx(node) as client:
        client.mail("alice@remote.test")
        client.rcpt("user@example.com")
        code, text = client.data(b"Subject: long\r\n\r\n" + b"z" * 2000 + b"\r\n")
        assert (code, text[:5]) == (500, b"5.5.2")
        assert client.sendmail("alice@remote.test", ["user@example.com"], MESSAGE) == {}
    assert len(node.files.stored("user@example.com")) == 1


@pytest.mark.parametrize(
    ("command", "code", "status"),
    [
        ("FOO bar", 500, b"5.5.2"),
        ("MAIL FROM:<unclosed", 501, b"5.1.7"),
        ("MAIL FROM:<a@b@c>", 501, b"5.1.7"),  # RFC 5321 §4.1.2; Postfix says the same
        ("MAIL TO:<x@y.test>", 501, b"5.5.4"),
        ("RCPT TO:<user@example.com>", 503, b"5.5.1"),
        ("DATA", 503, b"5.5.1"),
        ("MAIL FROM:<a@b.test> FOO=1", 555, b"5.5.4"),
        ("X" * 600, 500, b"5.5.2"),
    ],
)
def test_malformed_commands_are_answered_and_the_session_goes_on(
    node: RunningNode, command: str, code: int, status: bytes
) -> None:
    with mx(node) as client:
        got = client.docmd(command)
        assert (got[0], got[1][:5]) == (code, status)
        client.rset()
        assert client.sendmail("alice@remote.test", ["user@example.com"], MESSAGE) == {}


def test_pipelined_transaction(node: RunningNode) -> None:
    with socket.create_connection(("127.0.0.1", node.port("smtp")), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        sock.sendall(b"EHLO pipe.test\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
        sock.sendall(
            b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<user@example.com>\r\nRCPT TO:<nobody@example.com>\r\n"
            b"RCPT TO:<other@example.com>\r\nDATA\r\n"
        )
        replies = [reader.readline()[:9] for _ in range(5)]
        assert replies == [b"250 2.1.0", b"250 2.1.5", b"550 5.1.1", b"250 2.1.5", b"354 End d"]
        sock.sendall(MESSAGE + b".\r\nQUIT\r\n")
        assert reader.readline().startswith(b"250 2.0.0")
        assert reader.readline().startswith(b"221 2.0.0")
    assert len(node.files.stored("user@example.com")) == 1
    assert len(node.files.stored("other@example.com")) == 1


def test_smtputf8_and_8bit_content_are_stored_verbatim(node: RunningNode) -> None:
    content = "From: Zoë <zoë@remote.test>\r\nSubject: Grüße\r\n\r\nÄpfel und Birnen — 8 bit.\r\n".encode()
    with mx(node) as client:
        refused = client.sendmail(
            "zoë@remote.test", ["user@example.com"], content, mail_options=["SMTPUTF8", "BODY=8BITMIME"]
        )
        assert refused == {}
    [stored] = node.files.stored("user@example.com")
    assert stored.endswith(content)
    assert stored.startswith("Return-Path: <zoë@remote.test>".encode())


def test_idle_sessions_are_closed(node_factory: NodeFactory) -> None:
    node = node_factory(smtp={"idle_timeout": 0.3})
    with socket.create_connection(("127.0.0.1", node.port("smtp")), timeout=10) as sock:
        sock.recv(1024)  # greeting
        deadline = time.monotonic() + 10
        data = b"-"
        while data and time.monotonic() < deadline:
            data = sock.recv(1024)  # returns b"" once the server has closed the connection
        assert data == b""


def test_one_log_line_per_transaction(node: RunningNode, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailnode.smtp.server")
    with mx(node) as client:
        client.sendmail("alice@remote.test", ["user@example.com"], MESSAGE)
        client.mail("bob@remote.test")
        client.rcpt("nobody@example.com")
        client.rset()
    lines = [r.fields for r in caplog.records if r.getMessage() == "smtp transaction"]  # type: ignore[attr-defined]
    assert len(lines) == 2
    assert lines[0]["from"] == "alice@remote.test"
    assert lines[0]["recipients"] == ["user@example.com"]
    assert lines[0]["size"] == len(MESSAGE)
    assert lines[0]["result"].startswith("250 2.0.0 Ok: stored as " + lines[0]["id"])
    assert lines[1]["rejected"] == ["nobody@example.com"]
    assert lines[1]["result"] == "aborted: RSET"


def test_stopping_finishes_the_transaction_in_progress_then_says_421(node: RunningNode) -> None:
    idle = mx(node)
    busy = mx(node)
    busy.mail("alice@remote.test")
    busy.rcpt("user@example.com")
    stopping = threading.Thread(target=node.stop)
    stopping.start()
    deadline = time.monotonic() + 10
    while node.http_get("/readyz")[0] == 200 and time.monotonic() < deadline:
        time.sleep(0.02)  # stop() has begun once the node reports not ready; it waits for the busy session
    code, text = busy.data(MESSAGE)
    assert (code, text[:5]) == (250, b"2.0.0")  # the transaction in progress completes...
    stopping.join(15)
    assert not stopping.is_alive()
    assert busy.getreply()[:2] == (421, b"4.3.2 Service shutting down; try again later")  # ...then 421
    assert idle.getreply()[0] == 421
    assert len(node.files.stored("user@example.com")) == 1


@pytest.mark.parametrize(
    "content",
    [
        b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nRegards.\r\nend.\r\n",
        b"Subject: empty body\r\n\r\n",
        b"",
        b"\r\n",
        b"Subject: bare\nLF inside\r\n",
        b"Subject: long but legal\r\n\r\n" + b"w" * 998 + b"\r\n",
        b"Subject: big\r\n\r\n" + (b"0123456789" * 99 + b"\r\n") * 300,
    ],
)
def test_data_is_stored_exactly_as_sent(node: RunningNode, content: bytes) -> None:
    """smtplib dot-stuffs lines that start with a dot (RFC 5321 §4.5.2); the node must undo exactly that."""
    with mx(node) as client:
        client.mail("alice@remote.test")
        client.rcpt("user@example.com")
        assert client.data(content)[0] == 250
    [stored] = node.files.stored("user@example.com")
    expected = content if content.endswith(b"\r\n") else content + b"\r\n"  # smtplib ends the data with CRLF
    header_end = stored.index(b"\r\n", stored.index(b"\r\n\tby ")) + 2
    while stored[header_end : header_end + 1] == b"\t":
        header_end = stored.index(b"\r\n", header_end) + 2
    assert stored[header_end:] == expected  # everything after our trace headers


def test_data_split_across_many_packets(node: RunningNode) -> None:
    """The end-of-data marker found however the bytes arrive, one byte at a time included."""
    body = b"Subject: slow\r\n\r\nline one\r\n.stuffed\r\nlast.\r\n"
    wire = body.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    with socket.create_connection(("127.0.0.1", node.port("smtp")), timeout=10) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b"HELO slow.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
        assert [reader.readline()[:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
        for byte in wire:
            sock.sendall(bytes([byte]))
        assert reader.readline().startswith(b"250 2.0.0")
    [stored] = node.files.stored("user@example.com")
    assert stored.endswith(b"\r\n" + body.replace(b"\r\n..", b"\r\n."))
