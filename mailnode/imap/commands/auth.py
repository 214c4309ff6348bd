"""IMAP commands about the connection and the login: CAPABILITY, ID, LOGOUT, STARTTLS, LOGIN,
AUTHENTICATE (PLAIN, with SASL-IR), ENABLE (CONDSTORE, QRESYNC, IMAP4rev2) and NAMESPACE. Declared in
mailnode.imap.commands.TABLE.

Clustered, a login is where a session finds its mailbox's home (DESIGN.md "Clustering"): homed on another
node, the session is proxied there once the password was checked here (mailnode.imap.proxy); on the
internal port the only login is a peer's master login (AUTHENTICATE PLAIN with the internal credential).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging

from mailnode.config import MailboxEntry
from mailnode.imap import protocol, proxy, responses
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
    # The internal port has no TLS: the NetworkPolicy admits only the domain's own pods to it.
    return not session.is_tls and not session.internal and not session.config.imap.allow_plaintext_login


async def _log_in(session: Session, tag: str, username: str, password: str) -> bool | None:
    """Check the password, then either proxy the session to its mailbox's home (another node), or make
    the mailbox ready here and enter the authenticated state: all or nothing, so a LOGIN answered NO
    leaves the session as it was (not authenticated). False once a proxied session is over."""
    user = await session.authenticator.authenticate(username, password, remote=session.remote, protocol="imap")
    if user is None:
        log.info("imap auth failed", extra={"fields": {"client": session.remote}})
        raise responses.Refused(responses.NO_AUTHENTICATION_FAILED)
    if session.cluster is not None and not session.cluster.is_home(user):
        return await _proxy(session, session.cluster, tag, user)
    await _open_mailbox(session, tag, user)
    return None


async def _proxy(session: Session, cluster: proxy.Proxy, tag: str, user: MailboxEntry) -> bool:
    """Log in at the home and relay the session there until either side closes. The client hears the
    home's answer to the login, so its CAPABILITY is the home's own."""
    try:
        upstream = await cluster.connect(user)
    except proxy.Unavailable:
        raise responses.Refused(responses.NO_HOME_UNAVAILABLE) from None
    log.info("imap session proxied", extra={"fields": {"user": user.address, "home": user.home}})
    session.write(upstream.logged_in(tag) + b"\r\n")
    await session.relay(upstream)
    return False


async def _log_in_internal(session: Session, tag: str, authzid: str, authcid: str, password: str) -> None:
    """The internal port: a peer's master login (RFC 4616 §2: it acts as the authorization identity,
    a mailbox homed here); the user's password was checked by the peer."""
    assert session.cluster is not None  # the internal port listens only when clustered
    try:
        user = session.cluster.admit(session.directory(), authzid=authzid, authcid=authcid, password=password)
    except proxy.Refusal:
        raise responses.Refused(responses.NO_AUTHENTICATION_FAILED) from None
    await _open_mailbox(session, tag, user)


async def _open_mailbox(session: Session, tag: str, user: MailboxEntry) -> None:
    """Make the mailbox of a user whose login succeeded ready, then enter the authenticated state."""
    if session.store.is_frozen(user.address):  # being moved (mailnode.move): the client logs in again soon
        raise responses.Refused(responses.NO_MAILBOX_UNAVAILABLE)
    account = session.store.account(user.address)
    try:
        # The special-use folders (RFC 6154) exist from the first login on: clients file mail there at once.
        existing = {f.name for f in await account.folders()}
        for name in SPECIAL_USE:
            if name not in existing:
                with contextlib.suppress(FolderError):
                    await account.create_folder(name)
    except Exception:
        log.exception("imap login could not open the mailbox", extra={"fields": {"user": user.address}})
        raise responses.Refused(responses.NO_MAILBOX_UNAVAILABLE) from None
    if session.store.is_frozen(user.address):  # frozen meanwhile: its sessions were ended, this one too
        raise responses.Refused(responses.NO_MAILBOX_UNAVAILABLE)
    session.log_in(user, account)
    session.send(responses.OK_LOGGED_IN.line(tag, capabilities=session.capabilities()))


async def login(session: Session, command: protocol.Command) -> bool | None:
    if session.internal:  # the internal port knows no passwords: only the master login
        assert session.cluster is not None
        session.cluster.refused("login")
        raise responses.Refused(responses.NO_AUTHENTICATION_FAILED)
    if _plaintext_refused(session):
        raise responses.Refused(responses.NO_LOGIN_BEFORE_TLS)
    args = command.args
    if len(args) != 2:
        raise responses.Refused(responses.BAD_LOGIN_ARGUMENTS)
    return await _log_in(session, command.tag, protocol.arg_text(args[0]), protocol.arg_text(args[1]))


async def authenticate(session: Session, command: protocol.Command) -> bool | None:
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
        line = await session.read_in_time(session.readline())  # before login: the login timer runs
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
    authzid, authcid, password = (field.decode("utf-8", "replace") for field in fields)
    if session.internal:
        await _log_in_internal(session, command.tag, authzid, authcid, password)
        return None
    return await _log_in(session, command.tag, authcid, password)


async def enable(session: Session, command: protocol.Command) -> None:
    enabled = []
    for arg in command.args:
        name = protocol.arg_text(arg).upper()
        if name == "CONDSTORE":
            session.condstore = True
            enabled.append("CONDSTORE")
        elif name == "QRESYNC":  # RFC 7162 §3.2.3: QRESYNC implies CONDSTORE
            session.condstore = session.qresync = True
            enabled.append("QRESYNC")
        elif name == "IMAP4REV2":  # RFC 9051 §6.3.1: the session speaks IMAP4rev2 from the next command on
            session.imap4rev2 = True
            enabled.append("IMAP4rev2")
    session.send(f"* ENABLED {' '.join(enabled)}".rstrip())  # RFC 5161
    session.send(responses.OK_COMPLETED.line(command.tag, command="ENABLE"))


async def namespace(session: Session, command: protocol.Command) -> None:
    session.send(f'* NAMESPACE (("" "{DELIMITER}")) NIL NIL')  # RFC 2342
    session.send(responses.OK_COMPLETED.line(command.tag, command="NAMESPACE"))
