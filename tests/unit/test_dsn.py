"""Bounces (RFC 3464 DSNs), read back with the email package as a mail client would: the report's
structure and headers, the delivery-status fields, the original's headers without its body, CRLF line
ends, the delayed variant, and which senders get no bounce at all."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import UTC, datetime
from email.message import EmailMessage, Message

import pytest

from mailnode.queue import dsn

ORIGINAL = (
    b"From: Alice <alice@example.com>\r\nTo: bob@remote.test, carol@remote.test\r\nSubject: quarterly figures\r\n"
    b"Date: Mon, 2 Nov 2026 10:00:00 +0000\r\nMessage-ID: <q1@example.com>\r\n\r\n"
    b"The secret body of the message.\r\n"
)
ARRIVAL = datetime(2026, 11, 2, 10, 0, 1, tzinfo=UTC)
NOW = datetime(2026, 11, 2, 10, 5, 0, tzinfo=UTC)
BOB = dsn.Failure(
    recipient="bob@remote.test",
    status="5.1.1",
    diagnostic="550-5.1.1 The account you tried to reach does not exist.\r\n550 5.1.1 Try double-checking it.",
    remote_mta="mx1.remote.test",
)
CAROL = dsn.Failure(recipient="carol@remote.test", status="5.4.4", diagnostic="Host or domain name not found")


def bounce(original: bytes = ORIGINAL, failures: list[dsn.Failure] | None = None, **kwargs: object) -> bytes:
    return dsn.build_bounce(
        original=original,
        sender="alice@example.com",
        reporting_mta="mail.example.com",
        failures=failures or [BOB, CAROL],
        arrival=ARRIVAL,
        now=NOW,
        **kwargs,  # type: ignore[arg-type]
    )


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(data: bytes) -> list[EmailMessage]:
    payload = parse(data).get_payload()
    assert isinstance(payload, list)
    return [part for part in payload if isinstance(part, EmailMessage)]


def explanation(data: bytes) -> str:
    text = parts(data)[0].get_content()
    assert isinstance(text, str)
    return text


def returned_headers(data: bytes) -> bytes:
    headers = parts(data)[2].get_payload(decode=True)
    assert isinstance(headers, bytes)
    return headers


def status_blocks(data: bytes) -> list[Message]:
    report = parts(data)[1]
    assert report.get_content_type() == "message/delivery-status"
    blocks = report.get_payload()
    assert isinstance(blocks, list)
    return [block for block in blocks if isinstance(block, Message)]


def test_bounce_is_a_delivery_status_report_to_the_sender() -> None:
    data = bounce()
    message = parse(data)
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@mail.example.com>"
    assert message["To"] == "alice@example.com"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["Date"].datetime == NOW
    assert re.fullmatch(r"<[^<>@\s]+@mail\.example\.com>", message["Message-ID"])
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert [part.get_content_type() for part in parts(data)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert message.defects == [] and all(part.defects == [] for part in parts(data))


def test_every_bounce_has_its_own_message_id() -> None:
    assert parse(bounce())["Message-ID"] != parse(bounce())["Message-ID"]


def test_explanation_names_each_recipient_and_the_remote_reply() -> None:
    text = explanation(bounce())
    assert "This is the mail system at mail.example.com." in text
    assert "<bob@remote.test>: host mx1.remote.test said:" in text
    assert "550-5.1.1 The account you tried to reach does not exist." in text
    assert "550 5.1.1 Try double-checking it." in text
    assert "<carol@remote.test>: reason:" in text and "Host or domain name not found" in text


def test_delivery_status_fields() -> None:
    message_fields, bob, carol = status_blocks(bounce())
    assert dict(message_fields.items()) == {
        "Reporting-MTA": "dns; mail.example.com",
        "Arrival-Date": "Mon, 02 Nov 2026 10:00:01 +0000",
    }
    assert dict(bob.items()) == {
        "Final-Recipient": "rfc822; bob@remote.test",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx1.remote.test",
        "Diagnostic-Code": (
            "smtp; 550-5.1.1 The account you tried to reach does not exist. 550 5.1.1 Try double-checking it."
        ),
        "Last-Attempt-Date": "Mon, 02 Nov 2026 10:05:00 +0000",
    }
    assert dict(carol.items()) == {
        "Final-Recipient": "rfc822; carol@remote.test",
        "Action": "failed",
        "Status": "5.4.4",
        "Diagnostic-Code": "smtp; Host or domain name not found",
        "Last-Attempt-Date": "Mon, 02 Nov 2026 10:05:00 +0000",
    }


def test_arrival_date_is_left_out_when_unknown() -> None:
    data = dsn.build_bounce(original=ORIGINAL, sender="alice@example.com", reporting_mta="m.test", failures=[BOB])
    message_fields, bob = status_blocks(data)
    assert dict(message_fields.items()) == {"Reporting-MTA": "dns; m.test"}
    assert "Last-Attempt-Date" in bob


def test_original_headers_are_returned_without_the_body() -> None:
    data = bounce()
    assert returned_headers(data) == ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"
    assert b"secret body" not in data


def test_original_with_bare_lf_and_long_or_8bit_headers() -> None:
    original = b"Subject: caf\xc3\xa9\nX-Long: " + b"x" * 1200 + b"\nFrom: a@example.com\n\nbody\n"
    data = bounce(original=original)
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    assert data.isascii()  # deliverable to a server without 8BITMIME
    assert returned_headers(data) == b"Subject: caf\xc3\xa9\r\nX-Long: " + b"x" * 1200 + b"\r\nFrom: a@example.com\r\n"


def test_lines_end_in_crlf_throughout() -> None:
    data = bounce()
    assert data.endswith(b"\r\n")
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")


def test_delayed_warning() -> None:
    late = dsn.Failure("bob@remote.test", "4.4.1", "connection timed out", None)
    data = bounce(failures=[late], delayed=True)
    message = parse(data)
    assert message["Subject"] == "Delayed Mail (still being retried)"
    _, bob = status_blocks(data)
    assert bob["Action"] == "delayed" and bob["Status"] == "4.4.1"
    assert "Remote-MTA" not in bob
    assert "not been delivered yet" in explanation(data)


def test_non_ascii_recipient_keeps_the_report_ascii() -> None:
    jorg = dsn.Failure("jörg@remote.test", "5.1.1", "550 5.1.1 unknown", "mx.remote.test")
    data = bounce(failures=[jorg])
    assert data.isascii()
    _, block = status_blocks(data)
    assert block["Final-Recipient"] == "utf-8; j\\x{F6}rg@remote.test"  # RFC 6533 utf-8-addr-xtext
    assert "<jörg@remote.test>" in explanation(data)


def test_a_bounce_needs_a_failure() -> None:
    with pytest.raises(ValueError):
        dsn.build_bounce(original=ORIGINAL, sender="alice@example.com", reporting_mta="m.test", failures=[])


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("alice@example.com", True),
        ("<alice@example.com>", True),
        ("daemon@example.com", True),
        ("", False),
        ("<>", False),
        ("MAILER-DAEMON@example.com", False),
        ("mailer-daemon@mail.example.com", False),
        ("MAILER-DAEMON", False),
    ],
)
def test_should_bounce(sender: str, expected: bool) -> None:
    assert dsn.should_bounce(sender) is expected
