"""The node's IMAP4rev1 server (RFC 3501): `start_listener` serves IMAP (STARTTLS) or IMAPS and runs
one mailnode.imap.session.Session per connection, dispatching through mailnode.imap.commands.TABLE
(IDLE, UIDPLUS, MOVE, SPECIAL-USE, NAMESPACE, ID, ENABLE, LITERAL+, SASL-IR, UNSELECT, CHILDREN,
LIST-EXTENDED (basic), QUOTA, CONDSTORE). mailnode.node starts the listeners and keeps the sessions
(Session, AnalysisCache and FolderViews are named here for it). Clustered, it also starts the internal listener
(`internal=True`, `listen.imap_proxy`) on which peers log in the sessions they proxy (mailnode.imap.proxy).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable

from mailnode import listener as door
from mailnode.auth import Authenticator
from mailnode.config import Directory, NodeConfig
from mailnode.imap import commands
from mailnode.imap.proxy import Proxy
from mailnode.imap.session import AnalysisCache, FolderViews, Session
from mailnode.metrics import NodeMetrics
from mailnode.store.mailstore import MailStore

__all__ = ["AnalysisCache", "FolderViews", "Session", "start_listener"]

# The connection gate's refusals (mailnode.listener), instead of the greeting: RFC 3501 §7.1.5 lets a
# server send BYE and close at once; RFC 5530 §3 UNAVAILABLE: temporary, try again later.
TOO_MANY_FROM_CLIENT = b"* BYE [UNAVAILABLE] Too many connections from your address\r\n"
TOO_MANY_CONNECTIONS = b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n"


def refusal(reason: str) -> bytes:
    return TOO_MANY_FROM_CLIENT if reason == door.PER_CLIENT else TOO_MANY_CONNECTIONS


class _Connection(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol, giving the client's place at the gate back when the connection ends."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
        *,
        client: door.Client,
    ) -> None:
        super().__init__(reader, serve)
        self.client = client

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.closed()
        super().connection_lost(exc)


async def start_listener(
    *,
    config: NodeConfig,
    directory: Callable[[], Directory],
    store: MailStore,
    authenticator: Authenticator,
    metrics: NodeMetrics,
    host: str,
    port: int,
    tls: ssl.SSLContext | None,
    implicit_tls: bool,
    analyses: AnalysisCache,
    views: FolderViews,
    gate: door.ConnectionGate,
    proxy: door.ProxyPolicy | None = None,
    cluster: Proxy | None = None,
    internal: bool = False,
) -> tuple[asyncio.Server, set[Session]]:
    """Serve IMAP (STARTTLS) or IMAPS (implicit TLS) behind `gate` (and the PROXY protocol when `proxy`
    is given); with `cluster`, sessions of mailboxes homed elsewhere are proxied to their home. With
    `internal`, the internal port (no TLS: `tls` None), whose only login is a peer's master login.
    Returns the server and the set of live sessions."""
    sessions: set[Session] = set()
    listener = "imap_proxy" if internal else "imaps" if implicit_tls else "imap"

    def connection(client: door.Client) -> _Connection:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            session = Session(
                reader, writer, commands=commands.TABLE, config=config, directory=directory, store=store,
                authenticator=authenticator, metrics=metrics, tls=tls, implicit_tls=implicit_tls, listener=listener,
                analyses=analyses, views=views, remote=client.host, cluster=cluster, internal=internal,
            )  # fmt: skip
            session.task = asyncio.current_task()
            sessions.add(session)
            try:
                await session.run()
            finally:
                sessions.discard(session)

        return _Connection(asyncio.StreamReader(limit=config.imap.max_line), serve, client=client)

    entrance = door.Door(
        gate=gate, protocol=connection, refusal=refusal, proxy=proxy, tls=tls if implicit_tls else None
    )
    return await door.serve(entrance, host=host, port=port), sessions
