"""GPU backends of the per-task masked loss: the Triton kernels and the native CUDA op.

Without a GPU the Triton tests run in the interpreter (TRITON_INTERPRET=1, set by conftest) on small CPU tensors;
with a GPU the same tests run on CUDA tensors, and the ``@pytest.mark.cuda`` tests add the native CUDA op, large
shapes, CUDA graph capture, the sync-debug check and opcheck on the CUDA implementation.

The oracle is a float64 reference written here (independent of the op layer): element losses masked by
(sample mask AND element valid), mean over the valid count (0 when there is none), gradient by autograd.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmtl.testing import TOLERANCES, assert_scales_in_place_like_copy, rel_err

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compile_only  # noqa: E402  (beside this file: scripts against kernels compiled for sm_90)
import cuda_emulation  # noqa: E402  (beside this file: the CPU emulation of the CUDA kernels)

triton = pytest.importorskip("triton")

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Rows without a valid target compute -inf/NaN intermediates that the kernels mask out with tl.where; numpy (the
# interpreter's engine) warns about them.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
BF16_INTERPRETER = "bf16 arithmetic is wrong in the Triton interpreter (runs on a GPU only)"


@pytest.fixture(scope="module")
def tri():
    from fastmtl.ops import masked_loss_triton

    return masked_loss_triton


@pytest.fixture(scope="module")
def kernels():
    from fastmtl.kernels import masked_loss

    return masked_loss


# ---- reference and inputs -------------------------------------------------------------------------------------


def reference(pred, target, mask, kind, ignore_index=-100):
    """float64 (loss, grad) of one task."""
    p = pred.detach().to("cpu", torch.float64).requires_grad_()
    target = target.cpu()
    if kind == "ce":
        C = p.shape[1]
        valid = (target != ignore_index) & (target >= 0) & (target < C)
        logp = torch.log_softmax(p, dim=1)
        picked = logp.gather(1, torch.where(valid, target, 0).unsqueeze(1)).squeeze(1)
        elem = -picked
    else:
        t = target.to(torch.float64)
        valid = ~torch.isnan(t)
        t = torch.where(valid, t, 0.0)
        if kind == "bce":
            elem = torch.nn.functional.binary_cross_entropy_with_logits(p, t, reduction="none")
        elif kind == "l1":
            elem = (p - t).abs()
        else:
            elem = (p - t) ** 2
    if mask is not None:
        valid = valid & mask.cpu().view(-1, *([1] * (valid.dim() - 1)))
    count = valid.sum()
    loss = torch.where(valid, elem, 0.0).sum() / count.clamp(min=1)
    (grad,) = torch.autograd.grad(loss, p)
    return loss.detach(), grad


def make_mask(n, mode, device=DEVICE):
    if mode == "none":
        return None
    if mode == "empty":
        return torch.zeros(n, dtype=torch.bool, device=device)
    mask = torch.rand(n, device=device) > 0.4
    mask[0] = True
    return mask


def make_ce(shape, layout, dtype=torch.float32, C_out_of_range=True, device=DEVICE):
    pred = (3 * torch.randn(shape, device=device)).to(dtype)
    if layout == "channels_last":
        pred = pred.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    target = torch.randint(0, C, (shape[0],) + tuple(shape[2:]), device=device)
    flat = target.view(-1)
    flat[::5] = -100  # ignored
    if C_out_of_range and flat.numel() > 3:
        flat[1] = C + 3  # out of range: skipped, never read
        flat[3] = -7
    return pred, target


def make_dense(kind, shape, layout, dtype=torch.float32, device=DEVICE):
    pred = (2 * torch.randn(shape, device=device)).to(dtype)
    target = torch.rand(shape, device=device) if kind == "bce" else torch.randn(shape, device=device)
    target.view(-1)[::3] = float("nan")  # no label
    if layout == "channels_last":
        pred = pred.contiguous(memory_format=torch.channels_last)
        target = target.contiguous(memory_format=torch.channels_last)
    return pred, target


def check(out, pred, target, mask, kind, ignore_index=-100, dtype=torch.float32):
    loss, grad = out
    ref_loss, ref_grad = reference(pred, target, mask, kind, ignore_index)
    tol = TOLERANCES["loss"][dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == pred.dtype and grad.shape == pred.shape
    assert grad.stride() == pred.stride(), "grad must have pred's layout"
    if ref_loss.item() == 0.0:
        assert loss.item() == 0.0
        assert torch.count_nonzero(grad).item() == 0
    else:
        assert rel_err(loss, ref_loss) <= tol, (loss.item(), ref_loss.item())
        assert rel_err(grad, ref_grad) <= tol
    assert torch.isfinite(grad).all()


def skip_bf16_interpreter(dtype, device=DEVICE):
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip(BF16_INTERPRETER)


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


# ---- Triton (interpreter on CPU, or CUDA) -----------------------------------------------------------------------

CE_CASES = [
    ((37, 5), "contiguous"),  # [N, C]: one class block, rows as pixels
    ((6, 1500), "contiguous"),  # [N, C] with C over the class block: online softmax loop
    ((3, 13, 6, 7), "contiguous"),  # NCHW
    ((3, 13, 6, 7), "channels_last"),
    ((2, 40, 5, 3), "contiguous"),  # NCHW with C over the class block
    ((4, 6, 9), "contiguous"),  # [N, C, L]
    ((2, 3, 48, 48), "contiguous"),  # S >= the count block: block-wise sample index
]


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


def _large_mse_task(device=DEVICE):
    """A float16 mse task whose differences (about 5e4) fit float16 but whose doubled element gradient 2 (p - t) does
    not: the partials mode must not overflow where the normalised gradient is finite."""
    pred = (3e4 + 100 * torch.rand(3, 40, device=device)).to(torch.float16)
    target = torch.full((3, 40), -2e4, device=device)
    target.view(-1)[::3] = float("nan")
    return pred, target, make_mask(3, "random", device=device), "mse"


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
        _large_mse_task(),
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


# ---- the CUDA kernels on the CPU: csrc/cuda/masked_loss*.cu compiled by g++ against tests/cuda_emulation.py -----
# It checks the kernels' arithmetic, indexing, masking and reductions (and the launchers' choice of kernel), not
# memory-model or timing behaviour, and not the ATen glue (the @pytest.mark.cuda tests do).

_EMU_SHIM = r"""#include <vector>

#include "masked_loss.h"
using namespace fastmtl::cuda;
extern "C" {
static LossReduction reduction(const int32_t* counts, int num_counts, float* grad_scale, float* psum,
                               int32_t* pcount) {
  LossReduction red;
  red.counts = counts;
  red.num_counts = num_counts;
  red.grad_scale = grad_scale;
  red.psum = psum;
  red.pcount = pcount;
  return red;
}
static LaunchEnd end_of(unsigned* ticket, float* loss) {
  LaunchEnd end;
  end.ticket = ticket;
  end.loss = loss;
  return end;
}
static CeGeometry geometry(const int64_t* geom) {
  return CeGeometry{geom[0], geom[1], geom[2], geom[3], geom[4],  geom[5], geom[6],
                    geom[7], geom[8], geom[9], geom[10], geom[11], geom[12]};
}
int emu_count_ce(const int64_t* target, const bool* mask, const int64_t* geom, int64_t ignore_index, int32_t* counts,
                 int num_blocks, float* loss, unsigned* ticket) {
  return masked_loss_count_ce(target, mask, geometry(geom), ignore_index, counts, num_blocks, loss, ticket, nullptr);
}
int emu_ce(const void* pred, int dtype, const int64_t* target, const bool* mask, void* grad, const int64_t* geom,
           int64_t ignore_index, const int32_t* counts, int num_counts, float* grad_scale, float* psum,
           int32_t* pcount, unsigned* ticket, float* loss) {
  return masked_loss_ce(pred, DType(dtype), target, mask, grad, geometry(geom), ignore_index,
                        reduction(counts, num_counts, grad_scale, psum, pcount), end_of(ticket, loss), nullptr);
}
// The tasks of masked_loss_multitask_forward: kinds[i] -1 for ce (geoms[13 i..] given), else the ElementwiseKind
// (totals[i], Ms[i] given); grads[i] null for no gradient.
static std::vector<LossTask> tasks_of(const void** preds, const int* dtypes, const void** targets, const int* tdtypes,
                                      const int* kinds, const bool** masks, void** grads, const int64_t* geoms,
                                      int64_t ignore_index, const int64_t* totals, const int64_t* Ms, float** losses,
                                      int n) {
  std::vector<LossTask> tasks(n);
  for (int i = 0; i < n; ++i) {
    LossTask& t = tasks[i];
    t.is_ce = kinds[i] < 0;
    t.kind = ElementwiseKind(kinds[i] < 0 ? 0 : kinds[i]);
    t.pred = preds[i];
    t.dtype = DType(dtypes[i]);
    t.target = targets[i];
    t.target_dtype = DType(tdtypes[i]);
    t.mask = masks[i];
    t.grad = grads[i];
    t.geom = geometry(geoms + 13 * i);
    t.ignore_index = ignore_index;
    t.total = totals[i];
    t.M = Ms[i];
    t.loss = losses[i];
  }
  return tasks;
}
#define EMU_TASK_ARGS const void** preds, const int* dtypes, const void** targets, const int* tdtypes, \
    const int* kinds, const bool** masks, void** grads, const int64_t* geoms, int64_t ignore_index, \
    const int64_t* totals, const int64_t* Ms, float** losses, int n
#define EMU_TASKS tasks_of(preds, dtypes, targets, tdtypes, kinds, masks, grads, geoms, ignore_index, totals, Ms, \
    losses, n)
int64_t emu_multitask_slots(EMU_TASK_ARGS) { return masked_loss_multitask_slots(EMU_TASKS.data(), n); }
int emu_multitask_forward(EMU_TASK_ARGS, float* total, const float* weights, float* grad_scale, int32_t* counts,
                          float* psum, int32_t* pcount, float* loss_copies, unsigned* ticket, int grouped,
                          int group_blocks, int64_t group_tile_bytes) {
  MultitaskBuffers buf;
  buf.grouped = grouped != 0;
  buf.group_blocks = group_blocks;
  buf.group_tile_bytes = group_tile_bytes;
  buf.total = total;
  buf.weights = weights;
  buf.grad_scale = grad_scale;
  buf.counts = counts;
  buf.psum = psum;
  buf.pcount = pcount;
  buf.losses = loss_copies;
  buf.ticket = ticket;
  return masked_loss_multitask_forward(EMU_TASKS.data(), n, buf, nullptr);
}
int emu_count_float(const void* target, int tdtype, const bool* mask, int64_t total, int64_t M, int32_t* counts,
                    int num_blocks, float* loss, unsigned* ticket) {
  return masked_loss_count_float(target, DType(tdtype), mask, total, M, counts, num_blocks, loss, ticket, nullptr);
}
int emu_elementwise(int kind, const void* pred, int dtype, const void* target, int tdtype, const bool* mask, void* grad,
                    int64_t total, int64_t M, const int32_t* counts, int num_counts, float* grad_scale, float* psum,
                    int32_t* pcount, unsigned* ticket, float* loss) {
  return masked_loss_elementwise(ElementwiseKind(kind), pred, DType(dtype), target, DType(tdtype), mask, grad, total, M,
                                 reduction(counts, num_counts, grad_scale, psum, pcount), end_of(ticket, loss),
                                 nullptr);
}
int emu_scale(const void** ins, void** outs, const int64_t* numels, const int* dtypes, int n, const float* scales,
              int sms, int threads_per_sm) {
  ScaleTask tasks[kMaxScaleTasks];
  for (int i = 0; i < n; ++i) tasks[i] = {ins[i], outs[i], numels[i], DType(dtypes[i])};
  return masked_loss_scale_grads(tasks, n, scales, DeviceCapacity{sms, threads_per_sm}, nullptr);
}
int emu_scale_by(const void** ins, void** outs, const int64_t* numels, const int* dtypes, const float** g_tasks, int n,
                 const float* g_total, const float* weights, const float* factor, int sms, int threads_per_sm) {
  ScaleTask tasks[kMaxScaleTasks];
  for (int i = 0; i < n; ++i) tasks[i] = {ins[i], outs[i], numels[i], DType(dtypes[i]), g_tasks[i]};
  ScaleFactors f;
  f.g_total = g_total;
  f.weights = weights;
  f.factor = factor;
  return masked_loss_scale_grads_by(tasks, n, f, DeviceCapacity{sms, threads_per_sm}, nullptr);
}
int emu_count_blocks(int64_t total) { return masked_loss_count_blocks(total); }
int emu_max_count_blocks() { return kMaxCountBlocks; }
}
"""


# The masked loss's .cu files (with the kernel launches each holds) and the headers they include.
_EMU_KERNELS = {"masked_loss.cu": 8, "masked_loss_grouped.cu": 3, "masked_loss_scale.cu": 1}
_EMU_HEADERS = ["masked_loss.h", "masked_loss_grouped.h", "masked_loss_reduce.cuh", "masked_loss_count.cuh",
                "masked_loss_ce.cuh", "masked_loss_elementwise.cuh", "masked_loss_plan.cuh", "numeric.cuh"]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The CUDA launchers of the masked loss built for the CPU emulation, loaded with ctypes."""
    return cuda_emulation.build(tmp_path_factory.mktemp("cuda_emulation"), _EMU_KERNELS, _EMU_HEADERS, _EMU_SHIM)


_EMU_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


_ptr = cuda_emulation.ptr


def _emu_geometry(pred, target, mask, grad):
    """The CeGeometry masked_loss_aten.cpp builds, as a ctypes int64[13]."""

    from fastmtl.kernels.masked_loss import _collapsed_stride

    N, C = pred.shape[:2]
    S = math.prod(pred.shape[2:])
    ms = mask.stride(0) if mask is not None else 0
    if pred.dim() == 2:  # [N, C] as [1, C, N]
        g = [1, C, N, N * pred.stride(0), pred.stride(1), pred.stride(0), N * grad.stride(0), grad.stride(1),
             grad.stride(0), N * target.stride(0), target.stride(0), N * ms, ms]  # fmt: skip
    else:
        g = [N, C, S, pred.stride(0), pred.stride(1), _collapsed_stride(pred.shape[2:], pred.stride()[2:]),
             grad.stride(0), grad.stride(1), _collapsed_stride(grad.shape[2:], grad.stride()[2:]),
             target.stride(0), _collapsed_stride(target.shape[1:], target.stride()[1:]), ms, 0]  # fmt: skip
    return (ctypes.c_int64 * 13)(*g)


def _emu_task_args(tasks, grads, losses):
    """The EMU_TASK_ARGS of the shim for tasks (pred, target, mask, kind), their gradients (None: no gradient) and
    loss outputs."""

    geoms = []
    for pred, target, mask, kind in tasks:
        geoms.extend(_emu_geometry(pred, target, mask, pred) if kind == "ce" else [0] * 13)

    def arr(ctype, values):
        return (ctype * len(values))(*values)

    return (
        arr(ctypes.c_void_p, [p.data_ptr() for p, *_ in tasks]),
        arr(ctypes.c_int, [_EMU_DTYPE[p.dtype] for p, *_ in tasks]),
        arr(ctypes.c_void_p, [t.data_ptr() for _, t, _, _ in tasks]),
        arr(ctypes.c_int, [_EMU_DTYPE.get(t.dtype, 0) for _, t, _, _ in tasks]),
        arr(ctypes.c_int, [{"ce": -1, "bce": 0, "l1": 1, "mse": 2}[k] for *_, k in tasks]),
        arr(ctypes.c_void_p, [m.data_ptr() if m is not None else None for _, _, m, _ in tasks]),
        arr(ctypes.c_void_p, [g.data_ptr() if g is not None else None for g in grads]),
        arr(ctypes.c_int64, geoms), ctypes.c_int64(-100),
        arr(ctypes.c_int64, [p.numel() for p, *_ in tasks]),
        arr(ctypes.c_int64, [p.numel() // p.shape[0] if p.shape[0] else 0 for p, *_ in tasks]),
        arr(ctypes.c_void_p, [loss.data_ptr() for loss in losses]), len(tasks),
    )  # fmt: skip


def _emu_slots(lib, tasks, grads):
    """The slots masked_loss_multitask_slots gives (for one task: masked_loss_slots)."""

    lib.emu_multitask_slots.restype = ctypes.c_int64
    return lib.emu_multitask_slots(*_emu_task_args(tasks, grads, [torch.empty(()) for _ in tasks]))


def _emu_single_workspace(lib, task, grad):
    """Poisoned slots (psum, pcount) and ticket for one task's loss launch."""
    slots = max(_emu_slots(lib, [task], [grad]), 1)
    ticket = torch.full((1,), -1, dtype=torch.int32)
    return torch.full((slots,), float("nan")), torch.full((slots,), -1, dtype=torch.int32), ticket


def _emu_ce(lib, pred, target, mask, ignore_index=-100):
    """The count and loss launchers in normalised mode (fastmtl::masked_loss), on poisoned outputs and workspaces."""

    grad = torch.full_like(pred, float("nan"))
    geom = _emu_geometry(pred, target, mask, grad)
    blocks = lib.emu_count_blocks(ctypes.c_int64(geom[0] * geom[2]))
    counts = torch.full((blocks,), -1, dtype=torch.int32)
    loss = torch.full((), float("nan"))
    psum, pcount, ticket = _emu_single_workspace(lib, (pred, target, mask, "ce"), grad)
    ii = ctypes.c_int64(ignore_index)
    assert lib.emu_count_ce(_ptr(target), _ptr(mask), geom, ii, _ptr(counts), blocks, _ptr(loss), _ptr(ticket)) == 0
    dt = _EMU_DTYPE[pred.dtype]
    assert lib.emu_ce(_ptr(pred), dt, _ptr(target), _ptr(mask), _ptr(grad), geom, ii, _ptr(counts), blocks,
                      _ptr(None), _ptr(psum), _ptr(pcount), _ptr(ticket), _ptr(loss)) == 0  # fmt: skip
    return loss, grad


def _emu_elementwise(lib, pred, target, mask, kind):

    grad = torch.full_like(pred, float("nan"))
    total = ctypes.c_int64(pred.numel())
    M = ctypes.c_int64(pred.numel() // pred.shape[0])
    blocks = lib.emu_count_blocks(total)
    counts = torch.full((blocks,), -1, dtype=torch.int32)
    loss = torch.full((), float("nan"))
    psum, pcount, ticket = _emu_single_workspace(lib, (pred, target, mask, kind), grad)
    tdt, pdt = _EMU_DTYPE[target.dtype], _EMU_DTYPE[pred.dtype]
    assert lib.emu_count_float(_ptr(target), tdt, _ptr(mask), total, M, _ptr(counts), blocks, _ptr(loss),
                               _ptr(ticket)) == 0  # fmt: skip
    code = {"bce": 0, "l1": 1, "mse": 2}[kind]
    assert lib.emu_elementwise(code, _ptr(pred), pdt, _ptr(target), tdt, _ptr(mask), _ptr(grad), total, M,
                               _ptr(counts), blocks, _ptr(None), _ptr(psum), _ptr(pcount), _ptr(ticket),
                               _ptr(loss)) == 0  # fmt: skip
    return loss, grad


def _emu_multitask_forward(lib, tasks, weights, compute_grad=None, grouped=True, group_blocks=0, expect=0,
                           group_tile_bytes=0):
    """masked_loss_multitask_forward (what masked_multitask_loss_forward_cuda runs) on poisoned outputs and
    workspaces. tasks: (pred, target, mask, kind). Returns (total, losses, grad_scale, grads); grads[t] is None where
    compute_grad[t] is false. grouped=False: the chain even where the grouped launch applies; group_blocks: the
    grouped kernel's build (0: the default); expect: the launcher's return code; group_tile_bytes: the least a grouped
    loss tile moves (0: the default)."""
    n = len(tasks)
    compute_grad = compute_grad or [True] * n
    grads = [torch.full_like(pred, float("nan")) if c else None for (pred, *_), c in zip(tasks, compute_grad)]
    losses = [torch.full((), float("nan")) for _ in tasks]
    total = torch.full((), float("nan"))
    args = _emu_task_args(tasks, grads, losses)
    slots = max(_emu_slots(lib, tasks, grads), 1)
    counts = torch.full((n * lib.emu_max_count_blocks(),), -1, dtype=torch.int32)
    grad_scale = torch.full((n,), float("nan"))
    psum = torch.full((slots,), float("nan"))
    pcount = torch.full((slots,), -1, dtype=torch.int32)
    loss_copies = torch.full((n,), float("nan"))
    ticket = torch.full((1,), -1, dtype=torch.int32)
    assert lib.emu_multitask_forward(*args, _ptr(total), _ptr(weights), _ptr(grad_scale), _ptr(counts), _ptr(psum),
                                     _ptr(pcount), _ptr(loss_copies), _ptr(ticket), int(grouped),
                                     group_blocks, ctypes.c_int64(group_tile_bytes)) == expect  # fmt: skip
    return total, losses, grad_scale, grads


@pytest.mark.parametrize(
    "shape,layout,dtype,mask_mode",
    [
        ((37, 5), "contiguous", torch.float32, "random"),  # rows kernel, 4 threads per row
        ((6, 20), "contiguous", torch.bfloat16, "random"),  # 8 threads per row
        ((5, 100), "contiguous", torch.float16, "random"),  # 32 threads per row, cached
        ((3, 300), "contiguous", torch.float32, "random"),  # 32 threads per row, online softmax + re-read
        ((3, 300), "contiguous", torch.float32, "empty"),
        ((7, 1), "contiguous", torch.float32, "random"),  # C == 1: pixel kernel
        ((3, 13, 6, 7), "contiguous", torch.float32, "random"),  # NCHW: pixel kernel, logits in registers
        ((3, 13, 6, 7), "channels_last", torch.float16, "random"),  # channels_last: rows kernel
        ((2, 40, 5, 3), "contiguous", torch.bfloat16, "random"),  # NCHW, C > 16: online softmax
        ((2, 40, 5, 3), "contiguous", torch.float32, "empty"),
        ((3, 13, 4, 6), "contiguous", torch.float32, "random"),  # NCHW, S % 4 == 0: 4 pixels per thread
        ((2, 13, 8, 8), "contiguous", torch.bfloat16, "random"),
        ((2, 5, 4, 4), "contiguous", torch.float16, "none"),
        ((2, 5, 4, 4), "contiguous", torch.float32, "empty"),
    ],
)
def test_cuda_kernels_emulated_ce(emu, shape, layout, dtype, mask_mode):
    pred, target = make_ce(shape, layout, dtype, device="cpu")
    mask = make_mask(shape[0], mask_mode, device="cpu")
    loss, grad = _emu_ce(emu, pred, target, mask)
    ref_loss, ref_grad = reference(pred, target, mask, "ce")
    if ref_loss.item() == 0.0:
        assert loss.item() == 0.0 and torch.count_nonzero(grad).item() == 0
    else:
        tol = TOLERANCES["loss"][dtype]
        assert rel_err(loss, ref_loss) <= tol and rel_err(grad, ref_grad) <= tol



@pytest.mark.parametrize("C", range(1, 17))
def test_cuda_pixel_vec_every_class_count_emulated(emu, C):
    """The vectorised pixel cross entropy takes C as a constant (1 to 16): every C in the per-task kernel (4 pixels
    per thread) and in the grouped forward (2 per thread), with ignored, out-of-range and unlabelled pixels."""
    torch.manual_seed(C)
    dtype = (torch.bfloat16, torch.float16, torch.float32)[C % 3]
    pred, target = make_ce((3, C, 4, 6), "contiguous", dtype, device="cpu")
    mask = make_mask(3, "random", device="cpu")
    loss, grad = _emu_ce(emu, pred, target, mask)
    ref_loss, ref_grad = reference(pred, target, mask, "ce")
    tol = TOLERANCES["loss"][dtype]
    if ref_loss.item() == 0.0:
        assert loss.item() == 0.0 and torch.count_nonzero(grad).item() == 0
    else:
        assert rel_err(loss, ref_loss) <= tol and rel_err(grad, ref_grad) <= tol
    depth, depth_t = make_dense("l1", (3, 1, 4, 6), "contiguous", dtype, device="cpu")
    tasks = [(pred, target, mask, "ce"), (depth, depth_t, None, "l1")]
    emu.emu_take_launches()
    out = _emu_multitask_forward(emu, tasks, None)
    assert emu.emu_take_launches() == 1  # the grouped launch
    _check_multitask(tasks, None, *out, lead=-1)

@pytest.mark.parametrize(
    "kind,dtype,target_dtype,misaligned",
    [
        ("bce", torch.float32, torch.float32, True),
        ("l1", torch.bfloat16, torch.float32, False),
        ("mse", torch.float16, torch.float16, False),
        ("bce", torch.float16, torch.float32, False),
        ("mse", torch.float32, torch.float32, False),
    ],
)
def test_cuda_kernels_emulated_elementwise(emu, kind, dtype, target_dtype, misaligned):
    """16-byte vectors where aligned (scalar path otherwise), odd sizes (vector tail), mixed target dtype."""
    pred, target = make_dense(kind, (3, 1201), "contiguous", dtype, device="cpu")
    target = target.to(target_dtype)
    if misaligned:
        pred = torch.cat([pred.new_zeros(1), pred.flatten()])[1:].view(3, 1201)
    mask = torch.tensor([True, False, True])
    loss, grad = _emu_elementwise(emu, pred, target, mask, kind)
    ref_loss, ref_grad = reference(pred, target, mask, kind)
    tol = TOLERANCES["loss"][dtype]
    assert rel_err(loss, ref_loss) <= tol and rel_err(grad, ref_grad) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_emulated_ce_misaligned_pixels(emu, dtype):
    """NCHW logits one element off a vector boundary: the one-pixel-per-thread kernel, same results."""
    pred, target = make_ce((2, 6, 4, 4), "contiguous", dtype, device="cpu")
    pred = torch.cat([pred.new_zeros(1), pred.flatten()])[1:].view(pred.shape)
    mask = make_mask(2, "random", device="cpu")
    loss, grad = _emu_ce(emu, pred, target, mask)
    ref_loss, ref_grad = reference(pred, target, mask, "ce")
    tol = TOLERANCES["loss"][dtype]
    assert rel_err(loss, ref_loss) <= tol and rel_err(grad, ref_grad) <= tol


def test_count_grid_gives_each_block_one_chunk_up_to_its_cap(emu):
    """Count blocks are latency-bound: one chunk of 4 x 256 targets per block until the grid reaches its cap."""

    cap = emu.emu_max_count_blocks()
    for total, want in ((0, 1), (1, 1), (1024, 1), (1025, 2), (884_736, 864), (cap * 1024, cap), (10**9, cap)):
        assert emu.emu_count_blocks(ctypes.c_int64(total)) == want, total


@pytest.mark.parametrize("kind", ["ce", "l1"])
def test_cuda_kernels_emulated_counts_over_many_chunks(emu, kind):
    """Targets beyond what the largest count grid covers in one pass (each block walks several chunks, the last one
    partial): the partial counts add up to the valid elements (targets valid and sample labelled); the loss and the
    ticket are zeroed."""

    n, s = 5, 240_007  # 1200035 elements: 1024 blocks of 4 x 256 per chunk, 1 to 2 chunks each
    mask = torch.tensor([True, False, True, True, True])
    loss = torch.full((), float("nan"))
    ticket = torch.full((1,), -1, dtype=torch.int32)
    blocks = emu.emu_count_blocks(ctypes.c_int64(n * s))
    assert blocks == emu.emu_max_count_blocks() == 1024
    counts = torch.full((blocks,), -1, dtype=torch.int32)
    if kind == "ce":
        target = torch.randint(-1, 7, (n, s))  # -1: ignore_index; 6: out of range for C = 6
        valid = (target >= 0) & (target < 6) & mask[:, None]
        pred = torch.empty(n, 6, s)
        geom = _emu_geometry(pred, target, mask, pred)
        assert emu.emu_count_ce(_ptr(target), _ptr(mask), geom, ctypes.c_int64(-1), _ptr(counts), blocks, _ptr(loss),
                                _ptr(ticket)) == 0  # fmt: skip
    else:
        target = torch.randn(n, s).to(torch.bfloat16)
        target[target > 1.0] = float("nan")
        valid = ~target.isnan() & mask[:, None]
        assert emu.emu_count_float(_ptr(target), _EMU_DTYPE[torch.bfloat16], _ptr(mask), ctypes.c_int64(n * s),
                                   ctypes.c_int64(s), _ptr(counts), blocks, _ptr(loss), _ptr(ticket)) == 0  # fmt: skip
    assert (counts >= 0).all() and counts.sum().item() == valid.sum().item()
    assert loss.item() == 0.0 and ticket.item() == 0


# A loss near 0 (say one confident pixel) is compared absolutely below this: cross entropy's log(sum of exps) with the
# sum near 1 is rounded at float32's epsilon, in PyTorch's own float32 log_softmax as in our kernels.
_LOSS_FLOOR = 4 * torch.finfo(torch.float32).eps


def _check_multitask(tasks, weights, total, losses, grad_scale, grads, lead):
    """Losses, total and grads * grad_scale against the float64 reference; every gradient but the lead's and float16
    ones already divided (factor 1), so the backward moves no memory for them."""
    want_total = 0.0
    for t, ((pred, target, mask, kind), loss, grad) in enumerate(zip(tasks, losses, grads)):
        ref_loss, ref_grad = reference(pred, target, mask, kind)
        want_total += (weights[t].item() if weights is not None else 1.0) * ref_loss.item()
        tol = TOLERANCES["loss"][pred.dtype]
        if ref_loss.item() == 0.0:  # no valid element: loss 0 and a zero gradient
            assert loss.item() == 0.0 and (grad is None or torch.count_nonzero(grad).item() == 0)
            continue
        assert rel_err(loss, ref_loss) <= tol or abs(loss.item() - ref_loss.item()) <= _LOSS_FLOOR
        if grad is not None:
            assert rel_err(grad.double() * grad_scale[t].item(), ref_grad) <= tol
            if t != lead and pred.dtype != torch.float16:
                assert grad_scale[t].item() == 1.0
    assert abs(total.item() - want_total) <= max(1e-5 * abs(want_total), _LOSS_FLOOR)


@pytest.mark.parametrize("weighted", [True, False])
def test_cuda_kernels_emulated_multitask_forward(emu, weighted):
    """masked_loss_multitask_forward's chain over every kernel path (ce and float targets): the lead (rows, the
    smallest gradient) in partials mode, each launch counting the next task, the second finalizing the lead; T
    launches."""
    torch.manual_seed(0)
    seg, seg_t = make_ce((3, 5, 4, 8), "contiguous", torch.float32, device="cpu")  # 4 pixels per thread
    odd, odd_t = make_ce((3, 13, 6, 7), "contiguous", torch.float16, device="cpu")  # one pixel per thread
    rows, rows_t = make_ce((5, 7), "contiguous", torch.bfloat16, device="cpu")  # rows kernel
    depth, depth_t = make_dense("l1", (3, 1, 40, 9), "contiguous", torch.float32, device="cpu")  # 16-byte vectors
    attr, attr_t = make_dense("bce", (3, 1201), "contiguous", torch.float32, device="cpu")
    attr = torch.cat([attr.new_zeros(1), attr.flatten()])[1:].view(3, 1201)  # misaligned: scalar path
    empty, empty_t = make_dense("mse", (3, 17), "contiguous", torch.float32, device="cpu")
    tasks = [
        (seg, seg_t, make_mask(3, "random", device="cpu"), "ce"),
        (odd, odd_t, None, "ce"),
        (rows, rows_t, make_mask(5, "random", device="cpu"), "ce"),
        (depth, depth_t, make_mask(3, "random", device="cpu"), "l1"),
        (attr, attr_t, None, "bce"),
        (empty, empty_t, make_mask(3, "empty", device="cpu"), "mse"),
        _large_mse_task(device="cpu"),  # float16, 2 (p - t) beyond its range
    ]
    tasks[3] = (depth.half(), depth_t.half(), tasks[3][2], "l1")  # a float16 target in a count pass
    weights = torch.rand(len(tasks)) + 0.5 if weighted else None
    emu.emu_take_launches()
    out = _emu_multitask_forward(emu, tasks, weights)
    assert emu.emu_take_launches() == len(tasks)
    _check_multitask(tasks, weights, *out, lead=2)
    assert out[2][2].item() != 1.0  # the lead's gradient is stored undivided


@pytest.mark.parametrize("lead_kind", ["mse", "ce"])
def test_cuda_kernels_emulated_multitask_lead_paths(emu, lead_kind):
    """The lead's partials in each reduction path: an mse lead (stored halved, factor 2 / count) and a lead without
    a gradient (size 0, so it leads even though it is the largest task), plus a task without elements (no launch:
    loss and factor zeroed) among them."""
    torch.manual_seed(1)
    seg, seg_t = make_ce((2, 13, 8, 8), "contiguous", torch.float32, device="cpu")
    depth, depth_t = make_dense("mse", (2, 1, 5, 7), "contiguous", torch.float32, device="cpu")
    none, none_t = make_dense("l1", (0, 4), "contiguous", torch.float32, device="cpu")
    tasks = [(seg, seg_t, None, "ce"), (none, none_t, None, "l1"),
             (depth, depth_t, make_mask(2, "random", device="cpu"), "mse")]  # fmt: skip
    compute_grad = [lead_kind != "ce", True, True]
    weights = torch.rand(3) + 0.5
    emu.emu_take_launches()
    out = _emu_multitask_forward(emu, tasks, weights, compute_grad, grouped=False)
    assert emu.emu_take_launches() == 2  # the task without elements costs a memset, not a launch
    total, losses, grad_scale, grads = out
    assert losses[1].item() == 0.0 and grad_scale[1].item() == 0.0
    _check_multitask(tasks, weights, *out, lead=0 if lead_kind == "ce" else 2)


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("nan_task", [None, 1, 2])
def test_cuda_kernels_emulated_nan_weight_on_an_empty_task(emu, nan_task, grouped):
    """A NaN weight makes the total NaN even where its task has no valid element (weight * 0, as on the other
    backends): in the chain on the lead (task 1, the smallest) and on a later task, and in the grouped launch;
    finite weights keep it finite."""
    torch.manual_seed(3)
    seg, seg_t = make_ce((3, 5, 4, 8), "contiguous", torch.float32, device="cpu")
    lead, lead_t = make_dense("mse", (3, 17), "contiguous", torch.float32, device="cpu")
    depth, depth_t = make_dense("l1", (3, 40), "contiguous", torch.float32, device="cpu")
    empty = make_mask(3, "empty", device="cpu")
    tasks = [(seg, seg_t, None, "ce"), (lead, lead_t, empty, "mse"), (depth, depth_t, empty, "l1")]
    weights = torch.rand(3) + 0.5
    if nan_task is not None:
        weights[nan_task] = float("nan")
    total, losses, _, _ = _emu_multitask_forward(emu, tasks, weights, grouped=grouped)
    assert losses[1].item() == 0.0 and losses[2].item() == 0.0
    assert total.isnan().item() == (nan_task is not None)


@pytest.mark.parametrize("grouped", [True, False])
def test_cuda_kernels_emulated_multitask_one_task_with_elements(emu, grouped):
    """A single task with elements: the grouped launch alone; or, without it, no chain: one count launch for all
    tasks, then its loss kernel."""
    torch.manual_seed(2)
    depth, depth_t = make_dense("l1", (3, 1, 4, 6), "contiguous", torch.float32, device="cpu")
    none, none_t = make_ce((0, 5), "contiguous", torch.float32, device="cpu")
    tasks = [(none, none_t, None, "ce"), (depth, depth_t, make_mask(3, "random", device="cpu"), "l1")]
    weights = torch.rand(2) + 0.5
    emu.emu_take_launches()
    out = _emu_multitask_forward(emu, tasks, weights, grouped=grouped)
    assert emu.emu_take_launches() == (1 if grouped else 2)
    assert out[1][0].item() == 0.0
    _check_multitask(tasks, weights, *out, lead=-1)


@pytest.mark.parametrize("nan_weight", [False, True])
def test_cuda_kernels_emulated_multitask_without_elements(emu, nan_weight):
    """No task has elements (an empty batch): the count launch alone writes every loss (0), every factor and the
    total, sum_t w_t * 0, which a NaN weight makes NaN as on the other backends."""
    tasks = [(*make_ce((0, 5), "contiguous", torch.float32, device="cpu"), None, "ce") for _ in range(3)]
    weights = torch.rand(3) + 0.5
    if nan_weight:
        weights[1] = float("nan")
    emu.emu_take_launches()
    total, losses, grad_scale, _ = _emu_multitask_forward(emu, tasks, weights)
    assert emu.emu_take_launches() == 1
    assert all(loss.item() == 0.0 for loss in losses) and not grad_scale.isnan().any()
    assert total.isnan().item() if nan_weight else total.item() == 0.0


@pytest.mark.parametrize("with_elements", [0, 17])
def test_cuda_kernels_emulated_one_task_with_elements_among_18(emu, with_elements):
    """18 tasks, one with elements, in the first or second group of the count launches: its loss launch ends the op
    (loss and total); the tasks without elements keep loss 0 and an infinite weight still makes the total NaN."""
    torch.manual_seed(0)
    tasks = [(*make_ce((0, 5), "contiguous", torch.float32, device="cpu"), None, "ce") for _ in range(18)]
    pred, target = make_dense("l1", (3, 1, 40, 90), "contiguous", torch.float16, device="cpu")
    tasks[with_elements] = (pred, target, make_mask(3, "random", device="cpu"), "l1")
    weights = torch.rand(18) + 0.5
    out = _in_block_order(emu, 5, lambda: _emu_multitask_forward(emu, tasks, weights))
    _check_multitask(tasks, weights, *out, lead=-1)
    weights[3] = float("inf")
    total = _in_block_order(emu, 5, lambda: _emu_multitask_forward(emu, tasks, weights))[0]
    assert total.isnan().item()


@st.composite
def _emulated_task(draw):
    """One task of the CUDA multi-task forward: kind, layout, dtype, batch (0 = no elements), mask, gradient."""
    torch.manual_seed(draw(st.integers(0, 2**16)))  # the tensors' values: replayed with the example
    kind = draw(st.sampled_from(["ce", "bce", "l1", "mse"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    n = draw(st.integers(0, 3))
    if kind == "ce":
        layout = draw(st.sampled_from(["rows", "contiguous", "channels_last"]))
        c = draw(st.integers(1, 20))
        shape = (n * 7, c) if layout == "rows" else (n, c, draw(st.integers(1, 9)), draw(st.sampled_from([4, 7, 8])))
        pred, target = make_ce(shape, "contiguous" if layout == "rows" else layout, dtype, device="cpu")
    else:
        shape = (n, draw(st.integers(1, 3)), draw(st.integers(1, 40)))
        pred, target = make_dense(kind, shape, "contiguous", dtype, device="cpu")
        target = target.to(draw(st.sampled_from([torch.float32, dtype])))
    mode = draw(st.sampled_from(["none", "random", "empty"]))
    mask = make_mask(pred.shape[0], mode if pred.shape[0] else "empty", device="cpu")
    return (pred, target, mask, kind), draw(st.booleans())


def _grouped_applies(tasks):
    """Whether masked_loss_grouped.cu runs these tasks in one grouped launch: 1 to 8 tasks with elements, one dtype."""
    with_elements = [pred for pred, target, _, _ in tasks if target.numel() > 0]
    return 1 <= len(with_elements) <= 8 and len({pred.dtype for pred in with_elements}) == 1


def _chain_lead(tasks, compute_grad):
    """The task masked_loss.cu's chain_order leads with (fewest gradient elements among tasks with elements, none
    counting as 0), or -1 when fewer than two tasks have elements (no chain)."""
    sizes = {}
    for t, ((pred, target, _, kind), grad) in enumerate(zip(tasks, compute_grad)):
        if target.numel() > 0:
            sizes[t] = pred.numel() if grad else 0
    return min(sizes, key=lambda t: (sizes[t], t)) if len(sizes) >= 2 else -1


@settings(max_examples=25, deadline=None)
@given(drawn=st.lists(_emulated_task(), min_size=1, max_size=5), weighted=st.booleans(),
       seed=st.integers(1, 10_000), one_dtype=st.booleans())  # fmt: skip
def test_cuda_kernels_emulated_multitask_hypothesis(emu, drawn, weighted, seed, one_dtype):
    """Drawn task sets (every kind, layout, dtype, empty batches and masks, with and without gradients), in the chain
    or (one_dtype: every pred in the first task's dtype) the grouped launch: every loss, factor and gradient against
    the float64 reference, and bitwise the same with the blocks in a random order."""
    tasks = [task for task, _ in drawn]
    if one_dtype:
        dtype = tasks[0][0].dtype
        tasks = [(p.to(dtype), t if k == "ce" or t.dtype == torch.float32 else t.to(dtype), m, k) for p, t, m, k in tasks]
    compute_grad = [grad for _, grad in drawn]
    weights = torch.rand(len(tasks)) + 0.5 if weighted else None

    def run():
        return _emu_multitask_forward(emu, tasks, weights, compute_grad)

    out = _in_block_order(emu, 0, run)
    lead = -1 if _grouped_applies(tasks) else _chain_lead(tasks, compute_grad)  # grouped: every factor is final
    _check_multitask(tasks, weights, *out, lead=lead)
    _assert_bitwise_equal(out, _in_block_order(emu, seed, run))


def _misaligned(t):
    """t's values in a copy that starts one element past an allocation: no 16-byte vectors (scalar paths)."""
    return torch.cat([t.new_zeros(1), t.flatten()])[1:].view(t.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernels_emulated_grouped_forward(emu, dtype):
    """The grouped launch over every tile function and both count paths (16-byte vectors, scalar chunks), with a
    task without elements and one without a labelled sample among them: one launch (plus memsets); every gradient is
    final (factor 1) but float16's."""
    torch.manual_seed(4)
    seg, seg_t = make_ce((3, 5, 4, 8), "contiguous", dtype, device="cpu")  # 4 pixels per thread
    odd, odd_t = make_ce((3, 13, 6, 7), "contiguous", dtype, device="cpu")  # one pixel per thread
    rows, rows_t = make_ce((5, 7), "contiguous", dtype, device="cpu")  # 4 threads per row
    cl, cl_t = make_ce((2, 20, 3, 4), "channels_last", dtype, device="cpu")  # 8 threads per row
    depth, depth_t = make_dense("l1", (3, 1, 40, 9), "contiguous", dtype, device="cpu")  # vectors, float32 targets
    attr, attr_t = make_dense("bce", (3, 121), "contiguous", dtype, device="cpu")
    none, none_t = make_ce((0, 5), "contiguous", dtype, device="cpu")
    empty, empty_t = make_dense("mse", (3, 17), "contiguous", dtype, device="cpu")
    tasks = [
        (seg, seg_t, make_mask(3, "random", device="cpu"), "ce"),
        (odd, _misaligned(odd_t), None, "ce"),  # scalar count chunks
        (rows, rows_t, make_mask(5, "random", device="cpu"), "ce"),
        (cl, cl_t, None, "ce"),
        (depth, depth_t, make_mask(3, "random", device="cpu"), "l1"),
        (_misaligned(attr), _misaligned(attr_t.to(dtype)), None, "bce"),  # scalar loss and count paths
        (none, none_t, None, "ce"),
        (empty, empty_t.to(dtype), make_mask(3, "empty", device="cpu"), "mse"),
    ]
    weights = torch.rand(len(tasks)) + 0.5
    emu.emu_take_launches()
    out = _emu_multitask_forward(emu, tasks, weights)
    assert emu.emu_take_launches() == 1
    _check_multitask(tasks, weights, *out, lead=-1)
    assert out[2][6].item() == 0.0  # the task without elements: factor 0, as in the chain


def test_cuda_kernels_emulated_grouped_builds(emu):
    """The grouped kernel's builds for 2, 3 and 4 resident blocks per SM run the same arithmetic: bitwise the same
    results as the default build; another value is refused (cudaErrorInvalidValue) before any launch."""
    torch.manual_seed(6)
    seg, seg_t = make_ce((2, 7, 8, 8), "contiguous", torch.bfloat16, device="cpu")
    depth, depth_t = make_dense("l1", (2, 1, 8, 8), "contiguous", torch.bfloat16, device="cpu")
    tasks = [(seg, seg_t, make_mask(2, "random", device="cpu"), "ce"), (depth, depth_t.bfloat16(), None, "l1")]
    default = _emu_multitask_forward(emu, tasks, None)
    for blocks in (2, 3, 4):
        _assert_bitwise_equal(default, _emu_multitask_forward(emu, tasks, None, group_blocks=blocks))
    emu.emu_take_launches()
    _emu_multitask_forward(emu, tasks, None, group_blocks=5, expect=1)
    assert emu.emu_take_launches() == 0



def test_cuda_kernels_emulated_grouped_tile_sizes(emu):
    """The grouped forward's loss tiles from one block of the per-task kernel (a single 2-pixel block of the pixel
    cross entropy: task_slots gives it a slot of its own) to the most per tile: the same gradients bitwise (each element
    is computed alike), losses within float32 rounding (the slots are summed in other groupings), and every slot a
    tile writes inside the task's share (a poisoned workspace shows otherwise)."""
    torch.manual_seed(7)
    seg, seg_t = make_ce((3, 13, 16, 32), "contiguous", torch.bfloat16, device="cpu")
    depth, depth_t = make_dense("l1", (3, 1, 16, 32), "contiguous", torch.bfloat16, device="cpu")
    tasks = [(seg, seg_t, make_mask(3, "random", device="cpu"), "ce"), (depth, depth_t.bfloat16(), None, "l1")]
    default = _emu_multitask_forward(emu, tasks, None)
    _check_multitask(tasks, None, *default, lead=-1)
    for tile_bytes in (1, 4096, 1 << 20):
        out = _emu_multitask_forward(emu, tasks, None, group_tile_bytes=tile_bytes)
        _check_multitask(tasks, None, *out, lead=-1)
        for a, b in zip(default[3], out[3], strict=True):
            assert torch.equal(a, b)
        for a, b in zip(default[1], out[1], strict=True):
            assert abs(a.item() - b.item()) <= 1e-6 * abs(a.item())

@pytest.mark.parametrize("C", [40, 100, 200, 300])
def test_cuda_kernels_emulated_grouped_rows(emu, C):
    """The grouped launch's rows tile functions for wide rows (16 and 32 threads per row, 4 or 8 logits cached per
    lane, or none), beside a float16 mse task stored undivided (its factor in grad_scale)."""
    torch.manual_seed(C)
    pred, target = make_ce((9, C), "contiguous", torch.float16, device="cpu")
    tasks = [(pred, target, make_mask(9, "random", device="cpu"), "ce"), _large_mse_task(device="cpu")]
    out = _emu_multitask_forward(emu, tasks, None)
    _check_multitask(tasks, None, *out, lead=-1)
    assert out[2][1].item() != 1.0  # float16: stored undivided, the factor in grad_scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_emulated_grouped_many_tiles(emu, dtype):
    """Tasks of several count and loss tiles each, samples that end inside a 16-byte vector of targets (37 and 111
    elements per sample) and a random mask: the count words (tiles done, valid targets) and the per-task tickets."""
    torch.manual_seed(5)
    seg, seg_t = make_ce((3, 6, 48, 40), "contiguous", dtype, device="cpu")  # 5760 pixels: 3 count, 6 loss tiles
    depth, depth_t = make_dense("l1", (7, 37, 111), "contiguous", dtype, device="cpu")
    attr, attr_t = make_dense("mse", (40, 37), "contiguous", dtype, device="cpu")
    tasks = [(seg, seg_t, make_mask(3, "random", device="cpu"), "ce"),
             (depth, depth_t.to(dtype), make_mask(7, "random", device="cpu"), "l1"),
             (attr, attr_t, make_mask(40, "random", device="cpu"), "mse")]  # fmt: skip
    weights = torch.rand(3) + 0.5
    emu.emu_take_launches()
    out = _emu_multitask_forward(emu, tasks, weights)
    assert emu.emu_take_launches() == 1
    _check_multitask(tasks, weights, *out, lead=-1)


def test_cuda_kernels_emulated_multitask_forward_over_16_tasks(emu):
    """18 tasks: the chain has no task limit (each launch counts the next task)."""
    torch.manual_seed(0)
    tasks = []
    for i in range(18):
        if i % 2:
            pred, target = make_ce((3, 4, 2, 4), "contiguous", torch.float32, device="cpu")
            tasks.append((pred, target, make_mask(3, "random", device="cpu"), "ce"))
        else:
            pred, target = make_dense("l1", (3, 50 * (i + 1)), "contiguous", torch.float32, device="cpu")
            tasks.append((pred, target, None, "l1"))
    weights = torch.rand(len(tasks)) + 0.5
    emu.emu_take_launches()
    out = _emu_multitask_forward(emu, tasks, weights)
    assert emu.emu_take_launches() == 18
    _check_multitask(tasks, weights, *out, lead=1)  # the first 3x4x2x4 ce task: the smallest gradient


def _in_block_order(lib, seed, run):
    """``run()`` with the emulation running every launch's blocks in the order drawn from ``seed`` (0: by index)."""
    lib.emu_set_block_order(seed)
    try:
        return run()
    finally:
        lib.emu_set_block_order(0)


def _assert_bitwise_equal(a, b):
    for x, y in zip(a, b, strict=True):
        if isinstance(x, (list, tuple)):
            _assert_bitwise_equal(x, y)
        elif x is not None or y is not None:
            a, b = (t.detach().reshape(-1).view(torch.uint8) for t in (x, y))
            assert torch.equal(a, b), "not bitwise the same"


@pytest.mark.parametrize("case", ["grouped", "chain", "one task with elements", "masked_loss ce", "masked_loss l1"])
def test_cuda_kernels_emulated_results_do_not_depend_on_block_order(emu, case):
    """Losses, total, factors and gradients are bitwise the same whatever order the blocks run in: no floating-point
    sum depends on which block finishes first (run-to-run determinism on the GPU), for the grouped launch, the chain,
    the one-task forward and the one-task op (fastmtl::masked_loss)."""
    torch.manual_seed(4)
    seg, seg_t = make_ce((8, 13, 32, 32), "contiguous", torch.float32, device="cpu")  # 4 pixels per thread
    cls, cls_t = make_ce((300, 10), "contiguous", torch.float32, device="cpu")  # rows kernel
    depth, depth_t = make_dense("l1", (8, 1, 64, 64), "contiguous", torch.float32, device="cpu")
    masks = [make_mask(n, "random", device="cpu") for n in (8, 300, 8)]
    weights = torch.rand(3) + 0.5
    if case in ("grouped", "chain"):
        tasks = [(seg, seg_t, masks[0], "ce"), (cls, cls_t, masks[1], "ce"), (depth, depth_t, masks[2], "l1")]
        run = lambda: _emu_multitask_forward(emu, tasks, weights, grouped=case == "grouped")  # noqa: E731
    elif case == "one task with elements":
        none, none_t = make_ce((0, 5), "contiguous", torch.float32, device="cpu")
        tasks = [(none, none_t, None, "ce"), (depth, depth_t, masks[2], "l1")]
        run = lambda: _emu_multitask_forward(emu, tasks, weights[:2], grouped=False)  # noqa: E731
    elif case == "masked_loss ce":
        run = lambda: _emu_ce(emu, seg, seg_t, masks[0])  # noqa: E731
    else:
        run = lambda: _emu_elementwise(emu, depth, depth_t, masks[2], "l1")  # noqa: E731
    by_index = _in_block_order(emu, 0, run)
    for seed in (1, 2, 3):
        _assert_bitwise_equal(by_index, _in_block_order(emu, seed, run))


def test_cuda_kernels_emulated_float16_gradients_keep_their_precision(emu):
    """float16 logits with a large valid count: gradient / count would be float16 subnormals (about 1e-5), so the
    gradient is stored undivided with its factor; scaled by a loss scaler's 65536 it matches the reference."""
    torch.manual_seed(0)
    pred, target = make_ce((2, 13, 96, 96), "contiguous", torch.float16, device="cpu")
    tasks = [(pred, target, None, "ce")]
    _, _, grad_scale, grads = _emu_multitask_forward(emu, tasks, None)
    _, ref_grad = reference(pred, target, None, "ce")
    want = ref_grad * 65536.0
    scaled = (grads[0].float() * (grad_scale[0] * 65536.0)).half().double()  # what the backward's scaling computes
    divided = (ref_grad.half().float() * 65536.0).double()  # had float16 stored gradient / count
    nonzero = want.abs() > 1e-3

    def flushed(x):  # entries the reference has that came out as zero
        return ((x == 0) & nonzero).sum().item() / nonzero.sum().item()

    assert rel_err(scaled, want) <= 2e-3 and flushed(scaled) <= 0.01
    assert flushed(divided) > 0.03, "the case must be one where dividing in float16 loses the small entries"


# (SMs, threads per SM): one small SM (4 blocks: the grid strides across tasks), sm_86-like (6 per SM), an H100
_CAPACITIES = [(1, 1024), (7, 1536), (132, 2048)]


def _guarded(t, pad=3000):
    """``t``'s values in the middle of a NaN-filled buffer: (buffer, view). A chunk that strays outside the view shows
    as a changed margin."""
    flat = torch.full((pad + t.numel() + pad,), float("nan"), dtype=t.dtype)
    view = flat[pad : pad + t.numel()].view(t.shape)
    view.copy_(t)
    return flat, view


def _assert_margins_untouched(buffer, view):
    pad = (buffer.numel() - view.numel()) // 2
    assert buffer[:pad].isnan().all() and buffer[pad + view.numel() :].isnan().all()


@pytest.mark.parametrize("capacity", _CAPACITIES)
def test_cuda_kernels_emulated_scale_grads(emu, capacity):
    """Whole 16-byte-aligned chunks in vectors, the tails and a misaligned tensor one element at a time; on the
    small devices the grid is smaller than the 25 chunks, so each block strides across tasks. A scale of exactly 1
    out of place still copies. Nothing outside the outputs is written."""

    grads = [torch.randn(3, 700), torch.randn(2, 5).half(), torch.randn(0, 3), torch.randn(4000).bfloat16(),
             torch.randn(4097)[1:], torch.randn(36000).half()]  # fmt: skip
    guarded = [_guarded(torch.empty_like(g)) for g in grads]
    outs = [view.fill_(float("nan")) for _, view in guarded]
    scales = torch.randn(len(grads))
    scales[3] = 1.0
    n = len(grads)
    ins = (ctypes.c_void_p * n)(*[g.data_ptr() for g in grads])
    out_ptrs = (ctypes.c_void_p * n)(*[o.data_ptr() for o in outs])
    numels = (ctypes.c_int64 * n)(*[g.numel() for g in grads])
    dtypes = (ctypes.c_int * n)(*[_EMU_DTYPE[g.dtype] for g in grads])
    emu.emu_take_launches()
    assert emu.emu_scale(ins, out_ptrs, numels, dtypes, n, _ptr(scales), *capacity) == 0
    assert emu.emu_take_launches() == 1
    for g, o, s, (buffer, view) in zip(grads, outs, scales, guarded):
        assert rel_err(o, (g.double() * s.double()).to(g.dtype)) <= TOLERANCES["loss"][g.dtype]
        _assert_margins_untouched(buffer, view)


@pytest.mark.parametrize("capacity", [(0, 2048), (132, 128)])
def test_cuda_kernels_emulated_scale_grads_refuses_a_device_without_room(emu, capacity):
    """No SMs, or SMs that cannot hold one 256-thread block: refused (cudaErrorInvalidValue), nothing launched."""

    g = torch.randn(10)
    emu.emu_take_launches()
    ptrs = (ctypes.c_void_p * 1)(g.data_ptr())
    one = _ptr(torch.ones(1))
    assert emu.emu_scale(ptrs, ptrs, (ctypes.c_int64 * 1)(10), (ctypes.c_int * 1)(0), 1, one, *capacity) == 1
    assert emu.emu_take_launches() == 0


@pytest.mark.parametrize("capacity", _CAPACITIES)
@pytest.mark.parametrize(
    "with_total,with_weights,with_factor", [(True, True, True), (True, False, True), (False, False, True), (True, True, False)]
)
def test_cuda_kernels_emulated_scale_grads_by(emu, with_total, with_weights, with_factor, capacity):
    """The backward of masked_multitask_loss_forward: scale_t = (g_total * w_t + g_task[t]) * factor[t] in the kernel
    (no factor: 1, what the CUDA forward's already-divided gradients need)."""

    grads = [torch.randn(3, 700), torch.randn(2, 5).half(), torch.randn(4000).bfloat16(), torch.randn(10),
             torch.randn(20000)]  # fmt: skip
    n = len(grads)
    outs = [torch.full_like(g, float("nan")) for g in grads]
    g_total, weights, factor = torch.rand(()), torch.rand(n) + 0.5, torch.rand(n)
    g_tasks = [torch.rand(()), None, torch.rand(()), None, torch.rand(())]
    ins = (ctypes.c_void_p * n)(*[g.data_ptr() for g in grads])
    out_ptrs = (ctypes.c_void_p * n)(*[o.data_ptr() for o in outs])
    numels = (ctypes.c_int64 * n)(*[g.numel() for g in grads])
    dtypes = (ctypes.c_int * n)(*[_EMU_DTYPE[g.dtype] for g in grads])
    task_ptrs = (ctypes.c_void_p * n)(*[g.data_ptr() if g is not None else None for g in g_tasks])
    total_ptr = _ptr(g_total if with_total else None)
    weights_ptr = _ptr(weights if with_weights else None)
    factor_ptr = _ptr(factor if with_factor else None)
    assert emu.emu_scale_by(ins, out_ptrs, numels, dtypes, task_ptrs, n, total_ptr, weights_ptr, factor_ptr,
                            *capacity) == 0  # fmt: skip
    for t, (g, o) in enumerate(zip(grads, outs)):
        scale = g_total.item() * (weights[t].item() if with_weights else 1.0) if with_total else 0.0
        scale += g_tasks[t].item() if g_tasks[t] is not None else 0.0
        scale *= factor[t].item() if with_factor else 1.0
        assert rel_err(o, (g.double() * scale).to(g.dtype)) <= TOLERANCES["loss"][g.dtype]


def test_cuda_kernels_emulated_scale_by_one_in_place_leaves_the_gradients(emu):
    """A scale of exactly 1 in place (the usual training step) skips the task; values unchanged."""

    grads = [torch.randn(3, 700), torch.randn(4000).bfloat16()]
    before = [g.clone() for g in grads]
    n = len(grads)
    ptrs = (ctypes.c_void_p * n)(*[g.data_ptr() for g in grads])
    numels = (ctypes.c_int64 * n)(*[g.numel() for g in grads])
    dtypes = (ctypes.c_int * n)(*[_EMU_DTYPE[g.dtype] for g in grads])
    no_tasks = (ctypes.c_void_p * n)(None, None)
    one = torch.ones(())
    assert emu.emu_scale_by(ptrs, ptrs, numels, dtypes, no_tasks, n, _ptr(one), _ptr(None), _ptr(None), 132,
                            2048) == 0  # fmt: skip
    for g, b in zip(grads, before):
        assert torch.equal(g, b)


_UNTOUCHABLE_SCALE = r"""
import ctypes, sys
lib, libc = ctypes.CDLL(sys.argv[1]), ctypes.CDLL(None)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
n = 5000
page = libc.mmap(None, n * 4, 0, 0x02 | 0x20, -1, 0)  # PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS: any access faults
assert page not in (None, ctypes.c_void_p(-1).value)
ptrs = (ctypes.c_void_p * 1)(page)
one = ctypes.c_float(float(sys.argv[2]))
print(lib.emu_scale_by(ptrs, ptrs, (ctypes.c_int64 * 1)(n), (ctypes.c_int * 1)(0), (ctypes.c_void_p * 1)(None), 1,
                       ctypes.byref(one), None, None, 132, 2048))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="maps a no-access page with Linux's mmap flags")
def test_cuda_kernels_emulated_scale_by_one_in_place_moves_no_memory(emu):
    """The in-place skip is real: a gradient on a page that faults on any access, scaled in place by exactly 1,
    comes through (in a subprocess); by 0.5 the same call dies of SIGSEGV, which shows the page does fault."""
    import signal
    import subprocess

    def run(scale):
        return subprocess.run([sys.executable, "-c", _UNTOUCHABLE_SCALE, emu._name, scale], capture_output=True,
                              text=True, timeout=120)  # fmt: skip

    skipped = run("1.0")
    assert skipped.returncode == 0 and skipped.stdout.strip() == "0", skipped.stderr[-2000:]
    assert run("0.5").returncode == -signal.SIGSEGV


@pytest.mark.parametrize("capacity", _CAPACITIES)
def test_cuda_kernels_emulated_scale_grads_in_place(emu, capacity):
    """masked_loss_scale_grads_ launches the same kernel with in == out: each element is read before it is written.
    Tasks scaled by exactly 1 are skipped between the others; those still get every chunk (small devices: the
    blocks' strides cross the skipped tasks), and nothing outside them is written."""

    values = [torch.randn(3, 700), torch.randn(9000), torch.randn(2, 5).half(), torch.randn(4000).bfloat16(),
              torch.randn(17000).bfloat16()]  # fmt: skip
    factors = (0.5, 1.0, -2.0, 3.0, 1.0)
    want = [(v.double() * s).to(v.dtype) for v, s in zip(values, factors)]
    guarded = [_guarded(v) for v in values]
    grads = [view for _, view in guarded]
    scales = torch.tensor(factors)
    n = len(grads)
    ptrs = (ctypes.c_void_p * n)(*[g.data_ptr() for g in grads])
    numels = (ctypes.c_int64 * n)(*[g.numel() for g in grads])
    dtypes = (ctypes.c_int * n)(*[_EMU_DTYPE[g.dtype] for g in grads])
    assert emu.emu_scale(ptrs, ptrs, numels, dtypes, n, _ptr(scales), *capacity) == 0
    for g, w, (buffer, view) in zip(grads, want, guarded):
        assert torch.equal(g, w)
        _assert_margins_untouched(buffer, view)


# ---- CUDA (native op and Triton on the GPU) ---------------------------------------------------------------------


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
        _assert_bitwise_equal(first, step())


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
