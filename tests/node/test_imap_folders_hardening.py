"""Folder names and full disks against a real node, with imaplib over real sockets (issue 12):
empty and otherwise invalid names refused with NO [CANNOT] without touching the mailbox (DELETE ""
once removed the whole mailbox), over-long names refused with NO [LIMIT] before anything moves (a
RENAME once half-renamed the disk), control characters refused directly and through modified UTF-7,
and a full volume (a small tmpfs) that refuses APPEND with NO [OVERQUOTA] while SELECT, FETCH
ENVELOPE and EXPUNGE go on, and APPEND works again once EXPUNGE freed the space."""

from __future__ import annotations

import contextlib
import imaplib
import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.node.conftest import NodeFactory, RunningNode
from tests.node.test_imap import USER, connect, deliver, message


def _command(client: imaplib.IMAP4, name: str, *args: str) -> tuple[str, bytes]:
    typ, data = client._simple_command(name, *args)
    return typ, b" ".join(d for d in data if isinstance(d, bytes))


def _folders(client: imaplib.IMAP4) -> set[bytes]:
    """The folders LIST shows, but for INBOX and the special-use ones every mailbox has."""
    _typ, data = client.list()
    names = {d.rsplit(b' "/" ', 1)[1] for d in data if isinstance(d, bytes)}
    return names - {b"INBOX", b"Sent", b"Drafts", b"Trash", b"Junk", b"Archive"}


def _lines(size: int) -> str:
    """About `size` bytes of body in lines SMTP accepts."""
    return ("x" * 76 + "\r\n") * (size // 78)


@pytest.fixture
def imap(node: RunningNode, client_tls: ssl.SSLContext) -> Iterator[imaplib.IMAP4]:
    client = connect(node, client_tls)
    yield client
    with contextlib.suppress(imaplib.IMAP4.abort, OSError):
        client.logout()


# -- defect 2: empty and invalid names --------------------------------------------------------------------


def test_empty_and_invalid_names_are_refused_and_the_mailbox_survives(imap: imaplib.IMAP4, node: RunningNode) -> None:
    deliver(node, message(1))
    assert imap.create("keep")[0] == "OK"
    # "/zz" once created a folder "" (the mailbox's own directory) beside "/zz".
    for name in ('"/zz"', '""', '"a//b"', '"/"', '".."', '"a/../b"', '"a/./b"', '"../outside"', '"index.sqlite"'):
        typ, text = _command(imap, "CREATE", name)
        assert (typ, text[:8]) == ("NO", b"[CANNOT]"), (name, typ, text)
    assert _folders(imap) == {b"keep"}
    # DELETE "" once answered OK and removed INBOX, every folder and the index.
    for name in ('""', '"/"', '"keep/"', '".."'):
        typ, text = _command(imap, "DELETE", name)
        assert (typ, text[:8]) == ("NO", b"[CANNOT]"), (name, typ, text)
    for new in ('""', '"/x"', '"x//y"', '".."', '"x/."'):
        typ, text = _command(imap, "RENAME", '"keep"', new)
        assert (typ, text[:8]) == ("NO", b"[CANNOT]"), (new, typ, text)
    assert _folders(imap) == {b"keep"}
    typ, data = imap.select("INBOX")
    assert (typ, data) == ("OK", [b"1"])
    _typ, fetched = imap.fetch("1", "(BODY.PEEK[])")
    assert isinstance(fetched[0], tuple) and b"Body of note 1." in fetched[0][1]
    assert node.files.stored(USER)


def test_create_with_a_trailing_delimiter_creates_the_folder(imap: imaplib.IMAP4) -> None:
    # RFC 3501 §6.3.3: a trailing hierarchy delimiter declares the intent to create children under it.
    assert imap.create("parent/")[0] == "OK"
    assert imap.create("parent/child")[0] == "OK"
    assert _folders(imap) == {b"parent", b"parent/child"}


# -- defect 3: over-long names, control characters, all-or-nothing RENAME -----------------------------------


def test_an_overlong_rename_is_refused_and_leaves_everything_as_it_was(imap: imaplib.IMAP4) -> None:
    child = "p/" + "c" * 200  # on disk "p%2Fccc...": fits; renamed under a 60-character parent it does not
    assert imap.create(child)[0] == "OK"
    for folder in ("p", child):
        assert imap.append(folder, "", imaplib.Time2Internaldate(time.time()), message(7))[0] == "OK"
    typ, text = _command(imap, "RENAME", "p", "q" * 60)
    assert (typ, text[:7]) == ("NO", b"[LIMIT]"), (typ, text)
    typ, text = _command(imap, "CREATE", "x" * 300)
    assert (typ, text[:7]) == ("NO", b"[LIMIT]"), (typ, text)
    assert _folders(imap) == {b"p", child.encode()}
    for folder in ("p", child):
        assert imap.select(folder) == ("OK", [b"1"])
        _typ, fetched = imap.fetch("1", "(BODY.PEEK[])")
        assert isinstance(fetched[0], tuple) and b"Body of note 7." in fetched[0][1], (folder, fetched)
    # A rename that fits moves the children too.
    assert imap.rename("p", "r")[0] == "OK"
    assert imap.select("r/" + "c" * 200) == ("OK", [b"1"])
    _typ, fetched = imap.fetch("1", "(BODY.PEEK[])")
    assert isinstance(fetched[0], tuple) and b"Body of note 7." in fetched[0][1]


@pytest.mark.parametrize("encoded", ["a&AAA-b", "a&AA0-b", "a&AAo-b", "&AAA-"])
def test_control_characters_through_modified_utf7_are_refused(imap: imaplib.IMAP4, encoded: str) -> None:
    # &AAA- is NUL, &AA0- CR, &AAo- LF: the name decodes to them.
    typ, text = _command(imap, "CREATE", f'"{encoded}"')
    assert (typ, text[:8]) == ("NO", b"[CANNOT]"), (typ, text)
    assert imap.create("fine")[0] == "OK"
    typ, text = _command(imap, "RENAME", "fine", f'"{encoded}"')
    assert (typ, text[:8]) == ("NO", b"[CANNOT]"), (typ, text)
    assert _folders(imap) == {b"fine"}


def test_control_characters_in_a_literal_are_refused(imap: imaplib.IMAP4, node: RunningNode) -> None:
    for raw in (b"a\x00b", b"a\rb", b"a\nb"):
        imap.literal = raw  # type: ignore[assignment]  # imaplib sends bytes literals as they are
        try:
            typ, _data = imap._simple_command("CREATE")
        except imaplib.IMAP4.error:  # imaplib raises for BAD
            typ = "BAD"
        assert typ in ("NO", "BAD"), raw
    assert _folders(imap) == set()


# -- defect 9: a full disk -------------------------------------------------------------------------------------


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs at tmp_path/disk: a volume the test can fill (needs root, as in CI)."""
    where = tmp_path / "disk"
    where.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(where)], capture_output=True, text=True
        )
    except FileNotFoundError:
        pytest.skip("no mount command: cannot make a small volume to fill")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(directory: Path) -> None:
    """Take every free block of the volume."""
    fd = os.open(directory / "ballast", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        size = 65536
        while size:
            try:
                os.write(fd, b"\0" * size)
            except OSError:
                size //= 2
    finally:
        os.close(fd)


def test_a_full_disk_refuses_appends_but_lets_users_read_and_delete(
    small_volume: Path, node_factory: NodeFactory, client_tls: ssl.SSLContext
) -> None:
    node = node_factory(name="disk")
    assert node.files.data_dir.is_relative_to(small_volume)
    deliver(node, message(1, body=_lines(200_000)), message(2))
    imap = connect(node, client_tls)
    try:
        assert imap.select("INBOX") == ("OK", [b"2"])
        deliver(node, message(3))  # the next SELECT has a \Recent mark to move; no ENVELOPE is cached
        _fill(small_volume)
        typ, data = imap.append("INBOX", "", imaplib.Time2Internaldate(time.time()), message(4, body=_lines(50_000)))
        assert (typ, data[0][:12]) == ("NO", b"[OVERQUOTA] "), (typ, data)
        assert imap.select("INBOX") == ("OK", [b"3"])
        typ, fetched = imap.fetch("1:3", "(ENVELOPE)")
        lines = b" ".join(d for d in fetched if isinstance(d, bytes))
        assert typ == "OK" and lines.count(b"ENVELOPE") == 3 and b'"note 3"' in lines, fetched
        assert imap.store("1", "+FLAGS", "\\Deleted")[0] == "OK"
        assert imap.expunge() == ("OK", [b"1"])
        free = os.statvfs(small_volume)
        assert free.f_bavail * free.f_frsize > 150_000
        assert (
            imap.append("INBOX", "", imaplib.Time2Internaldate(time.time()), message(4, body=_lines(50_000)))[0] == "OK"
        )
        assert imap.select("INBOX") == ("OK", [b"3"])
    finally:
        with contextlib.suppress(Exception):
            imap.logout()
        node.stop()
