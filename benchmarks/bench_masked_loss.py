"""masked_multitask_loss benchmarks: forward + backward of a NYUv2-like 4-task batch.

Tasks: 13-class segmentation (ce, ~5% pixels ignore_index), depth (l1, ~20% pixels missing as NaN), surface normals
(3-channel l1, missing where depth is), a 10-class classification (ce); 30% of samples lack each task's label.
Sizes: 8 x 72 x 96 on the CPU (runs in seconds), 8 x 288 x 384 on CUDA (float32 and bfloat16 logits).

Variants (``extra_info["backend"]``):

* ``eager_index`` - form A: boolean-index the labelled samples (and valid pixels), then the stock mean losses.
* ``eager``       - form B: stock per-element losses, masked sums divided by the valid counts (sync-free).
* ``compile``     - ``torch.compile`` of form B.
* ``torch``, ``cpp``, ``cuda``, ``triton`` - ``fastmtl.masked_multitask_loss`` on that backend.

Peak memory (``extra_info["peak_mem_bytes"]``): on CUDA the conftest's ``max_memory_allocated`` above what was
allocated before the call; on the CPU the peak of the running sum of the allocations and frees in the memory
timeline of ``torch.profiler`` during one call (inputs excluded, temporaries inside ops included).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

import fastmtl
from fastmtl import backends
from fastmtl.ops import masked_loss as masked_loss_op
from fastmtl.testing import cpu_peak_bytes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import compile_static  # noqa: E402  (beside this file)

CUDA = torch.cuda.is_available()
KINDS = {"seg": "ce", "depth": "l1", "normals": "l1", "cls": "ce"}
IGNORE = -100


def make_batch(device, n, h, w, dtype, seed=0):
    """(preds, targets, masks) of the NYUv2-like batch; preds are leaves requiring grad."""
    g = torch.Generator().manual_seed(seed)
    seg_t = torch.randint(0, 13, (n, h, w), generator=g)
    seg_t[torch.rand(n, h, w, generator=g) < 0.05] = IGNORE
    depth_t = torch.rand(n, 1, h, w, generator=g) * 10
    missing = torch.rand(n, 1, h, w, generator=g) < 0.2
    depth_t[missing] = float("nan")
    normals_t = F.normalize(torch.randn(n, 3, h, w, generator=g), dim=1)
    normals_t[missing.expand(n, 3, h, w)] = float("nan")
    targets = {"seg": seg_t, "depth": depth_t, "normals": normals_t, "cls": torch.randint(0, 10, (n,), generator=g)}
    preds = {
        "seg": torch.randn(n, 13, h, w, generator=g),
        "depth": torch.randn(n, 1, h, w, generator=g),
        "normals": torch.randn(n, 3, h, w, generator=g),
        "cls": torch.randn(n, 10, generator=g),
    }
    masks = {}
    for i, name in enumerate(KINDS):
        m = torch.ones(n, dtype=torch.bool)
        m[torch.randperm(n, generator=g)[: round(0.3 * n)]] = False
        masks[name] = m
    preds = {k: v.to(device, dtype).requires_grad_(True) for k, v in preds.items()}
    targets = {k: v.to(device) for k, v in targets.items()}
    masks = {k: v.to(device) for k, v in masks.items()}
    return preds, targets, masks


def loss_index(preds, targets, masks):
    """Form A: select the labelled samples and valid elements, then the stock mean losses (syncs on the host)."""
    total = 0.0
    for name, kind in KINDS.items():
        p, t = preds[name][masks[name]], targets[name][masks[name]]
        if kind == "ce":
            total = total + F.cross_entropy(p.float(), t, ignore_index=IGNORE)
        else:
            valid = ~torch.isnan(t)
            total = total + F.l1_loss(p.float()[valid], t[valid])
    return total


def loss_masked_sum(preds, targets, masks):
    """Form B: per-element stock losses, masked sums over valid counts (no host sync, 0 for an empty task)."""
    total = 0.0
    for name, kind in KINDS.items():
        p, t, m = preds[name].float(), targets[name], masks[name]
        shape = (-1,) + (1,) * (t.dim() - 1)
        if kind == "ce":
            valid = (t != IGNORE) & m.view(shape)
            per_elem = F.cross_entropy(p, t.clamp(min=0), reduction="none")
        else:
            valid = ~torch.isnan(t) & m.view(shape)
            per_elem = (p - torch.nan_to_num(t)).abs()
        total = total + torch.where(valid, per_elem, 0.0).sum() / valid.sum().clamp(min=1)
    return total


def loss_fastmtl(preds, targets, masks):
    return fastmtl.masked_multitask_loss(preds, targets, KINDS, masks, ignore_index=IGNORE)[0]


def _cases():
    cases = [pytest.param("cpu", (8, 72, 96), torch.float32, id="cpu-8x72x96-float32")]
    cases.append(pytest.param("cpu", (8, 72, 96), torch.bfloat16, id="cpu-8x72x96-bfloat16"))
    if CUDA:
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).replace("torch.", "")
            cases.append(pytest.param("cuda", (8, 288, 384), dtype, id=f"cuda-8x288x384-{name}"))
    return cases


VARIANTS = ["eager_index", "eager", "compile", "torch", "cpp", "cuda", "triton"]


def _available(variant, device) -> tuple[bool, str]:
    if variant in ("eager_index", "eager", "compile"):
        return True, ""
    ok, why = backends.can_run(variant, torch.device(device))
    if ok and variant == "triton" and not masked_loss_op.triton_available():
        return False, "fastmtl.ops.masked_loss_triton is not installed"
    return ok, why


def make_step(variant, preds, targets, masks):
    """One forward + backward of the variant, returning the gradients."""
    if variant == "eager_index":
        fn = loss_index
    elif variant == "eager":
        fn = loss_masked_sum
    elif variant == "compile":
        fn = compile_static(loss_masked_sum)
    else:

        def fn(p, t, m):
            with fastmtl.use_backend(variant):
                return loss_fastmtl(p, t, m)

    leaves = list(preds.values())

    def step():
        return torch.autograd.grad(fn(preds, targets, masks), leaves)

    return step


@pytest.mark.parametrize("device, size, dtype", _cases())
@pytest.mark.parametrize("variant", VARIANTS)
def test_masked_multitask_loss(bench, benchmark, smoke, variant, device, size, dtype):
    ok, why = _available(variant, device)
    if not ok:
        pytest.skip(f"{variant} cannot run {device} tensors here: {why}")
    if variant == "triton" and device == "cpu":
        pytest.skip("triton on CPU is the Triton interpreter: correctness only (tests/), not timed")
    if variant == "compile" and smoke and dtype != torch.float32:
        pytest.skip("smoke run: torch.compile is exercised on the float32 case only (all cases when timing)")
    n, h, w = size
    preds, targets, masks = make_batch(device, n, h, w, dtype)
    step = make_step(variant, preds, targets, masks)
    if device == "cpu":
        step()  # warm-up (compilation), so the peak is the steady state
        benchmark.extra_info["peak_mem_bytes"] = cpu_peak_bytes(step)
    shape = f"nyu4 {n}x{h}x{w}"
    bench(step, op="masked_multitask_loss", mode="fwd+bwd", shape=shape, dtype=dtype, backend=variant,
          device=torch.device(device))
