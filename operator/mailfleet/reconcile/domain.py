"""MailDomain: observe -> check -> build -> apply -> status, for one domain and all of its Mailboxes. The
work queue's job (handlers.py); each step is a function of its own module, in the order below.

One reconcile of a domain does everything the domain's objects depend on, so it is the one thing the
work queue coalesces: the directory Secret is written once per reconcile however many Mailboxes changed,
and each Mailbox's status is written only when it changes.

Order matters for "nothing half-built": everything that can refuse the domain (its spec, the Secrets it
names, the backup it restores, a change Kubernetes would refuse: reconcile/checks.py) is checked before
the first object is written.
"""

from __future__ import annotations

import asyncio
import time

from mailfleet import api, k8s, kube_types, specs
from mailfleet.reconcile import (
    certificate,
    checks,
    conditions,
    dkim,
    internal,
    mailboxes,
    moves,
    objects,
    restore,
    status,
)
from mailfleet.reconcile.checks import Refused
from mailfleet.reconcile.context import MAILDOMAIN, STATEFULSET, Context, DomainKey


async def reconcile(ctx: Context, key: DomainKey) -> None:
    """Reconcile the MailDomain `key`. Raises on API errors, so the queue retries."""
    namespace, name = key
    started = time.monotonic()
    result = "error"
    try:
        body = await ctx.client.get(MAILDOMAIN, namespace, name)
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            ctx.owned.pop(key, None)
            ctx.placement.pop(key, None)
            await moves.domain_gone(ctx, key)
            mailboxes.domain_gone(ctx, key)
            result = "ok"
            return
        try:
            # The moves' flips write the directory between reconciles, never during one (reconcile/movegate.py).
            async with ctx.moving_of(key).directory:
                await _reconcile(ctx, body)
            result = "ok"
        except Refused as refusal:
            result = "refused"
            await _refused(ctx, body, refusal)
    except asyncio.CancelledError:
        result = "cancelled"  # the operator is stopping
        raise
    finally:
        ctx.metrics.reconciles.labels("MailDomain", result).inc()
        ctx.metrics.duration.labels("MailDomain").observe(time.monotonic() - started)


async def _reconcile(ctx: Context, body: kube_types.MailDomain) -> None:
    domain = checks.parse(body)
    key = (specs.common.namespace(domain), domain.metadata.name)
    ctx.served[key] = specs.node.domains_of(domain)

    # The cert-manager Certificate first: it depends on the spec alone, and fills the TLS Secret checked next.
    certificate_condition = await certificate.ensure(ctx, body, domain)
    # Observe and check: anything below may refuse the domain; nothing else is written yet.
    try:
        relay_username = await checks.ensure_named_secrets(ctx, domain)
    except Refused as refusal:
        if refusal.reason == "TLSSecretNotFound" and certificate_condition is not None:
            raise certificate.refusal(refusal, certificate_condition) from None
        raise
    existing = await ctx.client.get(STATEFULSET, key[0], specs.common.statefulset_name(domain))
    claims = await restore.claims_to_make(ctx, domain, existing)
    layout = moves.layout(domain, existing)
    served = await mailboxes.served(ctx, domain, serving=layout.serving)
    # Mailbox moves (a replicas change, a forced move): what moves, and how many nodes run meanwhile.
    bodies = {str(v.body["spec"]["address"]).lower(): v.body for v in served.verdicts if v.condition.status == "True"}
    forced, bad_annotations = moves.forced_moves(bodies, replicas=domain.spec.replicas)
    plan = moves.plan(
        served.homes,
        layout=layout,
        recorded=moves.recorded_moves(ctx, bodies),
        forced=forced,
        held=moves.held(ctx, bodies.values()),
        cleaning=moves.cleaning(ctx, domain),
    )
    running = _with_replicas(domain, plan.replicas)  # the domain as its nodes run now
    internal_token = await internal.token(ctx, domain)  # made now when it has no Secret yet: applied below

    def render(homes: dict[str, int]) -> specs.Rendered:
        return specs.render(
            running,
            served.accepted,
            served.passwords,
            image=ctx.image,
            relay_username=relay_username,
            internal_token=internal_token,
            operator_namespace=ctx.operator_namespace,
            placed=homes,
        ).owned_by(domain)

    rendered = render(served.homes)
    rendered.statefulset["metadata"].setdefault("annotations", {})[moves.PLACED_OVER] = str(plan.placed_over)
    checks.ensure_directory_fits(rendered.directory, mailboxes=len(served.accepted))
    checks.ensure_changeable(existing, rendered.statefulset)

    # Build: the DKIM key first (made once, kept in its Secret), the restore claims, then the objects (the
    # internal token's Secret among them).
    dkim_record = await dkim.ensure_key(ctx, domain, body) if domain.spec.dkim is not None else None
    await restore.ensure_claims(ctx, body, claims)
    statefulset = await objects.ensure_applied(ctx, body, rendered, mailboxes=len(served.accepted))
    ctx.owned[key] = objects.kinds(rendered, dkim=dkim_record is not None)
    ctx.placement[key] = (plan.replicas, served.homes)  # the same dict: the flips below update it

    # Moves run beside the reconciles; a flip writes the directory as this reconcile applied it, with the
    # new home (under the domain's directory lock: as it is then), into the homes the next one starts from.
    async def publish_home(address: str, ordinal: int) -> None:
        served.homes[address] = ordinal
        await k8s.apply(ctx.client, render(served.homes).directory)

    ctx.moving_of(key).publish = publish_home
    await moves.report_bad_annotations(ctx, bad_annotations)
    driven = await moves.drive(
        ctx,
        domain,
        plan,
        bodies=bodies,
        may_start=moves.nodes_ready(statefulset, plan.replicas),
        parallel=domain.spec.moves.parallel,
        token=internal_token,
        ordinals=range(plan.replicas),
    )
    # Each move runs beside the reconciles, in a task that asks for the next reconcile when it ends (the
    # flipped home shows in the Mailbox's status.node, the StatefulSet may shrink, the homes be balanced).

    # Status: the domain's, then each Mailbox's.
    report = status.reconciled(
        running, statefulset, mailboxes=len(served.accepted), dkim_record=dkim_record, certificate=certificate_condition
    )
    report = moves.progress(report, layout=layout, the_plan=plan, driven=driven)
    await status.write(ctx, body, report, at=conditions.now())
    mailboxes.write_verdicts(ctx, served.verdicts)


def _with_replicas(domain: api.MailDomain, replicas: int) -> api.MailDomain:
    """The domain with another number of nodes (what runs while a scale-down moves mailboxes off)."""
    if replicas == domain.spec.replicas:
        return domain
    return domain.model_copy(update={"spec": domain.spec.model_copy(update={"replicas": replicas})})


async def _refused(ctx: Context, body: kube_types.MailDomain, refusal: Refused) -> None:
    """Say in the status and in an Event (once per new reason or message) why the domain is not built,
    and tell its Mailboxes."""
    previous = conditions.find((body.get("status") or {}).get("conditions"), "Degraded")
    changed = previous is None or (previous.get("reason"), previous.get("message")) != (
        refusal.reason,
        refusal.message,
    )
    await status.write(ctx, body, status.refused(body, refusal.reason, refusal.message), at=conditions.now())
    if changed:
        await ctx.recorder.event(body, refusal.reason, refusal.message, type="Warning", at=conditions.now())
    mailboxes.domain_not_ready(ctx, body, refusal.message)
