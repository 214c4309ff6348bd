"""SMTP fuzzing at the socket: hypothesis plays sessions against one live node (the MX listener and
the plain submission port): commands from the SMTP verbs with valid, broken and random arguments, DATA
bodies with odd line ends, dot-stuffing and missing terminators, pipelined bursts, over-long lines, NUL
and 8-bit bytes, BDAT literals and abrupt disconnects. After each session the node must have answered
with well-formed replies, closed its side when the client did, written no error or traceback to its log,
and still greet a fresh connection with 220, deliver a valid transaction and answer /healthz.
MAILFLEET_FUZZ_EXAMPLES sets the number of sessions (100 by default)."""

from __future__ import annotations

import itertools
import re
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.node import fuzz
from tests.node.conftest import RunningNode, mailbox, write_node_files

_REPLY_LINE = re.compile(rb"^[2-5]\d\d[ -]")


@pytest.fixture(scope="module")
def live_node(tmp_path_factory: pytest.TempPathFactory, tls_files: tuple[Path, Path]) -> Iterator[RunningNode]:
    files = write_node_files(
        tmp_path_factory.mktemp("fuzz"),
        mailboxes=[mailbox("user@example.com"), mailbox("small@example.com", quota=2000)],
        tls=tls_files,
        smtp={"max_message_size": 64 * 1024, "max_recipients": 5},
    )
    node = RunningNode(files)
    yield node
    node.stop()


# -- what a session is made of ----------------------------------------------------------------------

PATHS = st.sampled_from(
    [
        b"<alice@remote.test>",
        b"<user@example.com>",
        b"<small@example.com>",
        b"<nobody@example.com>",
        b"<>",
        b"<postmaster>",
        b"<unterminated@example.net",
        b"<a\x00b@remote.test>",
        "<zoë@remote.test>".encode(),
        b"<zo\xeb@remote.test>",
        b"<@route.test:user@example.com>",
        b'<"q u"@remote.test>',
        b"user@example.com",
        b"<<a@b.test>>",
        b"",
    ]
) | st.binary(max_size=30)
PARAMETERS = st.sampled_from(
    [b"", b" SIZE=100", b" SIZE=abc", b" SIZE=99999999999", b" BODY=8BITMIME", b" SMTPUTF8", b" BODY=X", b" FOO=1"]
)
LINE_ENDS = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b""])
VERBS = st.sampled_from(
    [b"NOOP", b"RSET", b"VRFY", b"EXPN", b"HELP", b"QUIT", b"STARTTLS", b"AUTH", b"BDAT", b"DATA", b"TURN", b"X"]
)


@st.composite
def commands(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["hello", "mail", "rcpt", "verb", "anything"]))
    if kind == "hello":
        names = st.sampled_from([b"client.remote.test", b"", b"[127.0.0.1]", b"h\x00st", b"h\xc3\xb6st"])
        command = draw(st.sampled_from([b"EHLO", b"HELO", b"ehlo"])) + b" " + draw(names | st.binary(max_size=20))
    elif kind == "mail":
        command = b"MAIL FROM:" + draw(PATHS) + draw(PARAMETERS)
    elif kind == "rcpt":
        command = b"RCPT TO:" + draw(PATHS) + draw(PARAMETERS)
    elif kind == "verb":
        arguments = st.sampled_from([b"", b" ", b" PLAIN", b" 10 LAST", b" x"]) | st.binary(max_size=20)
        command = draw(VERBS) + draw(arguments)
    else:
        command = draw(st.binary(max_size=60))
    return command + draw(LINE_ENDS)


@st.composite
def data_bodies(draw: st.DrawFn) -> bytes:
    pieces = draw(
        st.lists(
            st.sampled_from([b"Subject: fuzz", b"", b".", b"..", b".leading dot", b"\x00nul", b"\xff8bit", b"x" * 1200])
            | st.binary(max_size=40),
            max_size=8,
        )
    )
    ends = [draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r", b"\r\r\n"])) for _ in pieces]
    body = b"".join(piece + end for piece, end in zip(pieces, ends, strict=True))
    terminator = draw(st.sampled_from([b"\r\n.\r\n", b".\r\n", b"\n.\n", b""]))
    return b"DATA\r\n" + body + terminator


@st.composite
def steps(draw: st.DrawFn) -> fuzz.Step:
    kind = draw(st.sampled_from(["command", "command", "burst", "data", "transaction", "long", "bdat"]))
    if kind == "command":
        return fuzz.Send(draw(commands()))
    if kind == "burst":  # RFC 2920 pipelining, and whatever else arrives in one segment
        return fuzz.Send(b"".join(draw(st.lists(commands(), min_size=2, max_size=6))))
    if kind == "data":
        return fuzz.Send(draw(data_bodies()))
    if kind == "transaction":  # a valid envelope, so that DATA is reached
        recipients = draw(st.lists(st.sampled_from([b"user@example.com", b"small@example.com"]), max_size=3))
        envelope = b"MAIL FROM:<alice@remote.test>\r\n" + b"".join(b"RCPT TO:<%s>\r\n" % r for r in recipients)
        return fuzz.Send(envelope + draw(data_bodies()))
    if kind == "long":  # RFC 5321 §4.5.3.1.4: 512 octets a command line; the node allows 1000
        return fuzz.Send(b"NOOP " + b"y" * draw(st.sampled_from([995, 996, 1200, 5000, 70000])) + b"\r\n")
    size = draw(st.integers(0, 40))  # RFC 3030 BDAT: not offered, so its literal is read as commands
    return fuzz.Send(b"BDAT %d LAST\r\n" % size + draw(st.binary(min_size=size, max_size=size)))


sessions = st.tuples(
    st.sampled_from(["smtp", "submission"]),
    st.lists(steps(), min_size=1, max_size=10),
    st.booleans(),  # end with an abrupt reset instead of a half-close
)


# -- the property -----------------------------------------------------------------------------------


_checks = itertools.count()


def node_is_well(node: RunningNode) -> None:
    marker = b"Subject: still here %d" % next(_checks)
    with smtplib.SMTP("127.0.0.1", node.port("smtp"), timeout=20) as client:
        assert client.ehlo("check.remote.test")[0] == 250  # smtplib read the 220 greeting before it
        assert client.mail("alice@remote.test")[0] == 250
        assert client.rcpt("user@example.com")[0] == 250
        code, text = client.data(marker + b"\r\n\r\nHi.\r\n")
        assert (code, text[:20]) == (250, b"2.0.0 Ok: stored as "), text
    # A session that ended with a reset may still be delivering: the check's own message is looked for.
    assert any(marker in message for message in node.files.stored("user@example.com"))
    assert node.http_get("/healthz")[0] == 200


@pytest.fixture(scope="module")
def errors() -> Iterator[fuzz.ErrorLog]:
    with fuzz.ErrorLog() as log:
        yield log


@settings(
    max_examples=fuzz.examples(),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(session=sessions)
def test_the_node_survives_any_smtp_session(
    live_node: RunningNode, errors: fuzz.ErrorLog, session: tuple[str, list[fuzz.Step], bool]
) -> None:
    listener, played, reset = session
    transcript = fuzz.run_session(live_node.port(listener), [*played, *([fuzz.Reset()] if reset else [])])
    lines = transcript.lines()
    if not transcript.reset or lines:
        assert lines and lines[0].startswith(b"220 "), transcript.received[:200]
    for line in lines:
        assert _REPLY_LINE.match(line), line  # a reply code on every line
        assert b"Error: (" not in line, line  # aiosmtpd's answer to an exception in a command
        line.decode()  # UTF-8, whatever the client sent
    assert transcript.reset or transcript.closed_by_node, "the node kept a half-closed session open"
    node_is_well(live_node)  # first, which also leaves time for whatever a reset session set off
    assert errors.take() == []
