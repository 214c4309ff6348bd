"""The cost of moving a mailbox (`make bench`; docs/architecture.md "Moving a mailbox"): a mailbox of
`--messages` messages of `--size` bytes (10,000 of 100 KiB by default: 1 GiB) on node 0 of a cluster of
two `mailnode serve` processes, moved to node 1 by the operator's driver (mailfleet.moving) step by step.

Printed: the time of each step, the whole move, and the freeze: from the FREEZING call to the end of the
THAWING call (what a client waits for, at most: its mail queued, its IMAP logins refused), against the
goal of under 2 s. The mailbox is filled through the store itself before the nodes start (group-committed
deliveries, as SMTP's), so the time measured is the move's only.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
from pathlib import Path

import aiohttp
import yaml

from bench import common
from bench.common import DOMAIN, HOST
from mailfleet import moving
from mailnode import passwords
from mailnode.gateway import Gateway
from mailnode.store.mailstore import Delivery, MailStore

ADDRESS = f"moved@{DOMAIN}"
TOKEN = secrets.token_hex(16)
FREEZE_GOAL = 2.0  # seconds
BATCH = 200  # deliveries per store call while filling


def fill(data_dir: Path, *, messages: int, size: int) -> None:
    """`messages` messages of about `size` bytes into ADDRESS's INBOX, through the store."""

    async def run() -> None:
        gateway = Gateway(workers=4)
        store = MailStore(data_dir, gateway=gateway)
        await store.open()
        body = (b"x" * 76 + b"\r\n") * max(1, size // 78)
        try:
            for start in range(0, messages, BATCH):
                count = min(BATCH, messages - start)
                batch = [Delivery(ADDRESS, f"Subject: bench {start + n}\r\n\r\n".encode() + body) for n in range(count)]
                await store.deliver(batch)
                print(f"move: filled {start + count}/{messages} messages", file=sys.stderr, end="\r")
        finally:
            print(file=sys.stderr)
            await store.close()
            gateway.close()

    asyncio.run(run())


def start_nodes(workdir: Path, *, messages: int, size: int) -> list[common.Node]:
    listeners = ("smtp", "http", "lmtp", "imap_proxy")
    ports = [dict(zip(listeners, common.free_ports(len(listeners)), strict=True)) for _ in range(2)]
    token_file = workdir / "internal-token"
    token_file.write_text(TOKEN)
    peers = [{"host": HOST, "lmtp": p["lmtp"], "imap_proxy": p["imap_proxy"], "http": p["http"]} for p in ports]
    hashed = passwords.hash_password(secrets.token_urlsafe(16))
    nodes = []
    for i in range(2):
        node_dir = workdir / f"node{i}"
        config, _ = common.node_files(node_dir, listeners=(), password="unused", addresses=())
        settings = yaml.safe_load(config.read_text())
        settings["listen"].update({"submission": 0, "submissions": 0, "imap": 0, "imaps": 0}, **ports[i])
        settings["internal"] = {"token_file": str(token_file)}
        settings["cluster"] = {"ordinal": i, "peers": peers}
        config.write_text(yaml.safe_dump(settings, sort_keys=False))
        write_directory(node_dir, hashed, home=0)
        if i == 0:
            fill(node_dir / "data", messages=messages, size=size)
        nodes.append(common.launch_node(node_dir, config, ports[i]))
    for node in nodes:
        node.wait_ready()
    return nodes


def write_directory(node_dir: Path, hashed: str, *, home: int) -> None:
    mailboxes = [{"address": ADDRESS, "password_hash": hashed, "home": home}]
    tmp = node_dir / "directory.yaml.tmp"
    tmp.write_text(yaml.safe_dump({"mailboxes": mailboxes}))
    tmp.replace(node_dir / "directory.yaml")


async def move(workdir: Path, nodes: list[common.Node]) -> dict[str, float]:
    """Seconds per step (by the step that ran), the move's and the freeze's."""
    domain = moving.AtURLs({i: f"http://{HOST}:{node.ports['http']}" for i, node in enumerate(nodes)}, token=TOKEN)
    hashed = yaml.safe_load((workdir / "node0" / "directory.yaml").read_text())["mailboxes"][0]["password_hash"]

    async def publish_home(address: str, home: int) -> None:
        for i in range(len(nodes)):
            write_directory(workdir / f"node{i}", hashed, home=home)

    seconds: dict[str, float] = {}
    current = moving.start(ADDRESS, source=0, target=1, now=moving.utc_now())
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while current.step is not moving.Step.DONE:
            step, began = current.step, time.monotonic()
            current = await moving.advance(
                current, nodes=domain, session=session, ordinals=range(len(nodes)), publish_home=publish_home
            )
            seconds[step.value] = time.monotonic() - began
            print(f"move: {step.value} {seconds[step.value]:.2f} s", file=sys.stderr)
    seconds["move"] = time.monotonic() - started
    frozen = (moving.Step.FREEZING, moving.Step.CATCHING_UP, moving.Step.FLIPPING, moving.Step.THAWING)
    seconds["freeze"] = sum(seconds[step.value] for step in frozen)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.move", description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=common.positive, default=int(common.env_default("MOVE_MESSAGES", "10000")))
    parser.add_argument("--size", type=common.size, default=common.size(common.env_default("MOVE_SIZE", "100KiB")))
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    with common.temporary_workdir("bench-move-", keep=args.keep) as workdir:
        nodes = start_nodes(workdir, messages=args.messages, size=args.size)
        try:
            seconds = asyncio.run(move(workdir, nodes))
            problems = [problem for node in nodes for problem in node.problems()]
        finally:
            for node in nodes:
                common.stop_process(node.proc)
    total = args.messages * args.size
    print(f"move of {args.messages} messages ({total / 2**30:.2f} GiB) from node 0 to node 1 of 2:")
    for name, value in seconds.items():
        print(f"  {name:12} {value:8.2f} s")
    verdict = "meets" if seconds["freeze"] < FREEZE_GOAL else "misses"
    print(f"  freeze {seconds['freeze']:.2f} s {verdict} the goal of {FREEZE_GOAL:g} s")
    print(f"  copy throughput {total / 2**20 / seconds['Copying']:.0f} MiB/s")
    return common.outcome(problems)


if __name__ == "__main__":
    sys.exit(main())
