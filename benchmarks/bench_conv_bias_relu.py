"""conv_bias_relu benchmarks: eager ``relu(conv2d)``, ``torch.compile`` of it, and each fastmtl backend.

Shapes: 8x64x56x56 3x3 and the layers of a small trunk (8x3x128x128 -> 32 -> 64 -> 128, pooled between stages) on
the CPU; on CUDA the trunk layers at batch 32 (128x128) and at 8x3x288x384 input, bf16, channels_last (input and
weight, as ``model.to(memory_format=torch.channels_last)`` leaves a model's convolutions).
Forward is timed without autograd; "fwd+bwd" includes the backward to x, weight and bias (x of the stem needs none).
Set FASTMTL_BENCH_MAX_AUTOTUNE=1 to add torch.compile's max-autotune on CUDA (slow to compile), or set it to a
comma-separated list of shape names (e.g. "b32 trunk2 32x32x64x64->64") to add it for those shapes only. It compiles
with mode="max-autotune-no-cudagraphs": the kernels max-autotune picks, without the CUDA graphs it would make of its
own, so that its device time is measured by a graph replay like every other variant's (and its wall time pays the
same host costs as theirs). FASTMTL_BENCH_SHAPES (shape names, comma-separated) keeps only those GPU shapes, and
FASTMTL_BENCH_TAG adds a tag to the rows' mode, so that a separate pass (benchmarks/gpu_check.sh runs max-autotune
in one of its own) forms its own groups in the report, with baselines measured beside it.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

import fastmtl
from fastmtl import backends

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import compile_static  # noqa: E402  (beside this file)

# (name, N, C_in, H, W, C_out)
CPU_SHAPES = [
    ("8x64x56x56->64", 8, 64, 56, 56, 64),
    ("trunk1 8x3x128x128->32", 8, 3, 128, 128, 32),
    ("trunk2 8x32x64x64->64", 8, 32, 64, 64, 64),
    ("trunk3 8x64x32x32->128", 8, 64, 32, 32, 128),
]
GPU_SHAPES = [
    ("b32 trunk1 32x3x128x128->32", 32, 3, 128, 128, 32),
    ("b32 trunk2 32x32x64x64->64", 32, 32, 64, 64, 64),
    ("b32 trunk3 32x64x32x32->128", 32, 64, 32, 32, 128),
    ("nyu trunk1 8x3x288x384->32", 8, 3, 288, 384, 32),
    ("nyu trunk2 8x32x144x192->64", 8, 32, 144, 192, 64),
    ("nyu trunk3 8x64x72x96->128", 8, 64, 72, 96, 128),
]

CUDA = torch.cuda.is_available()


def _names(env: str) -> list[str]:
    return [w.strip() for w in os.environ.get(env, "").split(",") if w.strip()]


def _gpu_shapes():
    wanted = _names("FASTMTL_BENCH_SHAPES")
    known = [s[0] for s in GPU_SHAPES]
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise ValueError(f"FASTMTL_BENCH_SHAPES names unknown shapes {unknown}; known: {known}")
    return [s for s in GPU_SHAPES if not wanted or s[0] in wanted]


def _cases():
    cases = []
    for shape in CPU_SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            cases.append(pytest.param("cpu", shape, dtype, False, id=f"cpu-{shape[0]}-{dtype}".replace("torch.", "")))
    if CUDA:
        for shape in _gpu_shapes():
            cases.append(pytest.param("cuda", shape, torch.bfloat16, True, id=f"cuda-{shape[0]}-bf16-cl"))
    return cases


def _max_autotune(shape_name: str) -> bool:
    wanted = _names("FASTMTL_BENCH_MAX_AUTOTUNE")
    return wanted == ["1"] or shape_name in wanted


def _variants(device: str, shape_name: str):
    names = ["eager", "compile"]
    if device == "cuda" and _max_autotune(shape_name):
        names.append("compile-max-autotune")
    names += [b for b in backends.BACKENDS if backends.can_run(b, torch.device(device))[0]]
    if device == "cuda":
        names.append("auto")
    return names


def _make(device, shape, dtype, channels_last, requires_grad):
    _, n, c_in, h, w, c_out = shape
    torch.manual_seed(0)
    x = torch.randn(n, c_in, h, w, device=device, dtype=dtype)
    weight = (torch.randn(c_out, c_in, 3, 3, device=device) / (9 * c_in) ** 0.5).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        weight = weight.contiguous(memory_format=torch.channels_last)
    bias = (torch.randn(c_out, device=device) * 0.1).to(dtype)
    x.requires_grad_(requires_grad and c_in > 3)  # the stem's input is data: no gradient
    weight.requires_grad_(requires_grad)
    bias.requires_grad_(requires_grad)
    return x, weight, bias


def _eager(x, w, b):
    return torch.relu(F.conv2d(x, w, b, 1, 1))


def _fused(x, w, b):
    return fastmtl.conv_bias_relu(x, w, b, 1, 1)


def _runner(variant, x, w, b, backward):
    if variant == "eager":
        fn = _eager
    elif variant.startswith("compile"):
        mode = "max-autotune-no-cudagraphs" if variant.endswith("max-autotune") else None
        fn = compile_static(_eager, mode=mode)
    else:
        name = variant

        def fn(x, w, b):
            with fastmtl.use_backend(name):
                return _fused(x, w, b)

    if not backward:

        def forward():
            with torch.no_grad():
                return fn(x, w, b)

        return forward
    grad = None

    def step():
        nonlocal grad
        y = fn(x, w, b)
        if grad is None:
            grad = torch.randn_like(y)
        inputs = [t for t in (x, w, b) if t.requires_grad]
        return torch.autograd.grad(y, inputs, grad)

    return step


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("device, shape, dtype, channels_last", _cases())
@pytest.mark.parametrize("variant", ["eager", "compile", "compile-max-autotune", "torch", "cpp", "cuda", "triton", "auto"])
def test_conv_bias_relu(bench, benchmark, smoke, variant, device, shape, dtype, channels_last, mode):
    if variant not in _variants(device, shape[0]):
        pytest.skip(f"{variant} is not a variant for {device} tensors on this machine")
    if smoke and variant.startswith("compile") and shape is not CPU_SHAPES[0] and device == "cpu":
        pytest.skip("smoke run: torch.compile is exercised on the first shape only (all shapes when timing)")
    if variant == "triton" and device == "cpu" and (dtype == torch.bfloat16 or not smoke):
        pytest.skip("triton on CPU is the interpreter: a smoke check only, and bf16 is wrong there")
    backward = mode == "fwd+bwd"
    x, w, b = _make(device, shape, dtype, channels_last, backward)
    if variant == "triton" and device == "cpu":  # interpreter: a tiny slice keeps the smoke run short
        x = x[:1, :, :8, :8].detach().requires_grad_(x.requires_grad)
    fn = _runner(variant, x, w, b, backward)
    tag = os.environ.get("FASTMTL_BENCH_TAG", "")
    bench(fn, op="conv_bias_relu", mode=f"{mode} ({tag})" if tag else mode, shape=shape[0], dtype=dtype,
          backend=variant, device=torch.device(device))
    if variant == "auto":  # which candidate the dispatcher measured fastest for this call
        from fastmtl import autotune

        key = autotune.conv_bias_relu_key(x, w, b, (1, 1), (1, 1), (1, 1), 1)
        benchmark.extra_info["choice"] = autotune.cached_choices().get(key)
