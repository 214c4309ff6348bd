"""Node configuration and the mailbox directory: loading, address resolution, and hot reload.

Owns reading the two files a node reads besides mail: the node config (YAML, read once at start by
`mailnode serve`; relative paths are relative to the file) and the directory (mailboxes, password
hashes, aliases), which the operator renders into a Secret and which `DirectoryWatcher` reloads whenever
it changes, keeping the last good version when a new one is invalid. Protocol servers ask
`Directory.resolve` and never read these files. The files' shapes are the wire models of
mailwire.config and mailwire.directory, which the operator builds them from; their names are
re-exported here for the node's modules.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import hashlib
import logging
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final, Literal

import pydantic
import yaml

from mailwire.config import (
    AuthConfig,
    BackupConfig,
    DKIMConfig,
    DomainConfig,
    IMAPConfig,
    InternalConfig,
    ListenConfig,
    NodeConfig,
    RelayHostConfig,
    SMTPConfig,
    TLSConfig,
)
from mailwire.directory import AppPasswordEntry, DirectoryFile, MailboxEntry
from mailwire.fields import normalize_address, parse_size

# The wire models the node's modules know by these names.
__all__ = [
    "AppPasswordEntry",
    "AuthConfig",
    "BackupConfig",
    "ConfigError",
    "DKIMConfig",
    "Directory",
    "DirectoryFile",
    "DirectoryWatcher",
    "DomainConfig",
    "IMAPConfig",
    "InternalConfig",
    "ListenConfig",
    "MailboxEntry",
    "NodeConfig",
    "RelayHostConfig",
    "Resolution",
    "SMTPConfig",
    "TLSConfig",
    "load_node_config",
    "normalize_address",
    "parse_directory",
    "parse_size",
    "read_internal_token",
    "read_token_file",
]

log = logging.getLogger(__name__)


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
    smtp = config.smtp
    if (relay := smtp.relay_host) is not None:
        files = {"password_file": relay.password_file, "ca_file": relay.ca_file}
        relay = relay.model_copy(update={key: rooted(p) for key, p in files.items() if p is not None})
        smtp = smtp.model_copy(update={"relay_host": relay})
    internal = config.internal
    if internal.token_file is not None:
        internal = internal.model_copy(update={"token_file": rooted(internal.token_file)})
    return config.model_copy(
        update={
            "data_dir": rooted(config.data_dir),
            "directory_file": rooted(config.directory_file),
            "tls": tls,
            "domains": domains,
            "backup": backup,
            "smtp": smtp,
            "internal": internal,
        }
    )


def read_internal_token(config: NodeConfig) -> str | None:
    """The domain's internal token from `internal.token_file`, or None when the config names no file.
    Read by the node at start and by the `mailnode` commands that change a running node."""
    path = config.internal.token_file
    return None if path is None else read_token_file(path, what="internal.token_file")


def read_token_file(path: Path, *, what: str) -> str:
    """A token file's text without the surrounding white space (people write files with a final
    newline). ConfigError, naming `what`, for a file that cannot be read or is empty."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise ConfigError(f"{what}: {path}: cannot read: {reason}") from error
    if not token:
        raise ConfigError(f"{what}: {path} is empty")
    return token


# ---------------------------------------------------------------------------------------------------
# The directory


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
