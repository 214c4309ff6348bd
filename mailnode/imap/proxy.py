"""IMAP between the nodes of a cluster (DESIGN.md "Clustering"): a session logged in on a node that is
not its mailbox's home is proxied to the home, as Dovecot's proxy does. One `Proxy` per node, built by
mailnode.node when clustered; mailnode.imap.commands.auth uses both of its sides:

- the client-facing side (`connect`, then `Upstream.relay`): after the user's own password was checked
  here, open the home's internal IMAP port (`listen.imap_proxy`, no TLS: the client's TLS ends at this
  node), log in there as the user with the domain's internal credential, then relay bytes both ways
  without parsing them, so IDLE, literals and every extension pass through unchanged;
- the home side (`admit`): the internal port's only way in is that master login, SASL PLAIN with the
  user as authorization identity and INTERNAL_USER and the token as credentials (RFC 4616 §2).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import logging
import ssl

from mailnode.cluster import INTERNAL_USER, Cluster, UnknownPeer
from mailnode.config import Directory, MailboxEntry
from mailnode.imap import responses
from mailnode.metrics import NodeMetrics

log = logging.getLogger(__name__)

CHUNK = 64 * 1024  # bytes relayed per read: with drain() after each write, what one direction buffers
_TAG = "P1"  # the tag of the internal login, the only command the proxy itself sends
_TAIL = 1024  # the home's last bytes kept, to tell whether it said BYE before closing


class Unavailable(Exception):
    """The home cannot take the session (down, slow, or refusing the internal login)."""


class Refusal(Exception):
    """The internal port refuses a login: `reason` is the label counted in mailnode_imap_proxy_refused."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Proxy:
    def __init__(self, *, cluster: Cluster, token: str, metrics: NodeMetrics, connect_timeout: float = 5.0) -> None:
        """`token`: the domain's internal token; `connect_timeout`: how long a home may take to take a login."""
        self.cluster = cluster
        self._token = token
        self._metrics = metrics
        self._connect_timeout = connect_timeout

    def is_home(self, entry: MailboxEntry) -> bool:
        return self.cluster.is_home(entry)

    # -- the home's side: the internal port -------------------------------------------------------------

    def admit(self, directory: Directory, *, authzid: str, authcid: str, password: str) -> MailboxEntry:
        """The mailbox a peer's master login acts as (RFC 4616 §2: the authorization identity), or
        Refusal: not the internal credential, or a mailbox that is not (or no longer) homed here."""
        if authcid != INTERNAL_USER:  # a user's own credentials are never accepted on this port
            raise self.refused("not_internal")
        if not hmac.compare_digest(password.encode(), self._token.encode()):
            raise self.refused("wrong_token")
        entry = directory.get(authzid)
        if entry is None or entry.suspended or not self.cluster.is_home(entry):
            raise self.refused("not_home")
        return entry

    def refused(self, reason: str) -> Refusal:
        """Count a refusal on the internal port and return it to raise."""
        self._metrics.imap_proxy_refused.labels(reason).inc()
        log.warning("imap proxy login refused", extra={"fields": {"reason": reason}})
        return Refusal(reason)

    # -- the client-facing side -------------------------------------------------------------------------

    async def connect(self, user: MailboxEntry) -> Upstream:
        """A session logged in as `user` on its home, or Unavailable. The home's tagged OK is kept to
        answer the client's login with (its CAPABILITY is the home's, after login)."""
        try:
            return await asyncio.wait_for(self._connect(user), self._connect_timeout)
        except (Unavailable, TimeoutError, OSError, ValueError, UnknownPeer, asyncio.IncompleteReadError) as error:
            self._metrics.imap_proxy_logins.labels("unavailable").inc()
            reason = str(error) or type(error).__name__
            fields = {"user": user.address, "home": user.home, "error": reason}
            log.warning("imap proxy: home unavailable", extra={"fields": fields})
            raise Unavailable(str(error)) from None

    async def _connect(self, user: MailboxEntry) -> Upstream:
        peer = self.cluster.peer(user.home)
        reader, writer = await asyncio.open_connection(peer.host, peer.imap_proxy, limit=CHUNK)
        try:
            greeting = await reader.readline()
            if not greeting.startswith(b"* OK"):
                raise Unavailable(f"greeting {greeting[:80]!r}")
            # RFC 4616 §2: authzid NUL authcid NUL password; RFC 4959: the initial response on the line.
            plain = f"{user.address}\0{INTERNAL_USER}\0{self._token}".encode()
            writer.write(f"{_TAG} AUTHENTICATE PLAIN {base64.b64encode(plain).decode()}\r\n".encode())
            await writer.drain()
            while True:
                line = await reader.readline()
                if not line:
                    raise Unavailable("the home closed the connection during the login")
                if line.startswith(f"{_TAG} ".encode()):
                    break
            if not line.startswith(f"{_TAG} OK".encode()):
                raise Unavailable(f"the home refused the internal login: {line[:120]!r}")
        except BaseException:
            writer.close()
            raise
        self._metrics.imap_proxy_logins.labels("proxied").inc()
        return Upstream(reader, writer, logged_in=line[len(_TAG) + 1 :].rstrip(b"\r\n"), metrics=self._metrics)


class Upstream:
    """A session on the home, logged in; `relay` joins it to the client's connection."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, logged_in: bytes, metrics: NodeMetrics
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._logged_in = logged_in
        self._metrics = metrics
        self._tail = b""

    def logged_in(self, tag: str) -> bytes:
        """The home's answer to the login (`OK [CAPABILITY ...] Logged in`), tagged as the client's."""
        return tag.encode() + b" " + self._logged_in

    async def relay(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        """Relay bytes both ways until either side closes; then close the other. When the home goes
        first without having said BYE (it crashed, or the network failed), tell the client
        `* BYE [UNAVAILABLE]` (RFC 3501 §7.1.5, RFC 5530 §3): its reconnect lands when the home is back.
        What the client sent after its login (pipelined) is in `client`'s buffer and goes first."""
        self._metrics.imap_proxied_sessions.inc()
        upward = asyncio.create_task(self._pump(client, self._writer, keep_tail=False))
        downward = asyncio.create_task(self._pump(self._reader, to_client, keep_tail=True))
        try:
            done, _ = await asyncio.wait({upward, downward}, return_when=asyncio.FIRST_COMPLETED)
            home_went_first = downward in done and upward not in done
            if home_went_first and not self._said_bye() and not to_client.is_closing():
                with contextlib.suppress(ConnectionError, ssl.SSLError):
                    to_client.write(responses.BYE_HOME_UNAVAILABLE.line().encode() + b"\r\n")
                    await to_client.drain()
        finally:
            for task in (upward, downward):
                task.cancel()
            await asyncio.gather(upward, downward, return_exceptions=True)
            self._metrics.imap_proxied_sessions.dec()
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, keep_tail: bool) -> None:
        """Copy until end of file or an error on either end: a bounded read, then drain (backpressure)."""
        with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            while data := await reader.read(CHUNK):
                if keep_tail:
                    self._tail = (self._tail + data)[-_TAIL:]
                writer.write(data)
                await writer.drain()

    def _said_bye(self) -> bool:
        """Whether one of the home's last lines was an untagged BYE (LOGOUT, autologout, shutdown)."""
        return any(line.startswith(b"* BYE") for line in self._tail.split(b"\r\n")[-3:])
