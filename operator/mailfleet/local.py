"""`mailfleet local up`: the MailDomains of resource files run as local `mailnode serve` processes on
127.0.0.1, with the node config and directory the operator's builders make (mailfleet.specs), so what
runs here is what a cluster runs. Called by cli.py; `make run` and the tests in tests/e2e use it.

`prepare` writes everything a node needs under the state directory (certificates, DKIM keys and the
internal token are made once and kept, so clients, DNS records and `mailnode queue --config` stay valid
across restarts); `run` starts the processes, waits
until they are ready, and stops them all on SIGINT or SIGTERM, or when one of them dies. The node is
started as a program, never imported: the operator does not depend on the node's code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Final, TextIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mailfleet import api, files, keys, specs
from mailfleet.specs import common

DEFAULT_BASE_PORT: Final = 20000
DEFAULT_STATE_DIR: Final = Path(".mailfleet-local")
# DESIGN.md, `mailfleet local up`: node i listens on base + 10*i + these offsets.
PORT_STRIDE: Final = 10
PORT_OFFSETS: Final = {"smtp": 0, "submission": 1, "submissions": 2, "imap": 3, "imaps": 4, "http": 5, "https": 8}
# Those of a node of several (replicas > 1): the peers hand mail and IMAP sessions over on these.
INTERNAL_PORT_OFFSETS: Final = {"lmtp": 6, "imap_proxy": 7}
PORT_USES: Final = {
    "smtp": "MX (STARTTLS)",
    "submission": "submission (STARTTLS, AUTH)",
    "submissions": "submission (implicit TLS, AUTH)",
    "imap": "IMAP (STARTTLS)",
    "imaps": "IMAP (implicit TLS)",
    "http": "/healthz /readyz /metrics /status",
    "https": "CalDAV/CardDAV (/dav/), autoconfig, Autodiscover, MTA-STS policy",
    "lmtp": "internal: mail handed over by the peers (LMTP)",
    "imap_proxy": "internal: IMAP sessions proxied by the peers",
}
HOST: Final = "127.0.0.1"
CLIENT_PORTS: Final = ("imap", "imaps", "submission", "submissions", "https")

READY_TIMEOUT: Final = 60.0  # seconds; a node recovers its store before it is ready
STOP_TIMEOUT: Final = 30.0  # seconds, as the pods' terminationGracePeriodSeconds
LOG_TAIL: Final = 10  # lines of a node's log shown when it dies

# A Kubernetes object name (RFC 1123 subdomain): safe as a directory name under the state directory.
_OBJECT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class LocalError(Exception):
    """A problem outside the resource files (ports, the state directory); the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Node:
    """One local mail node: replica `ordinal` of its MailDomain, the `index`-th node of the run (its
    ports), with the domain's shared files (directory, token, keys) under `root` and its own (config,
    data, log) under `own`: `root` itself for a domain of one node, as before clustering."""

    index: int
    ordinal: int
    domain: api.MailDomain
    root: Path  # STATE/<MailDomain name>
    own: Path  # root, or root/node-<ordinal> for a domain of several nodes
    ports: dict[str, int]
    tls: str  # where the certificate comes from, for people
    dns_records: list[str]

    @property
    def config_file(self) -> Path:
        return self.own / common.CONFIG_KEY

    @property
    def log_file(self) -> Path:
        return self.own / "node.log"

    @property
    def title(self) -> str:
        if not common.clustered(self.domain):
            return f"node {self.index} (MailDomain {self.domain.metadata.name})"
        return f"node {self.index} (MailDomain {self.domain.metadata.name}, ordinal {self.ordinal})"


def ports(base_port: int, index: int, *, internal: bool = False) -> dict[str, int]:
    """Node `index`'s ports (DESIGN.md, `mailfleet local up`), with the internal ones of a domain of
    several nodes when `internal`."""
    offsets = {**PORT_OFFSETS, **(INTERNAL_PORT_OFFSETS if internal else {})}
    return {name: base_port + PORT_STRIDE * index + offset for name, offset in offsets.items()}


# -- files ---------------------------------------------------------------------------------------------


def prepare(paths: list[Path], *, base_port: int, state_dir: Path) -> list[Node]:
    """Check the files, then write each node's node.yaml, directory.yaml, keys and certificates under
    `state_dir`; start nothing. The files are checked completely before anything is written, so refused
    input leaves the state directory as it was. Raises files.RenderError or LocalError."""
    loaded = files.load(paths)
    _check_names(loaded)
    _check_stranded_mail(loaded, state_dir=state_dir)
    nodes = sum(domain.spec.replicas for _, domain in loaded.domains)
    last_port = base_port + PORT_STRIDE * (nodes - 1) + max({**PORT_OFFSETS, **INTERNAL_PORT_OFFSETS}.values())
    if base_port < 1 or last_port > 65535:
        raise LocalError(f"--base-port {base_port}: the last node would listen on {last_port}, above 65535")
    resolved = files.resolve(loaded, paths)
    given_tls = [files.tls_secret(loaded, r) for r in resolved]
    directories = [_directory(r, state_dir=state_dir) for r in resolved]
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        self_signed = [
            name
            for r, tls in zip(resolved, given_tls, strict=True)
            if tls is None
            for name in common.tls_names(r.domain)
        ]
        cert_file = _self_signed_certificate(state_dir / "tls", self_signed) if self_signed else None
        written: list[Node] = []
        for r, tls, directory in zip(resolved, given_tls, directories, strict=True):
            written += _write_domain(
                len(written), r, tls, directory, state_dir=state_dir, base_port=base_port, self_signed=cert_file
            )
        return written
    except OSError as error:
        raise LocalError(f"{error.filename or state_dir}: cannot write: {error.strerror}") from error


def _directory(resolved: files.ResolvedDomain, *, state_dir: Path) -> str:
    """directory.yaml, as the operator puts it in the domain's directory Secret: each mailbox keeps the
    home the directory of the last run recorded (the operator reads its Secret back the same way)."""
    domain = resolved.domain
    recorded: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):  # no earlier run, or a file edited by hand
        previous = (state_dir / domain.metadata.name / common.DIRECTORY_KEY).read_bytes()
        recorded = specs.node.recorded_homes(specs.node.read_directory(previous))
    try:
        placed = specs.homes(domain, resolved.mailboxes, recorded=recorded)
        return specs.dump(specs.directory(domain, resolved.mailboxes, resolved.passwords, placed=placed))
    except ValueError as error:
        raise files.RenderError(f"{resolved.path}: MailDomain {domain.metadata.name}: {error}") from error


def _check_names(loaded: files.Loaded) -> None:
    seen: dict[str, Path] = {}
    for path, domain in loaded.domains:
        name = domain.metadata.name
        if not _OBJECT_NAME.match(name):
            raise files.RenderError(f"{path}: MailDomain {name}: metadata.name: not a Kubernetes object name")
        if name in seen:
            raise files.RenderError(
                f"{path}: MailDomain {name}: metadata.name: also the name of a MailDomain in {seen[name]}; "
                "local up keeps each node's files under its MailDomain's name"
            )
        seen[name] = path


def _check_stranded_mail(loaded: files.Loaded, *, state_dir: Path) -> None:
    """Refuse a run whose nodes would not use a data directory of an earlier run that holds mailboxes: local
    up does not move mailboxes between its nodes (the operator does, in a cluster), so fewer `replicas`,
    or one node becoming several or several one, would leave that mail unserved while its mailboxes are
    placed afresh, empty, on the nodes that run. More replicas keep every home (the directory records
    them), so they are accepted."""
    for path, domain in loaded.domains:
        root = state_dir / domain.metadata.name
        replicas = domain.spec.replicas
        used = {root / f"node-{i}" / "data" for i in range(replicas)} if common.clustered(domain) else {root / "data"}
        for data in sorted([root / "data", *root.glob("node-*/data")]):
            if data not in used and any(data.glob("mail/*/*")):
                raise files.RenderError(
                    f"{path}: MailDomain {domain.metadata.name}: spec.replicas: {replicas} would not run the node "
                    f"whose data is {data}, which holds mailboxes; local up does not move mailboxes between its "
                    "nodes: set replicas back, or use another --state-dir"
                )


def _write_domain(
    first_index: int,
    resolved: files.ResolvedDomain,
    tls: tuple[str, str] | None,
    directory: str,
    *,
    state_dir: Path,
    base_port: int,
    self_signed: Path | None,
) -> list[Node]:
    """The files of the domain's nodes, as the pods would see them mounted, with paths into the state
    directory and the nodes' ports on 127.0.0.1 instead of the pod contract's. The nodes share the
    directory, the internal token and the keys, as the pods share the Secrets; each has its own config
    and data, as each pod has its own ordinal and volume."""
    domain = resolved.domain
    root = state_dir / domain.metadata.name
    absolute = root.absolute()
    token_file = absolute / "internal" / common.INTERNAL_KEY
    _internal_token(token_file)
    clustered = common.clustered(domain)
    config = specs.node_config(
        domain,
        directory_file=str(absolute / common.DIRECTORY_KEY),
        tls_dir=None,
        relay_username=resolved.relay_username,
        internal_token_file=str(token_file),
    )

    if tls is None:
        assert self_signed is not None  # prepare makes it for every domain without a TLS Secret
        cert_file, key_file = self_signed, self_signed.with_name("key.pem")
        tls_source = f"{self_signed} (self-signed)"
    else:
        cert_file, key_file = root / "tls" / "tls.crt", root / "tls" / "tls.key"
        _write(cert_file, tls[0], mode=0o644)
        _write(key_file, tls[1], mode=0o600)
        assert domain.spec.tls is not None  # files.tls_secret found its Secret
        tls_source = f"Secret {domain.spec.tls.secret_name} ({cert_file})"
    config["tls"] = {"cert_file": str(cert_file.absolute()), "key_file": str(key_file.absolute())}

    dkim_record = None
    if domain.spec.dkim is not None:
        dkim_file = root / "dkim" / common.DKIM_KEY
        dkim_record = _dkim_record(dkim_file)
        for entry in config["domains"]:
            entry["dkim"]["key_file"] = str(dkim_file.absolute())
    relay_host = config["smtp"].get("relay_host")
    if relay_host is not None and resolved.relay is not None:
        password_file = root / "relay" / "password"
        _write(password_file, resolved.relay["password"], mode=0o600)
        relay_host["password_file"] = str(password_file.absolute())
    if relay_host is not None and resolved.relay_ca is not None:
        ca_file = root / "relay" / common.RELAY_CA_KEY
        _write(ca_file, resolved.relay_ca, mode=0o644)
        relay_host["ca_file"] = str(ca_file.absolute())

    _write(root / common.DIRECTORY_KEY, directory, mode=0o600)  # password hashes
    indexes = range(first_index, first_index + domain.spec.replicas)
    all_ports = [ports(base_port, index, internal=clustered) for index in indexes]
    if clustered:
        # DESIGN.md "Clustering": every node by ordinal, this one included, as the operator lists the pods
        peers = [
            {"host": HOST, "lmtp": p["lmtp"], "imap_proxy": p["imap_proxy"], "http": p["http"], "https": p["https"]}
            for p in all_ports
        ]
        config["cluster"] = {"peers": peers}
    nodes: list[Node] = []
    dns_records = files.dns_lines(domain, dkim_record=dkim_record)
    for ordinal, (index, node_ports) in enumerate(zip(indexes, all_ports, strict=True)):
        own = root / f"node-{ordinal}" if clustered else root
        node_config = {
            "node_name": common.pod_name(domain, ordinal),
            **config,
            "data_dir": str(own.absolute() / "data"),
            "listen": {"host": HOST, **node_ports},
            # the HTTPS listener always runs here (a certificate is always given); autoconfiguration names
            # the ports this node listens on, not the Service's
            "web": {
                "dav": domain.spec.dav.enabled,
                "client": {"host": HOST, **{name: node_ports[name] for name in CLIENT_PORTS}},
            },
        }
        if clustered:
            node_config["cluster"] = {"ordinal": ordinal, **config["cluster"]}
        (own / "data").mkdir(parents=True, exist_ok=True)
        _write(own / common.CONFIG_KEY, specs.dump(node_config), mode=0o644)
        nodes.append(Node(index, ordinal, domain, root, own, node_ports, tls_source, dns_records))
    return nodes


def _internal_token(token_file: Path) -> None:
    """The domain's internal token, as the operator keeps it in the <name>-internal Secret: made on the
    first run and kept (the node requires it for changes; `mailnode queue --config` reads it)."""
    if not token_file.exists():
        _write(token_file, keys.new_internal_token() + "\n", mode=0o600)


def _dkim_record(key_file: Path) -> str:
    """The DKIM key is made on the first run and kept, so the record published in DNS stays valid."""
    if key_file.exists():
        return files.dkim_record(files.dkim_key(key_file), str(key_file))
    key = files.dkim_key(None)
    _write(key_file, key, mode=0o600)
    return files.dkim_record(key, str(key_file))


def _self_signed_certificate(directory: Path, mail_hosts: list[str]) -> Path:
    """DIR/cert.pem and DIR/key.pem for localhost, 127.0.0.1 and the mail hosts: kept across runs (clients
    told to trust it keep working) unless it lacks a name, is about to expire or does not match the key."""
    names = ["localhost", HOST, *dict.fromkeys(mail_hosts)]
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    if _certificate_fits(cert_file, key_file, names):
        return cert_file
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])  # mbsync wants a common name
    now = datetime.datetime.now(datetime.UTC)
    alternative_names: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address(name)) if name == HOST else x509.DNSName(name) for name in names
    ]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        # Its own trust anchor: clients are given this file as their CA (curl --cacert, cafile=).
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(
        key_file,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        mode=0o600,
    )
    _write(cert_file, certificate.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return cert_file


def _certificate_fits(cert_file: Path, key_file: Path, names: list[str]) -> bool:
    try:
        certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    present = {*sans.get_values_for_type(x509.DNSName), *(str(ip) for ip in sans.get_values_for_type(x509.IPAddress))}
    tomorrow = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
    der, info = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    same_key = key.public_key().public_bytes(der, info) == certificate.public_key().public_bytes(der, info)
    return set(names) <= present and certificate.not_valid_after_utc > tomorrow and same_key


def _write(path: Path, content: str | bytes, *, mode: int) -> None:
    """Replace the file whole (a node that reads it never sees half of it), with `mode` even when the file
    existed with another one: keys and password hashes are for the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = content.encode() if isinstance(content, str) else content
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), mode)
        file.write(data)
    tmp.replace(path)


# -- processes -----------------------------------------------------------------------------------------


def run(nodes: list[Node], *, out: TextIO, err: TextIO, ready_timeout: float = READY_TIMEOUT) -> int:
    """Run the nodes in the foreground until SIGINT or SIGTERM (exit 0 once every node has stopped) or
    until a node dies or never gets ready (reported on `err`, the others stopped, exit 1)."""
    for node in nodes:
        if node.ordinal == 0:  # once per domain
            out.write(f"DNS records to publish for MailDomain {node.domain.metadata.name}:\n")
            out.writelines(f"  {line}\n" for line in node.dns_records)
    out.flush()
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    processes: list[tuple[Node, subprocess.Popen[bytes]]] = []
    try:
        for node in nodes:
            processes.append((node, _start(node)))
        code = _supervise(processes, stop, out=out, err=err, ready_timeout=ready_timeout)
    finally:
        stopped = _stop(processes, err=err)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code == 0 and stopped:
        out.write(f"stopped {_count(len(processes))}\n")
        out.flush()
    return code if code or stopped else 1


def _count(nodes: int) -> str:
    return "1 mail node" if nodes == 1 else f"{nodes} mail nodes"


def _start(node: Node) -> subprocess.Popen[bytes]:
    """`mailnode serve` as a process of its own session: Ctrl-C in a terminal reaches only this command,
    which then stops the nodes in order and waits for them."""
    with node.log_file.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "mailnode", "serve", "--config", str(node.config_file)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )


def _supervise(
    processes: list[tuple[Node, subprocess.Popen[bytes]]],
    stop: threading.Event,
    *,
    out: TextIO,
    err: TextIO,
    ready_timeout: float,
) -> int:
    deadline = time.monotonic() + ready_timeout
    waiting = [node for node, _ in processes]
    while waiting and not stop.is_set():
        if (code := _check_alive(processes, err=err, when="before it was ready")) is not None:
            return code
        waiting = [node for node in waiting if not _ready(node)]
        if waiting and time.monotonic() > deadline:
            for node in waiting:
                err.write(
                    f"mailfleet local up: {node.title} did not answer /readyz on port {node.ports['http']} "
                    f"within {ready_timeout:g}s; its log is {node.log_file}\n"
                )
            err.flush()
            return 1
        if waiting:
            stop.wait(0.1)
    if stop.is_set():
        return 0
    for node, _ in processes:
        _print_node(node, out=out)
    out.write(f"ready: {_count(len(processes))}; Ctrl-C stops {'it' if len(processes) == 1 else 'them'}\n")
    out.flush()
    while not stop.wait(0.2):
        if (code := _check_alive(processes, err=err, when="unexpectedly")) is not None:
            return code
    return 0


def _ready(node: Node) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{node.ports['http']}/readyz", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:  # refused while starting, or 503 until the listeners are up
        return False


def _check_alive(processes: list[tuple[Node, subprocess.Popen[bytes]]], *, err: TextIO, when: str) -> int | None:
    for node, process in processes:
        if (returncode := process.poll()) is not None:
            others = "; stopping the others" if len(processes) > 1 else ""
            err.write(f"mailfleet local up: {node.title} exited {when} (exit code {returncode}){others}\n")
            tail = _tail(node.log_file)
            if tail:
                err.write(f"  last lines of {node.log_file}:\n")
                err.writelines(f"    {line}\n" for line in tail)
            err.flush()
            return 1
    return None


def _tail(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL:]
    except OSError:
        return []


def _print_node(node: Node, *, out: TextIO) -> None:
    domains = ", ".join([node.domain.spec.domain, *node.domain.spec.alias_domains])
    out.write(f"{node.title}: {domains}\n")
    for name, port in node.ports.items():
        out.write(f"  {name:<12} {HOST}:{port:<6} {PORT_USES[name]}\n")
    out.write(f"  {'tls':<12} {node.tls}\n")
    if common.clustered(node.domain):
        out.write(f"  {'files':<12} {node.own} (shared: {node.root}; log: {node.log_file})\n")
    else:
        out.write(f"  {'files':<12} {node.root} (log: {node.log_file})\n")


def _stop(processes: list[tuple[Node, subprocess.Popen[bytes]]], *, err: TextIO) -> bool:
    """SIGTERM to every node still running, then wait for each (a node finishes its transactions and
    closes its store); one that outlives STOP_TIMEOUT is killed. True when every node we stopped exited
    cleanly."""
    running = [(node, process) for node, process in processes if process.poll() is None]
    for _, process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    clean = True
    for node, process in running:
        try:
            returncode = process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            err.write(f"mailfleet local up: {node.title} did not stop within {STOP_TIMEOUT:g}s; killed it\n")
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            clean = False
            continue
        # SIGTERM before the node set up its handlers (still starting) ends it by the signal: asked for.
        if returncode not in (0, -signal.SIGTERM):
            err.write(f"mailfleet local up: {node.title} exited with code {returncode} while stopping\n")
            clean = False
    err.flush()
    return clean
