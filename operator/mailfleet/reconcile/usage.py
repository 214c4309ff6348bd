"""Mailbox usage: what each mailbox keeps, as its node counts it, copied into the Mailbox's status
(usedBytes, messages: the Used column of `kubectl get mbx`). A pass asks every node of every MailDomain,
takes each mailbox's figures from its home's answer, and writes only the statuses that changed."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from mailfleet import k8s, kube_types, nodes
from mailfleet.reconcile import internal
from mailfleet.reconcile.context import MAILBOX, Context, DomainKey, object_key

log = logging.getLogger(__name__)


async def collect(ctx: Context, session: aiohttp.ClientSession, template: str) -> None:
    """One pass over the MailDomains reconciled so far."""
    for key in sorted(ctx.served):
        try:
            await collect_domain(ctx, session, template, key)
        except nodes.NodeError as error:
            log.info("no usage from the node of MailDomain %s/%s: %s", key[0], key[1], error)


async def collect_domain(ctx: Context, session: aiohttp.ClientSession, template: str, key: DomainKey) -> int:
    """Ask each node of the domain and write the Mailbox statuses that changed; returns how many. A node
    that does not answer (restarting) leaves its mailboxes' figures as they were; the others' are still
    written. NodeError when no node answered."""
    namespace, name = key
    replicas, homes = ctx.placement.get(key, (1, {}))
    token = await internal.for_nodes(ctx.client, namespace, name)
    answers: dict[int, dict[str, nodes.Usage]] = {}
    failures: list[nodes.NodeError] = []
    for ordinal in range(replicas):
        endpoint = nodes.url(template, namespace=namespace, name=name, ordinal=ordinal)
        try:
            answers[ordinal] = await nodes.usage(session, endpoint, token=token)
        except nodes.NodeError as error:
            log.info("no usage from node %d of MailDomain %s/%s: %s", ordinal, namespace, name, error)
            failures.append(error)
    if not answers and failures:
        raise failures[0]
    written = 0
    for mail_domain in sorted(ctx.served.get(key, set())):
        for body in ctx.view.mailboxes(namespace, mail_domain):
            address = str((body.get("spec") or {}).get("address", "")).lower()
            # DESIGN.md "Clustering": usage is asked of each mailbox's home, the only node that stores it
            used = answers.get(homes.get(address, 0), {}).get(address)
            if used is not None and await _write(ctx, body, used):
                written += 1
    return written


async def _write(ctx: Context, body: kube_types.Mailbox, used: nodes.Usage) -> bool:
    memory = object_key(body)
    status = body.get("status") or {}
    last = ctx.mailbox_usage.get(memory, (status.get("usedBytes"), status.get("messages")))
    if last == (used.bytes, used.messages):
        return False
    meta = body["metadata"]
    try:
        await ctx.client.patch(
            MAILBOX,
            meta["namespace"],
            meta["name"],
            {"status": {"usedBytes": used.bytes, "messages": used.messages}},
            subresource="status",
        )
    except k8s.ApiError as error:
        if error.not_found:
            return False
        raise
    ctx.mailbox_usage[memory] = (used.bytes, used.messages)
    return True


async def run(ctx: Context, template: str, interval: float) -> None:
    """A pass every `interval` seconds until cancelled."""
    async with aiohttp.ClientSession() as session:
        while True:
            await asyncio.sleep(interval)
            try:
                await collect(ctx, session, template)
            except k8s.ApiError as error:
                log.warning("writing Mailbox usage failed: %s", error)
