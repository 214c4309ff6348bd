"""IMAP SORT, THREAD and their UID forms (RFC 5256): the messages SEARCH's criteria match
(mailnode.imap.commands.search.matching), their header fields read, then ordered or threaded by the pure
mailnode.imap.sort. Declared in mailnode.imap.commands.TABLE.

Header fields are read from the header block only, and kept in the session's analysis cache beside
those SEARCH looks up, so a webmail sorting the same folder again reads no file.
"""

from __future__ import annotations

from mailnode.imap import mime, protocol, responses, search, sort
from mailnode.imap.commands.search import _matching as matching  # SEARCH's evaluation, shared (not a handler)
from mailnode.imap.session import Session
from mailnode.store.account import Message

_BATCH = 256  # header blocks read per Gateway trip
_WANTED = frozenset(name.lower() for name in sort.HEADER_FIELDS)


async def _fields(session: Session, hits: list[tuple[int, Message]]) -> list[sort.Fields]:
    """Each message's sort.Fields, its header fields from the cache or read from its header block."""
    assert session.account is not None and session.user is not None
    address = session.user.address
    cache = session.analysis_cache
    out: list[sort.Fields] = []
    for start in range(0, len(hits), _BATCH):
        chunk = hits[start : start + _BATCH]
        known = [cache.headers((address, m.path)) for _, m in chunk]
        unread = [m for (_, m), values in zip(chunk, known, strict=True) if not values.keys() >= _WANTED]
        if unread:
            analyses = await session.analyses(unread)
            present = [m for m in unread if m.uid in analyses]  # the others were expunged meanwhile
            limits = [analyses[m.uid].root.body_start for m in present]
            for message, data in zip(present, await session.account.read(present, limits=limits), strict=True):
                values = cache.headers((address, message.path))
                for name in sort.HEADER_FIELDS:
                    values.setdefault(name.lower(), mime.header_value(data, analyses[message.uid], name))
        for (seq, message), values in zip(chunk, known, strict=True):
            out.append(
                sort.fields(
                    seq=seq,
                    uid=message.uid,
                    size=message.size,
                    arrival=message.internal_date,
                    header=lambda name, v=values: v.get(name.lower()),  # type: ignore[misc]
                )
            )
    return out


async def sort_(session: Session, command: protocol.Command) -> None:
    """SORT, and UID SORT."""
    by_uid = command.name == "UID SORT"
    request = sort.parse_sort(list(command.args))
    hits = await matching(session, search.parse_search(request.search))
    ordered = sort.sort(await _fields(session, hits), request.criteria)
    session.send("* SORT" + "".join(f" {m.uid if by_uid else m.seq}" for m in ordered))
    await session.report_changes(expunge=by_uid)
    session.send(responses.OK_COMPLETED.line(command.tag, command=command.name))


async def thread(session: Session, command: protocol.Command) -> None:
    """THREAD, and UID THREAD."""
    by_uid = command.name == "UID THREAD"
    algorithm, criteria = sort.parse_thread(list(command.args))
    hits = await matching(session, search.parse_search(criteria))
    messages = await _fields(session, hits)
    algorithm_of = sort.thread_orderedsubject if algorithm == "ORDEREDSUBJECT" else sort.thread_references
    roots = algorithm_of(messages)
    threads = sort.format_threads(roots, uid=by_uid)
    session.send("* THREAD" + (f" {threads}" if threads else ""))  # RFC 5256 §4: no space before nothing
    await session.report_changes(expunge=by_uid)
    session.send(responses.OK_COMPLETED.line(command.tag, command=command.name))
