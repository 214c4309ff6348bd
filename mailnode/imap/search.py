"""IMAP SEARCH (RFC 3501 §6.4.4, MODSEQ from RFC 7162 §3.1.5): the criteria parsed into a tree, and that tree
evaluated against one message.

Pure: `mailnode.imap.commands.search` parses a SEARCH or UID SEARCH once with `parse_search`, asks `needs_content`
whether message files must be read at all, and calls `evaluate` for each message through a `SearchTarget` it
implements.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, Protocol, TypeAlias, assert_never

from mailnode.imap import mime, protocol
from mailnode.imap.protocol import Arg, ProtocolError

MAX_DEPTH = 100  # NOT, OR and parentheses nested in one search; the parser and evaluator recurse once per level


class BadCharset(ProtocolError):
    """CHARSET names a charset we do not search in; answered `NO [BADCHARSET (<supported>)]` (RFC 3501 §6.4.4),
    not BAD, so the server must catch this before ProtocolError."""

    def __init__(self, charset: str, supported: tuple[str, ...]) -> None:
        super().__init__(f"unsupported charset {charset[:32]}")
        self.supported = supported


# -- the tree -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class All:
    pass


@dataclasses.dataclass(frozen=True)
class Flag:
    """ANSWERED/UNANSWERED ... KEYWORD/UNKEYWORD, RECENT/OLD: `flag` set (present) or not set."""

    flag: str
    present: bool = True


@dataclasses.dataclass(frozen=True)
class Header:
    """HEADER field string, and FROM, TO, CC, BCC, SUBJECT (as HEADER on that field)."""

    field: str
    value: str


@dataclasses.dataclass(frozen=True)
class Body:
    value: str


@dataclasses.dataclass(frozen=True)
class Text:
    value: str


DateOp: TypeAlias = Literal["before", "on", "since"]


@dataclasses.dataclass(frozen=True)
class InternalDate:
    """BEFORE, ON, SINCE."""

    op: DateOp
    date: datetime.date


@dataclasses.dataclass(frozen=True)
class SentDate:
    """SENTBEFORE, SENTON, SENTSINCE (the Date header; the internal date when there is none)."""

    op: DateOp
    date: datetime.date


@dataclasses.dataclass(frozen=True)
class Size:
    """LARGER (op "larger": size > n) and SMALLER (size < n)."""

    op: Literal["larger", "smaller"]
    size: int


@dataclasses.dataclass(frozen=True)
class SequenceNumbers:
    numbers: protocol.SequenceSet


@dataclasses.dataclass(frozen=True)
class Uid:
    uids: protocol.SequenceSet


@dataclasses.dataclass(frozen=True)
class ModSeq:
    """MODSEQ [entry type] n: messages whose mod-sequence is n or higher (RFC 7162 §3.1.5). The entry name is
    accepted and ignored: one mod-sequence per message serves every flag."""

    value: int


@dataclasses.dataclass(frozen=True)
class Not:
    key: SearchKey


@dataclasses.dataclass(frozen=True)
class Or:
    left: SearchKey
    right: SearchKey


@dataclasses.dataclass(frozen=True)
class And:
    """A parenthesized group or several keys side by side (RFC 3501: all must match)."""

    keys: tuple[SearchKey, ...]
    # The same keys, those that need no reading first: a flag or UID mismatch spares the message file.
    cheap_first: tuple[SearchKey, ...] = dataclasses.field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        ordered = sorted(self.keys, key=needs_content)  # stable: False (cheap) before True
        object.__setattr__(self, "cheap_first", tuple(ordered))


SearchKey: TypeAlias = (
    All | Flag | Header | Body | Text | InternalDate | SentDate | Size | SequenceNumbers | Uid | ModSeq | Not | Or | And
)


class SearchTarget(Protocol):
    """One message, as the server shows it to `evaluate`. Content methods are called only when `needs_content`."""

    @property
    def seq(self) -> int: ...
    @property
    def uid(self) -> int: ...
    @property
    def flags(self) -> frozenset[str]: ...  # with \Recent when the message is recent to this session
    @property
    def size(self) -> int: ...  # RFC822.SIZE
    @property
    def internal_date(self) -> datetime.datetime: ...
    @property
    def modseq(self) -> int: ...
    @property
    def largest_seq(self) -> int: ...  # what `*` means in a sequence set
    @property
    def largest_uid(self) -> int: ...  # what `*` means in a UID set

    def header(self, name: str) -> str | None:
        """The named header's value, unfolded and decoded (several occurrences joined); None when absent."""
        ...

    def headers_text(self) -> str:
        """The message's header and its parts' (MIME headers), decoded: what TEXT looks in besides the body."""
        ...

    def body_text(self) -> str:
        """The text of the body parts, decoded."""
        ...

    def sent_date(self) -> datetime.date | None:
        """The Date header's date (in its own zone); None when absent or unparseable."""
        ...


# -- questions about a tree -----------------------------------------------------------------------------


def walk(key: SearchKey) -> Iterator[SearchKey]:
    """Every key of the tree, `key` first."""
    stack = [key]
    while stack:
        node = stack.pop()
        yield node
        match node:
            case Not(inner):
                stack.append(inner)
            case Or(left, right):
                stack.extend((left, right))
            case And(keys):
                stack.extend(keys)


def needs_content(key: SearchKey) -> bool:
    """Whether evaluating needs the message itself (headers or body), not just flags, UID, size and dates."""
    return any(isinstance(node, Header | Body | Text | SentDate) for node in walk(key))


def needs_body(key: SearchKey) -> bool:
    """Whether evaluating needs the body text (BODY, TEXT), not only the header."""
    return any(isinstance(node, Body | Text) for node in walk(key))


def header_fields(key: SearchKey) -> frozenset[str] | None:
    """The header fields (lower case) a search reads, or None when it needs more than single fields
    (the body, or the whole header for TEXT)."""
    fields: set[str] = set()
    for node in walk(key):
        if isinstance(node, Body | Text):
            return None
        if isinstance(node, Header):
            fields.add(node.field.lower())
        elif isinstance(node, SentDate):
            fields.add("date")
    return frozenset(fields)


def referenced_modseq(key: SearchKey) -> bool:
    """Whether MODSEQ was used: the response must then end with (MODSEQ <highest>) (RFC 7162 §3.1.5)."""
    return any(isinstance(node, ModSeq) for node in walk(key))


# -- parsing --------------------------------------------------------------------------------------------

_FLAG_KEYS: dict[str, SearchKey] = {
    "ANSWERED": Flag("\\Answered"),
    "DELETED": Flag("\\Deleted"),
    "DRAFT": Flag("\\Draft"),
    "FLAGGED": Flag("\\Flagged"),
    "SEEN": Flag("\\Seen"),
    "RECENT": Flag("\\Recent"),
    "UNANSWERED": Flag("\\Answered", present=False),
    "UNDELETED": Flag("\\Deleted", present=False),
    "UNDRAFT": Flag("\\Draft", present=False),
    "UNFLAGGED": Flag("\\Flagged", present=False),
    "UNSEEN": Flag("\\Seen", present=False),
    "OLD": Flag("\\Recent", present=False),
    "NEW": And((Flag("\\Recent"), Flag("\\Seen", present=False))),  # RFC 3501: RECENT UNSEEN
    "ALL": All(),
}
_HEADER_KEYS = {"BCC": "Bcc", "CC": "Cc", "FROM": "From", "SUBJECT": "Subject", "TO": "To"}
_DATE_KEYS: dict[str, tuple[bool, DateOp]] = {  # name: (sent date, comparison)
    "BEFORE": (False, "before"),
    "ON": (False, "on"),
    "SINCE": (False, "since"),
    "SENTBEFORE": (True, "before"),
    "SENTON": (True, "on"),
    "SENTSINCE": (True, "since"),
}
_MODSEQ_ENTRY_TYPES = frozenset({"PRIV", "SHARED", "ALL"})  # RFC 7162 §7 entry-type-req


class _Parser:
    def __init__(self, args: list[Arg], *, codec: str = "utf-8", saved: Sequence[int] = ()) -> None:
        self._args = args
        self._at = 0
        self.codec = codec  # what the search strings are in (dates, flags and field names are ASCII)
        self.saved = saved  # the UIDs `$` stands for (RFC 5182 SEARCHRES)

    def saved_key(self) -> SearchKey:
        if not self.saved:
            return Not(All())
        return Uid(protocol.parse_sequence_set(protocol.format_sequence_set(self.saved)))

    def done(self) -> bool:
        return self._at >= len(self._args)

    def take(self, what: str) -> Arg:
        if self.done():
            raise ProtocolError(f"missing {what}")
        arg = self._args[self._at]
        self._at += 1
        return arg

    def text(self, what: str) -> str:
        return protocol.arg_text(self.take(what))

    def string(self, what: str) -> str:
        """A search string, in the charset CHARSET named."""
        if self.codec == "utf-8":
            return self.text(what)
        try:
            return protocol.arg_bytes(self.take(what)).decode(self.codec)
        except UnicodeDecodeError:
            raise ProtocolError(f"{what} is not valid in the charset named") from None

    def keys(self, depth: int) -> list[SearchKey]:
        keys = []
        while not self.done():
            keys.append(self.key(depth))
        return keys

    def key(self, depth: int) -> SearchKey:
        if depth >= MAX_DEPTH:
            raise ProtocolError("search criteria nested too deeply")
        arg = self.take("search key")
        if isinstance(arg, protocol.ParenList):
            group = _Parser(arg.items, codec=self.codec, saved=self.saved).keys(depth + 1)
            if not group:
                raise ProtocolError("empty search group")
            return group[0] if len(group) == 1 else And(tuple(group))
        if not isinstance(arg, protocol.Atom):
            raise ProtocolError("expected a search key")
        word = arg.value
        name = word.upper()
        if word == protocol.SAVED:
            return self.saved_key()
        if word[:1].isdigit() or word[:1] == "*":
            return SequenceNumbers(protocol.parse_sequence_set(word))
        if name in _FLAG_KEYS:
            return _FLAG_KEYS[name]
        if name in _HEADER_KEYS:
            return Header(_HEADER_KEYS[name], self.string(f"{name} string"))
        if name in _DATE_KEYS:
            sent, op = _DATE_KEYS[name]
            date = protocol.parse_date(self.text(f"{name} date"))
            return SentDate(op, date) if sent else InternalDate(op, date)
        if name == "HEADER":
            field = protocol.arg_text(self.take("header field name"))
            if not field or not field.isascii() or not field.isprintable() or ":" in field or " " in field:
                raise ProtocolError("invalid header field name")
            return Header(field, self.string("HEADER string"))
        if name in ("KEYWORD", "UNKEYWORD"):
            keyword = protocol.parse_flag(self.take(f"{name} flag"))
            if keyword.startswith("\\"):
                raise ProtocolError(f"{name} takes a keyword, not a system flag")
            return Flag(keyword, present=name == "KEYWORD")
        if name in ("LARGER", "SMALLER"):
            size = protocol.arg_number(self.take(f"{name} size"))
            return Size("larger" if name == "LARGER" else "smaller", size)
        if name == "BODY":
            return Body(self.string("BODY string"))
        if name == "TEXT":
            return Text(self.string("TEXT string"))
        if name == "UID":
            uids = protocol.arg_atom(self.take("UID set"))
            return self.saved_key() if uids == protocol.SAVED else Uid(protocol.parse_sequence_set(uids))
        if name == "NOT":
            return Not(self.key(depth + 1))
        if name == "OR":
            left = self.key(depth + 1)
            return Or(left, self.key(depth + 1))
        if name == "MODSEQ":
            return self.modseq()
        raise ProtocolError(f"unknown search key {word[:32]}")

    def modseq(self) -> ModSeq:
        # RFC 7162 §7: "MODSEQ" [SP entry-name SP entry-type-req] SP mod-sequence-valzer
        arg = self.take("MODSEQ value")
        if isinstance(arg, protocol.String):
            if not arg.value.lower().startswith(b"/flags/"):
                raise ProtocolError("invalid MODSEQ entry name")
            if protocol.arg_atom(self.take("MODSEQ entry type")).upper() not in _MODSEQ_ENTRY_TYPES:
                raise ProtocolError("invalid MODSEQ entry type")
            arg = self.take("MODSEQ value")
        return ModSeq(protocol.arg_number(arg, maximum=protocol.MODSEQ_MAX))


def parse_search(args: list[Arg], *, saved: Sequence[int] = ()) -> SearchKey:
    """The arguments of SEARCH or UID SEARCH: `[CHARSET name] key...`. RFC 3501 §6.4.4: the search strings
    are in that charset, one of mime.TEXT_CHARSETS (the charsets messages are decoded from), else BadCharset;
    without CHARSET they are read as UTF-8 (US-ASCII is a subset). `saved`: the UIDs `$` stands for."""
    parser = _Parser(args, saved=saved)
    if args and isinstance(args[0], protocol.Atom) and args[0].value.upper() == "CHARSET":
        parser.take("CHARSET")
        charset = parser.text("charset name")
        codec = mime.text_codec(charset)
        if codec is None:
            raise BadCharset(charset, mime.TEXT_CHARSETS)
        parser.codec = codec
    keys = parser.keys(0)
    if not keys:
        raise ProtocolError("missing search criteria")
    return keys[0] if len(keys) == 1 else And(tuple(keys))


# -- evaluation -----------------------------------------------------------------------------------------


class _Message:
    """The target, with its texts case-folded once per evaluation."""

    def __init__(self, target: SearchTarget) -> None:
        self.target = target
        self._folded: dict[str, str | None] = {}
        self._flags: frozenset[str] | None = None

    def _fold(self, key: str, read: Callable[[], str | None]) -> str | None:
        if key not in self._folded:
            text = read()
            self._folded[key] = None if text is None else text.casefold()
        return self._folded[key]

    def header(self, name: str) -> str | None:
        return self._fold("header:" + name.lower(), lambda: self.target.header(name))

    def headers_text(self) -> str:
        return self._fold("headers", self.target.headers_text) or ""

    def body_text(self) -> str:
        return self._fold("body", self.target.body_text) or ""

    def has_flag(self, flag: str) -> bool:
        flags = self.target.flags
        if flag in flags:
            return True
        if self._flags is None:
            self._flags = frozenset(f.lower() for f in flags)
        return flag.lower() in self._flags  # flags and keywords compare case-insensitively


def _compare_date(op: DateOp, value: datetime.date, wanted: datetime.date) -> bool:
    if op == "before":
        return value < wanted
    if op == "on":
        return value == wanted
    return value >= wanted


def _matches(key: SearchKey, message: _Message) -> bool:
    target = message.target
    match key:
        case All():
            return True
        case Flag(flag, present):
            return message.has_flag(flag) == present
        case Header(field, value):
            # RFC 3501 §6.4.4: a case-insensitive substring; HEADER with "" matches every message with the field.
            text = message.header(field)
            return text is not None and value.casefold() in text
        case Body(value):
            return value.casefold() in message.body_text()
        case Text(value):
            wanted = value.casefold()
            return wanted in message.headers_text() or wanted in message.body_text()
        case InternalDate(op, date):
            # RFC 3501 §6.4.4: dates compare "disregarding time and timezone": the date as stamped.
            return _compare_date(op, target.internal_date.date(), date)
        case SentDate(op, date):
            sent = target.sent_date()
            return _compare_date(op, sent if sent is not None else target.internal_date.date(), date)
        case Size(op, size):
            return target.size > size if op == "larger" else target.size < size
        case SequenceNumbers(numbers):
            return numbers.contains(target.seq, target.largest_seq)
        case Uid(uids):
            return uids.contains(target.uid, target.largest_uid)
        case ModSeq(value):
            return target.modseq >= value
        case Not(inner):
            return not _matches(inner, message)
        case Or(left, right):
            return _matches(left, message) or _matches(right, message)
        case And():
            return all(_matches(k, message) for k in key.cheap_first)
        case _:
            assert_never(key)


def evaluate(key: SearchKey, message: SearchTarget) -> bool:
    """Whether `message` matches the criteria."""
    return _matches(key, _Message(message))
