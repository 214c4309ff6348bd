"""Where a mailbox lives on disk: directory names for addresses and folders, Maildir sub-directories.

Layout under the node's data directory:

    mail/<domain>/<local part>/index.sqlite      the mailbox's index (mailnode.store.index)
    mail/<domain>/<local part>/<folder>/{tmp,new,cur}/   one Maildir per folder, INBOX first

Names are percent-encoded so that any address or IMAP folder name maps to one safe path component.
`folder_dir` is the one gate from a folder name to a path: every folder operation of the store goes
through it, and it refuses (InvalidFolderName) any name that is empty, has an empty, `.` or `..`
level, holds a control character, is too long for the file system (FolderNameTooLong), or would be
the mailbox directory itself or one of its index files.
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

from mailnode.store import durable

INBOX = "INBOX"
DELIMITER = "/"  # the folder hierarchy's separator (IMAP's LIST shows it)
NAME_MAX = 255  # bytes in one path component (Linux NAME_MAX): a folder's directory name must fit
_RESERVED = frozenset({"index.sqlite", "index.sqlite-wal", "index.sqlite-shm", "index.sqlite-journal"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
SPECIAL_FOLDERS = ("Sent", "Drafts", "Trash", "Junk", "Archive")  # created on first use
SUBDIRS = ("tmp", "new", "cur")

_SAFE = re.compile(r"^[A-Za-z0-9_+\-][A-Za-z0-9_+\-.]*$")


def encode_name(name: str) -> str:
    """A path component for an address part or folder name; '/' and leading dots cannot escape."""
    if _SAFE.match(name) and ".." not in name:
        return name
    return urllib.parse.quote(name, safe="").replace(".", "%2E")


def decode_name(component: str) -> str:
    return urllib.parse.unquote(component)


def mailbox_dir(root: Path, address: str) -> Path:
    local, _, domain = address.rpartition("@")
    return root / "mail" / encode_name(domain) / encode_name(local)


class InvalidFolderName(ValueError):
    """A folder name the store refuses; nothing was touched."""


class FolderNameTooLong(InvalidFolderName):
    """A folder name longer than the file system allows once encoded; nothing was touched."""


def check_folder_name(name: str) -> str:
    """The name's directory name (one path component) if the store accepts `name`; raises otherwise."""
    if not name:
        raise InvalidFolderName("empty mailbox name")
    if _CONTROL.search(name):  # NUL, CR, LF...: also when they came through modified UTF-7
        raise InvalidFolderName("mailbox name holds a control character")
    levels = name.split(DELIMITER)
    if any(level in ("", ".", "..") for level in levels):
        raise InvalidFolderName(f"mailbox name levels must not be empty, '.' or '..': {name}")
    try:
        component = encode_name(name)
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8 for it
        raise InvalidFolderName("mailbox name is not valid Unicode") from None
    if len(component.encode()) > NAME_MAX:
        raise FolderNameTooLong(f"mailbox name too long ({len(component.encode())} bytes on disk, {NAME_MAX} at most)")
    if component in _RESERVED or component in ("", ".", ".."):
        raise InvalidFolderName(f"mailbox name is reserved: {name}")
    return component


def folder_dir(mailbox: Path, folder: str) -> Path:
    """The folder's Maildir directory: always one level below `mailbox`, never `mailbox` itself."""
    path = mailbox / check_folder_name(folder)
    if path.parent != mailbox:  # cannot happen (the encoding leaves no '/'): the guarantee, checked
        raise InvalidFolderName(f"mailbox name escapes the mailbox: {folder}")
    return path


def ensure_folder(mailbox: Path, folder: str) -> Path:
    path = folder_dir(mailbox, folder)
    for sub in SUBDIRS:
        durable.ensure_dir(path / sub)
    return path


def mailbox_dirs(root: Path) -> list[tuple[str, Path]]:
    """(address, path) of every mailbox that exists on disk."""
    found = []
    for index_file in sorted((root / "mail").glob("*/*/index.sqlite")):
        path = index_file.parent
        found.append((f"{decode_name(path.name)}@{decode_name(path.parent.name)}", path))
    return found


def message_files(mailbox: Path) -> set[str]:
    """Paths, relative to the mailbox, of every message file in new/ and cur/ of every folder."""
    files: set[str] = set()
    for folder in mailbox.iterdir():
        if not folder.is_dir():
            continue
        for sub in ("new", "cur"):
            d = folder / sub
            if d.is_dir():
                files.update(f"{folder.name}/{sub}/{f.name}" for f in d.iterdir() if f.is_file())
    return files


def clear_tmp(mailbox: Path) -> int:
    """Remove half-written files left by a crash; they were never acknowledged."""
    removed = 0
    for folder in mailbox.iterdir():
        tmp = folder / "tmp"
        if tmp.is_dir():
            for f in tmp.iterdir():
                f.unlink(missing_ok=True)
                removed += 1
    return removed
