"""IMAP in a cluster (DESIGN.md "Clustering"): three real nodes on 127.0.0.1 (tests.node.test_cluster_mail's
Cluster), imaplib over STARTTLS to a node that is not the mailbox's home.

Aspects: the login is proxied to the home, which answers with its capabilities; SELECT and FETCH show
the home's mail byte for byte, APPEND with a literal stores at the home only; IDLE through the proxy
wakes on mail sent to a third node (SMTP, LMTP hand-off, home); the gauge of proxied sessions and the
login counter on /metrics; the home down: a new login gets NO [UNAVAILABLE], a live session BYE
[UNAVAILABLE] (whether the home stops or crashes without a word), and a login lands again once it is
back; the internal port refuses LOGIN, a user's own password, a missing or wrong token and a mailbox
homed elsewhere, and counts each; a node alone has no internal port; mbsync syncs through the proxy.
"""

from __future__ import annotations

import base64
import imaplib
import re
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.node.conftest import DOMAIN, PASSWORD, NodeFactory, RunningNode
from tests.node.test_cluster_mail import TOKEN, Cluster, send
from tests.node.test_imap_clients import maildir_messages, normalized
from tests.node.test_outbound import wait_for

BOB = f"bob@{DOMAIN}"  # home: node 1
ALICE = f"alice@{DOMAIN}"  # home: node 0
NOTE = b"From: alice@remote.test\r\nTo: bob@example.com\r\nSubject: proxied\r\n\r\nRead on another node.\r\n"


@pytest.fixture
def cluster(node_factory: NodeFactory, tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(node_factory, tmp_path, 3)
    yield made
    for node in made.restarted:
        node.stop()


def login(node: RunningNode, client_tls: ssl.SSLContext, user: str = BOB) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", node.port("imap"), timeout=30)
    client.starttls(ssl_context=client_tls)
    client.login(user, PASSWORD)
    return client


def internal(node: RunningNode) -> imaplib.IMAP4:
    """A plaintext connection to the node's internal IMAP port, as a peer opens it."""
    return imaplib.IMAP4("127.0.0.1", node.port("imap_proxy"), timeout=30)


def plain(authzid: str, authcid: str, password: str) -> bytes:
    return f"{authzid}\0{authcid}\0{password}".encode()  # RFC 4616 §2


def test_a_login_on_another_node_is_proxied_to_the_home(cluster: Cluster, client_tls: ssl.SSLContext) -> None:
    node0, node1, node2 = cluster.nodes
    assert send(node0, [BOB], NOTE) == {}
    [stored] = node1.files.stored(BOB)
    at_home = imaplib.IMAP4("127.0.0.1", node1.port("imap"), timeout=30)
    at_home.starttls(ssl_context=client_tls)
    _typ, logged_in_at_home = at_home.login(BOB, PASSWORD)
    at_home.logout()
    client = imaplib.IMAP4("127.0.0.1", node2.port("imap"), timeout=30)
    client.starttls(ssl_context=client_tls)
    answer, logged_in = client.login(BOB, PASSWORD)
    # The login's OK carries the home's capabilities, exactly as a login there.
    assert answer == "OK" and logged_in == logged_in_at_home
    assert logged_in[0].startswith(b"[CAPABILITY IMAP4rev1 ") and b" IDLE " in logged_in[0]
    assert client.select("INBOX") == ("OK", [b"1"])
    _fetch, fetched = client.fetch("1", "(BODY.PEEK[])")
    assert isinstance(fetched[0], tuple) and fetched[0][1] == stored  # byte for byte, from the home
    assert node2.metric("mailnode_imap_proxied_sessions") == 1
    assert node2.metric("mailnode_imap_proxy_logins_total", result="proxied") == 1

    appended = client.append("Drafts", r"(\Draft)", None, b"Subject: draft\r\n\r\nA literal, relayed.\r\n")
    assert appended[0] == "OK" and b"APPENDUID" in appended[1][0]
    assert node1.files.stored(BOB, "Drafts") == [b"Subject: draft\r\n\r\nA literal, relayed.\r\n"]
    assert node2.files.stored(BOB, "Drafts") == [] and node2.files.stored(BOB) == []
    client.logout()
    wait_for("the gauge to follow", lambda: node2.metric("mailnode_imap_proxied_sessions") == 0)
    status, body = node2.http_get("/metrics")
    assert status == 200 and b"mailnode_imap_proxied_sessions 0.0" in body


def test_a_mailbox_homed_on_the_node_itself_is_served_there(cluster: Cluster, client_tls: ssl.SSLContext) -> None:
    node1 = cluster.nodes[1]
    client = login(node1, client_tls)
    assert client.select("INBOX") == ("OK", [b"0"])
    client.logout()
    assert node1.metric("mailnode_imap_proxy_logins_total", result="proxied") == 0


def test_idle_through_the_proxy_wakes_on_mail_sent_to_a_third_node(
    cluster: Cluster, client_tls: ssl.SSLContext
) -> None:
    node0, _, node2 = cluster.nodes
    client = login(node2, client_tls)
    client.select("INBOX")
    client.send(b"i1 IDLE\r\n")
    assert client.readline().startswith(b"+ ")
    threading.Timer(0.2, send, args=(node0, [BOB], NOTE)).start()  # SMTP on 0, LMTP to 1, IDLE on 2
    client.socket().settimeout(10)
    assert client.readline() == b"* 1 EXISTS\r\n"
    client.send(b"DONE\r\n")
    while not (line := client.readline()).startswith(b"i1 "):
        pass
    assert line.startswith(b"i1 OK")
    client.logout()


def test_with_the_home_down_a_login_is_unavailable_and_a_live_session_ends(
    cluster: Cluster, client_tls: ssl.SSLContext
) -> None:
    _, node1, node2 = cluster.nodes
    live = login(node2, client_tls)
    live.select("INBOX")
    node1.stop()
    live.socket().settimeout(10)
    assert live.readline().startswith(b"* BYE [UNAVAILABLE] ")
    assert live.readline() == b""  # and the connection is closed
    wait_for("the gauge to follow", lambda: node2.metric("mailnode_imap_proxied_sessions") == 0)

    client = imaplib.IMAP4("127.0.0.1", node2.port("imap"), timeout=30)
    client.starttls(ssl_context=client_tls)
    with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]"):
        client.login(BOB, PASSWORD)
    assert client.state == "NONAUTH"  # the session goes on, not logged in
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        client.login(BOB, "not the password")  # the password is still checked here first
    client.logout()
    assert node2.metric("mailnode_imap_proxy_logins_total", result="unavailable") == 1

    cluster.restart(1)  # the client's reconnect lands when the home is back
    again = login(node2, client_tls)
    assert again.select("INBOX")[0] == "OK"
    again.logout()


def test_a_home_that_goes_away_without_a_word_gets_the_client_a_bye(
    cluster: Cluster, client_tls: ssl.SSLContext
) -> None:
    """A crash: the home closes the connection mid-session without a BYE of its own."""
    node1, node2 = cluster.nodes[1], cluster.nodes[2]
    node1.stop()
    server = socket.create_server(("127.0.0.1", cluster.imap_proxy[1]))
    received: list[bytes] = []

    def crashing_home() -> None:
        connection, _ = server.accept()
        with connection, server, connection.makefile("rb") as lines:
            connection.sendall(b"* OK fake home\r\n")
            received.append(lines.readline())
            connection.sendall(b"P1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
            received.append(lines.readline())  # the client's first command, then the crash

    thread = threading.Thread(target=crashing_home, daemon=True)
    thread.start()
    client = login(node2, client_tls)
    client.send(b"s1 SELECT INBOX\r\n")
    client.socket().settimeout(10)
    assert client.readline().startswith(b"* BYE [UNAVAILABLE] ")
    thread.join(10)
    authenticate = re.fullmatch(rb"P1 AUTHENTICATE PLAIN (\S+)\r\n", received[0])
    assert authenticate is not None
    assert base64.b64decode(authenticate.group(1)) == plain(BOB, "mailfleet-internal", TOKEN)
    assert received[1] == b"s1 SELECT INBOX\r\n"  # relayed as the client sent it


def test_the_internal_port_admits_only_the_master_login_and_counts_refusals(cluster: Cluster) -> None:
    node1 = cluster.nodes[1]
    refusals = [
        plain("", BOB, PASSWORD),  # a user's own password
        plain(BOB, "mailfleet-internal", ""),  # no token
        plain(BOB, "mailfleet-internal", "not-the-token"),
        plain(ALICE, "mailfleet-internal", TOKEN),  # homed on node 0, not here
    ]
    with internal(node1) as client:
        assert "STARTTLS" not in client.capabilities  # never TLS: the peer's client TLS ended at the peer
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            client.login(BOB, PASSWORD)
        for response in refusals:
            with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
                client.authenticate("PLAIN", lambda _challenge, r=response: r)  # type: ignore[misc]
        client.send(b"x1 SELECT INBOX\r\n")  # imaplib would not send it before a login
        assert client.readline().startswith(b"x1 BAD SELECT needs authentication")
    for reason, count in (("login", 1), ("not_internal", 1), ("wrong_token", 2), ("not_home", 1)):
        assert node1.metric("mailnode_imap_proxy_refused_total", reason=reason) == count, reason

    with internal(node1) as client:
        client.authenticate("PLAIN", lambda _challenge: plain(BOB, "mailfleet-internal", TOKEN))
        assert client.select("INBOX") == ("OK", [b"0"])


def test_a_node_alone_has_no_internal_port(node: RunningNode) -> None:
    assert "imap_proxy" not in node.ports and "lmtp" not in node.ports


def test_mbsync_through_the_proxy(cluster: Cluster, client_tls: ssl.SSLContext, ca_file: Path, tmp_path: Path) -> None:
    binary = require_tool("mbsync")
    node0, node1, node2 = cluster.nodes
    assert send(node0, [BOB], NOTE) == {}
    local = tmp_path / "local"
    local.mkdir()
    config = tmp_path / "mbsyncrc"
    config.write_text(
        f'IMAPAccount node\nHost localhost\nPort {node2.port("imap")}\nUser {BOB}\nPass "{PASSWORD}"\n'
        f"SSLType STARTTLS\nCertificateFile {ca_file}\n\nIMAPStore remote\nAccount node\n\n"
        f"MaildirStore local\nPath {local}/\nInbox {local}/INBOX\nSubFolders Verbatim\n\n"
        "Channel sync\nFar :remote:\nNear :local:\nPatterns *\nCreate Both\nExpunge Both\nSyncState *\n"
    )
    for sub in ("cur", "new", "tmp"):
        (local / "Projects" / sub).mkdir(parents=True)
    (local / "Projects" / "new" / "1700000000.local.host").write_bytes(NOTE)
    result = subprocess.run([binary, "-c", str(config), "-a"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    pulled = maildir_messages(local / "INBOX").values()
    assert list(map(normalized, pulled)) == list(map(normalized, node1.files.stored(BOB)))
    [pushed] = node1.files.stored(BOB, "Projects")  # the local folder, created and filled at the home
    assert b"Subject: proxied" in pushed
    assert node2.files.stored(BOB, "Projects") == []
