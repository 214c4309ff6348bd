"""Issue 13's storage item on the real node (tests/cluster/node.py): a CSI driver with the snapshot
controller, and a MailBackup with method VolumeSnapshot and a restore through `spec.restore` end to end.

The kubernetes-csi hostpath driver and node-driver-registrar are not served by the Go module proxy here, so
the driver is the project's own single-node one (tools/csi-hostpath: volumes and snapshots are directories,
kubelet's plugin registration in the same process); csi-provisioner, csi-snapshotter and snapshot-controller
are kubernetes-csi's, with the snapshot CRDs of their release (scripts/build-csi). All four run as host
processes beside kubelet, as the node's own daemons do: the driver's bind mounts land in kubelet's pod
directories on this machine, where a pod would need Bidirectional propagation.

The path: helm install (the operator as the chart's pod, watching one namespace), a MailDomain on the CSI
StorageClass, swaks delivers to alice, a MailBackup with method VolumeSnapshot becomes Completed (the node's
checkpoint around the snapshot, cut by csi-snapshotter through the driver), the domain is deleted, and a new
MailDomain for the same mail domain with `spec.restore.backupName` starts on a claim the provisioner made from
the snapshot: IMAP reads alice's message back, byte for byte."""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.cluster.conftest import ROOT, _built
from tests.cluster.node import Node, until
from tests.cluster.test_pods import (
    MESSAGE,
    PASSWORD,
    PODS,
    REPOSITORY,
    VERSION,
    _banner,
    _deliver,
    _diagnostics,
    _get,
    _helm,
    _read_inbox,
    _ready_pod,
)
from tests.conftest import require_tool

DRIVER = "hostpath.csi.mailfleet.io"
RELEASE, SYSTEM, NAMESPACE = "mailfleet-csi", "mailfleet-csi-system", "csi-mail"

CLASSES = f"""
apiVersion: storage.k8s.io/v1
kind: CSIDriver
metadata: {{name: {DRIVER}}}
spec: {{attachRequired: false, podInfoOnMount: false, fsGroupPolicy: None, volumeLifecycleModes: [Persistent]}}
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {{name: csi-hostpath}}
provisioner: {DRIVER}
volumeBindingMode: Immediate
reclaimPolicy: Delete
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata:
  name: csi-hostpath
  annotations: {{snapshot.storage.kubernetes.io/is-default-class: "true"}}
driver: {DRIVER}
deletionPolicy: Delete
"""


def _domain(name: str, *, restore: str | None = None) -> str:
    spec = {
        "domain": "example.com",
        "replicas": 1,
        "storage": {"size": "1Gi", "storageClassName": "csi-hostpath"},
        "tls": {"secretName": "mail-example-com-tls"},
    }
    if restore is not None:
        spec["restore"] = {"backupName": restore}
    return json.dumps(
        {"apiVersion": "mailfleet.io/v1alpha1", "kind": "MailDomain", "metadata": {"name": name}, "spec": spec}
    )


MAILBOX = f"""
apiVersion: v1
kind: Secret
metadata: {{name: passwords}}
type: Opaque
stringData: {{alice: {PASSWORD}}}
---
apiVersion: mailfleet.io/v1alpha1
kind: Mailbox
metadata: {{name: alice}}
spec:
  address: alice@example.com
  passwordSecretRef: {{name: passwords, key: alice}}
"""


class Storage:
    """The driver and the three kubernetes-csi daemons as host processes, logs under `root`."""

    def __init__(self, node: Node, *, built: Path, root: Path) -> None:
        self.node, self.built, self.root = node, built, root
        self.processes: list[subprocess.Popen[bytes]] = []
        kubelet = node.root / "kubelet" / "root"  # node.py's --root-dir
        self.socket = kubelet / "plugins" / DRIVER / "csi.sock"
        self.registry = kubelet / "plugins_registry"

    def _run(self, name: str, *argv: object) -> None:
        log = (self.root / f"{name}.log").open("wb")
        process = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)

    def start(self) -> None:
        kubeconfig = f"--kubeconfig={self.node.plane.kubeconfig}"
        self._run(
            "csi-hostpath", self.built / "csi-hostpath", f"--endpoint={self.socket}", f"--registry={self.registry}",
            f"--data={self.root / 'data'}", f"--node={self.node.name}",
        )  # fmt: skip
        until(self.socket.exists, "the driver's socket", within=60, log=self.root / "csi-hostpath.log")
        for name in ("csi-provisioner", "csi-snapshotter"):
            self._run(name, self.built / name, f"--csi-address={self.socket}", kubeconfig, "--v=2")
        self._run("snapshot-controller", self.built / "snapshot-controller", kubeconfig, "--v=2")

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}" for path in sorted(self.root.glob("*.log"))
        )

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@contextlib.contextmanager
def _storage(node: Node, *, built: Path, root: Path) -> Iterator[Storage]:
    storage = Storage(node, built=built, root=root)
    try:
        storage.start()
        yield storage
    finally:
        storage.stop()


def _wait(node: Node, storage: Storage, probe: Any, what: str, *, within: float = PODS) -> Any:
    try:
        return until(probe, what, within=within)
    except pytest.fail.Exception as failure:
        pytest.fail(f"{failure}\n{_diagnostics(node)}\n{storage.logs()}")


def _csi_volumes(node: Node) -> list[str]:
    volumes = (_get(node, "pv") or {}).get("items", [])
    return [v["metadata"]["name"] for v in volumes if v["spec"].get("csi", {}).get("driver") == DRIVER]


def _phase(node: Node, kind: str, name: str) -> str | None:
    found = _get(node, "-n", NAMESPACE, kind, name) or {}
    return (found.get("status") or {}).get("phase")


def test_a_volume_snapshot_backup_and_a_restore_on_csi(node: Node, tmp_path: Path, pytestconfig: pytest.Config) -> None:
    swaks = require_tool("swaks")
    built = _built(pytestconfig, "build-csi")
    node.import_image(_built(pytestconfig, "build-image"))
    kubectl = node.plane.kubectl
    kubectl("apply", "--server-side", "-f", str(built / "crd"))
    kubectl("wait", "--for=condition=established", "crd", "--all", "--timeout=50s")
    logs = tmp_path / "csi"
    logs.mkdir()
    with _storage(node, built=built, root=logs) as storage:
        try:
            kubectl("apply", "-f", "-", stdin=CLASSES)
            csinode = functools.partial(kubectl, "get", "csinode", node.name, "-o", "json", check=False)
            _wait(node, storage, lambda: DRIVER in csinode().stdout, "kubelet registered the driver", within=120)
            kubectl("create", "namespace", NAMESPACE)  # before the chart, which gives the operator a Role in it
            install = _helm(
                node, "install", RELEASE, str(ROOT / "charts" / "mailfleet"), "--create-namespace",
                f"--set=image.repository={REPOSITORY}", f"--set=image.tag={VERSION}",
                "--set=image.pullPolicy=Never", f"--set=watchNamespaces={{{NAMESPACE}}}", namespace=SYSTEM,
            )  # fmt: skip
            assert install.returncode == 0, install.stderr
            kubectl("wait", "--for=condition=established", "crd", "--all", "--timeout=50s")
            ca = trustme.CA()
            certificate = ca.issue_cert("mail.example.com", "example.com")
            cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
            cert.write_bytes(certificate.cert_chain_pems[0].bytes())
            key.write_bytes(certificate.private_key_pem.bytes())
            kubectl(
                "-n", NAMESPACE, "create", "secret", "tls", "mail-example-com-tls", f"--cert={cert}", f"--key={key}"
            )
            kubectl("-n", NAMESPACE, "apply", "-f", "-", stdin=MAILBOX)
            kubectl("-n", NAMESPACE, "apply", "-f", "-", stdin=_domain("example-com"))

            _wait(node, storage, lambda: _ready_pod(node, NAMESPACE, "example-com-0"), "the mail node pod Ready")
            claim = _get(node, "-n", NAMESPACE, "pvc", "data-example-com-0")
            assert claim is not None and claim["spec"]["storageClassName"] == "csi-hostpath"
            volume = _get(node, "pv", claim["spec"]["volumeName"])
            assert volume is not None and volume["spec"]["csi"]["driver"] == DRIVER  # provisioned, not a local PV

            service = _get(node, "-n", NAMESPACE, "service", "example-com")
            assert service is not None
            address = service["spec"]["clusterIP"]
            _wait(node, storage, functools.partial(_banner, address, 25), "SMTP through the Service", within=120)
            _deliver(swaks, address, tmp_path)
            context = ssl.create_default_context()
            ca.configure_trust(context)
            [stored] = _wait(node, storage, lambda: _read_inbox(address, context), "alice's message", within=120)
            assert stored.endswith(MESSAGE)

            kubectl("-n", NAMESPACE, "apply", "-f", "-", stdin=(
                "apiVersion: mailfleet.io/v1alpha1\nkind: MailBackup\nmetadata: {name: b1}\n"
                "spec: {domainRef: example-com, method: VolumeSnapshot}\n"))  # fmt: skip
            _wait(node, storage, lambda: _phase(node, "mbk", "b1") in ("Completed", "Failed"), "MailBackup b1 done")
            backup = _get(node, "-n", NAMESPACE, "mbk", "b1")
            assert backup is not None and backup["status"]["phase"] == "Completed", (backup, storage.logs())
            assert backup["status"]["snapshots"] == ["b1-0"]
            snapshot = _get(node, "-n", NAMESPACE, "volumesnapshot", "b1-0")
            assert snapshot is not None and snapshot["status"]["readyToUse"] is True
            content = _get(node, "volumesnapshotcontent", snapshot["status"]["boundVolumeSnapshotContentName"])
            assert content is not None and content["spec"]["driver"] == DRIVER  # cut by the driver

            # The domain is lost (its claim too), and a new one restores it from the backup.
            kubectl("-n", NAMESPACE, "delete", "md", "example-com", "--wait=true", "--timeout=50s")
            _wait(node, storage, lambda: _get(node, "-n", NAMESPACE, "pod", "example-com-0") is None,
                  "example-com-0 gone")  # fmt: skip
            kubectl("-n", NAMESPACE, "delete", "pvc", "data-example-com-0", "--wait=true", "--timeout=50s")
            kubectl("-n", NAMESPACE, "apply", "-f", "-", stdin=_domain("restored", restore="b1"))
            _wait(node, storage, lambda: _ready_pod(node, NAMESPACE, "restored-0"), "the restored pod Ready")
            claim = _get(node, "-n", NAMESPACE, "pvc", "data-restored-0")
            assert claim is not None and claim["spec"]["dataSource"]["name"] == "b1-0"
            service = _get(node, "-n", NAMESPACE, "service", "restored")
            assert service is not None
            address = service["spec"]["clusterIP"]
            again = _wait(node, storage, lambda: _read_inbox(address, context), "alice's restored message", within=120)
            assert again == [stored]
        finally:
            # While the daemons run: claims and snapshots deleted through them, the driver's mounts undone.
            kubectl("delete", "namespace", NAMESPACE, "--wait=true", "--timeout=50s", check=False)
            _helm(node, "uninstall", RELEASE, "--wait", namespace=SYSTEM)
            kubectl("delete", "namespace", SYSTEM, "--wait=true", "--timeout=50s", check=False)
            _wait(node, storage, lambda: not _csi_volumes(node), "the CSI volumes deleted", within=120)
            kubectl("delete", "-f", "-", stdin=CLASSES, check=False)
