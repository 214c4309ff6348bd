"""Pure builders: resource models (mailfleet.api) and plain values in, Kubernetes objects (dicts) out.

No I/O and no Kubernetes client: reconcile/ reads what the builders need (Secrets, keys), calls them,
adds owner references (`Rendered.owned_by`) and applies the result; `mailfleet render` prints it. Split
by what they build: `node` (the node's config and directory files), `workload` (StatefulSet and what it
mounts), `network` (Services, NetworkPolicy, DNS records), `backup` (MailBackups, VolumeSnapshots and
restore claims), `placement` (each mailbox's home node), `common` (names, labels, owner references).
`render` builds every object of a domain as one named bundle (`Rendered`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import yaml

from mailfleet import api, kube_types
from mailfleet.specs import common, placement
from mailfleet.specs.common import checksum, labels, owner_reference, with_owner
from mailfleet.specs.network import client_service, dns_records, headless_service, network_policy
from mailfleet.specs.node import directory, directory_content, homes, node_config, password_key
from mailfleet.specs.workload import (
    config_map,
    directory_secret,
    dkim_secret,
    internal_secret,
    pod_disruption_budget,
    service_account,
    statefulset,
)

__all__ = [
    "Rendered",
    "checksum",
    "client_service",
    "config_map",
    "directory",
    "directory_content",
    "directory_secret",
    "dkim_secret",
    "dns_records",
    "dump",
    "headless_service",
    "homes",
    "internal_secret",
    "labels",
    "network_policy",
    "node_config",
    "owner_reference",
    "password_key",
    "placement",
    "pod_disruption_budget",
    "render",
    "service_account",
    "statefulset",
    "with_owner",
]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the files inside ConfigMaps and Secrets, PEM keys) as literal blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _represent_str)


def dump(data: Any) -> str:
    """YAML as the files in ConfigMaps and Secrets are written: block style, keys in the order built."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


@dataclasses.dataclass(frozen=True)
class Rendered:
    """Every object of a domain, by name. `in_apply_order` lists them for callers that apply or print all
    of them; callers that look at one (the directory's size, the StatefulSet's fixed fields) name it."""

    service_account: kube_types.Manifest
    configmap: kube_types.Manifest  # the node config
    directory: kube_types.Manifest  # the directory Secret (mailboxes and password hashes)
    dkim: kube_types.Manifest | None  # the DKIM key's Secret, when the key was given
    internal: kube_types.Manifest | None  # the internal token's Secret, when the token was given
    headless_service: kube_types.Manifest
    client_service: kube_types.Manifest
    network_policy: kube_types.Manifest
    pod_disruption_budget: kube_types.Manifest
    statefulset: kube_types.Manifest

    def in_apply_order(self) -> list[kube_types.Manifest]:
        """What is mounted or referenced comes before the StatefulSet that uses it (the field order)."""
        found = (getattr(self, field.name) for field in dataclasses.fields(self))
        return [obj for obj in found if obj is not None]

    def owned_by(self, domain: api.MailDomain) -> Rendered:
        """The same objects with the domain as their owner (Kubernetes deletes them with it)."""
        owned: dict[str, Any] = {
            field.name: None if (obj := getattr(self, field.name)) is None else with_owner(obj, domain)
            for field in dataclasses.fields(self)
        }
        return dataclasses.replace(self, **owned)


def render(
    domain: api.MailDomain,
    mailboxes: list[api.Mailbox],
    passwords: Mapping[str, str],
    *,
    image: str,
    dkim_private_key: str | None = None,
    relay_username: str | None = None,
    internal_token: str | None = None,
    operator_namespace: str | None = None,
    placed: Mapping[str, int] | None = None,
) -> Rendered:
    """Every object of the domain. The DKIM and internal Secrets are included when the key and the token
    are given (the caller makes them once and keeps them; a builder makes no keys). `passwords`: see
    `directory`; `operator_namespace`: see `network_policy`; `placed`: each mailbox's home (`node.homes`,
    by rendezvous alone when None)."""
    config_yaml = dump(node_config(domain, relay_username=relay_username, backup_dir=common.BACKUP_DIR))
    return Rendered(
        service_account=service_account(domain),
        configmap=config_map(domain, config_yaml),
        directory=directory_secret(domain, directory_content(directory(domain, mailboxes, passwords, placed=placed))),
        dkim=None if dkim_private_key is None else dkim_secret(domain, dkim_private_key),
        internal=None if internal_token is None else internal_secret(domain, internal_token),
        headless_service=headless_service(domain),
        client_service=client_service(domain),
        network_policy=network_policy(domain, operator_namespace=operator_namespace),
        pod_disruption_budget=pod_disruption_budget(domain),
        statefulset=statefulset(domain, image=image, config_checksum=checksum(config_yaml + (internal_token or ""))),
    )
