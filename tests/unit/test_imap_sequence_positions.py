"""SequenceSet.positions (mailnode.imap.protocol): a UID set's messages with their sequence numbers, found a
range at a time, are what a search of each UID in the folder's UIDs gives (Session.messages_for)."""

from __future__ import annotations

import bisect
import random

import pytest

from mailnode.imap import protocol


@pytest.mark.parametrize("seed", range(30))
def test_positions_are_each_members_place(seed: int) -> None:
    rng = random.Random(seed)
    uids = sorted(rng.sample(range(1, 400), rng.randrange(0, 60)))
    largest = uids[-1] if uids else 0
    ranges = [f"{rng.randrange(1, 420)}:{rng.choice(['*', str(rng.randrange(1, 420))])}" for _ in range(3)]
    text = ",".join([*ranges, str(rng.randrange(1, 420)), "*"][: rng.randrange(1, 6)])
    numbers = protocol.parse_sequence_set(text)
    expected = [(bisect.bisect_left(uids, uid) + 1, uid) for uid in numbers.iter(uids, largest)]
    assert numbers.positions(uids, largest) == expected, text
