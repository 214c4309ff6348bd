"""Outbound mail through a relay host, as `smtp.relay_host.tls` says, against real aiosmtpd relays that
demand AUTH: STARTTLS verified against a private CA (`ca_file`) delivers, and without that CA the mail
stays queued with a certificate error in `mailnode queue list`; implicit TLS (port 465 style) delivers;
starttls-unverified delivers to a relay with a self-signed certificate; a relay that offers no STARTTLS
keeps the mail queued rather than getting it (and the password) in clear; `tls: none` without
`allow_plaintext` is refused by the config loader, naming the field; a `ca_file` that is no certificate
stops `mailnode serve` with exit code 2, naming the field."""

from __future__ import annotations

import datetime
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailnode.config import ConfigError, load_node_config
from tests.node.conftest import NodeFactory, RunningNode, free_port, mailbox, write_node_files
from tests.node.test_outbound import RemoteMX, submit, wait_for
from tests.node.test_queue_commands import deferred, mailnode_queue, queue

RELAY_USER, RELAY_PASSWORD = "relay-user", "relay-secret"
# aiosmtpd warns about the relays that take AUTH without its own STARTTLS: the implicit-TLS one (encrypted
# from the start) and the plaintext one these tests keep the node from logging in to.
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")


class Relay(RemoteMX):
    """A relay host: takes mail only after AUTH with the relay's credentials, and records the logins."""

    def __init__(self) -> None:
        super().__init__()
        self.logins: list[tuple[bytes, bytes, bool]] = []

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        # session.ssl is aiosmtpd's STARTTLS; the transport tells implicit TLS
        encrypted = session.ssl is not None or server.transport.get_extra_info("ssl_object") is not None
        self.logins.append((data.login, data.password, encrypted))
        return AuthResult(success=data == LoginPassword(RELAY_USER.encode(), RELAY_PASSWORD.encode()), handled=False)


RelayFactory = Callable[..., tuple[Relay, int]]


@pytest.fixture
def relay_server() -> Iterator[RelayFactory]:
    """Starts relays on 127.0.0.1: `starttls` (a server context to offer STARTTLS with, required before
    AUTH), `implicit` (a server context to speak TLS from the first byte), or neither (no TLS at all)."""
    controllers: list[Controller] = []

    def start(*, starttls: ssl.SSLContext | None = None, implicit: ssl.SSLContext | None = None) -> tuple[Relay, int]:
        handler, port = Relay(), free_port()
        options: dict[str, Any] = {"authenticator": handler.authenticate, "auth_required": True}
        if starttls is not None:
            options.update(tls_context=starttls, require_starttls=True)
        elif implicit is not None:
            # aiosmtpd offers AUTH only after its own STARTTLS; here the session is TLS from the start
            options.update(ssl_context=implicit, auth_require_tls=False)
        else:
            options.update(auth_require_tls=False)
        controller = Controller(handler, hostname="127.0.0.1", port=port, server_hostname="relay.test", **options)
        controller.start()
        controllers.append(controller)
        return handler, port

    yield start
    for controller in controllers:
        controller.stop()


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


@pytest.fixture
def ca_signed(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    """The relay's certificate for localhost, from the test CA (a private CA: the system does not trust it)."""
    return server_context(*tls_files)


@pytest.fixture
def self_signed(tmp_path: Path) -> ssl.SSLContext:
    """A certificate for localhost signed by its own key, as an in-cluster relay might have."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "self-signed.pem", tmp_path / "self-signed.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return server_context(cert_file, key_file)


def relaying_node(node_factory: NodeFactory, tmp_path: Path, port: int, **relay: Any) -> RunningNode:
    """A node sending all outbound mail to localhost:port, logging in as the relay user."""
    password_file = tmp_path / "relay-password"
    password_file.write_text(RELAY_PASSWORD + "\n")
    relay_host = {"host": "localhost", "port": port, "username": RELAY_USER, "password_file": str(password_file)}
    return node_factory(
        [mailbox("user@example.com")], smtp={"relay_host": {**relay_host, **relay}, "delivery_interval": 0.1}
    )


def assert_relayed(relay: Relay) -> None:
    wait_for("the relay to receive the message", lambda: bool(relay.received))
    sender, recipients, _ = relay.received[0]
    assert (sender, recipients) == ("user@example.com", ["friend@remote.test"])
    assert relay.logins == [(RELAY_USER.encode(), RELAY_PASSWORD.encode(), True)]  # over TLS


def test_starttls_verified_with_the_relays_ca_delivers(
    node_factory: NodeFactory,
    relay_server: RelayFactory,
    ca_signed: ssl.SSLContext,
    ca_file: Path,
    client_tls: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    relay, port = relay_server(starttls=ca_signed)
    node = relaying_node(node_factory, tmp_path, port, ca_file=str(ca_file))  # tls: starttls by default
    submit(node, client_tls, ["friend@remote.test"])
    assert_relayed(relay)
    wait_for("the queue to empty", lambda: queue(node) == [])


def test_starttls_without_the_relays_ca_stays_queued_with_a_certificate_error(
    node_factory: NodeFactory,
    relay_server: RelayFactory,
    ca_signed: ssl.SSLContext,
    client_tls: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    relay, port = relay_server(starttls=ca_signed)
    node = relaying_node(node_factory, tmp_path, port)  # the system CAs do not know the test CA
    message = deferred(node, client_tls)
    [recipient] = message["recipients"]
    assert recipient["state"] == "pending"
    assert "4.7.5" in recipient["last_error"]
    listed = mailnode_queue(node, "list")
    assert listed.returncode == 0, listed.stderr
    assert "certificate" in listed.stdout and "not trusted" in listed.stdout
    assert relay.received == [] and relay.logins == []


def test_implicit_tls_delivers(
    node_factory: NodeFactory,
    relay_server: RelayFactory,
    ca_signed: ssl.SSLContext,
    ca_file: Path,
    client_tls: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    relay, port = relay_server(implicit=ca_signed)
    node = relaying_node(node_factory, tmp_path, port, tls="implicit", ca_file=str(ca_file))
    submit(node, client_tls, ["friend@remote.test"])
    assert_relayed(relay)


def test_starttls_unverified_delivers_to_a_self_signed_relay(
    node_factory: NodeFactory,
    relay_server: RelayFactory,
    self_signed: ssl.SSLContext,
    client_tls: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    relay, port = relay_server(starttls=self_signed)
    node = relaying_node(node_factory, tmp_path, port, tls="starttls-unverified")
    submit(node, client_tls, ["friend@remote.test"])
    assert_relayed(relay)


def test_a_relay_without_starttls_keeps_the_mail_queued(
    node_factory: NodeFactory, relay_server: RelayFactory, client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    relay, port = relay_server()  # no TLS at all; it would take the login in clear
    node = relaying_node(node_factory, tmp_path, port)
    message = deferred(node, client_tls)
    [recipient] = message["recipients"]
    assert recipient["state"] == "pending"
    assert "does not offer STARTTLS" in recipient["last_error"]
    assert "smtp.relay_host.tls: starttls" in recipient["last_error"]  # the setting that insists on it
    assert relay.received == [] and relay.logins == []


def test_plaintext_relay_needs_allow_plaintext(tmp_path: Path) -> None:
    relay_host = {"host": "relay.test", "port": 25, "tls": "none"}
    files = write_node_files(tmp_path / "node", mailboxes=[], tls=None, smtp={"relay_host": relay_host})
    with pytest.raises(ConfigError) as refused:
        load_node_config(files.config_file)
    assert "smtp.relay_host" in str(refused.value)
    assert "allow_plaintext" in str(refused.value)

    config = yaml.safe_load(files.config_file.read_text())
    config["smtp"]["relay_host"]["allow_plaintext"] = True
    files.config_file.write_text(yaml.safe_dump(config))
    relay = load_node_config(files.config_file).smtp.relay_host
    assert relay is not None and (relay.tls, relay.allow_plaintext) == ("none", True)


def test_a_ca_file_that_is_not_a_certificate_stops_the_node_naming_the_field(tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    relay_host = {"host": "relay.test", "ca_file": str(not_pem)}
    ports = {name: free_port() for name in ("smtp", "submission", "submissions", "imap", "imaps", "http")}
    files = write_node_files(tmp_path / "node", mailboxes=[], tls=None, ports=ports, smtp={"relay_host": relay_host})
    result = subprocess.run(
        [sys.executable, "-m", "mailnode", "serve", "--config", str(files.config_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"smtp.relay_host.ca_file: cannot load the CA bundle {not_pem}" in result.stderr
