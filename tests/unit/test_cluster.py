"""mailnode.cluster: this node's ordinal (configured, from $POD_NAME, else 0), the peers by ordinal, and
whether a mailbox is homed here; and the queue's hand-off routes, which outlive a restart in the spool."""

from __future__ import annotations

import pytest

from mailnode.cluster import Cluster, UnknownPeer, resolve_ordinal
from mailnode.queue import handoff
from mailwire.config import ClusterConfig, PeerConfig
from mailwire.directory import MailboxEntry
from tests.conftest import cheap_hash

PEERS = [PeerConfig(host=f"mail-{i}.mail-headless.ns.svc") for i in range(3)]


def entry(home: int) -> MailboxEntry:
    return MailboxEntry(address="bob@example.com", password_hash=cheap_hash("secret"), home=home)


@pytest.mark.parametrize(
    ("configured", "pod", "expected"),
    [(2, "mail-example-com-0", 2), (None, "mail-example-com-1", 1), (None, "mail-example-com-12", 12),
     (None, "laptop", 0), (None, "", 0)],
)  # fmt: skip
def test_the_ordinal_is_configured_or_ends_the_pod_name(configured: int | None, pod: str, expected: int) -> None:
    assert resolve_ordinal(configured, {"POD_NAME": pod}) == expected


def test_a_node_alone_is_home_to_every_mailbox() -> None:
    alone = Cluster.from_config(ClusterConfig(), {})
    assert not alone.clustered
    assert alone.is_home(entry(0)) and alone.is_home(entry(3))


def test_a_clustered_node_is_home_only_to_its_own_mailboxes() -> None:
    cluster = Cluster.from_config(ClusterConfig(peers=PEERS), {"POD_NAME": "mail-1"})
    assert cluster.clustered and cluster.ordinal == 1
    assert cluster.is_home(entry(1)) and not cluster.is_home(entry(0))
    assert cluster.peer(2).host == "mail-2.mail-headless.ns.svc"
    with pytest.raises(UnknownPeer):
        cluster.peer(3)


def test_an_ordinal_outside_the_peers_is_refused() -> None:
    with pytest.raises(ValueError, match="not one of the 3"):
        Cluster.from_config(ClusterConfig(ordinal=3, peers=PEERS))


def test_hand_off_routes() -> None:
    assert handoff.ordinal_of(handoff.route_to(2)) == 2
    assert handoff.ordinal_of("") is None and handoff.ordinal_of("node:x") is None


def test_an_answer_says_its_class_and_status() -> None:
    full = handoff.Answer(552, "552 5.2.2 Mailbox full")
    assert full.permanent and not full.delivered and full.status == "5.2.2"
    assert handoff.Answer(421, "421 connection lost").status == "4.0.0"
