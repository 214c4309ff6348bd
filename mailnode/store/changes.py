"""The switchboard: the store announces every change to a mailbox (new messages, flag changes,
expunges) to whoever listens for that mailbox, so IMAP sessions on other connections can tell their
clients (EXISTS, FETCH FLAGS, EXPUNGE) without polling. mox does the same (store/state.go).

Listeners are plain callables run on the event loop; they must not block (an IMAP session queues
the change and reports it at the next point the protocol allows).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any, Literal


@dataclasses.dataclass(frozen=True)
class Change:
    folder: str
    kind: Literal["added", "flags", "expunged"]
    uids: tuple[int, ...]
    # for "flags": the new flags and modseq of each uid, in the same order; for "expunged": the one modseq
    # the expunge took (the folder's HIGHESTMODSEQ after it), when the store read it under the same lock
    flags: tuple[str, ...] = ()
    modseqs: tuple[int, ...] = ()
    origin: object | None = None  # the session that made the change, if any
    # for "added": the new index.Message rows, when the change that stored them read them back (a delivery
    # does), so that no listener has to query them; empty: listeners read the rows of `uids` themselves.
    # (Any: this module sits beside the index, and imports none of it.)
    rows: tuple[Any, ...] = ()


Listener = Callable[[Change], None]


class Switchboard:
    def __init__(self) -> None:
        self._listeners: dict[str, list[Listener]] = collections.defaultdict(list)

    def subscribe(self, address: str, listener: Listener) -> Callable[[], None]:
        """Listen for changes to one mailbox; returns the function that stops listening."""
        self._listeners[address].append(listener)

        def unsubscribe() -> None:
            listeners = self._listeners.get(address, [])
            if listener in listeners:
                listeners.remove(listener)
            if not listeners:
                self._listeners.pop(address, None)

        return unsubscribe

    def publish(self, address: str, change: Change) -> None:
        for listener in list(self._listeners.get(address, ())):
            listener(change)

    def listeners(self, address: str) -> int:
        return len(self._listeners.get(address, ()))
