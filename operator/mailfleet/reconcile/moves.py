"""Mailbox moves, the Kubernetes side (DESIGN.md "Clustering", "Moving a mailbox"): which mailboxes of a
domain move, when the StatefulSet grows or shrinks around them, and driving each recorded move with the
driver (mailfleet.moving) in a task of its own beside the reconciles, each step recorded in the Mailbox's
status before the next one runs, the Mailbox held by the mailfleet.io/move finalizer meanwhile
(reconcile/finalizer.py); the clean-up of a move whose Mailbox was deleted; the moves' side of the gate
backups share with them (reconcile/movegate.py). reconcile/domain.py calls, in its order:
`layout` (what runs now), `plan` (pure: what should move, how many nodes to run), then after the objects
are applied `drive` and `progress`.

What moves:
  - a scale-up (spec.replicas above the number the homes are balanced over, the StatefulSet annotation
    mailfleet.io/placed-over): exactly the mailboxes whose rendezvous home over the new ordinals differs
    from the home the directory records; the StatefulSet grows first, moves start once every node is
    ready and up to date;
  - a scale-down: every mailbox homed on an ordinal that goes, to its rendezvous home among those that
    stay; the StatefulSet keeps its nodes until no mailbox is homed on (or moving from or to) them;
  - a Mailbox annotated mailfleet.io/move-to: "<ordinal>" (draining a node): to that ordinal, which then
    stays its home (a later scale-up does not move it away while the annotation is there).
At most spec.moves.parallel at once; recorded moves (an operator restarted mid-move) go on first, and a
move that was rolled back waits `RETRY_AFTER` before it is tried again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Final

import aiohttp

from mailfleet import api, k8s, kube_types, moving, nodes, specs
from mailfleet.reconcile import conditions, finalizer
from mailfleet.reconcile.conditions import Condition
from mailfleet.reconcile.context import Context, DomainKey, object_key
from mailfleet.reconcile.status import Report

log = logging.getLogger(__name__)

# On the StatefulSet (which the operator owns and reads at every reconcile): how many ordinals the
# recorded homes are balanced over. Below spec.replicas, a scale-up's moves are not all done.
PLACED_OVER: Final = "mailfleet.io/placed-over"
RETRY_AFTER: Final = 300.0  # seconds before a rolled-back move is planned again
BLOCKED_RETRY: Final = 5.0  # seconds before a move whose node did not answer is tried again


@dataclasses.dataclass(frozen=True)
class Layout:
    """The nodes of a domain as the reconcile finds them."""

    target: int  # spec.replicas
    running: int | None  # the StatefulSet's spec.replicas; None before it exists
    placed_over: int  # the ordinals the recorded homes are balanced over

    @property
    def serving(self) -> int:
        """The ordinals that may hold a home now: the StatefulSet's until a scale-down has moved them off."""
        return max(self.target, self.running or 0)


def layout(domain: api.MailDomain, existing: kube_types.StatefulSet | None) -> Layout:
    target = domain.spec.replicas
    if existing is None:
        return Layout(target, None, target)
    running = (existing.get("spec") or {}).get("replicas")
    running = int(running) if running is not None else target
    annotation = ((existing.get("metadata") or {}).get("annotations") or {}).get(PLACED_OVER)
    # An operator before moves wrote no annotation: the homes were placed over the nodes that run.
    placed = int(annotation) if annotation is not None and annotation.isdigit() else running
    return Layout(target, running, placed)


@dataclasses.dataclass(frozen=True)
class Wanted:
    """A move planned, not started yet."""

    address: str
    source: int
    target: int
    why: str  # "forced", "scale-down", "scale-up"


@dataclasses.dataclass(frozen=True)
class Plan:
    replicas: int  # what the StatefulSet runs now
    placed_over: int  # its annotation
    active: dict[str, moving.Move]  # recorded moves, by address, in the order they go on
    waiting: list[Wanted]  # planned, in the order they start

    @property
    def idle(self) -> bool:
        return not self.active and not self.waiting


def wanted_home(address: str, home: int, *, layout: Layout, forced: int | None) -> tuple[int, str]:
    """Where the mailbox should be, and why it moves when that is not `home`."""
    if forced is not None:
        return forced, "forced"
    if home >= layout.target:
        return specs.placement.rendezvous(address, layout.target), "scale-down"
    if layout.placed_over < layout.target:
        return specs.placement.rendezvous(address, layout.target), "scale-up"
    return home, ""


_ORDER: Final = {"forced": 0, "scale-down": 1, "scale-up": 2}


def plan(
    homes: Mapping[str, int],
    *,
    layout: Layout,
    recorded: Mapping[str, moving.Move],
    forced: Mapping[str, int],
    held: Iterable[str] = (),
    cleaning: Iterable[moving.Move] = (),
) -> Plan:
    """What should move and how many nodes to run (pure). `homes`: the recorded home of each mailbox the
    directory holds; `recorded`: the moves under way (status.move); `forced`: valid move-to annotations;
    `held`: mailboxes not to start a move for now (one rolled back lately); `cleaning`: the moves of
    Mailboxes being deleted, not cleaned up yet."""
    active = {address: move for address, move in sorted(recorded.items()) if address in homes}
    pending = []
    for address, home in sorted(homes.items()):
        wanted, why = wanted_home(address, home, layout=layout, forced=forced.get(address))
        if wanted != home and address not in active:
            pending.append(Wanted(address, home, wanted, why))
    pending.sort(key=lambda w: _ORDER[w.why])
    hold = set(held)
    waiting = [w for w in pending if w.address not in hold]
    placed_over = layout.placed_over
    if not active and not [w for w in pending if w.why != "forced"]:
        placed_over = layout.target  # the homes are balanced over the nodes asked for
    replicas = layout.target
    if layout.running is not None and layout.running > layout.target:
        # A scale-down: the StatefulSet shrinks only when nothing is homed on, or moving from or to, an
        # ordinal that goes; until then it keeps every node (a partial shrink would roll all the pods, the
        # peers' list being in their config, while moves are under way).
        going_on = [*active.values(), *cleaning]
        touched = [*homes.values(), *(m.source for m in going_on), *(m.target for m in going_on)]
        if any(ordinal >= layout.target for ordinal in touched):
            replicas, placed_over = layout.running, layout.placed_over
    return Plan(replicas, placed_over, active, waiting)


def forced_target(body: kube_types.Mailbox, *, replicas: int) -> tuple[int | None, str | None]:
    """The ordinal a Mailbox's mailfleet.io/move-to annotation asks for (None: none), or why it is not one."""
    value = ((body.get("metadata") or {}).get("annotations") or {}).get(api.MOVE_TO_ANNOTATION)
    if value is None:
        return None, None
    text = str(value).strip()
    if text.isdigit() and int(text) < replicas:
        return int(text), None
    return None, (
        f"{api.MOVE_TO_ANNOTATION}: {str(value)[:40]!r} is not a node of this domain: an ordinal from 0 to "
        f"{replicas - 1} (spec.replicas is {replicas}); the mailbox stays where it is"
    )


# -- Mailbox.status.move <-> moving.Move --------------------------------------------------------------


def forced_moves(
    bodies: Mapping[str, kube_types.Mailbox], *, replicas: int
) -> tuple[dict[str, int], dict[str, tuple[kube_types.Mailbox, str]]]:
    """The valid move-to annotations (address -> ordinal), and the invalid ones with why."""
    forced: dict[str, int] = {}
    problems: dict[str, tuple[kube_types.Mailbox, str]] = {}
    for address, body in bodies.items():
        ordinal, problem = forced_target(body, replicas=replicas)
        if ordinal is not None:
            forced[address] = ordinal
        elif problem is not None:
            problems[address] = (body, problem)
    return forced, problems


def recorded_moves(ctx: Context, bodies: Mapping[str, kube_types.Mailbox]) -> dict[str, moving.Move]:
    """The moves under way, as the Mailboxes' status.move records them (or as last written here)."""
    found = {}
    for address, body in bodies.items():
        move = from_status(address, ctx.statuses.move_of(body))
        if move is not None:
            found[address] = move
    return found


def from_status(address: str, recorded: kube_types.MailboxMove | None) -> moving.Move | None:
    """The move status.move records, None when there is none (or it is unreadable: edited by hand)."""
    if not recorded:
        return None
    try:
        return moving.Move(
            address=address,
            source=int(recorded["from"]),
            target=int(recorded["to"]),
            step=moving.Step(recorded["step"]),
            since=str(recorded["since"]),
            step_since=str(recorded.get("stepSince") or recorded["since"]),
        )
    except (KeyError, ValueError, TypeError):
        log.warning("%s: status.move is unreadable, ignored: %r", address, recorded)
        return None


def to_status(move: moving.Move, message: str = "") -> kube_types.MailboxMove:
    return {
        "from": move.source,
        "to": move.target,
        "step": move.step.value,
        "since": move.since,
        "stepSince": move.step_since,
        "message": message,
    }


# -- driving -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Driven:
    """What a reconcile's moves did."""

    blocked: dict[str, str] = dataclasses.field(default_factory=dict)  # address -> why its step did not run
    moving: int = 0  # moves under way after this reconcile
    waiting: int = 0  # planned moves not started
    started: bool = False  # moves may start (every node ready and up to date)


def nodes_ready(statefulset: kube_types.StatefulSet, replicas: int) -> bool:
    """Every node of the StatefulSet as applied is ready and runs the current spec: new moves may start."""
    observed = statefulset.get("status") or {}
    generation = (statefulset.get("metadata") or {}).get("generation")
    return (
        (generation is None or int(observed.get("observedGeneration") or 0) >= int(generation))
        and int(observed.get("readyReplicas") or 0) >= replicas
        and int(observed.get("updatedReplicas") or 0) >= replicas
        and observed.get("currentRevision") == observed.get("updateRevision")
    )


async def drive(
    ctx: Context,
    domain: api.MailDomain,
    the_plan: Plan,
    *,
    bodies: Mapping[str, kube_types.Mailbox],
    may_start: bool,
    parallel: int,
    token: str,
    ordinals: Sequence[int],
) -> Driven:
    """Start the waiting moves there is room for (when `may_start`), and a task for every move under way
    that has none (`_aside`); clean up the moves of Mailboxes deleted meanwhile (`_clean_ups`), and let the
    finalizer of a Mailbox that no longer moves go. `bodies`: the Mailboxes by address."""
    namespace, name = specs.common.namespace(domain), domain.metadata.name
    key = (namespace, name)
    driven = Driven(started=may_start)
    where = moving.InCluster(namespace=namespace, name=name, token=token, template=ctx.node_url)

    def aside(body: kube_types.Mailbox | None) -> Aside:
        return Aside(ctx=ctx, domain=domain, body=body, where=where, ordinals=ordinals)

    _clean_ups(ctx, domain, the_plan.active, aside)
    await _release_idle(ctx, key, bodies, the_plan.active)
    if the_plan.idle:
        ctx.metrics.mailboxes_moving.labels(namespace, name).set(0)
        return driven
    active = dict(the_plan.active)
    if may_start:
        for wanted in the_plan.waiting[: max(parallel - len(active), 0)]:
            body = bodies[wanted.address]
            move = moving.start(wanted.address, source=wanted.source, target=wanted.target, now=conditions.now())
            if not await ctx.statuses.write_move(body, to_status(move)):
                continue
            active[wanted.address] = move
            await ctx.recorder.event(
                _mailbox(body),
                "MoveStarted",
                f"moving from node {move.source} to node {move.target} ({wanted.why})",
                at=conditions.now(),
            )
    driven.waiting = len(the_plan.waiting) - (len(active) - len(the_plan.active))
    for (domain_key, address), (task, _) in list(ctx.copies.items()):
        if domain_key == key and address not in active and task.done():
            del ctx.copies[(domain_key, address)]  # the move ended
    for address, move in active.items():
        _aside(aside(bodies[address]), move, driven)
    driven.moving = sum(1 for a in active if ctx.statuses.move_of(bodies[a]) is not None)
    ctx.metrics.mailboxes_moving.labels(namespace, name).set(driven.moving)
    return driven


@dataclasses.dataclass(frozen=True)
class Aside:
    """What one move's task works with: the domain, how to reach its nodes (`where`, `ordinals`), and the
    Mailbox, as the reconcile that started the task read it (None: gone, its move known only from
    Context.moving)."""

    ctx: Context
    domain: api.MailDomain
    body: kube_types.Mailbox | None
    where: moving.DomainNodes
    ordinals: Sequence[int]

    @property
    def key(self) -> DomainKey:
        return specs.common.namespace(self.domain), self.domain.metadata.name

    @property
    def mailbox(self) -> kube_types.Mailbox:
        """The Mailbox of a move that runs (not a clean-up after it is gone)."""
        if self.body is None:
            raise AssertionError("a move runs only for a Mailbox that is there")
        return self.body


def _running(ctx: Context, key: DomainKey, address: str) -> bool:
    task = ctx.copies.get((key, address))
    return task is not None and not task[0].done()


def _launch(
    aside: Aside, address: str, what: str, work: Callable[[], Awaitable[None]], blocked: dict[str, str]
) -> None:
    """Run `work` in a task of its own (`ctx.copies`), which asks for the domain's next reconcile when it
    ends: at once, or in BLOCKED_RETRY seconds when a node (`blocked`) or the API did not answer."""
    ctx, key = aside.ctx, aside.key

    async def run() -> None:
        try:
            await work()
        except (k8s.ApiError, aiohttp.ClientError, TimeoutError) as error:  # a status not written: later
            log.warning("%s of %s: %s; trying again", what, address, error)
            blocked[address] = f"the Kubernetes API: {error}"
        finally:
            if blocked:  # a node not answering: not at once again
                asyncio.get_running_loop().call_later(BLOCKED_RETRY, ctx.enqueue, key)
            else:
                ctx.enqueue(key)

    task = asyncio.create_task(run(), name=f"{what} of {address}")
    ctx.copies[(key, address)] = (task, blocked)


def _aside(aside: Aside, move: moving.Move, driven: Driven) -> None:
    """A move runs beside the reconciles, in a task of its own (`ctx.copies`) that takes it from its
    recorded step to its end, each step recorded in the Mailbox's status before the next one runs. Why:
    the first copy of a big mailbox takes minutes (a GiB at tens of MiB/s), and the domain's other work
    (new Mailboxes, passwords, the other moves) must not wait for it; and the freeze, from Freezing to
    Thawing, must last what its steps take, not four of the domain's reconciles with the work queue's
    spacing between them. The task asks for the domain's next reconcile when it ends (done, or waiting for
    a node: then in BLOCKED_RETRY seconds); a reconcile meanwhile leaves it alone. Every step may be asked
    again, so a restarted operator just starts the task again from the recorded step."""
    ctx, body = aside.ctx, aside.mailbox
    blocked: dict[str, str] = {}
    running = ctx.copies.get((aside.key, move.address))
    if running is not None:
        task, blocked = running
        driven.blocked.update(blocked)  # said until a step goes on again
        if not task.done():
            return
        if from_status(move.address, ctx.statuses.move_of(body)) != move:
            return  # it recorded a step after this reconcile read the move: the next one goes on from there
    mine = Driven(blocked=dict(blocked))
    _launch(aside, move.address, f"move to node {move.target}", lambda: _run(aside, move, mine), mine.blocked)


def _clean_ups(
    ctx: Context, domain: api.MailDomain, active: Iterable[str], aside: Callable[[kube_types.Mailbox | None], Aside]
) -> None:
    """Start the clean-up (`_abandon`) of each move whose Mailbox was deleted and that no task runs: a
    Mailbox being deleted (its finalizer waits for the clean-up; after an operator restart its status.move
    says where the move was), or one gone (its move remembered in Context.moving: it had no finalizer yet,
    or someone removed it). A Mailbox's status.move is where its nodes are, unless the clean-up went a step
    further since (each step may be asked again)."""
    namespace, key = specs.common.namespace(domain), (specs.common.namespace(domain), domain.metadata.name)
    shared = ctx.moving_of(key)
    leaving = {
        str(body["spec"]["address"]).lower(): body
        for mail_domain in sorted(specs.node.domains_of(domain))
        for body in ctx.view.leaving(namespace, mail_domain)
    }
    for address, body in leaving.items():
        if _running(ctx, key, address):
            continue
        move = from_status(address, ctx.statuses.move_of(body)) or shared.moves.get(address)
        if move is not None or finalizer.held(body):
            _clean_up(aside(body), address, move)
    for move in abandoned(ctx, key, active):
        if move.address not in leaving:
            _clean_up(aside(None), move.address, move)


def _clean_up(aside: Aside, address: str, move: moving.Move | None) -> None:
    """The clean-up of a move whose Mailbox was deleted (`_abandon`), in a task of its own again; with no
    move left to clean up, only the finalizer goes."""
    blocked: dict[str, str] = {}

    async def work() -> None:
        if move is not None:
            async with aiohttp.ClientSession() as session:
                await _abandon(aside, move, session, blocked, gated=False)
        elif aside.body is not None:
            await finalizer.release(aside.ctx.client, aside.body)

    _launch(aside, address, "clean-up of the move", work, blocked)


async def _release_idle(
    ctx: Context, key: DomainKey, bodies: Mapping[str, kube_types.Mailbox], active: Iterable[str]
) -> None:
    """The finalizer of a Mailbox that does not move (its move ended, or it never started: an operator
    stopped between the two writes) goes."""
    moving_now = set(active)
    for address, body in bodies.items():
        idle = address not in moving_now and not _running(ctx, key, address) and ctx.statuses.move_of(body) is None
        if idle and finalizer.held(body):
            await finalizer.release(ctx.client, body)


# The steps of a move's window (reconcile/movegate.py): held from its freeze to its cleanup, so no
# backup takes points while the copy may be in place on both nodes.
WINDOW: Final = frozenset(
    {moving.Step.FREEZING, moving.Step.CATCHING_UP, moving.Step.FLIPPING, moving.Step.THAWING, moving.Step.CLEANING}
)
# Where a move is inside the window already when an operator takes it up (the copy may be in place).
INSIDE: Final = frozenset({moving.Step.FLIPPING, moving.Step.THAWING, moving.Step.CLEANING})


def recorded_inside(ctx: Context, domain: api.MailDomain) -> list[str]:
    """The domain's mailboxes whose move Mailbox.status records between the flip and the cleanup (the
    copy may be in place on both nodes), whether or not this operator runs it yet (reconcile/backup.py);
    a Mailbox being deleted counts too (its clean-up goes through the window)."""
    namespace, found = specs.common.namespace(domain), []
    for mail_domain in sorted(specs.node.domains_of(domain)):
        for body in [*ctx.view.mailboxes(namespace, mail_domain), *ctx.view.leaving(namespace, mail_domain)]:
            address = str(body["spec"]["address"]).lower()
            move = from_status(address, ctx.statuses.move_of(body))
            if move is not None and move.step in INSIDE:
                found.append(address)
    return found


def cleaning(ctx: Context, domain: api.MailDomain) -> list[moving.Move]:
    """The moves of the domain's Mailboxes being deleted, not cleaned up yet (`plan`: the nodes they
    touch stay until then)."""
    namespace, key = specs.common.namespace(domain), (specs.common.namespace(domain), domain.metadata.name)
    shared, found = ctx.moving_of(key), []
    for mail_domain in sorted(specs.node.domains_of(domain)):
        for body in ctx.view.leaving(namespace, mail_domain):
            address = str(body["spec"]["address"]).lower()
            move = from_status(address, ctx.statuses.move_of(body)) or shared.moves.get(address)
            if move is not None:
                found.append(move)
    return found


async def _run(aside: Aside, move: moving.Move, driven: Driven) -> None:
    """Take `move` from its step to its end, or until a step does not go on (a node not answering, a
    move failed after its flip, the Mailbox deleted). The finalizer is held before the first step (the
    move's first effect on a node), and goes when the move ends (`_step`, `_abandon`). The first copy runs
    alone; from the freeze to the cleanup the move holds the domain's gate (no backup takes points
    meanwhile)."""
    ctx, key = aside.ctx, aside.key
    shared = ctx.moving_of(key)

    async def publish(address: str, ordinal: int) -> None:
        async with shared.directory:
            if shared.publish is None:
                raise nodes.NodeError(f"the directory of {key[0]}/{key[1]} is not written yet")
            await shared.publish(address, ordinal)

    async def through(current: moving.Move | None, flip: Callable[[str, int], Awaitable[None]]) -> moving.Move | None:
        """The steps from `current` while they go on, each remembered (a Mailbox deleted meanwhile)."""
        while current is not None and current.step is not moving.Step.DONE:
            shared.moves[current.address] = current
            current = await _step(aside, current, session, flip, driven)
        if current is None and move.address not in driven.blocked:
            shared.moves.pop(move.address, None)  # done or rolled back (a blocked one is asked again)
        return current

    async with aiohttp.ClientSession() as session:
        try:
            shared.moves[move.address] = move
            if not await finalizer.hold(ctx.client, aside.mailbox):
                raise _Gone(move)  # deleted before the task ran
            current: moving.Move | None = move
            if move.step is moving.Step.COPYING:
                current = await _step(aside, move, session, _no_flip, driven)
            if current is not None and current.step in WINDOW:
                inside = current.step in INSIDE
                if not inside and shared.gate.backing_up:
                    await _note(ctx, aside.mailbox, current, "waiting for a backup of the domain to take its points")
                async with shared.gate.move(current.address, inside=inside):
                    try:
                        current = await through(current, publish)
                    except _Gone as gone:
                        await _abandon(aside, gone.move, session, driven.blocked, gated=True)
                        return
            await through(current, _no_flip)  # a roll-back
        except _Gone as gone:
            await _abandon(aside, gone.move, session, driven.blocked, gated=False)


class _Gone(Exception):
    """The Mailbox was deleted during its move; `move` is where the nodes are."""

    def __init__(self, move: moving.Move) -> None:
        super().__init__(move.address)
        self.move = move


CLEANING_UP: Final = "the Mailbox is being deleted: cleaning up what its move made"


async def _abandon(
    aside: Aside, move: moving.Move, session: aiohttp.ClientSession, blocked: dict[str, str], *, gated: bool
) -> None:
    """The move of a Mailbox deleted on the way: what the move made goes, and one copy stays, as any
    deleted Mailbox's mail stays on its home. Before the thaw it is rolled back: the source thawed, the
    target's copy (kept aside, or taken into place by a partial flip) dropped; from the thaw on it goes
    forward: the source thawed and its old copy dropped. While the Mailbox is there (its finalizer holds
    it) each step is recorded in status.move before it runs, so an operator restarted meanwhile goes on
    from it; the step is also remembered in Context.moving, for a Mailbox gone (no finalizer). A node that
    does not answer ends the task (`blocked`), and the domain's reconciles start it again (`_clean_ups`).
    When done, the finalizer goes, and with it the Mailbox."""
    ctx, key, body = aside.ctx, aside.key, aside.body
    shared = ctx.moving_of(key)
    if move.step in (moving.Step.THAWING, moving.Step.CLEANING, moving.Step.ROLLING_BACK):
        current = move
    else:
        current = dataclasses.replace(move, step=moving.Step.ROLLING_BACK)
    shared.moves[move.address] = current
    log.info("%s: its Mailbox was deleted during its move: %s", move.address, current.step)
    gate = shared.gate.move(move.address, inside=True) if not gated else contextlib.nullcontext()
    async with gate:
        while current.step is not moving.Step.DONE:
            if body is not None and not await _record(ctx, body, current, CLEANING_UP):
                body = None  # gone: remembered here only
            try:
                current = await moving.advance(
                    current, nodes=aside.where, session=session, ordinals=aside.ordinals, publish_home=_no_flip
                )
            except (nodes.NodeError, moving.MoveError) as error:  # a node still homes it (409), or is away
                blocked[move.address] = str(error)
                log.warning("%s: the deleted Mailbox's move: %s; trying again", move.address, error)
                if body is not None:
                    await _record(ctx, body, current, f"{CLEANING_UP}; waiting for a node: {error}")
                return
            shared.moves[move.address] = current
    blocked.pop(move.address, None)
    shared.moves.pop(move.address, None)
    ctx.metrics.moves.labels("abandoned").inc()
    if body is not None and await ctx.statuses.write_move(body, None):
        await finalizer.release(ctx.client, body)


async def _record(ctx: Context, body: kube_types.Mailbox, move: moving.Move, message: str) -> bool:
    """Write status.move unless it says this already; False when the Mailbox is gone."""
    if ctx.statuses.move_of(body) == to_status(move, message):
        return True
    return await ctx.statuses.write_move(body, to_status(move, message))


def abandoned(ctx: Context, key: DomainKey, active: Iterable[str]) -> list[moving.Move]:
    """The moves this operator ran whose Mailbox is gone (or being deleted) and whose task ended (a node
    did not answer its clean-up): the domain's reconcile starts their clean-up again."""
    shared, running = ctx.moving_of(key), set(active)
    found = []
    for address, move in list(shared.moves.items()):
        if address in running or _running(ctx, key, address):
            continue
        if any(str(b["spec"]["address"]).lower() == address for b in ctx.view.mailboxes(key[0], _domain_of(address))):
            continue  # the Mailbox is there (not served now): its move goes on once it is again
        found.append(move)
    return found


def _domain_of(address: str) -> str:
    return address.rsplit("@", 1)[-1]


async def _no_flip(address: str, ordinal: int) -> None:
    raise AssertionError(f"a move that does not hold the gate does not flip {address}'s home to node {ordinal}")


async def stop_copies(ctx: Context, key: DomainKey | None = None) -> None:
    """Cancel the moves running aside (all of them, or one domain's); each is taken up again from its
    recorded step by the next reconcile or the next operator."""
    going = [k for k in ctx.copies if key is None or k[0] == key]
    tasks = [ctx.copies.pop(k)[0] for k in going]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _leaving(ctx: Context, body: kube_types.Mailbox) -> bool:
    """The Mailbox is being deleted: as the body says, or as the watch showed since (MailboxStatuses.shown)."""
    return finalizer.leaving(body) or object_key(body) in ctx.statuses.leaving


async def _step(
    aside: Aside,
    move: moving.Move,
    session: aiohttp.ClientSession,
    publish_home: Callable[[str, int], Awaitable[None]],
    driven: Driven,
) -> moving.Move | None:
    """One step of one move, and its record: the move at its next step to run, None when there is none
    now (done, waiting for a node, failed after the flip). _Gone when the Mailbox is being deleted (or
    gone): its clean-up goes on from `move`."""
    ctx, body, address = aside.ctx, aside.mailbox, move.address
    if _leaving(ctx, body):
        raise _Gone(move)
    try:
        after = await moving.advance(
            move, nodes=aside.where, session=session, ordinals=aside.ordinals, publish_home=publish_home
        )
    except nodes.NodeError as error:  # not reachable now: the same step, later
        driven.blocked[address] = str(error)
        await _note(ctx, body, move, f"waiting for a node: {error}")
        return None
    except moving.MoveError as error:
        return await _failed(ctx, body, move, str(error), driven)
    driven.blocked.pop(address, None)
    if after.step is not moving.Step.DONE:
        # After the flip the home is the target: status.node says so with the step (no reconcile between).
        node = specs.common.pod_name(aside.domain, move.target) if move.step is moving.Step.FLIPPING else None
        if not await ctx.statuses.write_move(body, to_status(after), node=node):
            raise _Gone(after)
        return after
    if not await ctx.statuses.write_move(body, None):
        return None  # gone, with nothing left to clean
    ctx.moving_of(aside.key).moves.pop(address, None)  # ended: nothing to clean up if it is deleted now
    await finalizer.release(ctx.client, body)
    if _leaving(ctx, body):  # deleted during its last step: what it made is cleaned up as well
        ctx.metrics.moves.labels("abandoned").inc()
        return None
    if move.step is moving.Step.ROLLING_BACK:
        ctx.metrics.moves.labels("rolled_back").inc()
        return None
    ctx.metrics.moves.labels("done").inc()
    ctx.metrics.move_duration.observe(_seconds_since(move.since))
    await ctx.recorder.event(
        _mailbox(body), "MoveFinished", f"moved from node {move.source} to node {move.target}", at=conditions.now()
    )
    return None


async def _note(ctx: Context, body: kube_types.Mailbox, move: moving.Move, message: str) -> None:
    """Say in status.move.message why the step did not run (once: not rewritten while it says so)."""
    recorded = ctx.statuses.move_of(body) or {}
    if recorded.get("message") != message:
        await ctx.statuses.write_move(body, to_status(move, message))


async def _failed(
    ctx: Context, body: kube_types.Mailbox, move: moving.Move, why: str, driven: Driven
) -> moving.Move | None:
    """A lasting refusal: roll back when the directory cannot name the target yet (the move at RollingBack,
    to run next); after that, only going forward is safe, so the step is tried again later (and says why)."""
    driven.blocked[move.address] = why
    at = conditions.now()
    try:
        back = moving.roll_back(move, now=at)
    except moving.MoveError:
        recorded = ctx.statuses.move_of(body) or {}
        if recorded.get("message") != why:
            ctx.metrics.moves.labels("failed").inc()
            await ctx.recorder.event(_mailbox(body), "MoveFailed", f"{why}; trying again", type="Warning", at=at)
        await _note(ctx, body, move, why)
        return None
    if move.step is not moving.Step.ROLLING_BACK:
        await ctx.recorder.event(
            _mailbox(body),
            "MoveFailed",
            f"{why}; rolling back: the mailbox stays on node {move.source}",
            type="Warning",
            at=at,
        )
        ctx.statuses.retry_moves_after[object_key(body)] = time.monotonic() + RETRY_AFTER
    if not await ctx.statuses.write_move(body, to_status(back, why)):
        raise _Gone(back)
    return back


def held(ctx: Context, bodies: Iterable[kube_types.Mailbox]) -> set[str]:
    """Mailboxes (lower-case addresses) whose move was rolled back lately: not planned again yet."""
    now = time.monotonic()
    found = set()
    for body in bodies:
        until = ctx.statuses.retry_moves_after.get(object_key(body))
        if until is not None and until > now:
            found.add(str(body["spec"]["address"]).lower())
    return found


async def report_bad_annotations(ctx: Context, problems: Mapping[str, tuple[kube_types.Mailbox, str]]) -> None:
    """A Warning Event on each Mailbox whose move-to annotation is not an ordinal, once per value."""
    for body, problem in problems.values():
        key = object_key(body)
        value = str(((body.get("metadata") or {}).get("annotations") or {}).get(api.MOVE_TO_ANNOTATION))
        if ctx.statuses.move_to_reported.get(key) == value:
            continue
        ctx.statuses.move_to_reported[key] = value
        await ctx.recorder.event(_mailbox(body), "InvalidMoveTo", problem, type="Warning", at=conditions.now())


def _mailbox(body: kube_types.Mailbox) -> kube_types.Mailbox:
    """The body with its kind, as an Event's involvedObject needs (the view's snapshots have it)."""
    return {**body, "apiVersion": api.API_VERSION, "kind": "Mailbox"}


def _seconds_since(at: str) -> float:
    try:
        then = datetime.datetime.fromisoformat(at.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return max((datetime.datetime.now(datetime.UTC) - then).total_seconds(), 0.0)


# -- the domain's status ------------------------------------------------------------------------------


def progress(report: Report, *, layout: Layout, the_plan: Plan, driven: Driven) -> Report:
    """The domain reconcile's report with Progressing saying how far the moves are, while there are any."""
    if driven.moving == 0 and driven.waiting == 0:
        return report
    shrinking = layout.running is not None and layout.running > layout.target
    change = ""
    if (layout.running is not None and layout.running != layout.target) or layout.placed_over != layout.target:
        change = f" (replicas {max(layout.placed_over, layout.running or 0)} -> {layout.target})"
    message = f"{driven.moving} mailboxes moving, {driven.waiting} waiting{change}"
    reason = "MovingMailboxes"
    if not driven.started:
        message += "; new moves wait until every node is ready and up to date"
    if shrinking and (driven.blocked or not driven.started):
        reason = "ScaleDownBlocked"
        ordinals = f"{layout.target}..{(layout.running or 1) - 1}"
        message += f"; the StatefulSet keeps {the_plan.replicas} nodes until every mailbox on nodes {ordinals} moved"
    if driven.blocked:
        address, why = sorted(driven.blocked.items())[0]
        message += f"; {len(driven.blocked)} blocked, {address}: {why}"
    progressing = Condition("Progressing", "True", reason, message)
    wanted = [progressing if c.type == "Progressing" else c for c in report.conditions]
    return dataclasses.replace(report, conditions=wanted)


async def domain_gone(ctx: Context, key: DomainKey) -> None:
    """The MailDomain was deleted: its moves and clean-ups under way stop, its series of moving mailboxes
    goes, and so does the finalizer of each of its Mailboxes being deleted (`release_unserved`)."""
    await stop_copies(ctx, key)
    ctx.moving.pop(key, None)
    with contextlib.suppress(KeyError):
        ctx.metrics.mailboxes_moving.remove(*key)
    await release_unserved(ctx, key[0], gone=key[1])


async def release_unserved(ctx: Context, namespace: str, *, gone: str | None = None) -> None:
    """Let the finalizer of each Mailbox being deleted go when no MailDomain (other than `gone`, being
    deleted) serves its address: with the domain go its nodes (the StatefulSet), and no reconcile would
    ever clean up its move. Its copies stay on the volumes the StatefulSet leaves, with the rest of the
    domain's mail. A moving Mailbox that is not being deleted keeps its finalizer and status.move: a
    MailDomain made again on the same volumes finishes the move."""
    for body in ctx.view.leaving(namespace):
        if not finalizer.held(body):
            continue
        mail_domain = _domain_of(str(body["spec"]["address"]).lower())
        if [name for name in ctx.view.serving(namespace, mail_domain) if name != gone]:
            continue
        log.info("%s: deleted with no MailDomain serving it: its move is not cleaned up", body["spec"]["address"])
        await finalizer.release(ctx.client, body)
