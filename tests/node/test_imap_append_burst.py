"""APPEND is group-committed like SMTP delivery (mailnode.store.mailstore): a burst of APPENDs from
several sessions, arriving while a batch is being written, is written as one batch (one fsync per
directory, one index commit), and no APPEND is answered before the batch holding it is on disk. Over
imaplib on a real node; the first batch is held inside its write so that the burst gathers behind it."""

from __future__ import annotations

import contextlib
import imaplib
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest

from mailnode.store.mailstore import Delivery, MailStore
from tests.node.conftest import PASSWORD, NodeFactory, RunningNode

USER = "user@example.com"
BURST = 6
DEADLINE = 60.0  # seconds for anything to happen on a loaded machine


def _message(number: int) -> bytes:
    header = f"From: a@example.org\r\nSubject: burst {number}\r\nMessage-ID: <b{number}@example.org>\r\n"
    return header.encode() + b"\r\nbody\r\n"


@contextlib.contextmanager
def _clients(node: RunningNode, count: int) -> Iterator[list[imaplib.IMAP4]]:
    clients = []
    try:
        for _ in range(count):
            client = imaplib.IMAP4("127.0.0.1", node.port("imap"), timeout=DEADLINE)
            client.login(USER, PASSWORD)
            clients.append(client)
        yield clients
    finally:
        for client in clients:
            with contextlib.suppress(imaplib.IMAP4.error, OSError):
                client.logout()


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {DEADLINE:.0f} s"
        time.sleep(0.01)


def test_a_burst_of_appends_shares_one_batch_and_none_is_answered_before_it(
    node_factory: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = node_factory(imap={"allow_plaintext_login": True})
    store = node.node.store
    batches: list[int] = []  # deliveries per batch written
    entered, release = threading.Event(), threading.Event()
    write_batch = MailStore._write_batch

    def held(self: MailStore, calls: list[Sequence[Delivery]]) -> object:
        batches.append(len(calls))
        if len(batches) == 1:  # the first batch waits, inside its write, until the burst has gathered
            entered.set()
            release.wait(DEADLINE)
        return write_batch(self, calls)

    monkeypatch.setattr(MailStore, "_write_batch", held)
    answers: dict[int, str] = {}

    def append(client: imaplib.IMAP4, number: int) -> None:
        typ, data = client.append("INBOX", None, None, _message(number))
        answers[number] = f"{typ} {data[0]!r}"

    with _clients(node, BURST + 1) as clients:
        threads = [threading.Thread(target=append, args=(clients[0], 0))]
        threads[0].start()
        try:
            assert entered.wait(DEADLINE), "the first APPEND never reached the store"
            for number in range(1, BURST + 1):
                threads.append(threading.Thread(target=append, args=(clients[number], number)))
                threads[-1].start()
            _wait(lambda: len(store._pending) == BURST, "the burst gathering behind the first batch")
            assert answers == {}, "an APPEND was answered before its batch was written"
        finally:
            release.set()
            for thread in threads:
                thread.join(DEADLINE)
        assert not any(thread.is_alive() for thread in threads)
        assert sorted(answers) == list(range(BURST + 1))
        assert all(answer.startswith("OK b'[APPENDUID ") for answer in answers.values()), answers
        assert batches == [1, BURST], "the burst was not written as one batch"
        client = clients[0]
        client.select("INBOX")
        typ, data = client.search(None, "ALL")
        assert (typ, data) == ("OK", [" ".join(str(n) for n in range(1, BURST + 2)).encode()])
        subjects = set()
        for number in range(1, BURST + 2):
            typ, fetched = client.fetch(str(number), "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            assert typ == "OK" and isinstance(fetched[0], tuple)
            subjects.add(fetched[0][1].strip())
        assert subjects == {f"Subject: burst {n}".encode() for n in range(BURST + 1)}
