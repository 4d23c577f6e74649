"""The ``fastmtl`` command line: ``fastmtl info | train | bench``."""

from __future__ import annotations

import argparse
import importlib
import sys

from fastmtl.commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per module of :mod:`fastmtl.commands`."""
    parser = argparse.ArgumentParser(prog="fastmtl", description="Fast multi-task learning for CNNs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"fastmtl.commands.{name}")
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code (2 for bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
