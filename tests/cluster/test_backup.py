"""A MailBackup and a restore on a real API server: the CSI snapshot CRDs (tests/cluster/volumesnapshot-crds.yaml)
applied with kubectl, `mailfleet operator` out of the cluster with its node URL on a fake mail node
(tests/operator/fakenode.py), the test in the snapshot controller's place. The API server judges the
statuses (the CRDs' schemas, status subresources), the owner references and the claims; the
kube-controller-manager's StatefulSet controller makes the node claims a backup snapshots, and would make
empty ones if a restore's claims came after the StatefulSet."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.cluster.conftest import ROOT, ControlPlane
from tests.cluster.test_control_plane import _get, _until
from tests.operator.fakenode import FakeNode, serving

NAMESPACE = "backup"  # apart from test_control_plane.py's "mail": both share the session's control plane


def _apply(plane: ControlPlane, manifest: str) -> None:
    plane.kubectl("-n", NAMESPACE, "apply", "-f", "-", stdin=manifest)


def _created(obj: dict[str, object]) -> datetime.datetime:
    meta = obj["metadata"]
    assert isinstance(meta, dict)
    return datetime.datetime.fromisoformat(str(meta["creationTimestamp"]).replace("Z", "+00:00"))


def test_a_backup_and_a_restore_on_a_real_api_server(control_plane: ControlPlane, tmp_path: Path) -> None:
    plane = control_plane
    plane.kubectl("apply", "-f", str(ROOT / "crds"), "-f", str(Path(__file__).with_name("volumesnapshot-crds.yaml")))
    plane.kubectl("wait", "--for=condition=established", "crd", "--all", "--timeout=60s")
    plane.kubectl("create", "namespace", NAMESPACE)

    node = FakeNode()

    async def at_resume() -> bool:  # in the fake node's loop, before it resumes writes
        snapshot = await asyncio.to_thread(_get, plane, "-n", NAMESPACE, "volumesnapshot", "b1-0")
        return bool(snapshot and (snapshot.get("status") or {}).get("creationTime"))

    node.on_resume = at_resume
    with serving(node):
        log = (tmp_path / "operator.log").open("wb")
        operator = subprocess.Popen(
            [sys.executable, "-m", "mailfleet.cli", "operator", "--namespace", NAMESPACE, "--usage-interval", "0",
             "--node-url", node.url],
            env={**os.environ, "KUBECONFIG": str(plane.kubeconfig)}, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            # The fake node's token, in the Secret the operator keeps and sends it from.
            plane.kubectl("-n", NAMESPACE, "create", "secret", "generic", "example-com-internal",
                          f"--from-literal=token={node.token}")  # fmt: skip
            _apply(plane, "apiVersion: mailfleet.io/v1alpha1\nkind: MailDomain\nmetadata: {name: example-com}\n"
                          "spec: {domain: example.com}\n")  # fmt: skip
            _until(lambda: _get(plane, "-n", NAMESPACE, "statefulset", "example-com"), "the StatefulSet")
            # The StatefulSet controller makes the node's claim (its pod never runs: there is no kubelet).
            _until(lambda: _get(plane, "-n", NAMESPACE, "pvc", "data-example-com-0"), "the node's claim", within=30)

            _apply(plane, "apiVersion: mailfleet.io/v1alpha1\nkind: MailBackup\nmetadata: {name: b1}\n"
                          "spec: {domainRef: example-com, method: VolumeSnapshot}\n")  # fmt: skip
            snapshot = _until(lambda: _get(plane, "-n", NAMESPACE, "volumesnapshot", "b1-0"), "VolumeSnapshot b1-0")
            backup = _get(plane, "-n", NAMESPACE, "mbk", "b1")
            assert backup is not None and backup["status"]["phase"] == "Running"
            assert node.paused and node.endpoints() == ["POST /snapshot"]
            (owner,) = snapshot["metadata"]["ownerReferences"]
            assert (owner["kind"], owner["name"], owner["uid"]) == ("MailBackup", "b1", backup["metadata"]["uid"])
            assert snapshot["spec"] == {"source": {"persistentVolumeClaimName": "data-example-com-0"}}

            # The snapshot controller's part: the volume is cut (writes resume), then the snapshot is ready.
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            for status in ({"creationTime": now, "readyToUse": False}, {"readyToUse": True, "restoreSize": "1Gi"}):
                plane.kubectl("-n", NAMESPACE, "patch", "volumesnapshot", "b1-0", "--subresource=status",
                              "--type=merge", "-p", json.dumps({"status": status}))  # fmt: skip
                if not status["readyToUse"]:
                    _until(lambda: not node.paused, "DELETE /snapshot", within=30)

            columns = _until(
                lambda: (
                    (row := plane.kubectl("-n", NAMESPACE, "get", "mbk", "b1", "--no-headers").stdout.split())
                    and row[3] == "Completed"
                    and row
                ),
                "kubectl get mbk: Completed",
                within=30,
            )
            assert columns[:4] == ["b1", "example-com", "VolumeSnapshot", "Completed"]
            done = _get(plane, "-n", NAMESPACE, "mbk", "b1")
            assert done is not None
            assert done["status"]["snapshots"] == ["b1-0"]
            assert done["status"]["pointInTime"] == node.point_in_time
            assert node.endpoints() == ["POST /snapshot", "DELETE /snapshot"]
            assert node.seen_at_resume == [True]  # cut before writes resumed

            # Restore into a new MailDomain: its claim is made from the snapshot, before its StatefulSet.
            _apply(plane, "apiVersion: mailfleet.io/v1alpha1\nkind: MailDomain\nmetadata: {name: restored}\n"
                          "spec: {domain: restored.example, restore: {backupName: b1}}\n")  # fmt: skip
            statefulset = _until(lambda: _get(plane, "-n", NAMESPACE, "statefulset", "restored"), "the StatefulSet")
            claim = _get(plane, "-n", NAMESPACE, "pvc", "data-restored-0")
            assert claim is not None
            # Made by the operator (the StatefulSet controller would have made one without a dataSource).
            assert claim["spec"]["dataSource"] == {
                "apiGroup": "snapshot.storage.k8s.io",
                "kind": "VolumeSnapshot",
                "name": "b1-0",
            }
            assert claim["metadata"]["annotations"]["mailfleet.io/restored-from"] == "b1"
            assert not claim["metadata"].get("ownerReferences")
            assert _created(claim) <= _created(statefulset)
        finally:
            operator.send_signal(signal.SIGTERM)
            code = operator.wait(30)
    assert code == 0, (tmp_path / "operator.log").read_text()[-3000:]
