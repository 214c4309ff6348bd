"""A MailDomain of three nodes on the emulated API (DESIGN.md "Clustering"): the operator builds the
StatefulSet with the pods' peers, the Services, the NetworkPolicy and the internal Secret; each Mailbox's
status names the pod that stores it, as the directory records; an operator restart keeps every home the
directory records (even one the hash would not choose) and writes no directory; a replicas change is
accepted, the StatefulSet growing before any mailbox moves (tests/operator/test_moves.py moves them)."""

from __future__ import annotations

import base64
import functools
import json
from typing import Any

import yaml

from mailfleet import k8s
from mailfleet.specs import placement
from tests.operator.conftest import (
    CONFIGMAP,
    MAILBOX,
    MAILDOMAIN,
    NAMESPACE,
    SECRET,
    STATEFULSET,
    condition,
    directory,
    events,
    eventually,
    mailbox,
    maildomain,
    run_operator,
    secret,
    settled,
    status_of,
)

SERVICE = k8s.kind_of("v1", "Service")
NETWORKPOLICY = k8s.kind_of("networking.k8s.io/v1", "NetworkPolicy")
PEOPLE = ("alice", "bob", "carol", "dave", "erin", "frank")


async def _three_nodes(client: k8s.Client) -> None:
    await client.create(secret("password", password="pw"))
    await client.create(maildomain(replicas=3))
    for name in PEOPLE:
        await client.create(mailbox(name, f"{name}@example.com", "password"))


async def _node_shown(client: k8s.Client, name: str) -> str | None:
    obj = await client.get(MAILBOX, NAMESPACE, name)
    node = ((obj or {}).get("status") or {}).get("node")
    return str(node) if node and condition(obj, "Ready").get("status") == "True" else None


async def test_a_domain_of_three_nodes_is_built_and_each_mailbox_shows_its_node(operator, client):
    await _three_nodes(client)
    sts = await eventually(lambda: client.get(STATEFULSET, NAMESPACE, "example-com"), what="the StatefulSet")
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["podManagementPolicy"] == "OrderedReady"
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert any(e["name"] == "POD_NAME" for e in container["env"])

    config = await eventually(lambda: client.get(CONFIGMAP, NAMESPACE, "example-com-config"))
    node_yaml = yaml.safe_load(config["data"]["node.yaml"])
    assert [peer["host"] for peer in node_yaml["cluster"]["peers"]] == [
        f"example-com-{i}.example-com-headless.mail.svc" for i in range(3)
    ]
    assert "ordinal" not in node_yaml["cluster"]
    client_service = await client.get(SERVICE, NAMESPACE, "example-com")
    assert "lmtp" not in {p["name"] for p in client_service["spec"]["ports"]}
    headless = await client.get(SERVICE, NAMESPACE, "example-com-headless")
    assert {"lmtp", "imap-proxy"} <= {p["name"] for p in headless["spec"]["ports"]}
    policy = await client.get(NETWORKPOLICY, NAMESPACE, "example-com")
    assert any("lmtp" in str(rule.get("ports")) for rule in policy["spec"]["ingress"])
    internal = await client.get(SECRET, NAMESPACE, "example-com-internal")
    assert k8s.secret_values(internal)["token"]

    entries = await eventually(lambda: _all_in(client), what="every mailbox in the directory")
    for name in PEOPLE:
        address = f"{name}@example.com"
        home = entries[address].get("home", 0)
        assert home == placement.rendezvous(address, 3)
        shown = await eventually(functools.partial(_node_shown, client, name), what=f"{name}'s node")
        assert shown == f"example-com-{home}"
    assert len({entry.get("home", 0) for entry in entries.values()}) > 1  # six mailboxes, not all on one node


async def _all_in(client: k8s.Client) -> dict[str, Any] | None:
    entries = await directory(client)
    return entries if len(entries) == len(PEOPLE) else None


async def test_a_restart_keeps_the_recorded_homes_and_writes_no_directory(api, client):
    await _three_nodes(client)
    async with run_operator() as operator:
        await eventually(lambda: _all_in(client), what="every mailbox in the directory")
        await eventually(lambda: _node_shown(client, "alice"), what="alice's node")
        await settled(operator)

    # A home the hash would not choose, as a mailbox placed before a change of the hash would have: the
    # directory, not the hash, is the truth.
    obj = await client.get(SECRET, NAMESPACE, "example-com-directory")
    text = k8s.secret_values(obj)["directory.yaml"].decode()
    alice_home = placement.rendezvous("alice@example.com", 3)
    recorded = (alice_home + 1) % 3
    lines = text.splitlines(keepends=True)
    (index,) = [i for i, line in enumerate(lines) if '"alice@example.com"' in line]
    entry = yaml.safe_load(lines[index][2:])
    entry["home"] = recorded
    lines[index] = f"- {json.dumps(entry)}\n"
    edited = "".join(lines).encode()
    await client.patch(
        SECRET, NAMESPACE, "example-com-directory", {"data": {"directory.yaml": base64.b64encode(edited).decode()}}
    )
    writes_before = _directory_writes(api)

    async with run_operator() as operator:
        await settled(operator)
        await eventually(
            lambda: _shown_is(client, "alice", f"example-com-{recorded}"), what="alice shown on the recorded node"
        )
    assert _directory_writes(api) == writes_before, "the restarted operator rewrote the directory"
    assert (await directory(client))["alice@example.com"]["home"] == recorded


async def _shown_is(client: k8s.Client, name: str, node: str) -> bool:
    return await _node_shown(client, name) == node


def _directory_writes(api: Any) -> int:
    return sum(1 for method, plural, name, sub in api.writes if plural == "secrets" and name == "example-com-directory")


async def test_a_replicas_change_is_accepted_and_the_statefulset_grows_before_any_mailbox_moves(operator, client):
    await client.create(secret("alice-password", password="alice-pw"))
    await client.create(mailbox("alice", "alice@example.com"))
    await client.create(maildomain(replicas=3))
    await eventually(lambda: status_of(client, MAILBOX, "alice", status="True", reason="Served"))
    before = await client.get(STATEFULSET, NAMESPACE, "example-com")
    assert before["metadata"]["annotations"]["mailfleet.io/placed-over"] == "3"

    await client.patch(MAILDOMAIN, NAMESPACE, "example-com", {"spec": {"replicas": 4}})
    grown = await eventually(
        lambda: _replicas_are(client, 4), what="the StatefulSet grown to 4 (the new node starts first)"
    )
    # balanced over 4 only once alice is where rendezvous over 4 nodes puts her (already, or after her move)
    moves_alice = placement.rendezvous("alice@example.com", 4) != placement.rendezvous("alice@example.com", 3)
    assert grown["metadata"]["annotations"]["mailfleet.io/placed-over"] == ("3" if moves_alice else "4")
    domain = await eventually(
        lambda: status_of(client, MAILDOMAIN, "example-com", "Degraded", status="False", observedGeneration=2)
    )
    assert condition(domain, "Degraded")["reason"] == "Reconciled"
    assert await events(client, "example-com", "MoveNotSupported") == []
    # No node is ready (the emulator runs no pods): nothing moves, the mailbox is still stored where it was.
    alice = await client.get(MAILBOX, NAMESPACE, "alice")
    assert (alice["status"] or {}).get("node") == f"example-com-{placement.rendezvous('alice@example.com', 3)}"
    assert "move" not in alice["status"]

    await client.patch(MAILDOMAIN, NAMESPACE, "example-com", {"spec": {"replicas": 3}})
    back = await eventually(lambda: _replicas_are(client, 3), what="the StatefulSet back at 3: nothing was on node 3")
    assert back["metadata"]["annotations"]["mailfleet.io/placed-over"] == "3"
    await eventually(lambda: status_of(client, MAILBOX, "alice", status="True", reason="Served"))


async def _replicas_are(client: k8s.Client, replicas: int) -> dict[str, Any] | None:
    sts = await client.get(STATEFULSET, NAMESPACE, "example-com")
    return sts if sts is not None and sts["spec"]["replicas"] == replicas else None
