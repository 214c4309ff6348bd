"""A mail node: the store, the directory, the SMTP listeners and the HTTP endpoints, started and
stopped together. `mailnode serve` runs one; tests start several in one process on port 0.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any

from aiohttp import web

from mailnode import dkim
from mailnode.admin import http
from mailnode.auth import Authenticator
from mailnode.config import ConfigError, DirectoryWatcher, NodeConfig
from mailnode.gateway import Gateway
from mailnode.imap import server as imap
from mailnode.metrics import NodeMetrics
from mailnode.smtp import server as smtp
from mailnode.store.mailstore import MailStore

log = logging.getLogger(__name__)


def tls_context(config: NodeConfig) -> ssl.SSLContext | None:
    if config.tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls.cert_file, config.tls.key_file)
    return context


class Node:
    def __init__(
        self, config: NodeConfig, *, gateway: Gateway | None = None, metrics: NodeMetrics | None = None
    ) -> None:
        self.config = config
        # Many store threads: most of their time is spent waiting (fsync, the mailbox write lock), and
        # a read must not queue behind writes that wait.
        self.gateway = gateway or Gateway(workers=16)
        self.metrics = metrics or NodeMetrics()
        self.store = MailStore(config.data_dir, gateway=self.gateway)
        self.watcher = DirectoryWatcher(
            config.directory_file,
            domains=config.alias_domain_map(),
            poll_interval=config.directory_poll_interval,
            on_reload=self._directory_reloaded,
        )
        # Password hashing is slow on purpose: it gets threads of its own, so a burst of logins
        # never queues mail reads and writes behind it.
        self.auth_gateway = Gateway(workers=2)
        self.authenticator = Authenticator(
            directory=lambda: self.watcher.current,
            gateway=self.auth_gateway,
            metrics=self.metrics,
            base_delay=config.smtp.auth_failure_delay,
            max_delay=config.smtp.auth_failure_delay_max,
            cache_ttl=config.auth.cache_ttl,
        )
        self.metrics.track_store(size=self.store.total_bytes, messages=self.store.total_messages)
        self.ports: dict[str, int] = {}
        self._servers: list[asyncio.Server] = []
        self._handlers: list[smtp.SMTPHandler] = []
        self._imap_sessions: list[set[imap.Session]] = []
        self._analyses = imap.AnalysisCache()  # shared by the imap and imaps listeners
        self._runner: web.AppRunner | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._started = time.monotonic()
        self.ready = False
        self._dkim_records: list[dict[str, str]] = []

    def _directory_reloaded(self, ok: bool, error: str | None) -> None:
        self.metrics.directory_reloads.labels("success" if ok else "failure").inc()
        self.metrics.directory_last_reload_ok.set(1 if ok else 0)
        self.metrics.directory_mailboxes.set(len(self.watcher.current.mailboxes))

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
        return records

    async def start(self) -> None:
        """Load the directory (an invalid one is fatal here: ConfigError), open the store, listen."""
        self._dkim_records = await self.gateway.run(self._load_dkim_records)
        await self.gateway.run(self.watcher.load_initial)
        self.metrics.directory_mailboxes.set(len(self.watcher.current.mailboxes))
        await self.store.open()
        tls = tls_context(self.config)
        listen = self.config.listen
        for listener, port in (
            (smtp.Listener.MX, listen.smtp),
            (smtp.Listener.SUBMISSION, listen.submission),
            (smtp.Listener.SUBMISSIONS, listen.submissions),
        ):
            if listener.is_submission and tls is None:
                log.warning(
                    "no TLS certificate configured: submission listener not started (AUTH needs TLS)",
                    extra={"fields": {"listener": listener.value}},
                )
                continue
            handler = smtp.SMTPHandler(
                listener=listener,
                config=self.config,
                directory=lambda: self.watcher.current,
                store=self.store,
                authenticator=self.authenticator,
                metrics=self.metrics,
            )
            server = await smtp.start_listener(
                listener=listener, handler=handler, config=self.config, host=listen.host, port=port, tls=tls
            )
            self._servers.append(server)
            self._handlers.append(handler)
            self.ports[listener.value] = server.sockets[0].getsockname()[1]
        for name, port, implicit in (("imap", listen.imap, False), ("imaps", listen.imaps, True)):
            if implicit and tls is None:
                log.warning("no TLS certificate configured: imaps listener not started")
                continue
            imap_server, sessions = await imap.start_listener(
                config=self.config, directory=lambda: self.watcher.current, store=self.store,
                authenticator=self.authenticator, metrics=self.metrics, host=listen.host, port=port, tls=tls,
                implicit_tls=implicit, analyses=self._analyses,
            )  # fmt: skip
            self._servers.append(imap_server)
            self._imap_sessions.append(sessions)
            self.ports[name] = imap_server.sockets[0].getsockname()[1]
        app = http.build_app(metrics=self.metrics, ready=lambda: self.ready, status=self.status)
        self._runner, self.ports["http"] = await http.start(app, host=listen.host, port=listen.http)
        self._watch_task = asyncio.create_task(self._watch_directory())
        self.ready = True
        self.metrics.ready.set(1)
        log.info("node ready", extra={"fields": {"node": self.config.node_name, "ports": self.ports}})

    async def _watch_directory(self) -> None:
        while True:
            await asyncio.sleep(self.config.directory_poll_interval)
            await self.gateway.run(self.watcher.check)

    async def stop(self, *, grace: float = 10.0) -> None:
        """Stop listening; give SMTP transactions in progress `grace` seconds to finish (their 250 is
        written before the session counts as idle); tell every SMTP session 421 and every IMAP
        session BYE; close the store."""
        self.ready = False
        self.metrics.ready.set(0)
        for server in self._servers:
            server.close()
        if self._watch_task is not None:
            self._watch_task.cancel()
        connections = [c for handler in self._handlers for c in handler.connections]
        deadline = time.monotonic() + grace
        while any(not c.is_idle() for c in connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            connections = [c for c in connections if c.transport is not None]
        for connection in connections:
            connection.shut_down()
        imap_tasks = []
        for sessions in self._imap_sessions:
            for session in list(sessions):
                session.shut_down()
                if session.task is not None:
                    imap_tasks.append(session.task)
        if imap_tasks:
            await asyncio.wait(imap_tasks, timeout=grace)
        await self.store.close()
        if self._runner is not None:
            await self._runner.cleanup()
        self.gateway.close()
        self.auth_gateway.close()
        log.info("node stopped", extra={"fields": {"node": self.config.node_name}})

    def status(self) -> dict[str, Any]:
        directory = self.watcher.current
        return {
            "node": self.config.node_name,
            "hostname": self.config.hostname,
            "ready": self.ready,
            "uptime_seconds": round(time.monotonic() - self._started, 1),
            "domains": [d.model_dump(mode="json") for d in self.config.domains],
            "listeners": self.ports,
            "directory": {
                "version": directory.version,
                "mailboxes": len(directory.mailboxes),
                "last_error": self.watcher.last_error,
            },
            "store": {"bytes": self.store.total_bytes(), "messages": self.store.total_messages()},
            "dns_records": self._dkim_records,
        }
