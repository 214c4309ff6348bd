"""The SMTP benchmark `make bench` runs: the node's MX listener against a private Postfix on this machine.

Both servers get the same load from smtp-source (Postfix's load generator, Debian package postfix):
`--sessions` parallel sessions sending `--messages` messages of `--size` bytes, one recipient each, over
127.0.0.1. The node answers 250 only once the message file and its index are durable, so its accepted
time is its delivered time. Postfix answers 250 once its queue file is fsynced and delivers into a
Maildir afterwards, so both of its times are reported and the ratio uses the delivered one: the same
durability, a message in the mailbox. Everything lives in one temporary directory, removed at the end;
every process started here is stopped, also on error or interrupt. The Postfix side needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pwd
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench import common
from bench.common import DOMAIN, HOST, LOCAL_PART, RECIPIENT, SENDER, START_TIMEOUT, BenchError

POSTFIX = "postfix"  # the Debian package with Postfix's programs
STALL_TIMEOUT = 60.0  # seconds without a new Maildir file before waiting for deliveries gives up
LATE_GRACE = 5.0  # seconds to look for node messages that were acknowledged but are not on disk yet


@dataclasses.dataclass(frozen=True)
class Load:
    messages: int
    sessions: int
    size: int  # payload bytes per message, headers not included (smtp-source -l)


@dataclasses.dataclass(frozen=True)
class Result:
    server: str
    stored: int  # message files found in the Maildir at the end
    accepted_seconds: float  # smtp-source start until it finished (every message acknowledged)
    delivered_seconds: float | None  # smtp-source start until every message was in the Maildir
    problems: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------------
# Helpers


def tool(name: str) -> str:
    """The path of a Postfix program."""
    return common.tool(name, POSTFIX)


def count_files(*directories: Path) -> int:
    total = 0
    for directory in directories:
        with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
            total += sum(1 for entry in entries if entry.is_file(follow_symlinks=False))
    return total


# ---------------------------------------------------------------------------------------------------
# The load


def send(server: str, port: int, load: Load, *, timeout: float, progress: bool, recipient: str = RECIPIENT) -> float:
    """Run smtp-source against 127.0.0.1:port (to `recipient`); seconds from its start until it finished.

    smtp-source greets with HELO (plain SMTP: no ESMTP, no pipelining; it has no option for either) and
    opens one connection per message (no -d), as Postfix's own benchmarks use it. It exits non-zero when
    a reply is not the expected 2xx/3xx.
    """
    argv = [tool("smtp-source"), "-s", str(load.sessions), "-m", str(load.messages), "-l", str(load.size)]
    argv += ["-f", SENDER, "-t", recipient, f"{HOST}:{port}"]
    if progress:
        argv.insert(1, "-c")
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=None if progress else subprocess.DEVNULL,
        stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except BaseException:
        common.stop_process(proc, timeout=1)
        raise
    finally:
        if progress:
            print(flush=True)  # smtp-source -c ends without a newline
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        message = stderr.decode(errors="replace").strip() or "(no message)"
        raise BenchError(f"smtp-source against {server} failed (exit {proc.returncode}): {message}")
    return elapsed


# ---------------------------------------------------------------------------------------------------
# The mail node


def bench_node(workdir: Path, load: Load, *, timeout: float, progress: bool) -> Result:
    node = common.start_node(
        workdir, listeners=("smtp", "submission", "submissions", "http"), password=secrets.token_urlsafe(16)
    )
    ports = node.ports
    try:
        node.wait_ready()
        print(f"mailnode ready on {HOST}:{ports['smtp']}; sending", flush=True)
        seconds = send("mailnode", ports["smtp"], load, timeout=timeout, progress=progress)
        inbox = workdir / "data" / "mail" / DOMAIN / LOCAL_PART / "INBOX"
        stored = count_files(inbox / "new", inbox / "cur")
        problems: list[str] = []
        if stored != load.messages:
            # Every 250 should already be on disk; look a little longer to tell late from lost.
            time.sleep(LATE_GRACE)
            later = count_files(inbox / "new", inbox / "cur")
            problems.append(
                f"mailnode acknowledged {load.messages} messages but {stored} were in {inbox} when "
                f"smtp-source finished ({later} after {LATE_GRACE:.0f} s more)"
            )
            stored = later
        problems += node.problems()
        return Result("mailnode", stored, seconds, seconds, tuple(problems))
    finally:
        common.stop_process(node.proc)


# ---------------------------------------------------------------------------------------------------
# Postfix


MAIN_CF = """\
# A private Postfix for the benchmark: it shares only the programs with the system's /etc/postfix.
# Durability is Postfix's default: the queue file is fsynced before 250, the Maildir file before delivery.
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
maillog_file = {maillog}
maillog_file_prefixes = {workdir}
mail_owner = {mail_owner}
setgid_group = postdrop
myhostname = postfix.{domain}
mydomain = {domain}
myorigin = $myhostname
inet_interfaces = {host}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
relayhost =
alias_maps =
alias_database =
local_recipient_maps =
biff = no
# No DNS and no checks a sandbox cannot answer or that the node does not do either.
smtp_host_lookup = native
lmtp_host_lookup = native
smtpd_peername_lookup = no
smtpd_client_restrictions =
smtpd_helo_required = no
default_process_limit = 100
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {vmail}
virtual_mailbox_maps = inline:{{ {recipient}={domain}/{local_part}/ }}
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
"""

# Debian's master.cf without chroot (the private queue has no chroot tree) and without the pipe services.
MASTER_CF = """\
{host}:{port} inet n - n - - smtpd
pickup     unix  n - n 60    1 pickup
cleanup    unix  n - n -     0 cleanup
qmgr       unix  n - n 300   1 qmgr
rewrite    unix  - - n -     - trivial-rewrite
bounce     unix  - - n -     0 bounce
defer      unix  - - n -     0 bounce
trace      unix  - - n -     0 bounce
verify     unix  - - n -     1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -     - proxymap
proxywrite unix  - - n -     1 proxymap
smtp       unix  - - n -     - smtp
relay      unix  - - n -     - smtp
showq      unix  n - n -     - showq
error      unix  - - n -     - error
retry      unix  - - n -     - error
discard    unix  - - n -     - discard
local      unix  - n n -     - local
virtual    unix  - n n -     - virtual
lmtp       unix  - - n -     - lmtp
anvil      unix  - - n -     1 anvil
scache     unix  - - n -     1 scache
postlog    unix-dgram n - n - 1 postlogd
"""


def smtp_banner(port: int) -> bool:
    return common.greets(port, b"220", b"QUIT\r\n")


def postfix_command(config_dir: Path, *args: str, maillog: Path) -> None:
    """`postfix -c DIR ARGS`; Postfix logs into the maillog file only, so a failure shows its end."""
    argv = [tool("postfix"), "-c", str(config_dir), *args]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)
    except subprocess.TimeoutExpired as error:
        raise BenchError(f"{' '.join(argv)}: no answer after 60 s") from error
    if done.returncode != 0:
        output = (done.stdout + done.stderr).decode(errors="replace").strip()
        raise BenchError(
            f"{' '.join(argv)} failed (exit {done.returncode}) {output}\n  {maillog} ends with:\n{common.tail(maillog)}"
        )


def postfix_setup(workdir: Path) -> tuple[Path, int, Path]:
    """Write the private instance's config and directories; returns the config dir, port and Maildir."""
    common.require_root("Postfix")
    try:
        owner = pwd.getpwnam("postfix")
    except KeyError as error:
        raise BenchError("no postfix user: install Debian's postfix package (scripts/bootstrap --bench)") from error
    try:
        vmail_user = pwd.getpwnam("nobody")
    except KeyError:
        vmail_user = owner
    (port,) = common.free_ports(1)
    config_dir, queue, data, vmail = (workdir / name for name in ("conf", "queue", "data", "vmail"))
    for directory in (config_dir, queue, data, vmail):
        directory.mkdir(parents=True)
    os.chown(data, owner.pw_uid, owner.pw_gid)
    os.chown(vmail, vmail_user.pw_uid, vmail_user.pw_gid)  # virtual(8) makes the Maildir as this user
    values = {
        "queue": queue, "data": data, "maillog": workdir / "maillog", "workdir": workdir, "vmail": vmail,
        "mail_owner": owner.pw_name, "uid": vmail_user.pw_uid, "gid": vmail_user.pw_gid, "host": HOST,
        "port": port, "domain": DOMAIN, "local_part": LOCAL_PART, "recipient": RECIPIENT,
    }  # fmt: skip
    (config_dir / "main.cf").write_text(MAIN_CF.format(**values), encoding="utf-8")
    (config_dir / "master.cf").write_text(MASTER_CF.format(**values), encoding="utf-8")
    return config_dir, port, vmail / DOMAIN / LOCAL_PART


def master_pid(queue: Path) -> int | None:
    try:
        return int((queue / "pid" / "master.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def bench_postfix(workdir: Path, load: Load, *, timeout: float, progress: bool) -> Result:
    workdir.mkdir()
    config_dir, port, maildir = postfix_setup(workdir)
    maillog = workdir / "maillog"
    # `check` creates the queue directories with the owners Postfix wants.
    postfix_command(config_dir, "check", maillog=maillog)
    with (workdir / "master.out").open("wb") as out:
        proc = subprocess.Popen(
            [tool("postfix"), "-c", str(config_dir), "start-fg"], stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    master: int | None = None

    def died() -> str | None:
        if proc.poll() is None:
            return None
        return f"postfix exited with code {proc.returncode}; {maillog} ends with:\n{common.tail(maillog)}"

    try:
        common.wait_for("postfix", lambda: smtp_banner(port), timeout=START_TIMEOUT, alive=died)
        master = master_pid(workdir / "queue")
        print(f"postfix ready on {HOST}:{port}; sending", flush=True)
        started = time.monotonic()
        accepted = send("postfix", port, load, timeout=timeout, progress=progress)
        # Postfix has acknowledged every message; now wait for the deliveries into the Maildir.
        delivered: float | None = None
        stored = last = count_files(maildir / "new", maildir / "cur")
        last_change = time.monotonic()
        deadline = started + timeout
        while True:
            stored = count_files(maildir / "new", maildir / "cur")
            now = time.monotonic()
            if stored >= load.messages:
                delivered = now - started
                break
            if stored != last:
                last, last_change = stored, now
            if now - last_change > STALL_TIMEOUT or now > deadline or died() is not None:
                break
            time.sleep(0.02)
        problems: list[str] = []
        if stored != load.messages:
            problems.append(
                f"postfix: {stored} of {load.messages} messages in {maildir}; "
                f"{maillog} ends with:\n{common.tail(maillog)}"
            )
        return Result("postfix", stored, accepted, delivered, tuple(problems))
    finally:
        with contextlib.suppress(BenchError):
            postfix_command(config_dir, "stop", maillog=maillog)
        common.stop_process(proc)
        master = master or master_pid(workdir / "queue")
        if master is not None:
            # The master runs in a session of its own (setsid); its daemons share its process group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(master, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------
# The report


def postfix_version() -> str:
    return common.program_version("postconf", POSTFIX, "-d", "-h", "mail_version")


def rate(messages: int, seconds: float | None) -> str:
    return f"{messages / seconds:.1f}" if seconds else "-"


def report(results: list[Result], load: Load) -> None:
    rows: list[tuple[str, int, float | None, str]] = []
    for result in results:
        if result.server == "mailnode":
            rows.append(("mailnode", result.stored, result.accepted_seconds, "250 = in the Maildir, fsynced"))
        else:
            rows.append(("postfix accepted", load.messages, result.accepted_seconds, "250 = queue file fsynced"))
            rows.append(("postfix delivered", result.stored, result.delivered_seconds, "all in the Maildir"))
    print()
    print(f"{'server':<18} {'messages':>8} {'seconds':>8} {'msgs/s':>8}")
    for name, count, seconds, note in rows:
        shown = f"{seconds:.2f}" if seconds is not None else "-"
        print(f"{name:<18} {count:>8} {shown:>8} {rate(count, seconds):>8}   {note}")
    by_server = {result.server: result for result in results}
    node, postfix = by_server.get("mailnode"), by_server.get("postfix")
    if node is not None and postfix is not None and postfix.delivered_seconds and not node.problems:
        ratio = (node.stored / node.accepted_seconds) / (postfix.stored / postfix.delivered_seconds)
        print(f"ratio mailnode/postfix: {ratio:.2f}  (msgs/s, Postfix counted until delivered: the same durability)")
        accepted = (node.stored / node.accepted_seconds) / (load.messages / postfix.accepted_seconds)
        print(f"ratio mailnode/postfix accepted only: {accepted:.2f}")


# ---------------------------------------------------------------------------------------------------
# The command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.smtp",
        description="smtp-source against the mail node's MX and a private Postfix delivering into a Maildir.",
        epilog="Defaults come from BENCH_MESSAGES, BENCH_SESSIONS, BENCH_SIZE and BENCH_TIMEOUT when set.",
    )
    parser.add_argument(
        "--messages", type=common.positive, default=common.env_default("BENCH_MESSAGES", "5000"),
        help="default: 5000",
    )  # fmt: skip
    common.add_load_arguments(parser, sessions_help="parallel sessions (20)", size_help="payload per message (4KiB)")
    common.add_only_keep(parser, "postfix")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load = Load(messages=args.messages, sessions=args.sessions, size=args.size)
    progress = sys.stdout.isatty()
    print(f"smtp-source: {load.sessions} sessions, {load.messages} messages, {load.size} bytes each, to {RECIPIENT}")
    results: list[Result] = []
    # Postfix's daemons (user postfix) and virtual(8) (user nobody) walk through the directory.
    with common.temporary_workdir("mailfleet-bench-", keep=args.keep) as workdir:
        common.print_machine(workdir, f"Postfix {postfix_version()}")
        try:
            with common.signals_raise():
                if args.only in (None, "mailnode"):
                    results.append(bench_node(workdir / "mailnode", load, timeout=args.timeout, progress=progress))
                if args.only in (None, "postfix"):
                    results.append(bench_postfix(workdir / "postfix", load, timeout=args.timeout, progress=progress))
        except BenchError as error:
            failure: str | None = str(error)
        except KeyboardInterrupt as interrupt:
            return common.interrupted(interrupt)
        else:
            failure = None
    report(results, load)
    problems = [problem for result in results for problem in result.problems]
    if failure is not None:
        problems.append(failure)
    return common.outcome(problems)


if __name__ == "__main__":
    sys.exit(main())
