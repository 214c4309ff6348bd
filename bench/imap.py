"""The IMAP benchmark: the node's IMAP listener against a private Dovecot on this machine.

Both servers hold the same `--messages`-message mailbox (generated deterministically from `--seed`:
text/plain, multipart/alternative, some with a base64 attachment, 2-50 KiB) in a Maildir, and get the
same load: `--sessions` concurrent sessions, each repeating `--cycles` times the cycle LOGIN, SELECT
INBOX, UID FETCH 1:* (FLAGS RFC822.SIZE ENVELOPE BODYSTRUCTURE), 50 UID FETCH BODY.PEEK[] of random
messages, 5 UID STORE +FLAGS (\\Seen), 3 UID SEARCH (UNSEEN, FROM, SUBJECT), APPEND, LOGOUT over a new
connection to 127.0.0.1 with STARTTLS (a self-signed certificate made with openssl, served by both; a
session's next connection offers its last TLS session again, as mail clients do). Every command counts as
one operation; operations/s = operations / wall time; the report ends with each command's median on the
node against Dovecot's. Then `--idle-sessions` sessions (`--dovecot-idle-sessions` on Dovecot, whose
sessions cost two processes each) STARTTLS, LOGIN, SELECT and IDLE, and the servers' memory is read from
/proc (the open-files limit raised for them).

The node gets its mailbox over its SMTP MX port (the real delivery path) and fsyncs what it stores;
Dovecot gets the same messages written into its Maildir before it starts (indexed on the first SELECT)
and `mail_fsync = always`. LOGIN checks the node's argon2id hash on both servers (Dovecot verifies the
very same hash string, in its single auth process), unless `--dovecot-password plain`; both are set to
remember a successful login for 5 minutes (the node's auth.cache_ttl default; Dovecot's auth_cache_size
and auth_cache_ttl; the LOGIN latencies show whether a server still verifies each time). One warm-up
session per server before the timed run. The client is one asyncio process; its CPU time is reported
next to the servers' to show it is not the bottleneck.

That timed run is a closed loop: each session sends its next command as soon as the last is answered, so it
measures throughput, and the faster server carries more load (its medians include the queueing that load
makes). Then a paced run (`--paced-rate` commands/s over all sessions, `--paced-cycles` cycles) gives both
servers the very same load, each session's commands at fixed times, below what either serves at most: its
medians compare the commands at equal load. A command whose time came while the last was still unanswered
starts as soon as it is answered, and is counted late (the server did not keep the pace).

The node side is configured through `listen.imap`, `tls`, `listen.limits.imap` and `listen.limits.imaps` in its config;
a node whose config refuses these keys, or with nothing answering on that port, is skipped ("node has no
IMAP listener yet"), not failed. Everything lives in one temporary directory, removed at the end; every
process started here is stopped, also on error or interrupt. The Dovecot side needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import dataclasses
import datetime
import email.utils
import os
import quopri
import random
import re
import resource
import signal
import smtplib
import ssl
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from bench import common, dovecot
from bench.common import DOMAIN, HOST, RECIPIENT, SENDER, BenchError
from bench.outbound import make_certificate
from mailnode import passwords

PASSWORD = "bench"
COMMAND_TIMEOUT = 120.0  # seconds for one IMAP command (the first full FETCH on a cold index is the slowest)
IMAP_GRACE = 5.0  # seconds the node's IMAP port may take to answer once the node is ready
SMTP_SESSIONS = 10  # parallel SMTP sessions delivering the node's mailbox
IDLE_SETTLE = 2.0  # seconds between the last session entering IDLE and reading the memory
IDLE_GOAL = 2**30  # the node's RSS with 10,000 sessions in IDLE (issue 17): at most 1 GiB, baseline included
IDLE_GOAL_SESSIONS = 10_000
IMAPS_LIMIT = 16  # the node's imaps listener, which the bench does not use
LINE_LIMIT = 4 * 1024 * 1024  # the client's longest response line (a FETCH line with a BODYSTRUCTURE)
READ_SIZE = 256 * 1024  # bytes the client asks the socket for at a time
LAG_TICK = 0.01  # seconds between the client's samples of its own event loop's lag
MEDIAN_GOAL = 3.0  # no command more than this many times slower than Dovecot at the median (issue 17)

BODY_FETCHES = 50
STORES = 5
SEARCHES = 3
COMMANDS_PER_CYCLE = 3 + BODY_FETCHES + STORES + SEARCHES + 2  # LOGIN SELECT FETCH-all ... APPEND LOGOUT
SUMMARY_ITEMS = "(FLAGS RFC822.SIZE ENVELOPE BODYSTRUCTURE)"

# The latency table's rows, in cycle order ("connect" is the TCP connection and the greeting: no command).
KINDS = ("connect", "LOGIN", "SELECT", "FETCH 1:*", "FETCH BODY[]", "STORE", "SEARCH", "APPEND", "LOGOUT")
# SEARCH's rows again, one per search of the cycle (its first key), after the table's other rows.
SEARCH_KINDS = ("SEARCH UNSEEN", "SEARCH FROM", "SEARCH SUBJECT")


class Skipped(Exception):
    """A server that cannot be benchmarked yet (the node without its IMAP listener): not a failure."""


@dataclasses.dataclass(frozen=True)
class Load:
    messages: int
    sessions: int
    cycles: int
    idle_sessions: int  # the node's sessions in IDLE
    dovecot_idle_sessions: int  # Dovecot's: two processes each (imap-login for TLS, imap), hence fewer
    seed: int
    timeout: float  # seconds for each phase: preload, workload, opening the idle sessions
    paced_rate: float = 0.0  # commands/s over all sessions in the paced run; 0: none
    paced_cycles: int = 0


# ---------------------------------------------------------------------------------------------------
# The mailbox: deterministic, varied messages


@dataclasses.dataclass(frozen=True)
class Corpus:
    messages: list[bytes]  # CRLF line ends, as SMTP and APPEND carry them
    appends: list[bytes]  # what the sessions APPEND (matching neither search term)
    from_term: str
    subject_term: str
    from_hits: int  # messages of `messages` whose From contains from_term (case-insensitive)
    subject_hits: int  # ... whose decoded Subject contains subject_term

    @property
    def size(self) -> int:
        return sum(len(message) for message in self.messages)


FIRST_NAMES = (
    "Anna", "Ben", "Clara", "David", "Elif", "Farid", "Greta", "Hannes", "Ines", "Jonas", "Kemal", "Lea",
    "Mira", "Noah", "Olga", "Paul", "Rosa", "Sven", "Tara", "Yusuf",
)  # fmt: skip
LAST_NAMES = (
    "Albrecht", "Berger", "Costa", "Dietrich", "Eriksen", "Fischer", "Gruber", "Hoffmann", "Ivanova", "Jansen",
    "Keller", "Lindqvist", "Moreau", "Novak", "Okafor", "Peters", "Quist", "Richter", "Santos", "Weber",
)  # fmt: skip
NON_ASCII_NAMES = ("Jürgen Müller", "Zoë Dubois", "Søren Kjær", "Ana Muñoz", "Çağla Öztürk")
SENDER_DOMAINS = ("example.com", "example.net", "example.org", "mail.example.de", "lists.example.net")
FROM_TERM = "vogelsang"  # the one sender whose address and name contain it
TERM_SENDER = ("Vera Vogelsang", "vera.vogelsang@lists.example.net")
TOPICS = (
    "budget review", "release planning", "server migration", "team offsite", "quarterly numbers",
    "contract renewal", "hiring update", "backup policy", "conference travel", "customer feedback",
    "security audit", "office move", "roadmap draft", "support ticket", "training schedule",
)  # fmt: skip
SUBJECT_TERM = "invoice"  # only the "Invoice ..." subjects contain it
SUBJECTS = (
    "{topic}", "Re: {topic}", "Fwd: {topic}", "Re: Re: {topic}", "{Topic} - follow-up", "Question about the {topic}",
    "Notes from the {topic} meeting", "Invoice {number} for {month}", "Reminder: {topic} on {weekday}",
    "[announce] {Topic}",
)  # fmt: skip
NON_ASCII_SUBJECTS = ("Grüße aus {city}", "Café am {weekday}?", "Résumé: {topic}", "Überprüfung Nr. {number}")
CITIES = ("München", "Zürich", "Malmö", "Köln", "Genève")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
WORDS = (
    "the", "a", "we", "you", "they", "it", "is", "are", "was", "will", "can", "should", "have", "need", "see",
    "send", "check", "review", "update", "plan", "meeting", "report", "server", "team", "project", "budget",
    "week", "month", "today", "tomorrow", "customer", "change", "release", "draft", "version", "number",
    "question", "answer", "problem", "solution", "time", "date", "list", "file", "document", "backup", "disk",
    "network", "office", "travel", "schedule", "agenda", "notes", "point", "idea", "proposal", "contract",
    "and", "or", "but", "so", "if", "when", "before", "after", "with", "without", "for", "from", "to", "about",
    "new", "old", "next", "last", "first", "final", "quick", "short", "long", "open", "closed", "small", "large",
    "please", "thanks", "again", "also", "still", "already", "soon", "later", "maybe", "probably", "clearly",
)  # fmt: skip
NON_ASCII_WORDS = ("Grüße", "Straße", "Übersicht", "größer", "déjà", "café", "naïve", "Ångström", "señor", "€", "½")
MAILERS = ("Thunderbird 115.8.0", "Apple Mail (2.3774)", "Microsoft Outlook 16.0", "K-9 Mail 6.800", "mutt 2.2.12")


def _paragraph(rng: random.Random, *, non_ascii: bool) -> str:
    """A paragraph of 2-6 sentences wrapped at 72 columns, LF line ends."""
    words: list[str] = []
    for _ in range(rng.randint(2, 6)):
        sentence = [rng.choice(WORDS) for _ in range(rng.randint(6, 18))]
        if non_ascii:
            sentence[rng.randrange(len(sentence))] = rng.choice(NON_ASCII_WORDS)
        sentence[0] = sentence[0].capitalize()
        sentence[-1] += rng.choice(".....?!")
        words += sentence
    lines: list[str] = []
    line = ""
    for word in words:
        if line and len(line) + 1 + len(word) > 72:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class _Pool:
    plain: list[str]  # 7-bit paragraphs
    qp: list[str]  # non-ASCII paragraphs, quoted-printable encoded (QP works line by line)


def _pool(rng: random.Random) -> _Pool:
    plain = [_paragraph(rng, non_ascii=False) for _ in range(400)]
    qp = [quopri.encodestring(_paragraph(rng, non_ascii=True).encode()).decode("ascii").rstrip("\n") for _ in range(60)]
    return _Pool(plain, qp)


def _encoded_word(text: str) -> str:
    """RFC 2047 (base64) for a header text that is not ASCII."""
    if text.isascii():
        return text
    return f"=?utf-8?b?{base64.b64encode(text.encode()).decode('ascii')}?="


def _text(rng: random.Random, pool: _Pool, budget: int, *, non_ascii: bool) -> list[str]:
    paragraphs: list[str] = []
    length = 0
    while length < budget:
        paragraph = rng.choice(pool.qp) if non_ascii and rng.random() < 0.5 else rng.choice(pool.plain)
        paragraphs.append(paragraph)
        length += len(paragraph) + 2
    return paragraphs


def _plain_part(paragraphs: list[str], signature: str, *, qp: bool) -> str:
    encoding = "quoted-printable" if qp else "7bit"
    signature = f"-- \n{signature}\n"
    if qp:
        signature = quopri.encodestring(signature.encode()).decode("ascii")
    body = "\n\n".join(paragraphs) + "\n\n" + signature
    return f"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: {encoding}\n\n{body}"


def _html_part(paragraphs: list[str], *, qp: bool) -> str:
    encoding = "quoted-printable" if qp else "7bit"
    charset = "=3D" if qp else "="  # "=" is the escape character of quoted-printable
    body = "\n".join(f"<p>{paragraph}</p>" for paragraph in paragraphs)
    return (
        f"Content-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: {encoding}\n\n"
        f'<html><head><meta http-equiv{charset}"Content-Type" content{charset}"text/html; charset{charset}utf-8">'
        f"</head>\n<body>\n{body}\n</body></html>\n"
    )


def _multipart(subtype: str, boundary: str, parts: list[str]) -> str:
    inner = "".join(f"--{boundary}\n{part}\n" for part in parts)
    preamble = "This is a multi-part message in MIME format."
    return f'Content-Type: multipart/{subtype}; boundary="{boundary}"\n\n{preamble}\n\n{inner}--{boundary}--\n'


def build_message(
    rng: random.Random, pool: _Pool, index: int, *, sender: tuple[str, str] | None = None, subject: str | None = None
) -> tuple[bytes, str, str]:
    """One message (CRLF) and its From and decoded Subject, sized 2-50 KiB (log-uniform)."""
    if sender is None:
        if rng.random() < 0.04:
            sender = TERM_SENDER
        elif rng.random() < 0.1:
            name = rng.choice(NON_ASCII_NAMES)
            sender = (name, f"{rng.choice(FIRST_NAMES).lower()}.{index % 7}@{rng.choice(SENDER_DOMAINS)}")
        else:
            first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
            sender = (f"{first} {last}", f"{first}.{last}@{rng.choice(SENDER_DOMAINS)}".lower())
    if subject is None:
        values = {
            "topic": rng.choice(TOPICS), "number": str(rng.randint(1000, 99999)), "month": rng.choice(MONTHS),
            "weekday": rng.choice(WEEKDAYS), "city": rng.choice(CITIES),
        }  # fmt: skip
        values["Topic"] = values["topic"].capitalize()
        template = rng.choice(NON_ASCII_SUBJECTS) if rng.random() < 0.1 else rng.choice(SUBJECTS)
        subject = template.format(**values)
    name, address = sender
    domain = address.rpartition("@")[2]
    date = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(
        seconds=index * 3 * 3600 + rng.randrange(3 * 3600)
    )
    relay = f"mail{rng.randint(1, 9)}.{domain}"
    headers = [
        f"Received: from {relay} ({relay} [192.0.2.{rng.randint(1, 254)}])\n"
        f"\tby mx.{DOMAIN} with ESMTPS id {rng.getrandbits(40):010X}\n"
        f"\tfor <{RECIPIENT}>; {email.utils.format_datetime(date)}",
        f"Date: {email.utils.format_datetime(date)}",
        f"From: {_encoded_word(name)} <{address}>",
        f"To: Bench User <{RECIPIENT}>",
    ]
    if rng.random() < 0.2:
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        headers.append(f"Cc: {first} {last} <{first.lower()}.{last.lower()}@example.com>")
    headers.append(f"Subject: {_encoded_word(subject)}")
    headers.append(f"Message-ID: <{rng.getrandbits(64):016x}.{index}@{domain}>")
    if subject.startswith("Re:"):
        parent = f"<{rng.getrandbits(64):016x}@{domain}>"
        headers += [f"In-Reply-To: {parent}", f"References: {parent}"]
    if rng.random() < 0.5:
        headers.append(f"User-Agent: {rng.choice(MAILERS)}")
    headers.append("MIME-Version: 1.0")
    target = int(2048 * 25 ** rng.random())  # 2 KiB .. 50 KiB
    kind = rng.random()
    attachment = ""
    if kind >= 0.8:
        size = rng.randint(2048, 8192)
        filename, mime = rng.choice(
            (("scan-{}.pdf", "application/pdf"), ("photo-{}.png", "image/png"), ("data-{}.zip", "application/zip"))
        )
        filename = filename.format(index)
        encoded = base64.encodebytes(rng.randbytes(size)).decode("ascii")
        attachment = (
            f'Content-Type: {mime}; name="{filename}"\nContent-Transfer-Encoding: base64\n'
            f'Content-Disposition: attachment; filename="{filename}"\n\n{encoded}'
        )
    non_ascii = rng.random() < 0.15 or not name.isascii()  # the signature has the name
    budget = max(300, target - 900 - len(attachment))
    boundary = f"=_mailfleet_{rng.getrandbits(48):012x}"
    signature = f"{name}\n{address}"
    alternative = kind >= 0.5 and (kind < 0.8 or rng.random() < 0.5)
    if alternative:
        paragraphs = _text(rng, pool, budget // 2, non_ascii=non_ascii)
        body = _multipart(
            "alternative",
            boundary,
            [_plain_part(paragraphs, signature, qp=non_ascii), _html_part(paragraphs, qp=non_ascii)],
        )
    else:
        body = _plain_part(_text(rng, pool, budget, non_ascii=non_ascii), signature, qp=non_ascii)
    if attachment:
        body = _multipart("mixed", boundary + "_mixed", [body, attachment])
    text = "\n".join(headers) + "\n" + body
    return text.replace("\n", "\r\n").encode("ascii"), f"{name} <{address}>", subject


def generate(count: int, seed: int) -> Corpus:
    rng = random.Random(seed)
    pool = _pool(rng)
    messages: list[bytes] = []
    from_hits = subject_hits = 0
    for index in range(count):
        message, sender, subject = build_message(rng, pool, index)
        messages.append(message)
        from_hits += FROM_TERM in sender.lower()
        subject_hits += SUBJECT_TERM in subject.lower()
    appender = ("Bench Appender", f"append@{DOMAIN}")
    appends = [build_message(rng, pool, count + i, sender=appender, subject=f"bench append {i}")[0] for i in range(16)]
    return Corpus(messages, appends, FROM_TERM, SUBJECT_TERM, from_hits, subject_hits)


# ---------------------------------------------------------------------------------------------------
# A minimal IMAP client: one connection, commands one at a time, literals framed, contents skipped


LITERAL_RE = re.compile(rb"\{(\d+)\}\r\n\Z")
UID_RE = re.compile(rb"[( ]UID (\d+)")
SIZE_RE = re.compile(rb"RFC822\.SIZE (\d+)")

Response = tuple[bytes, list[int]]  # a response line with literals as {N}, and the literals' sizes


class Client:
    """Reads through a buffer of its own (StreamReader.readuntil per line costs several times more CPU:
    a UID FETCH 1:* answer is one line per message), so the client stays small next to the server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, label: str) -> None:
        self.reader, self.writer, self.label = reader, writer, label
        self._tags = 0
        self._buffer = b""
        self._pos = 0  # where the unread part of _buffer starts

    @classmethod
    async def connect(cls, port: int, label: str, tls: ClientTLS) -> Client:
        """Connect, read the greeting and STARTTLS (RFC 3501 §6.2.1): what "connect" measures."""
        client: Client | None = None
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                client = cls(*await asyncio.open_connection(HOST, port, limit=READ_SIZE), label)
                greeting, _ = await client._read()
                if not greeting.startswith(b"* OK"):
                    raise BenchError(f"{label}: greeting {greeting.strip()[:200]!r}")
                await client._exchange(b"s ", "STARTTLS", None)
                await client.writer.start_tls(tls.context, server_hostname=HOST)
                tls.handshakes += 1
                tls.resumed += client.ssl_object().session_reused
        except BaseException as error:
            if client is not None:
                client.close()
            if isinstance(error, TimeoutError):
                raise BenchError(f"{label}: no greeting after {COMMAND_TIMEOUT:.0f} s") from error
            if isinstance(error, OSError):
                raise BenchError(f"{label}: connecting to {HOST}:{port}: {error!r}") from error
            raise
        return client

    async def _fill(self) -> None:
        chunk = await self.reader.read(READ_SIZE)
        if not chunk:
            raise ConnectionResetError("the server closed the connection")
        self._buffer = self._buffer[self._pos :] + chunk
        self._pos = 0

    async def _line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n", self._pos)) < 0:
            if len(self._buffer) - self._pos > LINE_LIMIT:
                raise BenchError(f"{self.label}: a response line longer than {LINE_LIMIT} bytes")
            await self._fill()
        line = self._buffer[self._pos : end + 2]
        self._pos = end + 2
        return line

    async def _skip(self, size: int) -> None:
        while (available := len(self._buffer) - self._pos) < size:
            size -= available
            self._buffer, self._pos = b"", 0
            await self._fill()
        self._pos += size

    async def _read(self) -> Response:
        line = await self._line()
        if not line.endswith(b"}\r\n"):
            return line, []
        parts: list[bytes] = []
        sizes: list[int] = []
        while (match := LITERAL_RE.search(line)) is not None:
            size = int(match.group(1))
            parts.append(line[: match.end() - 2])
            sizes.append(size)
            await self._skip(size)
            line = await self._line()
        parts.append(line)
        return b"".join(parts), sizes

    async def command(self, text: str, *, literal: bytes | None = None) -> list[Response]:
        """Send a command, return its untagged responses; raises BenchError unless it ends with OK."""
        self._tags += 1
        tag = b"a%d " % self._tags
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                return await self._exchange(tag, text, literal)
        except TimeoutError as error:
            raise BenchError(f"{self.label}: {text[:60]}: no answer after {COMMAND_TIMEOUT:.0f} s") from error
        except OSError as error:
            raise BenchError(f"{self.label}: {text[:60]}: connection lost: {error!r}") from error

    async def _exchange(self, tag: bytes, text: str, literal: bytes | None) -> list[Response]:
        untagged: list[Response] = []
        if literal is None:
            self.writer.write(tag + text.encode() + b"\r\n")
        else:
            self.writer.write(tag + text.encode() + b" {%d}\r\n" % len(literal))
            while True:  # a synchronizing literal: the server says "+" first
                line, sizes = await self._read()
                if line.startswith(b"+"):
                    break
                if line.startswith(tag):
                    raise BenchError(f"{self.label}: {text[:60]}: answered {line.strip()[:300]!r}")
                untagged.append((line, sizes))
            self.writer.write(literal + b"\r\n")
        await self.writer.drain()
        while True:
            line, sizes = await self._read()
            if line.startswith(tag):
                if line[len(tag) : len(tag) + 3] != b"OK ":
                    raise BenchError(f"{self.label}: {text[:60]}: answered {line.strip()[:300]!r}")
                return untagged
            untagged.append((line, sizes))

    async def idle(self) -> None:
        """Enter IDLE (RFC 2177): returns once the server has sent its "+" continuation."""
        self._tags += 1
        tag = b"a%d " % self._tags
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                self.writer.write(tag + b"IDLE\r\n")
                await self.writer.drain()
                while True:
                    line, _ = await self._read()
                    if line.startswith(b"+"):
                        return
                    if line.startswith(tag):
                        raise BenchError(f"{self.label}: IDLE: answered {line.strip()[:300]!r}")
        except TimeoutError as error:
            raise BenchError(f"{self.label}: IDLE: no continuation after {COMMAND_TIMEOUT:.0f} s") from error
        except OSError as error:
            raise BenchError(f"{self.label}: IDLE: connection lost: {error!r}") from error

    def ssl_object(self) -> ssl.SSLObject:
        found = self.writer.get_extra_info("ssl_object")
        assert isinstance(found, ssl.SSLObject), "connected with STARTTLS"
        return found

    def close(self, tls: ClientTLS | None = None) -> None:
        """Hang up; `tls` keeps the session (its tickets came after the handshake) for the next connection."""
        if tls is not None and tls.resume:  # the server may have closed first (LOGOUT): the session stays
            tls.context.session = self.ssl_object().session
        self.writer.close()


class _ResumingContext(ssl.SSLContext):
    """A client context that offers `session` (the last connection's ticket) on the next connection, as
    mail clients do: asyncio's start_tls takes no session, so it goes in where asyncio wraps the socket."""

    session: ssl.SSLSession | None = None

    def wrap_bio(  # type: ignore[override]
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return super().wrap_bio(
            incoming,
            outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session or self.session,
        )


@dataclasses.dataclass
class ClientTLS:
    """One client's TLS: a context trusting only the bench's certificate, and (when `resume`) the session
    of its last connection offered again; the handshakes it made, and how many resumed a session."""

    context: _ResumingContext
    resume: bool
    handshakes: int = 0
    resumed: int = 0

    @classmethod
    def trusting(cls, cert: Path, *, resume: bool) -> ClientTLS:
        context = _ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(cert))
        return cls(context, resume)


def login_command() -> str:
    return f'LOGIN "{RECIPIENT}" "{PASSWORD}"'


T = TypeVar("T")


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, where SIGTERM and SIGHUP cancel the work as Ctrl-C does (every session's `finally`
    closes its connection), and then raise KeyboardInterrupt like signals_raise does outside asyncio."""
    received: list[signal.Signals] = []

    async def main() -> T:
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        assert task is not None
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}

        def stop(sig: signal.Signals) -> None:
            received.append(sig)
            task.cancel()

        for sig in previous:
            loop.add_signal_handler(sig, stop, sig)
        try:
            return await coroutine
        finally:
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)
                signal.signal(sig, handler)  # remove_signal_handler leaves SIG_DFL behind

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        if received:
            raise KeyboardInterrupt(received[0].name) from None
        raise


async def run_all(coroutines: Iterable[Coroutine[Any, Any, None]], *, seconds: float, what: str) -> None:
    """Run the coroutines together, for at most `seconds`; the first BenchError cancels the others and is raised."""
    try:
        async with asyncio.timeout(seconds), asyncio.TaskGroup() as group:
            for coroutine in coroutines:
                group.create_task(coroutine)
    except TimeoutError as error:
        raise BenchError(f"{what}: not done after {seconds:.0f} s") from error
    except ExceptionGroup as group:
        leaves: list[BaseException] = []
        pending: list[BaseException] = [group]
        while pending:
            exception = pending.pop(0)
            if isinstance(exception, BaseExceptionGroup):
                pending.extend(exception.exceptions)
            else:
                leaves.append(exception)
        first = next((leaf for leaf in leaves if isinstance(leaf, BenchError)), None)
        if first is None:
            raise
        raise first from None


# ---------------------------------------------------------------------------------------------------
# The load


@dataclasses.dataclass
class Stats:
    latencies: defaultdict[str, list[float]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    operations: int = 0
    handshakes: int = 0  # TLS handshakes, and how many of them resumed a session
    resumed: int = 0
    problems: Counter[str] = dataclasses.field(default_factory=Counter)
    lags: list[float] = dataclasses.field(default_factory=list)  # the client's event loop, late by (seconds)
    late: int = 0  # the paced run: commands that started late (Pacer)

    async def op(
        self, kind: str, client: Client, text: str, *, literal: bytes | None = None, also: str | None = None
    ) -> list[Response]:
        """One command, its latency counted under `kind` (and under `also`, a finer row, when given)."""
        started = time.perf_counter()
        responses = await client.command(text, literal=literal)
        self.latencies[kind].append(time.perf_counter() - started)
        if also is not None:
            self.latencies[also].append(self.latencies[kind][-1])
        self.operations += 1
        return responses


@dataclasses.dataclass
class Pacer:
    """One session's pace in the paced run: a command every `interval` seconds from `due` (the loop's clock);
    one whose time passed by more than an interval while the last was unanswered starts at once, counted
    `late`, and the times go on from it (no burst to catch up). Interval 0: the closed loop, no waiting."""

    interval: float = 0.0
    due: float = 0.0
    late: int = 0

    async def turn(self) -> None:
        if not self.interval:
            return
        now = asyncio.get_running_loop().time()
        if now < self.due:
            await asyncio.sleep(self.due - now)
        elif now > self.due + self.interval:
            self.late += 1
        self.due = max(self.due, now) + self.interval


async def one_cycle(
    port: int, label: str, rng: random.Random, corpus: Corpus, stats: Stats, tls: ClientTLS, pacer: Pacer
) -> None:
    started = time.perf_counter()
    client = await Client.connect(port, label, tls)
    stats.latencies["connect"].append(time.perf_counter() - started)

    async def paced(
        kind: str, client: Client, text: str, *, literal: bytes | None = None, also: str | None = None
    ) -> list[Response]:
        await pacer.turn()
        return await stats.op(kind, client, text, literal=literal, also=also)

    try:
        await paced("LOGIN", client, login_command())
        await paced("SELECT", client, "SELECT INBOX")
        sizes: dict[int, int] = {}
        structures = 0
        for line, _ in await paced("FETCH 1:*", client, f"UID FETCH 1:* {SUMMARY_ITEMS}"):
            uid_match, size_match = UID_RE.search(line), SIZE_RE.search(line)
            if uid_match is not None and size_match is not None:
                sizes[int(uid_match.group(1))] = int(size_match.group(1))
                structures += b"BODYSTRUCTURE" in line and b"ENVELOPE" in line
        if len(sizes) < len(corpus.messages):
            stats.problems[f"UID FETCH 1:* returned {len(sizes)} messages, fewer than {len(corpus.messages)}"] += 1
        if structures != len(sizes):
            stats.problems["UID FETCH 1:* left out ENVELOPE or BODYSTRUCTURE"] += 1
        uids = sorted(sizes)
        if not uids:
            raise BenchError(f"{label}: UID FETCH 1:* returned no message")
        for uid in (rng.choice(uids) for _ in range(BODY_FETCHES)):
            bodies = [
                literals[-1]
                for line, literals in await paced("FETCH BODY[]", client, f"UID FETCH {uid} BODY.PEEK[]")
                if literals and b"BODY[]" in line
            ]
            if not bodies or bodies[0] == 0:
                stats.problems["UID FETCH BODY.PEEK[] returned no body"] += 1
            elif bodies[0] != sizes[uid]:
                stats.problems["UID FETCH BODY.PEEK[]: the body's length is not the RFC822.SIZE"] += 1
        for uid in (rng.choice(uids) for _ in range(STORES)):
            await paced("STORE", client, f"UID STORE {uid} +FLAGS (\\Seen)")
        searches: tuple[tuple[str, int | None], ...] = (
            ("UNSEEN", None),
            (f'FROM "{corpus.from_term}"', corpus.from_hits),
            (f'SUBJECT "{corpus.subject_term}"', corpus.subject_hits),
        )
        for criteria, expected in searches:
            also = f"SEARCH {criteria.split()[0]}"
            found = [line for line, _ in await paced("SEARCH", client, f"UID SEARCH {criteria}", also=also)]
            hits = sum(len(line.split()) - 2 for line in found if line.startswith(b"* SEARCH"))
            if not any(line.startswith(b"* SEARCH") for line in found):
                stats.problems[f"UID SEARCH {criteria}: no SEARCH response"] += 1
            elif expected is not None and hits != expected:
                stats.problems[f"UID SEARCH {criteria}: {hits} hits, the mailbox has {expected}"] += 1
        await paced("APPEND", client, "APPEND INBOX", literal=rng.choice(corpus.appends))
        await paced("LOGOUT", client, "LOGOUT")
    finally:
        client.close(tls)


async def workload(port: int, server: str, load: Load, corpus: Corpus, cert: Path, *, paced: bool = False) -> Stats:
    """The sessions' cycles: the closed loop, or (`paced`) the paced run, its sessions' first commands spread
    over one interval."""
    stats = Stats()
    cycles = load.paced_cycles if paced else load.cycles
    interval = load.sessions / load.paced_rate if paced else 0.0
    begin = asyncio.get_running_loop().time()

    async def session(number: int) -> None:
        rng = random.Random(f"{load.seed}:{number}")  # the same choices against both servers
        tls = ClientTLS.trusting(cert, resume=True)  # each session's next cycle resumes its TLS session
        pacer = Pacer(interval, begin + interval * number / load.sessions)
        try:
            for cycle in range(cycles):
                await one_cycle(port, f"{server} session {number} cycle {cycle}", rng, corpus, stats, tls, pacer)
        finally:
            stats.handshakes += tls.handshakes
            stats.resumed += tls.resumed
            stats.late += pacer.late

    total = load.sessions * cycles * COMMANDS_PER_CYCLE
    monitor = asyncio.get_running_loop().create_task(loop_lag(stats.lags))
    try:
        await run_all((session(n) for n in range(load.sessions)), seconds=load.timeout, what=f"{server} workload")
    except BenchError as error:
        raise BenchError(f"{error} ({stats.operations} of {total} commands done)") from error
    finally:
        monitor.cancel()
    return stats


async def loop_lag(lags: list[float]) -> None:
    """How late the client's own event loop wakes a LAG_TICK timer, for as long as the workload runs: every
    latency it measures includes about that much of its own queueing (the client is one process)."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(LAG_TICK)
        lags.append(max(0.0, loop.time() - started - LAG_TICK))


async def warm_up(port: int, server: str, cert: Path) -> int:
    """One session: SELECT (Dovecot indexes the Maildir here) and every message's flags; the count."""
    client = await Client.connect(port, f"{server} warm-up", ClientTLS.trusting(cert, resume=False))
    try:
        await client.command(login_command())
        await client.command("SELECT INBOX")
        fetched = await client.command("UID FETCH 1:* (FLAGS)")
        await client.command("LOGOUT")
    finally:
        client.close()
    return sum(1 for line, _ in fetched if b" FETCH " in line and UID_RE.search(line))


@dataclasses.dataclass(frozen=True)
class Usage:
    processes: int
    rss: int  # bytes, summed over the server's processes
    pss: int  # bytes: shared pages counted once over all processes (the fair figure for Dovecot's many)


@dataclasses.dataclass(frozen=True)
class Memory:
    sessions: int
    seconds: float  # to open, log in, select and idle them all
    before: Usage
    after: Usage


async def idle_memory(
    port: int, server: str, root: int, sessions: int, load: Load, cert: Path
) -> tuple[Memory, str | None]:
    """The memory with `sessions` in IDLE; when opening them fails part-way (a server that refuses more),
    the memory with those that are in IDLE, and why the others are not."""
    before = tree_usage(root)
    clients: list[Client] = []
    idling = 0
    tls = ClientTLS.trusting(cert, resume=False)

    async def open_one(number: int, gate: asyncio.Semaphore) -> None:
        nonlocal idling
        async with gate:
            client = await Client.connect(port, f"{server} idle session {number}", tls)
            clients.append(client)
            await client.command(login_command())
            await client.command("SELECT INBOX")
            await client.idle()
            idling += 1

    started = time.monotonic()
    try:
        gate = asyncio.Semaphore(load.sessions)  # logins as concurrent as in the workload
        opening = (open_one(n, gate) for n in range(sessions))
        problem = None
        try:
            await run_all(opening, seconds=load.timeout, what=f"{server}: opening {sessions} IDLE sessions")
        except BenchError as error:
            problem = f"{error} ({idling} were in IDLE; the memory figures are theirs)"
        seconds = time.monotonic() - started
        await asyncio.sleep(IDLE_SETTLE)
        after = tree_usage(root)
    finally:
        for client in clients:
            client.close()
    return Memory(idling, seconds, before, after), problem


# ---------------------------------------------------------------------------------------------------
# Processes: the server's process tree, its CPU time and memory from /proc


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields 3.. of proc(5), the command name cut off


def process_tree(root: int) -> list[int]:
    children: defaultdict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            children[int(fields[1])].append(int(entry.name))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children[pid])
    return tree


def tree_cpu(root: int) -> float:
    """CPU seconds of the tree: each live process's own and that of its children it reaped (Dovecot's
    finished imap processes are in its master's cutime/cstime)."""
    ticks = 0
    for pid in process_tree(root):
        if (fields := _stat_fields(pid)) is not None:
            ticks += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return ticks / CLOCK_TICKS


def _kib(path: str, key: str) -> int:
    try:
        with open(path, encoding="ascii") as lines:  # noqa: PTH123 (proc files, read line by line)
            for line in lines:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def tree_usage(root: int) -> Usage:
    pids = process_tree(root)
    rss = sum(_kib(f"/proc/{pid}/status", "VmRSS:") for pid in pids)
    pss = sum(_kib(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in pids)
    return Usage(len(pids), rss, pss)


FD_LIMIT = 65536  # open files for the servers and the client: the node fits its listeners' totals into it


def raise_fd_limit() -> None:
    """Open files up to FD_LIMIT, the hard limit too where allowed (root), else the soft limit up to the
    hard one: 10,000 idle sessions need more than 1,024, and the node scales its listeners' connection
    totals down to its limit (hence imaps' own small listen.limits.imaps)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, FD_LIMIT), max(hard, FD_LIMIT)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def needed_fds(load: Load) -> int:
    return max(load.idle_sessions, load.dovecot_idle_sessions) + load.sessions + 64


# ---------------------------------------------------------------------------------------------------
# One server's run: warm-up, timed workload, idle memory


@dataclasses.dataclass(frozen=True)
class Result:
    server: str
    skipped: str | None = None
    preload: str = ""
    operations: int = 0
    seconds: float = 0.0
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    latencies: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    memory: Memory | None = None
    problems: tuple[str, ...] = ()
    handshakes: int = 0  # TLS handshakes of the workload, and how many resumed a session
    resumed: int = 0
    client_lags: list[float] = dataclasses.field(default_factory=list)  # Stats.lags
    paced: Stats | None = None  # the paced run's
    paced_seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.operations / self.seconds if self.seconds else 0.0


def client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_load(
    server: str, port: int, root: int, load: Load, corpus: Corpus, preload: str, *, cert: Path, idle_sessions: int
) -> Result:
    started = time.monotonic()
    count = run_async(warm_up(port, server, cert))
    print(f"{server}: warm-up session saw {count} messages in {time.monotonic() - started:.1f} s", flush=True)
    problems: list[str] = []
    if count != len(corpus.messages):
        problems.append(f"{server}: the mailbox holds {count} messages, {len(corpus.messages)} were preloaded")
    print(f"{server}: {load.sessions} sessions x {load.cycles} cycles", flush=True)
    cpu_before, client_before, started = tree_cpu(root), client_cpu(), time.monotonic()
    stats = run_async(workload(port, server, load, corpus, cert))
    seconds = time.monotonic() - started
    server_cpu, client_seconds = tree_cpu(root) - cpu_before, client_cpu() - client_before
    print(f"{server}: {stats.operations} commands in {seconds:.1f} s", flush=True)
    problems += [f"{server}: {problem} ({count}x)" for problem, count in stats.problems.items()]
    paced, paced_seconds = None, 0.0
    if load.paced_rate and load.paced_cycles:
        print(
            f"{server}: paced: {load.sessions} sessions x {load.paced_cycles} cycles at {load.paced_rate:g} commands/s"
        )
        started = time.monotonic()
        paced = run_async(workload(port, server, load, corpus, cert, paced=True))
        paced_seconds = time.monotonic() - started
        print(f"{server}: paced: {paced.operations} commands in {paced_seconds:.1f} s, {paced.late} late", flush=True)
        problems += [f"{server}: paced: {problem} ({count}x)" for problem, count in paced.problems.items()]
    memory = None
    if idle_sessions:
        print(f"{server}: opening {idle_sessions} IDLE sessions", flush=True)
        try:
            memory, problem = run_async(idle_memory(port, server, root, idle_sessions, load, cert))
            if problem is not None:
                problems.append(problem)
        except BenchError as error:  # the workload's figures stand
            problems.append(str(error))
        if server == "mailnode" and memory is not None:
            problems += idle_goal(memory, idle_sessions)
    return Result(
        server, preload=preload, operations=stats.operations, seconds=seconds, server_cpu=server_cpu,
        client_cpu=client_seconds, latencies=dict(stats.latencies), memory=memory, problems=tuple(problems),
        handshakes=stats.handshakes, resumed=stats.resumed, client_lags=stats.lags, paced=paced,
        paced_seconds=paced_seconds,
    )  # fmt: skip


def idle_goal(memory: Memory, asked: int) -> list[str]:
    """The node's IDLE memory against the goal, 10,000 sessions within 1 GiB of RSS (its baseline included);
    with fewer sessions asked, what 10,000 would take at the cost measured per session."""
    sessions = max(1, memory.sessions)
    per_session = (memory.after.rss - memory.before.rss) / sessions
    projected = memory.before.rss + per_session * IDLE_GOAL_SESSIONS
    print(
        f"mailnode: {memory.sessions} sessions in IDLE: RSS {mib(memory.before.rss)} before, {mib(memory.after.rss)} "
        f"after, {per_session / 1024:.1f} KiB per session; for {IDLE_GOAL_SESSIONS}: {mib(projected)} "
        f"(goal: at most {mib(IDLE_GOAL)})",
        flush=True,
    )
    if memory.sessions == asked and projected <= IDLE_GOAL:
        return []
    return [
        f"mailnode: {memory.sessions} of {asked} sessions in IDLE, {mib(projected)} for {IDLE_GOAL_SESSIONS} "
        f"(goal: at most {mib(IDLE_GOAL)})"
    ]


def imap_greeting(port: int) -> bool:
    return common.greets(port, b"* OK", b"z LOGOUT\r\n")


# ---------------------------------------------------------------------------------------------------
# The mail node


IMAP_CONFIG_ERROR = re.compile(r"^\s*(?:listen\.imap|imap)\b.*$", re.MULTILINE)


def deliver(port: int, corpus: Corpus, *, timeout: float) -> float:
    """The mailbox over the node's MX port, SMTP_SESSIONS sessions in parallel; the seconds it took."""

    stop = threading.Event()  # set on error or interrupt: the other sessions end after their current message

    def session(messages: list[bytes]) -> None:
        with smtplib.SMTP(HOST, port, timeout=COMMAND_TIMEOUT) as client:
            for message in messages:
                if stop.is_set():
                    return
                client.sendmail(SENDER, [RECIPIENT], message)

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(SMTP_SESSIONS) as pool:
        futures = [pool.submit(session, corpus.messages[n::SMTP_SESSIONS]) for n in range(SMTP_SESSIONS)]
        try:
            for future in concurrent.futures.as_completed(futures, timeout=timeout):
                future.result()
        except concurrent.futures.TimeoutError as error:
            raise BenchError(f"mailnode: delivering the mailbox over SMTP took more than {timeout:.0f} s") from error
        except (smtplib.SMTPException, OSError) as error:
            raise BenchError(f"mailnode: delivering the mailbox over SMTP: {error!r}") from error
        finally:
            stop.set()
    return time.monotonic() - started


def bench_node(workdir: Path, load: Load, corpus: Corpus, tls: tuple[Path, Path]) -> Result:
    """The node with the IMAP listener (STARTTLS with the bench's certificate) and a directory with one
    mailbox; its connection limits raised for the IDLE sessions, all from 127.0.0.1."""
    config, ports = common.node_files(
        workdir, listeners=("smtp", "submission", "submissions", "imap", "imaps", "http", "https"), password=PASSWORD,
        settings={"tls": {"cert_file": str(tls[0]), "key_file": str(tls[1])}},
    )  # fmt: skip
    settings = yaml.safe_load(config.read_text(encoding="utf-8"))
    room = load.idle_sessions + load.sessions + 16
    # imaps (unused here) gets its own small limit: the node fits its listeners' totals into its open-files
    # limit, and two of 10,000 would not fit this machine's 20,000 (imap would be cut to about 8,500).
    settings["listen"]["limits"] = {
        "imap": {"total": room, "per_client": room},
        "imaps": {"total": IMAPS_LIMIT, "per_client": IMAPS_LIMIT},
    }
    config.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    node = common.launch_node(workdir, config, ports, preexec_fn=raise_fd_limit)
    try:
        try:
            node.wait_ready()
        except BenchError:
            text = node.log_file.read_text(encoding="utf-8", errors="replace")
            if node.proc.poll() is not None and "invalid" in text and (lines := IMAP_CONFIG_ERROR.findall(text)):
                reasons = "; ".join(line.strip() for line in lines[:3])
                raise Skipped(
                    f"node has no IMAP listener yet (its config refuses listen.imap/imap: {reasons})"
                ) from None
            raise
        deadline = time.monotonic() + IMAP_GRACE
        while not imap_greeting(ports["imap"]):
            if time.monotonic() > deadline:
                raise Skipped(f"node has no IMAP listener yet (nothing answers on {HOST}:{ports['imap']})")
            time.sleep(0.1)
        print(f"mailnode ready, IMAP on {HOST}:{ports['imap']}; delivering the mailbox over SMTP", flush=True)
        seconds = deliver(ports["smtp"], corpus, timeout=load.timeout)
        preload = f"SMTP, {SMTP_SESSIONS} sessions: {len(corpus.messages) / seconds:.0f} msgs/s"
        result = run_load(
            "mailnode",
            ports["imap"],
            node.proc.pid,
            load,
            corpus,
            preload,
            cert=tls[0],
            idle_sessions=load.idle_sessions,
        )
        return dataclasses.replace(result, problems=(*result.problems, *node.problems()))
    except Skipped as skipped:
        return Result("mailnode", skipped=str(skipped))
    finally:
        common.stop_process(node.proc)


# ---------------------------------------------------------------------------------------------------
# Dovecot


def dovecot_setup(workdir: Path, load: Load, corpus: Corpus, scheme: str, tls: tuple[Path, Path]) -> dovecot.Instance:
    """The private instance (bench.dovecot) with the benchmark's user and its preloaded Maildir, STARTTLS
    with the bench's certificate (its other settings as shipped: a login process per TLS connection)."""
    # argon2id: a hash as the node's directory holds it, the same LOGIN cost (Dovecot verifies it with libsodium).
    password = "{ARGON2ID}" + passwords.hash_password(PASSWORD) if scheme == "argon2id" else "{PLAIN}" + PASSWORD
    instance = dovecot.setup(
        workdir, passwords={RECIPIENT: password}, sessions=load.sessions + load.dovecot_idle_sessions + 16,
        instance="mailfleet-bench", extra=f"ssl = yes\nssl_cert = <{tls[0]}\nssl_key = <{tls[1]}\n",
    )  # fmt: skip
    # The mailbox, as a delivery agent leaves it: one file per message in cur/, S= and W= (the size with
    # CRLF line ends, the same here) in the name. The first SELECT builds the index.
    maildir = instance.maildir(RECIPIENT)
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    now = int(time.time())
    for number, message in enumerate(corpus.messages):
        name = f"{now}.M{number}P{os.getpid()}.mailfleet-bench,S={len(message)},W={len(message)}:2,"
        (maildir / "cur" / name).write_bytes(message)
    return instance


def bench_dovecot(workdir: Path, load: Load, corpus: Corpus, tls: tuple[Path, Path], *, scheme: str) -> Result:
    workdir.mkdir()
    started = time.monotonic()
    instance = dovecot_setup(workdir, load, corpus, scheme, tls)
    preload = f"written into the Maildir in {time.monotonic() - started:.1f} s"
    with dovecot.running(instance, preexec_fn=raise_fd_limit) as server:
        print(f"dovecot ready on {HOST}:{instance.port}", flush=True)
        result = run_load(
            "dovecot", instance.port, server.proc.pid, load, corpus, preload, cert=tls[0],
            idle_sessions=load.dovecot_idle_sessions,
        )  # fmt: skip
        problems = common.run_problems("dovecot", server.died, dovecot.errors(instance.log_file))
        return dataclasses.replace(result, problems=(*result.problems, *problems))


# ---------------------------------------------------------------------------------------------------
# The report


def mib(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


def latency(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    return f"{statistics.median(ordered) * 1000:.1f} / {p95 * 1000:.1f} / {ordered[-1] * 1000:.0f}"


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000 if values else float("nan")


def ratios(node: dict[str, list[float]], dovecot: dict[str, list[float]], what: str) -> None:
    """Per command, the node's median against Dovecot's (how many times slower; the goal: at most 3), and
    the commands over the goal."""
    header = f"{'command':<14} {'mailnode ms':>11} {'dovecot ms':>11} {'slower x':>9}"
    print(f"{header}   (medians, {what}; connect: TCP, greeting, STARTTLS)")
    over: list[str] = []
    for kind in (*KINDS, *SEARCH_KINDS):
        mine, theirs = median_ms(node.get(kind, [])), median_ms(dovecot.get(kind, []))
        slower = mine / theirs if theirs else float("nan")
        print(f"{kind:<14} {mine:>11.2f} {theirs:>11.2f} {slower:>9.2f}")
        if kind != "connect" and slower > MEDIAN_GOAL:
            over.append(f"{kind} {slower:.2f}")
    print(f"more than {MEDIAN_GOAL:g}x slower at the median, {what}: {', '.join(over) or 'none'}")


def paced_stats(result: Result) -> Stats:
    assert result.paced is not None
    return result.paced


def paced_latencies(result: Result) -> dict[str, list[float]]:
    return dict(paced_stats(result).latencies)


def report(results: list[Result], load: Load, scheme: str) -> None:
    measured = [result for result in results if result.skipped is None and result.operations]
    print()
    for result in results:
        if result.skipped is not None:
            print(f"{result.server}: skipped: {result.skipped}")
    if not measured:
        return
    print(f"{'server':<10} {'commands':>8} {'seconds':>8} {'ops/s':>8} {'server CPU s':>12} {'client CPU s':>12}")
    for result in measured:
        print(
            f"{result.server:<10} {result.operations:>8} {result.seconds:>8.2f} {result.rate:>8.1f} "
            f"{result.server_cpu:>12.1f} {result.client_cpu:>12.1f}   mailbox preload: {result.preload}"
        )
    by_server = {result.server: result for result in measured}
    node, dovecot = by_server.get("mailnode"), by_server.get("dovecot")
    if node is not None and dovecot is not None and not node.problems and dovecot.rate:
        print(f"ratio mailnode/dovecot: {node.rate / dovecot.rate:.2f}  (ops/s; the goal: at least 0.8)")
    print()
    if "dovecot" not in by_server:
        login = "the node verifies an argon2id hash"
    elif scheme == "argon2id":
        login = "both servers verify the same argon2id hash; Dovecot in its one auth process"
    else:
        login = "the node verifies an argon2id hash, Dovecot compares a {PLAIN} password"
    print(f"latency ms, median / p95 / max  (LOGIN: {login})")
    print(f"{'command':<14}" + "".join(f" {result.server:>24}" for result in measured))
    for kind in (*KINDS, *SEARCH_KINDS):
        print(f"{kind:<14}" + "".join(f" {latency(result.latencies.get(kind, [])):>24}" for result in measured))
    # Not a command: how late the client's own loop ran during each server's workload (part of every figure).
    print(f"{'client lag':<14}" + "".join(f" {latency(result.client_lags):>24}" for result in measured))
    if node is not None and dovecot is not None:
        print()
        ratios(node.latencies, dovecot.latencies, "closed loop")
        for result in (node, dovecot):
            print(f"{result.server}: {result.resumed} of {result.handshakes} TLS handshakes resumed a session")
    paced = [result for result in measured if result.paced is not None and result.paced.operations]
    if paced:
        print()
        print(
            f"paced: the same {load.paced_rate:g} commands/s offered to each server ({load.sessions} sessions, "
            f"each a command every {load.sessions / load.paced_rate * 1000:.0f} ms); latency ms, median / p95 / max"
        )
        print(f"{'command':<14}" + "".join(f" {result.server:>24}" for result in paced))
        for kind in (*KINDS, *SEARCH_KINDS):
            print(f"{kind:<14}" + "".join(f" {latency(paced_latencies(result).get(kind, [])):>24}" for result in paced))
        print(f"{'client lag':<14}" + "".join(f" {latency(paced_stats(result).lags):>24}" for result in paced))
        for result in paced:
            stats = paced_stats(result)
            print(
                f"{result.server}: {stats.operations} commands in {result.paced_seconds:.1f} s "
                f"({stats.operations / result.paced_seconds:.1f}/s), {stats.late} of {stats.operations} started late "
                "(the last answer came more than an interval after their time)"
            )
        if node in paced and dovecot in paced:
            assert node is not None and dovecot is not None
            print()
            ratios(paced_latencies(node), paced_latencies(dovecot), "paced, equal load")
    with_memory = [result for result in measured if result.memory is not None and result.memory.sessions]
    if with_memory:
        print()
        print("memory with sessions in IDLE (RSS summed over the processes; PSS: shared once)")
        print(f"{'server':<10} {'sessions':>8} {'processes':>9} {'RSS before':>12} {'RSS idle':>12} "
              f"{'per session':>12} {'PSS before':>12} {'PSS idle':>12} {'per session':>12} {'open s':>7}")  # fmt: skip
        for result in with_memory:
            assert result.memory is not None
            memory = result.memory
            before, after = memory.before, memory.after
            print(
                f"{result.server:<10} {memory.sessions:>8} {after.processes:>9} {mib(before.rss):>12} "
                f"{mib(after.rss):>12} {(after.rss - before.rss) / memory.sessions / 1024:>9.0f} KiB "
                f"{mib(before.pss):>12} {mib(after.pss):>12} "
                f"{(after.pss - before.pss) / memory.sessions / 1024:>9.0f} KiB {memory.seconds:>7.1f}"
            )


# ---------------------------------------------------------------------------------------------------
# The command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.imap",
        description="The same IMAP session load against the mail node and a private Dovecot, and their memory "
        "with many sessions in IDLE.",
        epilog="Defaults come from BENCH_IMAP_MESSAGES, BENCH_IMAP_SESSIONS, BENCH_IMAP_CYCLES, "
        "BENCH_IMAP_PACED_RATE, BENCH_IMAP_PACED_CYCLES, BENCH_IMAP_IDLE_SESSIONS and BENCH_IMAP_TIMEOUT when set.",
    )
    parser.add_argument(
        "--messages", type=common.positive, default=common.env_default("BENCH_IMAP_MESSAGES", "2000"),
        help="messages in the mailbox (2000)",
    )  # fmt: skip
    parser.add_argument(
        "--sessions", type=common.positive, default=common.env_default("BENCH_IMAP_SESSIONS", "20"),
        help="concurrent sessions (20)",
    )  # fmt: skip
    parser.add_argument(
        "--cycles", type=common.positive, default=common.env_default("BENCH_IMAP_CYCLES", "5"),
        help=f"cycles per session, {COMMANDS_PER_CYCLE} commands each (5)",
    )  # fmt: skip
    parser.add_argument(
        "--idle-sessions", type=common.non_negative, default=common.env_default("BENCH_IMAP_IDLE_SESSIONS", "10000"),
        help="the node's sessions in IDLE for the memory figures; 0: none (10000; the goal: 1 GiB)",
    )  # fmt: skip
    parser.add_argument(
        "--dovecot-idle-sessions", type=common.non_negative,
        default=common.env_default("BENCH_IMAP_DOVECOT_IDLE_SESSIONS", "1000"),
        help="Dovecot's sessions in IDLE, two processes each; 0: none (1000)",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=common.positive, default=common.env_default("BENCH_IMAP_TIMEOUT", "600"),
        help="seconds each phase (preload, workload, idle sessions) may take per server (600)",
    )  # fmt: skip
    parser.add_argument(
        "--paced-rate", type=float, default=common.env_default("BENCH_IMAP_PACED_RATE", "120"),
        help="commands/s over all sessions in the paced run, the same for both servers; 0: no paced run "
        "(120: Dovecot keeps that pace here but after each LOGIN, which its one auth process verifying argon2id "
        "holds for seconds)",
    )  # fmt: skip
    parser.add_argument(
        "--paced-cycles", type=common.non_negative, default=common.env_default("BENCH_IMAP_PACED_CYCLES", "2"),
        help="cycles per session in the paced run (2)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated mailbox and the sessions' choices")
    parser.add_argument(
        "--dovecot-password", choices=("argon2id", "plain"), default="argon2id",
        help="Dovecot's password scheme: the node's argon2id hash (the same LOGIN cost) or {PLAIN}",
    )  # fmt: skip
    common.add_only_keep(parser, "dovecot")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load = Load(
        messages=args.messages, sessions=args.sessions, cycles=args.cycles, idle_sessions=args.idle_sessions,
        dovecot_idle_sessions=args.dovecot_idle_sessions, seed=args.seed, timeout=args.timeout,
        paced_rate=max(0.0, args.paced_rate), paced_cycles=args.paced_cycles,
    )  # fmt: skip
    raise_fd_limit()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed_fds(load):
        print(f"bench: FAILED: {needed_fds(load)} open files needed, the limit is {soft} (ulimit -Hn)", file=sys.stderr)
        return 1
    started = time.monotonic()
    corpus = generate(load.messages, load.seed)
    total = load.sessions * load.cycles * COMMANDS_PER_CYCLE
    print(
        f"imap: {load.messages} messages ({mib(corpus.size)}, seed {load.seed}, generated in "
        f"{time.monotonic() - started:.1f} s); {load.sessions} sessions x {load.cycles} cycles of "
        f"{COMMANDS_PER_CYCLE} commands = {total}: LOGIN, SELECT, UID FETCH 1:* {SUMMARY_ITEMS}, "
        f"{BODY_FETCHES} UID FETCH BODY.PEEK[], {STORES} UID STORE, {SEARCHES} UID SEARCH, APPEND, LOGOUT; "
        f"all over STARTTLS; then {load.paced_cycles} cycles paced at {load.paced_rate:g} commands/s; "
        f"then {load.idle_sessions} sessions in IDLE ({load.dovecot_idle_sessions} on Dovecot)"
    )
    results: list[Result] = []
    # Dovecot's processes (users dovecot, dovenull, nobody) walk through the directory.
    with common.temporary_workdir("mailfleet-bench-imap-", keep=args.keep) as workdir:
        common.print_machine(workdir, f"Dovecot {dovecot.version()}")
        tls = make_certificate(workdir / "tls")  # both servers serve it; the client trusts only it
        runs: dict[str, Callable[[], Result]] = {
            "mailnode": lambda: bench_node(workdir / "mailnode", load, corpus, tls),
            "dovecot": lambda: bench_dovecot(workdir / "dovecot", load, corpus, tls, scheme=args.dovecot_password),
        }
        try:
            with common.signals_raise():
                for server, run in runs.items():
                    if args.only in (None, server):
                        try:
                            results.append(run())
                        except BenchError as error:  # this server failed; the other one still runs
                            results.append(Result(server, problems=(str(error),)))
        except KeyboardInterrupt as interrupt:
            return common.interrupted(interrupt)
    report(results, load, args.dovecot_password)
    problems = [problem for result in results for problem in result.problems]
    if all(result.skipped is not None for result in results):
        problems.append("no server was measured")
    return common.outcome(problems)


if __name__ == "__main__":
    sys.exit(main())
