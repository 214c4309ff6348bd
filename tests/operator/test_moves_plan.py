"""The planning of mailbox moves (reconcile/moves.py), pure: which mailboxes move on a scale-up, a
scale-down and a forced move, how many nodes the StatefulSet runs meanwhile, and what the move-to
annotation accepts."""

from __future__ import annotations

from mailfleet import kube_types, moving
from mailfleet.reconcile import moves
from mailfleet.specs import placement

ADDRESSES = [f"user{i}@example.com" for i in range(200)]


def _homes(replicas: int) -> dict[str, int]:
    return {address: placement.rendezvous(address, replicas) for address in ADDRESSES}


def test_a_scale_up_moves_exactly_the_mailboxes_whose_rendezvous_home_changed():
    homes = _homes(3)
    plan = moves.plan(homes, layout=moves.Layout(5, 3, 3), recorded={}, forced={})
    expected = {a for a in ADDRESSES if placement.rendezvous(a, 5) != homes[a]}
    assert {w.address for w in plan.waiting} == expected
    assert all(w.target == placement.rendezvous(w.address, 5) and w.target in (3, 4) for w in plan.waiting)
    assert 0.25 < len(expected) / len(ADDRESSES) < 0.55  # about 2/5
    assert plan.replicas == 5  # the StatefulSet grows first
    assert plan.placed_over == 3  # balanced over 5 only once they moved


def test_once_the_scale_up_moved_everything_the_homes_are_balanced_over_the_new_nodes():
    plan = moves.plan(_homes(5), layout=moves.Layout(5, 5, 3), recorded={}, forced={})
    assert plan.waiting == [] and plan.placed_over == 5 and plan.replicas == 5


def test_a_scale_down_moves_every_mailbox_off_the_nodes_that_go_and_keeps_them_until_then():
    homes = _homes(5)
    plan = moves.plan(homes, layout=moves.Layout(2, 5, 5), recorded={}, forced={})
    assert {w.address for w in plan.waiting} == {a for a, home in homes.items() if home >= 2}
    assert all(w.target == placement.rendezvous(w.address, 2) < 2 for w in plan.waiting)
    assert plan.replicas == 5 and plan.placed_over == 5

    after = {a: min(home, placement.rendezvous(a, 2)) if home >= 2 else home for a, home in homes.items()}
    done = moves.plan(after, layout=moves.Layout(2, 5, 5), recorded={}, forced={})
    assert done.waiting == [] and done.replicas == 2 and done.placed_over == 2


def test_a_move_under_way_to_or_from_a_node_that_goes_keeps_the_statefulset():
    homes = {a: placement.rendezvous(a, 2) for a in ADDRESSES}
    under_way = moving.start(ADDRESSES[0], source=homes[ADDRESSES[0]], target=4, now="2026-01-01T00:00:00Z")
    plan = moves.plan(homes, layout=moves.Layout(2, 5, 5), recorded={ADDRESSES[0]: under_way}, forced={})
    assert plan.replicas == 5 and plan.active == {ADDRESSES[0]: under_way}


def test_recorded_moves_go_on_and_are_not_planned_twice():
    homes = _homes(3)
    first = next(a for a in ADDRESSES if placement.rendezvous(a, 5) != homes[a])
    recorded = {first: moving.start(first, source=homes[first], target=placement.rendezvous(first, 5), now="t")}
    plan = moves.plan(homes, layout=moves.Layout(5, 5, 3), recorded=recorded, forced={})
    assert list(plan.active) == [first] and first not in {w.address for w in plan.waiting}


def test_a_forced_move_comes_first_and_pins_the_mailbox():
    homes = _homes(3)
    alice = ADDRESSES[7]
    elsewhere = (homes[alice] + 1) % 3
    plan = moves.plan(homes, layout=moves.Layout(3, 3, 3), recorded={}, forced={alice: elsewhere})
    assert [(w.address, w.source, w.target, w.why) for w in plan.waiting] == [
        (alice, homes[alice], elsewhere, "forced")
    ]
    assert plan.placed_over == 3  # a forced move is no rebalance
    pinned = {**homes, alice: elsewhere}
    up = moves.plan(pinned, layout=moves.Layout(5, 5, 3), recorded={}, forced={alice: elsewhere})
    assert alice not in {w.address for w in up.waiting}


def test_held_mailboxes_are_not_planned():
    homes = _homes(3)
    plan = moves.plan(homes, layout=moves.Layout(5, 5, 3), recorded={}, forced={}, held=set(ADDRESSES))
    assert plan.waiting == [] and plan.placed_over == 3  # not balanced yet: they are tried again later


def test_the_move_to_annotation_is_an_ordinal_of_the_domain():
    def body(value: str) -> kube_types.Mailbox:
        return {"metadata": {"name": "alice", "annotations": {"mailfleet.io/move-to": value}}}

    assert moves.forced_target(body("2"), replicas=3) == (2, None)
    assert moves.forced_target(kube_types.Mailbox(metadata={"name": "alice"}), replicas=3) == (None, None)
    for bad in ("3", "-1", "two", "", "1.5"):
        ordinal, problem = moves.forced_target(body(bad), replicas=3)
        assert ordinal is None and problem is not None and "from 0 to 2" in problem, bad


def test_a_move_survives_its_status():
    move = moving.Move("a@example.com", 1, 3, moving.Step.CATCHING_UP, "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z")
    status = moves.to_status(move)
    assert status == {
        "from": 1, "to": 3, "step": "CatchingUp", "since": "2026-01-01T00:00:00Z",
        "stepSince": "2026-01-01T00:01:00Z", "message": "",
    }  # fmt: skip
    assert moves.from_status("a@example.com", status) == move
    assert moves.from_status("a@example.com", {"from": 1, "step": "Nonsense"}) is None


def test_the_api_names_every_step_of_the_driver():
    from typing import get_args

    from mailfleet import api

    assert set(get_args(api.MoveStep)) == {step.value for step in moving.Step}
