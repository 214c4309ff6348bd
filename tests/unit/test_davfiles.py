"""A mailbox's calendars and contacts as files (mailnode.store.davfiles) and as archive members
(mailnode.backup.archive, format 2), on a real file system with a `.dav/` laid out as Radicale leaves it.

Aspects: which files are carried (items and collection properties, not Radicale's caches, locks and
temporary files, nor the DAV lock); the lock (a copy's shared hold keeps a writer out, not another copy);
`merge` adds what is missing under the restoring mailbox's own principal, keeps what is there, refuses a
path that would leave `.dav/`; an archive carries `.dav/` after the mailbox's messages, verifies it, gives
it back to `mailbox_messages` and to a whole-node restore, and refuses a `.dav/` member that is unsafe,
not carried, of no mailbox, or that the manifest does not count; an archive of format 1 is still read.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from mailnode.backup import archive, noderestore
from mailnode.store import davfiles, maildir
from tests.unit.test_archive import ALICE, BOB, add_mailbox, members, message, repack, write

ITEM = "collection-root/alice@example.com/calendar/standup.ics"
PROPS = "collection-root/alice@example.com/calendar/.Radicale.props"
CARD = "collection-root/alice@example.com/contacts/ann.vcf"
CARRIED = {ITEM: b"BEGIN:VCALENDAR\r\nEND:VCALENDAR\r\n", PROPS: b'{"tag": "VCALENDAR"}', CARD: b"BEGIN:VCARD\r\n"}
NOT_CARRIED = [
    ".Radicale.lock",
    davfiles.LOCK,
    "collection-root/alice@example.com/calendar/.Radicale.cache/item/standup.ics",
    "collection-root/alice@example.com/.Radicale.tmp-abc/standup.ics",
    "collection-root/alice@example.com/calendar/.Radicale.tmp-x",
]


def add_dav(mailbox_dir: Path) -> None:
    for rel, data in [*CARRIED.items(), *((rel, b"x") for rel in NOT_CARRIED)]:
        path = mailbox_dir / davfiles.DIR / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@pytest.fixture
def staged(tmp_path: Path) -> Path:
    root = tmp_path / "staged"
    add_dav(add_mailbox(root, ALICE, {"INBOX": [(message(1), "")]}))
    add_mailbox(root, BOB, {"INBOX": [(message(2), "")]})
    return root


def test_only_items_and_properties_are_carried(staged: Path) -> None:
    alice = maildir.mailbox_dir(staged, ALICE)
    assert davfiles.files(alice) == sorted((rel, len(data)) for rel, data in CARRIED.items())
    assert davfiles.files(maildir.mailbox_dir(staged, BOB)) == []
    for rel in NOT_CARRIED:
        with pytest.raises(ValueError, match="not a calendar or contact file"):
            davfiles.check(rel)
    for rel in ("../index.sqlite", "collection-root/../../x", "/etc/passwd", "a//b", "a/./b"):
        with pytest.raises(ValueError, match="not a calendar or contact file"):
            davfiles.check(rel)


def test_a_copy_keeps_writers_out_and_not_other_copies(staged: Path) -> None:
    alice = maildir.mailbox_dir(staged, ALICE)

    def try_lock(kind: int) -> bool:
        fd = os.open(alice / davfiles.DIR / davfiles.LOCK, os.O_RDWR)
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    with davfiles.locked(alice, exclusive=False):
        assert not try_lock(fcntl.LOCK_EX)
        assert try_lock(fcntl.LOCK_SH)
    with davfiles.locked(alice, exclusive=True):
        assert not try_lock(fcntl.LOCK_SH)
    assert try_lock(fcntl.LOCK_EX)
    bob = maildir.mailbox_dir(staged, BOB)
    with davfiles.locked(bob, exclusive=False):  # nothing to copy: no `.dav/` is made for it
        assert not (bob / davfiles.DIR).exists()


def test_merge_adds_what_is_missing_under_the_mailboxs_own_principal(staged: Path, tmp_path: Path) -> None:
    target = tmp_path / "target"
    present = target / davfiles.DIR / "collection-root/copy@example.com/calendar/standup.ics"
    present.parent.mkdir(parents=True)
    present.write_bytes(b"changed since")
    written, kept = davfiles.merge(target, list(CARRIED.items()), user="copy@example.com")
    assert (written, kept) == (2, 1)
    assert present.read_bytes() == b"changed since"
    assert davfiles.files(target) == sorted(
        (rel.replace("alice@", "copy@"), len(b"changed since" if rel == ITEM else data))
        for rel, data in CARRIED.items()
    )
    assert davfiles.merge(target, list(CARRIED.items()), user="copy@example.com") == (0, 3)  # run again
    with pytest.raises(ValueError, match="not a calendar or contact file"):
        davfiles.merge(target, [("collection-root/../../../escape", b"x")], user="copy@example.com")
    assert not (tmp_path / "escape").exists()


def test_an_archive_carries_dav_after_the_messages_and_gives_it_back(staged: Path, tmp_path: Path) -> None:
    path = tmp_path / "backup.tar"
    summary = write(staged, path)
    assert summary.dav == {ALICE: (3, sum(len(data) for data in CARRIED.values()))}
    names = [info.name for info, _ in members(path)]
    prefix = maildir.mailbox_dir(Path(), ALICE).as_posix()
    dav_members = [n for n in names if n.startswith(f"{prefix}/.dav/")]
    assert dav_members == [f"{prefix}/.dav/{rel}" for rel in sorted(CARRIED)]
    assert names.index(dav_members[0]) > max(names.index(n) for n in names if n.startswith(f"{prefix}/INBOX/"))
    assert json.loads(dict(members_by_name(path))[archive.MANIFEST])["dav"] == {
        ALICE: {"files": 3, "bytes": sum(len(data) for data in CARRIED.values())}
    }
    assert archive.verify(path) == summary

    dav: list[tuple[str, bytes]] = []
    assert [m.data for m in archive.mailbox_messages(path, ALICE, dav=dav)] == [message(1)]
    assert dav == sorted(CARRIED.items())
    assert [m.data for m in archive.mailbox_messages(path, ALICE)] == [message(1)]  # not asked for: skipped

    data_dir = tmp_path / "data"
    assert noderestore.restore_node(path, data_dir) == summary
    alice = maildir.mailbox_dir(data_dir, ALICE)
    assert {rel: (alice / davfiles.DIR / rel).read_bytes() for rel, _ in davfiles.files(alice)} == CARRIED


def members_by_name(path: Path) -> list[tuple[str, bytes]]:
    return [(info.name, data) for info, data in members(path)]


def test_bad_dav_members_are_refused(staged: Path, tmp_path: Path) -> None:
    path = tmp_path / "backup.tar"
    write(staged, path)
    prefix = maildir.mailbox_dir(Path(), ALICE).as_posix()
    bob = maildir.mailbox_dir(Path(), BOB).as_posix()

    def renamed(old: str, new: str) -> Path:
        return repack(path, lambda ms: [(new if n == old else n, d) for n, d in ms], fix_manifest=True)

    cache = f"{prefix}/.dav/collection-root/alice@example.com/calendar/.Radicale.cache/x"
    with pytest.raises(archive.ArchiveError, match="not a calendar or contact file"):
        archive.verify(renamed(f"{prefix}/.dav/{ITEM}", cache))

    def before_index(ms: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        own = [m for m in ms if m[0] == f"{prefix}/.dav/{ITEM}"]
        return [ms[0], *((f"mail/example.com/nobody/.dav/{ITEM}", d) for _, d in own), *ms[1:]]

    with pytest.raises(archive.ArchiveError, match=r"before its mailbox's index\.sqlite"):
        archive.verify(repack(path, before_index, fix_manifest=True))

    def moved_to_bob(ms: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        dav = [(n.replace(prefix, bob), d) for n, d in ms if n.startswith(f"{prefix}/.dav/")]
        rest = [m for m in ms if not m[0].startswith(f"{prefix}/.dav/")]
        return [*rest[:-2], *dav, *rest[-2:]]  # before the queue and the manifest, after bob's index

    with pytest.raises(archive.ArchiveError, match="calendar and contact counts"):
        archive.verify(repack(path, moved_to_bob, fix_manifest=True))


def test_an_archive_of_format_1_is_still_read(tmp_path: Path) -> None:
    root = tmp_path / "staged"
    add_mailbox(root, ALICE, {"INBOX": [(message(1), "")]})
    path = tmp_path / "backup.tar"
    summary = write(root, path)

    def format_1(ms: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        header = json.loads(ms[0][1])
        manifest = json.loads(ms[-1][1])
        del manifest["dav"]
        return [
            (ms[0][0], json.dumps({**header, "format": 1}).encode()),
            *ms[1:-1],
            (ms[-1][0], json.dumps(manifest).encode()),
        ]

    old = repack(path, format_1, fix_manifest=True)
    assert archive.verify(old).mailboxes == summary.mailboxes
