"""The node's server TLS: the certificate and key the config names, loaded into the SSLContext that the
SMTP and IMAP listeners hold, and kept current while the node runs.

cert-manager renews a certificate by updating the Secret the pod mounts; `ServerTLS.check` (polled by
mailnode.node, as the directory is) notices the new files, loads them into a fresh SSLContext first, so
that a broken or mismatched pair keeps the last good certificate in force, and then hands the new one
to every new handshake. Connections already open keep the session they have.

Two settings for many connections: resumption (TLS 1.3 session tickets, OpenSSL's default, kept on: a
client's next connection skips the certificate signature), and asyncio's per-connection read buffer,
cut from 256 KiB to ASYNCIO_TLS_BUFFER and shared by the connections of an event loop
(`trim_asyncio_buffers`) so that 10,000 idle TLS sessions fit in the node's memory.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import logging
import ssl
import threading
from asyncio import sslproto
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509

from mailnode.config import ConfigError

log = logging.getLogger(__name__)

# asyncio gives every TLS connection a read buffer of SSLProtocol.max_size (256 KiB), zero-filled, hence
# resident, from the handshake on: 2.5 GiB for 10,000 idle IMAP sessions. Two full TLS records (16 KiB of
# plaintext each, RFC 8446 §5.1) per read are plenty: a large APPEND takes a few more reads, nothing else.
ASYNCIO_TLS_BUFFER = 32 * 1024
# That buffer only carries the bytes of one recv_into() to the connection's own MemoryBIO, in the same
# callback (SSLProtocol.get_buffer, then buffer_updated copies them out): the connections of one event
# loop can share one. Per thread, as a loop is: the tests run the node's loop beside their own.
_shared_buffers = threading.local()


def _loop_buffer() -> bytearray:
    buffer: bytearray | None = getattr(_shared_buffers, "buffer", None)
    if buffer is None:
        buffer = _shared_buffers.buffer = bytearray(ASYNCIO_TLS_BUFFER)
    return buffer


def _sharing_init(init: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(init)
    def __init__(self: sslproto.SSLProtocol, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        buffer = _loop_buffer()  # the one it made itself is dropped at once
        self._ssl_buffer = buffer  # type: ignore[attr-defined]
        self._ssl_buffer_view = memoryview(buffer)  # type: ignore[attr-defined]

    __init__.shares_buffer = True  # type: ignore[attr-defined]
    return __init__


def trim_asyncio_buffers() -> None:
    """Give the TLS connections made from now on (in this process: asyncio's SSLProtocol is one class)
    a read buffer of ASYNCIO_TLS_BUFFER bytes, the one of their thread's event loop."""
    protocol = sslproto.SSLProtocol
    protocol.max_size = ASYNCIO_TLS_BUFFER
    if not getattr(protocol.__init__, "shares_buffer", False):
        setattr(protocol, "__init__", _sharing_init(protocol.__init__))  # noqa: B010 (mypy: no method assignment)


@dataclasses.dataclass(frozen=True)
class Certificate:
    """The certificate served now (the first one in the certificate file: the leaf)."""

    subject: str  # RFC 4514, as `openssl x509 -subject -nameopt RFC2253` prints it
    not_after: datetime.datetime


@dataclasses.dataclass(frozen=True)
class _Loaded:
    context: ssl.SSLContext
    certificate: Certificate
    digest: str


class ServerTLS:
    """The listeners' SSLContext, whose certificate follows the files.

    The listeners keep `context` for their whole life: an asyncio implicit-TLS server is bound to the
    context it was created with, and STARTTLS (aiosmtpd, IMAP) hands the one it was given to
    start_tls. So `context` stays the same object, and its server-name callback, which OpenSSL calls
    for every ClientHello (with or without SNI) before it chooses the certificate, moves the new
    connection onto the newest good context (SSL_set_SSL_CTX). Loading a new pair into the live
    context instead would not be safe: load_cert_chain installs the certificate before it reads the
    key, and a failure halfway would leave the listeners with a certificate and no matching key.

    Like the directory, the files are compared by content hash: Kubernetes updates a mounted Secret by
    swapping the `..data` symlink, so the paths stay the same while what they resolve to changes.
    `on_reload(ok, error)` reports every change once (metrics and logs live with the caller).
    """

    def __init__(
        self,
        cert_file: Path,
        key_file: Path,
        *,
        on_reload: Callable[[bool, str | None], None] = lambda ok, error: None,
    ) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self._on_reload = on_reload
        self._context: ssl.SSLContext | None = None
        self._current: _Loaded | None = None
        self._failed_version: str | None = None  # the digest (or read error) already reported
        self.last_error: str | None = None

    @property
    def context(self) -> ssl.SSLContext:
        """The context to give the listeners (after `load_initial`)."""
        assert self._context is not None, "load_initial() first"
        return self._context

    @property
    def certificate(self) -> Certificate:
        """The certificate new connections get."""
        assert self._current is not None, "load_initial() first"
        return self._current.certificate

    def load_initial(self) -> None:
        """The first load at start-up: a missing or unusable pair here is fatal (raises ConfigError)."""
        loaded = self._load()
        if loaded is None:  # being replaced right now: one more look
            loaded = self._load()
        if loaded is None:
            raise ConfigError(f"{self.cert_file}, {self.key_file}: the files keep changing while they are read")
        loaded.context.sni_callback = self._select
        self._context, self._current = loaded.context, loaded
        trim_asyncio_buffers()  # before the listeners take their first connection

    def _select(self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        """OpenSSL's server-name callback, on the event loop, during each handshake."""
        assert self._current is not None
        if self._current.context is not context:
            connection.context = self._current.context

    def _read(self) -> tuple[bytes, bytes]:
        try:
            return self.cert_file.read_bytes(), self.key_file.read_bytes()
        except OSError as error:
            raise ConfigError(f"{error.filename}: cannot read: {error.strerror}") from error

    def _load(self) -> _Loaded | None:
        """The pair in the files now, in a fresh context; None when the files changed while they were
        read (a writer that is not atomic: the next poll looks again). Raises ConfigError when the pair
        cannot be served."""
        files = self._read()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        # Resumption: OpenSSL's stateless tickets (its default; the ticket key is this context's, so a
        # reloaded certificate starts new sessions) and TLS 1.3's two tickets per handshake.
        context.options &= ~ssl.OP_NO_TICKET
        problem: Exception | None = None
        try:
            # load_cert_chain reads the files itself (it takes no bytes), hence the second read below.
            context.load_cert_chain(self.cert_file, self.key_file)
            certificate = x509.load_pem_x509_certificate(files[0])
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
            problem = error
        if self._read() != files:
            return None
        if problem is not None:
            raise ConfigError(f"{self.cert_file}, {self.key_file}: not a usable certificate and key: {problem}")
        described = Certificate(certificate.subject.rfc4514_string(), certificate.not_valid_after_utc)
        return _Loaded(context, described, _digest(files))

    def check(self) -> bool:
        """Load the files again if they changed. Returns True when new connections get a new
        certificate. Blocking (files, key parsing): the node runs it on its Gateway."""
        assert self._current is not None, "load_initial() first"
        try:
            digest = _digest(self._read())
        except ConfigError as error:
            return self._failed(str(error), version=str(error))
        if digest == self._current.digest:
            self._failed_version = self.last_error = None  # back to the pair in force
            return False
        try:
            loaded = self._load()
        except ConfigError as error:
            return self._failed(str(error), version=digest)
        if loaded is None:
            return False
        self._current, self._failed_version, self.last_error = loaded, None, None
        log.info(
            "tls certificate reloaded",
            extra={
                "fields": {"subject": loaded.certificate.subject, "not_after": loaded.certificate.not_after.isoformat()}
            },
        )
        self._on_reload(True, None)
        return True

    def _failed(self, error: str, *, version: str) -> bool:
        if version != self._failed_version:  # report each broken version once, not on every poll
            self._failed_version, self.last_error = version, error
            log.error(
                "tls certificate reload failed; keeping the last good certificate",
                extra={"fields": {"error": error, "subject": self.certificate.subject}},
            )
            self._on_reload(False, error)
        return False


def _digest(files: tuple[bytes, bytes]) -> str:
    cert, key = files
    return hashlib.sha256(hashlib.sha256(cert).digest() + hashlib.sha256(key).digest()).hexdigest()
