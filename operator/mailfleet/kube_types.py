"""The Kubernetes objects the operator reads, typed: raw JSON as the API server (or kopf's indexes) hands
it over, with the fields the operator reads. Used by k8s/ (the client's `Kind` says which body a kind
returns), reconcile/ and specs/ wherever they read a body instead of `dict[str, Any]`. Plain types with
no imports of the operator, so the pure builders in specs/ may use them without importing k8s/.

Every TypedDict is `total=False`: the API server leaves out empty fields, and a watched body may be a
snapshot of a few of them (handlers.py's indexes), so a reader says what it does when one is missing.
Only the fields read are declared; a body carries more. What the operator writes is built as plain
manifests by specs/ (and `apply` compares them field by field); these types describe what comes back.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

# -- every object ----------------------------------------------------------------------------------------


class OwnerReference(TypedDict, total=False):
    apiVersion: str
    kind: str
    name: str
    uid: str
    controller: bool
    blockOwnerDeletion: bool


class ObjectMeta(TypedDict, total=False):
    name: str
    namespace: str
    uid: str
    generation: int
    resourceVersion: str
    creationTimestamp: str
    deletionTimestamp: str
    finalizers: list[str]
    labels: dict[str, str]
    annotations: dict[str, str]
    ownerReferences: list[OwnerReference]


class Object(TypedDict, total=False):
    """Any object: what Events, owner references and the operator's memories (`object_key`) read."""

    apiVersion: str
    kind: str
    metadata: ObjectMeta


class Condition(TypedDict, total=False):
    """A status condition as Kubernetes conventions have it (metav1.Condition)."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str
    lastTransitionTime: str
    observedGeneration: int


# -- core and apps kinds ---------------------------------------------------------------------------------


class Secret(Object, total=False):
    type: str
    data: dict[str, str]  # base64
    stringData: dict[str, str]


class StatefulSetStatus(TypedDict, total=False):
    observedGeneration: int
    replicas: int
    readyReplicas: int
    updatedReplicas: int
    currentRevision: str
    updateRevision: str


class StatefulSet(Object, total=False):
    spec: dict[str, Any]  # compared with the built one as a whole (k8s.immutable_change)
    status: StatefulSetStatus


class TypedObjectReference(TypedDict, total=False):
    apiGroup: str
    kind: str
    name: str


class PersistentVolumeClaimSpec(TypedDict, total=False):
    dataSource: TypedObjectReference


class PersistentVolumeClaim(Object, total=False):
    spec: PersistentVolumeClaimSpec


class VolumeSnapshotError(TypedDict, total=False):
    message: str
    time: str


class VolumeSnapshotStatus(TypedDict, total=False):
    """snapshot.storage.k8s.io/v1: creationTime is set once the volume is cut, readyToUse once it is
    stored; `error` when the CSI driver failed."""

    creationTime: str
    readyToUse: bool
    error: VolumeSnapshotError | str


class VolumeSnapshot(Object, total=False):
    status: VolumeSnapshotStatus


class APIResource(TypedDict, total=False):
    name: str
    kind: str


class APIResourceList(TypedDict, total=False):
    """Discovery (GET /apis/<group>/<version>): which kinds a group version serves."""

    resources: list[APIResource]


# -- the operator's own kinds (mailfleet.io/v1alpha1), as read raw -------------------------------------
# The specs are parsed into mailfleet.api models before they are acted on; what is read raw is what a
# reconcile looks at before (or without) parsing: names, domains, statuses.


class MailDomainSpec(TypedDict, total=False):
    domain: str
    aliasDomains: list[str]
    backup: dict[str, Any]  # parsed by api.BackupSpec


class LastBackup(TypedDict, total=False):
    name: str
    method: str
    completedAt: str


class MailDomainStatus(TypedDict, total=False):
    conditions: list[Condition]
    observedGeneration: int
    readyReplicas: int
    mailboxes: int
    dnsRecords: list[dict[str, Any]]
    lastBackup: LastBackup


class MailDomain(Object, total=False):
    spec: MailDomainSpec
    status: MailDomainStatus


class MailboxSpec(TypedDict, total=False):
    address: str


MailboxMove = TypedDict(  # "from" is a Python keyword
    "MailboxMove", {"from": int, "to": int, "step": str, "since": str, "stepSince": str, "message": str}, total=False
)


class MailboxStatus(TypedDict, total=False):
    conditions: list[Condition]
    observedGeneration: int
    usedBytes: int
    messages: int
    node: str | None  # None in a merge patch removes it
    phase: str | None  # "Moving" while status.move is set
    move: MailboxMove | None


class Mailbox(Object, total=False):
    spec: MailboxSpec
    status: MailboxStatus


class MailBackupSpec(TypedDict, total=False):
    domainRef: str
    method: str


class MailBackupStatus(TypedDict, total=False):
    phase: str  # Pending, Running, Completed, Failed
    startedAt: str
    completedAt: str
    pointInTime: str
    snapshots: list[str]
    error: str


class MailBackup(Object, total=False):
    spec: MailBackupSpec
    status: MailBackupStatus


# -- what the operator writes ----------------------------------------------------------------------------

# A manifest as the builders in specs/ make it and k8s.apply sends it: plain data, compared with what the
# API server holds field by field (k8s.contains), so it is not typed further.
Manifest = dict[str, Any]
