"""Every SMTP reply the node sends, named, with its RFC 3463 enhanced status code.

aiosmtpd's own replies carry no enhanced codes; `enhance` gives them ours (RFC 2034 §3: once
ENHANCEDSTATUSCODES is advertised, every 2xx/4xx/5xx reply after EHLO carries one).
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Reply:
    code: int
    status: str  # RFC 3463 enhanced status code
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"

    def format(self, **values: object) -> str:
        return f"{self.code} {self.status} {self.text.format(**values)}"


OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient ok")
DELIVERED = Reply(250, "2.0.0", "Ok: stored as {id}")
BYE = Reply(221, "2.0.0", "Bye")

TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
MAILBOX_FULL = Reply(452, "4.2.2", "Mailbox full: {address} is over its quota")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error while storing the message; try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down; try again later")

BAD_COMMAND = Reply(500, "5.5.2", "Syntax error, command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long (RFC 5321 section 4.5.3.1.6: 1000 octets at most)")
SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
AUTH_NOT_HERE = Reply(502, "5.5.1", "AUTH is not offered on this port; use submission (587 or 465)")
MAILBOX_UNKNOWN = Reply(550, "5.1.1", "Mailbox unavailable: no such user {address}")
MAILBOX_DISABLED = Reply(550, "5.2.1", "Mailbox disabled: {address} is not accepting mail")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied: {address} is not a domain of this server")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address rejected: {address} is not owned by user {user}")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message too big for system (limit {limit} bytes)")
# RFC 5321 §4.1.2 (Path syntax); the codes and words are Postfix's.
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax: {address}")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax: {address}")
# RFC 6531 §3.5: a non-ASCII address in a transaction whose MAIL FROM did not say SMTPUTF8.
NON_ASCII_SENDER = Reply(553, "5.6.7", "Non-ASCII sender address not permitted without SMTPUTF8: {address}")
NON_ASCII_RECIPIENT = Reply(553, "5.6.7", "Non-ASCII recipient address not permitted without SMTPUTF8: {address}")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")

_CODE_DEFAULTS = {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}
_BY_CODE = {
    500: "5.5.2",
    501: "5.5.4",
    502: "5.5.1",
    503: "5.5.1",
    504: "5.5.4",
    530: "5.7.0",
    552: "5.3.4",
    553: "5.1.3",
    555: "5.5.4",
    554: "5.7.0",
    421: "4.3.2",
    451: "4.3.0",
}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
_PLAIN = re.compile(r"^(\d{3})([ -])(.*)$", re.S)


def enhance(line: str) -> str:
    """Add an enhanced status code to a bare 2xx/4xx/5xx reply line; leave others as they are."""
    if _HAS_ENHANCED.match(line):
        return line
    match = _PLAIN.match(line)
    if not match or line[0] not in "245":
        return line
    code, sep, text = match.groups()
    status = _BY_CODE.get(int(code), _CODE_DEFAULTS[int(code[0])])
    text = text.removeprefix("Error: ")
    return f"{code}{sep}{status} {text}"
