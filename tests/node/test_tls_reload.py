"""Certificate renewal while the node runs, as cert-manager renews the TLS Secret a pod mounts.

Aspects: once the mounted files change (Kubernetes swaps the volume's `..data` symlink), new
connections on every TLS listener (submission and IMAP with STARTTLS, submissions, IMAPS and HTTPS
with implicit TLS) get the new certificate without a restart, while a connection opened before keeps its
session and goes on working; a broken pair (a key file cut short, the key of another certificate) keeps
the last good certificate served and counts a failure, and a fixed pair is then taken; the reloads and
the served certificate's expiry are on /metrics, its subject and notAfter in /status.
"""

from __future__ import annotations

import datetime
import functools
import imaplib
import json
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import prometheus_client.parser
import pytest
import trustme

import tests.node.conftest
from mailnode.node import Node
from tests.node.conftest import DOMAIN, PASSWORD, RunningNode, mailbox, write_node_files
from tests.node.test_directory_reload import eventually

USER = f"user@{DOMAIN}"
POLL_INTERVAL = 0.05


class SecretVolume:
    """A directory laid out as the kubelet mounts a `kubernetes.io/tls` Secret: tls.crt and tls.key are
    symlinks through `..data`, itself a symlink to a timestamped directory; an update writes a new
    directory and renames a new `..data` link over the old one (atomic for readers)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir()
        self._version = 0
        for name in ("tls.crt", "tls.key"):
            (root / name).symlink_to(Path("..data") / name)

    @property
    def cert_file(self) -> Path:
        return self.root / "tls.crt"

    @property
    def key_file(self) -> Path:
        return self.root / "tls.key"

    def write(self, cert: bytes, key: bytes) -> None:
        self._version += 1
        version = self.root / f"..2026_01_01_00_00_{self._version:02d}"
        version.mkdir()
        (version / "tls.crt").write_bytes(cert)
        (version / "tls.key").write_bytes(key)
        link = self.root / "..data_tmp"
        link.symlink_to(version.name)
        link.replace(self.root / "..data")

    def serve(self, cert: trustme.LeafCert) -> None:
        self.write(cert.private_key_and_cert_chain_pem.bytes(), cert.private_key_pem.bytes())


def leaf_der(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def not_after(cert: trustme.LeafCert) -> float:
    from cryptography import x509

    parsed = x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes())
    return parsed.not_valid_after_utc.timestamp()


@pytest.fixture(scope="module")
def certificates() -> tuple[trustme.LeafCert, trustme.LeafCert, ssl.SSLContext]:
    """Certificate A and its renewal B, from two CAs (a renewal may come with a new intermediate), and a
    client context that trusts both: the test tells them apart by the certificate a handshake shows."""
    old_ca, new_ca = trustme.CA(), trustme.CA()
    names = ("localhost", "127.0.0.1", f"mail.{DOMAIN}")
    a = old_ca.issue_cert(*names, common_name="A")
    b = new_ca.issue_cert(*names, common_name="B", not_after=datetime.datetime(2031, 5, 6, tzinfo=datetime.UTC))
    client = ssl.create_default_context()
    old_ca.configure_trust(client)
    new_ca.configure_trust(client)
    return a, b, client


@pytest.fixture
def secret(tmp_path: Path) -> SecretVolume:
    return SecretVolume(tmp_path / "tls-secret")


@pytest.fixture
def start_node(
    tmp_path: Path, secret: SecretVolume, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[], RunningNode]]:
    # The node watches the files every POLL_INTERVAL seconds (a pod: every few seconds).
    monkeypatch.setattr(tests.node.conftest, "Node", functools.partial(Node, tls_poll_interval=POLL_INTERVAL))
    started: list[RunningNode] = []

    def start() -> RunningNode:
        files = write_node_files(tmp_path / "node", mailboxes=[mailbox(USER)], tls=(secret.cert_file, secret.key_file))
        started.append(RunningNode(files))
        return started[-1]

    yield start
    for running in started:
        running.stop()


# -- what a client sees --------------------------------------------------------------------------------


def served(node: RunningNode, listener: str, client: ssl.SSLContext) -> bytes:
    """The certificate (DER) a new connection to `listener` is shown, after its TLS handshake."""
    host, port = "127.0.0.1", node.port(listener)
    if listener == "submission":
        with smtplib.SMTP(host, port, timeout=10) as smtp:
            smtp.starttls(context=client)
            return peer(smtp.sock)
    if listener == "submissions":
        with smtplib.SMTP_SSL(host, port, context=client, timeout=10) as smtp:
            return peer(smtp.sock)
    if listener == "https":
        with client.wrap_socket(socket.create_connection((host, port), timeout=10), server_hostname=host) as sock:
            return peer(sock)
    imap = (
        imaplib.IMAP4_SSL(host, port, ssl_context=client, timeout=10)
        if listener == "imaps"
        else imaplib.IMAP4(host, port, timeout=10)
    )
    try:
        if listener == "imap":
            imap.starttls(ssl_context=client)
        return peer(imap.sock)
    finally:
        imap.logout()


def peer(sock: Any) -> bytes:
    certificate = sock.getpeercert(binary_form=True)
    assert certificate is not None
    return bytes(certificate)


LISTENERS = ("submission", "submissions", "imap", "imaps", "https")


def reloads(node: RunningNode, result: str) -> float:
    return node.metric("mailnode_tls_reloads_total", result=result)


# -- the tests ---------------------------------------------------------------------------------------------


def test_renewed_certificate_is_served_to_new_connections(
    start_node: Callable[[], RunningNode],
    secret: SecretVolume,
    certificates: tuple[trustme.LeafCert, trustme.LeafCert, ssl.SSLContext],
) -> None:
    a, b, client = certificates
    secret.serve(a)
    node = start_node()
    for listener in LISTENERS:
        assert served(node, listener, client) == leaf_der(a), listener

    # Sessions opened before the renewal: an authenticated IMAPS session and a submission session
    # after STARTTLS and AUTH.
    imap = imaplib.IMAP4_SSL("127.0.0.1", node.port("imaps"), ssl_context=client, timeout=10)
    imap.login(USER, PASSWORD)
    smtp = smtplib.SMTP("127.0.0.1", node.port("submission"), timeout=10)
    smtp.starttls(context=client)
    smtp.login(USER, PASSWORD)

    secret.serve(b)
    eventually(lambda: served(node, "imaps", client) == leaf_der(b), True, "IMAPS serves the new certificate")
    for listener in LISTENERS:
        assert served(node, listener, client) == leaf_der(b), listener
    assert reloads(node, "success") == 1
    assert reloads(node, "failure") == 0

    # The sessions opened before go on, with the certificate they were shown.
    assert peer(imap.sock) == leaf_der(a)
    assert imap.select("INBOX")[0] == "OK"
    assert peer(smtp.sock) == leaf_der(a)
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = USER, USER, "sent over a session older than B"
    message.set_content("still works")
    assert smtp.send_message(message) == {}
    smtp.quit()
    eventually(lambda: int(imap.select("INBOX")[1][0] or 0), 1, "messages in the INBOX")
    imap.logout()


def test_broken_pair_keeps_the_last_good_certificate(
    start_node: Callable[[], RunningNode],
    secret: SecretVolume,
    certificates: tuple[trustme.LeafCert, trustme.LeafCert, ssl.SSLContext],
) -> None:
    a, b, client = certificates
    secret.serve(a)
    node = start_node()

    # B's certificate with a key file cut short (written by hand, not by the kubelet), then with A's key.
    secret.write(b.cert_chain_pems[0].bytes(), b.private_key_pem.bytes()[:100])
    eventually(lambda: reloads(node, "failure"), 1, "failed reloads")
    secret.write(b.cert_chain_pems[0].bytes(), a.private_key_pem.bytes())
    eventually(lambda: reloads(node, "failure"), 2, "failed reloads")
    for listener in LISTENERS:
        assert served(node, listener, client) == leaf_der(a), listener
    assert reloads(node, "success") == 0
    shown = json.loads(node.http_get("/status")[1])["tls"]
    assert "CN=A" in shown["subject"].split(",")
    assert "not a usable certificate and key" in shown["last_error"]
    time.sleep(20 * POLL_INTERVAL)
    assert reloads(node, "failure") == 2  # one failure per broken version, not one per poll

    secret.serve(b)
    eventually(lambda: reloads(node, "success"), 1, "successful reloads")
    for listener in LISTENERS:
        assert served(node, listener, client) == leaf_der(b), listener


def test_reloads_and_expiry_on_metrics_and_status(
    start_node: Callable[[], RunningNode],
    secret: SecretVolume,
    certificates: tuple[trustme.LeafCert, trustme.LeafCert, ssl.SSLContext],
) -> None:
    a, b, _ = certificates
    secret.serve(a)
    node = start_node()
    expiry = "mailnode_tls_certificate_expiry_timestamp_seconds"
    assert node.metric(expiry) == not_after(a)

    secret.serve(b)
    eventually(lambda: reloads(node, "success"), 1, "successful reloads")
    code, body = node.http_get("/metrics")
    assert code == 200
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in prometheus_client.parser.text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    assert samples[("mailnode_tls_reloads_total", (("result", "success"),))] == 1
    assert samples[("mailnode_tls_reloads_total", (("result", "failure"),))] == 0
    assert samples[(expiry, ())] == not_after(b) == datetime.datetime(2031, 5, 6, tzinfo=datetime.UTC).timestamp()

    code, body = node.http_get("/status")
    assert code == 200
    certificate = json.loads(body)["tls"]
    assert "CN=B" in certificate["subject"].split(",")
    assert certificate["not_after"] == "2031-05-06T00:00:00+00:00"
    assert certificate["last_error"] is None
