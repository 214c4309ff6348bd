"""mailnode.imap.mime on a corpus of real-world-shaped messages (tests/corpus/*.eml, CRLF):

- ENVELOPE, BODYSTRUCTURE and BODY byte for byte as RFC 3501 §7.4.2 spells them (plain text,
  multipart/alternative, attachments with RFC 2231 names, a forwarded message/rfc822, group syntax and
  quoted display names, encoded words left encoded, 8-bit and long values as literals);
- every BODY[<section>] form of RFC 3501 §6.4.5 on a nested message, and on a single-part one;
- broken MIME read as far as it parses (missing close delimiter, boundary never seen, no boundary
  parameter, garbage parameters, no empty line after the header, header only, empty message);
- SEARCH text: header values with encoded words decoded, bodies with transfer encodings and charsets
  (ISO-8859-1, windows-1252, Shift_JIS, base64, undeclared 8-bit) decoded;
- charsets: only text charsets are decoded (by name or alias); every other codec Python has (punycode,
  rot13, zlib_codec...) is an unknown charset, and a punycode part is read as plain text;
- the JSON cache form round-trips and refuses what it did not write;
- on arbitrary bytes and mutated corpus messages: analysis never fails, offsets nest, and the replies
  parse by the RFC 3501 grammar and agree with the part tree; nesting and part counts are bounded.
"""

from __future__ import annotations

import base64
import codecs
import encodings
import encodings.aliases
import encodings.punycode
import pkgutil
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailnode.imap import mime

CORPUS = Path(__file__).parent.parent / "corpus"
CORPUS_NAMES = sorted(p.name for p in CORPUS.glob("*.eml"))


def corpus(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def between(data: bytes, before: bytes, after: bytes) -> bytes:
    """The bytes after the only occurrence of `before` up to the following `after`."""
    start = data.index(before) + len(before)
    return data[start : data.index(after, start)]


def test_corpus_is_crlf_throughout() -> None:
    assert len(CORPUS_NAMES) >= 19
    for name in CORPUS_NAMES:
        data = corpus(name)
        assert data.count(b"\n") == data.count(b"\r\n"), name


# --- ENVELOPE and BODYSTRUCTURE, byte for byte ---

ALICE = b'(("Alice Example" NIL "alice" "example.org"))'
BOB = b'(("Bob" NIL "bob" "example.com"))'


def test_plain_text_message() -> None:
    analysis = mime.analyze(corpus("plain.eml"))
    assert analysis.envelope == (
        b'("Tue, 4 Jun 2024 11:12:40 +0200" "Lunch on Friday?" '
        + ALICE + b" " + ALICE + b" " + ALICE + b" " + BOB  # sender and reply-to default to from
        + b' NIL NIL NIL "<20240604091240.GA1234@example.org>")'
    )  # fmt: skip
    assert analysis.bodystructure == (
        b'("TEXT" "PLAIN" ("CHARSET" "utf-8" "FORMAT" "flowed") NIL NIL "7BIT" 80 5 NIL NIL NIL NIL)'
    )
    assert analysis.body == b'("TEXT" "PLAIN" ("CHARSET" "utf-8" "FORMAT" "flowed") NIL NIL "7BIT" 80 5)'
    assert analysis.root.content_type == "text/plain"
    assert analysis.root.parts == ()


def test_multipart_alternative() -> None:
    analysis = mime.analyze(corpus("alternative.eml"))
    news = b'(("Newsletter" NIL "news" "shop.example"))'
    assert analysis.envelope == (
        b'("Wed, 05 Jun 2024 08:01:02 -0700" "Your June offers" '
        + news + b" " + news + b" " + news
        + b' ((NIL NIL "bob" "example.com")) (("Carol" NIL "carol" "example.com")) NIL'
        + b' "<previous@shop.example>" "<june-offers-42@shop.example>")'
    )  # fmt: skip
    # Children follow each other with no space (body-type-mpart = 1*body SP media-subtype ...); the
    # CRLF before each delimiter is the delimiter's, so each text part is its two lines.
    assert analysis.bodystructure == (
        b'(("TEXT" "PLAIN" ("CHARSET" "UTF-8") NIL NIL "QUOTED-PRINTABLE" 69 2 NIL NIL NIL NIL)'
        b'("TEXT" "HTML" ("CHARSET" "UTF-8") NIL NIL "QUOTED-PRINTABLE" 110 2 NIL NIL NIL NIL)'
        b' "ALTERNATIVE" ("BOUNDARY" "----=_Part_0_1234567.1717599662000") NIL NIL NIL)'
    )
    assert analysis.body == (
        b'(("TEXT" "PLAIN" ("CHARSET" "UTF-8") NIL NIL "QUOTED-PRINTABLE" 69 2)'
        b'("TEXT" "HTML" ("CHARSET" "UTF-8") NIL NIL "QUOTED-PRINTABLE" 110 2) "ALTERNATIVE")'
    )


def test_attachments_with_disposition_and_rfc2231_name() -> None:
    analysis = mime.analyze(corpus("mixed-attachments.eml"))
    assert analysis.bodystructure == (
        b'(("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "BASE64" 98 1 NIL NIL NIL NIL)'
        b'("APPLICATION" "PDF" ("NAME" "invoice-2024-06.pdf") NIL NIL "BASE64" 298 NIL'
        b' ("ATTACHMENT" ("FILENAME" "invoice-2024-06.pdf" "SIZE" "218")) NIL NIL)'
        # RFC 2231 extended value passed on encoded, under its starred name, as Dovecot does
        b'("IMAGE" "PNG" NIL NIL "a red dot" "BASE64" 94 NIL'
        b' ("ATTACHMENT" ("FILENAME*" "utf-8\'\'Gr%C3%BC%C3%9Fe.png")) NIL NIL)'
        b' "MIXED" ("BOUNDARY" "=-mixed-7f3a") NIL NIL NIL)'
    )


def test_forwarded_message_has_envelope_and_structure_of_its_own() -> None:
    data = corpus("forwarded.eml")
    analysis = mime.analyze(data)
    eve = b'(("Eve" NIL "eve" "partner.example"))'
    inner_envelope = (
        b'("Mon, 3 Jun 2024 16:45:00 +0100" "Contract draft" '
        + eve + b" " + eve + b" " + eve + b" " + ALICE
        + b' NIL NIL NIL "<draft-77@partner.example>")'
    )  # fmt: skip
    inner_text = b'("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 36 2'
    inner_bin = b'("APPLICATION" "OCTET-STREAM" ("NAME" "draft.bin") NIL NIL "BASE64" 64'
    assert analysis.bodystructure == (
        b'(("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "7BIT" 12 1 NIL NIL NIL NIL)'
        b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 582 '
        + inner_envelope
        + b" ("
        + inner_text + b" NIL NIL NIL NIL)"
        + inner_bin + b' NIL ("ATTACHMENT" ("FILENAME" "draft.bin")) NIL NIL)'
        + b' "MIXED" ("BOUNDARY" "inner-b") NIL NIL NIL)'
        + b' 21 NIL ("INLINE" NIL) NIL NIL)'
        b' "MIXED" ("BOUNDARY" "outer-b") NIL NIL NIL)'
    )  # fmt: skip
    assert analysis.body == (
        b'(("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "7BIT" 12 1)'
        b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 582 '
        + inner_envelope + b" (" + inner_text + b")" + inner_bin + b') "MIXED") 21) "MIXED")'
    )  # fmt: skip
    forwarded = analysis.root.parts[1]
    assert forwarded.content_type == "message/rfc822"
    [encapsulated] = forwarded.parts
    assert (encapsulated.header_start, encapsulated.end) == (forwarded.body_start, forwarded.end)
    assert data[encapsulated.header_start :].startswith(b"Date: Mon, 3 Jun 2024")
    assert [p.content_type for p in encapsulated.parts] == ["text/plain", "application/octet-stream"]


def test_addresses_groups_and_quoted_display_names() -> None:
    analysis = mime.analyze(corpus("addresses.eml"))
    assert analysis.envelope == (
        b'("Wed, 12 Jun 2024 09:00:00 +0000" "Addresses"'
        b' (("Joe Q. Public" NIL "john.q.public" "example.com"))'
        b' (("Secretary" NIL "secy" "example.com"))'
        b' (("Smith, Jane \\"JJ\\"" NIL "jane" "example.net")("back\\\\slash" NIL "bs" "example.net"))'
        # RFC 3501 §7.4.2: a group opens with a NIL host and the group name as mailbox, and closes with
        # an all-NIL address
        b' ((NIL NIL "A Group" NIL)("Ed Jones" NIL "c" "a.test")(NIL NIL "joe" "where.test")'
        b'("John" NIL "jdoe" "one.test")(NIL NIL NIL NIL)("Mary Smith" NIL "mary" "x.test"))'
        b' ((NIL NIL "Undisclosed recipients" NIL)(NIL NIL NIL NIL))'
        b' (("Giant; \\"Big\\" Box" NIL "sysservices" "example.net")(NIL NIL "odd local" "example.org"))'
        b' NIL "<addr-1@example.com>")'
    )


def test_repeated_address_fields_are_merged_and_a_missing_domain_is_named() -> None:
    """As Dovecot answers: Cc: and CC: both count (the first alone would hide recipients); an address
    without a domain gets MISSING_DOMAIN (a NIL host would mean a group); a repeated Subject, the last."""
    data = (
        b"From: root\r\nTo: MAILER-DAEMON, b@example.org\r\nCc: c1@example.org\r\nSubject: first\r\n"
        b"CC: C2 <c2@example.org>\r\nSubject: last\r\n\r\nbody\r\n"
    )
    assert mime.analyze(data).envelope == (
        b'(NIL "last" ((NIL NIL "root" "MISSING_DOMAIN")) ((NIL NIL "root" "MISSING_DOMAIN"))'
        b' ((NIL NIL "root" "MISSING_DOMAIN")) ((NIL NIL "MAILER-DAEMON" "MISSING_DOMAIN")(NIL NIL "b" "example.org"))'
        b' ((NIL NIL "c1" "example.org")("C2" NIL "c2" "example.org")) NIL NIL NIL)'
    )


@pytest.mark.parametrize("cut", range(1, 12))
def test_line_ends_become_crlf_across_chunks(cut: int) -> None:
    """APPEND stores CRLF line ends (RFC 5322 §2.1), also when a CRLF is split between two chunks."""
    data = b"a\nb\r\nc\r\n\nd\n"
    line_ends = mime.LineEnds()
    assert line_ends.convert(data[:cut]) + line_ends.convert(data[cut:]) == b"a\r\nb\r\nc\r\n\r\nd\r\n"
    assert mime.crlf(data) == b"a\r\nb\r\nc\r\n\r\nd\r\n"
    assert mime.crlf(b"x\r\ny\r\n") == b"x\r\ny\r\n"


def test_encoded_words_stay_encoded_in_the_envelope() -> None:
    analysis = mime.analyze(corpus("encoded-words.eml"))
    andre = b'(("=?ISO-8859-1?Q?Andr=E9?= Pirard" NIL "pirard" "example.be"))'
    assert analysis.envelope == (
        b'("Sat, 8 Jun 2024 12:00:00 +0200"'
        b' "=?UTF-8?Q?Caf=C3=A9_meeting_?= =?UTF-8?B?4oCUIGJyaW5nIHlvdXIg4piV?=" '
        + andre + b" " + andre + b" " + andre
        + b' (("=?iso-8859-1?b?S+RydGUgTfxsbGVy?=" NIL "kaerte" "example.de")'
        + b'("=?UTF-8?Q?Ren=C3=A9e?=" NIL "renee" "example.fr"))'  # the folded To, unfolded
        + b' NIL NIL NIL "<ew-1@example.be>")'
    )  # fmt: skip


def test_8bit_and_long_header_values_are_sent_as_literals() -> None:
    raw_subject = "Grüße — naïve café".encode()
    analysis = mime.analyze(corpus("undeclared-8bit.eml"))
    assert analysis.envelope.startswith(b'("Mon, 10 Jun 2024 11:00:00 +0000" {%d}\r\n' % len(raw_subject) + raw_subject)
    assert analysis.bodystructure == b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 45 1 NIL NIL NIL NIL)'

    data = corpus("long-headers.eml")
    analysis = mime.analyze(data)
    folded = between(data, b"Subject: ", b"\r\nReferences:")
    unfolded = folded.replace(b"\r\n", b"")
    assert b"\r\n " in folded and len(unfolded) > 1000
    literal = b"{%d}\r\n" % len(unfolded) + unfolded
    assert analysis.envelope.startswith(b'("Tue, 11 Jun 2024 13:14:15 +0000" ' + literal + b" ")


# --- Broken MIME ---

PLAIN_DEFAULT = b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT"'


def test_missing_close_delimiter_leaves_the_last_part_running_to_the_end() -> None:
    data = corpus("broken-missing-close.eml")
    analysis = mime.analyze(data)
    assert analysis.bodystructure == (
        b"(" + PLAIN_DEFAULT + b" 10 0 NIL NIL NIL NIL)"
        b'("TEXT" "HTML" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 34 1 NIL NIL NIL NIL)'
        b' "MIXED" ("BOUNDARY" "XX") NIL NIL NIL)'
    )
    assert mime.section(data, analysis, "2") == b"<b>second part, never closed</b>\r\n"
    assert analysis.root.parts[1].end == len(data)


@pytest.mark.parametrize(
    ("name", "bodystructure"),
    [
        # Nameless, valueless and non-token parameters are dropped; the unterminated quote is kept; the
        # bad RFC 2231 escape is escaped (RFC 2231 parameters come after the others); the comment after
        # the transfer encoding goes.
        (
            "broken-garbage-params.eml",
            b'("TEXT" "PLAIN" ("CHARSET" "utf-8" "FORMAT" "\\"flowed" "NAME*" "bogus\'\'%25ZZtail"'
            b') NIL NIL "8BIT" 20 1 NIL NIL NIL NIL)',
        ),
    ],
)
def test_unusable_content_types_fall_back_to_text(name: str, bodystructure: bytes) -> None:
    data = corpus(name)
    analysis = mime.analyze(data)
    assert analysis.bodystructure == bodystructure
    assert analysis.root.parts == ()
    assert mime.section(data, analysis, "1") == mime.section(data, analysis, "TEXT")


@pytest.mark.parametrize(
    ("name", "bodystructure"),
    [
        (
            "broken-boundary-never-appears.eml",
            b"(" + PLAIN_DEFAULT + b' 0 0 NIL NIL NIL NIL) "ALTERNATIVE" ("BOUNDARY" "nowhere") NIL NIL NIL)',
        ),
        ("broken-no-boundary-param.eml", b"(" + PLAIN_DEFAULT + b' 0 0 NIL NIL NIL NIL) "MIXED" NIL NIL NIL NIL)'),
    ],
)
def test_a_multipart_without_parts_has_one_empty_part(name: str, bodystructure: bytes) -> None:
    """RFC 2046 §5.1.1 gives a multipart one part at least; as Dovecot answers, a multipart whose boundary
    never appears (or that has none) has one empty text/plain part, and no parameter of the multipart
    leaks into it."""
    data = corpus(name)
    analysis = mime.analyze(data)
    assert analysis.bodystructure == bodystructure
    assert mime.section(data, analysis, "1") == mime.section(data, analysis, "1.MIME") == b""
    assert mime.section(data, analysis, "2") is None
    assert mime.section(data, analysis, "TEXT") == data[analysis.root.body_start :] != b""


def test_header_without_empty_line_runs_to_the_end_as_dovecot_reads_it() -> None:
    """RFC 5322 §2.1: the body follows the empty line; without one, the message is all header (lines that
    are not fields are passed over), as Dovecot answers."""
    data = corpus("broken-no-blank-line.eml")
    analysis = mime.analyze(data)
    assert mime.section(data, analysis, "HEADER") == data
    assert mime.section(data, analysis, "TEXT") == b""
    assert analysis.bodystructure == PLAIN_DEFAULT + b" 0 0 NIL NIL NIL NIL)"
    assert b'"no empty line after the header"' in analysis.envelope


def test_a_field_folded_without_white_space_hides_no_field_below_it() -> None:
    data = b"Subject: a long subject\r\nfolded badly\r\nFrom: alice@example.org\r\n\r\nbody\r\n"
    analysis = mime.analyze(data)
    assert b'((NIL NIL "alice" "example.org"))' in analysis.envelope
    assert mime.section(data, analysis, "TEXT") == b"body\r\n"


def test_header_only_and_empty_messages() -> None:
    data = corpus("headers-only.eml")
    analysis = mime.analyze(data)
    assert mime.section(data, analysis, "HEADER") == data
    assert mime.section(data, analysis, "TEXT") == b""
    assert analysis.bodystructure == PLAIN_DEFAULT + b" 0 0 NIL NIL NIL NIL)"
    assert analysis.envelope.endswith(b' NIL NIL NIL "<probe@example.com>")')

    empty = mime.analyze(b"")
    assert empty.envelope == b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"
    assert empty.bodystructure == PLAIN_DEFAULT + b" 0 0 NIL NIL NIL NIL)"
    assert empty.body == PLAIN_DEFAULT + b" 0 0)"
    assert empty.root == mime.Part(header_start=0, body_start=0, end=0)
    for spec in ("", "HEADER", "TEXT", "1", "1.MIME"):
        assert mime.section(b"", empty, spec) == b""


def test_a_parser_bug_still_leaves_the_message_readable_as_text(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(mime, "_entity", broken)
    data = corpus("plain.eml")
    analysis = mime.analyze(data)
    assert analysis.bodystructure == PLAIN_DEFAULT + b" %d %d NIL NIL NIL NIL)" % (len(data), data.count(b"\n"))
    assert mime.section(data, analysis, "TEXT") == data
    check_body(read_imap(analysis.body), analysis.root, data, extended=False)


def test_bare_lf_messages_are_split_too() -> None:
    data = b"Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/html\n\n<p>x</p>\n--b--\n"
    analysis = mime.analyze(data)
    assert analysis.body == b'(("TEXT" "HTML" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 8 0) "MIXED")'
    assert mime.section(data, analysis, "1") == b"<p>x</p>"


# --- Sections (RFC 3501 §6.4.5) on the nested message ---
#
# nested.eml:  multipart/mixed
#   1          multipart/alternative
#   1.1          text/plain
#   1.2          multipart/related
#   1.2.1          text/html
#   1.2.2          image/png (inline, Content-ID)
#   2          application/pdf (attachment)
#   3          message/rfc822
#   3.1          text/plain      (of the encapsulated multipart/alternative)
#   3.2          text/html

NESTED = corpus("nested.eml")
NESTED_HEADER = NESTED[: NESTED.index(b"\r\n\r\n") + 4]
FORWARD = between(NESTED, b"Content-Type: message/rfc822\r\n\r\n", b"\r\n--mixed-1--")
FORWARD_HEADER = FORWARD[: FORWARD.index(b"\r\n\r\n") + 4]


@pytest.mark.parametrize(
    ("spec", "fields", "expected"),
    [
        ("", (), NESTED),
        ("HEADER", (), NESTED_HEADER),
        ("TEXT", (), NESTED[len(NESTED_HEADER) :]),
        (
            "HEADER.FIELDS",
            ("subject", "FROM", "X-Absent"),
            b"From: Frank <frank@example.com>\r\nSubject: Team photo, agenda and a forward\r\n\r\n",
        ),
        (
            "header.fields.not",
            ("Subject", "from", "mime-version", "content-type"),
            b"Date: Fri, 7 Jun 2024 09:00:00 +0000\r\nTo: Bob <bob@example.com>\r\n"
            b"Message-ID: <nested-1@example.com>\r\n\r\n",
        ),
        ("1", (), between(NESTED, b'boundary="alt-2"\r\n\r\n', b"\r\n--mixed-1\r\n")),
        ("1.MIME", (), b'Content-Type: multipart/alternative; boundary="alt-2"\r\n\r\n'),
        ("1.1", (), b"Team photo below; agenda attached.\r\n"),
        ("1.1.MIME", (), b"Content-Type: text/plain; charset=utf-8\r\n\r\n"),
        ("1.2", (), between(NESTED, b'type="text/html"\r\n\r\n', b"\r\n--alt-2--")),
        ("1.2.1", (), b'<p>Team photo:</p><img src=3D"cid:photo@example.com">'),
        (
            "1.2.2.MIME",
            (),
            b'Content-Type: image/png; name="photo.png"\r\nContent-ID: <photo@example.com>\r\n'
            b'Content-Disposition: inline; filename="photo.png"\r\nContent-Transfer-Encoding: base64\r\n\r\n',
        ),
        (
            "2.MIME",
            (),
            b'Content-Type: application/pdf; name="agenda.pdf"\r\n'
            b'Content-Disposition: attachment; filename="agenda.pdf"\r\n'
            b"Content-Transfer-Encoding: base64\r\nContent-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==\r\n\r\n",
        ),
        ("3", (), FORWARD),
        ("3.MIME", (), b"Content-Type: message/rfc822\r\n\r\n"),
        ("3.HEADER", (), FORWARD_HEADER),
        ("3.TEXT", (), FORWARD[len(FORWARD_HEADER) :]),
        ("3.HEADER.FIELDS", ("subject",), b"Subject: Re: agenda\r\n\r\n"),
        (
            "3.HEADER.FIELDS.NOT",
            ("date", "from", "to", "message-id"),
            b'Subject: Re: agenda\r\nContent-Type: multipart/alternative; boundary="fwd-alt"\r\n\r\n',
        ),
        ("3.1", (), b"Looks good."),
        ("3.2", (), b"<p>Looks good.</p>"),
        ("3.2.MIME", (), b"Content-Type: text/html\r\n\r\n"),
        ("3.HEADER.FIELDS", ("x-nothing",), b"\r\n"),
    ],
)
def test_sections_of_the_nested_message(spec: str, fields: tuple[str, ...], expected: bytes) -> None:
    assert mime.section(NESTED, mime.analyze(NESTED), spec, fields) == expected


def test_sections_holding_base64_decode_to_the_attachment() -> None:
    analysis = mime.analyze(NESTED)
    photo = mime.section(NESTED, analysis, "1.2.2")
    agenda = mime.section(NESTED, analysis, "2")
    assert photo is not None and base64.b64decode(photo).startswith(b"\x89PNG\r\n\x1a\n")
    assert agenda is not None and base64.b64decode(agenda).startswith(b"%PDF-1.4")


@pytest.mark.parametrize(
    "spec",
    ["4", "1.3", "1.1.1.1", "1.1.1.1.MIME", "1.2.2.1.1", "3.3", "3.1.1.1", "2.1.1", "2.1.1.MIME", "2.HEADER", "1.TEXT"],
)
def test_sections_that_do_not_exist(spec: str) -> None:
    assert mime.section(NESTED, mime.analyze(NESTED), spec) is None


@pytest.mark.parametrize(("spec", "part"), [("1.1.1", "1.1"), ("1.2.2.1", "1.2.2"), ("3.1.1", "3.1"), ("2.1", "2")])
def test_a_part_that_is_not_multipart_is_also_its_own_part_1(spec: str, part: str) -> None:
    """As Dovecot answers (issue 16's differential test): one more ".1" after a part of a multipart that
    is neither multipart nor message/rfc822 is that part again, its MIME header too."""
    analysis = mime.analyze(NESTED)
    assert mime.section(NESTED, analysis, spec) == mime.section(NESTED, analysis, part) != b""
    assert mime.section(NESTED, analysis, spec + ".MIME") == mime.section(NESTED, analysis, part + ".MIME") != b""


@pytest.mark.parametrize("spec", ["MIME", "0", "1.0", "01", "1.FOO", "HEADER.1", "1..2", "BODY", "¹"])
def test_malformed_section_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="not a section"):
        mime.section(NESTED, mime.analyze(NESTED), spec)


def test_a_single_part_message_has_its_body_as_part_1() -> None:
    data = corpus("plain.eml")
    analysis = mime.analyze(data)
    header = data[: data.index(b"\r\n\r\n") + 4]
    assert mime.section(data, analysis, "1") == data[len(header) :] == mime.section(data, analysis, "TEXT")
    assert mime.section(data, analysis, "1.MIME") == header
    assert mime.section(data, analysis, "2") is None
    assert mime.section(data, analysis, "1.1") is None
    assert mime.section(data, analysis, "1.HEADER") is None


def test_header_fields_keep_folding_order_and_every_occurrence() -> None:
    data = corpus("plain.eml")
    analysis = mime.analyze(data)
    received = between(data, b"\r\nReceived:", b"\r\nDate:")
    assert mime.section(data, analysis, "HEADER.FIELDS", ["SUBJECT", "received", "return-path"]) == (
        b"Return-Path: <alice@example.org>\r\nReceived:" + received + b"\r\nSubject: Lunch on Friday?\r\n\r\n"
    )
    doubled = b"X-A: 1\r\nX-B: 2\r\nx-a: 3\r\n  folded\r\n\r\nbody"
    assert mime.section(doubled, mime.analyze(doubled), "HEADER.FIELDS", ["X-A"]) == (
        b"X-A: 1\r\nx-a: 3\r\n  folded\r\n\r\n"
    )
    headers_only = b"Subject: no newline at the end"
    assert mime.section(headers_only, mime.analyze(headers_only), "HEADER.FIELDS", ["subject"]) == (
        b"Subject: no newline at the end\r\n\r\n"
    )


def test_a_top_level_message_rfc822_has_its_message_under_part_1() -> None:
    data = b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner body\r\n"
    analysis = mime.analyze(data)
    assert mime.section(data, analysis, "1") == b"Subject: inner\r\n\r\ninner body\r\n"
    assert mime.section(data, analysis, "1.HEADER") == b"Subject: inner\r\n\r\n"
    assert mime.section(data, analysis, "1.TEXT") == b"inner body\r\n"
    assert mime.section(data, analysis, "1.1") == b"inner body\r\n"
    assert analysis.body == (
        b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 30 (NIL "inner" NIL NIL NIL NIL NIL NIL NIL NIL) '
        + PLAIN_DEFAULT
        + b" 12 1) 3)"
    )


def test_digest_parts_default_to_message_rfc822() -> None:
    data = (
        b'Content-Type: multipart/digest; boundary="d"\r\n\r\n--d\r\n\r\nSubject: one\r\n\r\nfirst\r\n'
        b"--d\r\nContent-Type: text/plain\r\n\r\nnot a message\r\n--d--\r\n"
    )
    analysis = mime.analyze(data)
    assert [p.content_type for p in analysis.root.parts] == ["message/rfc822", "text/plain"]
    assert mime.section(data, analysis, "1.HEADER") == b"Subject: one\r\n\r\n"


# --- SEARCH ---


def test_header_value_decodes_encoded_words() -> None:
    data = corpus("encoded-words.eml")
    analysis = mime.analyze(data)
    # RFC 2047 §6.2: white space between adjacent encoded words goes; "_" in Q is a space
    assert mime.header_value(data, analysis, "Subject") == "Café meeting — bring your ☕"
    assert mime.header_value(data, analysis, "from") == "André Pirard <pirard@example.be>"
    assert mime.header_value(data, analysis, "TO") == "Kärte Müller <kaerte@example.de>, Renée <renee@example.fr>"
    assert mime.header_value(data, analysis, "X-Missing") is None

    sjis = corpus("shift-jis.eml")
    assert mime.header_value(sjis, mime.analyze(sjis), "subject") == "お知らせ"
    raw = corpus("undeclared-8bit.eml")
    assert mime.header_value(raw, mime.analyze(raw), "subject") == "Grüße — naïve café"
    long = corpus("long-headers.eml")
    subject = mime.header_value(long, mime.analyze(long), "subject")
    assert subject is not None and "item-005 item-006" in subject and "\n" not in subject


def test_header_value_joins_repeated_fields_and_survives_broken_words() -> None:
    data = b"Received: one\r\nReceived: two\r\n  folded\r\nSubject: =?utf-8?b?###?= =?x-unknown?q?caf=E9?=\r\n\r\n"
    analysis = mime.analyze(data)
    assert mime.header_value(data, analysis, "received") == "one\ntwo  folded"
    assert mime.header_value(data, analysis, "subject") == "café"


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("latin1.eml", "Grüße aus Köln, à bientôt!\r\n"),  # ISO-8859-1, 8bit
        ("windows-1252.eml", "The \u201cdeluxe\u201d plan costs \u20ac25 \u2013 per month.\r\n"),  # quoted-printable
        ("shift-jis.eml", "こんにちは、会議は明日です。\r\n"),
        ("undeclared-8bit.eml", "Grüße — the naïve café opens at nine.\r\n"),  # no charset: UTF-8
        ("encoded-words.eml", "Bonjour, on se voit au café à midi.\r\n"),  # ISO-8859-1, quoted-printable
        # base64 UTF-8; the base64 attachments are not text
        ("mixed-attachments.eml", "Hi Bob,\r\nattached: the invoice (résumé of June) and a photo.\r\nDana\r\n"),
        (
            "nested.eml",
            "Team photo below; agenda attached.\r\n\n"
            '<p>Team photo:</p><img src="cid:photo@example.com">\n'
            "Looks good.\n<p>Looks good.</p>",
        ),
    ],
)
def test_text_for_search_decodes_transfer_encoding_and_charset(name: str, text: str) -> None:
    data = corpus(name)
    assert mime.text_for_search(data, mime.analyze(data)) == text


def test_text_for_search_tolerates_broken_bodies() -> None:
    data = (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain; charset=no-such-charset\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"w6l0w6k\r\n"  # "été" with its padding missing
        b"--b\r\nContent-Type: text/plain; charset=rot13\r\n\r\nnot rot13\r\n"  # a codec, but not a text one
        b"--b\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n\xe9t\xe9\r\n"  # 8-bit mislabelled
        b"--b--\r\n"
    )
    assert mime.text_for_search(data, mime.analyze(data)) == "été\nnot rot13\nété"


# --- Charsets ---

# Codecs Python has that are not text charsets: transforms of bytes, escapes, IDNA's punycode.
NOT_TEXT = [
    "punycode", "idna", "rot13", "rot_13", "zlib_codec", "zlib", "base64_codec", "base64", "uu_codec", "uu",
    "bz2_codec", "bz2", "hex_codec", "hex", "quopri_codec", "quoted-printable", "unicode_escape",
    "raw_unicode_escape", "escape_codec", "string_escape", "undefined", "charmap", "mbcs", "oem", "palmos",
]  # fmt: skip
EVERY_CODEC_NAME = sorted(
    set(encodings.aliases.aliases)
    | set(encodings.aliases.aliases.values())
    | {module.name for module in pkgutil.iter_modules(encodings.__path__)}
    | set(NOT_TEXT)
)


@pytest.mark.parametrize("name", NOT_TEXT)
def test_codecs_that_are_not_text_are_unknown_charsets(name: str) -> None:
    assert mime.text_codec(name) is None
    assert mime.text_codec(name.upper()) is None


@pytest.mark.parametrize(
    ("name", "codec"),
    [
        ("us-ascii", "ascii"), ("UTF-8", "utf-8"), ("utf8", "utf-8"), ("utf--8", "utf-8"), ("latin1", "iso8859-1"),
        ("ISO_8859-15", "iso8859-15"), ("windows-1252", "cp1252"), ("windows-874", "cp874"), ("koi8-r", "koi8-r"),
        ("ISO-2022-JP", "iso2022_jp"), ("Shift_JIS", "shift_jis"), ("ks_c_5601-1987", "euc_kr"),
        ("gb2312", "gb2312"), ("Big5", "big5"), ("utf-16le", "utf-16-le"), ("UTF-7", "utf-7"),
    ],
)  # fmt: skip
def test_text_charsets_by_name_and_alias(name: str, codec: str) -> None:
    assert mime.text_codec(name) == codec


@pytest.mark.parametrize("name", mime.TEXT_CHARSETS)
def test_every_listed_charset_is_a_text_codec(name: str) -> None:
    codec = mime.text_codec(name)
    assert codec is not None
    assert codecs.lookup(codec)._is_text_encoding


@pytest.mark.parametrize("name", EVERY_CODEC_NAME)
def test_every_codec_python_has_is_refused_or_safe(name: str) -> None:
    # Safe: a text codec that decodes any bytes (errors replaced) into at most one character per byte,
    # so hostile input neither raises nor expands.
    codec = mime.text_codec(name)
    if codec is None:
        return
    assert name.lower() not in NOT_TEXT
    assert codecs.lookup(codec)._is_text_encoding
    hostile = bytes(range(256)) * 16 + b"+AGEAYgBj-\x1b$B\x1b(J~{~}" * 8
    text = hostile.decode(codec, "replace")
    assert len(text) <= len(hostile)


@given(st.text(max_size=60))
def test_any_charset_name_resolves_or_is_unknown(name: str) -> None:
    codec = mime.text_codec(name)
    assert codec is None or codecs.lookup(codec)._is_text_encoding


def test_a_punycode_part_is_read_as_undeclared_text(monkeypatch: pytest.MonkeyPatch) -> None:
    # Decoding a megabyte as punycode took 23 s on the event loop; it must not be tried at all.
    def refuse(*args: object) -> str:
        raise AssertionError("decoded as punycode")

    monkeypatch.setattr(encodings.punycode, "punycode_decode", refuse)
    body = b"b" * (1024 * 1024) + b"\r\nneedle\r\n"
    data = b"Subject: =?punycode?q?bbbb?=\r\nContent-Type: text/plain; charset=punycode\r\n\r\n" + body
    analysis = mime.analyze(data)
    assert mime.text_for_search(data, analysis) == body.decode()
    assert mime.header_value(data, analysis, "subject") == "bbbb"
    assert mime.text_codec("punycode") is None


# --- The cache form ---


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_json_round_trip(name: str) -> None:
    analysis = mime.analyze(corpus(name))
    text = analysis.to_json()
    assert mime.Analysis.from_json(text) == analysis
    assert text.startswith('{"v":2,"p":[0,')


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        # cached by an older version
        '{"v": 1, "p": [0, 0, 0, "text/plain", null, "7bit", []], "e": "", "s": "", "b": ""}',
        '{"v": 2, "p": [0, 0, "0", "text/plain", null, "7bit", []], "e": "", "s": "", "b": ""}',
        '{"v": 2, "p": [0, 0, 0, "text/plain", null, "7bit", [[]]], "e": "", "s": "", "b": ""}',
        '{"v": 2, "p": [0, 0, 0, "text/plain", null, "7bit", []], "e": "\\u20ac", "s": "", "b": ""}',
        '{"v": 2, "p": [0, 0, 0, "text/plain", null, "7bit", []], "e": "", "s": ""}',
    ],
)
def test_from_json_refuses_what_to_json_did_not_write(text: str) -> None:
    with pytest.raises(ValueError):
        mime.Analysis.from_json(text)


# --- Any input ---


def read_imap(data: bytes) -> object:
    """Parse one IMAP value (list, NIL, number, quoted string or literal) that must fill `data`."""
    value, end = _read_value(data, 0)
    assert end == len(data), data[end:]
    return value


def _read_value(data: bytes, pos: int) -> tuple[object, int]:
    if data.startswith(b"NIL", pos):
        return None, pos + 3
    if data.startswith(b"(", pos):
        items: list[object] = []
        pos += 1
        while not data.startswith(b")", pos):
            if items and data.startswith(b" ", pos):
                pos += 1
            item, pos = _read_value(data, pos)
            items.append(item)
        return items, pos + 1
    if data.startswith(b'"', pos):
        out = bytearray()
        pos += 1
        while not data.startswith(b'"', pos):
            char = data[pos : pos + 1]
            if char == b"\\":
                pos += 1
                char = data[pos : pos + 1]
                assert char in (b"\\", b'"')
            assert char and char not in b"\r\n\x00" and char.isascii()
            out += char
            pos += 1
        return bytes(out), pos + 1
    if literal := re.compile(rb"\{(\d+)\}\r\n").match(data, pos):
        start, size = literal.end(), int(literal[1])
        assert len(data) >= start + size and b"\x00" not in data[start : start + size]
        return data[start : start + size], start + size
    number = re.compile(rb"\d+").match(data, pos)
    assert number, data[pos:]
    return int(number[0]), number.end()


def check_nstring(value: object) -> None:
    assert value is None or isinstance(value, bytes)


def check_params(value: object) -> None:
    assert value is None or (isinstance(value, list) and value and len(value) % 2 == 0)
    assert all(isinstance(item, bytes) for item in value or [])


def check_extension(items: list[object]) -> None:
    """body-fld-dsp SP body-fld-lang SP body-fld-loc."""
    disposition, language, location = items
    if disposition is not None:
        assert isinstance(disposition, list) and len(disposition) == 2 and isinstance(disposition[0], bytes)
        check_params(disposition[1])
    assert language is None or isinstance(language, bytes) or (isinstance(language, list) and language)
    check_nstring(location)


def check_envelope(value: object) -> None:
    assert isinstance(value, list) and len(value) == 10
    for item in value[:2] + value[8:]:
        check_nstring(item)
    for addresses in value[2:8]:
        assert addresses is None or (isinstance(addresses, list) and addresses)
        for address in addresses or []:
            assert isinstance(address, list) and len(address) == 4
            for item in address:
                check_nstring(item)


def check_body(node: object, part: mime.Part, data: bytes, *, extended: bool) -> None:
    """`node` is a body by RFC 3501 §9 and describes `part`."""
    assert isinstance(node, list) and node
    if part.content_type.startswith("multipart/"):
        count = next(i for i, item in enumerate(node) if not isinstance(item, list))
        children = node[:count]
        assert len(children) == len(part.parts) >= 1
        for child_node, child in zip(children, part.parts, strict=True):
            check_body(child_node, child, data, extended=extended)
        subtype, *rest = node[len(children) :]
        assert isinstance(subtype, bytes) and subtype.lower() == part.content_type.split("/")[1].encode()
        assert len(rest) == (4 if extended else 0)
        if extended:
            check_params(rest[0])
            check_extension(rest[1:])
        return
    media, subtype, params, content_id, description, encoding, size, *rest = node
    assert isinstance(media, bytes) and isinstance(subtype, bytes)
    assert (media + b"/" + subtype).lower() == part.content_type.encode()
    check_params(params)
    check_nstring(content_id)
    check_nstring(description)
    assert isinstance(encoding, bytes)
    assert size == part.end - part.body_start
    lines = data[part.body_start : part.end].count(b"\n")  # as Dovecot counts: the line terminators
    if part.content_type == "message/rfc822":
        envelope, inner, inner_lines, *rest = rest
        check_envelope(envelope)
        [message] = part.parts
        check_body(inner, message, data, extended=extended)
        assert inner_lines == lines
    else:
        assert part.parts == ()
        if media == b"TEXT":
            assert rest.pop(0) == lines
    assert len(rest) == (4 if extended else 0)
    if extended:
        check_nstring(rest[0])
        check_extension(rest[1:])


def check_part(part: mime.Part, size: int) -> None:
    assert 0 <= part.header_start <= part.body_start <= part.end <= size
    previous_end = part.body_start
    for child in part.parts:
        check_part(child, size)
        if part.content_type == "message/rfc822":
            assert (child.header_start, child.end) == (part.body_start, part.end)
        else:
            assert previous_end <= child.header_start and child.end <= part.end
            previous_end = child.end


def part_paths(message: mime.Part, prefix: str = "") -> list[str]:
    """The part numbers of every entity of `message` (the top level or an encapsulated message), as
    RFC 3501 §6.4.5 numbers them."""
    entities = message.parts if message.content_type.startswith("multipart/") else (message,)
    paths = []
    for number, entity in enumerate(entities, start=1):
        path = f"{prefix}{number}"
        paths.append(path)
        if entity.content_type == "message/rfc822" and entity.parts:
            paths += part_paths(entity.parts[0], path + ".")
        elif entity is not message and entity.content_type.startswith("multipart/"):
            paths += part_paths(entity, path + ".")
    return paths


def check_everything(data: bytes) -> None:
    analysis = mime._analyze(data)  # not analyze: its last-resort fallback would hide a bug
    assert mime.analyze(data) == analysis
    check_part(analysis.root, len(data))
    check_envelope(read_imap(analysis.envelope))
    check_body(read_imap(analysis.bodystructure), analysis.root, data, extended=True)
    check_body(read_imap(analysis.body), analysis.root, data, extended=False)
    assert mime.Analysis.from_json(analysis.to_json()) == analysis
    assert mime.section(data, analysis, "") == data
    header, text = mime.section(data, analysis, "HEADER"), mime.section(data, analysis, "TEXT")
    assert header is not None and text is not None and header + text == data
    for path in part_paths(analysis.root)[:200]:
        for suffix in ("", ".MIME", ".HEADER", ".TEXT", ".HEADER.FIELDS", ".HEADER.FIELDS.NOT"):
            content = mime.section(data, analysis, path + suffix, ["subject", "content-type"])
            if suffix in ("", ".MIME"):
                assert content is not None and content in data
    for name in ("subject", "from", "content-type"):
        mime.header_value(data, analysis, name)
    mime.text_for_search(data, analysis)


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_corpus_replies_are_well_formed(name: str) -> None:
    check_everything(corpus(name))


MIME_TOKENS = [
    b"\r\n",
    b"\n",
    b"\r\n\r\n",
    b" ",
    b"Content-Type: multipart/mixed; boundary=b\r\n",
    b'Content-Type: multipart/alternative; boundary="c"\r\n',
    b"Content-Type: multipart/digest; boundary=b\r\n",
    b"Content-Type: message/rfc822\r\n",
    b"Content-Type: text/plain; charset=utf-8\r\n",
    b"Content-Type: text/plain; charset*0*=utf-8''%E9; charset*1=x; name*=a'b'c\r\n",
    b"Content-Type: ; boundary\r\n",
    b"Content-Transfer-Encoding: base64\r\n",
    b"Content-Transfer-Encoding: quoted-printable\r\n",
    b"Content-Disposition: attachment; filename*0*=utf-8''%41; filename*1=b\r\n",
    b"Content-Language: en,\r\n",
    b"--b\r\n",
    b"--b--\r\n",
    b"--b",
    b"--c\r\n",
    b"--c--",
    b"--b-c\r\n",
    b"Subject: =?utf-8?q?caf=C3=A9?= =?iso-8859-1?b?6Q==?=\r\n",
    b'From: a@b, G: c@d, "q\\"x" <e@f>;\r\n',
    b"To: <@r1,@r2:u@h>, (comment) x, ;:\r\n",
    b" folded\r\n",
    b"\tfolded\r\n",
    b"X: y\r\n",
    b"\x00",
    b"\xff\xfe",
    b"=?",
    b"w6k=\r\n",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_arbitrary_bytes(data: bytes) -> None:
    check_everything(data)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.sampled_from(MIME_TOKENS), st.binary(max_size=4)), max_size=80).map(b"".join))
def test_mime_shaped_noise(data: bytes) -> None:
    check_everything(data)


@st.composite
def mutated_corpus(draw: st.DrawFn) -> bytes:
    data = bytearray(corpus(draw(st.sampled_from(CORPUS_NAMES))))
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        where = draw(st.integers(min_value=0, max_value=len(data)))
        length = draw(st.integers(min_value=0, max_value=64))
        action = draw(st.sampled_from(["delete", "insert", "token", "duplicate", "truncate", "lf"]))
        if action == "delete":
            del data[where : where + length]
        elif action == "insert":
            data[where:where] = draw(st.binary(max_size=16))
        elif action == "token":
            data[where:where] = draw(st.sampled_from(MIME_TOKENS))
        elif action == "duplicate":
            data[where:where] = data[where : where + length]
        elif action == "truncate":
            del data[where:]
        else:
            data[:] = data.replace(b"\r\n", b"\n")
    return bytes(data)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_corpus())
def test_mutated_corpus_messages(data: bytes) -> None:
    check_everything(data)


def depth(part: mime.Part) -> int:
    return 1 + max((depth(child) for child in part.parts), default=0)


def test_nesting_is_bounded() -> None:
    multiparts = b"x"
    for level in range(300):
        multiparts = (
            b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (level, level)
            + multiparts
            + b"\r\n--b%d--\r\n" % level
        )
    messages = b"Content-Type: message/rfc822\r\n\r\n" * 300 + b"Subject: bottom\r\n\r\nx"
    for data in (multiparts, messages):
        analysis = mime._analyze(data)
        assert depth(analysis.root) == mime.MAX_DEPTH + 1
        check_everything(data)


def test_part_count_is_bounded() -> None:
    data = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + b"--b\r\n\r\nx\r\n" * 12_000 + b"--b--\r\n"
    analysis = mime.analyze(data)
    assert len(analysis.root.parts) == mime.MAX_PARTS - 1
    check_part(analysis.root, len(data))
    assert analysis.bodystructure.count(b'("TEXT" "PLAIN"') == mime.MAX_PARTS - 1
