"""The open mailboxes of a node and the values the store's modules share: `Mailbox` (a mailbox's
directory, its index connections and locks), `Mailboxes` (the table of them, opened on first use),
`Delivery`, `Stored` and `MailboxUsage`.

A folder RENAME's directory moves are journalled here (`journal_renames`, `settle_renames`,
`end_renames`): the journal is durable before the first directory moves and goes after the index
commit, so recovery can put the directories where the index says they are.

Used by MailStore (delivery, recovery), Account (IMAP's changes) and Staging (pins, staged copies),
which all import this module and none of which imports another's: MailStore passes Account and Staging
what they need.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

from mailnode.store import durable, index, maildir

log = logging.getLogger(__name__)

# In the mailbox directory, beside the folders: a leading dot, which maildir.encode_name never gives a
# folder's directory, so no folder name can collide with it.
RENAME_JOURNAL = ".rename.journal"


@dataclasses.dataclass(frozen=True)
class Spooled:
    """A message already written and fsynced to a file under the mailbox's tmp/ (a large APPEND,
    received in chunks: Account.spool); delivery renames the file into place."""

    path: Path
    size: int


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One message for one mailbox folder. `data` is the whole message as stored (CRLF lines), unless
    it is `spooled` to a file already."""

    address: str
    data: bytes
    folder: str = maildir.INBOX
    internal_date: int | None = None
    flags: str = ""  # space-separated IMAP flags (APPEND may set them)
    spooled: Spooled | None = None
    # A cluster hand-off's id (mailnode.queue.handoff): stored at most once per mailbox.
    handoff: str | None = None
    # APPEND's: the folder must be there already (none is made for it), else the delivery fails alone
    # with FolderError, in the batch that would store it (no read of the folder before).
    existing_folder: bool = False

    @property
    def size(self) -> int:
        return self.spooled.size if self.spooled is not None else len(self.data)


@dataclasses.dataclass(frozen=True)
class Stored:
    address: str
    folder: str
    uid: int  # 0 when duplicate
    path: Path
    # The hand-off was stored here before: nothing new was stored, and the delivery counts as done.
    duplicate: bool = False
    uidvalidity: int = 0  # an APPEND's (existing_folder) folder's, read under the lock that stored it (APPENDUID)
    row: index.Message | None = None  # its index row, read back under that lock (published with the change)


@dataclasses.dataclass
class MailboxUsage:
    bytes: int = 0
    messages: int = 0


class Mailbox:
    """An open mailbox: its directory and its index (used under `lock`, from Gateway threads)."""

    def __init__(self, address: str, path: Path) -> None:
        self.address = address
        self.path = path
        durable.ensure_dir(path)
        self.index = index.Index(path / "index.sqlite")
        self.lock = threading.RLock()  # one thread at a time uses the index connection (and writes)
        # A second connection for reads: in WAL mode they run beside a write that waits for its fsync.
        self.reader = index.Index(path / "index.sqlite")
        self.read_lock = threading.Lock()
        self.folders: set[str] = set()

    def ensure_folder(self, name: str) -> Path:
        if name not in self.folders:
            with self.lock:
                maildir.ensure_folder(self.path, name)
                self.index.create_folder(name)
                self.folders.add(name)
        return maildir.folder_dir(self.path, name)

    def recover(self) -> tuple[int, int, int]:
        """Make files and index agree after a crash: returns (tmp removed, orphans removed, rows dropped).
        Orphans are files in new/ or cur/ without a row: deliveries renamed but never committed, and the
        files of expunged messages whose unlink a pinned store deferred (Staging.pin) when the node
        stopped before the last pin went. A rename journal is settled first, so the moved directories
        are where the index's paths point before files and rows are compared."""
        self.settle_renames()
        tmp_removed = maildir.clear_tmp(self.path)
        on_disk = maildir.message_files(self.path)
        indexed = self.index.paths()
        orphans = on_disk - indexed
        for rel in orphans:
            (self.path / rel).unlink(missing_ok=True)
        missing = indexed - on_disk
        if missing:
            self.index.forget(missing)
        return tmp_removed, len(orphans), len(missing)

    # -- the rename journal (under `lock`) -----------------------------------------------------------------

    def journal_renames(self, old: str, new: str, moves: Sequence[tuple[Path, Path]]) -> None:
        """Record, durably, the directory renames (source, target; both in this directory) that a RENAME
        of folder `old` to `new` is about to make. Call before the first of them."""
        record = {"old": old, "new": new, "moves": [[source.name, target.name] for source, target in moves]}
        durable.replace_synced(self.path / RENAME_JOURNAL, json.dumps(record).encode())

    def end_renames(self) -> None:
        """The index committed the rename: the journal goes."""
        durable.remove_synced(self.path / RENAME_JOURNAL)

    def settle_renames(self) -> bool:
        """Finish a journalled rename that was cut short (a crash, or an undo that failed): the index,
        committed or not, says which names hold, and the directories are moved to match it, forward if
        it holds the new folder name, back otherwise. Then the journal goes. False if there was none."""
        journal = self.path / RENAME_JOURNAL
        if not journal.exists():
            return False
        record = json.loads(journal.read_bytes())
        moves = [(self.path / source, self.path / target) for source, target in record["moves"]]
        forward = self.index.folder(record["old"]) is None and self.index.folder(record["new"]) is not None
        steps = list(moves) if forward else [(t, s) for s, t in reversed(moves)]
        for here, there in steps:
            if here.exists() and not there.exists():
                here.rename(there)
        durable.fsync_dir(self.path)
        durable.remove_synced(journal)
        self.folders.clear()
        log.warning(
            "settled a folder rename cut short",
            extra={"fields": {"mailbox": self.address, "from": record["old"], "to": record["new"], "forward": forward}},
        )
        return True

    def close(self) -> None:
        self.index.close()
        self.reader.close()


RESERVE_BYTES = 1 << 20  # what the space reserve holds back: room for many flag changes


class Mailboxes:
    """The mailboxes of the data directory `root` that are open, by address (blocking: called from
    Gateway threads, any number at once), and the volume's space reserve (durable.SpaceReserve),
    taken when the first mailbox is opened."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.reserve = durable.SpaceReserve(root / "space.reserve", RESERVE_BYTES)
        self._open: dict[str, Mailbox] = {}
        self._lock = threading.Lock()  # guards _open between the writer and readers

    def open(self, address: str, path: Path | None = None) -> Mailbox:
        """The mailbox, opened (and its directory, index and INBOX made) on first use."""
        with self._lock:
            mailbox = self._open.get(address)
            if mailbox is None:
                if not self._open:
                    self.reserve.ensure()
                mailbox = Mailbox(address, path or maildir.mailbox_dir(self.root, address))
                mailbox.ensure_folder(maildir.INBOX)
                self._open[address] = mailbox
            return mailbox

    def existing(self, address: str) -> Mailbox | None:
        """The mailbox if it is open or on disk, without making one."""
        if address not in self._open and not maildir.mailbox_dir(self.root, address).exists():
            return None
        return self.open(address)

    def forget(self, address: str) -> None:
        """Close the mailbox and forget it (its directory is about to be replaced or removed: a move)."""
        with self._lock:
            mailbox = self._open.pop(address, None)
        if mailbox is not None:
            with mailbox.lock, mailbox.read_lock:
                mailbox.close()

    def all(self) -> list[Mailbox]:
        with self._lock:
            return list(self._open.values())

    def close(self) -> None:
        with self._lock:
            for mailbox in self._open.values():
                mailbox.close()
            self._open.clear()
