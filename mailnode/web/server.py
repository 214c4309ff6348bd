"""The node's HTTPS listener (`listen.https`: 8443 in the pod, 443 on the client Service): Thunderbird
autoconfig, Microsoft Autodiscover, Apple profiles (mailnode.web.autoconfig), the MTA-STS policy
(mailwire.mtasts) and CalDAV/CardDAV (mailnode.web.dav). node.py starts it when the node has a certificate.

It faces the Internet, so every connection passes the same door as the mail listeners (mailnode.listener:
the connection gate per listener and per client address, the PROXY protocol header, implicit TLS with
the node's ServerTLS context, which follows certificate renewals), requests are bounded (body
`web.max_request`, aiohttp's line and header limits) and a connection that sends nothing for
`web.idle_timeout` seconds while the node waits for it is closed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Final

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from mailnode import listener as door
from mailnode.web import autoconfig, dav
from mailwire import mtasts
from mailwire.config import NodeConfig

log = logging.getLogger(__name__)

THUNDERBIRD_PATHS: Final = ("/mail/config-v1.1.xml", "/.well-known/autoconfig/mail/config-v1.1.xml")
# Outlook asks with either spelling; aiohttp's router is case-sensitive
AUTODISCOVER_PATHS: Final = ("/autodiscover/autodiscover.xml", "/Autodiscover/Autodiscover.xml")
MOBILECONFIG_PATH: Final = "/apple/mailfleet.mobileconfig"
MTA_STS_PATH: Final = "/.well-known/mta-sts.txt"
AUTODISCOVER_MAX_BODY: Final = 16 * 1024  # an Autodiscover request is a few hundred bytes
REFUSAL: Final = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class Site:
    """What the routes answer from: the node config (domains, host names, ports) and, with DAV, the
    Radicale bridge."""

    def __init__(self, config: NodeConfig, *, dav_handler: dav.DAV | None) -> None:
        self._config = config
        self._domains = config.alias_domain_map()
        self._modes = {d.domain: d.mta_sts for d in config.domains}
        self._servers = autoconfig.Servers.of(config)
        self._dav = dav_handler

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._config.web.max_request)
        for path in THUNDERBIRD_PATHS:
            app.router.add_get(path, self.thunderbird)
        for path in AUTODISCOVER_PATHS:
            app.router.add_route("*", path, self.autodiscover)
        app.router.add_get(MOBILECONFIG_PATH, self.mobileconfig)
        app.router.add_get(MTA_STS_PATH, self.mta_sts)
        if self._dav is not None:
            # RFC 6764 §5: the well-known URIs redirect to the context path, where a PROPFIND of
            # current-user-principal finds the user's principal and home sets
            for name in ("caldav", "carddav"):
                app.router.add_route("*", f"/.well-known/{name}", self.well_known_dav)
            app.router.add_route("*", dav.PREFIX, self._dav.handle)
            app.router.add_route("*", dav.PREFIX + "/{tail:.*}", self._dav.handle)
            app.on_cleanup.append(self._close)
        return app

    async def _close(self, app: web.Application) -> None:
        if self._dav is not None:
            await self._dav.close()

    def _served(self, domain: str) -> str | None:
        """The primary domain of a domain this node serves, else None."""
        return self._domains.get(domain.strip().lower().rstrip("."))

    def _domain_of(self, request: web.Request, address: str | None, *, prefix: str) -> str | None:
        """The domain a client asks about: its address's, else the Host's after `prefix`
        (autoconfig.example.com)."""
        if address:
            return address.rpartition("@")[2]
        host = (request.host or "").rpartition(":")[0] or request.host or ""
        return host[len(prefix) :] if host.lower().startswith(prefix) else None

    async def thunderbird(self, request: web.Request) -> web.Response:
        asked = self._domain_of(request, request.query.get("emailaddress"), prefix="autoconfig.")
        if asked is None or self._served(asked) is None:
            raise web.HTTPNotFound(text="no mail domain of this server\n")
        body = autoconfig.thunderbird(self._servers, domain=asked.lower())
        return web.Response(body=body, content_type="application/xml", charset="utf-8")

    async def autodiscover(self, request: web.Request) -> web.Response:
        if request.method != "POST":
            raise web.HTTPMethodNotAllowed(request.method, ["POST"])
        if request.content_length is not None and request.content_length > AUTODISCOVER_MAX_BODY:
            raise web.HTTPRequestEntityTooLarge(max_size=AUTODISCOVER_MAX_BODY, actual_size=request.content_length)
        body = bytearray()
        while chunk := await request.content.readany():  # the whole body, never more than the bound
            body += chunk
            if len(body) > AUTODISCOVER_MAX_BODY:
                raise web.HTTPRequestEntityTooLarge(max_size=AUTODISCOVER_MAX_BODY, actual_size=len(body))
        try:
            address = autoconfig.autodiscover_address(bytes(body))
        except autoconfig.AutodiscoverError as error:
            raise web.HTTPBadRequest(text=f"{error}\n") from error
        if self._served(address.rpartition("@")[2]) is None:
            raise web.HTTPNotFound(text="no mail domain of this server\n")
        answer = autoconfig.autodiscover(self._servers, address=address)
        return web.Response(body=answer, content_type="application/xml", charset="utf-8")

    async def mobileconfig(self, request: web.Request) -> web.Response:
        address = request.query.get("emailaddress", "").strip()
        if "@" not in address or self._served(address.rpartition("@")[2]) is None:
            raise web.HTTPNotFound(text="?emailaddress= must name an address of this server's domains\n")
        body = autoconfig.mobileconfig(self._servers, address=address)
        return web.Response(
            body=body,
            content_type=autoconfig.MOBILECONFIG_TYPE,
            headers={"Content-Disposition": 'attachment; filename="mailfleet.mobileconfig"'},
        )

    async def mta_sts(self, request: web.Request) -> web.Response:
        # RFC 8461 §3.3: served only at https://mta-sts.<domain>/, the Host naming the domain
        asked = self._domain_of(request, None, prefix="mta-sts.")
        primary = None if asked is None else self._served(asked)
        if primary is None:
            raise web.HTTPNotFound(text="no MTA-STS policy for this host\n")
        text = mtasts.policy(
            mode=self._modes[primary], mx=[self._config.hostname], max_age=self._config.web.mta_sts_max_age
        )
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    async def well_known_dav(self, request: web.Request) -> web.Response:
        raise web.HTTPMovedPermanently(location=dav.PREFIX + "/")


class Clients:
    """The client address of each open connection (the PROXY header's, else the socket's), for the
    Authenticator's throttling: aiohttp only knows the socket's."""

    def __init__(self) -> None:
        self._hosts: dict[asyncio.BaseTransport, str] = {}

    def opened(self, transport: asyncio.BaseTransport, host: str) -> None:
        self._hosts[transport] = host

    def closed(self, transport: asyncio.BaseTransport) -> None:
        self._hosts.pop(transport, None)

    def host(self, request: web.Request) -> str:
        transport = request.transport
        found = None if transport is None else self._hosts.get(transport)
        return found or request.remote or "unknown"


class _Connection(asyncio.Protocol):
    """aiohttp's RequestHandler behind the door: the gate's place given back when it closes, and the
    connection closed when it sends nothing for `idle` seconds while its answer is not being written."""

    def __init__(self, handler: RequestHandler, client: door.Client, *, clients: Clients, idle: float) -> None:
        self._handler = handler
        self._client = client
        self._clients = clients
        self._idle = idle
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._writing_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._clients.opened(transport, self._client.host)
        self._handler.connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self._idle, self._expired)

    def _expired(self) -> None:
        self._timer = None
        if self._writing_paused:  # the client is slow to read a long answer: not idle
            self._arm()
        elif self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._arm()
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        self._handler.eof_received()
        return None

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._clients.closed(self._transport)
        try:
            self._handler.connection_lost(exc)
        finally:
            self._client.closed()


class Listener:
    """A running HTTPS listener: its port, and `close` for the node's stop."""

    def __init__(self, runner: web.AppRunner, server: asyncio.Server) -> None:
        self._runner = runner
        self._server = server
        self.port: int = server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._server.close()
        await self._runner.cleanup()  # closes the open connections (aiohttp's Server tracks them)


async def start(
    app: web.Application,
    *,
    host: str,
    port: int,
    tls: ssl.SSLContext,
    gate: door.ConnectionGate,
    proxy: door.ProxyPolicy | None,
    clients: Clients,
    idle_timeout: float,
) -> Listener:
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=idle_timeout)
    await runner.setup()
    server = runner.server
    assert server is not None

    def make(client: door.Client) -> asyncio.BaseProtocol:
        return _Connection(server(), client, clients=clients, idle=idle_timeout)

    listening = await door.serve(
        door.Door(gate=gate, protocol=make, refusal=lambda reason: REFUSAL, proxy=proxy, tls=tls), host=host, port=port
    )
    return Listener(runner, listening)
