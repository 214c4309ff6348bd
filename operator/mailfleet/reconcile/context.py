"""What every reconcile needs: the API client, the Event recorder, the view of the Mailbox and MailDomain
resources the operator watches, the work queue, the password hasher and the metrics; the kinds the
reconcile reads, each with its body type; and `object_key`, what the operator's memories are keyed by."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from typing import Any, Final, Protocol

from mailfleet import api, k8s, kube_types
from mailfleet.k8s.events import Recorder
from mailfleet.metrics import OperatorMetrics
from mailfleet.reconcile.passwords import PasswordHasher
from mailfleet.reconcile.workqueue import WorkQueue

DomainKey = tuple[str, str]  # (namespace, MailDomain name)

MAILDOMAIN: Final[k8s.Kind[kube_types.MailDomain]] = k8s.kind_of("mailfleet.io/v1alpha1", "MailDomain")
MAILBOX: Final[k8s.Kind[kube_types.Mailbox]] = k8s.kind_of("mailfleet.io/v1alpha1", "Mailbox")
SECRET: Final = k8s.secrets.SECRET
STATEFULSET: Final[k8s.Kind[kube_types.StatefulSet]] = k8s.kind_of("apps/v1", "StatefulSet")
MAILBACKUP: Final[k8s.Kind[kube_types.MailBackup]] = k8s.kind_of("mailfleet.io/v1alpha1", "MailBackup")
VOLUMESNAPSHOT: Final[k8s.Kind[kube_types.VolumeSnapshot]] = k8s.kind_of("snapshot.storage.k8s.io/v1", "VolumeSnapshot")
PERSISTENTVOLUMECLAIM: Final[k8s.Kind[kube_types.PersistentVolumeClaim]] = k8s.kind_of("v1", "PersistentVolumeClaim")


class View(Protocol):
    """The watched resources as the operator last saw them (kopf's indexes, in the operator). Complete
    before the first reconcile runs, so a directory is never built from half the Mailboxes."""

    def mailboxes(self, namespace: str, mail_domain: str) -> list[kube_types.Mailbox]:
        """The Mailboxes whose address is in `mail_domain` (a DNS domain), as bodies."""
        ...

    def serving(self, namespace: str, mail_domain: str) -> list[str]:
        """Names of the MailDomains that serve `mail_domain` (as domain or alias domain)."""
        ...

    def domain_names(self, namespace: str) -> list[str]:
        """Names of all MailDomains in the namespace."""
        ...

    def namespaces(self) -> list[str]:
        """The namespaces that hold MailDomains."""
        ...

    def backups(self, namespace: str, domain_name: str) -> list[kube_types.MailBackup]:
        """The MailBackups whose spec.domainRef is `domain_name`, as bodies (with labels and annotations)."""
        ...


@dataclasses.dataclass
class Context:
    client: k8s.Client
    recorder: Recorder
    view: View
    image: str
    hasher: PasswordHasher
    metrics: OperatorMetrics
    queue: WorkQueue[DomainKey] | None = None
    # The namespace the operator runs in: the nodes' NetworkPolicy admits the operator's pods from there
    # (None: not known, so only from the domain's own namespace).
    operator_namespace: str | None = None
    # The DNS domains each MailDomain served at its last reconcile: when it is deleted, its Mailboxes
    # are told their domain is gone.
    served: dict[DomainKey, set[str]] = dataclasses.field(default_factory=dict)
    # Each MailDomain's number of nodes and its mailboxes' homes (lower-case address -> ordinal), as its
    # last reconcile wrote them into the directory: usage asks each mailbox's home (reconcile/usage.py).
    placement: dict[DomainKey, tuple[int, dict[str, int]]] = dataclasses.field(default_factory=dict)
    # The status last written to each Mailbox (by uid): the indexes show the operator's own writes late.
    mailbox_statuses: dict[str, kube_types.MailboxStatus] = dataclasses.field(default_factory=dict)
    # The usage last written to each Mailbox's status (by uid): bytes, messages.
    mailbox_usage: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    # Each Mailbox's model (or why it is invalid) by uid, with the generation it was parsed from.
    parsed_mailboxes: dict[str, tuple[object, api.Mailbox | None, str]] = dataclasses.field(default_factory=dict)
    # The kinds of the objects each MailDomain owns, as of its last reconcile (for the metrics).
    owned: dict[DomainKey, collections.Counter[str]] = dataclasses.field(default_factory=dict)

    def enqueue(self, key: DomainKey) -> None:
        if self.queue is not None:
            self.queue.add(key)


def object_key(body: kube_types.Object | Mapping[str, Any]) -> str:
    """What the operator's memories of an object are keyed by: its uid (namespace/name if it has none)."""
    meta = body.get("metadata") or {}
    return str(meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}")
