"""Placement of mailboxes on the nodes of a MailDomain (mailfleet.specs.placement): rendezvous hashing is
stable (the same home for the same address and node count, in any process), spreads mailboxes roughly
evenly, moves only the mailboxes whose highest weight changed when a node is added, and the home
recorded in the directory wins over the hash."""

from __future__ import annotations

import collections
import subprocess
import sys

import pytest

from mailfleet.specs import placement

ADDRESSES = [f"user{i}@example.com" for i in range(3000)]


def test_a_home_is_stable_across_processes_and_case() -> None:
    here = [placement.rendezvous(address, 5) for address in ADDRESSES[:50]]
    # another interpreter, with another hash seed: Python's hash() would differ, sha256 does not
    code = (
        "from mailfleet.specs import placement;"
        "print([placement.rendezvous(f'user{i}@example.com', 5) for i in range(50)])"
    )
    there = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123"}
    )
    assert there.stdout.strip() == str(here)
    assert placement.rendezvous("Alice@Example.COM", 5) == placement.rendezvous("alice@example.com", 5)


def test_one_node_is_home_to_everyone() -> None:
    assert {placement.rendezvous(address, 1) for address in ADDRESSES} == {0}


@pytest.mark.parametrize("replicas", [2, 3, 7, 16])
def test_mailboxes_spread_roughly_evenly(replicas: int) -> None:
    counts = collections.Counter(placement.rendezvous(address, replicas) for address in ADDRESSES)
    assert set(counts) == set(range(replicas))
    expected = len(ADDRESSES) / replicas
    assert all(abs(count - expected) < 0.2 * expected for count in counts.values()), counts


def test_adding_a_node_moves_only_the_mailboxes_it_wins() -> None:
    before = {address: placement.rendezvous(address, 3) for address in ADDRESSES}
    after = {address: placement.rendezvous(address, 4) for address in ADDRESSES}
    moved = [address for address in ADDRESSES if before[address] != after[address]]
    assert moved and all(after[address] == 3 for address in moved)  # only to the new node
    assert abs(len(moved) - len(ADDRESSES) / 4) < 0.2 * len(ADDRESSES) / 4  # about its share


def test_the_recorded_home_wins_over_the_hash() -> None:
    address = next(a for a in ADDRESSES if placement.rendezvous(a, 3) != 2)
    homes = placement.homes([address, "new@example.com"], 3, recorded={address: 2})
    assert homes == {address: 2, "new@example.com": placement.rendezvous("new@example.com", 3)}
    # a recorded home that is no ordinal of the domain (the file edited by hand) is placed again
    assert placement.homes([address], 3, recorded={address: 9}) == {address: placement.rendezvous(address, 3)}


def test_no_nodes_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        placement.rendezvous("alice@example.com", 0)
