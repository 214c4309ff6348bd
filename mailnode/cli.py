"""The `mailnode` command: `serve --config FILE` runs a node; `hash-password` prints an argon2id hash
of a password read from standard input; `dkim-keygen` and `dkim-record` make a domain's DKIM key and
print the DNS record to publish; `queue list | retry ID | delete ID` show and change a running node's
outbound queue through its admin HTTP endpoints (which accept changes only from loopback)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import signal
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

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


DEFAULT_ADMIN_URL = "http://127.0.0.1:8080"


def _admin_url(url: str | None, config_path: Path | None) -> str:
    """The running node's admin base URL: --url, else the config's listen.host and listen.http (a
    wildcard host means this machine's loopback), else DEFAULT_ADMIN_URL."""
    if url:
        return url.rstrip("/")
    if config_path is None:
        return DEFAULT_ADMIN_URL
    listen = load_node_config(config_path).listen
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(listen.host, listen.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{listen.http}"


class _AdminError(Exception):
    """A request to the node's admin endpoints failed; the message says why, for stderr."""


def _admin_request(base: str, method: str, path: str) -> Any:
    request = urllib.request.Request(f"{base}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            detail = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            detail = body.decode(errors="replace").strip() or error.reason
        raise _AdminError(f"{method} {base}{path}: {error.code} {detail}") from error
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise _AdminError(f"cannot reach the node at {base}: {reason}") from error
    except ValueError as error:
        raise _AdminError(f"{method} {base}{path}: not a JSON answer") from error


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _print_queue(messages: list[dict[str, Any]]) -> None:
    if not messages:
        print("The queue is empty.")
        return
    id_width = max(len("ID"), *(len(m["id"]) for m in messages))
    sender_width = max(len("SENDER"), *(len(m["sender"] or "<>") for m in messages))
    print(f"{'ID':<{id_width}}  {'AGE':>7}  {'SENDER':<{sender_width}}  RECIPIENTS")
    indent = " " * (id_width + 2 + 7 + 2 + sender_width + 2)
    for message in messages:
        age, sender = _age(message["age_seconds"]), message["sender"] or "<>"
        lead = f"{message['id']:<{id_width}}  {age:>7}  {sender:<{sender_width}}  "
        for position, r in enumerate(message["recipients"]):
            line = f"{r['address']}  {r['state']}  attempts={r['attempts']}"
            if r["last_error"]:
                line += f"  last error: {r['last_error']}"
            print((lead if position == 0 else indent) + line)
    print(f"{len(messages)} message(s)")


def _queue(args: argparse.Namespace) -> int:
    try:
        base = _admin_url(args.url, args.config)
        if args.queue_command == "list":
            messages = _admin_request(base, "GET", "/queue")
            if args.json:
                print(json.dumps(messages, indent=2))
            else:
                _print_queue(messages)
        elif args.queue_command == "retry":
            message = _admin_request(base, "POST", f"/queue/{urllib.parse.quote(args.id, safe='')}/retry")
            pending = sum(1 for r in message["recipients"] if r["state"] == "pending")
            print(f"{message['id']}: {pending} pending recipient(s) due now")
        else:
            message = _admin_request(base, "DELETE", f"/queue/{urllib.parse.quote(args.id, safe='')}")
            print(f"{message['id']}: deleted (no bounce sent)")
    except _AdminError as error:
        print(f"mailnode queue: {error}", file=sys.stderr)
        return 1
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
    queue = commands.add_parser("queue", help="list, retry or delete messages in a running node's outbound queue")
    queue_commands = queue.add_subparsers(dest="queue_command", required=True)
    where = argparse.ArgumentParser(add_help=False)
    target = where.add_mutually_exclusive_group()
    target.add_argument("--config", "-c", type=Path, help="node config (YAML): the admin port is listen.http")
    target.add_argument("--url", help=f"the node's admin URL (default {DEFAULT_ADMIN_URL})")
    queue_list = queue_commands.add_parser("list", parents=[where], help="show the queued messages")
    queue_list.add_argument("--json", action="store_true", help="print GET /queue as JSON")
    for name, text in (("retry", "try a message's pending recipients now"), ("delete", "drop a message, no bounce")):
        queue_commands.add_parser(name, parents=[where], help=text).add_argument("id", help="message id")
    args = parser.parse_args(argv)
    if args.command == "queue":
        try:
            return _queue(args)
        except ConfigError as error:
            print(f"mailnode: {error}", file=sys.stderr)
            return 2
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
