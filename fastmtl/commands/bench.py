"""``fastmtl bench``: placeholder, filled in below."""


def add_parser(sub):
    """Register the subcommand."""
    p = sub.add_parser("bench", help="quick side-by-side timing of the fused ops against eager PyTorch")
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    p.set_defaults(run=run)


def run(args) -> int:
    """Not implemented yet."""
    return 0
