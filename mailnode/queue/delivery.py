"""Deliverer: the outbound delivery worker. Takes the spool's due recipients, routes them by domain (or all to
the relay host), hands them to the remote servers over SMTP, records each recipient's outcome in the spool
as soon as it is known, and bounces what could not be delivered. The node runs `Deliverer.run` as a task;
tests call `run_once`.

Per pass: one route per domain, at most `max_per_domain` connections per domain and `max_connections` in
all; a connection carries several messages (RSET between them). A recipient is recorded delivered right
after the remote `250`, before anything else happens, so a restart never delivers it twice (RFC 5321 §6.1:
the worst case is the rare duplicate when the connection drops between the end of DATA and the reply).

Recipients routed `node:<ordinal>` are hand-offs to the mailbox's home node (a home that was down or
slow when SMTP took the message): they go over LMTP through `mailnode.queue.handoff`, to the home the
directory names at the time of the attempt (a mailbox may have moved meanwhile), on a short retry
schedule, and they expire only after `handoff_lifetime`: a peer that restarts never causes a bounce.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime

import aiosmtplib

from mailnode.metrics import NodeMetrics
from mailnode.queue import dsn, handoff, mtasts, routing
from mailnode.queue.spool import QueuedMessage, Spool, expired
from mailwire import config as wire_config

log = logging.getLogger(__name__)

# A pass opens one connection per this many messages to a destination, up to max_per_domain.
MESSAGES_PER_CONNECTION = 10

EXPIRED_STATUS = "4.4.7"  # RFC 3463: delivery time expired
# Retries of a hand-off to a peer node: a restarting pod is back within a minute or two, so the first
# retries come sooner than the outbound schedule's (mailnode.queue.spool.RETRY_DELAYS); then every 5 min.
HANDOFF_RETRY_DELAYS: tuple[float, ...] = (10.0, 30.0, 60.0, 120.0, 300.0)
# A hand-off is not given up on before this (30 days): the home is one of our own nodes, and mail for it
# bounces only if it is gone for good (an operator's mistake that `mailnode queue list` shows).
HANDOFF_LIFETIME = 30 * 86400.0


def handoff_delay(attempts: int) -> float:
    """Seconds before the next hand-off attempt after `attempts` failed ones."""
    return HANDOFF_RETRY_DELAYS[min(max(attempts, 1), len(HANDOFF_RETRY_DELAYS)) - 1]


_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")


@dataclasses.dataclass(frozen=True)
class _Outcome:
    """What happened to one recipient in one attempt."""

    result: str  # "delivered", "deferred" or "failed"
    status: str  # the RFC 3463 code
    reply: str  # the remote reply ("550 5.1.1 no such user") or our own reason
    remote_mta: str | None = None


@dataclasses.dataclass
class _Job:
    message: QueuedMessage
    addresses: list[str]


class _ConnectFailed(Exception):
    """No server of the route could be used; `reply` says why (the last server's answer or error)."""

    def __init__(self, reply: str, *, status: str = "4.4.1") -> None:  # RFC 3463: no answer from host
        super().__init__(reply)
        self.reply = reply
        self.status = status


class _Connection:
    """One open SMTP session with a remote server, after EHLO, STARTTLS and AUTH."""

    def __init__(self, client: aiosmtplib.SMTP, host: str) -> None:
        self.client = client
        self.host = host
        self.transactions = 0


class Deliverer:
    def __init__(
        self,
        spool: Spool,
        *,
        hostname: str,
        resolver: routing.Resolver,
        relay_host: routing.RelayHost | None = None,
        deliver_locally: Callable[[str, bytes], Awaitable[bool]],
        metrics: NodeMetrics | None = None,
        clock: Callable[[], float] = time.time,
        port: int = 25,
        tls: ssl.SSLContext | None = None,
        max_connections: int = 20,
        max_per_domain: int = 4,
        lifetime: float = 5 * 86400,
        timeout: float = 60,
        transports: Mapping[str, tuple[str, int]] | None = None,
        handoffs: handoff.Handoff | None = None,
        handoff_lifetime: float = HANDOFF_LIFETIME,
        mta_sts: mtasts.Policies | None = None,
        sts_tls: ssl.SSLContext | None = None,
    ) -> None:
        """`port` is the port of every MX destination (a relay host has its own). `tls` is the MX STARTTLS
        client context; by default MX delivery is opportunistic (TLS when offered, certificate not verified,
        as Postfix's smtp_tls_security_level=may). A relay host is secured as its `tls` says
        (`relay_tls_context`); raises ValueError when its CA file cannot be loaded. `handoffs` delivers the
        recipients routed to a home node (a clustered node's; None: a node alone). `mta_sts` looks up the
        MTA-STS policies of the domains routed by MX (None: not honoured); an enforced policy's MX hosts
        are verified with `sts_tls` (default: the system CAs)."""
        self._spool = spool
        self._hostname = hostname
        self._resolver = resolver
        self._relay_host = relay_host
        self._deliver_locally = deliver_locally
        self._metrics = metrics
        self._clock = clock
        self._port = port
        # domain -> (host, port), as Postfix's transport_maps: mail for these domains skips MX routing
        self._transports = dict(transports or {})
        self._wakeup = asyncio.Event()
        self._mx_tls = tls or _unverified_context()
        self._relay_tls = relay_tls_context(relay_host) if relay_host is not None else None
        if relay_host is not None and relay_host.tls not in wire_config.RELAY_TLS_VERIFIED:
            log.warning(
                "the relay host's identity is not verified",
                extra={"fields": {"relay_host": relay_host.host, "tls": relay_host.tls}},
            )
        self._max_per_domain = max(1, max_per_domain)
        self._connections = asyncio.Semaphore(max(1, max_connections))
        self._lifetime = lifetime
        self._handoffs = handoffs
        self._handoff_lifetime = max(lifetime, handoff_lifetime)
        self._timeout = timeout
        # The failures of this process's attempts, with the remote host: a bounce made after a restart
        # rebuilds them from the spool's last_error, without the host.
        self._failures: dict[str, dict[str, dsn.Failure]] = {}
        self._mta_sts = mta_sts
        self._sts_tls = sts_tls or ssl.create_default_context()

    # -- the loop -----------------------------------------------------------------------------------

    async def run(self, *, interval: float = 5.0, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Deliver until cancelled: a pass every `interval` seconds, or at once after `wake()` (new mail
        in the queue); a failed pass is logged."""
        while True:
            self._wakeup.clear()
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.exception("delivery pass failed", extra={"fields": {"error": str(error)}})
            waiters = {asyncio.ensure_future(sleep(interval)), asyncio.ensure_future(self._wakeup.wait())}
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()

    def wake(self) -> None:
        """New mail was queued: start the next pass now rather than at the end of the interval."""
        self._wakeup.set()

    async def run_once(self) -> int:
        """One pass over the due recipients; returns how many recipients were attempted."""
        now = self._clock()
        groups: dict[str, dict[str, _Job]] = collections.defaultdict(dict)
        handoffs: dict[str, _Job] = {}
        attempted = 0
        for message in await self._spool.due(now):
            for recipient in message.pending:
                if recipient.next_attempt > now:
                    continue
                if handoff.ordinal_of(recipient.route) is not None:
                    handoffs.setdefault(message.id, _Job(message, [])).addresses.append(recipient.address)
                    attempted += 1
                    continue
                key = "" if self._relay_host is not None else _domain(recipient.address)
                job = groups[key].setdefault(message.id, _Job(message, []))
                job.addresses.append(recipient.address)
                attempted += 1
        domains = list(groups)
        results = await asyncio.gather(
            *(self._deliver_domain(domain, list(groups[domain].values())) for domain in domains),
            *(self._hand_off(job) for job in handoffs.values()),
            return_exceptions=True,
        )
        domains += [f"(hand-off of {id})" for id in handoffs]
        for domain, result in zip(domains, results, strict=True):
            # one domain's trouble (a spool write that failed) must not keep the others' outcomes from counting
            if isinstance(result, Exception):
                log.error(
                    "delivery to a domain failed",
                    exc_info=result,
                    extra={"fields": {"domain": domain, "error": str(result)}},
                )
            elif isinstance(result, BaseException):
                raise result
        await self._finish_all()
        await self._update_gauges()
        return attempted

    # -- hand-offs to the home nodes ----------------------------------------------------------------------

    async def _hand_off(self, job: _Job) -> None:
        """One queued message to the homes of its due hand-off recipients, each home in one LMTP session."""
        message = job.message
        by_home: dict[int, list[str]] = collections.defaultdict(list)
        for address in job.addresses:
            stored = handoff.ordinal_of(message.recipient(address).route) or 0  # run_once took only node routes
            # the home the directory names now: the mailbox may have moved since it was queued
            current = self._handoffs.home_of(address) if self._handoffs is not None else None
            by_home[stored if current is None else current].append(address)
        data = await self._spool.read(message.id)
        for home, addresses in by_home.items():
            if self._handoffs is None:  # a queue from a clustered run opened by a node alone
                answers = dict.fromkeys(addresses, handoff.Answer(451, "451 4.3.0 this node is not clustered"))
            else:
                # the id of the attempt made before SMTP's 250, else one of this queue entry's own
                id = message.handoff or self._handoffs.id_for(f"q{message.id}")
                async with self._connections:
                    answers = await self._handoffs.send(
                        home, sender=message.sender, recipients=addresses, data=data, id=id
                    )
            where = f"node {home}"
            for address in addresses:
                answer = answers[address]
                result = "delivered" if answer.delivered else "failed" if answer.permanent else "deferred"
                outcome = _Outcome(result, answer.status, f"{where}: {answer.text}", where)
                await self._record(message, address, outcome, destination=where, handoff=True)

    # -- one domain ---------------------------------------------------------------------------------

    async def _deliver_domain(self, domain: str, jobs: list[_Job]) -> None:
        try:
            if domain in self._transports and self._relay_host is None:
                host, port = self._transports[domain]
                destinations = [routing.Destination(host, [host], port=port)]
            else:
                destinations = await routing.route(domain, resolver=self._resolver, relay_host=self._relay_host)
        except routing.RoutingError as error:
            result = "failed" if isinstance(error, routing.PermanentRoutingError) else "deferred"
            outcome = _Outcome(result, error.status, f"{error.status} {error}")
            for job in jobs:
                for address in job.addresses:
                    await self._record(job.message, address, outcome, destination="")
            return
        own_port = self._relay_host is not None or domain in self._transports
        if not own_port and self._mta_sts is not None and not domain.startswith("["):
            try:
                destinations = await self._apply_mta_sts(domain, destinations)
            except _ConnectFailed as error:
                outcome = _Outcome("deferred", error.status, error.reply)
                for job in jobs:
                    for address in job.addresses:
                        await self._record(job.message, address, outcome, destination="")
                return
        queue = collections.deque(jobs)
        workers = min(self._max_per_domain, math.ceil(len(jobs) / MESSAGES_PER_CONNECTION))
        await asyncio.gather(*(self._worker(destinations, queue, own_port) for _ in range(workers)))

    async def _apply_mta_sts(self, domain: str, destinations: list[routing.Destination]) -> list[routing.Destination]:
        """RFC 8461 §5: under an enforce policy, only the MX hosts the policy names, each over STARTTLS
        with a verified certificate; none left is a temporary failure (the mail waits, it is never sent
        in clear). testing and none change nothing here (TLS reporting is not built)."""
        assert self._mta_sts is not None
        policy = await self._mta_sts.get(domain)
        if policy is None or policy.mode != "enforce":
            return destinations
        allowed = [dataclasses.replace(d, tls="mta-sts") for d in destinations if mtasts.mx_matches(policy, d.host)]
        if not allowed:
            hosts = ", ".join(d.host for d in destinations)
            # RFC 3463 X.7.0: a security failure; 4xx: the policy or the MX may be fixed meanwhile
            raise _ConnectFailed(
                f"4.7.0 MTA-STS policy of {domain} (enforce) names none of its MX hosts ({hosts})", status="4.7.0"
            )
        return allowed

    async def _worker(
        self, destinations: list[routing.Destination], queue: collections.deque[_Job], own_port: bool
    ) -> None:
        """Takes messages from `queue` and delivers them over one connection, reconnecting after a break."""
        async with self._connections:
            connection: _Connection | None = None
            try:
                while queue:
                    job = queue.popleft()
                    if connection is None:
                        try:
                            connection = await self._connect(destinations, own_port=own_port)
                        except _ConnectFailed as error:
                            # every server of the route refused: the rest of this destination's mail waits too
                            outcome = _Outcome("deferred", error.status, error.reply)
                            rest = [job, *queue]
                            queue.clear()
                            for waiting in rest:
                                for address in waiting.addresses:
                                    await self._record(waiting.message, address, outcome, destination="")
                            return
                    if not await self._transaction(connection, job):
                        connection.client.close()
                        connection = None
            finally:
                if connection is not None:
                    await _quit(connection.client)

    async def _connect(self, destinations: list[routing.Destination], *, own_port: bool) -> _Connection:
        """The first server of the route that greets with 220 and completes EHLO (and, as required,
        STARTTLS and AUTH). RFC 5321 §5.1: try the addresses in order."""
        last = _ConnectFailed("4.4.1 no destination to try")
        for destination in destinations:
            port = destination.port if own_port else self._port
            for address in destination.addresses:
                # RFC 8314 §3.3: implicit TLS starts with the handshake; the host name is the one verified
                implicit = destination.tls == "implicit"
                client = aiosmtplib.SMTP(
                    hostname=address,
                    port=port,
                    local_hostname=self._hostname,
                    timeout=self._timeout,
                    use_tls=implicit,
                    start_tls=False,
                    tls_context=self._relay_tls if implicit else None,
                )
                try:
                    await client.connect()
                    await self._greet(client, destination)
                except _ConnectFailed as error:
                    last = error
                except aiosmtplib.SMTPResponseException as error:
                    last = _ConnectFailed(f"{destination.host}[{address}] said: {_reply(error.code, error.message)}")
                except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
                    where = f"{destination.host}[{address}]:{port}"
                    if (untrusted := _certificate_error(error)) is not None:
                        # RFC 3463 X.7.5, as Postfix says it: the mail waits until the certificate is trusted
                        reason = untrusted.verify_message or str(untrusted)
                        last = _ConnectFailed(f"4.7.5 TLS certificate of {where} not trusted: {reason}", status="4.7.5")
                    else:
                        last = _ConnectFailed(f"4.4.1 connect to {where}: {error}")
                else:
                    return _Connection(client, destination.host)
                client.close()
                log.info(
                    "delivery connection failed",
                    extra={"fields": {"destination": destination.host, "address": address, "error": last.reply}},
                )
        raise last

    async def _greet(self, client: aiosmtplib.SMTP, destination: routing.Destination) -> None:
        await _hello(client)
        where = destination.host
        policy = destination.tls
        if policy in ("implicit", "none"):
            pass  # TLS since the first byte, or plaintext as configured (and allowed)
        elif client.supports_extension("starttls"):
            contexts = {"opportunistic": self._mx_tls, "mta-sts": self._sts_tls}
            context = contexts.get(policy, self._relay_tls)
            # RFC 3207 §4.2: the server's extensions are forgotten after STARTTLS and asked again
            await client.starttls(server_hostname=destination.host, tls_context=context)
            await _hello(client)
        elif policy == "mta-sts":
            # RFC 8461 §4.2: the policy requires TLS to this MX; RFC 3463 X.7.4: security features not supported
            raise _ConnectFailed(
                f"4.7.4 {where} does not offer STARTTLS, which its domain's MTA-STS policy requires", status="4.7.4"
            )
        elif policy != "opportunistic":
            # never a silent downgrade: RFC 3207 §4 leaves it to the client to insist, and the relay's
            # credentials must not go in clear. RFC 3463 X.7.4: security features not supported.
            raise _ConnectFailed(
                f"4.7.4 {where} does not offer STARTTLS, which smtp.relay_host.tls: {policy} requires", status="4.7.4"
            )
        if destination.username is not None and destination.password is not None:
            try:
                await client.login(destination.username, destination.password)
            except aiosmtplib.SMTPResponseException as error:
                # a configuration problem here, not the mail's: keep it and try later
                raise _ConnectFailed(f"{where} refused the login: {_reply(error.code, error.message)}") from None

    async def _transaction(self, connection: _Connection, job: _Job) -> bool:
        """Deliver one message to its recipients at this destination. False when the connection broke
        (the recipients not yet answered are deferred)."""
        client, host = connection.client, connection.host
        message = job.message
        done: set[str] = set()

        async def record(address: str, outcome: _Outcome) -> None:
            done.add(address)
            await self._record(message, address, outcome, destination=host)

        try:
            if connection.transactions:
                await client.rset()
            connection.transactions += 1
            data = await self._spool.read(message.id)
            if not data.endswith(b"\r\n"):
                data += b"\r\n"
            options = []
            if client.supports_extension("size"):
                options.append(f"SIZE={len(data)}")  # RFC 1870
            if not data.isascii() and client.supports_extension("8bitmime"):
                options.append("BODY=8BITMIME")  # RFC 6152
            addresses = [message.sender, *job.addresses]
            utf8 = not all(a.isascii() for a in addresses)
            if utf8:
                if not client.supports_extension("smtputf8"):
                    # RFC 6531 §3.2: without SMTPUTF8 the server cannot take these addresses
                    outcome = _Outcome("failed", "5.6.7", f"5.6.7 {host} does not support SMTPUTF8", host)
                    for address in job.addresses:
                        await record(address, outcome)
                    return True
                options.append("SMTPUTF8")
            encoding = "utf-8" if utf8 else "ascii"
            mail_from = f"FROM:<{message.sender}>".encode(encoding)  # "<>" for the null sender
            reply = await client.execute_command(b"MAIL", mail_from, *(o.encode("ascii") for o in options))
            if reply.code // 100 != 2:
                outcome = _from_reply(reply.code, reply.message, host)
                for address in job.addresses:
                    await record(address, outcome)
                return True
            accepted: list[str] = []
            for address in job.addresses:
                reply = await client.execute_command(b"RCPT", f"TO:<{address}>".encode(encoding))
                if reply.code // 100 == 2:
                    accepted.append(address)
                else:
                    await record(address, _from_reply(reply.code, reply.message, host))
            if not accepted:
                return True
            try:
                reply = await client.data(data)
            except aiosmtplib.SMTPDataError as error:
                outcome = _from_reply(error.code, error.message, host)
            else:
                outcome = _Outcome("delivered", "2.0.0", _reply(reply.code, reply.message), host)
            for address in accepted:
                await record(address, outcome)
            return True
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            outcome = _Outcome("deferred", "4.4.2", f"4.4.2 connection with {host} lost: {error}", host)
            for address in job.addresses:
                if address not in done:
                    await record(address, outcome)
            return False

    # -- outcomes -------------------------------------------------------------------------------------

    async def _record(
        self, message: QueuedMessage, address: str, outcome: _Outcome, *, destination: str, handoff: bool = False
    ) -> None:
        lifetime = self._handoff_lifetime if handoff else self._lifetime
        if outcome.result == "deferred" and expired(message, self._clock(), lifetime):
            outcome = _Outcome(
                "failed", EXPIRED_STATUS, f"{EXPIRED_STATUS} delivery time expired; last error: {outcome.reply}"
            )
        next_attempt = None
        if handoff and outcome.result == "deferred":
            next_attempt = self._clock() + handoff_delay(message.recipient(address).attempts + 1)
        await self._spool.record_attempt(
            message.id,
            address,
            delivered=outcome.result == "delivered",
            permanent=outcome.result == "failed",
            error=outcome.reply,
            next_attempt=next_attempt,
        )
        if outcome.result == "failed":
            failure = dsn.Failure(address, outcome.status, outcome.reply, outcome.remote_mta)
            self._failures.setdefault(message.id, {})[address] = failure
        if self._metrics is not None:
            self._metrics.delivery_attempts.labels(outcome.result).inc()
        log.info(
            "delivery attempt",
            extra={
                "fields": {
                    "id": message.id,
                    "recipient": address,
                    "destination": destination,
                    "result": outcome.result,
                    "reply": outcome.reply,
                }
            },
        )

    async def _finish_all(self) -> None:
        """Bounce and remove every message with no pending recipient; this also finishes messages whose
        last recipient was recorded just before a crash."""
        for message in await self._spool.list():
            if not message.pending:
                await self._finish(message)

    async def _finish(self, message: QueuedMessage) -> None:
        known = self._failures.pop(message.id, {})
        failures = [
            known.get(r.address) or dsn.Failure(r.address, _status(r.last_error, "5.0.0"), r.last_error)
            for r in message.recipients
            if r.state == "failed"
        ]
        if failures and dsn.should_bounce(message.sender):
            bounce = dsn.build_bounce(
                original=await self._spool.read(message.id),
                sender=message.sender,
                reporting_mta=self._hostname,
                failures=failures,
                arrival=datetime.fromtimestamp(message.created, UTC),
                now=datetime.fromtimestamp(self._clock(), UTC),
            )
            local = False
            try:
                local = await self._deliver_locally(message.sender, bounce)
            except Exception as error:
                log.exception(
                    "local bounce delivery failed; queueing it",
                    extra={"fields": {"id": message.id, "sender": message.sender, "error": str(error)}},
                )
            if not local:
                await self._spool.enqueue("", [message.sender], bounce)  # RFC 5321 §4.5.5: null reverse-path
            if self._metrics is not None:
                self._metrics.bounces.inc()
            log.info(
                "bounce sent",
                extra={
                    "fields": {
                        "id": message.id,
                        "sender": message.sender,
                        "failed": [f.recipient for f in failures],
                        "local": local,
                    }
                },
            )
        elif failures:
            log.info(
                "undeliverable message not bounced",
                extra={
                    "fields": {"id": message.id, "sender": message.sender, "failed": [f.recipient for f in failures]}
                },
            )
        await self._spool.remove(message.id)

    async def _update_gauges(self) -> None:
        if self._metrics is None:
            return
        messages = await self._spool.list()
        self._metrics.queue_messages.set(len(messages))
        self._metrics.handoff_queue_messages.set(sum(1 for m in messages if is_handoff(m)))
        oldest = min((m.created for m in messages), default=None)
        self._metrics.queue_oldest_age.set(0 if oldest is None else max(0.0, self._clock() - oldest))


# -- helpers --------------------------------------------------------------------------------------------


def is_handoff(message: QueuedMessage) -> bool:
    """A message waiting to be handed to a home node (a pending recipient routed `node:<ordinal>`)."""
    return any(handoff.ordinal_of(r.route) is not None for r in message.pending)


def relay_tls_context(relay: routing.RelayHost) -> ssl.SSLContext | None:
    """The client context for the relay host: its certificate verified against the system CAs, or only
    `ca_file` when set, and its name checked (starttls, implicit); not verified at all
    (starttls-unverified); None for tls: none. Raises ValueError when `ca_file` cannot be loaded."""
    if relay.tls == "none":
        return None
    if relay.tls == "starttls-unverified":
        return _unverified_context()
    if relay.ca_file is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(relay.ca_file))
    except (OSError, ValueError) as error:  # ssl.SSLError is an OSError: not a PEM bundle
        raise ValueError(f"cannot load the CA bundle {relay.ca_file}: {error}") from error


def _unverified_context() -> ssl.SSLContext:
    # RFC 7435 opportunistic security: encrypt, do not insist on a valid certificate
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _certificate_error(error: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind a connection error (aiosmtplib wraps it), if any."""
    seen: BaseException | None = error
    for _ in range(8):  # a chain is short; the bound guards against a cycle
        if seen is None or isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower() if "@" in address else ""


def _reply(code: int, message: str) -> str:
    return f"{code} {' '.join(line.strip() for line in message.splitlines())}".strip()


def _status(text: str, default: str) -> str:
    match = _ENHANCED.search(text)
    return match.group(0) if match else default


def _from_reply(code: int, message: str, host: str) -> _Outcome:
    """RFC 5321 §4.2.1: 2yz done, 4yz try again later, 5yz do not; anything else is treated as 4yz."""
    text = _reply(code, message)
    if code // 100 == 5:
        return _Outcome("failed", _status(message, "5.0.0"), text, host)
    if code // 100 == 2:
        return _Outcome("delivered", _status(message, "2.0.0"), text, host)
    status = _status(message, "4.0.0")
    if not status.startswith("4"):
        status = "4.0.0"
    return _Outcome("deferred", status, text, host)


async def _hello(client: aiosmtplib.SMTP) -> None:
    try:
        await client.ehlo()
    except aiosmtplib.SMTPHeloError as error:
        if error.code // 100 == 4:
            raise
        await client.helo()  # RFC 5321 §3.2: a server that does not know EHLO


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        await client.quit()
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        client.close()
