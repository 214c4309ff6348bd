"""Mailbox usage: what each mailbox keeps, as its node counts it, copied into the Mailbox's status
(usedBytes, messages: the Used column of `kubectl get mbx`). A pass asks node 0 of every MailDomain
and writes only the statuses that changed."""

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
    """Ask the domain's node and write the Mailbox statuses that changed; returns how many."""
    namespace, name = key
    token = await internal.for_nodes(ctx.client, namespace, name)
    found = await nodes.usage(session, nodes.url(template, namespace=namespace, name=name), token=token)
    written = 0
    for mail_domain in sorted(ctx.served.get(key, set())):
        for body in ctx.view.mailboxes(namespace, mail_domain):
            used = found.get(str((body.get("spec") or {}).get("address", "")).lower())
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
