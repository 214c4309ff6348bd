"""The pure builders of mailfleet.specs and `mailfleet render`: the node config and directory they make are
accepted by the node's own models (mailnode.config); plaintext passwords are refused; the StatefulSet's
security settings, probes, ports, volume claim and checksum; the Service's port mapping and traffic
policy rule; names and labels on every object; owner references; DNS records; the `render` command on the
examples and its errors. Validation against the Kubernetes OpenAPI schemas is a later step."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import argon2
import pydantic
import pytest
import yaml

from mailfleet import api, specs
from mailnode import config
from tests.conftest import cheap_hash
from tests.unit.test_api import load_examples

ROOT = Path(__file__).parents[2]
EXAMPLES = ROOT / "examples"
LABELS = {
    "app.kubernetes.io/name": "mailnode",
    "app.kubernetes.io/instance": "example-com",
    "app.kubernetes.io/component": "mail-node",
    "app.kubernetes.io/part-of": "mailfleet",
    "app.kubernetes.io/managed-by": "mailfleet-operator",
}


def example_domain(**spec: Any) -> api.MailDomain:
    (document,) = load_examples("maildomain.yaml")
    document["spec"].update(spec)
    document["metadata"]["namespace"] = "mail"
    document["metadata"]["uid"] = "0b7e-uid"
    return api.MailDomain.model_validate(document)


def example_mailboxes() -> list[api.Mailbox]:
    return [api.Mailbox.model_validate(d) for d in load_examples("mailboxes.yaml") if d["kind"] == "Mailbox"]


HASHES = {
    "alice-password/password": cheap_hash("alice-demo-password"),
    "bob-password/password": cheap_hash("bob-demo-password"),
    "bob-password/phone": cheap_hash("bob-phone-app-password"),
}


def by_kind(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    return found


# -- the node's files --------------------------------------------------------------------------------


def test_node_config_is_accepted_by_the_node() -> None:
    parsed = config.NodeConfig.model_validate(specs.node_config(example_domain()))
    assert parsed.hostname == "mail.example.com"
    assert parsed.alias_domain_map() == {"example.com": "example.com", "example.net": "example.com"}
    assert (parsed.listen.smtp, parsed.listen.submission, parsed.listen.submissions) == (2525, 5870, 4650)
    assert (parsed.listen.imap, parsed.listen.imaps, parsed.listen.http) == (1430, 9930, 8080)
    assert parsed.smtp.max_message_size == 25 * 1024 * 1024
    assert parsed.tls is not None and str(parsed.tls.cert_file) == "/etc/mailnode/tls/tls.crt"
    assert parsed.domains[0].dkim is not None and parsed.domains[0].dkim.selector == "mail"
    assert str(parsed.domains[0].dkim.key_file).startswith("/etc/mailnode/dkim/")
    assert parsed.smtp.relay_host is None


def test_node_config_without_tls_and_with_a_relay_host() -> None:
    domain = example_domain(
        tls=None,
        smtp={"maxMessageSize": "10M", "relayHost": "[smtp.example.net]:2587", "relaySecretRef": {"name": "r"}},
    )
    parsed = config.NodeConfig.model_validate(specs.node_config(domain, relay_username="relay-user"))
    assert parsed.tls is None
    assert parsed.smtp.max_message_size == 10_000_000
    relay = parsed.smtp.relay_host
    assert relay is not None
    assert (relay.host, relay.port, relay.username) == ("smtp.example.net", 2587, "relay-user")
    assert str(relay.password_file) == "/etc/mailnode/relay/password"


def test_relay_tls_renders_only_what_differs_from_the_node_defaults() -> None:
    plain = specs.node_config(example_domain(smtp={"relayHost": "[relay.mail.svc]:25"}))
    assert plain["smtp"]["relay_host"] == {"host": "relay.mail.svc", "port": 25}  # starttls: the node's default

    implicit = {"relayHost": "relay.mail.svc", "relayTLS": "implicit", "relayCASecretRef": {"name": "relay-ca"}}
    parsed = config.NodeConfig.model_validate(specs.node_config(example_domain(smtp=implicit)))
    relay = parsed.smtp.relay_host
    assert relay is not None
    assert (relay.tls, relay.port, str(relay.ca_file)) == ("implicit", 465, "/etc/mailnode/relay-ca/ca.crt")

    plaintext = {"relayHost": "relay.mail.svc", "relayTLS": "none", "relayAllowPlaintext": True}
    relay = config.NodeConfig.model_validate(specs.node_config(example_domain(smtp=plaintext))).smtp.relay_host
    assert relay is not None and (relay.tls, relay.allow_plaintext, relay.ca_file) == ("none", True, None)


def test_the_statefulset_mounts_the_relay_ca_where_the_node_config_names_it() -> None:
    ref = {"name": "relay-ca", "key": "bundle.pem"}
    domain = example_domain(smtp={"relayHost": "relay.mail.svc", "relayCASecretRef": ref})
    pod = specs.statefulset(domain, image="i", config_checksum="abc")["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["relay-ca"]["secret"] == {
        "secretName": "relay-ca",
        "items": [{"key": "bundle.pem", "path": "ca.crt"}],
    }
    assert mounts["relay-ca"]["readOnly"] is True
    relay = config.NodeConfig.model_validate(specs.node_config(domain)).smtp.relay_host
    assert relay is not None and relay.ca_file == Path(mounts["relay-ca"]["mountPath"]) / "ca.crt"
    without_relay = example_domain(smtp={"relayCASecretRef": ref})  # no relay host: nothing to verify
    pod = specs.statefulset(without_relay, image="i", config_checksum="abc")["spec"]["template"]["spec"]
    assert "relay-ca" not in {v["name"] for v in pod["volumes"]}


def test_proxy_protocol_renders_into_the_node_config() -> None:
    off = specs.node_config(example_domain())
    assert "proxy_protocol" not in off["listen"]  # the node's default: off
    domain = example_domain(service={"proxyProtocol": {"enabled": True, "trustedRanges": ["10.1.2.3/8", "fd00::/8"]}})
    rendered = specs.node_config(domain)
    assert rendered["listen"]["proxy_protocol"] == {"enabled": True, "trusted": ["10.0.0.0/8", "fd00::/8"]}
    parsed = config.NodeConfig.model_validate(rendered).listen.proxy_protocol
    assert parsed.enabled and [str(n) for n in parsed.trusted] == ["10.0.0.0/8", "fd00::/8"]


def test_proxy_protocol_needs_trusted_ranges() -> None:
    with pytest.raises(pydantic.ValidationError, match="trustedRanges: at least one range"):
        example_domain(service={"proxyProtocol": {"enabled": True}})


def test_directory_is_accepted_by_the_node() -> None:
    domain = example_domain()
    other = api.Mailbox.model_validate(
        {"metadata": {"name": "carol"}, "spec": {"address": "carol@other.org", "passwordSecretRef": {"name": "c"}}}
    )
    content = specs.directory(domain, [*reversed(example_mailboxes()), other], HASHES)
    config.DirectoryFile.model_validate(content)
    node = config.NodeConfig.model_validate(specs.node_config(domain))
    parsed = config.parse_directory(specs.dump(content).encode(), domains=node.alias_domain_map())
    assert [m.address for m in parsed.mailboxes] == ["alice@example.com", "bob@example.com"]  # sorted, no carol
    alice = parsed.get("alice@example.com")
    bob = parsed.get("bob@example.com")
    assert alice is not None and bob is not None
    assert alice.quota == 1024**3 and bob.quota == 500 * 1024**2
    assert alice.display_name == "Alice Example"
    assert parsed.resolve("info@example.net").mailbox == alice
    assert bob.forward_to == ["bob@example.org"]
    assert [(a.name, a.password_hash) for a in bob.app_passwords] == [("phone", HASHES["bob-password/phone"])]


def test_a_mailbox_without_quota_is_unlimited() -> None:
    mailbox = api.Mailbox.model_validate(
        {"metadata": {"name": "x"}, "spec": {"address": "x@example.com", "passwordSecretRef": {"name": "x"}}}
    )
    directory = specs.directory(example_domain(), [mailbox], {"x/password": HASHES["bob-password/phone"]})
    # Fields at the node's defaults are left out, and the node reads them as the defaults.
    assert directory["mailboxes"] == [{"address": "x@example.com", "password_hash": HASHES["bob-password/phone"]}]
    (entry,) = config.parse_directory(
        specs.directory_content(directory), domains={"example.com": "example.com"}
    ).mailboxes
    assert entry.quota == 0 and entry.display_name == "" and entry.suspended is False and entry.aliases == []


def test_a_large_directory_is_compressed_and_read_by_the_node() -> None:
    """Ten thousand mailboxes, each with its own hash, fit in one Secret (1 MiB) only compressed."""
    hasher = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    count = 10_000
    mailboxes = [
        api.Mailbox.model_validate(
            {
                "metadata": {"name": f"u{i}"},
                "spec": {"address": f"user{i}@example.com", "passwordSecretRef": {"name": f"u{i}"}},
            }
        )
        for i in range(count)
    ]
    passwords = {f"u{i}/password": hasher.hash(f"pw{i}") for i in range(count)}
    content = specs.directory_content(specs.directory(example_domain(), mailboxes, passwords))
    assert content[:2] == b"\x1f\x8b" and len(content) < 1024 * 1024, len(content)
    parsed = config.parse_directory(content, domains={"example.com": "example.com"})
    assert len(parsed.mailboxes) == count
    # The operator reads back what it wrote (to keep hashes that still verify) with the same result.
    assert [entry["address"] for entry in specs.node.read_directory(content)] == [m.address for m in parsed.mailboxes]
    entry = parsed.get("user1234@example.com")
    assert entry is not None and hasher.verify(entry.password_hash, "pw1234")
    # The same directory, the same bytes: an unchanged directory is not a Secret update.
    assert specs.directory_content(specs.directory(example_domain(), mailboxes, passwords)) == content
    secret = specs.directory_secret(example_domain(), content)
    assert "stringData" not in secret and base64.b64decode(secret["data"]["directory.yaml"]) == content


def test_the_directory_file_survives_any_text() -> None:
    """Display names and addresses with quotes, backslashes, control and non-ASCII characters come back
    as they were from the node's YAML reader."""
    names = ['O\'Brien "Bob"', "back\\slash", "tab\tand\u00e9\u4e2d", "colon: #hash", "- dash", "\u2028line"]
    mailboxes = [
        api.Mailbox.model_validate(
            {
                "metadata": {"name": f"m{i}"},
                "spec": {"address": f"m{i}@example.com", "displayName": name, "passwordSecretRef": {"name": "x"}},
            }
        )
        for i, name in enumerate(names)
    ]
    content = specs.directory_content(
        specs.directory(example_domain(), mailboxes, {"x/password": HASHES["bob-password/phone"]})
    )
    parsed = config.parse_directory(content, domains={"example.com": "example.com"})
    assert [parsed.get(f"m{i}@example.com").display_name for i in range(len(names))] == names  # type: ignore[union-attr]


def test_a_small_directory_stays_readable() -> None:
    content = specs.directory_content(specs.directory(example_domain(), example_mailboxes(), HASHES))
    assert content.startswith(b'mailboxes:\n- {"address": "alice@example.com", ')
    assert content.count(b"\n") == 3  # one line a mailbox
    assert specs.directory_secret(example_domain(), content)["stringData"] == {"directory.yaml": content.decode()}


def test_plaintext_passwords_are_refused() -> None:
    passwords = {**HASHES, "bob-password/phone": "bob-phone-app-password"}
    with pytest.raises(ValueError, match=r"Mailbox bob .*app password phone.*plaintext"):
        specs.directory(example_domain(), example_mailboxes(), passwords)


def test_a_missing_password_is_named() -> None:
    passwords = {k: v for k, v in HASHES.items() if k != "alice-password/password"}
    with pytest.raises(ValueError, match=r"Mailbox alice .*spec.passwordSecretRef.*alice-password"):
        specs.directory(example_domain(), example_mailboxes(), passwords)


# -- the Kubernetes objects ----------------------------------------------------------------------------


INTERNAL_TOKEN = "internal-token-of-the-test"
OPERATOR_NAMESPACE = "mailfleet-system"


def rendered(**spec: Any) -> list[dict[str, Any]]:
    return specs.render(
        example_domain(**spec),
        example_mailboxes(),
        HASHES,
        image="mailfleet:test",
        dkim_private_key="PEM",
        internal_token=INTERNAL_TOKEN,
        operator_namespace=OPERATOR_NAMESPACE,
    ).in_apply_order()


def test_every_object_is_named_and_labelled() -> None:
    objects = rendered()
    assert [o["kind"] for o in objects] == [
        "ServiceAccount", "ConfigMap", "Secret", "Secret", "Secret", "Service", "Service", "NetworkPolicy",
        "PodDisruptionBudget", "StatefulSet",
    ]  # fmt: skip
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {("StatefulSet", "example-com"), ("Service", "example-com"), ("Service", "example-com-headless")} <= names
    assert {("ConfigMap", "example-com-config"), ("Secret", "example-com-directory")} <= names
    assert ("Secret", "example-com-internal") in names
    for obj in objects:
        assert obj["apiVersion"] and obj["metadata"]["namespace"] == "mail"
        assert obj["metadata"]["labels"] == LABELS


def test_the_statefulset_runs_locked_down_nodes() -> None:
    sts = by_kind(rendered(replicas=2), "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert sts["spec"]["replicas"] == 2 and sts["spec"]["serviceName"] == "example-com-headless"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "smtp": 2525, "submission": 5870, "submissions": 4650, "imap": 1430, "imaps": 9930, "http": 8080,
        "lmtp": 2424, "imap-proxy": 1431,  # two nodes: the internal ports between them
        "https": 8443,  # a certificate: autoconfiguration, MTA-STS, DAV
    }  # fmt: skip
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
    assert container["image"] == "mailfleet:test"


def test_the_statefulset_mounts_what_the_node_config_names() -> None:
    domain = example_domain()
    sts = specs.statefulset(domain, image="i", config_checksum="abc")
    pod = sts["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts) == set(volumes) | {"data"}
    assert volumes["tls"]["secret"]["secretName"] == "mail-example-com-tls"
    assert volumes["config"]["configMap"]["name"] == "example-com-config"
    assert volumes["directory"]["secret"]["secretName"] == "example-com-directory"
    assert volumes["internal"]["secret"]["secretName"] == "example-com-internal"
    assert volumes["tmp"] == {"name": "tmp", "emptyDir": {}} and mounts["tmp"] == "/tmp"
    node = config.NodeConfig.model_validate(specs.node_config(domain))
    assert str(node.data_dir) == mounts["data"] == "/var/lib/mailnode"
    assert str(node.internal.token_file) == f"{mounts['internal']}/token"
    for path in (
        node.directory_file,
        node.tls and node.tls.cert_file,
        node.domains[0].dkim and node.domains[0].dkim.key_file,
    ):
        assert str(Path(str(path)).parent) in mounts.values()
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert "storageClassName" not in claim["spec"]
    assert sts["spec"]["template"]["metadata"]["annotations"] == {"mailfleet.io/config-checksum": "abc"}
    no_tls = specs.statefulset(
        example_domain(tls=None, storage={"size": "1Gi", "storageClassName": "fast"}), image="i", config_checksum="x"
    )
    assert "tls" not in {v["name"] for v in no_tls["spec"]["template"]["spec"]["volumes"]}
    assert no_tls["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "fast"


def test_a_config_change_changes_the_checksum() -> None:
    def annotation(objects: list[dict[str, Any]]) -> str:
        value: str = by_kind(objects, "StatefulSet")["spec"]["template"]["metadata"]["annotations"][
            "mailfleet.io/config-checksum"
        ]
        return value

    assert annotation(rendered()) == annotation(rendered())
    assert annotation(rendered()) != annotation(rendered(smtp={"maxMessageSize": "50Mi"}))


def test_the_client_service_maps_the_mail_ports() -> None:
    service = specs.client_service(example_domain(service={"type": "LoadBalancer", "annotations": {"a": "b"}}))
    assert {p["port"]: p["targetPort"] for p in service["spec"]["ports"]} == {
        25: "smtp", 587: "submission", 465: "submissions", 143: "imap", 993: "imaps", 443: "https",
    }  # fmt: skip
    without_tls = specs.client_service(example_domain(tls=None))
    assert 443 not in {p["port"] for p in without_tls["spec"]["ports"]}  # no certificate, no HTTPS listener
    assert service["spec"]["type"] == "LoadBalancer" and service["spec"]["externalTrafficPolicy"] == "Local"
    assert service["metadata"]["annotations"] == {"a": "b"}
    node_port = specs.client_service(example_domain(service={"type": "NodePort", "externalTrafficPolicy": "Cluster"}))
    assert node_port["spec"]["externalTrafficPolicy"] == "Cluster"
    cluster_ip = specs.client_service(example_domain(service={"type": "ClusterIP"}))
    assert "externalTrafficPolicy" not in cluster_ip["spec"]


def test_the_headless_service_and_the_budget_select_the_nodes() -> None:
    domain = example_domain()
    selector = {"app.kubernetes.io/name": "mailnode", "app.kubernetes.io/instance": "example-com"}
    headless = specs.headless_service(domain)
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["selector"] == selector
    assert specs.pod_disruption_budget(domain)["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": selector}}
    sts = specs.statefulset(domain, image="i", config_checksum="c")
    assert sts["spec"]["selector"]["matchLabels"] == selector
    assert selector.items() <= sts["spec"]["template"]["metadata"]["labels"].items()


def test_owner_references() -> None:
    domain = example_domain()
    service = specs.client_service(domain)
    owned = specs.with_owner(service, domain)
    assert "ownerReferences" not in service["metadata"]
    assert owned["metadata"]["ownerReferences"] == [
        {"apiVersion": "mailfleet.io/v1alpha1", "kind": "MailDomain", "name": "example-com", "uid": "0b7e-uid",
         "controller": True, "blockOwnerDeletion": True},
    ]  # fmt: skip


def test_dns_records() -> None:
    records = specs.dns_records(example_domain(), dkim_record="v=DKIM1; k=rsa; p=AAAA")
    for record in records:
        api.DNSRecord.model_validate(record)
    by_name = {(r["type"], r["name"]): r["value"] for r in records}
    assert by_name[("MX", "example.com")] == "10 mail.example.com."
    assert by_name[("TXT", "example.com")] == "v=spf1 mx -all"
    assert by_name[("TXT", "_dmarc.example.com")] == "v=DMARC1; p=quarantine"
    assert by_name[("TXT", "mail._domainkey.example.com")] == "v=DKIM1; k=rsa; p=AAAA"
    assert by_name[("MX", "example.net")] == "10 mail.example.com."
    assert not any("_domainkey" in r["name"] for r in specs.dns_records(example_domain(), dkim_record=None))


# -- mailfleet render ----------------------------------------------------------------------------------


def mailfleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailfleet.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_render_prints_the_objects_of_the_examples() -> None:
    result = mailfleet("render", "-f", "examples/maildomain.yaml", "-f", "examples/mailboxes.yaml")
    assert result.returncode == 0, result.stderr
    objects = [o for o in yaml.safe_load_all(result.stdout) if o is not None]
    assert len(objects) == 10
    for obj in objects:
        assert obj["apiVersion"] and obj["kind"] and obj["metadata"]["name"] and obj["metadata"]["namespace"]
    directory = by_kind(objects, "Secret", "example-com-directory")["stringData"]["directory.yaml"]
    assert "alice-demo-password" not in result.stdout  # hashed, never printed
    parsed = config.parse_directory(directory.encode(), domains={"example.com": "example.com"})
    assert len(parsed.mailboxes) == 2
    node = by_kind(objects, "ConfigMap")["data"]["node.yaml"]
    config.NodeConfig.model_validate(yaml.safe_load(node))
    assert "# DNS records to publish" in result.stdout and "MX 10 mail.example.com." in result.stdout


def test_render_names_a_missing_secret(tmp_path: Path) -> None:
    mailboxes = [d for d in load_examples("mailboxes.yaml") if d["metadata"]["name"] != "bob-password"]
    path = tmp_path / "mailboxes.yaml"
    path.write_text(yaml.safe_dump_all(mailboxes))
    result = mailfleet("render", "-f", "examples/maildomain.yaml", "-f", str(path))
    assert result.returncode == 1 and result.stdout == ""
    assert str(path) in result.stderr
    assert "Mailbox bob: spec.passwordSecretRef: Secret bob-password is not in the files" in result.stderr


def test_render_refuses_an_unknown_kind(tmp_path: Path) -> None:
    path = tmp_path / "extra.yaml"
    path.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    result = mailfleet("render", "-f", "examples/maildomain.yaml", "-f", str(path))
    assert result.returncode == 1
    assert f"{path}: document 1 (x): unknown kind v1/ConfigMap" in result.stderr


def test_render_names_the_invalid_field(tmp_path: Path) -> None:
    path = tmp_path / "domain.yaml"
    path.write_text((EXAMPLES / "maildomain.yaml").read_text().replace("replicas: 1", "replicas: 0"))
    result = mailfleet("render", "-f", str(path))
    assert result.returncode == 1
    assert f"{path}: MailDomain example-com: invalid: spec.replicas:" in result.stderr


def test_the_http_port_is_open_to_the_namespace_and_the_operator_only() -> None:
    (policy,) = [o for o in rendered() if o["kind"] == "NetworkPolicy"]
    mail, http = policy["spec"]["ingress"]
    assert "from" not in mail and {p["port"] for p in mail["ports"]} == {
        "smtp", "submission", "submissions", "imap", "imaps", "https"
    }  # fmt: skip
    assert http["ports"] == [{"port": "http", "protocol": "TCP"}]
    # The operator's pods by their labels AND their namespace, by the label only the API server sets: a
    # pod that gives itself the operator's labels elsewhere is not admitted.
    assert http["from"] == [
        {"podSelector": {}},
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": OPERATOR_NAMESPACE}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "mailfleet-operator"}},
        },
    ]


def test_without_the_operator_namespace_no_pod_elsewhere_is_admitted() -> None:
    policy = specs.network_policy(example_domain(), operator_namespace=None)
    _, http = policy["spec"]["ingress"]
    assert http["from"] == [{"podSelector": {}}]  # the domain's namespace only (the operator too, if it runs there)


def test_the_internal_token_is_a_secret_the_nodes_mount_and_the_config_names() -> None:
    objects = rendered()
    secret = by_kind(objects, "Secret", "example-com-internal")
    assert secret["stringData"] == {"token": INTERNAL_TOKEN} and secret["type"] == "Opaque"
    sts = by_kind(objects, "StatefulSet")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    node = config.NodeConfig.model_validate(yaml.safe_load(by_kind(objects, "ConfigMap")["data"]["node.yaml"]))
    assert str(node.internal.token_file) == "/etc/mailnode/internal/token"
    # `kubectl exec <pod> -- mailnode queue retry ID` finds the config, and so the token.
    assert {"name": "MAILNODE_CONFIG", "value": "/etc/mailnode/config/node.yaml"} in container["env"]
    # A new token (its Secret deleted and made again) rolls the nodes, which read it at start.
    checksum = sts["spec"]["template"]["metadata"]["annotations"]["mailfleet.io/config-checksum"]
    other = specs.render(
        example_domain(), example_mailboxes(), HASHES, image="mailfleet:test", internal_token="another token"
    ).statefulset
    assert other["spec"]["template"]["metadata"]["annotations"]["mailfleet.io/config-checksum"] != checksum
