"""The helpers the mail node's benchmarks (bench.smtp, bench.imap, bench.outbound) use: one place for each.

This module owns the mailbox both benchmarks deliver to (DOMAIN, LOCAL_PART, RECIPIENT, SENDER on HOST),
the shared timeouts, BenchError, and the plumbing around the servers: free ports, finding a Debian
program, starting the mail node with its config and collecting its problems, waiting for a server,
stopping processes, signal handling, the temporary directory, the machine line of the report, the
command-line helpers (defaults from the environment, positive numbers, --only and --keep) and the final
`bench: FAILED:` lines and exit code. What only one benchmark does stays in its own module.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from mailnode import passwords
from mailnode.config import parse_size

DOMAIN = "bench.test"
LOCAL_PART = "bench"
RECIPIENT = f"{LOCAL_PART}@{DOMAIN}"
SENDER = "sender@example.org"
HOST = "127.0.0.1"

START_TIMEOUT = 30.0  # seconds for a server to come up
STOP_TIMEOUT = 15.0  # seconds for a server to go down before it is killed


class BenchError(Exception):
    """A step that could not be done; the message says which and why."""


# ---------------------------------------------------------------------------------------------------
# Ports, programs, files, processes


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (all held open together, so none repeats)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]


def tool(name: str, package: str) -> str:
    """The path of a server's program; Debian puts them in /usr/sbin, which a user's PATH may lack."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
    if found is None:
        raise BenchError(f"{name} not found: install Debian's {package} package (scripts/bootstrap --bench)")
    return found


def require_root(baseline: str) -> None:
    if os.geteuid() != 0:
        raise BenchError(
            f"the {baseline} baseline needs root (its master runs as root): run as root, or --only mailnode"
        )


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"({path} cannot be read)"
    return "\n".join(f"    {line}" for line in text.splitlines()[-lines:]) or f"    ({path} is empty)"


def log_lines(path: Path) -> list[str]:
    """A log file's lines; none if it cannot be read."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []


def stop_process(proc: subprocess.Popen[bytes], *, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, then SIGKILL to its process group (each child here runs in a session of its own)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)


def wait_for(what: str, ready: Callable[[], bool], *, timeout: float, alive: Callable[[], str | None]) -> None:
    """Poll `ready` until it is true; `alive` returns why the server died, if it did."""
    deadline = time.monotonic() + timeout
    while True:
        if (died := alive()) is not None:
            raise BenchError(f"{what}: {died}")
        if ready():
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(0.1)


def greets(port: int, greeting: bytes, goodbye: bytes) -> bool:
    """Whether the server on 127.0.0.1:port greets with `greeting` (it is sent `goodbye` then)."""
    try:
        with socket.create_connection((HOST, port), timeout=2) as sock:
            received = sock.recv(512)
            sock.sendall(goodbye)
            return received.startswith(greeting)
    except OSError:
        return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def run_problems(server: str, died: Callable[[], str | None], errors: list[str]) -> list[str]:
    """What to report after a server's run: that it died, and the first of the errors it logged."""
    problems: list[str] = []
    if (why := died()) is not None:
        problems.append(why)
    if errors:
        shown = "\n".join(f"    {line}" for line in errors[:5])
        problems.append(f"{server} logged {len(errors)} errors during the run, the first ones:\n{shown}")
    return problems


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP end the run like Ctrl-C does, so every `finally` still stops its server."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------------------------------------
# The mail node


def errors_logged(log_file: Path) -> list[str]:
    """Log lines of level error or worse (the node logs one JSON object per line)."""
    return [line for line in log_lines(log_file) if '"level": "error"' in line or '"level": "critical"' in line]


@dataclasses.dataclass(frozen=True)
class Node:
    """A running mail node: its process (in a session of its own), log file and listener ports."""

    proc: subprocess.Popen[bytes]
    log_file: Path
    ports: dict[str, int]

    def died(self) -> str | None:
        if self.proc.poll() is None:
            return None
        return f"mailnode exited with code {self.proc.returncode}; its log ends with:\n{tail(self.log_file)}"

    def wait_ready(self) -> None:
        ready = f"http://{HOST}:{self.ports['http']}/readyz"
        wait_for("mailnode", lambda: http_ok(ready), timeout=START_TIMEOUT, alive=self.died)

    def problems(self) -> list[str]:
        return run_problems("mailnode", self.died, errors_logged(self.log_file))


def node_files(
    workdir: Path,
    *,
    listeners: tuple[str, ...],
    password: str,
    settings: dict[str, Any] | None = None,
    addresses: Sequence[str] = (RECIPIENT,),
) -> tuple[Path, dict[str, int]]:
    """Make workdir with a node config (`listeners` on free ports, `settings` added) and a directory with
    the mailboxes `addresses`, all of `password` and without quota; returns the config's path and the
    ports."""
    workdir.mkdir()
    ports = dict(zip(listeners, free_ports(len(listeners)), strict=True))
    config = {
        "node_name": "bench-0",
        "hostname": DOMAIN,
        "domains": [{"domain": DOMAIN}],
        "data_dir": "data",
        "directory_file": "directory.yaml",
        "listen": {"host": HOST, **ports},  # no tls: submission and imaps stay off, imap offers no STARTTLS
        **(settings or {}),
        "log_level": "info",
    }
    hashed = passwords.hash_password(password)
    mailboxes = [{"address": address, "password_hash": hashed, "quota": 0} for address in addresses]  # no limit
    (workdir / "directory.yaml").write_text(yaml.safe_dump({"mailboxes": mailboxes}), encoding="utf-8")
    path = workdir / "node.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path, ports


def launch_node(
    workdir: Path, config: Path, ports: dict[str, int], *, preexec_fn: Callable[[], None] | None = None
) -> Node:
    """Start `mailnode serve` on the config node_files wrote; the caller stops it (stop_process(node.proc))."""
    log_file = workdir / "node.log"
    argv = [sys.executable, "-m", "mailnode", "serve", "--config", str(config)]
    with log_file.open("wb") as log:
        proc = subprocess.Popen(
            argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=preexec_fn,
        )  # fmt: skip
    return Node(proc, log_file, ports)


def start_node(
    workdir: Path,
    *,
    listeners: tuple[str, ...],
    password: str,
    settings: dict[str, Any] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    address: str = RECIPIENT,
) -> Node:
    """node_files with one mailbox (`address`, RECIPIENT unless told), then launch_node."""
    config, ports = node_files(workdir, listeners=listeners, password=password, settings=settings, addresses=[address])
    return launch_node(workdir, config, ports, preexec_fn=preexec_fn)


# ---------------------------------------------------------------------------------------------------
# The command: arguments, temporary directory, machine line, outcome


def env_default(name: str, default: str) -> str:
    return os.environ.get(name, default)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def non_negative(text: str) -> int:
    """A count where 0 means "none" (skip that part of the run)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def add_only_keep(parser: argparse.ArgumentParser, baseline: str) -> None:
    """The options both benchmarks end with: --only SERVER and --keep."""
    parser.add_argument("--only", choices=("mailnode", baseline), help="benchmark one server only")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, mail)")


@contextlib.contextmanager
def temporary_workdir(prefix: str, *, keep: bool) -> Iterator[Path]:
    """A temporary directory for everything a run writes, removed at the end unless `keep`."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    workdir.chmod(0o755)  # the baseline's unprivileged processes walk through it
    try:
        yield workdir
    finally:
        if keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _output(argv: list[str], *, timeout: float) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, timeout=timeout, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.decode()


def program_version(name: str, package: str, *args: str) -> str:
    """The first word `name args` prints (its version), or "unknown"."""
    try:
        argv = [tool(name, package), *args]
    except BenchError:
        return "unknown"
    output = _output(argv, timeout=10)
    return output.split()[0] if output and output.strip() else "unknown"


def print_machine(workdir: Path, baseline: str) -> None:
    """The machine line: system, CPUs, Python, the file system of workdir and the baseline's version."""
    cpus = len(os.sched_getaffinity(0))
    machine = f"{platform.system()} {platform.release()}, {cpus} CPUs (nproc), Python {platform.python_version()}"
    output = _output(["stat", "-f", "-c", "%T", str(workdir)], timeout=5)
    filesystem = "unknown" if output is None else output.strip()
    print(f"machine: {machine}; {workdir} on {filesystem}; {baseline}")


def interrupted(interrupt: KeyboardInterrupt) -> int:
    print(f"bench: interrupted {interrupt}", file=sys.stderr)
    return 130


def outcome(problems: list[str]) -> int:
    """Print each problem as a failure; the exit code."""
    for problem in problems:
        print(f"bench: FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


def size(text: str) -> int:
    """An argparse type: a size such as 4096 or 4KiB, at least one byte."""
    try:
        value = parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    if value < 1:
        raise argparse.ArgumentTypeError("the size must be at least 1 byte")
    return value


def add_load_arguments(parser: argparse.ArgumentParser, *, sessions_help: str, size_help: str) -> None:
    """--sessions, --size and --timeout, with their BENCH_* environment defaults (the SMTP benchmarks)."""
    parser.add_argument("--sessions", type=positive, default=env_default("BENCH_SESSIONS", "20"), help=sessions_help)
    parser.add_argument("--size", type=size, default=env_default("BENCH_SIZE", "4KiB"), help=size_help)
    parser.add_argument(
        "--timeout", type=positive, default=env_default("BENCH_TIMEOUT", "600"),
        help="seconds each server may take for the whole load (600)",
    )  # fmt: skip
