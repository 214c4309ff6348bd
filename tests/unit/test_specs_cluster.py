"""The builders for a MailDomain of three nodes (DESIGN.md "Clustering"): the node config lists every pod
as a peer with the internal ports and leaves the ordinal to $POD_NAME; the container declares the
internal ports, the headless Service carries them, the client Service does not; the NetworkPolicy admits
them from the domain's own pods only; the StatefulSet spreads the pods over hosts and zones, starts and
rolls them in order, keeps their volumes; each mailbox's home is in the directory. A domain of one node
gets none of it (its objects stay as they were). The OpenAPI validation of these objects is in
test_specs_openapi.py (variant cluster-of-three)."""

from __future__ import annotations

from typing import Any

import yaml

from mailfleet import specs
from mailfleet.specs import placement
from mailnode import config
from tests.unit.test_specs import HASHES, by_kind, example_domain, example_mailboxes, rendered

SELECTOR = {"app.kubernetes.io/name": "mailnode", "app.kubernetes.io/instance": "example-com"}


def test_the_node_config_lists_every_pod_as_a_peer() -> None:
    parsed = config.NodeConfig.model_validate(specs.node_config(example_domain(replicas=3)))
    assert parsed.cluster.ordinal is None  # each pod takes it from $POD_NAME
    assert [(p.host, p.lmtp, p.imap_proxy, p.http) for p in parsed.cluster.peers] == [
        (f"example-com-{i}.example-com-headless.mail.svc", 2424, 1431, 8080) for i in range(3)
    ]
    assert (parsed.listen.lmtp, parsed.listen.imap_proxy) == (2424, 1431)
    alone = specs.node_config(example_domain(replicas=1))
    assert "cluster" not in alone and "lmtp" not in alone["listen"]


def test_the_pods_know_their_name_and_declare_the_internal_ports() -> None:
    sts = by_kind(rendered(replicas=3), "StatefulSet")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (ports["lmtp"], ports["imap-proxy"]) == (2424, 1431)


def test_the_internal_ports_are_on_the_headless_service_only() -> None:
    objects = rendered(replicas=3)
    headless = by_kind(objects, "Service", "example-com-headless")
    assert {p["name"]: p["port"] for p in headless["spec"]["ports"]}.items() >= {
        "lmtp": 2424,
        "imap-proxy": 1431,
    }.items()
    client = by_kind(objects, "Service", "example-com")
    assert {p["targetPort"] for p in client["spec"]["ports"]} == {
        "smtp", "submission", "submissions", "imap", "imaps", "https"
    }  # fmt: skip


def test_the_network_policy_admits_the_internal_ports_from_the_domains_pods_only() -> None:
    ingress = by_kind(rendered(replicas=3), "NetworkPolicy")["spec"]["ingress"]
    internal = [rule for rule in ingress if {"port": "lmtp", "protocol": "TCP"} in rule.get("ports", [])]
    assert internal == [
        {
            "from": [{"podSelector": {"matchLabels": SELECTOR}}],
            "ports": [{"port": "lmtp", "protocol": "TCP"}, {"port": "imap-proxy", "protocol": "TCP"}],
        }
    ]
    # the HTTP port as for one node: the namespace's pods and the operator's
    (http,) = [rule for rule in ingress if {"port": "http", "protocol": "TCP"} in rule.get("ports", [])]
    assert {"podSelector": {}} in http["from"] and len(http["from"]) == 2
    # no other rule opens the internal ports (the mail ports' rule names its ports)
    assert all(rule is internal[0] or "lmtp" not in str(rule) for rule in ingress)


def test_the_statefulset_spreads_orders_and_keeps_its_volumes() -> None:
    objects = rendered(replicas=3)
    sts = by_kind(objects, "StatefulSet")["spec"]
    assert sts["replicas"] == 3
    assert sts["podManagementPolicy"] == "OrderedReady" and sts["updateStrategy"] == {"type": "RollingUpdate"}
    assert sts["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    spread = sts["template"]["spec"]["topologySpreadConstraints"]
    assert [(c["topologyKey"], c["whenUnsatisfiable"], c["maxSkew"]) for c in spread] == [
        ("kubernetes.io/hostname", "ScheduleAnyway", 1),
        ("topology.kubernetes.io/zone", "ScheduleAnyway", 1),
    ]
    assert all(c["labelSelector"] == {"matchLabels": SELECTOR} for c in spread)
    assert by_kind(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_one_node_keeps_the_objects_it_had_before_clustering() -> None:
    sts = by_kind(rendered(replicas=1), "StatefulSet")["spec"]
    assert sts["podManagementPolicy"] == "Parallel"
    assert "persistentVolumeClaimRetentionPolicy" not in sts and "updateStrategy" not in sts
    assert "topologySpreadConstraints" not in sts["template"]["spec"]
    (container,) = sts["template"]["spec"]["containers"]
    assert "lmtp" not in {p["name"] for p in container["ports"]}


def _directory(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    text = by_kind(objects, "Secret", "example-com-directory")["stringData"]["directory.yaml"]
    return list(yaml.safe_load(text)["mailboxes"])


def test_the_directory_records_each_home() -> None:
    entries = _directory(rendered(replicas=3))
    for entry in entries:
        assert entry.get("home", 0) == placement.rendezvous(entry["address"], 3)
    # with one node every home is 0, left out as the node's default: the directory is as it was
    assert all("home" not in entry for entry in _directory(rendered(replicas=1)))


def test_a_recorded_home_is_kept() -> None:
    domain = example_domain(replicas=3)
    mailboxes = example_mailboxes()
    alice = "alice@example.com"
    elsewhere = (placement.rendezvous(alice, 3) + 1) % 3
    placed = specs.homes(domain, mailboxes, recorded={alice: elsewhere})
    assert placed[alice] == elsewhere
    entries = specs.directory(domain, mailboxes, HASHES, placed=placed)["mailboxes"]
    (entry,) = [e for e in entries if e["address"] == alice]
    assert entry.get("home", 0) == elsewhere
    assert specs.node.recorded_homes(entries)[alice] == elsewhere
