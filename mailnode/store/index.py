"""The SQLite index of one mailbox: folders (UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ) and messages (UID,
file, flags, modseq, internal date, size).

Used only by mailnode.store.mailstore, from the Gateway's threads, one thread at a time per index
(the store serialises writes). WAL with synchronous=FULL: a commit returns only after the log is on
disk, so a committed row is as durable as the message file it points to.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS folders (
    id            INTEGER PRIMARY KEY,
    name          TEXT    NOT NULL UNIQUE,
    uidvalidity   INTEGER NOT NULL,
    uidnext       INTEGER NOT NULL DEFAULT 1,
    highestmodseq INTEGER NOT NULL DEFAULT 1,
    subscribed    INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS messages (
    folder_id     INTEGER NOT NULL REFERENCES folders(id),
    uid           INTEGER NOT NULL,
    path          TEXT    NOT NULL UNIQUE,
    flags         TEXT    NOT NULL DEFAULT '',
    modseq        INTEGER NOT NULL,
    internal_date INTEGER NOT NULL,
    size          INTEGER NOT NULL,
    PRIMARY KEY (folder_id, uid)
) WITHOUT ROWID;
"""


@dataclasses.dataclass(frozen=True)
class Folder:
    id: int
    name: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int


@dataclasses.dataclass(frozen=True)
class NewMessage:
    folder: str
    path: str  # relative to the mailbox directory
    size: int
    internal_date: int
    flags: str = ""


@dataclasses.dataclass(frozen=True)
class Message:
    folder: str
    uid: int
    path: str
    flags: str
    modseq: int
    internal_date: int
    size: int


class Index:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{path}: index schema {version} is newer than this mailnode ({SCHEMA_VERSION})")
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    def folder(self, name: str) -> Folder | None:
        row = self._db.execute(
            "SELECT id, name, uidvalidity, uidnext, highestmodseq FROM folders WHERE name = ?", (name,)
        ).fetchone()
        return Folder(*row) if row else None

    def create_folder(self, name: str) -> Folder:
        existing = self.folder(name)
        if existing:
            return existing
        # RFC 3501 §2.3.1.1: UIDVALIDITY must grow if a folder is ever recreated; the clock does that.
        last = self._db.execute("SELECT COALESCE(MAX(uidvalidity), 0) FROM folders").fetchone()[0]
        uidvalidity = max(int(time.time()), last + 1)
        self._db.execute("INSERT INTO folders (name, uidvalidity) VALUES (?, ?)", (name, uidvalidity))
        folder = self.folder(name)
        assert folder is not None
        return folder

    def add(self, messages: Iterable[NewMessage]) -> list[int]:
        """Insert messages in one transaction and return their UIDs. The folders must exist."""
        uids = []
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            for message in messages:
                row = cur.execute(
                    "SELECT id, uidnext, highestmodseq FROM folders WHERE name = ?", (message.folder,)
                ).fetchone()
                if row is None:
                    raise KeyError(f"no folder {message.folder!r}")
                folder_id, uid, modseq = row[0], row[1], row[2] + 1
                cur.execute(
                    "INSERT INTO messages (folder_id, uid, path, flags, modseq, internal_date, size)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (folder_id, uid, message.path, message.flags, modseq, message.internal_date, message.size),
                )
                cur.execute(
                    "UPDATE folders SET uidnext = ?, highestmodseq = ? WHERE id = ?", (uid + 1, modseq, folder_id)
                )
                uids.append(uid)
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        return uids

    def messages(self, folder: str | None = None) -> list[Message]:
        query = (
            "SELECT f.name, m.uid, m.path, m.flags, m.modseq, m.internal_date, m.size"
            " FROM messages m JOIN folders f ON f.id = m.folder_id"
        )
        params: tuple[str, ...] = ()
        if folder is not None:
            query += " WHERE f.name = ?"
            params = (folder,)
        return [Message(*row) for row in self._db.execute(query + " ORDER BY f.name, m.uid", params)]

    def paths(self) -> set[str]:
        return {row[0] for row in self._db.execute("SELECT path FROM messages")}

    def forget(self, paths: Iterable[str]) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany("DELETE FROM messages WHERE path = ?", ((p,) for p in paths))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def usage(self) -> tuple[int, int]:
        """(bytes, messages) across all folders: what quota counts."""
        total, count = self._db.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM messages").fetchone()
        return int(total), int(count)
