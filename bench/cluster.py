"""The hand-off cost `make bench` measures (DESIGN.md "Clustering"): SMTP accepted through a cluster of
three mail nodes, with the recipients spread over all three homes so that two messages in three are handed
to another node over LMTP before their 250, against one node alone that stores every message itself.

Both runs get the same load from smtp-source (Postfix's load generator, as bench.smtp): one smtp-source
per (node, recipient) pair, all at once, `--sessions` parallel sessions and `--messages` messages in all,
the cluster's messages sent to its three nodes in turn as a Service spreads connections. Every process
runs on this one machine, so the three nodes share its CPUs with the load generator.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import secrets
import sys
import time
from pathlib import Path

import yaml

from bench import common
from bench import smtp as bench_smtp
from bench.common import DOMAIN, HOST, BenchError
from mailnode import passwords

NODES = 3
RECIPIENTS = [f"home{i}@{DOMAIN}" for i in range(NODES)]  # home{i} lives on node i
TOKEN = secrets.token_hex(16)


def start_nodes(workdir: Path, *, clustered: bool) -> list[common.Node]:
    """Three clustered nodes (peers of each other, one home each) or one node with every mailbox."""
    count = NODES if clustered else 1
    listeners = ("smtp", "http", "lmtp") if clustered else ("smtp", "http")
    ports = [dict(zip(listeners, common.free_ports(len(listeners)), strict=True)) for _ in range(count)]
    token_file = workdir / "internal-token"
    workdir.mkdir()
    token_file.write_text(TOKEN)
    peers = [{"host": HOST, "lmtp": p["lmtp"], "http": p["http"]} for p in ports] if clustered else []
    hashed = passwords.hash_password(secrets.token_urlsafe(16))
    homes = range(NODES) if clustered else [0] * NODES
    mailboxes = [{"address": a, "password_hash": hashed, "home": h} for a, h in zip(RECIPIENTS, homes, strict=True)]
    nodes = []
    for i in range(count):
        node_dir = workdir / f"node{i}"
        config, _ = common.node_files(node_dir, listeners=(), password="unused", addresses=())
        settings = yaml.safe_load(config.read_text())
        # Only SMTP, HTTP and LMTP are measured: the others on ports the kernel chooses, so nodes never clash.
        settings["listen"].update({"submission": 0, "submissions": 0, "imap": 0, "imaps": 0, "imap_proxy": 0})
        settings["listen"].update(ports[i])
        settings["internal"] = {"token_file": str(token_file)}
        if clustered:
            settings["cluster"] = {"ordinal": i, "peers": peers}
        config.write_text(yaml.safe_dump(settings, sort_keys=False))
        (node_dir / "directory.yaml").write_text(yaml.safe_dump({"mailboxes": mailboxes}))
        nodes.append(common.launch_node(node_dir, config, ports[i]))
    for node in nodes:
        node.wait_ready()
    return nodes


def run(workdir: Path, load: bench_smtp.Load, *, clustered: bool, timeout: float) -> tuple[float, list[str]]:
    """Seconds until smtp-source had every message accepted; the problems the nodes reported."""
    nodes = start_nodes(workdir, clustered=clustered)
    try:
        pairs = [(node, recipient) for node in nodes for recipient in RECIPIENTS]
        share = bench_smtp.Load(
            messages=max(load.messages // len(pairs), 1), sessions=max(load.sessions // len(pairs), 1), size=load.size
        )
        name = "cluster" if clustered else "one node"
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(len(pairs)) as pool:

            def send(node: common.Node, recipient: str) -> float:
                port = node.ports["smtp"]
                return bench_smtp.send(name, port, share, timeout=timeout, progress=False, recipient=recipient)

            sends = [pool.submit(send, node, recipient) for node, recipient in pairs]
            for sent in sends:
                sent.result()
        seconds = time.monotonic() - started
        return seconds, [problem for node in nodes for problem in node.problems()]
    finally:
        for node in nodes:
            common.stop_process(node.proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[0])
    common.add_load_arguments(
        parser, sessions_help="parallel SMTP sessions in all", size_help="payload bytes per message"
    )
    parser.add_argument("--messages", type=common.positive, default=common.env_default("BENCH_MESSAGES", "9000"),
                        help="messages in all, for each run (9000)")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, mail)")
    args = parser.parse_args(argv)
    load = bench_smtp.Load(messages=args.messages, sessions=args.sessions, size=args.size)
    messages = (load.messages // (NODES * NODES)) * NODES * NODES
    print(f"smtp-source: {load.sessions} sessions, {messages} messages of {load.size} bytes, over {NODES} recipients")
    results: dict[str, float] = {}
    problems: list[str] = []
    try:
        with common.signals_raise(), common.temporary_workdir("mailfleet-cluster-", keep=args.keep) as workdir:
            common.print_machine(workdir, "no baseline: the node alone against three nodes")
            for clustered in (False, True):
                label = f"{NODES} nodes, 2/3 handed off" if clustered else "one node alone"
                seconds, found = run(workdir / label.split(",")[0].replace(" ", "-"), load, clustered=clustered,
                                     timeout=args.timeout)  # fmt: skip
                results[label] = seconds
                problems += found
    except KeyboardInterrupt as interrupt:
        return common.interrupted(interrupt)
    except BenchError as error:
        problems.append(str(error))
    print(f"\n{'run':<28} {'messages':>8} {'seconds':>8} {'msgs/s':>8}")
    for label, seconds in results.items():
        print(f"{label:<28} {messages:>8} {seconds:>8.2f} {messages / seconds:>8.1f}")
    if len(results) == 2:
        alone, cluster = results.values()
        print(f"ratio cluster/one node: {alone / cluster:.2f}  (msgs/s accepted; a 250 is fsynced at the home or "
              "in the accepting node's queue)")  # fmt: skip
    return common.outcome(problems)


if __name__ == "__main__":
    sys.exit(main())
