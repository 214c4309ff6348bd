"""The cert-manager Certificate of spec.tls.issuerRef on a real API server: the Certificate CRD cut down
(tests/cluster/certmanager-crd.yaml) applied with kubectl, `mailfleet operator` out of the cluster, the test
in cert-manager's place (it writes the Certificate's status and the Secret). The API server judges the
MailDomain's issuerRef (the CRD's schema and defaults), the Certificate the operator sends (its schema,
status subresource) and the owner reference (the garbage collector removes the Certificate with its
MailDomain)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.cluster.conftest import ROOT, ControlPlane
from tests.cluster.test_control_plane import _condition, _get, _until

NAMESPACE = "certs"  # apart from the other tests' namespaces: all share the session's control plane


def test_the_certificate_on_a_real_api_server(control_plane: ControlPlane, tmp_path: Path) -> None:
    plane = control_plane
    plane.kubectl("apply", "-f", str(ROOT / "crds"), "-f", str(Path(__file__).with_name("certmanager-crd.yaml")))
    plane.kubectl("wait", "--for=condition=established", "crd", "--all", "--timeout=60s")
    plane.kubectl("create", "namespace", NAMESPACE)
    log = (tmp_path / "operator.log").open("wb")
    operator = subprocess.Popen(
        [sys.executable, "-m", "mailfleet.cli", "operator", "--namespace", NAMESPACE, "--usage-interval", "0"],
        env={**os.environ, "KUBECONFIG": str(plane.kubeconfig)}, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        plane.kubectl("-n", NAMESPACE, "apply", "-f", "-", stdin=(
            "apiVersion: mailfleet.io/v1alpha1\nkind: MailDomain\nmetadata: {name: example-com}\n"
            "spec: {domain: example.com, tls: {secretName: mail-tls,\n"
            "                                  issuerRef: {name: letsencrypt, kind: ClusterIssuer}}}\n"
        ))  # fmt: skip
        domain = _get(plane, "-n", NAMESPACE, "md", "example-com")
        assert domain is not None  # the API server defaulted the issuer's group
        assert domain["spec"]["tls"]["issuerRef"] == {
            "name": "letsencrypt",
            "kind": "ClusterIssuer",
            "group": "cert-manager.io",
        }

        certificate = _until(lambda: _get(plane, "-n", NAMESPACE, "certificate", "example-com-tls"), "the Certificate")
        (owner,) = certificate["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("MailDomain", "example-com", domain["metadata"]["uid"])
        assert certificate["spec"] == {
            "secretName": "mail-tls",
            "dnsNames": [
                "mail.example.com",
                "autoconfig.example.com",
                "autodiscover.example.com",
                "mta-sts.example.com",
            ],
            "issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer", "group": "cert-manager.io"},
        }
        _until(
            lambda: (
                _condition(_get(plane, "-n", NAMESPACE, "md", "example-com"), "Degraded").get("reason")
                == "TLSCertificatePending"
            ),
            "the domain waiting for its certificate",
        )
        assert _get(plane, "-n", NAMESPACE, "statefulset", "example-com") is None

        # cert-manager's part: the Certificate ready, and the Secret it fills.
        ready = {"type": "Ready", "status": "True", "reason": "Ready", "message": "Certificate is up to date"}
        plane.kubectl("-n", NAMESPACE, "patch", "certificate", "example-com-tls", "--subresource=status",
                      "--type=merge", "-p", json.dumps({"status": {"conditions": [ready]}}))  # fmt: skip
        cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=mail.example.com",
             "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
        )  # fmt: skip
        plane.kubectl("-n", NAMESPACE, "create", "secret", "tls", "mail-tls", f"--cert={cert}", f"--key={key}")
        issued = _until(
            lambda: (
                (d := _get(plane, "-n", NAMESPACE, "md", "example-com"))
                and _condition(d, "Certificate").get("reason") == "Issued"
                and d
            ),
            "the Certificate condition Issued",
        )
        assert _condition(issued, "Certificate")["status"] == "True"
        assert _condition(issued, "Degraded")["status"] == "False"
        _until(lambda: _get(plane, "-n", NAMESPACE, "statefulset", "example-com"), "the StatefulSet")

        # Deleting the MailDomain: the garbage collector removes its Certificate.
        plane.kubectl("-n", NAMESPACE, "delete", "md", "example-com", "--wait=false")
        _until(
            lambda: _get(plane, "-n", NAMESPACE, "certificate", "example-com-tls") is None, "the Certificate collected"
        )
    finally:
        operator.send_signal(signal.SIGTERM)
        code = operator.wait(30)
    assert code == 0, (tmp_path / "operator.log").read_text()[-3000:]
