"""How mail reaches the nodes: the client Service, the headless Service of the StatefulSet, the
NetworkPolicy, and the DNS records to publish. Pure builders."""

from __future__ import annotations

from typing import Any

from mailfleet import api, kube_types
from mailfleet.specs import common, workload
from mailwire import config as wire_config
from mailwire import mtasts


def client_service(domain: api.MailDomain) -> kube_types.Manifest:
    """The Service clients and other mail servers reach: 25, 587, 465, 143, 993 (and 443 with a certificate)
    -> the named container ports."""
    service = domain.spec.service
    spec: dict[str, Any] = {
        "type": service.type,
        "selector": common.selector_labels(domain),
        "ports": [
            {"name": name, "port": port, "targetPort": name, "protocol": "TCP"}
            for name, port in common.service_ports(domain).items()
        ],
    }
    if service.type in ("LoadBalancer", "NodePort"):  # the API server refuses it on a ClusterIP Service
        spec["externalTrafficPolicy"] = service.external_traffic_policy
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": common.metadata(domain, common.statefulset_name(domain), annotations=service.annotations),
        "spec": spec,
    }


def headless_service(domain: api.MailDomain) -> kube_types.Manifest:
    """The StatefulSet's governing Service: a stable DNS name per node (N-0.N-headless), ready or not, by
    which the nodes of a clustered domain reach each other (its internal ports too)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": common.metadata(domain, common.headless_name(domain)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": common.selector_labels(domain),
            "ports": [
                {"name": name, "port": port, "targetPort": name, "protocol": "TCP"}
                for name, port in workload.container_ports(domain).items()
            ],
        },
    }


def network_policy(domain: api.MailDomain, *, operator_namespace: str | None) -> kube_types.Manifest:
    """Mail ports are open to anyone (the Internet sends mail; clients log in from anywhere), but the
    HTTP port (health, metrics, usage, and node operations such as the queue) only to pods of the same
    namespace and to the operator's pods in `operator_namespace` (it reads each mailbox's usage and takes
    backups): the namespace by the label the API server sets on it, which no one can put on another
    namespace, as anyone who may create a pod can give it the operator's labels. Without
    `operator_namespace` the operator is admitted only as a pod of the domain's own namespace (the caller
    says so). Changes on the HTTP port need the domain's internal token as well (the node checks it).
    A clustered domain's internal ports (LMTP, IMAP proxy) admit its own pods only.
    The kubelet's probes are not subject to NetworkPolicy. A Prometheus in another namespace needs its own
    policy next to this one (policies add up). Egress is left open: nodes deliver mail to any MX."""
    mail_ports = [{"port": name, "protocol": "TCP"} for name in common.service_ports(domain)]
    peers: list[dict[str, Any]] = [{"podSelector": {}}]
    if operator_namespace is not None:
        peers.append(
            {
                "namespaceSelector": {"matchLabels": {common.NAMESPACE_NAME_LABEL: operator_namespace}},
                "podSelector": {"matchLabels": common.OPERATOR_LABELS},
            }
        )
    ingress: list[dict[str, Any]] = [
        {"ports": mail_ports},
        {"from": peers, "ports": [{"port": "http", "protocol": "TCP"}]},
    ]
    if common.clustered(domain):
        # DESIGN.md "Clustering": mail handed over and IMAP sessions proxied between the domain's own
        # nodes only (they carry the internal token as well).
        ingress.append(
            {
                "from": [{"podSelector": {"matchLabels": common.selector_labels(domain)}}],
                "ports": [{"port": name, "protocol": "TCP"} for name in common.INTERNAL_PORTS],
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": common.metadata(domain, common.statefulset_name(domain)),
        "spec": {
            "podSelector": {"matchLabels": common.selector_labels(domain)},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }


def dns_records(domain: api.MailDomain, *, dkim_record: str | None) -> list[dict[str, str]]:
    """The records to publish (status.dnsRecords), for the domain and each alias domain, since mail for an
    alias domain arrives by its own MX and the nodes sign its mail with the same key. `dkim_record` is
    the TXT value of the domain's key (v=DKIM1; k=rsa; p=...), when there is one. With a certificate
    (the HTTPS listener), also what clients and other servers find the nodes by: MTA-STS and TLS
    reporting, autoconfig/autodiscover host names and the RFC 6186 (and RFC 6764 for DAV) SRV records."""
    records: list[dict[str, str]] = []
    for name in (domain.spec.domain, *domain.spec.alias_domains):
        records += [
            {"type": "MX", "name": name, "value": f"10 {common.mail_host(domain)}."},
            {"type": "TXT", "name": name, "value": "v=spf1 mx -all"},  # RFC 7208: only the MX hosts send
            {"type": "TXT", "name": f"_dmarc.{name}", "value": "v=DMARC1; p=quarantine"},  # RFC 7489 §6.3
        ]
        if dkim_record is not None and domain.spec.dkim is not None:
            records.append(
                {"type": "TXT", "name": f"{domain.spec.dkim.selector}._domainkey.{name}", "value": dkim_record}
            )
        if common.serves_https(domain):
            records += _https_records(domain, name)
    return records


def mta_sts_policy(domain: api.MailDomain) -> str:
    """The policy file the nodes serve (mailnode.web.server builds the same from the node config):
    the record's id follows it."""
    max_age = wire_config.WebConfig().mta_sts_max_age
    return mtasts.policy(mode=domain.spec.mta_sts, mx=[common.mail_host(domain)], max_age=max_age)


def _https_records(domain: api.MailDomain, name: str) -> list[dict[str, str]]:
    host = f"{common.mail_host(domain)}."
    ports = common.SERVICE_PORTS
    records = [
        {
            "type": "TXT",
            "name": f"_mta-sts.{name}",
            "value": mtasts.txt_record(mta_sts_policy(domain)),
        },  # RFC 8461 §3.1
        # RFC 8460 §3: TLS failure reports to the domain's postmaster
        {
            "type": "TXT",
            "name": f"_smtp._tls.{name}",
            "value": f"v=TLSRPTv1; rua=mailto:postmaster@{domain.spec.domain}",
        },
        {"type": "CNAME", "name": f"mta-sts.{name}", "value": host},
        {"type": "CNAME", "name": f"autoconfig.{name}", "value": host},
        {"type": "CNAME", "name": f"autodiscover.{name}", "value": host},
        # RFC 6186 §3 (priority weight port target), and RFC 8314 §5.1 for implicit-TLS submission
        {"type": "SRV", "name": f"_submissions._tcp.{name}", "value": f"0 1 {ports['submissions']} {host}"},
        {"type": "SRV", "name": f"_submission._tcp.{name}", "value": f"0 1 {ports['submission']} {host}"},
        {"type": "SRV", "name": f"_imaps._tcp.{name}", "value": f"0 1 {ports['imaps']} {host}"},
        {"type": "SRV", "name": f"_imap._tcp.{name}", "value": f"0 1 {ports['imap']} {host}"},
    ]
    if domain.spec.dav.enabled:  # RFC 6764 §3, §4: the service and its context path
        https = common.HTTPS_SERVICE_PORT["https"]
        for service in ("caldavs", "carddavs"):
            records += [
                {"type": "SRV", "name": f"_{service}._tcp.{name}", "value": f"0 1 {https} {host}"},
                {"type": "TXT", "name": f"_{service}._tcp.{name}", "value": "path=/dav/"},
            ]
    return records
