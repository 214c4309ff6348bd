"""The consistent hot checkpoint (docs/backups.md, "The checkpoint"), through a real node's admin port.

Aspects: POST /snapshot answers the point in time with the counts, and every mailbox index's WAL is
empty afterwards; while writes are paused SMTP answers 451 4.3.0 at MAIL FROM and at the end of DATA
on the MX and submission listeners and stores nothing, an IMAP APPEND and a change to the outbound
queue wait (while reads go on) and complete once DELETE /snapshot resumes writes; a hold that runs out
resumes writes by itself and is counted; 409 for a second checkpoint and for DELETE without one, 400
for a bad hold, 503 when writes in flight do not drain or the store is not open; the metrics and
/status follow.
"""

from __future__ import annotations

import asyncio
import datetime
import imaplib
import json
import smtplib
import ssl
import threading
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.node.conftest import PASSWORD, NodeFactory, RunningNode, mailbox
from tests.node.test_imap import connect
from tests.node.test_outbound import submit, wait_for

USER, OTHER = "user@example.com", "other@example.com"
MESSAGE = b"From: <alice@remote.test>\r\nTo: <user@example.com>\r\nSubject: checkpoint\r\n\r\nHello.\r\n"
PAUSED = "451 4.3.0 Checkpoint in progress, try again shortly"


def call(node: RunningNode, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{node.port('http')}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def deliver(node: RunningNode, recipient: str = USER, data: bytes = MESSAGE) -> None:
    with smtplib.SMTP("127.0.0.1", node.port("smtp"), timeout=10) as client:
        client.sendmail("alice@remote.test", [recipient], data)


def paused(node: RunningNode) -> bool:
    return bool(json.loads(node.http_get("/status")[1])["backup"]["paused"])


@pytest.fixture
def node(node_factory: NodeFactory) -> RunningNode:
    return node_factory([mailbox(USER), mailbox(OTHER)])


def test_a_snapshot_answers_its_point_in_time_with_every_index_whole(node: RunningNode) -> None:
    deliver(node, USER)
    deliver(node, USER)
    deliver(node, OTHER)
    wal_files = sorted((node.files.data_dir / "mail").glob("*/*/index.sqlite-wal"))
    assert [f.stat().st_size > 0 for f in wal_files] == [True, True]  # the deliveries are in the WALs
    before = datetime.datetime.now(datetime.UTC)

    status, body = call(node, "POST", "/snapshot?hold=30")

    assert status == 200, body
    point_in_time = datetime.datetime.fromisoformat(body["point_in_time"])
    assert before <= point_in_time <= datetime.datetime.now(datetime.UTC)
    assert datetime.datetime.fromisoformat(body["hold_until"]) == point_in_time + datetime.timedelta(seconds=30)
    assert (body["mailboxes"], body["messages"], body["queued"]) == (2, 3, 0)
    assert [f.stat().st_size for f in wal_files] == [0, 0]  # each index whole in its main file
    assert paused(node)

    status, body = call(node, "DELETE", "/snapshot")
    assert status == 200
    assert body["paused_seconds"] >= 0
    assert not paused(node)
    deliver(node, USER)  # writes go on
    assert len(node.files.stored(USER)) == 3


def test_smtp_is_answered_451_while_paused_and_nothing_is_stored(node: RunningNode, client_tls: ssl.SSLContext) -> None:
    with smtplib.SMTP("127.0.0.1", node.port("smtp"), timeout=10) as ending:
        # A transaction that reaches the end of DATA while paused.
        ending.ehlo("remote.test")
        ending.mail("alice@remote.test")
        ending.rcpt(USER)
        assert call(node, "POST", "/snapshot?hold=30")[0] == 200

        code, text = ending.data(MESSAGE)  # smtplib returns the reply to the data (sendmail raises)
        assert f"{code} {text.decode()}" == PAUSED

        with pytest.raises(smtplib.SMTPSenderRefused) as refused_mail:  # MX: MAIL FROM
            ending.sendmail("alice@remote.test", [USER], MESSAGE)
        assert f"451 {refused_mail.value.smtp_error.decode()}" == PAUSED

        with smtplib.SMTP("127.0.0.1", node.port("submission"), timeout=10) as submission:
            submission.starttls(context=client_tls)
            submission.login(USER, PASSWORD)
            with pytest.raises(smtplib.SMTPSenderRefused) as refused_submission:
                submission.sendmail(USER, [OTHER], MESSAGE)
            assert refused_submission.value.smtp_code == 451

        assert node.files.stored(USER) == [] and node.files.stored(OTHER) == []
        assert node.metric("mailnode_smtp_messages_rejected_total", listener="smtp", reason="checkpoint") == 2
        assert node.metric("mailnode_smtp_messages_accepted_total", listener="smtp") == 0

        assert call(node, "DELETE", "/snapshot")[0] == 200
        ending.sendmail("alice@remote.test", [USER], MESSAGE)  # the client's retry, on the same session
    assert len(node.files.stored(USER)) == 1


def test_imap_append_waits_for_the_checkpoint_while_reads_go_on(node: RunningNode, client_tls: ssl.SSLContext) -> None:
    deliver(node, USER)
    writer, reader = connect(node, client_tls), connect(node, client_tls)
    assert call(node, "POST", "/snapshot?hold=60")[0] == 200
    appended: list[tuple[str, Any]] = []
    thread = threading.Thread(target=lambda: appended.append(writer.append("INBOX", "(\\Flagged)", None, MESSAGE)))
    thread.start()
    wait_for("the APPEND to wait for writes to resume", lambda: node.node.fence.waiting == 1)

    # Reads are served meanwhile, the APPEND still waits, and nothing has been written.
    assert reader.select("INBOX")[0] == "OK"
    typ, data = reader.fetch("1", "(BODY.PEEK[])")
    assert typ == "OK" and isinstance(data[0], tuple) and data[0][1].endswith(MESSAGE)
    assert b"(MESSAGES 1)" in reader.status("INBOX", "(MESSAGES)")[1][0]
    assert thread.is_alive() and appended == []
    assert len(node.files.stored(USER)) == 1

    assert call(node, "DELETE", "/snapshot")[0] == 200
    thread.join(30)
    assert appended and appended[0][0] == "OK"
    assert len(node.files.stored(USER)) == 2
    for client in (writer, reader):
        client.logout()


def test_the_outbound_queue_waits_for_the_checkpoint(
    node_factory: NodeFactory, refusing_port: int, client_tls: ssl.SSLContext
) -> None:
    node = node_factory(
        [mailbox(USER)],
        smtp={"transports": {"remote.test": f"127.0.0.1:{refusing_port}"}, "delivery_interval": 0.1},
    )
    submit(node, client_tls, ["friend@remote.test"])

    def attempted() -> bool:  # the first attempt recorded: the next is a minute away
        messages = json.loads(node.http_get("/queue")[1])
        return bool(messages) and messages[0]["recipients"][0]["attempts"] >= 1

    wait_for("the first delivery attempt", attempted)
    [queued] = json.loads(node.http_get("/queue")[1])
    status, body = call(node, "POST", "/snapshot?hold=60")
    assert (status, body["queued"]) == (200, 1)
    deleted: list[int] = []
    thread = threading.Thread(target=lambda: deleted.append(call(node, "DELETE", f"/queue/{queued['id']}")[0]))
    thread.start()
    wait_for("the delete to wait for writes to resume", lambda: node.node.fence.waiting == 1)
    assert [m["id"] for m in json.loads(node.http_get("/queue")[1])] == [queued["id"]]  # still there
    assert sorted(p.name for p in (node.files.data_dir / "queue" / "messages").iterdir()) == [
        f"{queued['id']}.eml",
        f"{queued['id']}.json",
    ]

    assert call(node, "DELETE", "/snapshot")[0] == 200
    thread.join(30)
    assert deleted == [200]
    assert json.loads(node.http_get("/queue")[1]) == []


def test_a_hold_that_runs_out_resumes_writes_by_itself(node: RunningNode) -> None:
    status, body = call(node, "POST", "/snapshot?hold=1")
    assert status == 200, body
    wait_for("writes to resume", lambda: not paused(node))
    assert node.metric("mailnode_checkpoint_hold_expired_total") == 1
    assert node.metric("mailnode_writes_paused") == 0
    assert call(node, "DELETE", "/snapshot") == (409, {"error": "no checkpoint is in progress"})
    deliver(node, USER)
    assert len(node.files.stored(USER)) == 1


def test_one_checkpoint_at_a_time(node: RunningNode) -> None:
    assert call(node, "DELETE", "/snapshot")[0] == 409
    assert call(node, "POST", "/snapshot")[0] == 200
    status, body = call(node, "POST", "/snapshot")
    assert status == 409
    assert "already in progress" in body["error"]
    assert call(node, "DELETE", "/snapshot")[0] == 200
    assert call(node, "DELETE", "/snapshot")[0] == 409


@pytest.mark.parametrize("hold", ["0", "0.5", "601", "soon", "nan", "-3"])
def test_a_bad_hold_is_refused(node: RunningNode, hold: str) -> None:
    status, body = call(node, "POST", f"/snapshot?hold={hold}")
    assert status == 400
    assert "hold must be a number of seconds from 1 to 600" in body["error"]
    assert not paused(node)


def test_the_hold_is_capped_by_the_config(node_factory: NodeFactory) -> None:
    node = node_factory(backup={"max_hold": 5})
    assert call(node, "POST", "/snapshot?hold=6")[0] == 400
    status, body = call(node, "POST", "/snapshot")  # the default hold (60 s) is capped too
    assert status == 200
    hold = datetime.datetime.fromisoformat(body["hold_until"]) - datetime.datetime.fromisoformat(body["point_in_time"])
    assert hold == datetime.timedelta(seconds=5)
    call(node, "DELETE", "/snapshot")


def test_writes_that_do_not_drain_give_503_and_writes_resume(node: RunningNode) -> None:
    node.node.checkpoint.drain_timeout = 0.2
    release = asyncio.Event()

    async def stuck_write() -> None:  # a write in flight that does not finish
        async with node.node.fence.writing():
            await release.wait()

    async def start_stuck() -> asyncio.Task[None]:
        task = asyncio.create_task(stuck_write())
        await asyncio.sleep(0)
        return task

    task: asyncio.Task[None] = node.call(start_stuck())
    try:
        status, body = call(node, "POST", "/snapshot")
        assert status == 503
        assert "still in flight" in body["error"]
        assert not paused(node)
        assert node.metric("mailnode_checkpoints_total", result="failed") == 1
    finally:

        async def finish() -> None:
            release.set()
            await task

        node.call(finish())
    deliver(node, USER)
    assert len(node.files.stored(USER)) == 1


def test_no_checkpoint_without_an_open_store(node: RunningNode) -> None:
    node.node.store.is_open = False  # as while the node starts or stops
    try:
        assert call(node, "POST", "/snapshot") == (503, {"error": "the store is not open"})
    finally:
        node.node.store.is_open = True


def test_metrics_and_status_follow_the_checkpoint(node: RunningNode) -> None:
    assert node.metric("mailnode_writes_paused") == 0
    status, body = call(node, "POST", "/snapshot?hold=30")
    assert status == 200
    assert node.metric("mailnode_writes_paused") == 1
    assert node.metric("mailnode_checkpoints_total", result="ok") == 1
    backup = json.loads(node.http_get("/status")[1])["backup"]
    assert backup["paused"] is True
    assert backup["hold_until"] == body["hold_until"]
    assert backup["last"] is None

    assert call(node, "DELETE", "/snapshot")[0] == 200
    assert node.metric("mailnode_writes_paused") == 0
    assert node.metric("mailnode_checkpoint_pause_seconds_count") == 1
    assert node.metric("mailnode_checkpoint_hold_expired_total") == 0
    text = node.http_get("/metrics")[1].decode()
    assert 'mailnode_checkpoints_total{result="ok"} 1.0' in text
    assert "mailnode_checkpoint_pause_seconds_bucket" in text
    assert json.loads(node.http_get("/status")[1])["backup"]["paused"] is False


def test_a_node_stopping_during_a_hold_lets_waiting_writes_finish(
    node_factory: NodeFactory, client_tls: ssl.SSLContext
) -> None:
    node = node_factory([mailbox(USER)])
    writer = connect(node, client_tls)
    assert call(node, "POST", "/snapshot?hold=600")[0] == 200
    outcome: list[object] = []

    def append() -> None:
        try:
            outcome.append(writer.append("INBOX", None, None, MESSAGE)[0])
        except (imaplib.IMAP4.abort, OSError) as error:  # the BYE of the stopping node may come first
            outcome.append(error)
        writer.shutdown()  # hang up, as a client does: the node's stop need not wait for the session

    thread = threading.Thread(target=append)
    thread.start()
    wait_for("the APPEND to wait for writes to resume", lambda: node.node.fence.waiting == 1)
    node.stop()  # does not wait for the hold; the APPEND's write completes before the store closes
    thread.join(30)
    assert outcome and not thread.is_alive()
    assert len(node.files.stored(USER)) == 1
