"""Make an object look as built: create it when missing, patch it when it differs, leave it alone otherwise.

"Differs" means the desired object is not contained in the observed one: fields the API server adds
(defaults, status, resourceVersion, a Service's clusterIP) and labels or annotations added by others do
not count, so an unchanged object is never written and its watch stays quiet. This is also how drift
is repaired: an object edited behind the operator's back no longer contains the desired fields.
"""

from __future__ import annotations

import base64
import enum
from collections.abc import Mapping
from typing import Any, Final

from mailfleet.k8s.client import ApiError, Client, kind_of

# A StatefulSet's spec may change only in these fields; the others (selector, serviceName,
# volumeClaimTemplates) are immutable, and a patch touching them is refused as a whole.
STATEFULSET_MUTABLE: Final = ("replicas", "template", "updateStrategy", "minReadySeconds", "ordinals")


class Applied(enum.StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


class ImmutableFieldChanged(Exception):
    """The desired object changes a field the API server does not let change in place."""


def contains(observed: Any, desired: Any) -> bool:
    """Whether `observed` has every field of `desired` with the same value. Mappings may have more keys;
    lists must have the same length, element by element (the server defaults fields inside them)."""
    if isinstance(desired, Mapping):
        return isinstance(observed, Mapping) and all(
            key in observed and contains(observed[key], value) for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(observed, list)
            and len(observed) == len(desired)
            and all(contains(o, d) for o, d in zip(observed, desired, strict=True))
        )
    return bool(desired == observed)


def secret_values(obj: Mapping[str, Any]) -> dict[str, bytes]:
    """A Secret's values whatever their form: the server turns stringData into base64 data."""
    values = {key: base64.b64decode(value) for key, value in (obj.get("data") or {}).items()}
    values.update({key: value.encode() for key, value in (obj.get("stringData") or {}).items()})
    return values


def _wire(desired: Mapping[str, Any]) -> dict[str, Any]:
    """The object as sent: a Secret's values as base64 data (stringData cannot be compared or removed)."""
    obj = dict(desired)
    if obj.get("kind") == "Secret" and "stringData" in obj:
        obj["data"] = {key: base64.b64encode(value).decode() for key, value in secret_values(obj).items()}
        del obj["stringData"]
    return obj


def _differs(observed: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    if desired.get("kind") == "Secret":
        if secret_values(observed) != secret_values(desired):
            return True
        desired = {key: value for key, value in desired.items() if key not in ("data", "stringData")}
    elif desired.get("kind") == "ConfigMap" and (observed.get("data") or {}) != (desired.get("data") or {}):
        return True
    return not contains(observed, desired)


def immutable_change(observed: Mapping[str, Any], desired: Mapping[str, Any]) -> str | None:
    """Why patching `observed` into `desired` would be refused (a StatefulSet's fixed fields), or None."""
    if desired.get("kind") != "StatefulSet":
        return None
    fixed = {key: value for key, value in desired["spec"].items() if key not in STATEFULSET_MUTABLE}
    spec = observed.get("spec") or {}
    changed = sorted(key for key, value in fixed.items() if not contains(spec.get(key), value))
    if not changed:
        return None
    return (
        f"StatefulSet {desired['metadata']['name']}: {', '.join('spec.' + key for key in changed)} cannot change "
        "in place (Kubernetes refuses it); delete the StatefulSet (its volumes stay) to have it rebuilt"
    )


def _patch(observed: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    patch = {key: value for key, value in desired.items() if key not in ("apiVersion", "kind")}
    patch["metadata"] = {key: value for key, value in desired["metadata"].items() if key not in ("name", "namespace")}
    if desired["kind"] in ("Secret", "ConfigMap"):  # every key is ours: remove the ones no longer built
        data = dict(patch.get("data") or {})
        data.update({key: None for key in observed.get("data") or {} if key not in data})
        patch["data"] = data
    if desired["kind"] == "StatefulSet":
        if (why := immutable_change(observed, desired)) is not None:
            raise ImmutableFieldChanged(why)
        patch["spec"] = {key: value for key, value in desired["spec"].items() if key in STATEFULSET_MUTABLE}
    return patch


async def apply(client: Client, desired: Mapping[str, Any]) -> tuple[Applied, dict[str, Any]]:
    """Create or patch `desired` (a full object with apiVersion, kind, metadata.name and namespace).
    Returns what was done and the object as the server has it now."""
    kind = kind_of(desired["apiVersion"], desired["kind"])
    meta = desired["metadata"]
    wire = _wire(desired)
    observed = await client.get(kind, meta.get("namespace"), meta["name"])
    if observed is None:
        try:
            return Applied.CREATED, await client.create(wire)
        except ApiError as error:
            if not error.conflict:  # created meanwhile (a second reconcile, or a user): patch it below
                raise
            observed = await client.get(kind, meta.get("namespace"), meta["name"])
            if observed is None:
                raise
    if not _differs(observed, desired):
        return Applied.UNCHANGED, observed
    patched = await client.patch(kind, meta.get("namespace"), meta["name"], _patch(observed, wire))
    return Applied.UPDATED, patched
