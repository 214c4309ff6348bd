"""IMAP4rev2 (RFC 9051) in the pure parts: the command table advertises it beside IMAP4rev1 only while every
extension it folds in is declared and always advertised (mailnode.imap.table), and the syntax helpers of
mailnode.imap.protocol read and write an IMAP4rev2 session's forms (UTF-8 folder names, SEARCH answered as
ESEARCH, STATUS DELETED) while an IMAP4rev1 session's stay as they were. The sessions themselves are driven
over real sockets in tests/node/test_imap_rev2.py."""

from __future__ import annotations

import dataclasses

import pytest

from mailnode.imap import commands, protocol, table
from mailnode.imap.protocol import Atom, ProtocolError, String
from tests.unit.test_imap_commands import STATES
from tests.unit.test_imap_protocol import parse

TABLE = commands.TABLE
REV2 = next(e for e in TABLE.extensions if e.capability == "IMAP4rev2")


@pytest.mark.parametrize("state", STATES, ids=lambda s: "-".join(k for k, v in s.items() if v) or "plain")
def test_imap4rev2_is_advertised_beside_imap4rev1_in_every_state(state: dict[str, bool]) -> None:
    advertised = TABLE.capabilities(**state)
    assert advertised[:2] == ["IMAP4rev1", "IMAP4rev2"]


def test_what_imap4rev2_folds_in_is_advertised_once_logged_in() -> None:
    """RFC 9051 Appendix E: the extensions IMAP4rev2 takes into the base protocol."""
    logged_in = set(TABLE.capabilities(authenticated=True, tls_active=True, tls_available=True, plaintext_login=False))
    folded = {"NAMESPACE", "UNSELECT", "UIDPLUS", "ESEARCH", "SEARCHRES", "ENABLE", "IDLE", "SASL-IR", "LIST-EXTENDED",
              "LIST-STATUS", "MOVE", "BINARY", "SPECIAL-USE", "STATUS=SIZE", "CHILDREN", "LITERAL+"}  # fmt: skip
    assert set(REV2.includes) == folded
    assert folded <= logged_in


def test_the_table_refuses_imap4rev2_without_what_it_folds_in() -> None:
    without_move = [c for c in TABLE.commands if c.capability != "MOVE"]
    with pytest.raises(ValueError, match=r"IMAP4rev2 includes capabilities not always advertised: \['MOVE'\]"):
        table.Table(extensions=TABLE.extensions, commands=without_move)
    # Advertised only in some states is not enough: a logged-in IMAP4rev2 client relies on each.
    sometimes = dataclasses.replace(REV2, includes=("AUTH=PLAIN",))
    with pytest.raises(ValueError, match="AUTH=PLAIN"):
        table.Table(extensions=(sometimes,), commands=TABLE.commands)


def test_mailbox_names_in_utf8() -> None:
    """RFC 9051 §5.1: UTF-8 names, `&` as itself; a denormalized name is taken in Unicode NFC."""
    assert protocol.mailbox_arg(String("Été & co".encode()), utf8=True) == "Été & co"
    assert protocol.mailbox_arg(String(b"A&-B"), utf8=True) == "A&-B"  # no modified UTF-7 to decode
    assert protocol.mailbox_arg(String("E\u0301te\u0301".encode()), utf8=True) == "Été"
    assert protocol.mailbox_arg(Atom("inbox/Sub"), utf8=True) == "INBOX/Sub"
    with pytest.raises(ProtocolError, match="UTF-8"):
        protocol.mailbox_arg(String(b"\xff"), utf8=True)
    # IMAP4rev1 as it was: modified UTF-7 only.
    assert protocol.mailbox_arg(String(b"A&-B")) == "A&B"
    with pytest.raises(ProtocolError, match="modified UTF-7"):
        protocol.mailbox_arg(String("Été".encode()))


def test_typed_requests_take_utf8_names() -> None:
    assert protocol.parse_select(parse('a SELECT "Été"').args, utf8=True).mailbox == "Été"
    assert protocol.parse_status(parse('a STATUS "Été" (MESSAGES)').args, imap4rev2=True).mailbox == "Été"
    listed = protocol.parse_list_args(parse('a LIST "" ("Ét*" "A&B")').args, imap4rev2=True)
    assert listed.patterns == ["Ét*", "A&B"]
    appended = protocol.parse_append(parse(b'a APPEND "\xc3\x89t\xc3\xa9" {2}\r\nhi').args, utf8=True)
    assert appended.mailbox == "Été"


def test_status_deleted_is_imap4rev2s() -> None:
    """RFC 9051 §6.3.11 adds DELETED; IMAP4rev1's grammar has no such item."""
    request = protocol.parse_status(parse("a STATUS INBOX (MESSAGES DELETED SIZE)").args, imap4rev2=True)
    assert request.items == ["MESSAGES", "DELETED", "SIZE"]
    with pytest.raises(ProtocolError, match="unknown status item DELETED"):
        protocol.parse_status(parse("a STATUS INBOX (DELETED)").args)
    listed = protocol.parse_list_args(parse('a LIST "" * RETURN (STATUS (DELETED))').args, imap4rev2=True)
    assert listed.status_items == ["DELETED"]


def test_search_without_return_is_esearch_all_under_imap4rev2() -> None:
    """RFC 9051 §6.4.4: IMAP4rev2 has no SEARCH response; a SEARCH without RETURN is answered as RETURN (ALL)."""
    assert protocol.parse_search_return([Atom("ALL")], imap4rev2=True).options == frozenset({"ALL"})
    assert protocol.parse_search_return([Atom("ALL")]).options is None
    returned = protocol.parse_search_return(parse("a SEARCH RETURN (COUNT) ALL").args, imap4rev2=True)
    assert returned.options == frozenset({"COUNT"})
    line = protocol.format_esearch("a1", uid=True, numbers=[], options=frozenset({"ALL"}))
    assert line == '* ESEARCH (TAG "a1") UID'  # an empty result: no ALL


def test_folder_names_for_responses() -> None:
    assert protocol.format_mailbox_name("Été & co", utf8=False) == b'"&AMk-t&AOk- &- co"'
    assert protocol.format_mailbox_name("Été & co", utf8=True) == '"Été & co"'.encode()
    assert protocol.format_mailbox_name("A&B", utf8=True) == b"A&B"
    assert protocol.format_mailbox_name("INBOX", utf8=True) == b"INBOX"
    assert protocol.format_mailbox_name('Say "é"', utf8=True) == 'Say \\"é\\"'.join(['"', '"']).encode()
    # What cannot be quoted goes as a literal either way.
    assert protocol.format_mailbox_name("é\r\n", utf8=True) == b"{4}\r\n" + "é\r\n".encode()
