"""What a MailBackup of the VolumeSnapshot method makes and what a restore starts from: one VolumeSnapshot
per node volume, and the node volumes (PersistentVolumeClaims) made from them. Pure builders, called by
reconcile/backup.py and reconcile/domain.py (docs/backups.md, "In Kubernetes")."""

from __future__ import annotations

from typing import Any, Final

from mailfleet import api
from mailfleet.specs import common, workload

SNAPSHOT_API_VERSION: Final = "snapshot.storage.k8s.io/v1"
SNAPSHOT_GROUP: Final = "snapshot.storage.k8s.io"
BACKUP_LABEL: Final = "mailfleet.io/backup"
DOMAIN_LABEL: Final = "mailfleet.io/maildomain"
RESTORED_FROM_ANNOTATION: Final = "mailfleet.io/restored-from"  # an annotation: names may be longer than a label
# The node's point in time, on each VolumeSnapshot: an operator that resumes a backup after a restart
# finds it there for the snapshots already cut.
POINT_IN_TIME_ANNOTATION: Final = "mailfleet.io/point-in-time"


def claim_name(domain: api.MailDomain, ordinal: int) -> str:
    """The "data" claim of node `ordinal`, as the StatefulSet controller names it from the claim template."""
    return f"data-{common.statefulset_name(domain)}-{ordinal}"


def snapshot_name(backup_name: str, ordinal: int) -> str:
    return f"{backup_name}-{ordinal}"


def backup_owner_reference(backup: api.MailBackup) -> dict[str, Any]:
    """The reference that makes the MailBackup own its VolumeSnapshots (deleted with it)."""
    return common.controller_reference(backup)


def volume_snapshot(
    backup: api.MailBackup, domain: api.MailDomain, ordinal: int, *, point_in_time: str
) -> dict[str, Any]:
    """The VolumeSnapshot of node `ordinal`'s volume, taken while the node holds writes at `point_in_time`.
    The class is spec.backup.volumeSnapshotClassName, or the cluster's default."""
    spec: dict[str, Any] = {"source": {"persistentVolumeClaimName": claim_name(domain, ordinal)}}
    if domain.spec.backup is not None and domain.spec.backup.volume_snapshot_class_name is not None:
        spec["volumeSnapshotClassName"] = domain.spec.backup.volume_snapshot_class_name
    return {
        "apiVersion": SNAPSHOT_API_VERSION,
        "kind": "VolumeSnapshot",
        "metadata": {
            "name": snapshot_name(backup.metadata.name, ordinal),
            "namespace": common.namespace(domain),
            "labels": {
                "app.kubernetes.io/managed-by": "mailfleet-operator",
                BACKUP_LABEL: backup.metadata.name,
                DOMAIN_LABEL: domain.metadata.name,
            },
            "annotations": {POINT_IN_TIME_ANNOTATION: point_in_time},
            "ownerReferences": [backup_owner_reference(backup)],
        },
        "spec": spec,
    }


def restore_claim(domain: api.MailDomain, backup_name: str, ordinal: int) -> dict[str, Any]:
    """Node `ordinal`'s "data" claim, made from the VolumeSnapshot of the same ordinal of MailBackup
    `backup_name` before the StatefulSet exists (which then uses it instead of making an empty one). It has
    the claim template's spec and no owner: the claims of a StatefulSet outlive it, as Kubernetes does."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": claim_name(domain, ordinal),
            "namespace": common.namespace(domain),
            "labels": common.labels(domain),
            "annotations": {RESTORED_FROM_ANNOTATION: backup_name},
        },
        "spec": {
            **workload.claim_spec(domain),
            "dataSource": {
                "apiGroup": SNAPSHOT_GROUP,
                "kind": "VolumeSnapshot",
                "name": snapshot_name(backup_name, ordinal),
            },
        },
    }
