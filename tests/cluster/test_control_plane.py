"""The chart and the operator on a real API server: helm installs the chart, kubectl applies the examples,
`mailfleet operator` (out of the cluster, with a kubeconfig) builds the domains (example.com of one node,
example.org of three, whose Mailboxes show their node; a replicas change grows the StatefulSet); the API
server's own validation, status subresource, generation and garbage collector are the judges."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mailfleet.specs import placement
from tests.cluster.conftest import BIN, ROOT, ControlPlane


def _until(probe: Callable[[], Any], what: str, within: float = 60) -> Any:
    deadline = time.monotonic() + within
    while not (result := probe()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within} s waiting for {what}")
        time.sleep(0.5)
    return result


def _get(plane: ControlPlane, *args: str) -> dict[str, Any] | None:
    result = plane.kubectl("get", "-o", "json", *args, check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def _node_of(plane: ControlPlane, mailbox: str) -> str | None:
    """status.node of the Mailbox, once written."""
    return ((_get(plane, "-n", "mail", "mbx", mailbox) or {}).get("status") or {}).get("node")


def _condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def test_the_chart_and_the_operator_on_a_real_api_server(control_plane: ControlPlane, tmp_path: Path) -> None:
    plane = control_plane
    helm = subprocess.run(
        [str(BIN / "helm"), "install", "mailfleet", str(ROOT / "charts" / "mailfleet"), "--namespace",
         "mailfleet-system", "--create-namespace", "--kubeconfig", str(plane.kubeconfig)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert helm.returncode == 0, helm.stderr
    plane.kubectl("wait", "--for=condition=established", "crd", "--all", "--timeout=60s")
    assert _get(plane, "-n", "mailfleet-system", "deployment", "mailfleet") is not None

    plane.kubectl("create", "namespace", "mail")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=mail.example.com",
         "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
    )  # fmt: skip
    for tls in ("mail-example-com-tls", "mail-example-org-tls"):  # examples/cluster.yaml's domain: example.org
        plane.kubectl("-n", "mail", "create", "secret", "tls", tls, f"--cert={cert}", f"--key={key}")
    plane.kubectl("-n", "mail", "apply", "-f", str(ROOT / "examples"))

    # The CRD schema refuses a bad address with the message kubectl shows.
    bad = plane.kubectl("-n", "mail", "apply", "-f", "-", check=False, stdin=(
        "apiVersion: mailfleet.io/v1alpha1\nkind: Mailbox\nmetadata: {name: bad}\n"
        "spec: {address: not-an-address, passwordSecretRef: {name: x}}\n"))  # fmt: skip
    assert bad.returncode != 0
    assert 'The Mailbox "bad" is invalid: spec.address: Invalid value: "not-an-address"' in bad.stderr

    log = (tmp_path / "operator.log").open("wb")
    operator = subprocess.Popen(
        [sys.executable, "-m", "mailfleet.cli", "operator", "--namespace", "mail", "--usage-interval", "0"],
        env={**os.environ, "KUBECONFIG": str(plane.kubeconfig)}, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        for kind, name in [("statefulset", "example-com"), ("service", "example-com"),
                           ("service", "example-com-headless"), ("configmap", "example-com-config"),
                           ("secret", "example-com-directory"), ("secret", "example-com-dkim"),
                           ("poddisruptionbudget", "example-com"), ("networkpolicy", "example-com"),
                           ("serviceaccount", "example-com")]:  # fmt: skip
            obj = _until(lambda: _get(plane, "-n", "mail", kind, name), f"{kind} {name}")  # noqa: B023
            assert obj["metadata"]["ownerReferences"][0]["kind"] == "MailDomain", (kind, name)
        domain = _until(
            lambda: (d := _get(plane, "-n", "mail", "md", "example-com")) and _condition(d, "Degraded") and d,
            "the MailDomain's status",
        )
        assert _condition(domain, "Degraded")["status"] == "False"
        assert _condition(domain, "Ready")["reason"] == "NodesNotReady"  # no kubelet: the pod never runs
        assert domain["status"]["observedGeneration"] == domain["metadata"]["generation"] == 1
        records = {(r["type"], r["name"]) for r in domain["status"]["dnsRecords"]}
        assert {kind for kind, _ in records} == {"MX", "TXT", "CNAME", "SRV"}  # TLS: client set-up, MTA-STS
        assert {("TXT", "_mta-sts.example.com"), ("CNAME", "autoconfig.example.com")} <= records
        alice = _until(
            lambda: _condition(_get(plane, "-n", "mail", "mbx", "alice"), "Ready").get("reason") == "Served",
            "alice Served",
        )
        assert alice

        # A domain of three nodes (examples/cluster.yaml): the API server takes the StatefulSet as built, and
        # each Mailbox's status names the pod that stores it, which `kubectl get mbx` shows.
        sts = _until(lambda: _get(plane, "-n", "mail", "statefulset", "example-org"), "the StatefulSet of three")
        assert sts["spec"]["replicas"] == 3 and sts["spec"]["podManagementPolicy"] == "OrderedReady"
        assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
        spread = sts["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
        for name in ("carol", "dave", "erin"):
            home = placement.rendezvous(f"{name}@example.org", 3)
            node = _until(functools.partial(_node_of, plane, name), f"{name}'s node")
            assert node == f"example-org-{home}"
        table = plane.kubectl("-n", "mail", "get", "mbx", "carol").stdout
        assert "NODE" in table and f"example-org-{placement.rendezvous('carol@example.org', 3)}" in table
        # Another number of nodes is accepted: the StatefulSet grows first; no mailbox moves before the new
        # node is ready (it never is: no kubelet), so each stays where it is (tests/cluster/test_moves.py moves).
        plane.kubectl("-n", "mail", "patch", "md", "example-org", "--type=merge", "-p", '{"spec": {"replicas": 4}}')
        _until(
            lambda: (_get(plane, "-n", "mail", "statefulset", "example-org") or {})["spec"]["replicas"] == 4,
            "the StatefulSet grown to 4",
        )
        _until(
            lambda: (
                (d := _get(plane, "-n", "mail", "md", "example-org"))
                and d["status"].get("observedGeneration") == d["metadata"]["generation"]
                and _condition(d, "Degraded").get("status") == "False"
            ),
            "the replicas change reconciled, not refused",
        )
        assert _node_of(plane, "carol") == f"example-org-{placement.rendezvous('carol@example.org', 3)}"

        # A spec change bumps generation; observedGeneration follows (through the status subresource).
        plane.kubectl("-n", "mail", "patch", "md", "example-com", "--type=merge", "-p",
                      '{"spec": {"smtp": {"maxMessageSize": "10Mi"}}}')  # fmt: skip
        _until(
            lambda: ((_get(plane, "-n", "mail", "md", "example-com") or {}).get("status") or {}).get(
                "observedGeneration") == 2,
            "observedGeneration 2",
        )  # fmt: skip

        # Deleting the MailDomain: the garbage collector removes what it owned.
        plane.kubectl("-n", "mail", "delete", "md", "example-com", "--wait=false")
        _until(lambda: _get(plane, "-n", "mail", "statefulset", "example-com") is None, "the StatefulSet collected")
        _until(lambda: _get(plane, "-n", "mail", "configmap", "example-com-config") is None, "the ConfigMap collected")
        _until(
            lambda: _condition(_get(plane, "-n", "mail", "mbx", "alice"), "Ready").get("reason") == "DomainNotFound",
            "alice DomainNotFound",
        )
    finally:
        operator.send_signal(signal.SIGTERM)
        code = operator.wait(30)
    assert code == 0, (tmp_path / "operator.log").read_text()[-3000:]
