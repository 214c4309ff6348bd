"""The IMAP server driven by imaplib over real sockets: TLS and login, folders (LIST, CREATE, RENAME,
DELETE, SUBSCRIBE, STATUS, special-use), FETCH items, STORE with CONDSTORE, SEARCH, COPY/MOVE with
UIDPLUS, EXPUNGE, APPEND, IDLE woken by SMTP delivery, sessions seeing each other's changes, quota,
bad input answered with BAD or NO while the session goes on, and every command of the table dispatched."""

from __future__ import annotations

import contextlib
import imaplib
import re
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailnode.imap import commands
from tests.node.conftest import PASSWORD, NodeFactory, RunningNode, mailbox

CORPUS = Path(__file__).parent.parent / "corpus"
USER = "user@example.com"


def message(number: int, *, sender: str = "alice@remote.test", body: str = "") -> bytes:
    return (
        f"From: Alice <{sender}>\r\nTo: {USER}\r\nSubject: note {number}\r\n"
        f"Date: Mon, 2 Nov 2026 10:00:{number:02d} +0000\r\nMessage-ID: <n{number}@remote.test>\r\n\r\n"
        f"Body of note {number}. {body}\r\n"
    ).encode()


def deliver(node: RunningNode, *messages: bytes, to: str = USER) -> None:
    with smtplib.SMTP("127.0.0.1", node.port("smtp"), timeout=10) as client:
        for data in messages:
            client.sendmail("alice@remote.test", [to], data)


def connect(node: RunningNode, client_tls: ssl.SSLContext, user: str = USER) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", node.port("imap"), timeout=30)
    client.starttls(ssl_context=client_tls)
    client.login(user, PASSWORD)
    return client


@pytest.fixture
def imap(node: RunningNode, client_tls: ssl.SSLContext) -> Iterator[imaplib.IMAP4]:
    client = connect(node, client_tls)
    yield client
    with contextlib.suppress(imaplib.IMAP4.abort, OSError):
        client.logout()


def untagged(client: imaplib.IMAP4, name: str) -> list[bytes]:
    _typ, data = client.response(name)
    return [d for d in data if d is not None] if data else []


# -- connection, TLS, login ---------------------------------------------------------------------------


def test_login_needs_tls(node: RunningNode, client_tls: ssl.SSLContext) -> None:
    client = imaplib.IMAP4("127.0.0.1", node.port("imap"), timeout=10)
    assert "STARTTLS" in client.capabilities
    assert "LOGINDISABLED" in client.capabilities
    typ, data = client._simple_command("LOGIN", USER, '"x"')
    assert typ == "NO"
    assert data[0].startswith(b"[PRIVACYREQUIRED]")
    client.starttls(ssl_context=client_tls)
    typ, caps = client.capability()
    assert b"AUTH=PLAIN" in caps[0]
    assert b"LOGINDISABLED" not in caps[0]
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        client.login(USER, "wrong")
    assert client.login(USER, PASSWORD)[0] == "OK"
    client.logout()


def test_login_refused_before_tls_says_why(node: RunningNode) -> None:
    with socket.create_connection(("127.0.0.1", node.port("imap")), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"* OK [CAPABILITY IMAP4rev1")
        sock.sendall(b'a1 LOGIN user@example.com "secret"\r\n')
        assert reader.readline().startswith(b"a1 NO [PRIVACYREQUIRED]")


def test_authenticate_plain_and_imaps(node: RunningNode, client_tls: ssl.SSLContext) -> None:
    client = imaplib.IMAP4_SSL("127.0.0.1", node.port("imaps"), ssl_context=client_tls, timeout=10)
    typ, _ = client.authenticate("PLAIN", lambda _: f"\0{USER}\0{PASSWORD}".encode())
    assert typ == "OK"
    assert client.select("INBOX")[0] == "OK"
    client.logout()


def test_plaintext_login_when_the_config_allows_it(node_factory: NodeFactory) -> None:
    node = node_factory(imap={"allow_plaintext_login": True})
    client = imaplib.IMAP4("127.0.0.1", node.port("imap"), timeout=10)
    assert "LOGINDISABLED" not in client.capabilities
    assert client.login(USER, PASSWORD)[0] == "OK"
    client.logout()


def test_capabilities_after_login(imap: imaplib.IMAP4) -> None:
    _typ, data = imap.capability()
    caps = data[0].split()
    for cap in (b"IMAP4rev1", b"IDLE", b"UIDPLUS", b"MOVE", b"SPECIAL-USE", b"NAMESPACE", b"ID", b"ENABLE",
                b"LITERAL+", b"UNSELECT", b"CHILDREN", b"QUOTA", b"CONDSTORE"):  # fmt: skip
        assert cap in caps, cap


# -- folders -----------------------------------------------------------------------------------------


def test_list_special_use_and_hierarchy(imap: imaplib.IMAP4) -> None:
    typ, data = imap.list()
    lines = {line.decode() for line in data}
    assert '(\\HasNoChildren) "/" INBOX' in lines
    assert '(\\HasNoChildren \\Sent) "/" Sent' in lines
    for name, use in (("Drafts", "\\Drafts"), ("Trash", "\\Trash"), ("Junk", "\\Junk"), ("Archive", "\\Archive")):
        assert f'(\\HasNoChildren {use}) "/" {name}' in lines
    assert imap.create("Projects/2026")[0] == "OK"
    typ, data = imap.list('""', "Projects*")
    assert {line.decode() for line in data} == {'(\\HasChildren) "/" Projects', '(\\HasNoChildren) "/" Projects/2026'}
    typ, data = imap.list('""', "%")
    assert '(\\HasChildren) "/" Projects' in {line.decode() for line in data}
    assert not any(b"2026" in line for line in data)  # % does not cross the delimiter
    _typ, data = imap.list('""', '""')
    assert data == [b'(\\Noselect) "/" ""']


def test_create_rename_delete_subscribe_status(imap: imaplib.IMAP4, node: RunningNode) -> None:
    assert imap.create("Work")[0] == "OK"
    typ, data = imap.create("Work")
    assert typ == "NO"
    assert imap.rename("Work", "Jobs")[0] == "OK"
    assert imap.select("Work")[0] == "NO"
    assert imap.subscribe("Jobs")[0] == "OK"
    assert imap.unsubscribe("Archive")[0] == "OK"
    typ, data = imap.lsub('""', "*")
    names = {line.decode().rsplit(" ", 1)[-1] for line in data}
    assert "Jobs" in names and "Archive" not in names
    deliver(node, message(1), message(2))
    typ, data = imap.status("INBOX", "(MESSAGES RECENT UNSEEN UIDNEXT UIDVALIDITY HIGHESTMODSEQ)")
    assert re.match(rb"INBOX \(MESSAGES 2 RECENT 2 UNSEEN 2 UIDNEXT 3 UIDVALIDITY \d+ HIGHESTMODSEQ \d+\)", data[0])
    imap.select("INBOX")  # this session takes \Recent
    typ, data = imap.status("INBOX", "(RECENT)")
    assert data[0] == b"INBOX (RECENT 0)"
    assert imap.delete("Jobs")[0] == "OK"
    assert imap.delete("INBOX")[0] == "NO"
    assert imap.delete("Nowhere")[0] == "NO"


def test_non_ascii_folder_names_use_modified_utf7(imap: imaplib.IMAP4) -> None:
    assert imap.create("&AMk-t&AOk-")[0] == "OK"  # "Été"
    _typ, data = imap.list('""', "&AMk-*")
    assert data == [b'(\\HasNoChildren) "/" &AMk-t&AOk-']
    assert imap.select("&AMk-t&AOk-")[0] == "OK"


# -- select, fetch -----------------------------------------------------------------------------------


def test_select_and_examine(imap: imaplib.IMAP4, node: RunningNode) -> None:
    deliver(node, message(1), message(2), message(3))
    typ, data = imap.select("INBOX")
    assert (typ, data) == ("OK", [b"3"])
    assert untagged(imap, "RECENT") == [b"3"]
    typ, data = imap.select("INBOX", readonly=True)
    assert typ == "OK"
    typ, data = imap.store("1", "+FLAGS", "\\Seen")
    assert typ == "NO"


def test_fetch_items(imap: imaplib.IMAP4, node: RunningNode) -> None:
    deliver(node, message(1), message(2, body="x" * 100))
    stored = node.files.stored(USER)
    imap.select("INBOX")
    typ, data = imap.fetch("1:2", "(UID FLAGS RFC822.SIZE INTERNALDATE)")
    assert typ == "OK"
    assert re.match(rb'1 \(UID 1 FLAGS \(\\Recent\) RFC822.SIZE \d+ INTERNALDATE "[^"]+"\)', data[0])
    assert f"RFC822.SIZE {len(stored[1])}".encode() in data[1]
    typ, data = imap.fetch("1", "(ENVELOPE)")
    assert b'"note 1"' in data[0]
    assert b'(("Alice" NIL "alice" "remote.test"))' in data[0]
    assert b'"<n1@remote.test>"' in data[0]
    typ, data = imap.fetch("1", "(BODYSTRUCTURE)")
    assert b'BODYSTRUCTURE ("TEXT" "PLAIN"' in data[0]
    typ, data = imap.fetch("2", "(BODY.PEEK[])")
    assert data[0][1] == stored[1]
    typ, data = imap.fetch("2", "(FLAGS)")
    assert b"\\Seen" not in data[0]
    typ, data = imap.fetch("2", "(BODY[HEADER.FIELDS (SUBJECT)])")
    assert data[0][1] == b"Subject: note 2\r\n\r\n"
    typ, data = imap.fetch("2", "(FLAGS)")
    assert b"\\Seen" in data[0]  # BODY[...] without PEEK sets \Seen (RFC 3501 §6.4.5)
    typ, data = imap.fetch("2", "(BODY.PEEK[TEXT]<0.7>)")
    assert data[0] == b'2 (BODY[TEXT]<0> "Body of")'
    typ, data = imap.uid("FETCH", "1:*", "(FLAGS)")
    assert [re.search(rb"UID (\d+)", d).group(1) for d in data] == [b"1", b"2"]  # type: ignore[union-attr]


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.eml")), ids=lambda p: p.stem)
def test_corpus_round_trip(imap: imaplib.IMAP4, path: Path) -> None:
    data = path.read_bytes()
    typ, response = imap.append("INBOX", None, None, data)
    assert typ == "OK", response
    imap.select("INBOX")
    typ, fetched = imap.fetch("1", "(BODY.PEEK[])")
    assert typ == "OK"
    body = fetched[0][1] if isinstance(fetched[0], tuple) else b""  # an empty body comes as "" not a literal
    assert body == data
    typ, fetched = imap.fetch("1", "(RFC822.SIZE ENVELOPE BODYSTRUCTURE)")
    assert typ == "OK"
    flat = b"".join(p if isinstance(p, bytes) else b"".join(p) for p in fetched)
    assert f"RFC822.SIZE {len(data)} ENVELOPE (".encode() in flat
    assert b"BODYSTRUCTURE (" in flat


# -- store, search -----------------------------------------------------------------------------------


def test_store_flags_and_condstore(imap: imaplib.IMAP4, node: RunningNode) -> None:
    deliver(node, message(1), message(2), message(3))
    typ, data = imap._simple_command("ENABLE", "CONDSTORE")  # RFC 5161: in the authenticated state
    assert (typ, untagged(imap, "ENABLED")) == ("OK", [b"CONDSTORE"])
    imap.select("INBOX")
    typ, data = imap.store("1:2", "+FLAGS", "(\\Flagged $Work)")
    assert typ == "OK"
    assert b"FLAGS (" in data[0] and b"\\Flagged" in data[0] and b"$Work" in data[0]
    typ, data = imap.store("1", "-FLAGS.SILENT", "(\\Flagged)")
    assert (typ, data) == ("OK", [None])
    typ, data = imap.fetch("1:2", "(FLAGS)")
    assert b"\\Flagged" not in data[0] and b"\\Flagged" in data[1]
    with pytest.raises(imaplib.IMAP4.error, match="invalid flag"):
        imap.store("1", "+FLAGS", "(\\Bogus)")
    typ, data = imap.fetch("3", "(MODSEQ)")
    modseq = int(re.search(rb"MODSEQ \((\d+)\)", data[0]).group(1))  # type: ignore[union-attr]
    imap.store("3", "+FLAGS", "(\\Answered)")
    typ, data = imap._simple_command("STORE", "3", "(UNCHANGEDSINCE", f"{modseq})", "+FLAGS", "(\\Draft)")
    assert typ == "OK"
    assert b"[MODIFIED 3]" in data[0]
    typ, data = imap.fetch("3", "(FLAGS)")
    assert b"\\Draft" not in data[0]


def test_search(imap: imaplib.IMAP4, node: RunningNode) -> None:
    deliver(
        node,
        message(1, sender="bob@remote.test", body="apples"),
        message(2, body="pears\r\n" + ("p" * 70 + "\r\n") * 40),
        message(3, body="apples and pears"),
    )
    imap.select("INBOX")
    imap.store("2", "+FLAGS", "\\Seen")
    assert imap.search(None, "ALL") == ("OK", [b"1 2 3"])
    assert imap.search(None, "UNSEEN") == ("OK", [b"1 3"])
    assert imap.search(None, "FROM", "bob") == ("OK", [b"1"])
    assert imap.search(None, "SUBJECT", '"note 3"') == ("OK", [b"3"])
    assert imap.search(None, "BODY", "apples") == ("OK", [b"1 3"])
    assert imap.search(None, "LARGER", "2000") == ("OK", [b"2"])
    assert imap.search(None, "NOT", "BODY", "apples") == ("OK", [b"2"])
    assert imap.search(None, "OR", "FROM", "bob", "SEEN") == ("OK", [b"1 2"])
    assert imap.search(None, "2:*", "UNSEEN") == ("OK", [b"3"])
    assert imap.uid("SEARCH", "BODY", "pears") == ("OK", [b"2 3"])
    with pytest.raises(imaplib.IMAP4.error, match="unknown search key"):
        imap.search(None, "BOGUS")
    typ, data = imap.search("X-BOGUS", "ALL")
    assert typ == "NO"
    assert data[0].startswith(b"[BADCHARSET (US-ASCII UTF-8 ")


# -- copy, move, expunge, append ---------------------------------------------------------------------


def test_copy_move_expunge(imap: imaplib.IMAP4, node: RunningNode) -> None:
    deliver(node, message(1), message(2), message(3), message(4))
    imap.select("INBOX")
    typ, data = imap.copy("1:2", "Archive")
    assert typ == "OK"
    assert re.search(rb"\[COPYUID \d+ 1:2 1:2\]", data[0])
    typ, data = imap.uid("MOVE", "3", "Archive")
    assert typ == "OK"
    assert re.search(rb"\[COPYUID \d+ 3 3\]", b" ".join(untagged(imap, "OK")))
    assert untagged(imap, "EXPUNGE") == [b"3"]
    typ, data = imap.search(None, "ALL")
    assert data == [b"1 2 3"]  # 3 was moved away; 4 is now number 3
    imap.store("1", "+FLAGS", "\\Deleted")
    typ, data = imap.expunge()
    assert (typ, data) == ("OK", [b"1"])
    imap.store("1:2", "+FLAGS", "\\Deleted")
    typ, data = imap.uid("EXPUNGE", "2")  # UIDPLUS: only UID 2 (message 1 now)
    assert typ == "OK"
    assert imap.search(None, "ALL") == ("OK", [b"1"])
    imap.close()  # expunges the remaining \Deleted message silently
    imap.select("INBOX")
    assert imap.search(None, "ALL") == ("OK", [b""])
    imap.select("Archive")
    typ, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    subjects = sorted(part[1] for part in data if isinstance(part, tuple))
    assert subjects == [b"Subject: note 1\r\n\r\n", b"Subject: note 2\r\n\r\n", b"Subject: note 3\r\n\r\n"]
    assert imap.copy("1", "Nowhere")[0] == "NO"
    assert b"TRYCREATE" in imap.copy("1", "Nowhere")[1][0]


def test_append(imap: imaplib.IMAP4) -> None:
    data = message(7)
    typ, response = imap.append("Drafts", "(\\Draft \\Seen)", '"02-Nov-2026 10:00:00 +0000"', data)
    assert typ == "OK"
    assert re.search(rb"\[APPENDUID \d+ 1\]", response[0])
    imap.select("Drafts")
    typ, fetched = imap.fetch("1", "(FLAGS INTERNALDATE BODY.PEEK[])")
    assert b"\\Draft" in fetched[0][0] and b"\\Seen" in fetched[0][0]
    assert b'INTERNALDATE "02-Nov-2026 10:00:00 +0000"' in fetched[0][0]
    assert fetched[0][1] == data
    assert imap.append("Nowhere", None, None, data)[0] == "NO"


def test_unselect_keeps_deleted_messages(imap: imaplib.IMAP4, node: RunningNode) -> None:
    deliver(node, message(1))
    imap.select("INBOX")
    imap.store("1", "+FLAGS", "\\Deleted")
    assert imap._simple_command("UNSELECT")[0] == "OK"
    imap.select("INBOX")
    assert imap.search(None, "DELETED") == ("OK", [b"1"])


# -- sessions together, IDLE -------------------------------------------------------------------------


def test_sessions_see_each_others_changes(node: RunningNode, client_tls: ssl.SSLContext) -> None:
    deliver(node, message(1), message(2))
    first, second = connect(node, client_tls), connect(node, client_tls)
    first.select("INBOX")
    second.select("INBOX")
    first.store("1", "+FLAGS", "\\Seen")
    second.noop()
    assert any(b"FLAGS (\\Seen" in r for r in untagged(second, "FETCH"))
    first.store("2", "+FLAGS", "\\Deleted")
    first.expunge()
    deliver(node, message(3))
    _typ, _data = second.noop()
    assert untagged(second, "EXPUNGE") == [b"2"]
    assert untagged(second, "EXISTS")[-1] == b"2"
    first.logout()
    second.logout()


def test_delivery_wakes_idle(node: RunningNode, client_tls: ssl.SSLContext) -> None:
    client = connect(node, client_tls)
    client.select("INBOX")
    sock = client.socket()
    client.send(b"i1 IDLE\r\n")
    assert client.readline().startswith(b"+ ")
    threading.Timer(0.2, deliver, args=(node, message(1))).start()
    sock.settimeout(10)
    lines = [client.readline(), client.readline()]
    assert lines[0] == b"* 1 EXISTS\r\n"
    client.send(b"DONE\r\n")
    assert client.readline().startswith(b"i1 OK")
    client.logout()


# -- extensions and bad input ------------------------------------------------------------------------


def test_namespace_id_quota(node_factory: NodeFactory, client_tls: ssl.SSLContext) -> None:
    node = node_factory([mailbox(USER, quota="1MiB")])
    deliver(node, message(1))
    client = connect(node, client_tls)
    assert client.namespace() == ("OK", [b'(("" "/")) NIL NIL'])
    typ, data = client.xatom("ID", "NIL")
    assert typ == "OK"
    assert b'"name" "Mailfleet"' in untagged(client, "ID")[0]
    typ, data = client.getquotaroot("INBOX")
    assert typ == "OK"
    assert data == [[b'INBOX ""'], [b'"" (STORAGE 1 1024)']]
    client.logout()


def test_bad_input_is_answered_and_the_session_goes_on(node: RunningNode, client_tls: ssl.SSLContext) -> None:
    client = connect(node, client_tls)
    client.select("INBOX")
    for line, expected in [
        (b"b1 FETCH 1 (FLAGS\r\n", b"b1 BAD"),
        (b"b2 FROBNICATE\r\n", b"b2 BAD"),
        (b"b3 FETCH 0:x FLAGS\r\n", b"b3 BAD"),
        (b"b4 FETCH 5 FLAGS\r\n", b"b4 BAD"),  # no such message
        (b'b5 SELECT "unterminated\r\n', b"b5 BAD"),
        (b"b6 APPEND INBOX {999999999999}\r\n", b"b6 NO [TOOBIG]"),
        (b"\r\n", b"* BAD"),
    ]:
        client.send(line)
        reply = client.readline()
        assert reply.startswith(expected), (line, reply)
    assert client.noop()[0] == "OK"
    client.logout()


def test_every_declared_command_reaches_its_handler(imap: imaplib.IMAP4) -> None:
    """The session dispatches through commands.TABLE: no declared command is unknown to it."""
    # IDLE waits for DONE; LOGOUT, CLOSE and UNSELECT leave the state the others are sent in.
    leave_out = {"IDLE", "LOGOUT", "CLOSE", "UNSELECT"}
    imap.select("INBOX")
    for number, command in enumerate(commands.TABLE.commands):
        if command.name in leave_out:
            continue
        tag = f"d{number}".encode()
        imap.send(tag + b" " + command.name.encode() + b"\r\n")  # without arguments: BAD, NO or OK
        reply = imap.readline()
        while not reply.startswith(tag + b" "):
            reply = imap.readline()
        assert b"Unknown command" not in reply, reply
        assert b"needs a selected mailbox" not in reply, reply  # still selected
    assert imap.noop()[0] == "OK"


def test_overlong_line_ends_the_session(node: RunningNode, client_tls: ssl.SSLContext) -> None:
    client = connect(node, client_tls)
    client.send(b"x1 NOOP " + b"a" * 100_000 + b"\r\n")
    assert client.readline().startswith(b"* BYE")


def test_idle_timeout(node_factory: NodeFactory, client_tls: ssl.SSLContext) -> None:
    node = node_factory(imap={"idle_timeout": 0.3})
    client = connect(node, client_tls)
    deadline = time.monotonic() + 10
    line = b""
    while time.monotonic() < deadline and not line:
        line = client.readline()
    assert line.startswith(b"* BYE")


def test_list_extended_selection_and_return_options(imap: imaplib.IMAP4) -> None:
    imap.unsubscribe("Junk")
    typ, data = imap._simple_command("LIST", "(SPECIAL-USE)", '""', "*")
    names = sorted(line.rsplit(b" ", 1)[-1] for line in untagged(imap, "LIST"))
    assert (typ, names) == ("OK", [b"Archive", b"Drafts", b"Junk", b"Sent", b"Trash"])
    typ, data = imap._simple_command("LIST", "(SUBSCRIBED)", '""', "*", "RETURN", "(SUBSCRIBED)")
    lines = untagged(imap, "LIST")
    assert typ == "OK"
    assert all(b"\\Subscribed" in line for line in lines)
    assert not any(line.endswith(b" Junk") for line in lines)


def test_check_and_literal_plus_append(imap: imaplib.IMAP4, node: RunningNode) -> None:
    imap.select("INBOX")
    assert imap.check()[0] == "OK"
    data = message(5)
    sock = imap.socket()
    # RFC 7888: a non-synchronizing literal is sent at once, without waiting for "+"
    sock.sendall(b"L1 APPEND INBOX (\\Seen) {" + str(len(data)).encode() + b"+}\r\n" + data + b"\r\n")
    lines = [imap.readline() for _ in range(3)]
    assert lines[-1].startswith(b"L1 OK [APPENDUID ")
    assert not any(line.startswith(b"+") for line in lines)
    typ, fetched = imap.fetch("1", "(FLAGS BODY.PEEK[])")
    assert b"\\Seen" in fetched[0][0]
    assert fetched[0][1] == data
