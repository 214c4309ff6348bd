"""Secrets as the reconcile reads them: their values as text (passwords, TLS, relay credentials, keys).
Used by reconcile/checks.py, reconcile/dkim.py and reconcile/mailboxes.py."""

from __future__ import annotations

from typing import Final

from mailfleet import kube_types
from mailfleet.k8s.apply import secret_values
from mailfleet.k8s.client import Client, Kind, kind_of

SECRET: Final[Kind[kube_types.Secret]] = kind_of("v1", "Secret")


def strings(secret: kube_types.Secret) -> dict[str, str]:
    """The Secret's values as text (invalid UTF-8 replaced: it then fails where it is used, and says so)."""
    return {key: value.decode("utf-8", "replace") for key, value in secret_values(secret).items()}


async def read(client: Client, namespace: str, name: str) -> dict[str, str] | None:
    """The values of Secret `name`, or None when it does not exist."""
    found = await client.get(SECRET, namespace, name)
    return None if found is None else strings(found)
