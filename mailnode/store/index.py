"""The SQLite index of one mailbox: folders (UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ) and messages (UID,
file, flags, modseq, internal date, size, and two caches the IMAP server fills: the MIME structure and
the header fields SEARCH reads). The only module that knows the schema; an older index is migrated
when it is opened (_MIGRATIONS).

`Index` is a live mailbox's index, used by the store (mailnode.store.mailboxes, account, staging) from
the Gateway's threads, one thread at a time per index (the store serialises writes). WAL with
synchronous=FULL: a commit returns only after the log is on disk, so a committed row is as durable as
the message file it points to.

`handoffs` holds the ids of the cluster hand-offs this mailbox has stored (DESIGN.md "Clustering"),
committed in the same transaction as their message rows: a peer's retry of a hand-off already stored
is recognised, and stored no second time (`deliver`). Ids older than HANDOFF_MEMORY are pruned.

`Reader` opens an index file that no longer changes (a staged copy, or one extracted from an archive)
read-only, for the backups (mailnode.backup): the same queries, plus SQLite's integrity check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal, NamedTuple

SCHEMA_VERSION = 4
_IN_LIMIT = 500  # UIDs per `IN (...)` query, well under SQLite's parameter limit
# Rows one index hands out shared (see _Queries._shared_rows); past this the table starts again (a few
# dozen MiB at most).
_SHARED_ROWS = 200_000
# Longer than a peer's queue keeps retrying a hand-off (mailnode.queue.delivery.HANDOFF_LIFETIME, 30 days).
HANDOFF_MEMORY = 40 * 24 * 3600

_SCHEMA = """
CREATE TABLE IF NOT EXISTS folders (
    id            INTEGER PRIMARY KEY,
    name          TEXT    NOT NULL UNIQUE,
    uidvalidity   INTEGER NOT NULL,
    uidnext       INTEGER NOT NULL DEFAULT 1,
    highestmodseq INTEGER NOT NULL DEFAULT 1,
    subscribed    INTEGER NOT NULL DEFAULT 1,
    first_recent  INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS messages (
    folder_id     INTEGER NOT NULL REFERENCES folders(id),
    uid           INTEGER NOT NULL,
    path          TEXT    NOT NULL UNIQUE,
    flags         TEXT    NOT NULL DEFAULT '',
    modseq        INTEGER NOT NULL,
    internal_date INTEGER NOT NULL,
    size          INTEGER NOT NULL,
    structure     TEXT,
    search        TEXT,
    PRIMARY KEY (folder_id, uid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS handoffs (
    id TEXT    PRIMARY KEY,
    at INTEGER NOT NULL
) WITHOUT ROWID;
"""

# Each step brings an index from version n to n + 1.
_MIGRATIONS = {
    1: [
        "ALTER TABLE folders ADD COLUMN first_recent INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE messages ADD COLUMN structure TEXT",  # cached MIME analysis (mailnode.imap.mime)
    ],
    2: ["CREATE TABLE IF NOT EXISTS handoffs (id TEXT PRIMARY KEY, at INTEGER NOT NULL) WITHOUT ROWID"],
    3: ["ALTER TABLE messages ADD COLUMN search TEXT"],  # cached header fields SEARCH reads (mailnode.imap)
}


@dataclasses.dataclass(frozen=True)
class Folder:
    id: int
    name: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    subscribed: bool = True
    first_recent: int = 1


@dataclasses.dataclass(frozen=True)
class FolderStatus:
    folder: Folder
    messages: int
    unseen: int
    size: int
    recent: int = 0  # messages no session has seen as \\Recent yet
    deleted: int = 0  # messages flagged \\Deleted (IMAP4rev2's STATUS DELETED, RFC 9051 §6.3.11)


@dataclasses.dataclass(frozen=True)
class NewMessage:
    folder: str
    path: str  # relative to the mailbox directory
    size: int
    internal_date: int
    flags: str = ""
    handoff: str | None = None  # the cluster hand-off that brings it (see `Index.deliver`)


class Message(NamedTuple):
    """A message row. A tuple, not a dataclass: a SELECT, FETCH 1:* or SEARCH makes one per message of the
    folder, and a tuple is made from the SQLite row several times faster, in less memory."""

    folder: str
    uid: int
    path: str
    flags: str
    modseq: int
    internal_date: int
    size: int


def _folder(row: tuple[int, str, int, int, int, int, int]) -> Folder:
    return Folder(
        id=row[0], name=row[1], uidvalidity=row[2], uidnext=row[3], highestmodseq=row[4],
        subscribed=bool(row[5]), first_recent=row[6],
    )  # fmt: skip


def _plain_rows(cursor: sqlite3.Cursor) -> list[Message]:
    return list(map(Message._make, cursor))


class _Queries:
    """The queries a live index and a read-only one share."""

    def __init__(self, path: Path, db: sqlite3.Connection) -> None:
        self.path = path
        self._db = db
        # Every SELECT copies each message's UID, flags and modseq into the session (mailnode.imap.session
        # Selected): the sessions on one mailbox share those objects instead of each holding its own copies
        # (with 2,000 messages, 130 KiB less per session), and a SELECT makes no new row for a message
        # unchanged since the last one. By path (unique, and already a string of the row). Used under the
        # caller's lock, as the connection is; only for SELECT (`messages(shared=True)`).
        self._rows_by_path: dict[str, Message] = {}

    def close(self) -> None:
        self._db.close()

    _FOLDER_COLUMNS = "id, name, uidvalidity, uidnext, highestmodseq, subscribed, first_recent"

    def folder(self, name: str) -> Folder | None:
        row = self._db.execute(f"SELECT {self._FOLDER_COLUMNS} FROM folders WHERE name = ?", (name,)).fetchone()
        return _folder(row) if row else None

    def folders(self) -> list[Folder]:
        rows = self._db.execute(f"SELECT {self._FOLDER_COLUMNS} FROM folders ORDER BY name")
        return [_folder(row) for row in rows]

    def status(self, name: str) -> FolderStatus | None:
        folder = self.folder(name)
        if folder is None:
            return None
        count, unseen, size, recent, deleted = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(instr(' ' || flags || ' ', ' \\Seen ') = 0), 0), COALESCE(SUM(size), 0),"
            " COALESCE(SUM(uid >= ?), 0), COALESCE(SUM(instr(' ' || flags || ' ', ' \\Deleted ') > 0), 0)"
            " FROM messages WHERE folder_id = ?",
            (folder.first_recent, folder.id),
        ).fetchone()
        return FolderStatus(folder, count, unseen, size, recent, deleted)

    def structures(self, name: str, uids: Iterable[int]) -> dict[int, str | None]:
        return self._column_by_uid(name, uids, "structure")

    def search_fields(self, name: str, uids: Iterable[int]) -> dict[int, str]:
        """The cached search fields of those messages of a folder that have them (see `set_search_fields`)."""
        return {uid: fields for uid, fields in self._column_by_uid(name, uids, "search").items() if fields is not None}

    def _column_by_uid(
        self, name: str, uids: Iterable[int], column: Literal["structure", "search"]
    ) -> dict[int, str | None]:
        """One cached text column of those messages of a folder, by UID, read in chunks of _IN_LIMIT."""
        wanted = sorted(set(uids))
        result: dict[int, str | None] = {}
        for start in range(0, len(wanted), _IN_LIMIT):
            chunk = wanted[start : start + _IN_LIMIT]
            marks = ",".join("?" * len(chunk))
            sql = (
                f"SELECT m.uid, m.{column} FROM messages m JOIN folders f ON f.id = m.folder_id"
                f" WHERE f.name = ? AND m.uid IN ({marks})"
            )
            result.update(self._db.execute(sql, (name, *chunk)).fetchall())
        return result

    def messages(
        self, folder: str | None = None, *, uids: Iterable[int] | None = None, shared: bool = False
    ) -> list[Message]:
        """Rows in (folder, uid) order: all, a folder's, or (with a folder) those UIDs of it. `shared`: for
        rows a session keeps (a SELECT's), their values shared with earlier rows (see `_shared_rows`)."""
        rows = self._shared_rows if shared else _plain_rows
        query = (
            "SELECT f.name, m.uid, m.path, m.flags, m.modseq, m.internal_date, m.size"
            " FROM messages m JOIN folders f ON f.id = m.folder_id"
        )
        if folder is None:
            return rows(self._db.execute(query + " ORDER BY f.name, m.uid"))
        if uids is None:
            return rows(self._db.execute(query + " WHERE f.name = ? ORDER BY m.uid", (folder,)))
        wanted = sorted(set(uids))
        found: list[Message] = []
        for start in range(0, len(wanted), _IN_LIMIT):
            chunk = wanted[start : start + _IN_LIMIT]
            marks = ",".join("?" * len(chunk))
            sql = f"{query} WHERE f.name = ? AND m.uid IN ({marks}) ORDER BY m.uid"
            found.extend(rows(self._db.execute(sql, (folder, *chunk))))
        return found

    def _shared_rows(self, cursor: sqlite3.Cursor) -> list[Message]:
        """Messages from (folder, uid, path, flags, modseq, internal_date, size) rows: the one handed out
        before for an equal row (a tuple compares equal to the NamedTuple of the same values)."""
        known = self._rows_by_path
        if len(known) > _SHARED_ROWS:
            known.clear()
        rows: list[Message] = []
        for row in cursor:
            message = known.get(row[2])
            if message is None or message != row:
                message = known[row[2]] = Message._make(row)
            rows.append(message)
        return rows

    def paths(self) -> set[str]:
        return {row[0] for row in self._db.execute("SELECT path FROM messages")}

    def usage(self) -> tuple[int, int]:
        """(bytes, messages) across all folders: what quota counts."""
        total, count = self._db.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM messages").fetchone()
        return int(total), int(count)


class Index(_Queries):
    """A live mailbox's index, read and written."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, sqlite3.connect(path, isolation_level=None, check_same_thread=False))
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{path}: index schema {version} is newer than this mailnode ({SCHEMA_VERSION})")
        if version == 0:
            self._db.executescript(_SCHEMA)
        else:
            for step in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[step]:
                    self._db.execute(statement)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._savepoints = itertools.count()

    @contextlib.contextmanager
    def atomic(self) -> Iterator[sqlite3.Cursor]:
        """One transaction for every write inside it: all committed, or (on an exception) none. Nested
        inside another it is a savepoint, so a caller can group the store's writes into one commit."""
        cur = self._db.cursor()
        if self._db.in_transaction:
            savepoint = f"s{next(self._savepoints)}"
            cur.execute(f"SAVEPOINT {savepoint}")
            try:
                yield cur
            except BaseException:
                cur.execute(f"ROLLBACK TO {savepoint}")
                cur.execute(f"RELEASE {savepoint}")
                raise
            cur.execute(f"RELEASE {savepoint}")
            return
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
            cur.execute("COMMIT")
        except BaseException:
            if cur.connection.in_transaction:  # a COMMIT that failed (e.g. disk full) may have ended it
                cur.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """One read transaction for every query inside it: they all see the index as of the first one (WAL),
        whatever the writer commits meanwhile. For the read connection, which never writes."""
        self._db.execute("BEGIN")
        try:
            yield
        finally:
            self._db.execute("COMMIT")

    def _bump_modseq(self, cur: sqlite3.Cursor, folder_id: int) -> int:
        cur.execute("UPDATE folders SET highestmodseq = highestmodseq + 1 WHERE id = ?", (folder_id,))
        return int(cur.execute("SELECT highestmodseq FROM folders WHERE id = ?", (folder_id,)).fetchone()[0])

    def delete_folder(self, name: str) -> list[str]:
        """Remove a folder and its rows; returns the message paths for the caller to unlink."""
        folder = self.folder(name)
        if folder is None:
            raise KeyError(name)
        with self.atomic() as cur:
            paths = [r[0] for r in cur.execute("SELECT path FROM messages WHERE folder_id = ?", (folder.id,))]
            cur.execute("DELETE FROM messages WHERE folder_id = ?", (folder.id,))
            cur.execute("DELETE FROM folders WHERE id = ?", (folder.id,))
        return paths

    def rename_folder(self, old: str, new: str) -> None:
        """Rename a folder (the Maildir directory is renamed by the caller first)."""
        with self.atomic() as cur:
            cur.execute("UPDATE folders SET name = ? WHERE name = ?", (new, old))
            prefix = f"{old}/"
            children = cur.execute(
                "SELECT id, name FROM folders WHERE substr(name, 1, ?) = ?", (len(prefix), prefix)
            ).fetchall()  # all of them first: the UPDATEs below reuse the cursor
            for row in children:
                cur.execute("UPDATE folders SET name = ? WHERE id = ?", (new + row[1][len(old) :], row[0]))

    def move_paths(self, moves: Iterable[tuple[str, str]]) -> None:
        """Point rows at new file paths (after the caller renamed directories or files)."""
        with self.atomic() as cur:
            cur.executemany("UPDATE messages SET path = ? WHERE path = ?", ((new, old) for old, new in moves))

    def set_subscribed(self, name: str, subscribed: bool) -> None:
        self._db.execute("UPDATE folders SET subscribed = ? WHERE name = ?", (int(subscribed), name))

    def take_recent(self, name: str, *, upto: int | None = None) -> int:
        """RFC 3501 \\Recent: returns the first UID that is recent for this session and moves the mark,
        so no other session sees those messages as recent: past every message, or (`upto`, the UIDNEXT
        of what the session read) past those the session shows."""
        row = self._db.execute("SELECT first_recent, uidnext FROM folders WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise KeyError(name)
        mark = row[1] if upto is None else max(row[0], min(upto, row[1]))
        if row[0] != mark:  # only when something arrived since: most SELECTs write nothing
            with self.atomic() as cur:
                cur.execute("UPDATE folders SET first_recent = ? WHERE name = ?", (mark, name))
        return int(row[0])

    def set_flags(
        self, name: str, changes: Iterable[tuple[int, str]], *, unchanged_since: int | None = None
    ) -> tuple[list[Message], list[int]]:
        """Set the flags of messages ((uid, flags) pairs, flags space-separated). Each changed message
        gets a new modseq (RFC 7162). With unchanged_since, messages modified after it are left alone and
        returned as failed (the MODIFIED response code). Returns (changed messages, failed uids)."""
        folder = self.folder(name)
        if folder is None:
            raise KeyError(name)
        changed: list[int] = []
        failed: list[int] = []
        with self.atomic() as cur:
            for uid, flags in changes:
                row = cur.execute(
                    "SELECT flags, modseq FROM messages WHERE folder_id = ? AND uid = ?", (folder.id, uid)
                ).fetchone()
                if row is None:
                    continue
                if unchanged_since is not None and row[1] > unchanged_since:
                    failed.append(uid)
                    continue
                if row[0] == flags:
                    continue
                modseq = self._bump_modseq(cur, folder.id)
                cur.execute(
                    "UPDATE messages SET flags = ?, modseq = ? WHERE folder_id = ? AND uid = ?",
                    (flags, modseq, folder.id, uid),
                )
                changed.append(uid)
        return self.messages(name, uids=changed), failed

    def expunge(self, name: str, uids: Iterable[int]) -> list[tuple[int, str]]:
        """Remove rows; returns (uid, path) of each for the caller to unlink. Bumps HIGHESTMODSEQ."""
        folder = self.folder(name)
        if folder is None:
            raise KeyError(name)
        removed: list[tuple[int, str]] = []
        with self.atomic() as cur:
            for uid in uids:
                row = cur.execute(
                    "SELECT path FROM messages WHERE folder_id = ? AND uid = ?", (folder.id, uid)
                ).fetchone()
                if row is not None:
                    cur.execute("DELETE FROM messages WHERE folder_id = ? AND uid = ?", (folder.id, uid))
                    removed.append((uid, row[0]))
            if removed:
                self._bump_modseq(cur, folder.id)
        return removed

    def set_structures(self, name: str, structures: dict[int, str]) -> None:
        """Cache parsed structures, all in one transaction (one fsync, not one per message)."""
        with self.atomic() as cur:
            cur.executemany(
                "UPDATE messages SET structure = ? WHERE uid = ?"
                " AND folder_id = (SELECT id FROM folders WHERE name = ?)",
                ((structure, uid, name) for uid, structure in structures.items()),
            )

    def set_search_fields(self, name: str, fields: dict[int, str]) -> None:
        """Cache the header fields SEARCH reads (by uid; opaque text, the IMAP server's), all in one
        transaction. Like the structures, a cache: a message file never changes, so neither do they."""
        with self.atomic() as cur:
            cur.executemany(
                "UPDATE messages SET search = ? WHERE uid = ? AND folder_id = (SELECT id FROM folders WHERE name = ?)",
                ((text, uid, name) for uid, text in fields.items()),
            )

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
        with self.atomic() as cur:
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
        return uids

    def deliver(self, messages: Iterable[NewMessage], *, now: int) -> list[int | None]:
        """`add`, in one transaction with recording each message's hand-off id: None for a message
        whose hand-off this mailbox has stored before (or earlier in this call), which is not added.
        Prunes the ids older than HANDOFF_MEMORY."""
        wanted = list(messages)
        with self.atomic() as cur:
            fresh: list[NewMessage] = []
            for message in wanted:
                if message.handoff is not None:
                    known = cur.execute("SELECT 1 FROM handoffs WHERE id = ?", (message.handoff,)).fetchone()
                    if known is not None:
                        continue
                    cur.execute("INSERT INTO handoffs (id, at) VALUES (?, ?)", (message.handoff, now))
                fresh.append(message)
            if len(fresh) < len(wanted) or any(m.handoff is not None for m in fresh):
                cur.execute("DELETE FROM handoffs WHERE at < ?", (now - HANDOFF_MEMORY,))
            uids = iter(self.add(fresh))  # nested: a savepoint of this transaction
        added = {id(message) for message in fresh}
        return [next(uids) if id(message) in added else None for message in wanted]

    def forget(self, paths: Iterable[str]) -> None:
        with self.atomic() as cur:
            cur.executemany("DELETE FROM messages WHERE path = ?", ((p,) for p in paths))

    # -- for staged copies (mailnode.store.staging), with the mailbox's lock held -----------------------

    def checkpoint_wal(self) -> tuple[int, bool]:
        """Fold the WAL into the main file (`PRAGMA wal_checkpoint(TRUNCATE)`), on a connection of its
        own. Returns (messages, done); not done when a reader kept the WAL from being truncated."""
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            messages = int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
            busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            db.close()
        return messages, not busy

    def copy_to(self, target: Path) -> None:
        """Copy the index into a new file with SQLite's backup API (rows, not files: quick)."""
        source = sqlite3.connect(self.path, isolation_level=None)
        try:
            copy = sqlite3.connect(target, isolation_level=None)
            try:
                # No journal, no fsync: a staged copy is thrown away when anything fails (and at start),
                # and these are the writes inside the pause. The copy is the source's pages, WAL header too.
                copy.execute("PRAGMA synchronous=OFF")
                copy.execute("PRAGMA journal_mode=OFF")
                source.backup(copy)
            finally:
                copy.close()
        finally:
            source.close()


Error = sqlite3.Error


def out_of_space(error: BaseException) -> bool:
    """Whether SQLite failed for want of disk space (SQLITE_FULL)."""
    if not isinstance(error, sqlite3.Error):
        return False
    return getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(error)


"""What a Reader raises for a file that is not a readable index (its message is SQLite's)."""


class Reader(_Queries):
    """An index file opened read-only, writing nothing beside it (no -wal or -shm): the file must not
    change while it is open, which holds for a staged copy and for a file just extracted."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro&immutable=1", uri=True))

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def check(self) -> list[str]:
        """The problems SQLite's integrity check finds; none for a sound file."""
        problems = [str(row[0]) for row in self._db.execute("PRAGMA integrity_check")]
        return [] if problems == ["ok"] else problems

    def folder_names(self) -> list[str]:
        """The folders' names, sorted (the one column every schema version has)."""
        return [str(row[0]) for row in self._db.execute("SELECT name FROM folders ORDER BY name")]

    def files(self) -> list[tuple[str, int]]:
        """(path, size) of every message file, in (folder, uid) order: plain tuples, for 100,000 rows."""
        return self._db.execute(
            "SELECT m.path, m.size FROM messages m JOIN folders f ON f.id = m.folder_id ORDER BY f.name, m.uid"
        ).fetchall()
