"""Where a mailbox lives on disk: directory names for addresses and folders, Maildir sub-directories.

Layout under the node's data directory:

    mail/<domain>/<local part>/index.sqlite      the mailbox's index (mailnode.store.index)
    mail/<domain>/<local part>/<folder>/{tmp,new,cur}/   one Maildir per folder, INBOX first

Names are percent-encoded so that any address or IMAP folder name maps to one safe path component.
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

from mailnode.store import durable

INBOX = "INBOX"
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


def folder_dir(mailbox: Path, folder: str) -> Path:
    return mailbox / encode_name(folder)


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
