"""The `throttllem` command: one entry point, one subcommand module per area."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import cli_twin

# Exit status for bad command-line input, as argparse uses.
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="throttllem",
        description="SLO-aware GPU clock and instance scaling for LLM inference on Triton.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cli_twin.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
