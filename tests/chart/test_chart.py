"""The Helm chart (charts/mailfleet) through the real helm binary: `helm lint --strict`; `helm template`
with each file of tests/chart/values/ (defaults, watched namespaces, everything for monitoring on), every
object strictly valid against the Kubernetes schemas (kubernetes-validate; the prometheus-operator kinds
are checked for their shape here, as no schema ships for them); the chart's crds/ byte for byte the
repository's crds/; the operator pods labelled as the nodes' NetworkPolicy expects
(mailfleet.specs.common.OPERATOR_LABELS) and run as specs.common.RUN_AS; RBAC granting what the operator
requests and nothing else; alerts and dashboard naming only metrics the code exports; values.schema.json
refusing bad values; NOTES.txt and the `helm test` hook."""

from __future__ import annotations

import argparse
import functools
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import prometheus_client as prom
import pytest
import yaml

from mailfleet import api, cli, k8s, options
from mailfleet.metrics import OperatorMetrics
from mailfleet.specs import common
from mailnode.metrics import NodeMetrics
from tests.conftest import require_tool
from tests.unit.test_specs_openapi import assert_valid

ROOT = Path(__file__).parents[2]
CHART = ROOT / "charts" / "mailfleet"
VALUES = Path(__file__).parent / "values"
VALUE_FILES = sorted(path.stem for path in VALUES.glob("*.yaml"))
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
LIVENESS = "http://0.0.0.0:8081/healthz"


def helm_binary() -> str:
    """scripts/bootstrap puts helm next to the virtualenv's python, which need not be on PATH."""
    beside = Path(sys.executable).parent / "helm"
    return str(beside) if beside.is_file() else require_tool("helm")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, check=check, timeout=60, cwd=ROOT)


@functools.cache
def _rendered(values: str) -> str:
    return helm(
        "template", "mail", str(CHART), "--namespace", "mailfleet-system", "-f", str(VALUES / f"{values}.yaml")
    ).stdout


def rendered(values: str) -> list[dict[str, Any]]:
    return [obj for obj in yaml.safe_load_all(_rendered(values)) if obj]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def the(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = find(objects, kind)
    return found


def test_lint_strict() -> None:
    result = helm("lint", "--strict", str(CHART), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    result = helm("lint", "--strict", str(CHART), "-f", str(VALUES / "monitoring.yaml"), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_chart_versions_follow_the_project() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["version"] == "0.1.0"
    assert chart["appVersion"] == project["version"]


def test_crds_are_the_repositorys_byte_for_byte() -> None:
    """Helm installs crds/ before the templates (and never upgrades them); they must be what `make crds` wrote."""
    ours = {path.name: path.read_bytes() for path in (ROOT / "crds").glob("*.yaml")}
    charts = {path.name: path.read_bytes() for path in (CHART / "crds").glob("*.yaml")}
    assert ours and set(charts) == set(ours)
    for name, content in ours.items():
        assert charts[name] == content, f"charts/mailfleet/crds/{name} differs from crds/{name}: copy it again"


@pytest.mark.parametrize("values", VALUE_FILES)
def test_every_object_is_valid(values: str) -> None:
    objects = rendered(values)
    assert {"Deployment", "ServiceAccount", "Service", "ClusterRole", "ClusterRoleBinding", "Pod"} <= {
        o["kind"] for o in objects
    }
    for obj in objects:
        if obj["kind"] in MONITORING_KINDS:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            assert obj["metadata"]["namespace"] == "mailfleet-system"
            assert isinstance(obj["spec"], dict) and obj["spec"]
        else:
            assert_valid(obj)


def test_the_values_files_cover_what_they_are_named_for() -> None:
    kinds = {name: {o["kind"] for o in rendered(name)} for name in VALUE_FILES}
    assert kinds["monitoring"] >= MONITORING_KINDS
    assert "ConfigMap" in kinds["monitoring"]  # the dashboard
    assert not (MONITORING_KINDS | {"ConfigMap", "Role", "RoleBinding"}) & kinds["defaults"]
    assert {"Role", "RoleBinding"} <= kinds["namespaced"]


def test_monitors_scrape_the_operator_and_the_nodes() -> None:
    objects = rendered("monitoring")
    service, deployment = the(objects, "Service"), the(objects, "Deployment")
    monitor = the(objects, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert {"name": "metrics", "port": 9191, "targetPort": "metrics", "protocol": "TCP"} in service["spec"]["ports"]
    assert "--metrics-port=9191" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    pods = the(objects, "PodMonitor")["spec"]
    # What a mail node pod carries (specs.common.labels) and the name of its HTTP port.
    node = api.MailDomain.model_validate({"metadata": {"name": "example"}, "spec": {"domain": "example.com"}})
    assert pods["selector"]["matchLabels"].items() <= common.labels(node).items()
    assert [e["port"] for e in pods["podMetricsEndpoints"]] == ["http"]
    assert "http" in common.CONTAINER_PORTS


# -- the operator's pod ------------------------------------------------------------------------------


@pytest.mark.parametrize("values", VALUE_FILES)
def test_operator_pods_carry_the_labels_the_nodes_admit(values: str) -> None:
    deployment = the(rendered(values), "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels.items() >= common.OPERATOR_LABELS.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("values", VALUE_FILES)
def test_mailfleet_operator_accepts_the_args(values: str, monkeypatch: pytest.MonkeyPatch) -> None:
    (container,) = the(rendered(values), "Deployment")["spec"]["template"]["spec"]["containers"]
    seen: list[argparse.Namespace] = []

    def operator(args: argparse.Namespace) -> int:  # instead of starting kopf
        seen.append(args)
        return 0

    monkeypatch.setattr(cli, "_operator", operator)
    assert cli.main(container["args"]) == 0
    (args,) = seen
    assert args.liveness == LIVENESS
    assert args.metrics_port == {"defaults": 9090, "monitoring": 9191, "namespaced": None}[values]
    assert args.namespace == ([] if values != "namespaced" else ["mail", "mail-staging"])
    assert args.verbose == (values == "monitoring") and args.usage_interval == (0 if values == "monitoring" else 60)


def test_the_operator_deployment() -> None:
    deployment = the(rendered("defaults"), "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}  # standalone kopf: never two
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/mailfleet/mailfleet:0.1.0"
    assert container["args"][0] == "operator"
    assert "--metrics-port=9090" in container["args"]
    assert f"--liveness={LIVENESS}" in container["args"]
    assert not [arg for arg in container["args"] if arg.startswith("--namespace")]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["MAILFLEET_NODE_IMAGE"] == container["image"]
    # The operator's namespace, from the downward API: the nodes' NetworkPolicies admit it from there.
    assert env["MAILFLEET_OPERATOR_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert set(env) <= set(options.environment_variables())  # each one an option of `mailfleet operator`
    liveness_port = int(LIVENESS.split(":")[2].split("/")[0])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": liveness_port, "metrics": 9090}
    for probe in (container["livenessProbe"], container["readinessProbe"]):
        assert probe["httpGet"] == {"path": "/healthz", "port": "health"}
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == common.RUN_AS
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsUser"] == common.RUN_AS
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == tmp["name"]]
    assert "emptyDir" in volume
    assert pod["serviceAccountName"] == the(rendered("defaults"), "ServiceAccount")["metadata"]["name"]


def test_watched_namespaces_and_node_image() -> None:
    objects = rendered("namespaced")
    (container,) = the(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [a for a in container["args"] if a.startswith("--namespace")] == [
        "--namespace=mail",
        "--namespace=mail-staging",
    ]
    assert not [a for a in container["args"] if a.startswith("--metrics-port")]
    assert [p["name"] for p in container["ports"]] == ["health"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MAILFLEET_NODE_IMAGE"] == "registry.example.com/mailfleet-node:0.1.0-node"
    assert container["image"] == "ghcr.io/mailfleet/mailfleet:0.1.0"
    assert the(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "mail-operator"


# -- RBAC --------------------------------------------------------------------------------------------

WRITES = {"get", "list", "watch", "create", "patch"}  # k8s.apply: get, create, merge patch; kopf: list, watch
# Every kind of mailfleet.k8s.client.KINDS, with the verbs the operator uses on it. A kind added there
# fails this test until it gets its line here and its rule in templates/rbac.yaml.
NAMESPACED: dict[tuple[str, str], set[str]] = {
    ("", "configmaps"): WRITES,
    ("", "secrets"): WRITES,  # also reads the password, TLS and relay Secrets the resources name
    ("", "services"): WRITES,
    ("", "serviceaccounts"): WRITES,
    ("apps", "statefulsets"): WRITES,
    ("policy", "poddisruptionbudgets"): WRITES,
    ("networking.k8s.io", "networkpolicies"): WRITES,
    ("", "events"): {"create"},  # k8s.events.Recorder posts them (kopf's own posting is off)
    ("", "pods"): set(),  # in KINDS, never requested: node 0 is reached over HTTP (mailfleet.nodes)
    ("mailfleet.io", "maildomains"): {"get", "list", "watch"},
    ("mailfleet.io", "mailboxes"): {"get", "list", "watch", "patch"},  # the mailfleet.io/move finalizer
    ("mailfleet.io", "mailbackups"): {"get", "list", "watch", "create", "delete"},  # schedule and retention
    ("mailfleet.io", "maildomains/status"): {"patch"},
    ("mailfleet.io", "mailboxes/status"): {"patch"},
    ("mailfleet.io", "mailbackups/status"): {"patch"},
    # reconcile/backup.py: VolumeSnapshots of a MailBackup (deleted when it fails, or by retention)
    ("snapshot.storage.k8s.io", "volumesnapshots"): {"get", "list", "watch", "create", "delete"},
    ("", "persistentvolumeclaims"): {"get", "list", "create"},  # a backup checks them; a restore makes them
    # reconcile/certificate.py: the Certificate of spec.tls.issuerRef (read, not watched; deleted when unset)
    ("cert-manager.io", "certificates"): {"get", "create", "patch", "delete"},
}
# kopf: lists and watches CRDs to resolve the resources; with namespaces given, follows namespaces too.
CRDS = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}
NAMESPACES = {("", "namespaces"): {"list", "watch"}}


def grants(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def test_the_rbac_table_covers_every_kind_the_client_knows() -> None:
    known = {(kind.api_version.rpartition("/")[0], kind.plural) for kind in k8s.KINDS.values()}
    assert {key for key in NAMESPACED if "/" not in key[1]} == known


def test_cluster_wide_rbac_is_what_the_operator_uses() -> None:
    objects = rendered("defaults")
    role = the(objects, "ClusterRole")
    expected = {key: verbs for key, verbs in NAMESPACED.items() if verbs} | CRDS
    assert grants(role["rules"]) == expected
    assert not find(objects, "Role")
    binding = the(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    account = the(objects, "ServiceAccount")["metadata"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["name"], "namespace": "mailfleet-system"}]


def test_namespaced_rbac_is_a_role_in_each_watched_namespace() -> None:
    objects = rendered("namespaced")
    assert grants(the(objects, "ClusterRole")["rules"]) == CRDS | NAMESPACES
    roles = {r["metadata"]["namespace"]: r for r in find(objects, "Role")}
    bindings = {b["metadata"]["namespace"]: b for b in find(objects, "RoleBinding")}
    assert set(roles) == set(bindings) == {"mail", "mail-staging"}
    for namespace, role in roles.items():
        assert grants(role["rules"]) == {key: verbs for key, verbs in NAMESPACED.items() if verbs}
        binding = bindings[namespace]
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "mail-operator", "namespace": "mailfleet-system"}
        ]


# -- alerts and dashboard ----------------------------------------------------------------------------

METRIC = re.compile(r"\b(?:mailnode|mailfleet_operator)_[a-z_]+\b")


def exported_metrics() -> set[str]:
    """The series names the node and the operator expose (a counter as <name>_total, and so on)."""
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    registries: list[prom.CollectorRegistry] = [NodeMetrics().registry, OperatorMetrics().registry]
    return {
        family.name + suffix
        for registry in registries
        for family in registry.collect()
        for suffix in suffixes[family.type]
    }


def test_alerts_name_metrics_that_exist() -> None:
    rule = the(rendered("monitoring"), "PrometheusRule")
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert {"MailNodeNotReady", "MailQueueBacklog", "MailQueueStuck", "MailAuthFailures"} <= set(alerts)
    assert 'mailfleet_operator_reconciles_total{result="error"}' in alerts["MailfleetOperatorReconcileErrors"]["expr"]
    named = {name for r in alerts.values() for name in METRIC.findall(r["expr"])}
    assert named and named <= exported_metrics()
    for alert in alerts.values():
        assert alert["labels"]["severity"] in {"warning", "critical"} and alert["annotations"]["summary"]
        assert "{{ $labels" in alert["annotations"]["summary"]  # Prometheus's templating left for Prometheus


def test_backup_alerts() -> None:
    """On the operator's backup metrics (reconcile/backup.py, reconcile/schedule.py); the summaries name only
    labels the alerting series carry."""
    rule = the(rendered("monitoring"), "PrometheusRule")
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    stale, failing = alerts["MailfleetBackupsStale"], alerts["MailfleetBackupFailing"]
    assert (stale["expr"], stale["for"]) == ("mailfleet_operator_backups_stale == 1", "15m")
    assert 'increase(mailfleet_operator_backups_total{result="failed"}[1h])' in failing["expr"]
    metrics = OperatorMetrics()
    carried = {
        "MailfleetBackupsStale": set(metrics.backups_stale._labelnames),
        "MailfleetBackupFailing": {"method"},  # sum by (method)
    }
    assert "sum by (method)" in failing["expr"] and "method" in metrics.backups._labelnames
    for name, labels in carried.items():
        named = set(re.findall(r"\$labels\.([a-z_]+)", alerts[name]["annotations"]["summary"]))
        assert named and named <= labels, name
    # The MailDomain's namespace label stays namespace (not exported_namespace) when scraped.
    (endpoint,) = the(rendered("monitoring"), "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["honorLabels"] is True


def test_dashboard_is_grafana_json_on_exported_metrics() -> None:
    configmap = the(rendered("monitoring"), "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(configmap["data"]["mailfleet.json"])
    assert dashboard["uid"] == "mailfleet" and len(dashboard["panels"]) >= 4
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    named = {name for expr in exprs for name in METRIC.findall(expr)}
    assert named and named <= exported_metrics()


# -- values schema, notes, helm test -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ("replicaCount=notanumber", "replicaCount"),
        ("replicaCount=2", "replicaCount"),  # standalone kopf
        ("metrics.port=70000", "port"),
        ("metrics.enabeld=true", "enabeld"),  # a typo is refused, not ignored
        ("watchNamespaces={mail-*}", "watchNamespaces"),  # a Role needs a real namespace name
    ],
)
def test_the_values_schema_refuses_bad_values(setting: str, field: str) -> None:
    result = helm("template", "mail", str(CHART), "--set", setting, check=False)
    assert result.returncode != 0
    assert "schema" in result.stderr and field in result.stderr, result.stderr


def test_notes_say_what_to_do_next() -> None:
    result = helm("install", "mail", str(CHART), "--dry-run=client", "--namespace", "mailfleet-system")
    notes = result.stdout.partition("NOTES:")[2]
    assert "kubectl create namespace mail\n" in notes
    assert "kubectl -n mail apply -f examples/maildomain.yaml -f examples/mailboxes.yaml" in notes
    assert "kubectl -n mail get md,mbx" in notes
    assert "{.status.dnsRecords[*]}" in notes.replace("range ", "")
    assert "helm test mail" in notes
    namespaced = helm(
        "install", "mail", str(CHART), "--dry-run=client", "-f", str(VALUES / "namespaced.yaml")
    ).stdout.partition("NOTES:")[2]
    assert "watching the namespaces mail, mail-staging" in namespaced and "kubectl -n mail get md,mbx" in namespaced
    assert "create namespace" not in namespaced


@pytest.mark.parametrize("values", VALUE_FILES)
def test_the_helm_test_hook(values: str) -> None:
    objects = rendered(values)
    (pod,) = [o for o in find(objects, "Pod") if o["metadata"]["annotations"].get("helm.sh/hook") == "test"]
    (container,) = pod["spec"]["containers"]
    assert container["image"] == the(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert container["command"] == ["python", "-c"]
    script = container["args"][0]
    compile(script, "helm-test", "exec")  # the Python it runs is Python
    service = the(objects, "Service")["metadata"]["name"]
    assert f"http://{service}.mailfleet-system.svc" in script and ":8081/healthz" in script
    assert ("/metrics" in script) == (values != "namespaced")  # metrics are off there
    assert container["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
