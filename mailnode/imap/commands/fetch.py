"""IMAP FETCH and UID FETCH (RFC 3501 §6.4.5, CONDSTORE's CHANGEDSINCE and MODSEQ): reads rows and
message files in batches through the store, structures through the session's analysis cache, and
sets \\Seen where the items ask for it. Declared in mailnode.imap.commands.TABLE.

Memory stays bounded per session whatever the client reads (issue 12): small messages go out a batch
per write (the last batch with the tagged OK: Session.flush), a large one alone, its whole-message
literals (BODY[], RFC822) and sections (BODY[2], BODY[1.MIME], RFC822.TEXT, ...: where they lie, from
its structure) streamed from its file in chunks, and every write waits for the transport to drain
before the next data is read. Only BINARY, which decodes, reads a large message whole.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
from collections.abc import Callable, Mapping, Sequence

from mailnode.imap import mime, protocol, responses
from mailnode.imap.session import Selected, Session
from mailnode.store.account import Message, MessageFile

_READ_BATCH = 64  # message files read per Gateway trip while answering FETCH
_SUMMARY_BATCH = 1024  # messages per FETCH response batch when no file is read
_LARGE = 128 * 1024  # a message larger than this is sent alone, never read with a batch
_CHUNK = 64 * 1024  # bytes read from a message file per step of a streamed literal
_CACHED_READS = 4  # at most this many small messages are read at once on the loop from the page cache
_STATIC = frozenset(("RFC822.SIZE", "INTERNALDATE", "ENVELOPE", "BODYSTRUCTURE", "BODY"))  # BODY: no section
_ANALYSED = frozenset(("ENVELOPE", "BODYSTRUCTURE", "BODY"))  # from the message's structure
_SUMMARY = _STATIC | {"UID", "FLAGS", "MODSEQ"}


@dataclasses.dataclass(frozen=True)
class _FileRange:
    """Bytes [start, end) of the message file, sent as they are read (the literal's `{n}` precedes)."""

    start: int
    end: int


Piece = bytes | _FileRange


async def fetch(session: Session, command: protocol.Command) -> None:
    """FETCH, and UID FETCH."""
    selected = session.selected
    assert selected is not None and session.account is not None
    by_uid = command.name == "UID FETCH"
    if len(command.args) < 2:
        raise responses.Refused(responses.BAD_FETCH_ARGUMENTS)
    targets = session.messages_for(protocol.arg_text(command.args[0]), uid=by_uid)
    items = protocol.parse_fetch_items([command.args[1]])
    changed_since = None
    if len(command.args) > 2:
        modifiers = protocol.parse_fetch_modifiers(command.args[2:])
        changed_since = modifiers.changed_since
        session.condstore = True
    if any(item.name == "MODSEQ" for item in items):
        session.condstore = True
    if changed_since is not None:
        targets = [(s, u) for s, u in targets if selected.modseqs.get(u, 0) > changed_since]
    if len(command.args) > 2 and modifiers.vanished:
        _vanished(session, command)
    names = {item.name for item in items}
    needs_structure = bool(names & {"ENVELOPE", "BODYSTRUCTURE", "RFC822.HEADER", "RFC822.TEXT"}) or any(
        (item.name == "BODY" and item.section is None) or item.section or item.name.startswith("BINARY")
        for item in items
    )
    needs_data = any(item.section is not None for item in items) or bool(
        names & {"RFC822", "RFC822.HEADER", "RFC822.TEXT"}
    )
    # RFC 3501 §6.4.5: BODY[...] and RFC822(.TEXT) set \Seen; BODY.PEEK and EXAMINE do not.
    sets_seen = not selected.readonly and any(item.sets_seen for item in items)  # and BINARY[...], RFC 3516
    plan = _summary_plan(items, by_uid)
    for start in range(0, len(targets), _READ_BATCH if needs_data else _SUMMARY_BATCH):
        if start:  # the previous batch drains before the next is read; the last goes with the tagged OK
            await session.flush()
        chunk = targets[start : start + (_READ_BATCH if needs_data else _SUMMARY_BATCH)]
        known = _known_rows(selected)
        preread: dict[int, bytes] = {}  # the small messages' files, read with their rows (one trip)
        cached = _read_cached(session, chunk, known) if needs_data and len(chunk) <= _CACHED_READS else None
        if not needs_data and all(u in known for _, u in chunk):
            present = [(s, known[u]) for s, u in chunk]
        elif cached is not None:
            present = [(s, known[u]) for s, u in chunk]
            preread = cached
        else:
            loaded = await session.account.load(
                selected.name, [u for _, u in chunk], data=needs_data, data_limit=_LARGE, known=known
            )
            rows = {message.uid: message for message, _ in loaded}
            preread = {message.uid: data for message, data in loaded if data is not None}
            present = [(s, rows[u]) for s, u in chunk if u in rows]
        if plan is not None:  # nothing to read, nothing to mark \Seen
            session.write(await _summaries(session, present, plan))
            continue
        analyses: dict[int, mime.Analysis] = {}
        if needs_structure:
            analyses = await session.analyses([m for _, m in present])
            present = [(s, m) for s, m in present if m.uid in analyses]  # the others were expunged meanwhile
        if sets_seen:
            unseen = [m.uid for _, m in present if "\\Seen" not in selected.flags.get(m.uid, "").split()]
            if unseen:
                changed, _ = await session.account.store_flags(
                    selected.name, unseen, mode="+", flags=["\\Seen"], origin=session
                )
                for message in changed:
                    selected.learn(message)
        unread = [m for _, m in present if m.size <= _LARGE and m.uid not in preread] if needs_data else []
        datas = dict(zip((m.uid for m in unread), await session.account.read(unread), strict=True)) if unread else {}
        datas.update(preread)
        # One write per batch of small messages: a write per message would be a send() system call each.
        pending: list[bytes] = []
        for seq, message in present:
            analysis = analyses.get(message.uid)
            if not needs_data or message.uid in datas:
                pieces = _render(session, seq, message, items, by_uid, analysis, datas.get(message.uid), 0, sets_seen)
                pending.extend(p for p in pieces if isinstance(p, bytes))  # the message was read: no _FileRange
                continue
            session.write(b"".join(pending))
            pending = []
            await session.flush()
            await _send_large(session, seq, message, items, by_uid, analysis, sets_seen)
        session.write(b"".join(pending))
    await session.report_changes(expunge=by_uid)
    session.send(responses.OK_COMPLETED.line(command.tag, command=command.name))


def _read_cached(
    session: Session, chunk: Sequence[tuple[int, int]], known: Mapping[int, Message]
) -> dict[int, bytes] | None:
    """The files of a few small known messages when the page cache holds them all (Account.read_cached):
    a FETCH BODY.PEEK[] of one message is answered without a Gateway trip. None: read them the usual way."""
    assert session.account is not None
    read: dict[int, bytes] = {}
    for _, uid in chunk:
        message = known.get(uid)
        if message is None or message.size > _LARGE:
            return None
        data = session.account.read_cached(message)
        if data is None:
            return None
        read[uid] = data
    return read


def _known_rows(selected: Selected) -> Mapping[int, Message]:
    """The rows FETCH need not query (FolderView.rows): those of the session's folder version, but for
    the messages expunged meanwhile that the session has not taken in yet. Those, and the ones expunged
    that the client has not been told of, are queried, and left out (they have nothing left to fetch)."""
    known = selected.view.rows
    gone = {uid for change in selected.pending if change.kind == "expunged" for uid in change.uids}
    return {uid: row for uid, row in known.items() if uid not in gone} if gone else known


def _vanished(session: Session, command: protocol.Command) -> None:
    """UID FETCH ... (CHANGEDSINCE n VANISHED) (RFC 7162 §3.2.6): the UIDs of the set that are gone, before
    the FETCH responses (all of them: the store does not keep when a message was expunged)."""
    selected = session.selected
    assert selected is not None
    if command.name != "UID FETCH" or not session.qresync:
        raise responses.Refused(responses.BAD_VANISHED)
    text = protocol.arg_text(command.args[0])
    if text == protocol.SAVED:  # `$`: the saved UIDs, here or gone
        if not selected.saved:
            return
        text = protocol.format_sequence_set(selected.saved)
    largest = max(selected.uidnext - 1, selected.uids[-1] if selected.uids else 0)
    vanished = protocol.missing_numbers(protocol.parse_sequence_set(text), selected.uids, largest)
    if vanished:
        session.send(f"* VANISHED (EARLIER) {vanished}")


def _section_spec(item: protocol.FetchAtt) -> str | None:
    """The section an item takes from a part of the message (BODY[1], BODY.PEEK[HEADER.FIELDS (From)],
    RFC822.TEXT, ...): those are read or streamed from a large message's file alone; None for the others."""
    if item.name in ("RFC822.HEADER", "RFC822.TEXT"):
        return item.name.removeprefix("RFC822.")
    if item.name in ("BODY", "BODY.PEEK") and item.section:
        return item.section
    return None


async def _read_sections(
    file: MessageFile, items: Sequence[protocol.FetchAtt], analysis: mime.Analysis | None
) -> dict[int, list[Piece]]:
    """For a large message: the value of each item that takes a section (by its place in `items`), as the
    string read from the file when it is at most a chunk long (and for HEADER.FIELDS[.NOT]: from its
    header), else as a literal to stream from the file, a chunk at a time: no more of the message is
    held than a chunk, or a header."""
    values: dict[int, list[Piece]] = {}
    for index, item in enumerate(items):
        spec = _section_spec(item)
        if spec is None:
            continue
        span = mime.section_span(_analysed(analysis), spec)
        if span is None:  # no such part: empty, as for a small message
            values[index] = [protocol.quote(b"")]
            continue
        start, end = span
        offset, length = item.partial if item.partial is not None else (0, None)
        if "HEADER.FIELDS" in spec:  # made from the lines of its header
            body = mime.section_from(await file.read(start, end - start), spec, item.fields)
            values[index] = [protocol.quote(body[offset:] if length is None else body[offset : offset + length])]
            continue
        start = min(start + offset, end)
        end = end if length is None else min(end, start + length)
        if end - start <= _CHUNK:
            values[index] = [protocol.quote(await file.read(start, end - start))]
        else:
            values[index] = [b"{%d}\r\n" % (end - start), _FileRange(start, end)]
    return values


async def _send_large(
    session: Session,
    seq: int,
    message: Message,
    items: Sequence[protocol.FetchAtt],
    by_uid: bool,
    analysis: mime.Analysis | None,
    sets_seen: bool,
) -> None:
    """One FETCH response for a large message, alone: its whole-message literals and sections read from
    the file a chunk at a time, each write drained before the next read (BINARY, which decodes, reads
    the message whole: one message in memory at a time)."""
    assert session.account is not None
    async with session.account.open_message(message) as file:
        if file is None:  # expunged by another session meanwhile: left out
            return
        binary = any(item.name.startswith("BINARY") for item in items)
        data = await file.read(0, file.size) if binary else None
        sections = {} if binary else await _read_sections(file, items, analysis)
        for piece in _render(session, seq, message, items, by_uid, analysis, data, file.size, sets_seen, sections):
            if isinstance(piece, bytes):
                session.write(piece)
                continue
            for offset in range(piece.start, piece.end, _CHUNK):
                session.write(await file.read(offset, min(_CHUNK, piece.end - offset)))
                await session.flush()  # RFC 3501 gives no flow control: the transport's is ours
        await session.flush()


def _whole(data: bytes | None, size: int, offset: int = 0, length: int | None = None) -> list[Piece]:
    """A range of the whole message as a string: quoted or a literal from `data` when it was read, else
    a literal to stream from the file (`size` bytes long)."""
    if data is not None:
        return [protocol.quote(data[offset:] if length is None else data[offset : offset + length])]
    start = min(offset, size)
    end = size if length is None else min(size, offset + length)
    return [b"{%d}\r\n" % (end - start), _FileRange(start, end)]


def _binary(item: protocol.FetchAtt, data: bytes | None, analysis: mime.Analysis | None) -> list[Piece]:
    """BINARY[section]<partial> and BINARY.SIZE[section] (RFC 3516 §4.2): the section decoded, as a literal8
    when it holds NUL (the message was read: _send_large reads it whole for BINARY)."""
    assert item.section is not None and data is not None
    label = item.response_name().encode()
    try:
        body = mime.binary_section(data, _analysed(analysis), item.section)
    except mime.UnknownEncoding as error:
        raise responses.Refused(responses.NO_UNKNOWN_CTE, encoding=error.encoding[:40]) from None
    if item.name == "BINARY.SIZE":
        return [label + b" %d" % len(body)]
    if item.partial is not None:
        body = body[item.partial[0] : item.partial[0] + item.partial[1]]
    if b"\x00" in body:  # RFC 3516 §4.2: NUL only in a literal8
        return [label + b" ~{%d}\r\n" % len(body) + body]
    return [label + b" " + protocol.quote(body)]


def _given(sections: dict[int, list[Piece]] | None, index: int) -> list[Piece]:
    assert sections is not None  # _send_large reads every section item of a message it did not read whole
    return sections[index]


def _analysed(analysis: mime.Analysis | None) -> mime.Analysis:
    assert analysis is not None  # FETCH reads the structure for every item with a part number
    return analysis


def _static_item(name: str, message: Message, analysis: mime.Analysis | None) -> bytes:
    """An item of _STATIC: what it says never changes for a message (its file and row are never rewritten)."""
    if name == "RFC822.SIZE":
        return b"RFC822.SIZE %d" % message.size
    if name == "INTERNALDATE":
        when = datetime.datetime.fromtimestamp(message.internal_date, datetime.UTC)
        return f'INTERNALDATE "{protocol.format_datetime(when)}"'.encode()
    assert analysis is not None
    if name == "ENVELOPE":
        return b"ENVELOPE " + analysis.envelope
    if name == "BODYSTRUCTURE":
        return b"BODYSTRUCTURE " + analysis.bodystructure
    return b"BODY " + analysis.body


def _summary_plan(items: Sequence[protocol.FetchAtt], by_uid: bool) -> list[str | tuple[str, ...]] | None:
    """How to answer a FETCH of items that read no message data (FLAGS, UID, MODSEQ and those of _STATIC:
    a message list's usual summary) faster: the items in order, each run of _STATIC items one tuple,
    rendered once per message for every session (AnalysisCache.rendered) and joined to the others. None
    when other items are asked for."""
    plan: list[str | tuple[str, ...]] = []
    names = [item.name for item in items]
    if by_uid and "UID" not in names:  # RFC 3501 §6.4.8: UID FETCH always reports the UID
        plan.append("UID")
    for item in items:
        if item.section is not None or item.name not in _SUMMARY:
            return None
        if item.name not in _STATIC:
            plan.append(item.name)
        elif plan and isinstance(plan[-1], tuple):
            plan[-1] = (*plan[-1], item.name)
        else:
            plan.append((item.name,))
    return plan


async def _summaries(
    session: Session, present: Sequence[tuple[int, Message]], plan: Sequence[str | tuple[str, ...]]
) -> bytes:
    """The FETCH responses of these messages by a _summary_plan: the same bytes _render makes. Each run of
    _STATIC items comes from the folder version's memo (FolderView.rendered, shared by its sessions), else
    from the node's (AnalysisCache.rendered), else is rendered now and kept in both."""
    selected, user = session.selected, session.user
    assert selected is not None and user is not None
    cache, address = session.analysis_cache, user.address
    runs = [" ".join(step) for step in plan if isinstance(step, tuple)]
    memos = [selected.view.rendered.setdefault(run, {}) for run in runs]
    missing = [m for _, m in present if any(m.uid not in memo for memo in memos)]
    if missing:
        unrendered: list[Message] = []
        for message in missing:
            found = [cache.rendered((address, message.path, run)) for run in runs]
            if any(value is None for value in found):
                unrendered.append(message)
                continue
            for memo, value in zip(memos, found, strict=True):
                assert value is not None
                memo[message.uid] = value
        needs_analysis = any(name in _ANALYSED for step in plan if isinstance(step, tuple) for name in step)
        analyses = await session.analyses(unrendered) if needs_analysis and unrendered else {}
        for message in unrendered:
            if needs_analysis and message.uid not in analyses:
                continue  # expunged meanwhile: left out
            static_steps = [step for step in plan if isinstance(step, tuple)]
            for names, run, memo in zip(static_steps, runs, memos, strict=True):
                value = b" ".join(_static_item(name, message, analyses.get(message.uid)) for name in names)
                cache.keep_rendered((address, message.path, run), value)
                memo[message.uid] = value
    modseqs, flags = selected.modseqs, selected.flags
    recent_from = session.flags_recent_from()
    condstore = session.condstore
    # One format for every line, and per message the values of its steps, in order.
    formats: list[bytes] = []
    getters: list[Callable[[Message], object]] = []
    memo_steps = iter(memos)
    for step in plan:
        if isinstance(step, tuple):
            memo = next(memo_steps)
            formats.append(b"%s")
            getters.append(lambda m, memo=memo: memo[m.uid])  # type: ignore[misc]
        elif step == "UID":
            formats.append(b"UID %d")
            getters.append(lambda m: m.uid)
        elif step == "MODSEQ":
            formats.append(b"MODSEQ (%d)")
            getters.append(lambda m: modseqs.get(m.uid, m.modseq))
        elif condstore:  # FLAGS, with its MODSEQ
            formats.append(b"%s")
            getters.append(lambda m: session.fetch_flags(m.uid).encode())
        else:  # FLAGS
            formats.append(b"%s")
            getters.append(
                lambda m: _flags_bytes(flags.get(m.uid, ""), recent_from is not None and m.uid >= recent_from)
            )
    if condstore and "MODSEQ" not in plan:
        formats.append(b"MODSEQ (%d)")
        getters.append(lambda m: modseqs.get(m.uid, m.modseq))
    line = b"* %d FETCH (" + b" ".join(formats) + b")\r\n"
    first = memos[0] if memos else None
    return b"".join(
        [
            line % (seq, *[get(m) for get in getters])
            for seq, m in present
            if first is None or m.uid in first  # else expunged before it was rendered: left out
        ]
    )


@functools.lru_cache(maxsize=1024)
def _flags_bytes(flags: str, recent: bool) -> bytes:
    return Session.flags_text(flags, recent).encode()


def _render(
    session: Session,
    seq: int,
    message: Message,
    items: Sequence[protocol.FetchAtt],
    by_uid: bool,
    analysis: mime.Analysis | None,
    data: bytes | None,
    size: int,
    sets_seen: bool,
    sections: dict[int, list[Piece]] | None = None,
) -> list[Piece]:
    """One FETCH response line (RFC 3501 §7.4.2), as bytes and ranges of the file to stream: `data` is
    the message when it was read, else whole-message items are ranges of its file of `size` bytes and
    the items that take a section are in `sections` (_read_sections), by their place in `items`."""
    selected = session.selected
    assert selected is not None
    out: list[list[Piece]] = []
    names = [item.name for item in items]
    if by_uid and "UID" not in names:  # RFC 3501 §6.4.8: UID FETCH always reports the UID
        out.append([f"UID {message.uid}".encode()])
    flags_sent = False
    for index, item in enumerate(items):
        name = item.name
        if name == "UID":
            out.append([f"UID {message.uid}".encode()])
        elif name == "FLAGS":
            out.append([session.fetch_flags(message.uid).encode()])
            flags_sent = True
        elif name == "MODSEQ":
            out.append([f"MODSEQ ({selected.modseqs.get(message.uid, message.modseq)})".encode()])
        elif name in _STATIC and item.section is None:
            out.append([_static_item(name, message, analysis)])
        elif name == "RFC822":
            out.append([b"RFC822 ", *_whole(data, size)])
        elif name in ("RFC822.HEADER", "RFC822.TEXT"):
            if data is None:  # a large message's, read or streamed alone
                out.append([name.encode() + b" ", *_given(sections, index)])
                continue
            assert analysis is not None
            body = mime.section(data, analysis, "HEADER" if name == "RFC822.HEADER" else "TEXT") or b""
            out.append([name.encode() + b" " + protocol.quote(body)])
        elif name in ("BINARY", "BINARY.PEEK", "BINARY.SIZE"):
            out.append(_binary(item, data, analysis))
        elif name in ("BODY", "BODY.PEEK"):
            assert item.section is not None
            label = f"BODY[{item.section}"
            if item.fields:
                label += " (" + " ".join(item.fields) + ")"
            label += "]"
            offset, length = item.partial if item.partial is not None else (0, None)
            if item.partial is not None:
                label += f"<{offset}>"
            if item.section == "":  # the whole message: no structure needed
                out.append([label.encode() + b" ", *_whole(data, size, offset, length)])
                continue
            if data is None:  # a large message's, read or streamed alone
                out.append([label.encode() + b" ", *_given(sections, index)])
                continue
            assert analysis is not None
            body = mime.section(data, analysis, item.section, item.fields) or b""
            if item.partial is not None:
                body = body[offset : offset + (length or 0)]
            out.append([label.encode() + b" " + protocol.quote(body)])
        else:
            raise responses.Refused(responses.BAD_FETCH_ITEM, item=name)
    if sets_seen and not flags_sent:  # RFC 3501 §6.4.5: a \Seen set by FETCH is reported
        out.append([session.fetch_flags(message.uid).encode()])
    if session.condstore and "MODSEQ" not in names:
        out.append([f"MODSEQ ({selected.modseqs.get(message.uid, message.modseq)})".encode()])
    pieces: list[Piece] = [f"* {seq} FETCH (".encode()]
    for index, item_pieces in enumerate(out):
        if index:
            pieces.append(b" ")
        pieces.extend(item_pieces)
    pieces.append(b")\r\n")
    return pieces
