"""IMAP commands on folders: SELECT and EXAMINE, CLOSE and UNSELECT, CREATE, DELETE, RENAME,
SUBSCRIBE and UNSUBSCRIBE, LIST and LSUB (with LIST-EXTENDED selection, SPECIAL-USE and LIST-STATUS), STATUS,
and the QUOTA commands. Declared in mailnode.imap.commands.TABLE.

A session that enabled IMAP4rev2 (RFC 9051) gets its forms: folder names in UTF-8 rather than modified UTF-7,
no RECENT response and no UNSEEN code from SELECT, which lists the folder instead (§6.3.2), and STATUS DELETED.

`store_refusals` turns what the store refuses into NO responses; these commands and those of
mailnode.imap.commands.store wrap their changes in it.
"""

from __future__ import annotations

import contextlib
import unicodedata
from collections.abc import Collection, Iterator

from mailnode.imap import protocol, responses
from mailnode.imap.session import DELIMITER, SPECIAL_USE, FolderView, Selected, Session
from mailnode.store import account
from mailnode.store.account import Folder

SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")


@contextlib.contextmanager
def store_refusals() -> Iterator[None]:
    """RFC 5530 codes for what the store refuses: a folder name it cannot store (CANNOT), one too long
    for its file system (LIMIT), and a full volume (OVERQUOTA)."""
    try:
        yield
    except account.FolderNameTooLong as error:
        raise responses.Refused(responses.NO_MAILBOX_NAME_TOO_LONG, error=error) from None
    except account.InvalidFolderName as error:
        raise responses.Refused(responses.NO_INVALID_MAILBOX_NAME, error=error) from None
    except account.StorageFull:
        raise responses.Refused(responses.NO_DISK_FULL) from None


async def select(session: Session, command: protocol.Command) -> None:
    """SELECT, and EXAMINE (the same, read-only)."""
    assert session.account is not None
    request = protocol.parse_select(command.args, utf8=session.imap4rev2)
    readonly = command.name == "EXAMINE"
    if request.condstore:  # RFC 7162 §3.2.8: SELECT mailbox (CONDSTORE)
        session.condstore = True
    if request.qresync is not None and not session.qresync:  # RFC 7162 §3.2.5: ENABLE QRESYNC first
        raise responses.Refused(responses.BAD_QRESYNC_NOT_ENABLED)
    name = request.mailbox
    if session.selected is not None:
        session.selected = None
        session.send(responses.OK_CLOSED.line())
    shown: list[FolderView] = []  # the shared version the folder is as it is now, when there is one

    def unchanged(folder: Folder) -> bool:
        version = session.current_version(folder)
        shown[:] = [] if version is None else [version]
        return version is not None

    with store_refusals(), session.selecting() as heard:
        result = await session.account.select(name, take_recent=not readonly, unchanged=unchanged)
    if result is None:
        raise responses.Refused(responses.NO_NO_SUCH_MAILBOX, mailbox=name)
    folder = result.folder
    selected: Selected = session.select(
        folder=folder,
        messages=shown[0] if result.messages is None else result.messages,
        readonly=readonly,
        first_recent=result.first_recent,
        heard=heard,
    )
    session.send(f"* FLAGS ({' '.join(SYSTEM_FLAGS)})")
    session.send(responses.OK_PERMANENTFLAGS.line(flags=" ".join(SYSTEM_FLAGS)))
    session.send(f"* {len(selected.uids)} EXISTS")
    if session.imap4rev2:  # RFC 9051 §6.3.2: no RECENT, no UNSEEN code; a LIST response names the folder
        await _send_selected_list(session, folder.name, protocol.arg_text(command.args[0]))
    else:
        session.send(f"* {len(selected.recent)} RECENT")
        flags = selected.flags
        unseen = next((i + 1 for i, uid in enumerate(selected.uids) if "\\Seen" not in flags[uid].split()), None)
        if unseen is not None:
            session.send(responses.OK_UNSEEN.line(seq=unseen))
    session.send(responses.OK_UIDVALIDITY.line(uidvalidity=folder.uidvalidity))
    session.send(responses.OK_UIDNEXT.line(uidnext=folder.uidnext))
    session.send(responses.OK_HIGHESTMODSEQ.line(modseq=folder.highestmodseq))
    if request.qresync is not None and request.qresync.uidvalidity == folder.uidvalidity:
        _resync(session, request.qresync)
    access = "READ-ONLY" if readonly else "READ-WRITE"
    session.send(responses.OK_SELECTED.line(command.tag, access=access, command=command.name))


async def _send_selected_list(session: Session, name: str, sent: str) -> None:
    """IMAP4rev2's LIST response in SELECT's answer (RFC 9051 §6.3.2): the folder's accurate attributes, and,
    when the client sent the name in a denormalized form (not Unicode NFC, §5.1), that form as OLDNAME."""
    assert session.account is not None
    folders = await session.account.folders()
    names = {f.name for f in folders}
    line = _list_line(session, "LIST", name, _attributes(name, names, lsub=False, subscribed=False))
    if unicodedata.normalize("NFC", sent) != sent:
        line += b' ("OLDNAME" (' + protocol.quote(sent, utf8=True) + b"))"
    session.send(line)


def _attributes(name: str, names: Collection[str], *, lsub: bool, subscribed: bool) -> list[str]:
    """A folder's LIST attributes: RFC 3348 CHILDREN, RFC 6154 special use (not in LSUB), and RFC 5258
    \\Subscribed when `subscribed` (asked for, and it is)."""
    children = any(n.startswith(name + DELIMITER) for n in names)
    attributes = ["\\HasChildren" if children else "\\HasNoChildren"]
    if name in SPECIAL_USE and not lsub:
        attributes.append(SPECIAL_USE[name])
    if subscribed:
        attributes.append("\\Subscribed")
    return attributes


def _list_line(session: Session, response: str, name: str, attributes: list[str]) -> bytes:
    """`* LIST (attributes) "/" name`, the name in the session's form (UTF-8 under IMAP4rev2)."""
    encoded = protocol.format_mailbox_name(name, utf8=session.imap4rev2)
    return f'* {response} ({" ".join(attributes)}) "{DELIMITER}" '.encode() + encoded


def _resync(session: Session, known: protocol.Qresync) -> None:
    """RFC 7162 §3.2.5.1: what changed since the client's mod-sequence: the UIDs it knew that are gone
    (every known UID not here: the store keeps no record of when a message was expunged, which the RFC
    allows), then the flags of the messages changed since."""
    selected = session.selected
    assert selected is not None
    vanished = protocol.missing_numbers(known.known_uids, selected.uids, selected.uidnext - 1)
    if vanished:
        session.send(f"* VANISHED (EARLIER) {vanished}")
    for seq, uid in enumerate(selected.uids, 1):
        if selected.modseqs.get(uid, 0) > known.modseq:
            session.send(f"* {seq} FETCH (UID {uid} {session.fetch_flags(uid)})")


async def close(session: Session, command: protocol.Command) -> None:
    """RFC 3501 §6.4.2: expunge silently (unless read-only), then leave the selected state."""
    selected = session.selected
    assert selected is not None and session.account is not None
    if not selected.readonly:
        deleted = [u for u in selected.uids if "\\Deleted" in selected.flags.get(u, "").split()]
        if deleted:
            with store_refusals():
                await session.account.expunge(selected.name, deleted, origin=session)
    session.selected = None
    session.send(responses.OK_COMPLETED.line(command.tag, command=command.name))


async def unselect(session: Session, command: protocol.Command) -> None:
    session.selected = None  # RFC 3691: as CLOSE, without the expunge
    session.send(responses.OK_COMPLETED.line(command.tag, command=command.name))


async def create(session: Session, command: protocol.Command) -> None:
    assert session.account is not None
    if not command.args:
        raise responses.Refused(responses.BAD_NEEDS_MAILBOX, command=command.name)
    name = session.folder_name(command.args[0])
    # RFC 3501 §6.3.3: a trailing delimiter declares the intent to create children: the folder is made.
    name = name.removesuffix(DELIMITER) if name != DELIMITER else name
    if name.upper() == "INBOX":
        raise responses.Refused(responses.NO_INBOX_EXISTS)
    if name in {f.name for f in await session.account.folders()}:
        raise responses.Refused(responses.NO_MAILBOX_EXISTS, mailbox=name)
    with store_refusals():
        await session.account.create_folder(name)  # and its missing superiors
    session.send(responses.OK_COMPLETED.line(command.tag, command=command.name))


async def delete(session: Session, command: protocol.Command) -> None:
    assert session.account is not None
    if not command.args:
        raise responses.Refused(responses.BAD_NEEDS_MAILBOX, command=command.name)
    name = session.folder_name(command.args[0])
    with store_refusals():
        await session.account.delete_folder(name)
    if session.selected is not None and session.selected.name == name:
        session.selected = None
    session.send(responses.OK_COMPLETED.line(command.tag, command=command.name))


async def rename(session: Session, command: protocol.Command) -> None:
    assert session.account is not None
    if len(command.args) != 2:
        raise responses.Refused(responses.BAD_RENAME_ARGUMENTS)
    old, new = session.folder_name(command.args[0]), session.folder_name(command.args[1])
    if new.upper() == "INBOX":
        raise responses.Refused(responses.NO_INBOX_EXISTS)
    with store_refusals():
        await session.account.rename_folder(old, new)
    session.send(responses.OK_COMPLETED.line(command.tag, command=command.name))


async def subscribe(session: Session, command: protocol.Command) -> None:
    """SUBSCRIBE, and UNSUBSCRIBE."""
    assert session.account is not None
    if not command.args:
        raise responses.Refused(responses.BAD_NEEDS_MAILBOX, command=command.name)
    with store_refusals():
        await session.account.subscribe(session.folder_name(command.args[0]), command.name == "SUBSCRIBE")
    session.send(responses.OK_COMPLETED.line(command.tag, command=command.name))


async def list_(session: Session, command: protocol.Command) -> None:
    """LIST (RFC 3501 §6.3.8, RFC 5258 selection and return options), and LSUB."""
    assert session.account is not None
    options = protocol.parse_list_args(command.args, imap4rev2=session.imap4rev2)
    folders = sorted(await session.account.folders(), key=lambda f: (f.name != "INBOX", f.name))  # INBOX first
    names = {f.name for f in folders}
    subscribed_names = {f.name for f in folders if f.subscribed}
    lsub = command.name == "LSUB"
    subscribed_only = lsub or "SUBSCRIBED" in options.selection
    # RFC 5258 §3.5 RECURSIVEMATCH: a folder not subscribed itself, with a subscribed descendant, is listed
    # with CHILDINFO saying so.
    recursive = "SUBSCRIBED" in options.selection and "RECURSIVEMATCH" in options.selection
    for folder in folders if options.patterns else []:
        if not any(protocol.mailbox_matches(p, folder.name, DELIMITER) for p in options.patterns):
            continue
        childinfo = False
        if subscribed_only and not folder.subscribed:
            childinfo = recursive and any(n.startswith(folder.name + DELIMITER) for n in subscribed_names)
            if not childinfo:
                continue
        if "SPECIAL-USE" in options.selection and folder.name not in SPECIAL_USE:  # RFC 6154 §5.1
            continue
        subscribed = folder.subscribed and "SUBSCRIBED" in options.returns
        line = _list_line(
            session, command.name, folder.name, _attributes(folder.name, names, lsub=lsub, subscribed=subscribed)
        )
        session.send(line + (b' ("CHILDINFO" ("SUBSCRIBED"))' if childinfo else b""))
        if "STATUS" in options.returns and not lsub:  # RFC 5819 LIST-STATUS: after the folder's LIST
            status_line = await _status_line(session, folder.name, options.status_items)
            if status_line is not None:  # deleted meanwhile: RFC 5819 §2 leaves its STATUS out
                session.send(status_line)
    if not options.patterns:  # RFC 3501 §6.3.8: an empty pattern asks for the delimiter
        session.send(f'* {command.name} (\\Noselect) "{DELIMITER}" ""')
    session.send(responses.OK_COMPLETED.line(command.tag, command=command.name))


async def status(session: Session, command: protocol.Command) -> None:
    request = protocol.parse_status(command.args, imap4rev2=session.imap4rev2)
    session.condstore |= "HIGHESTMODSEQ" in request.items  # RFC 7162 §3.1: a CONDSTORE enabling command
    line = await _status_line(session, request.mailbox, request.items)
    if line is None:
        raise responses.Refused(responses.NO_NO_SUCH_MAILBOX, mailbox=request.mailbox)
    session.send(line)
    session.send(responses.OK_COMPLETED.line(command.tag, command=command.name))


async def _status_line(session: Session, name: str, items: list[str]) -> bytes | None:
    """The STATUS response for a folder (RFC 3501 §7.2.4), for STATUS and LIST-STATUS; None if it is not there."""
    assert session.account is not None
    found = await session.account.status(name)
    if found is None:
        return None
    folder = found.folder
    values = {
        "MESSAGES": found.messages,
        "RECENT": found.recent,
        "UIDNEXT": folder.uidnext,
        "UIDVALIDITY": folder.uidvalidity,
        "UNSEEN": found.unseen,
        "HIGHESTMODSEQ": folder.highestmodseq,  # RFC 7162 (CONDSTORE)
        "SIZE": found.size,  # RFC 8438
        "DELETED": found.deleted,  # RFC 9051 §6.3.11 (asked for by IMAP4rev2 sessions only)
    }
    shown = [f"{key} {values[key]}" for key in items]
    encoded = protocol.format_mailbox_name(folder.name, utf8=session.imap4rev2)
    return b"* STATUS " + encoded + f" ({' '.join(shown)})".encode()


def _quota_line(session: Session) -> str:
    assert session.user is not None
    used_kib = (session.store.usage(session.user.address).bytes + 1023) // 1024
    if not session.user.quota:
        return '* QUOTA "" ()'
    return f'* QUOTA "" (STORAGE {used_kib} {session.user.quota // 1024})'  # RFC 2087: units of 1024 octets


async def getquota(session: Session, command: protocol.Command) -> None:
    if not command.args or protocol.arg_text(command.args[0]) != "":
        raise responses.Refused(responses.NO_NO_SUCH_QUOTA_ROOT)
    session.send(_quota_line(session))
    session.send(responses.OK_COMPLETED.line(command.tag, command=command.name))


async def getquotaroot(session: Session, command: protocol.Command) -> None:
    if not command.args:
        raise responses.Refused(responses.BAD_NEEDS_MAILBOX, command=command.name)
    session.send(b"* QUOTAROOT " + protocol.format_mailbox(protocol.arg_text(command.args[0])) + b' ""')
    session.send(_quota_line(session))
    session.send(responses.OK_COMPLETED.line(command.tag, command=command.name))


async def setquota(session: Session, command: protocol.Command) -> None:
    raise responses.Refused(responses.NO_QUOTA_READONLY)
