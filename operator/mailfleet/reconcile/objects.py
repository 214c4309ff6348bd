"""Apply a domain's rendered objects (specs.Rendered) in order, each only when it differs from what is
there, with an Event saying what changed and why: created, updated for a new spec, or repaired (changed
outside the operator though the spec was not). Called by reconcile/domain.py once nothing can refuse
the domain."""

from __future__ import annotations

import collections
from typing import cast

from mailfleet import k8s, kube_types, specs
from mailfleet.reconcile import conditions
from mailfleet.reconcile.context import Context


async def ensure_applied(
    ctx: Context, body: kube_types.MailDomain, objects: specs.Rendered, *, mailboxes: int
) -> kube_types.StatefulSet:
    """Returns the StatefulSet as the API server has it now (its status says how far the nodes are)."""
    at = conditions.now()
    generation = body["metadata"].get("generation")
    spec_unchanged = (body.get("status") or {}).get("observedGeneration") == generation
    statefulset = cast(kube_types.StatefulSet, objects.statefulset)
    for obj in objects.in_apply_order():
        applied, result = await k8s.apply(ctx.client, obj)
        if obj is objects.statefulset:
            statefulset = cast(kube_types.StatefulSet, result)
        if applied is k8s.Applied.UNCHANGED:
            continue
        ctx.metrics.applied.labels(obj["kind"], applied.value).inc()
        what = f"{obj['kind']} {obj['metadata']['name']}"
        if obj is objects.directory:
            await ctx.recorder.event(body, "DirectoryUpdated", f"{what}: {mailboxes} mailboxes", at=at)
        elif applied is k8s.Applied.CREATED and not spec_unchanged:
            await ctx.recorder.event(body, "Created", f"created {what}", at=at)
        elif spec_unchanged:  # the spec did not change, yet the object had to: it was deleted or edited
            await ctx.recorder.event(body, "Repaired", f"{what} was changed outside the operator; put back", at=at)
        else:
            await ctx.recorder.event(body, "Updated", f"updated {what}", at=at)
    return statefulset


def kinds(objects: specs.Rendered, *, dkim: bool) -> collections.Counter[str]:
    """How many objects of each kind the domain owns (the metrics), its DKIM key's Secret included."""
    return collections.Counter([obj["kind"] for obj in objects.in_apply_order()] + (["Secret"] if dkim else []))
