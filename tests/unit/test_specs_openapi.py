"""Every Kubernetes object mailfleet produces against the API server's own OpenAPI schemas
(kubernetes-validate, strict: an unknown field is an error, as with `kubectl apply --validate=strict`),
for the newest Kubernetes version the package ships: the objects `mailfleet.specs.render` builds for
MailDomains that switch on each optional part (TLS, relay host and its Secret, each Service type with
annotations, alias domains, a StorageClass, resources, the DKIM key, mailboxes with app passwords), the
same objects as reconcile applies them (with owner references), and the CRDs in crds/. And that the
check can fail: a real manifest with an unknown field or a wrong type is refused, the fault located.

The schemas check field names, types and required fields; they do not check enums (a Service type) or
the format of quantities, which the API server checks in code. tests/unit/test_specs.py covers those
values."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mailfleet import api, specs
from tests.conftest import cheap_hash
from tests.unit.test_specs import HASHES, example_domain, example_mailboxes

CRDS = Path(__file__).parents[2] / "crds"
KUBERNETES_VERSION: str = kubernetes_validate.latest_version()
IMAGE = "registry.example.com/mailfleet:1.0.0"
DKIM_KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"


def minimal_domain() -> api.MailDomain:
    """Only what the CRD requires: no namespace (so "default"), defaults for everything else."""
    return api.MailDomain.model_validate(
        {"metadata": {"name": "minimal", "uid": "1a2b-uid"}, "spec": {"domain": "a.org"}}
    )


def app_password_mailboxes() -> tuple[list[api.Mailbox], dict[str, str]]:
    """Mailboxes in the domain and in an alias domain, with several app passwords, and their hashes."""
    carol = api.Mailbox.model_validate(
        {
            "metadata": {"name": "carol"},
            "spec": {
                "address": "carol@example.org",
                "passwordSecretRef": {"name": "carol"},
                "quota": "2Gi",
                "appPasswords": [
                    {"name": "phone", "secretRef": {"name": "carol", "key": "phone"}},
                    {"name": "laptop", "secretRef": {"name": "carol-laptop", "key": "app"}},
                ],
            },
        }
    )
    keys = ["carol/password", "carol/phone", "carol-laptop/app"]
    return [*example_mailboxes(), carol], {**HASHES, **{key: cheap_hash(key) for key in keys}}


def render(
    domain: api.MailDomain,
    mailboxes: list[api.Mailbox] | None = None,
    passwords: dict[str, str] | None = None,
    *,
    dkim: bool = True,
    relay_username: str | None = None,
) -> list[dict[str, Any]]:
    return specs.render(
        domain,
        example_mailboxes() if mailboxes is None else mailboxes,
        HASHES if passwords is None else passwords,
        image=IMAGE,
        dkim_private_key=DKIM_KEY if dkim else None,
        relay_username=relay_username,
        internal_token="internal-token",
        operator_namespace="mailfleet-system",
    ).in_apply_order()


def variants() -> dict[str, list[dict[str, Any]]]:
    """What render builds for each MailDomain variant, by variant name."""
    relay = {"maxMessageSize": "10M", "relayHost": "[smtp.example.net]:2587", "relaySecretRef": {"name": "relay"}}
    mailboxes, passwords = app_password_mailboxes()
    example = example_domain(replicas=1)
    return {
        "example": render(example),
        "example-no-dkim-key": render(example, dkim=False),
        "example-owned": [specs.with_owner(obj, example) for obj in render(example)],
        "minimal": render(minimal_domain(), [], {}, dkim=False),
        "relay-with-secret": render(example_domain(replicas=1, tls=None, smtp=relay), relay_username="relay-user"),
        "relay-without-secret": render(example_domain(replicas=1, smtp={"relayHost": "relay.example.net"})),
        "nodeport": render(
            example_domain(
                replicas=1,
                service={"type": "NodePort", "externalTrafficPolicy": "Cluster", "annotations": {"a.io/b": "c"}},
            )
        ),
        "loadbalancer": render(
            example_domain(
                replicas=1,
                service={
                    "type": "LoadBalancer",
                    "annotations": {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"},
                },
            )
        ),
        "cluster-of-three": render(example_domain(replicas=3)),
        "cluster-of-three-archives": render(
            example_domain(replicas=3, backup={"schedule": "0 3 * * *", "method": "Archive", "archiveClaimName": "a"})
        ),
        "clusterip": render(
            example_domain(replicas=1, service={"type": "ClusterIP", "annotations": {"example.com/team": "mail"}})
        ),
        "storage-resources-aliases": render(
            example_domain(
                replicas=1,
                aliasDomains=["example.net", "example.org"],
                storage={"size": "20Gi", "storageClassName": "fast-ssd"},
                resources={
                    "requests": {"cpu": "250m", "memory": "256Mi", "ephemeral-storage": "1Gi"},
                    "limits": {"cpu": "2", "memory": "1Gi"},
                },
            ),
            mailboxes,
            passwords,
        ),
    }


VARIANTS = variants()
OBJECTS = [
    pytest.param(obj, id=f"{variant}:{obj['kind']}/{obj['metadata']['name']}")
    for variant, objects in VARIANTS.items()
    for obj in objects
]
CRD_DOCUMENTS: list[tuple[str, dict[str, Any]]] = [
    (path.name, document)
    for path in sorted(CRDS.glob("*.yaml"))
    for document in yaml.safe_load_all(path.read_text())
    if document
]
CRD_FILES = [pytest.param(crd, id=f"{file}:{crd['kind']}/{crd['metadata']['name']}") for file, crd in CRD_DOCUMENTS]


def schema_error(obj: dict[str, Any]) -> Any:
    """The first way `obj` breaks the schemas of KUBERNETES_VERSION, strictly (a
    kubernetes_validate.ValidationError), or None."""
    try:
        used = kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return error
    assert used == ".".join(KUBERNETES_VERSION.split(".")[:2])  # not an older schema picked as a fallback
    return None


def assert_valid(obj: dict[str, Any]) -> None:
    """A failure names the object, the field and the fault (str() of the error prints the whole schema)."""
    if (error := schema_error(obj)) is not None:
        where = ".".join(str(part) for part in error.absolute_path) or "(top level)"
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {where}: {error.message}", pytrace=False)


# -- what the operator applies --------------------------------------------------------------------------


@pytest.mark.parametrize("obj", OBJECTS)
def test_rendered_objects_are_valid(obj: dict[str, Any]) -> None:
    assert_valid(obj)


@pytest.mark.parametrize("crd", CRD_FILES)
def test_crds_are_valid(crd: dict[str, Any]) -> None:
    assert_valid(crd)


def test_the_variants_build_what_they_are_named_for() -> None:
    """So that a change to the helpers cannot quietly shrink what the tests above cover."""

    def find(variant: str, kind: str, name: str = "example-com") -> dict[str, Any]:
        (found,) = [o for o in VARIANTS[variant] if o["kind"] == kind and o["metadata"]["name"] == name]
        return found

    def volumes(variant: str, name: str = "example-com") -> set[str]:
        return {v["name"] for v in find(variant, "StatefulSet", name)["spec"]["template"]["spec"]["volumes"]}

    assert len(CRD_FILES) == 3
    assert {"tls", "dkim"} <= volumes("example")
    assert "relay" in volumes("relay-with-secret") and "tls" not in volumes("relay-with-secret")
    assert "relay" not in volumes("relay-without-secret")
    assert "example-com-dkim" in {o["metadata"]["name"] for o in VARIANTS["example"]}
    assert "example-com-dkim" not in {o["metadata"]["name"] for o in VARIANTS["example-no-dkim-key"]}
    assert all(o["metadata"]["ownerReferences"] for o in VARIANTS["example-owned"])
    assert find("minimal", "StatefulSet", "minimal")["metadata"]["namespace"] == "default"
    for variant, service_type in [
        ("nodeport", "NodePort"),
        ("loadbalancer", "LoadBalancer"),
        ("clusterip", "ClusterIP"),
    ]:
        service = find(variant, "Service")
        assert service["spec"]["type"] == service_type and service["metadata"]["annotations"]
    statefulset = find("storage-resources-aliases", "StatefulSet")
    assert statefulset["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "fast-ssd"
    assert statefulset["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {
        "cpu": "2",
        "memory": "1Gi",
    }
    directory = yaml.safe_load(
        find("storage-resources-aliases", "Secret", "example-com-directory")["stringData"]["directory.yaml"]
    )
    assert [len(m.get("app_passwords", [])) for m in directory["mailboxes"]] == [
        0,
        1,
        2,
    ]  # alice, bob, carol@example.org


# -- the check can fail ---------------------------------------------------------------------------------


def _container(obj: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = obj["spec"]["template"]["spec"]["containers"][0]
    return container


def _schema(obj: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = obj["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


# (kind of the real manifest to corrupt, what is done, how, where the error must point)
CORRUPTIONS: list[tuple[str, str, Callable[[dict[str, Any]], object], list[str | int]]] = [
    (
        "StatefulSet",
        "unknown container field",
        lambda o: _container(o).update(imagePullPolcy="Always"),
        ["spec", "template", "spec", "containers", 0],
    ),
    (
        "StatefulSet",
        "unknown securityContext field",
        lambda o: _container(o)["securityContext"].update(runAsRoot=False),
        ["spec", "template", "spec", "containers", 0, "securityContext"],
    ),
    (
        "StatefulSet",
        "replicas as a string",
        lambda o: o["spec"].update(replicas="1"),
        ["spec", "replicas"],
    ),
    (
        "StatefulSet",
        "container without a name",
        lambda o: _container(o).pop("name"),
        ["spec", "template", "spec", "containers", 0],
    ),
    ("Service", "unknown port field", lambda o: o["spec"]["ports"][0].update(nodeport=30025), ["spec", "ports", 0]),
    ("Secret", "unknown metadata field", lambda o: o["metadata"].update(lables={}), ["metadata"]),
    (
        "CustomResourceDefinition",
        "unknown field in the schema",
        lambda o: _schema(o)["properties"]["spec"].update(defualt={}),
        ["spec", "versions", 0, "schema", "openAPIV3Schema", "properties", "spec"],
    ),
]


@pytest.mark.parametrize(
    ("kind", "corrupt", "path"),
    [pytest.param(kind, corrupt, path, id=what) for kind, what, corrupt, path in CORRUPTIONS],
)
def test_a_corrupted_manifest_is_refused(
    kind: str, corrupt: Callable[[dict[str, Any]], object], path: list[str | int]
) -> None:
    real = [*VARIANTS["example"], *(crd for _, crd in CRD_DOCUMENTS)]
    original = next(obj for obj in real if obj["kind"] == kind)
    corrupted = copy.deepcopy(original)
    corrupt(corrupted)
    assert_valid(original)
    error = schema_error(corrupted)
    assert error is not None, "the corrupted copy passed"
    assert list(error.absolute_path) == path
