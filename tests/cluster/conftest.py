"""Tier 4 of DESIGN.md: a real control plane on 127.0.0.1, kine (in memory) + kube-apiserver +
kube-controller-manager v1.37.2, built by scripts/build-cluster (cached per machine), driven with
the real kubectl and helm; the `node` fixture adds a node that runs pods (node.py). `make e2e-cluster` runs
these tests alone; `make test` runs them with the rest, last: it starts scripts/build-cluster in the
background before bootstrap, so a fresh machine's cold build (19 CPU-minutes) overlaps the other tiers, and the
fixtures here wait for it."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.node.conftest import free_port

if TYPE_CHECKING:
    from tests.cluster.node import Node

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
BIN = Path(sys.executable).parent


class ControlPlane:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.token = secrets.token_hex(16)
        self.kubeconfig = root / "kubeconfig"
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, binaries: Path, *, address: str = "127.0.0.1") -> None:
        """`address`: where the API server listens and what it advertises. 127.0.0.1 for the tests without
        pods; tests/cluster/node.py gives the node's bridge address, which pods reach, and then the endpoint
        reconciler publishes it as the `kubernetes` Service's endpoint."""
        root = self.root
        subprocess.run(["openssl", "genrsa", "-out", root / "sa.key", "2048"], check=True, capture_output=True)
        subprocess.run(
            ["openssl", "rsa", "-in", root / "sa.key", "-pubout", "-out", root / "sa.pub"],
            check=True,
            capture_output=True,
        )
        (root / "tokens.csv").write_text(f"{self.token},admin,admin,system:masters\n")
        etcd, api = free_port(), free_port()
        self._run("kine", binaries / "kine", "--listen-address", f"127.0.0.1:{etcd}", "--metrics-bind-address", "0",
                  "--endpoint", "memory://")  # fmt: skip
        self._run(
            "kube-apiserver", binaries / "kube-apiserver", f"--etcd-servers=http://127.0.0.1:{etcd}",
            f"--bind-address={address}", f"--advertise-address={address}", f"--secure-port={api}",
            f"--cert-dir={root / 'certs'}", "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={root / 'sa.pub'}", f"--service-account-signing-key-file={root / 'sa.key'}",
            f"--token-auth-file={root / 'tokens.csv'}", "--authorization-mode=RBAC",
            "--service-cluster-ip-range=10.96.0.0/16", "--kubelet-preferred-address-types=InternalIP",
            f"--endpoint-reconciler-type={'none' if address == '127.0.0.1' else 'lease'}",
        )  # fmt: skip
        self.server = f"https://{address}:{api}"
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            "clusters: [{name: cp, cluster: "
            f"{{server: '{self.server}', insecure-skip-tls-verify: true}}}}]\n"
            f"users: [{{name: admin, user: {{token: '{self.token}'}}}}]\n"
            "contexts: [{name: cp, context: {cluster: cp, user: admin}}]\ncurrent-context: cp\n"
        )
        deadline = time.monotonic() + 60
        while self.kubectl("get", "--raw", "/readyz", check=False).returncode != 0:
            if time.monotonic() > deadline:
                pytest.fail(
                    "kube-apiserver not ready after 60 s:\n" + (root / "kube-apiserver.log").read_text()[-3000:]
                )
            time.sleep(0.5)
        self._run(
            "kube-controller-manager", binaries / "kube-controller-manager", f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}", f"--authorization-kubeconfig={self.kubeconfig}",
            "--authentication-skip-lookup=true", "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            f"--cert-dir={root / 'certs'}",
            "--controllers=*,-kube-apiserver-serving-clustertrustbundle-publisher-controller",
            "--use-service-account-credentials=false", "--leader-elect=false",
            f"--service-account-private-key-file={root / 'sa.key'}",
            f"--root-ca-file={root / 'certs' / 'apiserver.crt'}",
        )  # fmt: skip

    def _run(self, name: str, *argv: object) -> None:
        log = (self.root / f"{name}.log").open("wb")
        self.processes.append(
            subprocess.Popen([str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )

    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(BIN / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            text=True,
            input=stdin,
            timeout=60,
        )
        if check and result.returncode != 0:
            pytest.fail(f"kubectl {' '.join(args)}: {result.stderr}")
        return result

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[ControlPlane]:
    binaries = _built(pytestconfig, "build-cluster")
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane"))
    try:
        plane.start(binaries)
        yield plane
    finally:
        plane.stop()
    assert all(p.returncode is not None for p in plane.processes)


@pytest.fixture(scope="package")  # stopped when tests/cluster ends: the later tiers run without kubelet's load
def node(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Node]:
    """A single-node cluster that runs pods (tests/cluster/node.py), its own control plane on the node's
    address; the tests that need no pods use `control_plane` above, which starts in seconds."""
    from tests.cluster.node import running_node

    with running_node(tmp_path_factory.mktemp("node"), binaries=_built(pytestconfig, "build-cluster")) as started:
        yield started


def _built(pytestconfig: pytest.Config, script: str) -> Path:
    """Run scripts/`script` (cached per machine) and return the directory it prints. A cold build takes
    minutes: its progress goes to the terminal, not into pytest's capture."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        built = subprocess.run([str(ROOT / "scripts" / script)], stdout=subprocess.PIPE, text=True, check=False)
    if built.returncode != 0:
        pytest.fail(f"scripts/{script} failed (exit {built.returncode}); its log is above")
    return Path(built.stdout.strip())
