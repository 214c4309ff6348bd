"""Real command-line IMAP clients against a node: mbsync (isync) syncing a mailbox both ways, with
folders and flags, and curl's imap:// (LIST, SELECT with FETCH, SEARCH, APPEND), over STARTTLS with
the certificate verified."""

from __future__ import annotations

import imaplib
import re
import smtplib
import ssl
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.node.conftest import PASSWORD, RunningNode

USER = "user@example.com"


def note(number: int) -> bytes:
    return (
        f"From: alice@remote.test\r\nTo: {USER}\r\nSubject: sync {number}\r\n"
        f"Message-ID: <s{number}@remote.test>\r\n\r\nBody {number}\r\n"
    ).encode()


def deliver(node: RunningNode, *messages: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", node.port("smtp"), timeout=10) as client:
        for data in messages:
            client.sendmail("alice@remote.test", [USER], data)


def normalized(data: bytes) -> bytes:
    """mbsync keeps local mail with LF line ends and adds its own X-TUID header while syncing."""
    return re.sub(rb"(?m)^X-TUID: [^\n]*\n", b"", data.replace(b"\r\n", b"\n"))


def maildir_messages(folder: Path) -> dict[str, bytes]:
    """name -> bytes of every message in a Maildir folder (new/ and cur/)."""
    return {
        f.name: f.read_bytes() for sub in ("new", "cur") if (folder / sub).is_dir() for f in (folder / sub).iterdir()
    }


@pytest.fixture
def mbsync(tmp_path: Path, node: RunningNode, ca_file: Path):  # type: ignore[no-untyped-def]
    binary = require_tool("mbsync")
    local = tmp_path / "local"
    local.mkdir()
    config = tmp_path / "mbsyncrc"
    config.write_text(
        f"""IMAPAccount node
Host localhost
Port {node.port("imap")}
User {USER}
Pass "{PASSWORD}"
SSLType STARTTLS
CertificateFile {ca_file}

IMAPStore remote
Account node

MaildirStore local
Path {local}/
Inbox {local}/INBOX
SubFolders Verbatim

Channel sync
Far :remote:
Near :local:
Patterns *
Create Both
Expunge Both
SyncState *
"""
    )

    def run() -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [binary, "-c", str(config), "-a"], capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    return run, local


def test_mbsync_both_ways(node: RunningNode, mbsync, client_tls: ssl.SSLContext) -> None:  # type: ignore[no-untyped-def]
    run, local = mbsync
    deliver(node, note(1), note(2), note(3))
    run()
    pulled = maildir_messages(local / "INBOX")
    assert sorted(map(normalized, pulled.values())) == sorted(map(normalized, node.files.stored(USER)))
    assert (local / "Sent").is_dir() and (local / "Archive").is_dir()

    # Local changes: a new message in a new folder, one message marked seen, one deleted.
    seen, deleted = (next((local / "INBOX").glob(f"*/{name}")) for name in sorted(pulled)[:2])
    seen.rename(local / "INBOX" / "cur" / (seen.name.split(":")[0] + ":2,S"))  # Maildir flag S = \Seen
    deleted.unlink()
    for sub in ("cur", "new", "tmp"):
        (local / "Projects" / sub).mkdir(parents=True)
    (local / "Projects" / "new" / "1700000000.local.host").write_bytes(note(9))
    run()

    client = imaplib.IMAP4("127.0.0.1", node.port("imap"), timeout=10)
    client.starttls(ssl_context=client_tls)
    client.login(USER, PASSWORD)
    client.select("INBOX")
    typ, data = client.search(None, "ALL")
    assert len(data[0].split()) == 2  # the locally deleted message is gone on the server too
    _typ, data = client.search(None, "SEEN")
    assert len(data[0].split()) == 1
    client.select("Projects")
    _, data = client.fetch("1", "(BODY.PEEK[])")
    assert normalized(data[0][1]) == normalized(note(9))
    client.logout()

    # And a change on the server comes back down.
    deliver(node, note(4))
    run()
    assert len(maildir_messages(local / "INBOX")) == 3


@pytest.fixture
def curl() -> str:
    return require_tool("curl")


def curl_imap(curl: str, node: RunningNode, ca_file: Path, path: str, *extra: str) -> bytes:
    result = subprocess.run(
        [curl, "--silent", "--show-error", "--ssl-reqd", "--cacert", str(ca_file), "--user", f"{USER}:{PASSWORD}",
         f"imap://127.0.0.1:{node.port('imap')}/{path}", *extra],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def test_curl_list_fetch_search_append(curl: str, node: RunningNode, ca_file: Path, tmp_path: Path) -> None:
    deliver(node, note(1), note(2))
    listing = curl_imap(curl, node, ca_file, "")
    assert b'* LIST (\\HasNoChildren) "/" INBOX\r\n' in listing
    assert b"\\Sent" in listing
    body = curl_imap(curl, node, ca_file, "INBOX;UID=2")
    assert body.endswith(b"\r\n" + note(2))
    found = curl_imap(curl, node, ca_file, "INBOX?SUBJECT%20%22sync%201%22")
    assert found == b"* SEARCH 1\r\n"
    upload = tmp_path / "upload.eml"
    upload.write_bytes(note(5))
    curl_imap(curl, node, ca_file, "Drafts", "--upload-file", str(upload))
    body = curl_imap(curl, node, ca_file, "Drafts;UID=1")
    assert body == note(5)
