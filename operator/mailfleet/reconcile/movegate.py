"""What a MailDomain's reconciles, its mailbox moves (reconcile/moves.py) and its backups (reconcile/backup.py)
share while moves run beside the reconciles, one per domain in Context.moving (docs/architecture.md
"Mailbox moves"):

  - `directory`: the lock a reconcile holds from reading the homes to writing the directory and beyond,
    and a move's flip holds while it writes the directory with the new home; so a reconcile that read the
    homes before a flip never writes the directory after it with the old home;
  - `publish`: the last reconcile's way of writing the directory with one home changed (its rendering
    of what it applied: under `directory`, that is the directory as it is);
  - `gate`: between the moves' windows and the backups' points. From taking the copy into place on the
    target (Flipping) to dropping the old one (Cleaning) both nodes hold the mailbox: a backup whose points
    were taken across that window would hold it twice, or not at all (the target's point before the flip,
    the source's after the drop). So a backup takes its points only while no move is between its freeze
    and its cleanup, and a move freezes only while no backup takes points.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable

from mailfleet import moving

# How often a backup waiting for the moves looks again at what Mailbox.status records (a move recorded
# inside the window by an operator that stopped, whose task has not started yet, tells nobody).
RECHECK: float = 1.0


class StillMoving(Exception):
    """A backup waited too long for moves to leave their window; the message names their mailboxes."""


class Gate:
    """Moves and backups of one domain take turns: any number of moves at once, or one backup's points.
    A backup waiting keeps new moves from freezing (moves are short and many; a backup would starve)."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._moves: set[str] = set()  # addresses between their freeze and their cleanup
        self._backups = 0  # taking points now
        self._waiting = 0  # backups waiting for the moves to leave the window

    @property
    def moves(self) -> frozenset[str]:
        return frozenset(self._moves)

    @property
    def waiting(self) -> int:
        """Backups waiting for the moves to leave their window."""
        return self._waiting

    @property
    def backing_up(self) -> bool:
        return self._backups > 0

    @contextlib.asynccontextmanager
    async def move(self, address: str, *, inside: bool) -> AsyncIterator[None]:
        """Hold the window for a move of `address`. `inside`: the move is recorded in the window already
        (an operator restarted there): it goes on at once, since a backup that started meanwhile waited for
        it (`backup`'s `recorded`)."""
        async with self._changed:
            if not inside:
                await self._changed.wait_for(lambda: self._backups == 0 and self._waiting == 0)
            self._moves.add(address)
        try:
            yield
        finally:
            async with self._changed:
                self._moves.discard(address)
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def backup(self, recorded: Callable[[], list[str]], *, within: float) -> AsyncIterator[None]:
        """Hold off the moves while a backup takes its points: first wait until no move is in the window,
        whether this operator runs it or `recorded()` (the moves Mailbox.status records there) says so.
        StillMoving after `within` seconds of waiting (a move stuck on a node that does not answer)."""
        deadline = asyncio.get_running_loop().time() + within
        async with self._changed:
            self._waiting += 1
            try:
                while self._moves or recorded():
                    left = deadline - asyncio.get_running_loop().time()
                    if left <= 0:
                        raise StillMoving(", ".join(sorted(self._moves | set(recorded()))))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), timeout=min(RECHECK, left))
                self._backups += 1
            finally:
                self._waiting -= 1
                self._changed.notify_all()
        try:
            yield
        finally:
            async with self._changed:
                self._backups -= 1
                self._changed.notify_all()


@dataclasses.dataclass
class DomainMoving:
    """One MailDomain's share between its reconciles, moves and backups (see the module's docstring)."""

    directory: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    publish: Callable[[str, int], Awaitable[None]] | None = None
    gate: Gate = dataclasses.field(default_factory=Gate)
    # The moves under way as their tasks last left them, by address: a Mailbox being deleted has its
    # status.move (its mailfleet.io/move finalizer holds it), but one gone without it (removed by hand, or a
    # move recorded before its task held it) has no status to read its move from, and what the move made
    # is cleaned up from here (reconcile/moves.py).
    moves: dict[str, moving.Move] = dataclasses.field(default_factory=dict)
