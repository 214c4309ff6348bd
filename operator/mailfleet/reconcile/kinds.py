"""The kinds the reconcile reads and writes, each with its body type, and `object_key`, what the
operator's memories of an object are keyed by. Imported through reconcile/context.py by most modules."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from mailfleet import k8s, kube_types

MAILDOMAIN: Final[k8s.Kind[kube_types.MailDomain]] = k8s.kind_of("mailfleet.io/v1alpha1", "MailDomain")
MAILBOX: Final[k8s.Kind[kube_types.Mailbox]] = k8s.kind_of("mailfleet.io/v1alpha1", "Mailbox")
SECRET: Final = k8s.secrets.SECRET
STATEFULSET: Final[k8s.Kind[kube_types.StatefulSet]] = k8s.kind_of("apps/v1", "StatefulSet")
MAILBACKUP: Final[k8s.Kind[kube_types.MailBackup]] = k8s.kind_of("mailfleet.io/v1alpha1", "MailBackup")
VOLUMESNAPSHOT: Final[k8s.Kind[kube_types.VolumeSnapshot]] = k8s.kind_of("snapshot.storage.k8s.io/v1", "VolumeSnapshot")
PERSISTENTVOLUMECLAIM: Final[k8s.Kind[kube_types.PersistentVolumeClaim]] = k8s.kind_of("v1", "PersistentVolumeClaim")


def object_key(body: kube_types.Object | Mapping[str, Any]) -> str:
    """What the operator's memories of an object are keyed by: its uid (namespace/name if it has none)."""
    meta = body.get("metadata") or {}
    return str(meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}")
