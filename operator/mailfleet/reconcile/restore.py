"""Restore (docs/backups.md, "Restore"): a MailDomain with `spec.restore.backupName` starts its node
volumes from that MailBackup's VolumeSnapshots. Before the StatefulSet exists, reconcile/domain.py asks
`claims_to_make` (which checks the backup and may refuse) and, once nothing else can refuse the domain,
`ensure_claims` makes them; the StatefulSet then finds its claims made.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mailfleet import api, k8s, kube_types, specs
from mailfleet.reconcile import conditions
from mailfleet.reconcile.checks import Refused
from mailfleet.reconcile.context import MAILBACKUP, PERSISTENTVOLUMECLAIM, VOLUMESNAPSHOT, Context
from mailfleet.specs import backup as backup_specs


async def claims_to_make(
    ctx: Context, domain: api.MailDomain, statefulset: kube_types.StatefulSet | None
) -> list[kube_types.Manifest]:
    """The node claims to make from spec.restore.backupName's VolumeSnapshots, or Refused when they cannot
    be. None once the StatefulSet exists, or when they were made already (the StatefulSet was deleted
    since): the backup may be gone by now, and is not needed."""
    if statefulset is not None or domain.spec.restore is None:
        return []
    namespace, name = specs.common.namespace(domain), domain.spec.restore.backup_name
    missing = []
    for ordinal in range(domain.spec.replicas):
        claim = backup_specs.restore_claim(domain, name, ordinal)
        source, claim_name = claim["spec"]["dataSource"], claim["metadata"]["name"]
        existing = await ctx.client.get(PERSISTENTVOLUMECLAIM, namespace, claim_name)
        if existing is None:
            missing.append(claim)
        elif not _same_source((existing.get("spec") or {}).get("dataSource"), source):
            raise Refused(
                "RestoreClaimExists",
                f"PersistentVolumeClaim {claim_name} already exists and was not made from VolumeSnapshot "
                f"{source['name']}: its data would be used instead of the backup's (delete it to restore)",
            )
    if not missing:
        return []

    what = f"MailBackup {name} (spec.restore.backupName)"
    backup = await ctx.client.get(MAILBACKUP, namespace, name)
    if backup is None:
        raise Refused("RestoreBackupNotFound", f"{what} does not exist in namespace {namespace}")
    method = (backup.get("spec") or {}).get("method") or "VolumeSnapshot"
    if method != "VolumeSnapshot":
        raise Refused(
            "RestoreBackupNotVolumeSnapshot",
            f"{what} is an {method} backup; a restore starts the volumes from VolumeSnapshots "
            "(restore an archive with mailnode restore)",
        )
    status = backup.get("status") or {}
    if (phase := status.get("phase")) != "Completed":
        raise Refused("RestoreBackupNotCompleted", f"{what} is {phase or 'not started'}, not Completed")
    if not await ctx.client.serves(VOLUMESNAPSHOT):
        raise Refused(
            "VolumeSnapshotAPIMissing",
            f"cannot restore {what}: the VolumeSnapshot API (snapshot.storage.k8s.io/v1) is not served by this "
            "cluster; install the CSI snapshot CRDs and snapshot controller",
        )
    taken = list(status.get("snapshots") or [])
    for claim in missing:
        snapshot = claim["spec"]["dataSource"]["name"]
        if snapshot not in taken or await ctx.client.get(VOLUMESNAPSHOT, namespace, snapshot) is None:
            raise Refused(
                "RestoreSnapshotNotFound",
                f"{what} has no VolumeSnapshot {snapshot} for PersistentVolumeClaim {claim['metadata']['name']} "
                f"(it lists {', '.join(taken) or 'none'})",
            )
    return missing


def _same_source(found: kube_types.TypedObjectReference | None, wanted: Mapping[str, Any]) -> bool:
    return isinstance(found, Mapping) and all(found.get(key) == value for key, value in wanted.items())


async def ensure_claims(ctx: Context, body: kube_types.MailDomain, claims: list[kube_types.Manifest]) -> None:
    """Make the claims (before the StatefulSet, which then finds them made), each with an Event."""
    for claim in claims:
        try:
            await ctx.client.create(claim)
        except k8s.ApiError as error:
            if error.conflict:  # made meanwhile (by an earlier reconcile that failed after it)
                continue
            raise
        ctx.metrics.applied.labels("PersistentVolumeClaim", "created").inc()
        source = claim["spec"]["dataSource"]["name"]
        message = f"created PersistentVolumeClaim {claim['metadata']['name']} from VolumeSnapshot {source}"
        await ctx.recorder.event(body, "Restored", message, at=conditions.now())
