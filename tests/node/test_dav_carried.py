"""Calendars and contacts (a mailbox's `.dav/`, mailnode.store.davfiles) go where its mail goes: into
archives and back out of them, and along with a moved mailbox. Every check is made by a real client
library (caldav from PyPI) against real nodes: what it saved is what it reads back.

Aspects: an archive (GET /backup) holds them; POST /restore brings back what was deleted since into the
same mailbox (and keeps what is there), and brings all of it into another mailbox (under that
mailbox's own principal); a whole-node restore into an empty data directory serves them on a new
node; a moved mailbox's calendars and contacts are read from its new home through every node, nothing
is left of them on the old home once the move is cleaned up, and while the mailbox is frozen a write
is refused with 503 and Retry-After (through a node that relays too), never taken and lost.
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from caldav.davclient import DAVClient

from mailfleet import moving
from mailnode.backup import archive, noderestore
from tests.node.conftest import DOMAIN, PASSWORD, NodeFactory, RunningNode, mailbox
from tests.node.test_backup import stream_backup
from tests.node.test_checkpoint import call
from tests.node.test_cluster_mail import Cluster
from tests.node.test_move import ALICE, NOW, directory_with, domain_nodes, three_nodes
from tests.node.test_web import EVENT, VCARD, basic, fetch

USER, COPY = f"user@{DOMAIN}", f"copy@{DOMAIN}"
MAILBOXES = [mailbox(USER), mailbox(COPY)]
REVIEW = EVENT.replace("standup-1", "review-2").replace("Stand-up", "Review")


def client(node: RunningNode, ca_file: Path, user: str) -> DAVClient:
    """A caldav client that knows only the node's address and the account (discovery does the rest)."""
    url = f"https://127.0.0.1:{node.port('https')}/.well-known/caldav"
    return DAVClient(url=url, username=user, password=PASSWORD, ssl_verify_cert=str(ca_file))


def save(node: RunningNode, ca_file: Path, user: str) -> None:
    """An event in the Calendar every mailbox has, a calendar of the user's own with another event, and a
    contact in the address book."""
    with client(node, ca_file, user) as dav:
        principal = dav.principal()  # type: ignore[no-untyped-call]  # caldav leaves it unannotated
        [calendar] = principal.calendars()
        calendar.save_event(EVENT)
        principal.make_calendar(name="Work").save_event(REVIEW)
        card = VCARD.format(uid="ann@example.org", name="Ann Example")
        answer = dav.put(contact_url(node, user, "ann"), card, {"Content-Type": "text/vcard; charset=utf-8"})
        assert answer.status == 201, answer.raw


def contact_url(node: RunningNode, user: str, name: str) -> str:
    return f"https://127.0.0.1:{node.port('https')}/dav/{urllib.parse.quote(user)}/contacts/{name}.vcf"


def read(node: RunningNode, ca_file: Path, user: str) -> dict[str, list[str]]:
    """What the client finds: each calendar's event summaries by display name, and the contacts' names."""
    with client(node, ca_file, user) as dav:
        found: dict[str, list[str]] = {
            str(c.get_display_name()): sorted(str(e.icalendar_component["summary"]) for e in c.events())
            for c in dav.principal().calendars()  # type: ignore[no-untyped-call]
        }
        book = f"https://127.0.0.1:{node.port('https')}/dav/{urllib.parse.quote(user)}/contacts/"
        listing = dav.propfind(book, depth=1)
        assert listing.status == 207, listing.raw
        names = []
        for href in listing.tree.iterfind(".//{DAV:}href"):  # type: ignore[union-attr]
            if href.text and href.text.endswith(".vcf"):
                got = dav.request(urllib.parse.urljoin(book, href.text))
                assert got.status == 200, got.raw
                names += [line[3:] for line in str(got.raw).splitlines() if line.startswith("FN:")]
        found["contacts"] = sorted(names)
    return found


SAVED = {"Calendar": ["Stand-up"], "Work": ["Review"], "contacts": ["Ann Example"]}


def dav_dir(node: RunningNode, local: str) -> Path:
    return node.files.data_dir / "mail" / DOMAIN / local / ".dav"


# -- archives ---------------------------------------------------------------------------------------------


@pytest.fixture
def node(node_factory: NodeFactory) -> RunningNode:
    return node_factory(MAILBOXES, smtp={"check_inbound": False})


def test_an_archive_holds_calendars_and_contacts_and_restore_brings_them_back(
    node: RunningNode, ca_file: Path, tmp_path: Path
) -> None:
    save(node, ca_file, USER)
    assert read(node, ca_file, USER) == SAVED
    path = tmp_path / "node.tar"
    stream_backup(node, path)
    summary = archive.verify(path)
    assert summary.dav[USER][0] >= 5  # three items, and the properties of the collections they are in

    # Deleted since the archive: the contact, and the Work calendar; the Stand-up event changed.
    with client(node, ca_file, USER) as dav:
        assert dav.delete(contact_url(node, USER, "ann")).status in (200, 204)
        by_name = {c.get_display_name(): c for c in dav.principal().calendars()}  # type: ignore[no-untyped-call]
        by_name["Work"].delete()
        [event] = by_name["Calendar"].events()
        event.icalendar_component["summary"] = "Stand-up, moved"
        event.save()
    assert read(node, ca_file, USER) == {"Calendar": ["Stand-up, moved"], "contacts": []}

    files = summary.dav[USER][0]
    status, body = call(node, "POST", "/restore", {"archive": str(path), "mailbox": USER})
    assert status == 200, body
    assert body["dav_restored"] >= 3 and body["dav_restored"] + body["dav_kept"] == files  # the Work calendar, Ann
    # What was gone is back; what is there now (newer than the archive) is kept as it is.
    assert read(node, ca_file, USER) == {**SAVED, "Calendar": ["Stand-up, moved"]}
    status, body = call(node, "POST", "/restore", {"archive": str(path), "mailbox": USER})
    assert status == 200, body
    assert (body["dav_restored"], body["dav_kept"]) == (0, files)
    assert read(node, ca_file, USER) == {**SAVED, "Calendar": ["Stand-up, moved"]}  # run again: nothing twice

    # Into another mailbox: under its own principal, readable with its own password.
    status, body = call(node, "POST", "/restore", {"archive": str(path), "mailbox": USER, "as": COPY})
    assert status == 200, body
    assert (body["dav_restored"], body["dav_kept"]) == (files, 0)
    assert read(node, ca_file, COPY) == SAVED
    assert not (dav_dir(node, "copy") / "collection-root" / USER).exists()


def test_a_whole_node_restored_serves_calendars_and_contacts(
    node: RunningNode, node_factory: NodeFactory, ca_file: Path, tmp_path: Path
) -> None:
    save(node, ca_file, USER)
    path = tmp_path / "node.tar"
    stream_backup(node, path)
    node.stop()
    restored_dir = tmp_path / "fresh" / "data"
    summary = noderestore.restore_node(path, restored_dir)
    assert USER in summary.dav
    fresh = node_factory(MAILBOXES, name="fresh", smtp={"check_inbound": False})
    assert fresh.files.data_dir == restored_dir
    assert read(fresh, ca_file, USER) == SAVED
    # and the fresh node takes new ones as any node does
    with client(fresh, ca_file, USER) as dav:
        card = VCARD.format(uid="bo@example.org", name="Bo Example")
        assert dav.put(contact_url(fresh, USER, "bo"), card, {"Content-Type": "text/vcard"}).status == 201
    assert read(fresh, ca_file, USER)["contacts"] == ["Ann Example", "Bo Example"]


# -- moves --------------------------------------------------------------------------------------------------


@pytest.fixture
def cluster(node_factory: NodeFactory, tmp_path: Path) -> Iterator[Cluster]:
    yield from three_nodes(node_factory, tmp_path)


async def advance_until(cluster: Cluster, move: moving.Move, stop_at: moving.Step) -> moving.Move:
    """The operator's driver, step by step until the move reaches `stop_at` (the step it does next)."""

    async def publish_home(published: str, home: int) -> None:
        for node in cluster.nodes:
            node.files.write_directory(directory_with({published: home}))

    async with aiohttp.ClientSession() as session:
        while move.step is not stop_at:
            move = await moving.advance(
                move, nodes=domain_nodes(cluster), session=session, ordinals=range(3), publish_home=publish_home
            )
    return move


def put_contact(node: RunningNode, ca_file: Path, name: str) -> tuple[int, dict[str, str]]:
    """A contact PUT as a client sends it (urllib: the answer's status and headers whatever they are)."""
    card = VCARD.format(uid=f"{name}@example.org", name=name).encode()
    headers = {"Content-Type": "text/vcard", **basic(ALICE, PASSWORD)}
    status, answer, _ = fetch(
        node, f"/dav/{ALICE}/contacts/{name}.vcf", ssl.create_default_context(cafile=str(ca_file)),
        data=card, headers=headers, method="PUT",
    )  # fmt: skip
    return status, answer


def test_calendars_and_contacts_move_with_the_mailbox(cluster: Cluster, ca_file: Path) -> None:
    node0, node1, node2 = cluster.nodes
    save(node2, ca_file, ALICE)  # through a node that relays to the home, node 0
    assert read(node0, ca_file, ALICE) == SAVED
    assert dav_dir(node0, "alice").is_dir() and not dav_dir(node2, "alice").exists()

    move = asyncio.run(advance_until(cluster, moving.start(ALICE, source=0, target=1, now=NOW), moving.Step.FLIPPING))
    # Frozen (caught up, not yet flipped): reads are served, a write is refused and says when to come back,
    # on the home and through a node that relays to it.
    assert read(node2, ca_file, ALICE) == SAVED
    for node in (node0, node2):
        status, headers = put_contact(node, ca_file, "Frozen")
        assert status == 503, headers
        assert int(headers["Retry-After"]) > 0
    asyncio.run(advance_until(cluster, move, moving.Step.DONE))

    for node in (node1, node0, node2):  # the new home itself, and relayed from the two others
        assert read(node, ca_file, ALICE) == SAVED
    assert not (node0.files.data_dir / "mail" / DOMAIN / "alice").exists()  # nothing left on the old home
    assert not any((node0.files.data_dir / "moves" / "removed").glob("*/.dav"))
    assert dav_dir(node1, "alice").is_dir()
    # After the move a write lands on the new home, whichever node takes it.
    status, _ = put_contact(node0, ca_file, "After")
    assert status == 201
    assert read(node1, ca_file, ALICE)["contacts"] == ["After", "Ann Example"]
    assert not dav_dir(node0, "alice").exists()


def test_a_move_rolled_back_leaves_calendars_where_they_were_and_takes_writes_again(
    cluster: Cluster, ca_file: Path
) -> None:
    node0, node1, _ = cluster.nodes
    save(node0, ca_file, ALICE)
    start = moving.start(ALICE, source=0, target=1, now=NOW)
    move = asyncio.run(advance_until(cluster, start, moving.Step.CATCHING_UP))  # frozen, not yet caught up
    assert (node1.files.data_dir / "moves" / "incoming" / DOMAIN / "alice" / ".dav").is_dir()  # the copy has them
    assert put_contact(node1, ca_file, "Frozen")[0] == 503
    asyncio.run(advance_until(cluster, moving.roll_back(move, now=NOW), moving.Step.DONE))
    assert not (node1.files.data_dir / "moves" / "incoming" / DOMAIN / "alice").exists()
    assert put_contact(node1, ca_file, "Thawed")[0] == 201  # thawed: writes are taken again, at the home
    assert read(node0, ca_file, ALICE) == {**SAVED, "contacts": ["Ann Example", "Thawed"]}
