"""IMAP syntax (mailnode.imap.protocol): literal markers and framing, the tokenizer (tags, command names, atoms,
quoted strings, sync and non-sync literals, literal8, NIL, lists, FETCH sections), hostile input (nesting, 8-bit,
huge numbers, arbitrary bytes), sequence sets, FETCH items and modifiers, STORE, flags, dates, modified UTF-7,
INBOX, LIST patterns and options, STATUS/SELECT/APPEND, and the formatting of strings, mailboxes and flags.
Commands come from RFC 3501 (§6, §8 sample session), RFC 7162 and RFC 7888 where those give examples."""

from __future__ import annotations

import contextlib
import datetime
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailnode.imap import protocol
from mailnode.imap.protocol import NIL, Atom, Command, FetchAtt, ParenList, ProtocolError, String


def frame(wire: bytes) -> list[bytes]:
    """What the server does: split a command as sent into [line, literal, line, ...] using literal_marker."""
    parts = []
    rest = wire
    while True:
        line, sep, rest = rest.partition(b"\r\n")
        assert sep, "a command ends with CRLF"
        parts.append(line)
        marker = protocol.literal_marker(line)
        if marker is None:
            assert rest == b"", "bytes after the command"
            return parts
        size, _ = marker
        assert len(rest) >= size
        parts.append(rest[:size])
        rest = rest[size:]


def parse(wire: bytes | str) -> Command:
    """The command as sent, without its final CRLF."""
    data = wire.encode() if isinstance(wire, str) else wire
    return protocol.parse_command(frame(data + b"\r\n"))


def bad(wire: bytes | str) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse(wire)
    return caught.value


# -- literal markers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"A003 APPEND saved-messages (\\Seen) {310}", (310, False)),
        (b"A001 LOGIN {11+}", (11, True)),
        (b"a APPEND INBOX ~{5}", (5, False)),
        (b"a X {0}", (0, False)),
        (b"a X {007}", (7, False)),
        (b"a APPEND INBOX {999999999999}", (999_999_999_999, False)),  # the server answers NO [TOOBIG]
        (b"a X {" + b"9" * 50 + b"}", (protocol.LITERAL_SIZE_CAP, False)),
        (b"a NOOP", None),
        (b"a CREATE foo}", None),
        (b'a LOGIN "{3}"', None),
        (b'a RENAME "x{" y}', None),  # the brace is inside a quoted string
        (b"", None),
    ],
)
def test_literal_marker(line: bytes, expected: tuple[int, bool] | None) -> None:
    assert protocol.literal_marker(line) == expected


@pytest.mark.parametrize("line", [b"a X {abc}", b"a X {}", b"a X {3++}", b"a X {-3}", b"a X {+}"])
def test_literal_marker_garbage(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        protocol.literal_marker(line)


# -- commands: tag, name, tokens ------------------------------------------------------------------------


def test_rfc3501_sample_session() -> None:
    # RFC 3501 §8, the client's side.
    assert parse("a001 login mrc secret") == Command("a001", "LOGIN", [Atom("mrc"), Atom("secret")])
    assert parse("a002 select inbox") == Command("a002", "SELECT", [Atom("inbox")])
    assert parse("a003 fetch 12 full") == Command("a003", "FETCH", [Atom("12"), Atom("full")])
    assert parse("a004 fetch 12 body[header]") == Command("a004", "FETCH", [Atom("12"), FetchAtt("BODY", "HEADER")])
    assert parse("a005 store 12 +flags \\deleted") == Command(
        "a005", "STORE", [Atom("12"), Atom("+flags"), Atom("\\deleted")]
    )
    assert parse("a006 logout") == Command("a006", "LOGOUT", [])


def test_quoted_strings_unescape() -> None:
    assert parse(r'a LOGIN "fred" "a \"b\" \\c"').args == [String(b"fred"), String(b'a "b" \\c')]
    assert parse('a LOGIN "" ""').args == [String(b""), String(b"")]
    assert parse('a X "caf\xc3\xa9"'.encode("latin-1")).args == [String("café".encode())]  # 8-bit: tolerated


@pytest.mark.parametrize(
    "wire",
    [
        'a X "unterminated',
        r'a X "bad \q escape"',
        'a X "trailing backslash\\',
        b'a X "nul\x00"',
        b'a X "cr\rinside"',
    ],
)
def test_bad_quoting(wire: str | bytes) -> None:
    assert bad(wire).tag == "a"


def test_synchronizing_literals() -> None:
    # RFC 3501 §6.3.11: APPEND with a literal; the server sent "+ Ready" between the parts.
    message = b"Date: Mon, 7 Feb 1994 21:52:25 -0800 (PST)\r\nSubject: afternoon meeting\r\n\r\nHello Joe\r\n"
    command = parse(b"A003 APPEND saved-messages (\\Seen) {%d}\r\n" % len(message) + message)
    assert command == Command("A003", "APPEND", [Atom("saved-messages"), ParenList([Atom("\\Seen")]), String(message)])


def test_non_synchronizing_literals() -> None:
    # RFC 7888 §3 example.
    assert parse(b"A001 LOGIN {11+}\r\nFRED FOOBAR {7+}\r\nfat man") == Command(
        "A001", "LOGIN", [String(b"FRED FOOBAR"), String(b"fat man")]
    )


def test_literals_in_lists_and_empty_literals() -> None:
    assert parse(b"a X ({3}\r\nabc {0}\r\n) y").args == [ParenList([String(b"abc"), String(b"")]), Atom("y")]
    assert parse(b"a X {2}\r\n\r\n").args == [String(b"\r\n")]  # a literal may hold CRLF


def test_literal8() -> None:
    assert parse(b"a APPEND INBOX ~{3}\r\na\x00b").args == [Atom("INBOX"), String(b"a\x00b", literal8=True)]


@pytest.mark.parametrize(
    "parts",
    [
        [b"a X {3}", b"ab", b""],  # size differs from the data
        [b"a X {3}"],  # marker on the last line: data missing
        [b"a X {3}", b"abc"],  # even number of parts
        [b"a X {3} y", b"abc", b""],  # marker not at the end of its line
        [b"a X {3}", b"abc", b"y"],  # no space after the literal
        [b"a X ~{3}x", b"abc", b""],
        [b"a LOGIN x{1}", b"y", b""],
        [b"a NOOP", b"abc", b""],  # a line that announces no literal
    ],
)
def test_bad_literals(parts: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_command(parts)


def test_nil_atoms_and_lists() -> None:
    command = parse('a ID ("name" "x" "version" NIL) nil Nil "NIL" NILS')
    assert command.args == [
        ParenList([String(b"name"), String(b"x"), String(b"version"), NIL]),
        NIL,
        NIL,
        String(b"NIL"),
        Atom("NILS"),
    ]
    assert parse("a X () (()) (a (b c))").args == [
        ParenList([]),
        ParenList([ParenList([])]),
        ParenList([Atom("a"), ParenList([Atom("b"), Atom("c")])]),
    ]


def test_atoms_keep_case_and_special_characters() -> None:
    assert parse("a LIST ~/Mail/ %").args == [Atom("~/Mail/"), Atom("%")]
    assert parse("a STORE 1:*,3 FLAGS \\Seen $Junk").args == [
        Atom("1:*,3"),
        Atom("FLAGS"),
        Atom("\\Seen"),
        Atom("$Junk"),
    ]
    assert parse("a SELECT [Gmail]/Sent").args == [Atom("[Gmail]/Sent")]  # brackets are sections only in FETCH
    assert parse("a AUTHENTICATE PLAIN AGZyZWQAc2VjcmV0=").args == [Atom("PLAIN"), Atom("AGZyZWQAc2VjcmV0=")]


def test_command_names_and_uid() -> None:
    assert parse("A999 UID FETCH 4827313:4828442 FLAGS") == Command(
        "A999", "UID FETCH", [Atom("4827313:4828442"), Atom("FLAGS")]
    )
    assert parse("x uid Search 1").name == "UID SEARCH"
    assert parse("x uid expunge 3:5").name == "UID EXPUNGE"
    assert parse("tag.with-odd]chars NOOP").tag == "tag.with-odd]chars"
    assert parse("a NOOP ").args == []  # trailing spaces are tolerated


@pytest.mark.parametrize(
    ("wire", "tag", "message"),
    [
        ("", None, "empty command"),
        ("   ", None, "empty command"),
        (" NOOP", None, "missing or invalid tag"),
        ("+ NOOP", None, "missing or invalid tag"),
        ("a+b NOOP", None, "missing or invalid tag"),
        ('"a" NOOP', None, "missing or invalid tag"),
        ("a*b NOOP", None, "missing or invalid tag"),
        ("a1", "a1", "missing command"),
        ("a1  NOOP", "a1", "expected a command name"),
        ("a1 UID", "a1", "expected a space"),
        ("a1 (NOOP)", "a1", "expected a command name"),
        ("a1 FETCH 1 (FLAGS", "a1", "missing closing parenthesis"),
        ("a1 FETCH 1 FLAGS)", "a1", "expected a space before )"),
        ("a1 SEARCH )", "a1", "unbalanced parenthesis"),
        ("a1 SEARCH (ALL))", "a1", "expected a space before )"),
        ("a1 SEARCH ( ALL)", "a1", "unexpected space"),
        ("a1 SEARCH (ALL )", "a1", "unexpected )"),
        ("a1 SEARCH ALL  SEEN", "a1", "unexpected space"),
        ("a1 SEARCH ALL(SEEN)", "a1", "expected a space before (SEEN)"),
        ('a1 LOGIN a"b', "a1", 'expected a space before "b'),
        ("a1 LOGIN {x}", "a1", "invalid literal size"),  # from literal_marker, with the tag
        ("a1 LOGIN {1", "a1", "invalid literal"),
    ],
)
def test_malformed_commands(wire: str, tag: str | None, message: str) -> None:
    error = bad(wire)
    assert (error.tag, error.message) == (tag, message)


def test_8bit_and_control_characters_in_atoms() -> None:
    assert bad("a SELECT caf\xc3\xa9".encode("latin-1")).message == "8-bit character in atom"
    assert bad("a1 NO\xc3\xa9P".encode("latin-1")).message == "8-bit character in atom"
    assert bad(b"a SELECT foo\x01bar").message == "control character in command"
    assert bad(b"a SELECT \x7f").message == "control character in command"


def test_nesting_limit() -> None:
    depth = protocol.MAX_NESTING
    assert parse("a SEARCH " + "(" * depth + "ALL" + ")" * depth).args[0] is not None
    for levels in (depth + 1, 64, 10_000):
        error = bad("a SEARCH " + "(" * levels + "ALL" + ")" * levels)
        assert (error.tag, error.message) == ("a", "parentheses nested too deeply")


def test_huge_input_is_read_without_recursion() -> None:
    # Many list items or tokens cost only a loop.
    command = parse("a X (" + " ".join(["x"] * 50_000) + ")")
    assert isinstance(command.args[0], ParenList) and len(command.args[0].items) == 50_000


# -- FETCH items ----------------------------------------------------------------------------------------


def fetch_items(text: str) -> list[FetchAtt]:
    return protocol.parse_fetch_items(parse("a FETCH 1 " + text).args[1:])


def test_fetch_macros() -> None:
    # RFC 3501 §6.4.5
    assert fetch_items("ALL") == [FetchAtt(n) for n in ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE")]
    assert fetch_items("fast") == [FetchAtt(n) for n in ("FLAGS", "INTERNALDATE", "RFC822.SIZE")]
    assert fetch_items("FULL") == [FetchAtt(n) for n in ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY")]


def test_fetch_rfc_example() -> None:
    # RFC 3501 §6.4.5 example
    command = parse("A654 FETCH 2:4 (FLAGS BODY[HEADER.FIELDS (DATE FROM)])")
    assert protocol.parse_fetch(command.args) == protocol.FetchRequest(
        protocol.SequenceSet(((2, 4),)),
        [FetchAtt("FLAGS"), FetchAtt("BODY", "HEADER.FIELDS", ["DATE", "FROM"])],
        protocol.FetchModifiers(),
    )


def test_fetch_plain_items() -> None:
    names = "UID FLAGS INTERNALDATE RFC822 RFC822.HEADER RFC822.SIZE RFC822.TEXT ENVELOPE BODY BODYSTRUCTURE MODSEQ"
    assert fetch_items(f"({names.lower()})") == [FetchAtt(n) for n in names.split()]
    assert fetch_items("uid") == [FetchAtt("UID")]


@pytest.mark.parametrize(
    ("text", "expected", "response"),
    [
        ("BODY[]", FetchAtt("BODY", ""), "BODY[]"),
        ("body.peek[]", FetchAtt("BODY.PEEK", ""), "BODY[]"),
        ("BODY[TEXT]<0.7>", FetchAtt("BODY", "TEXT", partial=(0, 7)), "BODY[TEXT]<0>"),
        ("BODY.PEEK[header]<100.4294967295>", FetchAtt("BODY.PEEK", "HEADER", partial=(100, 2**32 - 1)), ""),
        ("BODY[1]", FetchAtt("BODY", "1"), "BODY[1]"),
        ("BODY[1.2.3]", FetchAtt("BODY", "1.2.3"), "BODY[1.2.3]"),
        ("BODY[1.2.mime]", FetchAtt("BODY", "1.2.MIME"), "BODY[1.2.MIME]"),
        ("BODY[4.2.HEADER]", FetchAtt("BODY", "4.2.HEADER"), "BODY[4.2.HEADER]"),
        ("BODY[3.TEXT]", FetchAtt("BODY", "3.TEXT"), "BODY[3.TEXT]"),
        (
            "BODY.PEEK[HEADER.FIELDS (From To Message-ID)]",
            FetchAtt("BODY.PEEK", "HEADER.FIELDS", ["From", "To", "Message-ID"]),
            "BODY[HEADER.FIELDS (From To Message-ID)]",
        ),
        (
            'BODY[2.HEADER.FIELDS.NOT ("X-Spam" References)]<5.10>',
            FetchAtt("BODY", "2.HEADER.FIELDS.NOT", ["X-Spam", "References"], (5, 10)),
            "BODY[2.HEADER.FIELDS.NOT (X-Spam References)]<5>",
        ),
        ("BINARY[]", FetchAtt("BINARY", ""), "BINARY[]"),
        ("BINARY.PEEK[1.2]<0.10>", FetchAtt("BINARY.PEEK", "1.2", partial=(0, 10)), "BINARY[1.2]<0>"),
        ("binary.size[3]", FetchAtt("BINARY.SIZE", "3"), "BINARY.SIZE[3]"),
        ("RFC822.HEADER", FetchAtt("RFC822.HEADER"), "RFC822.HEADER"),
        ("BODY", FetchAtt("BODY"), "BODY"),
    ],
)
def test_fetch_sections(text: str, expected: FetchAtt, response: str) -> None:
    assert fetch_items(text) == [expected]
    assert fetch_items(f"(FLAGS {text})") == [FetchAtt("FLAGS"), expected]
    if response:
        assert expected.response_name() == response


def test_fetch_header_names_as_literals_and_quoted() -> None:
    command = parse(b'a FETCH 1 (BODY[HEADER.FIELDS ({4}\r\nDate "From")])')
    assert protocol.parse_fetch_items(command.args[1:]) == [FetchAtt("BODY", "HEADER.FIELDS", ["Date", "From"])]


def test_fetch_sets_seen() -> None:
    # RFC 3501 §6.4.5; RFC 3516 §4.2
    texts = "BODY[] BODY.PEEK[] BODY BINARY[1] BINARY.PEEK[1] BINARY.SIZE[1] RFC822 RFC822.TEXT RFC822.HEADER FLAGS"
    setting = [text for text in texts.split() if fetch_items(text)[0].sets_seen]
    assert setting == ["BODY[]", "BINARY[1]", "RFC822", "RFC822.TEXT"]


@pytest.mark.parametrize(
    "text",
    [
        "BODY[FOO]",
        "BODY[0]",
        "BODY[1.0]",
        "BODY[01]",
        "BODY[MIME]",  # MIME needs a part number
        "BODY[1.]",
        "BODY[.1]",
        "BODY[HEADER.FIELDS]",  # needs a list
        "BODY[HEADER.FIELDS ()]",
        "BODY[HEADER (From)]",
        "BODY[HEADER.FIELDS (From:)]",
        "BODY[HEADER.FIELDS (From]",
        "BODY[TEXT",
        "BODY[TEXT]<0>",  # a command's partial has a length
        "BODY[TEXT]<0.0>",
        "BODY[TEXT]<1.99999999999>",
        "BODY[TEXT]<a.b>",
        "BODY[TEXT]<0.5",
        "BODY[TEXT]x",
        "BINARY[HEADER]",
        "BINARY[1.MIME]",
        "BINARY.SIZE[1]<0.5>",
        "BODY.PEEK",
        "BINARY",
        "RFC822.PEEK",
        "NIL",
        '"FLAGS"',
        "()",
        "(ALL)",  # macros stand alone
        "(FLAGS (UID))",
        "FLAGS UID",
        "FLAGS (CHANGEDSINCE 1) x",
    ],
)
def test_bad_fetch_items(text: str) -> None:
    with pytest.raises(ProtocolError):
        fetch_items(text)


def test_fetch_modifiers() -> None:
    # RFC 7162 §3.1.4.1 example, and §3.2.6 VANISHED
    command = parse("s100 UID FETCH 1:* (FLAGS) (CHANGEDSINCE 12345)")
    request = protocol.parse_fetch(command.args)
    assert request.modifiers == protocol.FetchModifiers(changed_since=12345)
    assert request.items == [FetchAtt("FLAGS")]
    assert protocol.parse_fetch_items(command.args[1:]) == [FetchAtt("FLAGS")]
    assert protocol.parse_fetch_modifiers(command.args[2:]).changed_since == 12345
    assert protocol.parse_fetch_modifiers(parse("a X (vanished CHANGEDSINCE 9223372036854775807)").args) == (
        protocol.FetchModifiers(changed_since=2**63 - 1, vanished=True)
    )
    assert protocol.parse_fetch_modifiers([]) == protocol.FetchModifiers()


@pytest.mark.parametrize(
    "text",
    [
        "()",
        "(CHANGEDSINCE)",
        "(CHANGEDSINCE x)",
        "(CHANGEDSINCE 9223372036854775808)",
        "(VANISHED)",
        "(CHANGEDSINCE 1 CHANGEDSINCE 2)",
        "(FOO 1)",
        "CHANGEDSINCE",
    ],
)
def test_bad_fetch_modifiers(text: str) -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_fetch_modifiers(parse("a X " + text).args)


def test_fetch_needs_sequence_set_and_items() -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_fetch([Atom("1")])
    with pytest.raises(ProtocolError, match="sequence set"):
        protocol.parse_fetch(parse("a FETCH 0:x FLAGS").args)


# -- sequence sets --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "largest", "numbers"),
    [
        ("1", 5, [1]),
        ("2:4", 5, [2, 3, 4]),
        ("4:2", 5, [2, 3, 4]),
        ("1,3,5", 5, [1, 3, 5]),
        ("3:*", 5, [3, 4, 5]),
        ("*:3", 5, [3, 4, 5]),
        ("*", 5, [5]),
        ("1:*", 0, []),
        ("*", 0, []),
        ("2,1:3,3", 5, [1, 2, 3]),
        ("1:3,5:6,4", 9, [1, 2, 3, 4, 5, 6]),
        ("7:9", 5, []),  # beyond the mailbox (exceeds() tells the server)
        ("4294967295", 5, []),
    ],
)
def test_sequence_set_resolve(text: str, largest: int, numbers: list[int]) -> None:
    sequence_set = protocol.parse_sequence_set(text)
    assert sequence_set.resolve(largest) == numbers
    assert [n for n in range(1, largest + 3) if sequence_set.contains(n, largest) and n <= largest] == numbers
    assert str(sequence_set) == text


def test_uid_sets_over_sparse_uids() -> None:
    uids = [3, 9, 10, 42, 100]
    assert list(protocol.parse_sequence_set("1:*").iter(uids, 100)) == uids
    assert list(protocol.parse_sequence_set("10:42,1,500").iter(uids, 100)) == [10, 42]
    assert list(protocol.parse_sequence_set("50:60").iter(uids, 100)) == []
    # RFC 3501 §6.4.8: 559:* includes the largest UID even when 559 is above it.
    assert list(protocol.parse_sequence_set("559:*").iter(uids, 100)) == [100]
    assert protocol.parse_sequence_set("559:*").contains(100, 100)
    assert list(protocol.parse_sequence_set("1:*").iter([], 0)) == []


def test_sequence_set_exceeds() -> None:
    assert not protocol.parse_sequence_set("1:5,*").exceeds(5)
    assert protocol.parse_sequence_set("1:6").exceeds(5)
    assert protocol.parse_sequence_set("*").exceeds(0)
    assert not protocol.parse_sequence_set("5:*").exceeds(9)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0",
        "0:5",
        "1:0",
        ",",
        "1,",
        ",1",
        "1::2",
        "1:2:3",
        "a",
        "1-3",
        "$",
        " 1",
        "1 ",
        "-1",
        "+1",
        "4294967296",
        "9" * 5000,
        "\u0661",
        "1:**",
        "**",
    ],
)
def test_bad_sequence_sets(text: str) -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_sequence_set(text)


@given(st.sets(st.integers(min_value=1, max_value=200), max_size=40))
def test_format_sequence_set_round_trip(numbers: set[int]) -> None:
    text = protocol.format_sequence_set(numbers)
    if not numbers:
        assert text == ""
        return
    assert protocol.parse_sequence_set(text).resolve(200) == sorted(numbers)


@given(
    st.lists(st.tuples(st.none() | st.integers(1, 30), st.none() | st.integers(1, 30)), min_size=1, max_size=6),
    st.integers(0, 30),
)
def test_sequence_set_methods_agree(ranges: list[tuple[int | None, int | None]], largest: int) -> None:
    sequence_set = protocol.SequenceSet(tuple(ranges))
    expected = {
        n
        for low, high in ranges
        for a, b in [(largest if low is None else low, largest if high is None else high)]
        for n in range(min(a, b), max(a, b) + 1)
        if n >= 1
    }
    assert sequence_set.resolve(largest) == sorted(n for n in expected if n <= largest)
    assert list(sequence_set.iter(range(1, 41), largest)) == sorted(expected)
    assert all(sequence_set.contains(n, largest) == (n in expected) for n in range(0, 41))
    assert protocol.parse_sequence_set(str(sequence_set)) == sequence_set


# -- STORE and flags ------------------------------------------------------------------------------------


def store(text: str) -> protocol.StoreSpec:
    return protocol.parse_store(parse("a STORE 1 " + text).args[1:])


def test_store() -> None:
    # RFC 3501 §6.4.6 and §8; RFC 7162 §3.1.3 example
    assert store("+FLAGS (\\Deleted)") == protocol.StoreSpec("+", False, ["\\Deleted"])
    assert store("+flags \\deleted") == protocol.StoreSpec("+", False, ["\\Deleted"])
    assert store("-FLAGS.SILENT (\\Seen $Work)") == protocol.StoreSpec("-", True, ["\\Seen", "$Work"])
    assert store("FLAGS ()") == protocol.StoreSpec("", False, [])
    assert store("FLAGS.SILENT \\Seen \\Answered \\SEEN") == protocol.StoreSpec("", True, ["\\Seen", "\\Answered"])
    command = parse("a103 UID STORE 6,4,8 (UNCHANGEDSINCE 12121230045) +FLAGS.SILENT (\\Deleted)")
    assert protocol.parse_store(command.args[1:]) == protocol.StoreSpec("+", True, ["\\Deleted"], 12121230045)
    assert store("(unchangedsince 0) FLAGS (a)").unchanged_since == 0


@pytest.mark.parametrize(
    "text",
    [
        "",
        "FLAGS",
        "+FLAGS (\\Bogus)",
        "+FLAGS (\\Recent)",
        "+FLAGS (\\*)",
        "+FLAGS ((\\Seen))",
        '+FLAGS ("\\Seen")',
        "+FLAGS (a%b)",
        "+FLAGS (a]b)",
        "+FLAGS (\\Seen) (\\Deleted)",
        "*FLAGS (\\Seen)",
        "+FLAGS.LOUD (\\Seen)",
        "+LABELS (x)",
        "(UNCHANGEDSINCE) +FLAGS (\\Seen)",
        "(UNCHANGEDSINCE x) +FLAGS (\\Seen)",
        "(CHANGEDSINCE 1) +FLAGS (\\Seen)",
        "(UNCHANGEDSINCE 1)",
    ],
)
def test_bad_store(text: str) -> None:
    with pytest.raises(ProtocolError):
        store(text)


def test_flags() -> None:
    assert protocol.normalize_flag("\\SEEN") == "\\Seen"
    assert protocol.normalize_flag("$Junk") == "$Junk"
    assert protocol.parse_flag(Atom("\\recent"), allow_recent=True) == "\\Recent"
    assert protocol.parse_flag_list(parse("a X ($a $b \\draft $A)").args[0]) == ["$a", "$b", "\\Draft"]
    with pytest.raises(ProtocolError):
        protocol.parse_flag_list(Atom("\\Seen"))


# -- dates ----------------------------------------------------------------------------------------------


def test_dates() -> None:
    assert protocol.parse_date("1-Feb-1994") == datetime.date(1994, 2, 1)
    assert protocol.parse_date("01-feb-1994") == datetime.date(1994, 2, 1)
    assert protocol.parse_date("29-Feb-2024") == datetime.date(2024, 2, 29)


@pytest.mark.parametrize(
    "text", ["", "1-Foo-1994", "32-Jan-1994", "29-Feb-2023", "1-Feb-94", "1 Feb 1994", "1-Feb-1994 ", "\uff11-Feb-1994"]
)
def test_bad_dates(text: str) -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_date(text)


def test_date_times() -> None:
    # RFC 3501 §9 date-time, and the INTERNALDATE example of §7.4.2
    value = protocol.parse_datetime("17-Jul-1996 02:44:25 -0700")
    assert value == datetime.datetime(1996, 7, 17, 2, 44, 25, tzinfo=datetime.timezone(datetime.timedelta(hours=-7)))
    assert protocol.format_datetime(value) == "17-Jul-1996 02:44:25 -0700"
    assert protocol.parse_datetime(" 7-Feb-1994 21:52:25 +0530").utcoffset() == datetime.timedelta(hours=5, minutes=30)
    assert protocol.parse_datetime("7-Feb-1994 21:52:25 +0000").day == 7
    assert protocol.format_datetime(datetime.datetime(2026, 11, 2, 10, 0, 0)) == "02-Nov-2026 10:00:00 +0000"
    assert (
        protocol.format_datetime(datetime.datetime(5, 1, 2, 3, 4, 5, tzinfo=datetime.UTC))
        == "02-Jan-0005 03:04:05 +0000"
    )


@pytest.mark.parametrize(
    "text",
    [
        "17-Jul-1996 02:44:25",
        "17-Jul-1996 24:00:00 +0000",
        "17-Jul-1996 02:60:00 +0000",
        "17-Jul-1996 02:44:25 +0060",
        "17-Jul-1996 02:44:25 +2400",
        "17-Jul-1996 2:44:25 +0000",
        "17-Jul-1996  02:44:25 +0000",
        "31-Apr-1996 02:44:25 +0000",
    ],
)
def test_bad_date_times(text: str) -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_datetime(text)


@given(st.datetimes(timezones=st.just(datetime.timezone(datetime.timedelta(hours=-3, minutes=-30)))))
def test_date_time_round_trip(value: datetime.datetime) -> None:
    value = value.replace(microsecond=0)
    assert protocol.parse_datetime(protocol.format_datetime(value)) == value


# -- mailbox names --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "wire"),
    [
        ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),  # RFC 3501 §5.1.3
        ("Été", "&AMk-t&AOk-"),
        ("Tom & Jerry", "Tom &- Jerry"),
        ("&", "&-"),
        ("INBOX", "INBOX"),
        ("", ""),
        ("😀", "&2D3eAA-"),  # outside the BMP: a surrogate pair
        ("a\tb", "a&AAk-b"),  # control characters are encoded too
    ],
)
def test_modified_utf7(name: str, wire: str) -> None:
    assert protocol.encode_mailbox_name(name) == wire
    assert protocol.decode_mailbox_name(wire) == name


@pytest.mark.parametrize(
    "wire",
    [
        "&",  # unterminated
        "&U,BTFw",
        "&Jjo!-",  # not base64
        "&U/BTFw-",  # "/" is "," in modified base64
        "&AGE-",  # "a" must stand for itself
        "&U,BTFw-&ZeVnLIqe-",  # null shift
        "&AMk=-",  # padding
        "&AM-",  # odd number of bytes
        "&AMl-",  # stray bits after the last character
        "&2D0-",  # lone surrogate
        "caf\u00e9",  # 8-bit
        "a\tb",
    ],
)
def test_bad_modified_utf7(wire: str) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode_mailbox_name(wire)


@given(st.text())
def test_modified_utf7_round_trip(name: str) -> None:
    wire = protocol.encode_mailbox_name(name)
    assert all(0x20 <= ord(c) <= 0x7E for c in wire)
    assert protocol.decode_mailbox_name(wire) == name


def test_encode_refuses_lone_surrogates() -> None:
    with pytest.raises(ProtocolError):
        protocol.encode_mailbox_name("a\ud800")


def test_inbox_normalisation() -> None:
    assert protocol.normalize_mailbox("inbox") == "INBOX"
    assert protocol.normalize_mailbox("InBox/Sub/x") == "INBOX/Sub/x"
    assert protocol.normalize_mailbox("inbox.old") == "inbox.old"
    assert protocol.normalize_mailbox("inbox.old", ".") == "INBOX.old"
    assert protocol.normalize_mailbox("\u0131nbox") == "\u0131nbox"  # dotless i: upper() would make it INBOX
    assert protocol.normalize_mailbox("Sent") == "Sent"
    assert protocol.mailbox_arg(Atom("iNbOx")) == "INBOX"
    assert protocol.mailbox_arg(String(b"&AMk-t&AOk-")) == "Été"
    assert protocol.mailbox_arg(NIL) == "NIL"
    with pytest.raises(ProtocolError):
        protocol.mailbox_arg(String("Été".encode()))
    with pytest.raises(ProtocolError):
        protocol.mailbox_arg(ParenList([]))


# -- LIST -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("*", "INBOX", True),
        ("*", "a/b/c", True),
        ("%", "a", True),
        ("%", "a/b", False),
        ("a/%", "a/b", True),
        ("a/%", "a/b/c", False),
        ("a/*", "a/b/c", True),
        ("a*", "a", True),
        ("%/%", "a/b", True),
        ("", "", True),
        ("Sent", "Sent", True),
        ("sent", "Sent", False),  # case-sensitive
        ("inbox", "INBOX", True),  # except INBOX
        ("Inbox/%", "INBOX/Sub", True),
        ("inbox/sub", "INBOX/Sub", False),
        ("i%", "INBOX", True),
        ("in*", "inbox-old", True),
        ("IN*", "inbox-old", False),
        ("\u0131nbox", "INBOX", False),
        ("&AMk-*", "&AMk-t&AOk-", True),
        ("a%b%c", "aXbYc", True),
        ("a%b%c", "aXb/c", False),
        ("*" * 50 + "x", "a" * 200, False),  # no exponential blow-up
        ("%" * 50 + "x", "a" * 200 + "x", True),
    ],
)
def test_mailbox_matches(pattern: str, name: str, expected: bool) -> None:
    assert protocol.mailbox_matches(pattern, name) is expected


def reference_match(pattern: str, name: str) -> bool:
    regex = "".join(".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, name, re.DOTALL) is not None


@given(st.text(alphabet="ab/*%", max_size=8), st.text(alphabet="ab/", max_size=8))
def test_mailbox_matches_like_a_regex(pattern: str, name: str) -> None:
    assert protocol.mailbox_matches(pattern, name) == reference_match(pattern, name)


def list_args(text: str, *, extended: bool = True) -> protocol.ListRequest:
    return protocol.parse_list_args(parse("a LIST " + text).args, extended=extended)


def test_list_arguments() -> None:
    # RFC 3501 §6.3.8 examples
    assert list_args('"" ""') == protocol.ListRequest("", [])
    assert list_args('"" ""').delimiter_query
    assert list_args('#news.comp.mail.misc ""') == protocol.ListRequest("#news.comp.mail.misc", [])
    assert not list_args('"" %').delimiter_query
    request = list_args("~/Mail/ %")
    assert request == protocol.ListRequest("~/Mail/", ["%"])
    assert request.matches("~/Mail/foo") and not request.matches("~/Mail/foo/bar") and not request.matches("foo")
    assert list_args('"" "&AMk-t*"').patterns == ["Ét*"]
    assert list_args('"" *', extended=False).patterns == ["*"]


def test_list_extended() -> None:
    # RFC 5258 §5 examples, RFC 6154 §5.1, RFC 5819
    assert list_args('(SUBSCRIBED) "" "*"') == protocol.ListRequest(
        "", ["*"], frozenset({"SUBSCRIBED"}), frozenset({"SUBSCRIBED"}), extended=True
    )
    assert list_args('"" "%" RETURN (CHILDREN)') == protocol.ListRequest(
        "", ["%"], returns=frozenset({"CHILDREN"}), extended=True
    )
    request = list_args(
        '(subscribed RECURSIVEMATCH) "" ("INBOX" "Sent*") return (special-use STATUS (MESSAGES unseen))'
    )
    assert request.selection == {"SUBSCRIBED", "RECURSIVEMATCH"}
    assert request.returns == {"SUBSCRIBED", "SPECIAL-USE", "STATUS"}
    assert request.status_items == ["MESSAGES", "UNSEEN"]
    assert request.patterns == ["INBOX", "Sent*"]
    assert list_args('(SPECIAL-USE) "" *').returns == {"SPECIAL-USE"}
    assert list_args('() "" *').extended


@pytest.mark.parametrize(
    "text",
    [
        '""',
        "",
        '(RECURSIVEMATCH) "" *',
        '(BOGUS) "" *',
        '"" * RETURN (BOGUS)',
        '"" * RETURN (STATUS)',
        '"" * RETURN (STATUS ())',
        '"" * RETURN (STATUS (FOO))',
        '"" * RETURN CHILDREN',
        '"" * EXTRA',
        '"" ()',
        '"" "&Jjo!-"',
        '"" "caf\u00e9"',
    ],
)
def test_bad_list_arguments(text: str) -> None:
    with pytest.raises(ProtocolError):
        list_args(text)


def test_lsub_takes_no_options() -> None:
    with pytest.raises(ProtocolError):
        list_args('(SUBSCRIBED) "" *', extended=False)
    with pytest.raises(ProtocolError):
        list_args('"" * RETURN (CHILDREN)', extended=False)


# -- STATUS, SELECT, APPEND -----------------------------------------------------------------------------


def test_status() -> None:
    # RFC 3501 §6.3.10 example
    command = parse("A042 STATUS blurdybloop (UIDNEXT MESSAGES)")
    assert protocol.parse_status(command.args) == protocol.StatusRequest("blurdybloop", ["UIDNEXT", "MESSAGES"])
    assert protocol.parse_status(parse("a STATUS inbox (unseen highestmodseq unseen size)").args) == (
        protocol.StatusRequest("INBOX", ["UNSEEN", "HIGHESTMODSEQ", "SIZE"])
    )
    for text in ("INBOX", "INBOX ()", "INBOX (BOGUS)", "INBOX MESSAGES", "(MESSAGES)"):
        with pytest.raises(ProtocolError):
            protocol.parse_status(parse("a STATUS " + text).args)


def test_select() -> None:
    assert protocol.parse_select(parse("A142 SELECT INBOX").args) == protocol.SelectRequest("INBOX")
    assert protocol.parse_select(parse('a SELECT "Sent" (CONDSTORE)').args) == protocol.SelectRequest("Sent", True)
    for text in ("", "INBOX (QRESYNC)", "INBOX (NOSUCH)", "INBOX CONDSTORE", "INBOX (CONDSTORE) x"):
        with pytest.raises(ProtocolError):
            protocol.parse_select(parse("a SELECT " + text).args)


def test_append() -> None:
    message = b"Subject: hi\r\n\r\nbody\r\n"
    literal = b"{%d}\r\n" % len(message) + message
    request = protocol.parse_append(
        parse(b'a APPEND Drafts (\\Draft \\seen) "02-Nov-2026 10:00:00 +0000" ' + literal).args
    )
    assert request == protocol.AppendRequest(
        "Drafts",
        ["\\Draft", "\\Seen"],
        datetime.datetime(2026, 11, 2, 10, 0, tzinfo=datetime.UTC),
        message,
    )
    assert protocol.parse_append(parse(b"a APPEND inbox " + literal).args) == protocol.AppendRequest(
        "INBOX", [], None, message
    )
    assert protocol.parse_append(parse(b"a APPEND x () " + literal).args).flags == []
    binary = protocol.parse_append(parse(b"a APPEND x ~{2}\r\n\x00\x01").args)
    assert (binary.message, binary.binary) == (b"\x00\x01", True)


@pytest.mark.parametrize(
    "text",
    [
        b"a APPEND x",
        b"a APPEND x (\\Seen)",
        b'a APPEND x "not a date" {1}\r\nm',
        b'a APPEND x "02-Nov-2026 10:00:00 +0000" (\\Seen) {1}\r\nm',
        b"a APPEND x (\\Recent) {1}\r\nm",
        b"a APPEND x (\\Seen) (\\Seen) {1}\r\nm",
        b"a APPEND x (\\Seen) NIL",
    ],
)
def test_bad_append(text: bytes) -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_append(parse(text).args)


# -- argument helpers -----------------------------------------------------------------------------------


def test_argument_helpers() -> None:
    assert protocol.arg_bytes(Atom("x")) == b"x"
    assert protocol.arg_text(String("é".encode())) == "é"
    assert protocol.arg_atom(NIL) == "NIL"
    assert protocol.arg_number(Atom("4294967295")) == 2**32 - 1
    for call in (
        lambda: protocol.arg_text(String(b"\xff")),
        lambda: protocol.arg_bytes(ParenList([])),
        lambda: protocol.arg_atom(String(b"x")),
        lambda: protocol.arg_number(Atom("4294967296")),
        lambda: protocol.arg_number(Atom("0"), nonzero=True),
        lambda: protocol.arg_number(String(b"1")),
        lambda: protocol.parse_number("1" * 10_000),
    ):
        with pytest.raises(ProtocolError):
            call()


# -- formatting -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (None, b"NIL"),
        ("", b'""'),
        ("hello world", b'"hello world"'),
        ('say "hi" \\o/', b'"say \\"hi\\" \\\\o/"'),
        ("NIL", b'"NIL"'),
        ("é", b"{2}\r\n\xc3\xa9"),
        (b"a\r\nb", b"{4}\r\na\r\nb"),
        (b"a\x00", b"{2}\r\na\x00"),
        ("x" * protocol.QUOTED_MAX, b'"' + b"x" * protocol.QUOTED_MAX + b'"'),
        ("x" * (protocol.QUOTED_MAX + 1), b"{1025}\r\n" + b"x" * 1025),
    ],
)
def test_quote(value: str | bytes | None, wire: bytes) -> None:
    assert protocol.quote(value) == wire


@given(st.binary(max_size=1500) | st.text(max_size=600))
def test_quote_parses_back(value: bytes | str) -> None:
    data = value.encode() if isinstance(value, str) else value
    assert parse(b"t1 X " + protocol.quote(value)).args == [String(data)]


def test_quote_none_parses_back_as_nil() -> None:
    assert parse(b"t1 X " + protocol.quote(None)).args == [NIL]


def test_format_mailbox_and_astring() -> None:
    assert protocol.format_mailbox("INBOX") == b"INBOX"
    assert protocol.format_mailbox(protocol.encode_mailbox_name("Été")) == b"&AMk-t&AOk-"
    assert protocol.format_mailbox("Projects/2026") == b"Projects/2026"
    assert protocol.format_mailbox("My Folder") == b'"My Folder"'
    assert protocol.format_mailbox("") == b'""'
    assert protocol.format_mailbox("nil") == b'"nil"'
    assert protocol.format_mailbox("a%b") == b'"a%b"'
    assert protocol.format_mailbox('say "x"') == b'"say \\"x\\""'
    assert protocol.format_astring("[Gmail]") == b"[Gmail]"
    assert protocol.format_astring("a(b") == b'"a(b"'


@given(st.text(max_size=40))
def test_format_mailbox_parses_back(name: str) -> None:
    command = parse(b"t SELECT " + protocol.format_mailbox(protocol.encode_mailbox_name(name)))
    assert protocol.mailbox_arg(command.args[0]) == protocol.normalize_mailbox(name)


def test_format_flags() -> None:
    assert protocol.format_flags(["\\Seen", "\\Answered"]) == b"(\\Seen \\Answered)"
    assert protocol.format_flags([]) == b"()"


# -- arbitrary bytes ------------------------------------------------------------------------------------


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=40), min_size=0, max_size=7))
def test_arbitrary_parts_raise_only_protocol_errors(parts: list[bytes]) -> None:
    with contextlib.suppress(ProtocolError):
        protocol.parse_command(parts)
    for line in parts:
        with contextlib.suppress(ProtocolError):
            protocol.literal_marker(line)


IMAPISH = st.text(alphabet=' ()[]{}<>"\\*%.:,+-~0123456789$&ABCDEFHIKLMNOPRSTUVXYZabc\x00\x7f\r\xe9', max_size=60)
PREFIXES = ["a FETCH ", "a UID FETCH 1 ", "a SEARCH ", "a STORE 1 ", "a LIST ", "a APPEND x ", "a STATUS x ", "a "]


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PREFIXES), IMAPISH, st.lists(st.binary(max_size=8), max_size=2))
def test_imapish_commands_raise_only_protocol_errors(prefix: str, text: str, literals: list[bytes]) -> None:
    """Near-miss commands, with literals spliced in, through the tokenizer and every per-command parser."""
    parts = [(prefix + text).encode("latin-1")]
    for data in literals:
        parts[-1] += b" {%d}" % len(data)
        parts += [data, b""]
    try:
        command = protocol.parse_command(parts)
    except ProtocolError:
        return
    for call in (
        protocol.parse_fetch,
        lambda args: protocol.parse_fetch_items(args[1:]),
        lambda args: protocol.parse_fetch_modifiers(args[2:]),
        lambda args: protocol.parse_store(args[1:]),
        protocol.parse_list_args,
        protocol.parse_status,
        protocol.parse_select,
        protocol.parse_append,
        lambda args: [protocol.mailbox_arg(arg) for arg in args],
        lambda args: [protocol.parse_sequence_set(protocol.arg_atom(arg)) for arg in args],
        lambda args: [protocol.parse_date(protocol.arg_text(arg)) for arg in args],
        lambda args: [protocol.parse_datetime(protocol.arg_text(arg)) for arg in args],
    ):
        with contextlib.suppress(ProtocolError):
            call(command.args)


def test_select_qresync_parameters() -> None:
    """RFC 7162 §3.2.5: SELECT mailbox (QRESYNC (uidvalidity modseq [known-uids [seq-match]]))."""
    args = protocol.parse_command([b"a SELECT INBOX (QRESYNC (67890007 20050715194045000 41,43:211 (1:3 4:6)))"]).args
    request = protocol.parse_select(args)
    assert request.qresync is not None and (request.qresync.uidvalidity, request.qresync.modseq) == (
        67890007,
        20050715194045000,
    )
    assert str(request.qresync.known_uids) == "41,43:211"
    for bad in (b"(QRESYNC)", b"(QRESYNC (1))", b"(QRESYNC (0 1))", b"(QRESYNC (1 1 x))", b"(CONDSTORE CONDSTORE)"):
        with pytest.raises(protocol.ProtocolError):
            protocol.parse_select(protocol.parse_command([b"a SELECT INBOX " + bad]).args)


def test_missing_numbers_walks_the_gaps() -> None:
    assert protocol.missing_numbers(None, [2, 3, 7], 9) == "1,4:6,8:9"
    assert protocol.missing_numbers(protocol.parse_sequence_set("3:8,20"), [2, 3, 7], 9) == "4:6,8"
    assert protocol.missing_numbers(None, [], 0) == ""
    assert protocol.missing_numbers(None, [1, 2], 2) == ""
    assert protocol.missing_numbers(None, [5], 4_000_000_000) == "1:4,6:4000000000"
