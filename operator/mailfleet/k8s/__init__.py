"""The only code of the operator that talks to the Kubernetes API: a small client (`Client`) and `apply`,
which creates or patches an object only when it differs from what is built; `secrets` reads Secrets as
text. What it reads is typed in mailfleet.kube_types."""

from mailfleet.k8s import secrets
from mailfleet.k8s.apply import Applied, ImmutableFieldChanged, apply, contains, immutable_change, secret_values
from mailfleet.k8s.client import KINDS, ApiError, Client, ConnectionInfo, Kind, kind_of

__all__ = [
    "KINDS",
    "ApiError",
    "Applied",
    "Client",
    "ConnectionInfo",
    "ImmutableFieldChanged",
    "Kind",
    "apply",
    "contains",
    "immutable_change",
    "kind_of",
    "secret_values",
    "secrets",
]
