"""A mailbox's calendars and contacts as files: `<mailbox directory>/.dav/`, Radicale's storage
(mailnode.web.dav serves it), seen from the jobs that copy a mailbox whole: archives and their restores
(mailnode.backup), and moves (mailnode.move, mailnode.store.transfer). Everything here blocks.

What is carried: every regular file under `.dav/` but Radicale's caches, locks and temporary files
(`.Radicale.cache/`, `.Radicale.lock`, `.Radicale.tmp-*`: Radicale remakes them) and the lock below, so
each collection's items and its `.Radicale.props`. Radicale writes a file whole under a temporary name
and renames it into place, never in place: a hard link or a copy of a file that exists is a whole item.

The lock (`locked`): a request that may change the storage (mailnode.web.dav) holds it exclusively
around Radicale's work, and checks under it that the mailbox is not frozen for a move; a copy holds it
shared. So a copy sees no half-done request (a collection made, its first item not yet), and a final
move copy, made under the freeze, misses no write: a write either finished before the copy took the
lock, or it finds the mailbox frozen and is refused. It is a flock(2) of a file of its own, not
Radicale's `.Radicale.lock`, which Radicale takes inside the request (flock locks are per open file,
so taking Radicale's here would wait for ourselves).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from mailnode.store import durable

DIR: Final = ".dav"
LOCK: Final = ".mailfleet.lock"
PROPS: Final = ".Radicale.props"
_RADICALE: Final = ".Radicale"  # the prefix of Radicale's own names: caches, locks, temporary files


@contextlib.contextmanager
def locked(mailbox_dir: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold the mailbox's DAV lock (see the module docstring). A shared hold of a mailbox without `.dav/`
    takes nothing: there is nothing to copy, and a request that makes it takes the lock after."""
    dav = mailbox_dir / DIR
    if not exclusive and not dav.is_dir():
        yield
        return
    dav.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(dav / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def carried(rel: str) -> bool:
    """Whether a path under `.dav/` is one a copy carries (an item, a collection's properties)."""
    parts = rel.split("/")
    if parts[-1] == LOCK and len(parts) == 1:
        return False
    return all(not part.startswith(_RADICALE) for part in parts[:-1]) and (
        parts[-1] == PROPS or not parts[-1].startswith(_RADICALE)
    )


def check(rel: str) -> str:
    """A path under `.dav/` received from elsewhere (an archive, a move's source), checked to stay under
    it and to be one that is carried: ValueError otherwise."""
    parts = rel.split("/")
    if any(part in ("", ".", "..") or "\0" in part or "\\" in part for part in parts) or not carried(rel):
        raise ValueError(f"not a calendar or contact file of a mailbox: {rel!r}")
    return rel


def files(mailbox_dir: Path) -> list[tuple[str, int]]:
    """(path under `.dav/`, size) of every file a copy carries, sorted; none when there is no `.dav/`.
    Call under `locked(..., exclusive=False)` for a state no request is changing."""
    root = mailbox_dir / DIR
    found: list[tuple[str, int]] = []
    directories = [""]
    while directories:
        prefix = directories.pop()
        try:
            entries = os.scandir(root / prefix if prefix else root)
        except FileNotFoundError:
            continue
        with entries:
            for entry in entries:
                rel = f"{prefix}{entry.name}"
                if entry.is_dir(follow_symlinks=False):
                    if not entry.name.startswith(_RADICALE):
                        directories.append(f"{rel}/")
                elif entry.is_file(follow_symlinks=False) and carried(rel):
                    found.append((rel, entry.stat(follow_symlinks=False).st_size))
    return sorted(found)


def link_tree(mailbox_dir: Path, dest_mailbox_dir: Path) -> tuple[int, int]:
    """Copy the carried files of a mailbox's `.dav/` into another mailbox directory (a staged copy on the
    same file system: hard links, as staging links message files; a copy where linking fails), under the
    shared lock. Returns (files, bytes)."""
    with locked(mailbox_dir, exclusive=False):
        listed = files(mailbox_dir)
        for rel, _ in listed:
            source, target = mailbox_dir / DIR / rel, dest_mailbox_dir / DIR / rel
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
    return len(listed), sum(size for _, size in listed)


def merge(mailbox_dir: Path, items: list[tuple[str, bytes]], *, user: str) -> tuple[int, int]:
    """Restore calendars and contacts into a live mailbox (`items`: (path under `.dav/`, bytes) as an
    archive holds them, for any user): each file goes under `collection-root/<user>/` whatever user it
    was stored for (a mailbox restored into another), and only where the mailbox has no file of that
    name: what is there now is newer than the archive, and a restore run again adds nothing. Each file is
    written whole and renamed into place, under the exclusive lock. Returns (written, kept as they were)."""
    written = kept = 0
    renamed: list[Path] = []
    with locked(mailbox_dir, exclusive=True):
        root = mailbox_dir / DIR
        for rel, data in items:
            parts = check(rel).split("/")
            if len(parts) >= 2 and parts[0] == "collection-root":
                parts[1] = user
            target = root.joinpath(*parts)
            if target.exists():
                kept += 1
                continue
            durable.ensure_dir(target.parent)
            part = target.with_name(f"{_RADICALE}.tmp-mailfleet-{target.name}")
            part.write_bytes(data)
            durable.fsync_file(part)
            part.rename(target)
            renamed.append(target)
            written += 1
        for directory in {path.parent for path in renamed}:
            durable.fsync_dir(directory)
    return written, kept
