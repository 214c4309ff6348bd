"""A mail node: the store, the directory, the SMTP listeners and the HTTP endpoints, started and
stopped together. `mailnode serve` runs one; tests start several in one process on port 0.

One WriteFence is shared by the store and the outbound queue, so the node's Checkpoint can hold every
write at once; archives are written on a Gateway of their own (mailnode.backup).

Clustered (`cluster.peers` lists more than one node), the node also listens for LMTP from its peers
(mailnode.smtp.lmtp) and hands mail for mailboxes homed elsewhere to them (mailnode.queue.handoff);
it listens for the IMAP sessions its peers proxy (`listen.imap_proxy`) and proxies the sessions of
mailboxes homed elsewhere to them (mailnode.imap.proxy). Every part of it reads the directory through
`_directory`: the file's, with the homes a mailbox move changed (mailnode.homes, mailnode.move).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from mailnode import dkim, move, tls
from mailnode import listener as door
from mailnode.admin import http
from mailnode.auth import Authenticator
from mailnode.backup import restore
from mailnode.backup.checkpoint import Checkpoint
from mailnode.backup.jobs import BackupJobs
from mailnode.cluster import Cluster
from mailnode.config import ConfigError, Directory, DirectoryWatcher, NodeConfig, read_internal_token
from mailnode.gateway import Gateway
from mailnode.homes import Homes
from mailnode.imap import proxy as imap_proxy
from mailnode.imap import server as imap
from mailnode.metrics import NodeMetrics
from mailnode.queue import handoff, mtasts, routing
from mailnode.queue.delivery import Deliverer
from mailnode.queue.spool import Spool
from mailnode.smtp import lmtp
from mailnode.smtp import server as smtp
from mailnode.smtp.inbound import InboundChecker
from mailnode.store.fence import WriteFence
from mailnode.store.mailstore import Delivery, MailStore
from mailnode.web import dav
from mailnode.web import server as web_server
from mailwire import admin

log = logging.getLogger(__name__)


class Node:
    def __init__(
        self,
        config: NodeConfig,
        *,
        gateway: Gateway | None = None,
        metrics: NodeMetrics | None = None,
        tls_poll_interval: float = 5.0,
    ) -> None:
        self.config = config
        # Many store threads: most of their time is spent waiting (fsync, the mailbox write lock), and
        # a read must not queue behind writes that wait.
        self.gateway = gateway or Gateway(workers=16)
        self.metrics = metrics or NodeMetrics()
        # Resolved once (the ordinal may come from $POD_NAME); an ordinal outside the peers fails start.
        self._cluster_error: str | None = None
        try:
            self.cluster = Cluster.from_config(config.cluster)
        except ValueError as error:
            self._cluster_error = str(error)
            self.cluster = Cluster(ordinal=0, peers=())
        self.handoffs: handoff.Handoff | None = None  # set at start when clustered
        self.imap_proxy: imap_proxy.Proxy | None = None  # likewise
        self.fence = WriteFence()  # every durable write passes it; a checkpoint pauses it
        self.store = MailStore(config.data_dir, gateway=self.gateway, fence=self.fence)
        self.homes = Homes(config.data_dir, ordinal=self.cluster.ordinal, domains=config.alias_domain_map())
        self.moves: move.Moves | None = None  # set at start
        self.watcher = DirectoryWatcher(
            config.directory_file,
            domains=config.alias_domain_map(),
            poll_interval=config.directory_poll_interval,
            on_reload=self._directory_reloaded,
        )
        # Seconds between looks at the certificate files: cert-manager renews weeks ahead of expiry,
        # and the kubelet itself takes up to a minute to update a mounted Secret.
        self._tls_poll_interval = tls_poll_interval
        self.tls = (
            None
            if config.tls is None
            else tls.ServerTLS(config.tls.cert_file, config.tls.key_file, on_reload=self._tls_reloaded)
        )
        # Password hashing is slow on purpose: it gets threads of its own, so a burst of logins
        # never queues mail reads and writes behind it.
        self.auth_gateway = Gateway(workers=2)
        self.authenticator = Authenticator(
            directory=self._directory,
            gateway=self.auth_gateway,
            metrics=self.metrics,
            base_delay=config.smtp.auth_failure_delay,
            max_delay=config.smtp.auth_failure_delay_max,
            cache_ttl=config.auth.cache_ttl,
        )
        self.metrics.track_store(size=self.store.total_bytes, messages=self.store.total_messages)
        self.spool = Spool(config.data_dir / "queue", gateway=self.gateway, fence=self.fence)
        self.checkpoint = Checkpoint(
            store=self.store, spool=self.spool, gateway=self.gateway, data_dir=config.data_dir,
            node=config.node_name, metrics=self.metrics,
        )  # fmt: skip
        # Writing an archive takes minutes: threads of its own, never the store's.
        self.backup_gateway = Gateway(workers=2)
        self.backups = BackupJobs(
            directory=config.backup_dir, checkpoint=self.checkpoint, gateway=self.backup_gateway,
            metrics=self.metrics, node=config.node_name,
        )  # fmt: skip
        self._dkim_keys: dict[str, tuple[str, bytes]] = {}  # domain -> (selector, private key)
        self._deliverer_task: asyncio.Task[None] | None = None
        self._inbound = InboundChecker(authserv_id=config.hostname)
        self.ports: dict[str, int] = {}
        self._servers: list[asyncio.Server] = []
        self._handlers: list[smtp.SMTPHandler] = []
        self._imap_sessions: list[set[imap.Session]] = []
        self._analyses = imap.AnalysisCache()  # shared by the imap and imaps listeners
        self._views = imap.FolderViews()  # likewise: sessions on one folder share its messages' state
        self._runner: web.AppRunner | None = None
        self._web: web_server.Listener | None = None  # the HTTPS listener (mailnode.web), with a certificate
        self._watch_tasks: list[asyncio.Task[None]] = []
        self._started = time.monotonic()
        self.ready = False
        self._dkim_records: list[dict[str, str]] = []

    def _directory(self) -> Directory:
        """The directory in force: the file's, with the homes moves changed (mailnode.homes)."""
        return self.homes.view(self.watcher.current)

    def _directory_reloaded(self, ok: bool, error: str | None) -> None:
        if ok and self.moves is not None:
            self.moves.reloaded()
        self.metrics.directory_reloads.labels("success" if ok else "failure").inc()
        self.metrics.directory_last_reload_ok.set(1 if ok else 0)
        self.metrics.directory_mailboxes.set(len(self.watcher.current.mailboxes))

    def _tls_reloaded(self, ok: bool, error: str | None) -> None:
        self.metrics.tls_reloads.labels("success" if ok else "failure").inc()
        if self.tls is not None:
            self.metrics.tls_certificate_expiry.set(self.tls.certificate.not_after.timestamp())

    def _load_dkim_records(self) -> list[dict[str, str]]:
        records = []
        for domain in self.config.domains:
            if domain.dkim is None:
                continue
            try:
                key = domain.dkim.key_file.read_bytes()
                found = dkim.record(key, domain=domain.domain, selector=domain.dkim.selector)
            except (OSError, ValueError) as error:
                raise ConfigError(f"domains: DKIM key of {domain.domain}: {error}") from error
            records.append({"type": "TXT", "name": found.name, "value": found.value})
            self._dkim_keys[domain.domain] = (domain.dkim.selector, key)
            for alias in domain.alias_domains:
                self._dkim_keys.setdefault(alias, (domain.dkim.selector, key))
        return records

    def _sign(self, domain: str, message: bytes) -> bytes:
        """DKIM-Signature for mail from `domain`, when the node has its key (called on the event loop:
        an RSA signature takes about a millisecond)."""
        found = self._dkim_keys.get(domain.lower())
        if found is None:
            return b""
        selector, key = found
        try:
            return dkim.sign(message, domain=domain.lower(), selector=selector, private_key=key)
        except Exception:  # a message dkimpy cannot sign still goes out, unsigned
            log.exception("dkim signing failed", extra={"fields": {"domain": domain}})
            return b""

    async def _check_inbound(self, ip: str, helo: str, sender: str, message: bytes) -> bytes:
        return await self.gateway.run(self._inbound.header, ip=ip, helo=helo, sender=sender, message=message)

    async def _deliver_bounce(self, address: str, message: bytes) -> bool:
        """Bounces for senders on this node go straight into their INBOX."""
        resolution = self._directory().resolve(address)
        if resolution.mailbox is None:
            return False
        if not self.cluster.is_home(resolution.mailbox):  # the sender's home takes it, through the queue
            route = handoff.route_to(resolution.mailbox.home)
            await self.spool.enqueue("", [resolution.mailbox.address], message, route=route)
            return True
        await self.store.deliver([Delivery(resolution.mailbox.address, b"Return-Path: <>\r\n" + message)])
        return True

    def _relay_host(self) -> routing.RelayHost | None:
        relay = self.config.smtp.relay_host
        if relay is None:
            return None
        password = None
        if relay.password_file is not None:
            try:
                password = relay.password_file.read_text().strip()
            except OSError as error:
                raise ConfigError(f"smtp.relay_host.password_file: {error.strerror}") from error
        return routing.RelayHost(relay.host, relay.port, relay.username, password, tls=relay.tls, ca_file=relay.ca_file)

    async def start(self) -> None:
        """Load the directory (an invalid one is fatal here: ConfigError), open the store, listen."""
        self._dkim_records = await self.gateway.run(self._load_dkim_records)
        if self.tls is not None:  # an unusable certificate is fatal at start: ConfigError
            await self.gateway.run(self.tls.load_initial)
            self.metrics.tls_certificate_expiry.set(self.tls.certificate.not_after.timestamp())
        context = None if self.tls is None else self.tls.context
        internal_token = await self.gateway.run(read_internal_token, self.config)
        if self._cluster_error is not None:
            raise ConfigError(f"cluster: {self._cluster_error}")
        if internal_token is None and self.cluster.clustered:
            raise ConfigError("cluster.peers lists several nodes: internal.token_file must name the internal token")
        if internal_token is None:
            log.warning("no internal token (internal.token_file): the admin port accepts changes from loopback only")
        elif self.cluster.clustered:
            self.handoffs = handoff.Handoff(
                cluster=self.cluster, directory=self._directory, token=internal_token,
                hostname=self.config.hostname,
            )  # fmt: skip
            self.imap_proxy = imap_proxy.Proxy(cluster=self.cluster, token=internal_token, metrics=self.metrics)
        await self.gateway.run(self.watcher.load_initial)
        self.metrics.directory_mailboxes.set(len(self.watcher.current.mailboxes))
        await self.gateway.run(self.checkpoint.clear_staging)
        await self.store.open()
        await self.spool.open()
        self.moves = move.Moves(
            store=self.store, cluster=self.cluster, homes=self.homes, directory=lambda: self.watcher.current,
            data_dir=self.config.data_dir, token=internal_token, metrics=self.metrics,
            close_sessions=self._close_sessions, nudge=self._nudge_handoffs,
        )  # fmt: skip
        await self.moves.start()
        smtp_config = self.config.smtp
        transports = {}
        for domain, target in smtp_config.transports.items():
            host, _, target_port = target.rpartition(":")
            transports[domain] = (host, int(target_port))
        relay_host = self._relay_host()
        resolver = routing.DNSPythonResolver()
        # RFC 8461: other domains' MTA-STS policies, for the mail routed by their MX records
        mta_sts = mtasts.Policies(resolver=resolver) if smtp_config.mta_sts else None
        try:
            self.deliverer = Deliverer(
                self.spool, hostname=self.config.hostname, resolver=resolver, mta_sts=mta_sts,
                relay_host=relay_host, deliver_locally=self._deliver_bounce, metrics=self.metrics,
                lifetime=smtp_config.queue_lifetime, transports=transports, handoffs=self.handoffs,
            )  # fmt: skip
        except ValueError as error:  # the relay host's CA bundle
            raise ConfigError(f"smtp.relay_host.ca_file: {error}") from error
        self._deliverer_task = asyncio.create_task(self.deliverer.run(interval=smtp_config.delivery_interval))
        listen = self.config.listen
        gates = self._connection_gates(tls=context is not None)
        proxy = None
        if listen.proxy_protocol.enabled:
            proxy = door.ProxyPolicy(
                trusted=[ipaddress.ip_network(str(n)) for n in listen.proxy_protocol.trusted],
                timeout=listen.proxy_protocol.timeout,
            )
        for listener, port in (
            (smtp.Listener.MX, listen.smtp),
            (smtp.Listener.SUBMISSION, listen.submission),
            (smtp.Listener.SUBMISSIONS, listen.submissions),
        ):
            if listener.is_submission and context is None:
                log.warning(
                    "no TLS certificate configured: submission listener not started (AUTH needs TLS)",
                    extra={"fields": {"listener": listener.value}},
                )
                continue
            handler = smtp.SMTPHandler(
                listener=listener,
                config=self.config,
                directory=self._directory,
                store=self.store,
                authenticator=self.authenticator,
                metrics=self.metrics,
                spool=self.spool,
                sign=self._sign,
                check_inbound=self._check_inbound if self.config.smtp.check_inbound else None,
                queued=self.deliverer.wake,
                cluster=self.cluster,
                handoffs=self.handoffs,
            )
            server = await smtp.start_listener(
                listener=listener, handler=handler, config=self.config, host=listen.host, port=port, tls=context,
                gate=gates[listener.value], proxy=proxy,
            )  # fmt: skip
            self._servers.append(server)
            self._handlers.append(handler)
            self.ports[listener.value] = server.sockets[0].getsockname()[1]
        if self.handoffs is not None and internal_token is not None:
            await self._start_lmtp(token=internal_token, gate=gates["lmtp"])
        for name, port, implicit in (("imap", listen.imap, False), ("imaps", listen.imaps, True)):
            if implicit and context is None:
                log.warning("no TLS certificate configured: imaps listener not started")
                continue
            imap_server, sessions = await imap.start_listener(
                config=self.config, directory=self._directory, store=self.store,
                authenticator=self.authenticator, metrics=self.metrics, host=listen.host, port=port, tls=context,
                implicit_tls=implicit, analyses=self._analyses, views=self._views, gate=gates[name], proxy=proxy,
                cluster=self.imap_proxy,
            )  # fmt: skip
            self._servers.append(imap_server)
            self._imap_sessions.append(sessions)
            self.ports[name] = imap_server.sockets[0].getsockname()[1]
        if self.imap_proxy is not None:
            await self._start_imap_proxy(gate=gates["imap_proxy"])
        backups = http.BackupOps(
            checkpoint=self.checkpoint, jobs=self.backups, restore=self.restore, max_hold=self.config.backup.max_hold
        )
        app = http.build_app(
            metrics=self.metrics, ready=lambda: self.ready, status=self.status, queue=self.spool, usage=self.usage,
            backups=backups, internal_token=internal_token, moves=self.moves,
        )  # fmt: skip
        self._runner, self.ports["http"] = await http.start(app, host=listen.host, port=listen.http)
        if context is not None:
            await self._start_web(context=context, gate=gates["https"], proxy=proxy, internal_token=internal_token)
        watched: list[tuple[Callable[[], object], float]] = [(self.watcher.check, self.config.directory_poll_interval)]
        if self.tls is not None:
            watched.append((self.tls.check, self._tls_poll_interval))
        self._watch_tasks = [asyncio.create_task(self._poll(check, interval)) for check, interval in watched]
        self.ready = True
        self.metrics.ready.set(1)
        log.info("node ready", extra={"fields": {"node": self.config.node_name, "ports": self.ports}})

    async def _start_web(
        self, *, context: ssl.SSLContext, gate: door.ConnectionGate, proxy: door.ProxyPolicy | None,
        internal_token: str | None,
    ) -> None:  # fmt: skip
        """The HTTPS listener: autoconfiguration, the MTA-STS policy, CalDAV/CardDAV (mailnode.web)."""
        clients = web_server.Clients()
        dav_handler = None
        if self.config.web.dav:
            dav_handler = dav.DAV(
                mail_root=self.config.data_dir, authenticator=self.authenticator, cluster=self.cluster,
                directory=self._directory, gateway=self.gateway, client_host=clients.host,
                max_request=self.config.web.max_request, internal_token=internal_token,
                frozen=self.store.is_frozen, open_mailbox=self.store.mailboxes.open,
            )  # fmt: skip
        app = web_server.Site(self.config, dav_handler=dav_handler).app()
        self._web = await web_server.start(
            app, host=self.config.listen.host, port=self.config.listen.https, tls=context, gate=gate, proxy=proxy,
            clients=clients, idle_timeout=self.config.web.idle_timeout,
        )  # fmt: skip
        self.ports["https"] = self._web.port

    async def _start_lmtp(self, *, token: str, gate: door.ConnectionGate) -> None:
        """The internal LMTP listener: mail for the mailboxes homed here, from the peer nodes."""
        handler = lmtp.LMTPHandler(
            token=token, config=self.config, directory=self._directory, store=self.store,
            authenticator=self.authenticator, metrics=self.metrics, cluster=self.cluster,
        )  # fmt: skip
        listen = self.config.listen
        server = await lmtp.start_listener(
            handler=handler, config=self.config, host=listen.host, port=listen.lmtp, gate=gate
        )
        self._servers.append(server)
        self._handlers.append(handler)
        self.ports["lmtp"] = server.sockets[0].getsockname()[1]

    async def _start_imap_proxy(self, *, gate: door.ConnectionGate) -> None:
        """The internal IMAP listener: sessions of the mailboxes homed here, proxied by the peer nodes
        (no TLS: the client's ended at the peer; no PROXY protocol: peers connect directly)."""
        listen = self.config.listen
        server, sessions = await imap.start_listener(
            config=self.config, directory=self._directory, store=self.store,
            authenticator=self.authenticator, metrics=self.metrics, host=listen.host, port=listen.imap_proxy,
            tls=None, implicit_tls=False, analyses=self._analyses, views=self._views, gate=gate,
            cluster=self.imap_proxy, internal=True,
        )  # fmt: skip
        self._servers.append(server)
        self._imap_sessions.append(sessions)
        self.ports["imap_proxy"] = server.sockets[0].getsockname()[1]

    def _connection_gates(self, *, tls: bool) -> dict[str, door.ConnectionGate]:
        """One gate per client listener, their totals fitted to the file descriptors the process may
        hold, so that a flood of idle connections leaves room for the store and the health checks."""
        limits = self.config.listen.limits
        wanted = {name: limits.smtp for name in ("smtp", "submission", "submissions")}
        wanted.update(imap=limits.imap, imaps=limits.imaps or limits.imap)
        wanted["https"] = limits.https
        if self.cluster.clustered:
            wanted["lmtp"] = limits.smtp
            wanted["imap_proxy"] = limits.imap
        if not tls:  # these listeners do not start without a certificate
            for name in ("submission", "submissions", "imaps", "https"):
                del wanted[name]
        fd_limit = door.raise_fd_limit()
        totals = door.fit_totals({name: limit.total for name, limit in wanted.items()}, fd_limit=fd_limit)
        fields = {"fd_limit": fd_limit, "reserve": door.FD_RESERVE, "totals": totals}
        if totals != {name: limit.total for name, limit in wanted.items()}:
            log.warning("connection limits lowered to fit the file descriptor limit", extra={"fields": fields})
        else:
            log.info("connection limits", extra={"fields": fields})
        return {
            name: door.ConnectionGate(
                listener=name, total=totals[name], per_client=min(limit.per_client, totals[name]), metrics=self.metrics
            )
            for name, limit in wanted.items()
        }

    def _close_sessions(self, address: str) -> list[asyncio.Task[Any]]:
        """A mailbox frozen for a move: its IMAP sessions here end with BYE [UNAVAILABLE]; their tasks."""
        tasks = []
        for sessions in self._imap_sessions:
            for session in list(sessions):
                if session.user is not None and session.user.address == address:
                    session.shut_down()
                    if session.task is not None:
                        tasks.append(session.task)
        return tasks

    async def _nudge_handoffs(self) -> None:
        """A mailbox thawed or homed elsewhere: what waits in the queue for a home node goes now."""
        if not self.spool.is_open:
            return
        for message in await self.spool.list():
            if any(handoff.ordinal_of(r.route) is not None for r in message.pending):
                with contextlib.suppress(KeyError):
                    await self.spool.retry_now(message.id)
        if self._deliverer_task is not None:
            self.deliverer.wake()

    async def _poll(self, check: Callable[[], object], interval: float) -> None:
        """Run a file watcher's `check` (the directory, the certificate) every `interval` seconds, on
        the Gateway: it reads files."""
        while True:
            await asyncio.sleep(interval)
            await self.gateway.run(check)

    async def stop(self, *, grace: float = 10.0) -> None:
        """Stop listening; give SMTP transactions in progress `grace` seconds to finish (their 250 is
        written before the session counts as idle); tell every SMTP session 421 and every IMAP
        session BYE; close the store."""
        self.ready = False
        self.metrics.ready.set(0)
        if self.checkpoint.holding:  # writes in progress must be able to finish
            self.checkpoint.end()
        for server in self._servers:
            server.close()
        for task in self._watch_tasks:
            task.cancel()
        connections = [c for handler in self._handlers for c in handler.connections]
        deadline = time.monotonic() + grace
        while any(not c.is_idle() for c in connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            connections = [c for c in connections if c.transport is not None]
        for connection in connections:
            connection.shut_down()
        if self._deliverer_task is not None:
            self._deliverer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._deliverer_task
        imap_tasks = []
        for sessions in self._imap_sessions:
            for session in list(sessions):
                session.shut_down()
                if session.task is not None:
                    imap_tasks.append(session.task)
        if imap_tasks:
            await asyncio.wait(imap_tasks, timeout=grace)
        # A session whose TLS handshake ended after the listeners closed began after the BYEs above, and
        # one may not have ended within the grace: cancelled, so that no session task outlives the node
        # (a pending task left behind is destroyed with its loop, mid-command).
        leftover = [
            session.task
            for sessions in self._imap_sessions
            for session in list(sessions)
            if session.task is not None and not session.task.done()
        ]
        for task in leftover:
            task.cancel()
        if leftover:
            await asyncio.wait(leftover, timeout=grace)
        if self._web is not None:  # before the store: a DAV request may be writing
            await self._web.close()
        await self.backups.close()
        if self.moves is not None:
            await self.moves.stop()
        await self.store.close()
        if self.spool.is_open:
            await self.spool.close()
        if self._runner is not None:
            await self._runner.cleanup()
        self.gateway.close()
        self.auth_gateway.close()
        self.backup_gateway.close()
        log.info("node stopped", extra={"fields": {"node": self.config.node_name}})

    async def restore(self, archive: Path, mailbox: str, target: str) -> restore.Restored:
        """POST /restore: `mailbox` from the archive into `target`, a mailbox of the directory now in force."""
        return await restore.restore_mailbox(
            store=self.store, gateway=self.backup_gateway, directory=self.watcher.current,
            archive_path=archive, mailbox=mailbox, target=target,
        )  # fmt: skip

    def usage(self) -> admin.Usage:
        """GET /usage: each mailbox of the directory with the bytes and messages it keeps (the operator
        copies them into the Mailbox's status). From memory: the store keeps the totals current."""
        mailboxes = {}
        for entry in self.watcher.current.mailboxes:
            used = self.store.usage(entry.address)
            mailboxes[entry.address] = admin.MailboxUsage(bytes=used.bytes, messages=used.messages)
        return admin.Usage(mailboxes=mailboxes)

    async def status(self) -> admin.Status:
        directory = self.watcher.current
        queued = await self.spool.list() if self.spool.is_open else []
        oldest = min((m.created for m in queued), default=None)
        return admin.Status(
            node=self.config.node_name,
            hostname=self.config.hostname,
            ready=self.ready,
            uptime_seconds=round(time.monotonic() - self._started, 1),
            domains=self.config.domains,
            listeners=self.ports,
            directory=admin.DirectoryStatus(
                version=directory.version, mailboxes=len(directory.mailboxes), last_error=self.watcher.last_error
            ),
            store=admin.StoreStatus(bytes=self.store.total_bytes(), messages=self.store.total_messages()),
            dns_records=[admin.DNSRecord(**record) for record in self._dkim_records],
            queue=admin.QueueStatus(
                messages=len(queued),
                oldest_age_seconds=0.0 if oldest is None else round(max(0.0, time.time() - oldest), 1),
            ),
            backup=self.checkpoint.status(last=self.backups.last),
            tls=None
            if self.tls is None
            else admin.TLSStatus(
                subject=self.tls.certificate.subject,
                not_after=self.tls.certificate.not_after.isoformat(),
                last_error=self.tls.last_error,
            ),
        )
