"""What every Kubernetes object of a MailDomain shares: names, labels, metadata, owner references, and the
pod contract's ports and paths. Used by the other `mailfleet.specs` modules and by reconcile/."""

from __future__ import annotations

import copy
import datetime
import hashlib
from typing import Any, Final

from mailfleet import api, kube_types

# DESIGN.md, Pod contract: container ports, and the client Service ports they are published on.
CONTAINER_PORTS: Final = {
    "smtp": 2525,
    "submission": 5870,
    "submissions": 4650,
    "imap": 1430,
    "imaps": 9930,
    "http": 8080,
}
# Internal (clustering, replicas > 1 only): declared on the container and the headless Service, never on
# the client Service; the NetworkPolicy admits them from the domain's own pods only.
INTERNAL_PORTS: Final = {"lmtp": 2424, "imap-proxy": 1431}
SERVICE_PORTS: Final = {"smtp": 25, "submission": 587, "submissions": 465, "imap": 143, "imaps": 993}
# The HTTPS listener (autoconfiguration, MTA-STS policy, CalDAV/CardDAV): only with a certificate
HTTPS_CONTAINER_PORT: Final = {"https": 8443}
HTTPS_SERVICE_PORT: Final = {"https": 443}

DATA_DIR: Final = "/var/lib/mailnode"
CONFIG_DIR: Final = "/etc/mailnode/config"
CONFIG_KEY: Final = "node.yaml"
DIRECTORY_DIR: Final = "/etc/mailnode/directory"
DIRECTORY_KEY: Final = "directory.yaml"
TLS_DIR: Final = "/etc/mailnode/tls"
DKIM_DIR: Final = "/etc/mailnode/dkim"
DKIM_KEY: Final = "private.pem"
RELAY_DIR: Final = "/etc/mailnode/relay"
RELAY_CA_DIR: Final = "/etc/mailnode/relay-ca"  # spec.smtp.relayCASecretRef's key, as RELAY_CA_KEY
RELAY_CA_KEY: Final = "ca.crt"
# The domain's internal credential (DESIGN.md "Clustering"): the <name>-internal Secret's token, which
# the nodes require on their admin port (and later on LMTP and the IMAP proxy between nodes).
INTERNAL_DIR: Final = "/etc/mailnode/internal"
INTERNAL_KEY: Final = "token"
# Set in the node container: `kubectl exec <pod> -- mailnode queue ...` finds the config, and its token.
CONFIG_ENV: Final = "MAILNODE_CONFIG"
# Where spec.backup.archiveClaimName is mounted (each pod in its own subdirectory of the claim); without
# a claim the node writes its archives to <data_dir>/backups, on its own volume.
BACKUP_DIR: Final = "/var/lib/mailnode-backups"

# The mail node image the operator runs unless told otherwise (`mailfleet operator --image`).
DEFAULT_IMAGE: Final = "ghcr.io/mailfleet/mailfleet:latest"

# The labels of the operator's own pods (the Helm chart sets them): the nodes' NetworkPolicy lets them
# reach the HTTP port, from the operator's namespace only, told by the label the API server sets on every
# namespace (nobody can set it on another one, unlike a pod label).
OPERATOR_LABELS: Final = {"app.kubernetes.io/name": "mailfleet-operator"}
NAMESPACE_NAME_LABEL: Final = "kubernetes.io/metadata.name"

CHECKSUM_ANNOTATION: Final = "mailfleet.io/config-checksum"
RUN_AS: Final = 10001


def rfc3339(at: datetime.datetime) -> str:
    """A time as Kubernetes writes them (metav1.Time): RFC 3339 in UTC, to the second."""
    return at.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def namespace(domain: api.MailDomain) -> str:
    """The domain's namespace; a resource read from a file without one lands in "default", as kubectl does."""
    return domain.metadata.namespace or "default"


def mail_host(domain: api.MailDomain) -> str:
    return f"mail.{domain.spec.domain}"


def serves_https(domain: api.MailDomain) -> bool:
    """The nodes' HTTPS listener runs with a certificate only; it serves autoconfiguration and the
    MTA-STS policy whether or not spec.dav is enabled, so its port follows spec.tls."""
    return domain.spec.tls is not None


def service_ports(domain: api.MailDomain) -> dict[str, int]:
    """The client Service's ports by name (the container ports of the same names)."""
    return {**SERVICE_PORTS, **(HTTPS_SERVICE_PORT if serves_https(domain) else {})}


def tls_names(domain: api.MailDomain) -> list[str]:
    """The names the domain's certificate must hold: the mail host, and for the domain and each alias
    domain the hosts clients and senders reach over HTTPS (autoconfig., autodiscover.: Outlook fetches
    https://autodiscover.<domain>/ first; mta-sts.: RFC 8461 §3.3), as status.dnsRecords names them."""
    names = [mail_host(domain)]
    for name in (domain.spec.domain, *domain.spec.alias_domains):
        names += [f"autoconfig.{name}", f"autodiscover.{name}", f"mta-sts.{name}"]
    return names


# Object names for a MailDomain named N.
def statefulset_name(domain: api.MailDomain) -> str:
    return domain.metadata.name


def headless_name(domain: api.MailDomain) -> str:
    return f"{domain.metadata.name}-headless"


def certificate_name(domain: api.MailDomain) -> str:
    """The cert-manager Certificate made for spec.tls.issuerRef (reconcile/certificate.py)."""
    return f"{domain.metadata.name}-tls"


def config_name(domain: api.MailDomain) -> str:
    return f"{domain.metadata.name}-config"


def directory_name(domain: api.MailDomain) -> str:
    return f"{domain.metadata.name}-directory"


def dkim_name(domain: api.MailDomain) -> str:
    return f"{domain.metadata.name}-dkim"


def internal_name(domain: api.MailDomain | str) -> str:
    """The Secret of the domain's internal token; `domain` may be the MailDomain's name alone (the
    operator's node clients know no more)."""
    name = domain if isinstance(domain, str) else domain.metadata.name
    return f"{name}-internal"


def clustered(domain: api.MailDomain) -> bool:
    """More than one node: the internal ports, the peers, the spread and the ordered start exist only then,
    so a one-node domain's objects stay as they were before clustering (no roll on an operator upgrade)."""
    return domain.spec.replicas > 1


def pod_name(domain: api.MailDomain, ordinal: int) -> str:
    """The StatefulSet's pod of `ordinal` (Mailbox.status.node)."""
    return f"{statefulset_name(domain)}-{ordinal}"


def pod_host(domain: api.MailDomain, ordinal: int) -> str:
    """The pod's DNS name in the headless Service, as the other nodes reach it."""
    return f"{pod_name(domain, ordinal)}.{headless_name(domain)}.{namespace(domain)}.svc"


def selector_labels(domain: api.MailDomain) -> dict[str, str]:
    """The labels a selector matches on: few and never changing, since a StatefulSet's selector is immutable."""
    return {"app.kubernetes.io/name": "mailnode", "app.kubernetes.io/instance": domain.metadata.name}


def labels(domain: api.MailDomain) -> dict[str, str]:
    return {
        **selector_labels(domain),
        "app.kubernetes.io/component": "mail-node",
        "app.kubernetes.io/part-of": "mailfleet",
        "app.kubernetes.io/managed-by": "mailfleet-operator",
    }


def metadata(domain: api.MailDomain, name: str, *, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace(domain), "labels": labels(domain)}
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def controller_reference(resource: api.MailDomain | api.MailBackup) -> dict[str, Any]:
    """The reference that makes one of our resources own (and control) an object, garbage-collected with it."""
    kind, meta = resource.kind_name, resource.metadata
    if not meta.uid:
        raise ValueError(f"{kind} {meta.name} has no metadata.uid; it must come from the API server")
    return {
        "apiVersion": api.API_VERSION,
        "kind": kind,
        "name": meta.name,
        "uid": meta.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owner_reference(domain: api.MailDomain) -> dict[str, Any]:
    """The reference that makes the MailDomain own an object (garbage-collected with it)."""
    return controller_reference(domain)


def with_owner(obj: kube_types.Manifest, domain: api.MailDomain) -> kube_types.Manifest:
    """A copy of `obj` owned by `domain` (the input is left as it is)."""
    owned = copy.deepcopy(obj)
    owned.setdefault("metadata", {})["ownerReferences"] = [owner_reference(domain)]
    return owned


def checksum(text: str) -> str:
    """A short digest of rendered content, put on the pod template so that a change rolls the pods."""
    return hashlib.sha256(text.encode()).hexdigest()[:32]
