"""The one writer of MailDomain.status. Two sources report on a domain, each owning its own conditions
and fields: the domain reconcile (`RECONCILE`: Ready, Progressing, Degraded, observedGeneration,
readyReplicas, mailboxes, dnsRecords; reconcile/domain.py) and the backup schedule (`BACKUPS`:
BackupsHealthy, lastBackup; reconcile/schedule.py). A source hands in a `Report`; `write` merges it with
what the status holds from the other sources and patches only what changed.

The status subresource takes a merge patch, and a merge patch replaces a list whole: so `write` sends
every condition, the other sources' as read. A source that reads the status long before it writes (the
schedule's pass over listed MailDomains) asks for the write to be refused when the object changed since
(`only_if_unchanged`), and writes again on its next pass, rather than put back another source's older
conditions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from mailfleet import api, k8s, kube_types, specs
from mailfleet.reconcile import conditions
from mailfleet.reconcile.conditions import Condition
from mailfleet.reconcile.context import MAILDOMAIN, Context


@dataclasses.dataclass(frozen=True)
class Source:
    """Who reports on a MailDomain: the condition types and the status fields it owns."""

    name: str
    conditions: tuple[str, ...]
    fields: tuple[str, ...]


RECONCILE: Final = Source(
    "reconcile",
    ("Ready", "Progressing", "Degraded", "Certificate"),  # Certificate: with spec.tls.issuerRef only
    ("observedGeneration", "readyReplicas", "mailboxes", "dnsRecords"),
)
BACKUPS: Final = Source("backups", ("BackupsHealthy",), ("lastBackup",))
# The order of the conditions in the status: the domain's own, then the backups'; types no source owns
# (written by someone else) come last, as they were.
ORDER: Final = RECONCILE.conditions + BACKUPS.conditions


@dataclasses.dataclass(frozen=True)
class Report:
    """What one source says of a domain now: its conditions (a type it owns that is not here is removed)
    and its fields (None removes one)."""

    source: Source
    conditions: Sequence[Condition]
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        foreign = [c.type for c in self.conditions if c.type not in self.source.conditions]
        foreign += [key for key in self.fields if key not in self.source.fields]
        if foreign:
            raise ValueError(f"the {self.source.name} source does not own {', '.join(foreign)}")


def merged(
    current: kube_types.MailDomainStatus,
    report: Report,
    *,
    generation: int | None,
    at: str,
    remembered: Iterable[kube_types.Condition] = (),
) -> list[kube_types.Condition]:
    """The conditions to write: the report's (each keeping its lastTransitionTime while its status holds,
    from `remembered` when the source knows a newer write than `current` shows) and the others as read."""
    present = list(current.get("conditions") or ())
    before = {c.get("type"): c for c in [*present, *remembered]}
    own = conditions.merge(before.values(), report.conditions, generation=generation, at=at)
    others = [c for c in present if c.get("type") not in report.source.conditions]
    rank = {type_: index for index, type_ in enumerate(ORDER)}
    return sorted([*own, *others], key=lambda c: rank.get(str(c.get("type")), len(ORDER)))


async def write(
    ctx: Context,
    body: kube_types.MailDomain,
    report: Report,
    *,
    at: str,
    remembered: Iterable[kube_types.Condition] = (),
    only_if_unchanged: bool = False,
) -> list[kube_types.Condition] | None:
    """Patch the domain's status with `report` when that changes it. Returns the conditions written, or
    None when nothing was: unchanged, the domain is gone, or (`only_if_unchanged`) it changed since `body`
    was read. Raises k8s.ApiError otherwise."""
    meta = body["metadata"]
    current = body.get("status") or {}
    wanted = merged(current, report, generation=meta.get("generation"), at=at, remembered=remembered)
    patch: dict[str, Any] = {key: value for key, value in report.fields.items() if current.get(key) != value}
    if not conditions.same(current.get("conditions"), wanted):
        patch["conditions"] = wanted
    if not patch:
        return None
    precondition: dict[str, Any] = {}
    if only_if_unchanged and meta.get("resourceVersion"):
        precondition = {"metadata": {"resourceVersion": meta["resourceVersion"]}}
    try:
        await ctx.client.patch(
            MAILDOMAIN, meta["namespace"], meta["name"], {**precondition, "status": patch}, subresource="status"
        )
    except k8s.ApiError as error:
        # 404: deleted meanwhile, nothing to report on; 409 (only with the precondition): written meanwhile.
        if error.not_found or error.conflict:
            return None
        raise
    return wanted


# -- the domain reconcile's report -----------------------------------------------------------------------


def reconciled(
    domain: api.MailDomain,
    statefulset: kube_types.StatefulSet,
    *,
    mailboxes: int,
    dkim_record: str | None,
    certificate: Condition | None = None,
) -> Report:
    """Every object is as built: how far the mail nodes are, and what to publish in DNS; `certificate`:
    the cert-manager Certificate's condition (reconcile/certificate.py), with spec.tls.issuerRef."""
    replicas = domain.spec.replicas
    observed = statefulset.get("status") or {}
    ready = int(observed.get("readyReplicas") or 0)
    updated = int(observed.get("updatedReplicas") or 0)
    rolling = observed.get("currentRevision") != observed.get("updateRevision") or updated < replicas
    if ready >= replicas:
        ready_condition = Condition("Ready", "True", "NodesReady", f"{ready}/{replicas} mail nodes ready")
    else:
        ready_condition = Condition("Ready", "False", "NodesNotReady", f"{ready}/{replicas} mail nodes ready")
    if rolling or ready < replicas:
        progressing = Condition("Progressing", "True", "RollingOut", f"{updated}/{replicas} mail nodes up to date")
    else:
        progressing = Condition("Progressing", "False", "UpToDate", "every mail node runs the current spec")
    degraded = Condition("Degraded", "False", "Reconciled", "every object is as specified")
    fields = {
        "observedGeneration": domain.metadata.generation,
        "readyReplicas": ready,
        "mailboxes": mailboxes,
        "dnsRecords": specs.dns_records(domain, dkim_record=dkim_record),
    }
    wanted = [ready_condition, progressing, degraded, *([certificate] if certificate is not None else [])]
    return Report(RECONCILE, wanted, fields)


def refused(body: kube_types.MailDomain, reason: str, message: str) -> Report:
    """The domain cannot be built as specified: nothing is Ready, and Degraded says why."""
    wanted = [
        Condition("Ready", "False", reason, message),
        Condition("Progressing", "False", reason, "waiting for the problem to be fixed"),
        Condition("Degraded", "True", reason, message),
    ]
    return Report(RECONCILE, wanted, {"observedGeneration": body["metadata"].get("generation")})
