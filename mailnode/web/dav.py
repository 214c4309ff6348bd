"""CalDAV (RFC 4791) and CardDAV (RFC 6352) for every mailbox: Radicale, embedded, under /dav/ on the
HTTPS listener (mailnode.web.server routes to `DAV.handle`).

Why this shape:
- Radicale is a WSGI application; each request is run on the node's Gateway (a thread), as Radicale's
  storage reads and writes files, with the body read (bounded) on the event loop first.
- The password is checked here, on the event loop, by the node's Authenticator (the directory,
  passwords and app passwords, the throttling per client address that SMTP and IMAP share), before
  Radicale sees the request; Radicale's own `http_x_remote_user` then takes the mailbox we set (any
  X-Remote-User the client sent is dropped). Radicale's auth plugins run in its thread and could not
  use the Authenticator's timers.
- Storage is per mailbox: `<mailbox directory>/.dav/` (a name no IMAP folder can have: the store
  encodes a leading dot), one Radicale application per mailbox (its lock file in that directory), so
  a VolumeSnapshot of the volume holds calendars and contacts next to the mail; archives and moves carry
  it too (mailnode.store.davfiles). A request that may write holds davfiles' lock around Radicale's work
  and is refused (503, Retry-After) while the mailbox is frozen for a move: checked under the lock, so a
  write either lands before the move's final copy or not at all. Its first write opens the mailbox in
  the store, so a mailbox used only for calendars has an index and is in archives like any other.
- Clustered, a mailbox's calendars are on its home node: another node checks the password, then
  relays the request to the home's HTTPS port as the IMAP proxy does, with the domain's internal token
  instead of the user's password (`Authorization: Bearer`, the user in X-Mailfleet-User), and relays
  the answer back. The hop's TLS is not verified: the token, not the certificate, proves the peer (the
  IMAP hop carries it in clear on the internal port).
"""

from __future__ import annotations

import base64
import binascii
import collections
import hmac
import io
import json
import logging
import ssl
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

import aiohttp
import radicale.config
from aiohttp import web
from radicale.app import Application

from mailnode.auth import Authenticator
from mailnode.cluster import Cluster, UnknownPeer
from mailnode.config import Directory, MailboxEntry
from mailnode.gateway import Gateway
from mailnode.store import davfiles, maildir

log = logging.getLogger(__name__)

PREFIX: Final = "/dav"
DAV_DIR: Final = davfiles.DIR
REALM: Final = "mailfleet"
CACHED_APPS: Final = 256  # Radicale applications kept (one per mailbox recently used)
# What every new mailbox finds (Radicale's storage.predefined_collections): clients that do not create
# collections themselves (many phones) need one of each.
PREDEFINED: Final = {
    "calendar": {"tag": "VCALENDAR", "D:displayname": "Calendar", "C:supported-calendar-component-set": "VEVENT,VTODO"},
    "contacts": {"tag": "VADDRESSBOOK", "D:displayname": "Contacts"},
}
# Hop-by-hop headers (RFC 9110 §7.6.1) and the ones aiohttp sets itself
_SKIPPED_RESPONSE_HEADERS: Final = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})
USER_HEADER: Final = "x-mailfleet-user"  # the mailbox of a request a peer relays
_SKIPPED_RELAYED_HEADERS: Final = _SKIPPED_RESPONSE_HEADERS | {"host", "authorization", USER_HEADER}
RELAY_TIMEOUT: Final = 60.0  # seconds for the home's answer to a relayed request
# Methods that only read (RFC 4918, 4791, 6352, 3253): any other may change the storage.
READS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PROPFIND", "REPORT"})
FROZEN_RETRY_AFTER: Final = 10  # seconds: a move's freeze lasts a few (its hold is the bound)
_Answer = tuple[int, list[tuple[str, str]], bytes]  # status, headers, body of Radicale's answer


class _Apps:
    """Radicale applications by storage folder, the least recently used dropped past CACHED_APPS."""

    def __init__(self, *, max_request: int) -> None:
        self._lock = threading.Lock()
        self._apps: collections.OrderedDict[Path, Application] = collections.OrderedDict()
        self._max_request = max_request

    def get(self, folder: Path) -> Application:
        with self._lock:
            app = self._apps.get(folder)
            if app is None:
                app = self._apps[folder] = Application(self._configuration(folder))
                while len(self._apps) > CACHED_APPS:
                    self._apps.popitem(last=False)
            self._apps.move_to_end(folder)
            return app

    def _configuration(self, folder: Path) -> radicale.config.Configuration:
        configuration = radicale.config.load()
        configuration.update(
            {
                "auth": {"type": "http_x_remote_user"},  # the Authenticator has checked the password
                "rights": {"type": "owner_only"},
                "web": {"type": "none"},
                "server": {"max_content_length": str(self._max_request)},
                "storage": {
                    "type": "multifilesystem",
                    "filesystem_folder": str(folder),
                    "predefined_collections": json.dumps(PREDEFINED),
                },
            },
            "mailnode",
        )
        return configuration


class DAV:
    """The /dav/ requests of one node."""

    def __init__(
        self,
        *,
        mail_root: Path,
        authenticator: Authenticator,
        directory: Callable[[], Directory],
        cluster: Cluster,
        gateway: Gateway,
        client_host: Callable[[web.Request], str],
        max_request: int,
        internal_token: str | None = None,
        frozen: Callable[[str], bool] = lambda address: False,
        open_mailbox: Callable[[str], object] = lambda address: None,
    ) -> None:
        """`frozen(address)`: whether the mailbox is frozen for a move (called from Gateway threads too);
        `open_mailbox(address)`: blocking, makes the mailbox in the store if it is new."""
        self._frozen = frozen
        self._open_mailbox = open_mailbox
        self._internal_token = internal_token
        self._relay_session: aiohttp.ClientSession | None = None
        self._mail_root = mail_root
        self._authenticator = authenticator
        self._directory = directory
        self._cluster = cluster
        self._gateway = gateway
        self._client_host = client_host
        self._apps = _Apps(max_request=max_request)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        entry = self._relayed_user(request)
        if entry is None:
            credentials = _basic_credentials(request.headers.get("Authorization", ""))
            if credentials is None:
                return _unauthorized()
            remote = self._client_host(request)
            entry = await self._authenticator.authenticate(*credentials, remote=remote, protocol="dav")
            if entry is None:
                return _unauthorized()
            if not self._cluster.is_home(entry):
                return await self._relay(request, entry)
        writes = request.method.upper() not in READS
        if writes and self._frozen(entry.address):
            return _frozen()
        body = await request.read()  # bounded by the application's client_max_size
        mailbox = maildir.mailbox_dir(self._mail_root, entry.address)
        environ = _environ(request, body=body, user=entry.address, remote=self._client_host(request))
        if writes:
            answer = await self._gateway.run(self._write, entry.address, mailbox, environ)
            if answer is None:
                return _frozen()
            status, headers, content = answer
        else:
            status, headers, content = await self._gateway.run(self._call, mailbox / DAV_DIR, environ)
        response = web.Response(status=status, body=content)
        for name, value in headers:
            if name.lower() not in _SKIPPED_RESPONSE_HEADERS:
                response.headers.add(name, value)
        return response

    def _relayed_user(self, request: web.Request) -> MailboxEntry | None:
        """The mailbox of a request a peer relayed (its internal token and X-Mailfleet-User), homed here."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        user = request.headers.get(USER_HEADER)
        if self._internal_token is None or scheme.lower() != "bearer" or user is None:
            return None
        if not hmac.compare_digest(token.strip().encode(), self._internal_token.encode()):
            return None
        entry = self._directory().get(user)
        return entry if entry is not None and not entry.suspended and self._cluster.is_home(entry) else None

    async def _relay(self, request: web.Request, entry: MailboxEntry) -> web.StreamResponse:
        """The request, as the user made it, to the mailbox's home node; its answer back."""
        try:
            peer = self._cluster.peer(entry.home)
        except UnknownPeer:
            return web.Response(status=503, text="this mailbox's node is not known here yet\n")
        if self._internal_token is None:  # a clustered node always has one (Node.start insists)
            return web.Response(status=503, text="no internal token\n")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIPPED_RELAYED_HEADERS}
        headers.update({"Authorization": f"Bearer {self._internal_token}", USER_HEADER: entry.address})
        headers["Host"] = request.headers.get("Host", "")
        if self._relay_session is None:
            timeout = aiohttp.ClientTimeout(total=RELAY_TIMEOUT)
            self._relay_session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        try:
            async with self._relay_session.request(
                request.method, f"https://{peer.host}:{peer.https}{request.raw_path}", headers=headers,
                data=await request.read(), ssl=_UNVERIFIED, allow_redirects=False,
            ) as answer:  # fmt: skip
                content = await answer.read()
                response = web.Response(status=answer.status, body=content)
                for name, value in answer.headers.items():
                    if name.lower() not in _SKIPPED_RESPONSE_HEADERS:
                        response.headers.add(name, value)
                return response
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            log.info("DAV relay to the home failed", extra={"fields": {"home": entry.home, "error": str(error)}})
            return web.Response(status=503, text="this mailbox's node does not answer; try again later\n")

    async def close(self) -> None:
        if self._relay_session is not None:
            await self._relay_session.close()

    def _write(self, address: str, mailbox: Path, environ: dict[str, Any]) -> _Answer | None:
        """A request that may write (in a Gateway thread), under davfiles' lock; None when the mailbox is
        frozen (checked under the lock: see the module docstring)."""
        self._open_mailbox(address)
        with davfiles.locked(mailbox, exclusive=True):
            if self._frozen(address):
                return None
            return self._call(mailbox / DAV_DIR, environ)

    def _call(self, folder: Path, environ: dict[str, Any]) -> _Answer:
        """One request through Radicale (in a Gateway thread): status, headers and the whole body
        (Radicale builds its answers in memory anyway)."""
        app = self._apps.get(folder)
        answer: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: object = None) -> None:
            answer["status"], answer["headers"] = int(status.split(" ", 1)[0]), headers

        chunks: Iterable[bytes] = app(environ, start_response)
        try:
            content = b"".join(chunks)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        return answer["status"], answer["headers"], content


def _frozen() -> web.Response:
    return web.Response(
        status=503,
        headers={"Retry-After": str(FROZEN_RETRY_AFTER)},
        text="this mailbox is being moved to another node; try again in a few seconds\n",
    )


def _unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


_UNVERIFIED: Final = _unverified()


def _basic_credentials(header: str) -> tuple[str, str] | None:
    """RFC 7617: `Basic base64(user:password)`, UTF-8."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon and user else None


def _unauthorized() -> web.Response:
    return web.Response(
        status=401,
        headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
        text="authentication required: the mailbox address and its password or an app password\n",
    )


def _environ(request: web.Request, *, body: bytes, user: str, remote: str) -> dict[str, Any]:
    """The WSGI environ (PEP 3333) of an aiohttp request mounted at PREFIX, the mailbox as
    X-Remote-User and without the client's Authorization."""
    path = urllib.parse.unquote(request.raw_path.partition("?")[0])[len(PREFIX) :] or "/"
    host, _, port = (request.host or "").rpartition(":")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": PREFIX,
        "PATH_INFO": path.encode().decode("latin-1"),  # PEP 3333: native strings hold the bytes
        "QUERY_STRING": request.query_string,
        "SERVER_NAME": host or request.host,
        "SERVER_PORT": port or "443",
        "SERVER_PROTOCOL": f"HTTP/{request.version.major}.{request.version.minor}",
        "REMOTE_ADDR": remote,
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "https",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if "Content-Type" in request.headers:
        environ["CONTENT_TYPE"] = request.headers["Content-Type"]
    for name, value in request.headers.items():
        key = "HTTP_" + name.upper().replace("-", "_")
        if key in ("HTTP_AUTHORIZATION", "HTTP_X_REMOTE_USER", "HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
            continue
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    environ["HTTP_X_REMOTE_USER"] = user
    return environ
