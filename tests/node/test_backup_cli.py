"""`mailnode backup`, `verify` and `restore` as an operator runs them (docs/backups.md, "Commands"), each
as its own process against a real node: a backup into a directory is named after the node and the point
in time, left with no partial file, verifies, restores whole into an empty data directory that a new
node then serves over IMAP; a gzip backup; a damaged copy fails verification naming the member; one
mailbox restored into the running node under another name, and again with nothing to do; the refusals
(an existing file, an unreachable node, a data directory with mail, options that do not go together),
each with exit status and message; progress only on a terminal."""

from __future__ import annotations

import imaplib
import os
import pty
import re
import ssl
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.node.conftest import PASSWORD, TRACE_BLOCK, NodeFactory, RunningNode
from tests.node.test_backup import COPY, MAILBOXES, OTHER, USER, deliver, message

STAMP = r"\d{8}T\d{6}Z"


def mailnode(*args: str, stderr: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailnode", *args], stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=120
    )


def url(node: RunningNode) -> str:
    return f"http://127.0.0.1:{node.port('http')}"


def inbox(node: RunningNode, client_tls: ssl.SSLContext, address: str = USER) -> list[bytes]:
    """The INBOX as IMAP serves it, in UID order, each message past the node's trace headers."""
    client = imaplib.IMAP4("127.0.0.1", node.port("imap"), timeout=30)
    try:
        client.starttls(ssl_context=client_tls)
        client.login(address, PASSWORD)
        typ, data = client.select("INBOX", readonly=True)
        assert typ == "OK", data
        if data[0] == b"0":
            return []
        typ, fetched = client.uid("FETCH", "1:*", "(BODY.PEEK[])")
        assert typ == "OK", fetched
        found = []
        for item in fetched:
            if isinstance(item, tuple):
                trace = TRACE_BLOCK.match(item[1])
                assert trace, item[1][:300]
                found.append(item[1][trace.end() :])
        return found
    finally:
        client.logout()


@pytest.fixture
def node(node_factory: NodeFactory) -> RunningNode:
    return node_factory(MAILBOXES, smtp={"check_inbound": False})


@pytest.fixture
def backup(node: RunningNode, tmp_path: Path) -> Path:
    """`mailnode backup --to DIR` of a node with three messages for user@ and one for other@."""
    deliver(node, "one", "two", "three")
    deliver(node, "four", to=OTHER)
    directory = tmp_path / "backups"
    directory.mkdir()
    done = mailnode("backup", "--to", str(directory), "--url", url(node))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no progress: stderr is not a terminal
    [written] = directory.iterdir()
    assert re.fullmatch(rf"mailnode-test-0-{STAMP}\.tar", written.name)
    assert re.fullmatch(
        rf"wrote {re.escape(str(written))}: \d mailboxes, 4 messages, {written.stat().st_size} bytes, "
        r"point in time \d{4}-\d\d-\d\dT[\d:.]+\+00:00\n",
        done.stdout,
    ), done.stdout
    assert written.stat().st_mode & 0o777 == 0o600
    return written


def test_backup_verify_and_restore_a_whole_node(
    backup: Path, node_factory: NodeFactory, tmp_path: Path, client_tls: ssl.SSLContext
) -> None:
    checked = mailnode("verify", str(backup))
    assert checked.returncode == 0, checked.stderr
    assert re.fullmatch(
        rf"{re.escape(str(backup))}: OK — \d mailboxes, 4 messages, queue 0, point in time \S+\n", checked.stdout
    ), checked.stdout
    data_dir = tmp_path / "restored" / "data"  # where node_factory(name="restored") keeps its data
    restored = mailnode("restore", "--from", str(backup), "--data-dir", str(data_dir))
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout.startswith(f"restored {backup} into {data_dir}: ")
    assert "4 messages, queue 0" in restored.stdout
    assert sorted(p.name for p in data_dir.iterdir()) == ["mail", "queue"]  # no .restore-* left

    again = node_factory(MAILBOXES, name="restored", smtp={"check_inbound": False})
    assert inbox(again, client_tls) == [message(tag) for tag in ("one", "two", "three")]
    assert inbox(again, client_tls, OTHER) == [message("four", OTHER)]


def test_a_path_ending_in_a_slash_is_a_directory_made_for_the_backup(node: RunningNode, tmp_path: Path) -> None:
    deliver(node, "one")
    directory = tmp_path / "new" / "backups"
    done = mailnode("backup", "--to", f"{directory}/", "--url", url(node))
    assert done.returncode == 0, done.stderr
    [written] = directory.iterdir()
    assert re.fullmatch(rf"mailnode-test-0-{STAMP}\.tar", written.name)
    assert done.stdout.startswith(f"wrote {written}: ")


def test_a_gzip_backup_to_a_file(node: RunningNode, tmp_path: Path) -> None:
    deliver(node, "one")
    target = tmp_path / "node.tar.gz"
    done = mailnode("backup", "--to", str(target), "--url", url(node))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {target}: ")
    assert target.read_bytes()[:2] == b"\x1f\x8b"
    assert not target.with_name("node.tar.gz.partial").exists()
    checked = mailnode("verify", str(target))
    assert checked.returncode == 0, checked.stderr
    assert ", 1 messages, queue 0," in checked.stdout


def test_a_damaged_copy_fails_verification_naming_the_member(backup: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.tar"
    copy.write_bytes(backup.read_bytes())
    with tarfile.open(copy) as tar:
        member = next(m for m in tar.getmembers() if "/INBOX/" in m.name)
    data = bytearray(copy.read_bytes())
    data[member.offset_data + 3] ^= 0x20
    copy.write_bytes(bytes(data))
    checked = mailnode("verify", str(copy))
    assert checked.returncode == 1
    assert checked.stdout == ""
    assert checked.stderr == f"mailnode verify: {copy}: member {member.name}: SHA-256 differs from the manifest's\n"
    assert mailnode("verify", str(backup)).returncode == 0  # the original is fine


def test_one_mailbox_restored_into_the_running_node(
    backup: Path, node: RunningNode, client_tls: ssl.SSLContext
) -> None:
    first = mailnode("restore", "--from", str(backup), "--mailbox", USER, "--as", COPY, "--url", url(node))
    assert first.returncode == 0, first.stderr
    assert first.stdout == f"restored 3 messages into {COPY} (0 already there)\n"
    assert inbox(node, client_tls, COPY) == inbox(node, client_tls, USER)
    again = mailnode("restore", "--from", str(backup), "--mailbox", USER, "--as", COPY, "--url", url(node))
    assert again.stdout == f"restored 0 messages into {COPY} (3 already there)\n"
    missing = mailnode("restore", "--from", str(backup), "--mailbox", "nobody@example.com", "--url", url(node))
    assert missing.returncode == 1
    assert missing.stderr.startswith(f"mailnode restore: POST {url(node)}/restore: 400 ")
    assert "nobody@example.com" in missing.stderr


def test_refusals(backup: Path, node: RunningNode, tmp_path: Path) -> None:
    exists = mailnode("backup", "--to", str(backup), "--url", url(node))
    assert (exists.returncode, exists.stderr) == (1, f"mailnode backup: {backup} exists; not overwriting a backup\n")

    unreachable = mailnode("backup", "--to", str(tmp_path / "x.tar"), "--url", "http://127.0.0.1:9")
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith("mailnode backup: cannot reach the node at http://127.0.0.1:9: ")
    assert not list(tmp_path.glob("x.tar*"))

    # the node's own data directory holds mail: a whole-node restore leaves it alone
    before = sorted(p.relative_to(node.files.data_dir) for p in node.files.data_dir.rglob("*"))
    refused = mailnode("restore", "--from", str(backup), "--data-dir", str(node.files.data_dir))
    assert refused.returncode == 1
    assert refused.stderr.startswith(f"mailnode restore: {node.files.data_dir}: ")
    assert "holds mailbox" in refused.stderr
    assert sorted(p.relative_to(node.files.data_dir) for p in node.files.data_dir.rglob("*")) == before

    mixed = mailnode("restore", "--from", str(backup), "--data-dir", str(tmp_path / "d"), "--as", COPY)
    assert mixed.returncode == 2
    assert "--as, --url, --config and --token-file go with --mailbox" in mixed.stderr
    neither = mailnode("restore", "--from", str(backup))
    assert neither.returncode == 2

    absent = mailnode("verify", str(tmp_path / "absent.tar"))
    assert (absent.returncode, absent.stderr) == (
        1,
        f"mailnode verify: {tmp_path / 'absent.tar'}: No such file or directory\n",
    )


def test_progress_only_on_a_terminal(backup: Path) -> None:
    controller, terminal = pty.openpty()
    try:
        try:
            checked = mailnode("verify", str(backup), stderr=terminal)
        finally:
            os.close(terminal)
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the terminal's other end is closed and everything was read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
    assert checked.returncode == 0
    assert re.search(rb"\rchecked [\d.]+ MB of [\d.]+ MB \(\d+%\)", shown), shown
    assert shown.endswith(b"\r\x1b[K")  # the line is gone before the summary
