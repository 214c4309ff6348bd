"""IMAP commands that change messages: STORE (with CONDSTORE's UNCHANGEDSINCE), COPY and MOVE
(COPYUID), EXPUNGE and UID EXPUNGE, APPEND (APPENDUID), each also in its UID form. They change
mail through the store's Account and tell the client at once. Declared in
mailnode.imap.commands.TABLE.
"""

from __future__ import annotations

from collections.abc import Sequence

from mailnode.imap import mime, protocol, responses
from mailnode.imap.commands.folders import store_refusals
from mailnode.imap.session import Session
from mailnode.store.account import MessageSpool


async def store(session: Session, command: protocol.Command) -> None:
    """STORE, and UID STORE (RFC 3501 §6.4.6)."""
    selected = session.selected
    assert selected is not None and session.account is not None
    if selected.readonly:
        raise responses.Refused(responses.NO_READ_ONLY)
    by_uid = command.name == "UID STORE"
    if len(command.args) < 3:
        raise responses.Refused(responses.BAD_STORE_ARGUMENTS)
    targets = session.messages_for(protocol.arg_text(command.args[0]), uid=by_uid)
    spec = protocol.parse_store(command.args[1:])
    if spec.unchanged_since is not None:
        session.condstore = True
    flags = spec.flags  # validated, system flags in canonical case
    with store_refusals():
        changed, failed = await session.account.store_flags(
            selected.name,
            [u for _, u in targets],
            mode=spec.mode,
            flags=flags,
            unchanged_since=spec.unchanged_since,
            origin=session,
        )
    for message in changed:
        selected.learn(message)
    changed_uids = {m.uid for m in changed}
    for seq, uid in targets:
        if uid in failed:
            continue
        if not spec.silent or (session.condstore and uid in changed_uids and spec.unchanged_since is not None):
            extra = f" UID {uid}" if by_uid else ""
            session.send(f"* {seq} FETCH ({session.fetch_flags(uid)}{extra})")
    await session.report_changes(expunge=by_uid)
    if failed:
        numbers = failed if by_uid else [selected.seq(u) for u in failed]
        session.send(responses.OK_MODIFIED.line(command.tag, numbers=",".join(map(str, numbers))))
    else:
        session.send(responses.OK_COMPLETED.line(command.tag, command=command.name))


async def copy(session: Session, command: protocol.Command) -> None:
    """COPY, MOVE (RFC 6851) and their UID forms; COPYUID is RFC 4315's."""
    selected = session.selected
    assert selected is not None and session.account is not None
    by_uid = command.name.startswith("UID ")
    move = command.name.endswith("MOVE")
    if len(command.args) != 2:
        raise responses.Refused(responses.BAD_COPY_ARGUMENTS, command=command.name)
    if move and selected.readonly:
        raise responses.Refused(responses.NO_READ_ONLY)
    targets = session.messages_for(protocol.arg_text(command.args[0]), uid=by_uid)
    dest = session.folder_name(command.args[1])
    if not targets:
        session.send(responses.OK_NOTHING_TO_DO.line(command.tag, command=command.name))
        return
    with store_refusals():
        uidvalidity, pairs = await session.account.copy(
            selected.name, [u for _, u in targets], dest, move=move, origin=session
        )
    copyuid = {
        "uidvalidity": uidvalidity,
        "sources": _uid_set([s for s, _ in pairs]),
        "destinations": _uid_set([d for _, d in pairs]),
    }
    if move:  # RFC 6851 §4.3: COPYUID in an untagged OK, then the EXPUNGEs
        session.send(responses.OK_MOVED.line(**copyuid))
        for src, _ in pairs:
            session.forget(src)
        await session.report_changes(expunge=True)
        session.send(responses.OK_COMPLETED.line(command.tag, command=command.name))
    else:
        await session.report_changes(expunge=by_uid)
        session.send(responses.OK_COPYUID.line(command.tag, command=command.name, **copyuid))


def _uid_set(uids: Sequence[int]) -> str:
    """Compact a list of UIDs into a sequence set: 1,2,3,7 -> 1:3,7 (order kept, as COPYUID needs)."""
    parts: list[str] = []
    start = prev = None
    for uid in uids:
        if start is not None and prev is not None and uid == prev + 1:
            prev = uid
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}:{prev}")
        start = prev = uid
    if start is not None:
        parts.append(str(start) if start == prev else f"{start}:{prev}")
    return ",".join(parts)


async def expunge(session: Session, command: protocol.Command) -> None:
    """EXPUNGE (RFC 3501 §6.4.3), and UID EXPUNGE (RFC 4315 §2.1): only the given UIDs."""
    selected = session.selected
    assert selected is not None and session.account is not None
    if selected.readonly:
        raise responses.Refused(responses.NO_READ_ONLY)
    candidates = selected.uids
    if command.name == "UID EXPUNGE":
        if not command.args:
            raise responses.Refused(responses.BAD_UID_EXPUNGE_ARGUMENTS)
        candidates = [u for _, u in session.messages_for(protocol.arg_text(command.args[0]), uid=True)]
    deleted = [u for u in candidates if "\\Deleted" in selected.flags.get(u, "").split()]
    with store_refusals():
        removed = await session.account.expunge(selected.name, deleted, origin=session)
    for uid in removed:
        session.forget(uid)
    await session.report_changes(expunge=True)
    session.send(responses.OK_COMPLETED.line(command.tag, command=command.name))


async def append(session: Session, command: protocol.Command) -> None:
    """APPEND (RFC 3501 §6.3.11), refused over the mailbox's quota. A large message literal was
    streamed into a store spool by the session (session.append_literal); MULTIAPPEND (RFC 3502) is
    not offered, so the message must be the command's last argument."""
    assert session.account is not None and session.user is not None
    request = protocol.parse_append(command.args, utf8=session.imap4rev2)
    literal = session.append_literal
    # RFC 5322 §2.1: stored and served with CRLF line ends, as Dovecot does (the streamed one was
    # converted as it arrived, in the session).
    message: bytes | MessageSpool = mime.crlf(request.message)
    if literal is not None:
        if not literal.last:
            raise protocol.ProtocolError("the message must be the last argument (MULTIAPPEND is not supported)")
        if literal.refused is not None:
            raise responses.Refused(literal.refused)
        assert literal.spool is not None
        message = literal.spool
    size = message.size if isinstance(message, MessageSpool) else len(message)
    if session.over_quota(size):
        raise responses.Refused(responses.NO_OVERQUOTA)
    internal_date = int(request.internal_date.timestamp()) if request.internal_date else None
    with store_refusals():
        uidvalidity, uid = await session.account.append(
            request.mailbox, message, flags=" ".join(sorted(set(request.flags))), internal_date=internal_date
        )
    await session.report_changes(expunge=True)
    session.send(responses.OK_APPENDUID.line(command.tag, uidvalidity=uidvalidity, uid=uid))
