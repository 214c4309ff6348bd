"""Archives: the portable tar of docs/backups.md ("Archives (node)"). `write` makes one from a staged copy
of a node's data directory (the node's GET /backup and POST /backups); `verify` and `receive` check one in
one streaming pass; `restore_node` brings back a whole node's data directory (`mailnode restore
--data-dir`); `mailbox_messages` reads one mailbox back (the node's POST /restore).

Members, in this order (`write` never seeks, so `out` may be a pipe):

    mailfleet-backup.json                       {"format": 1, "node": ..., "pointInTime": ...}
    mail/<domain>/<local>/index.sqlite          then that index's message files, in (folder, uid) order
    queue/messages/<id>.eml, <id>.json
    MANIFEST.json                               every other member's size and SHA-256, per-mailbox counts

Readers trust nothing before the manifest has matched: every member is hashed as it streams past, its
path must be relative without '..', an index must pass SQLite's integrity check and list exactly the
message files that follow it. The tar format is read and written here rather than by tarfile, whose
per-member cost (header parsing and building) is most of the time for 100,000 small messages; the
reader takes what POSIX tar writers make (ustar, pax and GNU long names, gzip) and refuses anything but
regular files. Everything here blocks (files, SQLite, hashing): the node calls it from a Gateway thread.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import datetime
import functools
import gzip
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

from mailnode.store import durable, maildir

FORMAT = 1
HEADER = "mailfleet-backup.json"
MANIFEST = "MANIFEST.json"
INDEX = "index.sqlite"
MAIL = "mail"
QUEUE = "queue/messages"

_CHUNK = 1 << 20  # bytes per read, per write to `out` and between two progress calls
_HEADER_LIMIT = 1 << 16  # the header member is a few dozen bytes
_PAX_LIMIT = 1 << 20  # extended header records of one member
_GZIP_LEVEL = 6
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # zlib reads and checks the gzip wrapper itself
_BLOCK = 512
_RECORD = 20 * _BLOCK  # tar(1) pads an archive to whole records
_ZERO_BLOCK = bytes(_BLOCK)
_MANY = 5  # problems named in one error message
_FSYNC_THREADS = 8

Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes total) as an archive is written or read, about once per MiB."""


class ArchiveError(Exception):
    """The archive cannot be trusted or used (or a restore is refused); the message says what is wrong
    and, where it is one member, which (for stderr and HTTP 400)."""


@dataclasses.dataclass(frozen=True)
class Summary:
    node: str
    point_in_time: datetime.datetime
    mailboxes: dict[str, tuple[int, int]]  # address -> (messages, bytes)
    queued: int  # outbound messages (envelopes)
    files: int  # members the manifest lists (all but the manifest itself)
    bytes: int  # their total size

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


def is_compressed(path: Path) -> bool:
    """Whether an archive at this path is (to be) gzip-compressed: its name ends in .gz or .tgz."""
    return path.name.endswith((".gz", ".tgz"))


def compressing(out: BinaryIO) -> gzip.GzipFile:
    """A gzip stream into `out` (closing it writes the gzip trailer and leaves `out` open)."""
    return gzip.GzipFile(fileobj=out, mode="wb", compresslevel=_GZIP_LEVEL, mtime=0)


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
    `compress`. Only files an index lists are archived for a mailbox. `out` is flushed, not closed."""
    mailboxes = maildir.mailbox_dirs(staged)
    queue_dir = staged / QUEUE
    queue_files = sorted(p for p in queue_dir.iterdir() if p.is_file()) if queue_dir.is_dir() else []
    total = sum((path / INDEX).stat().st_size + _indexed_bytes(path / INDEX) for _, path in mailboxes)
    total += sum(p.stat().st_size for p in queue_files)
    compressor = compressing(out) if compress else None
    tar = _TarWriter(cast(BinaryIO, compressor) if compressor else out, total=total, progress=progress)
    header = {"format": FORMAT, "node": node, "pointInTime": point_in_time.isoformat()}
    mtime = int(point_in_time.timestamp())
    tar.add_bytes(HEADER, json.dumps(header).encode(), mtime)
    counts: dict[str, tuple[int, int]] = {}
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
    queued = 0
    for file in queue_files:
        tar.add_file(f"{QUEUE}/{file.name}", str(file))
        queued += file.suffix == ".json"
    manifest = {
        **header,
        "files": {name: {"size": size, "sha256": digest} for name, (size, digest) in tar.files.items()},
        "mailboxes": {address: {"messages": n, "bytes": b} for address, (n, b) in counts.items()},
        "queue": {"messages": queued},
    }
    summary = Summary(
        node=node,
        point_in_time=point_in_time,
        mailboxes=counts,
        queued=queued,
        files=len(tar.files),
        bytes=sum(size for size, _ in tar.files.values()),
    )
    tar.add_bytes(MANIFEST, json.dumps(manifest, ensure_ascii=False).encode(), mtime, listed=False)
    tar.close()
    if compressor is not None:
        compressor.close()  # writes the gzip trailer; leaves `out` open
    out.flush()
    return summary


class _TarWriter:
    """Members written straight to `out` through a 1 MiB buffer, each hashed as it goes."""

    def __init__(self, out: BinaryIO, *, total: int, progress: Progress | None) -> None:
        self._out = out
        self._buffer = bytearray()
        self._progress = progress
        self._total = total
        self._done = self._reported = 0
        self._written = 0  # bytes of tar so far
        self.files: dict[str, tuple[int, str]] = {}  # name -> (size, sha256), in archive order

    def add_bytes(self, name: str, data: bytes, mtime: int, *, listed: bool = True) -> None:
        self._put(_tar_header(name, len(data), mtime))
        self._put(data)
        self._put(_padding(len(data)))
        if listed:
            self.files[name] = (len(data), hashlib.sha256(data).hexdigest())
            self._advance(len(data))

    def add_file(self, name: str, path: str) -> int:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            status = os.fstat(fd)
            size = status.st_size
            self._put(_tar_header(name, size, int(status.st_mtime)))
            digest = hashlib.sha256()
            remaining = size
            while remaining:
                chunk = os.read(fd, min(remaining, _CHUNK))
                if not chunk:
                    raise ArchiveError(f"{path} shrank while it was being archived")
                digest.update(chunk)
                self._put(chunk)
                remaining -= len(chunk)
        finally:
            os.close(fd)
        self._put(_padding(size))
        self.files[name] = (size, digest.hexdigest())
        self._advance(size)
        return size

    def close(self) -> None:
        """The end-of-archive marker (two zero blocks), padded to a whole record as tar(1) does."""
        end = self._written + 2 * _BLOCK
        self._put(bytes(2 * _BLOCK + -end % _RECORD))
        self._flush()
        if self._progress is not None:
            self._progress(self._done, self._done)

    def _put(self, data: bytes) -> None:
        self._written += len(data)
        if len(data) >= _CHUNK:
            self._flush()
            self._out.write(data)
            return
        self._buffer += data
        if len(self._buffer) >= _CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self._out.write(bytes(self._buffer))  # a copy: `out` may keep what it is given
            self._buffer.clear()

    def _advance(self, size: int) -> None:
        self._done += size
        if self._progress is not None and self._done - self._reported >= _CHUNK:
            self._reported = self._done
            self._progress(self._done, max(self._total, self._done))


# A ustar header block (POSIX.1-1988, as pax extends it), with the fields every member shares.
_USTAR = bytearray(_BLOCK)
_USTAR[100:108] = b"0000600\0"  # mode
_USTAR[108:124] = b"0000000\0" * 2  # uid, gid
_USTAR[148:156] = b" " * 8  # the checksum counts its own field as spaces
_USTAR[257:265] = b"ustar\x0000"  # magic, version
_USTAR[329:345] = b"0000000\0" * 2  # devmajor, devminor
_OCTAL_LIMIT = 8**11  # 11 octal digits: sizes below 8 GiB fit in the header itself
_PAX_NAME = "././@PaxHeader"


def _tar_header(name: str, size: int, mtime: int, *, kind: bytes = b"0") -> bytes:
    """The header block(s) of one member: a pax extended header first when the name is longer than
    100 bytes or not ASCII, or the size too big for its field."""
    encoded = name.encode("utf-8", "surrogateescape")
    records = b""
    if len(encoded) > 100 or not encoded.isascii():
        records += _pax_record(b"path", encoded)
    if size >= _OCTAL_LIMIT:
        records += _pax_record(b"size", b"%d" % size)
        size = 0
    block = _USTAR.copy()
    block[: min(len(encoded), 100)] = encoded[:100]
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"%011o\0" % min(max(mtime, 0), _OCTAL_LIMIT - 1)
    block[156:157] = kind
    block[148:155] = b"%06o\0" % sum(block)
    if not records:
        return bytes(block)
    return _tar_header(_PAX_NAME, len(records), 0, kind=b"x") + records + _padding(len(records)) + block


def _pax_record(keyword: bytes, value: bytes) -> bytes:
    """`<length> <keyword>=<value>` and a newline, the length counting its own digits."""
    rest = len(keyword) + len(value) + 3  # the space, '=' and newline
    length = rest + 1
    while length != rest + len(str(length)):
        length = rest + len(str(length))
    return b"%d %s=%s\n" % (length, keyword, value)


def _padding(size: int) -> bytes:
    return bytes(-size % _BLOCK)


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """Read an index without writing anything beside it (no -wal or -shm): the file must not change
    while it is open, which holds for a staged copy and for a file just extracted."""
    return sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro&immutable=1", uri=True)


def _indexed_bytes(path: Path) -> int:
    db = _connect_read_only(path)
    try:
        return int(db.execute("SELECT COALESCE(SUM(size), 0) FROM messages").fetchone()[0])
    finally:
        db.close()


_ORDERED_MESSAGES = (
    "SELECT m.path, f.name, m.flags, m.internal_date FROM messages m JOIN folders f ON f.id = m.folder_id"
    " ORDER BY f.name, m.uid"
)


def _indexed_paths(path: Path) -> list[str]:
    db = _connect_read_only(path)
    try:
        return [row[0] for row in db.execute(_ORDERED_MESSAGES)]
    finally:
        db.close()


# -- reading ---------------------------------------------------------------------------------------------


def verify(path: Path, *, progress: Progress | None = None) -> Summary:
    """Check an archive in one streaming pass (gzip or not): raises ArchiveError saying what is wrong."""
    with _open_archive(path) as raw, tempfile.TemporaryDirectory(prefix="mailnode-verify-") as scratch:
        source = _Source(raw, label=str(path), progress=progress, total=os.fstat(raw.fileno()).st_size)
        return _Scan(str(path), Path(scratch)).run(source)


def receive(
    source: BinaryIO, out: BinaryIO, *, label: str, progress: Progress | None = None, total: int = 0
) -> Summary:
    """Copy an archive from a stream (GET /backup's answer) into `out` byte for byte, checking it as
    `verify` does in the same pass; `total` is only for `progress`. Raises ArchiveError (the caller
    throws away what was written), or whatever reading `source` raises."""
    reader = _Source(source, label=label, progress=progress, total=total, copy_to=out)
    with tempfile.TemporaryDirectory(prefix="mailnode-verify-") as scratch:
        return _Scan(label, Path(scratch)).run(reader)


def restore_node(path: Path, data_dir: Path, *, progress: Progress | None = None) -> Summary:
    """Restore a whole node into `data_dir`, which must hold no mail and no queued message (the node
    stopped). Extracts into data_dir/.restore-<random>, checking as `verify` does and fsyncing every file
    and directory; only once the manifest matched are mail/ and queue/messages/ renamed into place. On
    any error nothing is left in data_dir."""
    _refuse_unless_empty(data_dir)
    created = durable.ensure_dir(data_dir)
    work = Path(tempfile.mkdtemp(prefix=".restore-", dir=data_dir))
    done = False
    try:
        with _open_archive(path) as raw:
            source = _Source(raw, label=str(path), progress=progress, total=os.fstat(raw.fileno()).st_size)
            extraction = _Extraction(str(path), work)
            summary = extraction.run(source)
        extraction.make_dir(work / MAIL)
        extraction.make_dir(work / QUEUE)
        extraction.sync()
        _refuse_unless_empty(data_dir)
        _move_into_place(work, data_dir)
        done = True
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created and not done:
            data_dir.rmdir()
    return summary


def mailbox_messages(path: Path, address: str) -> Iterator[ArchivedMessage]:
    """The messages of one mailbox of a verified archive, in the archive's order, which `write` makes
    (folder, uid) order. One streaming pass: the mailbox's index comes before its messages, so only the
    index (in a temporary file) and one message at a time are held. ArchiveError if the address is not
    in the archive."""
    key = maildir.mailbox_dir(Path(), address).as_posix()  # mail/<domain>/<local>
    label = str(path)
    rows: dict[str, tuple[str, str, int]] | None = None  # path in the mailbox -> (folder, flags, date)
    with _open_archive(path) as raw, tempfile.TemporaryDirectory(prefix="mailnode-restore-") as scratch:
        tar = _TarReader(_Source(raw, label=label, progress=None, total=0))
        entry = tar.next()
        if entry is None or entry.name != HEADER:
            raise ArchiveError(f"{label}: not a Mailfleet archive (it does not start with {HEADER})")
        while (entry := tar.next()) is not None:
            if rows is None:
                if entry.name == f"{key}/{INDEX}":
                    copy = Path(scratch) / INDEX
                    _copy(tar, copy)
                    rows = _index_rows(copy, f"{label}: {entry.name}")
                continue
            if not entry.name.startswith(f"{key}/"):
                break  # past this mailbox's members
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


def _open_archive(path: Path) -> BinaryIO:
    try:
        return path.open("rb", buffering=0)
    except OSError as error:
        raise ArchiveError(f"{path}: {error.strerror or error}") from error


class _Source:
    """An archive's bytes: read from `raw` a MiB at a time (copied to `copy_to` if given, counted for
    progress), inflated if they are gzip, served in exact amounts. Read errors become ArchiveError."""

    def __init__(
        self,
        raw: BinaryIO,
        *,
        label: str,
        progress: Progress | None,
        total: int,
        copy_to: BinaryIO | None = None,
    ) -> None:
        self.label = label
        self._raw = raw
        self._progress = progress
        self._total = total
        self._copy_to = copy_to
        self._started = False
        self._inflate: Any = None  # a zlib decompressor once the stream turned out to be gzip
        self._buffer = b""
        self._position = 0
        self._done = 0

    def take(self, size: int) -> bytes:
        """The next `size` bytes; fewer only at the end of the archive."""
        end = self._position + size
        if end <= len(self._buffer):
            data = self._buffer[self._position : end]
            self._position = end
            return data
        parts = [self._buffer[self._position :]]
        have = len(parts[0])
        self._buffer, self._position = b"", 0
        while have < size:
            more = self._more()
            if not more:
                break
            if have + len(more) > size:
                self._buffer, self._position = more, size - have
                more = more[: size - have]
            parts.append(more)
            have += len(more)
        return b"".join(parts)

    def drain(self) -> None:
        """Read what is left (the end-of-archive padding), so that all is counted and copied."""
        while self._read_raw():
            pass

    def _more(self) -> bytes:
        while True:
            inflate = self._inflate
            if inflate is not None and inflate.unconsumed_tail:
                compressed = inflate.unconsumed_tail
            elif inflate is not None and inflate.eof and inflate.unused_data:
                compressed = inflate.unused_data  # another gzip member follows
                inflate = self._inflate = zlib.decompressobj(_GZIP_WBITS)
            else:
                compressed = self._read_raw()
                if not self._started:
                    self._started = True
                    if compressed[:2] == b"\x1f\x8b":
                        inflate = self._inflate = zlib.decompressobj(_GZIP_WBITS)
                if inflate is None:
                    return compressed
                if not compressed:
                    if not inflate.eof:
                        raise ArchiveError(f"{self.label}: truncated: the gzip stream ends early")
                    return b""
                if inflate.eof:
                    inflate = self._inflate = zlib.decompressobj(_GZIP_WBITS)
            try:
                data: bytes = inflate.decompress(compressed, _CHUNK)  # at most a MiB out of any input
            except zlib.error as error:
                raise ArchiveError(f"{self.label}: damaged gzip data: {error}") from error
            if data:
                return data

    def _read_raw(self) -> bytes:
        try:
            data = self._raw.read(_CHUNK)
        except OSError as error:
            raise ArchiveError(f"{self.label}: cannot read: {error}") from error
        if self._copy_to is not None and data:
            self._copy_to.write(data)
        self._done += len(data)
        if self._progress is not None:
            self._progress(self._done, max(self._total, self._done))
        return data


@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str
    size: int
    mtime: int
    regular: bool


class _TarReader:
    """The members of a tar stream, one at a time: `next` gives a member's header (skipping what is left
    of the one before), `read` its bytes."""

    def __init__(self, source: _Source) -> None:
        self._source = source
        self._label = source.label
        self._remaining = self._size = 0
        self._last = ""

    def next(self) -> _Entry | None:
        """The next member, or None at the end-of-archive marker or the end of the data (an archive cut
        at a member boundary: the missing manifest tells)."""
        while self._remaining:
            self.read()
        extended: dict[bytes, bytes] = {}
        while True:
            block = self._source.take(_BLOCK)
            if not block or block == _ZERO_BLOCK:
                return None
            if len(block) < _BLOCK:
                raise ArchiveError(f"{self._label}: truncated inside a tar header{self._after()}")
            kind = block[156:157]
            try:
                checksum, size, mtime = _number(block[148:156]), _number(block[124:136]), _number(block[136:148])
            except ValueError:
                checksum = size = mtime = -1
            if checksum != sum(block) - sum(block[148:156]) + 8 * 32 or size < 0:
                if not self._last:
                    raise ArchiveError(f"{self._label}: not a tar archive (it does not start with a tar header)")
                raise ArchiveError(f"{self._label}: a damaged tar header{self._after()}")
            name = block[:100].split(b"\0", 1)[0]
            if block[257:263] == b"ustar\0" and block[345] != 0:  # POSIX ustar, not GNU: a name prefix
                name = block[345:500].split(b"\0", 1)[0] + b"/" + name
            if kind in (b"x", b"g", b"L"):  # pax (member, global), GNU long name: apply to what follows
                if size > _PAX_LIMIT:
                    raise ArchiveError(f"{self._label}: an extended tar header of {size} bytes{self._after()}")
                self._start(_Entry("(extended header)", size, 0, True))
                data = self.read_all()
                if kind == b"x":
                    extended.update(_pax_records(data, self._label))
                elif kind == b"L":
                    extended[b"path"] = data.split(b"\0", 1)[0]
                continue
            try:
                size = int(extended.get(b"size", size))
                mtime = min(max(int(float(extended.get(b"mtime", mtime))), 0), _OCTAL_LIMIT - 1)
            except (ValueError, OverflowError) as error:
                raise ArchiveError(f"{self._label}: a damaged extended tar header{self._after()}") from error
            name = extended.get(b"path", name)
            entry = _Entry(name.decode("utf-8", "surrogateescape"), size, mtime, kind in (b"0", b"\0"))
            self._start(entry)
            self._last = entry.name
            return entry

    def read(self) -> bytes:
        """The next piece (at most a MiB) of the current member; b"" at its end."""
        if not self._remaining:
            return b""
        want = min(self._remaining, _CHUNK)
        data = self._source.take(want)
        if len(data) < want:
            raise ArchiveError(f"{self._label}: truncated inside member {self._last}")
        self._remaining -= want
        if not self._remaining:
            self._source.take(-self._size % _BLOCK)
        return data

    def read_all(self) -> bytes:
        return b"".join(iter(self.read, b""))

    def _start(self, entry: _Entry) -> None:
        self._remaining = self._size = entry.size

    def _after(self) -> str:
        return f" after member {self._last}" if self._last else ""


def _number(field: bytes) -> int:
    """A numeric header field: octal digits, or (GNU, for big values) base-256 with the top bit set."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _pax_records(data: bytes, label: str) -> dict[bytes, bytes]:
    records = {}
    position = 0
    while position < len(data):
        length = data[position : position + 20].partition(b" ")[0]
        try:
            end = position + int(length)
        except ValueError:
            end = -1
        if end <= position or end > len(data) or data[end - 1 : end] != b"\n":
            raise ArchiveError(f"{label}: a damaged pax extended header")
        keyword, _, value = data[position + len(length) + 1 : end - 1].partition(b"=")
        records[keyword] = value
        position = end
    return records


def _copy(tar: _TarReader, target: Path | None, *, mtime: int | None = None) -> tuple[int, str]:
    """Read the current member to its end, hashing it and writing it to `target` (new) if given:
    (size, SHA-256)."""
    digest = hashlib.sha256()
    size = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600) if target else -1
    try:
        while chunk := tar.read():
            digest.update(chunk)
            size += len(chunk)
            view = memoryview(chunk)
            while fd >= 0 and view:
                view = view[os.write(fd, view) :]
        if fd >= 0 and mtime is not None:
            os.utime(fd, (mtime, mtime))
    finally:
        if fd >= 0:
            os.close(fd)
    return size, digest.hexdigest()


def _is_safe(name: str) -> bool:
    """A relative path with no '..', '.' or empty component (so none that is absolute)."""
    wrapped = f"/{name}/"
    return not ("//" in wrapped or "/./" in wrapped or "/../" in wrapped or "\\" in name or "\0" in name)


def _index_rows(path: Path, what: str) -> dict[str, tuple[str, str, int]]:
    _check_index(path, what)
    db = _connect_read_only(path)
    try:
        return {row[0]: (row[1], row[2], int(row[3])) for row in db.execute(_ORDERED_MESSAGES)}
    finally:
        db.close()


def _check_index(path: Path, what: str) -> tuple[list[str], list[str]]:
    """An index's message paths and folders, once it passed SQLite's integrity check."""
    try:
        db = _connect_read_only(path)
        try:
            problems = [str(row[0]) for row in db.execute("PRAGMA integrity_check")]
            if problems != ["ok"]:
                raise ArchiveError(f"{what}: fails SQLite's integrity check: {'; '.join(problems[:_MANY])}")
            folders = [str(row[0]) for row in db.execute("SELECT name FROM folders ORDER BY name")]
            paths = [str(row[0]) for row in db.execute("SELECT path FROM messages")]
        finally:
            db.close()
    except sqlite3.Error as error:
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


@dataclasses.dataclass(frozen=True)
class _Manifest:
    node: str
    point_in_time: str
    files: dict[str, tuple[int, str]]
    mailboxes: dict[str, tuple[int, int]]
    queued: int


class _Scan:
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

    def run(self, source: _Source) -> Summary:
        tar = _TarReader(source)
        while (entry := tar.next()) is not None:
            self._take(tar, entry)
            self._last = entry.name
        source.drain()  # all of it read, and copied if receiving
        return self._finish()

    def _fail(self, problem: str) -> ArchiveError:
        return ArchiveError(f"{self.label}: {problem}")

    def _take(self, tar: _TarReader, entry: _Entry) -> None:
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
        elif parts[0] == MAIL and len(parts) >= 5:
            self._take_message(tar, entry, "/".join(parts[:3]), "/".join(parts[3:]))
        elif len(parts) == 3 and f"{parts[0]}/{parts[1]}" == QUEUE:
            self._files[name] = _copy(tar, self._target(name), mtime=entry.mtime)
            self._queued += name.endswith(".json")
        else:
            raise self._fail(
                f"unexpected member {name} (neither the header, a mailbox's index or message, a queue file"
                " nor the manifest)"
            )

    def _small(self, tar: _TarReader, entry: _Entry) -> bytes:
        if entry.size > _HEADER_LIMIT:
            raise self._fail(f"member {entry.name}: {entry.size} bytes, more than a header can be")
        data = tar.read_all()
        self._files[entry.name] = (len(data), hashlib.sha256(data).hexdigest())
        return data

    def _read_header(self, data: bytes) -> None:
        raw = _json(data)
        if not isinstance(raw, dict):
            raise self._fail(f"{HEADER} is not a JSON object")
        if raw.get("format") != FORMAT:
            raise self._fail(f"{HEADER}: format {raw.get('format')!r}; this mailnode reads format {FORMAT}")
        node, written = raw.get("node"), raw.get("pointInTime")
        if not isinstance(node, str) or not isinstance(written, str):
            raise self._fail(f"{HEADER}: node and pointInTime must be strings")
        try:
            point_in_time = datetime.datetime.fromisoformat(written)
        except ValueError as error:
            raise self._fail(f"{HEADER}: pointInTime {written!r} is not an ISO 8601 time") from error
        self._header = (node, point_in_time, written)

    def _take_index(self, tar: _TarReader, entry: _Entry, prefix: str) -> None:
        target = self._target(entry.name)
        copy = target or self._scratch / f"{len(self._mailboxes)}.sqlite"
        self._files[entry.name] = _copy(tar, copy, mtime=entry.mtime)
        try:
            paths, folders = _check_index(copy, f"{self.label}: {entry.name}")
        finally:
            if target is None:
                copy.unlink()
        domain, local = prefix.split("/")[1:]
        address = f"{maildir.decode_name(local)}@{maildir.decode_name(domain)}"
        self._mailboxes[prefix] = _Mailbox(address, set(paths))
        self._mailbox_folders(prefix, folders)

    def _take_message(self, tar: _TarReader, entry: _Entry, prefix: str, rel: str) -> None:
        mailbox = self._mailboxes.get(prefix)
        if mailbox is None:
            raise self._fail(f"member {entry.name}: a message file before its mailbox's {INDEX}, or of no mailbox")
        if rel not in mailbox.unseen:
            raise self._fail(f"member {entry.name}: a message file its mailbox's {INDEX} does not list")
        size, digest = _copy(tar, self._target(entry.name), mtime=entry.mtime)
        self._files[entry.name] = (size, digest)
        mailbox.unseen.discard(rel)
        mailbox.messages += 1
        mailbox.bytes += size

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
        if manifest.queued != self._queued:
            raise self._fail(f"the manifest counts {manifest.queued} queued messages, the archive holds {self._queued}")
        return Summary(
            node=node,
            point_in_time=point_in_time,
            mailboxes=counts,
            queued=self._queued,
            files=len(self._files),
            bytes=sum(size for size, _ in self._files.values()),
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


# -- restoring a whole node ------------------------------------------------------------------------------


class _Extraction(_Scan):
    """A scan that writes every member under `root` as it goes, and makes the Maildir of every folder an
    index lists, empty ones too; `sync` then makes all of it durable."""

    def __init__(self, label: str, root: Path) -> None:
        super().__init__(label, root)
        self._root = root
        self._dirs: set[Path] = {root}
        self._written: list[Path] = []

    def _target(self, name: str) -> Path:
        target = self._root / name
        self.make_dir(target.parent)
        self._written.append(target)
        return target

    def _mailbox_folders(self, prefix: str, folders: list[str]) -> None:
        for folder in folders:
            for sub in maildir.SUBDIRS:
                self.make_dir(maildir.folder_dir(self._root / prefix, folder) / sub)

    def make_dir(self, path: Path) -> None:
        missing = []
        while path not in self._dirs:
            missing.append(path)
            path = path.parent
        for directory in reversed(missing):
            directory.mkdir(mode=0o700)
            self._dirs.add(directory)

    def sync(self) -> None:
        """Make every file and directory written durable. On Linux one syncfs(2) of the file system does it
        (and reports a writeback error of any of them, since Linux 5.8): for 100,000 small files that is
        about three times faster than an fsync each, which is the fallback elsewhere (several at a time:
        the file system commits concurrent fsyncs together)."""
        if _syncfs(self._root):
            return
        with concurrent.futures.ThreadPoolExecutor(_FSYNC_THREADS, thread_name_prefix="mailnode-fsync") as pool:
            for _ in pool.map(durable.fsync_file, self._written):
                pass
            for _ in pool.map(durable.fsync_dir, self._dirs):
                pass


def _syncfs(path: Path) -> bool:
    """syncfs(2) of the file system holding `path`: True once done, False where there is no syncfs (not
    Linux); OSError when the file system reports a write error."""
    syncfs = getattr(_libc(), "syncfs", None)
    if syncfs is None:
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if syncfs(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"syncfs of {path}: {os.strerror(error)}")
    finally:
        os.close(fd)
    return True


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _refuse_unless_empty(data_dir: Path) -> None:
    mail = data_dir / MAIL
    if mail.is_dir() and any(mail.iterdir()):
        found = maildir.mailbox_dirs(data_dir)
        what = f"mailbox {found[0][0]}" if found else sorted(p.name for p in mail.iterdir())[0]
        raise ArchiveError(f"{data_dir}: {mail} is not empty (it holds {what}); a whole node is restored only"
                           " into a data directory without mail")  # fmt: skip
    queue = data_dir / QUEUE
    if queue.is_dir() and any(queue.iterdir()):
        raise ArchiveError(f"{data_dir}: {queue} holds queued mail; a whole node is restored only into a data"
                           " directory without mail")  # fmt: skip


def _move_into_place(work: Path, data_dir: Path) -> None:
    """mail/ then queue/messages/ renamed from the extraction into data_dir (over empty directories),
    then data_dir made durable. If the second rename fails the first is undone."""
    (work / MAIL).replace(data_dir / MAIL)
    queue = data_dir / "queue"
    try:
        if queue.is_dir():
            (work / QUEUE).replace(queue / "messages")
            durable.fsync_dir(queue)
        else:
            (work / "queue").replace(queue)
    except BaseException:
        (data_dir / MAIL).replace(work / MAIL)
        raise
    durable.fsync_dir(data_dir)
