"""The differential test's corpus (tests/node/test_imap_dovecot.py): a few hundred messages, real-world shapes
and malformed variants, generated deterministically from a fixed seed so every run compares the same bytes.

`messages()` returns (name, bytes, flags, internal date) tuples. The shapes are written by hand (plain,
alternative, mixed with attachments, nested, forwarded message/rfc822, DSN multipart/report, calendar invite,
signed and encrypted, mailing list, encoded words, groups, addresses without domain, repeated Cc, missing or
broken Date, odd charsets); the malformed ones are each shape put through each mutation (boundary lost,
boundary only at the end, no parts, Content-Type without subtype or garbage, no blank line after the
header, bare LF, mixed line ends).
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable

SEED = 16  # the number; change it and the corpus (and perhaps the known differences) changes

NAMES = ("Alice Example", "Bob O'Neil", "Zoë Lefèvre", "李雷", "Mallory, Jr.", "postmaster")
DOMAINS = ("example.org", "lists.example.net", "mail.example.com")
WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do", "eiusmod",
         "tempor", "invoice", "meeting")  # fmt: skip
FLAG_SETS = ((), ("\\Seen",), ("\\Seen", "\\Flagged"), ("\\Answered",), ("$Label1",), ("\\Draft", "\\Seen"))


def _address(rng: random.Random) -> str:
    name = rng.choice(NAMES)
    local = name.split()[0].lower().strip(",'") if name.isascii() else "user"
    if not name.isascii():
        name = "=?UTF-8?B?" + base64.b64encode(name.encode()).decode() + "?="
    elif "," in name or "'" in name:
        name = f'"{name}"'
    return f"{name} <{local}@{rng.choice(DOMAINS)}>"


def _text(rng: random.Random, words: int) -> str:
    lines, line = [], []
    for _ in range(words):
        line.append(rng.choice(WORDS))
        if len(line) == 12:
            lines.append(" ".join(line))
            line = []
    lines.append(" ".join(line))
    return "\n".join(lines) + "\n"


def _date(rng: random.Random) -> str:
    day = rng.randrange(1, 28)
    weekday = ("Mon", "Tue", "Wed")[day % 3]
    return f"{weekday}, {day:02d} Mar 2025 {rng.randrange(24):02d}:{rng.randrange(60):02d}:07 +0100"


def _headers(rng: random.Random, subject: str, *, extra: str = "") -> str:
    return (
        f"From: {_address(rng)}\nTo: {_address(rng)}\nDate: {_date(rng)}\nSubject: {subject}\n"
        f"Message-ID: <{rng.getrandbits(48):x}@example.org>\nMIME-Version: 1.0\n{extra}"
    )


def _b64(data: bytes) -> str:
    encoded = base64.b64encode(data).decode()
    return "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76)) + "\n"


def plain(rng: random.Random) -> str:
    charset, cte, body = rng.choice(
        (
            ("us-ascii", "7bit", _text(rng, 40)),
            ("utf-8", "quoted-printable", "Gr=C3=BC=C3=9Fe aus K=C3=B6ln\n" + _text(rng, 20)),
            ("iso-8859-1", "8bit", "Caf\xe9 cr\xe8me\n" + _text(rng, 10)),
            ("koi8-r", "base64", _b64("Привет".encode("koi8-r"))),
            ("x-unknown-charset", "7bit", _text(rng, 8)),
        )
    )
    return _headers(rng, "plain " + rng.choice(WORDS)) + (
        f'Content-Type: text/plain; charset="{charset}"; format=flowed\nContent-Transfer-Encoding: {cte}\n\n{body}'
    )


def no_mime(rng: random.Random) -> str:
    head = f"From: {_address(rng)}\nTo: {_address(rng)}\nSubject: no MIME at all\nDate: {_date(rng)}\n\n"
    return head + _text(rng, 30)


def alternative(rng: random.Random) -> str:
    b = f"alt-{rng.getrandbits(32):08x}"
    text = _text(rng, 30)
    return _headers(rng, "alternative", extra=f'Content-Type: multipart/alternative; boundary="{b}"\n') + (
        f"\nThis is a multi-part message in MIME format.\n--{b}\nContent-Type: text/plain; charset=utf-8\n"
        f"Content-Transfer-Encoding: 7bit\n\n{text}\n--{b}\nContent-Type: text/html; charset=utf-8\n"
        f"Content-Transfer-Encoding: quoted-printable\n\n<html><body><p>{text}</p></body></html>\n--{b}--\n"
    )


def mixed(rng: random.Random) -> str:
    b = f"mix_{rng.getrandbits(32):08x}"
    blob = bytes(rng.getrandbits(8) for _ in range(rng.randrange(200, 900)))
    return _headers(rng, "mixed with attachments", extra=f"Content-Type: multipart/mixed; boundary={b}\n") + (
        f"\n--{b}\nContent-Type: text/plain\n\n{_text(rng, 20)}\n--{b}\n"
        f'Content-Type: application/pdf; name="report.pdf"\nContent-Disposition: attachment; filename="report.pdf"; '
        f"size={len(blob)}\nContent-Transfer-Encoding: base64\nContent-Description: the report\n"
        f"Content-ID: <part2@example.org>\n\n{_b64(blob)}--{b}\n"
        f"Content-Type: image/png\nContent-Disposition: inline; filename*=utf-8''%C3%A9t%C3%A9.png\n"
        f"Content-Transfer-Encoding: base64\nContent-Language: en, fr\nContent-Location: http://example.org/x.png\n"
        f"Content-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==\n\n{_b64(blob[:100])}--{b}--\nepilogue\n"
    )


def nested(rng: random.Random) -> str:
    outer, alt, rel = (f"{kind}{rng.getrandbits(24):06x}" for kind in ("outer", "alt", "rel"))
    return _headers(rng, "nested", extra=f'Content-Type: multipart/mixed; boundary="{outer}"\n') + (
        f'\n--{outer}\nContent-Type: multipart/alternative; boundary="{alt}"\n\n'
        f"--{alt}\nContent-Type: text/plain; charset=us-ascii\n\n{_text(rng, 10)}\n"
        f'--{alt}\nContent-Type: multipart/related; boundary="{rel}"; type="text/html"\n\n'
        f'--{rel}\nContent-Type: text/html\n\n<p><img src="cid:logo"></p>\n'
        f"--{rel}\nContent-Type: image/gif\nContent-ID: <logo>\nContent-Transfer-Encoding: base64\n\n"
        f"R0lGODlhAQABAAAAACw=\n--{rel}--\n\n--{alt}--\n\n"
        f"--{outer}\nContent-Type: text/csv; name=data.csv\nContent-Disposition: attachment\n\na,b\n1,2\n"
        f"--{outer}--\n"
    )


def forwarded(rng: random.Random) -> str:
    b = f"fwd{rng.getrandbits(32):08x}"
    inner = alternative(rng) if rng.random() < 0.5 else plain(rng)
    return _headers(rng, "Fwd: forwarded", extra=f'Content-Type: multipart/mixed; boundary="{b}"\n') + (
        f"\n--{b}\nContent-Type: text/plain\n\nSee below.\n--{b}\nContent-Type: message/rfc822\n"
        f"Content-Disposition: attachment\n\n{inner}\n--{b}--\n"
    )


def bare_rfc822(rng: random.Random) -> str:
    return _headers(rng, "only a message", extra="Content-Type: message/rfc822\n") + "\n" + plain(rng)


def dsn(rng: random.Random) -> str:
    b = f"dsn{rng.getrandbits(32):08x}"
    original = rng.choice(("message/rfc822", "text/rfc822-headers"))
    body = plain(rng) if original == "message/rfc822" else _headers(rng, "the original")
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mail.example.com>\nTo: <sender@example.org>\n"
        f"Date: {_date(rng)}\nSubject: Undelivered Mail Returned to Sender\nMIME-Version: 1.0\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{b}"\n\n'
        f"--{b}\nContent-Description: Notification\nContent-Type: text/plain; charset=us-ascii\n\n"
        f"I'm sorry to have to inform you that your message could not be delivered.\n\n"
        f"--{b}\nContent-Description: Delivery report\nContent-Type: message/delivery-status\n\n"
        f"Reporting-MTA: dns; mail.example.com\n\nFinal-Recipient: rfc822; nobody@example.net\n"
        f"Action: failed\nStatus: 5.1.1\n\n--{b}\nContent-Description: Undelivered Message\n"
        f"Content-Type: {original}\n\n{body}\n--{b}--\n"
    )


def invite(rng: random.Random) -> str:
    b = f"cal{rng.getrandbits(32):08x}"
    return _headers(rng, "Invitation: standup", extra=f'Content-Type: multipart/alternative; boundary="{b}"\n') + (
        f"\n--{b}\nContent-Type: text/plain; charset=UTF-8\n\nYou are invited.\n"
        f"--{b}\nContent-Type: text/calendar; charset=UTF-8; method=REQUEST\nContent-Transfer-Encoding: 7bit\n\n"
        "BEGIN:VCALENDAR\nMETHOD:REQUEST\nBEGIN:VEVENT\nSUMMARY:standup\nEND:VEVENT\nEND:VCALENDAR\n"
        f"--{b}--\n"
    )


def signed(rng: random.Random) -> str:
    b = f"sig{rng.getrandbits(32):08x}"
    kind = 'multipart/signed; micalg=pgp-sha256; protocol="application/pgp-signature"'
    return _headers(rng, "signed", extra=f'Content-Type: {kind}; boundary="{b}"\n') + (
        f"\n--{b}\nContent-Type: text/plain; charset=utf-8\n\n{_text(rng, 15)}\n--{b}\n"
        f'Content-Type: application/pgp-signature; name="signature.asc"\n\n-----BEGIN PGP SIGNATURE-----\n'
        f"iQEzBAEBCAAdFiEE\n-----END PGP SIGNATURE-----\n--{b}--\n"
    )


def encrypted(rng: random.Random) -> str:
    b = f"enc{rng.getrandbits(32):08x}"
    kind = 'multipart/encrypted; protocol="application/pgp-encrypted"'
    return _headers(rng, "encrypted", extra=f'Content-Type: {kind}; boundary="{b}"\n') + (
        f"\n--{b}\nContent-Type: application/pgp-encrypted\n\nVersion: 1\n--{b}\n"
        f"Content-Type: application/octet-stream\n\n-----BEGIN PGP MESSAGE-----\nhQEMA\n-----END PGP MESSAGE-----\n"
        f"--{b}--\n"
    )


def mailing_list(rng: random.Random) -> str:
    return (
        f"From: {_address(rng)}\nSender: list-bounces@lists.example.net\nReply-To: list@lists.example.net\n"
        f"To: list@lists.example.net\nDate: {_date(rng)}\nSubject: [list] {rng.choice(WORDS)}\n"
        f"In-Reply-To: <parent@example.org>\nReferences: <root@example.org> <parent@example.org>\n"
        f"List-Id: <list.lists.example.net>\nMessage-ID: <{rng.getrandbits(40):x}@lists.example.net>\n\n"
        + _text(rng, 50)
    )


def odd_addresses(rng: random.Random) -> str:
    to = rng.choice(
        (
            "undisclosed-recipients:;",
            'Team: a@example.org, "B" <b@example.org>;, c@example.org',
            "root",
            "MAILER-DAEMON, postmaster@example.org",
            "=?ISO-8859-1?Q?Andr=E9?= <andre@example.org>",
            '"quoted \\"name\\"" <q@example.org>',
            "a@example.org (a comment)",
            "<>",
        )
    )
    return (
        f"From: {rng.choice(('root', _address(rng), 'Some Body <somebody>'))}\nTo: {to}\n"
        f"Cc: c1@example.org\nCC: c2@example.org, C3 <c3@example.org>\nDate: {_date(rng)}\n"
        f"Subject: =?UTF-8?Q?caf=C3=A9_?= =?UTF-8?B?w6l0w6k=?= and more\n\n" + _text(rng, 10)
    )


def dates(rng: random.Random) -> str:
    date = rng.choice(("", "Date: yesterday\n", "Date: 31 Feb 2025 25:61:00 +9999\n", "Date: 2 Jan 2024 10:00 GMT\n"))
    return f"From: {_address(rng)}\nTo: {_address(rng)}\n{date}Subject: dates\n\n" + _text(rng, 10)


SHAPES: tuple[Callable[[random.Random], str], ...] = (
    plain, no_mime, alternative, mixed, nested, forwarded, bare_rfc822, dsn, invite, signed, encrypted,
    mailing_list, odd_addresses, dates,
)  # fmt: skip


# -- the mutations: each a function of the message text; those that find nothing to break return None


def _boundary(text: str) -> str | None:
    marker = "boundary="
    at = text.find(marker)
    if at < 0:
        return None
    value = text[at + len(marker) :].split("\n", 1)[0].split(";", 1)[0].strip()
    return value.strip('"')


def lost_boundary(text: str) -> str | None:
    b = _boundary(text)
    return None if b is None else text.replace(f"--{b}\n", "--somewhere-else\n").replace(f"--{b}--", "--gone--")


def boundary_only_at_end(text: str) -> str | None:
    b = _boundary(text)
    return None if b is None else text.replace(f"--{b}\n", "\n")


def no_parts(text: str) -> str | None:
    b = _boundary(text)
    if b is None:
        return None
    head, _, _ = text.partition("\n\n")
    return f"{head}\n\npreamble only\n--{b}--\n"


def no_subtype(text: str) -> str | None:
    return text.replace("Content-Type: text/plain", "Content-Type: text", 1) if "Content-Type: text/" in text else None


def garbage_type(text: str) -> str | None:
    at = text.find("Content-Type:")
    if at < 0:
        return None
    end = text.index("\n", at)
    return text[:at] + "Content-Type: ;;garbage here" + text[end:]


def no_blank_line(text: str) -> str:
    head, _, body = text.partition("\n\n")
    return head + "\n" + body


def header_only(text: str) -> str:
    return text.partition("\n\n")[0] + "\n"


def misdeclared_inner(text: str) -> str | None:
    if "multipart/alternative" not in text or "multipart/mixed" not in text:
        return None
    return text.replace('boundary="alt', 'boundary="wrong', 1)


MUTATIONS: tuple[Callable[[str], str | None], ...] = (
    lost_boundary, boundary_only_at_end, no_parts, no_subtype, garbage_type, no_blank_line, header_only,
    misdeclared_inner,
)  # fmt: skip


def _line_ends(text: str, rng: random.Random) -> bytes:
    """CRLF (what IMAP APPEND carries), bare LF, or a mix, chosen per message."""
    kind = rng.random()
    if kind < 0.8:
        return text.replace("\n", "\r\n").encode("latin-1" if not text.isascii() and _latin(text) else "utf-8")
    raw = text.encode("utf-8")
    if kind < 0.9:
        return raw
    lines = raw.split(b"\n")
    return b"".join(line + (b"\r\n" if rng.random() < 0.5 else b"\n") for line in lines[:-1]) + lines[-1]


def _latin(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


# Threads for SORT and THREAD (RFC 5256): (name, Message-ID, References, In-Reply-To, Subject, day and time in
# March 2025). Replies with and without References, a missing root (a dummy), a truncated References, a
# duplicate Message-ID, a reference loop, subjects merged by base subject ([list], Re:, Fwd:, (fwd), [fwd: ]).
THREADS = (
    ("t-root", "a1@t", "", "", "Project plan", "01 10:00"),
    ("t-reply", "a2@t", "<a1@t>", "<a1@t>", "Re: Project plan", "01 11:00"),
    ("t-reply2", "a3@t", "<a1@t> <a2@t>", "", "Re: Re: Project plan", "02 09:00"),
    ("t-sibling", "a4@t", "<a1@t>", "", "RE: Project plan", "01 12:00"),
    ("t-fwd", "a5@t", "", "", "Fwd: Project plan", "03 08:00"),
    ("t-orphan1", "b1@t", "<b0@t>", "", "Re: Lost root", "04 10:00"),
    ("t-orphan2", "b2@t", "<b0@t>", "", "Re: Lost root", "04 09:00"),
    ("t-irt-root", "c1@t", "", "", "Lunch?", "05 12:00"),
    ("t-irt", "c2@t", "", "<c1@t> <other@t>", "Re: Lunch?", "05 12:30"),
    ("t-list1", "d1@t", "", "", "[list] Weekly report", "06 10:00"),
    ("t-list2", "d2@t", "", "", "Re: [list] Weekly report", "06 11:00"),
    ("t-list3", "d3@t", "", "", "weekly report (fwd)", "06 09:00"),
    ("t-list4", "d4@t", "", "", "Weekly report", "06 08:00"),
    ("t-trunc1", "e1@t", "", "", "Chain", "07 10:00"),
    ("t-trunc2", "e2@t", "<e1@t>", "", "Re: Chain", "07 11:00"),
    ("t-trunc3", "e3@t", "<e2@t>", "", "Re: Chain", "07 12:00"),
    ("t-dup1", "dup@t", "", "", "Duplicate id", "08 10:00"),
    ("t-dup2", "dup@t", "", "", "Duplicate id again", "08 11:00"),
    ("t-loop1", "f1@t", "<f2@t>", "", "Loop one", "09 10:00"),
    ("t-loop2", "f2@t", "<f1@t>", "", "Loop two", "09 11:00"),
    ("t-nosubject", "g1@t", "", "", "", "10 10:00"),
    ("t-fwdwrap", "h1@t", "", "", "[fwd: Lunch?]", "10 11:00"),
    ("t-blobs", "h2@t", "", "", "[a] [b] Re: [c] Fwd: Blobs ", "10 12:00"),
    ("t-tz", "h3@t", "", "", "Zones", "10 12:30"),
)


def thread_message(name: str, message_id: str, references: str, in_reply_to: str, subject: str, when: str) -> str:
    zone = "-0800" if name == "t-tz" else "+0000"  # 20:30 UTC: after the others of the 10th
    lines = [
        f"From: {name} <{name}@example.org>",
        "To: user@example.com",
        f"Date: {when[:2]} Mar 2025 {when[3:]}:00 {zone}",
    ]
    lines += [f"Subject: {subject}"] * bool(subject) + [f"Message-ID: <{message_id}>"]
    lines += [f"References: {references}"] * bool(references) + [f"In-Reply-To: {in_reply_to}"] * bool(in_reply_to)
    return "\n".join(lines) + "\n\nthread body\n"


Message = tuple[str, bytes, tuple[str, ...], str]


def messages(*, variants: int = 14) -> list[Message]:
    """(name, message, flags, internal date as IMAP date-time) for every message of the corpus."""
    rng = random.Random(SEED)
    out: list[Message] = []

    def add(name: str, text: str) -> None:
        flags = rng.choice(FLAG_SETS)
        when = f'"{rng.randrange(1, 28):02d}-Apr-2025 {rng.randrange(24):02d}:{rng.randrange(60):02d}:00 +0000"'
        out.append((name, _line_ends(text, rng), flags, when))

    for shape in SHAPES:
        for variant in range(variants):
            add(f"{shape.__name__}-{variant}", shape(rng))
    for shape in SHAPES:
        base = shape(rng)
        for mutation in MUTATIONS:
            broken = mutation(base)
            if broken is not None and broken != base:
                add(f"{shape.__name__}+{mutation.__name__}", broken)
    for thread in THREADS:
        add(thread[0], thread_message(*thread))
    return out
