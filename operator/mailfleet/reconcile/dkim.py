"""The domain's DKIM key: made once (off the event loop) and kept in its Secret, and the DNS record that
publishes it. Called by reconcile/domain.py when the spec has `dkim`."""

from __future__ import annotations

import asyncio
import functools

from mailfleet import api, k8s, keys, kube_types, specs
from mailfleet.reconcile import conditions
from mailfleet.reconcile.checks import Refused
from mailfleet.reconcile.context import Context


async def ensure_key(ctx: Context, domain: api.MailDomain, body: kube_types.MailDomain) -> str:
    """The DKIM TXT record of the domain's key, made now when its Secret has none. Refused when the key
    there cannot be read."""
    namespace, secret_name = specs.common.namespace(domain), specs.common.dkim_name(domain)
    secret = await k8s.secrets.read(ctx.client, namespace, secret_name)
    pem = (secret or {}).get(specs.common.DKIM_KEY)
    if pem is None:
        pem = await asyncio.to_thread(keys.new_dkim_key)
        await k8s.apply(ctx.client, specs.with_owner(specs.dkim_secret(domain, pem), domain))
        ctx.metrics.applied.labels("Secret", "created").inc()
        await ctx.recorder.event(
            body,
            "DKIMKeyCreated",
            f"made a DKIM key in Secret {secret_name}; publish status.dnsRecords",
            at=conditions.now(),
        )
    try:
        return _record(pem)
    except ValueError as error:
        raise Refused("DKIMKeyInvalid", f"Secret {secret_name} key {specs.common.DKIM_KEY}: {error}") from error


@functools.lru_cache(maxsize=256)
def _record(pem: str) -> str:
    return keys.dkim_record(pem)  # parsing the key takes tens of milliseconds: once per key
