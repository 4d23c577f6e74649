"""``fastmtl train``: placeholder until the training issue lands."""


def add_parser(sub):
    """Register the subcommand."""
    p = sub.add_parser("train", help="train a multi-task model (not implemented yet)")
    p.set_defaults(run=run)


def run(args) -> int:
    """Not implemented yet."""
    print("fastmtl train: not implemented yet")
    return 1
