"""Archives: the portable tar of docs/backups.md ("Archives (node)"). `write` makes one from a staged copy
of a node's data directory (the node's GET /backup and POST /backups); `verify` and `receive` check one in
one streaming pass; `mailbox_messages` reads one mailbox back (the node's POST /restore); `Scan` is the
checking pass that mailnode.backup.noderestore extends to bring back a whole node.

Members, in this order (`write` never seeks, so `out` may be a pipe):

    mailfleet-backup.json                       {"format": 2, "node": ..., "pointInTime": ...}
    mail/<domain>/<local>/index.sqlite          then that index's message files, in (folder, uid) order,
    mail/<domain>/<local>/.dav/...              then its calendars and contacts (mailnode.store.davfiles)
    queue/messages/<id>.eml, <id>.json
    MANIFEST.json                               every other member's size and SHA-256, per-mailbox counts

Readers trust nothing before the manifest has matched: every member is hashed as it streams past, its
path must be relative without '..', an index must pass SQLite's integrity check and list exactly the
message files that follow it; a `.dav/` member must follow its mailbox's index and be a file
davfiles carries; anything but regular files is refused. Format 1 (before calendars and contacts were
archived) is read as well. The tar stream itself is
mailnode.backup.tarcodec; the indexes are read with the store's read-only `index.Reader`. Everything
here blocks (files, SQLite, hashing): the node calls it from a Gateway thread.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

from mailnode.backup import tarcodec
from mailnode.backup.tarcodec import ArchiveError as ArchiveError  # raised by the codec and by this module
from mailnode.backup.tarcodec import Progress
from mailnode.store import davfiles, index, maildir

FORMAT = 2
READABLE = (1, 2)  # formats this mailnode reads: 1 is 2 without `.dav/` members
HEADER = "mailfleet-backup.json"
MANIFEST = "MANIFEST.json"
INDEX = "index.sqlite"
DAV = davfiles.DIR
MAIL = "mail"
QUEUE = "queue/messages"

_HEADER_LIMIT = 1 << 16  # the header member is a few dozen bytes
_MANY = 5  # problems named in one error message


@dataclasses.dataclass(frozen=True)
class Summary:
    node: str
    point_in_time: datetime.datetime
    mailboxes: dict[str, tuple[int, int]]  # address -> (messages, bytes)
    queued: int  # outbound messages (envelopes)
    files: int  # members the manifest lists (all but the manifest itself)
    bytes: int  # their total size
    dav: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # address -> (.dav files, bytes)

    @property
    def messages(self) -> int:
        return sum(messages for messages, _ in self.mailboxes.values())


@dataclasses.dataclass(frozen=True)
class ArchivedMessage:
    folder: str
    data: bytes
    flags: str
    internal_date: int
    sha256: str  # of data


# -- writing --------------------------------------------------------------------------------------------


def write(
    staged: Path,
    out: BinaryIO,
    *,
    node: str,
    point_in_time: datetime.datetime,
    progress: Progress | None = None,
    compress: bool = False,
) -> Summary:
    """Stream an archive of `staged` (laid out like a node's data directory: mail/<domain>/<local>/
    index.sqlite with the message files that index lists, queue/messages/) into `out`, gzipped if
    `compress`. Only files an index lists are archived for a mailbox, then the files davfiles carries
    of its `.dav/`. `out` is flushed, not closed."""
    mailboxes = maildir.mailbox_dirs(staged)
    dav_files = {address: davfiles.files(path) for address, path in mailboxes}
    queue_dir = staged / QUEUE
    queue_files = sorted(p for p in queue_dir.iterdir() if p.is_file()) if queue_dir.is_dir() else []
    total = sum((path / INDEX).stat().st_size + _indexed_bytes(path / INDEX) for _, path in mailboxes)
    total += sum(size for listed in dav_files.values() for _, size in listed)
    total += sum(p.stat().st_size for p in queue_files)
    compressor = tarcodec.compressing(out) if compress else None
    tar = tarcodec.TarWriter(cast(BinaryIO, compressor) if compressor else out, total=total, progress=progress)
    header = {"format": FORMAT, "node": node, "pointInTime": point_in_time.isoformat()}
    mtime = int(point_in_time.timestamp())
    tar.add_bytes(HEADER, json.dumps(header).encode(), mtime)
    counts: dict[str, tuple[int, int]] = {}
    dav: dict[str, tuple[int, int]] = {}
    for address, path in mailboxes:
        prefix, base = path.relative_to(staged).as_posix(), str(path)
        tar.add_file(f"{prefix}/{INDEX}", f"{base}/{INDEX}")
        count = size = 0
        for rel in _indexed_paths(path / INDEX):
            if not _is_safe(rel):
                raise ArchiveError(f"{prefix}/{INDEX} lists an unsafe path {rel!r}")
            try:
                size += tar.add_file(f"{prefix}/{rel}", f"{base}/{rel}")
            except FileNotFoundError as error:
                raise ArchiveError(f"{prefix}/{INDEX} lists {rel}, which the staged copy lacks") from error
            count += 1
        counts[address] = (count, size)
        if listed := dav_files[address]:
            dav[address] = (
                len(listed),
                sum(tar.add_file(f"{prefix}/{DAV}/{rel}", f"{base}/{DAV}/{rel}") for rel, _ in listed),
            )
    queued = 0
    for file in queue_files:
        tar.add_file(f"{QUEUE}/{file.name}", str(file))
        queued += file.suffix == ".json"
    manifest = {
        **header,
        "files": {name: {"size": size, "sha256": digest} for name, (size, digest) in tar.files.items()},
        "mailboxes": {address: {"messages": n, "bytes": b} for address, (n, b) in counts.items()},
        "queue": {"messages": queued},
        "dav": {address: {"files": n, "bytes": b} for address, (n, b) in dav.items()},
    }
    summary = Summary(
        node=node,
        point_in_time=point_in_time,
        mailboxes=counts,
        queued=queued,
        files=len(tar.files),
        bytes=sum(size for size, _ in tar.files.values()),
        dav=dav,
    )
    tar.add_bytes(MANIFEST, json.dumps(manifest, ensure_ascii=False).encode(), mtime, listed=False)
    tar.close()
    if compressor is not None:
        compressor.close()  # writes the gzip trailer; leaves `out` open
    out.flush()
    return summary


def _indexed_bytes(path: Path) -> int:
    with index.Reader(path) as reader:
        return reader.usage()[0]


def _indexed_paths(path: Path) -> list[str]:
    with index.Reader(path) as reader:
        return [rel for rel, _ in reader.files()]


# -- reading ---------------------------------------------------------------------------------------------


def verify(path: Path, *, progress: Progress | None = None) -> Summary:
    """Check an archive in one streaming pass (gzip or not): raises ArchiveError saying what is wrong."""
    with tarcodec.open_archive(path) as raw, tempfile.TemporaryDirectory(prefix="mailnode-verify-") as scratch:
        source = tarcodec.Source(raw, label=str(path), progress=progress, total=os.fstat(raw.fileno()).st_size)
        return Scan(str(path), Path(scratch)).run(source)


def receive(
    source: BinaryIO, out: BinaryIO, *, label: str, progress: Progress | None = None, total: int = 0
) -> Summary:
    """Copy an archive from a stream (GET /backup's answer) into `out` byte for byte, checking it as
    `verify` does in the same pass; `total` is only for `progress`. Raises ArchiveError (the caller
    throws away what was written), or whatever reading `source` raises."""
    reader = tarcodec.Source(source, label=label, progress=progress, total=total, copy_to=out)
    with tempfile.TemporaryDirectory(prefix="mailnode-verify-") as scratch:
        return Scan(label, Path(scratch)).run(reader)


def mailbox_messages(
    path: Path, address: str, *, dav: list[tuple[str, bytes]] | None = None
) -> Iterator[ArchivedMessage]:
    """The messages of one mailbox of a verified archive, in the archive's order, which `write` makes
    (folder, uid) order. One streaming pass: the mailbox's index comes before its messages, so only the
    index (in a temporary file) and one message at a time are held. Its calendar and contact files
    ((path under `.dav/`, bytes); they follow the messages) are appended to `dav` if given, in the same
    pass. ArchiveError if the address is not in the archive."""
    key = maildir.mailbox_dir(Path(), address).as_posix()  # mail/<domain>/<local>
    label = str(path)
    rows: dict[str, tuple[str, str, int]] | None = None  # path in the mailbox -> (folder, flags, date)
    with tarcodec.open_archive(path) as raw, tempfile.TemporaryDirectory(prefix="mailnode-restore-") as scratch:
        tar = tarcodec.TarReader(tarcodec.Source(raw, label=label, progress=None, total=0))
        entry = tar.next()
        if entry is None or entry.name != HEADER:
            raise ArchiveError(f"{label}: not a Mailfleet archive (it does not start with {HEADER})")
        while (entry := tar.next()) is not None:
            if rows is None:
                if entry.name == f"{key}/{INDEX}":
                    copy = Path(scratch) / INDEX
                    tarcodec.copy_member(tar, copy)
                    rows = _index_rows(copy, f"{label}: {entry.name}")
                continue
            if not entry.name.startswith(f"{key}/"):
                break  # past this mailbox's members
            if entry.name.startswith(f"{key}/{DAV}/"):
                if dav is not None:
                    dav.append((entry.name[len(key) + len(DAV) + 2 :], tar.read_all()))
                continue
            row = rows.pop(entry.name[len(key) + 1 :], None)
            if row is None:
                raise ArchiveError(f"{label}: member {entry.name}: a message file the index does not list")
            data = tar.read_all()
            yield ArchivedMessage(row[0], data, row[1], row[2], hashlib.sha256(data).hexdigest())
    if rows is None:
        raise ArchiveError(f"{label}: no mailbox {address} in the archive")
    if rows:
        missing = sorted(rows)
        raise ArchiveError(
            f"{label}: {len(missing)} message file(s) of {address} are not in the archive, first {key}/{missing[0]}"
        )


def _is_safe(name: str) -> bool:
    """A relative path with no '..', '.' or empty component (so none that is absolute)."""
    wrapped = f"/{name}/"
    return not ("//" in wrapped or "/./" in wrapped or "/../" in wrapped or "\\" in name or "\0" in name)


def _index_rows(path: Path, what: str) -> dict[str, tuple[str, str, int]]:
    _check_index(path, what)
    with index.Reader(path) as reader:
        return {m.path: (m.folder, m.flags, m.internal_date) for m in reader.messages()}


def _check_index(path: Path, what: str) -> tuple[list[str], list[str]]:
    """An index's message paths and folders, once it passed SQLite's integrity check."""
    try:
        with index.Reader(path) as reader:
            problems = reader.check()
            if problems:
                raise ArchiveError(f"{what}: fails SQLite's integrity check: {'; '.join(problems[:_MANY])}")
            folders = reader.folder_names()
            paths = sorted(reader.paths())
    except index.Error as error:
        raise ArchiveError(f"{what}: not a mailbox index: {error}") from error
    for rel in paths:
        if not _is_safe(rel):
            raise ArchiveError(f"{what}: lists an unsafe path {rel!r}")
    return paths, folders


@dataclasses.dataclass
class _Mailbox:
    address: str
    unseen: set[str]  # paths the index lists whose file has not come by yet
    messages: int = 0
    bytes: int = 0
    dav_files: int = 0
    dav_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class _Manifest:
    node: str
    point_in_time: str
    files: dict[str, tuple[int, str]]
    mailboxes: dict[str, tuple[int, int]]
    queued: int
    dav: dict[str, tuple[int, int]]


class Scan:
    """One streaming pass over an archive, checking everything docs/backups.md promises; `_target`
    decides where a member's bytes go (nowhere when verifying; see _Extraction)."""

    def __init__(self, label: str, scratch: Path) -> None:
        self.label = label
        self._scratch = scratch  # for copies of indexes
        self._header: tuple[str, datetime.datetime, str] | None = None  # node, point in time, as written
        self._manifest: _Manifest | None = None
        self._files: dict[str, tuple[int, str]] = {}
        self._mailboxes: dict[str, _Mailbox] = {}  # by member prefix mail/<domain>/<local>
        self._queued = 0
        self._last = ""

    def _target(self, name: str) -> Path | None:
        return None

    def _mailbox_folders(self, prefix: str, folders: list[str]) -> None:
        pass

    def run(self, source: tarcodec.Source) -> Summary:
        tar = tarcodec.TarReader(source)
        while (entry := tar.next()) is not None:
            self._take(tar, entry)
            self._last = entry.name
        source.drain()  # all of it read, and copied if receiving
        return self._finish()

    def _fail(self, problem: str) -> ArchiveError:
        return ArchiveError(f"{self.label}: {problem}")

    def _take(self, tar: tarcodec.TarReader, entry: tarcodec.Entry) -> None:
        name = entry.name
        if self._header is None and name != HEADER:
            raise self._fail(f"not a Mailfleet archive: the first member is {name}, not {HEADER}")
        if self._manifest is not None:
            raise self._fail(f"member {name} follows {MANIFEST}, which must be the last")
        if not entry.regular:
            raise self._fail(f"member {name}: not a regular file")
        if not _is_safe(name):
            raise self._fail(f"member {name!r}: not a relative path inside the archive")
        if name in self._files:
            raise self._fail(f"member {name} appears twice")
        parts = name.split("/")
        if name == HEADER:
            self._read_header(self._small(tar, entry))
        elif name == MANIFEST:
            self._manifest = self._parse_manifest(tar.read_all())
        elif parts[0] == MAIL and len(parts) == 4 and parts[3] == INDEX:
            self._take_index(tar, entry, "/".join(parts[:3]))
        elif parts[0] == MAIL and len(parts) >= 5 and parts[3] == DAV:
            self._take_dav(tar, entry, "/".join(parts[:3]), "/".join(parts[4:]))
        elif parts[0] == MAIL and len(parts) >= 5:
            self._take_message(tar, entry, "/".join(parts[:3]), "/".join(parts[3:]))
        elif len(parts) == 3 and f"{parts[0]}/{parts[1]}" == QUEUE:
            self._files[name] = tarcodec.copy_member(tar, self._target(name), mtime=entry.mtime)
            self._queued += name.endswith(".json")
        else:
            raise self._fail(
                f"unexpected member {name} (neither the header, a mailbox's index or message, a queue file"
                " nor the manifest)"
            )

    def _small(self, tar: tarcodec.TarReader, entry: tarcodec.Entry) -> bytes:
        if entry.size > _HEADER_LIMIT:
            raise self._fail(f"member {entry.name}: {entry.size} bytes, more than a header can be")
        data = tar.read_all()
        self._files[entry.name] = (len(data), hashlib.sha256(data).hexdigest())
        return data

    def _read_header(self, data: bytes) -> None:
        raw = _json(data)
        if not isinstance(raw, dict):
            raise self._fail(f"{HEADER} is not a JSON object")
        if raw.get("format") not in READABLE:
            raise self._fail(f"{HEADER}: format {raw.get('format')!r}; this mailnode reads formats {READABLE}")
        node, written = raw.get("node"), raw.get("pointInTime")
        if not isinstance(node, str) or not isinstance(written, str):
            raise self._fail(f"{HEADER}: node and pointInTime must be strings")
        try:
            point_in_time = datetime.datetime.fromisoformat(written)
        except ValueError as error:
            raise self._fail(f"{HEADER}: pointInTime {written!r} is not an ISO 8601 time") from error
        self._header = (node, point_in_time, written)

    def _take_index(self, tar: tarcodec.TarReader, entry: tarcodec.Entry, prefix: str) -> None:
        target = self._target(entry.name)
        copy = target or self._scratch / f"{len(self._mailboxes)}.sqlite"
        self._files[entry.name] = tarcodec.copy_member(tar, copy, mtime=entry.mtime)
        try:
            paths, folders = _check_index(copy, f"{self.label}: {entry.name}")
        finally:
            if target is None:
                copy.unlink()
        domain, local = prefix.split("/")[1:]
        address = f"{maildir.decode_name(local)}@{maildir.decode_name(domain)}"
        self._mailboxes[prefix] = _Mailbox(address, set(paths))
        self._mailbox_folders(prefix, folders)

    def _take_message(self, tar: tarcodec.TarReader, entry: tarcodec.Entry, prefix: str, rel: str) -> None:
        mailbox = self._mailboxes.get(prefix)
        if mailbox is None:
            raise self._fail(f"member {entry.name}: a message file before its mailbox's {INDEX}, or of no mailbox")
        if rel not in mailbox.unseen:
            raise self._fail(f"member {entry.name}: a message file its mailbox's {INDEX} does not list")
        size, digest = tarcodec.copy_member(tar, self._target(entry.name), mtime=entry.mtime)
        self._files[entry.name] = (size, digest)
        mailbox.unseen.discard(rel)
        mailbox.messages += 1
        mailbox.bytes += size

    def _take_dav(self, tar: tarcodec.TarReader, entry: tarcodec.Entry, prefix: str, rel: str) -> None:
        mailbox = self._mailboxes.get(prefix)
        if mailbox is None:
            raise self._fail(f"member {entry.name}: a calendar or contact file before its mailbox's {INDEX}")
        try:
            davfiles.check(rel)
        except ValueError as error:
            raise self._fail(f"member {entry.name}: {error}") from None
        size, digest = tarcodec.copy_member(tar, self._target(entry.name), mtime=entry.mtime)
        self._files[entry.name] = (size, digest)
        mailbox.dav_files += 1
        mailbox.dav_bytes += size

    def _parse_manifest(self, data: bytes) -> _Manifest:
        raw = _json(data)
        try:
            files = {
                name: (_typed(entry["size"], int), _typed(entry["sha256"], str))
                for name, entry in _typed(raw["files"], dict).items()
            }
            mailboxes = {
                address: (_typed(counts["messages"], int), _typed(counts["bytes"], int))
                for address, counts in _typed(raw["mailboxes"], dict).items()
            }
            return _Manifest(
                node=_typed(raw["node"], str),
                point_in_time=_typed(raw["pointInTime"], str),
                files=files,
                mailboxes=mailboxes,
                queued=_typed(raw["queue"]["messages"], int),
                dav={
                    address: (_typed(counts["files"], int), _typed(counts["bytes"], int))
                    for address, counts in _typed(raw.get("dav", {}), dict).items()
                },
            )
        except (KeyError, TypeError) as error:
            raise self._fail(f"{MANIFEST} is malformed ({error!r})") from error

    def _finish(self) -> Summary:
        if self._header is None:
            raise self._fail("an empty archive")
        manifest = self._manifest
        if manifest is None:
            raise self._fail(f"the archive ends after member {self._last} without {MANIFEST}: truncated or damaged")
        problems = []
        for name, (size, digest) in self._files.items():
            listed = manifest.files.get(name)
            if listed is None:
                problems.append(f"member {name} is not in the manifest")
            elif listed[0] != size:
                problems.append(f"member {name}: {size} bytes, the manifest says {listed[0]}")
            elif listed[1] != digest:
                problems.append(f"member {name}: SHA-256 differs from the manifest's")
        problems += [
            f"member {name} is missing (the manifest lists it)" for name in manifest.files if name not in self._files
        ]
        if problems:
            more = f"; and {len(problems) - _MANY} more" if len(problems) > _MANY else ""
            raise self._fail("; ".join(problems[:_MANY]) + more)
        for prefix, mailbox in self._mailboxes.items():
            if mailbox.unseen:
                first = min(mailbox.unseen)
                raise self._fail(
                    f"{prefix}/{INDEX} lists {len(mailbox.unseen)} message file(s) the archive lacks, first {first}"
                )
        node, point_in_time, written = self._header
        counts = {m.address: (m.messages, m.bytes) for m in self._mailboxes.values()}
        if (manifest.node, manifest.point_in_time) != (node, written):
            raise self._fail(f"{MANIFEST} names another node or point in time than {HEADER}")
        if manifest.mailboxes != counts:
            raise self._fail(f"the manifest's mailbox counts {manifest.mailboxes} differ from the archive's {counts}")
        dav = {m.address: (m.dav_files, m.dav_bytes) for m in self._mailboxes.values() if m.dav_files}
        if manifest.dav != dav:
            raise self._fail(
                f"the manifest's calendar and contact counts {manifest.dav} differ from the archive's {dav}"
            )
        if manifest.queued != self._queued:
            raise self._fail(f"the manifest counts {manifest.queued} queued messages, the archive holds {self._queued}")
        return Summary(
            node=node,
            point_in_time=point_in_time,
            mailboxes=counts,
            queued=self._queued,
            files=len(self._files),
            bytes=sum(size for size, _ in self._files.values()),
            dav=dav,
        )


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


def _typed(value: Any, kind: type) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value
