"""The `mailnode` command: `serve --config FILE` runs a node; `hash-password` prints an argon2id hash
of a password read from standard input."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import signal
import sys
from pathlib import Path

from mailnode import logs, passwords
from mailnode.config import ConfigError, load_node_config
from mailnode.node import Node


async def _serve(config_path: Path) -> int:
    config = load_node_config(config_path)
    logs.setup(config.log_level)
    node = Node(config)
    try:
        await node.start()
    except ConfigError as error:
        print(f"mailnode: {error}", file=sys.stderr)
        await node.stop()
        return 2
    except OSError as error:
        print(f"mailnode: cannot start: {error}", file=sys.stderr)
        await node.stop()
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await node.stop()
    return 0


def _hash_password() -> int:
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("mailnode: passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("mailnode: empty password", file=sys.stderr)
        return 1
    print(passwords.hash_password(password))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mailnode", description="A Mailfleet mail node.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run a mail node")
    serve.add_argument("--config", "-c", type=Path, required=True, help="node config (YAML)")
    commands.add_parser("hash-password", help="print an argon2id hash of the password on stdin")
    args = parser.parse_args(argv)
    if args.command == "hash-password":
        return _hash_password()
    try:
        return asyncio.run(_serve(args.config))
    except ConfigError as error:
        print(f"mailnode: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
