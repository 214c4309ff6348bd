"""Sessions on one folder share its state (mailnode.imap.session.FolderView) and each still reports changes
to its own client only when IMAP lets it: EXPUNGE not after FETCH, STORE or SEARCH (RFC 3501 §7.4.1)
and with the sequence numbers the client knows; flags as FETCH after the command; VANISHED with QRESYNC
(RFC 7162 §3.2.10); at once in IDLE. A summary FETCH, whose unchanging items the sessions share once
rendered, says what each item rendered alone says, after flag changes, expunges and new mail. Also
`listen.limits.imaps`, the implicit-TLS listener's own limit.

A raw line client over TLS, so that the tests see every untagged response, in order."""

from __future__ import annotations

import asyncio
import re
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mailnode.imap.session import Session
from mailnode.store import index
from mailnode.store.account import Account
from tests.node.conftest import PASSWORD, NodeFactory, RunningNode

USER = "user@example.com"
WAIT = 60.0  # seconds for a condition on a loaded machine


def message(number: int) -> bytes:
    return (
        f"From: Alice <alice@remote.test>\r\nTo: {USER}\r\nSubject: note {number}\r\n"
        f"Message-ID: <s{number}@remote.test>\r\n\r\nBody {number}.\r\n"
    ).encode()


def deliver(node: RunningNode, *numbers: int) -> None:
    with smtplib.SMTP("127.0.0.1", node.port("smtp"), timeout=WAIT) as client:
        for number in numbers:
            client.sendmail("alice@remote.test", [USER], message(number))


class Client:
    """An IMAPS session that returns each command's untagged lines (without CRLF), in order."""

    def __init__(self, node: RunningNode, client_tls: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", node.port("imaps")), timeout=WAIT)
        self.sock = client_tls.wrap_socket(raw, server_hostname="127.0.0.1")
        self.reader = self.sock.makefile("rb")
        self.tag = 0
        assert self.line().startswith(b"* OK")
        self.ok(f'LOGIN "{USER}" "{PASSWORD}"')

    def line(self) -> bytes:
        line = self.reader.readline()
        assert line, "the server hung up"
        return line.rstrip(b"\r\n")

    def command(self, text: str) -> tuple[bytes, list[bytes]]:
        self.tag += 1
        tag = f"t{self.tag}".encode()
        self.sock.sendall(tag + b" " + text.encode() + b"\r\n")
        lines = []
        while not (line := self.line()).startswith(tag + b" "):
            lines.append(line)
        return line[len(tag) + 1 :], lines

    def ok(self, text: str) -> list[bytes]:
        status, lines = self.command(text)
        assert status.startswith(b"OK"), (text, status, lines)
        return lines

    def idle(self) -> None:
        self.sock.sendall(b"i IDLE\r\n")
        assert self.line().startswith(b"+ ")

    def done(self) -> list[bytes]:
        self.sock.sendall(b"DONE\r\n")
        lines = []
        while not (line := self.line()).startswith(b"i "):
            lines.append(line)
        assert line.startswith(b"i OK"), line
        return lines

    def close(self) -> None:
        # The file object holds the socket open too (makefile): both closed, the node sees the hang-up at once
        # instead of waiting out its shutdown grace for this session.
        self.reader.close()
        self.sock.close()


@pytest.fixture
def clients(node: RunningNode, client_tls: ssl.SSLContext) -> Iterator[Callable[[], Client]]:
    opened: list[Client] = []

    def open_one() -> Client:
        client = Client(node, client_tls)
        opened.append(client)
        return client

    yield open_one
    for client in opened:
        client.close()


def expunges(lines: list[bytes]) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := re.fullmatch(rb"\* (\d+) EXPUNGE", line))]


def fetched(lines: list[bytes]) -> dict[int, int]:
    """seq -> UID of the FETCH lines."""
    return {int(m.group(1)): int(m.group(2)) for line in lines if (m := re.match(rb"\* (\d+) FETCH \(UID (\d+)", line))}


def sessions_selecting(node: RunningNode, count: int) -> list[Session]:
    """The node's sessions that have a folder selected, once there are `count` of them."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            found = [s for group in node.node._imap_sessions for s in list(group) if s.selected is not None]
        except RuntimeError:  # a set changed size as the node's thread copied it: look again
            continue
        if len(found) == count or time.monotonic() > deadline:
            assert len(found) == count, found
            return found
        time.sleep(0.02)


def test_sessions_on_one_folder_share_its_state(node: RunningNode, clients: Callable[[], Client]) -> None:
    deliver(node, 1, 2, 3, 4, 5)
    first, second, third = clients(), clients(), clients()
    for client in (first, second, third):
        client.ok("SELECT INBOX")
    sessions = sessions_selecting(node, 3)
    views = {id(s.selected.view) for s in sessions if s.selected is not None}
    assert len(views) == 1  # one FolderView, not one copy per session
    for session in sessions:
        selected = session.selected
        assert selected is not None and len(selected.uids) == 5
        assert selected.uids is selected.view.uids and selected.flags is selected.view.flags  # nothing of its own
    old = sessions[0].selected.view if sessions[0].selected is not None else None
    first.ok("STORE 2 +FLAGS (\\Flagged)")
    second.ok("NOOP")
    third.ok("NOOP")
    views = {id(s.selected.view) for s in sessions if s.selected is not None}
    assert len(views) == 1 and id(old) not in views  # the new version, shared again
    for session in sessions:
        assert session.selected is not None and "\\Flagged" in session.selected.flags[2]


def test_an_expunge_is_told_only_where_imap_allows_with_the_numbers_the_client_knows(
    node: RunningNode, clients: Callable[[], Client]
) -> None:
    deliver(node, 1, 2, 3, 4, 5)
    first, second = clients(), clients()
    first.ok("SELECT INBOX")
    second.ok("SELECT INBOX")
    first.ok("STORE 2,4 +FLAGS.SILENT (\\Deleted)")
    assert expunges(first.ok("EXPUNGE")) == [2, 3]
    deliver(node, 6)
    # FETCH, STORE and SEARCH may not tell of expunges: the numbers stand (the messages gone have nothing
    # left to fetch), and the new message is told
    lines = second.ok("FETCH 1:5 (UID)")
    assert fetched(lines) == {1: 1, 3: 3, 5: 5} and not expunges(lines)
    assert b"* 6 EXISTS" in lines
    lines = second.ok("STORE 5 +FLAGS (\\Seen)")
    assert not expunges(lines) and any(line.startswith(b"* 5 FETCH (FLAGS (\\Seen") for line in lines)
    lines = second.ok("SEARCH ALL")
    assert not expunges(lines)
    lines = second.ok("FETCH 6 (UID)")
    assert fetched(lines) == {6: 6}
    # NOOP may: in the order they happened, each number as the client knows it by then
    assert expunges(second.ok("NOOP")) == [2, 3]
    assert fetched(second.ok("FETCH 1:* (UID)")) == {1: 1, 2: 3, 3: 5, 4: 6}
    assert expunges(second.ok("NOOP")) == []


def test_a_shared_summary_fetch_says_what_the_items_say_alone(node: RunningNode, clients: Callable[[], Client]) -> None:
    deliver(node, 1, 2, 3)
    first, second = clients(), clients()
    first.ok("SELECT INBOX")
    second.ok("SELECT INBOX")
    items = "FLAGS RFC822.SIZE INTERNALDATE ENVELOPE BODYSTRUCTURE"
    summary = f"UID FETCH 1:* ({items})"
    first.ok(summary)  # renders each message's unchanging items, once for both sessions
    first.ok("UID STORE 2 +FLAGS (\\Flagged)")
    first.ok("UID STORE 3 +FLAGS.SILENT (\\Deleted)")
    first.ok("EXPUNGE")
    deliver(node, 4)
    second.ok("NOOP")
    shared = [line for line in second.ok(summary) if b" FETCH " in line]
    # An item that reads the message makes every item of the line be rendered on its own, for this FETCH.
    empty = b' BODY[HEADER.FIELDS (X-NONE)]<100> ""'
    alone = [
        line.replace(empty, b"")
        for line in second.ok(f"UID FETCH 1:* ({items} BODY.PEEK[HEADER.FIELDS (X-NONE)]<100.1>)")
        if b" FETCH " in line
    ]
    assert shared == alone
    assert fetched(shared) == {1: 1, 2: 2, 3: 4}
    assert b"FLAGS (\\Flagged)" in shared[1] and b'"note 2"' in shared[1] and b'"note 4"' in shared[2]
    assert all(b"RFC822.SIZE " in line and b"BODYSTRUCTURE (" in line for line in shared)


def test_flags_changed_elsewhere_are_told_after_the_command(node: RunningNode, clients: Callable[[], Client]) -> None:
    deliver(node, 1, 2, 3)
    first, second = clients(), clients()
    first.ok("SELECT INBOX")
    second.ok("SELECT INBOX")
    first.ok("STORE 3 +FLAGS (\\Flagged)")
    lines = [line for line in second.ok("FETCH 3 (FLAGS)") if line.startswith(b"* 3 FETCH")]
    assert len(lines) == 2, lines
    assert b"\\Flagged" not in lines[0]  # the answer, as the client knew the message
    assert lines[1] == b"* 3 FETCH (FLAGS (\\Flagged) UID 3)"  # then the change
    assert second.ok("NOOP") == []


def test_qresync_sessions_hear_vanished_when_they_may(node: RunningNode, clients: Callable[[], Client]) -> None:
    deliver(node, 1, 2, 3, 4)
    first, second = clients(), clients()
    first.ok("SELECT INBOX")
    second.ok("ENABLE QRESYNC")
    second.ok("SELECT INBOX")
    first.ok("STORE 1,3 +FLAGS.SILENT (\\Deleted)")
    first.ok("EXPUNGE")
    lines = second.ok("FETCH 1:4 (UID)")
    assert fetched(lines) == {2: 2, 4: 4}
    assert not [line for line in lines if b"VANISHED" in line]
    lines = second.ok("NOOP")
    assert [line for line in lines if b"VANISHED" in line] == [b"* VANISHED 1", b"* VANISHED 3"]
    assert fetched(second.ok("FETCH 1:* (UID)")) == {1: 2, 2: 4}


def test_idle_sessions_hear_every_change_at_once(node: RunningNode, clients: Callable[[], Client]) -> None:
    deliver(node, 1, 2, 3)
    writer = clients()
    writer.ok("SELECT INBOX")
    idlers = [clients() for _ in range(3)]
    for idler in idlers:
        idler.ok("SELECT INBOX")
        idler.idle()
    writer.ok("STORE 2 +FLAGS (\\Answered)")
    for idler in idlers:
        assert idler.line() == b"* 2 FETCH (FLAGS (\\Answered) UID 2)"
    writer.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
    writer.ok("EXPUNGE")
    for idler in idlers:
        line = idler.line()
        if line.startswith(b"* 1 FETCH"):  # the \Deleted flag first
            line = idler.line()
        assert line == b"* 1 EXPUNGE"
    deliver(node, 4)
    for idler in idlers:
        assert idler.line() == b"* 3 EXISTS"
        assert idler.line() == b"* 1 RECENT"
    for idler in idlers:
        assert idler.done() == []
        assert fetched(idler.ok("FETCH 1:* (UID)")) == {1: 2, 2: 3, 3: 4}
    assert writer.ok("NOOP") == [b"* 3 EXISTS", b"* 3 RECENT"]  # told too (its SELECT took 1:3 as recent)
    sessions = sessions_selecting(node, 4)
    assert len({id(s.selected.view) for s in sessions if s.selected is not None}) == 1


def test_a_message_stored_while_a_select_reads_the_folder_is_told_after_it(
    node: RunningNode, clients: Callable[[], Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SELECT reads the folder, then answers: a message stored in between (published while the session has
    no folder selected yet) is not in what it read, and is told as EXISTS at the next command, as any later
    one is; before, the session never heard of it until it selected the folder again."""
    deliver(node, 1, 2)
    observer, client = clients(), clients()
    observer.ok("SELECT INBOX")
    read, answer = threading.Event(), threading.Event()
    select = Account.select

    async def read_then_wait(account: Account, name: str, **kwargs: Any) -> object:
        result = await select(account, name, **kwargs)
        read.set()
        await asyncio.to_thread(answer.wait, WAIT)
        return result

    monkeypatch.setattr(Account, "select", read_then_wait)
    client.sock.sendall(b"s1 SELECT INBOX\r\n")
    assert read.wait(WAIT), "the SELECT read the folder"
    deliver(node, 3)
    deadline = time.monotonic() + WAIT
    while b"* 3 EXISTS" not in observer.ok("NOOP"):  # published: the other session heard of it
        assert time.monotonic() < deadline, "the observer never heard of message 3"
    answer.set()
    lines = []
    while not (line := client.line()).startswith(b"s1 "):
        lines.append(line)
    assert line.startswith(b"s1 OK") and b"* 2 EXISTS" in lines, (line, lines)  # what the SELECT read
    assert b"* 3 EXISTS" in client.ok("NOOP")


def test_a_select_of_a_folder_unchanged_since_its_shared_version_reads_no_rows(
    node: RunningNode, clients: Callable[[], Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SELECT that finds the folder at the mod-sequence of its latest shared version takes that version
    instead of reading every row, and answers what a SELECT that reads them answers (STATUS, read from the
    index): after the sessions' own STORE and new mail, and after an EXPUNGE, the next SELECT reads no row;
    after a COPY into the folder (whose change brings no rows, read later by the sessions) it reads them."""
    deliver(node, 1, 2, 3)
    reads: list[str] = []
    messages = index._Queries.messages

    def counted(queries: index._Queries, folder: str | None = None, **kwargs: object) -> list[index.Message]:
        if kwargs.get("shared"):
            reads.append(str(folder))
        return messages(queries, folder, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(index._Queries, "messages", counted)
    first = clients()
    first.ok("SELECT INBOX")
    first.ok("STORE 2 +FLAGS (\\Seen)")
    deliver(node, 4)
    deadline = time.monotonic() + WAIT
    while b"* 4 EXISTS" not in first.ok("NOOP"):  # the session reported the new mail: its version is the latest
        assert time.monotonic() < deadline, "message 4 never came"
    assert reads == ["INBOX"]
    status = _status(first.ok("STATUS INBOX (MESSAGES UIDNEXT HIGHESTMODSEQ)"))
    fast = clients().ok("SELECT INBOX")
    assert reads == ["INBOX"]  # no row read
    assert _answer(fast) == {**status, "UNSEEN": b"1"}
    first.ok("STORE 4 +FLAGS (\\Deleted)")
    first.ok("EXPUNGE")
    status = _status(first.ok("STATUS INBOX (MESSAGES UIDNEXT HIGHESTMODSEQ)"))
    fast = clients().ok("SELECT INBOX")
    assert reads == ["INBOX"]
    assert _answer(fast) == {**status, "UNSEEN": b"1"} and status["EXISTS"] == b"3"
    first.ok("COPY 1 INBOX")
    status = _status(first.ok("STATUS INBOX (MESSAGES UIDNEXT HIGHESTMODSEQ)"))
    read = clients().ok("SELECT INBOX")
    assert reads == ["INBOX", "INBOX"]
    assert _answer(read) == {**status, "UNSEEN": b"1"} and status["EXISTS"] == b"4"


def _answer(lines: list[bytes]) -> dict[str, bytes]:
    """A SELECT's EXISTS, UNSEEN, UIDNEXT and HIGHESTMODSEQ."""
    found = {m.group(2).decode(): m.group(1) for line in lines if (m := re.fullmatch(rb"\* (\d+) (EXISTS)", line))}
    for line in lines:
        if m := re.match(rb"\* OK \[(UNSEEN|UIDNEXT|HIGHESTMODSEQ) (\d+)\]", line):
            found[m.group(1).decode()] = m.group(2)
    return found


def _status(lines: list[bytes]) -> dict[str, bytes]:
    """STATUS's MESSAGES, UIDNEXT and HIGHESTMODSEQ, named as a SELECT's answer names them."""
    (line,) = [line for line in lines if line.startswith(b"* STATUS")]
    values = dict(re.findall(rb"(MESSAGES|UIDNEXT|HIGHESTMODSEQ) (\d+)", line))
    return {"EXISTS": values[b"MESSAGES"], "UIDNEXT": values[b"UIDNEXT"], "HIGHESTMODSEQ": values[b"HIGHESTMODSEQ"]}


def test_imaps_has_its_own_connection_limit(node_factory: NodeFactory, client_tls: ssl.SSLContext) -> None:
    node = node_factory(
        listen={"limits": {"imap": {"total": 3, "per_client": 10}, "imaps": {"total": 1, "per_client": 10}}}
    )
    held = []
    for listener in ("imap", "imap", "imap", "imaps"):
        sock = socket.create_connection(("127.0.0.1", node.port(listener)), timeout=WAIT)
        held.append(sock)
        if listener == "imaps":
            sock = client_tls.wrap_socket(sock, server_hostname="127.0.0.1")
            held.append(sock)
        assert sock.makefile("rb").readline().startswith(b"* OK")
    sock = client_tls.wrap_socket(
        socket.create_connection(("127.0.0.1", node.port("imaps")), timeout=WAIT), server_hostname="127.0.0.1"
    )
    held.append(sock)
    assert sock.makefile("rb").readline().startswith(b"* BYE [UNAVAILABLE]")
    assert node.metric("mailnode_connections_refused_total", listener="imaps", reason="total") == 1
    assert node.metric("mailnode_connections_open", listener="imap") == 3
    for sock in held:
        sock.close()
