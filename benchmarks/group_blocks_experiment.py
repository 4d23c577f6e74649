"""Experiment (CUDA only): the grouped masked-loss forward's builds (2 or 3 resident blocks per SM, with or without
the L2 prefetch of its loss tiles), its loss tile size and its one-block tiles at the end of the schedule, side by
side.

    python benchmarks/group_blocks_experiment.py

Times the NYUv2-like batch of benchmarks/bandwidth.py (forward kernels alone and forward + backward, CUDA graph
replays, twice each for the spread) under each setting of CONFIGS (FASTMTL_CUDA_GROUP_BLOCKS,
FASTMTL_CUDA_GROUP_PREFETCH, FASTMTL_CUDA_GROUP_SMALL_TAIL, FASTMTL_CUDA_GROUP_TILE_KB), and checks each against the
torch backend on a fresh batch first. The default comes first and again last, so that a drift over the run shows.
The variables are unset for the run (each setting sets its own). Prints ms and the fraction of the measured copy
bandwidth.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bandwidth  # noqa: E402


# Each a setting of the experiment's variables ({}: the defaults, 3 blocks per SM, no prefetch, 48 KiB tiles all the way
# to the end of the schedule).
CONFIGS = (
    {},
    {"FASTMTL_CUDA_GROUP_BLOCKS": "2"},
    {"FASTMTL_CUDA_GROUP_PREFETCH": "1"},
    {"FASTMTL_CUDA_GROUP_PREFETCH": "1", "FASTMTL_CUDA_GROUP_BLOCKS": "2"},
    {"FASTMTL_CUDA_GROUP_PREFETCH": "1", "FASTMTL_CUDA_GROUP_TILE_KB": "96"},
    {"FASTMTL_CUDA_GROUP_PREFETCH": "1", "FASTMTL_CUDA_GROUP_BLOCKS": "2", "FASTMTL_CUDA_GROUP_TILE_KB": "96"},
    {"FASTMTL_CUDA_GROUP_SMALL_TAIL": "1"},
    {"FASTMTL_CUDA_GROUP_SMALL_TAIL": "1", "FASTMTL_CUDA_GROUP_PREFETCH": "1"},
    {"FASTMTL_CUDA_GROUP_SMALL_TAIL": "1", "FASTMTL_CUDA_GROUP_PREFETCH": "1", "FASTMTL_CUDA_GROUP_BLOCKS": "2"},
    {"FASTMTL_CUDA_GROUP_TILE_KB": "16"},
    {"FASTMTL_CUDA_GROUP_TILE_KB": "96"},
    {},
)


def parity(seed: int) -> float:
    """Largest relative error of the cuda backend's losses and gradients against the torch backend's."""
    import fastmtl

    g = torch.Generator(device="cuda").manual_seed(seed)
    n, h, w = 4, 96, 128
    preds = {
        "seg": torch.randn(n, 13, h, w, device="cuda", generator=g).bfloat16(),
        "depth": torch.randn(n, 1, h, w, device="cuda", generator=g).bfloat16(),
        "cls": torch.randn(n, 10, device="cuda", generator=g).bfloat16(),
    }
    targets = {
        "seg": torch.randint(-1, 13, (n, h, w), device="cuda", generator=g),
        "depth": torch.randn(n, 1, h, w, device="cuda", generator=g).bfloat16(),
        "cls": torch.randint(0, 10, (n,), device="cuda", generator=g),
    }
    targets["seg"][targets["seg"] < 0] = -100
    targets["depth"].view(-1)[::5] = float("nan")
    kinds = {"seg": "ce", "depth": "l1", "cls": "ce"}
    masks = {t: torch.rand(n, device="cuda", generator=g) > 0.3 for t in preds}
    out = {}
    for backend in ("torch", "cuda"):
        ps = {t: p.detach().clone().requires_grad_(True) for t, p in preds.items()}
        with fastmtl.use_backend(backend):
            total, per_task = fastmtl.masked_multitask_loss(ps, targets, kinds, masks)
        grads = torch.autograd.grad(total, list(ps.values()))
        out[backend] = [total, *per_task.values(), *grads]
    err = 0.0
    for a, b in zip(out["cuda"], out["torch"]):
        a, b = a.double(), b.double()
        err = max(err, ((a - b).norm() / b.norm().clamp_min(1e-30)).item())
    return err


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 0
    from fastmtl.testing import graph_replay_ms

    copy = bandwidth.copy_bandwidth()
    shape, nbytes, cases = bandwidth.loss_cases()
    names = ["cuda masked_multitask_loss_forward (fwd kernels), graph", "cuda masked_multitask_loss fwd+bwd, graph"]
    print(f"copy {copy:.0f} GB/s; {shape}; {nbytes / 1e6:.1f} MB")
    for k in {k for config in CONFIGS for k in config}:  # a value left in the shell would skew the defaults
        os.environ.pop(k, None)
    for seed, config in enumerate(CONFIGS):
        os.environ.update(config)
        label = " ".join(f"{k}={v}" for k, v in config.items()) or "default"
        try:
            print(f"{label}: parity vs torch (bf16) max rel err {parity(seed):.2e}")
            for name in names:
                times = [graph_replay_ms(cases[name][1]) for _ in range(2)]
                pct = [100 * nbytes / t / 1e6 / copy for t in times]
                print(f"  {name:58s} {times[0]:.4f} / {times[1]:.4f} ms  {pct[0]:.1f} / {pct[1]:.1f}% of copy")
        finally:
            for k in config:
                os.environ.pop(k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
