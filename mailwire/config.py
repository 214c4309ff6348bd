"""The node config (node.yaml, README "Node config"): every setting a mail node reads at start.

mailnode.config loads it from a file (relative paths, error messages); the operator's
mailfleet.specs.node builds it for a MailDomain and dumps it into the ConfigMap. Keys are snake_case and
sizes may be written as "25MiB": it is a file people write too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, Literal

import pydantic

from mailwire.fields import ByteSize, Domain, FileModel


class ConnectionLimit(FileModel):
    """Open connections of one listener: `total`, and `per_client` from one client address (IPv6: /64)."""

    total: int = pydantic.Field(1000, ge=1)
    per_client: int = pydantic.Field(20, ge=1)


class ConnectionLimits(FileModel):
    """Per listener (each SMTP and each IMAP listener has its own count), as Postfix's
    smtpd_client_connection_count_limit and Dovecot's mail_max_userip_connections. `imaps` unset: the
    same as `imap`; set, the implicit-TLS listener has its own, so that most of the file descriptors can
    go to the listener the clients use (10,000 IDLE sessions on `imap` with a few on `imaps`)."""

    smtp: ConnectionLimit = ConnectionLimit()
    imap: ConnectionLimit = ConnectionLimit(per_client=50)
    imaps: ConnectionLimit | None = None
    https: ConnectionLimit = ConnectionLimit(total=500)


class ProxyProtocolConfig(FileModel):
    """PROXY protocol v1/v2 on the SMTP and IMAP listeners (behind HAProxy, AWS NLB, ...): every
    connection must come from a `trusted` range and open with a header, whose client address the node
    uses from then on."""

    enabled: bool = False
    trusted: list[pydantic.IPvAnyNetwork] = []
    timeout: float = pydantic.Field(5.0, gt=0, description="seconds to wait for the header")

    @pydantic.model_validator(mode="after")
    def _trusted_when_enabled(self) -> ProxyProtocolConfig:
        if self.enabled and not self.trusted:
            raise ValueError("proxy_protocol.trusted: at least one range when enabled")
        return self


class ListenConfig(FileModel):
    """Where the listeners bind. A port of 0 lets the kernel choose (tests); `status()` tells which."""

    host: str = "0.0.0.0"
    smtp: int = pydantic.Field(2525, ge=0, le=65535)
    submission: int = pydantic.Field(5870, ge=0, le=65535)
    submissions: int = pydantic.Field(4650, ge=0, le=65535)
    imap: int = pydantic.Field(1430, ge=0, le=65535)
    imaps: int = pydantic.Field(9930, ge=0, le=65535)
    http: int = pydantic.Field(8080, ge=0, le=65535)
    # Internal (clustering): never on the client Service; started only when `cluster.peers` names more
    # than one node, and they require the internal credential (`internal.token_file`).
    lmtp: int = pydantic.Field(2424, ge=0, le=65535)  # mail handed over by the peers (RFC 2033)
    imap_proxy: int = pydantic.Field(1431, ge=0, le=65535)  # IMAP sessions proxied by the peers
    limits: ConnectionLimits = ConnectionLimits()
    proxy_protocol: ProxyProtocolConfig = ProxyProtocolConfig()
    # CalDAV/CardDAV, autoconfiguration and the MTA-STS policy (mailnode.web); needs `tls`.
    https: int = pydantic.Field(8443, ge=0, le=65535)


class TLSConfig(FileModel):
    cert_file: Path
    key_file: Path


# How the node secures its connection to the relay host (README "Node config"): STARTTLS or TLS from the
# first byte (port 465, RFC 8314 §3.3), with the certificate verified; STARTTLS without verification (a
# relay inside the cluster with a self-signed certificate); or none at all.
RelayTLS = Literal["starttls", "implicit", "starttls-unverified", "none"]
RELAY_TLS_VERIFIED: Final = ("starttls", "implicit")


class RelayHostConfig(FileModel):
    """All outbound mail through this host, over TLS as `tls` says (and AUTH when credentials are given)."""

    host: str
    port: int = pydantic.Field(587, ge=1, le=65535)
    username: str | None = None
    password_file: Path | None = None  # a file holding the password (a mounted Secret in a pod)
    tls: RelayTLS = "starttls"
    ca_file: Path | None = None  # PEM bundle the certificate is verified against instead of the system CAs
    # `tls: none` sends the mail, and the password of AUTH, in clear: only when this says so as well.
    allow_plaintext: bool = False

    @pydantic.model_validator(mode="before")
    @classmethod
    def _implicit_port(cls, data: object) -> object:
        # RFC 8314 §3.3: implicit TLS submission is port 465, so that is the default port for it
        if isinstance(data, dict) and data.get("tls") == "implicit" and "port" not in data:
            return {**data, "port": 465}
        return data

    @pydantic.model_validator(mode="after")
    def _tls_consistent(self) -> RelayHostConfig:
        if self.tls == "none" and not self.allow_plaintext:
            raise ValueError(
                "tls: none sends mail (and the relay password) in clear; set allow_plaintext: true to allow it"
            )
        if self.ca_file is not None and self.tls not in RELAY_TLS_VERIFIED:
            raise ValueError(f"ca_file is used only by tls: starttls or implicit, and tls is {self.tls}")
        return self


class SMTPConfig(FileModel):
    max_message_size: ByteSize = 25 * 1024 * 1024
    max_recipients: int = pydantic.Field(100, ge=1)
    # RFC 5321 §4.5.3.2.7: a server should wait at least 5 minutes for the next command.
    idle_timeout: float = pydantic.Field(300.0, gt=0)
    # Repeated AUTH failures from one client address are answered ever more slowly:
    # delay = min(auth_failure_delay * 2**(failures-1), auth_failure_delay_max).
    auth_failure_delay: float = pydantic.Field(0.5, ge=0)
    auth_failure_delay_max: float = pydantic.Field(16.0, ge=0)
    # Outbound: a relay host, or per-domain transports ("host:port", like Postfix's transport_maps);
    # every other domain is routed by its MX records.
    relay_host: RelayHostConfig | None = None
    # SPF and DKIM of mail from outside, reported in an Authentication-Results header (never refused)
    check_inbound: bool = True
    transports: dict[Domain, str] = {}
    queue_lifetime: float = pydantic.Field(5 * 86400.0, gt=0, description="seconds before a bounce")
    delivery_interval: float = pydantic.Field(5.0, gt=0, description="seconds between queue runs")
    # RFC 8461: honour the MTA-STS policies of the domains mail goes to (not for a relay host or transport)
    mta_sts: bool = True

    @pydantic.field_validator("transports")
    @classmethod
    def _transports(cls, value: dict[str, str]) -> dict[str, str]:
        for domain, target in value.items():
            host, _, port = target.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"transport of {domain}: {target!r} is not host:port")
        return value


class IMAPConfig(FileModel):
    # RFC 3501 §7.1: LOGIN before TLS exposes the password; allowed only for local development.
    allow_plaintext_login: bool = False
    # RFC 3501 §5.4: an inactivity timer of at least 30 minutes.
    idle_timeout: float = pydantic.Field(1800.0, gt=0)
    # Seconds from connecting to logging in (then `* BYE`): a short timer for anyone, the one above for
    # users (Dovecot gives a login process about 3 minutes; RFC 3501 §5.4 allows it).
    login_timeout: float = pydantic.Field(60.0, gt=0)
    max_line: ByteSize = pydantic.Field(64 * 1024, ge=1024)
    max_literal: ByteSize = pydantic.Field(64 * 1024 * 1024, ge=1024)  # the largest APPEND


class AuthConfig(FileModel):
    # Seconds a successful password check is remembered (0: never), as Dovecot's auth_cache_ttl.
    cache_ttl: float = pydantic.Field(300.0, ge=0)


class BackupConfig(FileModel):
    """Checkpoints and archives (docs/backups.md)."""

    dir: Path | None = None  # where POST /backups writes archives; default <data_dir>/backups
    # The longest a POST /snapshot may hold writes (its `hold`, 1..max_hold seconds).
    max_hold: float = pydantic.Field(600.0, ge=1)


class InternalConfig(FileModel):
    """The domain's internal credential (DESIGN.md "Clustering"): one token per MailDomain, which the
    operator keeps in the `<maildomain>-internal` Secret and mounts into every node of the domain. The
    admin port requires it (`Authorization: Bearer`) for every request that changes state; later, LMTP
    and the IMAP proxy between nodes carry it too. Without it (a bare `mailnode serve` for development)
    those requests are accepted from loopback clients only."""

    token_file: Path | None = None  # a file holding the token (a mounted Secret in a pod)


class PeerConfig(FileModel):
    """One node of the domain as the other nodes reach it: `<sts>-<i>.<sts>-headless.<ns>.svc` in a
    cluster, 127.0.0.1 and that node's ports under `mailfleet local up`."""

    host: str
    lmtp: int = pydantic.Field(2424, ge=1, le=65535)
    imap_proxy: int = pydantic.Field(1431, ge=1, le=65535)
    http: int = pydantic.Field(8080, ge=1, le=65535)
    https: int = pydantic.Field(8443, ge=1, le=65535)  # DAV requests of mailboxes homed there (mailnode.web.dav)


class ClusterConfig(FileModel):
    """The nodes that together serve the domain (DESIGN.md "Clustering"). Each mailbox has one home
    ordinal (the directory's `home`, chosen by the operator); a node never computes placement itself.
    `peers` lists every node by ordinal, this one included; empty or one entry: a node alone."""

    ordinal: int | None = pydantic.Field(
        None, ge=0, description="this node's ordinal; unset: the number ending $POD_NAME (a StatefulSet pod), else 0"
    )
    peers: list[PeerConfig] = []


# RFC 8461 §5: what a sending server does when TLS to an MX of the policy fails.
MTASTSMode = Literal["enforce", "testing", "none"]


class ClientPorts(FileModel):
    """The host and ports clients reach (autoconfiguration names them): the client Service's in a pod,
    the node's own under `mailfleet local up`. `host` unset: the node's `hostname`."""

    host: str | None = None
    imap: int = pydantic.Field(143, ge=1, le=65535)
    imaps: int = pydantic.Field(993, ge=1, le=65535)
    submission: int = pydantic.Field(587, ge=1, le=65535)
    submissions: int = pydantic.Field(465, ge=1, le=65535)
    https: int = pydantic.Field(443, ge=1, le=65535)


class WebConfig(FileModel):
    """The HTTPS listener (`listen.https`, mailnode.web): it faces the Internet, so it is bounded as the
    mail listeners are (`listen.limits.https`) and its requests are too."""

    dav: bool = True  # CalDAV and CardDAV (Radicale) under /dav/
    max_request: ByteSize = pydantic.Field(16 * 1024 * 1024, ge=1024)  # the largest body (a vCard with a photo)
    # Seconds a connection may send nothing while a request is being read (slow clients hold a slot)
    idle_timeout: float = pydantic.Field(60.0, gt=0)
    mta_sts_max_age: int = pydantic.Field(604800, ge=86400, le=31557600)  # RFC 8461 §3.2: up to a year
    client: ClientPorts = ClientPorts()


class DKIMConfig(FileModel):
    selector: str = pydantic.Field("mail", pattern=r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?$")
    key_file: Path  # RSA private key, PEM (`mailnode dkim-keygen`)


class DomainConfig(FileModel):
    domain: Domain
    alias_domains: list[Domain] = []
    dkim: DKIMConfig | None = None
    # RFC 8461: the mode of the policy served at https://mta-sts.<domain>/.well-known/mta-sts.txt
    mta_sts: MTASTSMode = "testing"


class NodeConfig(FileModel):
    node_name: str = "mailnode-0"
    hostname: Domain = pydantic.Field(description="The node's mail host name: greeting and Received")
    domains: list[DomainConfig] = pydantic.Field(min_length=1)
    data_dir: Path
    directory_file: Path
    directory_poll_interval: float = pydantic.Field(1.0, gt=0)
    listen: ListenConfig = ListenConfig()
    smtp: SMTPConfig = SMTPConfig()
    imap: IMAPConfig = IMAPConfig()
    auth: AuthConfig = AuthConfig()
    backup: BackupConfig = BackupConfig()
    internal: InternalConfig = InternalConfig()
    cluster: ClusterConfig = ClusterConfig()
    tls: TLSConfig | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    web: WebConfig = WebConfig()

    @pydantic.model_validator(mode="after")
    def _domains_unique(self) -> NodeConfig:
        seen: set[str] = set()
        for domain in self.domains:
            for name in (domain.domain, *domain.alias_domains):
                if name in seen:
                    raise ValueError(f"domain {name!r} is listed twice")
                seen.add(name)
        return self

    def alias_domain_map(self) -> dict[str, str]:
        """Every domain the node serves, mapped to its primary domain."""
        mapping: dict[str, str] = {}
        for domain in self.domains:
            mapping[domain.domain] = domain.domain
            mapping.update((alias, domain.domain) for alias in domain.alias_domains)
        return mapping

    @property
    def backup_dir(self) -> Path:
        return self.backup.dir if self.backup.dir is not None else self.data_dir / "backups"
