"""mailnode.imap.sort (RFC 5256): base subjects, SORT's order and both THREAD algorithms on small mailboxes
whose answers are worked out by hand from the RFC; the Dovecot differential test
(tests/node/test_imap_dovecot.py) compares the same code with Dovecot on its corpus."""

from __future__ import annotations

import pytest

from mailnode.imap import protocol, sort


@pytest.mark.parametrize(
    ("subject", "base", "reply"),
    [
        ("Project plan", "PROJECT PLAN", False),
        ("Re: Project plan", "PROJECT PLAN", True),
        ("RE: re: Fwd: Project  plan", "PROJECT PLAN", True),
        ("[list] Re: [list] Weekly report", "WEEKLY REPORT", True),
        ("[list] Weekly report", "WEEKLY REPORT", False),
        ("weekly report (fwd)", "WEEKLY REPORT", True),
        ("[fwd: Lunch?]", "LUNCH?", True),
        ("[only a blob]", "[ONLY A BLOB]", False),  # step 4: a blob that is the whole subject stays
        ("Re:", "", True),
        ("  Café  ", "CAFé", False),  # i;ascii-casemap: only a-z change case
    ],
)
def test_base_subject(subject: str, base: str, reply: bool) -> None:
    assert sort.base_subject(subject) == (base, reply)


def message(seq: int, subject: str = "s", *, sent: float | None = None, message_id: str | None = None,
            references: tuple[str, ...] = (), frm: str = "", size: int = 100) -> sort.Fields:  # fmt: skip
    base, reply = sort.base_subject(subject)
    return sort.Fields(
        seq=seq, uid=seq * 10, size=size, arrival=1000.0 - seq, sent=sent if sent is not None else float(seq),
        subject=base, reply=reply, from_=frm, to="", cc="", message_id=message_id, references=references,
    )  # fmt: skip


def test_fields_read_the_headers() -> None:
    headers = {
        "Subject": "Re: [x] hello",
        "Date": "Mon, 03 Mar 2025 10:00:00 +0100",
        "From": "Team: a@example.org, b@example.org;",
        "To": '"Doe, John" <john@example.org>',
        "In-Reply-To": "<p@x> <q@x>",
        "Message-ID": "<m@x>",
    }
    fields = sort.fields(seq=1, uid=7, size=5, arrival=42.0, header=headers.get)
    assert (fields.subject, fields.reply, fields.from_, fields.to, fields.cc) == ("HELLO", True, "TEAM", "JOHN", "")
    assert fields.sent == 1740992400.0
    assert (fields.message_id, fields.references) == ("m@x", ("p@x",))  # In-Reply-To's first, without References
    undated = sort.fields(seq=1, uid=7, size=5, arrival=42.0, header={"Date": "yesterday"}.get)
    assert undated.sent == 42.0  # RFC 5256 §2.2: the internal date


def test_sort_criteria_reverse_each_key_and_break_ties_by_sequence() -> None:
    messages = [message(1, frm="B", size=5), message(2, frm="A", size=5), message(3, frm="B", size=9)]
    assert [m.seq for m in sort.sort(messages, [("FROM", False), ("SIZE", True)])] == [2, 3, 1]
    assert [m.seq for m in sort.sort(messages, [("SIZE", False)])] == [1, 2, 3]
    assert [m.seq for m in sort.sort(messages, [("ARRIVAL", False)])] == [3, 2, 1]
    request = sort.parse_sort([protocol.ParenList([protocol.Atom("REVERSE"), protocol.Atom("date")]),
                               protocol.Atom("UTF-8"), protocol.Atom("ALL")])  # fmt: skip
    assert request.criteria == (("DATE", True),)
    with pytest.raises(protocol.ProtocolError):
        sort.parse_sort([protocol.ParenList([protocol.Atom("REVERSE")]), protocol.Atom("UTF-8"), protocol.Atom("ALL")])


def test_orderedsubject() -> None:
    messages = [message(1, "b", sent=5), message(2, "Re: a", sent=3), message(3, "a", sent=1),
                message(4, "Re: b", sent=6), message(5, "re: a", sent=2)]  # fmt: skip
    roots = sort.thread_orderedsubject(messages)
    assert sort.format_threads(roots, uid=False) == "(3 (5)(2))(1 4)"


def test_references_links_replies_dummies_and_subjects() -> None:
    messages = [
        message(1, "Plan", message_id="a1"),
        message(2, "Re: Plan", message_id="a2", references=("a1",)),
        message(3, "Re: Plan", message_id="a3", references=("a1", "a2")),
        message(4, "Re: Plan", message_id="a4", references=("a1",)),
        message(5, "Re: Lost", message_id="b1", references=("b0",)),
        message(6, "Re: Lost", message_id="b2", references=("b0",)),
        message(7, "Fwd: Plan", message_id="a5"),  # no references: joins by subject, as a reply
        message(8, "Loop", message_id="f1", references=("f2",)),
        message(9, "Loop", message_id="f2", references=("f1",)),
    ]
    roots = sort.thread_references(messages)
    assert sort.format_threads(roots, uid=False) == "(1 (2 3)(4)(7))((5)(6))(9 8)"
    assert sort.format_threads(roots, uid=True) == "(10 (20 30)(40)(70))((50)(60))(90 80)"


def test_a_long_chain_of_replies_needs_no_recursion() -> None:
    count = 20_000
    messages = [
        message(n, "Re: x", message_id=f"m{n}", references=(f"m{n - 1}",) if n > 1 else ()) for n in range(1, count + 1)
    ]
    text = sort.format_threads(sort.thread_references(messages), uid=False)
    assert text == "(" + " ".join(str(n) for n in range(1, count + 1)) + ")"
