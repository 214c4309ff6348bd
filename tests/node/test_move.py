"""Moving a mailbox between the nodes of a cluster (docs/architecture.md "Moving a mailbox"): three real
nodes on 127.0.0.1 (tests.node.test_cluster_mail's Cluster) and the operator's driver, mailfleet.moving,
calling their HTTP API step by step as the operator does; the test plays the operator's directory write
(publish_home: every node's directory file rewritten with the new home).

Aspects: what an IMAP client sees is identical before and after (UIDVALIDITY, UIDNEXT, UIDs with gaps,
flags and keywords, MODSEQ and HIGHESTMODSEQ, INTERNALDATE, sizes, LIST and LSUB with their attributes),
on the new home and through the proxy of any node, and mbsync synced before finds nothing to do after;
the steps come in the contract's order and the old copy is gone from the source; a step asked again
answers the same; a move given up before the flip leaves the mailbox where it was, whole; the node's
refusals (a drop of a mailbox homed here, a final copy without a freeze, an unknown mailbox).
"""

from __future__ import annotations

import asyncio
import copy
import imaplib
import re
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mailfleet import moving, nodes
from tests.conftest import require_tool
from tests.node.conftest import DOMAIN, PASSWORD, NodeFactory, RunningNode
from tests.node.test_cluster_mail import MAILBOXES, TOKEN, Cluster, send

ALICE = f"alice@{DOMAIN}"  # home: node 0
NOW = "2026-12-07T17:00:00Z"


# Every node connects from 127.0.0.1 here, so the peers' LMTP connections all count as one client's at
# the gate (in a cluster each pod has its own address): room for the queues of two peers at once.
LISTEN = {"limits": {"smtp": {"per_client": 200}}}


def three_nodes(node_factory: NodeFactory, tmp_path: Path) -> Iterator[Cluster]:
    """The cluster of the move tests (their `cluster` fixture)."""
    made = Cluster(node_factory, tmp_path, 3, listen=LISTEN)
    yield made
    for node in made.restarted:
        node.stop()


@pytest.fixture
def cluster(node_factory: NodeFactory, tmp_path: Path) -> Iterator[Cluster]:
    yield from three_nodes(node_factory, tmp_path)


def domain_nodes(cluster: Cluster) -> moving.AtURLs:
    return moving.AtURLs({i: f"http://127.0.0.1:{port}" for i, port in enumerate(cluster.http)}, token=TOKEN)


def directory_with(homes: dict[str, int]) -> list[dict[str, Any]]:
    entries = copy.deepcopy(MAILBOXES)
    for entry in entries:
        if entry["address"] in homes:
            entry["home"] = homes[entry["address"]]
    return entries


async def drive(
    cluster: Cluster, address: str, *, source: int, target: int, stop_at: moving.Step | None = None
) -> list[moving.Move]:
    """Run a move with the operator's driver until DONE (or until it reaches `stop_at`); every Move it
    recorded, in order."""

    async def publish_home(published: str, home: int) -> None:
        for node in cluster.nodes:
            node.files.write_directory(directory_with({published: home}))

    move = moving.start(address, source=source, target=target, now=NOW)
    recorded = [move]
    async with aiohttp.ClientSession() as session:
        while move.step is not moving.Step.DONE and move.step is not stop_at:
            move = await moving.advance(
                move, nodes=domain_nodes(cluster), session=session, ordinals=range(3), publish_home=publish_home
            )
            recorded.append(move)
    return recorded


def login(node: RunningNode, client_tls: ssl.SSLContext, user: str = ALICE) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", node.port("imap"), timeout=30)
    client.starttls(ssl_context=client_tls)
    client.login(user, PASSWORD)
    return client


def ok(answer: tuple[str, Any]) -> Any:
    typ, data = answer
    assert typ == "OK", data
    return data


_NAME = re.compile(rb'\) "/" (.+)$')


def seen_by_client(client: imaplib.IMAP4) -> dict[str, Any]:
    """Everything an IMAP client can know of the mailbox without changing it (EXAMINE, not SELECT:
    \\Recent is not taken)."""
    ok(client.enable("CONDSTORE"))
    listed = sorted(ok(client.list('""', "*")))
    subscribed = sorted(ok(client.lsub('""', "*")))
    view: dict[str, Any] = {"LIST": listed, "LSUB": subscribed}
    for line in listed:
        match = _NAME.search(line)
        assert match is not None, line
        name = match.group(1).decode()
        status = ok(client.status(name, "(MESSAGES UIDNEXT UIDVALIDITY HIGHESTMODSEQ UNSEEN)"))
        ok(client.select(name, readonly=True))
        fetched = ok(client.uid("FETCH", "1:*", "(FLAGS INTERNALDATE MODSEQ RFC822.SIZE BODY.PEEK[])"))
        view[name] = (status, [item for item in fetched if item is not None])
        ok(client.close())
    return view


def fill(client: imaplib.IMAP4) -> None:
    """Folders, subscriptions, flags and keywords, expunges that leave UID gaps, modseqs moved on."""
    for name in ("Projects", "Projects/2026", "Lists"):
        ok(client.create(name))
    ok(client.unsubscribe("Lists"))
    ok(client.unsubscribe("Junk"))
    for number in range(12):
        folder = ("INBOX", "Projects", "Projects/2026")[number % 3]
        message = f"From: a{number}@remote.test\r\nSubject: note {number}\r\n\r\nbody {number}\r\n".encode()
        flags = ("(\\Seen)", "(\\Flagged $Important)", "()")[number % 3]
        ok(client.append(folder, flags, imaplib.Time2Internaldate(1_700_000_000 + number * 3600), message))
    ok(client.select("INBOX"))
    ok(client.uid("STORE", "1", "+FLAGS", "(\\Deleted)"))
    ok(client.uid("STORE", "3", "+FLAGS", "(\\Answered keyword1)"))
    ok(client.expunge())
    ok(client.uid("STORE", "4", "-FLAGS", "(\\Seen)"))
    ok(client.close())
    ok(client.select("Projects"))
    ok(client.uid("STORE", "2", "+FLAGS", "(\\Deleted)"))
    ok(client.expunge())
    ok(client.close())


def test_a_moved_mailbox_looks_the_same_to_clients_and_to_mbsync(
    cluster: Cluster, client_tls: ssl.SSLContext, ca_file: Path, tmp_path: Path
) -> None:
    binary = require_tool("mbsync")
    node0, node1, node2 = cluster.nodes
    assert send(node2, [ALICE]) == {}  # through a hand-off: the hand-off id goes with the mailbox
    client = login(node0, client_tls)
    fill(client)
    before = seen_by_client(client)
    client.logout()
    local = tmp_path / "local"
    config = tmp_path / "mbsyncrc"
    config.write_text(
        f'IMAPAccount node\nHost localhost\nPort {node2.port("imap")}\nUser {ALICE}\nPass "{PASSWORD}"\n'
        f"SSLType STARTTLS\nCertificateFile {ca_file}\n\nIMAPStore remote\nAccount node\n\n"
        f"MaildirStore local\nPath {local}/\nInbox {local}/INBOX\nSubFolders Verbatim\n\n"
        "Channel sync\nFar :remote:\nNear :local:\nPatterns *\nCreate Both\nExpunge Both\nSyncState *\n"
    )
    local.mkdir()
    synced = subprocess.run([binary, "-c", str(config), "-a"], capture_output=True, text=True, timeout=120)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    local_before = snapshot_of(local)
    assert sum(1 for name in local_before if "/cur/" in name or "/new/" in name) == 11  # 13 messages, 2 expunged

    in_inbox = len(node0.files.stored(ALICE))
    recorded = asyncio.run(drive(cluster, ALICE, source=0, target=1))

    assert [move.step for move in recorded] == [
        moving.Step.COPYING, moving.Step.FREEZING, moving.Step.CATCHING_UP, moving.Step.FLIPPING,
        moving.Step.THAWING, moving.Step.CLEANING, moving.Step.DONE,
    ]  # fmt: skip
    assert all(move.since == NOW for move in recorded)
    for node in (node1, node2, node0):  # the new home itself, and proxied from the two others
        client = login(node, client_tls)
        assert seen_by_client(client) == before
        client.logout()
    assert not (node0.files.data_dir / "mail" / DOMAIN / "alice").exists()  # the old copy is gone
    assert not (node1.files.data_dir / "moves" / "incoming" / DOMAIN / "alice").exists()  # taken into place
    synced = subprocess.run([binary, "-c", str(config), "-a"], capture_output=True, text=True, timeout=120)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    assert snapshot_of(local) == local_before  # nothing to fetch, nothing changed, no UIDVALIDITY reset
    # Mail after the move goes to the new home, from every node.
    assert send(node0, [ALICE]) == {} and send(node2, [ALICE]) == {}
    assert len(node1.files.stored(ALICE)) == in_inbox + 2
    assert node1.metric("mailnode_move_copies_taken_total") == 1
    assert node0.metric("mailnode_move_exports_total", final="true") >= 1


def snapshot_of(local: Path) -> dict[str, bytes]:
    """Every file of an mbsync Maildir tree, with its content (its sync state included)."""
    return {str(path.relative_to(local)): path.read_bytes() for path in sorted(local.rglob("*")) if path.is_file()}


def test_each_step_asked_again_answers_the_same(cluster: Cluster) -> None:
    node0, node1, _ = cluster.nodes
    for number in range(5):
        assert send(node0, [ALICE], f"Subject: {number}\r\n\r\nagain\r\n".encode()) == {}

    async def run() -> list[moving.Step]:
        async def publish_home(address: str, home: int) -> None:
            for node in cluster.nodes:
                node.files.write_directory(directory_with({address: home}))

        move = moving.start(ALICE, source=0, target=1, now=NOW)
        steps: list[moving.Step] = []
        async with aiohttp.ClientSession() as session:
            while move.step is not moving.Step.DONE:
                first, again = [
                    await moving.advance(
                        move, nodes=domain_nodes(cluster), session=session, ordinals=range(3), publish_home=publish_home
                    )
                    for _ in range(2)
                ]
                assert again.step == first.step
                steps.append(move.step)
                move = again
        return steps

    assert len(asyncio.run(run())) == 6
    assert len(node1.files.stored(ALICE)) == 5
    assert node0.files.stored(ALICE) == []


def test_a_move_given_up_before_the_flip_leaves_the_mailbox_where_it_was(cluster: Cluster) -> None:
    node0, node1, _ = cluster.nodes
    assert send(node0, [ALICE]) == {}
    recorded = asyncio.run(drive(cluster, ALICE, source=0, target=1, stop_at=moving.Step.CATCHING_UP))

    async def roll_back() -> moving.Move:
        async def publish_home(address: str, home: int) -> None:
            raise AssertionError("a roll-back never writes the directory")

        move = moving.roll_back(recorded[-1], now=NOW)
        async with aiohttp.ClientSession() as session:
            return await moving.advance(
                move, nodes=domain_nodes(cluster), session=session, ordinals=range(3), publish_home=publish_home
            )

    assert asyncio.run(roll_back()).step is moving.Step.DONE
    assert not (node1.files.data_dir / "moves" / "incoming" / DOMAIN / "alice").exists()
    assert send(node1, [ALICE]) == {}  # thawed: mail is stored at the home again, at once
    assert len(node0.files.stored(ALICE)) == 2
    with pytest.raises(moving.MoveError):
        moving.roll_back(moving.Move(ALICE, 0, 1, moving.Step.FLIPPING, NOW, NOW), now=NOW)


def test_the_nodes_refuse_what_would_lose_mail(cluster: Cluster) -> None:
    async def run() -> None:
        base = domain_nodes(cluster)
        async with aiohttp.ClientSession() as session:
            with pytest.raises(nodes.NodeError) as refused:
                await nodes.drop_mailbox(session, base.url(0), ALICE, token=TOKEN)
            assert refused.value.status == 409  # homed there
            with pytest.raises(nodes.NodeError) as refused:
                await nodes.copy_mailbox(session, base.url(1), ALICE, token=TOKEN, source=0, final=True)
            assert refused.value.status == 409  # a final copy needs the freeze
            with pytest.raises(nodes.NodeError) as refused:
                await nodes.freeze(session, base.url(0), f"nobody@{DOMAIN}", token=TOKEN, hold_seconds=5)
            assert refused.value.status == 404
            with pytest.raises(nodes.NodeError) as refused:
                await nodes.set_home(session, base.url(0), ALICE, token="wrong", home=1)
            assert refused.value.status == 401
            assert await nodes.thaw(session, base.url(0), ALICE, token=TOKEN) is None  # not frozen
            assert await nodes.drop_mailbox(session, base.url(2), ALICE, token=TOKEN) is None  # holds none

    asyncio.run(run())
