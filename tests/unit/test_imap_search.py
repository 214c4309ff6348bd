"""IMAP SEARCH (mailnode.imap.search): every RFC 3501 §6.4.4 key and MODSEQ parsed to its tree and evaluated
against a message (flags, keywords, header and text matching case-insensitively, dates without time or zone,
sizes, sequence and UID sets with `*`), NOT/OR/groups/implicit AND, CHARSET and BADCHARSET, malformed and
hostile criteria, which searches need the message content, that cheap keys are decided before content is read,
and that arbitrary criteria parse or fail with ProtocolError only."""

from __future__ import annotations

import dataclasses
import datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailnode.imap import mime, protocol, search
from mailnode.imap.protocol import ProtocolError
from mailnode.imap.search import (
    All,
    And,
    Body,
    Flag,
    Header,
    InternalDate,
    ModSeq,
    Not,
    Or,
    SentDate,
    SequenceNumbers,
    Size,
    Text,
    Uid,
)

PST = datetime.timezone(datetime.timedelta(hours=-8))


@dataclasses.dataclass
class Message:
    """A SearchTarget that counts how often its content is read."""

    seq: int = 1
    uid: int = 10
    flags: frozenset[str] = frozenset()
    size: int = 1000
    internal_date: datetime.datetime = datetime.datetime(1994, 2, 1, 23, 30, tzinfo=PST)  # 2 Feb in UTC
    modseq: int = 5
    largest_seq: int = 3
    largest_uid: int = 30
    headers: dict[str, str] = dataclasses.field(
        default_factory=lambda: {
            "From": "Terry Gray <gray@cac.washington.edu>",
            "To": "imap@cac.washington.edu",
            "Cc": "minutes@CNRI.Reston.VA.US, John Klensin <KLENSIN@MIT.EDU>",
            "Subject": "IMAP4rev1 WG mtg summary and minutes",
            "Date": "Wed, 17 Jul 1996 02:23:25 -0700 (PDT)",
            "X-Empty": "",
        }
    )
    body: str = "Meeting summary: the Straße is closed."
    sent: datetime.date | None = datetime.date(1996, 7, 17)
    reads: int = 0

    def header(self, name: str) -> str | None:
        self.reads += 1
        return next((value for key, value in self.headers.items() if key.lower() == name.lower()), None)

    def headers_text(self) -> str:
        self.reads += 1
        return "".join(f"{key}: {value}\r\n" for key, value in self.headers.items())

    def body_text(self) -> str:
        self.reads += 1
        return self.body

    def sent_date(self) -> datetime.date | None:
        self.reads += 1
        return self.sent


def keys(text: bytes | str) -> search.SearchKey:
    data = text.encode() if isinstance(text, str) else text
    parts = [data]
    marker = protocol.literal_marker(data.split(b"\r\n")[0])
    if marker is not None:
        line, _, rest = data.partition(b"\r\n")
        parts = [line, rest[: marker[0]], rest[marker[0] :]]
    return search.parse_search(protocol.parse_command([b"a SEARCH " + parts[0], *parts[1:]]).args)


def matches(text: bytes | str, message: Message | None = None) -> bool:
    return search.evaluate(keys(text), message or Message())


# -- the RFC's examples ---------------------------------------------------------------------------------


def test_rfc3501_examples() -> None:
    # RFC 3501 §6.4.4
    assert keys('FLAGGED SINCE 1-Feb-1994 NOT FROM "Smith"') == And(
        (Flag("\\Flagged"), InternalDate("since", datetime.date(1994, 2, 1)), Not(Header("From", "Smith")))
    )
    assert keys('TEXT "string not in mailbox"') == Text("string not in mailbox")
    assert keys("CHARSET UTF-8 TEXT {6}\r\n" + "grüß") == Text("grüß")


def test_rfc3501_example_evaluated() -> None:
    query = 'FLAGGED SINCE 1-Feb-1994 NOT FROM "Smith"'
    assert matches(query, Message(flags=frozenset({"\\Flagged"})))
    assert not matches(query, Message())
    assert not matches(query, Message(flags=frozenset({"\\Flagged"}), headers={"From": "Jo SMITH <j@x>"}))
    early = Message(flags=frozenset({"\\Flagged"}), internal_date=datetime.datetime(1994, 1, 31, 23, 59, tzinfo=PST))
    assert not matches(query, early)


def test_rfc7162_modseq_example() -> None:
    # RFC 7162 §3.1.5
    assert keys('MODSEQ "/flags/\\\\draft" all 620162338') == ModSeq(620162338)
    assert keys("MODSEQ 0") == ModSeq(0)
    assert search.referenced_modseq(keys("OR MODSEQ 7 NOT MODSEQ 9"))
    assert not search.referenced_modseq(keys("ALL"))
    assert matches("MODSEQ 5", Message(modseq=5))
    assert not matches("MODSEQ 6", Message(modseq=5))
    assert matches('MODSEQ "/flags/$junk" priv 4', Message(modseq=5))


# -- each key -------------------------------------------------------------------------------------------

SEEN_ANSWERED = frozenset({"\\Seen", "\\Answered", "$Work"})


@pytest.mark.parametrize(
    ("query", "tree"),
    [
        ("ALL", All()),
        ("ANSWERED", Flag("\\Answered")),
        ("DELETED", Flag("\\Deleted")),
        ("DRAFT", Flag("\\Draft")),
        ("FLAGGED", Flag("\\Flagged")),
        ("RECENT", Flag("\\Recent")),
        ("SEEN", Flag("\\Seen")),
        ("UNANSWERED", Flag("\\Answered", present=False)),
        ("UNDELETED", Flag("\\Deleted", present=False)),
        ("UNDRAFT", Flag("\\Draft", present=False)),
        ("UNFLAGGED", Flag("\\Flagged", present=False)),
        ("UNSEEN", Flag("\\Seen", present=False)),
        ("OLD", Flag("\\Recent", present=False)),
        ("NEW", And((Flag("\\Recent"), Flag("\\Seen", present=False)))),
        ("KEYWORD $Work", Flag("$Work")),
        ("UNKEYWORD $Work", Flag("$Work", present=False)),
        ("BCC x", Header("Bcc", "x")),
        ("cc x", Header("Cc", "x")),
        ("FROM x", Header("From", "x")),
        ("SUBJECT x", Header("Subject", "x")),
        ("TO x", Header("To", "x")),
        ('HEADER "Message-ID" "<a@b>"', Header("Message-ID", "<a@b>")),
        ("BODY x", Body("x")),
        ("TEXT x", Text("x")),
        ('BEFORE "1-Feb-1994"', InternalDate("before", datetime.date(1994, 2, 1))),
        ("ON 1-Feb-1994", InternalDate("on", datetime.date(1994, 2, 1))),
        ("SINCE 1-Feb-1994", InternalDate("since", datetime.date(1994, 2, 1))),
        ("SENTBEFORE 1-Feb-1994", SentDate("before", datetime.date(1994, 2, 1))),
        ("SENTON 1-Feb-1994", SentDate("on", datetime.date(1994, 2, 1))),
        ("SENTSINCE 1-Feb-1994", SentDate("since", datetime.date(1994, 2, 1))),
        ("LARGER 1000", Size("larger", 1000)),
        ("SMALLER 1000", Size("smaller", 1000)),
        ("UID 1:*", Uid(protocol.SequenceSet(((1, None),)))),
        ("2,4:*", SequenceNumbers(protocol.SequenceSet(((2, 2), (4, None))))),
        ("*", SequenceNumbers(protocol.SequenceSet(((None, None),)))),
        ("NOT SEEN", Not(Flag("\\Seen"))),
        ("OR SEEN FLAGGED", Or(Flag("\\Seen"), Flag("\\Flagged"))),
        ("(SEEN)", Flag("\\Seen")),
        ("(SEEN FLAGGED)", And((Flag("\\Seen"), Flag("\\Flagged")))),
        ("SUBJECT NIL", Header("Subject", "NIL")),
    ],
)
def test_parse_each_key(query: str, tree: search.SearchKey) -> None:
    assert keys(query) == tree
    if query.isupper():
        assert keys(query.lower()) == tree  # key names are case-insensitive


@pytest.mark.parametrize(
    ("query", "message", "expected"),
    [
        ("ALL", Message(), True),
        ("SEEN", Message(flags=SEEN_ANSWERED), True),
        ("SEEN", Message(), False),
        ("UNSEEN", Message(flags=SEEN_ANSWERED), False),
        ("ANSWERED", Message(flags=SEEN_ANSWERED), True),
        ("UNANSWERED", Message(flags=SEEN_ANSWERED), False),
        ("DELETED", Message(flags=frozenset({"\\Deleted"})), True),
        ("UNDELETED", Message(flags=frozenset({"\\Deleted"})), False),
        ("DRAFT", Message(flags=frozenset({"\\Draft"})), True),
        ("UNDRAFT", Message(), True),
        ("FLAGGED", Message(flags=frozenset({"\\Flagged"})), True),
        ("UNFLAGGED", Message(flags=frozenset({"\\Flagged"})), False),
        ("RECENT", Message(flags=frozenset({"\\Recent"})), True),
        ("OLD", Message(flags=frozenset({"\\Recent"})), False),
        ("OLD", Message(), True),
        ("NEW", Message(flags=frozenset({"\\Recent"})), True),
        ("NEW", Message(flags=frozenset({"\\Recent", "\\Seen"})), False),
        ("NEW", Message(), False),
        ("KEYWORD $Work", Message(flags=SEEN_ANSWERED), True),
        ("KEYWORD $work", Message(flags=SEEN_ANSWERED), True),  # keywords compare case-insensitively
        ("KEYWORD $Junk", Message(flags=SEEN_ANSWERED), False),
        ("UNKEYWORD $Junk", Message(flags=SEEN_ANSWERED), True),
        ("UNKEYWORD $WORK", Message(flags=SEEN_ANSWERED), False),
        ("SEEN", Message(flags=frozenset({"\\SEEN"})), True),
        ("FROM gray", Message(), True),
        ("FROM GRAY@CAC", Message(), True),
        ('FROM "Terry Gray"', Message(), True),
        ("FROM smith", Message(), False),
        ("TO imap@", Message(), True),
        ("CC klensin@mit.edu", Message(), True),
        ("BCC x", Message(), False),  # no Bcc header
        ('BCC ""', Message(), False),
        ('FROM ""', Message(), True),
        ("SUBJECT mtg", Message(), True),
        ('SUBJECT "wg MTG"', Message(), True),
        ("SUBJECT minutes", Message(headers={}), False),
        ('HEADER X-Empty ""', Message(), True),  # an empty string matches any message with the field
        ('HEADER x-empty ""', Message(), True),
        ('HEADER X-Missing ""', Message(), False),
        ('HEADER Subject "summary AND"', Message(), True),
        ("BODY summary", Message(), True),
        ("BODY STRASSE", Message(), True),  # case folding: ß is ss
        ("BODY Gray", Message(), False),  # the header is not the body
        ("TEXT Gray", Message(), True),
        ("TEXT summary", Message(), True),
        ("TEXT nowhere", Message(), False),
        ('TEXT ""', Message(), True),
        # The internal date is 1 Feb 1994 23:30 -0800 (2 Feb in UTC): its own date counts, not UTC's.
        ("ON 1-Feb-1994", Message(), True),
        ("ON 2-Feb-1994", Message(), False),
        ("BEFORE 1-Feb-1994", Message(), False),
        ("BEFORE 2-Feb-1994", Message(), True),
        ("SINCE 1-Feb-1994", Message(), True),
        ("SINCE 2-Feb-1994", Message(), False),
        ("SENTON 17-Jul-1996", Message(), True),
        ("SENTBEFORE 17-Jul-1996", Message(), False),
        ("SENTBEFORE 18-Jul-1996", Message(), True),
        ("SENTSINCE 17-Jul-1996", Message(), True),
        ("SENTSINCE 18-Jul-1996", Message(), False),
        ("SENTON 1-Feb-1994", Message(sent=None), True),  # no Date header: the internal date stands in
        ("LARGER 999", Message(size=1000), True),
        ("LARGER 1000", Message(size=1000), False),
        ("SMALLER 1001", Message(size=1000), True),
        ("SMALLER 1000", Message(size=1000), False),
        ("1", Message(seq=1), True),
        ("2:3", Message(seq=1), False),
        ("*", Message(seq=3, largest_seq=3), True),
        ("*", Message(seq=2, largest_seq=3), False),
        ("3:*", Message(seq=3, largest_seq=3), True),
        ("UID 10", Message(uid=10), True),
        ("UID 11:*", Message(uid=10), False),
        ("UID *", Message(uid=30, largest_uid=30), True),
        ("UID 559:*", Message(uid=30, largest_uid=30), True),  # RFC 3501 §6.4.8
        ("UID 1:9,11:20", Message(uid=10), False),
        ("NOT SEEN", Message(), True),
        ("NOT NOT SEEN", Message(), False),
        ("OR SEEN FLAGGED", Message(flags=frozenset({"\\Flagged"})), True),
        ("OR SEEN FLAGGED", Message(), False),
        ("OR (SEEN FLAGGED) DRAFT", Message(flags=frozenset({"\\Seen"})), False),
        ("OR (SEEN FLAGGED) DRAFT", Message(flags=frozenset({"\\Seen", "\\Flagged"})), True),
        ("SEEN FLAGGED", Message(flags=frozenset({"\\Seen"})), False),
        ("SEEN (FLAGGED OR DRAFT ANSWERED)", Message(flags=frozenset({"\\Seen", "\\Flagged", "\\Answered"})), True),
        ("NOT (SEEN FLAGGED)", Message(flags=frozenset({"\\Seen"})), True),
        ("OR OR SEEN FLAGGED DRAFT", Message(flags=frozenset({"\\Draft"})), True),
    ],
)
def test_evaluate_each_key(query: str, message: Message, expected: bool) -> None:
    assert search.evaluate(keys(query), message) is expected


def test_strings_are_utf8_with_or_without_charset() -> None:
    message = Message(headers={"Subject": "Réunion à Genève"})
    assert matches('SUBJECT "réunion"', message)
    assert matches('CHARSET utf-8 SUBJECT "GENÈVE"', message)
    assert matches('CHARSET "US-ASCII" SUBJECT "union"', message)
    with pytest.raises(ProtocolError):
        search.parse_search([protocol.Atom("SUBJECT"), protocol.String(b"\xff")])


def test_strings_are_in_the_charset_named() -> None:
    # RFC 3501 §6.4.4: CHARSET says what the strings are in; any text charset messages are decoded from.
    message = Message(headers={"Subject": "Réunion à Genève"}, body="Привет из Москвы")
    assert keys(b"CHARSET ISO-8859-1 SUBJECT {7}\r\nR\xe9union") == Header("Subject", "Réunion")
    assert matches(b"CHARSET latin1 SUBJECT {6}\r\n" + "genève".encode("latin-1"), message)
    assert keys(b"CHARSET KOI8-R BODY {6}\r\n" + "Москва".encode("koi8-r")) == Body("Москва")
    assert keys(b"CHARSET UTF-16BE TEXT {4}\r\n" + "Жд".encode("utf-16-be")) == Text("Жд")
    # Only the search strings: dates, keywords and header names stay ASCII.
    assert keys(b"CHARSET UTF-16 SINCE 1-Feb-1994 HEADER X-A {4}\r\n\xff\xfeA\x00") == And(
        (InternalDate("since", datetime.date(1994, 2, 1)), Header("X-A", "A"))
    )
    with pytest.raises(ProtocolError, match="not valid in the charset"):
        keys(b"CHARSET ISO-2022-JP TEXT {2}\r\n\x1b$")


@pytest.mark.parametrize("charset", ["PUNYCODE", "idna", "rot13", "base64_codec", "zlib", "X-BOGUS", "UTF-8\x00"])
def test_bad_charset(charset: str) -> None:
    with pytest.raises(search.BadCharset) as caught:
        search.parse_search([protocol.Atom("CHARSET"), protocol.String(charset.encode()), protocol.Atom("ALL")])
    assert caught.value.supported == mime.TEXT_CHARSETS
    assert caught.value.supported[:2] == ("US-ASCII", "UTF-8")
    assert isinstance(caught.value, ProtocolError)
    assert caught.value.message == f"unsupported charset {charset}"


# -- malformed and hostile ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "BOGUS",
        "FROM",
        "HEADER",
        "HEADER Subject",
        'HEADER "" x',
        'HEADER "Sub ject" x',
        'HEADER "Subject:" x',
        "HEADER (x) y",
        "KEYWORD",
        "KEYWORD \\Seen",
        "KEYWORD (x)",
        'KEYWORD "x"',
        "KEYWORD a%b",
        "LARGER",
        "LARGER x",
        "LARGER -1",
        "LARGER 4294967296",
        "SMALLER 99999999999999999999999999999",
        "BEFORE",
        "BEFORE 1-Foo-1994",
        "BEFORE 1994-02-01",
        "SENTON 30-Feb-1994",
        "UID",
        "UID x",
        "UID 0",
        'UID "1"',
        "0",
        "1:x",
        "1,,2",
        "$$",
        "1:$",
        "UID 1,$",
        "NOT",
        "OR SEEN",
        "OR",
        "()",
        "(SEEN) ()",
        '"SEEN"',
        "MODSEQ",
        "MODSEQ x",
        "MODSEQ 9223372036854775808",
        'MODSEQ "/flags/x" 1',
        'MODSEQ "/flags/x" bogus 1',
        'MODSEQ "/other/x" all 1',
        'MODSEQ "/flags/x" all',
        "CHARSET",
        "CHARSET UTF-8",
        "ALL CHARSET UTF-8",
        "RETURN (MIN) ALL",
    ],
)
def test_malformed_searches(query: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        keys(query)
    assert not isinstance(caught.value, search.BadCharset)


def test_saved_result_is_a_uid_set() -> None:
    """RFC 5182 SEARCHRES: `$`, alone or after UID, stands for the UIDs saved; none saved, it matches nothing."""
    saved = search.parse_search([protocol.Atom("$")], saved=[3, 4, 9])
    assert saved == search.Uid(protocol.parse_sequence_set("3:4,9"))
    assert search.parse_search([protocol.Atom("UID"), protocol.Atom("$")], saved=[2]) == search.Uid(
        protocol.parse_sequence_set("2")
    )
    assert search.parse_search([protocol.Atom("$")]) == search.Not(search.All())


def test_empty_search() -> None:
    with pytest.raises(ProtocolError, match="missing search criteria"):
        search.parse_search([])


def test_depth_limit() -> None:
    deepest = search.MAX_DEPTH - 1
    assert search.evaluate(keys("NOT " * deepest + "ALL"), Message()) is (deepest % 2 == 0)
    assert search.evaluate(keys("OR " * deepest + "SEEN " * (deepest + 1)), Message()) is False
    for query in ("NOT " * search.MAX_DEPTH + "ALL", "NOT " * 10_000 + "ALL", "OR " * 5000 + "ALL " * 5001):
        with pytest.raises(ProtocolError, match="nested too deeply"):
            keys(query)
    with pytest.raises(ProtocolError, match="nested too deeply"):
        keys("(" * 64 + "ALL" + ")" * 64)


def test_long_flat_searches_are_fine() -> None:
    query = " ".join(["UNSEEN"] * 20_000)
    assert search.evaluate(keys(query), Message())


# -- what a search needs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "content", "body"),
    [
        ("ALL", False, False),
        ("SEEN UNDELETED KEYWORD x NEW OLD", False, False),
        ("UID 1:* 2:4 LARGER 10 SMALLER 20 MODSEQ 3", False, False),
        ("BEFORE 1-Feb-1994 ON 1-Feb-1994 SINCE 1-Feb-1994", False, False),
        ("SENTON 1-Feb-1994", True, False),
        ("FROM x", True, False),
        ('HEADER X-Y ""', True, False),
        ("NOT (SEEN OR ALL SUBJECT x)", True, False),
        ("BODY x", True, True),
        ("OR SEEN TEXT x", True, True),
    ],
)
def test_needs_content(query: str, content: bool, body: bool) -> None:
    assert search.needs_content(keys(query)) is content
    assert search.needs_body(keys(query)) is body


def test_cheap_keys_decide_before_content_is_read() -> None:
    message = Message()
    assert not search.evaluate(keys("FROM gray SEEN BODY summary"), message)
    assert message.reads == 0
    assert search.evaluate(keys("FROM gray UNSEEN BODY summary"), message)
    assert message.reads == 2


def test_content_is_read_once_per_evaluation() -> None:
    message = Message()
    assert search.evaluate(keys('BODY summary BODY meeting TEXT "straße" OR FROM x FROM gray'), message)
    assert message.reads == 3  # the body, the header section and From, each once


def test_and_keeps_the_clients_order() -> None:
    tree = keys("FROM x SEEN")
    assert isinstance(tree, And)
    assert tree.keys == (Header("From", "x"), Flag("\\Seen"))
    assert tree == And((Header("From", "x"), Flag("\\Seen")))


# -- arbitrary criteria ---------------------------------------------------------------------------------

VOCABULARY = (
    'ALL SEEN NOT OR ( ) FROM HEADER KEYWORD LARGER UID MODSEQ CHARSET UTF-8 1:* * 5 0 x "" 1-Feb-1994 '
    "BEFORE SENTON TEXT BODY NEW \\Seen $ {1} all"
)
WORDS = st.sampled_from(VOCABULARY.split())


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(WORDS, max_size=12))
def test_arbitrary_criteria_parse_or_fail_cleanly(words: list[str]) -> None:
    line = ("a SEARCH " + " ".join(words)).encode()
    parts = [line]
    if line.endswith(b"{1}"):
        parts += [b"x", b""]
    try:
        tree = search.parse_search(protocol.parse_command(parts).args)
    except ProtocolError:
        return
    result = search.evaluate(tree, Message())
    assert search.evaluate(Not(tree), Message()) is not result
    assert isinstance(search.needs_content(tree), bool)


@given(st.lists(st.sampled_from(["SEEN", "FLAGGED", "DRAFT", "ALL"]), min_size=2, max_size=2), st.booleans())
def test_or_and_not_follow_boolean_logic(pair: list[str], seen: bool) -> None:
    message = Message(flags=frozenset({"\\Seen"} if seen else set()))
    left, right = (matches(word, message) for word in pair)
    assert matches(f"OR {pair[0]} {pair[1]}", message) is (left or right)
    assert matches(f"{pair[0]} {pair[1]}", message) is (left and right)
    assert matches(f"NOT ({pair[0]} {pair[1]})", message) is not (left and right)
