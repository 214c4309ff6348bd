"""The internal LMTP listener (RFC 2033) of a clustered node: mail for the mailboxes homed here, handed
over by the peer nodes that accepted it over SMTP (mailnode.queue.handoff is the client). Started by
mailnode.node only when `cluster.peers` lists more than one node, on `listen.lmtp`, never on the client
Service.

Every transaction needs the domain's internal credential first: AUTH PLAIN as `mailfleet-internal` with
the internal token as password, accepted without TLS on this port only (the NetworkPolicy admits only
the domain's own pods). Anything before it is answered 530, a wrong token 535, both counted in
`mailnode_lmtp_refused_total{reason}`.

The recipient policy is SMTP's own (`SMTPHandler._admit`: exists, not suspended, homed here, quota),
answered at RCPT; after DATA, one reply per accepted recipient (RFC 2033 §4.2), `250` only once the
store has the message fsynced. The message arrives with the accepting node's trace headers; the home
adds Return-Path only (final delivery, RFC 5321 §4.4), and does not expand forward_to (the accepting
node already gave each target its own copy).

The accepting node's hand-off id comes as the first line, `X-Mailfleet-Handoff:` (mailnode.queue.handoff):
taken off here, never stored, and given to the store, which stores a hand-off once per mailbox and
answers a retry of one it has as delivered (DESIGN.md "Clustering": every 250 arrives exactly once).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any

from aiosmtpd.smtp import AuthResult, LoginPassword, syntax

from mailnode import listener as door
from mailnode.cluster import INTERNAL_USER
from mailnode.config import NodeConfig
from mailnode.queue import handoff
from mailnode.smtp import replies
from mailnode.smtp.server import (
    CHECKPOINT_IN_PROGRESS,
    Listener,
    MailEnvelope,
    MailSession,
    MailSMTP,
    SMTPHandler,
    refusal,
)
from mailnode.store.mailstore import Delivery

log = logging.getLogger(__name__)

# RFC 3463 X.2.2, permanent here: the accepting node has already answered its client 250, so a
# temporary refusal would leave the message in a peer's queue for days with the sender told nothing.
# The accepting node bounces it instead, as Dovecot's LMTP does by default (quota_full_tempfail = no).
MAILBOX_FULL = replies.Reply(552, "5.2.2", "Mailbox full: {address} is over its quota")
NOT_LMTP = replies.Reply(500, "5.5.1", "This is an LMTP port (RFC 2033): say LHLO")
# A mailbox frozen for a move (mailnode.move): the peer's queue retries, and finds the new home then.
# RFC 3463 X.2.1: mailbox disabled, not accepting messages (here: for the moment).
MAILBOX_MOVING = replies.Reply(451, "4.2.1", "{address} is being moved; try again shortly")
# The headers of the accepting node come on top of what its client sent, which max_message_size bounds.
HEADER_ALLOWANCE = 64 * 1024


class MailLMTP(MailSMTP):
    """One LMTP connection from a peer node: LHLO instead of HELO/EHLO, replies per recipient after DATA."""

    def __init__(self, handler: LMTPHandler, **settings: Any) -> None:
        super().__init__(handler, **settings)
        self.__ident__ = "Mailfleet LMTP"
        # RFC 4954 §4 lets a server offer PLAIN without TLS; this port is internal (module docstring).
        self._auth_require_tls = False

    @syntax("LHLO hostname")
    async def smtp_LHLO(self, arg: str) -> None:
        """RFC 2033 §4.1: the LMTP greeting, EHLO's twin."""
        await super().smtp_EHLO(arg)

    async def smtp_HELO(self, hostname: str) -> None:
        await self.push(str(NOT_LMTP))

    async def smtp_EHLO(self, hostname: str) -> None:
        await self.push(str(NOT_LMTP))

    async def check_auth_needed(self, caller_method: str) -> bool:
        needed = await super().check_auth_needed(caller_method)
        if needed:
            self.handler._metrics.lmtp_refused.labels("no_auth").inc()
        return needed

    async def push_after_data(self, status: str, recipients: int) -> None:
        """RFC 2033 §4.2: one reply per accepted RCPT, in order. `LMTPHandler.handle_DATA` gives them
        joined by CRLF; a reply for the whole message (too big, a checkpoint) is repeated for each."""
        lines = status.split("\r\n")
        if len(lines) != recipients:
            lines = [lines[0]] * recipients
        for line in lines:
            await self.push(line)


class LMTPHandler(SMTPHandler):
    """Policy and delivery for the LMTP listener: SMTPHandler's, with the internal credential for AUTH
    and per-recipient delivery. Built without hand-offs: a recipient homed elsewhere is refused 451."""

    quota_reply = MAILBOX_FULL

    def __init__(self, *, token: str, **collaborators: Any) -> None:
        """`collaborators` are SMTPHandler's (config, directory, store, ..., cluster); `token` the internal one."""
        super().__init__(listener=Listener.LMTP, **collaborators)
        self._token = token.encode()

    async def _login(self, server: MailSMTP, login: bytes, password: bytes) -> AuthResult:
        if login.decode("utf-8", "replace") == INTERNAL_USER and hmac.compare_digest(password, self._token):
            return AuthResult(success=True, auth_data=LoginPassword(login, b""))
        self._metrics.lmtp_refused.labels("wrong_token").inc()
        return AuthResult(success=False, handled=False)  # 535 5.7.8

    async def handle_DATA(self, server: MailSMTP, session: MailSession, envelope: MailEnvelope) -> str:
        hand_off_id, content = handoff.untag(envelope.original_content or b"")
        size = len(content)
        if self._store.fence.paused:
            self.rejected("checkpoint")
            self._metrics.lmtp_deliveries.labels("deferred").inc(len(envelope.accepted))
            return str(CHECKPOINT_IN_PROGRESS)
        sender = "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)
        data = f"Return-Path: <{sender}>\r\n".encode("utf-8", errors="surrogateescape") + content
        answers: dict[str, str] = {}  # by mailbox: two RCPTs of one mailbox (an alias) get one copy
        for address, mailbox in envelope.accepted:
            if mailbox.address not in answers:
                refused = self._admit(envelope, address, mailbox, size)  # quota, now with the real size
                if not refused and self._store.is_frozen(mailbox.address):
                    refused = self._refuse(envelope, address, MAILBOX_MOVING, "mailbox_moving")
                answers[mailbox.address] = refused or ""
        deliveries = [
            Delivery(address=a, data=data, handoff=hand_off_id) for a, answer in answers.items() if not answer
        ]
        started = time.perf_counter()
        if deliveries:
            try:
                await self._store.deliver(deliveries)
            except Exception:  # each recipient answered 451: the peer's queue retries
                log.exception("lmtp delivery failed", extra={"fields": {"id": envelope.id}})
                self.rejected("store_error")
                for delivery in deliveries:
                    answers[delivery.address] = str(replies.LOCAL_ERROR)
            else:
                stored = replies.DELIVERED.format(id=envelope.id)
                for delivery in deliveries:
                    answers[delivery.address] = stored
                self._metrics.delivery_seconds.observe(time.perf_counter() - started)
                self._metrics.messages_accepted.labels(self.listener.value).inc()
                self._metrics.received_bytes.labels(self.listener.value).inc(size)
        lines = [answers[mailbox.address] for _, mailbox in envelope.accepted]
        for line in lines:
            result = "delivered" if line.startswith("2") else "refused" if line.startswith("5") else "deferred"
            self._metrics.lmtp_deliveries.labels(result).inc()
        self.end_transaction(session, envelope, " | ".join(dict.fromkeys(lines)), size)
        return "\r\n".join(lines)


async def start_listener(
    *, handler: LMTPHandler, config: NodeConfig, host: str, port: int, gate: door.ConnectionGate
) -> asyncio.Server:
    """Serve the LMTP listener behind `gate` (no TLS, no PROXY protocol: peers connect directly)."""
    loop = asyncio.get_running_loop()

    def factory(client: door.Client) -> MailLMTP:
        return MailLMTP(
            handler,
            implicit_tls=False,
            data_size_limit=config.smtp.max_message_size + HEADER_ALLOWANCE,
            hostname=config.hostname,
            tls_context=None,
            timeout=config.smtp.idle_timeout,
            auth_required=True,
            loop=loop,
            client=client,
        )

    entrance = door.Door(gate=gate, protocol=factory, refusal=refusal, proxy=None, tls=None)
    return await door.serve(entrance, host=host, port=port)
