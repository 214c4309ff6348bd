"""kmock's Kubernetes emulator as the operator's tests (tier 3) and its benchmark use it.

The emulator stores objects as they are sent; a real API server also stamps uid, resourceVersion,
generation and creationTimestamp, and the operator relies on them (owner references, observedGeneration,
telling spec changes from status writes). `ApiServer` adds them, and makes the emulator fast enough for
thousands of objects.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import uuid
from typing import Any

import aiohttp.web
import kmock
from kmock._internal import dicts as kmock_dicts

VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}
RESOURCES = {
    "mailfleet.io/v1alpha1/maildomains": kmock.ResourceInfo(
        kind="MailDomain", namespaced=True, subresources={"status"}, verbs=VERBS
    ),
    "mailfleet.io/v1alpha1/mailboxes": kmock.ResourceInfo(
        kind="Mailbox", namespaced=True, subresources={"status"}, verbs=VERBS
    ),
    "mailfleet.io/v1alpha1/mailbackups": kmock.ResourceInfo(
        kind="MailBackup", namespaced=True, subresources={"status"}, verbs=VERBS
    ),
    "v1/secrets": kmock.ResourceInfo(kind="Secret", namespaced=True, verbs=VERBS),
    "v1/configmaps": kmock.ResourceInfo(kind="ConfigMap", namespaced=True, verbs=VERBS),
    "v1/services": kmock.ResourceInfo(kind="Service", namespaced=True, verbs=VERBS),
    "v1/serviceaccounts": kmock.ResourceInfo(kind="ServiceAccount", namespaced=True, verbs=VERBS),
    "v1/events": kmock.ResourceInfo(kind="Event", namespaced=True, verbs=VERBS),
    "v1/namespaces": kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs=VERBS),
    "apps/v1/statefulsets": kmock.ResourceInfo(
        kind="StatefulSet", namespaced=True, subresources={"status"}, verbs=VERBS
    ),
    "policy/v1/poddisruptionbudgets": kmock.ResourceInfo(kind="PodDisruptionBudget", namespaced=True, verbs=VERBS),
    "networking.k8s.io/v1/networkpolicies": kmock.ResourceInfo(kind="NetworkPolicy", namespaced=True, verbs=VERBS),
}


class _MatchAlone(kmock.RawHandler):
    """kmock finds the reaction to a request by filtering its request history for every reaction it has,
    which makes every request slower than the one before: the history is cut to the request itself just
    before the match (this harness sets no reactions that look further back; `ApiServer.writes` records
    what the tests count). Placed after KubernetesEmulator in ApiServer's MRO, so the cut comes after
    the emulator's locked bookkeeping, where a request may wait while others arrive, and nothing awaits
    between the cut and the match."""

    async def _handle(self, request: kmock.Request) -> Any:
        self._requests[:] = [request]
        return await super()._handle(request)


class ApiServer(kmock.KubernetesEmulator, _MatchAlone):
    """kmock's emulator plus what the API server stamps on objects: uid and creationTimestamp at creation,
    a new resourceVersion on every write, and generation 1 at creation, incremented when anything but
    metadata or status changes (as for resources with a status subresource)."""

    _versions = itertools.count(1)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.writes: list[tuple[str, str, str | None, str | None]] = []
        # (plural, name or None for a list): the reads the operator's own client made (not kopf's lists
        # and watches, which feed its indexes)
        self.reads: list[tuple[str, str | None]] = []

    namespaces: tuple[str, ...] = ("mail",)

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock cannot parse the cluster-wide /api/v1/namespaces, which kopf lists and watches when
        # told to serve some namespaces: served here, with the namespaces of the tests.
        if raw_request.path == "/api/v1/namespaces":
            if raw_request.query.get("watch") != "true":
                items = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in self.namespaces]
                return aiohttp.web.json_response({"metadata": {"resourceVersion": "1"}, "items": items})
            response = aiohttp.web.StreamResponse()
            await response.prepare(raw_request)
            await asyncio.sleep(float(raw_request.query.get("timeoutSeconds", 300)))  # nothing changes
            return response
        return await super().__call__(raw_request)

    def _get_resources(self) -> list[Any]:
        # The declared ones only (the emulator would also walk every stored object, at every list).
        return list(kmock.KubernetesScaffold._get_resources(self))

    def _KubernetesEmulator__get_objs(self, request: kmock.Request, strict: bool) -> list[Any]:
        # One object by name: a dict lookup instead of the emulator's walk over every stored object.
        if strict and request.name is not None:
            found = self.objects._objects.get((request.resource, request.namespace, request.name))  # type: ignore[arg-type]
            return [found] if found is not None else []
        return list(self._slow_get_objs(request, strict))

    _slow_get_objs = getattr(kmock.KubernetesEmulator, "_KubernetesEmulator__get_objs")  # noqa: B009 - name-mangled

    async def _handle(self, request: kmock.Request) -> Any:
        data = request.data
        agent = request.headers.get("User-Agent", "")
        if request.resource is not None and request.method.value == "GET" and not agent.startswith("kopf/"):
            self.reads.append((str(request.resource.plural), request.name))
        if request.resource is not None and request.method.value in ("POST", "PATCH", "PUT", "DELETE"):
            name = request.name
            if name is None and isinstance(data, dict):
                name = (data.get("metadata") or {}).get("name")
            self.writes.append((request.method.value, str(request.resource.plural), name, request.subresource))
        if request.resource is not None and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if request.action == kmock.action.CREATE:
                meta["uid"] = str(uuid.uuid4())
                meta["generation"] = 1
                meta["creationTimestamp"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            elif request.action == kmock.action.UPDATE and request.name is not None:
                key = (request.resource, request.namespace, request.name)
                if key in self.objects and not self.objects[key].deleted:
                    current = dict(self.objects[key].raw)
                    generation = (current.get("metadata") or {}).get("generation") or 1
                    if request.subresource is None:
                        after = kmock_dicts.patch_dict(copy.deepcopy(current), data)
                        spec_changed = any(
                            after.get(k) != current.get(k)
                            for k in set(after) | set(current)
                            if k not in ("metadata", "status")
                        )
                        generation += int(spec_changed)
                    meta["generation"] = generation
            if request.action in (kmock.action.CREATE, kmock.action.UPDATE):
                meta["resourceVersion"] = str(next(self._versions))
        return await super()._handle(request)
