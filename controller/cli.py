"""The `throttllem` command: one entry point, one subcommand module per area."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import (
    cli_clockd,
    cli_controller,
    cli_demo,
    cli_model,
    cli_replay,
    cli_serve,
    cli_simulate,
    cli_twin,
)

# Exit status for bad command-line input, as argparse uses.
EXIT_USAGE = 2


class OneLineErrorParser(argparse.ArgumentParser):
    """Bad arguments get one line naming the problem (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="throttllem",
        description="SLO-aware GPU clock and instance scaling for LLM inference on Triton.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cli_twin.add_parser(sub)
    cli_serve.add_parser(sub)
    cli_clockd.add_parser(sub)
    cli_model.add_parsers(sub)
    cli_simulate.add_parser(sub)
    cli_controller.add_parser(sub)
    cli_demo.add_parser(sub)
    cli_replay.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
