"""What every reconcile needs: the API client, the Event recorder, the view of the Mailbox and MailDomain
resources the operator watches, the work queue, the Mailbox status writer, the password hasher and the
metrics; and, from reconcile/kinds.py, the kinds the reconcile reads (each with its body type) and
`object_key`, what the operator's memories are keyed by."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from typing import Protocol

from mailfleet import api, k8s, kube_types, nodes
from mailfleet.k8s.events import Recorder
from mailfleet.metrics import OperatorMetrics
from mailfleet.reconcile.kinds import (
    MAILBACKUP,
    MAILBOX,
    MAILDOMAIN,
    PERSISTENTVOLUMECLAIM,
    SECRET,
    STATEFULSET,
    VOLUMESNAPSHOT,
    object_key,
)
from mailfleet.reconcile.movegate import DomainMoving
from mailfleet.reconcile.passwords import PasswordHasher
from mailfleet.reconcile.statuswrites import MailboxStatuses
from mailfleet.reconcile.workqueue import WorkQueue

__all__ = [
    "MAILBACKUP",
    "MAILBOX",
    "MAILDOMAIN",
    "PERSISTENTVOLUMECLAIM",
    "SECRET",
    "STATEFULSET",
    "VOLUMESNAPSHOT",
    "Context",
    "DomainKey",
    "View",
    "object_key",
]

DomainKey = tuple[str, str]  # (namespace, MailDomain name)


class View(Protocol):
    """The watched resources as the operator last saw them (kopf's indexes, in the operator). Complete
    before the first reconcile runs, so a directory is never built from half the Mailboxes."""

    def mailboxes(self, namespace: str, mail_domain: str) -> list[kube_types.Mailbox]:
        """The Mailboxes whose address is in `mail_domain` (a DNS domain), as bodies; not those being deleted."""
        ...

    def leaving(self, namespace: str, mail_domain: str | None = None) -> list[kube_types.Mailbox]:
        """The Mailboxes being deleted (a deletionTimestamp: a finalizer holds them) whose address is in
        `mail_domain`, or in any domain of the namespace (None)."""
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
    # Where node <ordinal> of a MailDomain answers (nodes.url): mailbox moves (reconcile/moves.py) ask them.
    node_url: str = nodes.IN_CLUSTER
    # The DNS domains each MailDomain served at its last reconcile: when it is deleted, its Mailboxes
    # are told their domain is gone.
    served: dict[DomainKey, set[str]] = dataclasses.field(default_factory=dict)
    # Each MailDomain's number of nodes and its mailboxes' homes (lower-case address -> ordinal), as its
    # last reconcile wrote them into the directory: usage asks each mailbox's home (reconcile/usage.py).
    placement: dict[DomainKey, tuple[int, dict[str, int]]] = dataclasses.field(default_factory=dict)
    # The usage last written to each Mailbox's status (by uid): bytes, messages.
    mailbox_usage: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    # Each Mailbox's model (or why it is invalid) by uid, with the generation it was parsed from.
    parsed_mailboxes: dict[str, tuple[object, api.Mailbox | None, str]] = dataclasses.field(default_factory=dict)
    # The mailbox moves running beside the reconciles (reconcile/moves.py), by domain and address, each
    # with why its step did not run (address -> the node's error), once it has said.
    copies: dict[tuple[DomainKey, str], tuple[asyncio.Task[None], dict[str, str]]] = dataclasses.field(
        default_factory=dict
    )
    # What each MailDomain's reconciles, moves and backups share (reconcile/movegate.py).
    moving: dict[DomainKey, DomainMoving] = dataclasses.field(default_factory=dict)
    # The kinds of the objects each MailDomain owns, as of its last reconcile (for the metrics).
    owned: dict[DomainKey, collections.Counter[str]] = dataclasses.field(default_factory=dict)

    # The small Secrets as the watch shows them (handlers.py feeds it): password Secrets, read without a list.
    seen_secrets: k8s.secrets.Seen = dataclasses.field(default_factory=k8s.secrets.Seen)
    # Every Mailbox status the operator writes, written behind the reconciles (reconcile/statuswrites.py).
    statuses: MailboxStatuses = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.statuses = MailboxStatuses(client=self.client, recorder=self.recorder)

    def moving_of(self, key: DomainKey) -> DomainMoving:
        return self.moving.setdefault(key, DomainMoving())

    def enqueue(self, key: DomainKey) -> None:
        if self.queue is not None:
            self.queue.add(key)
