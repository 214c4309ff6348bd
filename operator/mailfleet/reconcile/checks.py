"""What can refuse a MailDomain, checked before its first object is written ("nothing half-built"): its
spec, the Secrets it names, a directory too large for a Secret, a change Kubernetes would refuse. (A
replicas change is not refused: it moves mailboxes, reconcile/moves.py.) Each
check raises `Refused`, whose reason and message reconcile/domain.py puts into the domain's conditions
and an Event. Also raised by reconcile/restore.py and reconcile/dkim.py.
"""

from __future__ import annotations

from typing import Final

import pydantic

from mailfleet import api, k8s, kube_types, specs
from mailfleet.reconcile.context import Context

# A Secret holds at most 1 MiB of data (the API server refuses more).
SECRET_LIMIT: Final = 1024 * 1024
PEM_CERTIFICATE: Final = "-----BEGIN CERTIFICATE-----"  # RFC 7468 §5


class Refused(Exception):
    """The domain cannot be built as specified; `reason` and `message` go into its conditions."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def parse(body: kube_types.MailDomain) -> api.MailDomain:
    try:
        return api.MailDomain.model_validate(body)
    except pydantic.ValidationError as error:
        raise Refused("InvalidSpec", api.validation_message(error)) from error


async def ensure_named_secrets(ctx: Context, domain: api.MailDomain) -> str | None:
    """The TLS, relay and relay CA Secrets the spec names exist and hold what they must. Returns the
    relay's user name (None without one)."""
    namespace = specs.common.namespace(domain)
    if domain.spec.tls is not None:
        name = domain.spec.tls.secret_name
        tls = await k8s.secrets.read(ctx.client, namespace, name)
        if tls is None:
            raise Refused(
                "TLSSecretNotFound", f"Secret {name} (spec.tls.secretName) does not exist in namespace {namespace}"
            )
        if missing := [k for k in ("tls.crt", "tls.key") if not tls.get(k)]:
            raise Refused("TLSSecretInvalid", f"Secret {name} (spec.tls.secretName) has no {' or '.join(missing)}")
    if domain.spec.smtp.relay_host is None:
        return None
    username = await _ensure_relay_secret(ctx, domain.spec.smtp.relay_secret_ref, namespace)
    await _ensure_relay_ca(ctx, domain.spec.smtp.relay_ca_secret_ref, namespace)
    return username


async def _ensure_relay_secret(ctx: Context, ref: api.LocalObjectReference | None, namespace: str) -> str | None:
    if ref is None:
        return None
    relay = await k8s.secrets.read(ctx.client, namespace, ref.name)
    if relay is None:
        raise Refused(
            "RelaySecretNotFound",
            f"Secret {ref.name} (spec.smtp.relaySecretRef) does not exist in namespace {namespace}",
        )
    if not relay.get("password"):
        raise Refused("RelaySecretInvalid", f"Secret {ref.name} (spec.smtp.relaySecretRef) has no password")
    return relay.get("username") or None


async def _ensure_relay_ca(ctx: Context, ref: api.CASecretKeySelector | None, namespace: str) -> None:
    """A relay CA the node could not load would hold every outbound message: refused here instead."""
    if ref is None:
        return
    where = f"Secret {ref.name} (spec.smtp.relayCASecretRef)"
    secret = await k8s.secrets.read(ctx.client, namespace, ref.name)
    if secret is None:
        raise Refused("RelayCASecretNotFound", f"{where} does not exist in namespace {namespace}")
    if PEM_CERTIFICATE not in secret.get(ref.key, ""):
        raise Refused("RelayCASecretInvalid", f"{where} has no PEM certificate under the key {ref.key}")


def ensure_directory_fits(directory: kube_types.Manifest, *, mailboxes: int) -> None:
    size = sum(len(value) for value in k8s.secret_values(directory).values())
    if size > SECRET_LIMIT:
        raise Refused(
            "DirectoryTooLarge",
            f"the directory of {mailboxes} mailboxes is {size} bytes; a Secret holds at most "
            f"{SECRET_LIMIT} (split the mailboxes across MailDomains)",
        )


def ensure_changeable(existing: kube_types.StatefulSet | None, statefulset: kube_types.Manifest) -> None:
    """The StatefulSet as built may replace the one there (its fixed fields stay as they are)."""
    if existing is not None and (why := k8s.immutable_change(existing, statefulset)):
        raise Refused("ImmutableFieldChanged", why)
