"""The custom resources of mailfleet.io/v1alpha1 (MailDomain, Mailbox, MailBackup) as pydantic models.

These models are the source of truth: `mailfleet.crds` generates the CRDs (crds/) from them, the
operator parses the bodies kopf hands it into them, and `mailfleet render`/`local up` read example files
with them. So every rule here that OpenAPI can express also appears in the CRD schema (a pattern, an
enum, a minimum), and every field has a description for `kubectl explain`. No behaviour lives here.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import ipaddress
import math
import re
from collections.abc import Callable, Hashable, Sequence
from typing import Annotated, Any, ClassVar, Final, Literal, TypeVar

import pydantic
import pydantic_core
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue

GROUP = "mailfleet.io"
VERSION = "v1alpha1"
API_VERSION: Final = "mailfleet.io/v1alpha1"

# ---------------------------------------------------------------------------------------------------
# Value types. Each pairs a Python check (with a message a user can act on) with the JSON schema the
# CRD carries. The regular expressions are plain enough to mean the same in Python, in pydantic's Rust
# engine and in the API server's Go RE2.

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DOMAIN_PATTERN = rf"^{_LABEL}(\.{_LABEL})+$"
_ATOM = r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+"
ADDRESS_PATTERN = rf"^{_ATOM}(\.{_ATOM})*@{_LABEL}(\.{_LABEL})+$"  # RFC 5322 §3.4.1 dot-atom, lower case
NAME_PATTERN = rf"^{_LABEL}(\.{_LABEL})*$"  # a Kubernetes object name (RFC 1123 subdomain)
LABEL_PATTERN = rf"^{_LABEL}$"
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
# resource.Quantity without a sign: sizes and resource amounts are never negative.
QUANTITY_PATTERN = (
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
SCHEDULE_PATTERN = r"^(@(annually|yearly|monthly|weekly|daily|midnight|hourly)|(\S+\s+){4}\S+)$"
RELAY_HOST_PATTERN = r"^(\[[A-Za-z0-9.:-]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?$"  # Postfix relayhost: [host]:port
DURATION_PATTERN = r"^([0-9]+[smhd])+$"  # 30d, 36h, 1d12h: a Go duration, with days
CIDR_PATTERN = r"^[0-9A-Fa-f.:]+/[0-9]{1,3}$"  # 10.0.0.0/8, 2001:db8::/32 (ipaddress checks the rest)


@dataclasses.dataclass(frozen=True)
class _Matches:
    """Annotation for a string that must match `pattern`: checked with a message naming what was
    expected, and written into the JSON schema as pattern and maxLength."""

    pattern: str
    what: str
    example: str
    max_length: int

    def __get_pydantic_core_schema__(
        self, source: Any, handler: pydantic.GetCoreSchemaHandler
    ) -> pydantic_core.CoreSchema:
        return pydantic_core.core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: pydantic_core.CoreSchema, handler: pydantic.GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "pattern": self.pattern, "maxLength": self.max_length}

    def _check(self, value: str) -> str:
        if len(value) > self.max_length:
            raise ValueError(f"{value[:40]!r}... is longer than {self.max_length} characters")
        if not re.match(self.pattern, value):
            raise ValueError(f"{value!r} is not {self.what} (for example {self.example!r})")
        return value


DomainName = Annotated[str, _Matches(DOMAIN_PATTERN, "a lower-case DNS domain name", "example.com", 253)]
Address = Annotated[str, _Matches(ADDRESS_PATTERN, "a lower-case mail address local@domain", "alice@example.com", 254)]
ObjectName = Annotated[str, _Matches(NAME_PATTERN, "a Kubernetes object name", "mail-tls", 253)]
Label = Annotated[str, _Matches(LABEL_PATTERN, "a lower-case DNS label", "phone", 63)]
SecretKey = Annotated[str, _Matches(SECRET_KEY_PATTERN, "a Secret key", "password", 253)]
Schedule = Annotated[str, _Matches(SCHEDULE_PATTERN, "a cron schedule (five fields or @daily)", "0 3 * * *", 100)]
RelayHost = Annotated[str, _Matches(RELAY_HOST_PATTERN, "a relay host", "[smtp.example.net]:587", 260)]
Duration = Annotated[str, _Matches(DURATION_PATTERN, "a duration in s, m, h and d", "30d", 32)]


def _check_cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an address range in CIDR notation (for example '10.0.0.0/8')") from None
    return value


CIDR = Annotated[
    str,
    _Matches(CIDR_PATTERN, "an address range in CIDR notation", "10.0.0.0/8", 49),
    pydantic.AfterValidator(_check_cidr),
]

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(duration: str) -> int:
    """The seconds of a Duration ("30d" -> 2592000, "1d12h" -> 129600)."""
    return sum(int(number) * _DURATION_UNITS[unit] for number, unit in re.findall(r"([0-9]+)([smhd])", duration))


_QUANTITY_RE = re.compile(QUANTITY_PATTERN)


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative; a quantity here is never negative")
        return value
    if not _QUANTITY_RE.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (for example '1Gi', '500M', '250m' or 1024)")
    return value


# Kubernetes' own int-or-string form of resource.Quantity, as controller-gen writes it.
Quantity = Annotated[
    pydantic.StrictInt | pydantic.StrictStr,
    pydantic.AfterValidator(_check_quantity),
    pydantic.WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "minimum": 0,
            "x-kubernetes-int-or-string": True,
        }
    ),
]

_QUANTITY_SUFFIXES: dict[str, decimal.Decimal] = {
    "": decimal.Decimal(1), "n": decimal.Decimal("1e-9"), "u": decimal.Decimal("1e-6"), "m": decimal.Decimal("1e-3"),
    **{suffix: decimal.Decimal(1000) ** power for power, suffix in enumerate("kMGTPE", start=1)},
    **{f"{suffix}i": decimal.Decimal(1024) ** power for power, suffix in enumerate("KMGTPE", start=1)},
}  # fmt: skip


def validation_message(error: pydantic.ValidationError) -> str:
    """A model's validation errors on one line, each as "field.path: message", as conditions, Events and
    `mailfleet render` show them."""
    return "; ".join(
        f"{'.'.join(str(part) for part in problem['loc']) or '(top level)'}: {problem['msg']}"
        for problem in error.errors()
    )


def quantity_value(quantity: int | str) -> int:
    """The value of a quantity, rounded up to a whole number as Kubernetes' `Quantity.Value()` does
    ("1Gi" -> 1073741824, "1.5k" -> 1500, "100m" -> 1)."""
    if isinstance(quantity, int):
        return quantity
    match = re.match(r"^([0-9.]+)(.*)$", quantity)
    if not match or not _QUANTITY_RE.match(quantity):
        raise ValueError(f"{quantity!r} is not a Kubernetes quantity")
    number, suffix = decimal.Decimal(match.group(1)), match.group(2)
    if suffix in _QUANTITY_SUFFIXES:
        return math.ceil(number * _QUANTITY_SUFFIXES[suffix])
    return math.ceil(decimal.Decimal(quantity))  # a decimal exponent: 1e3


Item = TypeVar("Item")


def _unique(items: list[Item], *, key: Callable[[Item], Hashable], what: str) -> list[Item]:
    seen: set[Hashable] = set()
    for item in items:
        if key(item) in seen:
            raise ValueError(f"{what} {key(item)!r} is listed twice")
        seen.add(key(item))
    return items


_SET: JsonSchemaValue = {
    "x-kubernetes-list-type": "set"
}  # lists of unique scalars, merged as sets by server-side apply


# ---------------------------------------------------------------------------------------------------
# Base models


class _Model(pydantic.BaseModel):
    """camelCase in YAML, snake_case in Python. Strict, as the API server is: unknown fields are an
    error (as with `kubectl apply --validate=strict`), so a misspelt field never silently does nothing,
    and "3" is not an integer nor "yes" a boolean."""

    model_config = pydantic.ConfigDict(
        extra="forbid", frozen=True, strict=True, alias_generator=to_camel, populate_by_name=True
    )


class _Status(_Model):
    """Status is written by the operator alone; unknown fields (from another operator version) are
    ignored, never fatal."""

    model_config = pydantic.ConfigDict(extra="ignore", strict=False)  # timestamps arrive as RFC 3339 strings


def _object(factory: Callable[[], Any], description: str) -> Any:
    """A sub-object whose fields all have defaults. `default: {}` in the CRD lets the API server fill in
    the nested defaults too, so `kubectl get -o yaml` shows what the operator will use."""
    return pydantic.Field(default_factory=factory, description=description, json_schema_extra={"default": {}})


class SecretKeySelector(_Model):
    """One key of a Secret in the resource's namespace."""

    name: ObjectName = pydantic.Field(description="Name of the Secret, in the same namespace.")
    key: SecretKey = pydantic.Field("password", description="Key in the Secret's data that holds the value.")


class LocalObjectReference(_Model):
    """An object in the resource's namespace, by name."""

    name: ObjectName = pydantic.Field(description="Name of the object, in the same namespace.")


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(_Status):
    """One aspect of the resource's state, in the shape of Kubernetes' metav1.Condition."""

    type: str = pydantic.Field(
        description="Kind of condition: Ready, Progressing or Degraded.", pattern=r"^[A-Za-z][A-Za-z0-9]*$"
    )
    status: ConditionStatus = pydantic.Field(description="True, False or Unknown.")
    reason: str = pydantic.Field(
        description="A CamelCase word saying why the condition is in this status, for machines.",
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        max_length=1024,
    )
    message: str = pydantic.Field("", description="What is wrong or what is happening, for people.", max_length=32768)
    observed_generation: int | None = pydantic.Field(
        None, ge=0, description="The metadata.generation of the spec this condition was computed from."
    )
    last_transition_time: datetime.datetime = pydantic.Field(description="When the status last changed (RFC 3339).")


def _conditions() -> Any:
    return pydantic.Field(
        default_factory=list,
        description="The latest observations of the resource's state: Ready, Progressing and Degraded.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


_OBSERVED_GENERATION = "The metadata.generation of the spec the operator last reconciled."


class ObjectMeta(pydantic.BaseModel):
    """The parts of Kubernetes object metadata the operator reads; the rest is ignored."""

    model_config = pydantic.ConfigDict(extra="ignore", frozen=True, alias_generator=to_camel, populate_by_name=True)

    name: str = pydantic.Field(description="Name of the object.")
    namespace: str | None = pydantic.Field(None, description="Namespace of the object.")
    uid: str | None = pydantic.Field(None, description="UID, for owner references.")
    generation: int | None = pydantic.Field(None, description="Generation of the spec.")
    resource_version: str | None = pydantic.Field(None, description="Resource version, for optimistic locking.")
    labels: dict[str, str] = pydantic.Field(default_factory=dict, description="Labels.")
    annotations: dict[str, str] = pydantic.Field(default_factory=dict, description="Annotations.")
    creation_timestamp: datetime.datetime | None = pydantic.Field(None, description="When the object was created.")


@dataclasses.dataclass(frozen=True)
class PrinterColumn:
    """A column of `kubectl get` (a CRD additionalPrinterColumn)."""

    name: str
    type: Literal["string", "integer", "number", "boolean", "date"]
    json_path: str
    description: str


def _age() -> PrinterColumn:
    return PrinterColumn("Age", "date", ".metadata.creationTimestamp", "Time since the resource was created.")


def _ready() -> PrinterColumn:
    return PrinterColumn("Ready", "string", '.status.conditions[?(@.type=="Ready")].status', "The Ready condition.")


class Resource(_Model):
    """A whole custom resource. The class variables say how the CRD names it."""

    kind_name: ClassVar[str]
    plural: ClassVar[str]
    short_names: ClassVar[Sequence[str]]
    printer_columns: ClassVar[Sequence[PrinterColumn]]
    categories: ClassVar[Sequence[str]] = ("mailfleet",)

    api_version: Literal["mailfleet.io/v1alpha1"] = pydantic.Field(API_VERSION, description="mailfleet.io/v1alpha1.")
    metadata: ObjectMeta = pydantic.Field(description="Standard object metadata.")


# ---------------------------------------------------------------------------------------------------
# MailDomain


class StorageSpec(_Model):
    """The persistent volume of each mail node (one PersistentVolumeClaim per replica)."""

    size: Quantity = pydantic.Field("1Gi", description="Size of each node's volume, a quantity such as 10Gi.")
    storage_class_name: ObjectName | None = pydantic.Field(
        None, description="StorageClass of the volumes; the cluster's default class when empty."
    )


class ResourceRequirements(_Model):
    """CPU and memory for each mail node container, as in a Pod spec."""

    requests: dict[str, Quantity] = pydantic.Field(
        default_factory=dict, description="Minimum resources, such as cpu: 100m and memory: 128Mi."
    )
    limits: dict[str, Quantity] = pydantic.Field(
        default_factory=dict, description="Maximum resources, such as memory: 512Mi."
    )


ServiceType = Literal["ClusterIP", "NodePort", "LoadBalancer"]


TrafficPolicy = Literal["Cluster", "Local"]


class ProxyProtocolSpec(_Model):
    """The PROXY protocol (v1 and v2, as HAProxy, AWS NLB and most cloud load balancers send it) on the
    SMTP and IMAP ports: the client address it carries is the one the nodes use for throttling, SPF,
    logs and the Received header."""

    enabled: bool = pydantic.Field(
        False,
        description=(
            "Expect a PROXY protocol header on every SMTP and IMAP connection. Turn it on only together with "
            "the load balancer's own setting: a connection without a header is closed."
        ),
    )
    trusted_ranges: list[CIDR] = pydantic.Field(
        default_factory=list,
        description=(
            "Source address ranges (CIDR) of the load balancers allowed to send the header; connections from "
            "anywhere else are closed. Required when enabled."
        ),
        json_schema_extra=_SET,
    )

    @pydantic.model_validator(mode="after")
    def _ranges_when_enabled(self) -> ProxyProtocolSpec:
        if self.enabled and not self.trusted_ranges:
            raise ValueError("trustedRanges: at least one range when the PROXY protocol is enabled")
        return self


class ServiceSpec(_Model):
    """The Service that clients and other mail servers reach (ports 25, 587, 465, 143, 993)."""

    type: ServiceType = pydantic.Field("LoadBalancer", description="Service type: ClusterIP, NodePort or LoadBalancer.")
    annotations: dict[str, str] = pydantic.Field(
        default_factory=dict, description="Annotations for the Service, such as a cloud load balancer's settings."
    )
    external_traffic_policy: TrafficPolicy = pydantic.Field(
        "Local",
        description=(
            "Local keeps the client's address visible to SMTP (needed for logging and rate limits); Cluster "
            "spreads load over every node. Applies to NodePort and LoadBalancer Services only."
        ),
    )
    proxy_protocol: ProxyProtocolSpec = pydantic.Field(
        default_factory=ProxyProtocolSpec,
        description="PROXY protocol from the load balancer in front of the Service (off by default).",
        json_schema_extra={
            "default": {},
            # the API server's half of ProxyProtocolSpec's own check; has(): the API server also checks the
            # rule against the default {} itself, which has no `enabled` (defaults inside it are not applied)
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.enabled) || !self.enabled || "
                    "(has(self.trustedRanges) && size(self.trustedRanges) > 0)",
                    "message": "trustedRanges: at least one range when the PROXY protocol is enabled",
                }
            ],
        },
    )


KIND_PATTERN = r"^[A-Z][A-Za-z0-9]*$"  # a Kubernetes kind: Issuer, ClusterIssuer, an external issuer's
KindName = Annotated[str, _Matches(KIND_PATTERN, "a Kubernetes kind", "ClusterIssuer", 63)]
ApiGroup = Annotated[str, _Matches(NAME_PATTERN, "an API group", "cert-manager.io", 253)]


class IssuerRef(_Model):
    """The cert-manager issuer of the domain's certificate (cert-manager's own issuerRef, copied)."""

    name: ObjectName = pydantic.Field(description="Name of the issuer.")
    kind: KindName = pydantic.Field(
        "Issuer", description="Issuer (in the MailDomain's namespace), ClusterIssuer, or an external issuer's kind."
    )
    group: ApiGroup = pydantic.Field("cert-manager.io", description="API group of the issuer's kind.")


class TLSSpec(_Model):
    """The certificate the mail nodes present (STARTTLS, SMTPS, IMAPS, HTTPS)."""

    secret_name: ObjectName = pydantic.Field(
        description=(
            "Name of a kubernetes.io/tls Secret (tls.crt, tls.key) in the same namespace, e.g. from cert-manager."
        )
    )
    issuer_ref: IssuerRef | None = pydantic.Field(
        None,
        description=(
            "When set, the operator creates a cert-manager.io/v1 Certificate (owned by the MailDomain) that "
            "fills secretName, for every host name the certificate must hold (status.conditions Certificate); "
            "cert-manager must be installed. Unset: secretName is provided by other means."
        ),
    )


RelayTLSMode = Literal["starttls", "implicit", "starttls-unverified", "none"]
_RELAY_TLS_VERIFIED: Final = ("starttls", "implicit")


class CASecretKeySelector(SecretKeySelector):
    """One key of a Secret in the resource's namespace that holds CA certificates (PEM)."""

    key: SecretKey = pydantic.Field("ca.crt", description="Key in the Secret's data that holds the PEM bundle.")


class SMTPSpec(_Model):
    """SMTP settings of the domain's nodes."""

    # The API server refuses what _relay_tls_consistent refuses, so kubectl apply says so at once.
    model_config = pydantic.ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.relayTLS) || self.relayTLS != 'none' || "
                    "(has(self.relayAllowPlaintext) && self.relayAllowPlaintext)",
                    "message": "relayTLS: none sends mail and the relay password in clear; "
                    "set relayAllowPlaintext: true to allow it",
                },
                {
                    "rule": "!has(self.relayCASecretRef) || !has(self.relayTLS) || "
                    "self.relayTLS in ['starttls', 'implicit']",
                    "message": "relayCASecretRef is used only by relayTLS starttls or implicit",
                },
            ]
        }
    )

    max_message_size: Quantity = pydantic.Field(
        "25Mi", description="Largest message accepted, a quantity such as 25Mi (advertised as SIZE, RFC 1870)."
    )
    relay_host: RelayHost | None = pydantic.Field(
        None, description="Send outbound mail through this host ([host]:port, as Postfix's relayhost) instead of MX."
    )
    relay_secret_ref: LocalObjectReference | None = pydantic.Field(
        None, description="A Secret with the keys username and password to authenticate to the relay host."
    )
    relay_tls: RelayTLSMode = pydantic.Field(
        "starttls",
        alias="relayTLS",
        description=(
            "How the connection to the relay host is secured: starttls (STARTTLS required, the certificate verified"
            " against the system CAs or relayCASecretRef, the host name checked), implicit (TLS from the first"
            " byte, as on port 465, verified likewise), starttls-unverified (STARTTLS required, the certificate not"
            " verified: a relay with a self-signed certificate inside the cluster) or none (plaintext, only with"
            " relayAllowPlaintext). A relay that does not offer STARTTLS keeps the mail queued."
        ),
    )
    relay_allow_plaintext: bool = pydantic.Field(
        False,
        description="Allow relayTLS: none, which sends mail and the relay password (AUTH) in clear.",
    )
    relay_ca_secret_ref: CASecretKeySelector | None = pydantic.Field(
        None,
        alias="relayCASecretRef",
        description=(
            "A Secret key holding the CA certificates (PEM) the relay host's certificate is verified against,"
            " instead of the system CAs (relayTLS starttls or implicit): for a relay with a private CA."
        ),
    )

    @pydantic.model_validator(mode="after")
    def _relay_tls_consistent(self) -> SMTPSpec:
        if self.relay_tls == "none" and not self.relay_allow_plaintext:
            raise ValueError(
                "relayTLS: none sends mail and the relay password in clear; set relayAllowPlaintext: true to allow it"
            )
        if self.relay_ca_secret_ref is not None and self.relay_tls not in _RELAY_TLS_VERIFIED:
            raise ValueError(f"relayCASecretRef is used only by relayTLS starttls or implicit, not {self.relay_tls}")
        return self


class DKIMSpec(_Model):
    """DKIM signing of outbound mail (RFC 6376); the operator keeps the key in a Secret."""

    selector: Label = pydantic.Field(
        "mail", description="DKIM selector: the key is published at <selector>._domainkey.<domain>."
    )


class DAVSpec(_Model):
    """CalDAV and CardDAV (RFC 4791, RFC 6352) for every Mailbox, on the nodes' HTTPS port."""

    enabled: bool = pydantic.Field(
        False,
        description=(
            "Serve calendars and contacts at https://mail.<domain>/dav/ (the same passwords and app passwords as"
            " IMAP; /.well-known/caldav and /.well-known/carddav lead there). Needs spec.tls."
        ),
    )


# RFC 8461 §5: what other servers do when TLS to this domain's MX fails (enforce: they do not deliver)
MTASTSMode = Literal["enforce", "testing", "none"]

BackupMethod = Literal["VolumeSnapshot", "Archive"]


class RetentionSpec(_Model):
    """Which scheduled backups to keep: a backup goes when it is beyond the newest keepLast completed ones or
    older than maxAge (the newest completed backup is always kept). MailBackups made by hand are never deleted."""

    keep_last: int = pydantic.Field(7, ge=1, description="How many completed scheduled backups to keep.")
    max_age: Duration | None = pydantic.Field(
        None, description="Delete scheduled backups older than this (30d, 36h); no age limit when empty."
    )


class BackupSpec(_Model):
    """Scheduled backups: the operator creates a MailBackup on the schedule and keeps the latest few."""

    schedule: Schedule = pydantic.Field(description="When to back up, in cron syntax (0 3 * * *) or @daily.")
    method: BackupMethod = pydantic.Field(
        "VolumeSnapshot",
        description="VolumeSnapshot (CSI snapshots of the volumes) or Archive (a tar archive made by each node).",
    )
    retention: RetentionSpec = _object(RetentionSpec, "Which scheduled backups to keep.")
    volume_snapshot_class_name: ObjectName | None = pydantic.Field(
        None, description="VolumeSnapshotClass for the VolumeSnapshot method; the cluster's default when empty."
    )
    archive_claim_name: ObjectName | None = pydantic.Field(
        None,
        description=(
            "A PersistentVolumeClaim in the namespace, mounted into the mail nodes, where the Archive method writes;"
            " without it archives go to backups/ on each node's own volume."
        ),
    )


class RestoreSpec(_Model):
    """Where new volumes come from when the domain is created."""

    backup_name: ObjectName = pydantic.Field(
        description="A completed MailBackup in the same namespace whose data the new volumes start from."
    )


class MovesSpec(_Model):
    """Mailbox moves between the nodes of a domain: on a replicas change, and for a Mailbox annotated
    mailfleet.io/move-to: "<ordinal>"."""

    parallel: int = pydantic.Field(
        2, ge=1, le=16, description="How many mailboxes move at once (1 to 16); the others wait their turn."
    )


class MailDomainSpec(_Model):
    """The desired state of a MailDomain: one domain served by one StatefulSet of mail nodes."""

    domain: DomainName = pydantic.Field(description="The mail domain, lower case (example.com).")
    alias_domains: list[DomainName] = pydantic.Field(
        default_factory=list,
        description="More domains whose mail goes to the same mailboxes (user@alias goes to user@domain).",
        json_schema_extra=_SET,
    )
    replicas: int = pydantic.Field(
        1,
        ge=1,
        le=16,
        description=(
            "Number of mail nodes (1 to 16). With more than one, each mailbox is stored on one of them (its "
            "home, shown in the Mailbox's status.node) and every node serves every mailbox. A change moves "
            "mailboxes between the nodes (spec.moves): growing, the new nodes start first, then the mailboxes "
            "whose placement changed move to them; shrinking, every mailbox on the nodes that go moves off "
            "first, and only then does the StatefulSet shrink. Each node "
            "keeps its volume when the domain is deleted or scaled down (the StatefulSet's claim retention "
            "policy is Retain): delete the claims data-<name>-<i> yourself once the mail is no longer needed."
        ),
    )
    moves: MovesSpec = _object(MovesSpec, "How mailboxes move between the nodes (a replicas change, a forced move).")
    storage: StorageSpec = _object(StorageSpec, "The volume of each mail node.")
    resources: ResourceRequirements = pydantic.Field(
        default_factory=ResourceRequirements, description="CPU and memory of each mail node container."
    )
    service: ServiceSpec = _object(ServiceSpec, "The Service in front of the mail nodes.")
    tls: TLSSpec | None = pydantic.Field(
        None, description="The TLS certificate; without it the nodes offer no STARTTLS and no submission."
    )
    smtp: SMTPSpec = _object(SMTPSpec, "SMTP settings.")
    dkim: DKIMSpec = _object(DKIMSpec, "DKIM signing of outbound mail.")
    backup: BackupSpec | None = pydantic.Field(None, description="Scheduled backups; none when empty.")
    restore: RestoreSpec | None = pydantic.Field(
        None, description="Start the domain's volumes from a backup (read at creation only)."
    )
    dav: DAVSpec = _object(DAVSpec, "Calendars and contacts (CalDAV, CardDAV).")
    mta_sts: MTASTSMode = pydantic.Field(
        "testing",
        description=(
            "MTA-STS policy mode (RFC 8461) served at https://mta-sts.<domain>/.well-known/mta-sts.txt when spec.tls"
            " is set: testing (report only), enforce (senders refuse to deliver without verified TLS) or none."
        ),
    )

    @pydantic.field_validator("alias_domains")
    @classmethod
    def _unique_alias_domains(cls, value: list[str]) -> list[str]:
        return _unique(value, key=str.lower, what="alias domain")


DNSRecordType = Literal["MX", "TXT", "A", "AAAA", "CNAME", "SRV"]


class DNSRecord(_Status):
    """A DNS record to publish for the domain."""

    type: DNSRecordType = pydantic.Field(description="Record type: MX, TXT, A, AAAA, CNAME or SRV.")
    name: str = pydantic.Field(description="Owner name, fully qualified (_dmarc.example.com).")
    value: str = pydantic.Field(description="Record data, as a zone file writes it.")


class LastBackup(_Status):
    """The most recent completed backup."""

    name: str = pydantic.Field(description="Name of the MailBackup.")
    method: BackupMethod | None = pydantic.Field(None, description="VolumeSnapshot or Archive.")
    completed_at: datetime.datetime | None = pydantic.Field(None, description="When it completed (RFC 3339).")


class MailDomainStatus(_Status):
    """The observed state of a MailDomain."""

    conditions: list[Condition] = _conditions()
    observed_generation: int | None = pydantic.Field(None, ge=0, description=_OBSERVED_GENERATION)
    ready_replicas: int | None = pydantic.Field(None, ge=0, description="Mail nodes that are ready.")
    mailboxes: int | None = pydantic.Field(None, ge=0, description="Mailboxes of this domain that are served.")
    dns_records: list[DNSRecord] = pydantic.Field(
        default_factory=list, description="The MX, SPF, DKIM and DMARC records to publish for the domain."
    )
    last_backup: LastBackup | None = pydantic.Field(None, description="The most recent completed backup.")


class MailDomain(Resource):
    """A mail domain served by a StatefulSet of Mailfleet mail nodes (SMTP, IMAP), with its Service,
    volumes, certificates, DKIM key and backups."""

    kind_name: ClassVar[str] = "MailDomain"
    plural: ClassVar[str] = "maildomains"
    short_names: ClassVar[Sequence[str]] = ("md",)
    printer_columns: ClassVar[Sequence[PrinterColumn]] = (
        PrinterColumn("Domain", "string", ".spec.domain", "The mail domain."),
        _ready(),
        PrinterColumn("Replicas", "integer", ".spec.replicas", "Desired number of mail nodes."),
        PrinterColumn("Mailboxes", "integer", ".status.mailboxes", "Mailboxes served."),
        _age(),
    )

    kind: Literal["MailDomain"] = pydantic.Field("MailDomain", description="MailDomain.")
    spec: MailDomainSpec = pydantic.Field(description="The desired state of the domain.")
    status: MailDomainStatus = pydantic.Field(
        default_factory=MailDomainStatus, description="The observed state of the domain, written by the operator."
    )


# ---------------------------------------------------------------------------------------------------
# Mailbox


class AppPassword(_Model):
    """An extra password for one client (a phone, a mail program), revocable on its own."""

    name: Label = pydantic.Field(description="A name for the client, unique within the mailbox (phone).")
    secret_ref: SecretKeySelector = pydantic.Field(
        description="The Secret key holding the password, in plaintext or as an argon2id hash."
    )


class MailboxSpec(_Model):
    """The desired state of a Mailbox: one account of a MailDomain in the same namespace."""

    address: Address = pydantic.Field(
        description="The mailbox's address, lower case; its domain must be a MailDomain's domain."
    )
    display_name: str | None = pydantic.Field(None, max_length=256, description="The owner's name (Alice Example).")
    password_secret_ref: SecretKeySelector = pydantic.Field(
        description="The Secret key holding the password, in plaintext or as an argon2id hash (mailnode hash-password)."
    )
    quota: Quantity | None = pydantic.Field(
        None, description="Largest total size of the mail kept; unlimited when empty."
    )
    aliases: list[Address] = pydantic.Field(
        default_factory=list, description="More addresses delivered to this mailbox.", json_schema_extra=_SET
    )
    forward_to: list[Address] = pydantic.Field(
        default_factory=list,
        description="Addresses that also get a copy of each message; the mailbox keeps its own.",
        json_schema_extra=_SET,
    )
    suspended: bool = pydantic.Field(False, description="Refuse logins and incoming mail; the mail is kept.")
    app_passwords: list[AppPassword] = pydantic.Field(
        default_factory=list,
        description="Extra passwords, one per client.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )

    @pydantic.field_validator("aliases", "forward_to")
    @classmethod
    def _unique_addresses(cls, value: list[str]) -> list[str]:
        return _unique(value, key=str.lower, what="address")

    @pydantic.field_validator("app_passwords")
    @classmethod
    def _unique_app_passwords(cls, value: list[AppPassword]) -> list[AppPassword]:
        return _unique(value, key=lambda item: item.name, what="app password")


# A forced move (draining a node): `kubectl annotate mbx alice mailfleet.io/move-to=2` moves the mailbox to node 2.
MOVE_TO_ANNOTATION: Final = "mailfleet.io/move-to"
MoveStep = Literal["Copying", "Freezing", "CatchingUp", "Flipping", "Thawing", "Cleaning", "Done", "RollingBack"]


class MailboxMove(_Status):
    """A move of the mailbox from one node of its domain to another, step by step; each step is recorded
    here before the next one runs, so a restarted operator resumes where the last one stopped."""

    from_: int = pydantic.Field(alias="from", ge=0, description="The ordinal of the node the mailbox leaves.")
    to: int = pydantic.Field(ge=0, description="The ordinal of the node the mailbox moves to.")
    step: MoveStep = pydantic.Field(
        description=(
            "The step under way: Copying (the target copies while mail flows), Freezing, CatchingUp (the final "
            "copy under a short freeze), Flipping (the directory names the new home), Thawing, Cleaning (the "
            "old copy goes), Done; RollingBack when the move was given up before Flipping."
        )
    )
    since: datetime.datetime = pydantic.Field(description="When the move started (RFC 3339).")
    step_since: datetime.datetime = pydantic.Field(description="When this step started (RFC 3339).")
    message: str = pydantic.Field("", description="What the last attempt at this step met (a node not answering).")


class MailboxStatus(_Status):
    """The observed state of a Mailbox."""

    conditions: list[Condition] = _conditions()
    observed_generation: int | None = pydantic.Field(None, ge=0, description=_OBSERVED_GENERATION)
    used_bytes: int | None = pydantic.Field(None, ge=0, description="Total size of the mail kept, in bytes.")
    messages: int | None = pydantic.Field(None, ge=0, description="Number of messages kept.")
    node: str | None = pydantic.Field(
        None,
        description=(
            "The pod that stores the mailbox (its home, <maildomain>-<ordinal>), chosen by the operator and "
            "recorded in the domain's directory; every other node of the domain hands its mail and IMAP "
            "sessions there. Unset while the mailbox is in no directory."
        ),
    )
    phase: Annotated[Literal["Moving"], pydantic.WithJsonSchema({"type": "string", "enum": ["Moving"]})] | None = (
        pydantic.Field(
            None, description="Moving while the mailbox moves to another node (status.move); unset otherwise."
        )
    )
    move: MailboxMove | None = pydantic.Field(None, description="The move under way; unset when none is.")


class Mailbox(Resource):
    """A mail account (address, password, quota, aliases) served by the MailDomain of its domain."""

    kind_name: ClassVar[str] = "Mailbox"
    plural: ClassVar[str] = "mailboxes"
    short_names: ClassVar[Sequence[str]] = ("mbx",)
    printer_columns: ClassVar[Sequence[PrinterColumn]] = (
        PrinterColumn("Address", "string", ".spec.address", "The mailbox's address."),
        PrinterColumn("Quota", "string", ".spec.quota", "Largest total size of the mail kept."),
        PrinterColumn("Used", "integer", ".status.usedBytes", "Bytes of mail kept."),
        PrinterColumn("Node", "string", ".status.node", "The pod that stores the mailbox."),
        PrinterColumn("Phase", "string", ".status.phase", "Moving while the mailbox moves to another node."),
        _ready(),
        _age(),
    )

    kind: Literal["Mailbox"] = pydantic.Field("Mailbox", description="Mailbox.")
    spec: MailboxSpec = pydantic.Field(description="The desired state of the mailbox.")
    status: MailboxStatus = pydantic.Field(
        default_factory=MailboxStatus, description="The observed state of the mailbox, written by the operator."
    )


# ---------------------------------------------------------------------------------------------------
# MailBackup


class MailBackupSpec(_Model):
    """What to back up, and how. A MailBackup is taken once; its spec cannot change."""

    model_config = pydantic.ConfigDict(
        json_schema_extra={"x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "spec is immutable"}]}
    )

    domain_ref: ObjectName = pydantic.Field(description="Name of the MailDomain to back up, in the same namespace.")
    method: BackupMethod = pydantic.Field(
        "VolumeSnapshot",
        description="VolumeSnapshot (CSI snapshots of the volumes) or Archive (a tar archive made by each node).",
    )


BackupPhase = Literal["Pending", "Running", "Completed", "Failed"]


class MailBackupStatus(_Status):
    """The observed state of a MailBackup."""

    phase: BackupPhase | None = pydantic.Field(None, description="Pending, Running, Completed or Failed.")
    started_at: datetime.datetime | None = pydantic.Field(None, description="When the backup started (RFC 3339).")
    completed_at: datetime.datetime | None = pydantic.Field(
        None, description="When the backup completed or failed (RFC 3339)."
    )
    point_in_time: datetime.datetime | None = pydantic.Field(
        None, description="The moment the backup holds: when the nodes checkpointed and paused writes (RFC 3339)."
    )
    snapshots: list[str] = pydantic.Field(
        default_factory=list,
        description="What was taken: one VolumeSnapshot (or archive path) per mail node volume, by name.",
    )
    error: str | None = pydantic.Field(None, description="Why the backup failed.")


class MailBackup(Resource):
    """One backup of a MailDomain's mail volumes."""

    kind_name: ClassVar[str] = "MailBackup"
    plural: ClassVar[str] = "mailbackups"
    short_names: ClassVar[Sequence[str]] = ("mbk",)
    printer_columns: ClassVar[Sequence[PrinterColumn]] = (
        PrinterColumn("Domain", "string", ".spec.domainRef", "The MailDomain backed up."),
        PrinterColumn("Method", "string", ".spec.method", "VolumeSnapshot or Archive."),
        PrinterColumn("Phase", "string", ".status.phase", "Pending, Running, Completed or Failed."),
        PrinterColumn("Completed", "date", ".status.completedAt", "When the backup completed or failed."),
        _age(),
    )

    kind: Literal["MailBackup"] = pydantic.Field("MailBackup", description="MailBackup.")
    spec: MailBackupSpec = pydantic.Field(description="What to back up.")
    status: MailBackupStatus = pydantic.Field(
        default_factory=MailBackupStatus, description="The progress of the backup, written by the operator."
    )


RESOURCES: tuple[type[MailDomain] | type[Mailbox] | type[MailBackup], ...] = (MailDomain, Mailbox, MailBackup)
