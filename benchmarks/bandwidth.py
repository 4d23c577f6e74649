"""Achieved memory bandwidth of fastmtl's memory-bound kernels against the measured copy bandwidth (CUDA only).

    python benchmarks/bandwidth.py [--json OUT.json] [-k SUBSTRING]

Bytes counted are the fewest each op must move: every input read once, every output written once. The copy
bandwidth is measured here, on the same card, as (bytes read + bytes written) / time of a large device copy.
Rows marked "graph" time the replay of a CUDA graph holding the calls (device time without launch gaps and host
overhead); the others time eager calls back to back with CUDA events (host overhead counts where it exceeds the
device time).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def median_ms(fn) -> float:
    """Median time of ``fn()`` in ms, with CUDA events (fastmtl.autotune's timer, with more repeats)."""
    from fastmtl.autotune import time_ms

    return time_ms(fn, warmup=5, repeat=30)


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, counting read + write."""
    src = torch.randn(256 * 2**20, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.nbytes / ms / 1e6


def epilogue_cases():
    """relu_bias_grad: read grad_y and y, write grad_z (the bias sums are negligible)."""
    import fastmtl  # noqa: F401  (loads the ops)

    shape = (32, 64, 128, 128)
    y = torch.relu(torch.randn(shape, device="cuda", dtype=torch.bfloat16)).contiguous(memory_format=torch.channels_last)
    gy = torch.randn_like(y)
    nbytes = 3 * y.nbytes
    cases = {"cuda relu_bias_grad": lambda: torch.ops.fastmtl.relu_bias_grad(gy, y, True)}
    try:
        from fastmtl.kernels import conv_bias_relu as tk

        cases["triton relu_bias_grad"] = lambda: tk.relu_bias_grad(gy, y, True)
    except (ImportError, AttributeError):
        pass
    cases["eager (grad*(y>0), sum)"] = lambda: (lambda gz: (gz, gz.sum(dim=(0, 2, 3))))(gy * (y > 0))
    for name in list(cases):
        cases[f"{name}, graph"] = ("graph", cases[name])
    return f"{list(shape)} bf16 channels_last", nbytes, cases


def loss_cases():
    """The NYUv2-like 4-task batch: read preds and targets, write the gradients (forward + backward)."""
    import fastmtl

    n, h, w = 8, 288, 384
    g = torch.Generator(device="cuda").manual_seed(0)
    preds = {
        "seg": torch.randn(n, 13, h, w, device="cuda", dtype=torch.bfloat16, generator=g),
        "depth": torch.randn(n, 1, h, w, device="cuda", dtype=torch.bfloat16, generator=g),
        "normals": torch.randn(n, 3, h, w, device="cuda", dtype=torch.bfloat16, generator=g),
        "cls": torch.randn(n, 10, device="cuda", dtype=torch.bfloat16, generator=g),
    }
    targets = {
        "seg": torch.randint(0, 13, (n, h, w), device="cuda", generator=g),
        "depth": torch.rand(n, 1, h, w, device="cuda", generator=g).to(torch.bfloat16),
        "normals": torch.randn(n, 3, h, w, device="cuda", generator=g).to(torch.bfloat16),
        "cls": torch.randint(0, 10, (n,), device="cuda", generator=g),
    }
    kinds = {"seg": "ce", "depth": "l1", "normals": "l1", "cls": "ce"}
    masks = {t: torch.rand(n, device="cuda", generator=g) > 0.3 for t in preds}
    for p in preds.values():
        p.requires_grad_(True)
    nbytes = sum(p.nbytes * 2 + targets[t].nbytes for t, p in preds.items())
    params = list(preds.values())

    def run(backend):
        def step():
            with fastmtl.use_backend(backend):
                total, _ = fastmtl.masked_multitask_loss(preds, targets, kinds, masks)
            return torch.autograd.grad(total, params)

        return step

    names = list(preds)
    forward_args = (
        [preds[t] for t in names], [targets[t] for t in names], [masks[t] for t in names], [kinds[t] for t in names],
        -100, None, [True] * len(names),
    )  # fmt: skip

    def forward_pass(backend):
        # The forward kernels alone (every task's loss and gradient in one pass over its pred and target; cuda: one
        # grouped launch that counts the labelled samples' targets first): the part of the op that moves the bytes
        # counted here; the backward then scales the saved gradients (cuda: none, unless the scale is not 1).
        def forward():
            with torch.no_grad():
                if backend == "cuda":
                    return torch.ops.fastmtl.masked_multitask_loss_forward(*forward_args)
                from fastmtl.ops import masked_loss_triton

                return masked_loss_triton.multitask_forward(*forward_args)

        return forward

    cases = {f"{b} masked_multitask_loss fwd+bwd": run(b) for b in ("cuda", "triton", "torch")}
    for b in ("cuda", "triton"):
        cases[f"{b} masked_multitask_loss fwd+bwd, graph"] = ("graph", run(b))
        cases[f"{b} masked_multitask_loss_forward (fwd kernels), graph"] = ("graph", forward_pass(b))
    return "NYUv2-like 8x{13,1,3}x288x384 + 8x10 bf16", nbytes, cases


def main(argv=None) -> int:
    """Print one line per kernel: time, GB/s, fraction of the copy bandwidth."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json")
    parser.add_argument("-k", dest="only", default="", help="time only the rows whose name contains this")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bandwidth.py needs a CUDA GPU")
        return 0
    from fastmtl.testing import graph_replay_ms

    copy = copy_bandwidth()
    results = {"device": torch.cuda.get_device_name(), "copy_GBps": copy, "kernels": []}
    print(f"copy bandwidth: {copy:.0f} GB/s on {results['device']}")
    for builder in (epilogue_cases, loss_cases):
        try:
            shape, nbytes, cases = builder()
        except Exception as exc:  # noqa: BLE001 - report and go on with the other kernels
            print(f"{builder.__name__}: cannot build cases: {exc}")
            continue
        for name, fn in cases.items():
            if args.only not in name:
                continue
            try:
                ms = graph_replay_ms(fn[1]) if isinstance(fn, tuple) else median_ms(fn)
            except Exception as exc:  # noqa: BLE001
                print(f"{name}: failed: {str(exc).splitlines()[0][:200]}")
                continue
            gbps = nbytes / ms / 1e6
            row = {"kernel": name, "shape": shape, "bytes": nbytes, "ms": ms, "GBps": gbps, "of_copy": gbps / copy}
            results["kernels"].append(row)
            print(f"{name:45s} {shape:45s} {ms:8.3f} ms {gbps:8.0f} GB/s {100 * gbps / copy:6.1f}% of copy")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
