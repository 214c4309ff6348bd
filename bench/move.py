"""The cost of moving mailboxes (`make bench`; docs/architecture.md "Moving a mailbox"), with the
operator's driver (mailfleet.moving) calling real `mailnode serve` processes step by step:

- one move: a mailbox of `--messages` messages of `--size` bytes (10,000 of 100 KiB by default: 1 GiB) on
  node 0 of a cluster of two, moved to node 1. Printed: the time of each step, the whole move, and the
  freeze: from the FREEZING call to the end of the THAWING call (what a client waits for, at most: its
  mail queued, its IMAP logins refused), against the goal of under 2 s;
- a rebalance: `--rebalance-messages` messages (30,000 by default) spread evenly over
  `--rebalance-mailboxes` mailboxes of a domain of 3 nodes, placed as the operator places them
  (rendezvous over 3), and the domain scaled to 4: the moves the operator's plan (mailfleet.reconcile.
  moves.plan) makes, `--parallel` at once (spec.moves.parallel's default), until every move is Done.
  Printed: that time, the messages and MiB moved per second, the longest freeze, and the nodes' CPU
  seconds. The four nodes run from the start with the four peers, as after the StatefulSet's roll that
  comes before the moves; the operator's status writes between the steps are not in the figure.

The mailboxes are filled through the store itself before the nodes start (group-committed deliveries,
as SMTP's), so the time measured is the moves' only.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import secrets
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import aiohttp
import yaml

from bench import common
from bench.common import DOMAIN, HOST
from mailfleet import api, moving
from mailfleet.reconcile import moves as planning
from mailfleet.specs import placement
from mailnode import passwords
from mailnode.gateway import Gateway
from mailnode.store.mailstore import Delivery, MailStore

ADDRESS = f"moved@{DOMAIN}"
TOKEN = secrets.token_hex(16)
FREEZE_GOAL = 2.0  # seconds
BATCH = 200  # deliveries per store call while filling
FROZEN = (moving.Step.FREEZING, moving.Step.CATCHING_UP, moving.Step.FLIPPING, moving.Step.THAWING)
LISTENERS = ("smtp", "http", "lmtp", "imap_proxy")
REBALANCE_FROM, REBALANCE_TO = 3, 4  # nodes


def fill(data_dir: Path, counts: Mapping[str, int], *, size: int) -> None:
    """counts[address] messages of about `size` bytes into each address's INBOX, through the store."""

    async def run() -> None:
        gateway = Gateway(workers=4)
        store = MailStore(data_dir, gateway=gateway)
        await store.open()
        body = (b"x" * 76 + b"\r\n") * max(1, size // 78)
        total, done = sum(counts.values()), 0
        try:
            for address, messages in counts.items():
                for start in range(0, messages, BATCH):
                    count = min(BATCH, messages - start)
                    subjects = (f"Subject: bench {start + n}\r\n\r\n".encode() for n in range(count))
                    await store.deliver([Delivery(address, subject + body) for subject in subjects])
                    done += count
                    print(f"move: {data_dir.parent.name}: filled {done}/{total} messages", file=sys.stderr, end="\r")
        finally:
            print(file=sys.stderr)
            await store.close()
            gateway.close()

    asyncio.run(run())


@dataclasses.dataclass
class Domain:
    """The nodes of one bench domain, the directory file they share and the homes it records."""

    workdir: Path
    nodes: list[common.Node]
    homes: dict[str, int]
    hashed: str

    @property
    def at(self) -> moving.AtURLs:
        return moving.AtURLs({i: f"http://{HOST}:{node.ports['http']}" for i, node in enumerate(self.nodes)}, TOKEN)

    def write_directory(self) -> None:
        mailboxes = [{"address": a, "password_hash": self.hashed, "home": h} for a, h in self.homes.items()]
        tmp = self.workdir / "directory.yaml.tmp"
        tmp.write_text(yaml.safe_dump({"mailboxes": mailboxes}))
        tmp.replace(self.workdir / "directory.yaml")

    async def publish_home(self, address: str, home: int) -> None:
        """The operator's directory write at a flip (one file for every node, as the pods share the Secret)."""
        self.homes[address] = home
        self.write_directory()

    def stored(self, ordinal: int, address: str) -> int:
        local = address.partition("@")[0]
        inbox = self.workdir / f"node{ordinal}" / "data" / "mail" / DOMAIN / local / "INBOX"
        return sum(1 for sub in ("new", "cur") if (inbox / sub).is_dir() for _ in (inbox / sub).iterdir())

    def cpu_seconds(self) -> float:
        """User and system CPU time of the node processes so far (their threads included)."""
        ticks = 0
        for node in self.nodes:
            fields = Path(f"/proc/{node.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> list[str]:
        problems = [problem for node in self.nodes for problem in node.problems()]
        for node in self.nodes:
            common.stop_process(node.proc)
        return problems


def start_domain(workdir: Path, *, nodes: int, homes: Mapping[str, int], per_mailbox: int, size: int) -> Domain:
    """`nodes` nodes that name each other as peers, the mailboxes at `homes` filled with `per_mailbox`
    messages each."""
    ports = [dict(zip(LISTENERS, common.free_ports(len(LISTENERS)), strict=True)) for _ in range(nodes)]
    token_file = workdir / "internal-token"
    token_file.write_text(TOKEN)
    peers = [{"host": HOST, "lmtp": p["lmtp"], "imap_proxy": p["imap_proxy"], "http": p["http"]} for p in ports]
    domain = Domain(workdir, [], dict(homes), passwords.hash_password(secrets.token_urlsafe(16)))
    domain.write_directory()
    for i in range(nodes):
        node_dir = workdir / f"node{i}"
        config, _ = common.node_files(node_dir, listeners=(), password="unused", addresses=())
        settings = yaml.safe_load(config.read_text())
        settings["listen"].update({"submission": 0, "submissions": 0, "imap": 0, "imaps": 0}, **ports[i])
        settings["directory_file"] = str(workdir / "directory.yaml")
        settings["internal"] = {"token_file": str(token_file)}
        settings["cluster"] = {"ordinal": i, "peers": peers}
        config.write_text(yaml.safe_dump(settings, sort_keys=False))
        if mine := {address: per_mailbox for address, home in homes.items() if home == i}:
            fill(node_dir / "data", mine, size=size)
        domain.nodes.append(common.launch_node(node_dir, config, ports[i]))
    for node in domain.nodes:
        node.wait_ready()
    return domain


async def drive(domain: Domain, current: moving.Move, session: aiohttp.ClientSession) -> dict[str, float]:
    """One move until DONE: seconds per step (by the step that ran), the move's and the freeze's."""
    seconds: dict[str, float] = {}
    started = time.monotonic()
    while current.step is not moving.Step.DONE:
        step, began = current.step, time.monotonic()
        current = await moving.advance(
            current,
            nodes=domain.at,
            session=session,
            ordinals=range(len(domain.nodes)),
            publish_home=domain.publish_home,
        )
        seconds[step.value] = time.monotonic() - began
    seconds["move"] = time.monotonic() - started
    seconds["freeze"] = sum(seconds[step.value] for step in FROZEN)
    return seconds


# -- one move ------------------------------------------------------------------------------------------


async def move_one(domain: Domain) -> dict[str, float]:
    async with aiohttp.ClientSession() as session:
        seconds = await drive(domain, moving.start(ADDRESS, source=0, target=1, now=moving.utc_now()), session)
    for step, value in seconds.items():
        print(f"move: {step} {value:.2f} s", file=sys.stderr)
    return seconds


def single(workdir: Path, *, messages: int, size: int) -> list[str]:
    domain = start_domain(workdir, nodes=2, homes={ADDRESS: 0}, per_mailbox=messages, size=size)
    try:
        seconds = asyncio.run(move_one(domain))
    finally:
        problems = domain.stop()
    total = messages * size
    print(f"move of {messages} messages ({total / 2**30:.2f} GiB) from node 0 to node 1 of 2 ({load()}):")
    for name, value in seconds.items():
        print(f"  {name:12} {value:8.2f} s")
    verdict = "meets" if seconds["freeze"] < FREEZE_GOAL else "misses"
    print(f"  freeze {seconds['freeze']:.2f} s {verdict} the goal of {FREEZE_GOAL:g} s")
    print(f"  copy throughput {total / 2**20 / seconds['Copying']:.0f} MiB/s")
    return problems


# -- a rebalance ---------------------------------------------------------------------------------------


def rebalance_plan(homes: Mapping[str, int]) -> list[planning.Wanted]:
    """The moves of a scale-up from REBALANCE_FROM to REBALANCE_TO nodes, as the operator plans them."""
    layout = planning.Layout(target=REBALANCE_TO, running=REBALANCE_TO, placed_over=REBALANCE_FROM)
    return planning.plan(homes, layout=layout, recorded={}, forced={}).waiting


async def move_all(domain: Domain, wanted: list[planning.Wanted], *, parallel: int) -> list[dict[str, float]]:
    """Every planned move, `parallel` at once (the next starts when one is Done, as the operator's)."""
    slots = asyncio.Semaphore(parallel)
    finished = 0

    async def one(move: planning.Wanted, session: aiohttp.ClientSession) -> dict[str, float]:
        nonlocal finished
        async with slots:
            start = moving.start(move.address, source=move.source, target=move.target, now=moving.utc_now())
            seconds = await drive(domain, start, session)
        finished += 1
        print(f"move: rebalance: {finished}/{len(wanted)} moves done", file=sys.stderr, end="\r")
        return seconds

    async with aiohttp.ClientSession() as session:
        done = await asyncio.gather(*(one(move, session) for move in wanted))
    print(file=sys.stderr)
    return done


def rebalance(workdir: Path, *, messages: int, mailboxes: int, size: int, parallel: int) -> list[str]:
    addresses = [f"user{n:04}@{DOMAIN}" for n in range(mailboxes)]
    per_mailbox = max(1, messages // mailboxes)
    homes = {address: placement.rendezvous(address, REBALANCE_FROM) for address in addresses}
    wanted = rebalance_plan(homes)
    domain = start_domain(workdir, nodes=REBALANCE_TO, homes=homes, per_mailbox=per_mailbox, size=size)
    problems: list[str] = []
    try:
        cpu_before, started = domain.cpu_seconds(), time.monotonic()
        done = asyncio.run(move_all(domain, wanted, parallel=parallel))
        elapsed, cpu = time.monotonic() - started, domain.cpu_seconds() - cpu_before
        for move in wanted:  # each moved mailbox whole at its new home, and gone from its old one
            found = (domain.stored(move.target, move.address), domain.stored(move.source, move.address))
            if found != (per_mailbox, 0):
                problems.append(f"{move.address}: {found[0]} messages at node {move.target}, {found[1]} at node "
                                f"{move.source}, after its move; {per_mailbox} and 0 expected")  # fmt: skip
    finally:
        problems += domain.stop()
    moved = len(wanted) * per_mailbox
    mib = moved * size / 2**20
    print(
        f"rebalance {REBALANCE_FROM} -> {REBALANCE_TO} nodes of {per_mailbox * mailboxes} messages of "
        f"{size / 1024:g} KiB over {mailboxes} mailboxes ({load()}):"
    )
    print(f"  moves        {len(wanted)} mailboxes ({moved} messages, {mib / 1024:.2f} GiB), {parallel} at once")
    print(f"  until Done   {elapsed:8.2f} s")
    print(f"  throughput   {moved / elapsed:8.0f} messages/s, {mib / elapsed:.1f} MiB/s")
    if done:
        longest, frozen = max(s["move"] for s in done), max(s["freeze"] for s in done)
        print(f"  longest move {longest:8.2f} s, longest freeze {frozen:.2f} s")
    print(f"  node CPU     {cpu:8.1f} s (4 nodes; {moved / max(cpu, 0.001):.0f} messages per CPU second)")
    return problems


def load() -> str:
    return "load " + " ".join(f"{value:.1f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.move", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--messages",
        type=common.non_negative,
        default=int(common.env_default("MOVE_MESSAGES", "10000")),
        help="messages in the mailbox of the single move (0: skip it)",
    )
    parser.add_argument("--size", type=common.size, default=common.size(common.env_default("MOVE_SIZE", "100KiB")))
    parser.add_argument(
        "--rebalance-messages",
        type=common.non_negative,
        default=int(common.env_default("REBALANCE_MESSAGES", "30000")),
        help="messages in the domain scaled from 3 to 4 nodes (0: skip the rebalance)",
    )
    parser.add_argument("--rebalance-mailboxes", type=common.positive, default=60)
    parser.add_argument(
        "--rebalance-size", type=common.size, default=common.size(common.env_default("REBALANCE_SIZE", "100KiB"))
    )
    parser.add_argument("--parallel", type=common.positive, default=api.MovesSpec().parallel)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    problems: list[str] = []
    with common.temporary_workdir("bench-move-", keep=args.keep) as workdir:
        if args.messages:
            (workdir / "single").mkdir()
            problems += single(workdir / "single", messages=args.messages, size=args.size)
        if args.rebalance_messages:
            (workdir / "rebalance").mkdir()
            problems += rebalance(
                workdir / "rebalance",
                messages=args.rebalance_messages,
                mailboxes=args.rebalance_mailboxes,
                size=args.rebalance_size,
                parallel=args.parallel,
            )
    return common.outcome(problems)


if __name__ == "__main__":
    sys.exit(main())
