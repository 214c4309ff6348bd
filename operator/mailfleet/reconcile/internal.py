"""The domain's internal token (DESIGN.md "Clustering"): made once and kept in its `<name>-internal`
Secret, which its nodes mount and require of every change on their admin port (later of LMTP and the
IMAP proxy between nodes too). reconcile/domain.py asks for it before rendering the domain's objects;
the operator's own requests to the nodes (reconcile/backup.py, usage.py, schedule.py) read it back with
`for_nodes`."""

from __future__ import annotations

from mailfleet import api, k8s, keys, nodes, specs
from mailfleet.reconcile.context import Context


async def read(client: k8s.Client, namespace: str, domain_name: str) -> str | None:
    """The token in the Secret of MailDomain `domain_name`, or None when there is none (yet)."""
    secret = await k8s.secrets.read(client, namespace, specs.common.internal_name(domain_name))
    return (secret or {}).get(specs.common.INTERNAL_KEY, "").strip() or None


async def token(ctx: Context, domain: api.MailDomain) -> str:
    """The domain's token: the one its Secret holds, or a new one when it holds none, which reaches the
    Secret with the domain's other objects (specs.Rendered.internal). Kept from then on: a new token
    rolls the nodes, which read it at start."""
    found = await read(ctx.client, specs.common.namespace(domain), domain.metadata.name)
    return found if found is not None else keys.new_internal_token()


async def for_nodes(client: k8s.Client, namespace: str, domain_name: str) -> str:
    """The token the nodes of MailDomain `domain_name` require; nodes.NodeError when its Secret has none
    (the domain was never reconciled: it has no nodes either)."""
    found = await read(client, namespace, domain_name)
    if found is None:
        secret = specs.common.internal_name(domain_name)
        raise nodes.NodeError(
            f"Secret {secret} has no {specs.common.INTERNAL_KEY}: MailDomain {domain_name} not built yet"
        )
    return found
