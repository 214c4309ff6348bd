"""Node configuration and the mailbox directory: pydantic models, loading, and hot reload.

Owns the two files a node reads besides mail: the node config (YAML, read once at start by
`mailnode serve`) and the directory (mailboxes, password hashes, aliases), which the operator renders
into a Secret and which `DirectoryWatcher` reloads whenever it changes, keeping the last good version
when a new one is invalid. Protocol servers ask `Directory.resolve` and never read these files.
"""

from __future__ import annotations

import asyncio
import dataclasses
import decimal
import gzip
import hashlib
import logging
import re
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import pydantic
import yaml

from mailnode import passwords

log = logging.getLogger(__name__)

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object) -> int:
    """Bytes from an int or a size such as "25MiB", "1Gi" (Kubernetes quantity) or "500M"."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string such as '25MiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match and match.group(2).lower() in _SIZE_UNITS:
            return int(decimal.Decimal(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    raise ValueError(f"{value!r} is not a size (examples: 1048576, '25MiB', '1Gi', '500M')")


ByteSize = Annotated[int, pydantic.BeforeValidator(parse_size)]

_ADDRESS_RE = re.compile(r"^[^@\s<>]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")
_DOMAIN_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*$")


def normalize_address(address: str) -> str:
    """Addresses compare case-insensitively, as Postfix and Dovecot do by default."""
    return address.strip().lower()


def _address(value: str) -> str:
    value = normalize_address(value)
    if not _ADDRESS_RE.match(value):
        raise ValueError(f"{value!r} is not a mail address (local@domain)")
    return value


def _domain(value: str) -> str:
    value = value.strip().lower().rstrip(".")
    if not _DOMAIN_RE.match(value):
        raise ValueError(f"{value!r} is not a domain name")
    return value


Address = Annotated[str, pydantic.AfterValidator(_address)]
Domain = Annotated[str, pydantic.AfterValidator(_domain)]


class _Model(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------------
# The node config


class ListenConfig(_Model):
    """Where the listeners bind. A port of 0 lets the kernel choose (tests); `status()` tells which."""

    host: str = "0.0.0.0"
    smtp: int = pydantic.Field(2525, ge=0, le=65535)
    submission: int = pydantic.Field(5870, ge=0, le=65535)
    submissions: int = pydantic.Field(4650, ge=0, le=65535)
    imap: int = pydantic.Field(1430, ge=0, le=65535)
    imaps: int = pydantic.Field(9930, ge=0, le=65535)
    http: int = pydantic.Field(8080, ge=0, le=65535)


class TLSConfig(_Model):
    cert_file: Path
    key_file: Path


class RelayHostConfig(_Model):
    """All outbound mail through this host, with STARTTLS (and AUTH when credentials are given)."""

    host: str
    port: int = pydantic.Field(587, ge=1, le=65535)
    username: str | None = None
    password_file: Path | None = None  # a file holding the password (a mounted Secret in a pod)


class SMTPConfig(_Model):
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

    @pydantic.field_validator("transports")
    @classmethod
    def _transports(cls, value: dict[str, str]) -> dict[str, str]:
        for domain, target in value.items():
            host, _, port = target.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"transport of {domain}: {target!r} is not host:port")
        return value


class IMAPConfig(_Model):
    # RFC 3501 §7.1: LOGIN before TLS exposes the password; allowed only for local development.
    allow_plaintext_login: bool = False
    # RFC 3501 §5.4: an inactivity timer of at least 30 minutes.
    idle_timeout: float = pydantic.Field(1800.0, gt=0)
    max_line: ByteSize = pydantic.Field(64 * 1024, ge=1024)
    max_literal: ByteSize = pydantic.Field(64 * 1024 * 1024, ge=1024)  # the largest APPEND


class AuthConfig(_Model):
    # Seconds a successful password check is remembered (0: never), as Dovecot's auth_cache_ttl.
    cache_ttl: float = pydantic.Field(300.0, ge=0)


class BackupConfig(_Model):
    """Checkpoints and archives (docs/backups.md)."""

    dir: Path | None = None  # where POST /backups writes archives; default <data_dir>/backups
    # The longest a POST /snapshot may hold writes (its `hold`, 1..max_hold seconds).
    max_hold: float = pydantic.Field(600.0, ge=1)


class DKIMConfig(_Model):
    selector: str = pydantic.Field("mail", pattern=r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?$")
    key_file: Path  # RSA private key, PEM (`mailnode dkim-keygen`)


class DomainConfig(_Model):
    domain: Domain
    alias_domains: list[Domain] = []
    dkim: DKIMConfig | None = None


class NodeConfig(_Model):
    node_name: str = "mailnode-0"
    hostname: Domain = pydantic.Field(description="The node's mail host name: greeting and Received")
    domains: list[DomainConfig] = pydantic.Field(min_length=1)
    data_dir: Path
    directory_file: Path
    directory_poll_interval: float = pydantic.Field(1.0, gt=0)
    listen: ListenConfig = ListenConfig()
    tls: TLSConfig | None = None
    smtp: SMTPConfig = SMTPConfig()
    imap: IMAPConfig = IMAPConfig()
    auth: AuthConfig = AuthConfig()
    backup: BackupConfig = BackupConfig()
    log_level: Literal["debug", "info", "warning", "error"] = "info"

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


class ConfigError(Exception):
    """A config or directory file that cannot be used; the message names the field and the reason."""


def _format_validation_error(path: Path, error: pydantic.ValidationError) -> str:
    lines = [f"{path}: invalid"]
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        lines.append(f"  {where}: {problem['msg']}")
    return "\n".join(lines)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from error
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error


def load_node_config(path: Path) -> NodeConfig:
    """Read and validate the node config; relative paths in it are relative to the file."""
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: invalid\n  (top level): expected a mapping of settings")
    try:
        config = NodeConfig.model_validate(raw)
    except pydantic.ValidationError as error:
        raise ConfigError(_format_validation_error(path, error)) from error
    base = path.parent.resolve()

    def rooted(p: Path) -> Path:
        return p if p.is_absolute() else base / p

    tls = config.tls and TLSConfig(cert_file=rooted(config.tls.cert_file), key_file=rooted(config.tls.key_file))
    domains = [
        d.model_copy(update={"dkim": d.dkim.model_copy(update={"key_file": rooted(d.dkim.key_file)})})
        if d.dkim is not None
        else d
        for d in config.domains
    ]
    backup = config.backup
    if backup.dir is not None:
        backup = backup.model_copy(update={"dir": rooted(backup.dir)})
    return config.model_copy(
        update={
            "data_dir": rooted(config.data_dir),
            "directory_file": rooted(config.directory_file),
            "tls": tls,
            "domains": domains,
            "backup": backup,
        }
    )


# ---------------------------------------------------------------------------------------------------
# The directory


def _password_hash(value: str) -> str:
    if not passwords.is_hash(value):
        raise ValueError("expected an argon2 hash such as `mailnode hash-password` prints ($argon2id$...)")
    return value


PasswordHash = Annotated[str, pydantic.AfterValidator(_password_hash)]


class AppPasswordEntry(_Model):
    name: str
    password_hash: PasswordHash


class MailboxEntry(_Model):
    address: Address
    display_name: str = ""
    password_hash: PasswordHash
    quota: ByteSize = pydantic.Field(0, description="bytes; 0 means no limit")
    aliases: list[Address] = []
    forward_to: list[Address] = []
    suspended: bool = False
    app_passwords: list[AppPasswordEntry] = []


class DirectoryFile(_Model):
    mailboxes: list[MailboxEntry] = []


@dataclasses.dataclass(frozen=True)
class Resolution:
    """Where mail for one recipient address goes.

    kind is "local" (mailbox is set; forward_to lists further local or remote targets), "unknown" (a
    domain of the node, but no such mailbox or alias) or "foreign" (not a domain of the node).
    """

    kind: Literal["local", "unknown", "foreign"]
    mailbox: MailboxEntry | None = None


class Directory:
    """An immutable, validated snapshot of the directory, with address resolution."""

    def __init__(self, entries: Iterable[MailboxEntry], *, domains: dict[str, str], version: str = "") -> None:
        self.version = version
        self._domains = domains
        self._mailboxes: dict[str, MailboxEntry] = {}
        self._aliases: dict[str, str] = {}
        for entry in entries:
            self._check_domain(entry.address, f"mailbox {entry.address}")
            if entry.address in self._mailboxes or entry.address in self._aliases:
                raise ConfigError(f"address {entry.address} is defined twice")
            self._mailboxes[entry.address] = entry
        for entry in self._mailboxes.values():
            for alias in entry.aliases:
                self._check_domain(alias, f"alias {alias} of {entry.address}")
                if alias in self._mailboxes or alias in self._aliases:
                    raise ConfigError(f"alias {alias} of {entry.address} is already an address")
                self._aliases[alias] = entry.address

    def _check_domain(self, address: str, what: str) -> None:
        domain = address.rpartition("@")[2]
        if domain not in self._domains:
            raise ConfigError(f"{what}: domain {domain} is not served by this node")

    @classmethod
    def empty(cls, *, domains: dict[str, str]) -> Directory:
        return cls([], domains=domains, version="empty")

    @property
    def mailboxes(self) -> list[MailboxEntry]:
        return list(self._mailboxes.values())

    def get(self, address: str) -> MailboxEntry | None:
        return self._mailboxes.get(normalize_address(address))

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self._domains

    def resolve(self, address: str) -> Resolution:
        """Map a recipient to its mailbox: exact address, alias, alias domain, then `user+tag` form."""
        address = normalize_address(address)
        local, _, domain = address.rpartition("@")
        primary = self._domains.get(domain)
        if not local or primary is None:
            return Resolution("foreign")
        candidates = [f"{local}@{domain}", f"{local}@{primary}"]
        if "+" in local:
            base = local.split("+", 1)[0]
            candidates += [f"{base}@{domain}", f"{base}@{primary}"]
        for candidate in candidates:
            target = self._aliases.get(candidate, candidate)
            if (entry := self._mailboxes.get(target)) is not None:
                return Resolution("local", entry)
        return Resolution("unknown")

    def addresses_of(self, mailbox: MailboxEntry) -> set[str]:
        """The sender addresses a mailbox may use: its own, its aliases, and their alias-domain forms."""
        own = {mailbox.address, *mailbox.aliases}
        result = set(own)
        for address in own:
            local, _, domain = address.rpartition("@")
            result.update(f"{local}@{alias}" for alias, primary in self._domains.items() if primary == domain)
        return result


# libyaml's loader when PyYAML has it (the wheels do): a directory of 10,000 mailboxes reloads in a
# fraction of the time.
_YAML_LOADER: Final = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_directory(data: bytes, *, domains: dict[str, str], source: str = "directory") -> Directory:
    """Validate directory file contents (YAML, or gzip-compressed YAML as the operator writes a large
    directory); raises ConfigError naming the field and the reason."""
    version = hashlib.sha256(data).hexdigest()[:16]
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as error:
            raise ConfigError(f"{source}: gzip-compressed but cannot be decompressed: {error}") from error
    try:
        raw = yaml.load(data, Loader=_YAML_LOADER) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: invalid\n  (top level): expected a mapping with 'mailboxes'")
    try:
        parsed = DirectoryFile.model_validate(raw)
    except pydantic.ValidationError as error:
        raise ConfigError(_format_validation_error(Path(source), error)) from error
    try:
        return Directory(parsed.mailboxes, domains=domains, version=version)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from error


class DirectoryWatcher:
    """Holds the current directory and reloads it when the file changes.

    Kubernetes updates a mounted Secret by swapping a symlink, so the watcher compares the content
    hash rather than trusting mtimes. A new version that does not parse leaves the last good one in
    place; `on_reload(ok, error)` reports every attempt (log and metrics live with the caller).
    """

    def __init__(
        self,
        path: Path,
        *,
        domains: dict[str, str],
        poll_interval: float = 1.0,
        on_reload: Callable[[bool, str | None], None] = lambda ok, error: None,
    ) -> None:
        self.path = path
        self._domains = domains
        self._poll_interval = poll_interval
        self._on_reload = on_reload
        self._digest: str | None = None
        self.current = Directory.empty(domains=domains)
        self.last_error: str | None = None

    def load_initial(self) -> None:
        """The first load at start-up: an invalid directory here is fatal (raises ConfigError)."""
        data = self._read()
        self.current = parse_directory(data, domains=self._domains, source=str(self.path))
        self._digest = hashlib.sha256(data).hexdigest()

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as error:
            raise ConfigError(f"{self.path}: cannot read: {error.strerror}") from error

    def check(self) -> bool:
        """Reload if the file changed. Returns True when a new directory was installed."""
        try:
            data = self._read()
        except ConfigError as error:
            return self._failed(str(error), digest=None)
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._digest:
            return False
        try:
            directory = parse_directory(data, domains=self._domains, source=str(self.path))
        except ConfigError as error:
            return self._failed(str(error), digest=digest)
        self.current, self._digest, self.last_error = directory, digest, None
        log.info(
            "directory reloaded",
            extra={"fields": {"version": directory.version, "mailboxes": len(directory.mailboxes)}},
        )
        self._on_reload(True, None)
        return True

    def _failed(self, error: str, *, digest: str | None) -> bool:
        if error != self.last_error:  # report each distinct failure once, not on every poll
            self.last_error = error
            if digest is not None:
                self._digest = digest
            log.error(
                "directory reload failed; keeping the last good version",
                extra={"fields": {"error": error, "version": self.current.version}},
            )
            self._on_reload(False, error)
        return False

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            self.check()
