"""Archives (mailnode.backup.archive, its tar codec mailnode.backup.tarcodec and the whole-node restore
mailnode.backup.noderestore) on a real file system, from a staged directory built with the
store's own Index and Maildir layout: what `write` puts in (members in the documented order, mode 0600,
the manifest), that `verify` accepts it (plain and gzip, written to a stream that cannot seek) and
refuses a damaged one naming the member (a flipped byte, truncation, a missing, extra, misplaced or
unsafe member, a broken index, an index and its files that disagree), that `restore_node` brings back
byte-identical files into an empty data directory only and leaves nothing behind when it fails, and
that `mailbox_messages` reads one mailbox back."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailnode.backup import archive, noderestore, tarcodec
from mailnode.store import durable, index, maildir

POINT = datetime.datetime(2026, 11, 27, 7, 0, 0, 123456, tzinfo=datetime.UTC)
NODE = "mail-0"
ALICE = "alice@example.com"
BOB = "bob@example.com"
EMPTY = "empty@example.com"


def message(n: int, size: int = 200) -> bytes:
    body = (f"line {n} " * (size // 8 + 1)).encode()[:size]
    return f"From: sender{n}@remote.test\r\nSubject: message {n}\r\n\r\n".encode() + body + b"\r\n"


def add_mailbox(root: Path, address: str, folders: dict[str, list[tuple[bytes, str]]]) -> Path:
    """A mailbox as the store leaves it: an index listing message files under <folder>/cur or new."""
    path = maildir.mailbox_dir(root, address)
    durable.ensure_dir(path)
    db = index.Index(path / archive.INDEX)
    rows = []
    for folder, messages in folders.items():
        db.create_folder(folder)
        directory = maildir.ensure_folder(path, folder)
        for position, (data, flags) in enumerate(messages):
            sub = "cur" if flags else "new"
            file = durable.write_new(directory / "tmp", directory / sub, data)
            rows.append(
                index.NewMessage(folder, str(file.relative_to(path)), len(data), 1_700_000_000 + position, flags)
            )
    db.add(rows)
    db.close()
    return path


def add_queued(root: Path, id: str, data: bytes) -> None:
    directory = root / archive.QUEUE
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{id}.eml").write_bytes(data)
    (directory / f"{id}.json").write_text(json.dumps({"format": 1, "id": id, "sender": "", "recipients": []}))


@pytest.fixture
def staged(tmp_path: Path) -> Path:
    root = tmp_path / "staged"
    alice = add_mailbox(
        root,
        ALICE,
        {
            "INBOX": [(message(1), ""), (message(2, 5000), "\\Seen"), (message(3), "\\Seen \\Flagged")],
            "Sent": [(message(4), "\\Seen")],
            "Work/Projects ü": [(message(5), "")],
            "Trash": [],  # an empty folder
        },
    )
    bob = add_mailbox(root, BOB, {"INBOX": [(message(6, 70_000), "")]})
    # a file name longer than a tar header holds (a pod's long host name): a pax record carries it
    [old] = (bob / "INBOX" / "new").iterdir()
    long = f"INBOX/new/1700000000.M1P1Q1.{'mailfleet-mail-0.mailfleet-mail.mail-system' * 3},S=70000"
    old.rename(bob / long)
    db = index.Index(bob / archive.INDEX)
    db.move_paths([(f"INBOX/new/{old.name}", long)])
    db.close()
    add_mailbox(root, EMPTY, {"INBOX": []})
    (alice / "INBOX" / "new" / "1.stray,S=3").write_bytes(b"not indexed")  # left by a crash: not archived
    add_queued(root, "0000000000000001", message(7))
    return root


def write(staged: Path, path: Path) -> archive.Summary:
    with path.open("wb") as out:
        return archive.write(staged, out, node=NODE, point_in_time=POINT, compress=tarcodec.is_compressed(path))


@pytest.fixture
def tar_file(staged: Path, tmp_path: Path) -> Path:
    path = tmp_path / "backup.tar"
    write(staged, path)
    return path


def members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(info, tar.extractfile(info).read()) for info in tar]  # type: ignore[union-attr]


def repack(
    path: Path, edit: Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]], *, fix_manifest: bool
) -> Path:
    """A copy of an archive with its members edited; with fix_manifest the manifest's sizes and hashes
    are made to match the edited members (so only the other checks can catch the edit)."""
    edited = edit([(info.name, data) for info, data in members(path)])
    if fix_manifest:
        manifest = json.loads(dict(edited)[archive.MANIFEST])
        manifest["files"] = {
            name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in edited
            if name != archive.MANIFEST
        }
        edited = [(n, json.dumps(manifest).encode() if n == archive.MANIFEST else d) for n, d in edited]
    out = path.with_name("edited.tar")
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in edited:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and directory under root."""
    found: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        found[path.relative_to(root).as_posix()] = path.read_bytes() if path.is_file() else None
    return found


def message_name(path: Path, address: str = ALICE) -> str:
    prefix = maildir.mailbox_dir(Path(), address).as_posix()
    return next(info.name for info, _ in members(path) if info.name.startswith(f"{prefix}/INBOX/"))


# -- writing ---------------------------------------------------------------------------------------------


def test_write_summarises_what_it_archived(staged: Path, tmp_path: Path) -> None:
    summary = write(staged, tmp_path / "backup.tar")
    assert summary.node == NODE
    assert summary.point_in_time == POINT
    assert summary.mailboxes == {
        ALICE: (5, sum(len(message(n)) for n in (1, 3, 4, 5)) + len(message(2, 5000))),
        BOB: (1, len(message(6, 70_000))),
        EMPTY: (0, 0),
    }
    assert summary.messages == 6
    assert summary.queued == 1
    assert summary.files == 1 + 3 + 6 + 2  # header, indexes, messages, queue files
    assert summary.bytes == sum(len(data) for info, data in members(tmp_path / "backup.tar")[:-1])


def test_members_come_in_the_documented_order_with_mode_0600(tar_file: Path) -> None:
    found = members(tar_file)
    names = [info.name for info, _ in found]
    assert names[0] == archive.HEADER
    assert names[-1] == archive.MANIFEST
    assert json.loads(found[0][1]) == {"format": 2, "node": NODE, "pointInTime": POINT.isoformat()}
    mail = [n for n in names if n.startswith("mail/")]
    for address in (ALICE, BOB, EMPTY):
        prefix = maildir.mailbox_dir(Path(), address).as_posix() + "/"
        own = [n for n in mail if n.startswith(prefix)]
        assert own[0] == prefix + archive.INDEX  # the index, then its messages, together
        assert mail[mail.index(own[0]) : mail.index(own[0]) + len(own)] == own
    assert names[len(mail) + 1 : -1] == ["queue/messages/0000000000000001.eml", "queue/messages/0000000000000001.json"]
    assert not any(n.endswith("1.stray,S=3") for n in names)
    assert all(info.mode == 0o600 and info.isreg() for info, _ in found)
    assert all(not n.startswith("/") and ".." not in n.split("/") for n in names)
    manifest = json.loads(found[-1][1])
    assert manifest["files"] == {
        info.name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for info, data in found[:-1]
    }
    assert manifest["mailboxes"][BOB] == {"messages": 1, "bytes": len(message(6, 70_000))}
    assert manifest["queue"] == {"messages": 1}
    assert (manifest["format"], manifest["node"], manifest["pointInTime"]) == (2, NODE, POINT.isoformat())


def test_tar_tools_read_it_as_written(staged: Path, tar_file: Path, tmp_path: Path) -> None:
    names = [info.name for info, _ in members(tar_file)]
    assert max(map(len, names)) > 100  # the long name, whole
    # GNU tar extracts the same files; a queue file with a non-ASCII name takes a pax record too
    if shutil.which("tar") is None:
        pytest.skip("no tar(1) here")
    add_queued(staged, "0000000000000009-ü", message(9))
    path = tmp_path / "again.tar"
    write(staged, path)
    assert archive.verify(path).queued == 2
    out = tmp_path / "extracted"
    out.mkdir()
    subprocess.run(["tar", "-xf", str(path), "-C", str(out)], check=True)
    extracted = {k: v for k, v in tree(out).items() if v is not None and k.startswith(("mail/", "queue/"))}
    assert extracted == {k: v for k, v in tree(staged).items() if v is not None and not k.endswith("1.stray,S=3")}


def test_messages_of_a_mailbox_come_in_folder_and_uid_order(tar_file: Path) -> None:
    folders = [m.folder for m in archive.mailbox_messages(tar_file, ALICE)]
    assert folders == ["INBOX", "INBOX", "INBOX", "Sent", "Work/Projects ü"]
    assert [m.data for m in archive.mailbox_messages(tar_file, ALICE)][:3] == [message(1), message(2, 5000), message(3)]


class Unseekable(io.RawIOBase):
    """A pipe as `write` sees it: bytes go out, nothing can seek or tell."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.chunks.append(bytes(data))
        return len(data)

    def seek(self, *args: object) -> int:
        raise io.UnsupportedOperation("seek")

    def tell(self) -> int:
        raise io.UnsupportedOperation("tell")


def test_write_streams_to_a_pipe_and_reports_progress(staged: Path, tmp_path: Path) -> None:
    out = Unseekable()
    calls: list[tuple[int, int]] = []
    summary = archive.write(staged, out, node=NODE, point_in_time=POINT, progress=lambda d, t: calls.append((d, t)))  # type: ignore[arg-type]
    path = tmp_path / "piped.tar"
    path.write_bytes(b"".join(out.chunks))
    assert archive.verify(path) == summary
    assert calls[-1] == (summary.bytes, summary.bytes)
    assert len(path.read_bytes()) % tarfile.RECORDSIZE == 0


# -- verifying -------------------------------------------------------------------------------------------


def test_verify_accepts_what_write_wrote(tar_file: Path, staged: Path, tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    summary = archive.verify(tar_file, progress=lambda done, total: calls.append((done, total)))
    assert summary == write(staged, tmp_path / "again.tar")
    assert calls[-1] == (tar_file.stat().st_size, tar_file.stat().st_size)


def test_gzip_archives_write_verify_and_restore(staged: Path, tmp_path: Path) -> None:
    path = tmp_path / "backup.tar.gz"
    summary = write(staged, path)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    assert archive.verify(path) == summary
    assert noderestore.restore_node(path, tmp_path / "data") == summary
    assert [m.data for m in archive.mailbox_messages(path, BOB)] == [message(6, 70_000)]


def test_receive_copies_and_checks_a_stream(tar_file: Path, tmp_path: Path) -> None:
    copy = io.BytesIO()
    with tar_file.open("rb") as source:
        summary = archive.receive(source, copy, label="GET /backup")
    assert copy.getvalue() == tar_file.read_bytes()
    assert summary == archive.verify(tar_file)


def test_receive_refuses_a_cut_stream(tar_file: Path) -> None:
    with pytest.raises(archive.ArchiveError, match="GET /backup: "):
        archive.receive(io.BytesIO(tar_file.read_bytes()[:30_000]), io.BytesIO(), label="GET /backup")


def test_a_flipped_byte_in_a_message_is_named(tar_file: Path) -> None:
    name = message_name(tar_file)
    with tarfile.open(tar_file) as tar:
        offset = tar.getmember(name).offset_data
    data = bytearray(tar_file.read_bytes())
    data[offset + 10] ^= 0x01
    tar_file.write_bytes(bytes(data))
    with pytest.raises(archive.ArchiveError) as caught:
        archive.verify(tar_file)
    assert f"member {name}: SHA-256" in str(caught.value)
    assert str(caught.value).startswith(f"{tar_file}: ")


@pytest.mark.parametrize("where", ["inside a message", "inside a member's header", "inside the manifest"])
def test_a_truncated_archive_is_refused(tar_file: Path, where: str) -> None:
    with tarfile.open(tar_file) as tar:
        cut = {
            "inside a message": tar.getmember(message_name(tar_file)).offset_data + 5,
            "inside a member's header": tar.getmember(message_name(tar_file, BOB)).offset + 100,
            "inside the manifest": tar.getmember(archive.MANIFEST).offset_data + 50,
        }[where]
    tar_file.write_bytes(tar_file.read_bytes()[:cut])
    with pytest.raises(archive.ArchiveError, match=r"truncated|unexpected end"):
        archive.verify(tar_file)


def test_an_archive_cut_at_a_member_boundary_lacks_its_manifest(tar_file: Path) -> None:
    with tarfile.open(tar_file) as tar:
        manifest = tar.getmember(archive.MANIFEST)
    tar_file.write_bytes(tar_file.read_bytes()[: manifest.offset])
    with pytest.raises(archive.ArchiveError, match=f"without {archive.MANIFEST}: truncated"):
        archive.verify(tar_file)


def test_a_missing_member_is_named(tar_file: Path) -> None:
    name = message_name(tar_file, BOB)
    edited = repack(tar_file, lambda ms: [m for m in ms if m[0] != name], fix_manifest=False)
    with pytest.raises(archive.ArchiveError, match=re.escape(f"member {name} is missing")):
        archive.verify(edited)


def test_an_extra_member_is_named(tar_file: Path) -> None:
    extra = "queue/messages/0000000000000002.eml"

    def add(ms: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        return [*ms[:-1], (extra, b"sneaked in"), ms[-1]]

    with pytest.raises(archive.ArchiveError, match=re.escape(f"member {extra} is not in the manifest")):
        archive.verify(repack(tar_file, add, fix_manifest=False))


@pytest.mark.parametrize("name", ["mail/../../etc/cron.d/evil", "/etc/passwd", "mail/example.com/./x", "queue//x"])
def test_an_unsafe_member_path_is_refused(tar_file: Path, name: str) -> None:
    def add(ms: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        return [ms[0], (name, b"x"), *ms[1:]]

    with pytest.raises(archive.ArchiveError, match="not a relative path"):
        archive.verify(repack(tar_file, add, fix_manifest=True))


def test_a_member_after_the_manifest_is_refused(tar_file: Path) -> None:
    edited = repack(tar_file, lambda ms: [*ms, ("queue/messages/9.eml", b"late")], fix_manifest=False)
    with pytest.raises(archive.ArchiveError, match=f"follows {archive.MANIFEST}"):
        archive.verify(edited)


def test_a_message_file_no_index_lists_is_refused(tar_file: Path) -> None:
    prefix = maildir.mailbox_dir(Path(), BOB).as_posix()
    stray = f"{prefix}/INBOX/new/1.M1P1Q1.host,S=5"

    def add(ms: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        at = next(i for i, m in enumerate(ms) if m[0] == f"{prefix}/{archive.INDEX}")
        return [*ms[: at + 1], (stray, b"stray"), *ms[at + 1 :]]

    with pytest.raises(archive.ArchiveError, match=re.escape(f"member {stray}: a message file its mailbox's")):
        archive.verify(repack(tar_file, add, fix_manifest=True))


def test_an_index_row_without_its_file_is_refused(tar_file: Path) -> None:
    name = message_name(tar_file)
    edited = repack(tar_file, lambda ms: [m for m in ms if m[0] != name], fix_manifest=True)
    with pytest.raises(
        archive.ArchiveError, match=r"index.sqlite lists 1 message file\(s\) the archive lacks, first INBOX/"
    ):
        archive.verify(edited)


def test_an_index_that_is_not_sound_sqlite_is_refused(tar_file: Path) -> None:
    prefix = maildir.mailbox_dir(Path(), ALICE).as_posix()

    def damage(ms: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        result = []
        for name, data in ms:
            if name == f"{prefix}/{archive.INDEX}":
                data = data[:4096] + bytes(len(data) - 4096)  # every page but the first zeroed
            result.append((name, data))
        return result

    with pytest.raises(archive.ArchiveError, match=re.escape(f"{prefix}/{archive.INDEX}: ")):
        archive.verify(repack(tar_file, damage, fix_manifest=True))


def test_other_files_and_wrong_headers_are_refused(tar_file: Path, tmp_path: Path) -> None:
    not_tar = tmp_path / "notes.tar"
    not_tar.write_bytes(b"hello\n" * 1000)
    with pytest.raises(archive.ArchiveError, match="not a tar archive"):
        archive.verify(not_tar)
    with pytest.raises(archive.ArchiveError, match="No such file"):
        archive.verify(tmp_path / "absent.tar")

    def future(ms: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        return [(archive.HEADER, json.dumps({"format": 3, "node": NODE, "pointInTime": "x"}).encode()), *ms[1:]]

    with pytest.raises(archive.ArchiveError, match=r"format 3; this mailnode reads formats \(1, 2\)"):
        archive.verify(repack(tar_file, future, fix_manifest=True))
    with pytest.raises(archive.ArchiveError, match=f"the first member is {archive.INDEX}|not a Mailfleet archive"):
        archive.verify(repack(tar_file, lambda ms: ms[1:], fix_manifest=True))


# -- restoring a whole node --------------------------------------------------------------------------------


@pytest.mark.parametrize("sync", ["syncfs", "fsync each file"])
def test_restore_node_brings_back_identical_files_and_indexes(
    staged: Path, tar_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync: str
) -> None:
    if sync != "syncfs":  # as on a system without syncfs(2)
        monkeypatch.setattr(noderestore, "_syncfs", lambda path: False)
    data_dir = tmp_path / "data"
    summary = noderestore.restore_node(tar_file, data_dir)
    assert summary == archive.verify(tar_file)
    restored, original = tree(data_dir), tree(staged)
    del original[maildir.mailbox_dir(Path(), ALICE).as_posix() + "/INBOX/new/1.stray,S=3"]
    assert {k: v for k, v in restored.items() if v is not None} == {k: v for k, v in original.items() if v is not None}
    # every folder's Maildir is there, the empty Trash too; nothing else
    alice = maildir.mailbox_dir(data_dir, ALICE)
    for folder in ("INBOX", "Sent", "Trash", "Work/Projects ü"):
        for sub in maildir.SUBDIRS:
            assert (maildir.folder_dir(alice, folder) / sub).is_dir()
    assert [p.name for p in data_dir.iterdir()] == ["mail", "queue"] or sorted(p.name for p in data_dir.iterdir()) == [
        "mail",
        "queue",
    ]
    for address in (ALICE, BOB, EMPTY):
        before = index.Index(maildir.mailbox_dir(staged, address) / archive.INDEX)
        after = index.Index(maildir.mailbox_dir(data_dir, address) / archive.INDEX)
        assert after.messages() == before.messages()
        assert after.folders() == before.folders()
        before.close()
        after.close()
    assert all(p.stat().st_mode & 0o077 == 0 for p in data_dir.rglob("*") if p.is_file())
    # file times come back too (Maildir readers sort by them)
    name = message_name(tar_file)
    assert (data_dir / name).stat().st_mtime == int((staged / name).stat().st_mtime)


def test_restore_node_fills_a_data_dir_a_node_left_empty(tar_file: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "mail").mkdir(parents=True)
    (data_dir / "queue" / "messages").mkdir(parents=True)
    (data_dir / "queue" / "tmp").mkdir()
    summary = noderestore.restore_node(tar_file, data_dir)
    assert len(maildir.mailbox_dirs(data_dir)) == len(summary.mailboxes) == 3
    assert sorted(p.name for p in (data_dir / "queue" / "messages").iterdir()) == [
        "0000000000000001.eml",
        "0000000000000001.json",
    ]
    assert (data_dir / "queue" / "tmp").is_dir()


def test_restore_node_refuses_a_data_dir_with_mail_and_leaves_it_alone(
    staged: Path, tar_file: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    add_mailbox(data_dir, "carol@example.com", {"INBOX": [(message(9), "")]})
    before = tree(data_dir)
    with pytest.raises(archive.ArchiveError, match=re.escape("holds mailbox carol@example.com")):
        noderestore.restore_node(tar_file, data_dir)
    assert tree(data_dir) == before


def test_restore_node_refuses_a_data_dir_with_queued_mail(tar_file: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    add_queued(data_dir, "0000000000000005", message(5))
    before = tree(data_dir)
    with pytest.raises(archive.ArchiveError, match="holds queued mail"):
        noderestore.restore_node(tar_file, data_dir)
    assert tree(data_dir) == before


def test_a_failed_restore_leaves_nothing_behind(tar_file: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "keep.txt").write_text("the operator's")
    name = message_name(tar_file, BOB)
    with tarfile.open(tar_file) as tar:
        offset = tar.getmember(name).offset_data
    damaged = bytearray(tar_file.read_bytes())
    damaged[offset] ^= 0xFF  # found only at the manifest, after every file was extracted
    broken = tmp_path / "broken.tar"
    broken.write_bytes(bytes(damaged))
    with pytest.raises(archive.ArchiveError, match=re.escape(f"member {name}: SHA-256")):
        noderestore.restore_node(broken, data_dir)
    assert tree(data_dir) == {"keep.txt": b"the operator's"}

    def interrupted(done: int, total: int) -> None:
        if done > 0:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        noderestore.restore_node(tar_file, data_dir, progress=interrupted)
    assert tree(data_dir) == {"keep.txt": b"the operator's"}
    fresh = tmp_path / "fresh"
    with pytest.raises(archive.ArchiveError):
        noderestore.restore_node(broken, fresh)
    assert not fresh.exists()


# -- one mailbox -------------------------------------------------------------------------------------------


def test_mailbox_messages_reads_one_mailbox(tar_file: Path) -> None:
    got = list(archive.mailbox_messages(tar_file, ALICE))
    assert [(m.folder, m.flags, m.internal_date) for m in got] == [
        ("INBOX", "", 1_700_000_000),
        ("INBOX", "\\Seen", 1_700_000_001),
        ("INBOX", "\\Seen \\Flagged", 1_700_000_002),
        ("Sent", "\\Seen", 1_700_000_000),
        ("Work/Projects ü", "", 1_700_000_000),
    ]
    assert [m.data for m in got] == [message(1), message(2, 5000), message(3), message(4), message(5)]
    assert all(m.sha256 == hashlib.sha256(m.data).hexdigest() for m in got)
    assert list(archive.mailbox_messages(tar_file, EMPTY)) == []


def test_mailbox_messages_of_an_address_not_in_the_archive(tar_file: Path) -> None:
    with pytest.raises(archive.ArchiveError, match=re.escape("no mailbox nobody@example.com in the archive")):
        list(archive.mailbox_messages(tar_file, "nobody@example.com"))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies=st.lists(st.binary(max_size=3000), min_size=1, max_size=6), flags=st.sampled_from(["", "\\Seen"]))
def test_any_message_bytes_round_trip(bodies: list[bytes], flags: str) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        add_mailbox(root / "staged", ALICE, {"INBOX": [(body, flags) for body in bodies]})
        path = root / "backup.tar"
        summary = write(root / "staged", path)
        assert summary.mailboxes == {ALICE: (len(bodies), sum(map(len, bodies)))}
        assert archive.verify(path) == summary
        assert [(m.data, m.flags) for m in archive.mailbox_messages(path, ALICE)] == [(b, flags) for b in bodies]
