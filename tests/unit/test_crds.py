"""The generated CRDs (mailfleet.crds): crds/ matches the models, every schema is structural (what the
API server demands), defaults are valid, printer columns point at real fields, patterns mean the same
to a RE2-style engine, and the CRD schema accepts and refuses the same resources the models do.

There is no API server here: `check_structural` and `schema_errors` stand in for it, following
https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/
(Specifying a structural schema; Defaulting; Validation)."""

from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import Annotated, Any

import pydantic
import pytest
import yaml

from mailfleet import api, cli, crds
from tests.unit.test_api import load_examples

CRDS = Path(__file__).parents[2] / "crds"
ALL = {crd["spec"]["names"]["kind"]: crd for crd in crds.all_crds()}
MODELS: dict[str, type[api.Resource]] = {resource.kind_name: resource for resource in api.RESOURCES}
INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]
TYPES = {"object", "array", "string", "integer", "number", "boolean"}


def root_schema(kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = ALL[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


# -- crds/ on disk ----------------------------------------------------------------------------------


def test_crds_on_disk_match_the_models() -> None:
    expected = crds.render_files()
    on_disk = {path.name: path.read_text() for path in CRDS.glob("*.yaml")}
    assert on_disk == expected, "crds/ is out of date with operator/mailfleet/api: run `make crds`"


def test_the_files_are_named_after_the_crds() -> None:
    assert sorted(crds.render_files()) == [
        "mailbackups.mailfleet.io.yaml",
        "mailboxes.mailfleet.io.yaml",
        "maildomains.mailfleet.io.yaml",
    ]


def test_the_command_prints_every_crd_as_one_stream(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["crds"]) == 0
    documents = [doc for doc in yaml.safe_load_all(capsys.readouterr().out) if doc]
    assert documents == crds.all_crds()


def test_the_command_writes_a_directory_and_removes_crds_no_longer_defined(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mailrelays.mailfleet.io.yaml").write_text("kind: CustomResourceDefinition\n")
    assert cli.main(["crds", "--write", str(tmp_path / "out")]) == 0
    assert {path.name: path.read_text() for path in (tmp_path / "out").iterdir()} == crds.render_files()


# -- names, scope, subresources ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "plural", "short"), [("MailDomain", "maildomains", "md"), ("Mailbox", "mailboxes", "mbx"),
                                  ("MailBackup", "mailbackups", "mbk")]
)  # fmt: skip
def test_names(kind: str, plural: str, short: str) -> None:
    crd = ALL[kind]
    assert crd["metadata"]["name"] == f"{plural}.mailfleet.io"
    assert crd["spec"]["group"] == "mailfleet.io"
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"]["plural"] == plural
    assert crd["spec"]["names"]["shortNames"] == [short]
    assert crd["spec"]["names"]["categories"] == ["mailfleet"]
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


# -- structural schemas -----------------------------------------------------------------------------


def check_structural(node: Any, path: str = "", *, root: bool = True) -> list[str]:
    """What the API server (and `kubectl explain`) would object to in a schema, as a list of problems."""
    problems: list[str] = []
    where = path or "<root>"
    if not isinstance(node, dict):
        return [f"{where}: not a schema"]
    for forbidden in ("$ref", "$defs", "title", "allOf", "oneOf", "not", "x-kubernetes-preserve-unknown-fields"):
        if forbidden in node:
            problems.append(f"{where}: has {forbidden}")
    if node.get("x-kubernetes-int-or-string"):
        if "type" in node:
            problems.append(f"{where}: int-or-string with a type")
        if node.get("anyOf", INT_OR_STRING) != INT_OR_STRING:
            problems.append(f"{where}: int-or-string with anyOf {node['anyOf']}")
    else:
        if node.get("type") not in TYPES:
            problems.append(f"{where}: no type")
        if "anyOf" in node:
            problems.append(f"{where}: anyOf outside the int-or-string form")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{where}: both properties and additionalProperties")
    # The root's metadata is an empty object, filled in by the server.
    if node.get("type") == "object" and not {"properties", "additionalProperties"} & set(node) and path != ".metadata":
        problems.append(f"{where}: object with neither properties nor additionalProperties")
    if "additionalProperties" in node and not isinstance(node["additionalProperties"], dict):
        problems.append(f"{where}: additionalProperties is {node['additionalProperties']!r}, not a schema")
    if node.get("nullable") and node.get("default", ...) is None:
        problems.append(f"{where}: default null")
    for name in node.get("required", []):
        if name not in node.get("properties", {}):
            problems.append(f"{where}: required {name} is not a property")
    for name, child in node.get("properties", {}).items():
        if path == "" and name == "metadata":
            # The API server allows only `type` on the root's metadata (it refuses the CRD otherwise).
            if child != {"type": "object"}:
                problems.append(".metadata: must be just {type: object} (an API server refuses more)")
            continue
        if not (isinstance(child, dict) and child.get("description")):
            problems.append(f"{path}.{name}: no description")
        problems += check_structural(child, f"{path}.{name}", root=False)
    if "items" in node:
        problems += check_structural(node["items"], f"{path}[]", root=False)
        if node.get("x-kubernetes-list-type") == "map":
            items = node["items"]
            for key in node.get("x-kubernetes-list-map-keys", []):
                if key not in items.get("required", []) and "default" not in items["properties"].get(key, {}):
                    problems.append(f"{where}: list map key {key} is neither required nor defaulted")
    if isinstance(node.get("additionalProperties"), dict):
        problems += check_structural(node["additionalProperties"], f"{path}.*", root=False)
    if "default" in node:
        problems += [f"{where}: default: {error}" for error in schema_errors(node, node["default"], path)]
    return problems


@pytest.mark.parametrize("kind", sorted(ALL))
def test_every_schema_is_structural(kind: str) -> None:
    assert check_structural(root_schema(kind)) == []


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ({"type": "object", "properties": {"a": {"type": "string"}}}, ".a: no description"),
        ({"type": "object", "properties": {"a": {"description": "x"}}}, ".a: no type"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/A", "description": "x"}}}, ".a: has $ref"),
        ({"type": "string", "anyOf": [{"type": "string"}, {"type": "null"}]}, "anyOf outside the int-or-string"),
        ({"type": "object", "properties": {}, "additionalProperties": {"type": "string"}}, "both properties and"),
        ({"type": "object", "additionalProperties": False}, "additionalProperties is False"),
        ({"type": "integer", "minimum": 1, "default": 0}, "default: <root>: 0 is less than 1"),
        ({"type": "object", "properties": {"a": {"type": "object", "description": "x"}}}, "neither properties nor"),
    ],
)
def test_the_checker_finds_what_is_not_structural(schema: dict[str, Any], problem: str) -> None:
    assert any(problem in found for found in check_structural(schema)), check_structural(schema)


def all_patterns(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
        return found + [pattern for value in node.values() for pattern in all_patterns(value)]
    if isinstance(node, list):
        return [pattern for value in node for pattern in all_patterns(value)]
    return []


def test_every_pattern_compiles_without_python_only_syntax() -> None:
    # The API server matches with Go's RE2; the Rust regex crate refuses the same things RE2 does
    # (look-around, back-references), so a pattern both engines take means the same to both.
    patterns = {pattern for kind in ALL for pattern in all_patterns(root_schema(kind))}
    assert patterns
    rust = pydantic.ConfigDict(regex_engine="rust-regex")
    for pattern in patterns:
        pydantic.TypeAdapter(Annotated[str, pydantic.StringConstraints(pattern=pattern)], config=rust)


def test_nested_objects_default_to_empty_so_their_fields_get_defaults() -> None:
    spec = root_schema("MailDomain")["properties"]["spec"]["properties"]
    for name in ("storage", "service", "smtp", "dkim"):
        assert spec[name]["default"] == {}, name
    assert spec["storage"]["properties"]["size"]["default"] == "1Gi"
    assert spec["service"]["properties"]["externalTrafficPolicy"]["default"] == "Local"
    replicas = spec["replicas"]
    assert {k: replicas[k] for k in ("type", "default", "minimum", "maximum")} == {
        "type": "integer", "default": 1, "minimum": 1, "maximum": 16,
    }  # fmt: skip
    assert replicas["description"].startswith("Number of mail nodes (1 to 16).")
    assert "moves mailboxes" in replicas["description"] and "Retain" in replicas["description"]
    parallel = spec["moves"]["properties"]["parallel"]
    assert spec["moves"]["default"] == {}
    assert {k: parallel[k] for k in ("type", "default", "minimum", "maximum")} == {
        "type": "integer", "default": 2, "minimum": 1, "maximum": 16,
    }  # fmt: skip


def test_quantities_are_int_or_string() -> None:
    spec = root_schema("MailDomain")["properties"]["spec"]["properties"]
    for node in (
        spec["storage"]["properties"]["size"],
        spec["smtp"]["properties"]["maxMessageSize"],
        spec["resources"]["properties"]["limits"]["additionalProperties"],
        root_schema("Mailbox")["properties"]["spec"]["properties"]["quota"],
    ):
        assert node["x-kubernetes-int-or-string"] is True
        assert node["anyOf"] == INT_OR_STRING
        assert "type" not in node


def test_a_mailbackup_spec_cannot_change() -> None:
    spec = root_schema("MailBackup")["properties"]["spec"]
    assert spec["x-kubernetes-validations"] == [{"rule": "self == oldSelf", "message": "spec is immutable"}]


# -- printer columns --------------------------------------------------------------------------------

_STEP = re.compile(r'\.([A-Za-z0-9_]+)|\[\?\(@\.([A-Za-z0-9_]+)=="[^"]*"\)\]|\[(\*|\d+)\]')
_METADATA = {"name": "string", "namespace": "string", "creationTimestamp": "date"}


def column_schema(root: dict[str, Any], json_path: str) -> dict[str, Any]:
    """The schema node a printer column's JSONPath reaches; KeyError when it reaches nothing."""
    steps = list(_STEP.finditer(json_path))
    assert "".join(step.group(0) for step in steps) == json_path, f"cannot read {json_path}"
    if steps[0].group(1) == "metadata":
        assert len(steps) == 2
        return {"type": _METADATA[steps[1].group(1)]}
    node = root
    for step in steps:
        field, filter_field, _index = step.groups()
        if field is not None:
            node = node["properties"][field]
        else:
            assert node["type"] == "array", f"{json_path}: {step.group(0)} on a non-array"
            node = node["items"]
            if filter_field is not None:
                assert filter_field in node["properties"], f"{json_path}: filter on unknown {filter_field}"
    return node


@pytest.mark.parametrize("kind", sorted(ALL))
def test_printer_columns_point_at_fields_of_their_type(kind: str) -> None:
    columns = ALL[kind]["spec"]["versions"][0]["additionalPrinterColumns"]
    assert columns[-1] == {
        "name": "Age",
        "type": "date",
        "jsonPath": ".metadata.creationTimestamp",
        "description": "Time since the resource was created.",
    }
    for column in columns:
        node = column_schema(root_schema(kind), column["jsonPath"])
        if node.get("x-kubernetes-int-or-string"):
            assert column["type"] == "string", column
        elif column["type"] == "date" and node["type"] == "string":  # kubectl shows an RFC 3339 time as an age
            assert node.get("format") == "date-time", column
        else:
            assert column["type"] == node["type"] or (column["type"] == "string" and "enum" in node), column


def test_the_column_reader_notices_a_missing_field() -> None:
    with pytest.raises(KeyError):
        column_schema(root_schema("Mailbox"), ".status.used")


def test_the_expected_columns() -> None:
    names = {kind: [column["name"] for column in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
             for kind, crd in ALL.items()}  # fmt: skip
    assert names == {
        "MailDomain": ["Domain", "Ready", "Replicas", "Mailboxes", "Age"],
        "Mailbox": ["Address", "Quota", "Used", "Node", "Phase", "Ready", "Age"],
        "MailBackup": ["Domain", "Method", "Phase", "Completed", "Age"],
    }


# -- the schema and the models agree ----------------------------------------------------------------


def schema_errors(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """OpenAPI validation as the API server does it for these schemas, with unknown fields refused as
    `kubectl apply --validate=strict` refuses them."""
    where = path or "<root>"
    if schema.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, int | str):
            return [f"{where}: {value!r} is neither an integer nor a string"]
    else:
        expected = {"object": dict, "array": list, "string": str, "integer": int, "boolean": bool, "number": float}
        kind = expected[schema["type"]]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return [f"{where}: {value!r} is not of type {schema['type']}"]
    errors: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
        if len(value) > schema.get("maxLength", len(value)):
            errors.append(f"{where}: longer than {schema['maxLength']}")
        if schema.get("format") == "date-time":
            try:
                datetime.datetime.fromisoformat(value)
            except ValueError:
                errors.append(f"{where}: {value!r} is not a date-time")
    if isinstance(value, int) and not isinstance(value, bool) and value < schema.get("minimum", value):
        errors.append(f"{where}: {value} is less than {schema['minimum']}")
    if isinstance(value, int) and not isinstance(value, bool) and value > schema.get("maximum", value):
        errors.append(f"{where}: {value} is more than {schema['maximum']}")
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{where}: {name} is required")
        for name, item in value.items():
            if "properties" in schema:
                if name not in schema["properties"]:
                    errors.append(f"{where}: unknown field {name}")
                else:
                    errors += schema_errors(schema["properties"][name], item, f"{path}.{name}")
            elif "additionalProperties" in schema:
                errors += schema_errors(schema["additionalProperties"], item, f"{path}.{name}")
    if isinstance(value, list):
        for index, item in enumerate(value):
            errors += schema_errors(schema["items"], item, f"{path}[{index}]")
        list_type = schema.get("x-kubernetes-list-type")
        keys = schema.get("x-kubernetes-list-map-keys", [])
        identities = [repr(item) if list_type == "set" else repr([item.get(key) for key in keys]) for item in value]
        if list_type in ("set", "map") and len(set(identities)) != len(identities):
            errors.append(f"{where}: duplicate items")
    return errors


def _resources() -> list[dict[str, Any]]:
    documents = load_examples("maildomain.yaml", "mailboxes.yaml", "cluster.yaml")
    return [doc for doc in documents if doc["apiVersion"] == api.API_VERSION]


@pytest.mark.parametrize("document", _resources(), ids=lambda doc: f"{doc['kind']}/{doc['metadata']['name']}")
def test_the_examples_are_valid_under_the_crd(document: dict[str, Any]) -> None:
    assert schema_errors(root_schema(document["kind"]), document) == []


MAILBOX = {"address": "alice@example.com", "passwordSecretRef": {"name": "alice-password"}}
DOMAIN = {"domain": "example.com"}

AGREEMENT = [
    ("MailDomain", DOMAIN),
    ("MailDomain", {**DOMAIN, "replicas": 0}),
    ("MailDomain", {**DOMAIN, "replicas": 3}),
    ("MailDomain", {**DOMAIN, "replicas": 16}),
    ("MailDomain", {**DOMAIN, "replicas": 17}),
    ("MailDomain", {**DOMAIN, "replicas": "3"}),
    ("MailDomain", {"domain": "Example.com"}),
    ("MailDomain", {"domain": "example"}),
    ("MailDomain", {"domain": "mail.example.co.uk"}),
    ("MailDomain", {"domain": "ex_ample.com"}),
    ("MailDomain", {**DOMAIN, "aliasDomains": ["example.net", "example.net"]}),
    ("MailDomain", {**DOMAIN, "storage": {"size": 10737418240}}),
    ("MailDomain", {**DOMAIN, "storage": {"size": "10GB"}}),
    ("MailDomain", {**DOMAIN, "storage": {"size": "1.5Gi", "storageClassName": "fast-ssd"}}),
    ("MailDomain", {**DOMAIN, "storage": {"size": True}}),
    ("MailDomain", {**DOMAIN, "resources": {"requests": {"cpu": "250m"}, "limits": {"memory": "1Gi"}}}),
    ("MailDomain", {**DOMAIN, "resources": {"requests": {"cpu": "a quarter"}}}),
    ("MailDomain", {**DOMAIN, "resources": {"claims": []}}),
    ("MailDomain", {**DOMAIN, "service": {"type": "NodePort", "annotations": {"a": "b"}}}),
    ("MailDomain", {**DOMAIN, "service": {"type": "ExternalName"}}),
    ("MailDomain", {**DOMAIN, "service": {"externalTrafficPolicy": "local"}}),
    ("MailDomain", {**DOMAIN, "service": {"annotations": {"a": 1}}}),
    ("MailDomain", {**DOMAIN, "service": {"proxyProtocol": {"enabled": True, "trustedRanges": ["10.0.0.0/8",
                                                                                             "2001:db8::/32"]}}}),
    ("MailDomain", {**DOMAIN, "service": {"proxyProtocol": {"enabled": True, "trustedRanges": ["10.0.0.1"]}}}),
    ("MailDomain", {**DOMAIN, "service": {"proxyProtocol": {"trustedRanges": ["anywhere"]}}}),
    ("MailDomain", {**DOMAIN, "tls": {}}),
    ("MailDomain", {**DOMAIN, "tls": {"secretName": "Mail_TLS"}}),
    ("MailDomain", {**DOMAIN, "smtp": {"relayHost": "[smtp.example.net]:587", "relaySecretRef": {"name": "relay"}}}),
    ("MailDomain", {**DOMAIN, "smtp": {"relayHost": "smtp.example.net:587:1"}}),
    ("MailDomain", {**DOMAIN, "dkim": {"selector": "2026.01"}}),
    ("MailDomain", {**DOMAIN, "backup": {"schedule": "0 3 * * *", "retention": 0}}),
    ("MailDomain", {**DOMAIN, "backup": {"schedule": "@weekly", "method": "Archive"}}),
    ("MailDomain", {**DOMAIN, "backup": {"method": "Archive"}}),
    ("MailDomain", {**DOMAIN, "restore": {"backupName": "example-com-20260101"}}),
    ("Mailbox", MAILBOX),
    ("Mailbox", {**MAILBOX, "address": "alice"}),
    ("Mailbox", {**MAILBOX, "address": "first.last+tag@example.com"}),
    ("Mailbox", {**MAILBOX, "address": "first..last@example.com"}),
    ("Mailbox", {**MAILBOX, "address": "Alice@example.com"}),
    ("Mailbox", {**MAILBOX, "address": "al ice@example.com"}),
    ("Mailbox", {**MAILBOX, "quota": "2Gi"}),
    ("Mailbox", {**MAILBOX, "quota": "2 GiB"}),
    ("Mailbox", {**MAILBOX, "quota": -5}),
    ("Mailbox", {**MAILBOX, "quota": 1.5}),
    ("Mailbox", {**MAILBOX, "suspended": "yes"}),
    ("Mailbox", {**MAILBOX, "passwordSecretRef": {"name": "a", "key": "tls.key"}}),
    ("Mailbox", {**MAILBOX, "passwordSecretRef": {"name": "a", "key": "a/b"}}),
    ("Mailbox", {**MAILBOX, "forwardTo": ["x@example.org", "x@example.org"]}),
    ("Mailbox", {**MAILBOX, "appPasswords": [{"name": "phone", "secretRef": {"name": "s"}}]}),
    ("Mailbox", {**MAILBOX, "appPasswords": [{"name": "Phone", "secretRef": {"name": "s"}}]}),
    ("Mailbox", {**MAILBOX, "appPasswords": [{"name": "p", "secretRef": {"name": "s"}}, {"name": "p",
                                                                                       "secretRef": {"name": "t"}}]}),
    ("MailBackup", {"domainRef": "example-com"}),
    ("MailBackup", {"domainRef": "example-com", "method": "Archive"}),
    ("MailBackup", {"domainRef": "example-com", "method": "Rsync"}),
    ("MailBackup", {"domainRef": "Example"}),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "spec"), AGREEMENT)
def test_the_crd_and_the_model_accept_and_refuse_the_same_specs(kind: str, spec: dict[str, Any]) -> None:
    resource = {"apiVersion": api.API_VERSION, "kind": kind, "metadata": {"name": "x"}, "spec": spec}
    assert model_error(kind, resource) == (schema_errors(root_schema(kind), resource) != []), (
        model_error(kind, resource),
        schema_errors(root_schema(kind), resource),
    )


def model_error(kind: str, resource: dict[str, Any]) -> bool:
    try:
        MODELS[kind].model_validate(resource)
    except pydantic.ValidationError:
        return True
    return False


def test_the_agreement_cases_are_not_all_one_way() -> None:
    refused = [spec for kind, spec in AGREEMENT if model_error(kind, {"metadata": {"name": "x"}, "spec": spec})]
    assert len(AGREEMENT) / 3 < len(refused) < len(AGREEMENT) * 2 / 3
