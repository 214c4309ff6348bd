"""IMAP SEARCH and UID SEARCH (RFC 3501 §6.4.4, CONDSTORE's MODSEQ key): evaluates the keys that
mailnode.imap.search parses against each message, reading files only for keys that need content,
in batches. Declared in mailnode.imap.commands.TABLE.

The header fields clients search on (INDEXED_FIELDS: FROM, TO, CC, BCC, SUBJECT, and Date for the SENT*
keys) are decoded once per message and kept, in the index (Account.save_search_fields) and in the node's
memory (AnalysisCache.headers): a search on those, flags, sizes and dates opens no message file. A
message whose fields are not cached yet has them computed from its header block the first time a search
needs them. The commonest searches, flags and those fields in NOT/OR/AND/UID combinations, are answered
from memory alone: the session's flags, and per folder and field a column of every message's value,
case-folded and joined into one string searched with str.find (no row read, no step per message).

Keys that read message text (headers, BODY, TEXT) are evaluated in a thread of the search Gateway, so
that decoding megabytes never holds the event loop, within a CPU budget per command: a search that
spends it is answered `NO [LIMIT]` (RFC 5530), with no partial result, which a client could take for
the whole answer. Flags, UIDs, sizes and dates are evaluated on the loop.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import datetime
import email.utils
import json
import time
import weakref
from collections.abc import Iterable, Sequence

from mailnode import gateway
from mailnode.imap import mime, protocol, responses, search
from mailnode.imap.session import AnalysisCache, KeyedLocks, Selected, Session
from mailnode.store.account import Message

_SEARCH_BATCH = 256  # messages (headers or whole) read per Gateway trip while answering SEARCH
# CPU seconds one SEARCH may spend decoding and matching message text (reading files is not counted).
# Read at each search: a constant for now, to become a setting of the node.
CPU_BUDGET = 10.0
# Threads of their own, as password hashing has: searches spending their budget never queue the store's
# reads and writes, and at most two run at once in a node process, whatever the number of sessions.
_GATEWAY = gateway.Gateway(workers=2)


# The header fields cached for every message once a search has needed one of them (lower case).
INDEXED_FIELDS = ("from", "to", "cc", "bcc", "subject", "date")
_INDEXED = frozenset(INDEXED_FIELDS)


class _OverBudget(Exception):
    pass


def _decode_fields(data: bytes, analysis: mime.Analysis) -> dict[str, str | None]:
    """In a search thread: the INDEXED_FIELDS of one message, from its header block."""
    return {name: mime.header_value(data, analysis, name) for name in INDEXED_FIELDS}


def _decode_all(heads: list[bytes], analyses: list[mime.Analysis]) -> list[dict[str, str | None]]:
    return [_decode_fields(head, analysis) for head, analysis in zip(heads, analyses, strict=True)]


def _stored_fields(text: str | None) -> dict[str, str | None] | None:
    """Fields as the index holds them (a JSON object), or None when absent or not what this version stores."""
    if text is None:
        return None
    try:
        values = json.loads(text)
    except ValueError:
        return None
    if not isinstance(values, dict) or values.keys() != _INDEXED:
        return None
    if not all(value is None or isinstance(value, str) for value in values.values()):
        return None
    return values


async def _indexed_fields(session: Session, messages: Sequence[Message]) -> dict[int, dict[str, str | None]]:
    """The INDEXED_FIELDS of each message by UID: from memory, else from the index, else decoded from its
    header block now (and saved to both). A message expunged meanwhile gets none (it matches no header key)."""
    assert session.selected is not None and session.account is not None and session.user is not None
    cache, address = session.analysis_cache, session.user.address
    result: dict[int, dict[str, str | None]] = {}
    lacking = _known_fields(cache, address, messages, result)
    if not lacking:
        return result
    # One session at a time fills a mailbox's fields (sessions that waited find them in memory). Not the
    # analyses' lock (cache.lock(address)), which session.analyses takes inside this one.
    async with cache.lock(f"{address} search"):
        return await _fill_fields(session, lacking, result)


def _known_fields(
    cache: AnalysisCache, address: str, messages: Iterable[Message], result: dict[int, dict[str, str | None]]
) -> list[Message]:
    """Put into `result` (by UID) the messages whose indexed fields the node's memory holds; the others."""
    lacking = []
    for message in messages:
        known = cache.headers((address, message.path))
        if known.keys() >= _INDEXED:
            result[message.uid] = known
        else:
            lacking.append(message)
    return lacking


async def _fill_fields(
    session: Session, lacking: list[Message], result: dict[int, dict[str, str | None]]
) -> dict[int, dict[str, str | None]]:
    assert session.selected is not None and session.account is not None and session.user is not None
    cache, address, name = session.analysis_cache, session.user.address, session.selected.name
    lacking = _known_fields(cache, address, lacking, result)  # filled by the session this one waited for
    if not lacking:
        return result
    stored = await session.account.search_fields(name, [m.uid for m in lacking])
    unknown: list[Message] = []
    for message in lacking:
        values = _stored_fields(stored.get(message.uid))
        if values is None:
            unknown.append(message)
        else:
            known = result[message.uid] = cache.headers((address, message.path))
            known.update(values)
    for start in range(0, len(unknown), _SEARCH_BATCH):
        chunk = unknown[start : start + _SEARCH_BATCH]
        analyses = await session.analyses(chunk)
        chunk = [m for m in chunk if m.uid in analyses]  # not expunged meanwhile
        heads = await session.account.read(chunk, limits=[analyses[m.uid].root.body_start for m in chunk])
        decoded = await _GATEWAY.run(_decode_all, heads, [analyses[m.uid] for m in chunk])
        texts: dict[int, str] = {}
        for message, head, values in zip(chunk, heads, decoded, strict=True):
            if not head:  # expunged between the analysis and the read
                continue
            known = result[message.uid] = cache.headers((address, message.path))
            known.update(values)
            texts[message.uid] = json.dumps(values, ensure_ascii=False)
        await session.account.save_search_fields(name, texts)
    return result


class _Target:
    """A message as SEARCH sees it (implements search.SearchTarget)."""

    def __init__(
        self,
        selected: Selected,
        seq: int,
        message: Message,
        data: bytes | None,
        analysis: mime.Analysis | None,
        headers: dict[str, str | None],
    ) -> None:
        self._selected = selected
        self.message = message
        self.seq = seq
        self.uid = message.uid
        self.size = message.size
        self._data = data
        self._analysis = analysis
        self._headers = headers  # this message's field values found so far (shared through the cache)

    # The rest is computed only when the search asks for it.
    @property
    def flags(self) -> frozenset[str]:
        flags = frozenset(self._selected.flags.get(self.uid, self.message.flags).split())
        return flags | {"\\Recent"} if self.uid in self._selected.recent else flags

    @property
    def internal_date(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.message.internal_date, datetime.UTC)

    @property
    def modseq(self) -> int:
        return self._selected.modseqs.get(self.uid, self.message.modseq)

    @property
    def largest_seq(self) -> int:
        return len(self._selected.uids)

    @property
    def largest_uid(self) -> int:
        return self._selected.uids[-1] if self._selected.uids else 0

    def header(self, name: str) -> str | None:
        key = name.lower()
        if key not in self._headers:
            if self._data is None:
                return None
            assert self._analysis is not None  # a message is read only with its structure
            self._headers[key] = mime.header_value(self._data, self._analysis, name)
        return self._headers[key]

    def headers_text(self) -> str:
        if self._data is None:
            return ""
        assert self._analysis is not None
        return mime.headers_for_search(self._data, self._analysis)

    def body_text(self) -> str:
        if self._data is None:
            return ""
        assert self._analysis is not None
        return mime.text_for_search(self._data, self._analysis)

    def sent_date(self) -> datetime.date | None:
        value = self.header("Date")
        if not value:
            return None
        try:
            return email.utils.parsedate_to_datetime(value).date()
        except (TypeError, ValueError, IndexError):
            return None


def _evaluate(
    key: search.SearchKey, targets: list[_Target], *, spent: float, budget: float
) -> tuple[list[_Target], float]:
    """In a search thread: the targets that match, and the CPU time spent with those of earlier batches.
    Raises _OverBudget when the budget is spent before the last target is decided (a single message costs
    what its size does: the charsets decoded are linear, mime.TEXT_CHARSETS)."""
    start = time.thread_time()
    matched = []
    for target in targets:
        if spent + time.thread_time() - start > budget:
            raise _OverBudget
        if search.evaluate(key, target):
            matched.append(target)
    return matched, spent + time.thread_time() - start


# -- answered from memory ------------------------------------------------------------------------------
# The searches clients send most, flags and the cached header fields (UNSEEN, FROM x, SUBJECT y, NOT DELETED,
# OR FROM x TO y, UID n:*), are answered from the session's flags and the node's columns without a row or a
# file read, and without a Python step per message for a header key: each is a set of UIDs, and the tree is
# set algebra. Anything else (sizes, dates, MODSEQ, the body, other header fields) takes the general path.

_QUICK_KEYS = (search.All, search.Flag, search.Header, search.Not, search.And, search.Or, search.Uid)
_SEPARATOR = "\x00"  # between the values of a column: a search string holding one is answered value by value
_COLUMN_ENTRIES = 200_000  # messages' values kept in columns, per node (LRU by column)


class _NotQuick(Exception):
    """A message of the session's sequence has no flags in its state: the general path decides."""


class _Column:
    """One cached header field (INDEXED_FIELDS) of one folder's messages, case-folded once and joined into
    one string, so a substring search over the folder is str.find in C, one Python step per hit. Entries
    of messages expunged since stay until the column is rebuilt (hits are taken only from the session's
    sequence); never changed once made (a session adding messages makes a new one)."""

    __slots__ = ("_present", "_starts", "_text", "uids")

    def __init__(self, entries: Sequence[tuple[int, str | None]]) -> None:
        """`entries`: (UID, case-folded value or None when the message has no such field), UIDs ascending."""
        self.uids: list[int] = []
        self._present = b""
        self._starts: list[int] = []
        self._text = ""
        self._extend(entries)

    def _extend(self, entries: Sequence[tuple[int, str | None]]) -> None:
        """Put `entries` (UIDs ascending, above this column's) after the others."""
        values = ["" if value is None else value for _, value in entries]
        earlier = [self._text] if self.uids else []  # a separator after them, even when their text is ""
        at = len(self._text) + 1 if self.uids else 0
        for value in values:
            self._starts.append(at)
            at += len(value) + 1
        self.uids += [uid for uid, _ in entries]
        self._present += bytes(value is not None for _, value in entries)
        self._text = _SEPARATOR.join([*earlier, *values])

    def entries(self) -> list[tuple[int, str | None]]:
        ends = [*self._starts[1:], len(self._text) + 1] if self._starts else []
        return [
            (uid, self._text[start : end - 1] if present else None)
            for uid, present, start, end in zip(self.uids, self._present, self._starts, ends, strict=True)
        ]

    def with_entries(self, added: Sequence[tuple[int, str | None]], keep: set[int] | None) -> _Column:
        """A column with `added` besides these entries (only those of `keep`, when given). Messages added to a
        folder have UIDs above its others (RFC 3501 §2.3.1.1): those are put after a copy of this one."""
        ordered = sorted(added)
        if keep is None and (not self.uids or not ordered or ordered[0][0] > self.uids[-1]):
            column = _Column([])
            column.uids, column._present = list(self.uids), self._present
            column._starts, column._text = list(self._starts), self._text
            column._extend(ordered)
            return column
        merged = {uid: value for uid, value in self.entries() if keep is None or uid in keep}
        merged.update(ordered)
        return _Column(sorted(merged.items()))

    def matching(self, value: str) -> set[int]:
        """UIDs whose value holds `value`, case-insensitively (RFC 3501 §6.4.4, as search.evaluate decides:
        "" matches every message that has the field)."""
        wanted = value.casefold()
        if not wanted:
            return {uid for uid, present in zip(self.uids, self._present, strict=True) if present}
        text, starts = self._text, self._starts
        if _SEPARATOR in wanted:  # could span two values: each on its own
            return {uid for uid, value in self.entries() if value is not None and wanted in value}
        found: set[int] = set()
        at = text.find(wanted)
        while at >= 0:
            entry = bisect.bisect_right(starts, at) - 1
            found.add(self.uids[entry])
            if entry + 1 == len(starts):
                break
            at = text.find(wanted, starts[entry + 1])
        return found


class _Columns:
    """The node's columns by (mailbox, UIDVALIDITY, field): RFC 3501 §2.3.1.1 makes a UID name one message
    for as long as the UIDVALIDITY stands, and a message never changes. The least recently used go beyond
    _COLUMN_ENTRIES values."""

    def __init__(self) -> None:
        self._columns: collections.OrderedDict[tuple[str, int, str], _Column] = collections.OrderedDict()
        self._entries = 0
        self._locks: KeyedLocks[tuple[str, int]] = KeyedLocks()

    def lock(self, address: str, uidvalidity: int) -> contextlib.AbstractAsyncContextManager[None]:
        """Held while a folder's columns gain messages: the sessions that waited find them there (when
        twenty sessions search a new folder at once, one reads its rows)."""
        return self._locks.hold((address, uidvalidity))

    def get(self, key: tuple[str, int, str]) -> _Column | None:
        found = self._columns.get(key)
        if found is not None:
            self._columns.move_to_end(key)
        return found

    def put(self, key: tuple[str, int, str], column: _Column) -> None:
        old = self._columns.pop(key, None)
        self._entries += len(column.uids) - (0 if old is None else len(old.uids))
        self._columns[key] = column
        while self._entries > _COLUMN_ENTRIES and len(self._columns) > 1:
            _, dropped = self._columns.popitem(last=False)
            self._entries -= len(dropped.uids)


# One per node: kept beside the node's analysis cache (the sessions of both listeners share it).
_NODE_COLUMNS: weakref.WeakKeyDictionary[AnalysisCache, _Columns] = weakref.WeakKeyDictionary()


def _quick(key: search.SearchKey) -> frozenset[str] | None:
    """The cached fields (lower case) a key answered from memory needs; None when it cannot be."""
    fields = set()
    for node in search.walk(key):
        if not isinstance(node, _QUICK_KEYS):
            return None
        if isinstance(node, search.Header):
            field = node.field.lower()
            if field not in _INDEXED:
                return None
            fields.add(field)
    return frozenset(fields)


async def _columns(session: Session, fields: frozenset[str]) -> dict[str, _Column]:
    """The columns of `fields` covering every message of the session's sequence: the messages added since
    a column was made have their fields found (_indexed_fields: memory, index, or decoded) and put in."""
    selected = session.selected
    assert selected is not None and session.account is not None and session.user is not None
    store = _NODE_COLUMNS.setdefault(session.analysis_cache, _Columns())
    address, uids = session.user.address, selected.uids

    def lacking() -> tuple[dict[str, _Column], set[int]]:
        found: dict[str, _Column] = {}
        missing: set[int] = set()
        for field in fields:
            column = store.get((address, selected.uidvalidity, field))
            if column is not None:
                found[field] = column
            if column is None or column.uids != uids:
                missing.update(set(uids).difference(column.uids) if column is not None else uids)
        return found, missing

    found, missing = lacking()
    if not missing:
        return found
    async with store.lock(address, selected.uidvalidity):
        found, missing = lacking()  # filled by the session this one waited for
        if not missing:
            return found
        rows = await session.account.messages(selected.name, uids=sorted(missing))
        values = await _indexed_fields(session, rows)  # a message expunged meanwhile has none, nor an entry
        keep = set(selected.uids)
        for field in fields:
            added = [(uid, None if (v := values[uid].get(field)) is None else v.casefold()) for uid in values]
            key = (address, selected.uidvalidity, field)
            column = found.get(field)
            if column is None:
                column = _Column(sorted(added))
            else:  # entries of expunged messages go once they are half the column
                column = column.with_entries(added, keep if len(column.uids) > 2 * len(keep) else None)
            store.put(key, column)
            found[field] = column
    return found


def _flag_uids(flag: str, present: bool, selected: Selected) -> set[int]:
    """UIDs of the sequence with (or, `present` False, without) `flag`, as search.evaluate decides: flags
    compare case-insensitively, \\Recent is the session's. One test per distinct flag list."""
    lower = flag.lower()
    recent = lower == "\\recent"
    flags, marks = selected.flags, selected.recent
    verdicts: dict[str, bool] = {}
    found: set[int] = set()
    for uid in selected.uids:
        text = flags.get(uid)
        if text is None:
            raise _NotQuick
        has = verdicts.get(text)
        if has is None:
            parts = text.split()
            has = verdicts[text] = flag in parts or any(part.lower() == lower for part in parts)
        if (has or (recent and uid in marks)) == present:
            found.add(uid)
    return found


def _uid_set(key: search.SearchKey, selected: Selected, every: set[int], columns: dict[str, _Column]) -> set[int]:
    uids = selected.uids
    match key:
        case search.All():
            return every
        case search.Flag(flag, present):
            return _flag_uids(flag, present, selected)
        case search.Header(field, value):
            return columns[field.lower()].matching(value) & every
        case search.Uid(numbers):
            return set(numbers.iter(uids, uids[-1] if uids else 0))
        case search.Not(inner):
            return every - _uid_set(inner, selected, every, columns)
        case search.Or(left, right):
            return _uid_set(left, selected, every, columns) | _uid_set(right, selected, every, columns)
        case search.And():
            result = _uid_set(key.cheap_first[0], selected, every, columns)
            for inner in key.cheap_first[1:]:
                result = result & _uid_set(inner, selected, every, columns)
            return result
    raise _NotQuick


async def _quick_hits(session: Session, key: search.SearchKey) -> list[tuple[int, int]] | None:
    """(sequence number, UID) of the messages that match, from memory; None when `key` needs the general path."""
    selected = session.selected
    assert selected is not None
    fields = _quick(key)
    if fields is None:
        return None
    columns = await _columns(session, fields) if fields else {}
    uids = selected.uids
    try:
        hits = _uid_set(key, selected, set(uids), columns)
    except _NotQuick:
        return None
    if len(hits) * 16 < len(uids):  # few: each one's place found by bisection
        return [(bisect.bisect_left(uids, uid) + 1, uid) for uid in sorted(hits)]
    return [(seq, uid) for seq, uid in enumerate(uids, 1) if uid in hits]


async def search_(session: Session, command: protocol.Command) -> None:
    """SEARCH, and UID SEARCH."""
    selected = session.selected
    assert selected is not None
    by_uid = command.name == "UID SEARCH"
    request = protocol.parse_search_return(list(command.args), imap4rev2=session.imap4rev2)
    key = search.parse_search(request.criteria, saved=selected.saved)
    session.condstore |= search.referenced_modseq(key)  # RFC 7162 §3.1: SEARCH MODSEQ enables CONDSTORE
    if request.options is not None and "SAVE" in request.options:
        selected.saved = []  # RFC 5182 §2.1: a search that fails leaves `$` empty
    hits = await _quick_hits(session, key)
    modseq = None
    if hits is None:
        matched = await _matching(session, key)
        hits = [(seq, message.uid) for seq, message in matched]
        if search.referenced_modseq(key) and matched:  # RFC 7162: the highest MODSEQ of the hits
            modseq = max(selected.modseqs.get(m.uid, m.modseq) for _, m in matched)
    if request.options is not None:
        _answer_esearch(session, command, hits, request.options, modseq)
    else:
        line = "* SEARCH " + " ".join(str(uid if by_uid else seq) for seq, uid in hits)
        session.send(line.rstrip() if modseq is None else f"{line} (MODSEQ {modseq})")
    await session.report_changes(expunge=by_uid)
    session.send(responses.OK_COMPLETED.line(command.tag, command=command.name))


def _answer_esearch(
    session: Session,
    command: protocol.Command,
    hits: list[tuple[int, int]],
    options: frozenset[str],
    modseq: int | None,
) -> None:
    """SEARCH RETURN (...): the ESEARCH response (RFC 4731) and the result SAVEd for `$` (RFC 5182); `hits`
    are (sequence number, UID), `modseq` the highest of theirs when the search named MODSEQ."""
    selected = session.selected
    assert selected is not None
    by_uid = command.name == "UID SEARCH"
    if "SAVE" in options:
        selected.saved = protocol.saved_numbers([uid for _, uid in hits], options)
    numbers = [uid if by_uid else seq for seq, uid in hits]
    line = protocol.format_esearch(command.tag, uid=by_uid, numbers=numbers, options=options, modseq=modseq)
    if line is not None:
        session.send(line)


async def _matching(session: Session, key: search.SearchKey) -> list[tuple[int, Message]]:
    """The messages of the selected folder that match `key`, as (sequence number, message), in order:
    SEARCH's answer, and the messages SORT and THREAD order (mailnode.imap.commands.sort; private, as
    every public coroutine of a command module is a handler)."""
    selected = session.selected
    assert selected is not None and session.account is not None and session.user is not None
    quick = await _quick_hits(session, key)
    messages = await session.account.messages(selected.name)
    by_uid_map = {m.uid: m for m in messages}
    if quick is not None:
        return [(seq, by_uid_map[uid]) for seq, uid in quick if uid in by_uid_map]
    ordered = [(i + 1, by_uid_map[u]) for i, u in enumerate(selected.uids) if u in by_uid_map]
    hits: list[tuple[int, Message]] = []
    spent = 0.0  # CPU seconds spent on message text so far
    content = search.needs_content(key)
    body = search.needs_body(key)
    fields = search.header_fields(key)
    address = session.user.address
    cache = session.analysis_cache
    indexed: dict[int, dict[str, str | None]] | None = None
    if content and fields is not None and fields <= _INDEXED:
        # Only cached fields: every message's are known after this, and no file is read below.
        indexed = await _indexed_fields(session, [m for _, m in ordered])
    batch = _SEARCH_BATCH if content and indexed is None else max(len(ordered), 1)
    for start in range(0, len(ordered), batch):
        chunk = ordered[start : start + batch]
        datas: list[bytes | None] = [None] * len(chunk)
        analyses: dict[int, mime.Analysis] = {}
        if indexed is not None:
            headers = [indexed.get(m.uid, {}) for _, m in chunk]
        else:
            headers = [cache.headers((address, m.path)) for _, m in chunk]
        if content and indexed is None:
            # A search on single header fields reads no file for messages whose fields are known
            # from earlier searches, and only the header block of the others.
            unread = [
                position for position, known in enumerate(headers) if fields is None or not fields <= known.keys()
            ]
            if unread:
                analyses = await session.analyses([chunk[position][1] for position in unread])
                unread = [p for p in unread if chunk[p][1].uid in analyses]  # not expunged meanwhile
                wanted = [chunk[position][1] for position in unread]
                limits = None if body else [analyses[m.uid].root.body_start for m in wanted]
                read = await session.account.read(wanted, limits=limits)
                for position, contents in zip(unread, read, strict=True):
                    datas[position] = contents
        targets = [
            _Target(selected, seq, message, data, analyses.get(message.uid), known)
            for (seq, message), data, known in zip(chunk, datas, headers, strict=True)
        ]
        if content:
            try:
                matched, spent = await _GATEWAY.run(_evaluate, key, targets, spent=spent, budget=CPU_BUDGET)
            except _OverBudget:
                raise responses.Refused(responses.NO_SEARCH_LIMIT) from None
        else:
            matched = [target for target in targets if search.evaluate(key, target)]
        hits += [(target.seq, target.message) for target in matched]
    return hits
