"""The `mailfleet.io/move` finalizer on a Mailbox while it moves (reconcile/moves.py adds and removes it;
reconcile/routing.py and moves.domain_gone release it when no MailDomain is left to clean up).

Why a finalizer: a move makes copies on two nodes, and only the operator knows how to clean them up
(roll back before the thaw, drop the old copy from it on). A Mailbox deleted mid-move waits, with its
deletionTimestamp and its status.move, until the clean-up is done, so an operator restarted meanwhile
finds it and finishes the clean-up from the recorded step.

Why one of our own, not kopf's: kopf adds its finalizer (settings.persistence.finalizer) to every object
some mandatory `@kopf.on.delete` handler matches, at its own pace after a watch event; a move's task must
hold it before the move's first effect on a node (the copy), and let it go when the move ends, which only
the task knows. So the task patches it itself, and the handlers stay event handlers that write nothing on
the user's objects.
"""

from __future__ import annotations

from typing import Final

from mailfleet import k8s, kube_types
from mailfleet.reconcile.context import MAILBOX

FINALIZER: Final = "mailfleet.io/move"
ATTEMPTS: Final = 5  # patches tried when the Mailbox changes between reading it and patching it (409)


def held(body: kube_types.Mailbox) -> bool:
    """Whether the body (a snapshot) carries the finalizer."""
    return FINALIZER in ((body.get("metadata") or {}).get("finalizers") or [])


def leaving(body: kube_types.Mailbox) -> bool:
    """Whether the body (a snapshot) is being deleted."""
    return bool((body.get("metadata") or {}).get("deletionTimestamp"))


async def hold(client: k8s.Client, body: kube_types.Mailbox) -> bool:
    """Add the finalizer (kept when there already). False when the Mailbox is gone or being deleted (the
    API server adds no finalizer then): the caller cleans up instead of moving."""
    return await _set(client, body, wanted=True)


async def release(client: k8s.Client, body: kube_types.Mailbox) -> None:
    """Remove the finalizer (nothing when it is not there, or the Mailbox is gone)."""
    await _set(client, body, wanted=False)


async def _set(client: k8s.Client, body: kube_types.Mailbox, *, wanted: bool) -> bool:
    meta = body["metadata"]
    for _ in range(ATTEMPTS):
        current = await client.get(MAILBOX, meta["namespace"], meta["name"])
        if current is None or current["metadata"].get("uid") != meta.get("uid"):
            return False  # gone (or another Mailbox of the same name now)
        found = list(current["metadata"].get("finalizers") or [])
        deleting = leaving(current)
        if (FINALIZER in found) == wanted or (wanted and deleting):
            return wanted and not deleting
        changed = [*found, FINALIZER] if wanted else [f for f in found if f != FINALIZER]
        # A merge patch replaces the whole list: the resourceVersion makes it refused (409) when another
        # controller changed the finalizers since they were read, and it is read again.
        patch = {"metadata": {"finalizers": changed, "resourceVersion": current["metadata"].get("resourceVersion")}}
        try:
            await client.patch(MAILBOX, meta["namespace"], meta["name"], patch)
        except k8s.ApiError as error:
            if error.not_found:
                return False
            if error.conflict:
                continue
            raise
        return wanted
    raise k8s.ApiError(409, "Conflict", f"the finalizers of Mailbox {meta['namespace']}/{meta['name']} kept changing")
