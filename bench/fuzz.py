"""The long fuzzing run `make bench` ends with: random SMTP and IMAP sessions against one live mail node,
counted in inputs (one command line, burst, literal or message body written to the node), until
`--inputs` have been tried (10^6 by default), then the crashes: the node died, logged an error or a
traceback, or failed a health check (a fresh 220 greeting, an IMAP greeting, /healthz 200).

tests/node/test_fuzz_smtp.py and test_fuzz_imap.py play hypothesis-driven sessions in `make test` (and
shrink what fails to a smallest example); this run trades shrinking for volume: sessions are drawn with
`random` from the same kind of vocabulary, `--parallel` at a time, so a million inputs take minutes.
A failure prints the seed, so `python -m bench.fuzz --seed N` plays the same sessions again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
import urllib.request

from bench import common
from bench.common import HOST, RECIPIENT, BenchError
from mailnode.imap import commands as imap_commands

PASSWORD = "fuzz-password"
HEALTH_EVERY = 2_000  # sessions between health checks
READ_TIMEOUT = 10.0  # seconds a session waits for the node to close after the client half-closed

# -- the vocabulary ----------------------------------------------------------------------------------

ENDS = [b"\r\n"] * 6 + [b"\n", b"\r", b"", b"\r\r\n"]
JUNK = [b"", b" ", b"\x00", b"\xff\xfe", "zoë".encode(), b"\t", b"(", b")", b"{", b"}", b"[", b"]", b'"', b"\\", b"*"]
PATHS = [
    f"<{RECIPIENT}>".encode(), b"<alice@remote.test>", b"<nobody@bench.test>", b"<>", b"<postmaster>",
    b"<unterminated@example.net", b"<a\x00b@remote.test>", b"<zo\xeb@remote.test>", b"<@route.test:u@bench.test>",
    b'<"q u"@remote.test>', b"u@bench.test", b"<<a@b.test>>", b"",
]  # fmt: skip
SMTP_VERBS = [b"EHLO", b"HELO", b"NOOP", b"RSET", b"VRFY", b"EXPN", b"HELP", b"STARTTLS", b"AUTH", b"BDAT", b"DATA"]
IMAP_NAMES = [*sorted(command.name.encode() for command in imap_commands.TABLE.commands), b"XYZZY", b"UID X"]
IMAP_ARGS = [
    b"INBOX", b'"INBOX"', b'""', b"1", b"1:*", b"*", b"1,3:5", b"0", b"4294967296", b"(FLAGS)", b"ALL", b"FULL",
    b"(BODY.PEEK[] RFC822.SIZE ENVELOPE BODYSTRUCTURE)", b"BODY[1.2.MIME]<0.10>", b"+FLAGS (\\Seen)",
    b"-FLAGS.SILENT (\\Deleted)", b"TEXT hello", b"OR SEEN NOT DELETED", b"CHARSET UTF-8 BODY x", b"SINCE 1-Jan-2020",
    b"a/b", b"&AAA-", b"&Jjo-", b'"" *', b'"" %', b"(MESSAGES UIDNEXT)", b"(CONDSTORE)", b"Trash", b"{5}", b"{5+}",
    b"{99999999}", b"bench@bench.test " + PASSWORD.encode(), b"PLAIN", b"NIL", b"(",
]  # fmt: skip


def _junk(rng: random.Random) -> bytes:
    if rng.random() < 0.3:
        return rng.randbytes(rng.randrange(0, 40))
    return b"".join(rng.choice(JUNK) for _ in range(rng.randrange(0, 4)))


def smtp_input(rng: random.Random) -> bytes:
    kind = rng.randrange(10)
    if kind < 2:
        line = rng.choice([b"MAIL FROM:", b"RCPT TO:"]) + rng.choice(PATHS) + rng.choice([b"", b" SIZE=10", b" X=1"])
    elif kind < 6:
        line = rng.choice(SMTP_VERBS) + rng.choice([b"", b" ", b" bench.test", b" PLAIN", b" 10 LAST"]) + _junk(rng)
    elif kind == 6:  # a transaction that reaches DATA, with an odd body
        body = b"".join(rng.choice([b"Subject: x", b"", b".", b"..", b"\x00", b"\xff", b"y" * 1200]) + rng.choice(ENDS)
                        for _ in range(rng.randrange(0, 8)))  # fmt: skip
        return (b"MAIL FROM:<alice@remote.test>\r\nRCPT TO:<" + RECIPIENT.encode() + b">\r\nDATA\r\n" + body
                + rng.choice([b"\r\n.\r\n", b".\r\n", b"\n.\n", b""]))  # fmt: skip
    elif kind == 7:  # over-long lines
        line = b"NOOP " + b"y" * rng.choice([995, 1200, 5000, 70000])
    elif kind == 8:  # a pipelined burst
        return b"".join(smtp_input(rng) for _ in range(rng.randrange(2, 6)))
    else:
        line = _junk(rng)
    return line + rng.choice(ENDS)


def imap_input(rng: random.Random, tag: int) -> bytes:
    kind = rng.randrange(10)
    if kind == 0:
        return b"t%d LOGIN bench@bench.test %s\r\n" % (tag, PASSWORD.encode())
    if kind == 1:
        return b"t%d SELECT INBOX\r\n" % tag
    if kind == 2:  # a literal, synchronising or not, of a size that may not match what follows
        size = rng.choice([0, 5, 100, 9000])
        plus = rng.choice([b"", b"+"])
        payload = rng.randbytes(rng.choice([size, max(size - 3, 0), size + 3]))
        return b"t%d APPEND INBOX {%d%s}\r\n" % (tag, size, plus) + payload + b"\r\n"
    if kind == 3:  # over-long lines
        return b"t%d NOOP " % tag + b"y" * rng.choice([8000, 70000]) + b"\r\n"
    if kind == 4:  # a pipelined burst
        return b"".join(imap_input(rng, tag * 10 + i) for i in range(rng.randrange(2, 6)))
    if kind == 5:
        return _junk(rng) + rng.choice(ENDS)
    arguments = b" ".join(rng.choice(IMAP_ARGS) if rng.random() < 0.8 else _junk(rng) for _ in range(rng.randrange(4)))
    return b"t%d %s %s" % (tag, rng.choice(IMAP_NAMES), arguments) + rng.choice(ENDS)


# -- playing sessions --------------------------------------------------------------------------------


async def play(port: int, inputs: list[bytes], *, reset: bool) -> None:
    """One connection: write the inputs (reading whatever comes back meanwhile), then half-close and read
    until the node closes its side, or reset the connection."""
    reader, writer = await asyncio.open_connection(HOST, port)  # OSError when the node stopped listening

    async def drain_replies() -> None:
        while await reader.read(65536):
            pass

    replies = asyncio.create_task(drain_replies())
    try:
        for data in inputs:
            writer.write(data)
            await writer.drain()
        if reset:
            writer.transport.abort()
            return
        if writer.can_write_eof():
            writer.write_eof()
        await asyncio.wait_for(asyncio.shield(replies), READ_TIMEOUT)
    except (OSError, TimeoutError):
        pass  # the node closed first (QUIT, LOGOUT, a refusal), or kept talking to a client that left
    finally:
        replies.cancel()
        with contextlib.suppress(BaseException):
            await replies
        writer.close()


def healthy(node: common.Node) -> str | None:
    """None when the node is alive, greets on both protocols and answers /healthz."""
    if (died := node.died()) is not None:
        return died
    if not common.greets(node.ports["smtp"], b"220 ", b"QUIT\r\n"):
        return "no 220 greeting on SMTP"
    if not common.greets(node.ports["imap"], b"* OK", b"a LOGOUT\r\n"):
        return "no greeting on IMAP"
    try:
        with urllib.request.urlopen(f"http://{HOST}:{node.ports['http']}/healthz", timeout=10) as answer:
            if answer.status != 200:
                return f"/healthz answered {answer.status}"
    except OSError as error:
        return f"/healthz: {error}"
    return None


async def run(node: common.Node, *, total: int, parallel: int, seed: int) -> tuple[int, int, list[str]]:
    """Sessions until `total` inputs were written; (inputs, sessions, problems)."""
    tried = sessions = 0
    problems: list[str] = []
    started = time.monotonic()
    next_report = started + 10

    async def worker() -> None:
        nonlocal tried, sessions, next_report
        while tried < total and not problems:
            rng = random.Random(seed * 1_000_003 + sessions)  # one generator a session: --seed replays them
            protocol = rng.choice(["smtp", "imap"])
            count = rng.randrange(1, 12)
            inputs = [smtp_input(rng) if protocol == "smtp" else imap_input(rng, i) for i in range(count)]
            tried += count
            sessions += 1
            try:
                await play(node.ports[protocol], inputs, reset=rng.random() < 0.2)
            except OSError as error:  # the connection was refused: the node stopped listening
                problems.append(f"session {sessions} ({protocol}): cannot connect: {error}")
            if sessions % HEALTH_EVERY == 0 and (problem := await asyncio.to_thread(healthy, node)) is not None:
                problems.append(f"after {sessions} sessions: {problem}")
            if time.monotonic() >= next_report:
                next_report = time.monotonic() + 10
                rate = tried / (time.monotonic() - started)
                print(f"  {tried:,} inputs, {sessions:,} sessions, {rate:,.0f} inputs/s", file=sys.stderr)

    await asyncio.gather(*(worker() for _ in range(parallel)))
    return tried, sessions, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=common.positive, default=int(common.env_default("FUZZ_INPUTS", "1000000")),
                        help="inputs to try (default 10^6; $FUZZ_INPUTS)")  # fmt: skip
    parser.add_argument("--parallel", type=common.positive, default=8, help="sessions at a time (default 8)")
    parser.add_argument("--seed", type=int, default=None, help="replay the sessions of an earlier run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (the node's log)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    try:
        with common.signals_raise(), common.temporary_workdir("mailfleet-fuzz-", keep=args.keep) as workdir:
            common.print_machine(workdir, "no baseline: the node alone")
            # No growing delay after failed logins: the fuzzer guesses from one address all the time, and the
            # throttle (tested in make test) would make it wait instead of trying inputs.
            smtp = {"max_message_size": 64 * 1024, "auth_failure_delay": 0, "auth_failure_delay_max": 0}
            settings = {"imap": {"allow_plaintext_login": True}, "smtp": smtp}
            node = common.start_node(workdir / "node", listeners=("smtp", "imap", "http"), password=PASSWORD,
                                     settings=settings)  # fmt: skip
            try:
                node.wait_ready()
                started = time.monotonic()
                tried, sessions, problems = asyncio.run(run(node, total=args.inputs, parallel=args.parallel, seed=seed))
                elapsed = time.monotonic() - started
                if (problem := healthy(node)) is not None:
                    problems.append(f"at the end: {problem}")
                problems += node.problems()
            finally:
                common.stop_process(node.proc)
    except KeyboardInterrupt as interrupt:
        return common.interrupted(interrupt)
    except BenchError as error:
        return common.outcome([str(error)])
    rate = tried / elapsed
    print(f"fuzz (seed {seed}): {tried:,} inputs in {sessions:,} SMTP and IMAP sessions, {elapsed:.0f} s "
          f"({rate:,.0f} inputs/s); crashes: {len(problems)} (goal: at least 1,000,000 inputs, 0 crashes)")  # fmt: skip
    return common.outcome(problems)


if __name__ == "__main__":
    sys.exit(main())
