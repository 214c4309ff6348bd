"""The outbound benchmark: messages/s from submission until a remote server (Postfix's smtp-sink) took them,
the node's submission listener and Deliverer against a private Postfix relaying to the same kind of sink.

Both servers get the same load from this module's client (smtplib in threads): `--sessions` parallel
sessions, each with STARTTLS (a self-signed certificate made with the openssl program) and several
messages of `--size` bytes, together `--messages`, from sender@bench.test to rcpt@sink.test. The node's
sessions log in (AUTH PLAIN, once per session) on its submission port; Postfix's smtpd lets 127.0.0.1
relay without AUTH (mynetworks) on the same kind of STARTTLS session. The node routes sink.test to the
sink with `smtp.transports` and runs its queue every 0.2 s (`smtp.delivery_interval`); Postfix relays
everything there (`relayhost`). Each server gets a sink of its own, started fresh, whose message counter
(smtp-sink -c) is polled: the time runs from the first submission until the sink counted every message.
Both servers answer 250 to a submission once the message is durably queued; the time until the last 250
is reported too. Everything lives in one temporary directory, removed at the end; every process started
here is stopped, also on error or interrupt. The Postfix side needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import secrets
import signal
import smtplib
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import common, smtp
from bench.common import DOMAIN, HOST, START_TIMEOUT, BenchError

SINK_DOMAIN = "sink.test"
SINK_RECIPIENT = f"rcpt@{SINK_DOMAIN}"
SENDER = f"sender@{DOMAIN}"  # the node's one mailbox, which logs in to submit
DELIVERY_INTERVAL = 0.2  # the node's smtp.delivery_interval: seconds between queue runs
STALL_TIMEOUT = 60.0  # seconds without a new message at the sink before waiting for it gives up
SESSION_TIMEOUT = 60.0  # seconds for one SMTP command of the client
POLL = 0.02  # seconds between looks at the sink's counter


@dataclasses.dataclass(frozen=True)
class Load:
    messages: int
    sessions: int
    size: int  # body bytes per message, headers not included


@dataclasses.dataclass(frozen=True)
class Result:
    server: str
    messages: int  # sent by the client
    relayed: int  # messages the sink counted at the end
    submitted_seconds: float | None  # first submission until every session had its last 250
    relayed_seconds: float | None  # first submission until the sink had counted every message
    problems: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------------
# The certificate


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (both servers use it; the client trusts only it)."""
    directory.mkdir()
    cert, key = directory / "cert.pem", directory / "key.pem"
    argv = [
        common.tool("openssl", "openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
        "-addext", f"subjectAltName=IP:{HOST},DNS:localhost",
    ]  # fmt: skip
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)
    except subprocess.TimeoutExpired as error:
        raise BenchError("openssl req: no answer after 60 s") from error
    if done.returncode != 0:
        raise BenchError(f"openssl req failed (exit {done.returncode}): {done.stderr.decode(errors='replace')}")
    return cert, key


# ---------------------------------------------------------------------------------------------------
# The sink


SINK_COUNTER = re.compile(rb"mesg=(\d+)\r")


@dataclasses.dataclass(frozen=True)
class Sink:
    """A running smtp-sink (in a session of its own) whose counters (-c) go to `counters`."""

    proc: subprocess.Popen[bytes]
    port: int
    counters: Path

    def count(self) -> int:
        """Messages the sink received ("." with a 250); -c rewrites "sess=S quit=Q mesg=M\\r" as they change."""
        try:
            with self.counters.open("rb") as stream:
                stream.seek(max(0, stream.seek(0, os.SEEK_END) - 256))
                found = SINK_COUNTER.findall(stream.read())
        except OSError:
            return 0
        return int(found[-1]) if found else 0

    def died(self) -> str | None:
        if self.proc.poll() is None:
            return None
        return f"smtp-sink exited with code {self.proc.returncode}:\n{common.tail(self.counters.with_suffix('.err'))}"


def start_sink(workdir: Path, name: str) -> Sink:
    """smtp-sink on a free port of 127.0.0.1, counting; the caller stops it (stop_process(sink.proc))."""
    (port,) = common.free_ports(1)
    counters = workdir / f"{name}.out"
    argv = [smtp.tool("smtp-sink"), "-c", f"{HOST}:{port}", "256"]
    if os.geteuid() == 0:
        argv[1:1] = ["-u", "postfix"]  # it refuses to run as root
    with counters.open("wb") as out, counters.with_suffix(".err").open("wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
    sink = Sink(proc, port, counters)
    try:
        common.wait_for("smtp-sink", lambda: smtp.smtp_banner(port), timeout=START_TIMEOUT, alive=sink.died)
    except BaseException:
        common.stop_process(proc)
        raise
    if sink.count() != 0:  # the banner check is a session without a message
        common.stop_process(proc)
        raise BenchError(f"smtp-sink counted {sink.count()} messages before any was sent")
    return sink


# ---------------------------------------------------------------------------------------------------
# The load


def message(number: int, size: int) -> bytes:
    """A message of `size` body bytes in lines of 78 characters."""
    headers = (
        f"From: Sender <{SENDER}>\r\nTo: <{SINK_RECIPIENT}>\r\nSubject: outbound bench {number}\r\n"
        f"Message-ID: <bench-{number}@{DOMAIN}>\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - 2)] + b"\r\n"
    return headers + body


class Submitter:
    """The client: `load.sessions` threads, each one SMTP session (EHLO, STARTTLS, EHLO, AUTH when a
    password is given) that sends its share of the messages, one recipient each."""

    def __init__(self, port: int, load: Load, context: ssl.SSLContext, password: str | None) -> None:
        self.port, self.load, self.context, self.password = port, load, context, password
        self.errors: list[str] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        shares = [load.messages // load.sessions + (i < load.messages % load.sessions) for i in range(load.sessions)]
        firsts = [sum(shares[:i]) for i in range(load.sessions)]
        self._threads = [
            threading.Thread(target=self._session, args=(first, share), name=f"bench-session-{i}", daemon=True)
            for i, (first, share) in enumerate(zip(firsts, shares, strict=True))
            if share
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def done(self) -> bool:
        return not any(thread.is_alive() for thread in self._threads)

    def _session(self, first: int, count: int) -> None:
        try:
            with smtplib.SMTP(HOST, self.port, timeout=SESSION_TIMEOUT) as client:
                client.starttls(context=self.context)
                if self.password is not None:
                    client.login(SENDER, self.password)
                for number in range(first, first + count):
                    if self.stop.is_set():
                        return
                    refused = client.sendmail(SENDER, [SINK_RECIPIENT], message(number, self.load.size))
                    if refused:
                        raise BenchError(f"refused: {refused}")
        except (OSError, smtplib.SMTPException, BenchError) as error:
            with self._lock:
                self.errors.append(f"{type(error).__name__}: {error}")
            self.stop.set()


def run_load(
    server: str, port: int, load: Load, sink: Sink, *, context: ssl.SSLContext, password: str | None,
    timeout: float, progress: bool,
) -> Result:  # fmt: skip
    """Submit the load and poll the sink until it counted every message, the client failed, the sink
    stalled for STALL_TIMEOUT or `timeout` passed."""
    submitter = Submitter(port, load, context, password)
    started = time.monotonic()
    submitter.start()
    submitted: float | None = None
    relayed: float | None = None
    count = last = 0
    last_change = started
    problems: list[str] = []
    shown = 0.0
    try:
        while True:
            now = time.monotonic()
            count = sink.count()
            if submitted is None and submitter.done() and not submitter.errors:
                submitted = now - started
            if count >= load.messages:
                relayed = now - started
                break
            if count != last:
                last, last_change = count, now
            if submitter.errors:
                break
            if submitted is not None and now - last_change > STALL_TIMEOUT:
                problems.append(f"{server}: the sink counted no new message for {STALL_TIMEOUT:.0f} s")
                break
            if now - started > timeout:
                problems.append(f"{server}: not done after {timeout} s")
                break
            if (why := sink.died()) is not None:
                problems.append(why)
                break
            if progress and now - shown > 0.5:
                print(f"\r  {server}: sink counted {count} of {load.messages}", end="", flush=True)
                shown = now
            time.sleep(POLL)
    finally:
        submitter.stop.set()
        if progress:
            print(f"\r  {server}: sink counted {count} of {load.messages}", flush=True)
    if submitter.errors:
        shown_errors = "\n".join(f"    {error}" for error in submitter.errors[:5])
        problems.append(f"{server}: {len(submitter.errors)} client sessions failed, the first ones:\n{shown_errors}")
    if count > load.messages:
        problems.append(f"{server}: the sink counted {count} messages, {load.messages} were sent")
    if relayed is None and not problems:
        problems.append(f"{server}: the sink counted {count} of {load.messages} messages")
    return Result(server, load.messages, count, submitted, relayed, tuple(problems))


def client_context(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


# ---------------------------------------------------------------------------------------------------
# The mail node


def bench_node(workdir: Path, load: Load, tls: tuple[Path, Path], *, timeout: float, progress: bool) -> Result:
    sink = start_sink(workdir.parent, "mailnode-sink")
    try:
        password = secrets.token_urlsafe(16)
        settings = {
            "tls": {"cert_file": str(tls[0]), "key_file": str(tls[1])},
            "smtp": {"transports": {SINK_DOMAIN: f"{HOST}:{sink.port}"}, "delivery_interval": DELIVERY_INTERVAL},
        }
        node = common.start_node(
            workdir, listeners=("smtp", "submission", "submissions", "imap", "imaps", "http"),
            password=password,
            settings=settings, address=SENDER,
        )  # fmt: skip
        try:
            node.wait_ready()
            port = node.ports["submission"]
            print(f"mailnode ready on {HOST}:{port} (submission), sink on {HOST}:{sink.port}; sending", flush=True)
            result = run_load(
                "mailnode", port, load, sink, context=client_context(tls[0]), password=password,
                timeout=timeout, progress=progress,
            )  # fmt: skip
            return dataclasses.replace(result, problems=result.problems + tuple(node.problems()))
        finally:
            common.stop_process(node.proc)
    finally:
        common.stop_process(sink.proc)


# ---------------------------------------------------------------------------------------------------
# Postfix


def postconf(config_dir: Path, *settings: str) -> None:
    argv = [smtp.tool("postconf"), "-c", str(config_dir), "-e", *settings]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)
    except subprocess.TimeoutExpired as error:
        raise BenchError(f"{' '.join(argv)}: no answer after 60 s") from error
    if done.returncode != 0:
        output = (done.stdout + done.stderr).decode(errors="replace").strip()
        raise BenchError(f"{' '.join(argv)} failed (exit {done.returncode}) {output}")


def bench_postfix(workdir: Path, load: Load, tls: tuple[Path, Path], *, timeout: float, progress: bool) -> Result:
    workdir.mkdir()
    # bench.smtp's private instance (its Maildir domain stays, unused), relaying everything to the sink.
    config_dir, port, _ = smtp.postfix_setup(workdir)
    maillog = workdir / "maillog"
    sink = start_sink(workdir.parent, "postfix-sink")
    proc: subprocess.Popen[bytes] | None = None
    master: int | None = None
    try:
        postconf(
            config_dir, f"relayhost = [{HOST}]:{sink.port}", "default_transport = smtp",
            f"smtpd_tls_cert_file = {tls[0]}", f"smtpd_tls_key_file = {tls[1]}", "smtpd_tls_security_level = may",
        )  # fmt: skip
        with (config_dir / "master.cf").open("a", encoding="utf-8") as master_cf:
            master_cf.write("tlsmgr     unix  - - n 1000? 1 tlsmgr\n")  # smtpd's TLS session cache and entropy
        smtp.postfix_command(config_dir, "check", maillog=maillog)
        with (workdir / "master.out").open("wb") as out:
            proc = subprocess.Popen(
                [smtp.tool("postfix"), "-c", str(config_dir), "start-fg"], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        running = proc

        def died() -> str | None:
            if running.poll() is None:
                return None
            return f"postfix exited with code {running.returncode}; {maillog} ends with:\n{common.tail(maillog)}"

        common.wait_for("postfix", lambda: smtp.smtp_banner(port), timeout=START_TIMEOUT, alive=died)
        master = smtp.master_pid(workdir / "queue")
        print(f"postfix ready on {HOST}:{port}, sink on {HOST}:{sink.port}; sending", flush=True)
        result = run_load(
            "postfix", port, load, sink, context=client_context(tls[0]), password=None, timeout=timeout,
            progress=progress,
        )  # fmt: skip
        problems = list(result.problems)
        if (why := died()) is not None:
            problems.append(why)
        if problems:
            problems.append(f"postfix: {maillog} ends with:\n{common.tail(maillog)}")
        return dataclasses.replace(result, problems=tuple(problems))
    finally:
        with contextlib.suppress(BenchError):
            smtp.postfix_command(config_dir, "stop", maillog=maillog)
        if proc is not None:
            common.stop_process(proc)
        master = master or smtp.master_pid(workdir / "queue")
        if master is not None:
            # The master runs in a session of its own (setsid); its daemons share its process group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(master, signal.SIGKILL)
        common.stop_process(sink.proc)


# ---------------------------------------------------------------------------------------------------
# The report


def report(results: list[Result]) -> None:
    print()
    print(f"{'server':<18} {'messages':>8} {'seconds':>8} {'msgs/s':>8}")
    for result in results:
        rows = (
            (f"{result.server} relayed", result.relayed, result.relayed_seconds, "all counted by the sink"),
            (f"{result.server} submitted", result.messages, result.submitted_seconds, "every 250 to the client"),
        )
        for name, count, seconds, note in rows:
            shown = f"{seconds:.2f}" if seconds is not None else "-"
            print(f"{name:<18} {count:>8} {shown:>8} {smtp.rate(count, seconds):>8}   {note}")
    by_server = {result.server: result for result in results}
    node, postfix = by_server.get("mailnode"), by_server.get("postfix")
    if node is None or postfix is None or node.problems or postfix.problems:
        return
    if node.relayed_seconds and postfix.relayed_seconds:
        ratio = postfix.relayed_seconds / node.relayed_seconds  # the same message count
        print(f"ratio mailnode/postfix: {ratio:.2f}  (msgs/s, submission until the sink counted every message)")
    if node.submitted_seconds and postfix.submitted_seconds:
        print(f"ratio mailnode/postfix submitted only: {postfix.submitted_seconds / node.submitted_seconds:.2f}")


# ---------------------------------------------------------------------------------------------------
# The command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.outbound",
        description="Submission to acceptance by a local smtp-sink: the mail node against a private Postfix relay.",
        epilog="Defaults come from BENCH_OUTBOUND_MESSAGES, BENCH_SESSIONS, BENCH_SIZE and BENCH_TIMEOUT when set.",
    )
    parser.add_argument(
        "--messages", type=common.positive, default=common.env_default("BENCH_OUTBOUND_MESSAGES", "2000"),
        help="default: 2000",
    )  # fmt: skip
    common.add_load_arguments(
        parser, sessions_help="parallel submission sessions (20)", size_help="body per message (4KiB)"
    )
    common.add_only_keep(parser, "postfix")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load = Load(messages=args.messages, sessions=args.sessions, size=args.size)
    progress = sys.stdout.isatty()
    print(
        f"outbound: {load.sessions} sessions (STARTTLS; AUTH on the node), {load.messages} messages, "
        f"{load.size} bytes each, {SENDER} to {SINK_RECIPIENT}, relayed to smtp-sink; "
        f"node smtp.delivery_interval {DELIVERY_INTERVAL} s"
    )
    results: list[Result] = []
    with common.temporary_workdir("mailfleet-bench-outbound-", keep=args.keep) as workdir:
        common.print_machine(workdir, f"Postfix {smtp.postfix_version()}")
        try:
            with common.signals_raise():
                if args.only in (None, "postfix"):
                    common.require_root("Postfix")  # before the node's run, not after it
                tls = make_certificate(workdir / "tls")
                if args.only in (None, "mailnode"):
                    results.append(bench_node(workdir / "mailnode", load, tls, timeout=args.timeout, progress=progress))
                if args.only in (None, "postfix"):
                    results.append(
                        bench_postfix(workdir / "postfix", load, tls, timeout=args.timeout, progress=progress)
                    )
        except BenchError as error:
            failure: str | None = str(error)
        except KeyboardInterrupt as interrupt:
            return common.interrupted(interrupt)
        else:
            failure = None
    report(results)
    problems = [problem for result in results for problem in result.problems]
    if failure is not None:
        problems.append(failure)
    return common.outcome(problems)


if __name__ == "__main__":
    sys.exit(main())
