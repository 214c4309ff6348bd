"""Real mail nodes for the node tier: `node_factory` writes a config and a directory under tmp_path and
starts a `mailnode.node.Node` on 127.0.0.1 with kernel-chosen ports, in a thread with its own event
loop, so tests drive it with blocking clients (smtplib, swaks) exactly as a user would.
`serve_process` runs `mailnode serve` as a separate process, for tests that kill it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import imaplib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailnode.config import load_node_config
from mailnode.node import Node
from tests.conftest import cheap_hash

DOMAIN = "example.com"
# What the node puts in front of a message it stores: Return-Path, the Authentication-Results of mail
# from outside (MX listener), and its Received header.
TRACE_BLOCK = re.compile(
    rb"Return-Path: <[^<>\r\n]*>\r\n"
    rb"(?:Authentication-Results: [^\r\n]+(?:\r\n[ \t][^\r\n]+)*\r\n)?"
    rb"Received: [^\r\n]+(?:\r\n[ \t][^\r\n]+)*\r\n"
)
PASSWORD = "correct horse battery staple"
_HASH = cheap_hash(PASSWORD)


def mailbox(address: str, **fields: Any) -> dict[str, Any]:
    """A directory entry whose password is PASSWORD (unless password_hash is given)."""
    return {"address": address, "password_hash": _HASH, **fields}


@dataclasses.dataclass
class NodeFiles:
    root: Path
    config_file: Path
    directory_file: Path
    data_dir: Path

    def write_directory(self, mailboxes: list[dict[str, Any]] | str) -> None:
        """Replace the directory the way Kubernetes does: a new file renamed over the old one."""
        text = mailboxes if isinstance(mailboxes, str) else yaml.safe_dump({"mailboxes": mailboxes})
        tmp = self.directory_file.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.directory_file)

    def stored(self, address: str, folder: str = "INBOX") -> list[bytes]:
        """The message files of a mailbox folder, oldest first, as a user would find them on disk."""
        local, _, domain = address.partition("@")
        directory = self.data_dir / "mail" / domain / local / folder
        files = [f for sub in ("new", "cur") if (directory / sub).is_dir() for f in (directory / sub).iterdir()]
        return [f.read_bytes() for f in sorted(files, key=lambda f: (f.stat().st_mtime_ns, f.name))]


def write_node_files(
    root: Path,
    *,
    mailboxes: list[dict[str, Any]],
    tls: tuple[Path, Path] | None,
    ports: dict[str, int] | None = None,
    **overrides: Any,
) -> NodeFiles:
    root.mkdir(parents=True, exist_ok=True)
    files = NodeFiles(root, root / "node.yaml", root / "directory.yaml", root / "data")
    files.write_directory(mailboxes)
    config: dict[str, Any] = {
        "node_name": "test-0",
        "hostname": f"mail.{DOMAIN}",
        "domains": [{"domain": DOMAIN, "alias_domains": ["example.net"]}],
        "data_dir": str(files.data_dir),
        "directory_file": str(files.directory_file),
        "directory_poll_interval": 0.1,
        "listen": {
            "host": "127.0.0.1",
            **{name: 0 for name in ("smtp", "submission", "submissions", "imap", "imaps", "http", "https")},
            **(ports or {}),
        },
        "smtp": {"auth_failure_delay": 0.05, "auth_failure_delay_max": 0.4},
    }
    if tls is not None:
        config["tls"] = {"cert_file": str(tls[0]), "key_file": str(tls[1])}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    files.config_file.write_text(yaml.safe_dump(config))
    return files


class RunningNode:
    """A Node on its own event loop in a background thread."""

    def __init__(self, files: NodeFiles) -> None:
        self.files = files
        self.node = Node(load_node_config(files.config_file))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.call(self.node.start())

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def ports(self) -> dict[str, int]:
        return self.node.ports

    def port(self, listener: str) -> int:
        return self.node.ports[listener]

    def http_get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port('http')}{path}", timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def metric(self, name: str, **labels: str) -> float:
        value = self.node.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def stop(self) -> None:
        if self._loop.is_running():
            self.call(self.node.stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


NodeFactory = Callable[..., RunningNode]


@pytest.fixture
def node_factory(tmp_path: Path, tls_files: tuple[Path, Path]) -> Iterator[NodeFactory]:
    started: list[RunningNode] = []

    def start(
        mailboxes: list[dict[str, Any]] | None = None, *, tls: bool = True, name: str = "node", **overrides: Any
    ) -> RunningNode:
        files = write_node_files(
            tmp_path / name,
            mailboxes=mailboxes if mailboxes is not None else [mailbox(f"user@{DOMAIN}")],
            tls=tls_files if tls else None,
            **overrides,
        )
        running = RunningNode(files)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def node(node_factory: NodeFactory) -> RunningNode:
    """A node for example.com (alias domain example.net) with the mailboxes most tests use."""
    return node_factory(
        [
            mailbox(f"user@{DOMAIN}", aliases=[f"alias@{DOMAIN}"]),
            mailbox(f"other@{DOMAIN}"),
            mailbox(f"suspended@{DOMAIN}", suspended=True),
            mailbox(f"small@{DOMAIN}", quota=2000),
            mailbox(f"forwarder@{DOMAIN}", forward_to=[f"other@{DOMAIN}", "someone@remote.test"]),
        ]
    )


# -- a node as a separate process -------------------------------------------------------------------


@contextlib.contextmanager
def imap_inbox(node: RunningNode, user: str) -> Iterator[imaplib.IMAP4]:
    """A plaintext IMAP session on `node`, logged in as `user` (PASSWORD) with INBOX selected; logged out after."""
    client = imaplib.IMAP4("127.0.0.1", node.port("imap"), timeout=60)
    try:
        client.login(user, PASSWORD)
        client.select("INBOX")
        yield client
    finally:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            client.logout()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports below the kernel's ephemeral range (32768 and up), so that neither a
    listener bound to port 0 nor an outgoing connection takes one before the server it is meant for binds
    it (as can happen to a port from free_port()): for servers that must know each other's ports up front."""
    import random
    import socket

    ports: list[int] = []
    with contextlib.ExitStack() as stack:
        while len(ports) < count:
            port = random.randrange(20000, 32000)
            sock = stack.enter_context(socket.socket())
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            if port not in ports:
                ports.append(port)
    return ports


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port that refuses connections for the whole test: bound (so nothing else can take it, as a
    port from free_port() could be taken by the next server started) but never listening."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


@dataclasses.dataclass
class ServeProcess:
    files: NodeFiles
    ports: dict[str, int]
    process: subprocess.Popen[bytes] | None = None
    log_file: Path | None = None

    def start(self, timeout: float = 30) -> None:
        self.log_file = self.files.root / "node.log"
        log = self.log_file.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mailnode", "serve", "--config", str(self.files.config_file)],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mailnode exited with {self.process.returncode}: {self.log_file.read_text()}")
            with contextlib.suppress(OSError):
                url = f"http://127.0.0.1:{self.ports['http']}/readyz"
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            time.sleep(0.05)
        raise TimeoutError("mailnode did not become ready")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


@pytest.fixture
def serve_process(tmp_path: Path, tls_files: tuple[Path, Path]) -> Iterator[Callable[..., ServeProcess]]:
    made: list[ServeProcess] = []

    def make(mailboxes: list[dict[str, Any]] | None = None, **overrides: Any) -> ServeProcess:
        ports = {name: free_port() for name in ("smtp", "submission", "submissions", "imap", "imaps", "http")}
        files = write_node_files(
            tmp_path / "proc",
            mailboxes=mailboxes if mailboxes is not None else [mailbox(f"user@{DOMAIN}")],
            tls=tls_files,
            ports=ports,
            **overrides,
        )
        proc = ServeProcess(files, ports)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.kill()


async def refused_from_the_pod_network(app: Any, requests: list[tuple[str, str]]) -> None:
    """Each (method, path) of `app`, asked from a pod-network address (10.0.0.7), answers 403 with an error
    that says loopback: what the admin port does for the requests that change or read mail wholesale."""
    from unittest import mock

    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        ("10.0.0.7", 40000) if name == "peername" else default
    )
    for method, path in requests:
        request = make_mocked_request(method, path, app=app, transport=transport)
        match = await app.router.resolve(request)
        request._match_info = match
        response = await match.handler(request)
        assert isinstance(response, web.Response)
        assert response.status == 403, (method, path)
        assert response.text is not None
        assert "loopback" in json.loads(response.text)["error"]
