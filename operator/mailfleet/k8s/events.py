"""Kubernetes Events: what the operator did or could not do, on the object it concerns
(`kubectl describe md example-com` lists them). Posting an Event never fails a reconcile."""

from __future__ import annotations

import logging
import secrets
from typing import Literal

from mailfleet import kube_types
from mailfleet.k8s.client import ApiError, Client

log = logging.getLogger(__name__)

COMPONENT = "mailfleet-operator"


class Recorder:
    def __init__(self, client: Client, *, component: str = COMPONENT) -> None:
        self.client = client
        self.component = component

    async def event(
        self,
        obj: kube_types.Object,
        reason: str,
        message: str,
        *,
        type: Literal["Normal", "Warning"] = "Normal",
        at: str,
    ) -> None:
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta.get('name')}.{secrets.token_hex(8)}", "namespace": namespace},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind"),
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": type,
            "source": {"component": self.component},
            "reportingComponent": self.component,
            "firstTimestamp": at,
            "lastTimestamp": at,
            "count": 1,
        }
        log.log(
            logging.WARNING if type == "Warning" else logging.INFO,
            "%s %s/%s: %s: %s",
            obj.get("kind"),
            namespace,
            meta.get("name"),
            reason,
            message,
        )
        try:
            await self.client.create(event)
        except (ApiError, OSError, TimeoutError) as error:
            log.warning("could not post the Event %s for %s/%s: %s", reason, namespace, meta.get("name"), error)
