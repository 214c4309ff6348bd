"""FolderView and Selected (mailnode.imap.session): one version of a folder shared by the sessions that show
it, a change applied once for all of them, and what a session keeps of its own (ghosts, hidden UIDs,
flags it told) staying small and giving the sequence numbers its client knows."""

from __future__ import annotations

import asyncio
import gc
import sys
import weakref

from mailnode.imap.session import FolderView, FolderViews, Selected
from mailnode.store.changes import Change
from mailnode.store.index import Message

ADDRESS = "user@example.com"


def row(uid: int, flags: str = "", modseq: int = 1) -> Message:
    return Message("INBOX", uid, f"cur/{uid}", flags, modseq, 0, 100)


def selected_on(view: FolderView) -> Selected:
    return Selected(
        name="INBOX", readonly=False, uidvalidity=1, view=view, first_recent=10**9, highestmodseq=1,
        uidnext=view.uids[-1] + 1, key=(ADDRESS, "INBOX", 1),
    )  # fmt: skip


def test_a_select_of_an_unchanged_folder_takes_the_shown_version() -> None:
    views = FolderViews()
    rows = [row(uid) for uid in range(1, 2001)]
    first = views.select((ADDRESS, "INBOX", 1), rows, asof=1)
    assert views.select((ADDRESS, "INBOX", 1), [row(uid) for uid in range(1, 2001)], asof=1) is first
    changed = [*rows[:-1], row(2000, "\\Seen", 2)]
    assert views.select((ADDRESS, "INBOX", 1), changed, asof=2) is not first
    assert views.select((ADDRESS, "Other", 1), rows, asof=1) is not first


def test_a_change_makes_one_new_version_for_every_session() -> None:
    view = FolderView.of([row(uid) for uid in range(1, 6)])
    change = Change("INBOX", "flags", (2,), ("\\Seen",), (5,))
    after = view.after(change)
    assert view.after(change) is after  # the next session on `view` takes the same one
    assert after.uids is view.uids and after.flags[2] == "\\Seen" and view.flags[2] == ""
    assert after.after(Change("INBOX", "flags", (2,), ("",), (4,))) is after  # older than what it holds
    expunged = Change("INBOX", "expunged", (2, 4))
    assert after.after(expunged).uids == [1, 3, 5] and after.after(expunged) is after.after(expunged)
    assert view.after(Change("INBOX", "expunged", (9,))) is view


def test_an_addition_is_read_once_for_all_the_sessions_on_a_version() -> None:
    view = FolderView.of([row(1), row(2)])
    change = Change("INBOX", "added", (3, 4))
    reads: list[list[int]] = []

    async def load(uids: list[int]) -> list[Message]:
        reads.append(uids)
        await asyncio.sleep(0)
        return [row(3, "\\Flagged", 7)]  # 4 was expunged before the read

    async def main() -> list[FolderView]:
        return list(await asyncio.gather(*(view.after_added(change, load) for _ in range(50))))

    results = asyncio.run(main())
    assert reads == [[3, 4]]
    assert all(result is results[0] for result in results)
    assert results[0].uids == [1, 2, 3] and results[0].flags[3] == "\\Flagged"


def test_an_addition_that_brings_its_rows_is_read_by_no_one() -> None:
    view = FolderView.of([row(1), row(2)])
    change = Change("INBOX", "added", (3,), rows=(row(3, "\\Draft", 7),))

    async def load(uids: list[int]) -> list[Message]:
        raise AssertionError("the change brought the rows")

    async def main() -> list[FolderView]:
        return list(await asyncio.gather(*(view.after_added(change, load) for _ in range(5))))

    results = asyncio.run(main())
    assert all(result is results[0] for result in results)
    after = results[0]
    assert after.uids == [1, 2, 3] and after.flags[3] == "\\Draft" and after.rows[3] == row(3, "\\Draft", 7)


def test_rows_and_rendered_items_follow_the_versions() -> None:
    """What never changes for a message (its row, its rendered FETCH items) is shared by the versions a
    flag change makes, carried into those an addition or an expunge makes, without the expunged."""
    view = FolderView.of([row(uid) for uid in range(1, 4)])
    view.rendered["RFC822.SIZE"] = {uid: b"RFC822.SIZE 100" for uid in range(1, 4)}
    flagged = view.after(Change("INBOX", "flags", (2,), ("\\Seen",), (5,)))
    assert flagged.rows is view.rows and flagged.rendered is view.rendered
    expunged = flagged.after(Change("INBOX", "expunged", (2,)))
    assert sorted(expunged.rows) == [1, 3] and sorted(expunged.rendered["RFC822.SIZE"]) == [1, 3]
    assert sorted(view.rendered["RFC822.SIZE"]) == [1, 2, 3]  # the older version keeps what it showed
    added = asyncio.run(expunged.after_added(Change("INBOX", "added", (4,), rows=(row(4),)), _no_load))
    assert sorted(added.rows) == [1, 3, 4] and sorted(added.rendered["RFC822.SIZE"]) == [1, 3]
    # A SELECT that reads the same flags but files elsewhere (a RENAME moved them) makes a new version.
    views = FolderViews()
    rows = [row(uid) for uid in range(1, 4)]
    first = views.select((ADDRESS, "INBOX", 1), rows, asof=1)
    moved = [m._replace(path="renamed/" + m.path) for m in rows]
    assert views.select((ADDRESS, "INBOX", 1), moved, asof=1) is not first


def test_a_select_of_a_changed_folder_keeps_the_rendered_items_of_the_messages_still_there() -> None:
    """A SELECT that finds the folder changed since its latest version (a flag, a message gone) makes a new
    version, with the FETCH items that version rendered for the messages it still has: a UID's message
    never changes, so they are not rendered again."""
    views = FolderViews()
    key = (ADDRESS, "INBOX", 1)
    first = views.select(key, [row(uid) for uid in range(1, 5)], asof=1)
    first.rendered["RFC822.SIZE"] = {uid: b"RFC822.SIZE 100" for uid in range(1, 5)}
    changed = [row(1), row(2, "\\Seen", 2), row(4), row(5)]  # 3 expunged, 5 added
    second = views.select(key, changed, asof=5)
    assert second is not first and second.flags[2] == "\\Seen"
    assert sorted(second.rendered["RFC822.SIZE"]) == [1, 2, 4]
    assert sorted(first.rendered["RFC822.SIZE"]) == [1, 2, 3, 4]  # the older version keeps what it showed
    # Another folder, or the same name with another UIDVALIDITY, starts with nothing rendered.
    assert views.select((ADDRESS, "INBOX", 2), changed, asof=5).rendered == {}


async def _no_load(uids: list[int]) -> list[Message]:
    raise AssertionError("nothing to read")


def test_a_session_keeps_the_numbers_its_client_knows() -> None:
    view = FolderView.of([row(uid) for uid in range(1, 6)])
    selected = selected_on(view)
    assert selected.uids is view.uids and sys.getsizeof(selected) < 512  # nothing of its own yet
    # Expunged elsewhere, not yet told (after FETCH): a ghost keeps its number and flags
    for uid in (2, 4):
        selected.haunt(uid)
    selected.advance(view.after(Change("INBOX", "expunged", (2, 4))))
    assert selected.uids == [1, 2, 3, 4, 5] and selected.seq(5) == 5 and selected.flags[4] == ""
    # Told (NOOP): each number as the client knows it by then
    assert [selected.hide(uid) for uid in list(selected.ghosts)] == [2, 3]
    selected.advance(selected.view)
    assert selected.uids is selected.view.uids and selected.uids == [1, 3, 5]
    # Its own expunge is told before the store's change reaches it
    assert selected.hide(3) == 2 and selected.uids == [1, 5] and selected.view.uids == [1, 3, 5]
    selected.advance(selected.view.after(Change("INBOX", "expunged", (3,))))
    assert selected.uids is selected.view.uids and selected.uids == [1, 5]


def test_flags_a_session_told_stand_until_its_view_has_them() -> None:
    view = FolderView.of([row(1), row(2)])
    selected = selected_on(view)
    selected.learn(row(2, "\\Seen", 3))
    assert selected.flags[2] == "\\Seen" and selected.modseqs[2] == 3 and view.flags[2] == ""
    selected.advance(view.after(Change("INBOX", "flags", (2,), ("\\Seen",), (3,))))
    assert selected.flags is selected.view.flags and selected.flags[2] == "\\Seen"


def test_a_version_does_not_keep_the_later_ones_alive() -> None:
    """A session that lags on an old version (no IDLE, no command for hours) pins that version only."""
    view = FolderView.of([row(uid) for uid in range(1, 6)])
    later = weakref.ref(view.after(Change("INBOX", "flags", (2,), ("\\Seen",), (5,))))
    gc.collect()
    assert later() is None


def test_a_version_knows_the_mod_sequence_it_is_the_folder_at_while_each_change_is_the_next() -> None:
    """`asof`: the folder's HIGHESTMODSEQ when it was exactly this version. Known from a SELECT's read, carried
    through each change that took the very next mod-sequences, lost at a gap (a change not applied here), at
    an expunge that does not say its mod-sequence and at a read of rows; FolderViews.current gives the latest
    version only when the folder is at its mod-sequence."""
    views = FolderViews()
    key = (ADDRESS, "INBOX", 1)
    first = views.select(key, [row(uid, modseq=uid) for uid in range(1, 4)], asof=3)
    assert first.asof == 3 and views.current(key, 3) is first and views.current(key, 4) is None
    flagged = first.after(Change("INBOX", "flags", (1, 2), ("\\Seen", "\\Seen"), (5, 4)))
    assert flagged.asof == 5
    assert flagged.after(Change("INBOX", "flags", (1,), ("\\Seen",), (5,))) is flagged  # had it already
    added = asyncio.run(flagged.after_added(Change("INBOX", "added", (4,), rows=(row(4, modseq=6),)), _no_load))
    assert added.asof == 6 and added.uids == [1, 2, 3, 4]
    assert added.after(Change("INBOX", "flags", (4,), ("\\Flagged",), (8,))).asof is None  # 7 is not here
    assert added.after(Change("INBOX", "expunged", (2,))).asof is None  # not said: not known
    assert added.after(Change("INBOX", "expunged", (2,), modseqs=(7,))).asof == 7

    async def load(uids: list[int]) -> list[Message]:
        return [row(uid, modseq=7) for uid in uids]

    assert asyncio.run(added.after_added(Change("INBOX", "added", (5,)), load)).asof is None
    views.caught_up(key, added)
    assert views.current(key, 6) is added and views.current(key, 5) is None
    # A SELECT that reads the rows the latest version shows learns where it stands, as a new one does.
    unknown = added.after(Change("INBOX", "expunged", (3,)))
    views.caught_up(key, unknown)
    assert views.current(key, 7) is None
    again = views.select(key, [row(uid, flags, modseq) for uid, flags, modseq in _shown(unknown)], asof=7)
    assert again is unknown and views.current(key, 7) is unknown


def _shown(view: FolderView) -> list[tuple[int, str, int]]:
    return [(uid, view.flags[uid], view.modseqs[uid]) for uid in view.uids]


def test_a_change_that_came_and_went_unseen_by_a_read_makes_the_mod_sequence_unknown() -> None:
    """A SELECT that reads the very rows of the latest version at a later mod-sequence (a message came and was
    expunged meanwhile) says so; the sessions still to apply that message's coming change the version, and
    the mod-sequence it is at is then not known (it is not the folder at the later one)."""
    views = FolderViews()
    key = (ADDRESS, "INBOX", 1)
    rows = [row(uid, modseq=uid) for uid in range(1, 4)]
    first = views.select(key, rows, asof=3)
    assert views.select(key, rows, asof=5) is first and first.asof == 5  # 4 came (modseq 4) and went (5)
    came = asyncio.run(first.after_added(Change("INBOX", "added", (4,), rows=(row(4, modseq=4),)), _no_load))
    assert came.uids == [1, 2, 3, 4] and came.asof is None
    assert views.current(key, 5) is first
