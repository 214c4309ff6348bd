"""The driver of a mailbox move (docs/architecture.md "Moving a mailbox"): one step at a time over the
nodes' HTTP API (mailfleet.nodes; the endpoints are mailwire.admin's "mailbox moves"). No Kubernetes here:
the caller records each Move it gets back (Mailbox.status on a cluster, a variable in a local test) and
calls `advance` again, so a caller killed at any point resumes from the step it recorded. The operator's
reconcile and `mailfleet local` use it.

The steps, and why each can be asked again:
  COPYING      the target pulls the mailbox while mail still flows (repeating fetches only what is new);
  FREEZING     the source holds the mailbox still (asking again extends the hold);
  CATCHING_UP  the target's final copy under the freeze (the freeze is renewed first, so a caller that
               stalled past the hold still copies a still mailbox);
  FLIPPING     the freeze renewed and the final copy repeated (cheap when nothing changed; it catches what
               a lapsed hold let in), then the directory written with the new home and the home pushed to
               every node; a target that is already the home answers the copy without fetching;
  THAWING      the source thawed: what waited in its queue goes to the new home;
  CLEANING     the old copy dropped on the source (every node answered FLIPPING's home first);
  ROLLING_BACK before FLIPPING only: the source thawed and the target's kept-aside copy dropped.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Final, Protocol

import aiohttp

from mailfleet import nodes as node_api  # `advance` takes a keyword `nodes` (the contract's)
from mailfleet.specs.common import rfc3339

# How long a freeze holds without the driver: long enough for a catch-up and a directory write, short
# enough that a driver that died leaves the mailbox taking mail again soon.
FREEZE_HOLD_SECONDS: Final = 60.0


class Step(enum.StrEnum):
    """Where a move is; the value is what Mailbox.status.move.step shows."""

    COPYING = "Copying"
    FREEZING = "Freezing"
    CATCHING_UP = "CatchingUp"
    FLIPPING = "Flipping"
    THAWING = "Thawing"
    CLEANING = "Cleaning"
    DONE = "Done"
    ROLLING_BACK = "RollingBack"


# The steps after which the directory may name the target: from here on a move finishes, never rolls back.
FLIPPED: Final = frozenset({Step.THAWING, Step.CLEANING, Step.DONE})
ROLLBACK_POSSIBLE: Final = frozenset({Step.COPYING, Step.FREEZING, Step.CATCHING_UP, Step.ROLLING_BACK})


@dataclasses.dataclass(frozen=True)
class Move:
    address: str
    source: int  # ordinal
    target: int  # ordinal
    step: Step
    since: str  # RFC 3339 UTC, when the move started (kept across steps)
    step_since: str  # when this step started


class MoveError(Exception):
    """A lasting refusal: the move cannot go on (the caller rolls back when the step allows it)."""


class DomainNodes(Protocol):
    """Where the nodes of one MailDomain answer, and the domain's internal token."""

    def url(self, ordinal: int) -> str: ...

    @property
    def token(self) -> str: ...


@dataclasses.dataclass(frozen=True)
class InCluster:
    """The nodes of MailDomain `name` in `namespace`, by `template` (node_api.IN_CLUSTER, or a test's)."""

    namespace: str
    name: str
    token: str
    template: str = node_api.IN_CLUSTER

    def url(self, ordinal: int) -> str:
        return node_api.url(self.template, namespace=self.namespace, name=self.name, ordinal=ordinal)


@dataclasses.dataclass(frozen=True)
class AtURLs:
    """Nodes at known addresses (`mailfleet local`, tests): ordinal -> base URL."""

    urls: Mapping[int, str]
    token: str

    def url(self, ordinal: int) -> str:
        return self.urls[ordinal]


def utc_now() -> str:
    return rfc3339(datetime.datetime.now(datetime.UTC))


def start(address: str, *, source: int, target: int, now: str) -> Move:
    """A move of `address` from node `source` to node `target`, at its first step."""
    if source == target:
        raise MoveError(f"{address}: source and target are both node {source}")
    return Move(address=address, source=source, target=target, step=Step.COPYING, since=now, step_since=now)


def roll_back(move: Move, *, now: str) -> Move:
    """The move, to be given up: at ROLLING_BACK. MoveError once the directory may name the target
    (FLIPPING or later), when only going forward is safe."""
    if move.step not in ROLLBACK_POSSIBLE:
        raise MoveError(f"{move.address}: the move is at {move.step}; it can only finish")
    if move.step is Step.ROLLING_BACK:
        return move
    return dataclasses.replace(move, step=Step.ROLLING_BACK, step_since=now)


_NEXT: Final = {
    Step.COPYING: Step.FREEZING,
    Step.FREEZING: Step.CATCHING_UP,
    Step.CATCHING_UP: Step.FLIPPING,
    Step.FLIPPING: Step.THAWING,
    Step.THAWING: Step.CLEANING,
    Step.CLEANING: Step.DONE,
    Step.ROLLING_BACK: Step.DONE,
}


async def advance(
    move: Move,
    *,
    nodes: DomainNodes,
    session: aiohttp.ClientSession,
    ordinals: Sequence[int],
    publish_home: Callable[[str, int], Awaitable[None]],
    now: Callable[[], str] = utc_now,
) -> Move:
    """Run the one step `move.step` names and return the move at its next step (DONE at the end).
    Asking again with the same Move repeats that step harmlessly. A node that cannot be reached raises
    mailfleet.nodes.NodeError (try the same step later); a lasting refusal raises MoveError."""
    if move.step is Step.DONE:
        return move
    try:
        await _run(move, domain=nodes, session=session, ordinals=ordinals, publish_home=publish_home)
    except node_api.NodeError as error:
        if error.lasting:
            raise MoveError(f"{move.address}: {move.step}: {error}") from error
        raise
    return dataclasses.replace(move, step=_NEXT[move.step], step_since=now())


async def _run(
    move: Move,
    *,
    domain: DomainNodes,
    session: aiohttp.ClientSession,
    ordinals: Sequence[int],
    publish_home: Callable[[str, int], Awaitable[None]],
) -> None:
    address, token = move.address, domain.token
    source, target = domain.url(move.source), domain.url(move.target)

    async def freeze() -> None:
        await node_api.freeze(session, source, address, token=token, hold_seconds=FREEZE_HOLD_SECONDS)

    async def copy(*, final: bool) -> None:
        await node_api.copy_mailbox(session, target, address, token=token, source=move.source, final=final)

    match move.step:
        case Step.COPYING:
            await copy(final=False)
        case Step.FREEZING:
            await freeze()
        case Step.CATCHING_UP:
            await freeze()
            await copy(final=True)
        case Step.FLIPPING:
            await freeze()
            await copy(final=True)
            await publish_home(address, move.target)
            for ordinal in ordinals:
                await node_api.set_home(session, domain.url(ordinal), address, token=token, home=move.target)
        case Step.THAWING:
            await node_api.thaw(session, source, address, token=token)
        case Step.CLEANING:
            await node_api.drop_mailbox(session, source, address, token=token)
        case Step.ROLLING_BACK:
            await node_api.thaw(session, source, address, token=token)
            await node_api.drop_mailbox(session, target, address, token=token)
