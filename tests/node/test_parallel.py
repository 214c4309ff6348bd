"""Many SMTP sessions at once against one node, all open together before any of them sends.

Aspects: 100 MX sessions delivering to several mailboxes (one through an alias) and 20 submission
sessions with STARTTLS and AUTH all get 250 for every message; each message is stored exactly once,
byte for byte, in the right mailbox; the accepted-messages metric and /status count exactly what was sent.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import re
import smtplib
import ssl
import threading
import time
from collections.abc import Callable

from tests.node.conftest import DOMAIN, PASSWORD, TRACE_BLOCK, RunningNode

USER, OTHER, ALIAS = f"user@{DOMAIN}", f"other@{DOMAIN}", f"alias@{DOMAIN}"
MAILBOX_OF = {USER: USER, OTHER: OTHER, ALIAS: USER}  # alias@ is an alias of user@ in the `node` fixture

_MESSAGE_ID = re.compile(rb"\r\nMessage-ID: <([^<>\r\n]+)>\r\n")
_TRACE_BLOCK = TRACE_BLOCK

# One message sent: the recipient, the bytes sent and the replies to MAIL, RCPT and DATA.
Outcome = tuple[str, bytes, list[tuple[int, bytes]]]
Sent = dict[str, Outcome]  # by Message-ID


def make_message(message_id: str, sender: str, recipient: str) -> bytes:
    body = "".join(f"line {n} of {message_id}: {'x' * (n * 37 % 300)}\r\n" for n in range(30))
    return (
        f"Message-ID: <{message_id}>\r\nFrom: <{sender}>\r\nTo: <{recipient}>\r\n"
        f"Subject: parallel {message_id}\r\n\r\n{body}"
    ).encode()


def send(conn: smtplib.SMTP, message_id: str, sender: str, recipient: str) -> Outcome:
    data = make_message(message_id, sender, recipient)
    replies = [conn.mail(sender), conn.rcpt(recipient), conn.data(data)]
    return recipient, data, replies


def run_sessions(count: int, session: Callable[[int, threading.Barrier], Sent]) -> Sent:
    """Run `count` sessions in threads; each calls barrier.wait() once its connection is set up, so
    all of them are open at the same time before any sends."""
    barrier = threading.Barrier(count, timeout=60)

    def guarded(n: int) -> Sent:
        try:
            return session(n, barrier)
        except BaseException:
            barrier.abort()  # the others would wait for this one in vain
            raise

    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(guarded, n) for n in range(count)]
        results = [future.result(timeout=120) for future in futures]
    sent: Sent = {}
    for result in results:
        sent.update(result)
    return sent


def check_all_stored_once(node: RunningNode, sent: Sent, *, protocol: str) -> None:
    for message_id, (_, _, replies) in sent.items():
        codes = [code for code, _ in replies]
        assert codes == [250, 250, 250], f"{message_id}: {replies}"
    for mailbox in (USER, OTHER):
        expected = {mid: data for mid, (rcpt, data, _) in sent.items() if MAILBOX_OF[rcpt] == mailbox}
        counts: collections.Counter[str] = collections.Counter()
        for content in node.files.stored(mailbox):
            match = _MESSAGE_ID.search(content)
            assert match, f"{mailbox}: a stored message we did not send: {content[:200]!r}"
            message_id = match.group(1).decode()
            assert message_id in expected, f"{mailbox}: {message_id} was not sent to this mailbox"
            trace, body = content[: match.start() + 2], content[match.start() + 2 :]
            assert body == expected[message_id], f"{mailbox}: {message_id} stored with other bytes"
            assert _TRACE_BLOCK.fullmatch(trace), trace
            assert f" with {protocol} id ".encode() in trace, trace
            counts[message_id] += 1
        assert counts == collections.Counter(expected.keys()), f"{mailbox}: stored and sent differ"


def store_messages(node: RunningNode) -> int:
    status, body = node.http_get("/status")
    assert status == 200
    count: int = json.loads(body)["store"]["messages"]
    return count


def test_hundred_parallel_mx_sessions(node: RunningNode) -> None:
    sessions, per_session = 100, 3
    port = node.port("smtp")
    recipients = [USER, OTHER, ALIAS]

    def session(n: int, barrier: threading.Barrier) -> Sent:
        sent: Sent = {}
        # a hundred MX clients, each from its own address (one address gets 20: listen.limits.smtp)
        source = (f"127.0.1.{n + 1}", 0)
        with smtplib.SMTP(
            "127.0.0.1", port, local_hostname=f"client{n}.test", timeout=60, source_address=source
        ) as conn:
            assert conn.ehlo()[0] == 250
            barrier.wait()
            for k in range(per_session):
                message_id = f"mx.{n}.{k}@parallel.test"
                sent[message_id] = send(conn, message_id, f"sender{n}@remote.test", recipients[(n + k) % 3])
            assert conn.quit()[0] == 221
        return sent

    sent = run_sessions(sessions, session)

    assert len(sent) == sessions * per_session
    check_all_stored_once(node, sent, protocol="ESMTP")
    assert node.metric("mailnode_smtp_messages_accepted_total", listener="smtp") == len(sent)
    assert node.metric("mailnode_smtp_sessions_total", listener="smtp") == sessions
    assert store_messages(node) == len(sent)
    deadline = time.monotonic() + 5
    while node.metric("mailnode_smtp_sessions_active", listener="smtp") != 0:
        assert time.monotonic() < deadline, "sessions still counted as active after QUIT"
        time.sleep(0.01)


def test_parallel_submission_with_starttls_and_auth(node: RunningNode, client_tls: ssl.SSLContext) -> None:
    sessions, per_session = 20, 2
    port = node.port("submission")
    recipients = [OTHER, USER]

    def session(n: int, barrier: threading.Barrier) -> Sent:
        sent: Sent = {}
        with smtplib.SMTP("127.0.0.1", port, local_hostname=f"mua{n}.test", timeout=60) as conn:
            assert conn.starttls(context=client_tls)[0] == 220
            barrier.wait()  # every session authenticates at the same time
            assert conn.login(USER, PASSWORD)[0] == 235
            for k in range(per_session):
                message_id = f"sub.{n}.{k}@parallel.test"
                sent[message_id] = send(conn, message_id, USER, recipients[k % 2])
            assert conn.quit()[0] == 221
        return sent

    sent = run_sessions(sessions, session)

    assert len(sent) == sessions * per_session
    check_all_stored_once(node, sent, protocol="ESMTPSA")
    assert node.metric("mailnode_smtp_messages_accepted_total", listener="submission") == len(sent)
    assert node.metric("mailnode_smtp_messages_accepted_total", listener="smtp") == 0
    assert store_messages(node) == len(sent)
