"""Where the time of one conv_bias_relu training step goes on CUDA: device time per kernel, per variant.

    python benchmarks/profile_conv.py [--shape 32,32,64,64,64] [--steps 20]

Runs forward + backward (to x, weight and bias) of eager ``relu(conv2d)`` and of fastmtl's CUDA choices
(``cuda:library`` = cuDNN's fused convolution + bias + ReLU, ``cuda:implicit_gemm`` = our tensor-core kernel, both
with our fused backward epilogue), bf16 channels_last (input and weight), under ``torch.profiler``; prints each
variant's kernels with their mean device time per step, and the host time per step (launches queued without
waiting). This explains the ratios of ``bench_conv_bias_relu.py``; it is not a benchmark itself.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profiling import profile_variant  # noqa: E402  (benchmarks/profiling.py, beside this file)


def _step(variant, x, w, b, grad):
    if variant == "eager":
        y = torch.relu(F.conv2d(x, w, b, 1, 1))
    else:
        algo = variant.split(":")[1]
        y = torch.ops.fastmtl.conv_bias_relu(x, w, b, [1, 1], [1, 1], [1, 1], 1, algo)
    return torch.autograd.grad(y, (x, w, b), grad)


def main(argv=None) -> int:
    """Print a per-kernel table for each variant."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="32,32,64,64,64", help="N,C_in,H,W,C_out (3x3 kernel, padding 1)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_conv.py needs a CUDA GPU")
        return 0
    import fastmtl  # noqa: F401  (registers the ops)

    n, c_in, h, w_, c_out = (int(v) for v in args.shape.split(","))
    torch.manual_seed(0)
    x = torch.randn(n, c_in, h, w_, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(c_out, c_in, 3, 3, device="cuda") / (9 * c_in) ** 0.5).to(torch.bfloat16)
    w = w.contiguous(memory_format=torch.channels_last)  # as model.to(memory_format=torch.channels_last) leaves it
    b = (torch.randn(c_out, device="cuda") * 0.1).to(torch.bfloat16)
    for t in (x, w, b):
        t.requires_grad_(True)
    grad = torch.randn(n, c_out, h, w_, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last
    )
    for variant in ("eager", "cuda:library", "cuda:implicit_gemm"):
        profile_variant(variant, f"fwd+bwd ({args.shape}, bf16 channels_last)",
                        lambda: functools.partial(_step, variant, x, w, b, grad), args.steps)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
