"""One IMAP session per connection (RFC 3501): framing (lines and literals), state, the selected
folder, caches, and dispatch of each command through mailnode.imap.commands.TABLE. The command
modules answer commands with what the session offers here; mailnode.imap.server starts sessions.

A session with a folder selected keeps that folder's message sequence (UIDs in order) and flags;
changes made elsewhere reach it through the store's switchboard and are reported at the points
RFC 3501 §7 allows: EXISTS, FETCH and EXPUNGE after any command but FETCH/STORE/SEARCH (EXPUNGE
only then, §7.4.1), and at once during IDLE.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import collections.abc
import contextlib
import dataclasses
import functools
import heapq
import logging
import re
import ssl
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

from mailnode.auth import Authenticator
from mailnode.config import Directory, MailboxEntry, NodeConfig
from mailnode.imap import mime, protocol, proxy, responses, search, table
from mailnode.metrics import NodeMetrics
from mailnode.store.account import Account, Folder, FolderError, Message, MessageSpool, StorageFull
from mailnode.store.changes import Change
from mailnode.store.mailstore import MailStore

log = logging.getLogger(__name__)
T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

DELIMITER = "/"
SPECIAL_USE = {"Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash", "Junk": "\\Junk", "Archive": "\\Archive"}
_ANALYSES_KEPT = 20_000  # parsed structures kept in memory, per node
# Before login a client is anyone: it gets a short timer (imap.login_timeout; RFC 3501 §5.4's 30
# minutes are the autologout timer, once logged in) and small literals (Dovecot's are a few KiB:
# LOGIN's astrings; AUTHENTICATE's SASL responses are lines, bounded by imap.max_line).
LOGIN_MAX_LITERAL = 8 * 1024  # bytes of literals in one command before login
# After login, an APPEND's message literal larger than a chunk is not held in memory: it streams to a
# file of the store's (Account.spool), a chunk at a time, so a session's memory is bounded by the chunk.
APPEND_CHUNK = 64 * 1024
_APPEND = re.compile(rb"[^ ]+ APPEND ", re.IGNORECASE)
_MARKER = re.compile(rb"\{[0-9]+\+?\}\Z")
# Responses are held until the session flushes (Session.flush), but no more than this many bytes: past
# it they go to the transport at once, so a long burst of untagged responses never piles up in memory.
OUTPUT_BOUND = 64 * 1024


@dataclasses.dataclass
class AppendLiteral:
    """An APPEND's message literal received into a store spool instead of the command's parts (where
    an empty literal stands for it), or thrown away as it arrived because it is `refused` (over
    quota, or the disk filled up): the session keeps the connection in step either way."""

    position: int  # its index in the command's parts
    spool: MessageSpool | None
    refused: responses.Response | None = None
    last: bool = False  # the command ended right after it, as a message literal does


class FolderView:
    """One version of a selected folder's messages: their UIDs in order, and each one's flags and mod-sequence.
    Never changed once made: every session showing this version of the folder holds the same object (as
    Dovecot's sessions share a mailbox's index map), and a change makes a new version (`after`), which
    the other sessions on this one take as they report the same change, instead of each building its
    own. A session holds only what it shows differently (Selected).

    `rows` holds each message's row as it was read, for what never changes in it (path, size, internal
    date): FETCH takes them from here instead of querying the index (its flags and mod-sequence may be
    older than `flags` and `modseqs`, which are the version's)."""

    __slots__ = ("__weakref__", "_next", "asof", "flags", "modseqs", "rendered", "rows", "uids")

    def __init__(
        self,
        uids: list[int],
        flags: dict[int, str],
        modseqs: dict[int, int],
        rows: dict[int, Message],
        rendered: dict[str, dict[int, bytes]] | None = None,
        asof: int | None = None,
    ) -> None:
        self.uids = uids  # ascending; shared: never mutated
        self.flags = flags
        self.modseqs = modseqs
        self.rows = rows  # shared between versions while no message comes or goes; never mutated
        # FETCH items that never change for a message (commands.fetch._summaries), by item names, then UID:
        # filled by the sessions' FETCHes, shared like the rows, and carried into the next versions.
        self.rendered: dict[str, dict[int, bytes]] = {} if rendered is None else rendered
        # The folder's HIGHESTMODSEQ when it was exactly this version, when known: a SELECT read it with the
        # rows, and each change applied since was the very next (every change to a folder's messages takes
        # the next mod-sequences, RFC 7162, and the switchboard publishes them in that order). A SELECT that
        # finds the folder at that mod-sequence takes this version without reading the rows (FolderViews.current).
        self.asof = asof
        # The version after the last change applied to this one: sessions report the changes in the order
        # the switchboard published them, so the next session on this version asks for the same change.
        # Weak once made: a session that lags on an old version must not keep every later one alive.
        self._next: tuple[Change, weakref.ref[FolderView] | asyncio.Task[FolderView]] | None = None

    @classmethod
    def of(cls, messages: Sequence[Message], *, since: FolderView | None = None, asof: int | None = None) -> FolderView:
        """The version of `messages`, a SELECT's rows; with the rendered items of an older version `since`
        of the same folder (same UIDVALIDITY: a UID's message never changes, RFC 3501 §2.3.1.1) for those
        it still holds, instead of rendering them again."""
        rows = {m.uid: m for m in messages}
        rendered = None
        if since is not None:
            rendered = {
                items: {u: r for u, r in by_uid.items() if u in rows} for items, by_uid in since.rendered.items()
            }
        return cls(
            [m.uid for m in messages], {m.uid: m.flags for m in messages}, {m.uid: m.modseq for m in messages}, rows,
            rendered, asof,
        )  # fmt: skip

    def shows(self, messages: Sequence[Message]) -> bool:
        """Whether this version is exactly `messages` (a SELECT's rows, ascending), files included (a
        RENAME moves them)."""
        if len(messages) != len(self.uids):
            return False
        flags, modseqs, rows = self.flags, self.modseqs, self.rows
        return all(
            flags.get(m.uid) == m.flags
            and modseqs.get(m.uid) == m.modseq
            and ((known := rows.get(m.uid)) is m or (known is not None and known.path == m.path))
            for m in messages
        )

    def _remembered(self, change: Change) -> FolderView | asyncio.Task[FolderView] | None:
        following = self._next
        if following is None or following[0] is not change:
            return None
        made = following[1]
        return made if isinstance(made, asyncio.Task) else made()

    def after(self, change: Change) -> FolderView:
        """This version with a "flags" or "expunged" change applied (itself when it changes nothing here)."""
        found = self._remembered(change)
        if isinstance(found, FolderView):
            return found
        if change.kind == "flags":
            view = self._with_flags(change)
        elif change.kind == "expunged":
            view = self._without(change.uids, change.modseqs)
        else:
            raise ValueError(f"{change.kind} changes are applied by after_added")
        if view is not self:
            self._next = (change, weakref.ref(view))
        return view

    def _asof_after(self, modseqs: Sequence[int], *, changed: bool) -> int | None:
        """`asof` once a change that took these mod-sequences is applied (`changed`: it changed this version):
        the same when this version had it already (changed nothing, none newer); theirs when they are the very
        next ones; else not known (a change in between is not here, or this version's `asof` came from a read
        of rows that a change came and went between: FolderViews.select)."""
        if self.asof is None or not modseqs:
            return None if changed else self.asof
        if not changed and max(modseqs) <= self.asof:
            return self.asof
        ordered = sorted(set(modseqs))
        return ordered[-1] if ordered[0] == self.asof + 1 and len(ordered) == ordered[-1] - self.asof else None

    def _with_flags(self, change: Change) -> FolderView:
        flags = modseqs = None
        for uid, new_flags, modseq in zip(change.uids, change.flags, change.modseqs, strict=True):
            current = self.modseqs.get(uid)
            # Not older than what this version holds (an added message's row may have been read after it).
            if current is None or modseq < current or (modseq == current and new_flags == self.flags[uid]):
                continue
            if flags is None or modseqs is None:
                flags, modseqs = dict(self.flags), dict(self.modseqs)
            flags[uid] = new_flags
            modseqs[uid] = modseq
        asof = self._asof_after(change.modseqs, changed=flags is not None)
        if (flags is None or modseqs is None) and asof == self.asof:
            return self
        # The same messages: their UIDs, rows and rendered items shared.
        return FolderView(self.uids, flags or self.flags, modseqs or self.modseqs, self.rows, self.rendered, asof)

    def _without(self, uids: Sequence[int], took: Sequence[int] = ()) -> FolderView:
        """This version without the messages of `uids`, expunged by a change that `took` that mod-sequence."""
        gone = {uid for uid in uids if uid in self.flags}
        if not gone:
            return self
        flags = {u: f for u, f in self.flags.items() if u not in gone}
        modseqs = {u: m for u, m in self.modseqs.items() if u not in gone}
        rows = {u: m for u, m in self.rows.items() if u not in gone}
        rendered = {
            items: {u: r for u, r in by_uid.items() if u not in gone} for items, by_uid in self.rendered.items()
        }
        asof = self._asof_after(took, changed=True)  # unknown when the change does not say its mod-sequence
        return FolderView([u for u in self.uids if u not in gone], flags, modseqs, rows, rendered, asof)

    async def after_added(self, change: Change, load: Callable[[list[int]], Awaitable[list[Message]]]) -> FolderView:
        """This version with an "added" change applied: the new messages' flags are read (`load`) once for all
        the sessions on this version; those expunged before the read are left out."""
        new = [uid for uid in change.uids if uid not in self.flags]
        if not new:
            return self
        found = self._remembered(change)
        if isinstance(found, FolderView):
            return found
        told = [row for row in change.rows if row.uid in new]
        if len(told) == len(new):  # the change brought the rows: nothing to read
            view = self._with_rows(told, asof=self._asof_after([row.modseq for row in told], changed=True))
            if view is not self:
                self._next = (change, weakref.ref(view))
            return view
        task = found
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = asyncio.get_running_loop().create_task(self._with_added(new, load))
            self._next = (change, task)
        # Shielded: a session that ends while it waits does not cancel the read the others wait for.
        view = await asyncio.shield(task)
        if self._next is not None and self._next[1] is task and view is not self:
            self._next = (change, weakref.ref(view))
        return view

    async def _with_added(self, new: list[int], load: Callable[[list[int]], Awaitable[list[Message]]]) -> FolderView:
        return self._with_rows(await load(new), asof=None)  # read later than the change: of no one mod-sequence

    def _with_rows(self, loaded: Sequence[Message], *, asof: int | None) -> FolderView:
        rows = [m for m in loaded if m.uid not in self.flags]
        if not rows:
            return self
        flags, modseqs, known = dict(self.flags), dict(self.modseqs), dict(self.rows)
        for message in rows:
            flags[message.uid] = message.flags
            modseqs[message.uid] = message.modseq
            known[message.uid] = message
        added = sorted(m.uid for m in rows)
        # New UIDs are above the folder's (RFC 3501 §2.3.1.1): appended, unless the store says otherwise.
        ascending = not self.uids or added[0] > self.uids[-1]
        uids = self.uids + added if ascending else sorted((*self.uids, *added))
        rendered = {items: dict(by_uid) for items, by_uid in self.rendered.items()}
        return FolderView(uids, flags, modseqs, known, rendered, asof)


class FolderViews:
    """The latest FolderView of each folder a session shows, for the whole node (the imap and imaps
    listeners share it): a SELECT that finds the folder as that version shows it takes the version,
    instead of a copy of its own. Weak: a version no session shows is gone."""

    def __init__(self) -> None:
        self._latest: weakref.WeakValueDictionary[tuple[str, str, int], FolderView] = weakref.WeakValueDictionary()

    def select(self, key: tuple[str, str, int], messages: Sequence[Message], *, asof: int) -> FolderView:
        """The view of `messages`, the rows a SELECT read of the folder `key` (address, name, uidvalidity) at
        the mod-sequence `asof` (its HIGHESTMODSEQ in the same read)."""
        latest = self._latest.get(key)
        if latest is not None and latest.shows(messages):
            # Exactly the folder at `asof` (a later one, when it has come back to the same rows): said once known.
            latest.asof = asof if latest.asof is None else max(latest.asof, asof)
            return latest
        view = self._latest[key] = FolderView.of(messages, since=latest, asof=asof)
        return view

    def current(self, key: tuple[str, str, int], highestmodseq: int) -> FolderView | None:
        """The latest version of the folder `key`, when it is the folder at `highestmodseq` (its HIGHESTMODSEQ
        now): a SELECT takes it without reading the rows."""
        latest = self._latest.get(key)
        return latest if latest is not None and latest.asof == highestmodseq else None

    def caught_up(self, key: tuple[str, str, int], view: FolderView) -> None:
        """A session has reported every change it heard of: its view is the folder as it is now."""
        self._latest[key] = view


class _Recent(collections.abc.Set[int]):
    """The \\Recent messages of a session (RFC 3501 §2.3.2): those it shows from `first_recent` on, unless
    read-only (a set computed when asked, not kept)."""

    __slots__ = ("_selected",)

    def __init__(self, selected: Selected) -> None:
        self._selected = selected

    def __contains__(self, uid: object) -> bool:
        selected = self._selected
        return not selected.readonly and isinstance(uid, int) and uid >= selected.first_recent

    def __len__(self) -> int:
        selected = self._selected
        if selected.readonly:
            return 0
        uids = selected.uids
        return len(uids) - bisect.bisect_left(uids, selected.first_recent)

    def __iter__(self) -> Iterator[int]:
        selected = self._selected
        if selected.readonly:
            return iter(())
        uids = selected.uids
        return iter(uids[bisect.bisect_left(uids, selected.first_recent) :])


class Selected:
    """The selected folder as this session last reported it to its client: a FolderView, shared with the
    other sessions that show the same version, and the little in which this session differs from it:
    - `ghosts`: messages expunged in the view that the client has not been told of yet (an EXPUNGE may
      not be sent after FETCH, STORE or SEARCH, RFC 3501 §7.4.1): they keep their sequence numbers;
    - `hidden`: messages of the view the client has been told are expunged (its own EXPUNGE, MOVE),
      before the view has the change;
    - `told`: flags and mod-sequences the client has been told that are newer than the view's (its own
      STORE), and the last known ones of the ghosts.
    Commands read `uids`, `flags`, `modseqs`, `recent` and `seq`; `learn` records what they told."""

    __slots__ = (
        "_ghosts", "_hidden", "_own_uids", "_told_flags", "_told_modseqs", "first_recent", "highestmodseq", "key",
        "name", "pending", "readonly", "saved", "uidnext", "uidvalidity", "view",
    )  # fmt: skip

    def __init__(
        self, *, name: str, readonly: bool, uidvalidity: int, view: FolderView, first_recent: int,
        highestmodseq: int, uidnext: int, key: tuple[str, str, int],
    ) -> None:  # fmt: skip
        self.name = name
        self.readonly = readonly
        self.uidvalidity = uidvalidity
        self.view = view
        self.first_recent = first_recent  # UIDs from here on are \Recent in this session (unless read-only)
        self.highestmodseq = highestmodseq
        self.uidnext = uidnext
        self.key = key  # the folder's in FolderViews
        self.pending: list[Change] = []  # heard from the switchboard, not yet reported
        self.saved: list[int] = []  # RFC 5182 SEARCHRES `$`: UIDs, ascending
        self._ghosts: list[int] = []  # in the order they were expunged
        self._hidden: set[int] = set()
        self._told_flags: dict[int, str] = {}
        self._told_modseqs: dict[int, int] = {}
        self._own_uids: list[int] | None = None  # the sequence, when it is not the view's

    @property
    def uids(self) -> list[int]:
        """The UIDs in sequence order (index + 1 is the sequence number). Read only: it may be the view's."""
        return self.view.uids if self._own_uids is None else self._own_uids

    @property
    def flags(self) -> Mapping[int, str]:
        if not self._told_flags:
            return self.view.flags
        return collections.ChainMap(self._told_flags, self.view.flags)

    @property
    def modseqs(self) -> Mapping[int, int]:
        if not self._told_modseqs:
            return self.view.modseqs
        return collections.ChainMap(self._told_modseqs, self.view.modseqs)

    @property
    def recent(self) -> _Recent:
        return _Recent(self)

    def seq(self, uid: int) -> int:
        uids = self.uids
        index = bisect.bisect_left(uids, uid)
        if index < len(uids) and uids[index] == uid:
            return index + 1
        return 0

    def learn(self, message: Message) -> None:
        """The client has been told this message's flags and mod-sequence (newer than the view's)."""
        if self.seq(message.uid):
            self._told_flags[message.uid] = message.flags
            self._told_modseqs[message.uid] = message.modseq

    @property
    def ghosts(self) -> list[int]:
        return self._ghosts

    def hide(self, uid: int) -> int:
        """The client is being told `uid` is expunged: its sequence number before (0: not shown)."""
        seq = self.seq(uid)
        if not seq:
            return 0
        if self._own_uids is None:
            self._own_uids = list(self.view.uids)
        del self._own_uids[seq - 1]
        if uid in self._ghosts:
            self._ghosts.remove(uid)
            self._told_flags.pop(uid, None)
            self._told_modseqs.pop(uid, None)
        else:
            self._hidden.add(uid)
        return seq

    def haunt(self, uid: int) -> None:
        """`uid` is expunged from the view, not yet from the client's sequence: it stays, with its flags."""
        if not self.seq(uid) or uid in self._hidden:
            return
        self._told_flags.setdefault(uid, self.view.flags.get(uid, ""))
        self._told_modseqs.setdefault(uid, self.view.modseqs.get(uid, 0))
        self._ghosts.append(uid)

    def advance(self, view: FolderView) -> None:
        """Show `view` from now on, with the ghosts and hidden messages this session still has."""
        before = self.view.uids
        self.view = view
        hidden = {uid for uid in self._hidden if uid in view.flags}
        self._hidden = hidden
        ghosts = set(self._ghosts)
        for uid in [u for u in self._told_modseqs if u not in ghosts]:
            modseq = view.modseqs.get(uid)
            if modseq is None or modseq >= self._told_modseqs[uid]:  # the view knows as much now
                del self._told_modseqs[uid]
                self._told_flags.pop(uid, None)
        if not ghosts and not hidden:
            self._own_uids = None
        elif self._own_uids is None or before is not view.uids:  # else the same UIDs: the sequence stands
            shown = [u for u in view.uids if u not in hidden]
            self._own_uids = list(heapq.merge(shown, sorted(ghosts)))


class KeyedLocks(Generic[K]):
    """An asyncio.Lock per key, kept while a task holds it or waits for it and dropped after the last one:
    a lock kept for every key ever used would grow with the keys, which clients make (a folder's
    UIDVALIDITY, new with every folder created). `async with locks.hold(key):`."""

    __slots__ = ("_locks",)

    def __init__(self) -> None:
        self._locks: dict[K, tuple[asyncio.Lock, int]] = {}  # the lock, and the tasks holding or waiting

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, key: K) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            users = self._locks[key][1] - 1
            if users:
                self._locks[key] = (lock, users)
            else:
                del self._locks[key]


class _LeastRecentlyUsed(Generic[K, V]):
    """A mapping that keeps its `size` most recently used entries (AnalysisCache's three tables)."""

    __slots__ = ("_entries", "_size")

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: collections.OrderedDict[K, V] = collections.OrderedDict()

    def get(self, key: K) -> V | None:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def put(self, key: K, value: V) -> None:
        self._entries[key] = value
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)


class AnalysisCache:
    """Parsed message structures by (mailbox, file path). A message file never changes, so an entry
    never goes stale; the least recently used are dropped beyond `size`. One per node, shared by
    the imap and imaps listeners."""

    def __init__(self, size: int = _ANALYSES_KEPT) -> None:
        self._entries: _LeastRecentlyUsed[tuple[str, str], mime.Analysis] = _LeastRecentlyUsed(size)
        self._headers: _LeastRecentlyUsed[tuple[str, str], dict[str, str | None]] = _LeastRecentlyUsed(size)
        # FETCH items that never change for a message (RFC822.SIZE, ENVELOPE, ...), rendered once for every
        # session, by (mailbox, file path, item names): a summary FETCH joins them (commands.fetch).
        self._rendered: _LeastRecentlyUsed[tuple[str, str, str], bytes] = _LeastRecentlyUsed(size)
        self._locks: KeyedLocks[str] = KeyedLocks()

    def get(self, key: tuple[str, str]) -> mime.Analysis | None:
        return self._entries.get(key)

    def put(self, key: tuple[str, str], analysis: mime.Analysis) -> None:
        self._entries.put(key, analysis)

    def rendered(self, key: tuple[str, str, str]) -> bytes | None:
        return self._rendered.get(key)

    def keep_rendered(self, key: tuple[str, str, str], value: bytes) -> None:
        self._rendered.put(key, value)

    def lock(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Held by the session that fills a mailbox's misses (`name`: its address, or a name of the caller's)."""
        return self._locks.hold(name)

    def headers(self, key: tuple[str, str]) -> dict[str, str | None]:
        """The header field values SEARCH has looked up in this message so far (filled by the caller)."""
        found = self._headers.get(key)
        if found is None:
            found = {}
            self._headers.put(key, found)
        return found


def _analysis_json(data: bytes) -> str:
    return mime.analyze(data).to_json()


class Session:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        commands: table.Table[Session],
        config: NodeConfig,
        directory: Callable[[], Directory],
        store: MailStore,
        authenticator: Authenticator,
        metrics: NodeMetrics,
        tls: ssl.SSLContext | None,
        implicit_tls: bool,
        listener: str,
        analyses: AnalysisCache,
        views: FolderViews,
        remote: str,
        cluster: proxy.Proxy | None = None,
        internal: bool = False,
    ) -> None:
        """`cluster`: given when the node is clustered (a login whose home is another node is proxied
        there). `internal`: the session is on the internal port, whose only way in is a peer's master
        login (mailnode.imap.proxy), without TLS."""
        self._reader = reader
        self._writer = writer
        self._output: list[bytes] = []  # what send() and write() were given since the last flush()
        self._output_size = 0
        self._commands = commands
        self.config = config
        self._directory = directory
        self.store = store
        self.authenticator = authenticator
        self._metrics = metrics
        self._tls = tls
        self.is_tls = implicit_tls
        self._listener = listener
        self.analysis_cache = analyses
        self._views = views
        self.user: MailboxEntry | None = None
        self.account: Account | None = None
        self.selected: Selected | None = None
        self.condstore = False  # RFC 7162 §3.1: once enabled, FETCH and STORE report MODSEQ
        self.qresync = False  # RFC 7162 §3.2: once enabled, expunges are reported as VANISHED
        self.imap4rev2 = False  # RFC 9051, once enabled: UTF-8 names, ESEARCH for SEARCH, no \Recent (commands.auth)
        self._unsubscribe: Callable[[], None] | None = None
        self.wakeup = asyncio.Event()  # set when a change for the selected folder arrives
        self._heard_while_selecting: list[Change] | None = None  # see `selecting`
        self._clock = asyncio.get_running_loop().time
        self._login_deadline = self._clock() + config.imap.login_timeout
        self.task: asyncio.Task[Any] | None = None
        self.remote = remote  # the client's address (mailnode.listener.Client: a PROXY header's, else the peer)
        self.append_literal: AppendLiteral | None = None  # the command's streamed APPEND message
        self.cluster = cluster
        self.internal = internal

    @property
    def state(self) -> table.State:
        if self.selected is not None:
            return table.State.SELECTED
        if self.user is not None:
            return table.State.AUTHENTICATED
        return table.State.NOT_AUTHENTICATED

    def shut_down(self) -> None:
        """The node is stopping: say so and hang up (commands in progress are not waited for; what
        they had answered so far goes out before the BYE)."""
        if not self._writer.is_closing():
            self.send(responses.BYE_SHUTTING_DOWN.line())
            self._write_out()
            self._writer.close()

    # -- output ---------------------------------------------------------------------------------------
    # send() and write() only collect; flush() hands what they collected to the transport in one write.
    # Each transport write costs a send() system call and, over TLS, a record made by asyncio's SSL layer
    # in Python: a burst (a command's untagged responses and its tagged one) written as one is much
    # cheaper for the event loop than a write per line. So whoever sends and then waits for the client
    # (a continuation `+`, IDLE, STARTTLS's OK, the end of a command: Session._execute) flushes first.

    def send(self, line: str | bytes) -> None:
        """Send one response line (its CRLF is added); it goes out at the next flush()."""
        self.write((line.encode() if isinstance(line, str) else line) + b"\r\n")

    def write(self, data: bytes) -> None:
        """Send lines already framed (each with its CRLF); they go out at the next flush()."""
        self._output.append(data)
        self._output_size += len(data)
        if self._output_size >= OUTPUT_BOUND:
            self._write_out()

    def _write_out(self) -> None:
        """Hand what was sent since the last flush to the transport, in one write (no waiting: past
        OUTPUT_BOUND write() calls this, so memory stays bounded; the transport's buffer is drained by
        flush())."""
        if not self._output:
            return
        data = self._output[0] if len(self._output) == 1 else b"".join(self._output)
        self._output = []
        self._output_size = 0
        self._writer.write(data)

    async def flush(self) -> None:
        """Write out what was sent since the last flush, then wait until the transport has taken it
        (RFC 3501 has no flow control: the transport's is ours; FETCH drains before reading more)."""
        self._write_out()
        await self._writer.drain()

    def capabilities(self) -> str:
        return " ".join(
            self._commands.capabilities(
                authenticated=self.user is not None,
                tls_active=self.is_tls,
                tls_available=self._tls is not None,
                plaintext_login=self.config.imap.allow_plaintext_login or self.internal,
            )
        )

    # -- the connection -------------------------------------------------------------------------------

    def directory(self) -> Directory:
        """The directory in force now."""
        return self._directory()

    async def relay(self, upstream: proxy.Upstream) -> None:
        """Proxied (the mailbox's home is another node): from now on the client talks to the home through
        this connection; returns when either side has closed."""
        await self.flush()
        await upstream.relay(self._reader, self._writer)

    @property
    def tls_available(self) -> bool:
        return self._tls is not None

    async def start_tls(self) -> None:
        """Upgrade the connection (STARTTLS). RFC 3501 §6.2.1, RFC 2595 §3.1: anything the client sent
        after STARTTLS before the handshake is discarded; else a man in the middle could append
        commands (his own LOGIN) that would run inside the TLS session (CVE-2011-0411's class)."""
        assert self._tls is not None
        # The bytes already read are in the reader's buffer; no public API drops them (aiosmtpd does
        # the same). There is no await between this and start_tls pausing the plaintext transport,
        # so nothing more can slip in; what the kernel still holds is read as TLS and fails the handshake.
        buffer: bytearray = self._reader._buffer  # type: ignore[attr-defined]
        buffer.clear()
        await self._writer.start_tls(self._tls)
        self.is_tls = True

    def _time_left(self) -> float:
        """How long the session may wait for the client: the autologout timer once logged in, else
        what is left of the login timer."""
        if self.user is not None:
            return float(self.config.imap.idle_timeout)
        return max(0.0, min(self._login_deadline - self._clock(), float(self.config.imap.idle_timeout)))

    async def read_in_time(self, read: Awaitable[T]) -> T:
        """Await a read from the client, hanging up (`* BYE`) when it takes longer than _time_left. In this
        task (asyncio.timeout, not wait_for, whose task of its own costs each command two more turns of a
        busy event loop before it runs)."""
        try:
            async with asyncio.timeout(self._time_left()):
                return await read
        except TimeoutError:
            if self.user is None:
                raise responses.Hangup(responses.BYE_LOGIN_TIMEOUT) from None
            raise responses.Hangup(responses.BYE_AUTOLOGOUT) from None

    async def readline(self) -> bytes | None:
        """One line without its CRLF; None when the client has gone."""
        self._write_out()  # never wait for the client with an answer of ours still held here
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as error:
            if not error.partial:
                return None
            raise
        except asyncio.LimitOverrunError:
            raise responses.Hangup(responses.BYE_LINE_TOO_LONG) from None
        return line.rstrip(b"\r\n")

    # -- the command loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        self._metrics.imap_sessions.labels(self._listener).inc()
        self._metrics.imap_sessions_active.labels(self._listener).inc()
        try:
            self.send(responses.OK_GREETING.line(capabilities=self.capabilities(), hostname=self.config.hostname))
            await self.flush()
            while True:
                try:
                    parts = await self.read_in_time(self._read_command())
                    if parts is None:
                        return
                    if not await self._execute(parts):
                        return
                finally:
                    await self._drop_append_literal()
        except responses.Hangup as hangup:
            with contextlib.suppress(ConnectionError):
                self.send(hangup.line())
                await self.flush()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._metrics.imap_sessions_active.labels(self._listener).dec()
            if self._unsubscribe is not None:
                self._unsubscribe()
            if not self._writer.is_closing():  # what was sent without a flush (an error's way out) still goes
                with contextlib.suppress(OSError, RuntimeError):
                    self._write_out()
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()

    async def _read_command(self) -> list[bytes] | None:
        """One command: its lines and literals (RFC 3501 §4.3, RFC 7888 LITERAL+)."""
        parts: list[bytes] = []
        total = 0
        while True:
            line = await self.readline()
            if line is None:
                return None
            parts.append(line)
            total += len(line)
            try:
                marker = protocol.literal_marker(line)
            except protocol.ProtocolError:
                return parts  # parse_command reports it
            if marker is None:
                if self.append_literal is not None:
                    self.append_literal.last = self.append_literal.position == len(parts) - 2 and not line.strip()
                return parts
            size, non_synchronizing = marker
            total += size
            # RFC 7889 / RFC 4469 TOOBIG: the limit is refused before reading, before login much smaller.
            limit = self.config.imap.max_literal if self.user is not None else LOGIN_MAX_LITERAL
            if total > limit:
                if non_synchronizing:  # RFC 7888 §4: the client sends it anyway; we cannot resync
                    raise responses.Hangup(responses.BYE_TOOBIG)
                self.send(responses.NO_TOOBIG.line(protocol.command_tag(parts[0]), limit=limit))
                await self.flush()
                return []
            streamed = self._streams_append(parts[0], size)
            # RFC 3501 §7.5: a synchronising literal the command will refuse is refused before the `+`.
            refusal = responses.NO_OVERQUOTA if streamed and self.over_quota(size) else None
            if refusal is not None and not non_synchronizing:
                self.send(refusal.line(protocol.command_tag(parts[0])))
                await self.flush()
                return []
            if not non_synchronizing:
                self.send(responses.CONTINUE_LITERAL)
                await self.flush()
            if streamed:
                parts[-1] = _MARKER.sub(b"{0}", line)  # an empty literal stands for the message
                parts.append(b"")
                await self._stream_append(len(parts) - 1, size, refusal)
            else:
                parts.append(await self._reader.readexactly(size))

    def _streams_append(self, first_line: bytes, size: int) -> bool:
        """Whether this literal is an APPEND's message to stream to disk: logged in, larger than a
        chunk (a mailbox name or date-time never is), the command's first such literal."""
        return (
            self.account is not None
            and size > APPEND_CHUNK
            and self.append_literal is None
            and _APPEND.match(first_line) is not None
        )

    async def _stream_append(self, position: int, size: int, refusal: responses.Response | None) -> None:
        """Read `size` bytes of literal a chunk at a time into a store spool (or, refused, nowhere)."""
        assert self.account is not None
        literal = self.append_literal = AppendLiteral(position, None, refusal)
        if refusal is None:
            try:
                literal.spool = await self.account.spool()
            except StorageFull:
                literal.refused = responses.NO_DISK_FULL
        remaining = size
        line_ends = mime.LineEnds()  # stored with CRLF line ends, as commands.store.append does
        while remaining:
            chunk = await self._reader.read(min(APPEND_CHUNK, remaining))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", remaining)
            remaining -= len(chunk)
            if literal.spool is not None:
                try:
                    await literal.spool.write(line_ends.convert(chunk))
                except StorageFull:  # the spool removed its file; the rest is read and thrown away
                    literal.spool, literal.refused = None, responses.NO_DISK_FULL

    async def _drop_append_literal(self) -> None:
        """After each command, and when the session ends: the streamed message's file goes, unless the
        APPEND delivered it (then there is none)."""
        literal, self.append_literal = self.append_literal, None
        if literal is not None and literal.spool is not None:
            try:
                await literal.spool.discard()
            except Exception:  # recovery empties tmp/ at the next start
                log.exception("could not remove an APPEND's spool", extra={"fields": {"path": str(literal.spool.path)}})

    def over_quota(self, size: int) -> bool:
        """Whether a message of `size` bytes would take the user's mailbox over its quota."""
        assert self.user is not None
        quota = self.user.quota
        return bool(quota) and self.store.usage(self.user.address).bytes + size > quota

    async def _execute(self, parts: list[bytes]) -> bool:
        """Run one command. Returns False once the session is over."""
        if not parts:
            return True
        tag = "*"
        done: bool | None = None
        try:
            command = protocol.parse_command(parts)
            tag = command.tag
            self._metrics.imap_commands.labels(self._commands.metric_label(command.name)).inc()
            done = await self._commands.dispatch(command.name, self.state).handler(self, command)
        except search.BadCharset as error:  # RFC 3501 §6.4.4
            self.send(responses.NO_BADCHARSET.line(tag, supported=" ".join(error.supported), error=error))
        except protocol.ProtocolError as error:
            self.send(protocol.seven_bit(responses.BAD_SYNTAX.line(error.tag or tag, error=error)))
        except responses.Refused as refused:  # their texts may name a folder: 7-bit, as the client named it
            self.send(protocol.seven_bit(refused.line(tag)))
        except FolderError as error:
            text = str(error)
            folder_error = responses.NO_FOLDER if text.startswith("[") else responses.NO_NONEXISTENT
            self.send(protocol.seven_bit(folder_error.line(tag, error=text)))
        except (responses.Hangup, ConnectionError, asyncio.IncompleteReadError):
            raise
        except Exception:
            log.exception("imap command failed", extra={"fields": {"user": self.user and self.user.address}})
            self.send(responses.NO_SERVERBUG.line(tag))
        await self.flush()
        return done is not False

    # -- authenticated --------------------------------------------------------------------------------

    def log_in(self, user: MailboxEntry, account: Account) -> None:
        """Enter the authenticated state as `user`, whose mailbox is ready as `account`, and start
        hearing about changes to it. The last step of a login: nothing after it can fail."""
        self.user = user
        self.account = account
        self._unsubscribe = self.store.switchboard.subscribe(user.address, self._on_change)

    def folder_name(self, arg: protocol.Arg) -> str:
        return protocol.mailbox_arg(arg, DELIMITER, utf8=self.imap4rev2)

    def _on_change(self, change: Change) -> None:
        selected = self.selected
        if selected is not None and change.folder == selected.name:
            selected.pending.append(change)
            self.wakeup.set()
        elif self._heard_while_selecting is not None:
            self._heard_while_selecting.append(change)

    @contextlib.contextmanager
    def selecting(self) -> Iterator[list[Change]]:
        """While a SELECT (or EXAMINE) reads its folder, with none selected: the changes heard meanwhile,
        which what it read may not hold; `select` takes those of its folder as pending, told after it like
        any later change (a change it did read is applied again as nothing: FolderView.after and after_added
        skip what the version already holds)."""
        heard: list[Change] = []
        self._heard_while_selecting = heard
        try:
            yield heard
        finally:
            self._heard_while_selecting = None

    # -- selected ---------------------------------------------------------------------------------------

    def current_version(self, folder: Folder) -> FolderView | None:
        """The shared version of `folder` when it is the folder as just read (its HIGHESTMODSEQ), if there is one."""
        assert self.user is not None
        return self._views.current((self.user.address, folder.name, folder.uidvalidity), folder.highestmodseq)

    def select(
        self, *, folder: Folder, messages: Sequence[Message] | FolderView, readonly: bool, first_recent: int,
        heard: Sequence[Change] = (),
    ) -> Selected:  # fmt: skip
        """Enter the selected state on `folder`, whose messages a SELECT (or EXAMINE) just read, or which
        `current_version` found unchanged (the version given); `heard`: the changes heard while it read
        (`selecting`), those of this folder pending."""
        assert self.user is not None
        key = (self.user.address, folder.name, folder.uidvalidity)
        if isinstance(messages, FolderView):
            view = messages
        else:
            view = self._views.select(key, messages, asof=folder.highestmodseq)
        self.selected = Selected(
            name=folder.name, readonly=readonly, uidvalidity=folder.uidvalidity,
            view=view, first_recent=first_recent,
            highestmodseq=folder.highestmodseq, uidnext=folder.uidnext, key=key,
        )  # fmt: skip
        self.selected.pending.extend(change for change in heard if change.folder == folder.name)
        return self.selected

    async def analyses(self, messages: Sequence[Message]) -> dict[int, mime.Analysis]:
        """The MIME analysis of each message: from memory, else from the index cache, else parsed now."""
        assert self.selected is not None and self.account is not None and self.user is not None
        cache = self.analysis_cache
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
        """Tell the client what changed in the selected folder since it last heard (RFC 3501 §7), in the
        order the changes happened; with `expunge` False (after FETCH, STORE, SEARCH: §7.4.1) expunged
        messages keep their sequence numbers until a later report."""
        selected = self.selected
        if selected is None:
            return
        if expunge and selected.ghosts:
            for uid in list(selected.ghosts):  # older than anything pending
                self._tell_expunged(uid)
            selected.advance(selected.view)
        if not selected.pending:
            return
        assert self.account is not None
        account, name = self.account, selected.name
        pending, selected.pending = selected.pending, []
        shown = len(selected.uids)  # the count the client knows (EXISTS)
        for done, change in enumerate(pending):
            if change.kind == "added":
                try:
                    view = await selected.view.after_added(change, lambda uids: account.messages(name, uids=uids))
                except BaseException:  # the store failed (or the session ends): the rest stays to be told
                    selected.pending[:0] = pending[done:]
                    raise
                selected.advance(view)
                continue
            if len(selected.uids) != shown:  # EXISTS before a response that may name a new message
                shown = self._tell_exists()
            view = selected.view.after(change)
            if change.kind == "flags":
                selected.advance(view)
                if change.origin is not self:
                    for uid in change.uids:
                        seq = selected.seq(uid)
                        if seq:
                            self.send(f"* {seq} FETCH ({self.fetch_flags(uid)} UID {uid})")
            else:  # expunged, by another session or by this one without telling (then it is told now)
                for uid in change.uids:
                    if uid not in selected.view.flags:
                        continue
                    if expunge:
                        self._tell_expunged(uid)
                    else:
                        selected.haunt(uid)
                selected.advance(view)
                shown = len(selected.uids)
        if len(selected.uids) != shown:
            self._tell_exists()
        if not selected.pending and not selected.ghosts:
            self._views.caught_up(selected.key, selected.view)

    def _tell_exists(self) -> int:
        selected = self.selected
        assert selected is not None
        count = len(selected.uids)
        self.send(f"* {count} EXISTS")
        if not self.imap4rev2:  # RFC 9051 has no RECENT response
            self.send(f"* {len(selected.recent)} RECENT")
        return count

    def _tell_expunged(self, uid: int) -> None:
        assert self.selected is not None
        seq = self.selected.hide(uid)
        if seq:
            self.send(f"* VANISHED {uid}" if self.qresync else f"* {seq} EXPUNGE")  # RFC 7162 §3.2.10

    def forget(self, uid: int) -> None:
        """Drop a message this session expunged from the sequence and tell the client (RFC 3501 §7.4.1;
        VANISHED once QRESYNC is enabled)."""
        self._tell_expunged(uid)

    @staticmethod
    @functools.lru_cache(maxsize=1024)
    def flags_text(flags: str, recent: bool) -> str:
        """A FETCH response's FLAGS item, without MODSEQ: a folder's messages have few distinct flag sets,
        and a FETCH 1:* asks for each message's."""
        words = flags.split()
        if recent:
            words.append("\\Recent")
        return f"FLAGS ({' '.join(words)})"

    def flags_recent_from(self) -> int | None:
        """The first UID whose FLAGS a FETCH shows with \\Recent; None when none does: RFC 9051 (IMAP4rev2)
        has no \\Recent flag, and a read-only folder has no recent message."""
        selected = self.selected
        assert selected is not None
        return None if self.imap4rev2 or selected.readonly else selected.first_recent

    def fetch_flags(self, uid: int) -> str:
        """The FLAGS item of a FETCH response (with MODSEQ once CONDSTORE is on)."""
        selected = self.selected
        assert selected is not None
        first_recent = self.flags_recent_from()
        text = self.flags_text(selected.flags.get(uid, ""), first_recent is not None and uid >= first_recent)
        if self.condstore:
            text += f" MODSEQ ({selected.modseqs.get(uid, 0)})"
        return text

    def messages_for(self, sequence: str, *, uid: bool) -> list[tuple[int, int]]:
        """(seq, uid) pairs that a sequence set or UID set names, in order; `$` names the saved search
        result's messages still here (RFC 5182 §2.1: never an error, even when empty)."""
        selected = self.selected
        assert selected is not None
        if sequence == protocol.SAVED:
            return [(seq, u) for u in selected.saved if (seq := selected.seq(u))]
        numbers = protocol.parse_sequence_set(sequence)
        uids = selected.uids
        if uid:
            largest = uids[-1] if uids else 0
            return numbers.positions(uids, largest)
        count = len(uids)
        result = [(n, uids[n - 1]) for n in numbers.iter(range(1, count + 1), count)]
        if not result:  # RFC 3501 §9 seq-number: a number beyond the mailbox is an error
            raise responses.Refused(responses.BAD_NO_SUCH_MESSAGE)
        return result
