"""Reply lines: aiosmtpd's bare replies gain RFC 3463 enhanced status codes; ours keep theirs."""

from __future__ import annotations

import pytest

from mailnode.smtp import replies


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("250 OK", "250 2.0.0 OK"),
        ("221 Bye", "221 2.0.0 Bye"),
        ("503 Error: need MAIL command", "503 5.5.1 need MAIL command"),
        ('500 Error: command "FOO" not recognized', '500 5.5.2 command "FOO" not recognized'),
        ("501 Syntax: MAIL FROM: <address>", "501 5.5.4 Syntax: MAIL FROM: <address>"),
        ("553 5.1.3 Error: malformed address", "553 5.1.3 Error: malformed address"),
        ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
        ("334 VXNlcm5hbWU6", "334 VXNlcm5hbWU6"),
        ("452 4.5.3 Too many recipients", "452 4.5.3 Too many recipients"),
    ],
)
def test_enhance(line: str, expected: str) -> None:
    assert replies.enhance(line) == expected


def test_named_replies_format() -> None:
    assert replies.MAILBOX_UNKNOWN.format(address="x@example.com").startswith("550 5.1.1 ")
    assert str(replies.OK) == "250 2.0.0 Ok"
