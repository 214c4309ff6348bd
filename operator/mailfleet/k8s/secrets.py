"""Secrets as the reconcile reads them: their values as text (passwords, TLS, relay credentials, keys).
Used by reconcile/checks.py, reconcile/dkim.py and reconcile/mailboxes.py; `Seen`, the small Secrets as
the operator's watch shows them, is fed by handlers.py."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, Final

from mailfleet import kube_types
from mailfleet.k8s.apply import secret_values
from mailfleet.k8s.client import Client, Kind, kind_of

SECRET: Final[Kind[kube_types.Secret]] = kind_of("v1", "Secret")
SEEN_LIMIT: Final = 4096  # bytes of base64 data: a Secret larger than this is read from the API when needed


def strings(secret: kube_types.Secret) -> dict[str, str]:
    """The Secret's values as text (invalid UTF-8 replaced: it then fails where it is used, and says so)."""
    return {key: value.decode("utf-8", "replace") for key, value in secret_values(secret).items()}


async def read(client: Client, namespace: str, name: str) -> dict[str, str] | None:
    """The values of Secret `name`, or None when it does not exist."""
    found = await client.get(SECRET, namespace, name)
    return None if found is None else strings(found)


class Seen:
    """The values of the small Secrets (password Secrets are a few hundred bytes) as the watch last showed
    them, so that a reconcile of ten thousand Mailboxes does not list every Secret of the namespace again
    (seconds of the API server's time and tens of MiB of JSON each time). A Secret not seen (larger than
    SEEN_LIMIT, deleted, or not listed by the watch yet) is None: the caller asks the API."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, str], dict[str, str]] = {}

    def observe(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (sys.intern(str(meta.get("namespace"))), str(meta.get("name")))
        data = body.get("data") or {}
        if event_type == "DELETED" or sum(len(str(value)) for value in data.values()) > SEEN_LIMIT:
            self._values.pop(key, None)
            return
        values = strings(dict(body))  # type: ignore[arg-type]  # a Secret's JSON
        self._values[key] = {sys.intern(name): value for name, value in values.items()}  # "password" once

    def get(self, namespace: str, name: str) -> dict[str, str] | None:
        return self._values.get((namespace, name))

    def __len__(self) -> int:
        return len(self._values)
