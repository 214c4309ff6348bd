"""Pure builders: resource models (mailfleet.api) and plain values in, Kubernetes objects (dicts) out.

No I/O and no Kubernetes client: reconcile/ reads what the builders need (Secrets, keys), calls them,
adds owner references (`with_owner`) and applies the result; `mailfleet render` prints it. Split by what
they build: `node` (the node's config and directory files), `workload` (StatefulSet and what it mounts),
`network` (Services, NetworkPolicy, DNS records), `common` (names, labels, owner references).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from mailfleet import api
from mailfleet.specs import common
from mailfleet.specs.common import checksum, labels, owner_reference, with_owner
from mailfleet.specs.network import client_service, dns_records, headless_service, network_policy
from mailfleet.specs.node import directory, directory_content, node_config, password_key
from mailfleet.specs.workload import (
    config_map,
    directory_secret,
    dkim_secret,
    pod_disruption_budget,
    service_account,
    statefulset,
)

__all__ = [
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
    "labels",
    "network_policy",
    "node_config",
    "owner_reference",
    "password_key",
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


def render(
    domain: api.MailDomain,
    mailboxes: list[api.Mailbox],
    passwords: Mapping[str, str],
    *,
    image: str,
    dkim_private_key: str | None = None,
    relay_username: str | None = None,
) -> list[dict[str, Any]]:
    """Every object of the domain, in apply order: what is mounted or referenced comes before the
    StatefulSet that uses it. The DKIM Secret is included when the key is given (the caller makes it
    once and keeps it; a builder makes no keys). `passwords`: see `directory`."""
    config_yaml = dump(node_config(domain, relay_username=relay_username, backup_dir=common.BACKUP_DIR))
    objects = [
        service_account(domain),
        config_map(domain, config_yaml),
        directory_secret(domain, directory_content(directory(domain, mailboxes, passwords))),
    ]
    if dkim_private_key is not None:
        objects.append(dkim_secret(domain, dkim_private_key))
    objects += [
        headless_service(domain),
        client_service(domain),
        network_policy(domain),
        pod_disruption_budget(domain),
        statefulset(domain, image=image, config_checksum=checksum(config_yaml)),
    ]
    return objects
