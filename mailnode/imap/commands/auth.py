"""IMAP commands about the connection and the login: CAPABILITY, ID, LOGOUT, STARTTLS, LOGIN,
AUTHENTICATE (PLAIN, with SASL-IR), ENABLE and NAMESPACE. Declared in mailnode.imap.commands.TABLE.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging

from mailnode.imap import protocol, responses
from mailnode.imap.session import DELIMITER, SPECIAL_USE, Session
from mailnode.store.account import FolderError

log = logging.getLogger(__name__)


async def capability(session: Session, command: protocol.Command) -> None:
    session.send(f"* CAPABILITY {session.capabilities()}")
    await session.report_changes(expunge=True)
    session.send(responses.OK_COMPLETED.line(command.tag, command="CAPABILITY"))


async def logout(session: Session, command: protocol.Command) -> bool:
    session.send(responses.BYE_LOGOUT.line())
    session.send(responses.OK_COMPLETED.line(command.tag, command="LOGOUT"))
    return False


async def id_(session: Session, command: protocol.Command) -> None:
    session.send('* ID ("name" "Mailfleet" "vendor" "Mailfleet")')  # RFC 2971
    session.send(responses.OK_COMPLETED.line(command.tag, command="ID"))


async def starttls(session: Session, command: protocol.Command) -> None:
    if session.is_tls:
        raise responses.Refused(responses.BAD_TLS_ACTIVE)
    if not session.tls_available:
        raise responses.Refused(responses.NO_TLS_UNAVAILABLE)
    session.send(responses.OK_BEGIN_TLS.line(command.tag))
    await session.flush()
    await session.start_tls()


def _plaintext_refused(session: Session) -> bool:
    return not session.is_tls and not session.config.imap.allow_plaintext_login


async def _log_in(session: Session, tag: str, username: str, password: str) -> None:
    user = await session.authenticator.authenticate(username, password, remote=session.remote, protocol="imap")
    if user is None:
        log.info("imap auth failed", extra={"fields": {"client": session.remote}})
        raise responses.Refused(responses.NO_AUTHENTICATION_FAILED)
    account = session.log_in(user)
    # The special-use folders (RFC 6154) exist from the first login on: clients file mail there at once.
    existing = {f.name for f in await account.folders()}
    for name in SPECIAL_USE:
        if name not in existing:
            with contextlib.suppress(FolderError):
                await account.create_folder(name)
    session.send(responses.OK_LOGGED_IN.line(tag, capabilities=session.capabilities()))


async def login(session: Session, command: protocol.Command) -> None:
    if _plaintext_refused(session):
        raise responses.Refused(responses.NO_LOGIN_BEFORE_TLS)
    args = command.args
    if len(args) != 2:
        raise responses.Refused(responses.BAD_LOGIN_ARGUMENTS)
    await _log_in(session, command.tag, protocol.arg_text(args[0]), protocol.arg_text(args[1]))


async def authenticate(session: Session, command: protocol.Command) -> None:
    args = command.args
    if not args or protocol.arg_text(args[0]).upper() != "PLAIN":
        raise responses.Refused(responses.NO_ONLY_PLAIN)
    if _plaintext_refused(session):
        raise responses.Refused(responses.NO_AUTHENTICATE_BEFORE_TLS)
    if len(args) > 1:  # RFC 4959 SASL-IR
        response = protocol.arg_text(args[1])
    else:
        session.send(responses.CONTINUE_AUTHENTICATE)
        await session.flush()
        line = await session.readline()
        if line is None:
            raise ConnectionError("client went away during AUTHENTICATE")
        response = line.decode("ascii", "replace")
    if response == "*":  # RFC 3501 §6.2.2
        raise responses.Refused(responses.BAD_AUTHENTICATE_CANCELLED)
    try:
        decoded = base64.b64decode(response, validate=True) if response != "=" else b""
    except (binascii.Error, ValueError):
        raise responses.Refused(responses.BAD_PLAIN_BASE64) from None
    fields = decoded.split(b"\0")  # RFC 4616 §2
    if len(fields) != 3:
        raise responses.Refused(responses.BAD_PLAIN_FIELDS)
    await _log_in(session, command.tag, fields[1].decode("utf-8", "replace"), fields[2].decode("utf-8", "replace"))


async def enable(session: Session, command: protocol.Command) -> None:
    enabled = []
    for arg in command.args:
        if protocol.arg_text(arg).upper() == "CONDSTORE":
            session.condstore = True
            enabled.append("CONDSTORE")
    session.send(f"* ENABLED {' '.join(enabled)}".rstrip())  # RFC 5161
    session.send(responses.OK_COMPLETED.line(command.tag, command="ENABLE"))


async def namespace(session: Session, command: protocol.Command) -> None:
    session.send(f'* NAMESPACE (("" "{DELIMITER}")) NIL NIL')  # RFC 2342
    session.send(responses.OK_COMPLETED.line(command.tag, command="NAMESPACE"))
