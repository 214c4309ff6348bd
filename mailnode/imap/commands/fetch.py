"""IMAP FETCH and UID FETCH (RFC 3501 §6.4.5, CONDSTORE's CHANGEDSINCE and MODSEQ): reads rows and
message files in batches through the store, structures through the session's analysis cache, and
sets \\Seen where the items ask for it. Declared in mailnode.imap.commands.TABLE.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from mailnode.imap import mime, protocol, responses
from mailnode.imap.session import Session
from mailnode.store.account import Message

_READ_BATCH = 64  # message files read per Gateway trip while answering FETCH
_SUMMARY_BATCH = 1024  # messages per FETCH response batch when no file is read


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
    names = {item.name for item in items}
    needs_structure = bool(names & {"ENVELOPE", "BODYSTRUCTURE", "RFC822.HEADER", "RFC822.TEXT"}) or any(
        (item.name == "BODY" and item.section is None) or item.section for item in items
    )
    needs_data = any(item.section is not None for item in items) or bool(
        names & {"RFC822", "RFC822.HEADER", "RFC822.TEXT"}
    )
    # RFC 3501 §6.4.5: BODY[...] and RFC822(.TEXT) set \Seen; BODY.PEEK and EXAMINE do not.
    sets_seen = not selected.readonly and any(
        item.name in ("BODY", "RFC822", "RFC822.TEXT") and (item.section is not None or item.name != "BODY")
        for item in items
    )
    every = len(targets) > _READ_BATCH  # one query for the whole folder beats many small ones
    all_messages = {m.uid: m for m in await session.account.messages(selected.name)} if every else {}
    for start in range(0, len(targets), _READ_BATCH if needs_data else _SUMMARY_BATCH):
        chunk = targets[start : start + (_READ_BATCH if needs_data else _SUMMARY_BATCH)]
        datas: list[bytes] = []
        if all_messages:
            present = [(s, all_messages[u]) for s, u in chunk if u in all_messages]
            if needs_data:
                datas = await session.account.read([m for _, m in present])
        else:  # rows and files in one Gateway trip
            loaded = await session.account.load(selected.name, [u for _, u in chunk], data=needs_data)
            rows = {message.uid: (message, data) for message, data in loaded}
            present = [(s, rows[u][0]) for s, u in chunk if u in rows]
            datas = [rows[m.uid][1] or b"" for _, m in present]
        analyses: dict[int, mime.Analysis] = {}
        if needs_structure:
            analyses = await session.analyses([m for _, m in present])
            kept = [i for i, (_, m) in enumerate(present) if m.uid in analyses]
            if len(kept) < len(present):  # expunged by another session while we read
                present = [present[i] for i in kept]
                datas = [datas[i] for i in kept] if datas else datas
        if sets_seen:
            unseen = [m.uid for _, m in present if "\\Seen" not in selected.flags.get(m.uid, "").split()]
            if unseen:
                changed, _ = await session.account.store_flags(
                    selected.name, unseen, mode="+", flags=["\\Seen"], origin=session
                )
                for message in changed:
                    selected.flags[message.uid] = message.flags
                    selected.modseqs[message.uid] = message.modseq
        # One write per batch: a write per message would be a send() system call per message.
        session.write(
            b"".join(
                _render(
                    session, seq, message, items, by_uid, analyses.get(message.uid),
                    datas[i] if needs_data else None, sets_seen,
                )
                for i, (seq, message) in enumerate(present)
            )
        )  # fmt: skip
        await session.flush()
    await session.report_changes(expunge=by_uid)
    session.send(responses.OK_COMPLETED.line(command.tag, command=command.name))


def _render(
    session: Session,
    seq: int,
    message: Message,
    items: Sequence[protocol.FetchAtt],
    by_uid: bool,
    analysis: mime.Analysis | None,
    data: bytes | None,
    sets_seen: bool,
) -> bytes:
    """One FETCH response line (RFC 3501 §7.4.2)."""
    selected = session.selected
    assert selected is not None
    out: list[bytes] = []
    names = [item.name for item in items]
    if by_uid and "UID" not in names:  # RFC 3501 §6.4.8: UID FETCH always reports the UID
        out.append(f"UID {message.uid}".encode())
    flags_sent = False
    for item in items:
        name = item.name
        if name == "UID":
            out.append(f"UID {message.uid}".encode())
        elif name == "FLAGS":
            out.append(session.fetch_flags(message.uid).encode())
            flags_sent = True
        elif name == "INTERNALDATE":
            when = datetime.datetime.fromtimestamp(message.internal_date, datetime.UTC)
            out.append(f'INTERNALDATE "{protocol.format_datetime(when)}"'.encode())
        elif name == "RFC822.SIZE":
            out.append(f"RFC822.SIZE {message.size}".encode())
        elif name == "MODSEQ":
            out.append(f"MODSEQ ({selected.modseqs.get(message.uid, message.modseq)})".encode())
        elif name == "ENVELOPE":
            assert analysis is not None
            out.append(b"ENVELOPE " + analysis.envelope)
        elif name == "BODYSTRUCTURE":
            assert analysis is not None
            out.append(b"BODYSTRUCTURE " + analysis.bodystructure)
        elif name == "BODY" and item.section is None:
            assert analysis is not None
            out.append(b"BODY " + analysis.body)
        elif name == "RFC822":
            assert data is not None
            out.append(b"RFC822 " + protocol.quote(data))
        elif name in ("RFC822.HEADER", "RFC822.TEXT"):
            assert data is not None and analysis is not None
            body = mime.section(data, analysis, "HEADER" if name == "RFC822.HEADER" else "TEXT") or b""
            out.append(name.encode() + b" " + protocol.quote(body))
        elif name in ("BODY", "BODY.PEEK"):
            assert data is not None and item.section is not None
            if item.section == "":
                body = data  # the whole message: no structure needed
            else:
                assert analysis is not None
                body = mime.section(data, analysis, item.section, item.fields) or b""
            label = f"BODY[{item.section}"
            if item.fields:
                label += " (" + " ".join(item.fields) + ")"
            label += "]"
            if item.partial is not None:
                offset, length = item.partial
                body = body[offset : offset + length]
                label += f"<{offset}>"
            out.append(label.encode() + b" " + protocol.quote(body))
        else:
            raise responses.Refused(responses.BAD_FETCH_ITEM, item=name)
    if sets_seen and not flags_sent:  # RFC 3501 §6.4.5: a \Seen set by FETCH is reported
        out.append(session.fetch_flags(message.uid).encode())
    if session.condstore and "MODSEQ" not in names:
        out.append(f"MODSEQ ({selected.modseqs.get(message.uid, message.modseq)})".encode())
    return f"* {seq} FETCH (".encode() + b" ".join(out) + b")\r\n"
