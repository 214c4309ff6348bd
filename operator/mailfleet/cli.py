"""The `mailfleet` command. For now: `crds` prints the CustomResourceDefinitions (`--write DIR` writes
one file per CRD, as `make crds` does for crds/). `operator`, `render` and `local up` come with the
operator issue."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mailfleet import crds


def _crds(write: Path | None) -> int:
    if write is None:
        sys.stdout.write(crds.render_stream())
        return 0
    for path in crds.write(write):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mailfleet", description="The Mailfleet operator and its tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    crds_command = commands.add_parser("crds", help="print the CustomResourceDefinitions (YAML)")
    crds_command.add_argument(
        "--write", metavar="DIR", type=Path, help="write DIR/<plural>.mailfleet.io.yaml instead of printing"
    )
    args = parser.parse_args(argv)
    if args.command == "crds":
        return _crds(args.write)
    parser.error(f"unknown command {args.command}")  # argparse has refused it already; this is for mypy


if __name__ == "__main__":
    sys.exit(main())
