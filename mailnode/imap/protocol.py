"""IMAP4rev1 and IMAP4rev2 syntax (RFC 3501 §9, RFC 9051 §9): client commands parsed into tokens and typed
requests, server data formatted.

Pure functions, no I/O. `mailnode.imap.server` frames a command into lines and literals, asks `literal_marker`
whether a line announces a literal, hands the parts to `parse_command`, then calls the per-command helpers
(`parse_fetch`, `parse_store`, `parse_list_args`, ...). Every syntax error is a `ProtocolError` whose message
the server sends as `<tag> BAD <message>` (or `* BAD` when the tag itself could not be read).
"""

from __future__ import annotations

import base64
import bisect
import dataclasses
import datetime
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal, TypeAlias


class ProtocolError(Exception):
    """A command that does not follow the grammar; answered with BAD (tag None: `* BAD`)."""

    def __init__(self, message: str, tag: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.tag = tag


UINT32_MAX = 4_294_967_295  # RFC 3501 §9 number, nz-number
MODSEQ_MAX = 9_223_372_036_854_775_807  # RFC 7162 §7 mod-sequence-value: unsigned 63-bit
MAX_NESTING = 32  # parenthesized lists inside one command; deeper is refused, not recursed into
LITERAL_SIZE_CAP = 10**20  # literal_marker reports absurd sizes as this; the server refuses them as too big
QUOTED_MAX = 1024  # quote() sends longer values as literals

# -- tokens ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Atom:
    """An atom as the client sent it (case preserved): keywords, numbers, sequence sets, flags (`\\Seen`), `*`."""

    value: str


@dataclasses.dataclass(frozen=True)
class String:
    """A quoted string (unescaped) or a literal; `literal8` for RFC 3516 `~{n}` (may hold NUL)."""

    value: bytes
    literal8: bool = False


@dataclasses.dataclass(frozen=True)
class Nil:
    """The atom NIL (any case). Where the grammar wants an astring, `arg_bytes` reads it back as "NIL"."""


NIL = Nil()


@dataclasses.dataclass(frozen=True)
class ParenList:
    items: list[Arg]


@dataclasses.dataclass(frozen=True)
class FetchAtt:
    """A FETCH data item (RFC 3501 §6.4.5). Made by the tokenizer for the bracketed items of FETCH and UID FETCH
    (`BODY.PEEK[1.HEADER.FIELDS (From)]<0.100>`), by `parse_fetch_items` for the plain ones (`FLAGS`)."""

    name: str  # upper: BODY, BODY.PEEK, BINARY, BINARY.PEEK, BINARY.SIZE, RFC822.HEADER, FLAGS, ...
    section: str | None = None  # text inside [] without the field list, upper ("", "1.2.MIME", "HEADER.FIELDS")
    fields: list[str] = dataclasses.field(default_factory=list)  # HEADER.FIELDS[.NOT] names, as sent
    partial: tuple[int, int] | None = None  # <origin.length>

    @property
    def sets_seen(self) -> bool:
        # RFC 3501 §6.4.5: BODY[...] and RFC822(.TEXT) set \Seen; .PEEK, RFC822.HEADER and BODY do not.
        # RFC 3516 §4.2: so does BINARY[...] (BINARY.SIZE does not).
        if self.name in ("RFC822", "RFC822.TEXT"):
            return True
        return self.name in ("BODY", "BINARY") and self.section is not None

    def response_name(self) -> str:
        """The item's name in the FETCH response: `BODY[HEADER.FIELDS (From)]<0>` for `BODY.PEEK[...]<0.100>`."""
        name = self.name.removesuffix(".PEEK")
        if self.section is None:
            return name
        fields = " (" + " ".join(format_astring(f).decode("ascii") for f in self.fields) + ")" if self.fields else ""
        origin = f"<{self.partial[0]}>" if self.partial is not None else ""
        return f"{name}[{self.section}{fields}]{origin}"


Arg: TypeAlias = Atom | String | Nil | ParenList | FetchAtt


@dataclasses.dataclass
class Command:
    tag: str
    name: str  # upper; "UID FETCH", "UID SEARCH", ... for UID commands
    args: list[Arg]


# -- framing --------------------------------------------------------------------------------------------

# The marker is the line's last token: a final `}` with a space or quote after the last `{` (`"x{" y}`)
# ends an atom, not a marker.
_MARKER_TAIL = re.compile(rb'\{([^{}\s"]*)\}\Z')
_MARKER_BODY = re.compile(rb"([0-9]+)(\+?)")


def literal_marker(line: bytes) -> tuple[int, bool] | None:
    """(size, non-synchronizing) when `line` (CRLF stripped) ends with `{n}` or `{n+}` (RFC 7888), else None.

    A size too large to be meant is reported as LITERAL_SIZE_CAP, for the server to refuse as too big.
    """
    tail = _MARKER_TAIL.search(line)
    if tail is None:
        return None
    body = _MARKER_BODY.fullmatch(tail.group(1))
    if body is None:
        tag = _TAG.match(line)
        raise ProtocolError("invalid literal size", tag.group().decode("ascii") if tag else None)
    digits = body.group(1).lstrip(b"0") or b"0"
    size = int(digits) if len(digits) <= 20 else LITERAL_SIZE_CAP
    return min(size, LITERAL_SIZE_CAP), body.group(2) == b"+"


# -- tokenizer ------------------------------------------------------------------------------------------

_SP, _DQUOTE, _LPAREN, _RPAREN, _LBRACE, _TILDE, _RBRACKET, _LT = b' "(){~]<'

# RFC 3501 §9 ASTRING-CHAR, widened to `\`, `%` and `*` so that one atom reader serves flags (\Seen),
# LIST patterns and sequence sets: every visible ASCII character but ( ) { and ", which start other tokens.
_ATOM_RUN = re.compile(rb"[\x21\x23-\x27\x2a-\x7a\x7c-\x7e]+")
_TAG = re.compile(rb"[\x21\x23\x24\x26\x27\x2c-\x5b\x5d-\x7a\x7c-\x7e]+")  # ASTRING-CHAR except "+"
_QUOTED = re.compile(rb'"((?:[^"\\\r\n\x00]|\\["\\])*)"')
_QUOTED_ESCAPE = re.compile(rb'\\(["\\])')
_LITERAL = re.compile(rb"~?\{([0-9]+)(\+?)\}")
_SECTION_TEXT = re.compile(rb"[A-Za-z0-9.]*")
_PARTIAL = re.compile(rb"<([0-9]{1,10})\.([0-9]{1,10})>")

_SECTION_ATTS = frozenset({"BODY", "BODY.PEEK", "BINARY", "BINARY.PEEK", "BINARY.SIZE"})
_PART = r"[1-9][0-9]{0,9}(?:\.[1-9][0-9]{0,9})*"
_MSGTEXT = r"HEADER|HEADER\.FIELDS|HEADER\.FIELDS\.NOT|TEXT"
_BODY_SECTION = re.compile(rf"(?:{_MSGTEXT}|{_PART}(?:\.(?:{_MSGTEXT}|MIME))?)?")  # RFC 3501 §9 section-spec
_BINARY_SECTION = re.compile(rf"(?:{_PART})?")  # RFC 3516 §8 section-binary
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 §3.6.8 ftext


def _show(data: bytes) -> str:
    """A short, printable rendering of client bytes for an error message."""
    text = "".join(chr(b) if 0x20 <= b < 0x7F else "?" for b in data[:24])
    return text + ("..." if len(data) > 24 else "")


class _Reader:
    """Reads tokens from [line, literal, line, ..., line]; a literal is consumed where its marker ends a line."""

    def __init__(self, parts: list[bytes]) -> None:
        self._parts = parts
        self._index = 0
        self._line = parts[0]
        self._pos = 0
        self.fetch = False  # inside FETCH/UID FETCH: BODY[...] and friends become FetchAtt

    def peek(self) -> int | None:
        return self._line[self._pos] if self._pos < len(self._line) else None

    def at_end(self) -> bool:
        return self._pos >= len(self._line) and self._index == len(self._parts) - 1

    def expect_space(self) -> None:
        char = self.peek()
        if char != _SP:
            raise ProtocolError("expected a space" if char is None else f"expected a space before {_show(self.rest())}")
        self._pos += 1

    def rest(self) -> bytes:
        return self._line[self._pos :]

    def word(self) -> str:
        """A bare atom (tag position aside): the command name."""
        match = _ATOM_RUN.match(self._line, self._pos)
        if match is None:
            raise ProtocolError("expected a command name")
        self._pos = match.end()
        self._check_atom_end()
        return match.group().decode("ascii")

    def tag(self) -> str | None:
        match = _TAG.match(self._line, self._pos)
        if match is None:
            return None
        self._pos = match.end()
        return match.group().decode("ascii")

    def args(self) -> list[Arg]:
        args: list[Arg] = []
        if self.at_end():
            return args
        while True:
            args.append(self._arg(0))
            if self.at_end():
                return args
            self.expect_space()

    def _arg(self, depth: int) -> Arg:
        char = self.peek()
        if char is None:
            raise ProtocolError("unexpected end of command")
        if char == _LPAREN:
            return self._list(depth)
        if char == _DQUOTE:
            return String(self._quoted())
        if char == _LBRACE:
            return String(self._literal())
        if char == _TILDE and self._line[self._pos + 1 : self._pos + 2] == b"{":
            return String(self._literal(), literal8=True)
        if char == _RPAREN:
            raise ProtocolError("unbalanced parenthesis" if depth == 0 else "unexpected )")
        return self._atom(depth)

    def _list(self, depth: int) -> ParenList:
        if depth >= MAX_NESTING:
            raise ProtocolError("parentheses nested too deeply")
        self._pos += 1
        items: list[Arg] = []
        if self.peek() == _RPAREN:
            self._pos += 1
            return ParenList(items)
        while True:
            items.append(self._arg(depth + 1))
            char = self.peek()
            if char == _RPAREN:
                self._pos += 1
                return ParenList(items)
            if char == _SP:
                self._pos += 1
            elif char is None:
                raise ProtocolError("missing closing parenthesis")
            else:
                raise ProtocolError(f"expected a space or ) before {_show(self.rest())}")

    def _quoted(self) -> bytes:
        match = _QUOTED.match(self._line, self._pos)
        if match is None:
            raise ProtocolError("invalid quoted string")
        self._pos = match.end()
        return _QUOTED_ESCAPE.sub(rb"\1", match.group(1))

    def _literal(self) -> bytes:
        match = _LITERAL.fullmatch(self._line, self._pos)
        if match is None:
            raise ProtocolError("invalid literal")
        if self._index + 2 >= len(self._parts):
            raise ProtocolError("missing literal data")
        data = self._parts[self._index + 1]
        digits = match.group(1).lstrip(b"0")
        if len(digits) > 20 or int(digits or b"0") != len(data):
            raise ProtocolError("literal size does not match its data")
        self._index += 2
        self._line = self._parts[self._index]
        self._pos = 0
        return data

    def _check_atom_end(self) -> None:
        char = self.peek()
        if char is not None and (char >= 0x80 or char < 0x20 or char == 0x7F):
            raise ProtocolError("8-bit character in atom" if char >= 0x80 else "control character in command")

    def _atom(self, depth: int) -> Arg:
        start = self._pos
        match = _ATOM_RUN.match(self._line, start)
        if match is None:
            self._check_atom_end()
            raise ProtocolError("unexpected space" if self.peek() == _SP else f"unexpected {_show(self.rest())}")
        self._pos = match.end()
        self._check_atom_end()
        text = match.group().decode("ascii")
        if self.fetch and "[" in text:
            prefix = text[: text.index("[")]
            if prefix.upper() in _SECTION_ATTS:
                self._pos = start + len(prefix)
                return self._section(prefix.upper(), depth)
        if text.upper() == "NIL":
            return NIL
        return Atom(text)

    def _section(self, name: str, depth: int) -> FetchAtt:
        """`[section]<partial>` after BODY, BODY.PEEK, BINARY, BINARY.PEEK or BINARY.SIZE (RFC 3501 §9, RFC 3516)."""
        self._pos += 1  # [
        match = _SECTION_TEXT.match(self._line, self._pos)
        assert match is not None  # the pattern matches the empty string
        self._pos = match.end()
        section = match.group().decode("ascii").upper()
        pattern = _BODY_SECTION if name.startswith("BODY") else _BINARY_SECTION
        if pattern.fullmatch(section) is None:
            raise ProtocolError(f"invalid section {name}[{section}]")
        fields: list[str] = []
        wants_fields = section.endswith(("HEADER.FIELDS", "HEADER.FIELDS.NOT"))
        if self.peek() == _SP and wants_fields:
            self._pos += 1
            if self.peek() != _LPAREN:
                raise ProtocolError(f"{section} needs a list of header names")
            self.fetch = False  # header names are astrings, never sections
            try:
                names = self._list(depth)
            finally:
                self.fetch = True
            if not names.items:
                raise ProtocolError(f"{section} needs at least one header name")
            fields = [_field_name(item) for item in names.items]
        elif wants_fields:
            raise ProtocolError(f"{section} needs a list of header names")
        if self.peek() != _RBRACKET:
            raise ProtocolError(f"expected ] after {name}[{section}")
        self._pos += 1
        partial = None
        if self.peek() == _LT:
            if name == "BINARY.SIZE":
                raise ProtocolError("BINARY.SIZE takes no partial range")
            match = _PARTIAL.match(self._line, self._pos)
            if match is None:
                raise ProtocolError("invalid partial range, expected <origin.length>")
            origin, length = int(match.group(1)), int(match.group(2))
            if origin > UINT32_MAX or not 0 < length <= UINT32_MAX:
                raise ProtocolError("invalid partial range")
            self._pos = match.end()
            partial = (origin, length)
        return FetchAtt(name, section, fields, partial)


def _field_name(arg: Arg) -> str:
    name = arg_bytes(arg).decode("ascii", "replace")
    if _FIELD_NAME.fullmatch(name) is None:
        raise ProtocolError("invalid header field name")
    return name


def parse_command(parts: list[bytes]) -> Command:
    """The command framed as [line0, literal0, line1, ..., lineK] (CRLF stripped; every line but the last ends
    with its literal's `{n}`/`{n+}` marker). Literals inside FETCH section lists and APPEND messages included."""
    if not parts or len(parts) % 2 == 0:
        raise ProtocolError("incomplete command")
    if len(parts) == 1 and not parts[0].strip():
        raise ProtocolError("empty command")
    reader = _Reader([*parts[:-1], parts[-1].rstrip(b" ")])  # tolerate trailing spaces, as most servers do
    tag = reader.tag()
    if tag is None or reader.peek() not in (_SP, None):
        raise ProtocolError("missing or invalid tag")
    try:
        if reader.at_end():
            raise ProtocolError("missing command")
        reader.expect_space()
        name = reader.word().upper()
        if name == "UID":
            reader.expect_space()
            name = "UID " + reader.word().upper()
        reader.fetch = name in ("FETCH", "UID FETCH")
        args: list[Arg] = []
        if not reader.at_end():
            reader.expect_space()
            args = reader.args()
        return Command(tag, name, args)
    except ProtocolError as error:
        raise ProtocolError(error.message, tag) from None


# -- argument helpers -----------------------------------------------------------------------------------


def arg_bytes(arg: Arg) -> bytes:
    """An astring argument (atom, quoted string, literal; NIL read as the atom it also is)."""
    match arg:
        case Atom(value):
            return value.encode("ascii")
        case String(value):
            return value
        case Nil():
            return b"NIL"
    raise ProtocolError("expected a string")


def arg_text(arg: Arg) -> str:
    try:
        return arg_bytes(arg).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("string is not valid UTF-8") from None


def arg_atom(arg: Arg) -> str:
    match arg:
        case Atom(value):
            return value
        case Nil():
            return "NIL"
    raise ProtocolError("expected an atom")


def parse_number(text: str, *, maximum: int = UINT32_MAX, nonzero: bool = False) -> int:
    """RFC 3501 §9 number (nz-number with nonzero): ASCII digits within 0..maximum."""
    if not text or len(text) > 20 or not text.isascii() or not text.isdigit():
        raise ProtocolError("expected a number")
    value = int(text)
    if value > maximum or (nonzero and value == 0):
        raise ProtocolError("number out of range")
    return value


def arg_number(arg: Arg, *, maximum: int = UINT32_MAX, nonzero: bool = False) -> int:
    if not isinstance(arg, Atom):
        raise ProtocolError("expected a number")
    return parse_number(arg.value, maximum=maximum, nonzero=nonzero)


def mailbox_arg(arg: Arg, delimiter: str = "/", *, utf8: bool = False) -> str:
    """A mailbox argument as a name: astring, INBOX normalised; modified UTF-7 decoded, or with `utf8` (an
    IMAP4rev2 session) taken as the UTF-8 it is (RFC 9051 §5.1: `&` is itself there)."""
    return normalize_mailbox(_mailbox_text(arg, utf8=utf8), delimiter)


def _mailbox_text(arg: Arg, *, utf8: bool) -> str:
    """A mailbox name or LIST pattern as sent, decoded: modified UTF-7 (IMAP4rev1, RFC 3501 §5.1.3), or UTF-8
    in Unicode normalization form C (IMAP4rev2, RFC 9051 §5.1: a denormalized name is taken as its NFC form)."""
    raw = arg_bytes(arg)
    if utf8:
        try:
            return unicodedata.normalize("NFC", raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ProtocolError("mailbox name must be UTF-8") from None
    if not raw.isascii():
        raise ProtocolError("mailbox name must be modified UTF-7")
    return decode_mailbox_name(raw.decode("ascii"))


# -- sequence sets --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SequenceSet:
    """RFC 3501 §9 sequence-set; a bound of None is `*` (the largest number in use). A range may run backwards.

    For UIDs, `n:*` with n above every UID still includes the largest one (RFC 3501 §6.4.8).
    """

    ranges: tuple[tuple[int | None, int | None], ...]
    _resolved: dict[int, tuple[tuple[int, int], ...]] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def intervals(self, largest: int) -> tuple[tuple[int, int], ...]:
        """Sorted, merged [low, high] intervals with `*` resolved to `largest` (remembered per `largest`)."""
        cached = self._resolved.get(largest)
        if cached is None:
            if len(self._resolved) > 8:
                self._resolved.clear()
            cached = self._resolved[largest] = self._intervals(largest)
        return cached

    def _intervals(self, largest: int) -> tuple[tuple[int, int], ...]:
        bounds = sorted(
            (min(a, b), max(a, b))
            for a, b in ((largest if lo is None else lo, largest if hi is None else hi) for lo, hi in self.ranges)
        )
        merged: list[tuple[int, int]] = []
        for low, high in bounds:
            if high < 1:
                continue
            low = max(low, 1)
            if merged and low <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], high))
            else:
                merged.append((low, high))
        return tuple(merged)

    def contains(self, number: int, largest: int) -> bool:
        intervals = self.intervals(largest)
        at = bisect.bisect_right(intervals, number, key=lambda interval: interval[0]) - 1
        return at >= 0 and intervals[at][0] <= number <= intervals[at][1]

    def iter(self, values: Sequence[int], largest: int) -> Iterator[int]:
        """The members of `values` (ascending, e.g. the mailbox's UIDs) in the set, ascending."""
        for low, high in self.intervals(largest):
            start = bisect.bisect_left(values, low)
            stop = bisect.bisect_right(values, high)
            yield from values[start:stop]

    def positions(self, values: Sequence[int], largest: int) -> list[tuple[int, int]]:
        """(place from 1, value) of the members of `values` (ascending) in the set: a UID set's messages
        with their sequence numbers, found a range at a time (no search per message)."""
        found: list[tuple[int, int]] = []
        for low, high in self.intervals(largest):
            start = bisect.bisect_left(values, low)
            stop = bisect.bisect_right(values, high)
            found += zip(range(start + 1, stop + 1), values[start:stop], strict=True)
        return found

    def resolve(self, largest: int) -> list[int]:
        """Every number 1..largest in the set, ascending (for message sequence numbers)."""
        return [n for low, high in self.intervals(largest) for n in range(low, min(high, largest) + 1)]

    def exceeds(self, largest: int) -> bool:
        """A sequence number beyond the mailbox (or `*` in an empty one): RFC 3501 §9 wants BAD for those."""
        return any(
            (bound is None and largest == 0) or (bound is not None and bound > largest)
            for pair in self.ranges
            for bound in pair
        )

    def __str__(self) -> str:
        def show(bound: int | None) -> str:
            return "*" if bound is None else str(bound)

        return ",".join(show(lo) if lo == hi else f"{show(lo)}:{show(hi)}" for lo, hi in self.ranges)


def _seq_number(text: str) -> int | None:
    if text == "*":
        return None
    try:
        return parse_number(text, nonzero=True)
    except ProtocolError:
        raise ProtocolError(f"invalid sequence set element {text[:24]!r}") from None


SAVED = "$"  # RFC 5182 SEARCHRES: the sequence set of the last SEARCH RETURN (SAVE), resolved by the session


def parse_sequence_set(text: str) -> SequenceSet:
    """`1,3:5,7:*` (RFC 3501 §9 sequence-set). SEARCHRES `$` (SAVED) is the session's to resolve."""
    if not text:
        raise ProtocolError("empty sequence set")
    ranges: list[tuple[int | None, int | None]] = []
    for element in text.split(","):
        low, colon, high = element.partition(":")
        first = _seq_number(low)
        ranges.append((first, _seq_number(high) if colon else first))
    return SequenceSet(tuple(ranges))


def format_sequence_set(numbers: Iterable[int]) -> str:
    """Numbers as a compact sequence set, `1:3,5` (COPYUID, APPENDUID); empty for none."""
    runs: list[list[int]] = []
    for number in sorted(set(numbers)):
        if runs and number == runs[-1][1] + 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    return ",".join(str(lo) if lo == hi else f"{lo}:{hi}" for lo, hi in runs)


def missing_numbers(wanted: SequenceSet | None, present: Sequence[int], largest: int) -> str:
    """The numbers 1..`largest` in `wanted` (all of them for None) that are not in `present` (ascending),
    as a sequence set: QRESYNC's VANISHED (EARLIER) (RFC 7162 §3.2.5.1, §3.2.6). Gaps are walked, never
    listed one by one, so a mailbox with large UIDs costs what its messages do."""
    if largest < 1:
        return ""
    intervals = wanted.intervals(largest) if wanted is not None else ((1, largest),)
    runs: list[str] = []
    for low, high in intervals:
        high = min(high, largest)
        at = bisect.bisect_left(present, low)
        cursor = low
        while cursor <= high:
            following = present[at] if at < len(present) else high + 1
            if following > cursor:
                end = min(following - 1, high)
                runs.append(str(cursor) if cursor == end else f"{cursor}:{end}")
                cursor = end + 1
            else:
                cursor = following + 1
                at += 1
    return ",".join(runs)


# -- SEARCH RETURN (ESEARCH, RFC 4731; SEARCHRES, RFC 5182) -----------------------------------------------

SEARCH_RETURN_OPTIONS = frozenset({"MIN", "MAX", "ALL", "COUNT", "SAVE"})


@dataclasses.dataclass(frozen=True)
class SearchReturn:
    criteria: list[Arg]  # `[CHARSET name] key...`, what mailnode.imap.search parses
    options: frozenset[str] | None = None  # RETURN's options, upper; None without RETURN (a plain SEARCH answer)


def parse_search_return(args: list[Arg], *, imap4rev2: bool = False) -> SearchReturn:
    """SEARCH's `[RETURN (options)]` before its criteria (RFC 4731 §3.1): `RETURN ()` means ALL. An IMAP4rev2
    session has no SEARCH response: without RETURN it is answered as RETURN (ALL) (RFC 9051 §6.4.4)."""
    if args and isinstance(args[0], Atom) and args[0].value.upper() == "RETURN":
        if len(args) < 2 or not isinstance(args[1], ParenList):
            raise ProtocolError("RETURN needs a list of options")
        options = frozenset(_options(args[1], SEARCH_RETURN_OPTIONS, "search return option"))
        return SearchReturn(args[2:], options or _ALL)
    return SearchReturn(list(args), _ALL if imap4rev2 else None)


_ALL = frozenset({"ALL"})


def saved_numbers(numbers: Sequence[int], options: frozenset[str]) -> list[int]:
    """What SAVE keeps of the result (RFC 5182 §2.4): with MIN and/or MAX but neither ALL nor COUNT, only
    those; else all of it."""
    if not numbers or options & {"ALL", "COUNT"} or not options & {"MIN", "MAX"}:
        return list(numbers)
    kept = {min(numbers)} if "MIN" in options else set()
    return sorted(kept | {max(numbers)} if "MAX" in options else kept)


def format_esearch(
    tag: str, *, uid: bool, numbers: Sequence[int], options: frozenset[str], modseq: int | None = None
) -> str | None:
    """The ESEARCH response (RFC 4731 §3.1) for the result `numbers` (ascending); None when SAVE is the only
    option (RFC 5182 §2.4: no response then). MIN, MAX and ALL are left out for an empty result; MODSEQ
    (RFC 7162 §3.1.5) is the highest of the hits when the criteria used MODSEQ."""
    if options == {"SAVE"}:
        return None
    line = f'* ESEARCH (TAG "{tag}")' + (" UID" if uid else "")
    if numbers and "MIN" in options:
        line += f" MIN {numbers[0]}"
    if numbers and "MAX" in options:
        line += f" MAX {numbers[-1]}"
    if numbers and "ALL" in options:
        line += f" ALL {format_sequence_set(numbers)}"
    if "COUNT" in options:  # after ALL, in Dovecot's order
        line += f" COUNT {len(numbers)}"
    if numbers and modseq is not None:
        line += f" MODSEQ {modseq}"
    return line


# -- FETCH ----------------------------------------------------------------------------------------------

_PLAIN_ATTS = frozenset(
    {
        "UID",
        "FLAGS",
        "INTERNALDATE",
        "RFC822",
        "RFC822.HEADER",
        "RFC822.SIZE",
        "RFC822.TEXT",
        "ENVELOPE",
        "BODY",
        "BODYSTRUCTURE",
        "MODSEQ",  # RFC 7162 §3.1.4.1
    }
)
# RFC 3501 §6.4.5 macros; allowed only alone, never inside a list.
_MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}


@dataclasses.dataclass(frozen=True)
class FetchModifiers:
    changed_since: int | None = None  # RFC 7162 §3.1.4.1 CHANGEDSINCE (the response then includes MODSEQ)
    vanished: bool = False  # RFC 7162 §3.2.6 VANISHED (UID FETCH, with CHANGEDSINCE)


@dataclasses.dataclass(frozen=True)
class FetchRequest:
    sequence_set: SequenceSet
    items: list[FetchAtt]
    modifiers: FetchModifiers


def _fetch_att(arg: Arg) -> FetchAtt:
    if isinstance(arg, FetchAtt):
        return arg
    if isinstance(arg, Atom):
        name = arg.value.upper()
        if name in _PLAIN_ATTS:
            return FetchAtt(name)
        if name in _MACROS:
            raise ProtocolError(f"{name} cannot be used inside a list")
        raise ProtocolError(f"unknown fetch item {arg.value[:32]}")
    raise ProtocolError("expected a fetch item")


def parse_fetch_items(args: list[Arg]) -> list[FetchAtt]:
    """The items of FETCH: `args` are the arguments after the sequence set; the first is a macro (ALL, FAST,
    FULL), one item or a parenthesized list; a second, if present, is the modifier list (`parse_fetch_modifiers`)."""
    if not args:
        raise ProtocolError("missing fetch items")
    if len(args) > 2 or (len(args) == 2 and not isinstance(args[1], ParenList)):
        raise ProtocolError("unexpected arguments after fetch items")
    first = args[0]
    if isinstance(first, Atom) and first.value.upper() in _MACROS:
        return [FetchAtt(name) for name in _MACROS[first.value.upper()]]
    if isinstance(first, ParenList):
        if not first.items:
            raise ProtocolError("empty fetch item list")
        return [_fetch_att(item) for item in first.items]
    return [_fetch_att(first)]


def parse_fetch_modifiers(args: list[Arg]) -> FetchModifiers:
    """The FETCH modifiers: `args` are the arguments after the items, none or one list `(CHANGEDSINCE n [VANISHED])`."""
    if not args:
        return FetchModifiers()
    if len(args) != 1 or not isinstance(args[0], ParenList) or not args[0].items:
        raise ProtocolError("invalid fetch modifiers")
    items = args[0].items
    changed_since: int | None = None
    vanished = False
    at = 0
    while at < len(items):
        name = arg_atom(items[at]).upper()
        if name == "CHANGEDSINCE" and changed_since is None and at + 1 < len(items):
            changed_since = arg_number(items[at + 1], maximum=MODSEQ_MAX)
            at += 2
        elif name == "VANISHED" and not vanished:
            vanished = True
            at += 1
        else:
            raise ProtocolError(f"invalid fetch modifier {name[:32]}")
    if vanished and changed_since is None:
        raise ProtocolError("VANISHED requires CHANGEDSINCE")  # RFC 7162 §3.2.6
    return FetchModifiers(changed_since, vanished)


def parse_fetch(args: list[Arg]) -> FetchRequest:
    """All FETCH arguments: sequence set, items, optional modifiers."""
    if len(args) < 2:
        raise ProtocolError("FETCH needs a sequence set and items")
    return FetchRequest(
        parse_sequence_set(arg_atom(args[0])), parse_fetch_items(args[1:]), parse_fetch_modifiers(args[2:])
    )


# -- flags and STORE ------------------------------------------------------------------------------------

SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
_SYSTEM_BY_UPPER = {flag.upper(): flag for flag in (*SYSTEM_FLAGS, "\\Recent")}
_KEYWORD = re.compile(r"[\x21\x23\x24\x26\x27\x2b-\x5b\x5e-\x7a\x7c-\x7e]+")  # RFC 3501 §9 atom: no % * \ ] { ( ) "


def normalize_flag(flag: str) -> str:
    """System flags in their canonical case (flags are case-insensitive); keywords as they are."""
    return _SYSTEM_BY_UPPER.get(flag.upper(), flag)


def parse_flag(arg: Arg, *, allow_recent: bool = False) -> str:
    """One flag to set (RFC 3501 §9 flag): a system flag (canonical case) or a keyword."""
    if not isinstance(arg, Atom):
        raise ProtocolError("expected a flag")
    text = arg.value
    if text.startswith("\\"):
        flag = _SYSTEM_BY_UPPER.get(text.upper())
        if flag is None or (flag == "\\Recent" and not allow_recent):
            raise ProtocolError(f"invalid flag {text[:32]}")
        return flag
    if _KEYWORD.fullmatch(text) is None:
        raise ProtocolError(f"invalid keyword {text[:32]}")
    return text


def _unique(flags: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    result = []
    for flag in flags:
        if flag.upper() not in seen:
            seen.add(flag.upper())
            result.append(flag)
    return result


def parse_flag_list(arg: Arg) -> list[str]:
    """`(\\Seen $Work)` (RFC 3501 §9 flag-list), duplicates dropped (case-insensitively)."""
    if not isinstance(arg, ParenList):
        raise ProtocolError("expected a parenthesized flag list")
    return _unique(parse_flag(item) for item in arg.items)


@dataclasses.dataclass(frozen=True)
class StoreSpec:
    mode: Literal["+", "-", ""]  # add, remove, replace
    silent: bool
    flags: list[str]
    unchanged_since: int | None = None  # RFC 7162 §3.1.3 UNCHANGEDSINCE


_STORE_ITEM = re.compile(r"([+-]?)FLAGS(\.SILENT)?")


def parse_store(args: list[Arg]) -> StoreSpec:
    """The STORE arguments after the sequence set: `[(UNCHANGEDSINCE n)] [+-]FLAGS[.SILENT] (flags)` or with the
    flags bare, space-separated."""
    at = 0
    unchanged_since = None
    if args and isinstance(args[0], ParenList):
        modifiers = args[0].items
        if len(modifiers) != 2 or arg_atom(modifiers[0]).upper() != "UNCHANGEDSINCE":
            raise ProtocolError("invalid store modifier")
        unchanged_since = arg_number(modifiers[1], maximum=MODSEQ_MAX)
        at = 1
    if at >= len(args) or not isinstance(args[at], Atom):
        raise ProtocolError("missing FLAGS, +FLAGS or -FLAGS")
    item = arg_atom(args[at])
    match = _STORE_ITEM.fullmatch(item.upper())
    if match is None:
        raise ProtocolError(f"unknown store item {item[:32]}")
    rest = args[at + 1 :]
    if len(rest) == 1 and isinstance(rest[0], ParenList):
        flags = parse_flag_list(rest[0])
    elif rest and all(isinstance(flag, Atom) for flag in rest):
        flags = _unique(parse_flag(flag) for flag in rest)
    else:
        raise ProtocolError("expected flags")
    mode: Literal["+", "-", ""] = "+" if match.group(1) == "+" else "-" if match.group(1) == "-" else ""
    return StoreSpec(mode, match.group(2) is not None, flags, unchanged_since)


# -- dates ----------------------------------------------------------------------------------------------

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH_NUMBER = {name.upper(): number for number, name in enumerate(MONTHS, start=1)}
_DATE = re.compile(r"([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})")
_DATE_TIME = re.compile(
    r" ?([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) ([+-])([0-9]{2})([0-9]{2})"
)


def _date(day: str, month: str, year: str) -> datetime.date:
    number = _MONTH_NUMBER.get(month.upper())
    if number is None:
        raise ProtocolError("invalid month")
    try:
        return datetime.date(int(year), number, int(day))
    except ValueError:
        raise ProtocolError("invalid date") from None


def parse_date(text: str) -> datetime.date:
    """RFC 3501 §9 date-text for SEARCH: `1-Feb-1994`."""
    match = _DATE.fullmatch(text)
    if match is None:
        raise ProtocolError("invalid date, expected d-Mon-yyyy")
    return _date(*match.groups())


def parse_datetime(text: str) -> datetime.datetime:
    """RFC 3501 §9 date-time for APPEND, unquoted: `17-Jul-1996 02:44:25 -0700` (day may be space-padded)."""
    match = _DATE_TIME.fullmatch(text)
    if match is None:
        raise ProtocolError("invalid date-time, expected dd-Mon-yyyy hh:mm:ss +zzzz")
    day, month, year, hour, minute, second, sign, zone_hours, zone_minutes = match.groups()
    date = _date(day, month, year)
    if int(zone_minutes) > 59 or int(zone_hours) > 23:
        raise ProtocolError("invalid time zone")
    offset = datetime.timedelta(hours=int(zone_hours), minutes=int(zone_minutes))
    try:
        return datetime.datetime.combine(
            date,
            datetime.time(int(hour), int(minute), int(second)),
            datetime.timezone(-offset if sign == "-" else offset),
        )
    except ValueError:
        raise ProtocolError("invalid time") from None


def format_datetime(dt: datetime.datetime) -> str:
    """INTERNALDATE text, `17-Jul-1996 02:44:25 -0700`; a naive datetime is taken as UTC."""
    offset = dt.utcoffset() or datetime.timedelta(0)
    minutes = round(offset.total_seconds() / 60)
    sign = "-" if minutes < 0 else "+"
    hours, minutes = divmod(abs(minutes), 60)
    return f"{dt.day:02d}-{MONTHS[dt.month - 1]}-{dt.year:04d} {dt:%H:%M:%S} {sign}{hours:02d}{minutes:02d}"


# -- mailbox names --------------------------------------------------------------------------------------

INBOX = "INBOX"
_MUTF7_BASE64 = re.compile(r"[A-Za-z0-9+,]+")


def encode_mailbox_name(name: str) -> str:
    """Modified UTF-7 (RFC 3501 §5.1.3): printable ASCII as itself (`&` as `&-`), the rest as `&<base64>-`."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            try:
                raw = "".join(pending).encode("utf-16-be")
            except UnicodeEncodeError:
                raise ProtocolError("invalid mailbox name") from None
            out.append("&" + base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out)


def command_tag(line: bytes) -> str:
    """The tag a command line opens with, for a reply made before the command is parsed; `*` (untagged)
    when its first word is no tag a reply may carry (RFC 3501 §9 tag: ASTRING-CHAR except "+")."""
    word = line.split(b" ", 1)[0]
    return word.decode("ascii") if _TAG.fullmatch(word) else "*"


def seven_bit(text: str) -> str:
    """A status line's text as RFC 3501 §9 allows it (TEXT-CHAR: 7-bit, no CR, LF or NUL): what is not
    printable ASCII, such as a folder name the store echoes, written in modified UTF-7 (§5.1.3), as the
    client wrote the name."""
    return text if all(0x20 <= ord(char) <= 0x7E for char in text) else encode_mailbox_name(text)


def decode_mailbox_name(text: str) -> str:
    """The name a modified UTF-7 mailbox name stands for; refuses anything RFC 3501 §5.1.3 does not allow: non-ASCII,
    unterminated or non-canonical shifts, null shifts (`-&`), printable ASCII in base64, broken UTF-16."""
    out: list[str] = []
    at = 0
    after_shift = False
    while at < len(text):
        char = text[at]
        if not 0x20 <= ord(char) <= 0x7E:
            raise ProtocolError("mailbox name must be printable ASCII (modified UTF-7)")
        if char != "&":
            out.append(char)
            at += 1
            after_shift = False
            continue
        end = text.find("-", at + 1)
        if end < 0:
            raise ProtocolError("unterminated & in mailbox name")
        if end == at + 1:
            out.append("&")
            at = end + 1
            after_shift = False
            continue
        encoded = text[at + 1 : end]
        if after_shift or _MUTF7_BASE64.fullmatch(encoded) is None:
            raise ProtocolError("invalid modified UTF-7 in mailbox name")
        standard = encoded.replace(",", "/")
        try:
            raw = base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
            if base64.b64encode(raw).decode("ascii").rstrip("=") != standard:
                raise ValueError("not canonical")  # stray bits, or a length base64 cannot produce
            decoded = raw.decode("utf-16-be")
        except ValueError:
            raise ProtocolError("invalid modified UTF-7 in mailbox name") from None
        if any(0x20 <= ord(c) <= 0x7E for c in decoded):
            raise ProtocolError("invalid modified UTF-7 in mailbox name")
        out.append(decoded)
        at = end + 1
        after_shift = True
    return "".join(out)


def normalize_mailbox(name: str, delimiter: str = "/") -> str:
    """INBOX in any case (RFC 3501 §5.1), and as the first level of its children, becomes `INBOX`."""
    head, sep, rest = name.partition(delimiter) if delimiter else (name, "", "")
    if head.isascii() and head.upper() == INBOX:
        return INBOX + sep + rest
    return name


def mailbox_matches(pattern: str, name: str, delimiter: str = "/") -> bool:
    """RFC 3501 §6.3.8 LIST matching: `*` matches anything, `%` anything but the delimiter. Case-sensitive, except
    that a name's leading INBOX matches in any case."""
    name = normalize_mailbox(name, delimiter)
    fold = len(INBOX) if name == INBOX or (delimiter and name.startswith(INBOX + delimiter)) else 0

    def same(p: str, index: int) -> bool:
        if index < fold:
            return p.isascii() and p.upper() == name[index]
        return p == name[index]

    # Dynamic programming over name positions: linear in len(pattern) * len(name), whatever the wildcards.
    reachable = [True] + [False] * len(name)
    for p in pattern:
        if p == "*":
            for index in range(1, len(name) + 1):
                reachable[index] = reachable[index] or reachable[index - 1]
        elif p == "%":
            for index in range(1, len(name) + 1):
                reachable[index] = reachable[index] or (reachable[index - 1] and name[index - 1] != delimiter)
        else:
            for index in range(len(name), 0, -1):
                reachable[index] = reachable[index - 1] and same(p, index - 1)
            reachable[0] = False
        if not any(reachable):
            return False
    return reachable[len(name)]


# -- LIST, LSUB, STATUS, SELECT, APPEND -----------------------------------------------------------------

_SELECTION_OPTIONS = frozenset({"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"})  # RFC 5258, RFC 6154
_RETURN_OPTIONS = frozenset({"SUBSCRIBED", "CHILDREN", "SPECIAL-USE", "STATUS"})  # RFC 5258, 6154, 5819
STATUS_ITEMS = frozenset({"MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "HIGHESTMODSEQ", "SIZE"})
STATUS_ITEMS_REV2 = STATUS_ITEMS | {"DELETED"}  # RFC 9051 §6.3.11: the \Deleted messages; not IMAP4rev1's


@dataclasses.dataclass(frozen=True)
class ListRequest:
    reference: str  # decoded, as sent
    patterns: list[str]  # decoded, wildcards kept; empty patterns left out, so [] for `LIST "" ""`
    selection: frozenset[str] = frozenset()  # upper: SUBSCRIBED REMOTE RECURSIVEMATCH SPECIAL-USE
    returns: frozenset[str] = frozenset()  # return options, upper: SUBSCRIBED CHILDREN SPECIAL-USE STATUS
    status_items: list[str] = dataclasses.field(default_factory=list)  # RFC 5819 RETURN (STATUS (...))
    extended: bool = False  # LIST-EXTENDED syntax used (selection options, several patterns or RETURN)

    @property
    def delimiter_query(self) -> bool:
        """`LIST "" ""`: the client asks for the hierarchy delimiter (RFC 3501 §6.3.8)."""
        return not self.patterns

    def matches(self, name: str, delimiter: str = "/") -> bool:
        """Whether `name` is selected by any pattern, each taken after the reference (plain concatenation)."""
        return any(mailbox_matches(self.reference + pattern, name, delimiter) for pattern in self.patterns)


def _options(arg: Arg, allowed: frozenset[str], what: str) -> list[str]:
    if not isinstance(arg, ParenList):
        raise ProtocolError(f"expected a list of {what}")
    options = [arg_atom(item).upper() for item in arg.items]
    for option in options:
        if option not in allowed:
            raise ProtocolError(f"unknown {what} {option[:32]}")
    return options


def parse_list_args(args: list[Arg], *, extended: bool = True, imap4rev2: bool = False) -> ListRequest:
    """LIST (RFC 3501 §6.3.8; RFC 5258 `[(selection)] reference pattern(s) [RETURN (options)]`) or, with
    extended=False, LSUB's plain `reference pattern`. `imap4rev2`: names in UTF-8, STATUS with DELETED."""
    at = 0
    selection: list[str] = []
    if extended and args and isinstance(args[0], ParenList):
        selection = _options(args[0], _SELECTION_OPTIONS, "selection option")
        if set(selection) == {"RECURSIVEMATCH"}:
            raise ProtocolError("RECURSIVEMATCH needs another selection option")  # RFC 5258 §3.1
        at = 1
    if len(args) < at + 2:
        raise ProtocolError("LIST needs a reference and a mailbox pattern")
    reference = _mailbox_text(args[at], utf8=imap4rev2)
    target = args[at + 1]
    if extended and isinstance(target, ParenList):
        if not target.items:
            raise ProtocolError("empty pattern list")
        patterns = [_mailbox_text(item, utf8=imap4rev2) for item in target.items]
    else:
        patterns = [_mailbox_text(target, utf8=imap4rev2)]
    rest = args[at + 2 :]
    return_options: set[str] = set()
    status_items: list[str] = []
    if rest:
        if not extended or len(rest) != 2 or arg_atom(rest[0]).upper() != "RETURN":
            raise ProtocolError("unexpected arguments after the mailbox pattern")
        options = rest[1]
        if not isinstance(options, ParenList):
            raise ProtocolError("expected a list of return options")
        items = options.items
        at_option = 0
        while at_option < len(items):
            option = arg_atom(items[at_option]).upper()
            if option not in _RETURN_OPTIONS:
                raise ProtocolError(f"unknown return option {option[:32]}")
            if option == "STATUS":
                if at_option + 1 >= len(items):
                    raise ProtocolError("STATUS needs a list of items")
                status_items = _status_items(items[at_option + 1], imap4rev2=imap4rev2)
                at_option += 1
            return_options.add(option)
            at_option += 1
    # RFC 5258 §3.1 and RFC 6154 §3: these selection options imply the return option of the same name.
    return_options.update(option for option in selection if option in ("SUBSCRIBED", "SPECIAL-USE"))
    return ListRequest(
        reference,
        [pattern for pattern in patterns if pattern],
        frozenset(selection),
        frozenset(return_options),
        status_items,
        extended=at == 1 or isinstance(target, ParenList) or bool(rest),
    )


def _status_items(arg: Arg, *, imap4rev2: bool) -> list[str]:
    items = _options(arg, STATUS_ITEMS_REV2 if imap4rev2 else STATUS_ITEMS, "status item")
    if not items:
        raise ProtocolError("empty status item list")
    return list(dict.fromkeys(items))


@dataclasses.dataclass(frozen=True)
class StatusRequest:
    mailbox: str
    items: list[str]  # upper, in the client's order, without duplicates


def parse_status(args: list[Arg], *, imap4rev2: bool = False) -> StatusRequest:
    """STATUS mailbox (items) (RFC 3501 §6.3.10; HIGHESTMODSEQ RFC 7162, SIZE RFC 8438; DELETED and UTF-8
    names for an IMAP4rev2 session, RFC 9051 §6.3.11)."""
    if len(args) != 2:
        raise ProtocolError("STATUS needs a mailbox and a list of items")
    return StatusRequest(mailbox_arg(args[0], utf8=imap4rev2), _status_items(args[1], imap4rev2=imap4rev2))


@dataclasses.dataclass(frozen=True)
class Qresync:
    """SELECT's QRESYNC parameter (RFC 7162 §3.2.5): what the client knew of the folder."""

    uidvalidity: int
    modseq: int
    known_uids: SequenceSet | None = None  # None: every UID below UIDNEXT


@dataclasses.dataclass(frozen=True)
class SelectRequest:
    mailbox: str
    condstore: bool = False  # RFC 7162 §3.1.8 SELECT ... (CONDSTORE)
    qresync: Qresync | None = None  # RFC 7162 §3.2.5 SELECT ... (QRESYNC (...))


def parse_select(args: list[Arg], *, utf8: bool = False) -> SelectRequest:
    """SELECT or EXAMINE mailbox [(CONDSTORE | QRESYNC (uidvalidity modseq [known-uids [seq-match]]))].
    The sequence match data is accepted and not used: the VANISHED answer covers every known UID.
    `utf8`: an IMAP4rev2 session's name (`mailbox_arg`)."""
    if not 1 <= len(args) <= 2:
        raise ProtocolError("SELECT needs a mailbox")
    condstore = False
    qresync = None
    if len(args) == 2:
        if not isinstance(args[1], ParenList):
            raise ProtocolError("expected a list of select parameters")
        items = args[1].items
        at = 0
        while at < len(items):
            name = arg_atom(items[at]).upper()
            if name == "CONDSTORE" and not condstore:
                condstore = True
                at += 1
            elif name == "QRESYNC" and qresync is None and at + 1 < len(items):
                qresync = _qresync(items[at + 1])
                at += 2
            else:
                raise ProtocolError(f"invalid select parameter {name[:32]}")
    return SelectRequest(mailbox_arg(args[0], utf8=utf8), condstore, qresync)


def _qresync(arg: Arg) -> Qresync:
    if not isinstance(arg, ParenList) or not 2 <= len(arg.items) <= 4:
        raise ProtocolError("QRESYNC needs (uidvalidity modseq [known-uids [seq-match]])")
    items = arg.items
    uidvalidity = arg_number(items[0], nonzero=True)
    modseq = arg_number(items[1], maximum=MODSEQ_MAX, nonzero=True)
    known = None
    if len(items) >= 3:
        if isinstance(items[2], ParenList):
            raise ProtocolError("QRESYNC's known UIDs come before the sequence match data")
        known = parse_sequence_set(arg_atom(items[2]))
    if len(items) == 4 and (not isinstance(items[3], ParenList) or len(items[3].items) != 2):
        raise ProtocolError("invalid QRESYNC sequence match data")
    return Qresync(uidvalidity, modseq, known)


@dataclasses.dataclass(frozen=True)
class AppendRequest:
    mailbox: str
    flags: list[str]
    internal_date: datetime.datetime | None
    message: bytes
    binary: bool = False  # sent as RFC 3516 literal8


def parse_append(args: list[Arg], *, utf8: bool = False) -> AppendRequest:
    """APPEND mailbox [(flags)] ["date-time"] literal (RFC 3501 §6.3.11); `utf8`: as for `mailbox_arg`."""
    if not 2 <= len(args) <= 4:
        raise ProtocolError("APPEND needs a mailbox and a message")
    message = args[-1]
    if not isinstance(message, String):
        raise ProtocolError("the message must be a literal")
    middle = args[1:-1]
    flags: list[str] = []
    internal_date = None
    if middle and isinstance(middle[0], ParenList):
        flags = parse_flag_list(middle.pop(0))
    if middle and isinstance(date := middle[0], String):
        internal_date = parse_datetime(date.value.decode("ascii", "replace"))
        middle.pop(0)
    if middle:
        raise ProtocolError("expected flags or a date-time before the message")
    return AppendRequest(mailbox_arg(args[0], utf8=utf8), flags, internal_date, message.value, message.literal8)


# -- formatting -----------------------------------------------------------------------------------------

_NEEDS_LITERAL = re.compile(rb"[\x00\r\n\x80-\xff]")
_NEEDS_LITERAL_UTF8 = re.compile(rb"[\x00\r\n]")  # RFC 9051 §9 QUOTED-CHAR: UTF-8 may be quoted in IMAP4rev2
_ASTRING_ATOM = re.compile(rb"[\x21\x23\x24\x26\x27\x2b-\x5b\x5d-\x7a\x7c-\x7e]+")  # RFC 3501 §9 ASTRING-CHAR


def quote(value: str | bytes | None, *, utf8: bool = False) -> bytes:
    """NIL, a quoted string, or a literal `{n}\\r\\n...` for values with CR, LF, NUL, 8-bit data or great length;
    with `utf8` (an IMAP4rev2 session, and `value` valid UTF-8) 8-bit data is quoted too."""
    if value is None:
        return b"NIL"
    data = value.encode("utf-8") if isinstance(value, str) else value
    if len(data) > QUOTED_MAX or (_NEEDS_LITERAL_UTF8 if utf8 else _NEEDS_LITERAL).search(data):
        return b"{%d}\r\n" % len(data) + data
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def format_astring(value: str | bytes) -> bytes:
    """An atom when the value is one (and not NIL), else `quote(value)`."""
    data = value.encode("utf-8") if isinstance(value, str) else value
    if _ASTRING_ATOM.fullmatch(data) and data.upper() != b"NIL":
        return data
    return quote(data)


def format_mailbox(encoded: str) -> bytes:
    """A mailbox name for a response, given in its wire form (`encode_mailbox_name`): an atom where possible
    (`INBOX`, `&AMk-t&AOk-`), else quoted (`"My Folder"`, `""`)."""
    return format_astring(encoded)


def format_mailbox_name(name: str, *, utf8: bool) -> bytes:
    """A folder's name for a response: in modified UTF-7 (IMAP4rev1), or with `utf8` (an IMAP4rev2 session,
    RFC 9051 §5.1) as the UTF-8 it is, quoted when it is not plain ASCII."""
    if not utf8:
        return format_mailbox(encode_mailbox_name(name))
    return format_astring(name) if name.isascii() else quote(name, utf8=True)


def format_flags(flags: Iterable[str]) -> bytes:
    """`(\\Seen \\Answered)`, in the order given."""
    return b"(" + b" ".join(flag.encode("ascii") for flag in flags) + b")"
