"""The cert-manager Certificate of a MailDomain with spec.tls.issuerRef (reconcile/certificate.py), with
kopf running against the emulated API server: serving cert-manager.io/v1 Certificates (the CRD, no
cert-manager controller: the test plays it, writing the Certificate's status and the Secret), or not.

Aspects: the Certificate is made owned by the domain, with the TLS Secret's name, every host name the
certificate must hold and the issuerRef copied; while it is not issued the domain waits, saying so, and
once cert-manager has written the Secret the domain is built and its Certificate condition is Issued; a
spec change (an alias domain, another issuer) updates it, and unsetting issuerRef deletes it and the
condition; without cert-manager the domain is built all the same (its Secret given), its condition
says what is missing, and with no Secret either the domain is refused with that message, never a failed
reconcile retried in a loop; a Certificate of the same name that the domain does not own is left alone.
"""

from __future__ import annotations

import base64
from typing import Any

import kmock

from mailfleet import k8s
from tests.operator.conftest import (
    MAILDOMAIN,
    NAMESPACE,
    STATEFULSET,
    condition,
    eventually,
    maildomain,
    settled,
    status_of,
)
from tests.operator.emulator import VERBS, ApiServer

CERTIFICATE = k8s.kind_of("cert-manager.io/v1", "Certificate")
NAME = "example-com-tls"  # the Certificate's: <MailDomain>-tls
TLS = {"secretName": "mail-tls", "issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer"}}
NAMES = ["mail.example.com", "autoconfig.example.com", "autodiscover.example.com", "mta-sts.example.com"]


def serve_certificates(api: ApiServer) -> None:
    """cert-manager's CRD installed (its controller is the test)."""
    api.resources["cert-manager.io/v1/certificates"] = kmock.ResourceInfo(
        kind="Certificate", namespaced=True, subresources={"status"}, verbs=VERBS
    )


def tls_secret() -> dict[str, Any]:
    """The Secret cert-manager writes."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "mail-tls", "namespace": NAMESPACE},
        "type": "kubernetes.io/tls",
        "data": {key: base64.b64encode(b"pem of " + key.encode()).decode() for key in ("tls.crt", "tls.key")},
    }


async def test_the_certificate_is_made_issued_followed_and_removed(api, operator, client):
    serve_certificates(api)
    domain = await client.create(maildomain(tls=TLS))

    made = await eventually(lambda: client.get(CERTIFICATE, NAMESPACE, NAME), what="the Certificate")
    assert made["spec"] == {
        "secretName": "mail-tls",
        "dnsNames": NAMES,
        "issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer", "group": "cert-manager.io"},
    }
    [owner] = made["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("MailDomain", domain["metadata"]["uid"], True)
    # Not issued yet: the domain waits for its Secret and says why.
    waiting = await eventually(
        lambda: status_of(client, MAILDOMAIN, "example-com", "Degraded", reason="TLSCertificatePending")
    )
    assert "Secret mail-tls" in condition(waiting, "Degraded")["message"]
    assert f"Certificate {NAME}" in condition(waiting, "Degraded")["message"]
    assert await client.get(STATEFULSET, NAMESPACE, "example-com") is None

    # cert-manager issues it: the Certificate Ready, then the Secret (whose arrival reconciles the domain).
    ready = {"type": "Ready", "status": "True", "reason": "Ready", "message": "Certificate is up to date"}
    await client.patch(CERTIFICATE, NAMESPACE, NAME, {"status": {"conditions": [ready]}}, subresource="status")
    await client.create(tls_secret())
    issued = await eventually(
        lambda: status_of(client, MAILDOMAIN, "example-com", "Certificate", status="True", reason="Issued")
    )
    assert condition(issued, "Degraded")["status"] == "False"
    assert await eventually(lambda: client.get(STATEFULSET, NAMESPACE, "example-com"))

    # An alias domain and another issuer: the Certificate follows.
    await client.patch(
        MAILDOMAIN,
        NAMESPACE,
        "example-com",
        {"spec": {"aliasDomains": ["example.net"], "tls": {"issuerRef": {"name": "internal-ca", "kind": "Issuer"}}}},
    )

    async def updated() -> dict[str, Any] | None:
        found = await client.get(CERTIFICATE, NAMESPACE, NAME)
        return found if found and found["spec"]["issuerRef"]["name"] == "internal-ca" else None

    changed = await eventually(updated, what="the Certificate updated")
    assert changed["spec"]["dnsNames"] == [
        *NAMES, "autoconfig.example.net", "autodiscover.example.net", "mta-sts.example.net",
    ]  # fmt: skip
    assert changed["spec"]["issuerRef"] == {"name": "internal-ca", "kind": "Issuer", "group": "cert-manager.io"}

    # issuerRef unset: the Secret is the user's from now on; the Certificate goes, and its condition.
    await client.patch(MAILDOMAIN, NAMESPACE, "example-com", {"spec": {"tls": {"issuerRef": None}}})

    async def gone() -> bool:
        body = await client.get(MAILDOMAIN, NAMESPACE, "example-com")
        return await client.get(CERTIFICATE, NAMESPACE, NAME) is None and not condition(body, "Certificate")

    await eventually(gone, what="the Certificate deleted and its condition gone")
    await settled(operator)


async def test_without_cert_manager_the_domain_says_so_and_is_built_all_the_same(operator, client):
    await client.create(tls_secret())  # given by the user
    await client.create(maildomain(tls=TLS))
    missing = await eventually(
        lambda: status_of(client, MAILDOMAIN, "example-com", "Certificate", status="False", reason="CertManagerMissing")
    )
    assert "does not serve cert-manager.io/v1 Certificates" in condition(missing, "Certificate")["message"]
    assert condition(missing, "Degraded")["status"] == "False"
    assert await client.get(STATEFULSET, NAMESPACE, "example-com")
    await settled(operator)
    state = operator.running()
    assert state.ctx.metrics.reconciles.labels("MailDomain", "error")._value.get() == 0  # no retry loop


async def test_without_cert_manager_nor_a_secret_the_domain_is_refused_saying_why(operator, client):
    await client.create(maildomain(tls=TLS))
    refused = await eventually(
        lambda: status_of(client, MAILDOMAIN, "example-com", "Degraded", status="True", reason="CertManagerMissing")
    )
    message = condition(refused, "Degraded")["message"]
    assert "Secret mail-tls" in message and "install cert-manager" in message
    reconciles = operator.running().ctx.metrics.reconciles

    async def quiet() -> bool:  # refused (not failed, which the queue would retry), and nothing queued
        return reconciles.labels("MailDomain", "refused")._value.get() > 0 and not operator.running().queue

    await eventually(quiet, what="a refused reconcile and an empty queue")
    assert reconciles.labels("MailDomain", "error")._value.get() == 0


async def test_a_certificate_the_domain_does_not_own_is_left_alone(api, operator, client):
    serve_certificates(api)
    theirs = {
        "apiVersion": "cert-manager.io/v1",
        "kind": "Certificate",
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "spec": {"secretName": "other", "dnsNames": ["other.example.org"], "issuerRef": {"name": "x"}},
    }
    await client.create(theirs)
    await client.create(tls_secret())
    await client.create(maildomain(tls=TLS))
    conflict = await eventually(
        lambda: status_of(client, MAILDOMAIN, "example-com", "Certificate", reason="CertificateConflict")
    )
    assert condition(conflict, "Certificate")["status"] == "False"
    await settled(operator)
    assert (await client.get(CERTIFICATE, NAMESPACE, NAME))["spec"] == theirs["spec"]
