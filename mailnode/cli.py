"""The `mailnode` command: `serve --config FILE` runs a node; `hash-password` prints an argon2id hash
of a password read from standard input; `dkim-keygen` and `dkim-record` make a domain's DKIM key and
print the DNS record to publish."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import signal
import sys
from pathlib import Path

from mailnode import dkim, logs, passwords
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


def _print_record(record: dkim.Record) -> None:
    print(f'Publish this DNS record:\n{record.name}. IN TXT "{record.value}"')


def _dkim_keygen(domain: str, selector: str, bits: int, out: Path) -> int:
    if out.exists():
        print(f"mailnode: {out} exists; not overwriting a key", file=sys.stderr)
        return 1
    key = dkim.generate_key(bits)
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(key)
    except OSError as error:
        print(f"mailnode: cannot write {out}: {error.strerror}", file=sys.stderr)
        return 1
    _print_record(dkim.record(key, domain=domain, selector=selector))
    return 0


def _dkim_record(domain: str, selector: str, key_file: Path) -> int:
    try:
        found = dkim.record(key_file.read_bytes(), domain=domain, selector=selector)
    except (OSError, ValueError) as error:
        print(f"mailnode: {key_file}: {error}", file=sys.stderr)
        return 1
    _print_record(found)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mailnode", description="A Mailfleet mail node.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run a mail node")
    serve.add_argument("--config", "-c", type=Path, required=True, help="node config (YAML)")
    commands.add_parser("hash-password", help="print an argon2id hash of the password on stdin")
    keygen = commands.add_parser("dkim-keygen", help="make a domain's DKIM key and print the DNS record")
    keygen.add_argument("--domain", required=True)
    keygen.add_argument("--selector", default="mail")
    keygen.add_argument("--bits", type=int, default=2048, choices=(1024, 2048, 3072, 4096))
    keygen.add_argument("--out", type=Path, required=True, help="where to write the private key (PEM)")
    show = commands.add_parser("dkim-record", help="print the DNS record of an existing DKIM key")
    show.add_argument("--domain", required=True)
    show.add_argument("--selector", default="mail")
    show.add_argument("--key", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "hash-password":
        return _hash_password()
    if args.command == "dkim-keygen":
        return _dkim_keygen(args.domain, args.selector, args.bits, args.out)
    if args.command == "dkim-record":
        return _dkim_record(args.domain, args.selector, args.key)
    try:
        return asyncio.run(_serve(args.config))
    except ConfigError as error:
        print(f"mailnode: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
