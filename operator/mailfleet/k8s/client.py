"""A small asynchronous client of the Kubernetes API (aiohttp), for the few kinds the operator manages.

kopf watches; this client reads and writes. It takes kopf's ConnectionInfo (the operator's login handler
obtains it from the service account or a kubeconfig), so both use the same credentials; it is described
here by what the client reads of it (`ConnectionInfo`), so that nothing below handlers.py imports kopf. JSON merge
patches only: they behave the same on a real API server and on the emulator the fast tests use.
"""

from __future__ import annotations

import dataclasses
import json
import ssl
from collections.abc import Mapping
from typing import Any, Final, Generic, Protocol, TypeVar, cast
from urllib.parse import quote

import aiohttp

from mailfleet import kube_types

BodyT = TypeVar("BodyT", bound=Mapping[str, object])


@dataclasses.dataclass(frozen=True)
class Kind(Generic[BodyT]):
    """Where a kind lives in the API: `prefix` is "/api/v1" or "/apis/<group>/<version>". `BodyT` is the
    body (mailfleet.kube_types) the client's reads return for it: `Kind[kube_types.Secret]`."""

    api_version: str
    kind: str
    plural: str
    namespaced: bool = True

    @property
    def prefix(self) -> str:
        return f"/api/{self.api_version}" if "/" not in self.api_version else f"/apis/{self.api_version}"


_MANAGED: Final[list[Kind[Any]]] = [
    Kind("v1", "ConfigMap", "configmaps"),
    Kind("v1", "Secret", "secrets"),
    Kind("v1", "Service", "services"),
    Kind("v1", "ServiceAccount", "serviceaccounts"),
    Kind("v1", "Event", "events"),
    Kind("v1", "Pod", "pods"),
    Kind("v1", "PersistentVolumeClaim", "persistentvolumeclaims"),
    Kind("apps/v1", "StatefulSet", "statefulsets"),
    Kind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets"),
    Kind("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies"),
    Kind("mailfleet.io/v1alpha1", "MailDomain", "maildomains"),
    Kind("mailfleet.io/v1alpha1", "Mailbox", "mailboxes"),
    Kind("mailfleet.io/v1alpha1", "MailBackup", "mailbackups"),
    # An add-on (the CSI external-snapshotter's CRDs): ask `Client.serves` before using it.
    Kind("snapshot.storage.k8s.io/v1", "VolumeSnapshot", "volumesnapshots"),
    # An add-on (cert-manager): made for a MailDomain's spec.tls.issuerRef, once `Client.serves` says so.
    Kind("cert-manager.io/v1", "Certificate", "certificates"),
]
KINDS: Final = {(kind.api_version, kind.kind): kind for kind in _MANAGED}


def kind_of(api_version: str, kind: str) -> Kind[Any]:
    """The kind, for a body type to be given where it is declared: `SECRET: Kind[kube_types.Secret] = ...`."""
    try:
        return KINDS[(api_version, kind)]
    except KeyError:
        raise ValueError(f"the operator does not manage {api_version} {kind}") from None


class ApiError(Exception):
    """A refused request: the HTTP status, the API's reason and message (a Status object's fields)."""

    def __init__(self, status: int, reason: str, message: str, *, method: str = "", path: str = "") -> None:
        super().__init__(f"{method} {path}: {status} {reason}: {message}".strip())
        self.status, self.reason, self.message = status, reason, message

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409


class ConnectionInfo(Protocol):
    """What the client reads of kopf.ConnectionInfo."""

    @property
    def server(self) -> str: ...
    @property
    def insecure(self) -> bool | None: ...
    @property
    def default_namespace(self) -> str | None: ...
    @property
    def trust_env(self) -> bool: ...
    def as_http_headers(self) -> dict[str, str]: ...
    def as_ssl_context(self) -> ssl.SSLContext: ...


MERGE_PATCH: Final = "application/merge-patch+json"


class Client:
    """One HTTP session to one API server. `close()` it (or use `async with`)."""

    def __init__(self, info: ConnectionInfo, *, timeout: float = 30.0) -> None:
        self.server = info.server.rstrip("/")
        self._headers = {"Accept": "application/json", **info.as_http_headers()}
        ssl_context: ssl.SSLContext | bool | None = None
        if self.server.startswith("https:"):
            ssl_context = False if info.insecure else info.as_ssl_context()
        connector = aiohttp.TCPConnector(ssl=ssl_context if ssl_context is not None else True, limit=32)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout), trust_env=info.trust_env
        )
        self.default_namespace = info.default_namespace

    async def close(self) -> None:
        await self._session.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @staticmethod
    def path(kind: Kind[Any], namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        path = kind.prefix
        if kind.namespaced and namespace is not None:
            path += f"/namespaces/{quote(namespace)}"
        path += f"/{kind.plural}"
        if name is not None:
            path += f"/{quote(name)}"
        if subresource is not None:
            path += f"/{subresource}"
        return path

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        headers = dict(self._headers)
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        async with self._session.request(
            method, self.server + path, data=data, headers=headers, params=params
        ) as response:
            text = await response.text()
            if response.status >= 400:
                reason, message = response.reason or "", text.strip()
                try:
                    status = json.loads(text)
                    reason, message = status.get("reason", reason), status.get("message", message)
                except ValueError:
                    pass
                raise ApiError(response.status, str(reason), str(message), method=method, path=path)
            result = json.loads(text) if text else {}
            return result if isinstance(result, dict) else {}

    async def serves(self, kind: Kind[Any]) -> bool:
        """Whether the API server serves this kind now (discovery: GET /apis/<group>/<version>), for the
        kinds of add-ons such as VolumeSnapshot."""
        try:
            found = cast(kube_types.APIResourceList, await self.request("GET", kind.prefix))
        except ApiError as error:
            if error.not_found:
                return False
            raise
        return any(resource.get("name") == kind.plural for resource in found.get("resources") or [])

    async def get(self, kind: Kind[BodyT], namespace: str | None, name: str) -> BodyT | None:
        """The object, or None when it does not exist."""
        try:
            return cast(BodyT, await self.request("GET", self.path(kind, namespace, name)))
        except ApiError as error:
            if error.not_found:
                return None
            raise

    async def list(self, kind: Kind[BodyT], namespace: str | None) -> list[BodyT]:
        result = await self.request("GET", self.path(kind, namespace))
        return cast(list[BodyT], list(result.get("items") or []))

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        kind = kind_of(obj["apiVersion"], obj["kind"])
        return await self.request("POST", self.path(kind, obj["metadata"].get("namespace")), body=obj)

    async def patch(
        self,
        kind: Kind[BodyT],
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str | None = None,
    ) -> BodyT:
        """A JSON merge patch (RFC 7386); the object as patched."""
        found = await self.request(
            "PATCH", self.path(kind, namespace, name, subresource), body=patch, content_type=MERGE_PATCH
        )
        return cast(BodyT, found)

    async def delete(self, kind: Kind[Any], namespace: str | None, name: str) -> bool:
        """False when it was already gone."""
        try:
            await self.request("DELETE", self.path(kind, namespace, name))
        except ApiError as error:
            if error.not_found:
                return False
            raise
        return True
