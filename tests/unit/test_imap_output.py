"""The IMAP session's output path (mailnode.imap.session.Session: send, write, flush): what a command
answers reaches the transport in one write per flush (the greeting, CAPABILITY's two lines, LOGOUT's BYE
and OK: one write each), in the order sent; past OUTPUT_BOUND bytes held, send() passes them on at once
without waiting for a flush; a node shutting down writes what a command had answered before its BYE;
a read from the client first writes what is held.
Driven through Session.run over a StreamReader fed the client's lines and a writer that records its
writes. The node tests check the same over real sockets (tests/node/test_imap_output.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

from mailnode.auth import Authenticator
from mailnode.config import Directory, load_node_config
from mailnode.gateway import Gateway
from mailnode.imap import commands
from mailnode.imap.session import OUTPUT_BOUND, AnalysisCache, FolderViews, Session
from mailnode.metrics import NodeMetrics
from mailnode.store.mailstore import MailStore

DOMAINS = {"example.com": "example.com"}


class RecordingWriter:
    """What Session needs of an asyncio.StreamWriter; keeps each write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes.append(bytes(data))

    async def drain(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        pass


def _session(tmp_path: Path, reader: asyncio.StreamReader, writer: RecordingWriter) -> Session:
    config_file = tmp_path / "node.yaml"
    config_file.write_text(
        "hostname: mail.example.com\ndomains: [{domain: example.com}]\ndata_dir: d\ndirectory_file: f\n"
    )
    directory = Directory.empty(domains=DOMAINS)
    metrics = NodeMetrics()
    gateway = Gateway(workers=1)
    return Session(
        reader,
        cast(asyncio.StreamWriter, writer),
        commands=commands.TABLE,
        config=load_node_config(config_file),
        directory=lambda: directory,
        store=MailStore(tmp_path / "store", gateway=gateway),  # never opened: no command here reaches it
        authenticator=Authenticator(
            directory=lambda: directory, gateway=gateway, metrics=metrics, base_delay=0.0, max_delay=0.0
        ),
        metrics=metrics,
        tls=None,
        implicit_tls=False,
        listener="imap",
        analyses=AnalysisCache(),
        views=FolderViews(),
        remote="127.0.0.1",
    )


async def test_each_answer_is_one_write(tmp_path: Path) -> None:
    reader, writer = asyncio.StreamReader(), RecordingWriter()
    reader.feed_data(b"a CAPABILITY\r\nb LOGOUT\r\n")
    reader.feed_eof()
    await _session(tmp_path, reader, writer).run()
    assert len(writer.writes) == 3, writer.writes  # greeting, CAPABILITY, LOGOUT
    greeting, capability, logout = writer.writes
    assert greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    assert capability.startswith(b"* CAPABILITY IMAP4rev1 ")
    assert capability.endswith(b"\r\na OK CAPABILITY completed\r\n")
    assert capability.count(b"\r\n") == 2
    assert logout.startswith(b"* BYE ")
    assert logout.endswith(b"\r\nb OK LOGOUT completed\r\n")
    assert logout.count(b"\r\n") == 2
    assert writer.closed


async def test_a_long_burst_goes_out_before_the_flush(tmp_path: Path) -> None:
    """More than OUTPUT_BOUND bytes sent without a flush: the session holds no more than the bound."""
    reader, writer = asyncio.StreamReader(), RecordingWriter()
    session = _session(tmp_path, reader, writer)
    lines = [f"* {n} EXISTS {'x' * 90}".encode() for n in range(3 * OUTPUT_BOUND // 100)]
    for line in lines[:-1]:
        session.send(line)
    session.write(lines[-1] + b"\r\n")
    passed_on = len(writer.writes)
    assert passed_on >= 2  # before any flush
    assert all(len(data) < OUTPUT_BOUND + 100 for data in writer.writes)
    await session.flush()
    assert len(writer.writes) == passed_on + 1  # the rest, in one write
    assert b"".join(writer.writes) == b"".join(line + b"\r\n" for line in lines)  # in order, nothing lost
    await session.flush()
    assert len(writer.writes) == passed_on + 1  # nothing held: no empty write


async def test_shutting_down_writes_what_was_answered_before_the_bye(tmp_path: Path) -> None:
    reader, writer = asyncio.StreamReader(), RecordingWriter()
    session = _session(tmp_path, reader, writer)
    session.send("* 3 EXISTS")  # a command's answer so far, not flushed yet
    session.shut_down()
    assert writer.writes == [b"* 3 EXISTS\r\n* BYE [UNAVAILABLE] Server shutting down; try again later\r\n"]
    assert writer.closed


async def test_reading_from_the_client_writes_what_was_held(tmp_path: Path) -> None:
    """A continuation (`+`) sent and the client's answer awaited: it was written before the read, even
    without a flush (else the client would wait for it forever)."""
    reader, writer = asyncio.StreamReader(), RecordingWriter()
    session = _session(tmp_path, reader, writer)
    session.send("+ ")
    reader.feed_data(b"answer\r\n")
    assert await session.readline() == b"answer"
    assert writer.writes == [b"+ \r\n"]
