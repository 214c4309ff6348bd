"""Hand-off: mail for a mailbox homed on another node of the domain, given to that node over LMTP
(RFC 2033) on its internal port, authenticated with the domain's internal token. The SMTP handler
hands off before it answers DATA; the delivery worker (mailnode.queue.delivery) retries, from the
queue, what the home could not take then (route `node:<ordinal>`).

Every hand-off carries an id, the same for the attempt before SMTP's 250 and for each retry from the
queue (`Handoff.id_for`, kept in the spool entry): the first line of what is sent is the internal header
`X-Mailfleet-Handoff: <id>`, which the home's LMTP listener takes off (`untag`) and records with the
message, so that a retry of a hand-off it stored before (its 250 lost in a crash) is stored once only.
Only that first line is read, and only on the internal LMTP port: a client's own header of that name
lies below the accepting node's trace headers and is mail like any other.

`Handoff.send` never raises for the network: every recipient gets an `Answer`, a synthesised 4xx when
the home could not be reached, timed out, or broke off before answering for it.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import re
from collections.abc import Callable, Sequence

from mailnode.cluster import INTERNAL_USER, Cluster, UnknownPeer
from mailnode.config import Directory

log = logging.getLogger(__name__)

ROUTE_PREFIX = "node:"  # a queued recipient's route to its home: "node:1"
DEFAULT_TIMEOUT = 10.0  # seconds per step; then the message waits in the queue


HEADER = b"X-Mailfleet-Handoff"
_TAG = re.compile(rb"X-Mailfleet-Handoff:[ \t]*([0-9A-Za-z._-]{1,80})\r?\n", re.IGNORECASE)


def tag(id: str, data: bytes) -> bytes:
    """The message as handed to its home: the hand-off header on top."""
    return HEADER + b": " + id.encode("ascii") + b"\r\n" + data


def untag(data: bytes) -> tuple[str | None, bytes]:
    """(the hand-off id, the message without its header) when the first line is the hand-off header,
    else (None, the message as is)."""
    match = _TAG.match(data)
    if match is None:
        return None, data
    return match.group(1).decode("ascii"), data[match.end() :]


def route_to(ordinal: int) -> str:
    return f"{ROUTE_PREFIX}{ordinal}"


def ordinal_of(route: str) -> int | None:
    """The home ordinal of a hand-off route, None for any other route (outbound by domain)."""
    if route.startswith(ROUTE_PREFIX) and route[len(ROUTE_PREFIX) :].isdigit():
        return int(route[len(ROUTE_PREFIX) :])
    return None


@dataclasses.dataclass(frozen=True)
class Answer:
    """The home's reply for one recipient ("552 5.2.2 Mailbox full ..."), or ours when it gave none."""

    code: int
    text: str  # the whole reply, code included, lines joined by spaces

    @property
    def delivered(self) -> bool:
        return self.code // 100 == 2

    @property
    def permanent(self) -> bool:
        return self.code // 100 == 5

    @property
    def status(self) -> str:
        """The RFC 3463 code of the reply, or a default for its class."""
        parts = self.text.split()
        if len(parts) > 1 and parts[1][:1] in "245" and parts[1].count(".") == 2:
            return parts[1]
        return {2: "2.0.0", 5: "5.0.0"}.get(self.code // 100, "4.0.0")


class _Broken(Exception):
    """The session cannot go on; `answer` is what every recipient not yet answered gets."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.text)
        self.answer = answer


class Handoff:
    """Gives messages to their recipients' homes over LMTP. One per node, shared by SMTP and the queue."""

    def __init__(
        self,
        *,
        cluster: Cluster,
        directory: Callable[[], Directory],
        token: str,
        hostname: str,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.cluster = cluster
        self._directory = directory
        self._token = token
        self._hostname = hostname
        self._timeout = timeout

    def home_of(self, address: str) -> int | None:
        """The home ordinal the directory now in force gives this mailbox address (None: not a mailbox)."""
        resolution = self._directory().resolve(address)
        return None if resolution.mailbox is None else resolution.mailbox.home

    def id_for(self, local: str) -> str:
        """A hand-off id unique in the cluster: this node's ordinal and an id unique on this node (an
        SMTP transaction's, a queued message's)."""
        return f"{self.cluster.ordinal}.{local}"

    async def send(
        self, home: int, *, sender: str, recipients: Sequence[str], data: bytes, id: str
    ) -> dict[str, Answer]:
        """One LMTP transaction with node `home`: an Answer per recipient (RFC 2033 §4.2), 250 meaning
        the home has it on disk, now or from an earlier attempt with the same hand-off `id`. `sender`
        is "" for the null reverse-path."""
        data = tag(id, data)
        try:
            peer = self.cluster.peer(home)
        except UnknownPeer as error:
            answer = Answer(451, f"451 4.3.0 {error}")
            return dict.fromkeys(recipients, answer)
        where = f"node {home} ({peer.host}:{peer.lmtp})"
        answers: dict[str, Answer] = {}
        writer: asyncio.StreamWriter | None = None
        try:
            try:
                reader, opened = await asyncio.wait_for(asyncio.open_connection(peer.host, peer.lmtp), self._timeout)
            except (OSError, TimeoutError) as error:
                raise _Broken(Answer(421, f"421 4.4.1 cannot connect to {where}: {error or 'timed out'}")) from None
            writer = opened
            session = _Session(reader, opened, timeout=self._timeout, where=where)
            await session.transaction(
                hostname=self._hostname, token=self._token, sender=sender, recipients=recipients, data=data,
                answers=answers,
            )  # fmt: skip
        except _Broken as broken:
            for address in recipients:
                answers.setdefault(address, broken.answer)
        finally:
            if writer is not None:
                writer.close()
        return answers


class _Session:
    """One LMTP client session on asyncio streams (a few commands: no pipelining needed)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, timeout: float, where: str
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._timeout = timeout
        self._where = where

    async def transaction(
        self,
        *,
        hostname: str,
        token: str,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        answers: dict[str, Answer],
    ) -> None:
        await self._expect(await self._reply(), 2, "greeting")
        await self._expect(await self._command(f"LHLO {hostname}"), 2, "LHLO")
        # RFC 4954 with RFC 4616 PLAIN: authzid empty, authcid the internal user, the token as password.
        credential = base64.b64encode(f"\0{INTERNAL_USER}\0{token}".encode()).decode("ascii")
        auth = await self._command(f"AUTH PLAIN {credential}")
        if auth.code != 235:
            # A token the home does not know is a configuration matter: the mail waits, it does not bounce.
            raise _Broken(Answer(454, f"454 4.7.0 {self._where} refused the internal credential: {auth.text}"))
        utf8 = not (sender.isascii() and all(r.isascii() for r in recipients))
        options = f" SIZE={len(data)}" + (" SMTPUTF8" if utf8 else "")
        mail = await self._command(f"MAIL FROM:<{sender}>{options}")
        if mail.code // 100 != 2:
            for address in recipients:
                answers[address] = mail
            return
        accepted = []
        for address in recipients:
            reply = await self._command(f"RCPT TO:<{address}>")
            if reply.code // 100 == 2:
                accepted.append(address)
            else:
                answers[address] = reply
        if not accepted:
            await self._quit()
            return
        go_ahead = await self._command("DATA")
        if go_ahead.code != 354:
            for address in accepted:
                answers[address] = go_ahead
            return
        # RFC 5321 §4.5.2: a line starting with a dot gets another.
        body = data if data.endswith(b"\r\n") else data + b"\r\n"
        body = body.replace(b"\r\n.", b"\r\n..")
        if body.startswith(b"."):
            body = b"." + body
        self._writer.write(body + b".\r\n")
        await self._drain()
        # RFC 2033 §4.2: one reply per accepted recipient, in RCPT order; a break before one leaves
        # that recipient (and the rest) to _Broken's temporary answer.
        for address in accepted:
            answers[address] = await self._reply()
        await self._quit()

    async def _expect(self, reply: Answer, klass: int, step: str) -> None:
        if reply.code // 100 != klass:
            code = reply.code if reply.code // 100 == 4 else 451  # anything odd before MAIL: try again later
            raise _Broken(Answer(code, f"{code} 4.4.0 {self._where} at {step}: {reply.text}"))

    async def _command(self, line: str) -> Answer:
        self._writer.write(line.encode("utf-8", errors="surrogateescape") + b"\r\n")
        await self._drain()
        return await self._reply()

    async def _drain(self) -> None:
        try:
            await asyncio.wait_for(self._writer.drain(), self._timeout)
        except (OSError, TimeoutError) as error:
            raise _Broken(
                Answer(421, f"421 4.4.2 connection with {self._where} lost: {error or 'timed out'}")
            ) from None

    async def _reply(self) -> Answer:
        """One reply, multi-line ones joined (RFC 5321 §4.2.1)."""
        lines = []
        try:
            while True:
                raw = await asyncio.wait_for(self._reader.readline(), self._timeout)
                if not raw.endswith(b"\n"):
                    raise ConnectionResetError("connection closed")
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                lines.append(line)
                if len(line) < 4 or line[3] != "-":
                    break
        except (OSError, TimeoutError) as error:
            raise _Broken(
                Answer(421, f"421 4.4.2 connection with {self._where} lost: {error or 'timed out'}")
            ) from None
        code = lines[0][:3]
        if not code.isdigit():
            raise _Broken(Answer(451, f"451 4.4.0 {self._where} answered {lines[0][:80]!r}"))
        text = " ".join([lines[0], *(line[4:] for line in lines[1:])])
        return Answer(int(code), text)

    async def _quit(self) -> None:
        try:
            self._writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self._reader.readline(), self._timeout)
        except (OSError, TimeoutError):
            pass
