"""IMAP4rev2 (RFC 9051) against a live node over real sockets: the node advertises it beside IMAP4rev1, and a
session that sends ENABLE IMAP4rev2 gets the IMAP4rev2 forms (UTF-8 folder names, SEARCH answered as ESEARCH, no
\\Recent and no RECENT, SELECT's LIST response, STATUS DELETED) while an IMAP4rev1 session on the same mailbox
sees exactly what it saw before. Raw lines, so each response is checked as sent; one test drives imaplib."""

from __future__ import annotations

import contextlib
import imaplib
import re
import ssl
from collections.abc import Iterator

import pytest

from tests.node.conftest import PASSWORD, RunningNode
from tests.node.test_imap import USER, connect
from tests.node.test_imap_hardening import Lines

MESSAGE = b"From: a@example.org\r\nTo: user@example.com\r\nSubject: hello\r\n\r\nbody\r\n"
FOLDER = "Été & co"  # non-ASCII and an ampersand: modified UTF-7 `&AMk-t&AOk- &- co` in IMAP4rev1


class Session:
    """A logged-in IMAP connection, one command at a time, its answer as the raw lines sent."""

    def __init__(self, node: RunningNode, client_tls: ssl.SSLContext) -> None:
        self.lines = Lines(node.port("imap"))
        self.lines.sock.settimeout(120)  # a loaded machine: generous; each read waits for a line the node sends
        self.greeting = self.lines.readline()
        self._tag = 0
        assert self.run(b"STARTTLS")[-1].startswith(b"t1 OK")
        self.lines.start_tls(client_tls)
        self.lines.sock.settimeout(120)
        assert self.run(f'LOGIN {USER} "{PASSWORD}"'.encode())[-1].startswith(b"t2 OK")

    def run(self, command: bytes | str, literal: bytes | None = None) -> list[bytes]:
        """Send one command (with a synchronizing literal, sent after the `+`) and return every line until its
        tagged answer, that one last."""
        self._tag += 1
        tag = f"t{self._tag}".encode()
        data = command.encode() if isinstance(command, str) else command
        if literal is None:
            self.lines.send(tag + b" " + data + b"\r\n")
            return self.lines.until_tagged(tag)
        self.lines.send(tag + b" " + data + b" {%d}\r\n" % len(literal))
        assert self.lines.readline().startswith(b"+")
        self.lines.send(literal + b"\r\n")
        return self.lines.until_tagged(tag)

    def tag(self) -> str:
        return f"t{self._tag}"


@pytest.fixture
def sessions(node: RunningNode, client_tls: ssl.SSLContext) -> Iterator[tuple[Session, Session]]:
    """(an IMAP4rev1 session, one that enabled IMAP4rev2), on the same mailbox."""
    rev1, rev2 = Session(node, client_tls), Session(node, client_tls)
    assert rev2.run("ENABLE IMAP4rev2")[:2] == [b"* ENABLED IMAP4rev2", b"t3 OK ENABLE completed"]
    yield rev1, rev2
    rev1.lines.close()
    rev2.lines.close()


def test_imap4rev2_is_advertised_beside_imap4rev1(sessions: tuple[Session, Session]) -> None:
    rev1, _ = sessions
    assert rev1.greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 IMAP4rev2 ")
    capability = rev1.run("CAPABILITY")[0].split()
    assert capability[:4] == [b"*", b"CAPABILITY", b"IMAP4rev1", b"IMAP4rev2"]
    folded = b"NAMESPACE UNSELECT UIDPLUS ESEARCH SEARCHRES ENABLE IDLE MOVE LIST-EXTENDED LIST-STATUS BINARY"
    for capability_name in (folded + b" SPECIAL-USE STATUS=SIZE LITERAL+").split():
        assert capability_name in capability, capability_name
    assert rev1.run("NAMESPACE")[0] == b'* NAMESPACE (("" "/")) NIL NIL'


def test_utf8_folder_names_under_imap4rev2_and_modified_utf7_under_imap4rev1(
    sessions: tuple[Session, Session],
) -> None:
    rev1, rev2 = sessions
    quoted = f'"{FOLDER}"'.encode()
    assert rev2.run(b"CREATE " + quoted)[-1].startswith(rev2.tag().encode() + b" OK")
    assert rev2.run(b"APPEND " + quoted + b" (\\Deleted)", MESSAGE)[-1].startswith(rev2.tag().encode() + b" OK")
    listed = rev2.run('LIST "" "É*"')
    assert listed[0] == b'* LIST (\\HasNoChildren) "/" ' + quoted, listed
    status = rev2.run(b"STATUS " + quoted + b" (MESSAGES DELETED UNSEEN)")
    assert status[0] == b"* STATUS " + quoted + b" (MESSAGES 1 DELETED 1 UNSEEN 1)", status
    with_status = rev2.run('LIST "" "*" RETURN (STATUS (DELETED))')
    assert b"* STATUS " + quoted + b" (DELETED 1)" in with_status
    # The same folder in IMAP4rev1's modified UTF-7, as before; DELETED is not IMAP4rev1's.
    assert rev1.run('LIST "" "&AMk-*"')[0] == b'* LIST (\\HasNoChildren) "/" "&AMk-t&AOk- &- co"'
    assert rev1.run('STATUS "&AMk-t&AOk- &- co" (MESSAGES)')[0] == b'* STATUS "&AMk-t&AOk- &- co" (MESSAGES 1)'
    assert rev1.run('STATUS "&AMk-t&AOk- &- co" (DELETED)')[-1].startswith(rev1.tag().encode() + b" BAD")
    # An IMAP4rev2 name is UTF-8, so `&AMk-...` there names another folder, which does not exist.
    assert rev2.run('STATUS "&AMk-t&AOk- &- co" (MESSAGES)')[-1].startswith(rev2.tag().encode() + b" NO")


def test_select_under_imap4rev2_lists_the_folder_and_has_no_recent(sessions: tuple[Session, Session]) -> None:
    rev1, rev2 = sessions
    for _ in range(2):
        assert rev1.run("APPEND INBOX", MESSAGE)[-1].startswith(rev1.tag().encode() + b" OK")
    selected = rev2.run("SELECT inbox")
    assert b"* 2 EXISTS" in selected
    assert b'* LIST (\\HasNoChildren) "/" INBOX' in selected  # RFC 9051 §6.3.2
    assert not [line for line in selected if b"RECENT" in line or b"[UNSEEN " in line], selected
    assert selected[-1] == rev2.tag().encode() + b" OK [READ-WRITE] SELECT completed"
    fetched = rev2.run("FETCH 1:* (FLAGS)")
    assert fetched[:2] == [b"* 1 FETCH (FLAGS ())", b"* 2 FETCH (FLAGS ())"]
    # A message arriving while selected: EXISTS, and no RECENT after it.
    assert rev1.run("APPEND INBOX", MESSAGE)[-1].startswith(rev1.tag().encode() + b" OK")
    noop = rev2.run("NOOP")
    assert noop[0] == b"* 3 EXISTS" and not [line for line in noop if b"RECENT" in line], noop
    # The IMAP4rev1 session, selecting after the other took the \Recent flags, sees RECENT and UNSEEN as before.
    rev1_selected = rev1.run("EXAMINE INBOX")
    assert b"* 0 RECENT" in rev1_selected and b"* OK [UNSEEN 1] First unseen" in rev1_selected
    assert not [line for line in rev1_selected if line.startswith(b"* LIST")]


def test_select_of_a_denormalized_name_gives_oldname(sessions: tuple[Session, Session]) -> None:
    """RFC 9051 §5.1, §6.3.2: a name sent in a form other than Unicode NFC is taken as its NFC form, and SELECT's
    LIST response says what the client sent as OLDNAME."""
    _, rev2 = sessions
    assert rev2.run('CREATE "Été"')[-1].startswith(rev2.tag().encode() + b" OK")
    decomposed = "E\u0301te\u0301"
    selected = rev2.run(f'SELECT "{decomposed}"')
    expected = f'* LIST (\\HasNoChildren) "/" "Été" ("OLDNAME" ("{decomposed}"))'.encode()
    assert expected in selected, selected
    assert selected[-1].startswith(rev2.tag().encode() + b" OK")


def test_search_under_imap4rev2_is_answered_with_esearch(sessions: tuple[Session, Session]) -> None:
    rev1, rev2 = sessions
    for _ in range(3):
        assert rev1.run("APPEND INBOX", MESSAGE)[-1].startswith(rev1.tag().encode() + b" OK")
    # IMAP4rev1 as before (selecting first, it takes the \\Recent flags).
    rev1.run("SELECT INBOX")
    assert rev1.run("FETCH 1 (FLAGS)")[0] == b"* 1 FETCH (FLAGS (\\Recent))"
    assert rev1.run("STORE 2 +FLAGS.SILENT (\\Seen)")[-1].startswith(rev1.tag().encode() + b" OK")
    assert rev1.run("SEARCH UNSEEN")[0] == b"* SEARCH 1 3"
    rev2.run("SELECT INBOX")
    assert rev2.run("SEARCH UNSEEN")[0] == f'* ESEARCH (TAG "{rev2.tag()}") ALL 1,3'.encode()
    uids = rev2.run("UID SEARCH ALL")[0]
    assert re.fullmatch(rb'\* ESEARCH \(TAG "t\d+"\) UID ALL \d+:\d+', uids), uids
    assert rev2.run("SEARCH SUBJECT nothing-like-it")[0] == f'* ESEARCH (TAG "{rev2.tag()}")'.encode()
    assert rev2.run("SEARCH RETURN (COUNT) ALL")[0] == f'* ESEARCH (TAG "{rev2.tag()}") COUNT 3'.encode()
    assert not [line for line in rev2.run("SEARCH ALL") if line.startswith(b"* SEARCH")]


def test_list_recursivematch_gives_childinfo(sessions: tuple[Session, Session]) -> None:
    """RFC 5258 §3.5 (LIST-EXTENDED, folded into IMAP4rev2): a folder not subscribed, with a subscribed child."""
    _, rev2 = sessions
    assert rev2.run('CREATE "Projekte/Ärger"')[-1].startswith(rev2.tag().encode() + b" OK")
    assert rev2.run("UNSUBSCRIBE Projekte")[-1].startswith(rev2.tag().encode() + b" OK")
    listed = rev2.run('LIST (SUBSCRIBED RECURSIVEMATCH) "" "Projekte%"')
    assert listed[0] == b'* LIST (\\HasChildren) "/" Projekte ("CHILDINFO" ("SUBSCRIBED"))', listed
    assert rev2.run('LIST (SUBSCRIBED) "" "Projekte%"')[0].startswith(rev2.tag().encode() + b" OK")
    children = rev2.run('LIST (SUBSCRIBED) "" "Projekte/*"')
    assert children[0] == '* LIST (\\HasNoChildren \\Subscribed) "/" "Projekte/Ärger"'.encode(), children


def test_imaplib_with_imap4rev2_enabled(node: RunningNode, client_tls: ssl.SSLContext) -> None:
    """Python's imaplib, a real client: after ENABLE IMAP4rev2 its SEARCH gets an ESEARCH answer, which it keeps
    as an untagged ESEARCH response, and its SELECT's count has no RECENT beside it."""
    client = connect(node, client_tls)
    try:
        assert "IMAP4REV2" in client.capabilities
        assert client.append("INBOX", "(\\Flagged)", None, MESSAGE)[0] == "OK"
        assert client._simple_command("ENABLE", "IMAP4rev2")[0] == "OK"
        assert client.response("ENABLED")[1] == [b"IMAP4rev2"]
        assert client.select("INBOX") == ("OK", [b"1"])
        assert client.response("RECENT")[1] == [None]
        assert client.search(None, "FLAGGED") == ("OK", [None])  # no SEARCH response...
        (esearch,) = client.response("ESEARCH")[1]  # ...but this
        assert re.fullmatch(rb'\(TAG "[A-Z]+\d+"\) ALL 1', esearch), esearch
    finally:
        with contextlib.suppress(imaplib.IMAP4.abort, OSError):
            client.logout()
