"""Status conditions as Kubernetes conventions have them: one entry per type, lastTransitionTime changes
only when the status does, observedGeneration says which spec the condition is about."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping
from typing import Any, Literal

Status = Literal["True", "False", "Unknown"]


@dataclasses.dataclass(frozen=True)
class Condition:
    type: str
    status: Status
    reason: str
    message: str


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge(
    current: Iterable[Mapping[str, Any]] | None, wanted: Iterable[Condition], *, generation: int | None, at: str
) -> list[dict[str, Any]]:
    """The conditions to write: `wanted` (in its order), keeping each type's lastTransitionTime when
    its status stays the same; types not in `wanted` are dropped."""
    before = {str(c.get("type")): c for c in current or ()}
    result = []
    for condition in wanted:
        previous = before.get(condition.type)
        transition = at
        if previous is not None and previous.get("status") == condition.status and previous.get("lastTransitionTime"):
            transition = str(previous["lastTransitionTime"])
        entry: dict[str, Any] = {
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


def same(current: Iterable[Mapping[str, Any]] | None, merged: list[dict[str, Any]]) -> bool:
    """Whether writing `merged` would change nothing."""
    return [dict(c) for c in current or ()] == merged


def find(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions or () if c.get("type") == type_), None)
