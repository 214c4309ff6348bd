"""Placement: which node of a MailDomain is each mailbox's home (DESIGN.md "Clustering"), by rendezvous
(highest-random-weight) hashing of the address over the ordinals. Pure functions, called by
`mailfleet.specs.node.directory` (the operator and `mailfleet local up` alike); the directory then
records the home, and a node never computes placement itself.

Rendezvous hashing moves, when an ordinal is added, only the mailboxes whose highest weight is the new
ordinal's (about 1/N of them), and spreads them evenly without a ring or virtual nodes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping


def weight(ordinal: int, address: str) -> int:
    """The weight of `ordinal` for `address`: sha256, stable across processes and versions (Python's
    hash() is salted per process, so it would move every mailbox on each operator restart)."""
    digest = hashlib.sha256(f"{ordinal}:{address.lower()}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def rendezvous(address: str, replicas: int) -> int:
    """The ordinal in 0..replicas-1 with the highest weight for `address` (ties, which need a sha256
    collision on 64 bits, go to the lower ordinal)."""
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, not {replicas}")
    return max(range(replicas), key=lambda ordinal: (weight(ordinal, address), -ordinal))


def homes(addresses: list[str], replicas: int, *, recorded: Mapping[str, int]) -> dict[str, int]:
    """The home of each address (lower case): the one `recorded` in the current directory when it is an
    ordinal of the domain ("the directory, not the hash, is the truth": an operator restart or a changed
    hash never moves a mailbox), else its rendezvous ordinal."""
    placed: dict[str, int] = {}
    for address in addresses:
        key = address.lower()
        home = recorded.get(key)
        placed[key] = home if home is not None and 0 <= home < replicas else rendezvous(key, replicas)
    return placed
