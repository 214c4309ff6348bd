"""A mailbox moved on a real `mailfleet local up` of three nodes (issue "mailbox moves", its local test):
examples/cluster.yaml plus alice, run by `local up` as three `mailnode serve` processes; the operator's
driver (mailfleet.moving) moves her from her home to another node over the nodes' HTTP API, as the
operator does in a cluster, while three smtplib senders deliver to her through the three nodes' MX ports
and an imaplib session on her home is in IDLE. The test plays the operator's directory write (the flip):
the state directory's directory.yaml, the file the three nodes share as the pods share the Secret, is
rewritten with her new home.

Why the driver is called here rather than through local up's own resources: local up renders the files
once when it starts and has no reconcile loop, so neither the mailfleet.io/move-to annotation nor a
changed `replicas` reaches running nodes; the driver, the nodes' API and the directory are the
operator's own, and only the Kubernetes status writes between the steps are left out.

Aspects: no message is refused or lost while she is frozen (the mail waits in the queues); afterwards
every acknowledged message is stored once at her new home and the other nodes hold no copy, every queue
is empty; the IDLE session got `BYE [UNAVAILABLE]`, and its client logs in again (through the old home,
proxied now), sees every message and is told of new mail in IDLE; what a client saw before is unchanged
(UIDVALIDITY, UIDs, flags and keywords, MODSEQs, internal dates, folders, subscriptions, special use:
the mail of the move is only added to INBOX); mbsync, synced before, finds only the new mail to fetch:
no file it had changes (its flags are in the file names) and its sync state keeps every UID and the
UIDVALIDITY; and after a restart of local up, alice is still served from her new home (local up keeps
the home the directory recorded). Since local up itself moves nothing, a restart with fewer replicas
(or one node becoming several) that would leave a node's mailboxes unserved is refused, naming the
file, the field and the data; more replicas keep every home.
"""

from __future__ import annotations

import asyncio
import collections
import imaplib
import json
import re
import signal
import smtplib
import ssl
import subprocess
import threading
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from mailfleet import local, moving, specs
from mailfleet.specs import placement
from tests.conftest import require_tool
from tests.e2e import test_local_up
from tests.e2e.test_local_up import LocalUp, free_base_port, run_local_up
from tests.node.test_move import fill, ok, seen_by_client, snapshot_of
from tests.node.test_move_load import Idler, Sender
from tests.node.test_outbound import wait_for

local_up = test_local_up.local_up  # the fixture, shared with the other local up tests

ALICE = "alice@example.org"
ALICE_PASSWORD = "alice-demo-password"
ALICE_FILE = f"""\
apiVersion: v1
kind: Secret
metadata:
  name: alice-password
type: Opaque
stringData:
  password: {ALICE_PASSWORD}
---
apiVersion: mailfleet.io/v1alpha1
kind: Mailbox
metadata:
  name: alice
spec:
  address: {ALICE}
  passwordSecretRef: {{name: alice-password, key: password}}
"""
NODES = 3
HTTP_OFFSET, SMTP_OFFSET, IMAP_OFFSET = 5, 0, 3  # DESIGN.md, `mailfleet local up`: base + 10*i + these
READY_TIMEOUT = 300  # seconds: three nodes starting on a loaded machine
_MESSAGE_ID = re.compile(rb"\nMessage-ID: <([^<>\r\n]+)>\r?\n")  # mbsync writes LF line ends


class LocalDomain:
    """The three nodes of the `example-org` domain local up runs, as the driver reaches them."""

    def __init__(self, up: LocalUp) -> None:
        self.up = up
        self.root = up.state / "example-org"
        self.directory_file = self.root / "directory.yaml"
        token = (self.root / "internal" / "token").read_text().strip()
        self.nodes = moving.AtURLs({i: f"http://127.0.0.1:{self.port(i, HTTP_OFFSET)}" for i in range(NODES)}, token)

    def port(self, ordinal: int, offset: int) -> int:
        return self.up.base + 10 * ordinal + offset

    def homes(self) -> dict[str, int]:
        entries = specs.node.read_directory(self.directory_file.read_bytes())
        return specs.node.recorded_homes(entries)

    async def publish_home(self, address: str, home: int) -> None:
        """The operator's directory write at the flip: the file with the new home, replaced whole (each
        node reloads it when it changes)."""
        entries = specs.node.read_directory(self.directory_file.read_bytes())
        for entry in entries:
            if entry["address"].lower() == address:
                entry["home"] = home
        tmp = self.directory_file.with_name(".directory.yaml.move")
        tmp.write_text(specs.dump({"mailboxes": entries}))
        tmp.chmod(0o600)
        tmp.replace(self.directory_file)

    def mail_dir(self, ordinal: int) -> Path:
        return self.root / f"node-{ordinal}" / "data" / "mail" / "example.org" / "alice"

    def stored(self, ordinal: int) -> list[bytes]:
        inbox = self.mail_dir(ordinal) / "INBOX"
        return [f.read_bytes() for sub in ("new", "cur") if (inbox / sub).is_dir() for f in (inbox / sub).iterdir()]

    def queue(self, ordinal: int) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.nodes.url(ordinal)}/queue", timeout=30) as answer:  # no token to read
            queued: list[dict[str, Any]] = json.loads(answer.read())
            return queued

    def login(self, ordinal: int) -> imaplib.IMAP4:
        context = ssl.create_default_context(cafile=str(self.up.state / "tls" / "cert.pem"))
        client = imaplib.IMAP4("localhost", self.port(ordinal, IMAP_OFFSET), timeout=60)
        client.starttls(ssl_context=context)
        client.login(ALICE, ALICE_PASSWORD)
        return client


async def move(domain: LocalDomain, *, source: int, target: int) -> list[moving.Move]:
    """The move, step by step with the operator's driver until DONE; every Move it recorded."""
    current = moving.start(ALICE, source=source, target=target, now=moving.utc_now())
    recorded = [current]
    async with aiohttp.ClientSession() as session:
        while current.step is not moving.Step.DONE:
            current = await moving.advance(
                current, nodes=domain.nodes, session=session, ordinals=range(NODES), publish_home=domain.publish_home
            )
            recorded.append(current)
    return recorded


def mbsync(binary: str, config: Path) -> None:
    synced = subprocess.run([binary, "-c", str(config), "-a"], capture_output=True, text=True, timeout=300)
    assert synced.returncode == 0, synced.stdout + synced.stderr


def sync_state(text: str) -> tuple[list[str], list[str]]:
    """An mbsync state file: its header (UIDVALIDITYs and UID marks) and its entries, one per message
    (far UID, near UID, flags)."""
    header, _, entries = text.partition("\n\n")
    return header.splitlines(), entries.splitlines()


def status_item(status: list[bytes], name: str) -> int:
    found = re.search(rb"%s (\d+)" % name.encode(), status[0])
    assert found is not None, status
    return int(found.group(1))


def send_one(port: int) -> str:
    """One message to alice through the MX port; its Message-ID."""
    message_id = f"after-{uuid.uuid4().hex}@remote.test"
    data = f"Message-ID: <{message_id}>\r\nSubject: after the move\r\n\r\nNew mail.\r\n".encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
        assert client.sendmail("sender@remote.test", [ALICE], data) == {}
    return message_id


def test_alice_moves_under_load_on_local_up_and_her_clients_see_no_change(
    local_up: Callable[..., LocalUp], tmp_path: Path
) -> None:
    binary = require_tool("mbsync")
    alice_file = tmp_path / "alice.yaml"
    alice_file.write_text(ALICE_FILE)
    up = local_up("examples/cluster.yaml", str(alice_file), base=free_base_port(nodes=NODES))
    up.wait_ready(timeout=READY_TIMEOUT)
    domain = LocalDomain(up)
    source = domain.homes()[ALICE]
    assert source == placement.rendezvous(ALICE, NODES)
    target, other = (source + 1) % NODES, (source + 2) % NODES

    # Her mailbox as a client leaves it: folders, subscriptions, flags, keywords, UID gaps, modseqs.
    client = domain.login(source)
    fill(client)
    before = seen_by_client(client)
    client.logout()
    near = tmp_path / "mbsync"
    near.mkdir()
    config = tmp_path / "mbsyncrc"
    config.write_text(
        f"IMAPAccount node\nHost localhost\nPort {domain.port(other, IMAP_OFFSET)}\nUser {ALICE}\n"
        f'Pass "{ALICE_PASSWORD}"\nSSLType STARTTLS\nCertificateFile {up.state / "tls" / "cert.pem"}\n\n'
        "IMAPStore remote\nAccount node\n\n"
        f"MaildirStore local\nPath {near}/\nInbox {near}/INBOX\nSubFolders Verbatim\n\n"
        "Channel sync\nFar :remote:\nNear :local:\nPatterns *\nCreate Both\nExpunge Both\nSyncState *\n"
    )
    mbsync(binary, config)
    synced_before = snapshot_of(near)
    assert sum(1 for name in synced_before if "/cur/" in name or "/new/" in name) == 10  # 12 appended, 2 expunged

    # The load: an IMAP session in IDLE on her home, three senders through the three nodes' MX ports.
    idler = Idler(domain.login(source))
    idler.start()
    wait_for("IDLE to start", idler.idling.is_set, timeout=120)
    stop = threading.Event()
    senders = [Sender(f"via{i}", domain.port(i, SMTP_OFFSET), stop, (ALICE,)) for i in range(NODES)]
    for sender in senders:
        sender.start()
    try:
        wait_for("mail to flow", lambda: sum(len(s.acked) for s in senders) >= 15, timeout=300)
        recorded = asyncio.run(move(domain, source=source, target=target))
        after_move = sum(len(s.acked) for s in senders)
        wait_for("mail to flow after the move", lambda: sum(len(s.acked) for s in senders) >= after_move + 15, 300)
    finally:
        stop.set()
        for sender in senders:
            sender.join(120)
    assert [m.step for m in recorded][-1] is moving.Step.DONE
    assert domain.homes()[ALICE] == target

    # Every acknowledged message once, at the new home only; nothing refused, nothing waiting.
    assert [s.refused for s in senders] == [[]] * NODES
    assert [s.unreached for s in senders] == [[]] * NODES
    acked = [message_id for s in senders for message_id in s.acked]
    wait_for("every queue to empty", lambda: all(domain.queue(i) == [] for i in range(NODES)), timeout=300)
    found = collections.Counter(
        match.group(1).decode() for data in domain.stored(target) if (match := _MESSAGE_ID.search(data))
    )
    assert sorted(found) == sorted(acked)  # every acknowledged message, and no other sent one
    assert set(found.values()) == {1}  # each exactly once
    assert not domain.mail_dir(source).exists() and not domain.mail_dir(other).exists()

    # The IDLE client was told to go at the freeze; it comes back through the old home and idles again.
    idler.join(120)
    assert any(line.startswith(b"* BYE [UNAVAILABLE]") for line in idler.lines), idler.lines
    again = domain.login(source)
    messages = int(ok(again.select("INBOX"))[0])
    assert messages == status_item(before["INBOX"][0], "MESSAGES") + len(acked)
    again.send(b"i2 IDLE\r\n")
    assert again.readline().startswith(b"+")
    last = send_one(domain.port(other, SMTP_OFFSET))  # handed to her home, seen by the proxied session
    assert again.readline() == f"* {messages + 1} EXISTS\r\n".encode()
    again.send(b"DONE\r\n")
    while not (line := again.readline()).startswith(b"i2 "):  # past an untagged RECENT
        assert line.startswith(b"* "), line
    assert line.startswith(b"i2 OK"), line
    again.logout()

    # What a client saw is unchanged; the mail of the move only added to INBOX.
    client = domain.login(other)
    after = seen_by_client(client)
    client.logout()
    assert {k: v for k, v in after.items() if k != "INBOX"} == {k: v for k, v in before.items() if k != "INBOX"}
    (status_before, fetched_before), (status_after, fetched_after) = before["INBOX"], after["INBOX"]
    assert status_item(status_after, "UIDVALIDITY") == status_item(status_before, "UIDVALIDITY")
    assert fetched_after[: len(fetched_before)] == fetched_before  # UIDs, flags, MODSEQs, dates, bodies

    # mbsync: only the new mail to fetch; the files it had, and its record of them, unchanged.
    mbsync(binary, config)
    synced_after = snapshot_of(near)
    # Its record of INBOX (far and near UIDVALIDITY, far UID -> near UID with flags) and the Maildir's own
    # (near UIDVALIDITY, last UID) grow by the new messages; nothing else it wrote changes.
    inbox_state, inbox_uids = "INBOX/.mbsyncstate", "INBOX/.uidvalidity"
    changed = {name for name in synced_before if synced_after.get(name) != synced_before[name]}
    assert changed == {inbox_state, inbox_uids}, changed
    added = [synced_after[name] for name in synced_after.keys() - synced_before.keys()]
    assert sorted(m.group(1).decode() for data in added if (m := _MESSAGE_ID.search(data))) == sorted([*acked, last])
    header_before, entries_before = sync_state(synced_before[inbox_state].decode())
    header_after, entries_after = sync_state(synced_after[inbox_state].decode())
    assert [line for line in header_after if "UidValidity" in line] == [
        line for line in header_before if "UidValidity" in line
    ]
    assert entries_after[: len(entries_before)] == entries_before  # same UIDs, same flags
    assert len(entries_after) == len(entries_before) + len(acked) + 1
    assert synced_after[inbox_uids].splitlines()[0] == synced_before[inbox_uids].splitlines()[0]

    # local up restarted: alice stays at her new home (the directory recorded it), with all her mail.
    up.process.send_signal(signal.SIGTERM)
    assert up.wait(120) == 0, up.errors()
    restarted = local_up("examples/cluster.yaml", str(alice_file), state=up.state, base=free_base_port(nodes=NODES))
    restarted.wait_ready(timeout=READY_TIMEOUT)
    assert LocalDomain(restarted).homes()[ALICE] == target
    client = LocalDomain(restarted).login(source)
    assert int(ok(client.select("INBOX", readonly=True))[0]) == messages + 1
    client.logout()


def test_fewer_replicas_that_would_leave_mail_unserved_are_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cluster = (test_local_up.EXAMPLES / "cluster.yaml").read_text()
    local.prepare([test_local_up.EXAMPLES / "cluster.yaml"], base_port=25000, state_dir=state)
    homes = specs.node.recorded_homes(
        specs.node.read_directory((state / "example-org" / "directory.yaml").read_bytes())
    )
    (heidi,) = [address for address, home in homes.items() if home == 2]
    mailbox = state / "example-org" / "node-2" / "data" / "mail" / "example.org" / heidi.partition("@")[0]
    mailbox.mkdir(parents=True)  # as a node leaves it once the mailbox has mail

    for replicas in (2, 1):
        fewer = tmp_path / f"cluster-{replicas}.yaml"
        fewer.write_text(cluster.replace("replicas: 3", f"replicas: {replicas}"))
        result = run_local_up("-f", str(fewer), "--state-dir", str(state))
        assert result.returncode == 1
        assert result.stderr.startswith(
            f"mailfleet local up: error: {fewer}: MailDomain example-org: spec.replicas: {replicas} would not run "
            f"the node whose data is {state / 'example-org' / 'node-2' / 'data'}, which holds mailboxes;"
        ), result.stderr
        assert len(result.stderr.splitlines()) == 1

    more = tmp_path / "cluster-4.yaml"
    more.write_text(cluster.replace("replicas: 3", "replicas: 4"))
    local.prepare([more], base_port=25000, state_dir=state)
    directory = (state / "example-org" / "directory.yaml").read_bytes()
    assert specs.node.recorded_homes(specs.node.read_directory(directory)) == homes  # nothing moves
