"""Every bad input gets a condition and an Event that say exactly what is wrong, nothing half-built is
left behind, and fixing the input is enough for the operator to carry on."""

from __future__ import annotations

import base64
from typing import Any

from mailfleet import k8s
from tests.operator.conftest import (
    CONFIGMAP,
    MAILBOX,
    MAILDOMAIN,
    NAMESPACE,
    SECRET,
    STATEFULSET,
    condition,
    directory,
    events,
    eventually,
    mailbox,
    maildomain,
    secret,
    status_of,
)

BUILT = [
    ("v1", "ServiceAccount", "example-com"),
    ("v1", "ConfigMap", "example-com-config"),
    ("v1", "Secret", "example-com-directory"),
    ("v1", "Secret", "example-com-dkim"),
    ("v1", "Service", "example-com"),
    ("apps/v1", "StatefulSet", "example-com"),
]


async def _nothing_built(client: k8s.Client) -> None:
    for api_version, kind, name in BUILT:
        assert await client.get(k8s.kind_of(api_version, kind), NAMESPACE, name) is None, f"{kind} {name} was built"


async def _refused(client: k8s.Client, reason: str) -> dict[str, Any]:
    domain = await eventually(
        lambda: status_of(client, MAILDOMAIN, "example-com", "Degraded", status="True", reason=reason)
    )
    assert condition(domain, "Ready")["status"] == "False"
    assert condition(domain, "Ready")["reason"] == reason
    warnings = await eventually(lambda: events(client, "example-com", reason))
    assert [e["type"] for e in warnings] == ["Warning"]
    assert warnings[0]["message"] == condition(domain, "Degraded")["message"]
    return domain


async def test_more_than_sixteen_replicas_is_refused_until_fixed(operator, client):
    await client.create(secret("alice-password", password="alice-pw"))
    await client.create(mailbox("alice", "alice@example.com"))
    await client.create(maildomain(replicas=17))  # the emulator does not check the CRD's schema: the operator does

    domain = await _refused(client, "InvalidSpec")
    assert "spec.replicas" in condition(domain, "Degraded")["message"]
    assert "16" in condition(domain, "Degraded")["message"]
    await _nothing_built(client)
    alice = await eventually(lambda: status_of(client, MAILBOX, "alice", status="False", reason="DomainNotReady"))
    assert "spec.replicas" in condition(alice, "Ready")["message"]

    await client.patch(MAILDOMAIN, NAMESPACE, "example-com", {"spec": {"replicas": 3}})
    await eventually(lambda: client.get(STATEFULSET, NAMESPACE, "example-com"), what="the StatefulSet, once fixed")
    await eventually(lambda: status_of(client, MAILDOMAIN, "example-com", "Degraded", status="False"))
    await eventually(lambda: status_of(client, MAILBOX, "alice", status="True", reason="Served"))


async def test_a_missing_tls_secret_is_named_and_waited_for(operator, client):
    await client.create(maildomain(tls={"secretName": "mail-tls"}))
    domain = await _refused(client, "TLSSecretNotFound")
    assert condition(domain, "Degraded")["message"] == (
        "Secret mail-tls (spec.tls.secretName) does not exist in namespace mail"
    )
    await _nothing_built(client)

    # A Secret without the certificate is refused for that reason; the right one lets the domain build.
    await client.create(secret("mail-tls", **{"tls.key": "key"}))
    domain = await _refused(client, "TLSSecretInvalid")
    assert condition(domain, "Degraded")["message"] == "Secret mail-tls (spec.tls.secretName) has no tls.crt"
    await client.patch(SECRET, NAMESPACE, "mail-tls", {"data": {"tls.crt": "Y2VydA=="}})
    await eventually(lambda: client.get(STATEFULSET, NAMESPACE, "example-com"), what="the StatefulSet")


async def test_a_missing_relay_secret_is_named(operator, client):
    await client.create(maildomain(smtp={"relayHost": "[smtp.relay.test]:587", "relaySecretRef": {"name": "relay"}}))
    domain = await _refused(client, "RelaySecretNotFound")
    assert condition(domain, "Degraded")["message"] == (
        "Secret relay (spec.smtp.relaySecretRef) does not exist in namespace mail"
    )
    await _nothing_built(client)


async def test_a_missing_relay_ca_secret_is_named_and_waited_for(operator, client, ca):
    relay = {"relayHost": "[relay.mail.svc]:587", "relayCASecretRef": {"name": "relay-ca"}}
    await client.create(maildomain(smtp=relay))
    domain = await _refused(client, "RelayCASecretNotFound")
    assert condition(domain, "Degraded")["message"] == (
        "Secret relay-ca (spec.smtp.relayCASecretRef) does not exist in namespace mail"
    )
    await _nothing_built(client)

    # A Secret without a certificate under the key is refused for that reason; the right one builds.
    await client.create(secret("relay-ca", **{"ca.crt": "not a certificate"}))
    domain = await _refused(client, "RelayCASecretInvalid")
    assert condition(domain, "Degraded")["message"] == (
        "Secret relay-ca (spec.smtp.relayCASecretRef) has no PEM certificate under the key ca.crt"
    )
    await _nothing_built(client)
    pem = ca.cert_pem.bytes()
    await client.patch(SECRET, NAMESPACE, "relay-ca", {"data": {"ca.crt": base64.b64encode(pem).decode()}})
    statefulset = await eventually(lambda: client.get(STATEFULSET, NAMESPACE, "example-com"), what="the StatefulSet")
    volumes = statefulset["spec"]["template"]["spec"]["volumes"]
    assert {
        "name": "relay-ca",
        "secret": {"secretName": "relay-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]},
    } in volumes
    config = await client.get(CONFIGMAP, NAMESPACE, "example-com-config")
    assert "ca_file: /etc/mailnode/relay-ca/ca.crt" in config["data"]["node.yaml"]


async def test_an_invalid_spec_is_refused_with_the_field(operator, client):
    # The CRD's schema refuses this on a real API server; the operator does not count on it.
    await client.create(maildomain(storage={"size": "a lot"}))
    domain = await _refused(client, "InvalidSpec")
    assert "spec.storage.size" in condition(domain, "Degraded")["message"]
    await _nothing_built(client)


async def test_a_storage_change_kubernetes_would_refuse_changes_nothing(operator, client):
    await client.create(maildomain(storage={"size": "5Gi"}))
    await eventually(lambda: client.get(STATEFULSET, NAMESPACE, "example-com"))
    config = await client.get(CONFIGMAP, NAMESPACE, "example-com-config")

    await client.patch(
        MAILDOMAIN, NAMESPACE, "example-com", {"spec": {"storage": {"size": "50Gi"}, "smtp": {"maxMessageSize": "1Mi"}}}
    )
    domain = await _refused(client, "ImmutableFieldChanged")
    assert condition(domain, "Degraded")["message"].startswith(
        "StatefulSet example-com: spec.volumeClaimTemplates cannot change in place"
    )
    # Nothing else of the change was applied either.
    assert (await client.get(CONFIGMAP, NAMESPACE, "example-com-config"))["data"] == config["data"]


async def test_a_mailbox_of_no_domain_waits_for_one(operator, client):
    await client.create(secret("alice-password", password="alice-pw"))
    await client.create(mailbox("alice", "alice@example.com"))
    alice = await eventually(lambda: status_of(client, MAILBOX, "alice", status="False", reason="DomainNotFound"))
    assert condition(alice, "Ready")["message"] == (
        "no MailDomain in namespace mail serves example.com (as spec.domain or spec.aliasDomains)"
    )
    warned = await eventually(lambda: events(client, "alice", "DomainNotFound"))
    assert [e["type"] for e in warned] == ["Warning"]

    await client.create(maildomain())
    await eventually(lambda: status_of(client, MAILBOX, "alice", status="True", reason="Served"))
    assert "alice@example.com" in await directory(client)


async def test_mailbox_problems_keep_only_that_mailbox_out(operator, client):
    await client.create(maildomain())
    await client.create(secret("good-password", password="pw", other="pw2"))
    cases = {
        "no-secret": (
            mailbox("no-secret", "a@example.com"),
            "SecretNotFound",
            "Secret no-secret-password (spec.passwordSecretRef) does not exist",
        ),
        "no-key": (
            mailbox("no-key", "b@example.com", passwordSecretRef={"name": "good-password", "key": "missing"}),
            "SecretKeyNotFound",
            "Secret good-password (spec.passwordSecretRef) has no key missing",
        ),
        "app-no-secret": (
            mailbox(
                "app-no-secret",
                "c@example.com",
                passwordSecretRef={"name": "good-password"},
                appPasswords=[{"name": "phone", "secretRef": {"name": "phone-password"}}],
            ),
            "SecretNotFound",
            "Secret phone-password (spec.appPasswords[phone].secretRef) does not exist",
        ),
        "foreign-alias": (
            mailbox(
                "foreign-alias", "d@example.com", passwordSecretRef={"name": "good-password"}, aliases=["d@other.test"]
            ),
            "AliasNotServed",
            "alias d@other.test: MailDomain example-com does not serve other.test (add it to its spec.aliasDomains)",
        ),
        "bad-quota": (
            mailbox("bad-quota", "e@example.com", passwordSecretRef={"name": "good-password"}, quota="lots"),
            "InvalidSpec",
            "spec.quota",
        ),
    }
    await client.create(mailbox("good", "good@example.com", passwordSecretRef={"name": "good-password"}))
    for body, _, _ in cases.values():
        await client.create(body)
    # Claiming the address of a Mailbox already served: the one served keeps it.
    await eventually(lambda: status_of(client, MAILBOX, "good", status="True", reason="Served"))
    await client.create(
        mailbox(
            "copycat",
            "x@example.com",
            passwordSecretRef={"name": "good-password", "key": "other"},
            aliases=["good@example.com"],
        )
    )

    for name, (_, reason, message) in cases.items():
        found = await eventually(lambda: status_of(client, MAILBOX, name, status="False", reason=reason), what=name)  # noqa: B023
        assert message in condition(found, "Ready")["message"], name
        warned = await eventually(lambda: events(client, name, reason), what=f"{reason} Event of {name}")  # noqa: B023
        assert [e["type"] for e in warned] == ["Warning"], name
    copycat = await eventually(lambda: status_of(client, MAILBOX, "copycat", status="False", reason="AddressConflict"))
    assert condition(copycat, "Ready")["message"] == "good@example.com is already an address or alias of Mailbox good"
    await eventually(lambda: status_of(client, MAILBOX, "good", status="True", reason="Served"))
    assert set(await directory(client)) == {"good@example.com"}

    # Creating the missing Secret is enough.
    await client.create(secret("no-secret-password", password="pw"))
    await eventually(lambda: status_of(client, MAILBOX, "no-secret", status="True", reason="Served"))
    assert set(await directory(client)) == {"good@example.com", "a@example.com"}
