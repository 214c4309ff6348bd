"""Every IMAP status response the node sends (OK, NO, BAD, BYE), named, with its response code, and
the continuation requests. The session and the command modules use them; data responses (FETCH,
LIST, SEARCH...) are built where their data is.

Response codes are those of RFC 3501 §7.1 and RFC 5530, plus the ones the extensions define
(UIDPLUS, CONDSTORE, RFC 7162 CLOSED). Templates are filled with `str.format` values.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Response:
    status: str  # OK, NO, BAD or BYE
    code: str | None  # the response code, without its brackets
    text: str

    def line(self, tag: str = "*", /, **values: object) -> str:
        """The response as a line (without CRLF): tagged when `tag` is a command's tag."""
        code = f"[{self.code.format(**values)}] " if self.code else ""
        return f"{tag} {self.status} {code}{self.text.format(**values)}"


class Refused(Exception):
    """Answer the command with this NO or BAD response, tagged, and go on with the session."""

    def __init__(self, response: Response, **values: object) -> None:
        super().__init__(response.line(**values))
        self.response = response
        self.values = values

    def line(self, tag: str) -> str:
        return self.response.line(tag, **self.values)


class Hangup(Exception):
    """End the session after sending this BYE."""

    def __init__(self, response: Response, **values: object) -> None:
        super().__init__(response.line(**values))
        self.response = response
        self.values = values

    def line(self) -> str:
        return self.response.line(**self.values)


# -- continuation requests (RFC 3501 §7.5) -------------------------------------------------------------

CONTINUE_LITERAL = "+ Ready for literal data"
CONTINUE_AUTHENTICATE = "+ "  # RFC 3501 §6.2.2: an empty challenge for PLAIN
CONTINUE_IDLE = "+ idling"

# -- OK ------------------------------------------------------------------------------------------------

OK_GREETING = Response("OK", "CAPABILITY {capabilities}", "{hostname} Mailfleet IMAP4rev1 ready")
OK_COMPLETED = Response("OK", None, "{command} completed")
OK_NOTHING_TO_DO = Response("OK", None, "{command} completed (nothing to do)")
OK_LOGGED_IN = Response("OK", "CAPABILITY {capabilities}", "Logged in")
OK_BEGIN_TLS = Response("OK", None, "Begin TLS negotiation now")
OK_IDLE_DONE = Response("OK", None, "IDLE terminated")
OK_CLOSED = Response("OK", "CLOSED", "Previous mailbox closed")  # RFC 7162 §3.2.11
OK_PERMANENTFLAGS = Response("OK", "PERMANENTFLAGS ({flags} \\*)", "Flags permitted")
OK_UNSEEN = Response("OK", "UNSEEN {seq}", "First unseen")
OK_UIDVALIDITY = Response("OK", "UIDVALIDITY {uidvalidity}", "UIDs valid")
OK_UIDNEXT = Response("OK", "UIDNEXT {uidnext}", "Predicted next UID")
OK_HIGHESTMODSEQ = Response("OK", "HIGHESTMODSEQ {modseq}", "Highest")  # RFC 7162 (CONDSTORE)
OK_SELECTED = Response("OK", "{access}", "{command} completed")  # access: READ-ONLY or READ-WRITE
OK_APPENDUID = Response("OK", "APPENDUID {uidvalidity} {uid}", "APPEND completed")  # RFC 4315 §3
OK_COPYUID = Response("OK", "COPYUID {uidvalidity} {sources} {destinations}", "{command} completed")
OK_MOVED = Response("OK", "COPYUID {uidvalidity} {sources} {destinations}", "Moved")  # RFC 6851 §4.3
OK_MODIFIED = Response("OK", "MODIFIED {numbers}", "Conditional STORE failed")  # RFC 7162 (CONDSTORE)

# -- NO ------------------------------------------------------------------------------------------------

NO_TOOBIG = Response("NO", "TOOBIG", "Literal too large (limit {limit} bytes)")
NO_BADCHARSET = Response("NO", "BADCHARSET ({supported})", "{error}")  # RFC 3501 §6.4.4
NO_SEARCH_LIMIT = Response("NO", "LIMIT", "Search took too long")  # RFC 5530 §3: over its CPU budget
NO_UNKNOWN_CTE = Response("NO", "UNKNOWN-CTE", "Unknown Content-Transfer-Encoding {encoding}")  # RFC 3516 §4.3
NO_FOLDER = Response("NO", None, "{error}")  # the store's FolderError, when it carries its own code
NO_NONEXISTENT = Response("NO", "NONEXISTENT", "{error}")
NO_NO_SUCH_MAILBOX = Response("NO", "NONEXISTENT", "No such mailbox: {mailbox}")
NO_NO_SUCH_QUOTA_ROOT = Response("NO", "NONEXISTENT", "No such quota root")
NO_SERVERBUG = Response("NO", "SERVERBUG", "Internal error; the administrator can find it in the node log")
NO_TLS_UNAVAILABLE = Response("NO", None, "TLS is not available (no certificate configured)")
NO_AUTHENTICATION_FAILED = Response("NO", "AUTHENTICATIONFAILED", "Authentication failed")
# RFC 5530 UNAVAILABLE: the password was right but the mailbox cannot be opened (full disk, I/O error).
NO_MAILBOX_UNAVAILABLE = Response("NO", "UNAVAILABLE", "Mailbox temporarily unavailable; try again later")
# RFC 5530 UNAVAILABLE: the password was right but the mailbox's home node (clustering) cannot be reached.
NO_HOME_UNAVAILABLE = Response("NO", "UNAVAILABLE", "Mailbox's node unavailable; try again later")
NO_LOGIN_BEFORE_TLS = Response("NO", "PRIVACYREQUIRED", "LOGIN is disabled before STARTTLS")
NO_AUTHENTICATE_BEFORE_TLS = Response("NO", "PRIVACYREQUIRED", "Authentication is disabled before STARTTLS")
NO_ONLY_PLAIN = Response("NO", "CANNOT", "Only AUTHENTICATE PLAIN is supported")
NO_INBOX_EXISTS = Response("NO", "ALREADYEXISTS", "INBOX always exists")
NO_MAILBOX_EXISTS = Response("NO", "ALREADYEXISTS", "Mailbox exists: {mailbox}")
NO_OVERQUOTA = Response("NO", "OVERQUOTA", "Mailbox is over its quota")
NO_QUOTA_READONLY = Response("NO", "NOPERM", "Quotas are set on the Mailbox resource, not over IMAP")
NO_READ_ONLY = Response("NO", "READ-ONLY", "Mailbox is read-only")
# What the store refuses (RFC 5530 codes): a name it cannot store, one too long, a full volume (Dovecot
# says OVERQUOTA for a full disk too).
NO_INVALID_MAILBOX_NAME = Response("NO", "CANNOT", "Invalid mailbox name: {error}")
NO_MAILBOX_NAME_TOO_LONG = Response("NO", "LIMIT", "Mailbox name too long: {error}")
NO_DISK_FULL = Response("NO", "OVERQUOTA", "The server's disk is full; expunge some mail to make room")

# -- BAD -----------------------------------------------------------------------------------------------

BAD_SYNTAX = Response("BAD", None, "{error}")  # what protocol.ProtocolError says
BAD_UNKNOWN_COMMAND = Response("BAD", None, "Unknown command {command}")
BAD_AUTHENTICATED = Response("BAD", None, "{command} is not valid once authenticated")
BAD_NOT_AUTHENTICATED = Response("BAD", None, "{command} needs authentication first (LOGIN or AUTHENTICATE)")
BAD_NOT_SELECTED = Response("BAD", None, "{command} needs a selected mailbox (SELECT or EXAMINE first)")
BAD_TLS_ACTIVE = Response("BAD", None, "TLS is already active")
BAD_LOGIN_ARGUMENTS = Response("BAD", None, "LOGIN takes a user name and a password")
BAD_AUTHENTICATE_CANCELLED = Response("BAD", None, "AUTHENTICATE cancelled")
BAD_PLAIN_BASE64 = Response("BAD", None, "Invalid base64 in the PLAIN response")
BAD_PLAIN_FIELDS = Response("BAD", None, "The PLAIN response must be authzid NUL authcid NUL password")
BAD_NEEDS_MAILBOX = Response("BAD", None, "{command} needs a mailbox name")
BAD_RENAME_ARGUMENTS = Response("BAD", None, "RENAME needs the old and the new name")
BAD_IDLE_DONE = Response("BAD", None, "Expected DONE to end IDLE")
BAD_NO_SUCH_MESSAGE = Response("BAD", None, "Invalid message sequence number: no such message")
BAD_UID_EXPUNGE_ARGUMENTS = Response("BAD", None, "UID EXPUNGE needs a UID set")
BAD_FETCH_ARGUMENTS = Response("BAD", None, "FETCH needs a sequence set and data items")
BAD_FETCH_ITEM = Response("BAD", None, "{item} is not supported")
BAD_QRESYNC_NOT_ENABLED = Response("BAD", None, "QRESYNC is not enabled (ENABLE QRESYNC first)")  # RFC 7162 §3.2.5
BAD_VANISHED = Response("BAD", None, "VANISHED needs UID FETCH and ENABLE QRESYNC")  # RFC 7162 §3.2.6
BAD_STORE_ARGUMENTS = Response("BAD", None, "STORE needs a sequence set, an action and flags")
BAD_COPY_ARGUMENTS = Response("BAD", None, "{command} needs a sequence set and a mailbox name")

# -- BYE -----------------------------------------------------------------------------------------------

BYE_LOGOUT = Response("BYE", None, "Logging out")
BYE_AUTOLOGOUT = Response("BYE", None, "Autologout; idle for too long")
BYE_LOGIN_TIMEOUT = Response("BYE", None, "Autologout; no login in time")
BYE_LINE_TOO_LONG = Response("BYE", None, "Line too long")
BYE_TOOBIG = Response("BYE", "TOOBIG", "Literal too large")  # RFC 7888 §4: cannot refuse a LITERAL+
# RFC 5530 UNAVAILABLE: temporary; a client reconnects (to another node of a cluster, or this one, back).
BYE_SHUTTING_DOWN = Response("BYE", "UNAVAILABLE", "Server shutting down; try again later")
# A proxied session whose home node went away without a BYE of its own (mailnode.imap.proxy).
BYE_HOME_UNAVAILABLE = Response("BYE", "UNAVAILABLE", "The mailbox's node is unavailable; reconnect later")
