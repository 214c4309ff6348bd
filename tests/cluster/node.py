"""A real single-node cluster for tier 4 (issue 13): the control plane of conftest.py listening on the node's
bridge address, plus containerd (Debian's, CRI v1, runc), bridge CNI (Debian's containernetworking-plugins),
kube-scheduler, kubelet and kube-proxy (scripts/build-cluster), a dnsmasq as the pods' DNS and hostPath
PersistentVolumes of a default StorageClass `local`. Images come without a registry: image_archive() writes a
docker-archive tarball and Node.import_image() puts it into the node's containerd (pods use them with
imagePullPolicy: Never). Used by the `node` fixture of conftest.py.

Everything lives under the fixture's temporary directory except what the kernel keeps globally: the bridge, the
iptables chains of kube-proxy, the CNI network namespaces and kubelet's cgroups; stop() removes them all, so a
second run on the same machine starts clean. Those are machine-wide, so one Node runs at a time per machine (a
file lock; a second session waits for the first)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shlex
import shutil
import signal
import ssl
import subprocess
import tarfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import pytest

from tests.cluster.conftest import ControlPlane
from tests.node.conftest import free_port

BRIDGE = "mfnode0"
SUBNET = "10.244.0.0/24"
NODE_IP = "10.244.0.1"  # on the bridge: the node's address, the pods' gateway, the API server's, the DNS server's
NODE_NAME = "mailfleet-node"
PAUSE_IMAGE = "localhost/mailfleet/pause:v1"
LOCK = Path("/run/lock/mailfleet-node.lock")
STATE = Path("/run/lock/mailfleet-node.json")  # what a run started, for the next one if it was killed
KUBELET_HOST_DIR = Path("/var/lib/kubelet")


def image_archive(
    path: Path, *, tag: str, files: Mapping[str, Path | bytes], links: Mapping[str, str] = {}, cmd: list[str]
) -> Path:
    """Write a one-layer image as a docker-archive tarball (what `ctr images import` reads) at `path`: `files`
    maps paths in the image to a host file or to content (all executable, owned by root), `links` to symlink
    targets. Deterministic: the same input gives the same image id."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        parents = {Path(p.lstrip("/")).parent for p in [*files, *links]}
        for directory in sorted({str(d) for p in parents for d in [p, *p.parents]} - {"."}):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, content in sorted(files.items()):
            data = content.read_bytes() if isinstance(content, Path) else content
            info = tarfile.TarInfo(name.lstrip("/"))
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
        for name, target in sorted(links.items()):
            info = tarfile.TarInfo(name.lstrip("/"))
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": cmd, "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        },
        sort_keys=True,
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [tag], "Layers": ["layer.tar"]}]).encode()
    with tarfile.open(path, "w") as archive:
        for name, data in (("layer.tar", layer_bytes), (config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            archive.addfile(info, io.BytesIO(data))
    return path


def _sh(*argv: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120, check=False)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(str(a) for a in argv)}: exit {result.returncode}: {result.stderr[-2000:]}")
    return result


def until(probe: Callable[[], Any], what: str, *, within: float, log: Path | None = None) -> Any:
    """Poll `probe` until it returns something true; fail after `within` seconds, with the tail of `log`."""
    deadline = time.monotonic() + within
    while not (result := probe()):
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
            pytest.fail(f"timed out after {within} s waiting for {what}\n{tail}")
        time.sleep(0.5)
    return result


def _started(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat), which tells it from a later one with its PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _kill_shims(socket: Path) -> None:
    """containerd-shim-runc-v2 processes outlive containerd (they are meant to); a node's name its socket."""
    mine = str(socket).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if mine in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)


def _unmount(root: Path) -> None:
    """Unmount everything under root (overlay rootfs, shm, kubelet's tmpfs volumes), deepest first."""
    prefix = str(root) + "/"
    with Path("/proc/self/mountinfo").open() as mountinfo:
        points = [line.split()[4] for line in mountinfo]
    for point in sorted({p for p in points if p.startswith(prefix)}, key=len, reverse=True):
        _sh("umount", "--lazy", point, check=False)


class ServiceNames(threading.Thread):
    """The records of Kubernetes' DNS specification that the chart needs, kept in a dnsmasq hosts file: a
    Service's `<svc>.<ns>.svc.cluster.local` (its ClusterIP, or for a headless one its pods' IPs) and a pod's
    `<hostname>.<subdomain>.<ns>.svc.cluster.local` (a StatefulSet's pods behind its headless Service, which
    the operator reaches). Polls the API server every second and SIGHUPs dnsmasq when they change."""

    def __init__(self, *, plane: ControlPlane, hosts: Path, dns: subprocess.Popen[bytes]) -> None:
        super().__init__(name="service-names", daemon=True)
        self.plane, self.hosts, self.dns = plane, hosts, dns
        self.stopping = threading.Event()
        self._tls = ssl.create_default_context()
        self._tls.check_hostname, self._tls.verify_mode = False, ssl.CERT_NONE  # like the tests' kubeconfig

    def run(self) -> None:
        written = ""
        while not self.stopping.wait(1.0):
            try:
                records = self._records()
            except (OSError, ValueError, KeyError):
                continue  # the API server starting or stopping: the next round
            if records != written:
                self.hosts.write_text(records)
                self.dns.send_signal(signal.SIGHUP)
                written = records

    def _list(self, path: str) -> list[dict[str, Any]]:
        request = urllib.request.Request(
            self.plane.server + path, headers={"Authorization": f"Bearer {self.plane.token}"}
        )
        with urllib.request.urlopen(request, context=self._tls, timeout=10) as response:
            return list(json.load(response)["items"])

    def _records(self) -> str:
        services = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in self._list("/api/v1/services")}
        lines: list[str] = []
        for pod in self._list("/api/v1/pods"):
            meta, spec, status = pod["metadata"], pod["spec"], pod.get("status", {})
            ip, namespace = status.get("podIP"), meta["namespace"]
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))
            if not ip or meta.get("deletionTimestamp"):
                continue
            for (ns, name), service in services.items():
                selector = service["spec"].get("selector")
                if ns != namespace or service["spec"].get("clusterIP") != "None" or not selector:
                    continue
                if not (ready or service["spec"].get("publishNotReadyAddresses")):
                    continue
                if selector.items() <= meta.get("labels", {}).items():
                    lines.append(f"{ip} {name}.{ns}.svc.cluster.local")
                    if spec.get("hostname") and spec.get("subdomain") == name:
                        lines.append(f"{ip} {spec['hostname']}.{name}.{ns}.svc.cluster.local")
        for (ns, name), service in services.items():
            cluster_ip = service["spec"].get("clusterIP")
            if cluster_ip and cluster_ip != "None":
                lines.append(f"{cluster_ip} {name}.{ns}.svc.cluster.local")
        return "".join(f"{line}\n" for line in sorted(lines))


class Node:
    """The cluster: `plane` (kubectl, kubeconfig), `address` (the node's IP, where ClusterIPs and pods are
    reachable from the host), import_image(), dns_record(); Services and StatefulSet pods get their DNS names
    (ServiceNames)."""

    def __init__(self, root: Path, *, binaries: Path) -> None:
        self.root = root
        self.binaries = binaries
        self.address = NODE_IP
        self.name = NODE_NAME
        self.plane = ControlPlane(root / "control-plane")
        self.socket = root / "containerd" / "containerd.sock"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.hosts = root / "dns" / "hosts"
        self._lock: IO[bytes] | None = None
        self._netns_before: set[str] = set()
        self._kubelet_dir_before = True
        self.service_names: ServiceNames | None = None

    # -- start ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        self._lock = LOCK.open("wb")
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # one node per machine: the bridge and iptables are global
        self._clean_after_killed_run()
        self._netns_before = self._netns()
        # kubelet's device manager always makes its socket here, whatever --root-dir says
        self._kubelet_dir_before = KUBELET_HOST_DIR.exists()
        _sh("ip", "link", "add", BRIDGE, "type", "bridge")
        _sh("ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
        _sh("ip", "link", "set", BRIDGE, "up")
        self.plane.root.mkdir()
        try:
            self.plane.start(self.binaries, address=NODE_IP)
        finally:
            self._record()
        self._start_dns()
        self._start_containerd()
        pause = self.root / "images" / "pause.tar"
        pause.parent.mkdir()
        image_archive(pause, tag=PAUSE_IMAGE, files={"/pause": self.binaries / "pause"}, cmd=["/pause"])
        self.import_image(pause)
        self._start_kubelet()
        self._start_scheduler_and_proxy()
        self._storage()
        until(self._node_ready, f"node {NODE_NAME} Ready", within=180, log=self.root / "kubelet.log")
        until(self._default_service_account, "the default ServiceAccount", within=120)

    def _run(self, name: str, *argv: object) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("wb")
        process = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        self._record()
        return process

    def _record(self) -> None:
        pids = [p.pid for p in [*self.plane.processes, *self.processes]]
        state = {
            "root": str(self.root),
            "processes": {p: _started(p) for p in pids},
            "netns": sorted(self._netns_before),
            "kubelet_dir": self._kubelet_dir_before,
        }
        STATE.write_text(json.dumps(state))

    def _clean_after_killed_run(self) -> None:
        """A run killed before its teardown (SIGKILL, a lost machine session) leaves its processes (each in
        its own process group), shims, mounts, chains and bridge: stop them before starting anew."""
        if STATE.exists():
            state = json.loads(STATE.read_text())
            for pid, started in state["processes"].items():
                if started is not None and _started(int(pid)) == started:  # the same process, not a reused PID
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(int(pid), signal.SIGKILL)
            old = Path(state["root"])
            _kill_shims(old / "containerd" / "containerd.sock")
            _unmount(old)
            # containerd's CRI names its pods' network namespaces cni-*; only a node makes them, one at a time
            for netns in self._netns() - set(state["netns"]):
                if netns.startswith("cni-"):
                    _sh("ip", "netns", "delete", netns, check=False)
            if not state["kubelet_dir"]:
                shutil.rmtree(KUBELET_HOST_DIR, ignore_errors=True)
        self._cleanup_iptables()
        self._cleanup_network()

    def _start_dns(self) -> None:
        """dnsmasq on the node's address, local only (no upstream: every answer is immediate), names from
        `hosts` (dns_record() adds to it)."""
        self.hosts.parent.mkdir()
        self.hosts.write_text("")
        services = self.hosts.parent / "services"
        services.write_text("")
        (self.root / "dns" / "resolv.conf").write_text(f"nameserver {NODE_IP}\n")
        self.dns = self._run(
            "dnsmasq", "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll",
            f"--addn-hosts={self.hosts}", f"--addn-hosts={services}", f"--listen-address={NODE_IP}",
            "--bind-interfaces", "--except-interface=lo", "--local=/#/", f"--pid-file={self.root / 'dns' / 'pid'}",
            "--user=root", "--log-facility=-",
        )  # fmt: skip
        self.service_names = ServiceNames(plane=self.plane, hosts=services, dns=self.dns)
        self.service_names.start()

    def dns_record(self, name: str, address: str) -> None:
        """Make `name` resolve to `address` for the pods (dnsmasq rereads its hosts file on SIGHUP)."""
        with self.hosts.open("a") as hosts:
            hosts.write(f"{address} {name}\n")
        self.dns.send_signal(signal.SIGHUP)

    def _start_containerd(self) -> None:
        d = self.root / "containerd"
        (d / "cni").mkdir(parents=True)
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        (d / "config.toml").write_text(
            f"""version = 2
root = "{d / "root"}"
state = "{d / "state"}"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
[{cri}.cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{d / "cni"}"
"""
        )
        (d / "cni" / "10-mailfleet.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "mailfleet",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": BRIDGE,
                            "isGateway": True,
                            "ipMasq": False,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": SUBNET, "gateway": NODE_IP}]],
                                # Service ClusterIPs are off the pod subnet: through the node (kube-proxy)
                                "routes": [{"dst": "0.0.0.0/0", "gw": NODE_IP}],
                                "dataDir": str(d / "ipam"),
                            },
                        },
                        {"type": "loopback"},
                    ],
                },
                indent=1,
            )
        )
        self._run("containerd", "containerd", "--config", d / "config.toml")
        until(lambda: self.ctr("version", check=False).returncode == 0, "containerd", within=60,
              log=self.root / "containerd.log")  # fmt: skip

    def ctr(self, *args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`ctr` against the node's containerd, in the namespace the CRI (kubelet) uses."""
        return _sh("ctr", "--address", self.socket, "--namespace", "k8s.io", *args, check=check)

    def import_image(self, archive: Path) -> None:
        """Import a docker-archive (image_archive(), `buildah push ... docker-archive:`) into the node's
        containerd; pods then run it with imagePullPolicy: Never."""
        self.ctr("images", "import", "--no-unpack=false", archive)

    def _start_kubelet(self) -> None:
        d = self.root / "kubelet"
        d.mkdir()
        healthz = free_port()
        (d / "config.yaml").write_text(
            json.dumps(
                {
                    "apiVersion": "kubelet.config.k8s.io/v1beta1",
                    "kind": "KubeletConfiguration",
                    "failCgroupV1": False,  # the machine is cgroup v1 (hybrid)
                    "cgroupDriver": "cgroupfs",
                    "containerRuntimeEndpoint": f"unix://{self.socket}",
                    "address": NODE_IP,
                    "port": free_port(),
                    "readOnlyPort": 0,
                    "healthzBindAddress": "127.0.0.1",
                    "healthzPort": healthz,
                    "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
                    "authorization": {"mode": "AlwaysAllow"},
                    "clusterDNS": [NODE_IP],
                    "clusterDomain": "cluster.local",
                    "resolvConf": str(self.root / "dns" / "resolv.conf"),
                    "failSwapOn": False,
                    # A test machine's full disk must not evict the tests' pods nor delete their images.
                    "evictionHard": {
                        k: "0%"
                        for k in ("memory.available", "nodefs.available", "nodefs.inodesFree", "imagefs.available")
                    },
                    "imageGCHighThresholdPercent": 100,
                    "imageGCLowThresholdPercent": 99,
                    "serializeImagePulls": False,
                    "volumePluginDir": str(d / "volume-plugins"),
                    "podLogsDir": str(d / "pod-logs"),  # not /var/log/pods, which would outlive the run
                },
                indent=1,
            )
        )
        self._run(
            "kubelet", self.binaries / "kubelet", f"--config={d / 'config.yaml'}",
            f"--kubeconfig={self.plane.kubeconfig}", f"--root-dir={d / 'root'}", f"--cert-dir={d / 'pki'}",
            f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}", "--v=1",
        )  # fmt: skip

    def _start_scheduler_and_proxy(self) -> None:
        kubeconfig = self.plane.kubeconfig
        self._run(
            "kube-scheduler", self.binaries / "kube-scheduler", f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}", "--leader-elect=false",
        )  # fmt: skip
        config = self.root / "kube-proxy.yaml"
        config.write_text(
            json.dumps(
                {
                    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                    "kind": "KubeProxyConfiguration",
                    "mode": "iptables",
                    "clusterCIDR": SUBNET,
                    "hostnameOverride": NODE_NAME,
                    "clientConnection": {"kubeconfig": str(kubeconfig)},
                    "healthzBindAddress": f"127.0.0.1:{free_port()}",
                    "metricsBindAddress": f"127.0.0.1:{free_port()}",
                    # Leave the machine's conntrack table sizes alone (read-only here).
                    "conntrack": {"maxPerCore": 0, "min": 0},
                    "iptables": {"localhostNodePorts": False},
                }
            )
        )
        self._run("kube-proxy", self.binaries / "kube-proxy", f"--config={config}")

    def _storage(self) -> None:
        """A default StorageClass `local` without a provisioner and hostPath PersistentVolumes under the
        temporary directory for it: a StatefulSet's volumeClaimTemplate binds one each, and the data outlives
        the pod."""
        items: list[dict[str, Any]] = [
            {
                "apiVersion": "storage.k8s.io/v1",
                "kind": "StorageClass",
                "metadata": {
                    "name": "local",
                    "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
                },
                "provisioner": "kubernetes.io/no-provisioner",
                "volumeBindingMode": "WaitForFirstConsumer",
                "reclaimPolicy": "Retain",
            }
        ]
        for i in range(8):
            path = self.root / "volumes" / f"pv{i}"
            path.mkdir(parents=True)
            path.chmod(0o777)  # the pods' users (the mail node runs as 10001) write there
            items.append(
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolume",
                    "metadata": {"name": f"local-pv{i}"},
                    "spec": {
                        "capacity": {"storage": "10Gi"},
                        "accessModes": ["ReadWriteOnce"],
                        "persistentVolumeReclaimPolicy": "Retain",
                        "storageClassName": "local",
                        "hostPath": {"path": str(path), "type": "Directory"},
                    },
                }
            )
        self.plane.kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))

    def _node_ready(self) -> bool:
        result = self.plane.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
        if result.returncode != 0:
            return False
        conditions = json.loads(result.stdout)["status"].get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _default_service_account(self) -> bool:
        return self.plane.kubectl("get", "serviceaccount", "default", check=False).returncode == 0

    # -- stop -------------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Pods first (so kubelet tears down their sandboxes: network namespaces, veths, mounts), then every
        process by PID, then what the kernel keeps: leftover containers and shims, mounts under root, network
        namespaces, kube-proxy's chains, the bridge, kubelet's cgroups."""
        with contextlib.suppress(BaseException):
            if self.processes and all(p.poll() is None for p in self.processes):
                self.plane.kubectl("delete", "statefulsets,deployments,replicasets,pods", "--all", "--all-namespaces",
                                   "--wait=false", check=False)  # fmt: skip
                until(self._no_sandboxes, "the pods' sandboxes gone", within=120)
        if self.service_names is not None:
            self.service_names.stopping.set()
            self.service_names.join()
        for process in reversed(self.processes):
            self._terminate(process)
        self.plane.stop()
        _kill_shims(self.socket)
        _unmount(self.root)
        for netns in self._netns() - self._netns_before:
            if netns.startswith("cni-"):  # containerd's CRI names its pods' so; others are not ours
                _sh("ip", "netns", "delete", netns, check=False)
        _sh(self.binaries / "kube-proxy", "--cleanup", check=False)
        self._cleanup_iptables()
        self._cleanup_network()
        self._remove_cgroups()
        if not self._kubelet_dir_before:
            shutil.rmtree(KUBELET_HOST_DIR, ignore_errors=True)
        STATE.unlink(missing_ok=True)
        if self._lock is not None:
            self._lock.close()

    def _no_sandboxes(self) -> bool:
        pods = self.plane.kubectl("get", "pods", "-A", "-o", "name", check=False)
        tasks = self.ctr("tasks", "list", "-q", check=False)
        return pods.returncode == 0 and not pods.stdout.strip() and not tasks.stdout.strip()

    @staticmethod
    def _terminate(process: subprocess.Popen[bytes]) -> None:
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    @staticmethod
    def _netns() -> set[str]:
        result = _sh("ip", "netns", "list", check=False)
        return {line.split()[0] for line in result.stdout.splitlines() if line.strip()}

    @staticmethod
    def _cleanup_iptables() -> None:
        """What `kube-proxy --cleanup` leaves: kubelet's KUBE-FIREWALL, KUBE-KUBELET-CANARY and
        KUBE-IPTABLES-HINT chains and the INPUT/OUTPUT jumps to them (the lock makes every KUBE- chain ours)."""
        for command in ("iptables", "ip6tables"):
            for table in ("filter", "nat", "mangle"):
                rules = _sh(command, "-t", table, "-S", check=False).stdout.splitlines()
                for rule in rules:
                    words = shlex.split(rule)
                    builtin = words[:1] == ["-A"] and not words[1].startswith("KUBE-")
                    if builtin and "-j" in words and words[words.index("-j") + 1].startswith("KUBE-"):
                        _sh(command, "-t", table, "-D", *words[1:], check=False)
                chains = [rule.split()[1] for rule in rules if rule.startswith("-N KUBE-")]
                for chain in chains:
                    _sh(command, "-t", table, "-F", chain, check=False)
                for chain in chains:
                    _sh(command, "-t", table, "-X", chain, check=False)

    @staticmethod
    def _cleanup_network() -> None:
        if _sh("ip", "link", "show", BRIDGE, check=False).returncode == 0:
            _sh("ip", "link", "delete", BRIDGE)

    @staticmethod
    def _remove_cgroups() -> None:
        """kubelet's /kubepods hierarchy in every v1 controller, empty once the processes are gone."""
        for controller in Path("/sys/fs/cgroup").iterdir():
            top = controller / "kubepods"
            if not top.is_dir():
                continue
            for cgroup in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    cgroup.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()


@contextlib.contextmanager
def running_node(root: Path, *, binaries: Path) -> Iterator[Node]:
    node = Node(root, binaries=binaries)
    try:
        node.start()
        yield node
    finally:
        node.stop()
