"""Issue 13's whole path, as a user runs it, on the real single-node cluster (tests/cluster/node.py): the
project's image (scripts/build-image) imported into the node's containerd; `helm install` of the chart with
that image, so the operator runs as the chart's Deployment pod and becomes Ready; `kubectl apply` of a
MailDomain, its TLS Secret and Mailboxes with their password Secret; the operator pod builds the StatefulSet
and the mail node pod becomes Ready on a PersistentVolume. Then from the host: swaks delivers through the
mail Service's ClusterIP, IMAP over TLS (the CA verified, the certificate's name checked) reads the message
back byte for byte, the pod's /metrics counts the delivery, the Mailbox's status.usedBytes (copied by the
operator pod from the node) becomes non-zero; the pod, deleted, comes back from the StatefulSet with the
same volume and the message; `helm test` passes."""

from __future__ import annotations

import functools
import imaplib
import json
import socket
import ssl
import subprocess
import tomllib
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.cluster.conftest import BIN, ROOT, _built
from tests.cluster.node import Node, until
from tests.conftest import require_tool

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
# What `ctr images import` names the archive's mailfleet:<version> (docker's normalisation).
REPOSITORY = "docker.io/library/mailfleet"
RELEASE, SYSTEM = "mailfleet", "mailfleet-system"
NAMESPACE = "mail"
PASSWORD = "alice-pods-password"
PODS = 240.0  # a pod's start on a loaded 2-core machine: image unpack, volume, probes

MANIFESTS = f"""
apiVersion: mailfleet.io/v1alpha1
kind: MailDomain
metadata: {{name: example-com, namespace: {NAMESPACE}}}
spec:
  domain: example.com
  replicas: 1
  storage: {{size: 1Gi}}
  tls: {{secretName: mail-example-com-tls}}
---
apiVersion: v1
kind: Secret
metadata: {{name: passwords, namespace: {NAMESPACE}}}
type: Opaque
stringData: {{alice: {PASSWORD}, bob: bob-pods-password}}
---
apiVersion: mailfleet.io/v1alpha1
kind: Mailbox
metadata: {{name: alice, namespace: {NAMESPACE}}}
spec:
  address: alice@example.com
  passwordSecretRef: {{name: passwords, key: alice}}
---
apiVersion: mailfleet.io/v1alpha1
kind: Mailbox
metadata: {{name: bob, namespace: {NAMESPACE}}}
spec:
  address: bob@example.com
  passwordSecretRef: {{name: passwords, key: bob}}
"""

# Exactly what swaks sends as DATA (CRLF lines, no line starting with a dot); the node stores it after its
# trace headers (Return-Path, Authentication-Results, Received).
MESSAGE = (
    b"From: Remote Sender <sender@remote.test>\r\n"
    b"To: Alice <alice@example.com>\r\n"
    b"Subject: the first mail to a pod\r\n"
    b"Message-ID: <first-pod-mail@remote.test>\r\n"
    b"\r\n"
    b"Delivered through the Service's ClusterIP to a StatefulSet pod.\r\n"
)


def _get(node: Node, *args: str) -> dict[str, Any] | None:
    result = node.plane.kubectl("get", "-o", "json", *args, check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def _ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
    return ready and not pod["metadata"].get("deletionTimestamp")


def _ready_pod(node: Node, namespace: str, *selector: str) -> dict[str, Any] | None:
    found = _get(node, "-n", namespace, "pods", *selector) or {}
    ready = [pod for pod in found.get("items", [found] if found else []) if _ready(pod)]
    return ready[0] if ready else None


def _diagnostics(node: Node) -> str:
    """What a failed wait shows: the pods, their descriptions and logs, the operator's and the node's."""
    kubectl = node.plane.kubectl
    parts = [
        kubectl("get", "pods,pvc,statefulsets,md,mbx", "-A", "-o", "wide", check=False).stdout,
        kubectl("get", "events", "-A", "--sort-by=.lastTimestamp", check=False).stdout[-4000:],
    ]
    for namespace in (SYSTEM, NAMESPACE):
        parts.append(kubectl("-n", namespace, "describe", "pods", check=False).stdout[-4000:])
        names = kubectl("-n", namespace, "get", "pods", "-o", "name", check=False).stdout.split()
        for name in names:
            for previous in ("--previous=false", "--previous=true"):
                logs = kubectl("-n", namespace, "logs", name, "--all-containers", previous, "--tail=60", check=False)
                parts.append(f"--- {name} {previous}\n{logs.stdout}{logs.stderr}")
    kubelet = node.root / "kubelet.log"
    parts.append("--- kubelet.log\n" + kubelet.read_text(errors="replace")[-3000:])
    return "\n".join(parts)


def _wait(node: Node, probe: Callable[[], Any], what: str, *, within: float = PODS) -> Any:
    try:
        return until(probe, what, within=within)
    except pytest.fail.Exception as failure:
        pytest.fail(f"{failure}\n{_diagnostics(node)}")


def _helm(node: Node, *args: str, namespace: str = SYSTEM, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "helm"), *args, "--namespace", namespace, "--kubeconfig", str(node.plane.kubeconfig)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _deliver(swaks: str, address: str, tmp_path: Path) -> None:
    """MESSAGE to alice with swaks through the Service at `address`, port 25: stored (250)."""
    data = tmp_path / "message.eml"
    data.write_bytes(MESSAGE.removesuffix(b"\r\n"))  # swaks ends the DATA with CRLF . CRLF itself
    sent = subprocess.run(
        [swaks, "--server", address, "--port", "25", "--helo", "remote.test", "--from", "sender@remote.test",
         "--to", "alice@example.com", "--data", str(data), "--timeout", "30"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert sent.returncode == 0 and "<-  250 2.0.0 Ok: stored as" in sent.stdout, sent.stdout + sent.stderr


def _banner(address: str, port: int) -> bool:
    """The SMTP greeting through kube-proxy (a ClusterIP without endpoints refuses at once)."""
    try:
        with socket.create_connection((address, port), timeout=10) as connection:
            return connection.recv(512).startswith(b"220 ")
    except OSError:
        return False


class _IMAP(imaplib.IMAP4_SSL):
    """IMAP over TLS to `address` (the ClusterIP), the certificate checked against `host` (the mail host
    name it is issued for), as a client that resolves mail.example.com to the Service would."""

    def __init__(self, address: str, *, host: str, ssl_context: ssl.SSLContext) -> None:
        self._address = address
        super().__init__(host, 993, ssl_context=ssl_context, timeout=30)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        connection = socket.create_connection((self._address, self.port), timeout)
        wrapped: ssl.SSLSocket = self.ssl_context.wrap_socket(connection, server_hostname=self.host)
        return wrapped


def _read_inbox(address: str, context: ssl.SSLContext) -> list[bytes] | None:
    """Every message of alice's INBOX, or None while the node does not answer yet (after a restart)."""
    try:
        with _IMAP(address, host="mail.example.com", ssl_context=context) as imap:
            imap.login("alice@example.com", PASSWORD)
            status, data = imap.select("INBOX", readonly=True)
            assert status == "OK", data
            if int(data[0] or 0) == 0:
                return []
            status, fetched = imap.fetch("1:*", "(BODY.PEEK[])")
            assert status == "OK", fetched
            return [part[1] for part in fetched if isinstance(part, tuple)]
    except (OSError, imaplib.IMAP4.abort):
        return None


def _fetch(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())
    except OSError:
        return None


def _domain_ready(node: Node) -> bool:
    status = (_get(node, "-n", NAMESPACE, "md", "example-com") or {}).get("status") or {}
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))
    return ready and status.get("readyReplicas") == 1


def _used_bytes(node: Node, name: str) -> int:
    mailbox = _get(node, "-n", NAMESPACE, "mbx", name) or {}
    return int((mailbox.get("status") or {}).get("usedBytes") or 0)


def test_helm_install_to_the_first_mail_read_back(node: Node, tmp_path: Path, pytestconfig: pytest.Config) -> None:
    swaks = require_tool("swaks")
    node.import_image(_built(pytestconfig, "build-image"))
    kubectl = node.plane.kubectl

    # The operator is the chart's Deployment pod, on the imported image, and gives the StatefulSets the same
    # one (nodeImage defaults to image: MAILFLEET_NODE_IMAGE); Never: no registry is asked, ever.
    install = _helm(
        node, "install", RELEASE, str(ROOT / "charts" / "mailfleet"), "--create-namespace",
        f"--set=image.repository={REPOSITORY}", f"--set=image.tag={VERSION}", "--set=image.pullPolicy=Never",
        "--set=operator.usageInterval=2",  # usage copied into the Mailbox statuses within seconds
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    selector = "-l", "app.kubernetes.io/name=mailfleet-operator"
    operator = _wait(node, lambda: _ready_pod(node, SYSTEM, *selector), "the operator pod Ready")
    assert operator["spec"]["containers"][0]["image"] == f"{REPOSITORY}:{VERSION}"
    kubectl("wait", "--for=condition=established", "crd", "--all", "--timeout=50s")  # within kubectl()'s 60 s

    # A TLS Secret for the mail host, from a CA the host's clients trust.
    ca = trustme.CA()
    certificate = ca.issue_cert("mail.example.com", "example.com")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(certificate.cert_chain_pems[0].bytes())
    key.write_bytes(certificate.private_key_pem.bytes())
    kubectl("create", "namespace", NAMESPACE)
    kubectl("-n", NAMESPACE, "create", "secret", "tls", "mail-example-com-tls", f"--cert={cert}", f"--key={key}")
    kubectl("apply", "-f", "-", stdin=MANIFESTS)

    mail = _wait(node, lambda: _ready_pod(node, NAMESPACE, "example-com-0"), "the mail node pod Ready")
    # What `kubectl get md` shows: the operator pod saw its node Ready.
    _wait(node, functools.partial(_domain_ready, node), "MailDomain example-com Ready with 1 ready replica")
    sts = _get(node, "-n", NAMESPACE, "statefulset", "example-com")
    assert sts is not None and sts["spec"]["template"]["spec"]["containers"][0]["image"] == f"{REPOSITORY}:{VERSION}"
    claim = _get(node, "-n", NAMESPACE, "pvc", "data-example-com-0")
    assert claim is not None and claim["status"]["phase"] == "Bound"
    assert claim["spec"]["volumeName"].startswith("local-pv")
    volume = _get(node, "pv", claim["spec"]["volumeName"])
    assert volume is not None
    on_disk = Path(volume["spec"]["hostPath"]["path"])

    service = _get(node, "-n", NAMESPACE, "service", "example-com")
    assert service is not None  # a LoadBalancer by default (none here): its ClusterIP serves all the same
    address = service["spec"]["clusterIP"]
    _wait(node, functools.partial(_banner, address, 25), "SMTP through the Service", within=120)
    _deliver(swaks, address, tmp_path)

    context = ssl.create_default_context()
    ca.configure_trust(context)
    inbox = _wait(node, lambda: _read_inbox(address, context), "alice's message over IMAP", within=120)
    [stored] = inbox
    assert stored.endswith(MESSAGE), stored  # what was sent, byte for byte, after the trace headers
    trace = stored.removesuffix(MESSAGE)
    assert trace.startswith(b"Return-Path: <sender@remote.test>\r\n") and b"\r\nReceived: from remote.test" in trace

    metrics = _wait(node, lambda: _fetch(f"http://{mail['status']['podIP']}:8080/metrics"), "the pod's /metrics")
    assert 'mailnode_smtp_messages_accepted_total{listener="smtp"} 1.0' in metrics, metrics
    used = _wait(node, lambda: _used_bytes(node, "alice"), "alice's status.usedBytes from the operator pod")
    assert used >= len(MESSAGE)
    # The store on the PersistentVolume, written by the node's user (the hostPath volume is the node's
    # directory on this machine; kubelet applies no fsGroup to hostPath, so the node writes as 10001 there).
    files = [path for path in on_disk.rglob("*") if path.is_file()]
    assert files and {path.stat().st_uid for path in files} == {10001}, [(p, p.stat().st_uid) for p in files]
    assert any(MESSAGE in path.read_bytes() for path in files)

    # The StatefulSet brings a deleted pod back on the same claim, and the mail is still there.
    kubectl("-n", NAMESPACE, "delete", "pod", "example-com-0", "--wait=false")
    uid = mail["metadata"]["uid"]
    back = _wait(
        node,
        lambda: (
            (pod := _ready_pod(node, NAMESPACE, "example-com-0")) is not None and pod["metadata"]["uid"] != uid and pod
        ),
        "example-com-0 back from the StatefulSet",
    )
    [data_volume] = [v for v in back["spec"]["volumes"] if v["name"] == "data"]
    assert data_volume["persistentVolumeClaim"]["claimName"] == "data-example-com-0"
    again = _wait(node, lambda: _read_inbox(address, context), "alice's message after the restart", within=120)
    assert again == [stored]

    # Neither the operator (in-cluster login, liveness probe) nor the new node restarted on the way.
    for namespace, name in [(SYSTEM, operator["metadata"]["name"]), (NAMESPACE, "example-com-0")]:
        pod = _get(node, "-n", namespace, "pod", name)
        assert pod is not None and pod["status"]["containerStatuses"][0]["restartCount"] == 0, _diagnostics(node)

    # The chart's own test hook, on the same image.
    tested = _helm(node, "test", RELEASE, "--logs", f"--timeout={int(PODS)}s")
    assert tested.returncode == 0, tested.stdout + tested.stderr + _diagnostics(node)
    assert "Phase:          Succeeded" in tested.stdout and "the operator answers" in tested.stdout, tested.stdout
