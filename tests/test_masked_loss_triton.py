"""The Triton backend of the per-task and multi-task masked loss.

Without a GPU the tests run in the interpreter (TRITON_INTERPRET=1, set by conftest) on small CPU tensors; with a GPU
the same tests run on CUDA tensors. The kernels are also compiled for sm_90 without a GPU (compile_only) to check
their PTX. The oracle and inputs are in masked_loss_cases.py.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from fastmtl.testing import TOLERANCES, assert_scales_in_place_like_copy, rel_err

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compile_only  # noqa: E402  (beside this file: scripts against kernels compiled for sm_90)
from masked_loss_cases import (  # noqa: E402  (beside this file)
    CE_CASES,
    DEVICE,
    DTYPES,
    GPU,
    check,
    large_mse_task,
    make_ce,
    make_dense,
    make_mask,
    reference,
    skip_bf16_interpreter,
)

triton = pytest.importorskip("triton")

# Rows without a valid target compute -inf/NaN intermediates that the kernels mask out with tl.where; numpy (the
# interpreter's engine) warns about them.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


@pytest.fixture(scope="module")
def tri():
    from fastmtl.ops import masked_loss_triton

    return masked_loss_triton


@pytest.fixture(scope="module")
def kernels():
    from fastmtl.kernels import masked_loss

    return masked_loss


@pytest.fixture
def poisoned(kernels, monkeypatch):
    """Make the Triton launcher's outputs start as NaN, so a test fails unless every element is written."""
    alloc = kernels._alloc_outputs

    def poisoned_alloc(pred, compute_grad):
        loss, grad = alloc(pred, compute_grad)
        return loss.fill_(float("nan")), grad.fill_(float("nan"))

    monkeypatch.setattr(kernels, "_alloc_outputs", poisoned_alloc)
    # a ticket counter that is not zeroed by its first launch never lets the last program finalize
    monkeypatch.setattr(kernels, "_alloc_ticket", lambda device: torch.full((1,), 12345, dtype=torch.int32))


@pytest.mark.parametrize("shape,layout", CE_CASES)
@pytest.mark.parametrize("mask_mode", ["none", "random", "empty"])
def test_triton_ce_parity(tri, poisoned, shape, layout, mask_mode):
    pred, target = make_ce(shape, layout)
    mask = make_mask(shape[0], mask_mode)
    before = pred.clone()
    check(tri.masked_loss(pred, target, mask, "ce", -100, True), pred, target, mask, "ce")
    assert torch.equal(pred, before), "pred must never be written"


@pytest.mark.parametrize("kind", ["bce", "l1", "mse"])
@pytest.mark.parametrize(
    "shape,layout",
    [
        ((5, 3, 6, 4), "contiguous"), ((5, 3, 6, 4), "channels_last"),
        ((300, 1), "contiguous"), ((3, 5000), "contiguous"),
    ],
)
@pytest.mark.parametrize("mask_mode", ["none", "random", "empty"])
def test_triton_elementwise_parity(tri, poisoned, kind, shape, layout, mask_mode):
    pred, target = make_dense(kind, shape, layout)
    mask = make_mask(shape[0], mask_mode)
    before = pred.clone()
    check(tri.masked_loss(pred, target, mask, kind, -100, True), pred, target, mask, kind)
    assert torch.equal(pred, before), "pred must never be written"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["ce", "bce", "l1", "mse"])
def test_triton_low_precision(tri, poisoned, dtype, kind):
    skip_bf16_interpreter(dtype)
    mask = make_mask(4, "random")
    if kind == "ce":
        pred, target = make_ce((4, 13, 5, 6), "channels_last", dtype)
    else:
        pred, target = make_dense(kind, (4, 3, 5, 6), "contiguous", dtype)
    check(tri.masked_loss(pred, target, mask, kind, -100, True), pred, target, mask, kind, dtype=dtype)


def test_triton_count_grid_stride(tri, poisoned):
    """More target blocks than count programs: each count program loops (and sample boundaries fall mid-block)."""
    pred, target = make_dense("mse", (3, 181_000), "contiguous")
    mask = torch.tensor([True, False, True], device=DEVICE)
    check(tri.masked_loss(pred, target, mask, "mse", -100, True), pred, target, mask, "mse")


def test_triton_fp16_target_with_fp32_pred(tri):
    pred, target = make_dense("mse", (4, 7, 3), "contiguous")
    target = target.half()
    mask = make_mask(4, "random")
    check(tri.masked_loss(pred, target, mask, "mse", -100, True), pred, target, mask, "mse")


def test_triton_ignore_index_inside_class_range(tri):
    pred, target = make_ce((4, 5, 3, 3), "contiguous", C_out_of_range=False)
    target.view(-1)[::2] = 2  # class 2 is the ignored one
    check(tri.masked_loss(pred, target, None, "ce", 2, True), pred, target, None, "ce", ignore_index=2)


@pytest.mark.parametrize("kind", ["ce", "bce", "l1", "mse"])
def test_triton_all_invalid_gives_zero(tri, poisoned, kind):
    """Every element ignored (not just masked samples): exactly 0.0 and an all-zero gradient, never NaN."""
    if kind == "ce":
        pred, target = make_ce((3, 4, 5), "contiguous")
        target.fill_(-100)
    else:
        pred, target = make_dense(kind, (3, 4, 5), "contiguous")
        target.fill_(float("nan"))
    loss, grad = tri.masked_loss(pred, target, None, kind, -100, True)
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad).item() == 0 and not torch.isnan(grad).any()


@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_triton_zero_samples(tri, kind):
    pred = torch.randn(0, 4, 3, device=DEVICE)
    target = torch.zeros(0, 3, dtype=torch.long, device=DEVICE) if kind == "ce" else torch.randn(0, 4, 3, device=DEVICE)
    loss, grad = tri.masked_loss(pred, target, None, kind, -100, True)
    assert loss.item() == 0.0 and grad.shape == pred.shape


@pytest.mark.parametrize("kind", ["ce", "l1"])
def test_triton_without_grad(tri, poisoned, kind):
    if kind == "ce":
        pred, target = make_ce((3, 6, 4, 4), "contiguous")
    else:
        pred, target = make_dense(kind, (3, 6, 4, 4), "contiguous")
    mask = make_mask(3, "random")
    loss, grad = tri.masked_loss(pred, target, mask, kind, -100, False)
    assert grad.numel() == 0
    assert rel_err(loss, reference(pred, target, mask, kind)[0]) <= 1e-5


def test_triton_strided_inputs(tri):
    """Non-collapsible / sliced inputs and a strided mask are handled (copied where needed), grads stay right."""
    big = torch.randn(6, 7, 8, 10, device=DEVICE)
    pred = big[::2, :, 1:7, ::2]  # spatial dims no longer one progression
    target = torch.randint(0, 7, (3, 6, 5), device=DEVICE)
    mask_store = torch.tensor([True, False, True, True, False, True], device=DEVICE)
    mask = mask_store[::2]
    loss, grad = tri.masked_loss(pred, target, mask, "ce", -100, True)
    ref_loss, ref_grad = reference(pred, target, mask, "ce")
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5

    pred = torch.randn(3, 5, 4, 6, device=DEVICE).permute(0, 1, 3, 2)  # dense, spatial dims not one progression
    target = torch.randint(0, 5, (3, 6, 4), device=DEVICE)
    loss, grad = tri.masked_loss(pred, target, None, "ce", -100, True)
    ref_loss, ref_grad = reference(pred, target, None, "ce")
    assert grad.stride() == pred.stride()
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5

    pred = torch.randn(5, 12, device=DEVICE).t()  # [12, 5], dim 0 not outermost
    target = torch.randn(12, 5, device=DEVICE)
    mask = make_mask(12, "random")
    loss, grad = tri.masked_loss(pred, target, mask, "mse", -100, True)
    ref_loss, ref_grad = reference(pred, target, mask, "mse")
    assert grad.stride() == pred.stride()
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5

    pred, target = make_dense("l1", (4, 3, 5, 6), "channels_last")
    target = target.contiguous()  # target layout differs from pred's
    loss, grad = tri.masked_loss(pred, target, None, "l1", -100, True)
    ref_loss, ref_grad = reference(pred, target, None, "l1")
    assert grad.stride() == pred.stride()
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5


def test_triton_bce_saturated_logits(tri):
    pred = torch.tensor([[30.0, -30.0, 80.0, -80.0, 0.0, 1e-3]], device=DEVICE)
    target = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.5, 1.0]], device=DEVICE)
    loss, grad = tri.masked_loss(pred, target, None, "bce", -100, True)
    ref_loss, ref_grad = reference(pred, target, None, "bce")
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("num_tasks", [1, 3, 10])  # 10 > 8 slots: two launches
def test_triton_scale_grads(tri, num_tasks):
    dtypes = [torch.float32, torch.float16] if DEVICE == "cpu" else DTYPES
    grads = []
    for i in range(num_tasks):
        g = torch.randn(2 + i, 3, 5, 4, device=DEVICE).to(dtypes[i % len(dtypes)])
        if i % 2:
            g = g.contiguous(memory_format=torch.channels_last)
        grads.append(g)
    grads.append(torch.randn(0, 3, device=DEVICE))
    scales = torch.randn(len(grads), device=DEVICE)
    before = [g.clone() for g in grads]
    outs = tri.scale_grads(grads, scales)
    for g, b, o, s in zip(grads, before, outs, scales):
        assert torch.equal(g, b), "inputs must not be written"
        assert o.dtype == g.dtype and o.shape == g.shape and o.stride() == g.stride()
        expected = (g.double() * s.double()).to(g.dtype)
        assert rel_err(o, expected) <= TOLERANCES["loss"][g.dtype]


@pytest.mark.parametrize("kind", ["ce", "bce"])
def test_triton_launch_count(kernels, kind):
    """Two launches per task forward (count, fused loss+grad); one grouped launch scales up to 8 tasks' grads."""
    launched = []

    def counting(kernel):
        launched.append(kernel)
        return kernel

    if kind == "ce":
        pred, target = make_ce((3, 5, 4, 2), "contiguous")
    else:
        pred, target = make_dense(kind, (3, 5, 4), "contiguous")
    kernels.masked_loss(pred, target, make_mask(3, "random"), kind, -100, True, launch=counting)
    assert len(launched) == 2
    launched.clear()
    kernels.scale_grads([torch.randn(3, 4, device=DEVICE) for _ in range(8)], torch.rand(8, device=DEVICE), counting)
    assert len(launched) == 1


def _multitask_tasks(dtype=torch.float32):
    """(pred, target, mask, kind) of five tasks covering the Triton kernel paths, one without any valid element."""
    seg, seg_t = make_ce((3, 5, 4, 6), "contiguous", dtype)  # NCHW: pixels along the fast axis
    cls, cls_t = make_ce((7, 10), "contiguous", dtype)  # [N, C]: rows
    depth, depth_t = make_dense("l1", (3, 1, 4, 6), "contiguous", dtype)
    attr, attr_t = make_dense("bce", (3, 5), "contiguous", dtype)
    empty, empty_t = make_dense("mse", (3, 4), "contiguous", dtype)
    return [
        (seg, seg_t, make_mask(3, "random"), "ce"),
        (cls, cls_t, None, "ce"),
        (depth, depth_t, make_mask(3, "random"), "l1"),
        (attr, attr_t, None, "bce"),
        (empty, empty_t, make_mask(3, "empty"), "mse"),
        large_mse_task(),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("weighted", [True, False])
def test_triton_multitask_forward_and_backward(kernels, poisoned, dtype, weighted):
    """Partials, finalize and the backward's in-kernel scales against the float64 reference, on poisoned outputs."""
    tasks = _multitask_tasks(dtype)
    preds, targets, masks, kinds = (list(x) for x in zip(*tasks))
    n = len(tasks)
    weights = torch.rand(n, device=DEVICE) + 0.5 if weighted else None
    total, losses, grad_scale, grads = kernels.multitask_forward(
        preds, targets, masks, kinds, -100, weights, [True, True, False, True, True, True]
    )
    want_total, refs = 0.0, []
    for t, (pred, target, mask, kind) in enumerate(tasks):
        tol = TOLERANCES["loss"][pred.dtype]
        ref_loss, ref_grad = reference(pred, target, mask, kind)
        refs.append(ref_grad)
        want_total += (weights[t].item() if weighted else 1.0) * ref_loss.item()
        assert rel_err(losses[t], ref_loss) <= tol if ref_loss.item() else losses[t].item() == 0.0
        if t == 2:
            assert grads[t].numel() == 0  # compute_grad False
        elif ref_loss.item() == 0.0:
            assert grad_scale[t].item() == 0.0 and not grads[t].isnan().any()
        else:
            assert rel_err(grads[t].double().cpu() * grad_scale[t].item(), ref_grad) <= tol
    assert abs(total.item() - want_total) <= 1e-5 * abs(want_total)

    g_total = torch.rand((), device=DEVICE)
    g_tasks = [torch.rand((), device=DEVICE), None, None, torch.rand((), device=DEVICE), None, None]
    outs = kernels.multitask_backward(grads, grad_scale, g_total, weights, g_tasks)
    for t in (0, 1, 3, 5):
        tol = TOLERANCES["loss"][grads[t].dtype]
        scale = g_total.item() * (weights[t].item() if weighted else 1.0)
        scale += g_tasks[t].item() if g_tasks[t] is not None else 0.0
        assert rel_err(outs[t].double().cpu(), refs[t] * scale) <= tol
    in_place = [g.clone() for g in grads]
    kernels.multitask_backward(in_place, grad_scale, g_total, weights, g_tasks, inplace=True)
    for a, b in zip(in_place, outs):
        assert torch.equal(a, b)


def test_triton_in_place_scaling_refuses_tensors_that_share_memory(kernels):
    g = torch.randn(4, 5, device=DEVICE)
    with pytest.raises(RuntimeError, match="share memory"):
        kernels.scale_grads([g, g[2:]], torch.rand(2, device=DEVICE), inplace=True)


def _task_set(name):
    """Task lists for the finalize's three paths: in the last loss launch (2 to 8 launched tasks) or a launch of its
    own (one task, one launched task, more than 8 tasks)."""
    tasks = _multitask_tasks()
    zero, zero_t = make_dense("l1", (0, 3), "contiguous")  # no samples: its loss kernel is not launched
    if name == "one task":
        return tasks[:1]
    if name == "ten tasks":
        return tasks + tasks[:4]
    if name == "last task not launched":
        return tasks[:3] + [(zero, zero_t, None, "l1")]
    if name == "one launched task":
        return [(zero, zero_t, None, "l1"), tasks[2]]
    return tasks


TASK_SETS = {  # name: (forward loss launches, finalize launches)
    "six tasks": (6, 0),
    "one task": (1, 1),
    "ten tasks": (10, 2),
    "last task not launched": (3, 0),
    "one launched task": (1, 1),
}


@pytest.mark.parametrize("name", TASK_SETS)
def test_triton_multitask_finalize_paths(kernels, poisoned, name):
    """Every finalize path against the float64 reference, on poisoned outputs and a poisoned ticket counter."""
    tasks = _task_set(name)
    preds, targets, masks, kinds = (list(x) for x in zip(*tasks))
    weights = torch.rand(len(tasks), device=DEVICE) + 0.5
    total, losses, grad_scale, grads = kernels.multitask_forward(
        preds, targets, masks, kinds, -100, weights, [True] * len(tasks)
    )
    want_total = 0.0
    for t, (pred, target, mask, kind) in enumerate(tasks):
        ref_loss, ref_grad = reference(pred, target, mask, kind)
        want_total += weights[t].item() * ref_loss.item()
        tol = TOLERANCES["loss"][pred.dtype]
        if ref_loss.item() == 0.0:
            assert losses[t].item() == 0.0 and grad_scale[t].item() == 0.0
        else:
            assert rel_err(losses[t], ref_loss) <= tol
            assert rel_err(grads[t].double().cpu() * grad_scale[t].item(), ref_grad) <= tol
    assert abs(total.item() - want_total) <= 1e-5 * abs(want_total)


@pytest.mark.parametrize("name", TASK_SETS)
def test_triton_multitask_launch_count(kernels, name):
    """Forward: one loss kernel per task with samples, the last of them finalizing when an earlier one zeroed its
    ticket (2 to 8 tasks: T launches), else one finalize launch per 8 tasks; backward: one launch per 8 tasks."""
    launched = []

    def counting(kernel):
        launched.append(kernel)
        return kernel

    tasks = _task_set(name)
    preds, targets, masks, kinds = (list(x) for x in zip(*tasks))
    n = len(tasks)
    _, _, grad_scale, grads = kernels.multitask_forward(preds, targets, masks, kinds, -100, None, [True] * n, counting)
    loss_launches, finalize_launches = TASK_SETS[name]
    assert launched.count(kernels._finalize_kernel) == finalize_launches
    assert len(launched) == loss_launches + finalize_launches
    # the first and last launches carry the tail (ticket, finalize); the others are the lean kernels
    tails = [k in (kernels._ce_kernel_chained, kernels._elementwise_kernel_chained) for k in launched]
    fused = finalize_launches == 0
    assert tails == ([True] + [False] * (loss_launches - 2) + [True] if fused else [False] * len(tails))
    assert kernels._count_kernel not in launched
    launched.clear()
    kernels.multitask_backward(grads, grad_scale, torch.ones((), device=DEVICE), None, [None] * n, counting)
    assert launched == [kernels._scale_grads_kernel] * -(-n // 8)


def test_triton_multitask_opcheck(tri):
    tasks = _multitask_tasks()
    preds, targets, masks, kinds = (list(x) for x in zip(*tasks))
    weights = torch.rand(len(tasks), device=DEVICE)
    args = (preds, targets, masks, ",".join(kinds), -100, weights, [True, False, True, True, True, True])
    torch.library.opcheck(torch.ops.fastmtl.masked_multitask_loss_forward_triton.default, args)
    grads = [torch.randn(3, 4, device=DEVICE), torch.randn(0, device=DEVICE), torch.randn(5, device=DEVICE)]
    g_tasks = [None, None, torch.rand((), device=DEVICE)]
    bwd = (grads, torch.rand(3, device=DEVICE), torch.rand((), device=DEVICE), None, g_tasks)
    torch.library.opcheck(torch.ops.fastmtl.masked_multitask_loss_backward_triton.default, bwd)
    torch.library.opcheck(
        torch.ops.fastmtl.masked_multitask_loss_backward_triton_.default, ([g.clone() for g in grads], *bwd[1:])
    )


_COMPILE_SCRIPT = r"""
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
from fastmtl.kernels import masked_loss as K

def compile_one(fn, sig, consts):
    sig = dict(sig, **{name: "constexpr" for name in consts})
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 8})

i64 = lambda *names: {n: "i64" for n in names}
count = {"target_ptr": "*i64", "mask_ptr": "*u8", "counts_ptr": "*i32", "ticket_ptr": "*i32", "total": "i64",
         "iters": "i32", "C": "i32", "ignore_index": "i32", **i64("S", "t_sn", "t_ss", "m_sn", "m_ss")}
compile_one(K._count_kernel, count, {"IS_CE": True, "HAS_MASK": True, "BIG_S": True, "BLOCK": 2048})
compile_one(K._count_kernel, dict(count, target_ptr="*bf16"), {"IS_CE": False, "HAS_MASK": True, "BIG_S": False,
                                                               "BLOCK": 2048})
partials = {"psum_ptr": "*fp32", "pcount_ptr": "*i32"}
slots = {}
for i in range(8):
    slots.update({f"n{i}": "i64", f"l{i}": "*fp32"})
tail = {"ticket_ptr": "*i32", "fin_gs_ptr": "*fp32", "fin_w_ptr": "*fp32", "fin_total_ptr": "*fp32", **slots}
def chained(ticket, num):  # the tail's arguments and constexprs (None: the lean kernel)
    if ticket is None:
        return {}, {}
    return tail, {"TICKET": ticket, "NUM": num, "HAS_WEIGHTS": num > 1, "MSE_MASK": 5, "FIN_BLOCK": 1024}

# (last launch of a multi-task forward, its first launch, a launch between them, masked_loss's loss launch)
for dt, single, bs, bc, part, ticket, num in (("bf16", False, 4, 1024, True, 2, 8), ("fp16", True, 256, 16, True, 1, 8),
                                              ("fp16", True, 256, 16, True, None, 0),
                                              ("fp32", True, 256, 16, False, 2, 1)):  # fmt: skip
    tail_sig, tail_consts = chained(ticket, num)
    ce = {"pred_ptr": "*" + dt, "target_ptr": "*i64", "mask_ptr": "*u8", "grad_ptr": "*" + dt, "counts_ptr": "*i32",
          **partials, "S": "i32", "C": "i32", "num_s_blocks": "i32", "num_counts": "i32",
          "first_slot": "i32", "ignore_index": "i32",
          **i64("p_sn", "p_sc", "p_ss", "g_sn", "g_sc", "g_ss", "t_sn", "t_ss", "m_sn", "m_ss"), **tail_sig}
    compile_one(K._ce_kernel_chained if ticket else K._ce_kernel, ce,
                {"HAS_MASK": True, "MASK_PER_PIXEL": dt == "fp32", "ROWS": bc > 16, "COMPUTE_GRAD": True,
                 "SINGLE_C": single, "PARTIALS": part, "COUNTS_P2": 256, "BLOCK_S": bs, "BLOCK_C": bc, **tail_consts})
for dt, kind, part, ticket, num in (("fp16", 0, True, 2, 8), ("bf16", 1, True, 1, 8), ("fp32", 2, True, None, 0),
                                    ("bf16", 2, False, 2, 1)):  # fmt: skip
    tail_sig, tail_consts = chained(ticket, num)
    el = {"pred_ptr": "*" + dt, "target_ptr": "*fp32", "mask_ptr": "*u8", "grad_ptr": "*" + dt, "counts_ptr": "*i32",
          **partials, "total": "i64", "M": "i64", "num_counts": "i32", "first_slot": "i32",
          **tail_sig}
    compile_one(K._elementwise_kernel_chained if ticket else K._elementwise_kernel, el,
                {"KIND": kind, "HAS_MASK": True, "COMPUTE_GRAD": True, "BIG_S": kind == 1,
                 "PARTIALS": part, "COUNTS_P2": 256, "BLOCK": 4096, **tail_consts})
fin = {"psum_ptr": "*fp32", "pcount_ptr": "*i32", "gs_ptr": "*fp32", "w_ptr": "*fp32", "total_ptr": "*fp32", **slots}
compile_one(K._finalize_kernel, fin, {"NUM": 8, "HAS_WEIGHTS": True, "MSE_MASK": 130, "ACCUMULATE": True,
                                      "BLOCK": 1024})
scale = {"scales_ptr": "*fp32", "total_ptr": "*fp32", "w_ptr": "*fp32", "factor_ptr": "*fp32"}
for i in range(8):
    scale.update({f"g{i}": "*bf16", f"o{i}": "*bf16", f"n{i}": "i64", f"f{i}": "i32", f"t{i}": "*fp32"})
for factors in (False, True):
    compile_one(K._scale_grads_kernel, scale, {"NUM": 8, "FACTORS": factors, "HAS_TOTAL": factors,
                                               "HAS_WEIGHTS": factors, "G_MASK": 5 if factors else 0, "BLOCK": 4096})
print("compiled")
"""


@pytest.mark.skipif(GPU, reason="with a GPU the kernels are compiled and run by the other tests")
def test_triton_kernels_compile_for_sm90():
    """The interpreter skips Triton's compiler: compile each kernel for sm_90 (no GPU needed)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-P", "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


_VECTOR_LOADS_SCRIPT = r"""
import collections, json, re
import torch
from fastmtl.kernels import masked_loss as K

g = torch.Generator().manual_seed(0)
n, h, w = 2, 64, 64  # S = 4096: the depth task's samples span whole elementwise blocks (BIG_S)
preds = [torch.randn(n, 13, h, w, generator=g).bfloat16(), torch.randn(n, 1, h, w, generator=g).bfloat16()]
targets = [torch.randint(0, 13, (n, h, w), generator=g), torch.rand(n, 1, h, w, generator=g)]
masks = [torch.tensor([True, False]), torch.tensor([False, True])]
K.multitask_forward(preds, targets, masks, ["ce", "l1"], -100, None, [True, True])
for name, ptx in triton_compile_check.compiled_ptx(K):
    if name in ("_ce_kernel_chained", "_elementwise_kernel_chained"):
        print(name, json.dumps(collections.Counter(re.findall(r"ld\.global[.\w]*", ptx))))
"""


@pytest.mark.skipif(GPU, reason="compiles through a stand-in driver; with a GPU the benchmarks time the kernels")
def test_triton_loss_kernels_load_in_vectors():
    """On sm_90 the NCHW cross-entropy kernel reads each thread's neighbouring logits as 16-byte vectors (a load
    predicate that changed from pixel to pixel made them 16 scalar 2-byte loads), and the elementwise kernel reads a
    block's sample mask with two scalar loads instead of a gathered byte per element."""
    import json

    loads = {}
    for line in compile_only.run(_VECTOR_LOADS_SCRIPT, timeout=300).splitlines():
        name, ops = line.split(" ", 1)
        loads[name] = json.loads(ops)
    ce, elementwise = loads["_ce_kernel_chained"], loads["_elementwise_kernel_chained"]
    narrow = {"ld.global.b16", "ld.global.b32", "ld.global.v2.b16", "ld.global.v2.b32", "ld.global.v4.b16"}
    assert ce.get("ld.global.v4.b32", 0) >= 2 and not narrow & set(ce), ce
    assert elementwise.get("ld.global.b8", 0) <= 2 and elementwise.get("ld.global.v4.b32", 0) >= 2, elementwise


_FLOAT_ATOMICS_SCRIPT = r"""
import json
import torch
from fastmtl.kernels import masked_loss as K

g = torch.Generator().manual_seed(0)
n, h, w = 2, 8, 8
cases = [(torch.randn(n, 13, h, w, generator=g), torch.randint(0, 13, (n, h, w), generator=g), "ce"),
         (torch.randn(n, 10, generator=g).half(), torch.randint(0, 10, (n,), generator=g), "ce"),
         (torch.randn(n, 1, h, w, generator=g), torch.rand(n, 1, h, w, generator=g), "l1"),
         (torch.randn(n, 5, generator=g), torch.rand(n, 5, generator=g), "bce"),
         (torch.randn(n, 3, generator=g).bfloat16(), torch.randn(n, 3, generator=g), "mse")]
mask = torch.tensor([True, False])
for pred, target, kind in cases:
    K.masked_loss(pred, target, mask, kind)
preds, targets, kinds = zip(*cases)
K.multitask_forward(list(preds), list(targets), [mask] * len(cases), list(kinds), -100, torch.rand(5), [True] * 5)
K.multitask_backward([p.clone() for p in preds], torch.rand(5), torch.ones(()), torch.rand(5), [None] * 5)
print(json.dumps(triton_compile_check.float_atomics(K)))
"""


@pytest.mark.skipif(GPU, reason="compiles through a stand-in driver; with a GPU the tests run the kernels")
def test_triton_loss_kernels_use_no_float_atomics():
    """Every masked-loss Triton kernel, compiled for sm_90 on the one-task and multi-task paths, holds no
    floating-point atomic: each sum over programs is taken by one program in a fixed order, so the loss and the
    total are the same from run to run (a float atomicAdd makes them depend on which program finishes first)."""
    import json

    report = json.loads(compile_only.run(_FLOAT_ATOMICS_SCRIPT).strip().splitlines()[-1])
    assert report["compiled"] >= 8, report
    assert report["float_atomics"] == {}, report


def test_triton_opcheck(tri):
    pred, target = make_ce((3, 5, 4, 2), "channels_last")
    mask = make_mask(3, "random")
    torch.library.opcheck(torch.ops.fastmtl.masked_loss_triton.default, (pred, target, mask, "ce", -100, True))
    pred, target = make_dense("bce", (3, 2, 4), "contiguous")
    torch.library.opcheck(torch.ops.fastmtl.masked_loss_triton.default, (pred, target, None, "bce", -100, False))
    grads = [torch.randn(3, 4, device=DEVICE), torch.randn(2, 5, device=DEVICE)]
    torch.library.opcheck(
        torch.ops.fastmtl.masked_loss_scale_grads_triton.default, (grads, torch.rand(2, device=DEVICE))
    )
    torch.library.opcheck(
        torch.ops.fastmtl.masked_loss_scale_grads_triton_.default, (grads, torch.rand(2, device=DEVICE))
    )


def test_triton_scale_in_place_matches_copy(tri):
    """The in-place scaling writes into the gradients (strided ones too) the values of the copying one."""
    grads = [
        torch.randn(3, 4, 5, 6, device=DEVICE).contiguous(memory_format=torch.channels_last),
        torch.randn(4, 3, device=DEVICE, dtype=torch.float16),
        torch.randn(0, device=DEVICE),
        torch.randn(4, 6, device=DEVICE)[:, ::2],  # not dense: scaled by ATen (in float32)
        torch.randn(4, 6, device=DEVICE, dtype=torch.float16)[:, ::2],
    ]
    assert_scales_in_place_like_copy(tri.scale_grads, tri.scale_grads_, grads, torch.rand(len(grads), device=DEVICE))
