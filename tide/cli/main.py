"""Entry point of the ``tide`` console script."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from tide import __version__
from tide.errors import TideError

# Subcommand modules, in the order ``tide --help`` lists them.
COMMAND_MODULES = ("spec", "hw", "trace", "simulate", "generate", "plan", "sweep", "calibrate", "validate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tide",
        description="Lossless inference, simulation and planning for mixture-of-experts diffusion LLMs.",
    )
    parser.add_argument("--version", action="version", version=f"tide {__version__}")
    parser.add_argument("--log-level", default="WARNING", help="logging level on standard error (default: WARNING)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"tide.cli.{name}_cmd")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except TideError as error:
        print(f"tide {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tide {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
