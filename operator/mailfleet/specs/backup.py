"""Backups as objects (docs/backups.md, "In Kubernetes"): the MailBackups the schedule makes, what a
MailBackup of the VolumeSnapshot method makes (one VolumeSnapshot per node volume) and what a restore
starts from (the node volumes, PersistentVolumeClaims, made from them). Pure builders and the names and
labels they use, called by reconcile/schedule.py, reconcile/backup.py and reconcile/restore.py."""

from __future__ import annotations

import datetime
from typing import Any, Final

from mailfleet import api, kube_types
from mailfleet.specs import common, workload

SNAPSHOT_API_VERSION: Final = "snapshot.storage.k8s.io/v1"
SNAPSHOT_GROUP: Final = "snapshot.storage.k8s.io"
MANAGED_LABEL: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "mailfleet-operator"
BACKUP_LABEL: Final = "mailfleet.io/backup"  # on the VolumeSnapshots of a MailBackup
DOMAIN_LABEL: Final = "mailfleet.io/maildomain"
SCHEDULED_LABEL: Final = "mailfleet.io/scheduled"  # "true" on the MailBackups the schedule made
SCHEDULED_AT: Final = "mailfleet.io/scheduled-at"  # annotation: the cron time a scheduled MailBackup is for
RESTORED_FROM_ANNOTATION: Final = "mailfleet.io/restored-from"  # an annotation: names may be longer than a label
# The node's point in time, on each VolumeSnapshot: an operator that resumes a backup after a restart
# finds it there for the snapshots already cut.
POINT_IN_TIME_ANNOTATION: Final = "mailfleet.io/point-in-time"


def backup_name(domain_name: str, at: datetime.datetime) -> str:
    """`<maildomain>-<YYYYMMDDHHMM>`, the time in UTC."""
    return f"{domain_name}-{at.astimezone(datetime.UTC):%Y%m%d%H%M}"


def scheduled_backup(namespace: str, domain_name: str, method: str, at: datetime.datetime) -> kube_types.Manifest:
    """The MailBackup the schedule makes for time `at`. No owner reference: a backup outlives its domain."""
    return {
        "apiVersion": api.API_VERSION,
        "kind": "MailBackup",
        "metadata": {
            "name": backup_name(domain_name, at),
            "namespace": namespace,
            "labels": {MANAGED_LABEL: MANAGED_BY, DOMAIN_LABEL: domain_name, SCHEDULED_LABEL: "true"},
            "annotations": {SCHEDULED_AT: common.rfc3339(at)},
        },
        "spec": {"domainRef": domain_name, "method": method},
    }


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
) -> kube_types.Manifest:
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
                MANAGED_LABEL: MANAGED_BY,
                BACKUP_LABEL: backup.metadata.name,
                DOMAIN_LABEL: domain.metadata.name,
            },
            "annotations": {POINT_IN_TIME_ANNOTATION: point_in_time},
            "ownerReferences": [backup_owner_reference(backup)],
        },
        "spec": spec,
    }


def restore_claim(domain: api.MailDomain, backup_name: str, ordinal: int) -> kube_types.Manifest:
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
