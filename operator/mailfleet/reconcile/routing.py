"""Which MailDomains to reconcile when something changes. Every change ends as a key in the work queue:
a Mailbox names its domain by its address, an owned object by its labels, a Secret by who uses it.

Status writes (the operator's own, or a controller's) do not change metadata.generation; a Mailbox or
MailDomain event with a generation already seen is only that, and reconciles nothing. (A StatefulSet's
status does matter: readyReplicas is copied into the MailDomain's status.)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, cast

import aiohttp

from mailfleet import api, k8s, kube_types, specs
from mailfleet.reconcile import finalizer, mailboxes, moves
from mailfleet.reconcile.context import Context, object_key

log = logging.getLogger(__name__)

INSTANCE_LABEL = "app.kubernetes.io/instance"


class Router:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._generations: dict[str, Any] = {}  # uid -> metadata.generation last seen

    def _is_new(self, event_type: str | None, body: Mapping[str, Any]) -> bool:
        meta = body.get("metadata") or {}
        uid = object_key(body)
        if event_type == "DELETED":
            self._generations.pop(uid, None)
            return True
        # A Mailbox's move-to annotation (a forced move, reconcile/moves.py) changes no generation, yet counts;
        # so does its deletion while a finalizer holds it (it leaves the directory, its move is cleaned up).
        generation = (
            meta.get("generation"),
            (meta.get("annotations") or {}).get(api.MOVE_TO_ANNOTATION),
            bool(meta.get("deletionTimestamp")),
        )
        if uid in self._generations and self._generations[uid] == generation:
            return False
        self._generations[uid] = generation
        return True

    def domain_changed(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        if self._is_new(event_type, body):
            self.ctx.enqueue((str(meta["namespace"]), str(meta["name"])))

    async def mailbox_changed(self, event_type: str | None, raw: Mapping[str, Any]) -> None:
        """`raw`: the Mailbox as kopf hands it over (the API's JSON)."""
        body = cast(kube_types.Mailbox, raw)
        if not self._is_new(event_type, body):
            return
        namespace = str(body["metadata"]["namespace"])
        # Every domain of the namespace: an address may have moved from one domain to another.
        for name in self.ctx.view.domain_names(namespace):
            self.ctx.enqueue((namespace, name))
        if event_type == "DELETED":
            self.ctx.statuses.forget(body)
            self.ctx.parsed_mailboxes.pop(object_key(body), None)
            self.ctx.mailbox_usage.pop(object_key(body), None)
            return
        if finalizer.leaving(body):
            # A moving Mailbox deleted: its domain's reconcile cleans up the move; with no domain, nobody would.
            if finalizer.held(body):
                try:
                    await moves.release_unserved(self.ctx, namespace)
                except (k8s.ApiError, aiohttp.ClientError, TimeoutError) as error:
                    log.warning("the finalizers of deleted Mailboxes in %s: %s; at the next list", namespace, error)
                    self._generations.pop(object_key(body), None)  # kopf's next list counts it as new
            return
        mail_domain = specs.node.domain_of((body.get("spec") or {}).get("address"))
        if not self.ctx.view.serving(namespace, mail_domain):
            mailboxes.write_status(self.ctx, body, mailboxes.domain_not_found(namespace, mail_domain))

    def owned_changed(self, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        owner = (meta.get("labels") or {}).get(INSTANCE_LABEL)
        if owner:
            self.ctx.enqueue((str(meta["namespace"]), str(owner)))

    def secret_changed(self, namespace: str, users: list[str]) -> None:
        """A Secret named by Mailboxes or MailDomains changed: `users` are the DNS domains of its Mailboxes
        and the names of the MailDomains that name it."""
        names = set(self.ctx.view.domain_names(namespace))
        for user in users:
            if user in names:
                self.ctx.enqueue((namespace, user))
            for name in self.ctx.view.serving(namespace, user):
                self.ctx.enqueue((namespace, name))
