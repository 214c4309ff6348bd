"""What the operator asks the mail nodes over their HTTP port (8080; the nodes' NetworkPolicy admits the
operator's pods, labelled app.kubernetes.io/name: mailfleet-operator, from any namespace): each
mailbox's usage, for the Mailbox status. A node that does not answer is skipped until the next pass."""

from __future__ import annotations

import dataclasses
from typing import Any, Final

import aiohttp

# Where node 0 of a MailDomain answers, inside the cluster: the pod's name in its headless Service.
IN_CLUSTER: Final = "http://{pod}.{service}.{namespace}.svc:8080"


@dataclasses.dataclass(frozen=True)
class Usage:
    bytes: int
    messages: int


class NodeError(Exception):
    """A node that could not be asked (not running yet, unreachable, or an answer that makes no sense)."""


def url(template: str, *, namespace: str, name: str) -> str:
    return template.format(pod=f"{name}-0", service=f"{name}-headless", namespace=namespace, name=name)


async def usage(session: aiohttp.ClientSession, base: str) -> dict[str, Usage]:
    """GET <base>/usage: address -> usage, for every mailbox in the node's directory."""
    try:
        async with session.get(f"{base.rstrip('/')}/usage", timeout=aiohttp.ClientTimeout(total=10)) as response:
            if response.status != 200:
                raise NodeError(f"{base}/usage: HTTP {response.status}")
            data: Any = await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        raise NodeError(f"{base}/usage: {error}") from error
    try:
        return {
            str(address): Usage(int(used["bytes"]), int(used["messages"]))
            for address, used in data["mailboxes"].items()
        }
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise NodeError(f"{base}/usage: unexpected answer ({error})") from error
