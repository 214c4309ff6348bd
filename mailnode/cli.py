"""The `mailnode` command: `serve --config FILE` runs a node; `hash-password` prints an argon2id hash
of a password read from standard input; `dkim-keygen` and `dkim-record` make a domain's DKIM key and
print the DNS record to publish; `queue list | retry ID | delete ID` show and change a running node's
outbound queue through its admin HTTP endpoints (which accept changes only from loopback, with the
domain's internal token: read from the node config's internal.token_file, or --token-file). The node
config is --config, else $MAILNODE_CONFIG (set in the node's pods, so `kubectl exec` needs no options).

Backups (docs/backups.md, "Commands"): `backup --to FILE|DIR` streams a running node's GET /backup into a
file, checking the archive as it arrives; `verify FILE` checks an archive on its own; `restore --from
FILE --data-dir DIR` restores a whole (stopped) node, and `restore --from FILE --mailbox ADDRESS [--as
ADDRESS]` one mailbox into the running node (POST /restore). Progress goes to stderr when it is a
terminal; the archive work itself is mailnode.backup.archive's. The admin endpoints' JSON is read and
written with mailwire.admin's models."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import getpass
import http.client
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO, Final, TypeVar, cast

import pydantic

from mailnode import dkim, logs, passwords
from mailnode.backup import archive, noderestore, tarcodec
from mailnode.config import ConfigError, load_node_config, read_internal_token, read_token_file
from mailnode.node import Node
from mailnode.store import durable
from mailwire import admin


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
# The node config the commands that talk to a running node read when --config is not given.
CONFIG_ENV: Final = "MAILNODE_CONFIG"


@dataclasses.dataclass(frozen=True)
class _Target:
    """A running node's admin port: its base URL, and the internal token its changes need (None: the
    node has none, and accepts changes from loopback clients only)."""

    base: str
    token: str | None


def _admin_target(args: argparse.Namespace) -> _Target:
    """--url, else the config's listen.host and listen.http (a wildcard host means this machine's
    loopback), else DEFAULT_ADMIN_URL; the token of --token-file, else the config's internal.token_file.
    The config is --config, else $MAILNODE_CONFIG."""
    config_path = args.config or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    config = None if config_path is None else load_node_config(config_path)
    token = read_token_file(args.token_file, what="--token-file") if args.token_file is not None else None
    if token is None and config is not None:
        token = read_internal_token(config)
    if args.url:
        return _Target(args.url.rstrip("/"), token)
    if config is None:
        return _Target(DEFAULT_ADMIN_URL, token)
    listen = config.listen
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(listen.host, listen.host)
    if ":" in host:
        host = f"[{host}]"
    return _Target(f"http://{host}:{listen.http}", token)


class _AdminError(Exception):
    """A request to the node's admin endpoints failed; the message says why, for stderr."""


def _admin_open(
    target: _Target, method: str, path: str, *, body: admin.Message | None = None, timeout: float = 30
) -> http.client.HTTPResponse:
    """A 2xx answer of the node, for the caller to read (and close). `timeout` bounds each wait for the
    node (connecting, each read), not the whole exchange."""
    base = target.base
    data = None if body is None else json.dumps(body.to_json()).encode()
    headers = {} if body is None else {"Content-Type": "application/json"}
    if target.token is not None:
        headers["Authorization"] = f"Bearer {target.token}"  # RFC 6750 §2.1
    request = urllib.request.Request(f"{base}{path}", data=data, headers=headers, method=method)
    try:
        response: http.client.HTTPResponse = urllib.request.urlopen(request, timeout=timeout)
        return response
    except urllib.error.HTTPError as error:
        answer = error.read()
        try:
            detail = admin.Error.model_validate_json(answer).error
        except ValueError:  # pydantic.ValidationError too: not the node's {"error"}
            detail = answer.decode(errors="replace").strip() or error.reason
        raise _AdminError(f"{method} {base}{path}: {error.code} {detail}") from error
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise _AdminError(f"cannot reach the node at {base}: {reason}") from error


Answer = TypeVar("Answer")


def _admin_request(
    target: _Target,
    method: str,
    path: str,
    answer: pydantic.TypeAdapter[Answer],
    *,
    body: admin.Message | None = None,
    timeout: float = 30,
) -> Answer:
    """The node's answer, read as `answer` (a mailwire.admin model)."""
    base = target.base
    try:
        with _admin_open(target, method, path, body=body, timeout=timeout) as response:
            data = response.read()
    except (OSError, http.client.HTTPException) as error:
        raise _AdminError(f"{method} {base}{path}: the answer broke off: {error}") from error
    try:
        return answer.validate_json(data)
    except pydantic.ValidationError as error:
        if any(problem["type"] == "json_invalid" for problem in error.errors()):
            raise _AdminError(f"{method} {base}{path}: not a JSON answer") from error
        raise _AdminError(f"{method} {base}{path}: an unexpected answer: {admin.problem(error)}") from error


_MESSAGE: Final = pydantic.TypeAdapter(admin.QueuedMessage)
_RESTORED: Final = pydantic.TypeAdapter(admin.Restored)


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _print_queue(messages: list[admin.QueuedMessage]) -> None:
    if not messages:
        print("The queue is empty.")
        return
    id_width = max(len("ID"), *(len(m.id) for m in messages))
    sender_width = max(len("SENDER"), *(len(m.sender or "<>") for m in messages))
    print(f"{'ID':<{id_width}}  {'AGE':>7}  {'SENDER':<{sender_width}}  RECIPIENTS")
    indent = " " * (id_width + 2 + 7 + 2 + sender_width + 2)
    for message in messages:
        age, sender = _age(message.age_seconds), message.sender or "<>"
        lead = f"{message.id:<{id_width}}  {age:>7}  {sender:<{sender_width}}  "
        for position, r in enumerate(message.recipients):
            line = f"{r.address}  {r.state}  attempts={r.attempts}"
            if r.home is not None:
                line += f"  to node {r.home}"
            if r.last_error:
                line += f"  last error: {r.last_error}"
            print((lead if position == 0 else indent) + line)
    print(f"{len(messages)} message(s)")


def _queue(args: argparse.Namespace) -> int:
    try:
        target = _admin_target(args)
        if args.queue_command == "list":
            messages = _admin_request(target, "GET", "/queue", admin.QUEUE)
            if args.json:
                print(json.dumps(admin.QUEUE.dump_python(messages, mode="json"), indent=2))
            else:
                _print_queue(messages)
        elif args.queue_command == "retry":
            message = _admin_request(target, "POST", f"/queue/{urllib.parse.quote(args.id, safe='')}/retry", _MESSAGE)
            pending = sum(1 for r in message.recipients if r.state == "pending")
            print(f"{message.id}: {pending} pending recipient(s) due now")
        else:
            message = _admin_request(target, "DELETE", f"/queue/{urllib.parse.quote(args.id, safe='')}", _MESSAGE)
            print(f"{message.id}: deleted (no bounce sent)")
    except _AdminError as error:
        print(f"mailnode queue: {error}", file=sys.stderr)
        return 1
    return 0


# -- backups --------------------------------------------------------------------------------------------

BACKUP_TIMEOUT = 600  # seconds the node may take to answer: a checkpoint, then staging every file
RESTORE_TIMEOUT = 3600  # POST /restore answers once every message is in


class _Meter:
    """Progress as one updating line on stderr, only when stderr is a terminal; `clear` removes it."""

    def __init__(self, verb: str) -> None:
        self._verb = verb
        self._shown = False
        self._enabled = sys.stderr.isatty()
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self._enabled or now - self._last < 0.2:
            return
        self._last = now
        line = f"{self._verb} {_megabytes(done)}"
        if total:
            line += f" of {_megabytes(total)} ({min(100, done * 100 // total)}%)"
        sys.stderr.write(f"\r{line}\x1b[K")
        sys.stderr.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._shown = False


def _megabytes(size: int) -> str:
    return f"{size / 1_000_000:.1f} MB"


def _when(summary: archive.Summary) -> str:
    return summary.point_in_time.isoformat()


def _archive_name(node: str, point_in_time: datetime.datetime) -> str:
    stamp = point_in_time.astimezone(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"mailnode-{node.replace('/', '_')}-{stamp}.tar"


def _backup(args: argparse.Namespace) -> int:
    target = Path(args.to)
    into_dir = target.is_dir()
    if not into_dir and args.to.endswith(("/", os.sep)):  # a directory, by its trailing slash: made if missing
        try:
            durable.ensure_dir(target)
        except OSError as error:
            print(f"mailnode backup: cannot make the directory {target}: {error.strerror}", file=sys.stderr)
            return 1
        into_dir = True
    if not into_dir and target.exists():
        print(f"mailnode backup: {target} exists; not overwriting a backup", file=sys.stderr)
        return 1
    if not into_dir and not target.parent.is_dir():
        print(f"mailnode backup: no directory {target.parent}", file=sys.stderr)
        return 1
    node = _admin_target(args)
    base = node.base
    meter = _Meter("received")
    try:
        with _admin_open(node, "GET", "/backup", timeout=BACKUP_TIMEOUT) as response:
            final = target if not into_dir else _named_by_headers(target, response)
            unnamed = final or target / f"mailnode-backup-{os.getpid()}.tar"  # named once the archive is in
            partial = unnamed.with_name(f"{unnamed.name}.partial")
            compress = not into_dir and tarcodec.is_compressed(target)
            try:
                summary = _receive(response, partial, base=base, meter=meter, compress=compress)
                final = final or target / _archive_name(summary.node, summary.point_in_time)
                if into_dir and final.exists():
                    raise FileExistsError(f"{final} exists; not overwriting a backup")
                partial.replace(final)
                durable.fsync_dir(final.parent)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
    except (_AdminError, archive.ArchiveError) as error:
        meter.clear()
        print(f"mailnode backup: {error}", file=sys.stderr)
        return 1
    except http.client.HTTPException as error:  # the node ended the answer early (IncompleteRead)
        meter.clear()
        print(f"mailnode backup: GET {base}/backup: the archive broke off: {error!r}", file=sys.stderr)
        return 1
    except OSError as error:
        meter.clear()
        print(f"mailnode backup: {error}", file=sys.stderr)
        return 1
    meter.clear()
    print(
        f"wrote {final}: {len(summary.mailboxes)} mailboxes, {summary.messages} messages, "
        f"{final.stat().st_size} bytes, point in time {_when(summary)}"
    )
    return 0


def _named_by_headers(directory: Path, response: http.client.HTTPResponse) -> Path | None:
    """DIR/mailnode-<node>-<time>.tar from the answer's headers, or None to name it after the archive's
    own header once it is in."""
    node, written = response.headers.get(admin.NODE_HEADER), response.headers.get(admin.POINT_IN_TIME_HEADER)
    try:
        return directory / _archive_name(node, datetime.datetime.fromisoformat(written)) if node and written else None
    except ValueError:
        return None


def _receive(
    response: http.client.HTTPResponse, partial: Path, *, base: str, meter: _Meter, compress: bool
) -> archive.Summary:
    """The archive from the node into `partial` (gzipped if `compress`), checked as it arrives, then
    fsynced."""
    try:  # X-Mailfleet-Bytes counts the files; each adds a tar header and on average half a block
        total = int(response.headers.get(admin.BYTES_HEADER) or 0)
        total += 768 * int(response.headers.get(admin.MESSAGES_HEADER) or 0)
    except ValueError:
        total = 0
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as file:
        sink = tarcodec.compressing(file) if compress else file
        summary = archive.receive(
            cast(BinaryIO, response), cast(BinaryIO, sink), label=f"GET {base}/backup", progress=meter, total=total
        )
        if sink is not file:
            sink.close()
        file.flush()
        os.fsync(file.fileno())
    return summary


def _verify(path: Path) -> int:
    meter = _Meter("checked")
    try:
        summary = archive.verify(path, progress=meter)
    except archive.ArchiveError as error:
        meter.clear()
        print(f"mailnode verify: {error}", file=sys.stderr)
        return 1
    meter.clear()
    print(
        f"{path}: OK — {len(summary.mailboxes)} mailboxes, {summary.messages} messages, queue {summary.queued}, "
        f"point in time {_when(summary)}"
    )
    return 0


def _restore(args: argparse.Namespace) -> int:
    source: Path = args.source
    if args.data_dir is not None:
        meter = _Meter("restored")
        try:
            summary = noderestore.restore_node(source, args.data_dir, progress=meter)
        except (archive.ArchiveError, OSError) as error:
            meter.clear()
            print(f"mailnode restore: {error}", file=sys.stderr)
            return 1
        meter.clear()
        print(
            f"restored {source} into {args.data_dir}: {len(summary.mailboxes)} mailboxes, {summary.messages} "
            f"messages, queue {summary.queued}, point in time {_when(summary)}"
        )
        return 0
    body = admin.RestoreRequest(
        archive=str(source.absolute()), mailbox=args.mailbox, as_=args.as_address or args.mailbox
    )
    try:
        target = _admin_target(args)
        result = _admin_request(target, "POST", "/restore", _RESTORED, body=body, timeout=RESTORE_TIMEOUT)
        print(f"restored {result.restored} messages into {result.mailbox} ({result.skipped} already there)")
        if result.dav_restored or result.dav_kept:
            print(f"restored {result.dav_restored} calendar and contact files ({result.dav_kept} already there)")
    except _AdminError as error:
        print(f"mailnode restore: {error}", file=sys.stderr)
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
    where.add_argument(
        "--config",
        "-c",
        type=Path,
        help=f"node config (YAML): admin port listen.http, token internal.token_file (default ${CONFIG_ENV})",
    )
    where.add_argument("--url", help=f"the node's admin URL (default: the config's, else {DEFAULT_ADMIN_URL})")
    where.add_argument(
        "--token-file",
        type=Path,
        help="the domain's internal token, for a node that --url names (Secret <domain>-internal)",
    )
    queue_list = queue_commands.add_parser("list", parents=[where], help="show the queued messages")
    queue_list.add_argument("--json", action="store_true", help="print GET /queue as JSON")
    for name, text in (("retry", "try a message's pending recipients now"), ("delete", "drop a message, no bounce")):
        queue_commands.add_parser(name, parents=[where], help=text).add_argument("id", help="message id")
    backup = commands.add_parser("backup", parents=[where], help="write a running node's archive to a file")
    backup.add_argument(
        "--to",
        required=True,
        help="the archive file (.tar, or .tar.gz / .tgz), or a directory for it (an existing one, or any path"
        " ending in /)",
    )
    verify = commands.add_parser("verify", help="check an archive: every SHA-256, nothing missing or extra")
    verify.add_argument("file", type=Path)
    restore = commands.add_parser(
        "restore", parents=[where], help="restore a whole node (stopped) or one mailbox (into the running node)"
    )
    restore.add_argument("--from", dest="source", type=Path, required=True, help="the archive")
    what = restore.add_mutually_exclusive_group(required=True)
    what.add_argument("--data-dir", type=Path, help="restore the whole node into this data directory (without mail)")
    what.add_argument("--mailbox", help="restore this mailbox of the archive into the running node")
    restore.add_argument("--as", dest="as_address", help="into this mailbox of the node (default: --mailbox)")
    args = parser.parse_args(argv)
    if (
        args.command == "restore"
        and args.data_dir is not None
        and (args.as_address or args.url or args.config or args.token_file)
    ):
        restore.error("--as, --url, --config and --token-file go with --mailbox")
    if args.command in ("queue", "backup", "restore"):
        run = {"queue": _queue, "backup": _backup, "restore": _restore}[args.command]
        try:
            return run(args)
        except ConfigError as error:
            print(f"mailnode: {error}", file=sys.stderr)
            return 2
    if args.command == "verify":
        return _verify(args.file)
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
