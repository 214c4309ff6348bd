"""Archives of a running node (docs/backups.md, "Archives (node)"), through its admin port, and what
they bring back.

Aspects: GET /backup and POST /backups taken while several SMTP sessions keep delivering, each restored
whole into an empty data directory (noderestore.restore_node) and served by a new node: every message
acknowledged before the archive's point in time is there exactly once, byte for byte (what IMAP FETCH
returns and the file on disk, past the node's trace headers), the index agrees with the files, and the
outbound queue comes back; POST /restore brings one mailbox back under another name (folders, flags,
internal dates), skips everything when run again, and refuses a corrupted archive, an address not in
it and a target not on the node with 400 while the node goes on serving; POST /backups records
(202/200, 400 for a bad name, 404 for an unknown one) survive a restart, as Completed for a finished
archive and Failed for a partial one, and staging leftovers are removed at start; an archive waits for
a snapshot's hold; GET /backup and POST /restore are for loopback clients only; the metrics and
/status follow.

Staging while mail flows (the staging held at its linking step, after writes resumed, by the test):
SMTP is answered 250 and the archive holds exactly the point in time; an IMAP EXPUNGE completes, the
archive still holds the expunged message byte for byte and its file goes once the staging is done; a
folder RENAME waits for the staging and the archive has the folder under its old name; a listed file
gone missing fails the staging with a clear error while writes go on.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import hashlib
import imaplib
import json
import re
import shutil
import smtplib
import ssl
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from mailnode.admin.http import BackupOps, build_app
from mailnode.backup import archive, noderestore
from mailnode.metrics import NodeMetrics
from mailnode.store.mailboxes import MailboxUsage
from mailnode.store.staging import IndexCopy
from tests.node.conftest import TRACE_BLOCK, NodeFactory, RunningNode, mailbox, refused_from_the_pod_network
from tests.node.test_checkpoint import call, paused
from tests.node.test_imap import connect
from tests.node.test_outbound import submit, wait_for

USER, OTHER, COPY = "user@example.com", "other@example.com", "copy@example.com"
MAILBOXES = [mailbox(USER), mailbox(OTHER), mailbox(COPY)]
NO_DAV = {"dav_restored": 0, "dav_kept": 0}  # no calendars or contacts here (tests/node/test_dav_carried.py has them)


def message(tag: str, recipient: str = USER) -> bytes:
    body = "".join(f"line {n} of {tag}: {'y' * (n * 31 % 200)}\r\n" for n in range(20))
    return (
        f"Message-ID: <{tag}@backup.test>\r\nFrom: <alice@remote.test>\r\nTo: <{recipient}>\r\n"
        f"Subject: backup {tag}\r\n\r\n{body}"
    ).encode()


def deliver(node: RunningNode, *tags: str, to: str = USER) -> None:
    with smtplib.SMTP("127.0.0.1", node.port("smtp"), timeout=10) as client:
        for tag in tags:
            client.sendmail("alice@remote.test", [to], message(tag, to))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def without_trace(stored: bytes) -> bytes:
    """A stored message as it was sent: past the Return-Path and Received headers the node adds."""
    trace = TRACE_BLOCK.match(stored)
    assert trace, stored[:300]
    return stored[trace.end() :]


def stream_backup(node: RunningNode, dest: Path) -> dict[str, str]:
    """GET /backup into dest, as `mailnode backup` does; returns the response headers."""
    url = f"http://127.0.0.1:{node.port('http')}/backup"
    with urllib.request.urlopen(url, timeout=120) as response, dest.open("wb") as out:
        assert response.status == 200
        shutil.copyfileobj(response, out)
        return dict(response.headers.items())


def backup_record(node: RunningNode, name: str) -> dict[str, Any]:
    status, body = call(node, "GET", f"/backups/{name}")
    assert status == 200, body
    record: dict[str, Any] = body
    return record


def finished(node: RunningNode, name: str) -> dict[str, Any]:
    wait_for(f"archive {name} to finish", lambda: backup_record(node, name)["state"] != "Running", timeout=60)
    return backup_record(node, name)


def fetch_all(client: imaplib.IMAP4, folder: str) -> list[tuple[bytes, bytes, bytes]]:
    """(flags, internal date, bytes) of every message of a folder, in UID order."""
    typ, data = client.select(f'"{folder}"', readonly=True)
    assert typ == "OK", data
    if data[0] == b"0":
        return []
    typ, fetched = client.uid("FETCH", "1:*", "(FLAGS INTERNALDATE BODY.PEEK[])")
    assert typ == "OK", fetched
    found = []
    for item in fetched:
        if isinstance(item, tuple):
            head = item[0]
            flags = re.search(rb"FLAGS \(([^)]*)\)", head)
            date = re.search(rb'INTERNALDATE "([^"]+)"', head)
            assert flags and date, head
            found.append((flags.group(1), date.group(1), item[1]))
    return found


def status_messages(client: imaplib.IMAP4, folder: str) -> int:
    typ, data = client.status(f'"{folder}"', "(MESSAGES)")
    assert typ == "OK"
    raw = data[0]
    assert isinstance(raw, bytes)
    found = re.search(rb"MESSAGES (\d+)", raw)
    assert found, raw
    return int(found.group(1))


# -- archives of a node under load, restored whole ---------------------------------------------------


class Senders:
    """Threads that each keep one SMTP session delivering new messages, alternating two mailboxes, and
    record when each 250 arrived; a 451 (checkpoint in progress) is retried, as an MTA would."""

    def __init__(self, node: RunningNode, count: int) -> None:
        self.acknowledged: list[tuple[str, bytes, float]] = []  # (recipient, bytes sent, time of the 250)
        self.sent: dict[str, set[str]] = collections.defaultdict(set)  # recipient -> every SHA-256 tried
        self.retried = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._run, args=(node, n)) for n in range(count)]
        for thread in self._threads:
            thread.start()

    def _run(self, node: RunningNode, n: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", node.port("smtp"), timeout=60) as client:
                number = 0
                while not self._stop.is_set():
                    recipient = (USER, OTHER)[number % 2]
                    data = message(f"load-{n}-{number}", recipient)
                    with self._lock:
                        self.sent[recipient].add(sha256(data))
                    try:
                        client.sendmail("alice@remote.test", [recipient], data)
                    except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as error:
                        assert error.smtp_code == 451, error
                        with self._lock:
                            self.retried += 1
                        time.sleep(0.005)
                        continue
                    with self._lock:
                        self.acknowledged.append((recipient, data, time.time()))
                    number += 1
        except BaseException as error:
            self._errors.append(error)

    def count(self) -> int:
        with self._lock:
            return len(self.acknowledged)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        assert not self._errors, self._errors


def check_restored(
    restored: RunningNode, client_tls: ssl.SSLContext, senders: Senders, point_in_time: datetime.datetime
) -> int:
    """Every message acknowledged before the point in time is in the restored node exactly once, byte for
    byte, and the index agrees with the files. Returns how many messages the restored node holds."""
    before = point_in_time.timestamp()
    total = 0
    for address in (USER, OTHER):
        client = connect(restored, client_tls, address)
        try:
            fetched = [data for _, _, data in fetch_all(client, "INBOX")]
            on_disk = restored.files.stored(address)
            assert status_messages(client, "INBOX") == len(fetched) == len(on_disk)
        finally:
            client.logout()
        assert sorted(fetched) == sorted(on_disk)  # IMAP serves the files byte for byte
        held = collections.Counter(sha256(without_trace(data)) for data in fetched)
        assert all(n == 1 for n in held.values()), "a message restored twice"
        assert set(held) <= senders.sent[address], "a message that was never sent"
        acknowledged = {sha256(data) for rcpt, data, at in senders.acknowledged if rcpt == address and at < before}
        missing = acknowledged - set(held)
        assert not missing, f"{address}: {len(missing)} message(s) acknowledged before {point_in_time} are missing"
        total += len(fetched)
    return total


def test_archives_taken_under_load_restore_every_acknowledged_message(
    node_factory: NodeFactory, client_tls: ssl.SSLContext, refusing_port: int, tmp_path: Path
) -> None:
    settings: dict[str, Any] = {
        "smtp": {"check_inbound": False, "transports": {"remote.test": f"127.0.0.1:{refusing_port}"}},
    }
    node = node_factory(MAILBOXES, **settings)
    submit(node, client_tls, ["friend@remote.test"])  # stays queued: nothing answers for remote.test
    [queued] = json.loads(node.http_get("/queue")[1])
    senders = Senders(node, 4)
    try:
        wait_for("mail to flow", lambda: senders.count() >= 40, timeout=60)
        headers = stream_backup(node, tmp_path / "streamed.tar")
        status, record = call(node, "POST", "/backups", {"name": "under-load"})
        assert status == 202, record
        assert record["state"] == "Running"
        record = finished(node, "under-load")
        assert record["state"] == "Completed", record
        after = senders.count()
        wait_for("mail to flow on after the archives", lambda: senders.count() >= after + 20, timeout=60)
    finally:
        senders.stop()

    streamed_at = datetime.datetime.fromisoformat(headers["X-Mailfleet-Point-In-Time"])
    written_at = datetime.datetime.fromisoformat(record["point_in_time"])
    assert streamed_at < written_at
    for number, (path, point_in_time) in enumerate(
        [(tmp_path / "streamed.tar", streamed_at), (Path(record["path"]), written_at)]
    ):
        summary = archive.verify(path)
        assert summary.point_in_time == point_in_time
        assert summary.node == "test-0"
        assert summary.queued == 1
        if number == 0:
            assert summary.messages == int(headers["X-Mailfleet-Messages"])
            with tarfile.open(path) as tar:  # the bytes of the mail and queue files, without header and manifest
                payload = sum(m.size for m in tar if m.name not in (archive.HEADER, archive.MANIFEST))
            assert payload == int(headers["X-Mailfleet-Bytes"])
        else:
            assert (record["messages"], record["mailboxes"]) == (summary.messages, len(summary.mailboxes))
            assert record["bytes"] == path.stat().st_size
        noderestore.restore_node(path, tmp_path / f"restored-{number}" / "data")
        restored = node_factory(MAILBOXES, name=f"restored-{number}", **settings)
        assert check_restored(restored, client_tls, senders, point_in_time) == summary.messages
        assert [m["id"] for m in json.loads(restored.http_get("/queue")[1])] == [queued["id"]]
        restored.stop()
    assert not (node.files.data_dir / ".staging").exists() or not any((node.files.data_dir / ".staging").iterdir())
    assert node.metric("mailnode_backups_total", result="ok") == 2
    assert node.metric("mailnode_checkpoints_total", result="ok") == 2
    assert node.metric("mailnode_writes_paused") == 0


# -- one mailbox through POST /restore ----------------------------------------------------------------


@pytest.fixture
def node(node_factory: NodeFactory) -> RunningNode:
    return node_factory(MAILBOXES, smtp={"check_inbound": False})


@pytest.fixture
def archived(node: RunningNode, client_tls: ssl.SSLContext, tmp_path: Path) -> Path:
    """An archive of user@ with three messages in INBOX (one answered) and one in Projects/2026 (seen,
    flagged, with its own internal date)."""
    deliver(node, "one", "two", "three")
    client = connect(node, client_tls)
    try:
        assert client.create('"Projects/2026"')[0] == "OK"
        date = imaplib.Time2Internaldate(datetime.datetime(2025, 3, 4, 5, 6, 7, tzinfo=datetime.UTC))
        assert client.append('"Projects/2026"', "(\\Seen \\Flagged)", date, message("filed"))[0] == "OK"
        client.select("INBOX")
        assert client.store("1", "+FLAGS", "(\\Answered)")[0] == "OK"
    finally:
        client.logout()
    path = tmp_path / "user.tar"
    stream_backup(node, path)
    return path


def folders(node: RunningNode, client_tls: ssl.SSLContext, address: str) -> dict[str, list[tuple[bytes, bytes, bytes]]]:
    client = connect(node, client_tls, address)
    try:
        return {name: fetch_all(client, name) for name in ("INBOX", "Projects/2026")}
    finally:
        client.logout()


def test_a_mailbox_restored_under_another_name(node: RunningNode, archived: Path, client_tls: ssl.SSLContext) -> None:
    status, body = call(node, "POST", "/restore", {"archive": str(archived), "mailbox": USER, "as": COPY})
    assert status == 200, body
    assert body == {"mailbox": COPY, "restored": 4, "skipped": 0, **NO_DAV}

    original, copy = folders(node, client_tls, USER), folders(node, client_tls, COPY)
    assert copy == original  # the same bytes, flags and internal dates, folder by folder
    assert b"\\Answered" in copy["INBOX"][0][0]
    [(flags, date, data)] = copy["Projects/2026"]
    assert sorted(flags.split()) == [b"\\Flagged", b"\\Seen"]
    assert date == b"04-Mar-2025 05:06:07 +0000"
    assert data == message("filed")  # APPEND stores the bytes as given

    status, body = call(node, "POST", "/restore", {"archive": str(archived), "mailbox": USER, "as": COPY})
    assert (status, body) == (200, {"mailbox": COPY, "restored": 0, "skipped": 4, **NO_DAV})  # nothing twice
    assert folders(node, client_tls, COPY) == original


def test_a_restore_into_the_same_mailbox_brings_back_only_what_is_gone(
    node: RunningNode, archived: Path, client_tls: ssl.SSLContext
) -> None:
    client = connect(node, client_tls)
    try:
        client.select("INBOX")
        client.store("2", "+FLAGS", "(\\Deleted)")
        client.expunge()
    finally:
        client.logout()
    status, body = call(node, "POST", "/restore", {"archive": str(archived), "mailbox": USER})
    assert (status, body) == (200, {"mailbox": USER, "restored": 1, "skipped": 3, **NO_DAV})
    assert sorted(without_trace(d) for _, _, d in folders(node, client_tls, USER)["INBOX"]) == sorted(
        message(tag) for tag in ("one", "two", "three")
    )


def test_a_corrupted_archive_is_refused(node: RunningNode, archived: Path, client_tls: ssl.SSLContext) -> None:
    with tarfile.open(archived) as tar:
        member = next(m for m in tar.getmembers() if "/INBOX/" in m.name)
    with archived.open("r+b") as file:  # flip one byte of a message
        file.seek(member.offset_data + 20)
        byte = file.read(1)
        file.seek(member.offset_data + 20)
        file.write(bytes([byte[0] ^ 0x01]))

    status, body = call(node, "POST", "/restore", {"archive": str(archived), "mailbox": USER, "as": COPY})

    assert status == 400
    assert str(archived) in body["error"] and member.name in body["error"], body
    client = connect(node, client_tls, COPY)
    try:
        assert status_messages(client, "INBOX") == 0  # nothing restored
    finally:
        client.logout()
    assert node.http_get("/healthz") == (200, b"ok\n")


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"mailbox": USER}, "'archive' must be a non-empty string"),
        ({"archive": "ARCHIVE"}, "'mailbox' must be a non-empty string"),
        (
            {"archive": "ARCHIVE", "mailbox": "nobody@example.com", "as": COPY},
            "nobody@example.com is not in the archive",
        ),
        ({"archive": "ARCHIVE", "mailbox": USER, "as": "ghost@example.com"}, "ghost@example.com is not a mailbox"),
        ({"archive": "/nonexistent/backup.tar", "mailbox": USER}, "/nonexistent/backup.tar"),
        ({"archive": "NOT_A_TAR", "mailbox": USER}, "NOT_A_TAR"),
    ],
)
def test_a_restore_that_cannot_be_done_is_refused(
    node: RunningNode, archived: Path, body: dict[str, str], error: str
) -> None:
    junk = archived.with_name("junk.tar")
    junk.write_bytes(b"this is not an archive\n" * 100)
    substitutes = {"ARCHIVE": str(archived), "NOT_A_TAR": str(junk)}
    request = {key: substitutes.get(value, value) for key, value in body.items()}
    status, answer = call(node, "POST", "/restore", request)
    assert status == 400
    assert substitutes.get(error, error) in answer["error"], answer
    assert node.http_get("/healthz") == (200, b"ok\n")


def test_a_restore_body_must_be_a_json_object(node: RunningNode) -> None:
    url = f"http://127.0.0.1:{node.port('http')}/restore"
    for data in (b"not json", b"[1, 2]"):
        request = urllib.request.Request(url, data=data, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 400
        assert "error" in json.loads(refused.value.read())


# -- POST /backups records -------------------------------------------------------------------------------


def test_backup_records_survive_a_restart(node_factory: NodeFactory, tmp_path: Path) -> None:
    node = node_factory(MAILBOXES, smtp={"check_inbound": False}, backup={"dir": str(tmp_path / "archives")})
    deliver(node, "a", "b")
    status, body = call(node, "POST", "/backups", {"name": "nightly-1"})
    assert status == 202
    assert body["name"] == "nightly-1" and body["error"] is None
    record = finished(node, "nightly-1")
    path = tmp_path / "archives" / "nightly-1.tar"
    assert record == {
        "name": "nightly-1",
        "state": "Completed",
        "path": str(path),
        "point_in_time": record["point_in_time"],
        "mailboxes": 1,
        "messages": 2,
        "bytes": path.stat().st_size,
        "error": None,
    }
    assert archive.verify(path).messages == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["nightly-1.tar"]  # no partial left
    assert call(node, "POST", "/backups", {"name": "nightly-1"}) == (200, record)  # posting again is safe
    assert node.metric("mailnode_backups_total", result="ok") == 1
    assert node.metric("mailnode_backup_bytes") == path.stat().st_size
    assert node.metric("mailnode_backup_last_success_timestamp_seconds") > 0
    last = json.loads(node.http_get("/status")[1])["backup"]["last"]
    assert (last["name"], last["state"], last["bytes"]) == ("nightly-1", "Completed", path.stat().st_size)

    node.stop()
    (path.parent / "crashed.tar.partial").write_bytes(b"half an archive")
    leftover = node.files.data_dir / ".staging" / "123-abc" / "mail"
    leftover.mkdir(parents=True)
    again = RunningNode(node.files)  # the node restarted
    try:
        assert backup_record(again, "nightly-1") == record  # read back from the archive's manifest
        crashed = backup_record(again, "crashed")
        assert crashed["state"] == "Failed"
        assert crashed["error"] == "the node restarted while writing the archive"
        assert call(again, "POST", "/backups", {"name": "crashed"}) == (200, crashed)
        assert call(again, "GET", "/backups/never")[0] == 404
        assert not (node.files.data_dir / ".staging").exists()
    finally:
        again.stop()


def test_delete_removes_an_archive_and_its_record(node_factory: NodeFactory, tmp_path: Path) -> None:
    """DELETE /backups/{name}, what the operator's retention calls: the file goes, the name is unknown after."""
    node = node_factory(MAILBOXES, smtp={"check_inbound": False}, backup={"dir": str(tmp_path / "archives")})
    deliver(node, "a")
    assert call(node, "POST", "/backups", {"name": "old-1"})[0] == 202
    record = finished(node, "old-1")
    assert record["state"] == "Completed"
    (tmp_path / "archives" / "crashed.tar.partial").write_bytes(b"half an archive")  # a failed one, left over
    status, body = call(node, "DELETE", "/backups/old-1")
    assert (status, body) == (200, {**record, "deleted": True})
    assert call(node, "DELETE", "/backups/crashed")[0] == 200
    assert sorted(p.name for p in (tmp_path / "archives").iterdir()) == []
    assert call(node, "GET", "/backups/old-1")[0] == 404
    status, body = call(node, "DELETE", "/backups/old-1")
    assert (status, body) == (404, {"error": "no backup named 'old-1'"})
    deliver(node, "b")  # the node goes on serving
    assert len(node.files.stored(USER)) == 2


@pytest.mark.parametrize(
    "body",
    [{"name": "Nightly"}, {"name": "-x"}, {"name": "x-"}, {"name": "a/b"}, {"name": "x" * 254}, {"name": 7}, {}],
)
def test_a_bad_backup_name_is_refused(node: RunningNode, body: dict[str, Any]) -> None:
    status, answer = call(node, "POST", "/backups", body)
    assert status == 400
    assert "name must be lower-case letters" in answer["error"]


def test_the_longest_names_are_fine(node: RunningNode) -> None:
    for name in ("a" * 253, "a" * 252 + "b"):  # too long for a file name with .tar.partial
        status, _ = call(node, "POST", "/backups", {"name": name})
        assert status == 202
        record = finished(node, name)
        assert record["state"] == "Completed", record
        assert len(Path(record["path"]).name) == 255 - len(".partial")
        assert archive.verify(Path(record["path"])).messages == 0
    assert len(list((node.files.data_dir / "backups").iterdir())) == 2


# -- staging while mail flows ------------------------------------------------------------------------------


class HeldStaging:
    """A GET /backup in a thread whose staging the test holds at its linking step: the indexes are copied,
    the point in time taken, writes resumed and the store pinned, and no message file is linked yet."""

    def __init__(self, node: RunningNode, monkeypatch: pytest.MonkeyPatch, dest: Path) -> None:
        self.dest = dest
        self.linking = threading.Event()  # set once the staging has reached its linking step
        self._release = threading.Event()
        self.outcome: list[dict[str, str] | tuple[int, Any]] = []  # the headers, or (status, body) of a failure
        staging = node.node.store.staging
        link_files = staging.link_files

        async def held(copies: list[IndexCopy]) -> dict[str, MailboxUsage]:
            self.linking.set()
            await asyncio.get_running_loop().run_in_executor(None, self._release.wait, 60)
            return await link_files(copies)

        monkeypatch.setattr(staging, "link_files", held)
        self._thread = threading.Thread(target=self._backup, args=(node,))
        self._thread.start()
        assert self.linking.wait(60), "the staging did not reach its linking step"

    def _backup(self, node: RunningNode) -> None:
        try:
            self.outcome.append(stream_backup(node, self.dest))
        except urllib.error.HTTPError as error:
            self.outcome.append((error.code, json.loads(error.read())))

    def release(self) -> None:
        self._release.set()

    def finish(self) -> dict[str, str] | tuple[int, Any]:
        """Let the staging link its files; the response's headers, or (status, body) when it failed."""
        self._release.set()
        self._thread.join(60)
        assert not self._thread.is_alive() and len(self.outcome) == 1
        return self.outcome[0]


@pytest.fixture
def held_staging(
    node: RunningNode, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Callable[[], HeldStaging]]:
    """Starts a HeldStaging of `node` (into tmp_path/archive.tar); released at the end of the test whatever
    happened, so the node can stop."""
    started: list[HeldStaging] = []

    def start() -> HeldStaging:
        started.append(HeldStaging(node, monkeypatch, tmp_path / "archive.tar"))
        return started[-1]

    yield start
    for staging in started:
        staging.release()


def pinned(node: RunningNode) -> bool:
    return node.node.store.staging.pinned


def mailbox_dir(node: RunningNode, address: str = USER) -> Path:
    local, _, domain = address.partition("@")
    return node.files.data_dir / "mail" / domain / local


def message_file(node: RunningNode, tag: str, address: str = USER) -> Path:
    """The file of the message delivered with this tag."""
    marker = f"Message-ID: <{tag}@backup.test>".encode()
    [found] = [
        f
        for f in mailbox_dir(node, address).glob("*/*/*")
        if f.parent.name in ("new", "cur") and marker in f.read_bytes()
    ]
    return found


def archived_messages(path: Path, address: str = USER, folder: str = "INBOX") -> dict[str, bytes]:
    """The message members of one folder of an archive: name -> bytes."""
    local, _, domain = address.partition("@")
    prefix = f"mail/{domain}/{local}/{folder}/"
    with tarfile.open(path) as tar:
        found = {}
        for member in tar.getmembers():
            if member.isfile() and member.name.startswith(prefix):
                extracted = tar.extractfile(member)
                assert extracted is not None
                found[member.name] = extracted.read()
        return found


def test_smtp_is_answered_250_while_the_staging_links_and_the_archive_is_the_point_in_time(
    node: RunningNode, held_staging: Callable[[], HeldStaging], tmp_path: Path
) -> None:
    deliver(node, "before-1", "before-2", "before-3")
    staging = held_staging()
    assert pinned(node) and not paused(node)
    with smtplib.SMTP("127.0.0.1", node.port("smtp"), timeout=10) as client:
        client.ehlo("remote.test")
        for tag in ("during-1", "during-2"):
            assert client.mail("alice@remote.test")[0] == 250
            assert client.rcpt(USER)[0] == 250
            assert client.data(message(tag))[0] == 250  # not 451: writes are not paused while linking
    assert len(node.files.stored(USER)) == 5
    assert node.metric("mailnode_smtp_messages_rejected_total", listener="smtp", reason="checkpoint") == 0

    headers = staging.finish()

    assert isinstance(headers, dict)
    summary = archive.verify(tmp_path / "archive.tar")
    assert summary.messages == int(headers["X-Mailfleet-Messages"]) == 3
    archived = sorted(without_trace(data) for data in archived_messages(tmp_path / "archive.tar").values())
    assert archived == sorted(message(tag) for tag in ("before-1", "before-2", "before-3"))
    assert not pinned(node)
    assert node.metric("mailnode_checkpoints_total", result="ok") == 1
    assert node.metric("mailnode_checkpoint_pause_seconds_count") == 1


def test_an_expunge_while_the_staging_links_keeps_the_file_for_the_archive(
    node: RunningNode, client_tls: ssl.SSLContext, held_staging: Callable[[], HeldStaging], tmp_path: Path
) -> None:
    deliver(node, "kept", "expunged")
    expunged = message_file(node, "expunged")
    original = expunged.read_bytes()
    staging = held_staging()

    client = connect(node, client_tls)
    try:
        assert client.select("INBOX")[0] == "OK"
        assert client.store("2", "+FLAGS", "(\\Deleted)")[0] == "OK"
        assert client.expunge() == ("OK", [b"2"])  # done at once, not held by the staging
        assert status_messages(client, "INBOX") == 1
    finally:
        client.logout()
    assert expunged.read_bytes() == original  # kept on disk while the staging is pinned

    headers = staging.finish()

    assert isinstance(headers, dict)
    assert archive.verify(tmp_path / "archive.tar").messages == 2
    member = expunged.relative_to(node.files.data_dir).as_posix()
    assert archived_messages(tmp_path / "archive.tar")[member] == original  # byte for byte
    assert not expunged.exists()  # gone from the mailbox once the staging was done
    assert [without_trace(data) for data in node.files.stored(USER)] == [message("kept")]


def test_a_folder_rename_waits_for_the_staging(
    node: RunningNode, client_tls: ssl.SSLContext, held_staging: Callable[[], HeldStaging], tmp_path: Path
) -> None:
    filed = [message(f"filed-{n}") for n in range(3)]
    client = connect(node, client_tls)
    try:
        assert client.create("Projects")[0] == "OK"
        for data in filed:
            assert client.append("Projects", None, None, data)[0] == "OK"
    finally:
        client.logout()
    staging = held_staging()

    renamer = connect(node, client_tls)
    renamed: list[tuple[str, Any]] = []
    thread = threading.Thread(target=lambda: renamed.append(renamer.rename("Projects", "Renamed")))
    thread.start()
    wait_for("the RENAME to wait for the staging", lambda: node.node.store.staging.pin_waiting == 1)
    assert thread.is_alive() and renamed == []
    assert (mailbox_dir(node) / "Projects").is_dir()
    deliver(node, "meanwhile")  # other writes go on

    headers = staging.finish()

    assert isinstance(headers, dict)
    thread.join(30)
    assert renamed and renamed[0][0] == "OK", renamed
    renamer.logout()
    assert not (mailbox_dir(node) / "Projects").exists()
    assert sorted(node.files.stored(USER, "Renamed")) == sorted(filed)
    # The archive has the folder under its old name, with all its messages.
    assert sorted(archived_messages(tmp_path / "archive.tar", folder="Projects").values()) == sorted(filed)
    status, body = call(
        node, "POST", "/restore", {"archive": str(tmp_path / "archive.tar"), "mailbox": USER, "as": COPY}
    )
    assert (status, body) == (200, {"mailbox": COPY, "restored": 3, "skipped": 0, **NO_DAV})
    client = connect(node, client_tls, COPY)
    try:
        assert sorted(data for _, _, data in fetch_all(client, "Projects")) == sorted(filed)
        assert client.select("Renamed")[0] == "NO"
    finally:
        client.logout()


def test_a_listed_file_gone_missing_fails_the_staging_and_writes_go_on(
    node: RunningNode, held_staging: Callable[[], HeldStaging]
) -> None:
    deliver(node, "one", "two")
    staging = held_staging()
    lost = message_file(node, "two")
    lost.unlink()  # behind the store's back: what the pin rules out

    outcome = staging.finish()

    assert isinstance(outcome, tuple)
    status, body = outcome
    assert status == 500
    rel = lost.relative_to(mailbox_dir(node)).as_posix()
    assert f"{USER}: the staged index lists {rel}, which is no longer on disk" in body["error"], body
    assert node.metric("mailnode_checkpoints_total", result="failed") == 1
    assert node.metric("mailnode_writes_paused") == 0
    assert not pinned(node)
    assert not any((node.files.data_dir / ".staging").iterdir())
    deliver(node, "after")
    assert len(node.files.stored(USER)) == 2


# -- an archive during a snapshot, loopback only ---------------------------------------------------------


def test_an_archive_waits_for_a_snapshot_hold(node: RunningNode, tmp_path: Path) -> None:
    deliver(node, "held")
    assert call(node, "POST", "/snapshot?hold=1")[0] == 200
    headers = stream_backup(node, tmp_path / "after-hold.tar")  # staged once the hold has run out
    assert node.metric("mailnode_checkpoint_hold_expired_total") == 1
    assert archive.verify(tmp_path / "after-hold.tar").messages == int(headers["X-Mailfleet-Messages"]) == 1


async def test_archives_and_restores_are_for_loopback_clients_only() -> None:
    checkpoint, restore = mock.Mock(), mock.AsyncMock()
    ops = BackupOps(checkpoint=checkpoint, jobs=mock.Mock(), restore=restore, max_hold=600)
    app = build_app(metrics=NodeMetrics(), ready=lambda: True, status=mock.AsyncMock(), backups=ops)
    await refused_from_the_pod_network(app, [("GET", "/backup"), ("POST", "/restore")])
    checkpoint.staged.assert_not_called()
    restore.assert_not_called()
