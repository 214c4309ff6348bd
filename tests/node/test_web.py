"""The node's HTTPS listener with real clients over real TLS (the test CA trusted):
- autoconfiguration: Thunderbird's file by address and by Host, Autodiscover POX, the Apple profile;
- the MTA-STS policy, only for Host mta-sts.<domain>;
- CalDAV: the `caldav` library finds the calendar from the address alone (well-known redirect,
  principal, home set), stores an event and reads it back; the storage is in the mailbox's directory;
- CardDAV and CalDAV both ways with vdirsyncer (a contact made on the client reaches the server, one
  made on the server reaches the client);
- passwords and app passwords as for IMAP; a wrong one is 401 and counted;
- clustered: a mailbox's calendars through any node, kept on its home (relayed with the internal token,
  which a client cannot forge);
- the listener's gate (per client) and its bounds (request size).
"""

from __future__ import annotations

import base64
import plistlib
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest
from caldav.davclient import DAVClient

from mailnode.web import autoconfig
from mailwire import mtasts
from tests.conftest import cheap_hash
from tests.node.conftest import DOMAIN, PASSWORD, NodeFactory, RunningNode, free_ports, mailbox

USER = f"user@{DOMAIN}"
APP_PASSWORD = "app password for the phone"


def fetch(
    node: RunningNode,
    path: str,
    context: ssl.SSLContext,
    *,
    host: str | None = None,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    method: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    url = f"https://127.0.0.1:{node.port('https')}{path}"
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    if host is not None:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.fixture
def web_node(node_factory: NodeFactory) -> RunningNode:
    app = {"name": "phone", "password_hash": cheap_hash(APP_PASSWORD)}
    return node_factory([mailbox(USER, app_passwords=[app]), mailbox(f"other@{DOMAIN}")])


# -- autoconfiguration -----------------------------------------------------------------------------------


def test_thunderbird_autoconfig_by_address_and_by_host(web_node: RunningNode, client_tls: ssl.SSLContext) -> None:
    for path, host in (
        (f"/mail/config-v1.1.xml?emailaddress={USER}", None),
        ("/.well-known/autoconfig/mail/config-v1.1.xml", f"autoconfig.{DOMAIN}"),
        ("/mail/config-v1.1.xml?emailaddress=someone@example.net", None),  # an alias domain
    ):
        status, headers, body = fetch(web_node, path, client_tls, host=host)
        assert status == 200, body
        assert headers["Content-Type"].startswith("application/xml")
        root = ET.fromstring(body)
        incoming = root.find("emailProvider/incomingServer")
        assert incoming is not None
        assert [incoming.findtext(tag) for tag in ("hostname", "port", "socketType")] == [
            f"mail.{DOMAIN}",
            "993",
            "SSL",
        ]
        outgoing = [
            (s.findtext("port"), s.findtext("socketType")) for s in root.iterfind("emailProvider/outgoingServer")
        ]
        assert outgoing == [("465", "SSL"), ("587", "STARTTLS")]
        assert root.findtext("calendar/serverURL") == f"https://mail.{DOMAIN}/dav/"
    status, _, _ = fetch(web_node, "/mail/config-v1.1.xml?emailaddress=a@elsewhere.test", client_tls)
    assert status == 404


def test_autodiscover_pox(web_node: RunningNode, client_tls: ssl.SSLContext) -> None:
    request = (
        f'<?xml version="1.0" encoding="utf-8"?><Autodiscover xmlns="{autoconfig.AUTODISCOVER_REQUEST}">'
        f"<Request><EMailAddress>{USER}</EMailAddress><AcceptableResponseSchema>{autoconfig.OUTLOOK_RESPONSE}"
        "</AcceptableResponseSchema></Request></Autodiscover>"
    ).encode()
    status, _, body = fetch(
        web_node, "/Autodiscover/Autodiscover.xml", client_tls, data=request, headers={"Content-Type": "text/xml"}
    )
    assert status == 200, body
    ns = {"a": autoconfig.AUTODISCOVER_RESPONSE, "o": autoconfig.OUTLOOK_RESPONSE}
    protocols = ET.fromstring(body).findall("o:Response/o:Account/o:Protocol", ns)
    assert [(p.findtext("o:Type", namespaces=ns), p.findtext("o:Port", namespaces=ns)) for p in protocols] == [
        ("IMAP", "993"),
        ("SMTP", "465"),
    ]
    assert protocols[0].findtext("o:LoginName", namespaces=ns) == USER
    status, _, _ = fetch(web_node, "/autodiscover/autodiscover.xml", client_tls, data=b"<not-autodiscover/>")
    assert status == 400
    status, _, _ = fetch(web_node, "/autodiscover/autodiscover.xml", client_tls, data=b"x" * 20000)
    assert status == 413


def test_apple_profile(web_node: RunningNode, client_tls: ssl.SSLContext) -> None:
    status, headers, body = fetch(web_node, f"/apple/mailfleet.mobileconfig?emailaddress={USER}", client_tls)
    assert status == 200
    assert headers["Content-Type"] == autoconfig.MOBILECONFIG_TYPE
    profile = plistlib.loads(body)
    kinds = {p["PayloadType"]: p for p in profile["PayloadContent"]}
    assert set(kinds) == {"com.apple.mail.managed", "com.apple.caldav.account", "com.apple.carddav.account"}
    assert kinds["com.apple.mail.managed"]["IncomingMailServerUsername"] == USER
    assert kinds["com.apple.caldav.account"]["CalDAVPrincipalURL"] == f"https://mail.{DOMAIN}/dav/{USER}/"
    secrets = {"IncomingPassword", "OutgoingPassword", "CalDAVPassword", "CardDAVPassword"}
    assert not any(secrets & set(payload) for payload in kinds.values())  # the device asks for it


# -- MTA-STS ----------------------------------------------------------------------------------------------


def test_mta_sts_policy_only_for_its_host(web_node: RunningNode, client_tls: ssl.SSLContext) -> None:
    status, headers, body = fetch(web_node, "/.well-known/mta-sts.txt", client_tls, host=f"mta-sts.{DOMAIN}")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert body.decode() == mtasts.policy(mode="testing", mx=[f"mail.{DOMAIN}"], max_age=604800)
    assert body.decode().splitlines()[:2] == ["version: STSv1", "mode: testing"]
    status, _, _ = fetch(web_node, "/.well-known/mta-sts.txt", client_tls, host="mta-sts.elsewhere.test")
    assert status == 404
    status, _, _ = fetch(web_node, "/.well-known/mta-sts.txt", client_tls)  # Host 127.0.0.1
    assert status == 404


def test_mta_sts_mode_from_the_config(node_factory: NodeFactory, client_tls: ssl.SSLContext) -> None:
    node = node_factory(domains=[{"domain": DOMAIN, "mta_sts": "enforce"}], web={"mta_sts_max_age": 86400})
    status, _, body = fetch(node, "/.well-known/mta-sts.txt", client_tls, host=f"mta-sts.{DOMAIN}:443")
    assert status == 200
    assert b"mode: enforce\r\n" in body and b"max_age: 86400\r\n" in body


# -- CalDAV and CardDAV -----------------------------------------------------------------------------------


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_dav_needs_the_mailbox_password_or_an_app_password(web_node: RunningNode, client_tls: ssl.SSLContext) -> None:
    status, headers, _ = fetch(web_node, "/dav/", client_tls)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic ")
    status, _, _ = fetch(web_node, "/dav/", client_tls, headers=basic(USER, "wrong"))
    assert status == 401
    assert web_node.metric("mailnode_auth_failures_total", protocol="dav") == 1
    for password in (PASSWORD, APP_PASSWORD):
        status, _, body = fetch(
            web_node, f"/dav/{USER}/", client_tls, headers={**basic(USER, password), "Depth": "0"}, method="PROPFIND"
        )
        assert status == 207 and f"/dav/{USER.replace('@', '%40')}/".encode() in body  # the principal
    # a client's own X-Remote-User is dropped: the password decides who it is
    status, _, _ = fetch(
        web_node,
        f"/dav/other@{DOMAIN}/calendar/",
        client_tls,
        headers={**basic(USER, PASSWORD), "X-Remote-User": f"other@{DOMAIN}"},
    )
    assert status in (403, 404)


def test_well_known_redirects(web_node: RunningNode, client_tls: ssl.SSLContext) -> None:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=client_tls), NoRedirect)
    for name in ("caldav", "carddav"):
        try:
            opener.open(f"https://127.0.0.1:{web_node.port('https')}/.well-known/{name}", timeout=30)
        except urllib.error.HTTPError as error:
            assert (error.code, error.headers["Location"]) == (301, "/dav/")
        else:
            raise AssertionError("no redirect")


EVENT = """BEGIN:VCALENDAR
VERSION:2.0
PRODID:-//mailfleet tests//EN
BEGIN:VEVENT
UID:standup-1@example.com
DTSTAMP:20260101T090000Z
DTSTART:20260105T090000Z
DTEND:20260105T091500Z
SUMMARY:Stand-up
END:VEVENT
END:VCALENDAR
"""


def test_caldav_library_finds_the_calendar_stores_and_reads_an_event(web_node: RunningNode, ca_file: Path) -> None:
    # Only the server's address and the account: discovery does the rest (RFC 6764, RFC 4791 §6.2.1)
    url = f"https://127.0.0.1:{web_node.port('https')}/.well-known/caldav"
    with DAVClient(url=url, username=USER, password=APP_PASSWORD, ssl_verify_cert=str(ca_file)) as client:
        principal = client.principal()  # type: ignore[no-untyped-call]  # caldav leaves it unannotated
        calendars = principal.calendars()
        assert [c.get_display_name() for c in calendars] == ["Calendar"]
        calendars[0].save_event(EVENT)
        made = principal.make_calendar(name="Work")
        made.save_event(EVENT.replace("standup-1", "review-2").replace("Stand-up", "Review"))
    with DAVClient(url=url, username=USER, password=PASSWORD, ssl_verify_cert=str(ca_file)) as client:
        by_name = {c.get_display_name(): c for c in client.principal().calendars()}  # type: ignore[no-untyped-call]
        assert set(by_name) == {"Calendar", "Work"}
        [event] = by_name["Calendar"].events()
        assert event.icalendar_component["summary"] == "Stand-up"
        [event] = by_name["Work"].events()
        assert event.icalendar_component["uid"] == "review-2@example.com"
    # stored in the mailbox's own directory tree, next to its mail
    dav_dir = web_node.files.data_dir / "mail" / DOMAIN / "user" / ".dav"
    stored = [p for p in dav_dir.rglob("*.ics") if ".Radicale" not in str(p)]
    assert sorted(p.read_text().count("SUMMARY:") for p in stored) == [1, 1]


VCARD = "BEGIN:VCARD\r\nVERSION:3.0\r\nUID:{uid}\r\nFN:{name}\r\nN:{name};;;;\r\nEMAIL:{uid}\r\nEND:VCARD\r\n"


def test_vdirsyncer_syncs_contacts_and_calendars_both_ways(
    web_node: RunningNode, ca_file: Path, tmp_path: Path
) -> None:
    vdirsyncer = [sys.executable, "-m", "vdirsyncer"]
    url = f"https://127.0.0.1:{web_node.port('https')}/"
    local = tmp_path / "local"
    pairs = []
    for kind, fileext in (("carddav", ".vcf"), ("caldav", ".ics")):
        pairs.append(
            f'[pair {kind}]\na = "{kind}_local"\nb = "{kind}_remote"\ncollections = ["from b"]\n\n'
            f'[storage {kind}_local]\ntype = "filesystem"\npath = "{local / kind}"\nfileext = "{fileext}"\n\n'
            f'[storage {kind}_remote]\ntype = "{kind}"\nurl = "{url}"\nusername = "{USER}"\n'
            f'password = "{APP_PASSWORD}"\nverify = "{ca_file}"\n'
        )
    config = tmp_path / "vdirsyncer.conf"
    config.write_text(f'[general]\nstatus_path = "{tmp_path / "status"}"\n\n' + "\n".join(pairs))

    def run(*args: str) -> None:
        done = subprocess.run(
            [*vdirsyncer, "-c", str(config), *args], input="y\n" * 4, capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 0, done.stdout + done.stderr

    run("discover")
    run("sync")
    contacts, calendar = local / "carddav" / "contacts", local / "caldav" / "calendar"
    assert contacts.is_dir() and calendar.is_dir()
    # client -> server: a contact and an event written on the client's side
    (contacts / "alice.vcf").write_text(VCARD.format(uid="alice@example.org", name="Alice"))
    (calendar / "standup.ics").write_text(EVENT)
    run("sync")
    [contact] = server_items(web_node, "contacts", ca_file)
    assert "UID:alice@example.org" in contact
    [event] = server_items(web_node, "calendar", ca_file)
    assert "UID:standup-1@example.com" in event
    # server -> client: a contact stored on the server (as a phone would) arrives on the next sync
    status, _, _ = fetch(
        web_node, f"/dav/{USER}/contacts/bob.vcf", client_context(ca_file),
        data=VCARD.format(uid="bob@example.org", name="Bob").encode(),
        headers={**basic(USER, PASSWORD), "Content-Type": "text/vcard"}, method="PUT",
    )  # fmt: skip
    assert status == 201
    run("sync")
    names = sorted(re.findall(r"^FN:(.*?)\r?$", p.read_text(), re.MULTILINE)[0] for p in contacts.glob("*.vcf"))
    assert names == ["Alice", "Bob"]


def client_context(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


def server_items(node: RunningNode, collection: str, ca_file: Path) -> list[str]:
    """The items of one of USER's collections as the server has them: PROPFIND, then GET each."""
    context = client_context(ca_file)
    path = f"/dav/{USER}/{collection}/"
    status, _, body = fetch(node, path, context, headers={**basic(USER, PASSWORD), "Depth": "1"}, method="PROPFIND")
    assert status == 207
    hrefs = [h.text or "" for h in ET.fromstring(body).iterfind("{DAV:}response/{DAV:}href")]
    items = []
    for href in hrefs:
        if urllib.parse.unquote(href) != path:
            status, _, item = fetch(node, href, context, headers=basic(USER, PASSWORD))
            assert status == 200, href
            items.append(item.decode())
    return items


# -- the listener's bounds --------------------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.05)


def test_listener_gate_and_request_size(node_factory: NodeFactory, client_tls: ssl.SSLContext) -> None:
    node = node_factory(listen={"limits": {"https": {"total": 10, "per_client": 2}}}, web={"max_request": 4096})
    status, _, _ = fetch(
        node,
        f"/dav/{USER}/contacts/big.vcf",
        client_tls,
        data=b"x" * 8192,
        headers=basic(USER, PASSWORD),
        method="PUT",
    )
    assert status == 413

    def open_now() -> float:
        return node.metric("mailnode_connections_open", listener="https")

    def connect() -> ssl.SSLSocket:
        sock = socket.create_connection(("127.0.0.1", node.port("https")), timeout=30)
        return client_tls.wrap_socket(sock, server_hostname="localhost")

    wait_for(lambda: open_now() == 0, "the first request's connection to close")
    held = [connect(), connect()]
    try:
        wait_for(lambda: open_now() == 2, "two connections admitted")
        with connect() as third:
            assert third.recv(1024).startswith(b"HTTP/1.1 503")
        assert node.metric("mailnode_connections_refused_total", listener="https", reason="per_client") == 1
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: open_now() == 0, "the held connections to close")


# -- clustered --------------------------------------------------------------------------------------------


def test_dav_through_any_node_is_kept_on_the_home(node_factory: NodeFactory, ca_file: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "internal-token"
    token_file.write_text("internal-token-of-example-com\n")
    ports = free_ports(8)  # known to the peers up front
    lmtp, http, imap_proxy, https = ports[0:2], ports[2:4], ports[4:6], ports[6:8]
    peers = [
        {"host": "127.0.0.1", "lmtp": lmtp[i], "imap_proxy": imap_proxy[i], "http": http[i], "https": https[i]}
        for i in range(2)
    ]
    nodes = [
        node_factory(
            [mailbox(USER, home=1)], name=f"node{i}", cluster={"ordinal": i, "peers": peers},
            listen={"lmtp": lmtp[i], "imap_proxy": imap_proxy[i], "http": http[i], "https": https[i]},
            internal={"token_file": str(token_file)},
        )
        for i in range(2)
    ]  # fmt: skip
    url = f"https://127.0.0.1:{nodes[0].port('https')}/.well-known/caldav"  # node 0: not the home
    with DAVClient(url=url, username=USER, password=PASSWORD, ssl_verify_cert=str(ca_file)) as client:
        [calendar] = client.principal().calendars()  # type: ignore[no-untyped-call]
        calendar.save_event(EVENT)
    [event] = server_items(nodes[1], "calendar", ca_file)  # read from the home itself
    assert "UID:standup-1@example.com" in event
    homes = [node.files.data_dir / "mail" / DOMAIN / "user" / ".dav" for node in nodes]
    assert not homes[0].exists() and homes[1].is_dir()
    # the hop's credential is the internal token: a client that sends its own header gets nothing by it
    forged = {"Authorization": "Bearer not-the-token", "X-Mailfleet-User": USER, "Depth": "0"}
    status, _, _ = fetch(nodes[1], f"/dav/{USER}/", client_context(ca_file), headers=forged, method="PROPFIND")
    assert status == 401


def test_a_client_that_stops_sending_is_closed(node_factory: NodeFactory, client_tls: ssl.SSLContext) -> None:
    node = node_factory(web={"idle_timeout": 0.5})
    sock = client_tls.wrap_socket(
        socket.create_connection(("127.0.0.1", node.port("https")), timeout=60), server_hostname="localhost"
    )
    with sock:
        # a request whose body never comes (slowloris on the body, where aiohttp's keep-alive timer is off)
        sock.sendall(
            b"POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: localhost\r\nContent-Length: 500\r\n\r\n<A"
        )
        while sock.recv(1024):  # until the node hangs up (the socket's timeout is the deadline)
            pass
    wait_for(lambda: node.metric("mailnode_connections_open", listener="https") == 0, "the slot to be given back")
