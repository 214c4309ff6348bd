"""The mail nodes themselves: the StatefulSet, the ConfigMap and Secrets it mounts (directory, DKIM key,
internal token), its ServiceAccount and PodDisruptionBudget. Pure builders, called by
`mailfleet.specs.render` and reconcile/."""

from __future__ import annotations

import base64
from typing import Any

from mailfleet import api, kube_types
from mailfleet.specs import common


def config_map(domain: api.MailDomain, node_config_yaml: str) -> kube_types.Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": common.metadata(domain, common.config_name(domain)),
        "data": {common.CONFIG_KEY: node_config_yaml},
    }


def directory_secret(domain: api.MailDomain, content: bytes) -> kube_types.Manifest:
    """The directory holds password hashes, so it is a Secret (mounted as a directory, not with subPath,
    so that the kubelet's updates reach the node, which reloads it). `content`: `node.directory_content`
    (YAML as text, readable with kubectl, or gzip bytes as base64 data)."""
    secret: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": common.metadata(domain, common.directory_name(domain)),
        "type": "Opaque",
    }
    try:
        secret["stringData"] = {common.DIRECTORY_KEY: content.decode("utf-8")}
    except UnicodeDecodeError:  # compressed
        secret["data"] = {common.DIRECTORY_KEY: base64.b64encode(content).decode("ascii")}
    return secret


def dkim_secret(domain: api.MailDomain, private_key_pem: str) -> kube_types.Manifest:
    """The domain's DKIM private key (made once by the caller; a builder makes no keys)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": common.metadata(domain, common.dkim_name(domain)),
        "type": "Opaque",
        "stringData": {common.DKIM_KEY: private_key_pem},
    }


def internal_secret(domain: api.MailDomain, token: str) -> kube_types.Manifest:
    """The domain's internal token (made once by the caller and kept: the nodes require it of the operator
    and, later, of each other), mounted into every node as a file."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": common.metadata(domain, common.internal_name(domain)),
        "type": "Opaque",
        "stringData": {common.INTERNAL_KEY: token},
    }


def service_account(domain: api.MailDomain) -> kube_types.Manifest:
    """The nodes need no Kubernetes API access: no token is mounted."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": common.metadata(domain, common.statefulset_name(domain)),
        "automountServiceAccountToken": False,
    }


def pod_disruption_budget(domain: api.MailDomain) -> kube_types.Manifest:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": common.metadata(domain, common.statefulset_name(domain)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": common.selector_labels(domain)}},
    }


def container_ports(domain: api.MailDomain) -> dict[str, int]:
    """The node container's named ports: the pod contract's, https with a certificate, and the internal ones
    of a clustered domain."""
    return {
        **common.CONTAINER_PORTS,
        **(common.HTTPS_CONTAINER_PORT if common.serves_https(domain) else {}),
        **(common.INTERNAL_PORTS if common.clustered(domain) else {}),
    }


def _probe(path: str, *, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def _resources(spec: api.ResourceRequirements) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    if spec.requests:
        resources["requests"] = dict(spec.requests)
    if spec.limits:
        resources["limits"] = dict(spec.limits)
    return resources


def _volumes(domain: api.MailDomain) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, volumeMounts) of the node container, apart from the "data" claim."""
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": common.config_name(domain)}},
        {"name": "directory", "secret": {"secretName": common.directory_name(domain)}},
        {"name": "internal", "secret": {"secretName": common.internal_name(domain)}},
        {"name": "tmp", "emptyDir": {}},  # the root filesystem is read-only
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "data", "mountPath": common.DATA_DIR},
        {"name": "config", "mountPath": common.CONFIG_DIR, "readOnly": True},
        {"name": "directory", "mountPath": common.DIRECTORY_DIR, "readOnly": True},
        {"name": "internal", "mountPath": common.INTERNAL_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    spec = domain.spec
    if spec.tls is not None:
        volumes.append({"name": "tls", "secret": {"secretName": spec.tls.secret_name}})
        mounts.append({"name": "tls", "mountPath": common.TLS_DIR, "readOnly": True})
    if spec.dkim is not None:
        volumes.append({"name": "dkim", "secret": {"secretName": common.dkim_name(domain)}})
        mounts.append({"name": "dkim", "mountPath": common.DKIM_DIR, "readOnly": True})
    if spec.smtp.relay_host is not None and spec.smtp.relay_secret_ref is not None:
        volumes.append(
            {
                "name": "relay",
                "secret": {
                    "secretName": spec.smtp.relay_secret_ref.name,
                    "items": [{"key": "password", "path": "password"}],
                },
            }
        )
        mounts.append({"name": "relay", "mountPath": common.RELAY_DIR, "readOnly": True})
    if spec.smtp.relay_host is not None and (ca := spec.smtp.relay_ca_secret_ref) is not None:
        items = [{"key": ca.key, "path": common.RELAY_CA_KEY}]
        volumes.append({"name": "relay-ca", "secret": {"secretName": ca.name, "items": items}})
        mounts.append({"name": "relay-ca", "mountPath": common.RELAY_CA_DIR, "readOnly": True})
    if spec.backup is not None and spec.backup.archive_claim_name is not None:
        volumes.append({"name": "backups", "persistentVolumeClaim": {"claimName": spec.backup.archive_claim_name}})
        # One directory per pod: nodes sharing the claim never write the same <backup>.tar.
        mounts.append({"name": "backups", "mountPath": common.BACKUP_DIR, "subPathExpr": "$(POD_NAME)"})
    return volumes, mounts


def claim_spec(domain: api.MailDomain) -> dict[str, Any]:
    """The spec of each node's "data" PersistentVolumeClaim: the StatefulSet's claim template, and the
    claims a restore creates before it (specs.backup.restore_claim)."""
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": domain.spec.storage.size}},
    }
    if domain.spec.storage.storage_class_name is not None:
        spec["storageClassName"] = domain.spec.storage.storage_class_name
    return spec


def statefulset(domain: api.MailDomain, *, image: str, config_checksum: str) -> kube_types.Manifest:
    """The mail nodes. `config_checksum` (of the rendered node config and the internal token, which the
    nodes read at start) goes on the pod template, so a change of either rolls the pods; the directory is
    not in it, since nodes reload it in place."""
    spec = domain.spec
    volumes, mounts = _volumes(domain)
    config_file = f"{common.CONFIG_DIR}/{common.CONFIG_KEY}"
    clustered = common.clustered(domain)
    env: list[dict[str, Any]] = [{"name": common.CONFIG_ENV, "value": config_file}]
    # A node of several takes its ordinal from its pod's name (the config leaves cluster.ordinal unset).
    if clustered or any(mount.get("subPathExpr") for mount in mounts):
        env.append({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    container: dict[str, Any] = {
        "name": "mailnode",
        "image": image,
        "command": ["mailnode", "serve", "--config", config_file],
        "env": env,
        "ports": [
            {"name": name, "containerPort": port, "protocol": "TCP"} for name, port in container_ports(domain).items()
        ],
        "livenessProbe": _probe("/healthz", period=10, failures=3),
        "readinessProbe": _probe("/readyz", period=5, failures=2),
        "startupProbe": _probe("/healthz", period=2, failures=60),  # store recovery may take a while
        "volumeMounts": mounts,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": common.RUN_AS,
            "runAsGroup": common.RUN_AS,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if resources := _resources(spec.resources):
        container["resources"] = resources
    pod_spec: dict[str, Any] = {
        "serviceAccountName": common.statefulset_name(domain),
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 30,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": common.RUN_AS,
            "runAsGroup": common.RUN_AS,
            "fsGroup": common.RUN_AS,  # the claim's files belong to the node's group
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    sts_spec: dict[str, Any] = {
        "replicas": spec.replicas,
        "serviceName": common.headless_name(domain),
        "podManagementPolicy": "Parallel",  # one node: nothing to order
        "selector": {"matchLabels": common.selector_labels(domain)},
        "template": {
            "metadata": {
                "labels": common.labels(domain),
                "annotations": {common.CHECKSUM_ANNOTATION: config_checksum},
            },
            "spec": pod_spec,
        },
        "volumeClaimTemplates": [
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": "data"},
                "spec": claim_spec(domain),
            }
        ],
    }
    if clustered:
        # Nodes apart, one host and one zone each as far as they go (a node down takes its mailboxes'
        # storage with it until it is back), but never left unscheduled for it.
        pod_spec["topologySpreadConstraints"] = [
            {
                "maxSkew": 1,
                "topologyKey": key,
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": common.selector_labels(domain)},
            }
            for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone")
        ]
        # Started and rolled one at a time, each ready before the next (with the PodDisruptionBudget, at
        # most one home is away at once). Fixed at creation, as replicas is (a change is refused).
        sts_spec["podManagementPolicy"] = "OrderedReady"
        sts_spec["updateStrategy"] = {"type": "RollingUpdate"}
        # A node's volume holds the only copy of its mailboxes: deleting the domain or scaling down never
        # deletes it (the MailDomain's spec.replicas description says so).
        sts_spec["persistentVolumeClaimRetentionPolicy"] = {"whenDeleted": "Retain", "whenScaled": "Retain"}
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": common.metadata(domain, common.statefulset_name(domain)),
        "spec": sts_spec,
    }
