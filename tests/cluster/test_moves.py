"""Mailbox moves on a real API server (issue 15): `mailfleet operator` out of the cluster, its node URL on
fake mail nodes (tests/operator/fakenode.py FakeCluster, under /<ordinal>/ of one port), the test in the
kubelet's place (no pod runs here: it marks the StatefulSet controller's pods Running and Ready, so the
controller reports the nodes ready, rolled and scaled as it would). 3 -> 5 -> 2 replicas: the StatefulSet
grows before anything moves, exactly the rendezvous difference moves, each Mailbox's status.node follows;
shrinking, every mailbox leaves nodes 2..4 while the StatefulSet still has 5 nodes, then it shrinks.
A Mailbox deleted mid-move while the operator is stopped: the mailfleet.io/move finalizer keeps it, being
deleted, until the next operator has rolled the move back; then it is gone."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from mailfleet.specs import placement
from tests.cluster.conftest import ROOT, ControlPlane
from tests.cluster.test_control_plane import _get, _until
from tests.operator.fakenode import FakeCluster, serving

NAMESPACE = "moves"  # apart from the other tests' namespaces: they share the session's control plane
PEOPLE = [f"user{i:02d}" for i in range(12)]
ADDRESSES = [f"{name}@example.com" for name in PEOPLE]
WITHIN = 180.0  # each pod started and rolled one at a time (OrderedReady), on a loaded machine


@contextmanager
def _kubelet(plane: ControlPlane, namespace: str = NAMESPACE) -> Iterator[None]:
    """Marks every pod of the namespace Running and Ready (in a thread), as a kubelet would once the
    containers pass their readiness probe."""
    stop = threading.Event()

    def run() -> None:
        ready = json.dumps({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})
        while not stop.wait(0.5):
            pods = _get(plane, "-n", namespace, "pods") or {"items": []}
            for pod in pods["items"]:
                conditions = (pod.get("status") or {}).get("conditions") or []
                if not any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                    plane.kubectl("-n", namespace, "patch", "pod", pod["metadata"]["name"], "--subresource=status",
                                  "--type=merge", "-p", ready, check=False)  # fmt: skip

    thread = threading.Thread(target=run, name="fake kubelet", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)


def _homes(plane: ControlPlane) -> dict[str, int] | None:
    secret = _get(plane, "-n", NAMESPACE, "secret", "example-com-directory")
    if secret is None:
        return None
    text = base64.b64decode(secret["data"]["directory.yaml"])
    entries = yaml.safe_load(text).get("mailboxes") or []
    return {e["address"]: int(e.get("home", 0)) for e in entries} if len(entries) == len(PEOPLE) else None


def _settled(plane: ControlPlane, expected: dict[str, int]) -> bool:
    """The directory says `expected`, no Mailbox is moving and each one's status.node says its home."""
    if _homes(plane) != expected:
        return False
    boxes = (_get(plane, "-n", NAMESPACE, "mbx") or {"items": []})["items"]
    return len(boxes) == len(PEOPLE) and all(
        "move" not in (b.get("status") or {})
        and (b.get("status") or {}).get("node") == f"example-com-{expected[b['spec']['address']]}"
        for b in boxes
    )


def _statefulset(plane: ControlPlane) -> dict[str, Any]:
    sts = _get(plane, "-n", NAMESPACE, "statefulset", "example-com")
    assert sts is not None
    return sts


def _ready(plane: ControlPlane, replicas: int) -> bool:
    status = _statefulset(plane).get("status") or {}
    return (
        _statefulset(plane)["spec"]["replicas"] == replicas
        and status.get("readyReplicas") == replicas
        and status.get("currentRevision") == status.get("updateRevision")
    )


def test_three_to_five_to_two_replicas_on_a_real_api_server(control_plane: ControlPlane, tmp_path: Path) -> None:
    plane = control_plane
    plane.kubectl("apply", "-f", str(ROOT / "crds"))
    plane.kubectl("wait", "--for=condition=established", "crd", "--all", "--timeout=60s")
    plane.kubectl("create", "namespace", NAMESPACE)
    cluster = FakeCluster(5)
    seen_replicas: list[int] = []

    async def look(_: str) -> None:  # in the fakes' loop, before a move request is answered
        seen_replicas.append((await asyncio.to_thread(_statefulset, plane))["spec"]["replicas"])

    with serving(cluster), _kubelet(plane):
        operator = _start_operator(plane, cluster, tmp_path / "operator.log", NAMESPACE)
        try:
            _apply_domain(plane, cluster, NAMESPACE, PEOPLE, spec="replicas: 3, moves: {parallel: 3}")
            three = {a: placement.rendezvous(a, 3) for a in ADDRESSES}
            _until(lambda: _settled(plane, three), "every mailbox placed over 3 nodes", within=WITHIN)
            cluster.place(three)
            _until(lambda: _ready(plane, 3), "3 nodes ready", within=WITHIN)

            # 3 -> 5: the StatefulSet grows (and rolls: the peers are in the nodes' config), then the moves.
            plane.kubectl("-n", NAMESPACE, "patch", "md", "example-com", "--type=merge", "-p",
                          '{"spec": {"replicas": 5}}')  # fmt: skip
            five = {a: placement.rendezvous(a, 5) for a in ADDRESSES}
            _until(lambda: _settled(plane, five), "every mailbox placed over 5 nodes", within=WITHIN)
            up = {a for a in ADDRESSES if five[a] != three[a]}
            assert up and cluster.moved() == up
            assert cluster.holders() == {a: [five[a]] for a in ADDRESSES}
            _until(
                lambda: _statefulset(plane)["metadata"]["annotations"].get("mailfleet.io/placed-over") == "5",
                "the homes balanced over 5",
                within=WITHIN,
            )

            # 5 -> 2: everything on nodes 2..4 moves off while the StatefulSet keeps 5 nodes; then it shrinks.
            for node in cluster.nodes:
                node.on_move = look
                node.calls.clear()
            plane.kubectl("-n", NAMESPACE, "patch", "md", "example-com", "--type=merge", "-p",
                          '{"spec": {"replicas": 2}}')  # fmt: skip
            two = {a: placement.rendezvous(a, 2) for a in ADDRESSES}
            _until(lambda: _settled(plane, two), "every mailbox placed over 2 nodes", within=WITHIN)
            assert cluster.moved() == {a for a in ADDRESSES if five[a] >= 2}
            assert cluster.holders() == {a: [two[a]] for a in ADDRESSES}
            assert seen_replicas and set(seen_replicas) == {5}
            _until(lambda: _statefulset(plane)["spec"]["replicas"] == 2, "the StatefulSet shrunk", within=WITHIN)
            domain = _get(plane, "-n", NAMESPACE, "md", "example-com")
            assert domain is not None and domain["spec"]["replicas"] == 2
        finally:
            operator.send_signal(signal.SIGTERM)
            code = operator.wait(30)
    assert code == 0, (tmp_path / "operator.log").read_text()[-3000:]


DELETED_NS = "moves-deleted"


def _start_operator(plane: ControlPlane, cluster: FakeCluster, log: Path, namespace: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "mailfleet.cli", "operator", "--namespace", namespace, "--usage-interval", "0",
         "--node-url", cluster.template],
        env={**os.environ, "KUBECONFIG": str(plane.kubeconfig)}, stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )  # fmt: skip


def _apply_domain(
    plane: ControlPlane, cluster: FakeCluster, namespace: str, people: Iterable[str], *, spec: str
) -> None:
    """The domain's internal token and a password Secret, then the MailDomain example-com (`spec` after its
    domain) and a Mailbox per name in `people`, applied as a user would."""
    plane.kubectl("-n", namespace, "create", "secret", "generic", "example-com-internal",
                  f"--from-literal=token={cluster.nodes[0].token}")  # fmt: skip
    plane.kubectl("-n", namespace, "create", "secret", "generic", "password", "--from-literal=password=pw")
    manifests = ["apiVersion: mailfleet.io/v1alpha1\nkind: MailDomain\nmetadata: {name: example-com}\n"
                 f"spec: {{domain: example.com, {spec}}}\n"]  # fmt: skip
    manifests += [
        f"apiVersion: mailfleet.io/v1alpha1\nkind: Mailbox\nmetadata: {{name: {name}}}\n"
        f"spec: {{address: {name}@example.com, passwordSecretRef: {{name: password}}}}\n"
        for name in people
    ]
    plane.kubectl("-n", namespace, "apply", "-f", "-", stdin="---\n".join(manifests))


def _stop(operator: subprocess.Popen[bytes], log: Path) -> None:
    operator.send_signal(signal.SIGTERM)
    assert operator.wait(30) == 0, log.read_text()[-3000:]


def test_a_mailbox_deleted_mid_move_across_an_operator_restart_on_a_real_api_server(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """The real API server's finalizer rules (a merge patch of metadata.finalizers with its resourceVersion,
    deletion held while a finalizer is there, a status written to an object being deleted): the operator
    stopped while the final copy waits at the target, the Mailbox deleted; the next operator rolls the
    move back (the target's copy dropped, the source thawed) and lets the Mailbox go."""
    plane, ns, log = control_plane, DELETED_NS, tmp_path / "operator.log"
    plane.kubectl("apply", "-f", str(ROOT / "crds"))
    plane.kubectl("wait", "--for=condition=established", "crd", "--all", "--timeout=60s")
    plane.kubectl("create", "namespace", ns)
    cluster = FakeCluster(3)
    people = PEOPLE[:3]
    address = f"{people[0]}@example.com"
    home = placement.rendezvous(address, 3)
    target = (home + 1) % 3
    released, held, left = threading.Event(), threading.Event(), threading.Event()

    async def hold(what: str) -> None:  # in the fakes' loop: the target's final copy waits for the test
        if what == "POST /moves final=True":
            held.set()
            try:
                await asyncio.to_thread(released.wait, 600)
            finally:
                left.set()

    cluster.nodes[target].on_move = hold

    def mailbox() -> dict[str, Any] | None:
        return _get(plane, "-n", ns, "mbx", people[0])

    def step() -> str | None:
        return (((mailbox() or {}).get("status") or {}).get("move") or {}).get("step")

    def directory() -> dict[str, int] | None:
        secret = _get(plane, "-n", ns, "secret", "example-com-directory")
        if secret is None:
            return None
        entries = yaml.safe_load(base64.b64decode(secret["data"]["directory.yaml"])).get("mailboxes") or []
        return {e["address"]: int(e.get("home", 0)) for e in entries}

    with serving(cluster), _kubelet(plane, ns):
        operator = _start_operator(plane, cluster, log, ns)
        try:
            _apply_domain(plane, cluster, ns, people, spec="replicas: 3")
            homes = _until(lambda: (d := directory()) and len(d) == len(people) and d, "the directory", WITHIN)
            cluster.place(homes)
            _until(lambda: _ready_in(plane, ns, 3), "3 nodes ready", within=WITHIN)
            plane.kubectl("-n", ns, "annotate", "mbx", people[0], f"mailfleet.io/move-to={target}")
            _until(lambda: held.is_set() and step() == "CatchingUp", "the final copy held", within=WITHIN)
            assert (mailbox() or {})["metadata"].get("finalizers") == ["mailfleet.io/move"]
            plane.kubectl("-n", ns, "delete", "mbx", people[0], "--wait=false")
            _until(lambda: (d := directory()) is not None and address not in d, "out of the directory", WITHIN)
        finally:
            _stop(operator, log)
        deleting = mailbox()
        assert deleting is not None and deleting["metadata"].get("deletionTimestamp")
        assert deleting["metadata"].get("finalizers") == ["mailfleet.io/move"]
        assert deleting["status"]["move"]["step"] == "CatchingUp"
        released.set()
        _until(left.is_set, "the stopped operator's request answered")

        operator = _start_operator(plane, cluster, log, ns)
        try:
            _until(lambda: mailbox() is None, "the Mailbox gone", within=WITHIN)
        finally:
            _stop(operator, log)
    assert cluster.holders()[address] == [home]
    assert not cluster.nodes[home].frozen


def _ready_in(plane: ControlPlane, namespace: str, replicas: int) -> bool:
    status = (_get(plane, "-n", namespace, "statefulset", "example-com") or {}).get("status") or {}
    return status.get("readyReplicas") == replicas and status.get("currentRevision") == status.get("updateRevision")
