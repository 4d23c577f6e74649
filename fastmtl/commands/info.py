"""``fastmtl info``: version, torch, build flags, and each backend's status."""

from __future__ import annotations

import os
import platform


def add_parser(sub):
    """Register the subcommand."""
    p = sub.add_parser("info", help="show versions, build flags and backend availability")
    p.set_defaults(run=run)


def run(args) -> int:
    """Print the report."""
    import torch

    import fastmtl
    from fastmtl import autotune, backends

    print(f"fastmtl {fastmtl.__version__}")
    print(f"python  {platform.python_version()}  ({platform.machine()})")
    print(f"torch   {torch.__version__}  (CUDA {torch.version.cuda or 'none'}, {torch.get_num_threads()} CPU threads)")
    try:
        import triton

        print(f"triton  {triton.__version__}")
    except ImportError:
        print("triton  not installed")
    if torch.cuda.is_available():
        print(f"GPU     {torch.cuda.get_device_name()} (capability {'.'.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        print("GPU     none visible")
    print(f"build   CPU extension: {'yes' if fastmtl._native.has_cpp() else 'no'}; "
          f"CUDA extension: {'yes' if fastmtl._native.has_cuda_build() else 'no'}; OpenMP; oneDNN: "
          f"{'yes' if torch.backends.mkldnn.is_available() else 'no'}")
    print(f"backend selected: {backends.current_backend()} (FASTMTL_BACKEND={os.environ.get('FASTMTL_BACKEND', '')!r})")
    print("backends:")
    for name, (ok, why) in backends.backend_status().items():
        print(f"  {name:7s} {'yes' if ok else 'no ':3s}  {why}")
    choices = autotune.cached_choices()
    try:
        measured_by = f"by {autotune.metric()} time"
    except ValueError as err:
        measured_by = str(err)
    state = f"on, {measured_by}" if autotune.enabled() else "off (FASTMTL_AUTOTUNE=0)"
    print(f"autotune: {state}, {len(choices)} cached choice(s)")
    for key, choice in sorted(choices.items()):
        print(f"  {choice:7s} <- {key}")
    return 0
