"""The node's SMTP listeners: inbound MX (smtp), submission (STARTTLS) and submissions (implicit TLS).

aiosmtpd parses the protocol; `MailSMTP` adds what it lacks (enhanced status codes on every reply,
PIPELINING and ENHANCEDSTATUSCODES in EHLO, AUTH only where it belongs), and `SMTPHandler` owns the
policy, in aiosmtpd's hooks: who may send, which recipients exist, size and quota, and delivery to
the store. A `250` after DATA is sent only once `MailStore.deliver` has returned: the message is on
disk, fsynced, and indexed. While a checkpoint holds the store's writes (docs/backups.md), MAIL FROM
and the end of DATA are answered `451 4.3.0` and nothing is stored: the client retries, as after any
4xx, and no SMTP session waits on the pause.

In a cluster (DESIGN.md "Clustering") the handler accepts mail for every mailbox of the domain: a
recipient homed on another node is handed to its home over LMTP before the `250` (mailnode.queue.handoff),
or put in this node's queue, routed to that home, when the home is down or slow; a permanent refusal by
the home becomes a bounce from the queue, as Postfix does after its queue. The policy for a recipient
(`_admit`) is the same code for SMTP and for the internal LMTP listener (mailnode.smtp.lmtp).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import enum
import inspect
import logging
import re
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import AnyStr

from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
    TLSSetupException,
    _AuthMechAttr,
    login_always_fail,
    syntax,
)

from mailnode import listener as door
from mailnode.auth import Authenticator
from mailnode.cluster import Cluster
from mailnode.config import Directory, MailboxEntry, NodeConfig
from mailnode.metrics import NodeMetrics
from mailnode.queue import handoff
from mailnode.queue.spool import Spool
from mailnode.smtp import replies
from mailnode.store.mailstore import Delivery, MailStore

log = logging.getLogger(__name__)

# docs/backups.md: the reply while a checkpoint holds writes (RFC 3463 4.3.0: other mail system status).
CHECKPOINT_IN_PROGRESS = replies.Reply(451, "4.3.0", "Checkpoint in progress, try again shortly")
# The connection gate's refusals (mailnode.listener), as the greeting: RFC 5321 §3.1 lets a server
# answer 421 instead of 220 and close; RFC 3463 4.7.0: other security or policy status.
TOO_MANY_FROM_CLIENT = replies.Reply(421, "4.7.0", "Too many connections from your address")
TOO_MANY_CONNECTIONS = replies.Reply(421, "4.7.0", "Too many connections, try again later")
# A peer handed over mail for a mailbox this node's directory homes elsewhere: the two directories
# differ for a moment (a move); temporary, so the peer's queue retries with its directory reloaded.
NOT_HOMED_HERE = replies.Reply(451, "4.3.0", "{address} is not stored on this node; try again later")


class Listener(enum.StrEnum):
    MX = "smtp"
    SUBMISSION = "submission"
    SUBMISSIONS = "submissions"
    LMTP = "lmtp"  # internal: mail handed over by the peer nodes (mailnode.smtp.lmtp)

    @property
    def is_submission(self) -> bool:
        return self in (Listener.SUBMISSION, Listener.SUBMISSIONS)

    @property
    def takes_auth(self) -> bool:
        """AUTH is offered: users on submission, the internal credential on LMTP; never on the MX port."""
        return self is not Listener.MX


class MailSession(Session):
    """Per connection (aiosmtpd's Session plus ours)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.user: MailboxEntry | None = None
        self.tls = False

    @property
    def client_ip(self) -> str:
        """The client's address: the one a PROXY header carried, else the socket's peer. It is what
        throttling, SPF, the logs and the Received header use."""
        return str(self.peer[0]) if self.peer else "unknown"


class MailEnvelope(Envelope):
    """Per transaction: MAIL FROM to the end of DATA (or RSET)."""

    def __init__(self) -> None:
        super().__init__()
        self.declared_size = 0
        self.targets: dict[str, MailboxEntry] = {}
        self.accepted: list[tuple[str, MailboxEntry]] = []  # each accepted RCPT of a mailbox, in order
        self.remote: list[str] = []  # recipients in other domains (submission only): the outbound queue
        self.rejected: list[tuple[str, str]] = []
        self.id = ""
        self.logged = False


def new_transaction_id() -> str:
    return f"{int(time.time() * 1000):x}{secrets.token_hex(3)}"


_SIZE_REJECTS = ("552 Error: Too much mail data", "552 Error: message size exceeds fixed maximum message size")
_LINE_REJECTS = ("500 Line too long (see RFC5321 4.5.3.1.6)",)
_UNPRINTABLE = re.compile(r"[^\x21-\x7e]")
_DATA_END = b".\r\n"
_DATA_READ_LIMIT = 64 * 1024

# RFC 5321 §4.1.2, the Path syntax, as RFC 6531 §3.3 extends it when the client says SMTPUTF8: atext,
# qtextSMTP and sub-domains may then hold UTF8-non-ascii (never a lone surrogate: those stand for bytes
# that were not UTF-8). No control character, NUL included, fits anywhere.
_UTF8 = "\u0080-\ud7ff\ue000-\U0010ffff"
_ATOM = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~{_UTF8}-]+"
_DOT_STRING = rf"{_ATOM}(?:\.{_ATOM})*"
_QUOTED_STRING = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e])*"'  # qtextSMTP / quoted-pairSMTP
_SUB_DOMAIN = rf"[A-Za-z0-9{_UTF8}](?:[A-Za-z0-9{_UTF8}-]*[A-Za-z0-9{_UTF8}])?"
_ADDRESS_LITERAL = r"\[(?:IPv6:)?[0-9A-Fa-f.:]+\]"
# Mailbox = Local-part "@" ( Domain / address-literal ); our policy adds that a domain has a dot in it.
_MAILBOX = rf"(?:{_DOT_STRING}|{_QUOTED_STRING})@(?:{_SUB_DOMAIN}(?:\.{_SUB_DOMAIN})+|{_ADDRESS_LITERAL})"
_IS_MAILBOX = re.compile(_MAILBOX)
# Path = "<" [ A-d-l ":" ] Mailbox ">" (the source route is accepted and ignored, §4.1.1.3 and §C), then
# the parameters after a space. Between the brackets anything but a bracket is taken here, so that the
# parameters (SMTPUTF8 among them) still count, and `path_refusal` judges the Mailbox. "<Postmaster>"
# needs no domain (§4.1.1.3); "<>" is the null reverse-path.
_ROUTE = rf"@{_SUB_DOMAIN}(?:\.{_SUB_DOMAIN})*"
_PATH = re.compile(
    rf"<(?:{_ROUTE}(?:,{_ROUTE})*:)?(?P<mailbox>[^<>]*)>(?P<rest>[ \t].*)?$"
    # Without angle brackets, as Postfix accepts by default (strict_rfc821_envelopes = no).
    rf"|(?P<bare>{_MAILBOX})(?P<bare_rest>[ \t].*)?$",
    re.S,
)


def path_refusal(address: str, *, smtputf8: bool) -> str | None:
    """Why a path from MAIL FROM or RCPT TO (as `MailSMTP._getaddr` returned it) cannot be taken:
    "8bit" for a non-ASCII address in a transaction without SMTPUTF8, "syntax" when it breaks the
    Path syntax; None when it is a Mailbox."""
    if not smtputf8 and not address.isascii():
        return "8bit"  # RFC 6531 §3.5: 553 5.6.7, raw 8-bit bytes and UTF-8 alike
    return None if _IS_MAILBOX.fullmatch(address) else "syntax"


def printable(address: str) -> str:
    """An address fit to quote in a reply: a refused path may hold NUL, controls or bytes that are not UTF-8."""
    return _UNPRINTABLE.sub("?", address)


_Tables = tuple[dict[str, tuple[str, bool]], list[str], list[str]]
_tables: dict[tuple[type, type], _Tables] = {}


def _class_tables(protocol: type[SMTP], handler: type) -> _Tables:
    """aiosmtpd's AUTH mechanism, handler hook and command tables, by name, for these classes."""
    if (protocol, handler) in _tables:
        return _tables[protocol, handler]
    auth: dict[str, tuple[str, bool]] = {}
    for owner, builtin in ((protocol, True), (handler, False)):  # the handler's mechanisms win, as in aiosmtpd
        for name, member in inspect.getmembers(owner):
            if name.startswith("auth_") and callable(member):
                mechanism = getattr(member, "__auth_mechanism_name__", name.replace("auth_", "").replace("__", "-"))
                auth[mechanism] = (name, builtin)
    hooks = [name.removeprefix("handle_") for name in dir(handler) if name.startswith("handle_")]
    commands = [name.removeprefix("smtp_") for name in dir(protocol) if name.startswith("smtp_")]
    _tables[protocol, handler] = auth, hooks, commands
    return auth, hooks, commands


class MailSMTP(SMTP):
    """One SMTP connection."""

    def __init__(
        self,
        handler: SMTPHandler,
        *,
        implicit_tls: bool,
        loop: asyncio.AbstractEventLoop,
        data_size_limit: int,
        hostname: str,
        tls_context: ssl.SSLContext | None,
        timeout: float,
        auth_required: bool,
        client: door.Client | None = None,
    ) -> None:
        # What aiosmtpd 1.4's SMTP.__init__ does for these settings, without its introspection:
        # it runs inspect.getmembers() on the connection and the handler and dir() on both, for every
        # connection, which cost more than the whole rest of a transaction. The tables it builds
        # depend only on the classes, so `_class_tables` builds them once.
        # tests/unit/test_smtp_init.py checks that the result matches aiosmtpd's own __init__.
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        self.__ident__ = "Mailfleet ESMTP"
        self.loop = loop
        self.event_handler = handler
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        self.command_size_limits.clear()
        self.hostname = hostname
        self.tls_context = tls_context
        self.require_starttls = False
        self._timeout_duration = timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        # An implicit-TLS connection is encrypted from its first byte: AUTH needs no STARTTLS first.
        self._auth_require_tls = not implicit_tls
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = auth_required
        auth, hooks, commands = _class_tables(type(self), type(handler))
        self._auth_methods = {
            mechanism: _AuthMechAttr(getattr(self if builtin else handler, name), builtin)
            for mechanism, (name, builtin) in auth.items()
        }
        self._handle_hooks = {hook: getattr(handler, f"handle_{hook}") for hook in hooks}
        self._ehlo_hook_ver = "new" if "EHLO" in hooks else None
        self._smtp_methods = {command: getattr(self, f"smtp_{command}") for command in commands}
        self._enforce_call_limit = False

        self.handler = handler
        self.implicit_tls = implicit_tls
        self._replying_to_hello = False
        self._greeted = False  # RFC 2034 §3: the greeting carries no enhanced code
        self._counted = False
        self.client = client  # None: the socket's peer (a connection made without mailnode.listener)

    def _create_session(self) -> MailSession:
        return MailSession(self.loop)

    def _create_envelope(self) -> MailEnvelope:
        return MailEnvelope()

    # Methods, not properties: aiosmtpd's __init__ runs inspect.getmembers(self), which reads properties.
    def mail_session(self) -> MailSession:
        assert isinstance(self.session, MailSession)
        return self.session

    def is_tls(self) -> bool:
        return self.implicit_tls or self._tls_protocol is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # a new session, after STARTTLS too (RFC 3207 §4.2)
        if self.client is None:
            self.client = door.Client.of_transport(transport)
        # aiosmtpd stores the transport's (host, port) tuple here, though it types `peer` as a str.
        self.mail_session().peer = self.client.peername  # type: ignore[assignment]
        self.mail_session().tls = self.is_tls()
        if not self._counted:  # called again after STARTTLS
            self._counted = True
            self.handler.session_opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self.handler.session_closed(self)
            if self.envelope is not None:
                self.handler.end_transaction(self.session, self.envelope, "aborted: connection closed")
        if self.client is not None:
            self.client.closed()
        super().connection_lost(error)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """(mailbox, parameters) of a MAIL FROM or RCPT TO argument, by RFC 5321 §4.1.2 (in place of
        aiosmtpd's RFC 5322 parser, which takes "<a@b" as "a@b" and costs more than the rest of MAIL).
        A path that breaks the syntax comes back whole, with no parameters, so that `SMTPHandler`
        refuses it with the command's own reply (501 5.1.7 or 501 5.1.3) and the session goes on."""
        text = arg.strip()
        match = _PATH.match(text)
        if match is None:
            return text, ""
        if match["bare"] is not None:
            return match["bare"], (match["bare_rest"] or "").strip()
        return match["mailbox"] or "<>", (match["rest"] or "").strip()

    async def smtp_DATA(self, arg: str) -> None:
        """DATA as aiosmtpd does it, but reading the message in large pieces instead of line by line."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        recipients = len(self.envelope.rcpt_tos)
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        content, too_big = await self._read_data()
        if too_big:
            status = replies.MESSAGE_TOO_BIG.format(limit=self.data_size_limit)
            self.handler.rejected("message_too_big")
            self.handler.end_transaction(self.session, self.envelope, status, too_big)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push_after_data(status, recipients)
            return
        # RFC 5321 §4.5.3.1.6: a line is at most 1000 octets with its CRLF (+1 for a transparent dot).
        if max(map(len, content.split(b"\r\n"))) > self.line_length_limit - 2:
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push_after_data(str(replies.LINE_TOO_LONG), recipients)
            return
        # RFC 5321 §4.5.2: a leading dot on a line is transparent.
        content = content.replace(b"\r\n.", b"\r\n")
        if content.startswith(b"."):
            content = content[1:]
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        # The envelope is reset before the reply is written: is_idle() relies on that order.
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push_after_data("250 OK" if status is MISSING else status, recipients)

    async def push_after_data(self, status: str, recipients: int) -> None:
        """The reply to the end of DATA: one for the message in SMTP (LMTP answers per recipient)."""
        await self.push(status)

    async def _read_data(self) -> tuple[bytes, int]:
        """Read up to the terminating CRLF.CRLF. Returns (raw data with its final CRLF, 0), or
        (b"", bytes read) when the data exceeded the size limit (it is read to the end regardless)."""
        reader = self._reader
        limit = self.data_size_limit or 0
        data = bytearray()
        total = 0
        too_big = False
        tail = b"\r\n"  # the data starts at the beginning of a line
        # StreamReader's limit is aiosmtpd's command line limit (a private attribute, as aiosmtpd itself
        # reaches into the reader); the message is read in larger pieces, each bounded by this limit.
        saved_limit = reader._limit  # type: ignore[attr-defined]
        reader._limit = _DATA_READ_LIMIT  # type: ignore[attr-defined]
        try:
            while True:
                try:
                    piece = await reader.readuntil(_DATA_END)
                except asyncio.LimitOverrunError as error:
                    piece = await reader.readexactly(error.consumed)
                    ends = False
                else:
                    # ".\r\n" ends the data only at the start of a line
                    ends = (tail + piece[:-3])[-2:] == b"\r\n"
                total += len(piece)
                tail = (tail + piece)[-2:]
                if not too_big:
                    data += piece
                    if limit and len(data) - 3 * ends > limit:
                        too_big = True
                        data.clear()
                if ends:
                    break
        finally:
            reader._limit = saved_limit  # type: ignore[attr-defined]
        if too_big:
            return b"", total - 3
        return bytes(data[:-3]), 0

    def is_idle(self) -> bool:
        """Between transactions: closing now loses nothing (a 250 is written before the reset)."""
        return self.envelope is None or not self.envelope.mail_from

    def shut_down(self) -> None:
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(f"{replies.SHUTTING_DOWN}\r\n".encode())
            transport.close()

    async def push(self, status: AnyStr) -> None:
        if not self._greeted:
            self._greeted = True
        elif isinstance(status, str) and not self._replying_to_hello:
            if status in _SIZE_REJECTS:
                status = replies.MESSAGE_TOO_BIG.format(limit=self.data_size_limit)
                self.handler.rejected("message_too_big")
                if self.envelope is not None and self.envelope.mail_from:
                    self.handler.end_transaction(self.session, self.envelope, status)
            elif status in _LINE_REJECTS:
                status = str(replies.LINE_TOO_LONG)
            else:
                status = replies.enhance(status)
        await super().push(status)

    async def handle_exception(self, error: Exception) -> str:
        """A STARTTLS whose handshake never completes is the client's doing (it left, or does not speak
        TLS): aiosmtpd closes the connection; one info line, not an error with a traceback. Anything
        else is a bug of ours, logged as aiosmtpd does."""
        if isinstance(error, TLSSetupException):
            client = self.mail_session().client_ip if self.session is not None else None
            cause = repr(error.__cause__)
            log.info("smtp starttls failed", extra={"fields": {"client": client, "error": cause}})
            return ""  # not sent: the connection is closed
        return await super().handle_exception(error)

    async def smtp_HELO(self, hostname: str) -> None:
        self._replying_to_hello = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._replying_to_hello = False

    async def smtp_EHLO(self, hostname: str) -> None:
        self._replying_to_hello = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._replying_to_hello = False

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if not arg and self.tls_context is not None:
            # RFC 3207 §4.2: what a client pipelined after STARTTLS is discarded (aiosmtpd clears it
            # once TLS is up). Cleared now as well, because a StreamReader holding more than its limit
            # has paused reading the socket (its flow control), and the TLS layer put in its place
            # would then never see the handshake nor the client leaving: the session would hang until
            # the idle timeout. The reader's internals, as aiosmtpd's own reach into them.
            self._reader._buffer.clear()  # type: ignore[attr-defined]
            self._reader._maybe_resume_transport()  # type: ignore[attr-defined]
        await super().smtp_STARTTLS(arg)

    async def smtp_AUTH(self, arg: str) -> None:
        if not self.handler.listener.takes_auth:
            await self.push(str(replies.AUTH_NOT_HERE))
            return
        await super().smtp_AUTH(arg)

    async def smtp_QUIT(self, arg: str) -> None:
        self.handler.end_transaction(self.session, self.envelope, "aborted: QUIT before DATA")
        await super().smtp_QUIT(arg)

    async def smtp_RSET(self, arg: str) -> None:
        self.handler.end_transaction(self.session, self.envelope, "aborted: RSET")
        await super().smtp_RSET(arg)


class SMTPHandler:
    """Policy and delivery for one listener (aiosmtpd handler hooks)."""

    def __init__(
        self,
        *,
        listener: Listener,
        config: NodeConfig,
        directory: Callable[[], Directory],
        store: MailStore,
        authenticator: Authenticator,
        metrics: NodeMetrics,
        spool: Spool | None = None,
        sign: Callable[[str, bytes], bytes] = lambda domain, message: b"",
        check_inbound: Callable[[str, str, str, bytes], Awaitable[bytes]] | None = None,
        queued: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
        cluster: Cluster | None = None,
        handoffs: handoff.Handoff | None = None,
    ) -> None:
        """`spool` takes submitted mail for other domains (and remote forward_to targets); `sign(domain,
        message)` returns the DKIM-Signature header for mail from that domain, or b"" without a key;
        `check_inbound(ip, helo, sender, message)` returns the Authentication-Results header for mail
        arriving on the MX listener. `cluster` says which mailboxes are stored here (None: all);
        `handoffs`, given with the spool, takes mail for the mailboxes homed elsewhere; without it such
        a recipient is refused (NOT_HOMED_HERE), as the LMTP listener does."""
        if handoffs is not None and spool is None:
            raise ValueError("hand-offs need the spool: what a home cannot take now waits there")
        self.listener = listener
        self._config = config
        self._directory = directory
        self._store = store
        self._authenticator = authenticator
        self._metrics = metrics
        self._spool = spool
        self._sign = sign
        self._check_inbound = check_inbound
        self._queued = queued  # told after each enqueue: the delivery worker starts at once
        self._clock = clock
        self._cluster = cluster
        self._handoffs = handoffs
        self.connections: set[MailSMTP] = set()

    # -- bookkeeping ---------------------------------------------------------------------------------

    def session_opened(self, connection: MailSMTP) -> None:
        self.connections.add(connection)
        self._metrics.smtp_sessions.labels(self.listener.value).inc()
        self._metrics.smtp_sessions_active.labels(self.listener.value).inc()

    def session_closed(self, connection: MailSMTP) -> None:
        self.connections.discard(connection)
        self._metrics.smtp_sessions_active.labels(self.listener.value).dec()

    def rejected(self, reason: str) -> None:
        self._metrics.messages_rejected.labels(self.listener.value, reason).inc()

    def _refuse(self, envelope: MailEnvelope, address: str, reply: replies.Reply, reason: str, **values: str) -> str:
        text = reply.format(address=address, **values)
        self.rejected(reason)
        envelope.rejected.append((address, text))
        return text

    def end_transaction(self, session: Session | None, envelope: Envelope | None, result: str, size: int = 0) -> None:
        """The one log line per transaction (a transaction that got as far as MAIL FROM)."""
        if not isinstance(envelope, MailEnvelope) or not isinstance(session, MailSession):
            return
        if not envelope.mail_from or envelope.logged:
            return
        envelope.logged = True
        fields = {
            "id": envelope.id,
            "listener": self.listener.value,
            "client": session.client_ip,
            "user": session.user.address if session.user else None,
            "from": envelope.mail_from,
            "recipients": list(envelope.rcpt_tos),
            "rejected": [address for address, _ in envelope.rejected],
            "size": size,
            "result": result,
        }
        log.info("smtp transaction", extra={"fields": fields})

    # -- hooks ---------------------------------------------------------------------------------------

    async def handle_EHLO(
        self, server: MailSMTP, session: MailSession, envelope: MailEnvelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if not self.listener.takes_auth:
            responses = [r for r in responses if not r[4:].startswith("AUTH")]
        # RFC 2920 PIPELINING and RFC 2034 ENHANCEDSTATUSCODES, which aiosmtpd supports but does not say.
        return [*responses[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(
        self, server: MailSMTP, session: MailSession, envelope: MailEnvelope, address: str, options: list[str]
    ) -> str:
        envelope.id = new_transaction_id()
        if self._store.fence.paused:
            self.rejected("checkpoint")
            return str(CHECKPOINT_IN_PROGRESS)
        if address == "<>":
            address = ""  # the null reverse-path of bounces (RFC 5321 §4.5.5)
        elif problem := path_refusal(address, smtputf8=envelope.smtp_utf8):
            self.rejected("bad_address")
            refusal = replies.NON_ASCII_SENDER if problem == "8bit" else replies.BAD_SENDER_SYNTAX
            return refusal.format(address=printable(address))
        if self.listener.is_submission:
            user = session.user
            if user is None:  # aiosmtpd's auth_required stops this earlier; keep the guard
                return str(replies.AUTH_REQUIRED)
            if address.lower() not in self._directory().addresses_of(user):
                self.rejected("sender_not_owned")
                return replies.SENDER_NOT_OWNED.format(address=address or "<>", user=user.address)
        for option in options:
            if option.startswith("SIZE="):
                envelope.declared_size = int(option[5:])
        envelope.mail_from = address or "<>"
        envelope.mail_options.extend(options)
        return str(replies.SENDER_OK)

    async def handle_RCPT(
        self, server: MailSMTP, session: MailSession, envelope: MailEnvelope, address: str, options: list[str]
    ) -> str:
        if address.lower() == "postmaster":  # RFC 5321 §4.5.1: accepted without a domain
            address = f"postmaster@{self._config.domains[0].domain}"
        if problem := path_refusal(address, smtputf8=envelope.smtp_utf8):
            refusal = replies.NON_ASCII_RECIPIENT if problem == "8bit" else replies.BAD_RECIPIENT_SYNTAX
            return self._refuse(envelope, printable(address), refusal, "bad_address")
        if len(envelope.rcpt_tos) >= self._config.smtp.max_recipients:
            return self._refuse(envelope, address, replies.TOO_MANY_RECIPIENTS, "too_many_recipients")
        directory = self._directory()
        resolution = directory.resolve(address)
        if resolution.kind == "foreign":
            if self.listener.is_submission and self._spool is not None:  # the outbound queue takes it
                envelope.rcpt_tos.append(address)
                envelope.rcpt_options.extend(options)
                envelope.remote.append(address)
                return str(replies.RECIPIENT_OK)
            return self._refuse(envelope, address, replies.RELAY_DENIED, "relay_denied")
        mailbox = resolution.mailbox
        if mailbox is None:
            return self._refuse(envelope, address, replies.MAILBOX_UNKNOWN, "unknown_mailbox")
        if (refused := self._admit(envelope, address, mailbox, envelope.declared_size)) is not None:
            return refused
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        envelope.targets[mailbox.address] = mailbox
        envelope.accepted.append((address, mailbox))
        return str(replies.RECIPIENT_OK)

    # RFC 3463 X.2.2. SMTP answers a full mailbox 452 (temporary: the client's queue retries); the LMTP
    # listener (mailnode.smtp.lmtp) answers 552.
    quota_reply = replies.MAILBOX_FULL

    def _admit(self, envelope: MailEnvelope, address: str, mailbox: MailboxEntry, size: int) -> str | None:
        """The policy for a recipient that is a mailbox of the directory, the same for SMTP and LMTP:
        not suspended; stored here (or, with hand-offs, at its home, which answers for its own quota at
        DATA); not over quota with `size` more bytes. The refusal text, counted, or None."""
        if mailbox.suspended:
            return self._refuse(envelope, address, replies.MAILBOX_DISABLED, "mailbox_disabled")
        if not self.is_here(mailbox):
            if self._handoffs is not None:
                return None
            return self._refuse(envelope, address, NOT_HOMED_HERE, "not_homed_here")
        if self._over_quota(mailbox, size):
            return self._refuse(envelope, address, self.quota_reply, "over_quota")
        return None

    def is_here(self, mailbox: MailboxEntry) -> bool:
        """The mailbox is stored on this node (every mailbox, on a node alone)."""
        return self._cluster is None or self._cluster.is_home(mailbox)

    def _over_quota(self, mailbox: MailboxEntry, incoming: int) -> bool:
        if not mailbox.quota:
            return False
        used = self._store.usage(mailbox.address).bytes
        return used >= mailbox.quota or used + incoming > mailbox.quota

    def _forward_targets(
        self, directory: Directory, mailboxes: list[MailboxEntry]
    ) -> tuple[list[MailboxEntry], list[str]]:
        """forward_to targets of the recipients' mailboxes (one level, as Postfix's .forward): local
        mailboxes, and remote addresses for the outbound queue."""
        local: list[MailboxEntry] = []
        remote: list[str] = []
        for mailbox in mailboxes:
            for target in mailbox.forward_to:
                resolution = directory.resolve(target)
                if resolution.mailbox is not None and not resolution.mailbox.suspended:
                    local.append(resolution.mailbox)
                elif resolution.kind == "foreign":
                    remote.append(target)
        return local, remote

    async def handle_DATA(self, server: MailSMTP, session: MailSession, envelope: MailEnvelope) -> str:
        content: bytes = envelope.original_content or b""
        size = len(content)
        mailboxes = list(envelope.targets.values())
        for mailbox in mailboxes:
            # a home elsewhere answers for its own quota, in its LMTP reply
            if self.is_here(mailbox) and self._over_quota(mailbox, size):
                reply = self._refuse(envelope, mailbox.address, self.quota_reply, "over_quota")
                self.end_transaction(session, envelope, reply, size)
                return reply
        directory = self._directory()
        targets = {m.address: m for m in mailboxes}
        forwarded: set[str] = set()  # forward_to targets: dropped, not bounced, when they cannot take it
        forward_local, forward_remote = self._forward_targets(directory, mailboxes)
        for forward in forward_local:
            if forward.address not in targets and not (self.is_here(forward) and self._over_quota(forward, size)):
                targets[forward.address] = forward
                forwarded.add(forward.address)
        remote = list(dict.fromkeys([*envelope.remote, *forward_remote])) if self._spool is not None else []
        single = envelope.rcpt_tos[0] if len(envelope.rcpt_tos) == 1 else None
        received = self._received_header(session, envelope, single)
        sender = "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)
        return_path = f"Return-Path: <{sender}>\r\n".encode("utf-8", errors="surrogateescape")
        results = b""
        if self._check_inbound is not None and not self.listener.is_submission:
            ip = session.client_ip
            try:
                results = await self._check_inbound(ip, session.host_name or "unknown", sender, content)
            except Exception:  # a check that breaks must not lose the message
                log.exception("inbound checks failed", extra={"fields": {"id": envelope.id}})
        # What a home node stores (it adds only Return-Path): the trace headers are added once, here.
        traced = results + received + content
        here = [address for address, mailbox in targets.items() if self.is_here(mailbox)]
        away: dict[int, list[str]] = {}
        for address, mailbox in targets.items():
            if not self.is_here(mailbox):
                away.setdefault(mailbox.home, []).append(address)
        deliveries = [Delivery(address=address, data=return_path + traced) for address in here]
        # Checked after the last await before the store (the hand-offs aside: once a home has the
        # message, the store and queue writes below wait out a checkpoint rather than refuse it): a
        # transaction ending now would wait for the checkpoint's whole hold; the client retries after a 451.
        if self._store.fence.paused:
            self.rejected("checkpoint")
            reply = str(CHECKPOINT_IN_PROGRESS)
            self.end_transaction(session, envelope, reply, size)
            return reply
        started = time.perf_counter()
        # One hand-off id for this message, kept with it in the queue: a retry of what the home stored
        # before (its 250 lost in a crash) is not stored again.
        hand_off_id = self._handoffs.id_for(envelope.id) if self._handoffs is not None else ""
        handed, waiting, refused = await self._hand_off(away, sender=sender, data=traced, id=hand_off_id)
        bounced = {address: answer for address, answer in refused.items() if address not in forwarded}
        for address in refused.keys() - bounced.keys():
            log.info(
                "forward target refused by its home; dropped",
                extra={"fields": {"id": envelope.id, "target": address, "reply": refused[address].text}},
            )
        if bounced and not (deliveries or remote or handed or waiting):
            # Nothing was taken: the client hears the home's refusal itself, and no bounce is needed.
            first = next(iter(bounced.values()))
            self.rejected("refused_by_home")
            self.end_transaction(session, envelope, first.text, size)
            return first.text
        try:
            # A mailbox frozen for a move (mailnode.move) takes no mail now (checked with no await before
            # the store): queued as a hand-off to its home, which the queue gives to the new home once
            # the move is done; 250 still means fsynced.
            for delivery in [d for d in deliveries if self._handoffs is not None and self._store.is_frozen(d.address)]:
                waiting.setdefault(targets[delivery.address].home, []).append(delivery.address)
                deliveries.remove(delivery)
            if deliveries:
                await self._store.deliver(deliveries)
            if remote and self._spool is not None:
                # RFC 6376: the signature covers what leaves, Received header included.
                outbound = received + content
                signature = self._sign(sender.rpartition("@")[2], outbound) if sender else b""
                await self._spool.enqueue(sender, remote, signature + outbound)
                self._queued()
            await self._queue_hand_offs(
                sender, traced, waiting=waiting, bounced=bounced, targets=targets, id=hand_off_id
            )
        except Exception as error:
            log.exception("delivery failed", extra={"fields": {"id": envelope.id, "error": str(error)}})
            self.rejected("store_error")
            reply = str(replies.LOCAL_ERROR)
            self.end_transaction(session, envelope, reply, size)
            return reply
        self._metrics.delivery_seconds.observe(time.perf_counter() - started)
        self._metrics.messages_accepted.labels(self.listener.value).inc()
        self._metrics.received_bytes.labels(self.listener.value).inc(size)
        reply = replies.DELIVERED.format(id=envelope.id)
        self.end_transaction(session, envelope, reply, size)
        return reply

    async def _hand_off(
        self, away: dict[int, list[str]], *, sender: str, data: bytes, id: str
    ) -> tuple[list[str], dict[int, list[str]], dict[str, handoff.Answer]]:
        """Give the message to each home node of `away` (ordinal -> mailbox addresses), at once.
        Returns (stored by their home, {home: addresses to queue for it}, {address: permanent refusal})."""
        handed: list[str] = []
        waiting: dict[int, list[str]] = {}
        refused: dict[str, handoff.Answer] = {}
        if not away or self._handoffs is None:
            return handed, waiting, refused
        homes = list(away)
        outcomes = await asyncio.gather(
            *(self._handoffs.send(home, sender=sender, recipients=away[home], data=data, id=id) for home in homes)
        )
        for home, answers in zip(homes, outcomes, strict=True):
            for address, answer in answers.items():
                if answer.delivered:
                    handed.append(address)
                    self._metrics.handoffs.labels("delivered").inc()
                elif answer.permanent:
                    refused[address] = answer
                    self._metrics.handoffs.labels("refused").inc()
                else:
                    waiting.setdefault(home, []).append(address)
                    self._metrics.handoffs.labels("queued").inc()
                    log.info(
                        "home node did not take the message now; queued for it",
                        extra={"fields": {"home": home, "recipient": address, "reply": answer.text}},
                    )
        return handed, waiting, refused

    async def _queue_hand_offs(
        self,
        sender: str,
        data: bytes,
        *,
        waiting: dict[int, list[str]],
        bounced: dict[str, handoff.Answer],
        targets: dict[str, MailboxEntry],
        id: str,
    ) -> None:
        """Queue what the homes could not take now (the queue's worker retries), and the recipients they
        refused for good, recorded failed so that the worker sends the sender one RFC 3464 bounce."""
        if self._spool is None:
            return
        for home, addresses in waiting.items():
            await self._spool.enqueue(sender, addresses, data, route=handoff.route_to(home), handoff=id)
        refusals: dict[int, list[str]] = {}
        for address in bounced:
            refusals.setdefault(targets[address].home, []).append(address)
        for home, addresses in refusals.items():
            message = await self._spool.enqueue(sender, addresses, data, route=handoff.route_to(home))
            for address in addresses:
                error = f"node {home}: {bounced[address].text}"
                await self._spool.record_attempt(
                    message.id, address, delivered=False, permanent=True, error=error, next_attempt=None
                )
        if waiting or refusals:
            self._queued()

    def _received_header(self, session: MailSession, envelope: MailEnvelope, recipient: str | None) -> bytes:
        """The Received header (RFC 5321 §4.4; "with" keywords from RFC 3848). Return-Path is added
        only at final delivery, into a mailbox."""
        helo = _UNPRINTABLE.sub("", session.host_name or "unknown")[:255] or "unknown"
        ip = session.client_ip
        protocol = "ESMTP" if session.extended_smtp else "SMTP"
        if session.tls:
            protocol += "S"
        if session.user is not None:
            protocol += "A"
        date = email.utils.format_datetime(email.utils.localtime(None))
        received = f"Received: from {helo} ([{ip}])\r\n\tby {self._config.hostname} (Mailfleet)"
        received += f" with {protocol} id {envelope.id}"
        if recipient:
            received += f"\r\n\tfor <{recipient}>"
        return f"{received}; {date}\r\n".encode("utf-8", errors="surrogateescape")

    # -- authentication (RFC 4954; PLAIN is RFC 4616) --------------------------------------------------

    async def auth_PLAIN(self, server: MailSMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = base64.b64decode(args[1], validate=True)
            except (binascii.Error, ValueError):
                await server.push("501 5.5.2 Cannot decode base64")
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await server.push("501 5.5.2 Cannot split the PLAIN response into authzid, authcid and password")
            return AuthResult(success=False, handled=True)
        return await self._login(server, parts[1], parts[2])

    async def auth_LOGIN(self, server: MailSMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await server.challenge_auth("Username:")
            if login is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                login = base64.b64decode(args[1], validate=True)
            except (binascii.Error, ValueError):
                await server.push("501 5.5.2 Cannot decode base64")
                return AuthResult(success=False, handled=True)
        password = await server.challenge_auth("Password:")
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._login(server, login, password)

    async def _login(self, server: MailSMTP, login: bytes, password: bytes) -> AuthResult:
        session = server.mail_session()
        remote = session.client_ip
        user = await self._authenticator.authenticate(
            login.decode("utf-8", "replace"), password.decode("utf-8", "replace"), remote=remote, protocol="smtp"
        )
        if user is None:
            log.info("smtp auth failed", extra={"fields": {"client": remote, "listener": self.listener.value}})
            return AuthResult(success=False, handled=False)
        session.user = user
        return AuthResult(success=True, auth_data=LoginPassword(login, b""))


def refusal(reason: str) -> bytes:
    """The line a client the connection gate refuses reads (mailnode.listener)."""
    reply = TOO_MANY_FROM_CLIENT if reason == door.PER_CLIENT else TOO_MANY_CONNECTIONS
    return f"{reply}\r\n".encode()


async def start_listener(
    *,
    listener: Listener,
    handler: SMTPHandler,
    config: NodeConfig,
    host: str,
    port: int,
    tls: ssl.SSLContext | None,
    gate: door.ConnectionGate,
    proxy: door.ProxyPolicy | None = None,
) -> asyncio.Server:
    """Serve one SMTP listener behind `gate` (and the PROXY protocol when `proxy` is given)."""
    implicit = listener is Listener.SUBMISSIONS
    loop = asyncio.get_running_loop()

    def factory(client: door.Client) -> MailSMTP:
        return MailSMTP(
            handler,
            implicit_tls=implicit,
            data_size_limit=config.smtp.max_message_size,
            hostname=config.hostname,
            tls_context=None if implicit else tls,
            timeout=config.smtp.idle_timeout,
            auth_required=listener.is_submission,
            loop=loop,
            client=client,
        )

    entrance = door.Door(gate=gate, protocol=factory, refusal=refusal, proxy=proxy, tls=tls if implicit else None)
    return await door.serve(entrance, host=host, port=port)
