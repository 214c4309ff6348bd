"""The cert-manager Certificate of a MailDomain with `spec.tls.issuerRef` (reconcile/domain.py calls
`ensure` before it checks the Secrets the spec names, since this Certificate is what fills the TLS one).

The Certificate (`<domain>-tls`, owned by the MailDomain, so deleted with it) asks the issuer the spec
names for `spec.tls.secretName`, for every host name the certificate must hold
(specs.common.tls_names: the mail host, and autoconfig., autodiscover. and mta-sts. of the domain and
of each alias domain); a spec change that changes them updates it. Its state is the domain's
`Certificate` condition: Issued once cert-manager says the Certificate is Ready, Issuing until then
(with cert-manager's message), CertManagerMissing when the API server does not serve
cert-manager.io/v1 Certificates (cert-manager not installed: the rest of the domain is still built, and
the reconcile does not fail over it), CertificateConflict when an object of that name is there that this
MailDomain does not own (left alone). When issuerRef is removed, the Certificate made for it is deleted
(so cert-manager no longer overwrites the Secret the user now provides) and the condition goes.
cert-manager is an add-on: no watch on Certificates; the TLS Secret it writes is watched (handlers.py),
so its arrival reconciles the domain and refreshes the condition.
"""

from __future__ import annotations

from typing import Any, Final

from mailfleet import api, k8s, kube_types, specs
from mailfleet.reconcile import conditions
from mailfleet.reconcile.checks import Refused
from mailfleet.reconcile.conditions import Condition
from mailfleet.reconcile.context import Context

CERTIFICATE: Final[k8s.Kind[dict[str, Any]]] = k8s.kind_of("cert-manager.io/v1", "Certificate")
TYPE: Final = "Certificate"  # the MailDomain condition


def desired(domain: api.MailDomain) -> dict[str, Any]:
    """The Certificate for the domain's spec.tls (which must have an issuerRef)."""
    tls = domain.spec.tls
    assert tls is not None and tls.issuer_ref is not None
    ref = tls.issuer_ref
    metadata = specs.common.metadata(domain, specs.common.certificate_name(domain))
    metadata["ownerReferences"] = [specs.common.owner_reference(domain)]
    return {
        "apiVersion": CERTIFICATE.api_version,
        "kind": CERTIFICATE.kind,
        "metadata": metadata,
        "spec": {
            "secretName": tls.secret_name,
            "dnsNames": specs.common.tls_names(domain),
            "issuerRef": {"name": ref.name, "kind": ref.kind, "group": ref.group},
        },
    }


PENDING: Final = "TLSCertificatePending"  # the domain's refusal while the Secret is not issued yet


def refusal(missing: Refused, condition: Condition) -> Refused:
    """The domain's refusal when its TLS Secret is missing (`missing`) and the Certificate that fills it
    is not issued: why, in cert-manager's words or ours."""
    reason = PENDING if condition.reason == "Issuing" else condition.reason
    return Refused(reason, f"{missing.message}: {condition.message}")


def _reported(body: kube_types.MailDomain) -> bool:
    """Whether the domain's status speaks of a Certificate: its condition, or a refusal over one."""
    found = (body.get("status") or {}).get("conditions")
    degraded = conditions.find(found, "Degraded") or {}
    return conditions.find(found, TYPE) is not None or degraded.get("reason") in (
        PENDING, "CertManagerMissing", "CertificateConflict"
    )  # fmt: skip


def _ours(existing: dict[str, Any], body: kube_types.MailDomain) -> bool:
    uid = body["metadata"].get("uid")
    owners = (existing.get("metadata") or {}).get("ownerReferences") or []
    return any(o.get("uid") == uid and o.get("controller") for o in owners)


async def ensure(ctx: Context, body: kube_types.MailDomain, domain: api.MailDomain) -> Condition | None:
    """Make the Certificate as the spec asks (or remove the one made for an issuerRef since removed):
    the domain's Certificate condition, None without issuerRef. Raises k8s.ApiError (the queue retries)."""
    namespace, name = specs.common.namespace(domain), specs.common.certificate_name(domain)
    tls = domain.spec.tls
    if tls is None or tls.issuer_ref is None:
        # Only a domain that reported a Certificate may have one: the others cost no request here.
        if _reported(body):
            existing = (
                await ctx.client.get(CERTIFICATE, namespace, name) if await ctx.client.serves(CERTIFICATE) else None
            )
            if existing is not None and _ours(existing, body):
                await ctx.client.delete(CERTIFICATE, namespace, name)
                await ctx.recorder.event(
                    body, "Deleted", f"deleted Certificate {name}: spec.tls.issuerRef is unset", at=conditions.now()
                )
        return None
    if not await ctx.client.serves(CERTIFICATE):
        return Condition(
            TYPE,
            "False",
            "CertManagerMissing",
            f"spec.tls.issuerRef is set, but this cluster does not serve cert-manager.io/v1 Certificates: install "
            f"cert-manager, or unset issuerRef and provide Secret {tls.secret_name} (spec.tls.secretName) yourself",
        )
    existing = await ctx.client.get(CERTIFICATE, namespace, name)
    if existing is not None and not _ours(existing, body):
        return Condition(
            TYPE,
            "False",
            "CertificateConflict",
            f"Certificate {name} exists and is not this MailDomain's: left as it is; delete it, and the operator "
            "makes its own",
        )
    applied, current = await k8s.apply(ctx.client, desired(domain))
    if applied is not k8s.Applied.UNCHANGED:
        ctx.metrics.applied.labels(CERTIFICATE.kind, applied.value).inc()
        reason = "Created" if applied is k8s.Applied.CREATED else "Updated"
        await ctx.recorder.event(body, reason, f"{reason.lower()} Certificate {name}", at=conditions.now())
    ready = conditions.find((current.get("status") or {}).get("conditions"), "Ready")
    ref = tls.issuer_ref
    if ready is not None and ready.get("status") == "True":
        return Condition(
            TYPE, "True", "Issued", f"Certificate {name} is ready in Secret {tls.secret_name} ({ref.kind} {ref.name})"
        )
    waiting = str((ready or {}).get("message") or "waiting for cert-manager to issue it")
    return Condition(TYPE, "False", "Issuing", f"Certificate {name} ({ref.kind} {ref.name}): {waiting}")
