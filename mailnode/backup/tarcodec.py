"""The tar codec of the archives, used by mailnode.backup.archive and noderestore (and by mailnode.cli
for gzip): a streaming writer (`TarWriter`, which never seeks, so its output may be a pipe) and reader
(`Source`, gzip or not, and `TarReader`), each hashing members as they pass. Written here rather than
with tarfile, whose per-member cost (header parsing and building) is most of the time for 100,000 small
messages; the reader takes what POSIX tar writers make (ustar, pax and GNU long names, gzip). Every
problem is an ArchiveError (defined here, where the first ones are met; archive re-exports it).
Everything here blocks: callers run it in a Gateway thread.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

_CHUNK = 1 << 20  # bytes per read, per write to `out` and between two progress calls
_PAX_LIMIT = 1 << 20  # extended header records of one member
_GZIP_LEVEL = 6
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # zlib reads and checks the gzip wrapper itself
_BLOCK = 512
_RECORD = 20 * _BLOCK  # tar(1) pads an archive to whole records
_ZERO_BLOCK = bytes(_BLOCK)

Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes total) as an archive is written or read, about once per MiB."""


class ArchiveError(Exception):
    """The archive cannot be trusted or used (or a restore is refused); the message says what is wrong
    and, where it is one member, which (for stderr and HTTP 400)."""


def is_compressed(path: Path) -> bool:
    """Whether an archive at this path is (to be) gzip-compressed: its name ends in .gz or .tgz."""
    return path.name.endswith((".gz", ".tgz"))


def compressing(out: BinaryIO) -> gzip.GzipFile:
    """A gzip stream into `out` (closing it writes the gzip trailer and leaves `out` open)."""
    return gzip.GzipFile(fileobj=out, mode="wb", compresslevel=_GZIP_LEVEL, mtime=0)


# -- writing --------------------------------------------------------------------------------------------


class TarWriter:
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


# -- reading ---------------------------------------------------------------------------------------------


def open_archive(path: Path) -> BinaryIO:
    try:
        return path.open("rb", buffering=0)
    except OSError as error:
        raise ArchiveError(f"{path}: {error.strerror or error}") from error


class Source:
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
class Entry:
    name: str
    size: int
    mtime: int
    regular: bool


class TarReader:
    """The members of a tar stream, one at a time: `next` gives a member's header (skipping what is left
    of the one before), `read` its bytes."""

    def __init__(self, source: Source) -> None:
        self._source = source
        self._label = source.label
        self._remaining = self._size = 0
        self._last = ""

    def next(self) -> Entry | None:
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
                self._start(Entry("(extended header)", size, 0, True))
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
            entry = Entry(name.decode("utf-8", "surrogateescape"), size, mtime, kind in (b"0", b"\0"))
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

    def _start(self, entry: Entry) -> None:
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


def copy_member(tar: TarReader, target: Path | None, *, mtime: int | None = None) -> tuple[int, str]:
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
