"""The two files a mail node reads: the node config (mailwire.config.NodeConfig) and the directory
(mailwire.directory.DirectoryFile), built as those wire models and dumped to the plain data the
operator renders into a ConfigMap and a Secret.

The models are the ones mailnode reads the files with (the operator never imports mailnode; both import
mailwire), so a field the node does not know cannot be written. Only the fields set here are dumped:
the node's defaults stay the node's.
"""

from __future__ import annotations

import gzip
import ipaddress
import json
import zlib
from collections.abc import Mapping
from typing import Any, Final

import yaml

from mailfleet import api
from mailfleet.specs import common, placement
from mailwire import config as wire_config
from mailwire import directory as wire_directory


def node_config(
    domain: api.MailDomain,
    *,
    data_dir: str = common.DATA_DIR,
    directory_file: str = f"{common.DIRECTORY_DIR}/{common.DIRECTORY_KEY}",
    tls_dir: str | None = common.TLS_DIR,
    relay_username: str | None = None,
    backup_dir: str | None = None,
    internal_token_file: str = f"{common.INTERNAL_DIR}/{common.INTERNAL_KEY}",
) -> dict[str, Any]:
    """The node config of the domain's nodes. `tls_dir` is where the TLS Secret is mounted (no TLS when
    spec.tls is unset, whatever tls_dir says); `relay_username` comes from spec.smtp.relaySecretRef's
    Secret, which the caller reads (the password stays in the Secret, mounted as a file); `backup_dir` is
    where spec.backup.archiveClaimName is mounted (the StatefulSet mounts it at common.BACKUP_DIR; None, or no
    claim: the node's own <data_dir>/backups); `internal_token_file` is where the internal Secret's token is
    (the StatefulSet mounts it at common.INTERNAL_DIR)."""
    spec = domain.spec
    entry: dict[str, Any] = {"domain": spec.domain, "alias_domains": list(spec.alias_domains)}
    if spec.mta_sts != "testing":  # only what differs from the node's default: no roll for the others
        entry["mta_sts"] = spec.mta_sts
    if spec.dkim is not None:
        key_file = f"{common.DKIM_DIR}/{common.DKIM_KEY}"
        entry["dkim"] = wire_config.DKIMConfig(selector=spec.dkim.selector, key_file=key_file)
    smtp: dict[str, Any] = {"max_message_size": api.quantity_value(spec.smtp.max_message_size)}
    if spec.smtp.relay_host is not None:
        host, port = _split_relay_host(spec.smtp.relay_host)
        relay: dict[str, Any] = {"host": host}
        if port is not None:
            relay["port"] = port
        if spec.smtp.relay_secret_ref is not None:
            if relay_username is not None:
                relay["username"] = relay_username
            relay["password_file"] = f"{common.RELAY_DIR}/password"
        # only what differs from the node's defaults: an unchanged domain keeps an unchanged config (no roll)
        if spec.smtp.relay_tls != "starttls":
            relay["tls"] = spec.smtp.relay_tls
        if spec.smtp.relay_allow_plaintext:
            relay["allow_plaintext"] = True
        if spec.smtp.relay_ca_secret_ref is not None:
            relay["ca_file"] = f"{common.RELAY_CA_DIR}/{common.RELAY_CA_KEY}"
        smtp["relay_host"] = wire_config.RelayHostConfig(**relay)
    fields: dict[str, Any] = {
        "hostname": common.mail_host(domain),
        "domains": [wire_config.DomainConfig(**entry)],
        "data_dir": data_dir,
        "directory_file": directory_file,
        "listen": wire_config.ListenConfig(
            host="0.0.0.0", **common.CONTAINER_PORTS, **_internal_ports(domain), **_proxy_protocol(domain)
        ),
        "smtp": wire_config.SMTPConfig(**smtp),
        "internal": wire_config.InternalConfig(token_file=internal_token_file),
    }
    if common.clustered(domain):
        # DESIGN.md "Clustering": every node by ordinal, this one included; `cluster.ordinal` stays unset,
        # each pod takes it from $POD_NAME (the StatefulSet sets it), so one ConfigMap serves them all.
        peers = [
            wire_config.PeerConfig(
                host=common.pod_host(domain, i), http=common.CONTAINER_PORTS["http"], **_internal_ports(domain)
            )
            for i in range(domain.spec.replicas)
        ]
        fields["cluster"] = wire_config.ClusterConfig(peers=peers)
    if spec.backup is not None and spec.backup.archive_claim_name is not None and backup_dir is not None:
        fields["backup"] = wire_config.BackupConfig(dir=backup_dir)
    if spec.tls is not None and tls_dir is not None:
        fields["tls"] = wire_config.TLSConfig(cert_file=f"{tls_dir}/tls.crt", key_file=f"{tls_dir}/tls.key")
        fields["web"] = wire_config.WebConfig(dav=spec.dav.enabled)  # the HTTPS listener needs the certificate
    config = wire_config.NodeConfig(**fields)
    return config.model_dump(mode="json", exclude_unset=True)


def _internal_ports(domain: api.MailDomain) -> dict[str, int]:
    """The internal ports as the config names them (lmtp, imap_proxy), for a domain of several nodes."""
    if not common.clustered(domain):
        return {}
    return {name.replace("-", "_"): port for name, port in common.INTERNAL_PORTS.items()}


def _proxy_protocol(domain: api.MailDomain) -> dict[str, Any]:
    """spec.service.proxyProtocol as the listen section's proxy_protocol (nothing when it is off)."""
    proxy = domain.spec.service.proxy_protocol
    if not proxy.enabled:
        return {}
    # strict=False: "10.1.2.3/8" means 10.0.0.0/8, as HAProxy reads it
    trusted = [str(ipaddress.ip_network(cidr, strict=False)) for cidr in proxy.trusted_ranges]
    return {"proxy_protocol": {"enabled": True, "trusted": trusted}}


def _split_relay_host(relay_host: str) -> tuple[str, int | None]:
    """Postfix relayhost syntax: "[host]:port", "host:port" or "host" (brackets: no MX lookup, which the
    node never does for a relay anyway)."""
    host, port = relay_host, None
    if relay_host.startswith("["):
        host, _, rest = relay_host[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif ":" in relay_host:
        host, _, number = relay_host.rpartition(":")
        port = int(number)
    return host, port


def domain_of(address: object) -> str:
    """The DNS domain of a mail address, lower case ("" for no address)."""
    return str(address or "").rpartition("@")[2].lower()


def domains_of(domain: api.MailDomain) -> set[str]:
    return {domain.spec.domain, *domain.spec.alias_domains}


def password_key(selector: api.SecretKeySelector) -> str:
    """The key of `passwords` for a Secret key: "secretName/key"."""
    return f"{selector.name}/{selector.key}"


def served_mailboxes(domain: api.MailDomain, mailboxes: list[api.Mailbox]) -> list[api.Mailbox]:
    """The mailboxes the domain's directory holds (address in the domain or an alias domain), by address."""
    served = domains_of(domain)
    return [m for m in sorted(mailboxes, key=lambda m: m.spec.address) if m.spec.address.rpartition("@")[2] in served]


def homes(
    domain: api.MailDomain, mailboxes: list[api.Mailbox], *, recorded: Mapping[str, int] | None = None
) -> dict[str, int]:
    """The home ordinal of each mailbox the directory holds, by lower-case address: the one `recorded` in
    the current directory (`recorded_homes`), else by rendezvous hashing (specs.placement)."""
    addresses = [m.spec.address for m in served_mailboxes(domain, mailboxes)]
    return placement.homes(addresses, domain.spec.replicas, recorded=recorded or {})


def recorded_homes(entries: list[dict[str, Any]]) -> dict[str, int]:
    """address -> home of a directory's entries (`read_directory`); a missing home is ordinal 0."""
    found: dict[str, int] = {}
    for entry in entries:
        home = entry.get("home", 0)
        if isinstance(entry.get("address"), str) and isinstance(home, int) and not isinstance(home, bool):
            found[entry["address"].lower()] = home
    return found


def directory(
    domain: api.MailDomain,
    mailboxes: list[api.Mailbox],
    passwords: Mapping[str, str],
    *,
    placed: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The directory file of the domain: its mailboxes (`served_mailboxes`), with their homes (`placed`,
    from `homes`; None: placed by rendezvous alone). `passwords` maps "secretName/key" to argon2 hashes:
    the caller hashes plaintext values (slow on purpose, so not in a pure builder). Raises ValueError
    naming the mailbox for a missing or unhashed password."""
    if placed is None:
        placed = homes(domain, mailboxes)
    entries = []
    for mailbox in served_mailboxes(domain, mailboxes):
        spec = mailbox.spec
        what = f"Mailbox {mailbox.metadata.name} ({spec.address})"
        entry = wire_directory.MailboxEntry(
            address=spec.address,
            password_hash=_hash(passwords, spec.password_secret_ref, f"{what}: spec.passwordSecretRef"),
            display_name=spec.display_name or "",
            quota=0 if spec.quota is None else api.quantity_value(spec.quota),
            aliases=list(spec.aliases),
            forward_to=list(spec.forward_to),
            suspended=spec.suspended,
            app_passwords=[
                wire_directory.AppPasswordEntry(
                    name=app.name, password_hash=_hash(passwords, app.secret_ref, f"{what}: app password {app.name}")
                )
                for app in spec.app_passwords
            ],
            home=placed[spec.address.lower()],
        )
        # Fields at the node's defaults are left out: a directory of ten thousand mailboxes must fit in
        # one Secret.
        entries.append(entry.model_dump(mode="json", exclude_defaults=True))
    return {"mailboxes": entries}


# Above this size the directory is stored gzip-compressed (the node recognises gzip by its first bytes):
# small directories stay readable with kubectl, large ones still fit in a Secret (at most 1 MiB).
COMPRESS_ABOVE: Final = 256 * 1024


def directory_content(directory_file: Mapping[str, Any]) -> bytes:
    """The directory file's bytes: YAML with one mailbox a line (each a JSON object, which YAML reads as
    a flow mapping: quick to write for ten thousand mailboxes, still readable with kubectl), gzip-compressed
    when larger than COMPRESS_ABOVE. Deterministic (no timestamp in the gzip header), so an unchanged
    directory is an unchanged Secret."""
    entries = directory_file.get("mailboxes") or []
    lines = [f"- {json.dumps(entry, ensure_ascii=False)}\n" for entry in entries]
    text = ("mailboxes:\n" + "".join(lines) if lines else "mailboxes: []\n").encode()
    if len(text) <= COMPRESS_ABOVE:
        return text
    return gzip.compress(text, compresslevel=9, mtime=0)


GZIP_MAGIC: Final = b"\x1f\x8b"
# libyaml's loader when PyYAML has it (the wheels do): a directory of ten thousand mailboxes parses fast.
_YAML_LOADER: Final = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def directory_text(content: bytes) -> bytes:
    """The directory file's YAML, from `directory_content`'s bytes (compressed or not). Raises ValueError
    for a compressed file that cannot be decompressed."""
    if not content.startswith(GZIP_MAGIC):
        return content
    try:
        return gzip.decompress(content)
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"gzip-compressed but cannot be decompressed: {error}") from error


def read_directory(content: bytes) -> list[dict[str, Any]]:
    """The mailbox entries of a directory file as `directory_content` wrote it. Raises ValueError for a
    file that is not one (edited by hand, say)."""
    text = directory_text(content)
    if (entries := _read_lines(text)) is not None:
        return entries
    try:
        entries = (yaml.load(text, Loader=_YAML_LOADER) or {}).get("mailboxes") or []
    except (yaml.YAMLError, AttributeError) as error:
        raise ValueError(f"not a directory file: {error}") from error
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ValueError("not a directory file: mailboxes is not a list of mappings")
    return entries


_HEADER: Final = b"mailboxes:\n"


def _read_lines(text: bytes) -> list[dict[str, Any]] | None:
    """The entries of a file in exactly the form `directory_content` writes, one JSON object a line, read
    with json: some twenty times faster than YAML (over two seconds for ten thousand mailboxes, which a
    clustered domain's reconcile reads back for their homes). None for any other form (YAML reads it)."""
    if not text.startswith(_HEADER):
        return None
    entries: list[dict[str, Any]] = []
    for line in text[len(_HEADER) :].splitlines():  # a JSON string holds no raw line break
        if not line.startswith(b"- {"):
            return None
        try:
            entry = json.loads(line[2:])
        except ValueError:
            return None
        if not isinstance(entry, dict):
            return None
        entries.append(entry)
    return entries


def _hash(passwords: Mapping[str, str], selector: api.SecretKeySelector, what: str) -> str:
    key = password_key(selector)
    if key not in passwords:
        raise ValueError(f"{what}: no value for Secret {selector.name} key {selector.key}")
    value = passwords[key]
    if not wire_directory.is_password_hash(value):
        raise ValueError(f"{what}: Secret {selector.name} key {selector.key} holds plaintext; hash it first")
    return value
