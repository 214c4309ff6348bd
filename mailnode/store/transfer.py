"""A mailbox moved between nodes (docs/architecture.md "Moving a mailbox"), the file side: what the source
exports (its index copied with SQLite's backup API, as staging does for backups, and the message files
that copy lists) and where the target keeps what it received until it is the mailbox's home: aside, in
`moves/incoming/<domain>/<local>/` under the data directory (laid out as the mailbox directory itself,
so taking it into place is one rename). mailnode.move drives both ends (the tar stream, HTTP); MailStore
takes a copy into place and drops one. Everything here blocks: callers run it on a Gateway thread.

A received copy is the source's index as it was (UIDVALIDITY, UIDs, UIDNEXT, flags, modseqs, internal
dates, folders, subscriptions, the hand-off ids) and exactly the files it lists: a file is written under a
`.part` name and renamed, so a name that exists holds a whole message; message files never change once
written, so a later copy fetches only the names it does not hold with the size the index gives them.

The mailbox's calendars and contacts (`.dav/`, mailnode.store.davfiles) come whole with every copy (they
are small, and Radicale rewrites its files): received into `.dav.new/` and swapped for the copy's
`.dav/` when the copy is finished, so the copy's `.dav/` is always one export's, whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from mailnode.store import davfiles, durable, index, maildir

INCOMING = Path("moves") / "incoming"
TRASH = Path("moves") / "removed"  # what `remove` renames away before deleting it
STATE = "move.json"  # in an incoming copy: {"source": ordinal, "final": bool, "freeze": id or null}
INDEX = "index.sqlite"
_NEW_INDEX = "index.sqlite.new"
PART = ".part"
_NEW_DAV = davfiles.DIR + ".new"  # the `.dav/` of the export being received


@dataclasses.dataclass(frozen=True)
class CopyState:
    """What an incoming copy is: from which node, and whether it was made under the source's freeze."""

    source: int
    final: bool
    freeze: str | None = None  # a final copy: the source's freeze it was made under (Moves' hold id)


def aside_dir(root: Path, address: str) -> Path:
    """Where the target keeps a copy of `address` until it is the mailbox's home."""
    return root / INCOMING / maildir.mailbox_dir(Path(), address).relative_to("mail")


def snapshot(mailbox_path: Path, live: index.Index, dest: Path) -> list[tuple[str, int]]:
    """Copy the live index to `dest` (call under the mailbox's lock: the copy is a committed state) and
    list (path, size) of every message file it names."""
    live.copy_to(dest)
    with index.Reader(dest) as reader:
        return reader.files()


def state(copy: Path) -> CopyState | None:
    """The incoming copy's state, None when there is none (or it was never finished once)."""
    try:
        raw = json.loads((copy / STATE).read_bytes())
        freeze = raw.get("freeze")
        return CopyState(
            source=int(raw["source"]), final=bool(raw["final"]), freeze=None if freeze is None else str(freeze)
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def held(copy: Path) -> set[str]:
    """The message files an incoming copy holds whole: those its index lists with the size found on disk
    (a name that exists was renamed from .part, so it is whole, unless a power cut lost what the
    last copy had not synced: the size check catches a short file)."""
    path = copy / INDEX
    if not path.exists():
        return set()
    with index.Reader(path) as reader:
        listed = reader.files()
    have = set()
    base = f"{copy}/"  # plain strings, not Paths: 10,000 stats take a third of the time (as staging's links)
    for rel, size in listed:
        try:
            if os.stat(base + rel).st_size == size:  # noqa: PTH116  (strings: see above)
                have.add(rel)
        except OSError:
            continue
    return have


def _on_disk(copy: Path) -> tuple[set[str], list[str]]:
    """The message files of a copy (paths relative to it) and its .part files left by a cut copy."""
    files: set[str] = set()
    parts: list[str] = []
    for folder in os.scandir(copy):
        if not folder.is_dir() or folder.name.startswith(davfiles.DIR):  # no folder's name does (encoded)
            continue
        for sub in ("new", "cur"):
            try:
                entries = os.scandir(f"{folder.path}/{sub}")
            except FileNotFoundError:
                continue
            with entries:
                for entry in entries:
                    rel = f"{folder.name}/{sub}/{entry.name}"
                    if entry.name.endswith(PART):
                        parts.append(rel)
                    else:
                        files.add(rel)
    return files, parts


def begin(copy: Path, *, source: int) -> None:
    """A copy from node `source` is being received: it is not final (nor taken into place by a directory
    reload) until `finish` says so."""
    durable.ensure_dir(copy)
    current = state(copy)
    if current is None or current.final or current.source != source:
        durable.replace_synced(copy / STATE, json.dumps({"source": source, "final": False}).encode())


def incoming(root: Path) -> list[tuple[str, Path]]:
    """(address, path) of every incoming copy of the data directory `root`."""
    found = []
    for path in sorted((root / INCOMING).glob("*/*")):
        if path.is_dir() and (path / STATE).exists():
            found.append((f"{maildir.decode_name(path.name)}@{maildir.decode_name(path.parent.name)}", path))
    return found


def file_target(copy: Path, rel: str) -> Path:
    """Where a received member is written (then `settle_file`): its name, checked to stay in the copy."""
    parts = rel.split("/")
    if len(parts) != 3 or parts[1] not in ("new", "cur") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"not a message file of a mailbox: {rel!r}")
    maildir.check_folder_name(maildir.decode_name(parts[0]))
    target = copy / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + PART)
    part.unlink(missing_ok=True)
    return part


def settle_file(part: Path) -> Path:
    final = part.with_name(part.name.removesuffix(PART))
    part.rename(final)
    return final


def dav_begin(copy: Path) -> None:
    """An export is being received: what an earlier, cut one left of its `.dav/` goes."""
    shutil.rmtree(copy / _NEW_DAV, ignore_errors=True)


def dav_target(copy: Path, rel: str) -> Path:
    """Where a received `.dav/` member (`rel` under it) is written: checked to stay under it."""
    target = copy / _NEW_DAV / davfiles.check(rel)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return target


def _take_dav(copy: Path) -> None:
    """The `.dav/` just received, every directory of it made durable, in place of the copy's (none when
    the export had none: the source has no calendars or contacts)."""
    received = copy / _NEW_DAV
    old = copy / davfiles.DIR
    if old.exists():
        shutil.rmtree(old)
    if received.is_dir():
        for directory, _, _ in os.walk(received):
            durable.fsync_dir(Path(directory))
        received.rename(old)


def index_target(copy: Path) -> Path:
    target = copy / _NEW_INDEX
    target.unlink(missing_ok=True)
    return target


# Above this many files written by one copy, one sync(2) of everything costs less than an fsync each.
_FSYNC_EACH = 256


def finish(copy: Path, *, source: int, final: bool, written: list[Path], freeze: str | None = None) -> tuple[int, int]:
    """The copy received whole: the files `written` synced, the new index in place, the files it does not
    list removed (expunged at the source since), its state recorded. Returns (messages, bytes) it holds."""
    if len(written) > _FSYNC_EACH:
        os.sync()
    else:
        for path in written:
            durable.fsync_file(path)
        for directory in {path.parent for path in written}:
            durable.fsync_dir(directory)
    new_index = copy / _NEW_INDEX
    if new_index.exists():
        for stale in (INDEX, INDEX + "-wal", INDEX + "-shm"):
            (copy / stale).unlink(missing_ok=True)
        new_index.rename(copy / INDEX)
    with index.Reader(copy / INDEX) as reader:
        listed = reader.files()
    names = {rel for rel, _ in listed}
    files, parts = _on_disk(copy)
    for rel in (files - names).union(parts):  # expunged at the source since; cut short
        (copy / rel).unlink(missing_ok=True)
    if missing := names - files:
        raise FileNotFoundError(f"the copy's index lists {min(missing)}, which did not arrive")
    _take_dav(copy)
    record = {"source": source, "final": final, "freeze": freeze if final else None}
    durable.replace_synced(copy / STATE, json.dumps(record).encode())
    durable.fsync_dir(copy)
    return len(listed), sum(size for _, size in listed)


def place(root: Path, copy: Path, destination: Path) -> None:
    """Take an incoming copy into place as the mailbox directory (one rename); a directory already
    there (left from an earlier time this node held the mailbox) is removed first."""
    (copy / STATE).unlink(missing_ok=True)
    if destination.exists():
        remove(root, destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    copy.rename(destination)
    durable.fsync_dir(destination.parent)
    durable.fsync_dir(copy.parent)


def remove(root: Path, path: Path) -> None:
    """Remove a mailbox directory or an incoming copy of the data directory `root`: renamed into the
    trash (one step: a crash leaves it whole where it was, or in the trash), which `empty_trash` deletes
    (a GiB of files takes a while; the caller need not wait)."""
    if not path.exists():
        return
    trash = root / TRASH
    trash.mkdir(parents=True, exist_ok=True)
    path.rename(trash / durable.unique_name(0))
    durable.fsync_dir(path.parent)


def empty_trash(root: Path) -> None:
    """Delete what `remove` put in the trash (at start too: what a crash left there)."""
    trash = root / TRASH
    if trash.is_dir():
        for gone in trash.iterdir():
            shutil.rmtree(gone, ignore_errors=True)


def usage(path: Path) -> tuple[int, int]:
    """(messages, bytes) a mailbox directory or copy lists in its index."""
    if not (path / INDEX).exists():
        return 0, 0
    with index.Reader(path / INDEX) as reader:
        listed = reader.files()
    return len(listed), sum(size for _, size in listed)
