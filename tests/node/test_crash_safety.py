"""Crash safety of a real `mailnode serve` process: SIGKILL at random moments while clients stream mail.

Aspects: every message acknowledged with 250 survives any number of kills, exactly once and byte for
byte under our trace headers; nothing is stored twice or from nowhere; recovery leaves no tmp/ file
and an index that agrees with the files (paths, sizes, UIDs in delivery order); a clean SIGTERM after
all that exits 0.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import random
import re
import smtplib
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.node.conftest import DOMAIN, TRACE_BLOCK, ServeProcess

RECIPIENT = f"user@{DOMAIN}"
KILL_ROUNDS = 8
CLIENTS = 3
MAX_MESSAGES_PER_CLIENT = 5000  # far more than the time allows; a bound, not a target
RESTART_DEADLINE = 60.0  # a restarted node's first delivery: 10 s ran out at load 16 on 2 cores
CLIENT_TIME_LIMIT = 240.0  # a safety bound: the test stops the clients itself when it is done

_PRINTABLE = bytes(range(0x20, 0x7F))
_EIGHT_BIT = _PRINTABLE + bytes(range(0x80, 0x100))
_TRACE_BLOCK = TRACE_BLOCK
_MESSAGE_ID = re.compile(rb"\r\nMessage-ID: <([^<>\r\n]+)>\r\n")


def make_message(message_id: str, rng: random.Random) -> tuple[bytes, bool]:
    """A unique message of a few KiB (CRLF lines, at most 998 bytes each); returns (bytes, is 8-bit)."""
    eight_bit = rng.random() < 0.4
    header = (
        f"Message-ID: <{message_id}>\r\n"
        f"From: <sender@remote.test>\r\nTo: <{RECIPIENT}>\r\nSubject: crash test {message_id}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}\r\n\r\n"
    ).encode()
    alphabet = _EIGHT_BIT if eight_bit else _PRINTABLE
    target = rng.randint(1_000, 8_000)
    lines: list[bytes] = []
    size = 0
    while size < target:
        length = rng.choice((0, rng.randint(1, 78), rng.randint(1, 78), rng.randint(500, 998)))
        line = bytes(rng.choices(alphabet, k=length))
        if line and rng.random() < 0.05:
            line = b"." + line[1:]  # exercises dot-stuffing on the way in and out
        lines.append(line)
        size += length + 2
    return header + b"\r\n".join(lines) + b"\r\n", eight_bit


@dataclasses.dataclass
class Client:
    """One sequential SMTP client. Each message is sent at most once, whatever happens to it."""

    name: str
    port: int
    stop: threading.Event
    seed: int
    sent: dict[str, bytes] = dataclasses.field(default_factory=dict)  # in sending order
    acked: set[str] = dataclasses.field(default_factory=set)
    errors: int = 0
    last_error: str = ""

    def run(self) -> None:
        rng = random.Random(self.seed)
        deadline = time.monotonic() + CLIENT_TIME_LIMIT
        conn: smtplib.SMTP | None = None
        for seq in range(MAX_MESSAGES_PER_CLIENT):
            if self.stop.is_set() or time.monotonic() > deadline:
                break
            if conn is None:
                try:
                    conn = smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test", timeout=10)
                except (OSError, smtplib.SMTPException) as error:
                    self.last_error = repr(error)
                    time.sleep(0.02)  # the node is down or starting: the next message waits for it
                    continue
            message_id = f"{self.name}.{seq}@crash.test"
            data, eight_bit = make_message(message_id, rng)
            self.sent[message_id] = data
            try:
                refused = conn.sendmail(
                    "sender@remote.test",
                    [RECIPIENT],
                    data,
                    mail_options=["BODY=8BITMIME"] if eight_bit else [],
                )
            except (OSError, smtplib.SMTPException) as error:
                self.errors += 1
                self.last_error = repr(error)
                self._drop(conn)
                conn = None
                continue
            if not refused:
                self.acked.add(message_id)
            if rng.random() < 0.1:
                self._drop(conn, quit=True)  # sometimes a fresh session, as real clients do
                conn = None
        if conn is not None:
            self._drop(conn, quit=True)

    @staticmethod
    def _drop(conn: smtplib.SMTP, *, quit: bool = False) -> None:
        with contextlib.suppress(OSError, smtplib.SMTPException):
            if quit:
                conn.quit()
        conn.close()


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, clients: list[Client], proc: ServeProcess
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            seen = [(c.name, len(c.sent), len(c.acked), c.errors, c.last_error) for c in clients]
            log = proc.log_file.read_text()[-3000:] if proc.log_file else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; {seen=}; node log: {log}")
        time.sleep(0.01)


def http_get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        body: bytes = response.read()
        return body


def scrape(port: int, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(http_get(port, "/metrics").decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


@pytest.mark.slow
def test_acknowledged_mail_survives_repeated_sigkill(serve_process: Callable[..., ServeProcess]) -> None:
    proc = serve_process()
    proc.start()
    rng = random.Random()
    stop = threading.Event()
    clients = [Client(f"c{n}", proc.ports["smtp"], stop, seed=rng.randrange(2**32)) for n in range(CLIENTS)]
    threads = [threading.Thread(target=client.run, daemon=True) for client in clients]
    for thread in threads:
        thread.start()

    def acked() -> int:
        return sum(len(client.acked) for client in clients)

    def more_acks(than: int) -> Callable[[], bool]:
        return lambda: acked() > than

    try:
        for round_no in range(KILL_ROUNDS):
            wait_for(more_acks(acked()), RESTART_DEADLINE, f"a delivery after start {round_no}", clients, proc)
            time.sleep(rng.uniform(0.05, 0.5))
            proc.kill()
            proc.start()
        wait_for(more_acks(acked() + 5), RESTART_DEADLINE, "deliveries after the last restart", clients, proc)
    finally:
        stop.set()
        for thread in threads:
            thread.join(CLIENT_TIME_LIMIT + 15)
    assert not any(thread.is_alive() for thread in threads), "a client did not finish"

    # What the running node reports agrees with what it holds, then it stops cleanly.
    status = json.loads(http_get(proc.ports["http"], "/status"))
    store_messages = scrape(proc.ports["http"], "mailnode_store_messages")
    assert proc.terminate() == 0, proc.log_file.read_text() if proc.log_file else ""

    sent = {mid: data for client in clients for mid, data in client.sent.items()}
    all_acked = {mid for client in clients for mid in client.acked}
    assert len(sent) == sum(len(client.sent) for client in clients)  # message ids are unique
    assert len(all_acked) >= 50, "too few deliveries to prove anything"
    assert sum(client.errors for client in clients) >= KILL_ROUNDS, "the kills did not interrupt the clients"

    mail = proc.files.data_dir / "mail"
    assert [str(p.relative_to(mail)) for p in mail.glob("*/*")] == [f"{DOMAIN}/user"], "mail stored elsewhere"
    mailbox = mail / DOMAIN / "user"
    folders = [d for d in mailbox.iterdir() if d.is_dir()]
    assert [d.name for d in folders] == ["INBOX"]
    leftovers = [f for d in folders for f in (d / "tmp").iterdir()]
    assert leftovers == [], "files left in tmp/ after recovery and a clean stop"
    files = {str(f.relative_to(mailbox)): f for sub in ("new", "cur") for f in mailbox.glob(f"*/{sub}/*")}

    # Every stored file is our trace headers followed by exactly the bytes of one message we sent.
    stored_ids: collections.Counter[str] = collections.Counter()
    id_of_path: dict[str, str] = {}
    for rel, path in files.items():
        content = path.read_bytes()
        match = _MESSAGE_ID.search(content)
        assert match, f"{rel}: no Message-ID, not a message we sent: {content[:200]!r}"
        message_id = match.group(1).decode()
        assert message_id in sent, f"{rel}: foreign message {message_id}"
        trace, body = content[: match.start() + 2], content[match.start() + 2 :]
        assert body == sent[message_id], f"{rel}: stored bytes differ from the bytes sent for {message_id}"
        assert _TRACE_BLOCK.fullmatch(trace), f"{rel}: unexpected text before the message: {trace!r}"
        assert f"for <{RECIPIENT}>".encode() in trace
        stored_ids[message_id] += 1
        id_of_path[rel] = message_id
    duplicates = {mid: n for mid, n in stored_ids.items() if n > 1}
    assert duplicates == {}, "messages stored more than once"
    lost = all_acked - stored_ids.keys()
    assert lost == set(), f"{len(lost)} acknowledged messages lost, e.g. {sorted(lost)[:5]}"

    # The index agrees with the files: same paths, same sizes, unique UIDs growing in sending order.
    with contextlib.closing(sqlite3.connect(mailbox / "index.sqlite")) as db:
        rows = db.execute(
            "SELECT m.path, m.size, m.uid, f.uidnext FROM messages m JOIN folders f ON f.id = m.folder_id"
        ).fetchall()
    indexed = {path: (size, uid, uidnext) for path, size, uid, uidnext in rows}
    assert len(indexed) == len(rows)
    assert set(indexed) == set(files), "index rows and message files differ"
    for rel, (size, uid, uidnext) in indexed.items():
        assert size == files[rel].stat().st_size, f"{rel}: index size {size} != file size"
        assert 0 < uid < uidnext
    uids = [uid for _, uid, _ in indexed.values()]
    assert len(set(uids)) == len(uids), "duplicate UIDs"
    uid_of_id = {id_of_path[rel]: uid for rel, (_, uid, _) in indexed.items()}
    for client in clients:
        in_order = [uid_of_id[mid] for mid in client.sent if mid in uid_of_id]
        assert in_order == sorted(in_order), f"{client.name}: UIDs do not grow in the order mail was sent"

    assert status["store"]["messages"] == len(files) == store_messages
    assert status["store"]["bytes"] == sum(f.stat().st_size for f in files.values())
