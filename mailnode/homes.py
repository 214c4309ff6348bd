"""Where each mailbox is homed, as this node must act on it now: the directory file's `home`, changed by
a move (mailnode.move) before the file says so. Every part of the node that asks the directory (SMTP,
LMTP, hand-offs, IMAP and its proxy, usage) is given `Homes.view`, so `Cluster.is_home(entry)` and
`entry.home` tell the same everywhere.

Two things change a home here:
- an override (PUT /mailboxes/{address}/home): kept in memory and in `moves/homes.json` on the volume
  (a node restarted before its directory file caught up still knows), forgotten once the file agrees;
- a copy received for a move and not yet taken into place (mailnode.store.transfer's incoming copy):
  while the file already names this node but the copy is not in place, the mailbox stays homed at the
  copy's source, so no mail is stored into an empty mailbox that the copy would then replace.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from mailnode.config import Directory
from mailnode.store import durable

log = logging.getLogger(__name__)

FILE = Path("moves") / "homes.json"


class Homes:
    def __init__(self, data_dir: Path, *, ordinal: int, domains: dict[str, str]) -> None:
        self._path = data_dir / FILE
        self._ordinal = ordinal
        self._domains = domains
        self.overrides: dict[str, int] = {}
        self.pending: dict[str, int] = {}  # address -> the source of an incoming copy not yet in place
        self._version = 0  # bumped at every change, so the view is rebuilt
        self._cached: tuple[Directory, int, Directory] | None = None  # (the file's directory, version, view)
        self._writing = threading.Lock()  # one change of the overrides (and of their file) at a time

    def load(self) -> None:
        """Blocking (at start): the overrides kept on the volume."""
        try:
            raw = json.loads(self._path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as error:
            log.warning("home overrides unreadable; ignored", extra={"fields": {"error": str(error)}})
            return
        self.overrides = {str(address): int(home) for address, home in raw.items()}
        self._version += 1

    def _save(self) -> None:
        durable.ensure_dir(self._path.parent)
        durable.replace_synced(self._path, json.dumps(self.overrides, sort_keys=True).encode())

    def set(self, address: str, home: int) -> None:
        """Blocking: `address` is homed at `home` from now on (durable before it counts)."""
        with self._writing:
            changed = dict(self.overrides, **{address: home})
            self.overrides, previous = changed, self.overrides
            try:
                self._save()
            except BaseException:
                self.overrides = previous
                raise
            self._version += 1

    def forget_agreed(self, directory: Directory) -> None:
        """Blocking: drop the overrides the directory file now agrees with (or whose mailbox is gone)."""
        with self._writing:
            keep = {}
            for address, home in self.overrides.items():
                entry = directory.get(address)
                if entry is not None and entry.home != home:
                    keep[address] = home
            if keep != self.overrides:
                self.overrides = keep
                self._save()
                self._version += 1

    def set_pending(self, address: str, source: int | None) -> None:
        """An incoming copy from `source` exists (None: no longer: taken into place or dropped)."""
        if source is None:
            self.pending.pop(address, None)
        else:
            self.pending[address] = source
        self._version += 1

    def home(self, address: str, file_home: int) -> int:
        if (override := self.overrides.get(address)) is not None:
            return override
        if file_home == self._ordinal and (source := self.pending.get(address)) is not None:
            return source
        return file_home

    def waiting_to_take(self, directory: Directory) -> list[str]:
        """The incoming copies whose mailbox the file homes here (and no override elsewhere)."""
        found = []
        for address in self.pending:
            entry = directory.get(address)
            if entry is not None and entry.home == self._ordinal and address not in self.overrides:
                found.append(address)
        return found

    def view(self, directory: Directory) -> Directory:
        """`directory` (the file's) with the homes as this node must act on them now."""
        if not self.overrides and not self.pending:
            return directory
        cached = self._cached
        if cached is not None and cached[0] is directory and cached[1] == self._version:
            return cached[2]
        changed = False
        entries = []
        for entry in directory.mailboxes:
            home = self.home(entry.address, entry.home)
            if home != entry.home:
                entry = entry.model_copy(update={"home": home})
                changed = True
            entries.append(entry)
        view = Directory(entries, domains=self._domains, version=directory.version) if changed else directory
        self._cached = (directory, self._version, view)
        return view
