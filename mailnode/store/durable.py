"""Durable-write primitives: the only way mail bytes reach the disk.

The contract every caller relies on (the mailbox store now, the outbound queue later): after
`write_new` and `fsync_dir` of the destination directory return, the file survives a crash or power
loss under its final name, complete, or never appears there at all. Files are written under tmp/
first, fsynced, and renamed; a rename is atomic on POSIX file systems, and the directory fsync makes
the new name durable.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import time
from pathlib import Path

_counter = itertools.count()
_host = socket.gethostname().replace("/", "_").replace(":", "_") or "localhost"


NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def out_of_space(error: BaseException) -> bool:
    """Whether a write failed for want of space: the volume is full, or a file-system quota is."""
    return isinstance(error, OSError) and error.errno in NO_SPACE


def unique_name(size: int) -> str:
    """A Maildir file name: <seconds>.M<micros>P<pid>Q<n>.<host>,S=<size> (unique per host)."""
    now = time.time()
    seconds = int(now)
    micros = int((now - seconds) * 1_000_000)
    return f"{seconds}.M{micros}P{os.getpid()}Q{next(_counter)}.{_host},S={size}"


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of `data` to `fd` (os.write may write less than it was given)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def create_new(path: Path) -> int:
    """Create `path` (which must not exist) for writing; returns the descriptor."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


def write_synced(path: Path, data: bytes) -> None:
    """Create `path` (which must not exist), write `data` and fsync it."""
    fd = create_new(path)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def fsync_file(path: Path) -> None:
    """fsync a file already written (by another handle, or a copy SQLite made)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(tmp_dir: Path, final_dir: Path, data: bytes) -> Path:
    """Write `data` under tmp_dir, fsync it, rename it into final_dir. The caller fsyncs final_dir
    (once for a whole batch of files) before treating the file as durable."""
    name = unique_name(len(data))
    tmp_path = tmp_dir / name
    write_synced(tmp_path, data)
    return move_new(tmp_path, final_dir, len(data))


def move_new(tmp_path: Path, final_dir: Path, size: int) -> Path:
    """Rename a file written and fsynced under tmp/ (of any folder of the same mailbox) into final_dir
    under a new unique name; on failure the tmp file is removed. The caller fsyncs final_dir."""
    final_path = final_dir / unique_name(size)
    try:
        tmp_path.rename(final_path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return final_path


def replace_synced(path: Path, data: bytes) -> None:
    """Put `data` at `path` (a small record such as a journal) durably, replacing any file there: it is
    written to `<path>.tmp`, fsynced, renamed over `path`, and the directory fsynced. After a crash
    `path` holds the old contents or the new ones, whole; a `<path>.tmp` left over is garbage."""
    partial = path.with_name(path.name + ".tmp")
    partial.unlink(missing_ok=True)
    write_synced(partial, data)
    try:
        partial.rename(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_synced(path: Path) -> None:
    """Remove `path` (and a `<path>.tmp` left by replace_synced) and make the removal durable."""
    path.with_name(path.name + ".tmp").unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    fsync_dir(path.parent)


def ensure_dir(path: Path) -> bool:
    """Create a directory (and parents) durably. Returns True if it had to be created."""
    if path.is_dir():
        return False
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    for created in reversed(missing):
        fsync_dir(created.parent)
    return True


class SpaceReserve:
    """A file holding `size` bytes of the volume back, given up when a full disk would otherwise keep
    users from deleting mail (marking it \\Deleted needs a little room in the index), and taken again
    once there is room. Thread-safe enough: its operations are idempotent."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size

    def ensure(self) -> bool:
        """Hold the space again if the volume has it; True when the reserve is in place."""
        if self.path.exists():
            return True
        partial = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)  # real blocks, not a sparse file
                os.fsync(fd)
            finally:
                os.close(fd)
            partial.rename(self.path)
        except OSError:
            partial.unlink(missing_ok=True)
            return False
        return True

    def release(self) -> bool:
        """Give the space back to the volume; False when there was none held."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True
