"""Subcommands of the ``fastmtl`` CLI: each module has ``add_parser(subparsers)`` and ``run(args) -> int``."""

COMMANDS = ("info", "train", "bench")


def check_device(parser, name: str):
    """The ``torch.device`` that ``--device NAME`` names; exits with code 2 through ``parser.error`` unless it is
    the CPU or a visible CUDA device."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as e:
        parser.error(f"--device {name}: {e}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {name}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: no CUDA device is visible")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device
