"""The `mailfleet` command: `crds` prints the CustomResourceDefinitions (`--write DIR` writes one file per
CRD, as `make crds` does for crds/); `render` prints the objects the operator would apply for MailDomain,
Mailbox and Secret files; `local up` runs those files as local mail node processes (mailfleet.local).
Both read the files through mailfleet.files. `operator` runs the kopf operator (mailfleet.handlers) with
the options declared in mailfleet.options."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import sys
from pathlib import Path
from typing import Final

import kopf

from mailfleet import crds, files, handlers, keys, local, options, specs

DEFAULT_IMAGE = specs.common.DEFAULT_IMAGE


def _crds(write: Path | None) -> int:
    if write is None:
        sys.stdout.write(crds.render_stream())
        return 0
    for path in crds.write(write):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def render_files(paths: list[Path], *, image: str, dkim_key: Path | None = None) -> str:
    """The multi-document YAML `mailfleet render` prints; the DNS records to publish follow as comments."""
    parts: list[str] = []
    comments: list[str] = []
    for resolved in files.resolve(files.load(paths), paths):
        domain = resolved.domain
        private_key = files.dkim_key(dkim_key)
        try:
            rendered = specs.render(
                domain,
                resolved.mailboxes,
                resolved.passwords,
                image=image,
                dkim_private_key=private_key,
                relay_username=resolved.relay_username,
                internal_token=keys.new_internal_token(),  # made for each run, like a DKIM key not given
            )
        except ValueError as error:
            raise files.RenderError(f"{resolved.path}: MailDomain {domain.metadata.name}: {error}") from error
        parts += [specs.dump(obj) for obj in rendered.in_apply_order()]
        record = files.dkim_record(private_key, str(dkim_key or "generated DKIM key"))
        comments.append(f"# DNS records to publish for MailDomain {domain.metadata.name}:")
        comments += [f"#   {line}" for line in files.dns_lines(domain, dkim_record=record)]
    return "---\n" + "---\n".join(parts) + "\n".join(comments) + "\n"


def _render(args: argparse.Namespace) -> int:
    try:
        sys.stdout.write(render_files(args.file, image=args.image, dkim_key=args.dkim_key))
    except files.RenderError as error:
        print(f"mailfleet render: error: {error}", file=sys.stderr)
        return 1
    return 0


def _local_up(args: argparse.Namespace) -> int:
    try:
        nodes = local.prepare(args.file, base_port=args.base_port, state_dir=args.state_dir)
    except (files.RenderError, local.LocalError) as error:
        print(f"mailfleet local up: error: {error}", file=sys.stderr)
        return 1
    return local.run(nodes, out=sys.stdout, err=sys.stderr)


def _routine_success(record: logging.LogRecord) -> bool:
    """False for kopf's "Handler 'x' succeeded." line, logged at INFO for each watch event of each object:
    ten thousand Mailboxes make tens of thousands of them, and they say nothing a failure would not."""
    message = str(record.msg)
    routine = message.startswith(("Handler '", "Indexer '")) and message.endswith("' succeeded.")
    return not (record.levelno == logging.INFO and routine)


# glibc's malloc settings for the operator (mallopt(3); the numbers are malloc.h's), each unless its
# environment variable (MALLOC_ARENA_MAX, ...) is set. Two arenas, not eight per core: the operator's
# threads (kopf's executor, password hashing, DNS) allocate little, and every arena keeps its freed memory.
# Blocks of 128 KiB or more always mmap'd, and freed memory above 128 KiB given back: glibc otherwise raises
# both thresholds after the first large free (a reconcile's directory of ten thousand mailboxes is a few
# MiB of text, gzip and JSON), and each large buffer then stays in the heap after its reconcile.
_MALLOPT: Final = (
    ("MALLOC_ARENA_MAX", -8, 2),
    ("MALLOC_MMAP_THRESHOLD_", -3, 128 * 1024),
    ("MALLOC_TRIM_THRESHOLD_", -1, 128 * 1024),
)


def _tune_malloc() -> None:
    """Before any thread starts (arenas are made per thread). Nothing where there is no mallopt (not glibc)."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return
    for variable, parameter, value in _MALLOPT:
        if variable not in os.environ:
            mallopt(parameter, value)


def _operator(args: argparse.Namespace) -> int:
    _tune_malloc()
    operator = handlers.Operator(options.from_arguments(args))
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.FULL)
    if not args.verbose:  # --verbose: every line, as kopf logs it
        logging.getLogger("kopf.objects").addFilter(_routine_success)
    kopf.run(
        registry=operator.registry,
        standalone=True,  # one operator replica (the chart's Deployment); no peering resources needed
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mailfleet", description="The Mailfleet operator and its tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    crds_command = commands.add_parser("crds", help="print the CustomResourceDefinitions (YAML)")
    crds_command.add_argument(
        "--write", metavar="DIR", type=Path, help="write DIR/<plural>.mailfleet.io.yaml instead of printing"
    )
    render_command = commands.add_parser(
        "render",
        help="print the objects the operator would apply for MailDomain, Mailbox and Secret files",
        description=(
            "Read MailDomain, Mailbox and Secret objects (multi-document YAML) and print, as one YAML stream, "
            "the objects the operator would apply for every MailDomain with the Mailboxes of its namespace. "
            "Passwords come from the Secrets' stringData or data; plaintext values are hashed here with "
            "argon2id (as the operator does), so they never appear in the output. The DNS records to "
            "publish follow as comments."
        ),
    )
    render_command.add_argument(
        "-f", "--file", metavar="PATH", type=Path, action="append", required=True, help="a YAML file (repeatable)"
    )
    render_command.add_argument("--image", default=DEFAULT_IMAGE, help=f"mail node image (default {DEFAULT_IMAGE})")
    render_command.add_argument(
        "--dkim-key",
        metavar="PEM",
        type=Path,
        help="the domains' DKIM private key (RSA, PEM); a new key is made for each run when omitted",
    )
    local_command = commands.add_parser("local", help="run resource files as mail node processes on this machine")
    local_commands = local_command.add_subparsers(dest="local_command", required=True)
    up_command = local_commands.add_parser(
        "up",
        help="run the nodes of MailDomain, Mailbox and Secret files on 127.0.0.1 until interrupted",
        description=(
            "Render MailDomain, Mailbox and Secret files as the operator would (plaintext passwords hashed "
            "with argon2id) and run one `mailnode serve` process per MailDomain, in file order, on 127.0.0.1. "
            "Node i listens on N+10i (smtp), +1 (submission), +2 (submissions), +3 (imap), +4 (imaps) and "
            "+5 (http: health, metrics). Its files live in DIR/<MailDomain name>; a domain without its TLS "
            "Secret in the files gets the self-signed DIR/tls/cert.pem (for localhost, 127.0.0.1 and its mail "
            "host), and DKIM keys are made once and kept. Runs in the foreground: SIGINT (Ctrl-C) or SIGTERM "
            "stops every node and exits 0; a node that dies stops the others and exits 1."
        ),
    )
    up_command.add_argument(
        "-f", "--file", metavar="PATH", type=Path, action="append", required=True, help="a YAML file (repeatable)"
    )
    up_command.add_argument(
        "--base-port",
        metavar="N",
        type=options.port,
        default=local.DEFAULT_BASE_PORT,
        help=f"node i listens on N+10i to N+10i+5 (default {local.DEFAULT_BASE_PORT})",
    )
    up_command.add_argument(
        "--state-dir",
        metavar="DIR",
        type=Path,
        default=local.DEFAULT_STATE_DIR,
        help=f"configs, keys, certificates, mail and logs (default {local.DEFAULT_STATE_DIR})",
    )
    operator_command = commands.add_parser(
        "operator",
        help="run the operator: reconcile MailDomain and Mailbox resources (in a pod, or with a kubeconfig)",
        description=(
            "Run the Mailfleet operator until SIGINT or SIGTERM. It logs in with the pod's service account, "
            "or else with KUBECONFIG (or ~/.kube/config), watches MailDomain and Mailbox resources and the "
            "objects it owns, and reconciles each MailDomain into its mail nodes. The options with an "
            "environment variable ($NAME in their help) take their default from it when it is set."
        ),
    )
    operator_command.add_argument(
        "-n",
        "--namespace",
        metavar="NS",
        action="append",
        default=[],
        help="watch only this namespace (repeatable; kopf glob patterns such as 'mail-*' allowed); "
        "default: all namespaces",
    )
    operator_command.add_argument(
        "--liveness",
        metavar="URL",
        help="kopf's health endpoint, e.g. http://0.0.0.0:8081/healthz (default: none)",
    )
    options.add_arguments(operator_command)
    operator_command.add_argument("--verbose", action="store_true", help="log at debug level")
    args = parser.parse_args(argv)
    if args.command == "operator":
        return _operator(args)
    if args.command == "crds":
        return _crds(args.write)
    if args.command == "render":
        return _render(args)
    if args.command == "local":
        return _local_up(args)  # `up` is its only subcommand
    parser.error(f"unknown command {args.command}")  # argparse has refused it already; this is for mypy


if __name__ == "__main__":
    sys.exit(main())
