"""The mailbox index's schema migrations (mailnode.store.index): an index written by an older mailnode
opens, keeps its rows and caches, and gains what the current schema adds (version 4: the header fields
SEARCH caches per message)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mailnode.store import index

# Version 3 as mailnode wrote it (the schema before the search column).
_VERSION_3 = """
CREATE TABLE folders (
    id            INTEGER PRIMARY KEY,
    name          TEXT    NOT NULL UNIQUE,
    uidvalidity   INTEGER NOT NULL,
    uidnext       INTEGER NOT NULL DEFAULT 1,
    highestmodseq INTEGER NOT NULL DEFAULT 1,
    subscribed    INTEGER NOT NULL DEFAULT 1,
    first_recent  INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE messages (
    folder_id     INTEGER NOT NULL REFERENCES folders(id),
    uid           INTEGER NOT NULL,
    path          TEXT    NOT NULL UNIQUE,
    flags         TEXT    NOT NULL DEFAULT '',
    modseq        INTEGER NOT NULL,
    internal_date INTEGER NOT NULL,
    size          INTEGER NOT NULL,
    structure     TEXT,
    PRIMARY KEY (folder_id, uid)
) WITHOUT ROWID;
CREATE TABLE handoffs (
    id TEXT    PRIMARY KEY,
    at INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO folders (id, name, uidvalidity, uidnext, highestmodseq) VALUES (1, 'INBOX', 1700000000, 3, 3);
INSERT INTO messages VALUES (1, 1, 'INBOX/cur/a', '\\Seen', 2, 1700000001, 120, '{"cached": 1}');
INSERT INTO messages VALUES (1, 2, 'INBOX/cur/b', '', 3, 1700000002, 240, NULL);
INSERT INTO handoffs VALUES ('peer-1', 1700000003);
PRAGMA user_version = 3;
"""


def _version_3(path: Path) -> None:
    db = sqlite3.connect(path)
    try:
        db.executescript(_VERSION_3)
    finally:
        db.close()


def test_a_version_3_index_opens_with_its_rows_and_gains_the_search_cache(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    _version_3(path)
    db = index.Index(path)
    try:
        assert db._db.execute("PRAGMA user_version").fetchone()[0] == index.SCHEMA_VERSION == 4
        assert db.messages("INBOX") == [
            index.Message("INBOX", 1, "INBOX/cur/a", "\\Seen", 2, 1700000001, 120),
            index.Message("INBOX", 2, "INBOX/cur/b", "", 3, 1700000002, 240),
        ]
        assert db.structures("INBOX", [1, 2]) == {1: '{"cached": 1}', 2: None}
        assert db.search_fields("INBOX", [1, 2]) == {}  # nothing cached yet: computed at the next search
        db.set_search_fields("INBOX", {2: '{"subject": "b"}'})
        assert db.search_fields("INBOX", [1, 2]) == {2: '{"subject": "b"}'}
        # Writes go on as before, and a new message has no cached fields until a search computes them.
        [uid] = db.add([index.NewMessage("INBOX", "INBOX/cur/c", 10, 1700000004)])
        assert uid == 3 and db.search_fields("INBOX", [3]) == {}
    finally:
        db.close()
    # Opened again (now version 4): nothing to migrate, the cache kept.
    again = index.Index(path)
    try:
        assert again.search_fields("INBOX", [1, 2, 3]) == {2: '{"subject": "b"}'}
    finally:
        again.close()


def test_a_read_only_reader_of_a_version_3_copy_lists_its_files(tmp_path: Path) -> None:
    """Backups read archived indexes of any version with Reader, which does not migrate."""
    path = tmp_path / "index.sqlite"
    _version_3(path)
    with index.Reader(path) as reader:
        assert reader.check() == []
        assert reader.files() == [("INBOX/cur/a", 120), ("INBOX/cur/b", 240)]
        assert [m.uid for m in reader.messages("INBOX")] == [1, 2]


def test_a_new_index_has_the_search_cache(tmp_path: Path) -> None:
    db = index.Index(tmp_path / "index.sqlite")
    try:
        db.create_folder("INBOX")
        [uid] = db.add([index.NewMessage("INBOX", "INBOX/cur/a", 10, 1700000000)])
        db.set_search_fields("INBOX", {uid: "{}"})
        assert db.search_fields("INBOX", [uid]) == {uid: "{}"}
    finally:
        db.close()


def test_rows_for_sessions_share_their_values(tmp_path: Path) -> None:
    """SELECT's rows (`shared=True`), which every session keeps, hold the same UID, flags and modseq
    objects for equal values, whichever read made them; other reads make plain rows of equal value."""
    db = index.Index(tmp_path / "index.sqlite")
    try:
        db.create_folder("INBOX")
        db.add([index.NewMessage("INBOX", f"INBOX/cur/{n}", 10, 1700000000, flags="\\Seen") for n in range(300)])
        first, second = db.messages("INBOX", shared=True), db.messages("INBOX", shared=True)
        assert first == second == db.messages("INBOX")
        for a, b in zip(first, second, strict=True):
            assert a.uid is b.uid and a.flags is b.flags and a.modseq is b.modseq
    finally:
        db.close()
