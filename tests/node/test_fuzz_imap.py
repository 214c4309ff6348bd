"""IMAP fuzzing at the socket: hypothesis plays sessions against one live node, logged in or not, with
a folder selected or not: commands drawn from mailnode.imap.commands.TABLE (and names that are not
in it) with valid, broken and random arguments (sequence sets, mailbox names, flag lists, FETCH items,
SEARCH keys, quoted strings with escapes), literals {n} and {n+} (RFC 7888) of the declared size or
not, pipelined bursts, over-long lines, NUL and 8-bit bytes, and abrupt disconnects (TCP RST). After
each session the node must have greeted it, answered with well-formed status lines (7-bit text, RFC
3501 §9), closed its side when the client did, written no error or traceback to its log, and still
greet a fresh connection, log in, SELECT INBOX, FETCH, and answer /healthz.
MAILFLEET_FUZZ_EXAMPLES sets the number of sessions (100 by default).

The runner, the error log and the number of examples are tests/node/fuzz.py's; a step with a tag waits
for that command's answer, as a lock-step IMAP client does."""

from __future__ import annotations

import contextlib
import imaplib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailnode.imap import commands
from tests.node import fuzz
from tests.node.conftest import PASSWORD, RunningNode, mailbox, write_node_files

USER = "user@example.com"
CORPUS = Path(__file__).parent.parent / "corpus"


@pytest.fixture(scope="module")
def live_node(tmp_path_factory: pytest.TempPathFactory, tls_files: tuple[Path, Path]) -> Iterator[RunningNode]:
    files = write_node_files(
        tmp_path_factory.mktemp("fuzz-imap"),
        mailboxes=[mailbox(USER), mailbox("small@example.com", quota=2000)],
        tls=tls_files,
        imap={"allow_plaintext_login": True, "max_line": 8192, "max_literal": 64 * 1024},
    )
    node = RunningNode(files)
    yield node
    node.stop()


_LITERAL_END = re.compile(rb"\{(\d+)\+?\}$")


def response_lines(received: bytes) -> list[bytes]:
    """The first line of each response the node sent, literals (and the lines they continue) skipped."""
    lines = []
    pos = 0
    while (end := received.find(b"\r\n", pos)) >= 0:
        line = received[pos:end]
        lines.append(line)
        pos = end + 2
        while (literal := _LITERAL_END.search(line)) and pos < len(received):
            pos += int(literal[1])
            end = received.find(b"\r\n", pos)
            if end < 0:
                return lines
            line = received[pos:end]
            pos = end + 2
    return lines


@pytest.fixture(scope="module")
def errors() -> Iterator[fuzz.ErrorLog]:
    with fuzz.ErrorLog() as log:
        yield log


# -- what a session is made of ----------------------------------------------------------------------

NAMES = sorted(name.encode() for name in commands.TABLE.by_name)
OTHER_NAMES = [b"UID", b"UID BOGUS", b"UID NOOP", b"X-FUZZ", b"", b"DONE", b"*", b"noop", b"uid fetch", b"Select"]
SEQUENCES = [b"1", b"2:4", b"1:*", b"*", b"*:1", b"0", b"1,3,5", b"4294967295", b"4294967296", b"1:", b":", b","]
MAILBOXES = [
    b"INBOX", b"inbox", b"Archive", b"Sent", b"Trash", b"Fuzz", b"Fuzz/Deep", b'"a b"', b'""', b'"\\\\"', b"NIL",
    b"&AOk-t&AOk-", b"&-", b"&bogus", b"a%b*", b"Fuzz/", b"/", b"INBOX/child", b'"\\"x"',
]  # fmt: skip
FLAGS = [b"(\\Seen)", b"(\\Deleted)", b"(\\Seen \\Flagged $Label)", b"()", b"(\\Bogus)", b"(\\Recent)", b"\\Seen",
         b"(\\\\)", b"((nested))", b"(\\*)", b"($" + b"k" * 300 + b")"]  # fmt: skip
FETCH_ITEMS = [
    b"FLAGS", b"(FLAGS UID)", b"ALL", b"FAST", b"FULL", b"ENVELOPE", b"BODYSTRUCTURE", b"BODY", b"RFC822",
    b"RFC822.HEADER", b"RFC822.TEXT", b"RFC822.SIZE", b"INTERNALDATE", b"BODY[]", b"BODY.PEEK[]", b"BODY[HEADER]",
    b"BODY[TEXT]", b"BODY[1]", b"BODY[1.2.3]", b"BODY[2.MIME]", b"BODY[HEADER.FIELDS (From Subject)]",
    b"BODY[HEADER.FIELDS.NOT (To)]", b"BODY[]<0.10>", b"BODY[]<10.0>", b"BODY[]<4294967295.4294967295>",
    b"BODY[0]", b"BODY[1.0]", b"BODY[MIME]", b"BINARY[1]", b"MODSEQ", b"(CHANGEDSINCE 1)", b"(CHANGEDSINCE 0)",
    b"BODY[HEADER.FIELDS ()]", b"BODY[HEADER.FIELDS (]", b"BODY[", b"(UID", b"UID)", b"(BODY[1]<0.5> UID X)",
]  # fmt: skip
SEARCH_KEYS = [
    b"ALL", b"TEXT", b"BODY", b"SUBJECT", b"FROM", b"HEADER", b"X-Foo", b"OR", b"NOT", b"(", b")", b"CHARSET",
    b"UTF-8", b"ISO-8859-1", b"UTF-16", b"PUNYCODE", b"SINCE", b"1-Feb-1994", b"31-Feb-2024", b"1-Foo-1994",
    b"LARGER", b"SMALLER", b"100", b"UID", b"MODSEQ", b'"/flags/\\\\seen"', b"all", b"KEYWORD", b"$x", b"NEW",
    b"OLD", b"RECENT", b"SENTON", b"ON", b"BEFORE", b"UNSEEN", b"DELETED", b"-1", b"99999999999999999999",
]  # fmt: skip
OTHER_ARGS = [
    b"+FLAGS", b"-FLAGS", b"FLAGS", b"+FLAGS.SILENT", b"FLAGS.SILENT", b"(UNCHANGEDSINCE 3)", b"(UNCHANGEDSINCE 0)",
    b"(MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN HIGHESTMODSEQ)", b"(BOGUS)", b"()", b'""', b'"*"', b'"%"',
    b'"INBOX*"', b"(SUBSCRIBED)", b"(SPECIAL-USE)", b"RETURN", b"(CHILDREN)", b"(SPECIAL-USE SUBSCRIBED)",
    b"(REMOTE)", b"(STORAGE 10)", b"(STORAGE 99999999999999999)", b"(MESSAGE 5)", b"ROOT", b"CONDSTORE",
    b"QRESYNC", b"UTF8=ACCEPT", b'("name" "fuzz" "version" "1")', b'("name")', b'(("a"))', b"PLAIN", b"LOGIN",
    b"AHVzZXJAZXhhbXBsZS5jb20AY29ycmVjdCBob3JzZSBiYXR0ZXJ5IHN0YXBsZQ==", b"=", b"user@example.com",
    b'"correct horse battery staple"', b'"17-Jul-1996 02:44:25 -0700"', b'"31-Feb-1996 99:99:99 +9999"', b"NIL",
    b"(", b")", b"[", b"]", b"{", b"}", b"\\", b'"', b'"unterminated', b'"esc\\"aped"', b'"8bit \xc3\xa9"',
    b'"nul\x00"', b"\x00", b"\xff\xfe", b"~{", b"{1}", b"{-1}", b"{99999999999}", b"{4294967296+}",
]  # fmt: skip
ATOMS = SEQUENCES + MAILBOXES + FLAGS + FETCH_ITEMS + SEARCH_KEYS + OTHER_ARGS
MESSAGE = b"From: a@remote.test\r\nSubject: fuzz\r\nContent-Type: text/plain; charset=punycode\r\n\r\nbbbb\r\n"
# Well-formed commands, so that the deep paths are reached.
VALID = [
    b"SELECT INBOX", b"EXAMINE INBOX (CONDSTORE)", b"FETCH 1:* (FLAGS BODYSTRUCTURE ENVELOPE)",
    b"UID FETCH 1:* (BODY.PEEK[1] BODY[HEADER.FIELDS (Subject)])", b"SEARCH TEXT bbbb", b"UID SEARCH OR SEEN NEW",
    b"SEARCH CHARSET UTF-8 BODY fuzz", b"STORE 1 +FLAGS (\\Seen $Fuzz)", b"UID STORE 1:* -FLAGS (\\Deleted)",
    b"COPY 1 Fuzz", b"UID MOVE 2 Fuzz", b"EXPUNGE", b"UID EXPUNGE 3", b"CREATE Fuzz/Deep", b"RENAME Fuzz Fuzz2",
    b"DELETE Fuzz2", b'LIST "" "*"', b'LSUB "" "*"', b"STATUS INBOX (MESSAGES UNSEEN UIDNEXT)", b"SUBSCRIBE Fuzz",
    b"GETQUOTAROOT INBOX", b'GETQUOTA ""', b"ENABLE CONDSTORE", b"NAMESPACE", b"ID NIL", b"CHECK", b"CLOSE",
    b"UNSELECT", b"NOOP", b"CAPABILITY", b"IDLE\r\nDONE", b"APPEND Fuzz (\\Seen) {%d+}\r\n" % len(MESSAGE) + MESSAGE,
    b"LOGIN user@example.com \"correct horse battery staple\"",
    b"AUTHENTICATE PLAIN AHVzZXJAZXhhbXBsZS5jb20AY29ycmVjdCBob3JzZSBiYXR0ZXJ5IHN0YXBsZQ==",
]  # fmt: skip


@st.composite
def literals(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A literal {n} or {n+} (RFC 7888); (bytes, whether its declared size is its real one)."""
    content = draw(st.sampled_from([b"", b"INBOX", b"x\r\ny", MESSAGE, b"\x00\xff"]) | st.binary(max_size=40))
    size = len(content)
    honest = draw(st.integers(0, 5)) > 0
    if not honest:
        size = draw(st.sampled_from([size + 1, size + 100, max(size - 1, 0), 70_000, 10**12]))
    plus = b"+" if draw(st.booleans()) else b""
    return b"{%d%s}\r\n" % (size, plus) + content, honest


@st.composite
def commands_(draw: st.DrawFn) -> tuple[bytes, bytes, bool]:
    """One command line (with its literals): (bytes, tag, whether it is complete and honest)."""
    tag = draw(st.sampled_from([b"a1", b"T2", b"x.y", b"*", b"+", b"", b"a(b", b'"q"', b"t\xff", b"t\x00"]))
    honest = tag in (b"a1", b"T2", b"x.y")  # a tag the node can answer with (the others get "* BAD")
    kind = draw(st.sampled_from(["valid", "table", "table", "other", "noise"]))
    if kind == "valid":
        return tag + b" " + draw(st.sampled_from(VALID)) + b"\r\n", tag, honest
    if kind == "noise":
        return draw(st.binary(max_size=80)) + b"\r\n", tag, False
    name = draw(st.sampled_from(NAMES if kind == "table" else OTHER_NAMES))
    pieces = [tag, name]
    for _ in range(draw(st.integers(0, 6))):
        choice = draw(st.integers(0, 9))
        if choice < 6:
            pieces.append(draw(st.sampled_from(ATOMS)))
        elif choice < 8:
            text = draw(st.text(max_size=12)).encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"')
            pieces.append(b'"' + text.replace(b"\r", b"").replace(b"\n", b"") + b'"')
        elif choice == 8:
            literal, fair = draw(literals())
            pieces.append(literal)
            honest = honest and fair
        else:
            pieces.append(draw(st.binary(max_size=12)).replace(b"\n", b""))
    separator = draw(st.sampled_from([b" ", b" ", b" ", b"  ", b""]))
    honest = honest and separator != b""  # the tag and the name run together: "* BAD"
    end = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"]))
    return separator.join(pieces) + end, tag, honest


@st.composite
def steps(draw: st.DrawFn) -> fuzz.Step:
    kind = draw(st.sampled_from(["command", "command", "command", "burst", "long", "bare-cr"]))
    if kind == "command":
        data, tag, honest = draw(commands_())
        return fuzz.Send(data, tag if honest else None)
    if kind == "burst":  # pipelining: the node answers in order, whatever arrives in one segment
        return fuzz.Send(b"".join(command for command, _, _ in draw(st.lists(commands_(), min_size=2, max_size=6))))
    if kind == "long":  # past max_line (8192 here): BYE, the line cannot be read
        length = draw(st.sampled_from([8000, 8200, 70_000]))
        return fuzz.Send(b"L1 NOOP " + b"y" * length + b"\r\n", b"L1")
    return fuzz.Send(b"C1 NOOP\rC2 NOOP\r\n")


LOGIN = fuzz.Send(b'P1 LOGIN user@example.com "correct horse battery staple"\r\n', b"P1")
SELECT = fuzz.Send(b"P2 SELECT INBOX\r\n", b"P2")
PREFIXES: dict[str, list[fuzz.Step]] = {"not authenticated": [], "authenticated": [LOGIN], "selected": [LOGIN, SELECT]}
ENDINGS: dict[str, list[fuzz.Step]] = {
    "half-close": [],
    "logout": [fuzz.Send(b"Z1 LOGOUT\r\n", b"Z1")],
    "reset": [fuzz.Reset()],
}
sessions = st.tuples(
    st.sampled_from(sorted(PREFIXES)),
    st.lists(steps(), min_size=1, max_size=8),
    st.sampled_from(["half-close", "half-close", "logout", "reset"]),
)


# -- the property -----------------------------------------------------------------------------------

_STATUS = re.compile(rb"^(\S+) (OK|NO|BAD|BYE|PREAUTH)\b")
_RESPONSE = re.compile(rb"^(\* |\+ |\+$|\S+ (OK|NO|BAD)\b)")


def node_is_well(node: RunningNode) -> None:
    client = imaplib.IMAP4("127.0.0.1", node.port("imap"), timeout=20)  # reads the greeting
    try:
        assert client.welcome.startswith(b"* OK ")
        client.login(USER, PASSWORD)
        typ, selected = client.select("INBOX")
        assert typ == "OK", selected
        if int(selected[0] or 0) < 3:  # the fuzzer may have expunged or moved them
            assert client.append("INBOX", None, None, (CORPUS / "nested.eml").read_bytes())[0] == "OK"
            client.select("INBOX")
        typ, fetched = client.fetch("1:*", "(UID FLAGS BODYSTRUCTURE)")
        assert typ == "OK" and fetched[0] is not None, fetched
    finally:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            client.logout()
    assert node.http_get("/healthz")[0] == 200


@settings(
    max_examples=fuzz.examples(),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(session=sessions)
def test_the_node_survives_any_imap_session(
    live_node: RunningNode, errors: fuzz.ErrorLog, session: tuple[str, list[fuzz.Step], str]
) -> None:
    state, played, ending = session
    transcript = fuzz.run_session(live_node.port("imap"), [*PREFIXES[state], *played, *ENDINGS[ending]])
    lines = response_lines(transcript.received)
    if not transcript.reset or lines:
        assert lines and lines[0].startswith(b"* OK "), transcript.received[:200]
    for line in lines:
        assert _RESPONSE.match(line), line
        if _STATUS.match(line):
            # RFC 3501 §9: resp-text is TEXT-CHAR, 7-bit without CR, LF or NUL.
            assert all(0x20 <= byte <= 0x7E for byte in line), line
    assert transcript.reset or transcript.closed_by_node, "the node kept a half-closed session open"
    node_is_well(live_node)
    assert errors.take() == []


def test_the_runner_sees_a_well_session(live_node: RunningNode) -> None:
    # The property above holds for what this runner reads: a plain session is greeted, answered in
    # order, literals skipped, and closed by the node after LOGOUT.
    node_is_well(live_node)  # which leaves messages in INBOX
    transcript = fuzz.run_session(
        live_node.port("imap"),
        [LOGIN, SELECT, fuzz.Send(b"F1 FETCH 1 (BODY.PEEK[HEADER])\r\n", b"F1"), fuzz.Send(b"Z1 LOGOUT\r\n", b"Z1")],
    )
    lines = response_lines(transcript.received)
    assert lines[0].startswith(b"* OK ")
    assert any(line.startswith(b"P1 OK") for line in lines)
    assert any(line.startswith(b"* 1 FETCH (BODY[HEADER] {") for line in lines)
    assert lines[-2:] == [b"* BYE Logging out", b"Z1 OK LOGOUT completed"]
    assert transcript.closed_by_node


def test_a_refused_literal_is_answered_with_a_valid_tag(live_node: RunningNode) -> None:
    # Found by the fuzz test: the line's first word was echoed as the tag, empty, 8-bit or NUL.
    sent = [b"t\xff APPEND {70000}\r\n", b" APPEND {70000}\r\n", b"a(b APPEND {70000}\r\n", b"t\x00 APPEND {70000}\r\n"]
    transcript = fuzz.run_session(live_node.port("imap"), [LOGIN, *(fuzz.Send(data) for data in sent)])
    refused = [line for line in response_lines(transcript.received) if b"TOOBIG" in line]
    assert refused == [b"* NO [TOOBIG] Literal too large (limit 65536 bytes)"] * 4


def test_a_missing_folder_is_named_in_7_bit(live_node: RunningNode) -> None:
    transcript = fuzz.run_session(live_node.port("imap"), [LOGIN, fuzz.Send(b"a1 SELECT &AOk-t&AOk-\r\n", b"a1")])
    refused = [line for line in response_lines(transcript.received) if line.startswith(b"a1 ")]
    assert len(refused) == 1 and refused[0].startswith(b"a1 NO [NONEXISTENT] ")
    # Found by the fuzz test: the name came back decoded, "été" in UTF-8, in a status line.
    assert refused[0].isascii() and refused[0].endswith(b" &AOk-t&AOk-"), refused[0]


def test_a_rename_onto_a_name_with_children_is_refused(live_node: RunningNode, errors: fuzz.ErrorLog) -> None:
    # Found by the fuzz test: os.rename raised "Directory not empty", logged with its traceback and
    # answered NO [SERVERBUG] (fixed by RENAME all or nothing, harden-folders).
    errors.take()
    played = [b"CREATE R/Deep", b"CREATE R", b"RENAME R R2", b"DELETE R2", b"CREATE R/Deep", b"RENAME R R2"]
    steps = [LOGIN, *(fuzz.Send(b"r%d %s\r\n" % (n, command), b"r%d" % n) for n, command in enumerate(played))]
    transcript = fuzz.run_session(live_node.port("imap"), [*steps, fuzz.Send(b"Z1 LOGOUT\r\n", b"Z1")])
    answers = [line for line in response_lines(transcript.received) if line.startswith(b"r")]
    assert errors.take() == []
    assert answers[-1].startswith(b"r5 NO ") and b"SERVERBUG" not in answers[-1], answers
