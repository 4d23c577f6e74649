"""The masked loss on a GPU: the native CUDA op and the Triton kernels on CUDA tensors (``@pytest.mark.cuda``: large
shapes, bitwise reproducibility, launch counts, CUDA graph capture, the sync-debug check and opcheck on the CUDA
implementation). Skipped without a GPU; benchmarks/gpu_check.sh runs them. The oracle and inputs are in
masked_loss_cases.py.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from fastmtl.testing import TOLERANCES, assert_scales_in_place_like_copy, rel_err

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from masked_loss_cases import (  # noqa: E402  (beside this file)
    CE_CASES,
    DTYPES,
    assert_bitwise_equal,
    check,
    make_ce,
    make_dense,
    make_mask,
    reference,
)

triton = pytest.importorskip("triton")


@pytest.fixture(scope="module")
def tri():
    from fastmtl.ops import masked_loss_triton

    return masked_loss_triton


def _native():
    from fastmtl import _native

    ok, why = _native.load("_C_cuda")
    if not ok:
        pytest.fail(f"the CUDA extension must be built on a GPU machine: {why}")
    return torch.ops.fastmtl.masked_loss


def _run(backend, tri, pred, target, mask, kind, ignore_index=-100, compute_grad=True):
    if backend == "cuda":
        return _native()(pred, target, mask, kind, ignore_index, compute_grad)
    return tri.masked_loss(pred, target, mask, kind, ignore_index, compute_grad)


GPU_CE_CASES = CE_CASES + [((2, 300, 7), "contiguous"), ((5, 200), "contiguous"), ((7, 2), "contiguous")]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,layout", GPU_CE_CASES)
@pytest.mark.parametrize("mask_mode", ["none", "random", "empty"])
def test_gpu_ce_parity(tri, backend, dtype, shape, layout, mask_mode):
    pred, target = make_ce(shape, layout, dtype, device="cuda")
    mask = make_mask(shape[0], mask_mode, device="cuda")
    before = pred.clone()
    check(_run(backend, tri, pred, target, mask, "ce"), pred, target, mask, "ce", dtype=dtype)
    assert torch.equal(pred, before)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bce", "l1", "mse"])
@pytest.mark.parametrize(
    "shape,layout",
    [
        ((5, 3, 6, 4), "contiguous"),
        ((5, 3, 6, 4), "channels_last"),
        ((300, 1), "contiguous"),
        ((3, 5001), "contiguous"),  # odd size: vector tail
    ],
)
@pytest.mark.parametrize("mask_mode", ["none", "random", "empty"])
def test_gpu_elementwise_parity(tri, backend, dtype, kind, shape, layout, mask_mode):
    pred, target = make_dense(kind, shape, layout, dtype, device="cuda")
    mask = make_mask(shape[0], mask_mode, device="cuda")
    before = pred.clone()
    check(_run(backend, tri, pred, target, mask, kind), pred, target, mask, kind, dtype=dtype)
    assert torch.equal(pred, before)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["ce", "bce", "l1", "mse"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gpu_triton_low_precision(tri, dtype, kind, layout):
    """Triton on the GPU in fp16/bf16 (fp32 Triton parity is covered by the unmarked tests, which run on CUDA)."""
    mask = make_mask(4, "random", device="cuda")
    if kind == "ce":
        pred, target = make_ce((4, 13, 5, 6), layout, dtype, device="cuda")
    else:
        pred, target = make_dense(kind, (4, 3, 5, 6), layout, dtype, device="cuda")
    check(tri.masked_loss(pred, target, mask, kind, -100, True), pred, target, mask, kind, dtype=dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_unaligned_and_strided(tri, backend):
    """Offsets that break 16-byte alignment take the scalar path; sliced preds are handled."""
    storage = torch.randn(3 * 1001 + 1, device="cuda")
    pred = storage[1:].view(3, 1001)  # 4-byte offset
    target = torch.randn(3 * 1001 + 1, device="cuda")[1:].view(3, 1001)
    target.view(-1)[::7] = float("nan")
    mask = make_mask(3, "random", device="cuda")
    check(_run(backend, tri, pred, target, mask, "mse"), pred, target, mask, "mse")
    big = torch.randn(6, 7, 8, 10, device="cuda")
    permuted = torch.randn(3, 5, 4, 6, device="cuda").permute(0, 1, 3, 2)
    transposed = torch.randn(5, 12, device="cuda").t()
    cases = [
        (big[::2, :, 1:7, ::2], torch.randint(0, 7, (3, 6, 5), device="cuda"), "ce"),
        (permuted, torch.randint(0, 5, (3, 6, 4), device="cuda"), "ce"),
        (transposed, torch.randn(12, 5, device="cuda"), "mse"),
    ]
    for pred, target, kind in cases:
        loss, grad = _run(backend, tri, pred, target, None, kind)
        ref_loss, ref_grad = reference(pred, target, None, kind)
        assert grad.stride() == torch.empty_like(pred).stride()
        assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_large_shapes(tri, layout, dtype):
    """The NYUv2-like sizes: 13-class segmentation 8x13x288x384, depth with holes, 3-channel normals, attributes."""
    mask = make_mask(8, "random", device="cuda")
    cases = [("ce", make_ce((8, 13, 288, 384), layout, dtype, device="cuda"))]
    dense_cases = (("l1", (8, 1, 288, 384)), ("l1", (8, 3, 288, 384)), ("bce", (8, 40)), ("mse", (8, 1, 288, 384)))
    for kind, shape in dense_cases:
        cases.append((kind, make_dense(kind, shape, layout if len(shape) == 4 else "contiguous", dtype, device="cuda")))
    for kind, (pred, target) in cases:
        ref_loss, ref_grad = reference(pred, target, mask, kind)
        tol = TOLERANCES["loss"][dtype]
        for backend in ("cuda", "triton"):
            loss, grad = _run(backend, tri, pred, target, mask, kind)
            assert grad.stride() == pred.stride()
            assert rel_err(loss, ref_loss) <= tol, (backend, kind)
            assert rel_err(grad, ref_grad) <= tol, (backend, kind)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_results_are_bitwise_reproducible(tri, backend):
    """Repeated runs give bitwise the same losses, total and gradients (multi-task op, forward and backward) and the
    same loss and gradient (one-task op): no sum depends on the order blocks finish in. The NYUv2-like sizes give
    hundreds of blocks per task (cuda: seg 864, depth 432, normals 648, cls 64), so a floating-point atomicAdd
    would show; the float16 task keeps its gradient undivided with a factor."""
    import fastmtl

    torch.manual_seed(0)
    n, h, w = 8, 288, 384
    seg, seg_t = make_ce((n, 13, h, w), "contiguous", torch.bfloat16, C_out_of_range=False, device="cuda")
    depth, depth_t = make_dense("l1", (n, 1, h, w), "contiguous", torch.float32, device="cuda")
    normals, normals_t = make_dense("mse", (n, 3, h, w), "contiguous", torch.float16, device="cuda")
    cls, cls_t = make_ce((4096, 10), "contiguous", torch.float32, C_out_of_range=False, device="cuda")
    preds = {"seg": seg.requires_grad_(), "depth": depth.requires_grad_(), "normals": normals.requires_grad_(),
             "cls": cls.requires_grad_()}  # fmt: skip
    targets = {"seg": seg_t, "depth": depth_t, "normals": normals_t, "cls": cls_t}
    kinds = {"seg": "ce", "depth": "l1", "normals": "mse", "cls": "ce"}
    masks = {name: make_mask(p.shape[0], "random", device="cuda") for name, p in preds.items()}
    weights = {"seg": 0.7, "depth": torch.tensor(1.3, device="cuda")}

    def step():
        with fastmtl.use_backend(backend):
            total, per_task = fastmtl.masked_multitask_loss(preds, targets, kinds, masks, weights)
        grads = torch.autograd.grad(total, list(preds.values()))
        single = _run(backend, tri, seg.detach(), seg_t, masks["seg"], "ce")
        return [total, *per_task.values(), *grads, *single]

    first = step()
    for _ in range(10):
        assert_bitwise_equal(first, step())


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_launch_count(tri, backend):
    """Kernels actually run on the GPU: 2 per task forward, 1 for the grouped gradient scaling."""
    pred, target = make_ce((4, 13, 16, 16), "contiguous", device="cuda")
    dpred, dtarget = make_dense("l1", (4, 1, 16, 16), "contiguous", device="cuda")
    mask = make_mask(4, "random", device="cuda")
    scale = torch.ops.fastmtl.masked_loss_scale_grads if backend == "cuda" else tri.scale_grads
    ce = _run(backend, tri, pred, target, mask, "ce")  # warm-up (Triton compiles)
    l1 = _run(backend, tri, dpred, dtarget, mask, "l1")
    scale([ce[1], l1[1]], torch.rand(2, device="cuda"))
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        ce = _run(backend, tri, pred, target, mask, "ce")
        torch.cuda.synchronize()
    forward_kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(forward_kernels) == 2, [e.name for e in forward_kernels]
    with torch.profiler.profile(activities=activities) as prof:
        scale([ce[1], l1[1]], torch.rand(2, device="cuda"))
        torch.cuda.synchronize()
    kernels_run = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    # torch.rand is one kernel, the grouped scaling is the other
    assert len(kernels_run) == 2, [e.name for e in kernels_run]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_scale_grads(tri, backend):
    grads = [torch.randn(4 + i, 3, 9, 7, device="cuda", dtype=DTYPES[i % 3]) for i in range(5)]
    grads[1] = grads[1].contiguous(memory_format=torch.channels_last)
    scales = torch.randn(len(grads), device="cuda")
    if backend == "cuda":
        _native()
        outs = torch.ops.fastmtl.masked_loss_scale_grads(grads, scales)
    else:
        outs = tri.scale_grads(grads, scales)
    for g, o, s in zip(grads, outs, scales):
        assert o.stride() == g.stride() and o.dtype == g.dtype
        assert rel_err(o, (g.double() * s.double()).to(g.dtype)) <= TOLERANCES["loss"][g.dtype]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_scale_grads_in_place_matches_copy(tri, backend):
    grads = [torch.randn(4 + i, 3, 9, 7, device="cuda", dtype=DTYPES[i % 3]) for i in range(5)]
    grads[1] = grads[1].contiguous(memory_format=torch.channels_last)
    grads.append(torch.randn(6, 8, device="cuda", dtype=torch.bfloat16)[:, ::2])  # strided: ATen in float32
    scales = torch.randn(len(grads), device="cuda")
    if backend == "cuda":
        _native()
        scale, scale_inplace = torch.ops.fastmtl.masked_loss_scale_grads, torch.ops.fastmtl.masked_loss_scale_grads_
    else:
        scale, scale_inplace = tri.scale_grads, tri.scale_grads_
    assert_scales_in_place_like_copy(scale, scale_inplace, grads, scales)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_no_host_sync_and_graph_capture(tri, backend):
    """No host synchronisation (sync debug mode 'error'), and the loss is capturable in a CUDA graph and replays."""
    mask = make_mask(4, "random", device="cuda")
    pred, target = make_ce((4, 13, 16, 16), "contiguous", device="cuda")
    dpred, dtarget = make_dense("l1", (4, 1, 16, 16), "contiguous", device="cuda")
    scales = torch.rand(2, device="cuda")

    def step():
        ce = _run(backend, tri, pred, target, mask, "ce")
        l1 = _run(backend, tri, dpred, dtarget, mask, "l1")
        if backend == "cuda":
            outs = torch.ops.fastmtl.masked_loss_scale_grads([ce[1], l1[1]], scales)
        else:
            outs = tri.scale_grads([ce[1], l1[1]], scales)
        return ce[0], l1[0], outs

    step()  # compile / warm up outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ce_loss, l1_loss, outs = step()
    # new data in the captured input buffers, then replay
    pred.copy_(torch.randn_like(pred))
    dpred.copy_(torch.randn_like(dpred))
    graph.replay()
    torch.cuda.synchronize()
    ref_ce, ref_ce_grad = reference(pred, target, mask, "ce")
    ref_l1, ref_l1_grad = reference(dpred, dtarget, mask, "l1")
    assert rel_err(ce_loss, ref_ce) <= 1e-5 and rel_err(l1_loss, ref_l1) <= 1e-5
    assert rel_err(outs[0], ref_ce_grad * scales[0].double().cpu()) <= 1e-5
    assert rel_err(outs[1], ref_l1_grad * scales[1].double().cpu()) <= 1e-5


@pytest.mark.cuda
def test_gpu_opcheck_native():
    op = _native().default
    import fastmtl.ops.masked_loss  # noqa: F401  (registers the fake implementation and autograd)

    pred, target = make_ce((3, 5, 4, 2), "channels_last", device="cuda")
    torch.library.opcheck(op, (pred, target, make_mask(3, "random", device="cuda"), "ce", -100, True))
    pred, target = make_dense("mse", (3, 2, 4), "contiguous", device="cuda")
    torch.library.opcheck(op, (pred, target, None, "mse", -100, False))
    grads = [torch.randn(3, 4, device="cuda"), torch.randn(2, 5, device="cuda", dtype=torch.float16)]
    torch.library.opcheck(torch.ops.fastmtl.masked_loss_scale_grads.default, (grads, torch.rand(2, device="cuda")))
    torch.library.opcheck(torch.ops.fastmtl.masked_loss_scale_grads_.default, (grads, torch.rand(2, device="cuda")))


@pytest.mark.cuda
def test_gpu_opcheck_triton(tri):
    pred, target = make_ce((3, 5, 4, 2), "contiguous", device="cuda")
    torch.library.opcheck(torch.ops.fastmtl.masked_loss_triton.default, (pred, target, None, "ce", -100, True))
