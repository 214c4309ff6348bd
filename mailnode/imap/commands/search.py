"""IMAP SEARCH and UID SEARCH (RFC 3501 §6.4.4, CONDSTORE's MODSEQ key): evaluates the keys that
mailnode.imap.search parses against each message, reading files only for keys that need content,
in batches. Declared in mailnode.imap.commands.TABLE.
"""

from __future__ import annotations

import datetime
import email.utils

from mailnode.imap import mime, protocol, responses, search
from mailnode.imap.session import Selected, Session
from mailnode.store.account import Message

_SEARCH_BATCH = 256  # messages (headers or whole) read per Gateway trip while answering SEARCH


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
        self._message = message
        self.seq = seq
        self.uid = message.uid
        self.size = message.size
        self._data = data
        self._analysis = analysis
        self._headers = headers  # this message's field values found so far (shared through the cache)

    # The rest is computed only when the search asks for it.
    @property
    def flags(self) -> frozenset[str]:
        flags = frozenset(self._selected.flags.get(self.uid, self._message.flags).split())
        return flags | {"\\Recent"} if self.uid in self._selected.recent else flags

    @property
    def internal_date(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self._message.internal_date, datetime.UTC)

    @property
    def modseq(self) -> int:
        return self._selected.modseqs.get(self.uid, self._message.modseq)

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
        return (mime.section(self._data, self._analysis, "HEADER") or b"").decode("utf-8", "replace")

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


async def search_(session: Session, command: protocol.Command) -> None:
    """SEARCH, and UID SEARCH."""
    selected = session.selected
    assert selected is not None and session.account is not None and session.user is not None
    by_uid = command.name == "UID SEARCH"
    key = search.parse_search(list(command.args))
    messages = await session.account.messages(selected.name)
    by_uid_map = {m.uid: m for m in messages}
    ordered = [(i + 1, by_uid_map[u]) for i, u in enumerate(selected.uids) if u in by_uid_map]
    hits: list[tuple[int, Message]] = []
    content = search.needs_content(key)
    body = search.needs_body(key)
    fields = search.header_fields(key)
    address = session.user.address
    cache = session.analysis_cache
    batch = _SEARCH_BATCH if content else max(len(ordered), 1)
    for start in range(0, len(ordered), batch):
        chunk = ordered[start : start + batch]
        datas: list[bytes | None] = [None] * len(chunk)
        analyses: dict[int, mime.Analysis] = {}
        headers = [cache.headers((address, m.path)) for _, m in chunk]
        if content:
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
        for (seq, message), data, known in zip(chunk, datas, headers, strict=True):
            analysis = analyses.get(message.uid)
            if search.evaluate(key, _Target(selected, seq, message, data, analysis, known)):
                hits.append((seq, message))
    numbers = [str(m.uid if by_uid else seq) for seq, m in hits]
    line = "* SEARCH" + "".join(f" {n}" for n in numbers)
    if search.referenced_modseq(key) and hits:  # RFC 7162: the highest MODSEQ of the hits
        line += f" (MODSEQ {max(selected.modseqs.get(m.uid, m.modseq) for _, m in hits)})"
    session.send(line)
    await session.report_changes(expunge=by_uid)
    session.send(responses.OK_COMPLETED.line(command.tag, command=command.name))
