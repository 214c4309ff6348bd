"""The node's IMAP answers against Dovecot's on the same mail (issue 16): the differential test.

Dovecot (bench.dovecot, a private instance on a temporary directory) and a node get the same APPENDs of the
corpus (tests/node/corpus.py: same flags, same internal dates, the line ends as generated), then the same
commands through imaplib: every FETCH item (FLAGS, INTERNALDATE, RFC822.SIZE, ENVELOPE, BODY,
BODYSTRUCTURE, BODY[] and its sections down to three levels with .MIME/.HEADER/.TEXT, HEADER.FIELDS and
partials), SEARCH keys, STORE, COPY, MOVE, EXPUNGE and LIST. Each answer compared is one check. The test
prints the agreement by category, asserts it reaches AGREEMENT, and that every difference left is one
of KNOWN_DIFFERENCES (documented with the RFC reasoning in docs/imap-compatibility.md): a new difference
fails it.
"""

from __future__ import annotations

import imaplib
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import dovecot
from tests.node import corpus
from tests.node.conftest import DOMAIN, PASSWORD, NodeFactory, free_ports, mailbox

AGREEMENT = 0.995  # issue 16's goal: checks agreeing / all checks
USER = f"user@{DOMAIN}"

# Every difference left, each (category, subject) with its reason: all are answers where the node is the
# better one, each reason explained with the RFC in docs/imap-compatibility.md. A category is the FETCH item,
# SEARCH key or command; the subject the corpus's message name, "*" for the commands that answer for the
# mailbox, and for SEARCH the messages only one server found ("node+a,b dovecot+c"), so a search that
# differs on one more message is a new difference. A difference not listed fails the test.
KNOWN_FILE = Path(__file__).with_name("imap_dovecot_known.json")
# MAILFLEET_IMAPDIFF_WRITE=1 rewrites KNOWN_FILE from a run, reasons by category prefix (and by corpus
# mutation for SEARCH): after a fix, to drop what now agrees. Review the diff: a new entry is a change of
# behaviour to justify in the doc, or a regression.
REASONS = (
    ("CREATE ", "create-existing"),
    ("LIST RETURN ", "list-return-attributes"),
    ("BINARY.SIZE", "binary-size"),
    ("SEARCH SENT", "sent-date-fallback"),
    ("SEARCH NOT SENT", "sent-date-fallback"),
    ("SEARCH ", "invalid-content-type"),
    ("BODY", "invalid-content-type"),
)
DOCUMENTED = frozenset(reason for _, reason in REASONS)

SECTIONS = (
    "", "HEADER", "TEXT", "1", "1.MIME", "1.HEADER", "1.TEXT", "2", "2.MIME", "2.HEADER", "2.TEXT", "3",
    "3.MIME", "1.1", "1.1.MIME", "1.2", "1.2.MIME", "2.1", "2.2", "2.1.MIME", "3.1", "1.1.1", "1.2.1",
    "1.2.2", "2.1.1", "2.2.1", "1.2.1.MIME", "HEADER.FIELDS (FROM TO CC SUBJECT DATE CONTENT-TYPE)",
    "HEADER.FIELDS.NOT (FROM TO MESSAGE-ID)", "1.HEADER.FIELDS (CONTENT-TYPE)", "2.HEADER.FIELDS (SUBJECT)",
)  # fmt: skip
PARTIALS = ("BODY.PEEK[]<0.64>", "BODY.PEEK[TEXT]<5.20>", "BODY.PEEK[1]<10.10>", "BODY.PEEK[]<100000.5>")
BINARIES = (  # RFC 3516
    "BINARY.PEEK[]", "BINARY.PEEK[1]", "BINARY.PEEK[2]", "BINARY.PEEK[1.1]", "BINARY.PEEK[1.2]", "BINARY.PEEK[2.1]",
    "BINARY.PEEK[1]<0.20>", "BINARY.SIZE[1]", "BINARY.SIZE[2]", "BINARY.SIZE[1.2]",
)  # fmt: skip
ITEMS = (
    "FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY", "BODYSTRUCTURE", "RFC822.HEADER",
    *(f"BODY.PEEK[{section}]" for section in SECTIONS), *PARTIALS, *BINARIES,
)  # fmt: skip
SEARCHES = (
    "ALL", "SEEN", "UNSEEN", "FLAGGED", "ANSWERED", "DRAFT", "KEYWORD $Label1", "UNKEYWORD $Label1",
    "SENTBEFORE 10-Mar-2025", "SENTSINCE 10-Mar-2025", "SENTON 2-Jan-2024", "SENTBEFORE 1-Jan-2000",
    "SENTSINCE 1-Jan-2000", "NOT SENTSINCE 1-Jan-2000", "BEFORE 10-Apr-2025", "SINCE 10-Apr-2025",
    "ON 12-Apr-2025", "SUBJECT plain", "SUBJECT café", "SUBJECT été", "FROM alice", "FROM MAILER-DAEMON",
    "TO list", "CC c2@example.org", "CC c1", "BCC nobody", "TEXT lorem", "TEXT invoice", "TEXT Köln",
    "TEXT Привет", "TEXT report.pdf", "TEXT VCALENDAR", "TEXT undelivered", "BODY meeting", "BODY Köln",
    "BODY Café", "BODY epilogue", "BODY Reporting-MTA", 'HEADER List-Id ""', "HEADER List-Id lists",
    'HEADER Content-Type multipart', "HEADER Date yesterday", 'HEADER X-Missing ""', "LARGER 1000",
    "SMALLER 600", "OR SEEN FLAGGED", "NOT TEXT lorem", "UID 5:20", "1:10,30:*",
)  # fmt: skip
# RFC 5256: SORT criteria (each over every message, and over a search) and THREAD algorithms.
SORTS = (
    "ARRIVAL", "REVERSE ARRIVAL", "DATE", "REVERSE DATE", "SUBJECT", "REVERSE SUBJECT", "FROM", "TO", "CC",
    "SIZE", "REVERSE SIZE", "SUBJECT DATE", "FROM REVERSE DATE", "CC REVERSE SUBJECT SIZE",
)  # fmt: skip
SORT_SEARCHES = ("ALL", "SEEN", "FROM example", "OR FLAGGED SUBJECT report")
THREADS = ("ORDEREDSUBJECT", "REFERENCES")
# RFC 4731 ESEARCH: (return options, criteria), for SEARCH and UID SEARCH.
ESEARCHES = (
    ("(MIN MAX COUNT ALL)", "SEEN"),
    ("()", "FLAGGED"),
    ("(COUNT)", "UNSEEN"),
    ("(MIN)", "TEXT lorem"),
    ("(MAX COUNT)", "NOT SEEN"),
    ("(ALL)", "SUBJECT nothing-has-this"),
    ("(MIN MAX)", "SUBJECT nothing-has-this"),
    ("(ALL)", "1:10,30:*"),
)  # fmt: skip (MODSEQ is left out: it enables CONDSTORE, and the servers count mod-sequences differently)
# RFC 5182 SEARCHRES: a search SAVEd, then commands on `$` (the answers compared step by step).
SEARCHRES = (
    ("SEARCH", "RETURN", "(SAVE)", "FLAGGED"), ("FETCH", "$", "(UID FLAGS)"), ("UID FETCH", "$", "(FLAGS)"),
    ("SEARCH", "RETURN", "(SAVE MIN MAX)", "SEEN"), ("FETCH", "$", "(UID)"), ("SEARCH", "UNSEEN", "OR", "$", "DRAFT"),
    ("UID SEARCH", "UID", "$"), ("SEARCH", "RETURN", "(SAVE COUNT)", "SUBJECT Plan"), ("SEARCH", "$"),
    ("SEARCH", "RETURN", "(SAVE)", "SUBJECT nothing-has-this"), ("FETCH", "$", "(UID)"), ("SEARCH", "NOT", "$"),
)  # fmt: skip
FOLDERS = ("Archive", "Sent", "Trash", "Work", "Work/Projects", "Caf&AOk-")

NAMESPACE = """\
namespace inbox {
  inbox = yes
  separator = /
""" + "".join(
    f"  mailbox {name} {{\n    auto = create\n    special_use = \\{name}\n  }}\n"
    for name in ("Sent", "Drafts", "Trash", "Junk", "Archive")
) + "}\n"  # fmt: skip


# -- reading imaplib's answers back into values -----------------------------------------------------


def _joined(data: list[Any]) -> bytes:
    """imaplib splits a response at its literals; put them back inline as {n}CRLF and the bytes."""
    out = b""
    for piece in data:
        if isinstance(piece, tuple):
            out += piece[0] + b"\r\n" + piece[1]
        elif piece is not None:
            out += piece + b"\n"
    return out


class _Parser:
    """IMAP values: atoms as str, quoted strings and literals as bytes (the same to a client), NIL as None."""

    def __init__(self, text: bytes) -> None:
        self.text, self.at = text, 0

    def skip(self) -> None:
        while self.at < len(self.text) and self.text[self.at : self.at + 1] in (b" ", b"\r", b"\n"):
            self.at += 1

    def value(self) -> Any:
        self.skip()
        char = self.text[self.at : self.at + 1]
        if char == b"(":
            self.at += 1
            items: list[Any] = []
            while True:
                self.skip()
                if self.text[self.at : self.at + 1] in (b")", b""):
                    self.at += 1
                    return items
                items.append(self.value())
        if char == b'"':
            end, out = self.at + 1, bytearray()
            while self.text[end : end + 1] != b'"':
                if self.text[end : end + 1] == b"\\":
                    end += 1
                out += self.text[end : end + 1]
                end += 1
            self.at = end + 1
            return bytes(out)
        if self.text[self.at : self.at + 2] == b"~{":  # RFC 3516 literal8: a literal that may hold NUL
            self.at += 1
            char = b"{"
        if char == b"{":
            close = self.text.index(b"}", self.at)
            size = int(self.text[self.at + 1 : close])
            start = self.text.index(b"\n", close) + 1
            self.at = start + size
            return self.text[start : start + size]
        start, depth = self.at, 0
        while self.at < len(self.text):
            c = self.text[self.at : self.at + 1]
            if c == b"[":
                depth += 1
            elif c == b"]":
                depth -= 1
            elif depth == 0 and c in (b" ", b")", b"(", b"\r", b"\n"):
                break
            self.at += 1
        atom = self.text[start : self.at].decode("latin-1")
        return None if atom.upper() == "NIL" else atom

    def value_list(self, count: int) -> list[Any]:
        return [self.value() for _ in range(count)]

    def fetches(self) -> dict[int, dict[str, Any]]:
        """`n (ITEM value ...)` lines: message number -> item name (upper case) -> value."""
        out: dict[int, dict[str, Any]] = {}
        while True:
            self.skip()
            if self.at >= len(self.text):
                return out
            number = int(self.value())
            items = self.value()
            record = out.setdefault(number, {})
            for name, value in zip(items[::2], items[1::2], strict=True):
                record[str(name).upper()] = value


# -- the two servers --------------------------------------------------------------------------------


class Server:
    """One server seen through imaplib, with the answers reduced to comparable values."""

    def __init__(self, name: str, port: int, login: str) -> None:
        self.name, self.port, self.login = name, port, login

    def connect(self) -> imaplib.IMAP4:
        client = imaplib.IMAP4("127.0.0.1", self.port, timeout=60)
        client.login(self.login, PASSWORD)
        return client

    def append_all(self, messages: list[corpus.Message]) -> None:
        client = self.connect()
        for _name, message, flags, when in messages:
            # imaplib.append would rewrite bare LFs to CRLF; the corpus's line ends go out as generated.
            client.literal = message  # type: ignore[assignment]  # typeshed says str; imaplib sends bytes
            typ, data = client._simple_command("APPEND", "INBOX", "(" + " ".join(flags) + ")", when)
            assert typ == "OK", (self.name, data)
        # A first SELECT takes \Recent away (Dovecot gives it to the first session only), so the compared
        # sessions see the same flags on both servers.
        client.select("INBOX")
        client.logout()


def _answer(client: imaplib.IMAP4, command: str, *args: str) -> tuple[str, Any]:
    try:
        typ, data = client._simple_command(command, *args)
    except imaplib.IMAP4.error as error:
        return "BAD", str(error)
    return typ, data


def _fetch(client: imaplib.IMAP4, item: str) -> tuple[str, dict[int, dict[str, Any]]]:
    typ, _ = _answer(client, "FETCH", "1:*", f"({item})")
    _, data = client._untagged_response(typ, None, "FETCH")
    return typ, _Parser(_joined([piece for piece in data if piece is not None])).fetches()


def _normalize(value: Any) -> Any:
    """Case-insensitive where IMAP is: atoms (attributes, content types in BODYSTRUCTURE come as strings)."""
    if isinstance(value, dict):  # a FETCH record; its FLAGS are a set
        return {k: sorted(_normalize(v)) if k == "FLAGS" else _fold(k, _normalize(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    if isinstance(value, str):
        return value.upper()
    return value


def _fold(item: str, value: Any) -> Any:
    """BODY and BODYSTRUCTURE's strings compared without case: RFC 2045 §5.1 makes type, subtype, parameter
    names and the transfer encoding case-insensitive (the node upper-cases them, Dovecot repeats the
    message's spelling), and no client tells them apart."""
    if item not in ("BODY", "BODYSTRUCTURE"):
        return value
    if isinstance(value, list):
        return [_fold(item, v) for v in value]
    return value.lower() if isinstance(value, bytes) else value


class Comparison:
    def __init__(self) -> None:
        self.checks: Counter[str] = Counter()
        self.agreed: Counter[str] = Counter()
        self.differences: list[tuple[str, str, Any, Any]] = []

    def check(self, category: str, subject: str, node: Any, reference: Any) -> None:
        self.checks[category] += 1
        if _normalize(node) == _normalize(reference):
            self.agreed[category] += 1
        else:
            self.differences.append((category, subject, node, reference))

    def report(self) -> str:
        total, agreed = sum(self.checks.values()), sum(self.agreed.values())
        lines = [f"IMAP agreement with Dovecot {dovecot.version()}: {agreed}/{total} = {agreed / total:.2%}"]
        for category in sorted(self.checks):
            if self.agreed[category] != self.checks[category]:
                lines.append(f"  {category}: {self.agreed[category]}/{self.checks[category]}")
        return "\n".join(lines)


def _known_differences() -> dict[tuple[str, str], str]:
    entries = json.loads(KNOWN_FILE.read_text(encoding="utf-8"))["differences"]
    return {(category, subject): reason for category, subject, reason in entries}


def _write_known(differences: list[tuple[str, str, Any, Any]]) -> None:
    entries = [
        [category, subject, next((reason for prefix, reason in REASONS if category.startswith(prefix)), "NEW")]
        for category, subject, _, _ in differences
    ]
    lines = ",\n".join(json.dumps(entry, ensure_ascii=False) for entry in sorted(entries))
    KNOWN_FILE.write_text('{"differences": [\n' + lines + "\n]}\n", encoding="utf-8")


# -- the test ---------------------------------------------------------------------------------------


@pytest.fixture
def dovecot_server() -> Iterator[Server]:
    if os.geteuid() != 0:
        pytest.skip("Dovecot's master runs as root: the differential test needs root")  # CI runs as root
    # Not under pytest's tmp_path: Dovecot's unprivileged processes must walk the directory.
    workdir = Path(tempfile.mkdtemp(prefix="mailfleet-imapdiff-"))
    workdir.chmod(0o755)
    try:
        instance = dovecot.setup(
            workdir,
            passwords={USER: "{PLAIN}" + PASSWORD},
            sessions=8,
            instance="mailfleet-imapdiff",
            extra=NAMESPACE,
            port=free_ports(1)[0],  # below the ephemeral range: no outgoing connection takes it first
        )
        with dovecot.running(instance) as running:
            yield Server("dovecot", instance.port, USER)
            assert dovecot.errors(instance.log_file) == [], running.died()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_the_node_answers_as_dovecot_does(node_factory: NodeFactory, dovecot_server: Server) -> None:
    running = node_factory([mailbox(USER)], imap={"allow_plaintext_login": True})
    node = Server("node", running.port("imap"), USER)
    messages = corpus.messages()
    names = [name for name, *_ in messages]
    for server in (node, dovecot_server):
        server.append_all(messages)
    clients = {server.name: server.connect() for server in (node, dovecot_server)}
    for client in clients.values():
        client.select("INBOX")
    result = Comparison()

    for item in ITEMS:
        answers = {name: _fetch(client, item) for name, client in clients.items()}
        result.check(f"FETCH {item} status", "*", answers["node"][0], answers["dovecot"][0])
        for number, name in enumerate(names, 1):
            result.check(item, name, answers["node"][1].get(number), answers["dovecot"][1].get(number))

    for key in SEARCHES:
        found = {}
        for name, client in clients.items():
            if key.isascii():
                typ, data = _answer(client, "SEARCH", key)
            else:  # the non-ASCII word as a literal, after CHARSET UTF-8
                field, word = key.split(" ", 1)
                client.literal = word.encode()  # type: ignore[assignment]  # typeshed says str; imaplib sends bytes
                typ, data = _answer(client, "SEARCH", "CHARSET", "UTF-8", field)
            _, hits = client._untagged_response(typ, data, "SEARCH")
            found[name] = (typ, sorted(int(n) for piece in hits if piece for n in piece.split()))
        node_found, dovecot_found = set(found["node"][1]), set(found["dovecot"][1])
        subject = "node+{} dovecot+{}".format(
            ",".join(names[n - 1] for n in sorted(node_found - dovecot_found)),
            ",".join(names[n - 1] for n in sorted(dovecot_found - node_found)),
        )
        result.check(f"SEARCH {key}", subject, found["node"], found["dovecot"])

    for options, criterion in ESEARCHES:
        for command in ("SEARCH", "UID SEARCH"):
            esearched: dict[str, Any] = {}
            for name, client in clients.items():
                typ, data = _answer(client, *command.split(), "RETURN", options, *criterion.split())
                _, lines = client._untagged_response(typ, data, "ESEARCH")
                esearched[name] = (typ, [re.sub(rb'^\(TAG "[^"]*"\) ?', b"", line) for line in lines if line])
            check = f"ESEARCH {command} RETURN {options} {criterion}"
            result.check(check, "*", esearched["node"], esearched["dovecot"])
    for number, (command, *args) in enumerate(SEARCHRES):
        saved: dict[str, Any] = {}
        for name, client in clients.items():
            typ, data = _answer(client, *command.split(), *args)
            responses = {
                response: [line for line in client._untagged_response(typ, data, response)[1] if line]
                for response in ("SEARCH", "ESEARCH", "FETCH")
            }
            responses["ESEARCH"] = [re.sub(rb'^\(TAG "[^"]*"\) ?', b"", line) for line in responses["ESEARCH"]]
            saved[name] = (typ, responses)
        result.check(f"SEARCHRES {number} {command} {' '.join(args)}", "*", saved["node"], saved["dovecot"])

    for criteria in SORTS:
        for criterion in SORT_SEARCHES:
            for command in ("SORT", "UID SORT"):
                found = {}
                for name, client in clients.items():
                    typ, data = _answer(client, *command.split(), f"({criteria})", "UTF-8", criterion)
                    found[name] = (typ, _numbers(client, typ, data, "SORT"))
                result.check(f"{command} ({criteria}) {criterion}", "*", found["node"], found["dovecot"])
    for algorithm in THREADS:
        for criterion in SORT_SEARCHES:
            for command in ("THREAD", "UID THREAD"):
                found = {}
                for name, client in clients.items():
                    typ, data = _answer(client, *command.split(), algorithm, "UTF-8", criterion)
                    _, threads = client._untagged_response(typ, data, "THREAD")
                    found[name] = (typ, [piece for piece in threads if piece])
                result.check(f"{command} {algorithm} {criterion}", "*", found["node"], found["dovecot"])

    # Changes: on a copy of the first 40 messages in a folder of their own, the same on both servers.
    answers_by_step: dict[str, dict[str, Any]] = {}
    for name, client in clients.items():
        for folder in FOLDERS:
            answers_by_step.setdefault(f"CREATE {folder}", {})[name] = _answer(client, "CREATE", folder)[0]
        steps = answers_by_step
        steps.setdefault("COPY", {})[name] = _copyuid(_answer(client, "COPY", "1:40", "Work"))
        client.select("Work")
        steps.setdefault("STORE +FLAGS", {})[name] = _flags(client, "1:5", "+FLAGS", "(\\Flagged $Work)")
        steps.setdefault("STORE -FLAGS.SILENT", {})[name] = _flags(client, "2", "-FLAGS.SILENT", "(\\Seen)")
        steps.setdefault("STORE FLAGS", {})[name] = _flags(client, "6:8", "FLAGS", "(\\Deleted \\Answered)")
        steps.setdefault("FETCH FLAGS after STORE", {})[name] = _fetch(client, "FLAGS")
        steps.setdefault("EXPUNGE", {})[name] = _expunged(client, _answer(client, "EXPUNGE"))
        steps.setdefault("MOVE", {})[name] = _expunged(client, _answer(client, "MOVE", "3:4,30", "Archive"))
        steps.setdefault("UID EXPUNGE-less CLOSE", {})[name] = _answer(client, "CLOSE")[0]
        for pattern in ("*", "%", "Work/%"):
            typ, data = _answer(client, "LIST", '""', pattern)
            _, lines = client._untagged_response(typ, data, "LIST")
            parsed = sorted(
                (str(sorted(_normalize(f) for f in flags)), delimiter, folder)
                for flags, delimiter, folder in (_Parser(line).value_list(3) for line in lines if line)
            )
            steps.setdefault(f"LIST {pattern}", {})[name] = (typ, parsed)
        typ, data = _answer(client, "STATUS", "Archive", "(MESSAGES UNSEEN)")
        steps.setdefault("STATUS", {})[name] = (typ, client._untagged_response(typ, data, "STATUS")[1])
        for folder in ("INBOX", "Archive", "Work"):  # RFC 8438 STATUS=SIZE
            typ, data = _answer(client, "STATUS", folder, "(SIZE MESSAGES)")
            steps.setdefault(f"STATUS {folder} SIZE", {})[name] = (typ, _statuses(client, typ, data))
        for pattern in ("*", "Work*"):  # RFC 5819 LIST-STATUS
            typ, data = _answer(client, "LIST", '""', pattern, "RETURN", "(STATUS (MESSAGES UNSEEN SIZE))")
            listed = [_Parser(line).value_list(3) for line in _untagged(client, typ, data, "LIST")]
            steps.setdefault(f"LIST-STATUS {pattern}", {})[name] = (
                typ, sorted(folder for _, _, folder in listed), _statuses(client, typ, data)
            )  # fmt: skip
            # The attributes apart: with RETURN options Dovecot leaves out those not asked for (known difference).
            steps.setdefault(f"LIST RETURN (STATUS) {pattern} attributes", {})[name] = sorted(
                (folder, sorted(_normalize(attributes))) for attributes, _, folder in listed
            )
    for step, answer in answers_by_step.items():
        result.check(step, "*", answer["node"], answer["dovecot"])
    for client in clients.values():
        client.logout()

    report = result.report()
    print(report)
    if os.environ.get("MAILFLEET_IMAPDIFF_WRITE"):
        _write_known(result.differences)
    known = _known_differences()
    assert set(known.values()) <= DOCUMENTED, "every known difference has a reason the doc explains"
    unknown = [d for d in result.differences if (d[0], d[1]) not in known]
    reasons = Counter(known[d[0], d[1]] for d in result.differences if (d[0], d[1]) in known)
    print("differences by reason:", dict(reasons))
    shown: Counter[str] = Counter()
    for category, subject, node_answer, reference in unknown:
        shown[category] += 1
        if shown[category] <= 2 and category.startswith("SEARCH "):  # the messages found by one server only
            node_only = sorted(set(node_answer[1]) - set(reference[1]))
            dovecot_only = sorted(set(reference[1]) - set(node_answer[1]))
            print(f"DIFF {category}\n  node only:    {[names[n - 1] for n in node_only]}")
            print(f"  dovecot only: {[names[n - 1] for n in dovecot_only]}")
        elif shown[category] <= 2:  # two examples of each new difference, from a little before where they part
            node_text, reference_text = repr(node_answer), repr(reference)
            at = next((i for i, (a, b) in enumerate(zip(node_text, reference_text, strict=False)) if a != b), 0)
            start = max(0, at - 100)
            print(f"DIFF {category} {subject} (at {at})\n  node:    {node_text[start : start + 700]}")
            print(f"  dovecot: {reference_text[start : start + 700]}")
    total, agreed = sum(result.checks.values()), sum(result.agreed.values())
    assert not unknown, f"{len(unknown)} differences not in KNOWN_DIFFERENCES\n{report}"
    assert agreed / total >= AGREEMENT, report


def _numbers(client: imaplib.IMAP4, typ: str, data: Any, response: str) -> list[int]:
    """The numbers of a SEARCH or SORT response, in order. In INBOX both servers give the appended
    messages the same UIDs (1 up, in APPEND order): UID SORT's answers compare as they are."""
    _, pieces = client._untagged_response(typ, data, response)
    return [int(n) for piece in pieces if piece for n in piece.split()]


def _untagged(client: imaplib.IMAP4, typ: str, data: Any, response: str) -> list[Any]:
    """The untagged responses of one kind, sorted: the order of STATUS and LIST lines is the server's."""
    return sorted(line for line in client._untagged_response(typ, data, response)[1] if line)


def _statuses(client: imaplib.IMAP4, typ: str, data: Any) -> list[tuple[Any, dict[str, str]]]:
    """STATUS responses as (mailbox, {item: value}): RFC 3501 §7.2.4 gives the items no order."""
    statuses = (_Parser(line).value_list(2) for line in _untagged(client, typ, data, "STATUS"))
    return sorted((mailbox, dict(zip(items[::2], items[1::2], strict=True))) for mailbox, items in statuses)


def _copyuid(answer: tuple[str, Any]) -> tuple[str, Any]:
    """COPYUID's UID sets (the UIDVALIDITY differs between any two servers)."""
    typ, data = answer
    text = b" ".join(piece for piece in data if isinstance(piece, bytes)).decode("latin-1")
    found = re.search(r"COPYUID \d+ (\S+) (\S+)\]", text)
    return typ, found.groups() if found else None


def _flags(client: imaplib.IMAP4, numbers: str, how: str, flags: str) -> tuple[str, Any]:
    typ, _ = _answer(client, "STORE", numbers, how, flags)
    _, data = client._untagged_response(typ, None, "FETCH")
    return typ, _Parser(_joined([piece for piece in data if piece is not None])).fetches()


def _expunged(client: imaplib.IMAP4, answer: tuple[str, Any]) -> tuple[str, list[int]]:
    """The messages expunged, by their number before the command: the order of EXPUNGE responses is the
    server's choice (RFC 3501 §7.4.1), the messages they remove are not."""
    _, data = client._untagged_response(answer[0], None, "EXPUNGE")
    numbers = list(range(1, 1000))
    gone = [numbers.pop(int(piece) - 1) for piece in data if piece is not None]
    return answer[0], sorted(gone)


def test_a_large_bare_lf_append_is_stored_as_dovecot_stores_it(
    node_factory: NodeFactory, dovecot_server: Server
) -> None:
    """A message over the node's streaming size (session.APPEND_CHUNK) with bare LF line ends, some CRLF
    split across the chunks: both servers serve it with CRLF and count those in RFC822.SIZE."""
    running = node_factory([mailbox(USER)], imap={"allow_plaintext_login": True})
    node = Server("node", running.port("imap"), USER)
    lines = [f"line {n:06d} of a long plain text body".encode() for n in range(6000)]
    body = b"".join(line + (b"\r\n" if n % 7 == 0 else b"\n") for n, line in enumerate(lines))
    message = b"From: a@example.org\nTo: user@example.com\nSubject: long\n\n" + body
    assert len(message) > 3 * 64 * 1024
    answers = {}
    for server in (node, dovecot_server):
        server.append_all([("long", message, (), '"01-Apr-2025 00:00:00 +0000"')])
        client = server.connect()
        client.select("INBOX")
        answers[server.name] = {item: _fetch(client, item) for item in ("RFC822.SIZE", "BODY.PEEK[]", "BODYSTRUCTURE")}
        client.logout()
    expected = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert answers["node"]["BODY.PEEK[]"][1][1]["BODY[]"] == expected
    assert answers["node"]["RFC822.SIZE"][1][1]["RFC822.SIZE"] == str(len(expected))
    assert _normalize(answers["node"]) == _normalize(answers["dovecot"])
