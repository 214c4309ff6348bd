"""Status conditions as Kubernetes conventions have them: one entry per type, lastTransitionTime changes
only when the status does, observedGeneration says which spec the condition is about."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable
from typing import Literal

from mailfleet import kube_types
from mailfleet.specs.common import rfc3339

Status = Literal["True", "False", "Unknown"]


@dataclasses.dataclass(frozen=True)
class Condition:
    type: str
    status: Status
    reason: str
    message: str


def now() -> str:
    return rfc3339(datetime.datetime.now(datetime.UTC))


def merge(
    current: Iterable[kube_types.Condition] | None, wanted: Iterable[Condition], *, generation: int | None, at: str
) -> list[kube_types.Condition]:
    """The conditions to write: `wanted` (in its order), keeping each type's lastTransitionTime when
    its status stays the same; types not in `wanted` are dropped."""
    before = {str(c.get("type")): c for c in current or ()}
    result = []
    for condition in wanted:
        previous = before.get(condition.type)
        transition = at
        if previous is not None and previous.get("status") == condition.status and previous.get("lastTransitionTime"):
            transition = str(previous["lastTransitionTime"])
        entry: kube_types.Condition = {
            "type": condition.type,
            "status": condition.status,
            "reason": condition.reason,
            "message": condition.message,
            "lastTransitionTime": transition,
        }
        if generation is not None:
            entry["observedGeneration"] = generation
        result.append(entry)
    return result


def same(current: Iterable[kube_types.Condition] | None, merged: list[kube_types.Condition]) -> bool:
    """Whether writing `merged` would change nothing."""
    return list(current or ()) == merged


def find(conditions: Iterable[kube_types.Condition] | None, type_: str) -> kube_types.Condition | None:
    return next((c for c in conditions or () if c.get("type") == type_), None)
