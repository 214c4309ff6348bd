"""IMAP SEARCH and UID SEARCH (RFC 3501 §6.4.4, CONDSTORE's MODSEQ key): evaluates the keys that
mailnode.imap.search parses against each message, reading files only for keys that need content,
in batches. Declared in mailnode.imap.commands.TABLE.

The header fields clients search on (INDEXED_FIELDS: FROM, TO, CC, BCC, SUBJECT, and Date for the SENT*
keys) are decoded once per message and kept, in the index (Account.save_search_fields) and in the node's
memory (AnalysisCache.headers): a search on those, flags, sizes and dates opens no message file. A
message whose fields are not cached yet has them computed from its header block the first time a search
needs them.

Keys that read message text (headers, BODY, TEXT) are evaluated in a thread of the search Gateway, so
that decoding megabytes never holds the event loop, within a CPU budget per command: a search that
spends it is answered `NO [LIMIT]` (RFC 5530), with no partial result, which a client could take for
the whole answer. Flags, UIDs, sizes and dates are evaluated on the loop.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import time
from collections.abc import Iterable, Sequence

from mailnode import gateway
from mailnode.imap import mime, protocol, responses, search
from mailnode.imap.session import AnalysisCache, Selected, Session
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


# The commonest searches, a lone flag (UNSEEN, FLAGGED) or a lone key on a cached field (FROM x, SUBJECT y), are
# answered by a plain loop over the folder; the general evaluator costs several objects per message.


def _flag_hits(flag: str, present: bool, ordered: list[tuple[int, Message]], selected: Selected) -> list[int]:
    """Positions in `ordered` of the messages with (or, `present` False, without) `flag`, as search.evaluate
    decides: flags compare case-insensitively, \\Recent is the session's."""
    lower = flag.lower()
    recent = selected.recent if lower == "\\recent" else set()
    hits = []
    for position, (_, message) in enumerate(ordered):
        parts = selected.flags.get(message.uid, message.flags).split()
        has = flag in parts or message.uid in recent or any(part.lower() == lower for part in parts)
        if has == present:
            hits.append(position)
    return hits


def _field_hits(value: str, values: list[str | None], *, spent: float, budget: float) -> tuple[list[int], float]:
    """In a search thread: positions of the `values` (one message's cached field each) that contain `value`,
    case-insensitively (RFC 3501 §6.4.4), as search.evaluate decides; within the CPU budget (_OverBudget)."""
    start = time.thread_time()
    wanted = value.casefold()
    hits = []
    for position, text in enumerate(values):
        if position % _SEARCH_BATCH == 0 and spent + time.thread_time() - start > budget:
            raise _OverBudget
        if text is not None and wanted in text.casefold():
            hits.append(position)
    return hits, spent + time.thread_time() - start


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
    hits = await _matching(session, key)
    if request.options is not None:
        _answer_esearch(session, command, key, hits, request.options)
    else:
        numbers = [str(m.uid if by_uid else seq) for seq, m in hits]
        line = "* SEARCH" + "".join(f" {n}" for n in numbers)
        if search.referenced_modseq(key) and hits:  # RFC 7162: the highest MODSEQ of the hits
            line += f" (MODSEQ {max(selected.modseqs.get(m.uid, m.modseq) for _, m in hits)})"
        session.send(line)
    await session.report_changes(expunge=by_uid)
    session.send(responses.OK_COMPLETED.line(command.tag, command=command.name))


def _answer_esearch(
    session: Session,
    command: protocol.Command,
    key: search.SearchKey,
    hits: list[tuple[int, Message]],
    options: frozenset[str],
) -> None:
    """SEARCH RETURN (...): the ESEARCH response (RFC 4731) and the result SAVEd for `$` (RFC 5182)."""
    selected = session.selected
    assert selected is not None
    by_uid = command.name == "UID SEARCH"
    if "SAVE" in options:
        selected.saved = protocol.saved_numbers([m.uid for _, m in hits], options)
    modseq = None
    if search.referenced_modseq(key) and hits:
        modseq = max(selected.modseqs.get(m.uid, m.modseq) for _, m in hits)
    numbers = [m.uid if by_uid else seq for seq, m in hits]
    line = protocol.format_esearch(command.tag, uid=by_uid, numbers=numbers, options=options, modseq=modseq)
    if line is not None:
        session.send(line)


async def _matching(session: Session, key: search.SearchKey) -> list[tuple[int, Message]]:
    """The messages of the selected folder that match `key`, as (sequence number, message), in order:
    SEARCH's answer, and the messages SORT and THREAD order (mailnode.imap.commands.sort; private, as
    every public coroutine of a command module is a handler)."""
    selected = session.selected
    assert selected is not None and session.account is not None and session.user is not None
    messages = await session.account.messages(selected.name)
    by_uid_map = {m.uid: m for m in messages}
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
    fast: list[int] | None = None
    if isinstance(key, search.Flag):
        fast = _flag_hits(key.flag, key.present, ordered, selected)
    elif isinstance(key, search.Header) and indexed is not None:
        field = key.field.lower()
        values = [indexed.get(m.uid, {}).get(field) for _, m in ordered]
        try:
            fast, spent = await _GATEWAY.run(_field_hits, key.value, values, spent=spent, budget=CPU_BUDGET)
        except _OverBudget:
            raise responses.Refused(responses.NO_SEARCH_LIMIT) from None
    if fast is not None:
        hits, ordered = [ordered[position] for position in fast], []  # nothing left to evaluate
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
