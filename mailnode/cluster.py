"""The nodes that serve the domain together (DESIGN.md "Clustering"): this node's ordinal, resolved once,
the peers by ordinal, and whether a mailbox is homed here. The SMTP handler and the queue's hand-off
(mailnode.queue.handoff) ask it where a recipient's mail goes; the IMAP proxy asks it where a session
goes. It never computes placement: the directory's `home` (written by the operator) is the truth.

    cluster = Cluster.from_config(config.cluster)    # once, at start
    cluster.clustered                                # more than one node: LMTP and the proxy listen
    cluster.ordinal                                  # this node
    cluster.is_home(entry)                           # is this mailbox stored here?
    cluster.peer(entry.home)                         # PeerConfig{host, lmtp, imap_proxy, http}
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

from mailwire.config import ClusterConfig, PeerConfig
from mailwire.directory import MailboxEntry

# The number ending a StatefulSet pod's name (`mail-example-com-2`): its ordinal.
_TRAILING_NUMBER = re.compile(r"-(\d+)$")

# The user name of the internal credential on the LMTP port (RFC 4616 authcid); the password is the
# domain's internal token (`internal.token_file`).
INTERNAL_USER = "mailfleet-internal"


class UnknownPeer(LookupError):
    """An ordinal that `cluster.peers` does not list (a directory newer than this node's config)."""


def resolve_ordinal(configured: int | None, environ: Mapping[str, str] | None = None) -> int:
    """`cluster.ordinal` when set; else the number ending $POD_NAME (a StatefulSet pod's name); else 0."""
    if configured is not None:
        return configured
    pod = (os.environ if environ is None else environ).get("POD_NAME", "")
    match = _TRAILING_NUMBER.search(pod)
    return int(match.group(1)) if match else 0


class Cluster:
    """This node's place among its peers. Immutable: the node config is read once at start."""

    def __init__(self, *, ordinal: int, peers: Sequence[PeerConfig]) -> None:
        self.ordinal = ordinal
        self.peers: tuple[PeerConfig, ...] = tuple(peers)
        if self.clustered and ordinal >= len(self.peers):
            raise ValueError(f"cluster.ordinal {ordinal} is not one of the {len(self.peers)} cluster.peers")

    @classmethod
    def from_config(cls, config: ClusterConfig, environ: Mapping[str, str] | None = None) -> Cluster:
        """Raises ValueError when the resolved ordinal is not among the peers."""
        return cls(ordinal=resolve_ordinal(config.ordinal, environ), peers=config.peers)

    @property
    def clustered(self) -> bool:
        """More than one node: mail and IMAP sessions of mailboxes homed elsewhere go to their home."""
        return len(self.peers) > 1

    def is_home(self, entry: MailboxEntry) -> bool:
        """True when the mailbox is stored on this node (always, for a node alone)."""
        return not self.clustered or entry.home == self.ordinal

    def peer(self, ordinal: int) -> PeerConfig:
        """The node of that ordinal as the others reach it; UnknownPeer when the config does not list it."""
        if not 0 <= ordinal < len(self.peers):
            raise UnknownPeer(f"no node {ordinal} among the {len(self.peers)} cluster.peers")
        return self.peers[ordinal]
