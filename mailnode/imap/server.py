"""The node's IMAP4rev1 server (RFC 3501) with the extensions clients rely on: IDLE, UIDPLUS, MOVE,
SPECIAL-USE, NAMESPACE, ID, ENABLE, LITERAL+, SASL-IR, UNSELECT, CHILDREN, LIST-EXTENDED (basic),
QUOTA, CONDSTORE.

One `Session` per connection reads commands (framing literals itself), parses them with
mailnode.imap.protocol, and answers from the store's `Account`. A session with a folder selected
keeps that folder's message sequence (UIDs in order) and flags; changes made elsewhere reach it
through the store's switchboard and are reported at the points RFC 3501 §7 allows: EXISTS, FETCH
and EXPUNGE after any command but FETCH/STORE/SEARCH (EXPUNGE only then, §7.4.1), and at once
during IDLE.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import collections
import contextlib
import dataclasses
import datetime
import email.utils
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from mailnode.auth import Authenticator
from mailnode.config import Directory, MailboxEntry, NodeConfig
from mailnode.imap import mime, protocol, search
from mailnode.metrics import NodeMetrics
from mailnode.store.account import Account, FolderError, Message
from mailnode.store.changes import Change
from mailnode.store.mailstore import MailStore

log = logging.getLogger(__name__)

DELIMITER = "/"
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
SPECIAL_USE = {"Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash", "Junk": "\\Junk", "Archive": "\\Archive"}
_READ_BATCH = 64  # message files read per Gateway trip while answering FETCH
_SEARCH_BATCH = 256  # messages (headers or whole) read per Gateway trip while answering SEARCH
_SUMMARY_BATCH = 1024  # messages per FETCH response batch when no file is read
_ANALYSES_KEPT = 20_000  # parsed structures kept in memory, per node

CAPABILITIES = (
    "IMAP4rev1 LITERAL+ SASL-IR ID ENABLE IDLE NAMESPACE UIDPLUS MOVE UNSELECT CHILDREN "
    "SPECIAL-USE LIST-EXTENDED QUOTA CONDSTORE"
)


class _Close(Exception):
    """End the session after sending `line` (a BYE)."""

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.line = line


class _No(Exception):
    """Answer the command with NO and this text (a response code may lead it)."""


class _Bad(Exception):
    """Answer the command with BAD and this text."""


@dataclasses.dataclass
class _Selected:
    name: str
    readonly: bool
    uidvalidity: int
    uids: list[int]
    flags: dict[int, str]
    modseqs: dict[int, int]
    recent: set[int]
    highestmodseq: int
    uidnext: int
    pending: list[Change] = dataclasses.field(default_factory=list)

    def seq(self, uid: int) -> int:
        index = bisect.bisect_left(self.uids, uid)
        if index < len(self.uids) and self.uids[index] == uid:
            return index + 1
        return 0


class AnalysisCache:
    """Parsed message structures by (mailbox, file path). A message file never changes, so an entry
    never goes stale; the least recently used are dropped beyond `size`."""

    def __init__(self, size: int = _ANALYSES_KEPT) -> None:
        self._size = size
        self._entries: collections.OrderedDict[tuple[str, str], mime.Analysis] = collections.OrderedDict()
        self._headers: collections.OrderedDict[tuple[str, str], dict[str, str | None]] = collections.OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    def get(self, key: tuple[str, str]) -> mime.Analysis | None:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def put(self, key: tuple[str, str], analysis: mime.Analysis) -> None:
        self._entries[key] = analysis
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def lock(self, address: str) -> asyncio.Lock:
        return self._locks.setdefault(address, asyncio.Lock())

    def headers(self, key: tuple[str, str]) -> dict[str, str | None]:
        """The header field values SEARCH has looked up in this message so far (filled by the caller)."""
        found = self._headers.get(key)
        if found is None:
            found = self._headers[key] = {}
            if len(self._headers) > self._size:
                self._headers.popitem(last=False)
        else:
            self._headers.move_to_end(key)
        return found


class _Target:
    """A message as SEARCH sees it (implements search.SearchTarget)."""

    def __init__(
        self,
        session: Session,
        seq: int,
        message: Message,
        data: bytes | None,
        analysis: Any,
        headers: dict[str, str | None],
    ) -> None:
        selected = session.selected
        assert selected is not None
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
            self._headers[key] = mime.header_value(self._data, self._analysis, name)
        return self._headers[key]

    def headers_text(self) -> str:
        if self._data is None:
            return ""
        return (mime.section(self._data, self._analysis, "HEADER") or b"").decode("utf-8", "replace")

    def body_text(self) -> str:
        if self._data is None:
            return ""
        return mime.text_for_search(self._data, self._analysis)

    def sent_date(self) -> datetime.date | None:
        value = self.header("Date")
        if not value:
            return None
        try:
            return email.utils.parsedate_to_datetime(value).date()
        except (TypeError, ValueError, IndexError):
            return None


def _analysis_json(data: bytes) -> str:
    return mime.analyze(data).to_json()


class Session:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        config: NodeConfig,
        directory: Callable[[], Directory],
        store: MailStore,
        authenticator: Authenticator,
        metrics: NodeMetrics,
        tls: ssl.SSLContext | None,
        implicit_tls: bool,
        listener: str,
        analyses: AnalysisCache,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._config = config
        self._directory = directory
        self._store = store
        self._authenticator = authenticator
        self._metrics = metrics
        self._tls = tls
        self.is_tls = implicit_tls
        self._listener = listener
        self._analysis_cache = analyses
        self.user: MailboxEntry | None = None
        self.account: Account | None = None
        self.selected: _Selected | None = None
        self.condstore = False
        self._unsubscribe: Callable[[], None] | None = None
        self._wakeup = asyncio.Event()
        self.task: asyncio.Task[Any] | None = None
        peer = writer.get_extra_info("peername")
        self.remote = peer[0] if peer else "unknown"

    def shut_down(self) -> None:
        """The node is stopping: say so and hang up (commands in progress are not waited for)."""
        if not self._writer.is_closing():
            self._writer.write(b"* BYE Server shutting down; try again later\r\n")
            self._writer.close()

    # -- output ---------------------------------------------------------------------------------------

    def send(self, line: str | bytes) -> None:
        self._writer.write((line.encode() if isinstance(line, str) else line) + b"\r\n")

    async def flush(self) -> None:
        await self._writer.drain()

    def capabilities(self) -> str:
        caps = CAPABILITIES
        if not self.is_tls and self._tls is not None:
            caps += " STARTTLS"
        if self.user is None:
            if self.is_tls or self._config.imap.allow_plaintext_login:
                caps += " AUTH=PLAIN"
            else:
                caps += " LOGINDISABLED"
        return caps

    # -- the command loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        self._metrics.imap_sessions.labels(self._listener).inc()
        self._metrics.imap_sessions_active.labels(self._listener).inc()
        try:
            self.send(f"* OK [CAPABILITY {self.capabilities()}] {self._config.hostname} Mailfleet IMAP4rev1 ready")
            await self.flush()
            while True:
                try:
                    parts = await asyncio.wait_for(self._read_command(), self._config.imap.idle_timeout)
                except TimeoutError:
                    raise _Close("* BYE Autologout; idle for too long") from None
                if parts is None:
                    return
                if not await self._execute(parts):
                    return
        except _Close as close:
            with contextlib.suppress(ConnectionError):
                self.send(close.line)
                await self.flush()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._metrics.imap_sessions_active.labels(self._listener).dec()
            if self._unsubscribe is not None:
                self._unsubscribe()
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()

    async def _readline(self) -> bytes | None:
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as error:
            if not error.partial:
                return None
            raise
        except asyncio.LimitOverrunError:
            raise _Close("* BYE Line too long") from None
        return line.rstrip(b"\r\n")

    async def _read_command(self) -> list[bytes] | None:
        """One command: its lines and literals (RFC 3501 §4.3, RFC 7888 LITERAL+)."""
        parts: list[bytes] = []
        total = 0
        while True:
            line = await self._readline()
            if line is None:
                return None
            parts.append(line)
            total += len(line)
            try:
                marker = protocol.literal_marker(line)
            except protocol.ProtocolError:
                return parts  # parse_command reports it
            if marker is None:
                return parts
            size, non_synchronizing = marker
            total += size
            if total > self._config.imap.max_literal:
                if non_synchronizing:  # RFC 7888 §4: the client sends it anyway; we cannot resync
                    raise _Close("* BYE [TOOBIG] Literal too large")
                tag = line.split(b" ", 1)[0].decode("ascii", "replace")
                self.send(f"{tag} NO [TOOBIG] Literal too large (limit {self._config.imap.max_literal} bytes)")
                await self.flush()
                return []
            if not non_synchronizing:
                self.send("+ Ready for literal data")
                await self.flush()
            parts.append(await self._reader.readexactly(size))

    async def _execute(self, parts: list[bytes]) -> bool:
        """Run one command. Returns False once the session is over."""
        if not parts:
            return True
        tag = "*"
        try:
            command = protocol.parse_command(parts)
            tag = command.tag
            self._metrics.imap_commands.labels(_metric_name(command.name)).inc()
            handler = self._handler(command.name)
            done = await handler(command)
        except search.BadCharset as error:  # RFC 3501 §6.4.4
            supported = " ".join(error.supported)
            self.send(f"{tag} NO [BADCHARSET ({supported})] {error}")
            done = None
        except protocol.ProtocolError as error:
            self.send(f"{error.tag or tag} BAD {error}")
            done = None
        except _Bad as error:
            self.send(f"{tag} BAD {error}")
            done = None
        except _No as error:
            self.send(f"{tag} NO {error}")
            done = None
        except FolderError as error:
            text = str(error)
            self.send(f"{tag} NO {text if text.startswith('[') else '[NONEXISTENT] ' + text}")
            done = None
        except (_Close, ConnectionError, asyncio.IncompleteReadError):
            raise
        except Exception:
            log.exception("imap command failed", extra={"fields": {"user": self.user and self.user.address}})
            self.send(f"{tag} NO [SERVERBUG] Internal error; the administrator can find it in the node log")
            done = None
        if done is False:
            await self.flush()
            return False
        await self.flush()
        return True

    def _handler(self, name: str) -> Callable[[protocol.Command], Awaitable[bool | None]]:
        any_state = {"CAPABILITY": self.cmd_capability, "NOOP": self.cmd_noop, "LOGOUT": self.cmd_logout,
                     "ID": self.cmd_id}  # fmt: skip
        not_authenticated = {"STARTTLS": self.cmd_starttls, "LOGIN": self.cmd_login,
                             "AUTHENTICATE": self.cmd_authenticate}  # fmt: skip
        authenticated = {
            "SELECT": self.cmd_select, "EXAMINE": self.cmd_select, "CREATE": self.cmd_create,
            "DELETE": self.cmd_delete, "RENAME": self.cmd_rename, "SUBSCRIBE": self.cmd_subscribe,
            "UNSUBSCRIBE": self.cmd_subscribe, "LIST": self.cmd_list, "LSUB": self.cmd_list,
            "STATUS": self.cmd_status, "APPEND": self.cmd_append, "NAMESPACE": self.cmd_namespace,
            "ENABLE": self.cmd_enable, "IDLE": self.cmd_idle, "GETQUOTA": self.cmd_getquota,
            "GETQUOTAROOT": self.cmd_getquotaroot, "SETQUOTA": self.cmd_setquota,
        }  # fmt: skip
        selected = {
            "CHECK": self.cmd_check, "CLOSE": self.cmd_close, "UNSELECT": self.cmd_unselect,
            "EXPUNGE": self.cmd_expunge, "SEARCH": self.cmd_search, "FETCH": self.cmd_fetch,
            "STORE": self.cmd_store, "COPY": self.cmd_copy, "MOVE": self.cmd_copy,
            "UID FETCH": self.cmd_fetch, "UID STORE": self.cmd_store, "UID COPY": self.cmd_copy,
            "UID MOVE": self.cmd_copy, "UID SEARCH": self.cmd_search, "UID EXPUNGE": self.cmd_expunge,
        }  # fmt: skip
        if name in any_state:
            return any_state[name]
        if name in not_authenticated:
            if self.user is not None:
                raise _Bad(f"{name} is not valid once authenticated")
            return not_authenticated[name]
        if name in authenticated:
            if self.user is None:
                raise _Bad(f"{name} needs authentication first (LOGIN or AUTHENTICATE)")
            return authenticated[name]
        if name in selected:
            if self.selected is None:
                raise _Bad(f"{name} needs a selected mailbox (SELECT or EXAMINE first)")
            return selected[name]
        raise _Bad(f"Unknown command {name[:40]}")

    # -- any state ------------------------------------------------------------------------------------

    async def cmd_capability(self, command: protocol.Command) -> None:
        self.send(f"* CAPABILITY {self.capabilities()}")
        await self.report_changes(expunge=True)
        self.send(f"{command.tag} OK CAPABILITY completed")

    async def cmd_noop(self, command: protocol.Command) -> None:
        await self.report_changes(expunge=True)
        self.send(f"{command.tag} OK {command.name} completed")

    async def cmd_logout(self, command: protocol.Command) -> bool:
        self.send("* BYE Logging out")
        self.send(f"{command.tag} OK LOGOUT completed")
        return False

    async def cmd_id(self, command: protocol.Command) -> None:
        self.send('* ID ("name" "Mailfleet" "vendor" "Mailfleet")')  # RFC 2971
        self.send(f"{command.tag} OK ID completed")

    # -- not authenticated ------------------------------------------------------------------------------

    async def cmd_starttls(self, command: protocol.Command) -> None:
        if self.is_tls:
            raise _Bad("TLS is already active")
        if self._tls is None:
            raise _No("TLS is not available (no certificate configured)")
        self.send(f"{command.tag} OK Begin TLS negotiation now")
        await self.flush()
        # RFC 3501 §6.2.1: anything the client sent after STARTTLS before the handshake is discarded.
        await self._writer.start_tls(self._tls)
        self.is_tls = True

    def _plaintext_refused(self) -> bool:
        return not self.is_tls and not self._config.imap.allow_plaintext_login

    async def _login(self, tag: str, username: str, password: str) -> None:
        user = await self._authenticator.authenticate(username, password, remote=self.remote, protocol="imap")
        if user is None:
            log.info("imap auth failed", extra={"fields": {"client": self.remote}})
            raise _No("[AUTHENTICATIONFAILED] Authentication failed")
        self.user = user
        self.account = self._store.account(user.address)
        await self._ensure_special_folders()
        self._unsubscribe = self._store.switchboard.subscribe(user.address, self._on_change)
        self.send(f"{tag} OK [CAPABILITY {self.capabilities()}] Logged in")

    async def _ensure_special_folders(self) -> None:
        assert self.account is not None
        existing = {f.name for f in await self.account.folders()}
        for name in SPECIAL_USE:
            if name not in existing:
                with contextlib.suppress(FolderError):
                    await self.account.create_folder(name)

    async def cmd_login(self, command: protocol.Command) -> None:
        if self._plaintext_refused():
            raise _No("[PRIVACYREQUIRED] LOGIN is disabled before STARTTLS")
        args = command.args
        if len(args) != 2:
            raise _Bad("LOGIN takes a user name and a password")
        await self._login(command.tag, protocol.arg_text(args[0]), protocol.arg_text(args[1]))

    async def cmd_authenticate(self, command: protocol.Command) -> None:
        args = command.args
        if not args or protocol.arg_text(args[0]).upper() != "PLAIN":
            raise _No("[CANNOT] Only AUTHENTICATE PLAIN is supported")
        if self._plaintext_refused():
            raise _No("[PRIVACYREQUIRED] Authentication is disabled before STARTTLS")
        if len(args) > 1:  # RFC 4959 SASL-IR
            response = protocol.arg_text(args[1])
        else:
            self.send("+ ")
            await self.flush()
            line = await self._readline()
            if line is None:
                raise ConnectionError("client went away during AUTHENTICATE")
            response = line.decode("ascii", "replace")
        if response == "*":
            raise _Bad("AUTHENTICATE cancelled")
        try:
            decoded = base64.b64decode(response, validate=True) if response != "=" else b""
        except (binascii.Error, ValueError):
            raise _Bad("Invalid base64 in the PLAIN response") from None
        fields = decoded.split(b"\0")
        if len(fields) != 3:
            raise _Bad("The PLAIN response must be authzid NUL authcid NUL password")
        await self._login(command.tag, fields[1].decode("utf-8", "replace"), fields[2].decode("utf-8", "replace"))

    # -- authenticated ------------------------------------------------------------------------------

    def _folder_name(self, arg: protocol.Arg) -> str:
        return protocol.mailbox_arg(arg, DELIMITER)

    def _on_change(self, change: Change) -> None:
        selected = self.selected
        if selected is not None and change.folder == selected.name:
            selected.pending.append(change)
            self._wakeup.set()

    async def cmd_select(self, command: protocol.Command) -> None:
        assert self.account is not None
        request = protocol.parse_select(command.args)
        readonly = command.name == "EXAMINE"
        if request.condstore:  # RFC 7162 §3.2.8: SELECT mailbox (CONDSTORE)
            self.condstore = True
        name = request.mailbox
        if self.selected is not None:
            self.selected = None
            self.send("* OK [CLOSED] Previous mailbox closed")  # RFC 7162 §3.2.11
        result = await self.account.select(name, take_recent=not readonly)
        if result is None:
            raise _No(f"[NONEXISTENT] No such mailbox: {name}")
        folder, messages = result.folder, result.messages
        selected = _Selected(
            name=folder.name,
            readonly=readonly,
            uidvalidity=folder.uidvalidity,
            uids=[m.uid for m in messages],
            flags={m.uid: m.flags for m in messages},
            modseqs={m.uid: m.modseq for m in messages},
            recent={m.uid for m in messages if m.uid >= result.first_recent},
            highestmodseq=folder.highestmodseq,
            uidnext=folder.uidnext,
        )
        self.selected = selected
        self.send(f"* FLAGS ({' '.join(SYSTEM_FLAGS)})")
        self.send(f"* OK [PERMANENTFLAGS ({' '.join(SYSTEM_FLAGS)} \\*)] Flags permitted")
        self.send(f"* {len(selected.uids)} EXISTS")
        self.send(f"* {len(selected.recent)} RECENT")
        unseen = next((i + 1 for i, m in enumerate(messages) if "\\Seen" not in m.flags.split()), None)
        if unseen is not None:
            self.send(f"* OK [UNSEEN {unseen}] First unseen")
        self.send(f"* OK [UIDVALIDITY {folder.uidvalidity}] UIDs valid")
        self.send(f"* OK [UIDNEXT {folder.uidnext}] Predicted next UID")
        self.send(f"* OK [HIGHESTMODSEQ {folder.highestmodseq}] Highest")
        access = "READ-ONLY" if readonly else "READ-WRITE"
        self.send(f"{command.tag} OK [{access}] {command.name} completed")

    async def cmd_create(self, command: protocol.Command) -> None:
        assert self.account is not None
        if not command.args:
            raise _Bad("CREATE needs a mailbox name")
        name = self._folder_name(command.args[0]).rstrip(DELIMITER)
        if not name or name.upper() == "INBOX":
            raise _No("[ALREADYEXISTS] INBOX always exists")
        existing = {f.name for f in await self.account.folders()}
        if name in existing:
            raise _No(f"[ALREADYEXISTS] Mailbox exists: {name}")
        parts = name.split(DELIMITER)
        for depth in range(1, len(parts) + 1):  # RFC 3501 §6.3.3: create missing superiors
            ancestor = DELIMITER.join(parts[:depth])
            if ancestor not in existing:
                await self.account.create_folder(ancestor)
        self.send(f"{command.tag} OK CREATE completed")

    async def cmd_delete(self, command: protocol.Command) -> None:
        assert self.account is not None
        if not command.args:
            raise _Bad("DELETE needs a mailbox name")
        name = self._folder_name(command.args[0])
        if self.selected is not None and self.selected.name == name:
            self.selected = None
        await self.account.delete_folder(name)
        self.send(f"{command.tag} OK DELETE completed")

    async def cmd_rename(self, command: protocol.Command) -> None:
        assert self.account is not None
        if len(command.args) != 2:
            raise _Bad("RENAME needs the old and the new name")
        old, new = self._folder_name(command.args[0]), self._folder_name(command.args[1])
        if new.upper() == "INBOX":
            raise _No("[ALREADYEXISTS] INBOX always exists")
        await self.account.rename_folder(old, new)
        self.send(f"{command.tag} OK RENAME completed")

    async def cmd_subscribe(self, command: protocol.Command) -> None:
        assert self.account is not None
        if not command.args:
            raise _Bad(f"{command.name} needs a mailbox name")
        await self.account.subscribe(self._folder_name(command.args[0]), command.name == "SUBSCRIBE")
        self.send(f"{command.tag} OK {command.name} completed")

    async def cmd_list(self, command: protocol.Command) -> None:
        assert self.account is not None
        options = protocol.parse_list_args(command.args)
        folders = sorted(await self.account.folders(), key=lambda f: (f.name != "INBOX", f.name))  # INBOX first
        names = {f.name for f in folders}
        lsub = command.name == "LSUB"
        subscribed_only = lsub or "SUBSCRIBED" in options.selection
        for folder in folders if options.patterns else []:
            if not any(protocol.mailbox_matches(p, folder.name, DELIMITER) for p in options.patterns):
                continue
            if subscribed_only and not folder.subscribed:
                continue
            if "SPECIAL-USE" in options.selection and folder.name not in SPECIAL_USE:  # RFC 6154 §5.1
                continue
            attributes: list[str] = []
            children = any(n.startswith(folder.name + DELIMITER) for n in names)
            attributes.append("\\HasChildren" if children else "\\HasNoChildren")
            if folder.name in SPECIAL_USE and (not lsub):
                attributes.append(SPECIAL_USE[folder.name])
            if folder.subscribed and "SUBSCRIBED" in options.returns:
                attributes.append("\\Subscribed")
            encoded = protocol.format_mailbox(protocol.encode_mailbox_name(folder.name))
            self.send(f'* {command.name} ({" ".join(attributes)}) "{DELIMITER}" '.encode() + encoded)
        if not options.patterns:  # RFC 3501 §6.3.8: an empty pattern asks for the delimiter
            self.send(f'* {command.name} (\\Noselect) "{DELIMITER}" ""')
        self.send(f"{command.tag} OK {command.name} completed")

    async def cmd_status(self, command: protocol.Command) -> None:
        assert self.account is not None
        request = protocol.parse_status(command.args)
        name = request.mailbox
        status = await self.account.status(name)
        if status is None:
            raise _No(f"[NONEXISTENT] No such mailbox: {name}")
        folder = status.folder
        values = {
            "MESSAGES": status.messages,
            "RECENT": status.recent,
            "UIDNEXT": folder.uidnext,
            "UIDVALIDITY": folder.uidvalidity,
            "UNSEEN": status.unseen,
            "HIGHESTMODSEQ": folder.highestmodseq,
            "SIZE": status.size,
        }
        items = [f"{key} {values[key]}" for key in request.items]
        encoded = protocol.format_mailbox(protocol.encode_mailbox_name(folder.name))
        self.send(b"* STATUS " + encoded + f" ({' '.join(items)})".encode())
        self.send(f"{command.tag} OK STATUS completed")

    async def cmd_append(self, command: protocol.Command) -> None:
        assert self.account is not None and self.user is not None
        request = protocol.parse_append(command.args)
        name, flags, data = request.mailbox, request.flags, request.message
        internal_date = int(request.internal_date.timestamp()) if request.internal_date else None
        quota = self.user.quota
        if quota and self._store.usage(self.user.address).bytes + len(data) > quota:
            raise _No("[OVERQUOTA] Mailbox is over its quota")
        uidvalidity, uid = await self.account.append(
            name, data, flags=" ".join(sorted(set(flags))), internal_date=internal_date
        )
        await self.report_changes(expunge=True)
        self.send(f"{command.tag} OK [APPENDUID {uidvalidity} {uid}] APPEND completed")

    async def cmd_namespace(self, command: protocol.Command) -> None:
        self.send(f'* NAMESPACE (("" "{DELIMITER}")) NIL NIL')  # RFC 2342
        self.send(f"{command.tag} OK NAMESPACE completed")

    async def cmd_enable(self, command: protocol.Command) -> None:
        enabled = []
        for arg in command.args:
            if protocol.arg_text(arg).upper() == "CONDSTORE":
                self.condstore = True
                enabled.append("CONDSTORE")
        self.send(f"* ENABLED {' '.join(enabled)}".rstrip())  # RFC 5161
        self.send(f"{command.tag} OK ENABLE completed")

    def _quota_line(self) -> str:
        assert self.user is not None
        used_kib = (self._store.usage(self.user.address).bytes + 1023) // 1024
        if not self.user.quota:
            return '* QUOTA "" ()'
        return f'* QUOTA "" (STORAGE {used_kib} {self.user.quota // 1024})'  # RFC 2087: units of 1024 octets

    async def cmd_getquota(self, command: protocol.Command) -> None:
        if not command.args or protocol.arg_text(command.args[0]) != "":
            raise _No("[NONEXISTENT] No such quota root")
        self.send(self._quota_line())
        self.send(f"{command.tag} OK GETQUOTA completed")

    async def cmd_getquotaroot(self, command: protocol.Command) -> None:
        if not command.args:
            raise _Bad("GETQUOTAROOT needs a mailbox name")
        self.send(b"* QUOTAROOT " + protocol.format_mailbox(protocol.arg_text(command.args[0])) + b' ""')
        self.send(self._quota_line())
        self.send(f"{command.tag} OK GETQUOTAROOT completed")

    async def cmd_setquota(self, command: protocol.Command) -> None:
        raise _No("[NOPERM] Quotas are set on the Mailbox resource, not over IMAP")

    async def cmd_idle(self, command: protocol.Command) -> None:
        """RFC 2177: report changes as they happen until the client says DONE."""
        self.send("+ idling")
        await self.report_changes(expunge=True)
        await self.flush()
        done = asyncio.ensure_future(self._readline())
        try:
            while True:
                self._wakeup.clear()
                waiter = asyncio.ensure_future(self._wakeup.wait())
                finished, _ = await asyncio.wait(
                    {done, waiter}, timeout=self._config.imap.idle_timeout, return_when=asyncio.FIRST_COMPLETED
                )
                waiter.cancel()
                if done in finished:
                    break
                if not finished:
                    raise _Close("* BYE Autologout; idle for too long")
                await self.report_changes(expunge=True)
                await self.flush()
        finally:
            if not done.done():
                done.cancel()
        line = done.result()
        if line is None:
            raise ConnectionError("client went away during IDLE")
        if line.strip().upper() != b"DONE":
            raise _Bad("Expected DONE to end IDLE")
        self.send(f"{command.tag} OK IDLE terminated")

    # -- selected ---------------------------------------------------------------------------------------

    async def _analyses(self, messages: Sequence[Message]) -> dict[int, mime.Analysis]:
        """The MIME analysis of each message: from memory, else from the index cache, else parsed now."""
        assert self.selected is not None and self.account is not None and self.user is not None
        cache = self._analysis_cache
        result: dict[int, mime.Analysis] = {}

        def collect() -> list[Message]:
            missing: list[Message] = []
            for message in messages:
                found = cache.get((address, message.path))
                if found is None:
                    missing.append(message)
                else:
                    result[message.uid] = found
            return missing

        address = self.user.address
        missing = collect()
        if not missing:
            return result
        # One session at a time fills a mailbox's misses; sessions that wait find them filled.
        async with cache.lock(address):
            missing = collect()
            if missing:
                stored = await self.account.structures(self.selected.name, missing, _analysis_json)
                for message in missing:
                    if message.uid not in stored:
                        continue  # expunged meanwhile: the caller leaves it out
                    try:
                        analysis = mime.Analysis.from_json(stored[message.uid])
                    except ValueError:  # cached by an older mailnode: parse again
                        analysis = mime.analyze((await self.account.read([message]))[0])
                    cache.put((address, message.path), analysis)
                    result[message.uid] = analysis
        return result

    async def report_changes(self, *, expunge: bool) -> None:
        """Tell the client what changed in the selected folder since it last heard (RFC 3501 §7)."""
        selected = self.selected
        if selected is None or not selected.pending:
            return
        assert self.account is not None
        pending, selected.pending = selected.pending, []
        kept: list[Change] = []
        added: list[int] = []
        for change in pending:
            if change.kind == "added":
                added.extend(uid for uid in change.uids if uid not in selected.flags)
            elif change.kind == "flags" and change.origin is not self:
                for uid, flags, modseq in zip(change.uids, change.flags, change.modseqs, strict=True):
                    seq = selected.seq(uid)
                    if seq:
                        selected.flags[uid] = flags
                        selected.modseqs[uid] = modseq
                        self.send(f"* {seq} FETCH ({self._fetch_flags(uid)} UID {uid})")
            elif change.kind == "expunged" and change.origin is not self:
                if expunge:
                    for uid in change.uids:
                        self._forget(uid)
                else:
                    kept.append(change)
        if added:
            new = await self.account.messages(selected.name, uids=added)
            for message in new:
                if message.uid not in selected.flags:
                    bisect.insort(selected.uids, message.uid)
                    selected.flags[message.uid] = message.flags
                    selected.modseqs[message.uid] = message.modseq
                    if not selected.readonly:
                        selected.recent.add(message.uid)
            self.send(f"* {len(selected.uids)} EXISTS")
            self.send(f"* {len(selected.recent)} RECENT")
        selected.pending = kept + selected.pending

    def _forget(self, uid: int) -> None:
        selected = self.selected
        assert selected is not None
        seq = selected.seq(uid)
        if seq:
            del selected.uids[seq - 1]
            selected.flags.pop(uid, None)
            selected.modseqs.pop(uid, None)
            selected.recent.discard(uid)
            self.send(f"* {seq} EXPUNGE")

    def _fetch_flags(self, uid: int) -> str:
        selected = self.selected
        assert selected is not None
        flags = selected.flags.get(uid, "").split()
        if uid in selected.recent:
            flags.append("\\Recent")
        text = f"FLAGS ({' '.join(flags)})"
        if self.condstore:
            text += f" MODSEQ ({selected.modseqs.get(uid, 0)})"
        return text

    def _messages_for(self, sequence: str, *, uid: bool) -> list[tuple[int, int]]:
        """(seq, uid) pairs that a sequence set or UID set names, in order."""
        selected = self.selected
        assert selected is not None
        numbers = protocol.parse_sequence_set(sequence)
        uids = selected.uids
        if uid:
            largest = uids[-1] if uids else 0
            return [(selected.seq(u), u) for u in numbers.iter(uids, largest)]
        count = len(uids)
        result = [(n, uids[n - 1]) for n in numbers.iter(range(1, count + 1), count)]
        if not result:  # RFC 3501 §9 seq-number: a number beyond the mailbox is an error
            raise _Bad("Invalid message sequence number: no such message")
        return result

    async def cmd_check(self, command: protocol.Command) -> None:
        await self.report_changes(expunge=True)
        self.send(f"{command.tag} OK CHECK completed")

    async def cmd_close(self, command: protocol.Command) -> None:
        selected = self.selected
        assert selected is not None and self.account is not None
        if not selected.readonly:
            deleted = [u for u in selected.uids if "\\Deleted" in selected.flags.get(u, "").split()]
            if deleted:
                await self.account.expunge(selected.name, deleted, origin=self)
        self.selected = None
        self.send(f"{command.tag} OK CLOSE completed")

    async def cmd_unselect(self, command: protocol.Command) -> None:
        self.selected = None
        self.send(f"{command.tag} OK UNSELECT completed")

    async def cmd_expunge(self, command: protocol.Command) -> None:
        selected = self.selected
        assert selected is not None and self.account is not None
        if selected.readonly:
            raise _No("[READ-ONLY] Mailbox is read-only")
        candidates = selected.uids
        if command.name == "UID EXPUNGE":  # RFC 4315 §2.1
            if not command.args:
                raise _Bad("UID EXPUNGE needs a UID set")
            candidates = [u for _, u in self._messages_for(protocol.arg_text(command.args[0]), uid=True)]
        deleted = [u for u in candidates if "\\Deleted" in selected.flags.get(u, "").split()]
        removed = await self.account.expunge(selected.name, deleted, origin=self)
        for uid in removed:
            self._forget(uid)
        await self.report_changes(expunge=True)
        self.send(f"{command.tag} OK {command.name} completed")

    async def cmd_search(self, command: protocol.Command) -> None:
        selected = self.selected
        assert selected is not None and self.account is not None
        by_uid = command.name == "UID SEARCH"
        key = search.parse_search(list(command.args))
        messages = await self.account.messages(selected.name)
        by_uid_map = {m.uid: m for m in messages}
        ordered = [(i + 1, by_uid_map[u]) for i, u in enumerate(selected.uids) if u in by_uid_map]
        hits: list[tuple[int, Message]] = []
        content = search.needs_content(key)
        body = search.needs_body(key)
        fields = search.header_fields(key)
        assert self.user is not None
        address = self.user.address
        cache = self._analysis_cache
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
                    analyses = await self._analyses([chunk[position][1] for position in unread])
                    unread = [p for p in unread if chunk[p][1].uid in analyses]  # not expunged meanwhile
                    wanted = [chunk[position][1] for position in unread]
                    limits = None if body else [analyses[m.uid].root.body_start for m in wanted]
                    read = await self.account.read(wanted, limits=limits)
                    for position, contents in zip(unread, read, strict=True):
                        datas[position] = contents
            for (seq, message), data, known in zip(chunk, datas, headers, strict=True):
                analysis = analyses.get(message.uid)
                if search.evaluate(key, _Target(self, seq, message, data, analysis, known)):
                    hits.append((seq, message))
        numbers = [str(m.uid if by_uid else seq) for seq, m in hits]
        line = "* SEARCH" + "".join(f" {n}" for n in numbers)
        if search.referenced_modseq(key) and hits:
            line += f" (MODSEQ {max(selected.modseqs.get(m.uid, m.modseq) for _, m in hits)})"
        self.send(line)
        await self.report_changes(expunge=by_uid)
        self.send(f"{command.tag} OK {command.name} completed")

    async def cmd_fetch(self, command: protocol.Command) -> None:
        selected = self.selected
        assert selected is not None and self.account is not None
        by_uid = command.name == "UID FETCH"
        if len(command.args) < 2:
            raise _Bad("FETCH needs a sequence set and data items")
        targets = self._messages_for(protocol.arg_text(command.args[0]), uid=by_uid)
        items = protocol.parse_fetch_items([command.args[1]])
        changed_since = None
        if len(command.args) > 2:
            modifiers = protocol.parse_fetch_modifiers(command.args[2:])
            changed_since = modifiers.changed_since
            self.condstore = True
        if any(item.name == "MODSEQ" for item in items):
            self.condstore = True
        if changed_since is not None:
            targets = [(s, u) for s, u in targets if selected.modseqs.get(u, 0) > changed_since]
        names = {item.name for item in items}
        needs_structure = bool(names & {"ENVELOPE", "BODYSTRUCTURE", "RFC822.HEADER", "RFC822.TEXT"}) or any(
            (item.name == "BODY" and item.section is None) or item.section for item in items
        )
        needs_data = any(item.section is not None for item in items) or bool(
            names & {"RFC822", "RFC822.HEADER", "RFC822.TEXT"}
        )
        sets_seen = not selected.readonly and any(
            item.name in ("BODY", "RFC822", "RFC822.TEXT") and (item.section is not None or item.name != "BODY")
            for item in items
        )
        every = len(targets) > _READ_BATCH  # one query for the whole folder beats many small ones
        all_messages = {m.uid: m for m in await self.account.messages(selected.name)} if every else {}
        for start in range(0, len(targets), _READ_BATCH if needs_data else _SUMMARY_BATCH):
            chunk = targets[start : start + (_READ_BATCH if needs_data else _SUMMARY_BATCH)]
            datas: list[bytes] = []
            if all_messages:
                present = [(s, all_messages[u]) for s, u in chunk if u in all_messages]
                if needs_data:
                    datas = await self.account.read([m for _, m in present])
            else:  # rows and files in one Gateway trip
                loaded = await self.account.load(selected.name, [u for _, u in chunk], data=needs_data)
                rows = {message.uid: (message, data) for message, data in loaded}
                present = [(s, rows[u][0]) for s, u in chunk if u in rows]
                datas = [rows[m.uid][1] or b"" for _, m in present]
            analyses: dict[int, mime.Analysis] = {}
            if needs_structure:
                analyses = await self._analyses([m for _, m in present])
                kept = [i for i, (_, m) in enumerate(present) if m.uid in analyses]
                if len(kept) < len(present):  # expunged by another session while we read
                    present = [present[i] for i in kept]
                    datas = [datas[i] for i in kept] if datas else datas
            if sets_seen:
                unseen = [m.uid for _, m in present if "\\Seen" not in selected.flags.get(m.uid, "").split()]
                if unseen:
                    changed, _ = await self.account.store_flags(
                        selected.name, unseen, mode="+", flags=["\\Seen"], origin=self
                    )
                    for message in changed:
                        selected.flags[message.uid] = message.flags
                        selected.modseqs[message.uid] = message.modseq
            # One write per batch: a write per message would be a send() system call per message.
            self._writer.write(
                b"".join(
                    self._render_fetch(
                        seq, message, items, by_uid, analyses.get(message.uid), datas[i] if needs_data else None,
                        sets_seen,
                    )
                    for i, (seq, message) in enumerate(present)
                )
            )  # fmt: skip
            await self.flush()
        await self.report_changes(expunge=by_uid)
        self.send(f"{command.tag} OK {command.name} completed")

    def _render_fetch(
        self,
        seq: int,
        message: Message,
        items: Sequence[protocol.FetchAtt],
        by_uid: bool,
        analysis: mime.Analysis | None,
        data: bytes | None,
        sets_seen: bool,
    ) -> bytes:
        selected = self.selected
        assert selected is not None
        out: list[bytes] = []
        names = [item.name for item in items]
        if by_uid and "UID" not in names:
            out.append(f"UID {message.uid}".encode())
        flags_sent = False
        for item in items:
            name = item.name
            if name == "UID":
                out.append(f"UID {message.uid}".encode())
            elif name == "FLAGS":
                out.append(self._fetch_flags(message.uid).encode())
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
                raise _Bad(f"{name} is not supported")
        if sets_seen and not flags_sent:
            out.append(self._fetch_flags(message.uid).encode())
        if self.condstore and "MODSEQ" not in names:
            out.append(f"MODSEQ ({selected.modseqs.get(message.uid, message.modseq)})".encode())
        return f"* {seq} FETCH (".encode() + b" ".join(out) + b")\r\n"

    async def cmd_store(self, command: protocol.Command) -> None:
        selected = self.selected
        assert selected is not None and self.account is not None
        if selected.readonly:
            raise _No("[READ-ONLY] Mailbox is read-only")
        by_uid = command.name == "UID STORE"
        if len(command.args) < 3:
            raise _Bad("STORE needs a sequence set, an action and flags")
        targets = self._messages_for(protocol.arg_text(command.args[0]), uid=by_uid)
        spec = protocol.parse_store(command.args[1:])
        if spec.unchanged_since is not None:
            self.condstore = True
        flags = spec.flags  # validated, system flags in canonical case
        changed, failed = await self.account.store_flags(
            selected.name,
            [u for _, u in targets],
            mode=spec.mode,
            flags=flags,
            unchanged_since=spec.unchanged_since,
            origin=self,
        )
        for message in changed:
            selected.flags[message.uid] = message.flags
            selected.modseqs[message.uid] = message.modseq
        changed_uids = {m.uid for m in changed}
        for seq, uid in targets:
            if uid in failed:
                continue
            if not spec.silent or (self.condstore and uid in changed_uids and spec.unchanged_since is not None):
                extra = f" UID {uid}" if by_uid else ""
                self.send(f"* {seq} FETCH ({self._fetch_flags(uid)}{extra})")
        await self.report_changes(expunge=by_uid)
        if failed:
            numbers = failed if by_uid else [selected.seq(u) for u in failed]
            self.send(f"{command.tag} OK [MODIFIED {','.join(map(str, numbers))}] Conditional STORE failed")
        else:
            self.send(f"{command.tag} OK {command.name} completed")

    async def cmd_copy(self, command: protocol.Command) -> None:
        selected = self.selected
        assert selected is not None and self.account is not None
        by_uid = command.name.startswith("UID ")
        move = command.name.endswith("MOVE")
        if len(command.args) != 2:
            raise _Bad(f"{command.name} needs a sequence set and a mailbox name")
        if move and selected.readonly:
            raise _No("[READ-ONLY] Mailbox is read-only")
        targets = self._messages_for(protocol.arg_text(command.args[0]), uid=by_uid)
        dest = self._folder_name(command.args[1])
        if not targets:
            self.send(f"{command.tag} OK {command.name} completed (nothing to do)")
            return
        uidvalidity, pairs = await self.account.copy(
            selected.name, [u for _, u in targets], dest, move=move, origin=self
        )
        code = f"COPYUID {uidvalidity} {_uid_set([s for s, _ in pairs])} {_uid_set([d for _, d in pairs])}"
        if move:  # RFC 6851 §4.3: COPYUID in an untagged OK, then the EXPUNGEs
            self.send(f"* OK [{code}] Moved")
            for src, _ in pairs:
                self._forget(src)
            await self.report_changes(expunge=True)
            self.send(f"{command.tag} OK {command.name} completed")
        else:
            await self.report_changes(expunge=by_uid)
            self.send(f"{command.tag} OK [{code}] {command.name} completed")


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


_KNOWN_COMMANDS = {
    "CAPABILITY", "NOOP", "LOGOUT", "ID", "STARTTLS", "LOGIN", "AUTHENTICATE", "SELECT", "EXAMINE", "CREATE",
    "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST", "LSUB", "STATUS", "APPEND", "NAMESPACE", "ENABLE",
    "IDLE", "GETQUOTA", "GETQUOTAROOT", "SETQUOTA", "CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH",
    "STORE", "COPY", "MOVE", "UID FETCH", "UID STORE", "UID COPY", "UID MOVE", "UID SEARCH", "UID EXPUNGE",
}  # fmt: skip


def _metric_name(name: str) -> str:
    return name if name in _KNOWN_COMMANDS else "other"  # bounded label values


async def start_listener(
    *,
    config: NodeConfig,
    directory: Callable[[], Directory],
    store: MailStore,
    authenticator: Authenticator,
    metrics: NodeMetrics,
    host: str,
    port: int,
    tls: ssl.SSLContext | None,
    implicit_tls: bool,
    analyses: AnalysisCache,
) -> tuple[asyncio.Server, set[Session]]:
    """Serve IMAP (STARTTLS) or IMAPS (implicit TLS). Returns the server and the set of live sessions."""
    sessions: set[Session] = set()
    listener = "imaps" if implicit_tls else "imap"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(
            reader, writer, config=config, directory=directory, store=store, authenticator=authenticator,
            metrics=metrics, tls=tls, implicit_tls=implicit_tls, listener=listener, analyses=analyses,
        )  # fmt: skip
        session.task = asyncio.current_task()
        sessions.add(session)
        try:
            await session.run()
        finally:
            sessions.discard(session)

    server = await asyncio.start_server(
        serve, host=host, port=port, ssl=tls if implicit_tls else None, reuse_address=True, backlog=512,
        limit=config.imap.max_line,
    )  # fmt: skip
    return server, sessions
