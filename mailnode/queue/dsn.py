"""Bounce messages: RFC 3464 delivery status notifications for mail the queue could not deliver.

The queue calls `build_bounce` when it gives up on recipients (or, with `delayed=True`, to warn that
it is still trying) and delivers the result to the original sender with the null reverse-path
(`MAIL FROM:<>`, RFC 5321 §4.5.5), after asking `should_bounce` so that a bounce is never bounced.
Pure: bytes in, bytes out.
"""

from __future__ import annotations

import binascii
import dataclasses
import re
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from email import utils

SUBJECT_FAILED = "Undelivered Mail Returned to Sender"
SUBJECT_DELAYED = "Delayed Mail (still being retried)"

_LINE_END = re.compile(rb"\r\n|\r|\n")
_MAX_LINE = 998  # RFC 5322 §2.1.1, octets before CRLF
_FOLD_AT = 78


@dataclasses.dataclass(frozen=True)
class Failure:
    """One recipient the queue could not deliver to (yet).

    `status` is the RFC 3463 enhanced code ("5.1.1"), `diagnostic` the remote server's reply as
    received (all lines, e.g. "550 5.1.1 <bob@example.net>: no such user"), or the queue's own reason
    when no server answered; `remote_mta` the host that answered, when there was one.
    """

    recipient: str
    status: str
    diagnostic: str
    remote_mta: str | None = None


def should_bounce(sender: str) -> bool:
    """Whether a message from `sender` may be bounced: not from the null sender (bounces and other
    notifications, RFC 5321 §4.5.5 and RFC 3464 §2) and not from a MAILER-DAEMON (RFC 3834 §2: no
    automatic reply to automatic mail)."""
    address = sender.strip().strip("<>").strip()
    if not address:
        return False
    local = address.rpartition("@")[0] if "@" in address else address
    return local.lower() != "mailer-daemon"


def build_bounce(
    *,
    original: bytes,
    sender: str,
    reporting_mta: str,
    failures: Sequence[Failure],
    delayed: bool = False,
    arrival: datetime | None = None,
    now: datetime | None = None,
) -> bytes:
    """The complete notification (RFC 5322, CRLF line ends) to deliver to `sender`'s mailbox.

    multipart/report; report-type=delivery-status (RFC 6522) with three parts: an explanation for
    people, the machine-readable message/delivery-status (RFC 3464 §2), and the original message's
    header section as text/rfc822-headers (RFC 6522 §4), never its body. `delayed=True` makes the
    "still being retried" warning (RFC 3464 §2.3.3, Action: delayed) instead of the final failure.
    """
    if not failures:
        raise ValueError("a bounce needs at least one failed recipient")
    now = now or datetime.now(UTC)
    human = _explanation(reporting_mta=reporting_mta, failures=failures, delayed=delayed)
    status = _delivery_status(reporting_mta=reporting_mta, failures=failures, delayed=delayed, arrival=arrival, now=now)
    headers = _header_section(original)

    parts = [
        _part("text/plain", human),
        _part_bytes("message/delivery-status", status, "7bit"),
        _part("text/rfc822-headers", headers),
    ]
    boundary = _boundary(parts)
    top = [
        _field("From", f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"),
        _field("To", sender.strip().strip("<>")),  # UTF-8 for an SMTPUTF8 sender (RFC 6532 §3.2)
        _field("Subject", SUBJECT_DELAYED if delayed else SUBJECT_FAILED),
        _field("Date", utils.format_datetime(_aware(now))),
        _field("Message-ID", utils.make_msgid("bounce", domain=reporting_mta)),
        _field("Auto-Submitted", "auto-replied"),  # RFC 3834 §5: a reply to the original, made by machine
        _field("MIME-Version", "1.0"),
        b'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="' + boundary + b'"\r\n',
    ]
    out = [*top, b"\r\n", b"This is a MIME-encapsulated message.\r\n"]
    for part in parts:
        out += [b"\r\n--", boundary, b"\r\n", part]
    out += [b"\r\n--", boundary, b"--\r\n"]
    return b"".join(out)


def _explanation(*, reporting_mta: str, failures: Sequence[Failure], delayed: bool) -> str:
    if delayed:
        intro = [
            "Your message has not been delivered yet to the recipients below.",
            "The mail system keeps trying and will tell you if it gives up;",
            "you do not need to send the message again.",
        ]
    else:
        intro = [
            "Your message could not be delivered to the recipients below.",
            "The headers of your message are attached.",
        ]
    lines = [f"This is the mail system at {reporting_mta}.", "", *intro]
    for failure in failures:
        where = f"host {failure.remote_mta} said:" if failure.remote_mta else "reason:"
        lines += ["", f"<{failure.recipient}>: {where}"]
        lines += [f"    {line}" for line in _reply_lines(failure.diagnostic)]
    return "\n".join(lines) + "\n"


def _delivery_status(
    *, reporting_mta: str, failures: Sequence[Failure], delayed: bool, arrival: datetime | None, now: datetime
) -> bytes:
    # RFC 3464 §2.2: the per-message fields, then one block per recipient, blocks separated by a blank line
    message = [_field("Reporting-MTA", f"dns; {reporting_mta}")]
    if arrival is not None:
        message.append(_field("Arrival-Date", utils.format_datetime(_aware(arrival))))
    blocks = [b"".join(message)]
    for failure in failures:
        fields = [
            _field("Final-Recipient", _address_field(failure.recipient)),
            _field("Action", "delayed" if delayed else "failed"),
            _field("Status", failure.status),
        ]
        if failure.remote_mta:
            fields.append(_field("Remote-MTA", f"dns; {failure.remote_mta}"))
        reply = " ".join(_reply_lines(failure.diagnostic))
        if reply:
            fields.append(_field("Diagnostic-Code", f"smtp; {_ascii(reply)}"))
        fields.append(_field("Last-Attempt-Date", utils.format_datetime(_aware(now))))
        blocks.append(b"".join(fields))
    return b"\r\n".join(blocks)


def _header_section(original: bytes) -> bytes:
    """The original's header section, CRLF-terminated lines, without the blank line and body."""
    text = _LINE_END.sub(b"\r\n", original)
    if text.startswith(b"\r\n"):
        return b""
    end = text.find(b"\r\n\r\n")
    if end < 0:
        return text if text.endswith(b"\r\n") or not text else text + b"\r\n"
    return text[: end + 2]


def _part(content_type: str, content: str | bytes) -> bytes:
    data = content.encode("utf-8", "replace") if isinstance(content, str) else content
    data = _LINE_END.sub(b"\r\n", data)
    if data.isascii() and all(len(line) <= _MAX_LINE for line in data.split(b"\r\n")):
        charset = "us-ascii"
        encoding = "7bit"
    else:
        # keeps the whole bounce 7-bit, so the queue can hand it to any server (no 8BITMIME needed)
        charset = "utf-8"
        encoding = "quoted-printable"
        lines = data.split(b"\r\n")
        data = _LINE_END.sub(b"\r\n", b"\r\n".join(binascii.b2a_qp(line) for line in lines))  # soft breaks are LF
    if content_type == "text/plain":
        content_type = f"text/plain; charset={charset}"
    return _part_bytes(content_type, data, encoding)


def _part_bytes(content_type: str, data: bytes, encoding: str) -> bytes:
    head = _field("Content-Type", content_type) + _field("Content-Transfer-Encoding", encoding)
    if content_type.startswith("text/plain"):
        head += _field("Content-Description", "Notification")
    return head + b"\r\n" + data


def _boundary(parts: Sequence[bytes]) -> bytes:
    while True:
        boundary = f"=_bounce_{secrets.token_hex(12)}".encode()
        if not any(boundary in part for part in parts):
            return boundary


def _field(name: str, value: str) -> bytes:
    """One header field, folded at spaces to keep lines short (RFC 5322 §2.2.3)."""
    line = f"{name}: "
    lines: list[str] = []
    for word in value.split(" "):
        if len(line) + len(word) > _FOLD_AT and line.strip() and not line.endswith(": "):
            lines.append(line.rstrip(" "))
            line = " "
        line += word + " "
    lines.append(line.rstrip(" "))
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def _reply_lines(diagnostic: str) -> list[str]:
    return [line.strip() for line in diagnostic.splitlines() if line.strip()]


def _address_field(address: str) -> str:
    # RFC 6533 §3: an address that is not ASCII goes in a delivery-status field as utf-8-addr-xtext
    if address.isascii():
        return f"rfc822; {address}"
    encoded = "".join(c if "!" <= c <= "~" and c not in "\\+=" else f"\\x{{{ord(c):X}}}" for c in address)
    return f"utf-8; {encoded}"


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
