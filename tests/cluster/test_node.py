"""Pods on the real single-node cluster (tests/cluster/node.py): a StatefulSet of one busybox httpd pod on a
PersistentVolume becomes Ready, its ClusterIP Service answers the host through kube-proxy, the pod resolves
names through the node's DNS at once (its Service's and its own among them) and reaches the API server with
its ServiceAccount token through the `kubernetes` Service, and a deleted pod comes back with the same volume.
The image is made here from Debian's busybox-static, without a registry."""

from __future__ import annotations

import functools
import json
import shutil
import ssl
import urllib.request
from pathlib import Path
from typing import Any

from tests.cluster.node import Node, image_archive, until

IMAGE = "localhost/mailfleet/busybox:test"

MANIFESTS = f"""
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web-pods}}
spec:
  clusterIP: None
  selector: {{app: web}}
  ports: [{{port: 8080}}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: web}}
spec:
  serviceName: web-pods
  replicas: 1
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
        - name: httpd
          image: {IMAGE}
          imagePullPolicy: Never
          # born: written once, by the first pod on the volume; the pod that replaces it serves the same file.
          command: [/bin/sh, -c, "test -f /data/born || cat /proc/sys/kernel/random/uuid > /data/born;
                    exec httpd -f -p 8080 -h /data"]
          readinessProbe:
            httpGet: {{path: /born, port: 8080}}
            periodSeconds: 1
          volumeMounts: [{{name: data, mountPath: /data}}]
  volumeClaimTemplates:
    - metadata: {{name: data}}
      spec:
        accessModes: [ReadWriteOnce]
        resources: {{requests: {{storage: 1Gi}}}}
"""


def _get(node: Node, *args: str) -> dict[str, Any] | None:
    result = node.plane.kubectl("get", "-o", "json", *args, check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def _ready_pod(node: Node, name: str) -> dict[str, Any] | None:
    pod = _get(node, "pod", name)
    if pod is None or pod["metadata"].get("deletionTimestamp"):
        return None
    conditions = pod["status"].get("conditions", [])
    return pod if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions) else None


def _resolves(node: Node, name: str, address: str) -> bool:
    return address in node.plane.kubectl("exec", "web-0", "--", "nslookup", name, check=False).stdout


def _fetch(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return None


def test_a_statefulset_pod_serves_through_its_service_and_comes_back_with_its_volume(
    node: Node, tmp_path: Path
) -> None:
    busybox = shutil.which("busybox")
    assert busybox is not None, "busybox-static is installed by scripts/bootstrap"
    archive = image_archive(
        tmp_path / "busybox.tar",
        tag=IMAGE,
        files={"/bin/busybox": Path(busybox)},
        links={name: "busybox" for name in ("/bin/sh", "/bin/httpd", "/bin/nslookup", "/bin/wget", "/bin/cat")},
        cmd=["/bin/sh"],
    )
    node.import_image(archive)
    node.dns_record("probe.mailfleet.test", "10.244.0.77")
    node.plane.kubectl("apply", "-f", "-", stdin=MANIFESTS)
    logs = node.root / "kubelet.log"

    first = until(lambda: _ready_pod(node, "web-0"), "pod web-0 Ready", within=240, log=logs)
    claim = _get(node, "pvc", "data-web-0")
    assert claim is not None and claim["status"]["phase"] == "Bound"
    assert claim["spec"]["volumeName"].startswith("local-pv")
    assert first["status"]["podIP"].startswith("10.244.0.")

    service = _get(node, "service", "web")
    assert service is not None
    born = until(lambda: _fetch(f"http://{service['spec']['clusterIP']}/born"), "the Service from the host",
                 within=120, log=node.root / "kube-proxy.log")  # fmt: skip
    assert len(born.strip()) == 36  # a uuid

    # In the pod: the node's DNS answers (a lookup that waited for a timeout would exceed nslookup's own 5 s
    # and fail), and the API server is reachable through the `kubernetes` Service the operator pod will use.
    lookup = node.plane.kubectl("exec", "web-0", "--", "nslookup", "probe.mailfleet.test", check=False)
    assert lookup.returncode == 0 and "10.244.0.77" in lookup.stdout, lookup.stdout + lookup.stderr
    # The names of Kubernetes' DNS that the operator uses (a StatefulSet pod's, behind the headless Service).
    names = {
        "web.default.svc.cluster.local": service["spec"]["clusterIP"],
        "web-0.web-pods.default.svc.cluster.local": first["status"]["podIP"],
    }
    for name, address in names.items():
        until(functools.partial(_resolves, node, name, address), f"{name} in the pods' DNS", within=60)
    resolv = node.plane.kubectl("exec", "web-0", "--", "cat", "/etc/resolv.conf").stdout
    assert f"nameserver {node.address}" in resolv
    kubernetes = _get(node, "service", "kubernetes")
    assert kubernetes is not None
    # Busybox's TLS and the API server share no cipher suite: plain HTTP to the TLS port gets Go's "400 Bad
    # Request" answer, which proves the path; the mounted token and CA are then checked from the host.
    cluster_ip = kubernetes["spec"]["clusterIP"]
    api = node.plane.kubectl("exec", "web-0", "--", "wget", "-q", "-O", "-", f"http://{cluster_ip}:443/", check=False)
    assert "400 Bad Request" in api.stdout + api.stderr, api.stdout + api.stderr
    secrets = "/var/run/secrets/kubernetes.io/serviceaccount"
    token = node.plane.kubectl("exec", "web-0", "--", "cat", f"{secrets}/token").stdout.strip()
    ca = node.plane.kubectl("exec", "web-0", "--", "cat", f"{secrets}/ca.crt").stdout
    request = urllib.request.Request(f"https://{cluster_ip}/api", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, context=ssl.create_default_context(cadata=ca), timeout=30) as response:
        assert json.load(response)["kind"] == "APIVersions"
    endpoints = _get(node, "endpoints", "kubernetes")
    assert endpoints is not None and endpoints["subsets"][0]["addresses"][0]["ip"] == node.address

    node.plane.kubectl("delete", "pod", "web-0", "--wait=false")
    uid = first["metadata"]["uid"]
    back = until(
        lambda: (pod := _ready_pod(node, "web-0")) is not None and pod["metadata"]["uid"] != uid and pod,
        "web-0 back from the StatefulSet",
        within=240,
        log=logs,
    )
    assert back["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "data-web-0"
    assert until(lambda: _fetch(f"http://{service['spec']['clusterIP']}/born"), "the Service again", within=120) == born
