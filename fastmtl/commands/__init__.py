"""Subcommands of the ``fastmtl`` CLI: each module has ``add_parser(subparsers)`` and ``run(args) -> int``."""

COMMANDS = ("info", "train", "bench")
