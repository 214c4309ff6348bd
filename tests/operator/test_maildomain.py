"""The operator builds a MailDomain into its objects, reports status, follows spec changes and repairs
drift: kopf running for real against the emulated API server (see conftest.py)."""

from __future__ import annotations

import base64
from typing import Any

import argon2
import yaml

from mailfleet import k8s, keys
from tests.conftest import cheap_hash
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
    run_operator,
    secret,
    settled,
    status_of,
)

OWNED = [
    ("v1", "ServiceAccount", "example-com"),
    ("v1", "ConfigMap", "example-com-config"),
    ("v1", "Secret", "example-com-directory"),
    ("v1", "Secret", "example-com-dkim"),
    ("v1", "Secret", "example-com-internal"),
    ("v1", "Service", "example-com-headless"),
    ("v1", "Service", "example-com"),
    ("networking.k8s.io/v1", "NetworkPolicy", "example-com"),
    ("policy/v1", "PodDisruptionBudget", "example-com"),
    ("apps/v1", "StatefulSet", "example-com"),
]


async def test_a_maildomain_becomes_its_objects_with_status_and_events(operator, client):
    await client.create(secret("alice-password", password="alice-pw"))
    await client.create(mailbox("alice", "alice@example.com", quota="1Gi", aliases=["info@example.com"]))
    domain = await client.create(maildomain())

    served = await eventually(lambda: status_of(client, MAILBOX, "alice", status="True", reason="Served"))
    assert condition(served, "Ready")["observedGeneration"] == 1
    for api_version, kind, name in OWNED:
        obj = await eventually(lambda: client.get(k8s.kind_of(api_version, kind), NAMESPACE, name), what=name)  # noqa: B023
        assert obj["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "mailfleet.io/v1alpha1",
                "kind": "MailDomain",
                "name": "example-com",
                "uid": domain["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ], f"{kind} {name}"
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "mailfleet-operator"
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == "example-com"

    entry = (await directory(client))["alice@example.com"]
    assert argon2.PasswordHasher().verify(entry["password_hash"], "alice-pw")  # hashed by the operator
    assert entry["quota"] == 1024**3 and entry["aliases"] == ["info@example.com"]

    status = (await client.get(MAILDOMAIN, NAMESPACE, "example-com"))["status"]
    assert status["observedGeneration"] == 1 and status["mailboxes"] == 1 and status["readyReplicas"] == 0
    assert {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]} == {
        "Ready": ("False", "NodesNotReady"),
        "Progressing": ("True", "RollingOut"),
        "Degraded": ("False", "Reconciled"),
    }
    dkim = await client.get(SECRET, NAMESPACE, "example-com-dkim")
    key = k8s.secret_values(dkim)["private.pem"].decode()
    assert {(r["type"], r["name"], r["value"]) for r in status["dnsRecords"]} == {
        ("MX", "example.com", "10 mail.example.com."),
        ("TXT", "example.com", "v=spf1 mx -all"),
        ("TXT", "_dmarc.example.com", "v=DMARC1; p=quarantine"),
        ("TXT", "mail._domainkey.example.com", keys.dkim_record(key)),
    }
    assert await events(client, "example-com", "DKIMKeyCreated")
    assert await events(client, "example-com", "DirectoryUpdated")
    created = {e["message"] for e in await events(client, "example-com", "Created")}
    assert "created StatefulSet example-com" in created and "created ConfigMap example-com-config" in created
    assert await eventually(lambda: events(client, "alice", "Served"))


async def test_ready_follows_the_statefulset(operator, client):
    await client.create(maildomain())
    await eventually(lambda: client.get(STATEFULSET, NAMESPACE, "example-com"))
    # What the StatefulSet controller reports once the pod is up and ready.
    await client.patch(
        STATEFULSET,
        NAMESPACE,
        "example-com",
        {
            "status": {
                "replicas": 1,
                "readyReplicas": 1,
                "updatedReplicas": 1,
                "currentRevision": "example-com-1",
                "updateRevision": "example-com-1",
            }
        },
        subresource="status",
    )
    ready = await eventually(lambda: status_of(client, MAILDOMAIN, "example-com", status="True", reason="NodesReady"))
    assert ready["status"]["readyReplicas"] == 1
    assert condition(ready, "Progressing")["status"] == "False"
    assert condition(ready, "Ready")["message"] == "1/1 mail nodes ready"


async def test_a_spec_change_updates_the_config_and_rolls_the_pods(operator, client):
    await client.create(maildomain(smtp={"maxMessageSize": "10Mi"}))
    before = await eventually(lambda: client.get(STATEFULSET, NAMESPACE, "example-com"))
    annotation = "mailfleet.io/config-checksum"
    checksum = before["spec"]["template"]["metadata"]["annotations"][annotation]

    await client.patch(MAILDOMAIN, NAMESPACE, "example-com", {"spec": {"smtp": {"maxMessageSize": "30Mi"}}})

    async def rolled() -> dict[str, Any] | None:
        obj = await client.get(STATEFULSET, NAMESPACE, "example-com")
        return obj if obj["spec"]["template"]["metadata"]["annotations"][annotation] != checksum else None

    await eventually(rolled, what="a new config checksum on the pod template")
    config = await client.get(CONFIGMAP, NAMESPACE, "example-com-config")
    assert yaml.safe_load(config["data"]["node.yaml"])["smtp"]["max_message_size"] == 30 * 1024**2
    domain = await eventually(
        lambda: status_of(client, MAILDOMAIN, "example-com", "Degraded", status="False", observedGeneration=2)
    )
    assert domain["status"]["observedGeneration"] == 2
    assert await eventually(lambda: events(client, "example-com", "Updated"))


async def test_the_internal_token_is_made_once_and_kept(operator, client):
    await client.create(maildomain())
    made = await eventually(lambda: client.get(SECRET, NAMESPACE, "example-com-internal"), what="the internal Secret")
    token = k8s.secret_values(made)["token"]
    assert len(base64.urlsafe_b64decode(token + b"=")) == 32  # 32 random bytes
    config = await client.get(CONFIGMAP, NAMESPACE, "example-com-config")
    assert yaml.safe_load(config["data"]["node.yaml"])["internal"] == {"token_file": "/etc/mailnode/internal/token"}
    sts = await eventually(lambda: client.get(STATEFULSET, NAMESPACE, "example-com"))
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volumes["internal"]["secret"] == {"secretName": "example-com-internal"}

    await client.patch(MAILDOMAIN, NAMESPACE, "example-com", {"spec": {"smtp": {"maxMessageSize": "30Mi"}}})
    await eventually(
        lambda: status_of(client, MAILDOMAIN, "example-com", "Degraded", status="False", observedGeneration=2)
    )
    assert k8s.secret_values(await client.get(SECRET, NAMESPACE, "example-com-internal"))["token"] == token


async def test_a_token_already_in_the_secret_is_kept(operator, client):
    await client.create(secret("example-com-internal", token="chosen-by-the-admin"))
    domain = await client.create(maildomain())

    async def owned() -> dict[str, Any] | None:
        found = await client.get(SECRET, NAMESPACE, "example-com-internal")
        return found if (found or {}).get("metadata", {}).get("ownerReferences") else None

    adopted = await eventually(owned, what="the internal Secret owned by its MailDomain")
    assert adopted["metadata"]["ownerReferences"][0]["uid"] == domain["metadata"]["uid"]
    assert k8s.secret_values(adopted)["token"] == b"chosen-by-the-admin"


async def test_drift_is_repaired(operator, client):
    await client.create(maildomain())
    original = await eventually(lambda: client.get(STATEFULSET, NAMESPACE, "example-com"))
    config = await client.get(CONFIGMAP, NAMESPACE, "example-com-config")

    # Behind the operator's back: the ConfigMap deleted, the image and the directory edited.
    await client.delete(CONFIGMAP, NAMESPACE, "example-com-config")
    template = original["spec"]["template"]
    tampered = [dict(template["spec"]["containers"][0], image="evil:latest")]
    await client.patch(
        STATEFULSET, NAMESPACE, "example-com", {"spec": {"template": {"spec": {"containers": tampered}}}}
    )
    await client.patch(SECRET, NAMESPACE, "example-com-directory", {"data": {"directory.yaml": "bWFpbGJveGVzOiBbXQo="}})

    async def repaired() -> bool:
        sts = await client.get(STATEFULSET, NAMESPACE, "example-com")
        cm = await client.get(CONFIGMAP, NAMESPACE, "example-com-config")
        secret = await client.get(SECRET, NAMESPACE, "example-com-directory")
        return bool(
            cm is not None
            and cm["data"] == config["data"]
            and sts["spec"]["template"]["spec"]["containers"][0]["image"] == "mailfleet-test:1"
            and k8s.secret_values(secret)["directory.yaml"] == b"mailboxes: []\n"
        )

    await eventually(repaired, what="the ConfigMap, the image and the directory put back")
    expected = {
        "ConfigMap example-com-config was changed outside the operator; put back",
        "StatefulSet example-com was changed outside the operator; put back",
    }

    async def reported() -> bool:
        return expected <= {e["message"] for e in await events(client, "example-com", "Repaired")}

    await eventually(reported, what=f"Repaired Events: {expected}")


async def test_a_deleted_domain_leaves_its_mailboxes_without_one(operator, client):
    await client.create(secret("alice-password", password="alice-pw"))
    await client.create(mailbox("alice", "alice@example.com"))
    await client.create(maildomain())
    await eventually(lambda: status_of(client, MAILBOX, "alice", status="True"))

    await client.delete(MAILDOMAIN, NAMESPACE, "example-com")

    gone = await eventually(lambda: status_of(client, MAILBOX, "alice", status="False", reason="DomainNotFound"))
    assert "no MailDomain in namespace mail serves example.com" in condition(gone, "Ready")["message"]


async def test_a_restarted_operator_rewrites_nothing(api, client):
    """Everything is as built: a new operator process reconciles it all and writes nothing, though it
    has never seen the plaintext passwords (the directory's hashes still verify them, so they stay)."""
    await client.create(secret("alice-password", password=cheap_hash("alice-pw")))
    await client.create(mailbox("alice", "alice@example.com", aliases=["info@example.com"]))
    await client.create(secret("bob-password", password="bob-pw", phone="bob-phone-pw"))
    phone = [{"name": "phone", "secretRef": {"name": "bob-password", "key": "phone"}}]
    await client.create(mailbox("bob", "bob@example.com", appPasswords=phone))
    await client.create(maildomain())
    async with run_operator() as operator:
        await eventually(lambda: status_of(client, MAILBOX, "alice", status="True", reason="Served"))
        await eventually(lambda: status_of(client, MAILBOX, "bob", status="True", reason="Served"))
        await eventually(lambda: status_of(client, MAILDOMAIN, "example-com", "Degraded", status="False"))
        await settled(operator)
    before = len(api.writes)
    built = await directory(client)

    async with run_operator() as operator:
        await settled(operator)
    assert api.writes[before:] == []
    assert await directory(client) == built
