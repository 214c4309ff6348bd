"""The backup benchmark: backing up and restoring a node that holds `--messages` messages (100,000 by
default) in `--mailboxes` mailboxes, against the two ways the same mail is backed up without Mailfleet:
GNU tar of the Maildir files (what "backups by tar" of docker-mailserver and Mailu charts do: fast, but not
consistent while mail arrives, and nothing to verify it with) and Dovecot's `doveadm backup` (dsync, one-way
mailbox synchronisation into a second Maildir, and `doveadm backup -R` back).

The mail (generated deterministically from `--seed`, 2-50 KiB, as the IMAP benchmark's) is written into the
node's store with the node's own store code (MailStore.deliver: file written, fsynced, renamed, index row
committed, as SMTP stores it), then the node is started (`mailnode serve`) and timed:

- checkpoint: `POST /snapshot` (pause writes, drain, checkpoint every index) until it answers, and how long
  writes were held until `DELETE /snapshot`;
- backup: `mailnode backup --to FILE` (a consistent archive of the running node, SHA-256 of every message);
  the time writes were paused while it staged its copy is read from the node's metrics;
- verify: `mailnode verify FILE`;
- restore: `mailnode restore --from FILE --data-dir EMPTY` (the whole node, verified, made durable) and
  `mailnode restore --mailbox ... --as ...` (one mailbox into the running node, through its store).

Dovecot gets the same messages in Maildirs (one per mailbox, indexed before the timed run, as a running
server's would be) and is timed for `doveadm backup` of each mailbox into an empty location, `doveadm backup -R` back
into emptied Maildirs, and `doveadm import` of one mailbox into another user. tar is timed for `tar -cf` of
the mail directory and `tar -xf` into an empty one. Both are given the same files; ratios are baseline time
over node time (above 1: the node is faster). Everything lives in one temporary directory, removed at the end
unless --keep. The Dovecot side needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from bench import common, dovecot, imap
from bench.common import DOMAIN, HOST, START_TIMEOUT, BenchError
from mailnode.gateway import Gateway
from mailnode.store.mailstore import Delivery, MailStore

PASSWORD = "bench"
BATCH = 200  # messages per MailStore.deliver call while preloading
PRELOAD_CALLS = 16  # deliver calls in flight while preloading (the node's store threads)


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    seconds: float
    messages: int
    bytes: int
    note: str = ""

    def line(self, width: int) -> str:
        rate = f"{self.messages / self.seconds:>9.0f} msgs/s  {self.bytes / self.seconds / 2**20:>7.1f} MiB/s"
        if not self.messages:  # a step whose time does not grow with the mail (the checkpoint)
            rate = " " * len(rate)
        return f"  {self.name:<{width}}  {self.seconds:>8.2f} s  {rate}  {self.note}".rstrip()


def addresses(count: int) -> list[str]:
    return [f"user{i}@{DOMAIN}" for i in range(count)]


def corpus(total: int, mailboxes: int, seed: int) -> list[list[bytes]]:
    """The messages of each mailbox: `total` spread evenly, each mailbox from its own seed."""
    per = [total // mailboxes + (1 if i < total % mailboxes else 0) for i in range(mailboxes)]
    return [imap.generate(count, seed + i).messages for i, count in enumerate(per)]


def mail_bytes(mail: list[list[bytes]]) -> int:
    return sum(len(m) for messages in mail for m in messages)


# ---------------------------------------------------------------------------------------------------
# The node


async def preload(data_dir: Path, users: list[str], mail: list[list[bytes]]) -> None:
    """Every message through MailStore.deliver, PRELOAD_CALLS calls in flight, as concurrent SMTP sessions
    would store them."""
    gateway = Gateway(workers=PRELOAD_CALLS)
    store = MailStore(data_dir, gateway=gateway)
    await store.open()
    batches = [
        [Delivery(address, message) for message in messages[start : start + BATCH]]
        for address, messages in zip(users, mail, strict=True)
        for start in range(0, len(messages), BATCH)
    ]
    limit = asyncio.Semaphore(PRELOAD_CALLS)

    async def one(batch: list[Delivery]) -> None:
        async with limit:
            await store.deliver(batch)

    try:
        await asyncio.gather(*(one(batch) for batch in batches))
    finally:
        await store.close()
        gateway.close()


def mailnode(*args: str, cwd: Path) -> tuple[float, str]:
    """Run `mailnode ARGS`; its wall time and its standard output. A failure is a BenchError."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "mailnode", *args], cwd=cwd, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise BenchError(f"mailnode {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return seconds, done.stdout


def http(method: str, url: str) -> dict[str, object]:
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=300) as response:
        answer: dict[str, object] = json.loads(response.read())
        return answer


def metric(url: str, name: str) -> float:
    """The sum of a metric's samples named exactly `name` (every label set)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def files_under(path: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def bench_node(workdir: Path, users: list[str], mail: list[list[bytes]]) -> list[Step]:
    listeners = ("smtp", "imap", "http")
    addresses = [*users, f"restored@{DOMAIN}"]
    config, ports = common.node_files(workdir, listeners=listeners, password=PASSWORD, addresses=addresses)
    total, size = sum(len(m) for m in mail), mail_bytes(mail)
    started = time.monotonic()
    asyncio.run(preload(workdir / "data", users, mail))
    print(f"mailnode: {total} messages stored with MailStore.deliver in {time.monotonic() - started:.1f} s", flush=True)
    node = common.launch_node(workdir, config, ports)
    url = f"http://{HOST}:{ports['http']}"
    steps: list[Step] = []
    try:
        node.wait_ready()
        started = time.monotonic()
        checkpoint = http("POST", f"{url}/snapshot?hold=60")
        answered = time.monotonic() - started
        held = http("DELETE", f"{url}/snapshot")["paused_seconds"]
        steps.append(Step("checkpoint (POST /snapshot)", answered, 0, 0,
                          f"writes held {float(held):.3f} s until DELETE; {checkpoint['mailboxes']} indexes"))  # type: ignore[arg-type]  # fmt: skip
        archive = workdir / "node.tar"
        paused_before = metric(url, "mailnode_checkpoint_pause_seconds_sum")
        seconds, _ = mailnode("backup", "--to", str(archive), "--url", url, cwd=workdir)
        paused = metric(url, "mailnode_checkpoint_pause_seconds_sum") - paused_before
        note = f"archive {archive.stat().st_size / 2**20:.0f} MiB; writes paused {paused:.2f} s to stage"
        steps.append(Step("backup (mailnode backup)", seconds, total, size, note))
        seconds, _ = mailnode("verify", str(archive), cwd=workdir)
        steps.append(Step("verify (mailnode verify)", seconds, total, size))
        restored = workdir / "restored"
        restored.mkdir()
        seconds, _ = mailnode("restore", "--from", str(archive), "--data-dir", str(restored), cwd=workdir)
        found = files_under(restored / "mail") - len(users)  # minus one index.sqlite per mailbox
        if found != total:
            raise BenchError(f"the restored data directory holds {found} message files, not {total}")
        steps.append(Step("restore node (--data-dir)", seconds, total, size, "verified, then one syncfs"))
        one, one_bytes = len(mail[0]), sum(len(m) for m in mail[0])
        seconds, out = mailnode("restore", "--from", str(archive), "--mailbox", users[0], "--as",
                                f"restored@{DOMAIN}", "--url", url, cwd=workdir)  # fmt: skip
        steps.append(Step(f"restore 1 mailbox (--mailbox, {one})", seconds, one, one_bytes, out.strip()))
        problems = node.died()
        if problems:
            raise BenchError(problems)
    finally:
        common.stop_process(node.proc)
    return steps


# ---------------------------------------------------------------------------------------------------
# tar


def bench_tar(workdir: Path, users: list[str], mail: list[list[bytes]]) -> list[Step]:
    workdir.mkdir()
    maildirs = write_maildirs(workdir / "mail", users, mail, owner=None)
    total, size = sum(len(m) for m in mail), mail_bytes(mail)
    archive = workdir / "mail.tar"
    started = time.monotonic()
    subprocess.run(["tar", "-cf", str(archive), "-C", str(workdir), "mail"], check=True)
    backup = time.monotonic() - started
    target = workdir / "restored"
    target.mkdir()
    started = time.monotonic()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(target)], check=True)
    subprocess.run(["sync", "-f", str(target)], check=True)  # as the node's restore, on disk at the end
    restore = time.monotonic() - started
    if files_under(target / "mail") != files_under(maildirs):
        raise BenchError("tar -xf restored a different number of files")
    return [
        Step("backup (tar -cf)", backup, total, size, f"archive {archive.stat().st_size / 2**20:.0f} MiB"),
        Step("restore node (tar -xf; sync)", restore, total, size),
    ]


def write_maildirs(root: Path, users: list[str], mail: list[list[bytes]], owner: tuple[int, int] | None) -> Path:
    """One Maildir per mailbox at root/<domain>/<local>, the messages in cur/ as a delivery agent leaves them."""
    now = int(time.time())
    for address, messages in zip(users, mail, strict=True):
        local, _, domain = address.partition("@")
        maildir = root / domain / local
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True)
        for number, message in enumerate(messages):
            name = f"{now}.M{number}P{os.getpid()}.mailfleet-bench,S={len(message)},W={len(message)}:2,"
            (maildir / "cur" / name).write_bytes(message)
    if owner is not None:
        dovecot.chown_tree(root, *owner)
    return root


# ---------------------------------------------------------------------------------------------------
# Dovecot


DOVEADM_CONF = """\
# A private Dovecot for doveadm: no protocol listens; the daemon runs for its auth service (user lookups).
base_dir = {run}
state_dir = {state}
instance_name = mailfleet-bench-backup
log_path = {log}
protocols = none
default_login_user = {login_user}
default_internal_user = {internal_user}
first_valid_uid = {uid}
first_valid_gid = {gid}
mail_location = maildir:{mail}/%d/%n
mail_fsync = always
passdb {{
  driver = passwd-file
  args = username_format=%u {users}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {users}
}}
"""


def bench_dovecot(workdir: Path, users: list[str], mail: list[list[bytes]]) -> list[Step]:
    common.require_root("Dovecot")
    workdir.mkdir()
    nobody = dovecot.user("nobody")
    uid, gid = nobody.pw_uid, nobody.pw_gid
    for name in ("run", "state", "home", "backup"):
        (workdir / name).mkdir()
    lines = [f"{a}::{uid}:{gid}::{workdir / 'home' / a}::" for a in [*users, f"restored@{DOMAIN}"]]
    (workdir / "users").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = workdir / "doveadm.conf"
    config.write_text(
        DOVEADM_CONF.format(run=workdir / "run", state=workdir / "state", log=workdir / "dovecot.log",
                            login_user=dovecot.user("dovenull").pw_name, internal_user=dovecot.user("dovecot").pw_name,
                            uid=uid, gid=gid, mail=workdir / "mail", users=workdir / "users"),
        encoding="utf-8",
    )  # fmt: skip
    write_maildirs(workdir / "mail", users, mail, owner=(uid, gid))
    dovecot.chown_tree(workdir / "home", uid, gid)
    dovecot.chown_tree(workdir / "backup", uid, gid)
    doveadm = common.tool("doveadm", dovecot.PACKAGE)

    def run(*args: str) -> float:
        started = time.monotonic()
        done = subprocess.run([doveadm, "-c", str(config), *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchError(f"doveadm {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
        return time.monotonic() - started

    out_file = workdir / "dovecot.out"
    with out_file.open("wb") as out:
        daemon = subprocess.Popen(
            [common.tool("dovecot", dovecot.PACKAGE), "-c", str(config), "-F"], stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        common.wait_for(
            "dovecot's auth service", lambda: (workdir / "run" / "auth-userdb").exists(), timeout=START_TIMEOUT,
            alive=lambda: None if daemon.poll() is None else f"dovecot exited:\n{common.tail(out_file)}",
        )  # fmt: skip
        return dovecot_steps(workdir, users, mail, run)
    finally:
        common.stop_process(daemon)


def dovecot_steps(workdir: Path, users: list[str], mail: list[list[bytes]], run: Callable[..., float]) -> list[Step]:
    total, size = sum(len(m) for m in mail), mail_bytes(mail)
    run("index", "-A", "*")  # a running Dovecot has its indexes; not timed

    def each(*args: str, reverse: bool = False) -> float:
        """`doveadm ARGS -u USER maildir:<backup of USER>` for every mailbox (the location is per user)."""
        seconds = 0.0
        for address in users:
            local, _, domain = address.partition("@")
            seconds += run(*args, "-u", address, f"maildir:{workdir / 'backup' / domain / local}")
        return seconds

    backup = each("backup")
    for address in users:  # the mail lost: empty Maildirs, indexes gone
        local, _, domain = address.partition("@")
        subprocess.run(["rm", "-rf", str(workdir / "mail" / domain / local)], check=True)
    restore = each("backup", "-R")
    restored = sum(
        files_under(workdir / "mail" / DOMAIN / a.partition("@")[0] / sub) for a in users for sub in ("cur", "new")
    )
    if restored != total:
        raise BenchError(f"doveadm backup -R restored {restored} messages, not {total}")
    one, one_bytes = len(mail[0]), sum(len(m) for m in mail[0])
    local0 = users[0].partition("@")[0]
    imported = run("import", "-u", f"restored@{DOMAIN}", f"maildir:{workdir / 'backup' / DOMAIN / local0}", "", "all")
    return [
        Step("backup (doveadm backup)", backup, total, size),
        Step("restore node (doveadm backup -R)", restore, total, size),
        Step(f"restore 1 mailbox (doveadm import, {one})", imported, one, one_bytes),
    ]


# ---------------------------------------------------------------------------------------------------
# The report


def report(node: list[Step], baselines: dict[str, list[Step]]) -> None:
    width = max((len(s.name) for steps in (node, *baselines.values()) for s in steps), default=10)
    print("\nmailnode")
    for step in node:
        print(step.line(width))
    for name, steps in baselines.items():
        print(f"\n{name}")
        for step in steps:
            print(step.line(width))
    by_kind = {s.name.split(" (")[0]: s for s in node}
    print("\nratios (baseline time / mailnode time; above 1: mailnode is faster)")
    for name, steps in baselines.items():
        for step in steps:
            kind = step.name.split(" (")[0]
            if kind in by_kind:
                ours = by_kind[kind]
                print(f"  {kind:<{width}}  {name}: {step.seconds / ours.seconds:.2f}x")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.backup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=common.positive, default=common.env_default("BENCH_MESSAGES", "100000"))
    parser.add_argument("--mailboxes", type=common.positive, default=10, help="mailboxes the messages are spread over")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", choices=("mailnode", "tar", "dovecot"), help="benchmark one side only")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    users = addresses(args.mailboxes)
    problems: list[str] = []
    with common.signals_raise(), common.temporary_workdir("mailfleet-bench-backup-", keep=args.keep) as workdir:
        common.print_machine(workdir, f"Dovecot {dovecot.version()}")
        started = time.monotonic()
        mail = corpus(args.messages, args.mailboxes, args.seed)
        made = time.monotonic() - started
        print(f"corpus: {args.messages} messages in {args.mailboxes} mailboxes, "
              f"{mail_bytes(mail) / 2**20:.0f} MiB, made in {made:.1f} s", flush=True)  # fmt: skip
        node: list[Step] = []
        baselines: dict[str, list[Step]] = {}
        try:
            if args.only in (None, "mailnode"):
                node = bench_node(workdir / "mailnode", users, mail)
            if args.only in (None, "tar"):
                baselines["tar"] = bench_tar(workdir / "tar", users, mail)
            if args.only in (None, "dovecot"):
                baselines["Dovecot"] = bench_dovecot(workdir / "dovecot", users, mail)
        except BenchError as error:
            problems.append(str(error))
        except KeyboardInterrupt as interrupt:
            return common.interrupted(interrupt)
        report(node, baselines)
    return common.outcome(problems)


if __name__ == "__main__":
    sys.exit(main())
