"""The builders of backups and restores (mailfleet.specs.backup) and the archive claim in the StatefulSet and
the node config: what they build, checked against the Kubernetes schemas and the node's config model."""

from __future__ import annotations

from typing import Any

import yaml

from mailfleet import api, specs
from mailfleet.specs import backup as backup_specs
from mailnode import config
from tests.unit.test_specs import example_domain
from tests.unit.test_specs_openapi import assert_valid

SCHEDULE = {"schedule": "@daily"}


def a_backup(name: str = "example-com-202611270300") -> api.MailBackup:
    return api.MailBackup.model_validate(
        {
            "metadata": {"name": name, "namespace": "mail", "uid": "5e1f-uid"},
            "spec": {"domainRef": "example-com"},
        }
    )


def _node_container(sts: dict[str, Any]) -> dict[str, Any]:
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    return dict(container)


def test_a_volume_snapshot_of_each_node_volume_owned_by_its_backup() -> None:
    domain = example_domain(replicas=1, backup={**SCHEDULE, "volumeSnapshotClassName": "csi-hostpath-snapclass"})
    snapshot = backup_specs.volume_snapshot(a_backup(), domain, 0, point_in_time="2026-11-27T03:00:00.5+00:00")
    assert snapshot["metadata"]["name"] == "example-com-202611270300-0"
    assert snapshot["metadata"]["namespace"] == "mail"
    assert snapshot["spec"] == {
        "source": {"persistentVolumeClaimName": "data-example-com-0"},
        "volumeSnapshotClassName": "csi-hostpath-snapclass",
    }
    assert snapshot["metadata"]["labels"] == {
        "app.kubernetes.io/managed-by": "mailfleet-operator",
        "mailfleet.io/backup": "example-com-202611270300",
        "mailfleet.io/maildomain": "example-com",
    }
    assert snapshot["metadata"]["annotations"] == {"mailfleet.io/point-in-time": "2026-11-27T03:00:00.5+00:00"}
    assert snapshot["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "mailfleet.io/v1alpha1",
            "kind": "MailBackup",
            "name": "example-com-202611270300",
            "uid": "5e1f-uid",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    # Without a class: the cluster's default VolumeSnapshotClass.
    default = backup_specs.volume_snapshot(a_backup(), example_domain(replicas=1), 0, point_in_time="x")
    assert "volumeSnapshotClassName" not in default["spec"]


def test_a_restored_claim_is_the_claim_template_with_the_snapshot_as_its_source() -> None:
    domain = example_domain(replicas=1, storage={"size": "20Gi", "storageClassName": "fast-ssd"})
    claim = backup_specs.restore_claim(domain, "example-com-202611270300", 0)
    assert_valid(claim)
    assert claim["metadata"]["name"] == "data-example-com-0"
    assert "ownerReferences" not in claim["metadata"]
    assert claim["metadata"]["annotations"] == {"mailfleet.io/restored-from": "example-com-202611270300"}
    assert claim["spec"].pop("dataSource") == {
        "apiGroup": "snapshot.storage.k8s.io",
        "kind": "VolumeSnapshot",
        "name": "example-com-202611270300-0",
    }
    (template,) = specs.statefulset(domain, image="i", config_checksum="c")["spec"]["volumeClaimTemplates"]
    assert claim["spec"] == template["spec"]
    assert claim["metadata"]["name"] == f"{template['metadata']['name']}-{domain.metadata.name}-0"


def test_an_archive_claim_is_mounted_where_the_node_config_says() -> None:
    domain = example_domain(replicas=1, backup={**SCHEDULE, "method": "Archive", "archiveClaimName": "mail-archives"})
    sts = specs.statefulset(domain, image="i", config_checksum="c")
    assert_valid(sts)
    container = _node_container(sts)
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volumes["backups"] == {"name": "backups", "persistentVolumeClaim": {"claimName": "mail-archives"}}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "backups"]
    # Each pod in its own directory of the claim: two nodes never write the same <backup>.tar.
    assert mount == {"name": "backups", "mountPath": "/var/lib/mailnode-backups", "subPathExpr": "$(POD_NAME)"}
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
    configmap = specs.render(domain, [], {}, image="i").configmap
    node = config.NodeConfig.model_validate(yaml.safe_load(configmap["data"]["node.yaml"]))
    assert str(node.backup_dir) == mount["mountPath"]
    # `mailfleet local up` mounts nothing: its node keeps its archives in its own data directory.
    assert "backup" not in specs.node_config(domain)


def test_without_an_archive_claim_archives_stay_on_the_node_volume() -> None:
    for domain in (example_domain(replicas=1), example_domain(replicas=1, backup={**SCHEDULE, "method": "Archive"})):
        sts = specs.statefulset(domain, image="i", config_checksum="c")
        container = _node_container(sts)
        assert "backups" not in {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}
        assert "POD_NAME" not in {e["name"] for e in container["env"]}
        rendered = specs.node_config(domain)
        assert "backup" not in rendered
        node = config.NodeConfig.model_validate(rendered)
        assert node.backup_dir == node.data_dir / "backups"
