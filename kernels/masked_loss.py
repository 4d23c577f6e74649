"""Triton kernels of the masked loss of one task, and the grouped gradient scaling of all tasks.

Installed as ``fastmtl.kernels.masked_loss``. The host launchers below take already validated arguments (the op layer,
``fastmtl.ops.masked_loss``, checks them) and never synchronise with the host, so they can be captured in a CUDA
graph.

One task, two launches:

1. ``_count_kernel``: a capped grid (at most ``COUNT_PROGRAMS`` programs) counts the valid elements (sample mask AND
   element valid); each program writes its partial count, so no buffer needs zeroing. Program 0 also zeroes the
   float32 loss accumulator.
2. ``_ce_kernel`` / ``_elementwise_kernel``: every program sums the partial counts (one small vector load), then
   computes the element losses and the gradient, already scaled by ``1 / count``, in one sweep over the data, and adds
   its partial loss times ``1 / count`` to the accumulator with one atomic add. With no valid element the count is 0,
   every element loss and gradient is masked to 0 and the loss stays exactly 0.0.

Cross entropy views the logits as ``[N, C, S]`` with three strides (``S`` = product of the spatial dims; an
``[N, C]`` input is viewed as ``[1, C, N]``), so NCHW (pixels contiguous) and channels_last / ``[N, C]`` (classes
contiguous) run through the same kernel: a program owns a tile of ``BLOCK_S`` pixels of one sample and loops over the
classes in blocks of ``BLOCK_C`` with an online softmax (one block when ``C`` fits: the logits then stay in
registers and are read once). The elementwise kinds run over the storage order of ``pred`` (``target`` in the same
layout), where sample ``n`` owns the contiguous range ``[n * M, (n + 1) * M)``.

All math is float32; bf16/fp16 values are converted right after loading (bf16 arithmetic is wrong in the
interpreter).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

KINDS = ("ce", "bce", "l1", "mse")
_ELEMENTWISE_CODE = {"bce": 0, "l1": 1, "mse": 2}

COUNT_PROGRAMS = 256  # upper bound on the count grid = length of the partial-count vector every program reads
COUNT_BLOCK = 2048
ELEMENTWISE_BLOCK = 4096
SCALE_BLOCK = 4096
SCALE_SLOTS = 8  # tasks per scale_grads launch (pointers are kernel arguments, so the launch is graph-capturable)


# ---- device helpers ---------------------------------------------------------------------------------------------


@triton.jit
def _sample_of(offs, start, S, BIG_S: tl.constexpr):
    """Sample index of each flat offset of a block starting at ``start``, for data laid out as ``[N, S]``."""
    if BIG_S:  # S >= block size: the block spans at most two samples, so one scalar division suffices
        n0 = start // S
        n = n0 + (offs >= (n0 + 1) * S).to(tl.int64)
    else:
        n = offs // S
    return n


@triton.jit
def _total_count(counts_ptr, num_counts, COUNTS_P2: tl.constexpr):
    """Sum of the partial counts written by ``_count_kernel`` (int64, exact)."""
    idx = tl.arange(0, COUNTS_P2)
    parts = tl.load(counts_ptr + idx, mask=idx < num_counts, other=0)
    return tl.sum(parts.to(tl.int64), axis=0)


@triton.jit
def _log1p(z):
    """log(1 + z) accurate for small z (the libdevice log1p is not available in the interpreter)."""
    u = 1.0 + z
    return tl.where(u == 1.0, z, tl.log(u) * (z / (u - 1.0)))


# ---- kernels ----------------------------------------------------------------------------------------------------


@triton.jit
def _count_kernel(
    target_ptr, mask_ptr, counts_ptr, loss_ptr,
    total, iters, S, t_sn, t_ss, m_sn, m_ss, C, ignore_index,
    IS_CE: tl.constexpr, HAS_MASK: tl.constexpr, BIG_S: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Partial valid counts over the ``[N, S]`` index space of the targets; program 0 zeroes the loss."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(0, iters):  # grid-stride over blocks (a runtime trip count also runs in the interpreter)
        start = (pid + i * nprog).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        inb = offs < total
        n = _sample_of(offs, start, S, BIG_S)
        s = offs - n * S
        t = tl.load(target_ptr + n * t_sn + s * t_ss, mask=inb, other=0)
        if IS_CE:
            ok = inb & (t != ignore_index) & (t >= 0) & (t < C)
        else:
            ok = inb & (t == t)  # NaN marks an element without a label
        if HAS_MASK:
            ok = ok & (tl.load(mask_ptr + n * m_sn + s * m_ss, mask=inb, other=0) != 0)
        acc += ok.to(tl.int32)
    tl.store(counts_ptr + pid, tl.sum(acc, axis=0))
    if pid == 0:
        tl.store(loss_ptr, 0.0)


@triton.jit
def _ce_kernel(
    pred_ptr, target_ptr, mask_ptr, grad_ptr, counts_ptr, loss_ptr,
    S, C, num_s_blocks, num_counts, ignore_index,
    p_sn, p_sc, p_ss, g_sn, g_sc, g_ss, t_sn, t_ss, m_sn, m_ss,
    HAS_MASK: tl.constexpr, COMPUTE_GRAD: tl.constexpr, SINGLE_C: tl.constexpr,
    COUNTS_P2: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Cross entropy of a tile of BLOCK_S pixels of one sample: online softmax over C, loss and scaled gradient."""
    pid = tl.program_id(0)
    n = (pid // num_s_blocks).to(tl.int64)
    s = (pid % num_s_blocks).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = s < S
    t = tl.load(target_ptr + n * t_sn + s * t_ss, mask=s_ok, other=0)
    ok = s_ok & (t != ignore_index) & (t >= 0) & (t < C)  # out-of-range classes are skipped, never read
    if HAS_MASK:
        ok = ok & (tl.load(mask_ptr + n * m_sn + s * m_ss, mask=s_ok, other=0) != 0)
    inv_count = 1.0 / tl.maximum(_total_count(counts_ptr, num_counts, COUNTS_P2), 1).to(tl.float32)

    row_p = pred_ptr + n * p_sn + s * p_ss
    row_g = grad_ptr + n * g_sn + s * g_ss
    cols = tl.arange(0, BLOCK_C).to(tl.int64)
    if SINGLE_C:
        c_ok = cols < C
        x = tl.load(row_p[:, None] + cols[None, :] * p_sc, mask=ok[:, None] & c_ok[None, :], other=float("-inf"))
        x = x.to(tl.float32)
        m = tl.max(x, axis=1)
        e = tl.exp(x - m[:, None])
        lsum = tl.sum(e, axis=1)
        hit = cols[None, :] == t[:, None]
        x_t = tl.sum(tl.where(hit, x, 0.0), axis=1)
        if COMPUTE_GRAD:
            g = (e / lsum[:, None] - hit.to(tl.float32)) * inv_count
            g = tl.where(ok[:, None], g, 0.0)
            tl.store(row_g[:, None] + cols[None, :] * g_sc, g.to(grad_ptr.dtype.element_ty),
                     mask=s_ok[:, None] & c_ok[None, :])  # fmt: skip
    else:
        m = tl.full([BLOCK_S], -1.0e30, tl.float32)  # finite start: invalid rows stay NaN-free in the loop
        lsum = tl.zeros([BLOCK_S], tl.float32)
        x_t = tl.zeros([BLOCK_S], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cols
            x = tl.load(row_p[:, None] + cc[None, :] * p_sc, mask=ok[:, None] & (cc < C)[None, :],
                        other=float("-inf")).to(tl.float32)  # fmt: skip
            m_new = tl.maximum(m, tl.max(x, axis=1))
            lsum = lsum * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
            x_t += tl.sum(tl.where(cc[None, :] == t[:, None], x, 0.0), axis=1)
            m = m_new
        if COMPUTE_GRAD:
            scale = inv_count / lsum
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + cols
                c_ok = cc < C
                x = tl.load(row_p[:, None] + cc[None, :] * p_sc, mask=ok[:, None] & c_ok[None, :],
                            other=float("-inf")).to(tl.float32)  # fmt: skip
                hit = cc[None, :] == t[:, None]
                g = tl.exp(x - m[:, None]) * scale[:, None] - tl.where(hit, inv_count, 0.0)
                g = tl.where(ok[:, None], g, 0.0)
                tl.store(row_g[:, None] + cc[None, :] * g_sc, g.to(grad_ptr.dtype.element_ty),
                         mask=s_ok[:, None] & c_ok[None, :])  # fmt: skip
    row_loss = tl.where(ok, m + tl.log(lsum) - x_t, 0.0)
    tl.atomic_add(loss_ptr, tl.sum(row_loss, axis=0) * inv_count)


@triton.jit
def _elementwise_kernel(
    pred_ptr, target_ptr, mask_ptr, grad_ptr, counts_ptr, loss_ptr,
    total, M, num_counts,
    KIND: tl.constexpr, HAS_MASK: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BIG_S: tl.constexpr,
    COUNTS_P2: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """bce / l1 / mse over flat storage (sample n owns [n*M, (n+1)*M)): loss and scaled gradient in one sweep."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    inb = offs < total
    ok = inb
    if HAS_MASK:
        n = _sample_of(offs, start, M, BIG_S)
        ok = ok & (tl.load(mask_ptr + n, mask=inb, other=0) != 0)
    # unlabelled samples are not read at all
    t = tl.load(target_ptr + offs, mask=ok, other=0).to(tl.float32)
    p = tl.load(pred_ptr + offs, mask=ok, other=0).to(tl.float32)
    ok = ok & (t == t)
    inv_count = 1.0 / tl.maximum(_total_count(counts_ptr, num_counts, COUNTS_P2), 1).to(tl.float32)
    if KIND == 0:  # bce with logits, stable form
        e = tl.exp(-tl.abs(p))
        loss = tl.maximum(p, 0.0) - p * t + _log1p(e)
        g = tl.where(p >= 0, 1.0 / (1.0 + e), e / (1.0 + e)) - t
    elif KIND == 1:  # l1
        d = p - t
        loss = tl.abs(d)
        g = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    else:  # mse
        d = p - t
        loss = d * d
        g = 2.0 * d
    tl.atomic_add(loss_ptr, tl.sum(tl.where(ok, loss, 0.0), axis=0) * inv_count)
    if COMPUTE_GRAD:
        tl.store(grad_ptr + offs, tl.where(ok, g * inv_count, 0.0).to(grad_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _scale_slot(pid, first_block, g_ptr, o_ptr, numel, scales_ptr, index, BLOCK: tl.constexpr):
    """out = grad * scales[index] for the programs [first_block, first_block + cdiv(numel, BLOCK))."""
    local = pid - first_block
    if (local >= 0) & (local < tl.cdiv(numel, BLOCK)):
        offs = local.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < numel
        scale = tl.load(scales_ptr + index)
        g = tl.load(g_ptr + offs, mask=inb, other=0).to(tl.float32)
        tl.store(o_ptr + offs, (g * scale).to(o_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _scale_grads_kernel(
    scales_ptr,
    g0, o0, n0, f0, g1, o1, n1, f1, g2, o2, n2, f2, g3, o3, n3, f3,
    g4, o4, n4, f4, g5, o5, n5, f5, g6, o6, n6, f6, g7, o7, n7, f7,
    NUM: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Grouped ``out[t] = grads[t] * scales[t]``: each program finds its task slot by its block range."""
    pid = tl.program_id(0)
    _scale_slot(pid, f0, g0, o0, n0, scales_ptr, 0, BLOCK)
    if NUM > 1:
        _scale_slot(pid, f1, g1, o1, n1, scales_ptr, 1, BLOCK)
    if NUM > 2:
        _scale_slot(pid, f2, g2, o2, n2, scales_ptr, 2, BLOCK)
    if NUM > 3:
        _scale_slot(pid, f3, g3, o3, n3, scales_ptr, 3, BLOCK)
    if NUM > 4:
        _scale_slot(pid, f4, g4, o4, n4, scales_ptr, 4, BLOCK)
    if NUM > 5:
        _scale_slot(pid, f5, g5, o5, n5, scales_ptr, 5, BLOCK)
    if NUM > 6:
        _scale_slot(pid, f6, g6, o6, n6, scales_ptr, 6, BLOCK)
    if NUM > 7:
        _scale_slot(pid, f7, g7, o7, n7, scales_ptr, 7, BLOCK)


# ---- host side --------------------------------------------------------------------------------------------------


def _direct(kernel):
    return kernel


def _collapsed_stride(sizes, strides):
    """The single stride of a run of dims that is one arithmetic progression in memory, else None."""
    dims = [(n, st) for n, st in zip(sizes, strides) if n != 1]
    if not dims:
        return 1
    for (_, outer), (inner_n, inner) in zip(dims[:-1], dims[1:]):
        if outer != inner * inner_n:
            return None
    return dims[-1][1]


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(st_a == st_b for n, st_a, st_b in zip(a.shape, a.stride(), b.stride()) if n != 1)


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers exactly ``numel`` consecutive elements of its storage (any order of dims)."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _flat_by_sample(t: torch.Tensor) -> bool:
    """Whether ``t`` is dense with dim 0 outermost, so sample n owns storage range [n*M, (n+1)*M)."""
    if not _dense(t):
        return False
    n = t.shape[0]
    return n <= 1 or t.stride(0) == t.numel() // n


def _mask_u8(mask, fallback):
    return (mask.view(torch.uint8), True) if mask is not None else (fallback, False)


def _alloc_outputs(pred, compute_grad):
    loss = torch.empty((), dtype=torch.float32, device=pred.device)
    grad = torch.empty_like(pred) if compute_grad else pred.new_empty(0)
    return loss, grad


def _launch_count(launch, target, mask_u8, has_mask, counts_total, counts, loss, S, t_sn, t_ss, m_sn, m_ss, C,
                  ignore_index, is_ce):  # fmt: skip
    blocks = triton.cdiv(counts_total, COUNT_BLOCK)
    programs = max(1, min(COUNT_PROGRAMS, blocks))
    if launch is not None:
        launch(_count_kernel)[(programs,)](
            target, mask_u8, counts, loss, counts_total, triton.cdiv(blocks, programs),
            S, t_sn, t_ss, m_sn, m_ss, C, ignore_index,
            IS_CE=is_ce, HAS_MASK=has_mask, BIG_S=bool(S >= COUNT_BLOCK), BLOCK=COUNT_BLOCK, num_warps=8,
        )  # fmt: skip
    return programs


def masked_loss(pred, target, mask, kind, ignore_index=-100, compute_grad=True, launch=_direct):
    """Masked mean loss of one task and its gradient (see ``fastmtl::masked_loss`` in csrc/ops.cpp).

    Args:
        pred, target, mask, kind, ignore_index, compute_grad: as the native op; arguments are assumed valid.
        launch: wraps each kernel before launching (``torch.library.wrap_triton`` inside a ``triton_op``); ``None``
            allocates the outputs without launching anything (fake/meta implementations).

    Returns:
        ``(loss, grad)``: float32 0-dim loss, gradient with pred's shape, dtype and (dense) strides, or an empty
        tensor when ``compute_grad`` is false.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    loss, grad = _alloc_outputs(pred, compute_grad)  # grad is empty_like(pred): pred's layout, as the fakes say
    if kind == "ce":
        work_grad = _cross_entropy(pred, target, mask, ignore_index, compute_grad, grad, loss, launch)
    else:
        work_grad = _elementwise(pred, target, mask, kind, compute_grad, grad, loss, launch)
    if compute_grad and launch is not None and work_grad is not grad:
        grad.copy_(work_grad)  # rare: the kernel could not write pred's own layout
    return loss, grad


def _cross_entropy(pred, target, mask, ignore_index, compute_grad, grad, loss, launch):
    """Launch the ce kernels; returns the tensor the gradient was written to (``grad`` unless a copy is needed)."""
    if _collapsed_stride(pred.shape[2:], pred.stride()[2:]) is None:
        pred = pred.contiguous()
    if _collapsed_stride(target.shape[1:], target.stride()[1:]) is None:
        target = target.contiguous()
    if compute_grad and _collapsed_stride(grad.shape[2:], grad.stride()[2:]) is None:
        grad = torch.empty_like(pred)
    N, C = pred.shape[0], pred.shape[1]
    S = math.prod(pred.shape[2:])
    p_sn, p_sc = pred.stride(0), pred.stride(1)
    p_ss = _collapsed_stride(pred.shape[2:], pred.stride()[2:])
    g_src = grad if compute_grad else pred
    g_sn, g_sc, g_ss = g_src.stride(0), g_src.stride(1), _collapsed_stride(g_src.shape[2:], g_src.stride()[2:])
    t_sn, t_ss = target.stride(0), _collapsed_stride(target.shape[1:], target.stride()[1:])
    m_sn, m_ss = (mask.stride(0) if mask is not None else 0), 0
    if pred.dim() == 2:  # [N, C] as [1, C, N]: rows become pixels of a single sample
        N, S = 1, N
        p_ss, g_ss, t_ss, m_ss = p_sn, g_sn, t_sn, m_sn
        p_sn = g_sn = t_sn = m_sn = 0
    mask_u8, has_mask = _mask_u8(mask, target)
    counts = torch.empty(COUNT_PROGRAMS, dtype=torch.int32, device=pred.device)
    num_counts = _launch_count(launch, target, mask_u8, has_mask, N * S, counts, loss, S, t_sn, t_ss, m_sn, m_ss,
                               C, ignore_index, True)  # fmt: skip
    if launch is None or N * S == 0:
        return grad

    # constexpr block sizes are made concrete below (under dynamic-shape tracing this specialises on C and S)
    if p_sc == 1 and C > 1:  # classes contiguous ([N, C], channels_last): rows of BLOCK_C lanes
        block_c = min(triton.next_power_of_2(C), 1024)
        block_s = max(1, min(128, 4096 // block_c))
    else:  # pixels contiguous (NCHW): BLOCK_S pixels along the fast axis, loop over classes
        block_c = min(triton.next_power_of_2(max(C, 1)), 16)
        block_s = max(32, 4096 // block_c)
    block_s = min(block_s, triton.next_power_of_2(S))
    num_s_blocks = triton.cdiv(S, block_s)
    launch(_ce_kernel)[(N * num_s_blocks,)](
        pred, target, mask_u8, grad if compute_grad else pred, counts, loss,
        S, C, num_s_blocks, num_counts, ignore_index,
        p_sn, p_sc, p_ss, g_sn, g_sc, g_ss, t_sn, t_ss, m_sn, m_ss,
        HAS_MASK=has_mask, COMPUTE_GRAD=compute_grad, SINGLE_C=bool(C <= block_c),
        COUNTS_P2=COUNT_PROGRAMS, BLOCK_S=int(block_s), BLOCK_C=int(block_c),
        num_warps=8 if block_s * block_c >= 4096 else 4,
    )  # fmt: skip
    return grad


def _elementwise(pred, target, mask, kind, compute_grad, grad, loss, launch):
    """Launch the bce/l1/mse kernels; returns the tensor the gradient was written to."""
    if not _flat_by_sample(pred):
        pred = pred.contiguous()
    if not (_dense(target) and _same_layout(pred, target)):
        target = torch.empty_like(pred, dtype=target.dtype).copy_(target)  # rare: bring target to pred's layout
    if compute_grad and not (_dense(grad) and _same_layout(grad, pred)):
        grad = torch.empty_like(pred)
    N = pred.shape[0]
    total = pred.numel()
    M = total // N if N else 0
    mask_u8, has_mask = _mask_u8(mask, target)
    m_sn = mask.stride(0) if mask is not None else 0
    if has_mask and m_sn != 1:
        mask_u8 = mask_u8.contiguous()
    counts = torch.empty(COUNT_PROGRAMS, dtype=torch.int32, device=pred.device)
    # the targets in storage order: [N, M] with strides (M, 1)
    num_counts = _launch_count(launch, target, mask_u8, has_mask, total, counts, loss, max(M, 1), max(M, 1), 1, 1,
                               0, 0, 0, False)  # fmt: skip
    if launch is None or total == 0:
        return grad
    launch(_elementwise_kernel)[(triton.cdiv(total, ELEMENTWISE_BLOCK),)](
        pred, target, mask_u8, grad if compute_grad else pred, counts, loss, total, M, num_counts,
        KIND=_ELEMENTWISE_CODE[kind], HAS_MASK=has_mask, COMPUTE_GRAD=compute_grad, BIG_S=bool(M >= ELEMENTWISE_BLOCK),
        COUNTS_P2=COUNT_PROGRAMS, BLOCK=ELEMENTWISE_BLOCK, num_warps=8,
    )  # fmt: skip
    return grad


def scale_grads(grads, scales, launch=_direct, inplace=False):
    """``out[t] = grads[t] * scales[t]`` for every task, in ``ceil(T / 8)`` launches (one for up to 8 tasks).

    Args:
        grads: list of gradient tensors (any float dtype, any dense layout; others are made contiguous, or with
            ``inplace`` scaled by ATen in place).
        scales: float32 tensor ``[T]`` on the grads' device.
        launch: as in :func:`masked_loss`; ``None`` only allocates.
        inplace: write the result into ``grads`` (each element is read and written by the same program).

    Returns:
        New tensors like ``grads`` (with ``inplace``: the dense inputs, now scaled; use ``grads`` instead).
    """
    if inplace:
        # Dense gradients are both input and output of the kernel; strided ones are scaled by ATen here and left
        # to the kernel as empty slots.
        for t, g in enumerate(grads):
            if not _dense(g):  # in float32: a half tensor multiplied in place would round the scale to half
                g.copy_(g.float() * scales[t])
        grads = [g if _dense(g) else g.new_empty(0) for g in grads]
        outs = grads
    else:
        grads = [g if _dense(g) else g.contiguous() for g in grads]
        outs = [torch.empty_like(g) for g in grads]
    if launch is None:
        return outs
    for first in range(0, len(grads), SCALE_SLOTS):
        group = list(range(first, min(first + SCALE_SLOTS, len(grads))))
        args, block = [], 0
        for i in range(SCALE_SLOTS):
            t = group[i] if i < len(group) else group[0]
            numel = grads[t].numel() if i < len(group) else 0
            args += [grads[t], outs[t], numel, block]
            block += triton.cdiv(numel, SCALE_BLOCK)
        if block == 0:
            continue
        launch(_scale_grads_kernel)[(block,)](
            scales[first:], *args, NUM=len(group), BLOCK=SCALE_BLOCK, num_warps=8
        )
    return outs
