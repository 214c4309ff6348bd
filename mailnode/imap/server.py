"""The node's IMAP4rev1 server (RFC 3501): `start_listener` serves IMAP (STARTTLS) or IMAPS and runs
one mailnode.imap.session.Session per connection, dispatching through mailnode.imap.commands.TABLE
(IDLE, UIDPLUS, MOVE, SPECIAL-USE, NAMESPACE, ID, ENABLE, LITERAL+, SASL-IR, UNSELECT, CHILDREN,
LIST-EXTENDED (basic), QUOTA, CONDSTORE). mailnode.node starts the listeners and keeps the sessions
(Session and AnalysisCache are named here for it).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from mailnode.auth import Authenticator
from mailnode.config import Directory, NodeConfig
from mailnode.imap import commands
from mailnode.imap.session import AnalysisCache, Session
from mailnode.metrics import NodeMetrics
from mailnode.store.mailstore import MailStore

__all__ = ["AnalysisCache", "Session", "start_listener"]


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
) -> tuple[asyncio.Server, set[Session]]:
    """Serve IMAP (STARTTLS) or IMAPS (implicit TLS). Returns the server and the set of live sessions."""
    sessions: set[Session] = set()
    listener = "imaps" if implicit_tls else "imap"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(
            reader, writer, commands=commands.TABLE, config=config, directory=directory, store=store,
            authenticator=authenticator, metrics=metrics, tls=tls, implicit_tls=implicit_tls, listener=listener,
            analyses=analyses,
        )  # fmt: skip
        session.task = asyncio.current_task()
        sessions.add(session)
        try:
            await session.run()
        finally:
            sessions.discard(session)

    server = await asyncio.start_server(
        serve, host=host, port=port, ssl=tls if implicit_tls else None, reuse_address=True, backlog=512,
        limit=config.imap.max_line,
    )  # fmt: skip
    return server, sessions
