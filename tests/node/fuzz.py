"""Fuzzing a live node at the socket, shared by the protocol fuzz tests (test_fuzz_smtp, test_fuzz_imap):
`run_session` plays a list of steps over one real connection while a thread reads whatever the node
answers (after a step with a tag, waiting a little for its answer), then half-closes and waits for the
node to close its side; `ErrorLog` collects the
log records at ERROR and above (tracebacks included) that the node in this process writes, so a test
can say that nothing broke; `examples()` is how many sessions a test plays (MAILFLEET_FUZZ_EXAMPLES
overrides it for a longer run)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import socket
import struct
import threading


def examples(default: int = 100) -> int:
    return int(os.environ.get("MAILFLEET_FUZZ_EXAMPLES", default))


@dataclasses.dataclass(frozen=True)
class Send:
    """Bytes written in one go: one command, or a pipelined burst. With `tag` (IMAP), the client then
    waits (a little) for that command's tagged answer or a continuation request, as a lock-step client does."""

    data: bytes
    tag: bytes | None = None


@dataclasses.dataclass(frozen=True)
class Reset:
    """An abrupt disconnect (TCP RST): nothing more is sent or read."""


Step = Send | Reset


@dataclasses.dataclass
class Transcript:
    received: bytes
    reset: bool  # the session ended with our Reset
    closed_by_node: bool  # after our half-close, the node closed its side too (it did not hang)

    def lines(self) -> list[bytes]:
        return self.received.split(b"\r\n")[:-1] if self.received else []


def run_session(port: int, steps: list[Step], *, timeout: float = 20.0, wait: float = 3.0) -> Transcript:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    received = bytearray()
    arrived = threading.Condition()

    def read() -> None:
        try:
            while chunk := sock.recv(65536):
                with arrived:
                    received.extend(chunk)
                    arrived.notify_all()
        except OSError:  # reset by the node after it closed with our bytes unread, or by our Reset
            pass
        with arrived:
            arrived.notify_all()

    def answered(tag: bytes, since: int) -> bool:
        # A line of the answer: starting at `since`, or after a line end. Whether it came is all
        # that matters: an IDLE or AUTHENTICATE that waits for more counts as answered by its "+".
        new = bytes(received[max(since - 2, 0) :])
        return not reader.is_alive() or any(
            re.search(rb"(?:^|\r\n)" + re.escape(prefix), new) for prefix in (tag + b" ", b"+ ")
        )

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        for step in steps:
            if isinstance(step, Reset):
                with contextlib.suppress(OSError):  # not connected any more: the node closed first
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.shutdown(socket.SHUT_RD)  # wakes the reader (closing does not); nothing goes out yet
                reader.join(timeout)
                sock.close()  # with a zero linger time: RST
                return Transcript(bytes(received), reset=True, closed_by_node=False)
            since = len(received)
            try:
                sock.sendall(step.data)
            except OSError:  # the node has closed (LOGOUT, a refused literal+, a line too long)
                break
            if step.tag is not None:
                tag = step.tag
                with arrived:  # not an assertion: a command the node must wait on (an open literal) waits
                    if not arrived.wait_for(lambda: answered(tag, since), wait):  # noqa: B023
                        unanswered.append(step.data[:80])
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        reader.join(timeout)
        return Transcript(bytes(received), reset=False, closed_by_node=not reader.is_alive())
    finally:
        sock.close()


unanswered: list[bytes] = []  # commands waited on in vain (not an error: how long a run takes)


class ErrorLog(logging.Handler):
    """Log records at ERROR and above, from every logger of this process, while installed."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> ErrorLog:
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeHandler(self)

    def take(self) -> list[str]:
        """The records since the last call, formatted with their tracebacks."""
        taken, self.records = self.records, []
        formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
        return [formatter.format(record) for record in taken]
