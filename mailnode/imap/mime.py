"""Message structure for the IMAP server: where each MIME part of a stored message lies, and the ENVELOPE,
BODY and BODYSTRUCTURE replies. `analyze` parses a message once (the server caches `Analysis.to_json` in
its index); `section` cuts BODY[<section>] out of the stored bytes; `header_value`, `headers_for_search`
and `text_for_search` serve SEARCH.

Pure: bytes in, bytes out, nothing raises on a broken message. Offsets come from scanning the raw bytes
for the end of each header and for boundary lines (RFC 2046 §5.1.1), as mox does (message/part.go); the
email package parses parameters (with RFC 2231), addresses and encoded words (RFC 2047).
"""

from __future__ import annotations

import binascii
import codecs
import dataclasses
import email.header
import email.message
import email.utils
import functools
import json
import re
import urllib.parse
from collections.abc import Iterator, Sequence

# Hostile input must not make us recurse or allocate without bound; the same limits as Dovecot's
# message parser (100 levels, 10000 parts). Past them, an entity is read as text/plain.
MAX_DEPTH = 100
MAX_PARTS = 10_000

# An address list is cut after this many entries: getaddresses takes seconds over a hostile megabyte.
MAX_ADDRESSES = 1000
# Strings longer than this go out as literals rather than quoted strings.
_QUOTED_MAX = 1000
# The email package's parameter parser is quadratic in the number of ";"; no honest Content-Type is longer.
_PARAMS_MAX = 8192
_JSON_VERSION = 2  # 2: repeated address fields merged, MISSING_DOMAIN, Dovecot's line counts (1 is redone)


_BARE_LF = re.compile(rb"(?<!\r)\n")


class LineEnds:
    """A message's bytes as IMAP stores them: every bare LF made CRLF (RFC 5322 §2.1: lines end in CRLF;
    RFC 3501 §6.3.11 APPENDs a message in that form, and Dovecot stores and serves a bare-LF APPEND with
    CRLF, its RFC822.SIZE counting them). Fed chunk by chunk (a streamed APPEND), it remembers whether
    the last chunk ended in CR so a CRLF split between two chunks stays one line end."""

    def __init__(self) -> None:
        self._after_cr = False

    def convert(self, chunk: bytes) -> bytes:
        if not chunk:
            return chunk
        converted = _BARE_LF.sub(b"\r\n", chunk)
        if self._after_cr and chunk.startswith(b"\n"):
            converted = converted[1:]  # that LF ended the CR of the last chunk: it was no bare LF
        self._after_cr = chunk.endswith(b"\r")
        return converted


def crlf(message: bytes) -> bytes:
    """The whole message with CRLF line ends (see LineEnds)."""
    return LineEnds().convert(message)


@dataclasses.dataclass(frozen=True)
class Part:
    """One MIME entity. Offsets are into the whole message: [header_start, body_start) is the header,
    including the empty line that ends it; [body_start, end) is the body. `parts` holds a multipart's
    children, or for message/rfc822 exactly one: the encapsulated message."""

    header_start: int
    body_start: int
    end: int
    content_type: str = "text/plain"  # lowercased type/subtype, as interpreted (broken multipart: text/plain)
    charset: str | None = None  # lowercased charset parameter, as declared
    encoding: str = "7bit"  # lowercased Content-Transfer-Encoding
    parts: tuple[Part, ...] = ()


@dataclasses.dataclass(frozen=True)
class Analysis:
    """What the server keeps per message: the part tree, and the FETCH replies rendered once."""

    root: Part
    envelope: bytes  # RFC 3501 §7.4.2 ENVELOPE
    bodystructure: bytes  # BODYSTRUCTURE, with extension data
    body: bytes  # BODY: the same without extension data

    def to_json(self) -> str:
        # Short keys: one of these is stored per message. The rendered replies are bytes that may hold
        # 8-bit literals; latin-1 maps them one to one onto code points.
        return json.dumps(
            {
                "v": _JSON_VERSION,
                "p": _part_to_json(self.root),
                "e": self.envelope.decode("latin-1"),
                "s": self.bodystructure.decode("latin-1"),
                "b": self.body.decode("latin-1"),
            },
            separators=(",", ":"),
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, text: str) -> Analysis:
        """Raises ValueError for anything `to_json` of this version did not write (the caller then
        analyzes the message again)."""
        obj = json.loads(text)
        if not isinstance(obj, dict) or obj.get("v") != _JSON_VERSION:
            raise ValueError("not a message analysis of this version")
        envelope, bodystructure, body = obj.get("e"), obj.get("s"), obj.get("b")
        if not (isinstance(envelope, str) and isinstance(bodystructure, str) and isinstance(body, str)):
            raise ValueError("message analysis lacks its replies")
        try:
            return cls(
                root=_part_from_json(obj.get("p"), depth=0),
                envelope=envelope.encode("latin-1"),
                bodystructure=bodystructure.encode("latin-1"),
                body=body.encode("latin-1"),
            )
        except UnicodeEncodeError as e:
            raise ValueError("message analysis holds characters outside latin-1") from e


def _part_to_json(part: Part) -> list[object]:
    children = [_part_to_json(child) for child in part.parts]
    return [part.header_start, part.body_start, part.end, part.content_type, part.charset, part.encoding, children]


def _part_from_json(obj: object, *, depth: int) -> Part:
    if not isinstance(obj, list) or len(obj) != 7 or depth > MAX_DEPTH:
        raise ValueError("malformed part in message analysis")
    header_start, body_start, end, content_type, charset, encoding, children = obj
    offsets = (header_start, body_start, end)
    if not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets):
        raise ValueError("malformed offsets in message analysis")
    if not (isinstance(content_type, str) and isinstance(encoding, str) and isinstance(children, list)):
        raise ValueError("malformed part in message analysis")
    if charset is not None and not isinstance(charset, str):
        raise ValueError("malformed charset in message analysis")
    return Part(
        header_start=header_start,
        body_start=body_start,
        end=end,
        content_type=content_type,
        charset=charset,
        encoding=encoding,
        parts=tuple(_part_from_json(child, depth=depth + 1) for child in children),
    )


# --- Analysis ---


def analyze(data: bytes) -> Analysis:
    """The part tree and FETCH replies of a stored message. Never raises: what does not parse as MIME is
    read as text/plain, as far as it goes."""
    try:
        return _analyze(data)
    except Exception:  # a bug here must not make a stored message unreadable; tests check it is not reached
        return _flat(data)


def _analyze(data: bytes) -> Analysis:
    parsed = _entity(data, 0, len(data), default_type="text/plain", depth=0, budget=_Budget(MAX_PARTS), message=True)
    assert parsed.envelope is not None
    return Analysis(root=parsed.part, envelope=parsed.envelope, bodystructure=parsed.bodystructure, body=parsed.body)


def _flat(data: bytes) -> Analysis:
    """The whole message as one text/plain body with no header."""
    size, lines = len(data), _count_lines(data, 0, len(data))
    basic = b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" %d %d' % (size, lines)
    return Analysis(
        root=Part(header_start=0, body_start=0, end=len(data)),
        envelope=b"(" + b" ".join([b"NIL"] * 10) + b")",
        bodystructure=basic + b" NIL NIL NIL NIL)",
        body=basic + b")",
    )


@dataclasses.dataclass
class _Budget:
    parts_left: int


@dataclasses.dataclass(frozen=True)
class _Parsed:
    part: Part
    bodystructure: bytes
    body: bytes
    envelope: bytes | None  # for messages (the top level and each message/rfc822 body)


def _entity(
    data: bytes, start: int, end: int, *, default_type: str, depth: int, budget: _Budget, message: bool
) -> _Parsed:
    budget.parts_left -= 1
    body_start, fields = _scan_header(data, start, end)
    first = _first_fields(fields)
    mime = _mime_fields(data, first, default_type=default_type)
    content_type = mime.content_type
    children: list[_Parsed] = []
    within_limits = depth < MAX_DEPTH and budget.parts_left > 0
    if content_type.startswith("multipart/"):
        spans: list[tuple[int, int]] = []
        if within_limits and mime.boundary:
            spans = _split_multipart(data, body_start, end, mime.boundary.encode("latin-1"), budget.parts_left)
        # RFC 2046 §5.1.7: any multipart subtype splits as multipart/mixed does; §5.1.5: in a digest a
        # part without Content-Type is a message.
        child_default = "message/rfc822" if content_type == "multipart/digest" else "text/plain"
        for child_start, child_end in spans:
            children.append(
                _entity(
                    data,
                    child_start,
                    child_end,
                    default_type=child_default,
                    depth=depth + 1,
                    budget=budget,
                    message=False,
                )
            )
        if not children and within_limits:
            # No boundary parameter, a boundary that never appears or only closes: RFC 2046 §5.1.1 gives a
            # multipart one part at least, and IMAP cannot express one without. As Dovecot answers, it has
            # one empty text/plain part (a client asking BODY[1] gets nothing rather than the raw body, and
            # no boundary parameter leaks into a text part's parameters).
            children.append(
                _entity(data, end, end, default_type="text/plain", depth=depth + 1, budget=budget, message=False)
            )
        elif not children:
            content_type = "text/plain"  # past the limits: the body is shown as the text it is
    elif content_type == "message/rfc822":
        if within_limits:
            children.append(
                _entity(data, body_start, end, default_type="text/plain", depth=depth + 1, budget=budget, message=True)
            )
        else:
            content_type = "text/plain"

    part = Part(
        header_start=start,
        body_start=body_start,
        end=end,
        content_type=content_type,
        charset=mime.charset,
        encoding=mime.encoding,
        parts=tuple(child.part for child in children),
    )
    envelope = _envelope(data, fields) if message else None
    if children and content_type.startswith("multipart/"):
        bodystructure = _multipart(mime, [c.bodystructure for c in children], content_type, extended=True)
        body = _multipart(mime, [c.body for c in children], content_type, extended=False)
    else:
        inner = children[0] if children else None
        bodystructure = _single(data, part, mime, inner, extended=True)
        body = _single(data, part, mime, inner, extended=False)
    return _Parsed(part=part, bodystructure=bodystructure, body=body, envelope=envelope)


# --- Header ---


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str  # lowercased
    start: int  # first byte of the field name
    value_start: int  # just after the colon
    end: int  # after the field's last line terminator (or at the end of the entity)


# RFC 5322 §2.2: a field name is printable US-ASCII except ":" (obsolete syntax allows WSP before the
# colon); §2.2.3: a field goes on over the following lines that start with WSP.
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:[^\n]*(?:\n[ \t][^\n]*)*\n?")


def _scan_header(data: bytes, start: int, end: int) -> tuple[int, list[_Field]]:
    """Where the body starts, and the header fields. The header ends after the first empty line (which it
    includes), or at `end` (RFC 5322 §2.1: the body is what follows the empty line). A line that is
    neither a field nor a continuation is skipped, as Dovecot does: a field folded without its leading
    white space must not hide the From, To or Date below it (and a message missing the empty line has
    no body, rather than one that starts wherever a line lacks a colon)."""
    fields: list[_Field] = []
    pos = start
    while pos < end:
        if data.startswith(b"\n", pos, end):
            return pos + 1, fields
        if data.startswith(b"\r\n", pos, end):
            return pos + 2, fields
        field = _FIELD.match(data, pos, end)
        if field is None:
            line_end = data.find(b"\n", pos, end)
            if line_end < 0:
                return end, fields
            pos = line_end + 1
            continue
        name_end = field.end(1)
        value_start = data.index(b":", name_end) + 1
        fields.append(_Field(data[pos:name_end].decode("ascii").lower(), pos, value_start, field.end()))
        pos = field.end()
    return end, fields


_FOLD = re.compile(rb"\r?\n(?=[ \t])")


def _value(data: bytes, field: _Field) -> bytes:
    """The field's value, unfolded (RFC 5322 §2.2.3: the CRLF before WSP removed), without the leading
    and trailing white space."""
    return _FOLD.sub(b"", data[field.value_start : field.end]).strip(b" \t\r\n")


def _first_fields(fields: Sequence[_Field]) -> dict[str, _Field]:
    """The first field of each name (repeated fields that should be single are read as their first)."""
    return {field.name: field for field in reversed(fields)}


def _first(data: bytes, first: dict[str, _Field], name: str) -> bytes | None:
    field = first.get(name)
    return None if field is None else _value(data, field)


# --- MIME header fields ---


@dataclasses.dataclass(frozen=True)
class _Mime:
    content_type: str
    params: list[tuple[str, str]]  # lowercased name, value (latin-1 over the raw bytes)
    charset: str | None
    boundary: str | None
    encoding: str
    content_id: bytes | None
    description: bytes | None
    md5: bytes | None
    disposition: tuple[str, list[tuple[str, str]]] | None
    language: list[bytes]
    location: bytes | None


# RFC 2045 §5.1: token := 1*<any (US-ASCII) CHAR except SPACE, CTLs, or tspecials>
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")


def _mime_fields(data: bytes, first: dict[str, _Field], *, default_type: str) -> _Mime:
    content_type = default_type
    params: list[tuple[str, str]] = []
    raw_type = _first(data, first, "content-type")
    if raw_type is not None:
        kind, params = _parameters(raw_type, "content-type")
        main, slash, sub = kind.lower().partition("/")
        # RFC 2045 §5.2: a Content-Type that does not parse means text/plain.
        valid = slash and _TOKEN.fullmatch(main) and _TOKEN.fullmatch(sub)
        content_type = f"{main}/{sub}" if valid else "text/plain"
    values = dict(reversed(params))  # the first of duplicates wins
    charset = values.get("charset", "").strip().lower() or None
    boundary = values.get("boundary") or None

    raw_encoding = _first(data, first, "content-transfer-encoding") or b""
    encoding = raw_encoding.decode("latin-1").replace("(", " ").replace(";", " ").split()
    disposition = None
    raw_disposition = _first(data, first, "content-disposition")
    if raw_disposition is not None:
        kind, disposition_params = _parameters(raw_disposition, "content-disposition")
        if _TOKEN.fullmatch(kind.strip()):
            disposition = (kind.strip(), disposition_params)
    raw_language = _first(data, first, "content-language") or b""
    return _Mime(
        content_type=content_type,
        params=params,
        charset=charset,
        boundary=boundary,
        encoding=encoding[0].lower() if encoding else "7bit",
        content_id=_first(data, first, "content-id"),
        description=_first(data, first, "content-description"),
        md5=_first(data, first, "content-md5"),
        disposition=disposition,
        language=[tag.strip() for tag in raw_language.split(b",") if tag.strip()],
        location=_first(data, first, "content-location"),
    )


# RFC 2231 §7 attribute-char: what may stay unescaped in an extended parameter value.
_ATTRIBUTE_SAFE = "!#$&+-.^_`|~"


def _parameters(value: bytes, header: str) -> tuple[str, list[tuple[str, str]]]:
    """The leading type and the parameters of a Content-Type or Content-Disposition value, names
    lowercased, duplicates kept, RFC 2231 continuations joined. An RFC 2231 extended value stays encoded,
    under its name with a star ("name*" = "utf-8''r%C3%A9sum%C3%A9.pdf") as Dovecot sends it: clients
    that know RFC 2231 decode it, and no charset conversion happens here."""
    text = value[:_PARAMS_MAX].decode("latin-1").replace("\r", " ").replace("\n", " ")
    holder = email.message.Message()
    holder[header] = text
    try:
        # Typed as str values, but RFC 2231 values come as (charset, language, value) tuples.
        items: Sequence[tuple[str, object]] = holder.get_params(header=header) or []
    except Exception:  # the email package on hostile input (e.g. a continuation number of 5000 digits)
        return text.partition(";")[0].strip(), []
    if not items:
        return "", []
    params: list[tuple[str, str]] = []
    for name, param in items[1:]:
        if not _TOKEN.fullmatch(name):
            continue
        if isinstance(param, tuple):
            charset, language, encoded = param
            if charset is None:  # continuations without an encoded segment
                params.append((name, encoded))
                continue
            octets = urllib.parse.quote(encoded.encode("latin-1", "replace"), safe=_ATTRIBUTE_SAFE)
            params.append((name + "*", f"{charset}'{language or ''}'{octets}"))
        elif isinstance(param, str) and param:
            params.append((name, param))
    return items[0][0].strip(), params


# --- Multipart ---


def _split_multipart(data: bytes, start: int, end: int, boundary: bytes, max_parts: int) -> list[tuple[int, int]]:
    """The (start, end) of each body part in the multipart body [start, end). RFC 2046 §5.1.1: a
    delimiter is "--boundary" at the start of a line, followed by optional white space; the CRLF before it
    belongs to it; "--boundary--" closes; preamble and epilogue are not parts. A close delimiter that never
    comes leaves the last part running to `end`."""
    marker = b"--" + boundary
    # "^" in MULTILINE matches after each LF; searches start at line starts, where it matches too.
    delimiter = re.compile(b"^" + re.escape(marker), re.MULTILINE)
    spans: list[tuple[int, int]] = []
    part_start = -1  # -1 until the first delimiter
    pos = start
    while found_match := delimiter.search(data, pos, end):
        found = found_match.start()
        pos = found + 1
        after = found + len(marker)
        newline = data.find(b"\n", after, end)
        line_end = end if newline < 0 else newline + 1
        closing = data.startswith(b"--", after, line_end)
        # Only white space may follow a delimiter, so that a nested boundary that merely starts with ours
        # ("--b" and "--b-inner", as some mailers make them) is not taken for ours.
        if not closing and data[after:line_end].strip(b" \t\r\n"):
            continue
        if part_start >= 0:
            part_end = found - 1
            if data[part_end - 1 : part_end] == b"\r":
                part_end -= 1
            spans.append((part_start, max(part_start, part_end)))
        if closing or len(spans) == max_parts:
            return spans
        part_start = line_end
        pos = line_end
    if part_start >= 0:
        spans.append((part_start, end))
    return spans


# --- Rendering (RFC 3501 §7.4.2, §9 body, envelope) ---


def _string(value: bytes) -> bytes:
    # NUL is not allowed in an IMAP4rev1 string, quoted or literal (CHAR8 = %x01-ff).
    value = value.replace(b"\x00", b"")
    if len(value) > _QUOTED_MAX or not value.isascii() or b"\r" in value or b"\n" in value:
        return b"{%d}\r\n" % len(value) + value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _nstring(value: bytes | None) -> bytes:
    return b"NIL" if value is None else _string(value)


def _text(value: str) -> bytes:
    return _string(value.encode("latin-1", "replace"))


def _param_list(params: Sequence[tuple[str, str]]) -> bytes:
    """body-fld-param: names uppercased as in RFC 3501's examples, values as sent."""
    if not params:
        return b"NIL"
    return b"(" + b" ".join(_text(name.upper()) + b" " + _text(value) for name, value in params) + b")"


def _count_lines(data: bytes, start: int, end: int) -> int:
    """Lines in [start, end): the line terminators. A last line without one is not counted, as Dovecot
    counts: a part's last line loses its CRLF to the boundary that follows (RFC 2046 §5.1.1), so counting
    it would make every part but the last one line longer than the same text alone."""
    return data.count(b"\n", start, end)


def _extension(mime: _Mime) -> bytes:
    """body-fld-dsp SP body-fld-lang SP body-fld-loc, shared by single parts and multiparts."""
    if mime.disposition is None:
        disposition = b"NIL"
    else:
        kind, params = mime.disposition
        disposition = b"(" + _text(kind.upper()) + b" " + _param_list(params) + b")"
    language = b"(" + b" ".join(_string(tag) for tag in mime.language) + b")" if mime.language else b"NIL"
    return disposition + b" " + language + b" " + _nstring(mime.location)


def _single(data: bytes, part: Part, mime: _Mime, inner: _Parsed | None, *, extended: bool) -> bytes:
    """body-type-basic, body-type-text or body-type-msg, with body-ext-1part if `extended`."""
    main, _, sub = part.content_type.partition("/")
    params = mime.params
    if main == "text" and not any(name == "charset" for name, _ in params):
        params = [*params, ("charset", "US-ASCII")]  # RFC 2045 §5.2, written out as RFC 3501's examples do
    items = [
        _text(main.upper()),
        _text(sub.upper()),
        _param_list(params),
        _nstring(mime.content_id),
        _nstring(mime.description),
        _text(part.encoding.upper()),
        b"%d" % (part.end - part.body_start),
    ]
    lines = b"%d" % _count_lines(data, part.body_start, part.end)
    if inner is not None:
        assert inner.envelope is not None
        items += [inner.envelope, inner.bodystructure if extended else inner.body, lines]
    elif main == "text":
        items.append(lines)
    if extended:
        items += [_nstring(mime.md5), _extension(mime)]
    return b"(" + b" ".join(items) + b")"


def _multipart(mime: _Mime, children: Sequence[bytes], content_type: str, *, extended: bool) -> bytes:
    """body-type-mpart: the children with no space between them, the subtype, then body-ext-mpart."""
    rendered = b"(" + b"".join(children) + b" " + _text(content_type.partition("/")[2].upper())
    if extended:
        rendered += b" " + _param_list(mime.params) + b" " + _extension(mime)
    return rendered + b")"


def _envelope(data: bytes, fields: Sequence[_Field]) -> bytes:
    """RFC 3501 §7.4.2 ENVELOPE. Values are raw (encoded words are the client's to decode); absent or empty
    fields are NIL."""

    def raw(name: str) -> bytes | None:
        # A repeated Date, Subject, In-Reply-To or Message-ID: the last one, as Dovecot answers.
        last = next((field for field in reversed(fields) if field.name == name), None)
        return (_value(data, last) if last is not None else None) or None

    def addresses(name: str) -> bytes:
        # A repeated address field (Cc: and CC:, which RFC 5322 §3.6 forbids but mailers write) is read as
        # one list of all their addresses, as Dovecot does: the first alone would hide recipients.
        values = [value for field in fields if field.name == name and (value := _value(data, field))]
        return _addresses(b", ".join(values) if values else None)

    sender_from = addresses("from")
    # RFC 3501 §7.4.2: an absent or empty Sender or Reply-To is given the value of From.
    sender = addresses("sender")
    reply_to = addresses("reply-to")
    items = [
        _nstring(raw("date")),
        _nstring(raw("subject")),
        sender_from,
        sender_from if sender == b"NIL" else sender,
        sender_from if reply_to == b"NIL" else reply_to,
        addresses("to"),
        addresses("cc"),
        addresses("bcc"),
        _nstring(raw("in-reply-to")),
        _nstring(raw("message-id")),
    ]
    return b"(" + b" ".join(items) + b")"


_GROUP_END = b"(NIL NIL NIL NIL)"
_ROUTE = re.compile(r"<\s*@[^<>\"]*?:")  # RFC 5322 §4.4 obs-route, dropped as every client ignores it


def _addresses(value: bytes | None) -> bytes:
    """An address list as RFC 3501 renders it: one (name adl mailbox host) per mailbox; a group is
    (NIL NIL "group" NIL), its members, then (NIL NIL NIL NIL). NIL if there are no addresses.

    Groups are found here; email.utils.getaddresses reads the mailboxes but drops group names."""
    if value is None:
        return b"NIL"
    rendered: list[bytes] = []
    in_group = False
    for text, separator in split_address_list(value.decode("latin-1")):
        if len(rendered) >= MAX_ADDRESSES:
            break
        if separator == ":" and not in_group:
            name = text.strip()
            rendered.append(b"(NIL NIL " + _text(_unquote(name)) + b" NIL)")
            in_group = True
            continue
        rendered += _mailboxes(text)
        if separator == ";" and in_group:
            rendered.append(_GROUP_END)
            in_group = False
    if in_group:
        rendered.append(_GROUP_END)
    return b"(" + b"".join(rendered) + b")" if rendered else b"NIL"


def split_address_list(text: str) -> Iterator[tuple[str, str]]:
    """The pieces of an address list between top-level "," ":" and ";" (outside quoted strings, comments
    and angle brackets), each with the separator that ended it ("" at the end)."""
    piece_start = 0
    quoted = False
    comment_depth = 0
    angle = False
    index = 0
    while index < len(text):
        char = text[index]
        if quoted:
            if char == "\\":
                index += 1
            elif char == '"':
                quoted = False
        elif comment_depth:
            if char == "\\":
                index += 1
            elif char == "(":
                comment_depth += 1
            elif char == ")":
                comment_depth -= 1
        elif char == '"':
            quoted = True
        elif char == "(":
            comment_depth = 1
        elif char == "<":
            angle = True
        elif char == ">":
            angle = False
        elif char in ",:;" and not angle:
            yield text[piece_start:index], char
            piece_start = index + 1
        index += 1
    yield text[piece_start:], ""


def _mailboxes(text: str) -> list[bytes]:
    if not text.strip():
        return []
    try:
        pairs = email.utils.getaddresses([_ROUTE.sub("<", text)])
    except Exception:  # the email package on hostile input: no address rather than no message
        return []
    rendered = []
    for name, address in pairs:
        if not name and not address:
            continue
        local, at, host = address.rpartition("@")
        if not at:
            # RFC 3501 §7.4.2: a NIL host would mean a group; Dovecot (and clients that read its answers)
            # write MISSING_DOMAIN, as RFC 5322 §3.4.1 requires a domain and the local part alone says too little.
            local, host = address, "MISSING_DOMAIN"
        rendered.append(
            b"(" + (_text(name) if name else b"NIL") + b" NIL " + _text(_unquote(local)) + b" " + _text(host) + b")"
        )
    return rendered


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    return text


# --- Sections (RFC 3501 §6.4.5) ---

_SECTION_TEXTS = frozenset({"", "HEADER", "TEXT", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "MIME"})


def section(data: bytes, analysis: Analysis, spec: str, fields: Sequence[str] = ()) -> bytes | None:
    """The bytes of BODY[<spec>] (RFC 3501 §6.4.5). `spec` is a section-spec without the field list:
    "", "HEADER", "TEXT", "HEADER.FIELDS", "HEADER.FIELDS.NOT", or part numbers ("1.2") optionally
    followed by one of those or "MIME"; `fields` are the names for HEADER.FIELDS[.NOT]. None if the part
    does not exist (or HEADER/TEXT follow a part that is not a message/rfc822); ValueError if `spec` is
    not a section-spec."""
    if not spec:
        return data
    span = section_span(analysis, spec)
    if span is None:
        return None
    return section_from(data[span[0] : span[1]], spec, fields)


def section_span(analysis: Analysis, spec: str) -> tuple[int, int] | None:
    """Where BODY[<spec>] lies in the message, [start, end), or for HEADER.FIELDS[.NOT] the header its lines
    are taken from (`section_from` makes the section from those bytes): FETCH reads a large message's
    section, or streams it, from the file alone. None and ValueError as for `section`."""
    numbers, text = _parse_spec(spec)
    message = analysis.root
    if numbers:
        part = _find_part(analysis.root, numbers)
        if part is None:
            return None
        if text == "":
            return part.body_start, part.end
        if text == "MIME":
            return part.header_start, part.body_start
        # HEADER and TEXT after part numbers address a message/rfc822 part's encapsulated message.
        if part.content_type != "message/rfc822" or not part.parts:
            return None
        message = part.parts[0]
    elif text == "":
        return message.header_start, message.end
    if text == "TEXT":
        return message.body_start, message.end
    return message.header_start, message.body_start


def section_from(span: bytes, spec: str, fields: Sequence[str] = ()) -> bytes:
    """BODY[<spec>] from the bytes of its section_span."""
    _, text = _parse_spec(spec)
    if not text.startswith("HEADER.FIELDS"):
        return span
    return _header_fields(span, fields, exclude=text == "HEADER.FIELDS.NOT")


class UnknownEncoding(ValueError):
    """BINARY asked for a part whose Content-Transfer-Encoding the node cannot undo (RFC 3516 §4.3)."""

    def __init__(self, encoding: str) -> None:
        super().__init__(encoding)
        self.encoding = encoding


_BINARY_ENCODINGS = frozenset({"7bit", "8bit", "binary", "base64", "quoted-printable"})


def binary_section(data: bytes, analysis: Analysis, spec: str) -> bytes:
    """The bytes of BINARY[<spec>] (RFC 3516 §4.2), `spec` "" (the whole message) or part numbers ("1.2"),
    as Dovecot answers: every part at or below it with its Content-Transfer-Encoding undone, and the
    Content-Transfer-Encoding of the parts decoded from base64 or quoted-printable made `binary`. Empty if
    the part does not exist, as BODY[] gives; UnknownEncoding for an encoding other than 7bit, 8bit,
    binary, base64 and quoted-printable."""
    if not spec:
        return _binary_entity(data, analysis.root)
    part = _find_part(analysis.root, [int(number) for number in spec.split(".")])
    return b"" if part is None else _binary_body(data, part)


_CTE_FIELD = re.compile(rb"(?im)^content-transfer-encoding:[^\r\n]*(?:\r?\n[ \t][^\r\n]*)*\r?\n")


def _binary_entity(data: bytes, part: Part) -> bytes:
    header = data[part.header_start : part.body_start]
    if not part.parts and part.encoding in ("base64", "quoted-printable"):
        # Dovecot's place for it: the field removed, `binary` added last, before the empty line.
        header = _CTE_FIELD.sub(b"", header)
        ending = b"\r\n" if header.endswith(b"\r\n\r\n") else b""
        header = header[: len(header) - len(ending)] + b"Content-Transfer-Encoding: binary\r\n" + ending
    return header + _binary_body(data, part)


def _binary_body(data: bytes, part: Part) -> bytes:
    """The part's body, each leaf part below it decoded. Iterative over the children of one level only:
    the part tree's depth is bounded by the analysis (MAX_DEPTH)."""
    if not part.parts:
        body = data[part.body_start : part.end]
        if part.encoding not in _BINARY_ENCODINGS:
            raise UnknownEncoding(part.encoding)
        return _transfer_decode(body, part.encoding)
    pieces = []
    at = part.body_start
    for child in part.parts:
        pieces += [data[at : child.header_start], _binary_entity(data, child)]
        at = child.end
    pieces.append(data[at : part.end])
    return b"".join(pieces)


def _parse_spec(spec: str) -> tuple[list[int], str]:
    components = spec.upper().split(".") if spec else []
    numbers: list[int] = []
    while components and components[0].isdigit():
        number = components.pop(0)
        if number.startswith("0") or not number.isascii():  # nz-number
            raise ValueError(f"not a section: {spec!r}")
        numbers.append(int(number))
    text = ".".join(components)
    if text not in _SECTION_TEXTS or (text == "MIME" and not numbers):
        raise ValueError(f"not a section: {spec!r}")
    return numbers, text


def _find_part(root: Part, numbers: Sequence[int]) -> Part | None:
    """RFC 3501 §6.4.5: part numbers index a multipart's children; a message that is not multipart has
    one part, 1, its body; a number after a message/rfc822 part indexes its encapsulated message.
    As Dovecot does, a part of a multipart that is neither multipart nor message/rfc822 also answers to
    one more ".1": itself, its MIME header included (clients that number parts by the RFC's rule for
    messages ask BODY[1.1] of a text part 1, and get what Dovecot gives them)."""
    part = root
    reached = False  # whether `part` was reached through a part number, rather than being the message
    closed = False  # whether no further number can follow: a message's body part 1, or a part's extra ".1"
    for number in numbers:
        if closed:
            return None
        if reached and part.content_type == "message/rfc822" and part.parts:
            part = part.parts[0]
        if part.content_type.startswith("multipart/") and part.parts:
            if number > len(part.parts):
                return None
            part = part.parts[number - 1]
        elif number != 1:
            return None
        else:  # a message/rfc822 message's part 1 still leads into the message it encapsulates
            closed = part.content_type != "message/rfc822" or not part.parts
        reached = True
    return part


def _header_fields(header: bytes, names: Sequence[str], *, exclude: bool) -> bytes:
    """HEADER.FIELDS: the header lines (folding kept) of the fields named, in message order, then the
    empty line (RFC 3501 §6.4.5). HEADER.FIELDS.NOT: the header without the fields named, lines that are
    not fields and the empty line kept where the header has them. Both as Dovecot answers for a header
    missing its empty line: HEADER.FIELDS gives the empty line when it found a field (or the header has
    one); .NOT ends as the header does."""
    wanted = {name.lower() for name in names}
    _, fields = _scan_header(header, 0, len(header))
    ends_empty = header.endswith((b"\n\n", b"\n\r\n")) or header in (b"\n", b"\r\n")
    out = []
    if exclude:
        pos = 0
        for field in fields:
            if field.name in wanted:
                out.append(header[pos : field.start])
                pos = field.end
        out.append(header[pos:])
        text = b"".join(out)
        return text if not text or text.endswith(b"\n") else text + b"\r\n"
    for field in fields:
        if field.name in wanted:
            lines = header[field.start : field.end]
            out.append(lines if lines.endswith(b"\n") else lines + b"\r\n")
    if out or ends_empty:
        out.append(b"\r\n")
    return b"".join(out)


# --- Search ---


def header_value(data: bytes, analysis: Analysis, name: str) -> str | None:
    """The unfolded value of the top-level header field `name`, encoded words decoded (RFC 2047), for
    SEARCH; several fields of that name are joined with newlines. None if there is none."""
    root = analysis.root
    _, fields = _scan_header(data, root.header_start, root.body_start)
    wanted = name.lower()
    values = [_decode_words(_value(data, field)) for field in fields if field.name == wanted]
    return "\n".join(values) if values else None


def _decode_words(raw: bytes) -> str:
    # latin-1 keeps every byte as one character, so 8-bit text outside encoded words comes back intact
    # (decode_header returns it through raw-unicode-escape, which is latin-1 below U+0100).
    try:
        pieces = email.header.decode_header(raw.decode("latin-1"))
    except Exception:  # a malformed encoded word: search the text as it is
        return _decode_unlabelled(raw)
    decoded = []
    for piece, charset in pieces:
        octets = piece.encode("latin-1", "replace") if isinstance(piece, str) else piece
        if charset is None:
            decoded.append(_decode_unlabelled(octets))
        else:
            decoded.append(_decode_charset(octets, charset.partition("*")[0]))  # RFC 2231 §5: charset*lang
    return "".join(decoded)


# Reports that are text in all but name (RFC 3464 §2.1, RFC 8098 §3.1, RFC 6533 §6): searched as text/plain,
# as Dovecot does (SEARCH BODY Reporting-MTA finds the bounce).
_TEXT_REPORTS = frozenset(
    {"message/delivery-status", "message/disposition-notification", "message/global-delivery-status"}
)


def headers_for_search(data: bytes, analysis: Analysis) -> str:
    """The message's header and every part's (MIME headers, encapsulated messages' headers), as text with
    encoded words decoded too: what SEARCH TEXT looks in besides the body text. RFC 3501 §6.4.4: TEXT is
    "the header or body of the message", and a part's header is in the body (Dovecot finds an attachment
    by the file name in its Content-Disposition)."""
    texts = []
    stack = [analysis.root]
    while stack:
        part = stack.pop()
        stack.extend(reversed(part.parts))
        if part.body_start == part.header_start:
            continue
        texts.append(data[part.header_start : part.body_start].decode("utf-8", "replace"))
        _, fields = _scan_header(data, part.header_start, part.body_start)
        texts.extend(_decode_words(value) for field in fields if b"=?" in (value := _value(data, field)))
    return "\n".join(texts)


def text_for_search(data: bytes, analysis: Analysis) -> str:
    """Every text/* body (and the reports in _TEXT_REPORTS), transfer encoding and charset decoded (errors
    replaced), joined with newlines: what SEARCH BODY and TEXT look in."""
    texts = []
    stack = [analysis.root]
    while stack:
        part = stack.pop()
        if part.parts:
            stack.extend(reversed(part.parts))
        elif part.content_type.startswith("text/") or part.content_type in _TEXT_REPORTS:
            octets = _transfer_decode(data[part.body_start : part.end], part.encoding)
            texts.append(_decode_charset(octets, part.charset or ""))
    return "\n".join(texts)


_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")


def _transfer_decode(body: bytes, encoding: str) -> bytes:
    if encoding == "base64":
        # Forgiving: line breaks, stray characters and missing padding are common.
        cleaned = _NOT_BASE64.sub(b"", body)
        if len(cleaned) % 4 == 1:
            cleaned = cleaned[:-1]  # a lone sextet holds no whole octet
        cleaned += b"=" * (-len(cleaned) % 4)
        try:
            return binascii.a2b_base64(cleaned)
        except binascii.Error:
            return body
    if encoding == "quoted-printable":
        return binascii.a2b_qp(body)
    return body


# --- Charsets ---

# The charsets we decode: the text charsets mail uses, by their IANA names (as MIME declares them and as
# BADCHARSET lists them, RFC 3501 §6.4.4). Whatever else Python can decode is not text: punycode and idna
# (punycode decoding is quadratic: 23 s for a megabyte), rot13, base64_codec, zlib_codec, bz2_codec, uu_codec,
# hex_codec, unicode_escape, raw_unicode_escape... A charset outside this list is unknown, and its text is
# read as undeclared 8-bit text is, as Dovecot reads a charset it does not know.
TEXT_CHARSETS: tuple[str, ...] = (
    "US-ASCII", "UTF-8", "UTF-16", "UTF-16BE", "UTF-16LE", "UTF-32", "UTF-32BE", "UTF-32LE", "UTF-7",
    "ISO-8859-1", "ISO-8859-2", "ISO-8859-3", "ISO-8859-4", "ISO-8859-5", "ISO-8859-6", "ISO-8859-7",
    "ISO-8859-8", "ISO-8859-9", "ISO-8859-10", "ISO-8859-11", "ISO-8859-13", "ISO-8859-14", "ISO-8859-15",
    "ISO-8859-16",
    "WINDOWS-1250", "WINDOWS-1251", "WINDOWS-1252", "WINDOWS-1253", "WINDOWS-1254", "WINDOWS-1255",
    "WINDOWS-1256", "WINDOWS-1257", "WINDOWS-1258", "WINDOWS-874",
    "KOI8-R", "KOI8-U", "IBM437", "IBM850", "IBM852", "IBM866", "MACINTOSH", "TIS-620",
    "ISO-2022-JP", "ISO-2022-JP-1", "ISO-2022-JP-2", "ISO-2022-JP-3", "ISO-2022-JP-2004", "SHIFT_JIS",
    "SHIFT_JIS-2004", "WINDOWS-31J", "EUC-JP", "EUC-JIS-2004",
    "ISO-2022-KR", "EUC-KR", "KS_C_5601-1987", "CP949",
    "GB2312", "GBK", "GB18030", "HZ-GB-2312", "BIG5", "BIG5-HKSCS", "CP950",
)  # fmt: skip
_PYTHON_NAMES = {"WINDOWS-874": "cp874", "WINDOWS-31J": "cp932"}  # IANA names Python's codecs do not know
# Canonical codec names (codecs.lookup(...).name): an alias is accepted when it leads to one of these.
_TEXT_CODECS = frozenset(codecs.lookup(_PYTHON_NAMES.get(name, name)).name for name in TEXT_CHARSETS)
# RFC 2978 §2.3 mime-charset characters; IANA names are at most 40 characters.
_CHARSET_NAME = re.compile(r"[A-Za-z0-9!#$%&'+\-^_`{}~]{1,40}")


@functools.lru_cache(maxsize=256)
def text_codec(charset: str) -> str | None:
    """The Python codec that decodes `charset` (a MIME charset name, in any case, or an alias Python knows),
    or None if it names no charset of TEXT_CHARSETS."""
    name = charset.strip()
    if not _CHARSET_NAME.fullmatch(name):
        return None
    # Punctuation runs made one hyphen first: codecs.lookup caches every spelling it resolves, and
    # "utf--8", "utf---8"... would each take a cache entry.
    name = re.sub(r"[^A-Z0-9]+", "-", name.upper()).strip("-")
    try:
        codec = codecs.lookup(_PYTHON_NAMES.get(name, name)).name
    except LookupError:
        return None
    return codec if codec in _TEXT_CODECS else None


def _decode_charset(octets: bytes, charset: str) -> str:
    codec = text_codec(charset) if charset else None
    if codec is None or codec == "ascii":  # unknown, not text, or 7-bit that often holds 8-bit
        return _decode_unlabelled(octets)
    return octets.decode(codec, "replace")


def _decode_unlabelled(octets: bytes) -> str:
    """Undeclared 8-bit text: UTF-8 if it is, else windows-1252 (which mail software writes most)."""
    try:
        return octets.decode("utf-8")
    except UnicodeDecodeError:
        return octets.decode("cp1252", "replace")
