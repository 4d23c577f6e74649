"""Where the time of one masked_multitask_loss forward + backward goes on CUDA: kernels, launches, host time.

    python benchmarks/profile_loss.py [--size 8,288,384] [--dtype bfloat16] [--steps 20]

Profiles the NYUv2-like 4-task batch of ``bench_masked_loss.py`` (the same tensors) for the eager masked-sum form
a user would write and for fastmtl's torch, cuda and triton backends: per kernel, its mean device time and launches
per step; per variant, the totals and the host time per step (launches queued without waiting). This explains the
ratios of ``bench_masked_loss.py`` and the bandwidth rows of ``bandwidth.py``; it is not a benchmark itself.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_masked_loss as bench  # noqa: E402  (beside this file: the batch and the eager form)
from profiling import profile_variant  # noqa: E402


def main(argv=None) -> int:
    """Print a per-kernel table for each variant."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="8,288,384", help="N,H,W")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_loss.py needs a CUDA GPU")
        return 0
    n, h, w = (int(v) for v in args.size.split(","))
    preds, targets, masks = bench.make_batch("cuda", n, h, w, getattr(torch, args.dtype))
    for variant in ("eager", "torch", "cuda", "triton"):
        ok, why = bench._available(variant, "cuda")
        if not ok:
            print(f"\n{variant}: not available ({why})")
            continue
        profile_variant(variant, f"fwd+bwd (nyu4 {args.size}, {args.dtype})",
                        lambda: bench.make_step(variant, preds, targets, masks), args.steps)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
