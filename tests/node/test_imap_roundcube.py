"""A real webmail's IMAP client against a live node: Roundcube's protocol library (rcube_imap_generic, Debian's
roundcube-core, unpacked into .venv by scripts/bootstrap) run by php-cli through tests/node/roundcube_client.php.
It uses each extension the node advertises as Roundcube does: the message list sorted on the server (SORT),
the threaded list (THREAD=REFERENCES), counts and the first and last UIDs (SEARCH RETURN, ESEARCH), a folder's
size (STATUS=SIZE), an attachment decoded by the server (BINARY), and the cache's quick resync after another
client changed flags and expunged (QRESYNC: SELECT (QRESYNC ...), UID FETCH (CHANGEDSINCE VANISHED)).

Each test checks what the library returned and, from its transcript, that it sent the extension's command
rather than a fallback. Not LIST-STATUS: Roundcube 1.6.5 cannot parse that answer under PHP 8 (see
roundcube_client.php); tests/node/test_imap_goimap.py has a client that uses it."""

from __future__ import annotations

import base64
import contextlib
import imaplib
import json
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.node.conftest import PASSWORD, RunningNode
from tests.node.test_imap import USER, connect

DRIVER = Path(__file__).with_name("roundcube_client.php")
LIBRARY = Path(sys.prefix) / "roundcube"  # scripts/bootstrap unpacks it into .venv
ATTACHMENT = bytes(range(256)) * 4  # binary: only a decoded BINARY[] gives it back as it was


def note(number: int, subject: str, *, day: int, references: str = "", body: str = "") -> bytes:
    refs = f"References: {references}\r\n" if references else ""
    return (
        f"From: sender{number}@example.org\r\nTo: {USER}\r\nSubject: {subject}\r\n"
        f"Date: {day:02d} Mar 2025 10:00:00 +0000\r\nMessage-ID: <r{number}@example.org>\r\n{refs}\r\n"
        f"body {number}{body}\r\n"
    ).encode()


def with_attachment(number: int) -> bytes:
    encoded = base64.encodebytes(ATTACHMENT).decode().replace("\n", "\r\n")
    return (
        f"From: sender{number}@example.org\r\nTo: {USER}\r\nSubject: Report\r\nDate: 03 Mar 2025 10:00:00 +0000\r\n"
        f"Message-ID: <r{number}@example.org>\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        "--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        f"{encoded}--b--\r\n"
    ).encode()


# APPEND order = UID order (1..6). Threads by References: 1 <- 2 <- 4, and 1 <- 5; 3 and 6 stand alone.
MESSAGES = (
    (note(1, "Plan", day=5), "(\\Seen)"),
    (note(2, "Re: Plan", day=7, references="<r1@example.org>"), "()"),
    (with_attachment(3), "(\\Seen \\Flagged)"),
    (note(4, "Re: Plan", day=8, references="<r1@example.org> <r2@example.org>", body=" and a longer body"), "()"),
    (note(5, "Re: Plan", day=6, references="<r1@example.org>"), "(\\Seen)"),
    (note(6, "Budget", day=1, body=" " + "x" * 500), "()"),
)


@pytest.fixture
def mailbox(node: RunningNode, client_tls: ssl.SSLContext) -> Iterator[imaplib.IMAP4]:
    """The user's INBOX holding MESSAGES, and a folder Archive with one; an imaplib session on it stays open."""
    client = connect(node, client_tls)
    for data, flags in MESSAGES:
        assert client.append("INBOX", flags, None, data)[0] == "OK"
    assert client.append("Archive", "()", None, note(7, "Old", day=2))[0] == "OK"
    yield client
    with contextlib.suppress(imaplib.IMAP4.abort, OSError):
        client.logout()


def roundcube(node: RunningNode, ca_file: Path, step: str, **extra: Any) -> dict[str, Any]:
    php = require_tool("php")
    if not (LIBRARY / "Roundcube" / "rcube_imap_generic.php").is_file():
        message = f"Roundcube's IMAP library is not in {LIBRARY} (scripts/bootstrap unpacks it)"
        pytest.fail(message)  # bootstrap always unpacks it beside php: never a skip
    request = {
        "lib": str(LIBRARY),
        "port": node.port("imap"),
        "user": USER,
        "password": PASSWORD,
        "cafile": str(ca_file),
        "folder": "INBOX",
        "step": step,
        **extra,
    }
    done = subprocess.run(
        [php, str(DRIVER)], input=json.dumps(request).encode(), capture_output=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace") + done.stdout.decode(errors="replace")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def sent(result: dict[str, Any], fragment: str) -> list[str]:
    """The command lines Roundcube sent that contain `fragment`."""
    return [line for line in result["sent"] if fragment in line]


def test_roundcube_sorts_threads_counts_and_lists_on_the_server(
    node: RunningNode, ca_file: Path, mailbox: imaplib.IMAP4
) -> None:
    result = roundcube(node, ca_file, "browse", attachment_uid=3)
    capabilities = result["capabilities"]
    assert capabilities["SORT"] and capabilities["ESEARCH"] and capabilities["LIST-STATUS"] and capabilities["BINARY"]
    assert "REFERENCES" in capabilities["THREAD"]

    # SORT: by the Date header (6, 3, 1, 5, 2, 4), by base subject (Budget, Plan*, Report), unseen by size.
    assert result["sorted_by_date"] == [6, 3, 1, 5, 2, 4]
    assert result["sorted_by_subject"] == [6, 1, 2, 4, 5, 3]  # ties in mailbox order (RFC 5256 §3)
    assert result["sorted_by_size_unseen"] == [2, 4, 6]
    assert sent(result, "UID SORT (DATE) US-ASCII ALL") and sent(result, "UID SORT (SIZE) US-ASCII UNSEEN")

    # THREAD=REFERENCES: 1 with its answers 2 (answered by 4) and 5; 3 and 6 alone, roots ordered by date.
    assert result["thread_count"] == 3
    assert result["thread_order"] == [6, 3, 1, 5, 2, 4]
    assert result["thread_tree"] == {"6": [], "3": [], "1": {"5": [], "2": {"4": []}}}
    assert sent(result, "UID THREAD REFERENCES US-ASCII ALL")

    # ESEARCH: RETURN (COUNT), RETURN (MIN MAX), and the plain list through RETURN (ALL).
    assert result["unseen_count"] == 3
    assert (result["uid_min"], result["uid_max"]) == (1, 6)
    assert result["flagged"] == [3]
    assert sent(result, "UID SEARCH RETURN (COUNT) UNSEEN") and sent(result, "UID SEARCH RETURN (MIN MAX) ALL")

    # The folder list, and STATUS with STATUS=SIZE.
    assert {"INBOX", "Archive", "Sent", "Drafts", "Trash", "Junk"} <= set(result["folders"])
    archive = {item: int(value) for item, value in result["archive_status"].items()}
    assert archive == {"MESSAGES": 1, "UNSEEN": 1, "SIZE": len(note(7, "Old", day=2))}
    assert sent(result, "STATUS Archive (MESSAGES UNSEEN SIZE)")
    assert int(result["status"]["MESSAGES"]) == 6 and int(result["status"]["UNSEEN"]) == 3

    # BINARY: the base64 attachment decoded by the server, byte for byte.
    assert base64.b64decode(result["attachment"]) == ATTACHMENT
    assert sent(result, "BINARY.PEEK[2]")


def test_roundcube_resyncs_with_qresync(node: RunningNode, ca_file: Path, mailbox: imaplib.IMAP4) -> None:
    remembered = roundcube(node, ca_file, "remember")
    assert remembered["capabilities"]["QRESYNC"] and remembered["capabilities"]["CONDSTORE"]
    assert remembered["uids"] == [1, 2, 3, 4, 5, 6]
    assert sent(remembered, "ENABLE QRESYNC")

    # Meanwhile another client (imaplib) flags 2, marks 4 seen, and expunges 5 and 6.
    mailbox.select("INBOX")
    assert mailbox.uid("STORE", "2", "+FLAGS", "(\\Flagged)")[0] == "OK"
    assert mailbox.uid("STORE", "4", "+FLAGS", "(\\Seen)")[0] == "OK"
    assert mailbox.uid("STORE", "5,6", "+FLAGS", "(\\Deleted)")[0] == "OK"
    assert mailbox.expunge()[0] == "OK"

    known = {key: remembered[key] for key in ("uidvalidity", "highestmodseq", "uids")}
    resync = roundcube(node, ca_file, "resync", known=known)
    qresync_select = sent(resync, "SELECT INBOX (QRESYNC (")
    assert qresync_select, resync["sent"]
    # SELECT (QRESYNC ...): the UIDs gone, and the flags of the messages changed since, in the SELECT answer.
    assert resync["vanished_on_select"] == "5:6"
    assert {uid: sorted(flags) for uid, flags in resync["changed_on_select"].items()} == {
        "2": ["\\Flagged"],
        "4": ["\\Seen"],
    }
    assert int(resync["highestmodseq"]) > int(remembered["highestmodseq"])
    # UID FETCH 1:* (FLAGS) (CHANGEDSINCE n VANISHED): the same, as a cache that did not resync on SELECT asks.
    assert sent(resync, f"(CHANGEDSINCE {remembered['highestmodseq']} VANISHED)")
    assert {uid: sorted(flags) for uid, flags in resync["changed_since"].items()} == {
        "2": ["FLAGGED"],
        "4": ["SEEN"],
    }
    assert resync["vanished_since"] == "5:6"
