"""`mailfleet local up` of the examples, as `make run` starts it (tier 5 of DESIGN.md), with real clients.

Aspects: mail sent with smtplib to the MX port reaches alice and reads back byte for byte over IMAP with
STARTTLS, trusting the certificate local up made; the plaintext passwords and app passwords of
examples/mailboxes.yaml log in; SIGTERM stops every node (exit 0, no node process left, ports closed); a
restart keeps the mail, the certificate and the DKIM key; a TLS Secret in the files is served instead of a
self-signed certificate; a node that dies, or cannot start because a port is taken, ends the run with
exit 1 and says which; a domain of three replicas runs three nodes, each on its own ports, config and
data, with the others as its peers and the same directory, and every node serves every mailbox (mail
sent with swaks through node 0 is stored at its home only and read back byte for byte through node 2 with
imaplib and mbsync); bad input (more than 16 replicas, a missing
password Secret, a Secret of the wrong type) is refused with one line naming the file and the field,
before anything is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import imaplib
import os
import random
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from mailfleet.specs import placement
from tests.conftest import require_tool
from tests.node.test_imap_clients import normalized

ROOT = Path(__file__).parents[2]
EXAMPLES = ROOT / "examples"
EXAMPLE_FILES = ("examples/maildomain.yaml", "examples/mailboxes.yaml")
PORT_NAMES = ("smtp", "submission", "submissions", "imap", "imaps", "http")
HTTPS_OFFSET = 8  # the HTTPS listener (DAV, autoconfiguration, MTA-STS) at base + 10*i + 8
CLUSTER_MAILBOXES = ("carol@example.org", "dave@example.org", "erin@example.org", "heidi@example.org")


def example_documents(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((EXAMPLES / name).read_text()) if doc is not None]


def example_password(secret: str, key: str) -> str:
    """The plaintext a user of the examples types: the Secret's stringData in examples/mailboxes.yaml."""
    (document,) = [d for d in example_documents("mailboxes.yaml") if d["metadata"]["name"] == secret]
    return str(document["stringData"][key])


def free_base_port(*, nodes: int = 1) -> int:
    """A base N with the ports of `nodes` nodes free on 127.0.0.1 (N..N+5, N+10..N+17, ...), below the
    kernel's ephemeral range (32768 and up) so that no outgoing connection takes one meanwhile, and away
    from 20000, where `make run` may be running."""
    offsets = (
        [*range(len(PORT_NAMES)), HTTPS_OFFSET]
        if nodes == 1
        else [10 * i + o for i in range(nodes) for o in (*range(8), HTTPS_OFFSET)]
    )
    for _ in range(100):
        base = random.randrange(21000, 32000, 10)
        with contextlib.ExitStack() as stack:
            try:
                for offset in offsets:
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", base + offset))
            except OSError:
                continue
        return base
    raise RuntimeError("no six free consecutive ports")


@dataclasses.dataclass
class LocalUp:
    """One `mailfleet local up` process; its output goes to files, read as a user reads the terminal."""

    state: Path
    base: int
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    node_pids: list[int] = dataclasses.field(default_factory=list)

    def port(self, name: str) -> int:
        return self.base + (HTTPS_OFFSET if name == "https" else PORT_NAMES.index(name))

    def output(self) -> str:
        return self.stdout.read_text()

    def errors(self) -> str:
        return self.stderr.read_text()

    def wait_ready(self, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "\nready: " in self.output():
                self.node_pids = _children(self.process.pid)
                return self.output()
            if self.process.poll() is not None:
                pytest.fail(f"local up exited with {self.process.returncode}:\n{self.errors()}")
            time.sleep(0.1)
        pytest.fail(f"local up not ready after {timeout}s:\n{self.output()}\n{self.errors()}")

    def wait(self, timeout: float = 60) -> int:
        return self.process.wait(timeout)

    def kill_everything(self) -> None:
        """Teardown after a failed test: nothing may outlive it (the nodes run in sessions of their own)."""
        pids = [*self.node_pids, *(_children(self.process.pid) if self.process.poll() is None else [])]
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.fixture
def local_up(tmp_path: Path) -> Iterator[Callable[..., LocalUp]]:
    started: list[LocalUp] = []

    def start(*files: str, state: Path | None = None, base: int | None = None) -> LocalUp:
        state = state or tmp_path / "state"
        base = base or free_base_port()
        index = len(started)
        stdout, stderr = tmp_path / f"stdout-{index}", tmp_path / f"stderr-{index}"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-m", "mailfleet.cli", "local", "up"]
                + [arg for path in (files or EXAMPLE_FILES) for arg in ("-f", str(path))]
                + ["--base-port", str(base), "--state-dir", str(state)],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        up = LocalUp(state, base, process, stdout, stderr)
        started.append(up)
        return up

    yield start
    for up in started:
        up.kill_everything()


def run_local_up(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """For input that must be refused: the command ends by itself (a timeout would mean it started nodes)."""
    return subprocess.run(
        [sys.executable, "-m", "mailfleet.cli", "local", "up", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def imap_login(up: LocalUp, address: str, password: str, *, context: ssl.SSLContext | None = None) -> imaplib.IMAP4:
    """IMAP on the STARTTLS port, trusting the certificate local up made (unless told otherwise)."""
    context = context or ssl.create_default_context(cafile=str(up.state / "tls" / "cert.pem"))
    imap = imaplib.IMAP4("localhost", up.port("imap"))
    imap.starttls(ssl_context=context)
    imap.login(address, password)
    return imap


def inbox(imap: imaplib.IMAP4) -> list[bytes]:
    imap.select("INBOX", readonly=True)
    _, numbers = imap.search(None, "ALL")
    messages = []
    for number in numbers[0].split():
        _, data = imap.fetch(number.decode(), "(BODY.PEEK[])")
        part = data[0]
        assert isinstance(part, tuple)
        messages.append(part[1])
    return messages


def send_to_alice(up: LocalUp) -> bytes:
    """A message with a body no other test sends, over the MX port, as mail from another server arrives."""
    message = (
        b"From: Carol <carol@elsewhere.test>\r\n"
        b"To: alice@example.com\r\n"
        b"Subject: local up\r\n"
        b"Message-ID: <" + uuid.uuid4().hex.encode() + b"@elsewhere.test>\r\n"
        b"\r\n"
        b"Hello Alice,\r\n"
        b"  indented, with trailing space \r\n"
        b"token " + uuid.uuid4().hex.encode() + b"\r\n"
    )
    with smtplib.SMTP("127.0.0.1", up.port("smtp"), timeout=30) as smtp:
        smtp.sendmail("carol@elsewhere.test", ["alice@example.com"], message)
    return message


def assert_stopped(up: LocalUp) -> None:
    assert up.node_pids, "local up had no node process"
    for pid in up.node_pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    for name in (*PORT_NAMES, "https"):
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", up.port(name)), timeout=5):
            pass


# -- running the examples ------------------------------------------------------------------------------


def test_mail_to_the_mx_is_read_over_imap_and_sigterm_stops_every_node(local_up: Callable[..., LocalUp]) -> None:
    up = local_up()
    output = up.wait_ready()
    for name in PORT_NAMES:
        assert f"127.0.0.1:{up.port(name)}" in output
    assert "example.com. MX 10 mail.example.com." in output
    assert "mail._domainkey.example.com. TXT v=DKIM1; k=rsa; p=" in output
    assert len(up.node_pids) == 1

    message = send_to_alice(up)
    imap = imap_login(up, "alice@example.com", example_password("alice-password", "password"))
    (stored,) = inbox(imap)
    imap.logout()
    assert stored.endswith(message)  # after the node's trace headers, exactly what was sent

    app = imap_login(up, "bob@example.com", example_password("bob-password", "phone"))
    assert app.noop()[0] == "OK"
    app.logout()

    # the HTTPS listener on base+8, with the self-signed certificate `local up` made (its names included)
    assert f"127.0.0.1:{up.port('https')}" in output
    context = ssl.create_default_context(cafile=str(up.state / "tls" / "cert.pem"))
    autoconfig = f"https://127.0.0.1:{up.port('https')}/mail/config-v1.1.xml?emailaddress=alice@example.com"
    with urllib.request.urlopen(autoconfig, context=context, timeout=10) as answer:
        body = answer.read().decode()
    assert f"<port>{up.port('imaps')}</port>" in body and "<hostname>127.0.0.1</hostname>" in body

    up.process.send_signal(signal.SIGTERM)
    assert up.wait() == 0, up.errors()
    assert up.output().endswith("stopped 1 mail node\n")
    assert_stopped(up)


def test_a_restart_keeps_mail_certificate_and_dkim_key(local_up: Callable[..., LocalUp]) -> None:
    first = local_up()
    output = first.wait_ready()
    certificate = (first.state / "tls" / "cert.pem").read_bytes()
    (dkim_record,) = [line for line in output.splitlines() if "mail._domainkey.example.com." in line]
    message = send_to_alice(first)
    first.process.send_signal(signal.SIGINT)  # Ctrl-C
    assert first.wait() == 0, first.errors()

    second = local_up(state=first.state)
    assert dkim_record in second.wait_ready().splitlines()
    assert (second.state / "tls" / "cert.pem").read_bytes() == certificate
    imap = imap_login(second, "alice@example.com", example_password("alice-password", "password"))
    (stored,) = inbox(imap)
    imap.logout()
    assert stored.endswith(message)


def test_a_tls_secret_in_the_files_is_served(
    local_up: Callable[..., LocalUp], tmp_path: Path, ca: trustme.CA, client_tls: ssl.SSLContext
) -> None:
    cert = ca.issue_cert("localhost", "mail.example.com")
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "mail-example-com-tls"},  # spec.tls.secretName of the example
        "type": "kubernetes.io/tls",
        "stringData": {
            "tls.crt": cert.private_key_and_cert_chain_pem.bytes().decode(),
            "tls.key": cert.private_key_pem.bytes().decode(),
        },
    }
    path = tmp_path / "tls-secret.yaml"
    path.write_text(yaml.safe_dump(secret))
    up = local_up(*EXAMPLE_FILES, str(path))
    assert "Secret mail-example-com-tls" in up.wait_ready()
    imap = imap_login(up, "alice@example.com", example_password("alice-password", "password"), context=client_tls)
    imap.logout()
    assert not (up.state / "tls").exists()


# -- failures ------------------------------------------------------------------------------------------


def test_a_node_that_dies_stops_the_run(local_up: Callable[..., LocalUp]) -> None:
    up = local_up()
    up.wait_ready()
    (node,) = up.node_pids
    os.kill(node, signal.SIGKILL)
    assert up.wait() == 1
    assert "node 0 (MailDomain example-com) exited unexpectedly (exit code -9)" in up.errors()
    assert_stopped(up)


def test_a_taken_port_is_reported(local_up: Callable[..., LocalUp]) -> None:
    with socket.socket() as taken:
        base = free_base_port()
        taken.bind(("127.0.0.1", base + PORT_NAMES.index("imap")))
        taken.listen()
        up = local_up(base=base)
        assert up.wait() == 1
    errors = up.errors()
    assert "node 0 (MailDomain example-com) exited before it was ready (exit code 1)" in errors
    assert "address already in use" in errors  # the node's own message, from its log


def test_a_domain_of_three_replicas_runs_three_nodes(local_up: Callable[..., LocalUp]) -> None:
    base = free_base_port(nodes=3)
    up = local_up("examples/cluster.yaml", base=base)
    output = up.wait_ready()
    assert len(up.node_pids) == 3
    root = up.state / "example-org"
    peers = [
        {
            "host": "127.0.0.1",
            "lmtp": base + 10 * i + 6,
            "imap_proxy": base + 10 * i + 7,
            "http": base + 10 * i + 5,
            "https": base + 10 * i + HTTPS_OFFSET,
        }
        for i in range(3)
    ]
    for ordinal in range(3):
        title = f"node {ordinal} (MailDomain example-org, ordinal {ordinal})"
        assert title in output
        for offset in (*range(8), HTTPS_OFFSET):  # the client ports and the internal ones, in the printed table
            assert f"127.0.0.1:{base + 10 * ordinal + offset}" in output
        with urllib.request.urlopen(f"http://127.0.0.1:{base + 10 * ordinal + 5}/readyz", timeout=5) as ready:
            assert ready.status == 200
        config = yaml.safe_load((root / f"node-{ordinal}" / "node.yaml").read_text())
        assert config["cluster"] == {"ordinal": ordinal, "peers": peers}
        assert config["node_name"] == f"example-org-{ordinal}"
        assert config["data_dir"] == str((root / f"node-{ordinal}" / "data").absolute())
        # one directory and one internal token for the three, as the pods share the Secrets
        assert config["directory_file"] == str((root / "directory.yaml").absolute())
        assert config["internal"]["token_file"] == str((root / "internal" / "token").absolute())
    assert output.count("DNS records to publish for MailDomain example-org") == 1
    homes = {e["address"]: e.get("home", 0) for e in yaml.safe_load((root / "directory.yaml").read_text())["mailboxes"]}
    assert homes == {a: placement.rendezvous(a, 3) for a in CLUSTER_MAILBOXES}

    up.process.send_signal(signal.SIGTERM)
    assert up.wait() == 0, up.errors()
    assert up.output().endswith("stopped 3 mail nodes\n")
    for pid in up.node_pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_every_node_of_three_serves_every_mailbox(local_up: Callable[..., LocalUp], tmp_path: Path) -> None:
    # swaks through node 0's MX to a mailbox of each home; each read back byte for byte through node 2's IMAP,
    # with imaplib and with mbsync (proxied to the home, except for node 2's own mailbox).
    swaks, mbsync = require_tool("swaks"), require_tool("mbsync")
    base = free_base_port(nodes=3)
    up = local_up("examples/cluster.yaml", base=base)
    up.wait_ready()
    root = up.state / "example-org"
    homes = {address: placement.rendezvous(address, 3) for address in CLUSTER_MAILBOXES}
    assert set(homes.values()) == {0, 1, 2}
    ca_file = up.state / "tls" / "cert.pem"
    for address in CLUSTER_MAILBOXES:
        token = uuid.uuid4().hex
        sent = subprocess.run(
            [swaks, "--server", f"127.0.0.1:{base}", "--helo", "swaks.test", "--from", "zoe@elsewhere.test",
             "--to", address, "--header", f"Subject: {token}", "--body", f"for {address} {token}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stdout + sent.stderr
        local = address.split("@")[0]
        stored = [
            [f.read_bytes() for f in sorted((root / f"node-{i}/data/mail/example.org/{local}/INBOX/new").glob("*"))]
            for i in range(3)
        ]
        assert [len(files) for files in stored] == [1 if i == homes[address] else 0 for i in range(3)], address
        context = ssl.create_default_context(cafile=str(ca_file))
        imap = imaplib.IMAP4("localhost", base + 20 + PORT_NAMES.index("imap"))
        imap.starttls(ssl_context=context)
        imap.login(address, example_password_of(address))
        assert inbox(imap) == stored[homes[address]]  # byte for byte, as the home stored it
        imap.logout()

    dave = "dave@example.org"
    assert homes["heidi@example.org"] == 2 and homes[dave] != 2  # heidi was read at her home, dave proxied
    near = tmp_path / "mbsync"
    near.mkdir()
    config = tmp_path / "mbsyncrc"
    config.write_text(
        f'IMAPAccount node2\nHost localhost\nPort {base + 23}\nUser {dave}\nPass "{example_password_of(dave)}"\n'
        f"SSLType STARTTLS\nCertificateFile {ca_file}\n\nIMAPStore remote\nAccount node2\n\n"
        f"MaildirStore local\nPath {near}/\nInbox {near}/INBOX\n\n"
        "Channel sync\nFar :remote:\nNear :local:\nPatterns INBOX\nCreate Near\nSyncState *\n"
    )
    synced = subprocess.run([mbsync, "-c", str(config), "-a"], capture_output=True, text=True, timeout=120)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    pulled = [f.read_bytes() for sub in ("new", "cur") for f in (near / "INBOX" / sub).glob("*")]
    home = root / f"node-{homes[dave]}/data/mail/example.org/dave/INBOX"
    at_home = [f.read_bytes() for sub in ("new", "cur") for f in (home / sub).glob("*")]
    assert len(pulled) == 1 and [normalized(pulled[0])] == [m.replace(b"\r\n", b"\n") for m in at_home]


def example_password_of(address: str) -> str:
    (secret,) = [d for d in example_documents("cluster.yaml") if d["kind"] == "Secret"]
    return str(secret["stringData"][address.split("@")[0]])


def test_more_than_sixteen_replicas_is_refused(tmp_path: Path) -> None:
    (document,) = example_documents("maildomain.yaml")
    document["spec"]["replicas"] = 17
    path = tmp_path / "maildomain.yaml"
    path.write_text(yaml.safe_dump(document))
    state = tmp_path / "state"
    result = run_local_up("-f", str(path), "-f", "examples/mailboxes.yaml", "--state-dir", str(state))
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"mailfleet local up: error: {path}: MailDomain example-com: invalid: spec.replicas:"
    )
    assert "16" in result.stderr and len(result.stderr.splitlines()) == 1
    assert result.stdout == "" and not state.exists()


def test_a_missing_password_secret_names_the_file_and_mailbox(tmp_path: Path) -> None:
    documents = [d for d in example_documents("mailboxes.yaml") if d["metadata"]["name"] != "bob-password"]
    path = tmp_path / "mailboxes.yaml"
    path.write_text(yaml.safe_dump_all(documents))
    state = tmp_path / "state"
    result = run_local_up("-f", "examples/maildomain.yaml", "-f", str(path), "--state-dir", str(state))
    assert result.returncode == 1
    assert result.stderr == (
        f"mailfleet local up: error: {path}: Mailbox bob: spec.passwordSecretRef: "
        "Secret bob-password is not in the files\n"
    )
    assert not state.exists()


def test_a_tls_secret_of_the_wrong_type_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret.yaml"
    path.write_text(
        yaml.safe_dump(
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mail-example-com-tls"}, "stringData": {}}
        )
    )
    state = tmp_path / "state"
    files = ("-f", "examples/maildomain.yaml", "-f", "examples/mailboxes.yaml", "-f", str(path))
    result = run_local_up(*files, "--state-dir", str(state))
    assert result.returncode == 1 and not state.exists()
    assert result.stderr == (
        "mailfleet local up: error: examples/maildomain.yaml: MailDomain example-com: "
        f"spec.tls.secretName: Secret mail-example-com-tls ({path}) is of type Opaque, not kubernetes.io/tls\n"
    )
