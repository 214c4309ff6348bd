"""The resource models (mailfleet.api): the examples parse, defaults are filled in, YAML is camelCase,
bad input is refused with a message naming the field, quantities have the value Kubernetes gives them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from mailfleet import api

EXAMPLES = Path(__file__).parents[2] / "examples"
KINDS: dict[str, type[api.Resource]] = {resource.kind_name: resource for resource in api.RESOURCES}


def load_examples(*names: str) -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for name in names:
        documents.extend(document for document in yaml.safe_load_all((EXAMPLES / name).read_text()) if document)
    return documents


def resources(documents: list[dict[str, Any]]) -> list[api.Resource]:
    return [KINDS[doc["kind"]].model_validate(doc) for doc in documents if doc["apiVersion"] == api.API_VERSION]


def test_the_example_domain_parses() -> None:
    (domain,) = resources(load_examples("maildomain.yaml"))
    assert isinstance(domain, api.MailDomain)
    assert domain.metadata.name == "example-com"
    assert domain.spec.domain == "example.com"
    assert domain.spec.alias_domains == ["example.net"]
    assert domain.spec.replicas == 1
    assert domain.spec.tls is not None and domain.spec.tls.secret_name == "mail-example-com-tls"
    assert domain.spec.resources.requests == {"cpu": "100m", "memory": "128Mi"}
    assert domain.spec.backup is not None and domain.spec.backup.schedule == "0 3 * * *"


def test_the_example_mailboxes_parse_and_their_secrets_hold_the_keys_they_name() -> None:
    documents = load_examples("mailboxes.yaml")
    secrets = {doc["metadata"]["name"]: doc["stringData"] for doc in documents if doc["kind"] == "Secret"}
    mailboxes = resources(documents)
    assert [mailbox.spec.address for mailbox in mailboxes if isinstance(mailbox, api.Mailbox)] == [
        "alice@example.com",
        "bob@example.com",
    ]
    for mailbox in mailboxes:
        assert isinstance(mailbox, api.Mailbox)
        refs = [mailbox.spec.password_secret_ref] + [app.secret_ref for app in mailbox.spec.app_passwords]
        for ref in refs:
            assert ref.key in secrets[ref.name], f"{mailbox.metadata.name}: Secret {ref.name} has no key {ref.key}"


def test_the_example_mailboxes_belong_to_the_example_domain() -> None:
    (domain,) = resources(load_examples("maildomain.yaml"))
    assert isinstance(domain, api.MailDomain)
    served = {domain.spec.domain, *domain.spec.alias_domains}
    for mailbox in resources(load_examples("mailboxes.yaml")):
        assert isinstance(mailbox, api.Mailbox)
        assert mailbox.spec.address.partition("@")[2] in served


def test_a_minimal_domain_gets_the_defaults() -> None:
    spec = api.MailDomainSpec.model_validate({"domain": "example.com"})
    assert spec.replicas == 1
    assert spec.storage.size == "1Gi"
    assert spec.service.type == "LoadBalancer"
    assert spec.service.external_traffic_policy == "Local"
    assert spec.smtp.max_message_size == "25Mi"
    assert spec.dkim.selector == "mail"
    assert spec.tls is None and spec.backup is None and spec.restore is None
    backup = api.BackupSpec.model_validate({"schedule": "@daily"})
    assert backup.method == "VolumeSnapshot"
    assert (backup.retention.keep_last, backup.retention.max_age) == (7, None)


def test_relay_tls_defaults_to_verified_starttls() -> None:
    smtp = api.SMTPSpec.model_validate({"relayHost": "[relay.mail.svc]:587", "relayCASecretRef": {"name": "ca"}})
    assert (smtp.relay_tls, smtp.relay_allow_plaintext) == ("starttls", False)
    assert smtp.relay_ca_secret_ref == api.CASecretKeySelector(name="ca", key="ca.crt")
    assert smtp.model_dump(by_alias=True, exclude_defaults=True) == {
        "relayHost": "[relay.mail.svc]:587",
        "relayCASecretRef": {"name": "ca"},
    }
    plaintext = api.SMTPSpec.model_validate({"relayTLS": "none", "relayAllowPlaintext": True})
    assert plaintext.relay_tls == "none"


@pytest.mark.parametrize(("text", "seconds"), [("30d", 2592000), ("36h", 129600), ("1d12h", 129600), ("90s", 90)])
def test_durations_are_read_in_seconds(text: str, seconds: int) -> None:
    assert api.duration_seconds(text) == seconds
    assert api.RetentionSpec.model_validate({"maxAge": text}).max_age == text


@pytest.mark.parametrize("text", ["30", "1w", "-1d", "1.5h", ""])
def test_a_bad_duration_is_refused(text: str) -> None:
    with pytest.raises(pydantic.ValidationError, match="is not a duration"):
        api.RetentionSpec.model_validate({"maxAge": text})


def test_a_minimal_mailbox_gets_the_defaults() -> None:
    spec = api.MailboxSpec.model_validate({"address": "a@example.com", "passwordSecretRef": {"name": "a"}})
    assert spec.password_secret_ref.key == "password"
    assert spec.quota is None
    assert not spec.suspended
    assert spec.aliases == spec.forward_to == []


def test_yaml_field_names_are_camel_case_and_python_names_work_too() -> None:
    by_python_name = api.MailDomainSpec(domain="example.com", alias_domains=["example.net"])
    by_yaml_name = api.MailDomainSpec.model_validate({"domain": "example.com", "aliasDomains": ["example.net"]})
    assert by_python_name == by_yaml_name
    dumped = by_python_name.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert dumped["aliasDomains"] == ["example.net"]
    assert dumped["service"]["externalTrafficPolicy"] == "Local"
    assert dumped["smtp"] == {"maxMessageSize": "25Mi", "relayTLS": "starttls", "relayAllowPlaintext": False}


def test_a_resource_round_trips_through_its_dump() -> None:
    (domain,) = resources(load_examples("maildomain.yaml"))
    dumped = domain.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert dumped["apiVersion"] == "mailfleet.io/v1alpha1"
    assert dumped["kind"] == "MailDomain"
    assert api.MailDomain.model_validate(dumped) == domain


def test_status_reads_what_the_operator_writes_and_ignores_what_it_does_not_know() -> None:
    status = api.MailDomainStatus.model_validate(
        {
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "AllReplicasReady", "message": "",
                 "observedGeneration": 3, "lastTransitionTime": "2026-01-02T03:04:05Z"}
            ],
            "observedGeneration": 3,
            "readyReplicas": 2,
            "dnsRecords": [{"type": "MX", "name": "example.com", "value": "10 mail.example.com."}],
            "kopf": {"progress": {}},
        }
    )  # fmt: skip
    assert status.conditions[0].status == "True"
    assert status.conditions[0].last_transition_time.year == 2026
    assert status.dns_records[0].type == "MX"


def _errors(model: type[pydantic.BaseModel], data: dict[str, Any]) -> str:
    with pytest.raises(pydantic.ValidationError) as raised:
        model.model_validate(data)
    return str(raised.value)


MAILBOX = {"address": "alice@example.com", "passwordSecretRef": {"name": "alice-password"}}


@pytest.mark.parametrize(
    ("model", "data", "field", "says"),
    [
        (api.MailboxSpec, {**MAILBOX, "address": "alice"}, "address", "not a lower-case mail address"),
        (api.MailboxSpec, {**MAILBOX, "address": "alice@@example.com"}, "address", "not a lower-case mail address"),
        (api.MailboxSpec, {**MAILBOX, "address": "Alice@Example.com"}, "address", "not a lower-case mail address"),
        (api.MailboxSpec, {**MAILBOX, "aliases": ["x@example.com", "x@example.com"]}, "aliases", "listed twice"),
        (api.MailboxSpec, {**MAILBOX, "quota": "lots"}, "quota", "not a Kubernetes quantity"),
        (api.MailboxSpec, {**MAILBOX, "quota": "1GiB"}, "quota", "not a Kubernetes quantity"),
        (api.MailboxSpec, {**MAILBOX, "quota": -1}, "quota", "negative"),
        (api.MailboxSpec, {"address": "alice@example.com"}, "passwordSecretRef", "Field required"),
        (
            api.MailboxSpec,
            {**MAILBOX, "appPasswords": [{"name": "a", "secretRef": {"name": "s"}}] * 2},
            "appPasswords",
            "app password 'a' is listed twice",
        ),
        (api.MailDomainSpec, {"domain": "example.com", "replicas": 0}, "replicas", "greater than or equal to 1"),
        (api.MailDomainSpec, {"domain": "example"}, "domain", "not a lower-case DNS domain name"),
        (api.MailDomainSpec, {"domain": "-x.example.com"}, "domain", "not a lower-case DNS domain name"),
        (api.MailDomainSpec, {"domain": "example.com", "replica": 2}, "replica", "Extra inputs are not permitted"),
        (
            api.MailDomainSpec,
            {"domain": "example.com", "service": {"type": "Ingress"}},
            "service.type",
            "'LoadBalancer'",
        ),
        (
            api.MailDomainSpec,
            {"domain": "example.com", "backup": {"schedule": "nightly"}},
            "backup.schedule",
            "not a cron schedule",
        ),
        (
            api.MailDomainSpec,
            {"domain": "example.com", "backup": {"schedule": "@daily", "method": "Rsync"}},
            "backup.method",
            "'VolumeSnapshot' or 'Archive'",
        ),
        (
            api.MailBackupSpec,
            {"domainRef": "example-com", "method": "Tarball"},
            "method",
            "'VolumeSnapshot' or 'Archive'",
        ),
        (
            api.MailDomainSpec,
            {"domain": "example.com", "smtp": {"relayHost": "relay.test", "relayTLS": "tls"}},
            "smtp.relayTLS",
            "'starttls', 'implicit', 'starttls-unverified' or 'none'",
        ),
        (
            api.MailDomainSpec,
            {"domain": "example.com", "smtp": {"relayHost": "relay.test", "relayTLS": "none"}},
            "smtp",
            "set relayAllowPlaintext: true to allow it",
        ),
        (
            api.MailDomainSpec,
            {"domain": "example.com", "smtp": {"relayTLS": "starttls-unverified", "relayCASecretRef": {"name": "c"}}},
            "smtp",
            "relayCASecretRef is used only by relayTLS starttls or implicit",
        ),
        (
            api.MailDomainSpec,
            {"domain": "example.com", "smtp": {"relayCASecretRef": {"name": "c", "key": "a/b"}}},
            "smtp.relayCASecretRef.key",
            "not a Secret key",
        ),
        (api.MailBackupSpec, {"method": "Archive"}, "domainRef", "Field required"),
        (api.MailBackupStatus, {"phase": "Done"}, "phase", "'Pending', 'Running', 'Completed' or 'Failed'"),
    ],
)
def test_bad_input_is_refused_naming_the_field(
    model: type[pydantic.BaseModel], data: dict[str, Any], field: str, says: str
) -> None:
    message = _errors(model, data)
    assert f"\n{field}\n" in message or message.splitlines()[1].startswith(field), message
    assert says in message


def test_a_whole_resource_names_the_field_by_its_path() -> None:
    message = _errors(
        api.MailDomain,
        {"kind": "MailDomain", "metadata": {"name": "x"}, "spec": {"domain": "example.com", "replicas": 0}},
    )
    assert "spec.replicas" in message


def test_a_resource_of_another_kind_is_refused() -> None:
    message = _errors(api.Mailbox, {"kind": "MailDomain", "metadata": {"name": "x"}, "spec": MAILBOX})
    assert "kind" in message


@pytest.mark.parametrize(
    ("quantity", "value"),
    [(1024, 1024), ("1024", 1024), ("1Gi", 2**30), ("25Mi", 25 * 2**20), ("1.5k", 1500), ("500M", 500 * 10**6),
     ("100m", 1), ("1e3", 1000), ("0.5Ki", 512), ("1E", 10**18)],
)  # fmt: skip
def test_quantities_have_their_kubernetes_value(quantity: int | str, value: int) -> None:
    assert api.quantity_value(quantity) == value


@pytest.mark.parametrize("quantity", ["", "1GiB", "-1Gi", "1 Gi", "Gi"])
def test_quantity_value_refuses_what_is_not_a_quantity(quantity: str) -> None:
    with pytest.raises(ValueError, match="quantity"):
        api.quantity_value(quantity)
