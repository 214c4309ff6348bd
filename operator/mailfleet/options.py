"""The operator's options, each declared once, as a field of `OperatorOptions`: its name, type and default,
and for those `mailfleet operator` takes, its `Flag` (environment variable, help). cli.py derives the
command-line options and their environment defaults from these fields (`add_arguments`, `from_arguments`);
handlers.Operator reads the typed, frozen result; tests build one directly."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

from mailfleet import nodes, specs
from mailfleet.reconcile import backup

T = TypeVar("T")

# Where Kubernetes tells a pod its own namespace (with its service account token).
SERVICE_ACCOUNT_NAMESPACE: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def port(value: str) -> int:
    """A TCP port number, as argparse's `type`: a clear error for anything else."""
    number = int(value)
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (1-65535)")
    return number


@dataclasses.dataclass(frozen=True)
class Flag:
    """How an option appears on the command line: `--<field name with dashes>`, with its default taken
    from `env` when that is set (argparse parses a string default as it parses the argument)."""

    env: str
    help: str
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None  # default: the type of the default value
    shown_default: str | None = None  # what the help says when the default value says nothing (None)


def _flag(default: T, **flag: Any) -> T:
    """A field of OperatorOptions that `mailfleet operator` takes as an option."""
    return dataclasses.field(default=default, metadata={"flag": Flag(**flag)})


@dataclasses.dataclass(frozen=True, kw_only=True)
class OperatorOptions:
    """How the operator runs. The fields with a Flag are `mailfleet operator` options; the others are for
    tests and benchmarks, which build OperatorOptions themselves."""

    image: str = _flag(specs.common.DEFAULT_IMAGE, env="MAILFLEET_NODE_IMAGE", help="mail node image")
    metrics_port: int | None = _flag(
        None,
        env="MAILFLEET_METRICS_PORT",
        metavar="PORT",
        parse=port,
        shown_default="not served",
        help="serve Prometheus metrics on :PORT/metrics",
    )
    resync: float = _flag(
        300.0, env="MAILFLEET_RESYNC", metavar="SECONDS", help="reconcile every MailDomain this often, changed or not"
    )
    usage_interval: float = _flag(
        60.0,
        env="MAILFLEET_USAGE_INTERVAL",
        metavar="SECONDS",
        help="copy each mailbox's usage from its node into the Mailbox status this often; 0: never",
    )
    schedule_interval: float = _flag(
        30.0,
        env="MAILFLEET_SCHEDULE_INTERVAL",
        metavar="SECONDS",
        help="look this often for scheduled backups that are due, old backups to delete and stale ones; 0: never",
    )
    node_url: str = _flag(
        nodes.IN_CLUSTER,
        env="MAILFLEET_NODE_URL",
        metavar="TEMPLATE",
        help="where node <ordinal> of a MailDomain answers, with {pod} {ordinal} {service} {namespace} {name}",
    )
    operator_namespace: str | None = _flag(
        None,
        env="MAILFLEET_OPERATOR_NAMESPACE",
        metavar="NAMESPACE",
        parse=str,
        shown_default="the operator pod's own",
        help="the namespace the operator runs in: the nodes' NetworkPolicy admits the operator's pods from there",
    )

    metrics_host: str = "0.0.0.0"
    workers: int = 4  # reconciles at a time
    delay: float = 0.2  # seconds a changed domain waits for more changes before its reconcile
    backup_hold: int = backup.Settings.hold  # seconds a node holds writes while its VolumeSnapshot is cut
    backup_poll: float = backup.Settings.poll  # seconds between looks at a VolumeSnapshot or an archive
    backup_attempts: int = backup.Settings.attempts  # tries of a node that does not answer
    backup_retry: float = backup.Settings.retry  # seconds before the second try, doubled for each next one


def own_namespace(options: OperatorOptions, *, path: Path = SERVICE_ACCOUNT_NAMESPACE) -> str | None:
    """The operator's namespace: --operator-namespace, else the one its pod runs in (read from `path`),
    else None (run outside a cluster without the option)."""
    if options.operator_namespace:
        return options.operator_namespace
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _flags() -> list[tuple[dataclasses.Field[Any], Flag]]:
    return [
        (field, field.metadata["flag"]) for field in dataclasses.fields(OperatorOptions) if "flag" in field.metadata
    ]


def environment_variables() -> list[str]:
    """The environment variables the options read, in their order."""
    return [flag.env for _, flag in _flags()]


def add_arguments(parser: argparse.ArgumentParser, *, environ: Mapping[str, str] = os.environ) -> None:
    """One option per Flag field; an environment variable that is set replaces the declared default."""
    for field, flag in _flags():
        default = environ.get(flag.env) or field.default
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            metavar=flag.metavar,
            type=flag.parse or type(field.default),
            default=default,
            help=f"{flag.help} (default {_shown(default, flag)}; ${flag.env})".replace("%", "%%"),
        )


def _shown(default: object, flag: Flag) -> str:
    if default is None:
        return flag.shown_default or "none"
    return f"{default:g}" if isinstance(default, float) else str(default)


def from_arguments(args: argparse.Namespace) -> OperatorOptions:
    """The options `add_arguments` parsed; the other fields keep their defaults."""
    return OperatorOptions(**{field.name: getattr(args, field.name) for field, _ in _flags()})
