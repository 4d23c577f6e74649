"""The CUDA kernels of the masked loss (csrc/cuda/masked_loss*.cu) on the CPU: compiled by g++ against
tests/cuda_emulation.py and called through ctypes, so that they are run, not only compiled, on a machine without a
GPU. The oracle and inputs are in masked_loss_cases.py.
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

from fastmtl.testing import TOLERANCES, rel_err

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cuda_emulation  # noqa: E402  (beside this file: the CPU emulation of the CUDA kernels)
from masked_loss_cases import (  # noqa: E402  (beside this file)
    assert_bitwise_equal,
    large_mse_task,
    make_ce,
    make_dense,
    make_mask,
    reference,
)

pytest.importorskip("triton")  # the geometry helper comes from fastmtl.kernels.masked_loss

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
                          int group_blocks, int64_t group_tile_bytes, int64_t* trace, int64_t trace_len,
                          int group_prefetch, int group_small_tail) {
  MultitaskBuffers buf;
  buf.grouped = grouped != 0;
  buf.group_blocks = group_blocks;
  buf.group_tile_bytes = group_tile_bytes;
  buf.group_prefetch = group_prefetch != 0;
  buf.group_small_tail = group_small_tail != 0;
  buf.group_trace = trace;
  buf.group_trace_len = trace_len;
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
int emu_group_trace_fields() { return kGroupTraceFields; }
int emu_max_count_blocks() { return kMaxCountBlocks; }
}
"""


# The masked loss's .cu files (with the kernel launches each holds) and the headers they include.
_EMU_KERNELS = {"masked_loss.cu": 8, "masked_loss_grouped.cu": 1, "masked_loss_scale.cu": 1}
_EMU_HEADERS = ["masked_loss.h", "masked_loss_grouped.h", "masked_loss_reduce.cuh", "masked_loss_count.cuh",
                "masked_loss_ce.cuh", "masked_loss_elementwise.cuh", "masked_loss_plan.cuh", "masked_loss_prefetch.cuh",
                "numeric.cuh"]


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
                           group_tile_bytes=0, trace=None, group_prefetch=False, group_small_tail=False):
    """masked_loss_multitask_forward (what masked_multitask_loss_forward_cuda runs) on poisoned outputs and
    workspaces. tasks: (pred, target, mask, kind). Returns (total, losses, grad_scale, grads); grads[t] is None where
    compute_grad[t] is false. grouped=False: the chain even where the grouped launch applies; group_blocks: the
    grouped kernel's build (0: the default); expect: the launcher's return code; group_tile_bytes: the least a grouped
    loss tile moves (0: the default); trace: an int64 [rows, fields] tensor for the grouped forward's tile records;
    group_prefetch: the grouped build that prefetches its loss tiles' reads; group_small_tail: the schedule's last wave
    of loss work in one-block tiles."""
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
                                     group_blocks, ctypes.c_int64(group_tile_bytes), _ptr(trace),
                                     ctypes.c_int64(0 if trace is None else trace.shape[0]),
                                     int(group_prefetch), int(group_small_tail)) == expect  # fmt: skip
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
@pytest.mark.parametrize("shape", [(3, 1201), (5, 1200)])
def test_cuda_kernels_emulated_elementwise(emu, kind, dtype, target_dtype, misaligned, shape):
    """16-byte vectors where aligned (scalar path otherwise), mixed target dtype; a sample size that is not a multiple
    of the vector (a vector may span two samples, and the last is partial) and one that is (one mask read per vector;
    a thread's second vector past the end)."""
    pred, target = make_dense(kind, shape, "contiguous", dtype, device="cpu")
    target = target.to(target_dtype)
    if misaligned:
        pred = torch.cat([pred.new_zeros(1), pred.flatten()])[1:].view(shape)
    mask = torch.tensor([True, False, True, True, False][: shape[0]])
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
        large_mse_task(device="cpu"),  # float16, 2 (p - t) beyond its range
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
    assert_bitwise_equal(out, _in_block_order(emu, seed, run))


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
    """The grouped kernel's builds for 2 and 3 resident blocks per SM, each with and without the loss tiles' L2
    prefetch, run the same arithmetic: bitwise the same results as the default build; another block count is refused
    (cudaErrorInvalidValue) before any launch."""
    torch.manual_seed(6)
    seg, seg_t = make_ce((2, 7, 8, 8), "contiguous", torch.bfloat16, device="cpu")
    depth, depth_t = make_dense("l1", (2, 1, 8, 8), "contiguous", torch.bfloat16, device="cpu")
    tasks = [(seg, seg_t, make_mask(2, "random", device="cpu"), "ce"), (depth, depth_t.bfloat16(), None, "l1")]
    default = _emu_multitask_forward(emu, tasks, None)
    for blocks in (2, 3):
        for prefetch in (False, True):
            out = _emu_multitask_forward(emu, tasks, None, group_blocks=blocks, group_prefetch=prefetch)
            assert_bitwise_equal(default, out)
    emu.emu_take_launches()
    for blocks in (4, 5):
        _emu_multitask_forward(emu, tasks, None, group_blocks=blocks, expect=1)
    assert emu.emu_take_launches() == 0


def _labelled_ranges(t, mask):
    """The byte ranges [begin, end) of a contiguous [N, ...] tensor's labelled samples."""
    per = t[0].numel() * t.element_size()
    return [(t.data_ptr() + n * per, t.data_ptr() + (n + 1) * per) for n in range(t.shape[0]) if mask[n]]


@pytest.mark.parametrize("tile_bytes", [1, 0])  # one block per loss tile; the default (several)
def test_cuda_kernels_emulated_grouped_prefetch(emu, tile_bytes):
    """The prefetching build of the grouped forward asks the L2 for exactly the labelled samples' reads of its pixel
    and elementwise loss tiles: every 128-byte line of a labelled sample's logits, class targets, predictions and float
    targets, none inside an unlabelled sample's (nor anywhere else), nothing for a task whose tiles span more than
    kPrefetchMaxSamples samples; the results bitwise those of the build without prefetch, which prefetches nothing."""
    torch.manual_seed(12)
    seg, seg_t = make_ce((4, 13, 24, 40), "contiguous", torch.bfloat16, device="cpu")  # 2 blocks per sample
    depth, depth_t = make_dense("l1", (4, 1, 40, 48), "contiguous", torch.bfloat16, device="cpu")
    normals, normals_t = make_dense("l1", (4, 3, 40, 48), "contiguous", torch.bfloat16, device="cpu")  # f32 targets
    attr, attr_t = make_dense("mse", (40, 7), "contiguous", torch.bfloat16, device="cpu")
    masks = [torch.tensor(m) for m in ([True, False, True, True], [False, True, True, False], [True, True, False, True])]
    attr_mask = make_mask(40, "random", device="cpu")
    tasks = [(seg, seg_t, masks[0], "ce"), (depth, depth_t.bfloat16(), masks[1], "l1"),
             (normals, normals_t, masks[2], "l1"), (attr, attr_t.bfloat16(), attr_mask, "mse")]  # fmt: skip
    cuda_emulation.take_prefetches(emu)
    plain = _emu_multitask_forward(emu, tasks, None, group_tile_bytes=tile_bytes)
    assert cuda_emulation.take_prefetches(emu) == []
    out = _emu_multitask_forward(emu, tasks, None, group_tile_bytes=tile_bytes, group_prefetch=True)
    assert_bitwise_equal(plain, out)
    addresses = cuda_emulation.take_prefetches(emu)
    lines = {a // 128 for a in addresses}
    labelled = [r for pred, target, mask, _ in tasks[:3] for t in (pred, target) for r in _labelled_ranges(t, mask)]
    assert all(any(begin <= a < end for begin, end in labelled) for a in addresses), "an address outside the reads"
    for begin, end in labelled:
        missing = set(range(begin // 128, (end - 1) // 128 + 1)) - lines
        assert not missing, f"{len(missing)} lines of a labelled sample not prefetched"
    inside = {line for begin, end in labelled for line in range(begin // 128, (end - 1) // 128 + 1)}
    assert lines <= inside, "a line prefetched outside every labelled sample's reads (an unlabelled sample's?)"


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


def test_cuda_kernels_emulated_grouped_trace(emu):
    """The grouped forward's trace (FASTMTL_CUDA_GROUP_TRACE): one record per tile, in tile-id rows, count tiles
    before loss tiles, each tile of its task's kind and task, start <= counted <= end (a loss tile's count wait ends
    after its task's last count tile), then the finalize's row; rows past it untouched, results the same as without
    a trace."""
    torch.manual_seed(11)
    tasks = [(*make_ce((4, 5, 40, 30), "contiguous", device="cpu"), make_mask(4, "random", device="cpu"), "ce"),
             (*make_dense("l1", (4, 3, 40, 30), "contiguous", device="cpu"), None, "l1"),
             (*make_dense("mse", (4, 7), "contiguous", device="cpu"), make_mask(4, "random", device="cpu"), "mse")]
    fields = emu.emu_group_trace_fields()
    trace = torch.full((4096, fields), -1, dtype=torch.int64)
    plain = _emu_multitask_forward(emu, tasks, None, group_tile_bytes=4096)
    traced = _emu_multitask_forward(emu, tasks, None, group_tile_bytes=4096, trace=trace)
    assert_bitwise_equal(plain, traced)
    rows = trace[trace[:, 0] >= 0]
    finalize, rows = rows[-1], rows[:-1]
    assert finalize[6] == -1 and finalize[7] == 2, "the row after the last tile's: the finalize"
    assert finalize[1] >= rows[:, 3].max() and finalize[3] >= finalize[1]
    tile, start, counted, end = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
    task, is_loss = rows[:, 6], rows[:, 7]
    assert torch.equal(tile, torch.arange(len(rows))), "one record per tile, in tile-id rows"
    assert len(rows) > 10 and (trace[len(rows) + 1 :] == -1).all()
    assert is_loss.min() == 0 and is_loss.max() == 1
    assert torch.equal(is_loss, torch.sort(is_loss).values), "count tiles first"
    assert set(task.tolist()) == {0, 1, 2} and (start <= counted).all() and (counted <= end).all()
    for t in range(3):  # a task's loss tiles start only once its count tiles are done
        last_count_end = end[(task == t) & (is_loss == 0)].max()
        assert (counted[(task == t) & (is_loss == 1)] >= last_count_end).all()
    assert (counted[is_loss == 0] == start[is_loss == 0]).all()


@pytest.mark.parametrize("prefetch", [False, True])
def test_cuda_kernels_emulated_grouped_small_tail(emu, prefetch):
    """FASTMTL_CUDA_GROUP_SMALL_TAIL: the schedule's last wave of loss work (8 blocks here: 4 emulated SMs x 2) runs as
    one-block tiles, taken from the last task back (tiles of up to 8 blocks: the tile-size knob at 1 MiB): the last
    task's 2 blocks become 2 tiles, the last 6 of the 12 blocks before them 6 tiles beside a tile of the first 6, the
    largest task keeps its 1 tile of 8. Gradients bitwise the same, losses within float32 rounding (other slot
    groupings); with the prefetch too."""
    torch.manual_seed(13)
    seg, seg_t = make_ce((4, 13, 24, 40), "contiguous", torch.bfloat16, device="cpu")  # 8 blocks of 512 pixels
    normals, normals_t = make_dense("l1", (4, 3, 80, 48), "contiguous", torch.bfloat16, device="cpu")  # 12 of 4096
    depth, depth_t = make_dense("l1", (4, 1, 40, 48), "contiguous", torch.bfloat16, device="cpu")  # 2 of 4096
    tasks = [(seg, seg_t, make_mask(4, "random", device="cpu"), "ce"), (depth, depth_t.bfloat16(), None, "l1"),
             (normals, normals_t, make_mask(4, "random", device="cpu"), "l1")]  # fmt: skip
    fields = emu.emu_group_trace_fields()
    runs = {}
    for small_tail in (False, True):
        trace = torch.full((256, fields), -1, dtype=torch.int64)
        out = _emu_multitask_forward(emu, tasks, None, group_tile_bytes=1 << 20, trace=trace,
                                     group_prefetch=prefetch, group_small_tail=small_tail)  # fmt: skip
        _check_multitask(tasks, None, *out, lead=-1)
        rows = trace[(trace[:, 0] >= 0) & (trace[:, 7] == 1)]
        runs[small_tail] = out, {t: int((rows[:, 6] == t).sum()) for t in range(3)}
    (plain, plain_tiles), (split, split_tiles) = runs[False], runs[True]
    assert plain_tiles == {0: 1, 1: 1, 2: 2}
    assert split_tiles == {0: 1, 1: 2, 2: 7}
    for a, b in zip(plain[3], split[3], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(plain[1], split[1], strict=True):
        assert abs(a.item() - b.item()) <= 1e-6 * abs(a.item())


@pytest.mark.parametrize("C", [40, 100, 200, 300])
def test_cuda_kernels_emulated_grouped_rows(emu, C):
    """The grouped launch's rows tile functions for wide rows (16 and 32 threads per row, 4 or 8 logits cached per
    lane, or none), beside a float16 mse task stored undivided (its factor in grad_scale)."""
    torch.manual_seed(C)
    pred, target = make_ce((9, C), "contiguous", torch.float16, device="cpu")
    tasks = [(pred, target, make_mask(9, "random", device="cpu"), "ce"), large_mse_task(device="cpu")]
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


@pytest.mark.parametrize("last_valid", [True, False])
def test_cuda_kernels_emulated_grouped_count_tail(emu, last_valid):
    """A task whose last count tile is a single partial 16-byte vector of targets (one element past a whole number of
    tiles: 2048 int64, 8192 bfloat16 or 4096 float32 targets per count tile), in the grouped launch. Every target but
    the last (last_valid) or but one inside the first tile has no label, so a tail counted twice or not at all shows in
    the loss: it is the one valid element's own."""
    torch.manual_seed(17)
    tasks = []
    for kind, n_elems, target_dtype in [("ce", 2049, torch.int64), ("l1", 8193, torch.bfloat16),
                                        ("mse", 4097, torch.float32)]:  # fmt: skip
        if kind == "ce":
            pred = torch.randn(1, 3, n_elems).to(torch.bfloat16)
            target = torch.full((1, n_elems), -100, dtype=torch.int64)
            target[0, -1] = 2 if last_valid else -100
            target[0, 7] = 1 if not last_valid else -100  # a task with one other valid target
        else:
            pred = torch.randn(1, n_elems).to(torch.bfloat16)
            target = torch.full((1, n_elems), float("nan"), dtype=target_dtype)
            target[0, -1] = 0.5 if last_valid else float("nan")
            if not last_valid:
                target[0, 7] = 0.25
        tasks.append((pred, target, None, kind))
    emu.emu_take_launches()
    out = _emu_multitask_forward(emu, tasks, None)
    assert emu.emu_take_launches() == 1, "the grouped launch"
    _check_multitask(tasks, None, *out, lead=-1)
    for (pred, target, _, kind), loss in zip(tasks, out[1]):
        assert loss.item() == pytest.approx(reference(pred, target, None, kind)[0].item(), rel=1e-2)
        assert loss.item() > 0.0


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
        assert_bitwise_equal(by_index, _in_block_order(emu, seed, run))


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


# (SMs, threads per SM): one small SM (2 blocks: the grid strides across tasks), sm_86-like, an H100
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
    """Whole 16-byte-aligned chunks in vectors (float32, bfloat16, float16), the tails and a misaligned tensor one
    element at a time; on the smallest device the grid (2 blocks) is smaller than the 14 chunks, so each block strides
    across tasks. A scale of exactly 1 out of place still copies. Nothing outside the outputs is written."""

    grads = [torch.randn(3, 700), torch.randn(2, 5).half(), torch.randn(0, 3), torch.randn(20000).bfloat16(),
             torch.randn(4097)[1:], torch.randn(36000).half(), torch.randn(17000)]  # fmt: skip
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
    """masked_loss_scale_grads_ launches the same kernel with in == out: each element is read before it is written
    (whole chunks in vectors and tails alike). Tasks scaled by exactly 1 are skipped between the others; those still
    get every chunk (smallest device: the blocks' strides cross the skipped tasks), and nothing outside them is
    written."""

    values = [torch.randn(3, 700), torch.randn(9000), torch.randn(2, 5).half(), torch.randn(4000).bfloat16(),
              torch.randn(17000).bfloat16(), torch.randn(20000)]  # fmt: skip
    factors = (0.5, 1.0, -2.0, 1.0, 3.0, -0.25)
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
