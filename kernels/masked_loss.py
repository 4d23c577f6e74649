"""Triton kernels of the masked loss: one task, all tasks of a batch, and the grouped gradient scaling.

Installed as ``fastmtl.kernels.masked_loss``. The host launchers below take already validated arguments (the op layer,
``fastmtl.ops.masked_loss``, checks them) and never synchronise with the host, so they can be captured in a CUDA
graph.

All tasks (``multitask_forward`` / ``multitask_backward``, what ``masked_multitask_loss`` runs): for 2 to 8 tasks,
``T`` launches forward and one backward, ``T + 1`` in all.

1. Per task, ``_ce_kernel`` / ``_elementwise_kernel`` in partials mode: the element gradient (not yet divided by the
   valid count) and, per program, its loss sum and valid count in its own slot (no buffer needs zeroing, each target
   is read once).
2. The finalize (``_finalize_tasks``): each task's loss (sum / count, 0 without a valid element), its gradient
   factor ``1 / count`` and the weighted total. The last loss launch runs it in the program that finishes last
   (``_ticket``: a counter that the first launch zeroed, so a single task, or more than 8, get ``_finalize_kernel``
   as a launch of its own).
3. Backward, ``_scale_grads_kernel``: ``grad_t * (g_total * w_t + g_task) * factor_t``, the scale computed in the
   kernel from the upstream gradients.

One task (``masked_loss``, the op ``fastmtl::masked_loss_triton``), two launches:

1. ``_count_kernel``: a capped grid (at most ``COUNT_PROGRAMS`` programs) counts the valid elements (sample mask AND
   element valid); each program writes its partial count, so no buffer needs zeroing. Program 0 also zeroes the
   ticket counter of the next launch.
2. ``_ce_kernel_chained`` / ``_elementwise_kernel_chained``: every program sums the partial counts (one small vector
   load), then computes the element losses and the gradient, already scaled by ``1 / count``, in one sweep over the
   data, and writes its (loss sum, valid count) partial; the program that takes the last ticket sums the partials
   into the loss (``_ticket``). With no valid element the count is 0, every element loss and gradient is masked to 0
   and the loss is exactly 0.0.

No floating-point atomics anywhere: every sum over programs is taken by one program in a fixed order, so the results
do not depend on the order programs run in (run-to-run deterministic).

Cross entropy views the logits as ``[N, C, S]`` with three strides (``S`` = product of the spatial dims; an
``[N, C]`` input is viewed as ``[1, C, N]``), so NCHW (pixels contiguous) and channels_last / ``[N, C]`` (classes
contiguous) run through the same kernel: a program owns a tile of ``BLOCK_S`` pixels of one sample and loops over the
classes in blocks of ``BLOCK_C`` with an online softmax (one block when ``C`` fits: the logits then stay in
registers and are read once). In the NCHW form every pixel of a labelled sample is read, ignored ones included, so
that each thread's neighbouring pixels load as one 16-byte vector (see ``_ce_body``). The elementwise kinds run over
the storage order of ``pred`` (``target`` in the same layout), where sample ``n`` owns the contiguous range
``[n * M, (n + 1) * M)``.

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
FINALIZE_BLOCK = 1024  # partials summed per step of the finalize loop (8 tasks per launch, like SCALE_SLOTS)
# Integer arguments that change with the batch's sizes (partial counts per task, a task's first partial slot): not
# specialised (== 1, % 16), so they do not recompile the kernels.
_SLOT_COUNTS = [f"n{i}" for i in range(SCALE_SLOTS)]
_VARYING = ["first_slot", *_SLOT_COUNTS]


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
def _labelled(mask_ptr, offs, inb, start, M, total, BIG_S: tl.constexpr):
    """Whether each flat offset's sample (sample n owns ``[n * M, (n + 1) * M)``) is labelled. With BIG_S the block
    spans at most two samples: two scalar loads instead of one gathered byte per element."""
    if BIG_S:
        n0 = start // M
        boundary = (n0 + 1) * M
        first = tl.load(mask_ptr + n0) != 0
        second = tl.load(mask_ptr + n0 + 1, mask=boundary < total, other=0) != 0
        labelled = tl.where(offs >= boundary, second, first)
    else:
        labelled = tl.load(mask_ptr + offs // M, mask=inb, other=0) != 0
    return labelled


@triton.jit
def _total_count(counts_ptr, num_counts, COUNTS_P2: tl.constexpr):
    """Sum of the partial counts written by ``_count_kernel`` (int64, exact)."""
    idx = tl.arange(0, COUNTS_P2)
    parts = tl.load(counts_ptr + idx, mask=idx < num_counts, other=0)
    return tl.sum(parts.to(tl.int64), axis=0)


@triton.jit
def _inv_count(counts_ptr, num_counts, PARTIALS: tl.constexpr, COUNTS_P2: tl.constexpr):
    """The gradient's factor: 1 / (total valid count), or 1 with PARTIALS (the count is not known yet)."""
    inv = 1.0
    if not PARTIALS:
        inv = 1.0 / tl.maximum(_total_count(counts_ptr, num_counts, COUNTS_P2), 1).to(tl.float32)
    return inv


@triton.jit
def _finish(psum_ptr, pcount_ptr, slot, loss_sum, valid):
    """A program's end: its (loss sum, valid count) partial in slot ``slot`` (no atomics: a finalize sums the slots
    in a fixed order, so the loss does not depend on the order programs run in)."""
    tl.store(psum_ptr + slot, loss_sum)
    tl.store(pcount_ptr + slot, valid)


@triton.jit
def _log1p(z):
    """log(1 + z) accurate for small z (the libdevice log1p is not available in the interpreter)."""
    u = 1.0 + z
    return tl.where(u == 1.0, z, tl.log(u) * (z / (u - 1.0)))


# ---- kernels ----------------------------------------------------------------------------------------------------


@triton.jit
def _count_kernel(
    target_ptr, mask_ptr, counts_ptr, ticket_ptr,
    total, iters, S, t_sn, t_ss, m_sn, m_ss, C, ignore_index,
    IS_CE: tl.constexpr, HAS_MASK: tl.constexpr, BIG_S: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Partial valid counts over the ``[N, S]`` index space of the targets; program 0 zeroes the ticket counter of
    the loss launch that follows."""
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
        tl.store(ticket_ptr, 0)


@triton.jit
def _ce_body(
    pred_ptr, target_ptr, mask_ptr, grad_ptr, counts_ptr, psum_ptr, pcount_ptr,
    S, C, num_s_blocks, num_counts, first_slot, ignore_index,
    p_sn, p_sc, p_ss, g_sn, g_sc, g_ss, t_sn, t_ss, m_sn, m_ss,
    ticket_ptr, fin_gs_ptr, fin_w_ptr, fin_total_ptr,
    n0, l0, n1, l1, n2, l2, n3, l3, n4, l4, n5, l5, n6, l6, n7, l7,
    HAS_MASK: tl.constexpr, MASK_PER_PIXEL: tl.constexpr, ROWS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    SINGLE_C: tl.constexpr, PARTIALS: tl.constexpr, COUNTS_P2: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr, TICKET: tl.constexpr, NUM: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    MSE_MASK: tl.constexpr, FIN_BLOCK: tl.constexpr,
):  # fmt: skip
    """Cross entropy of a tile of BLOCK_S pixels of one sample: online softmax over C, loss and gradient (scaled by
    1/count, or with PARTIALS the element gradient), and this program's (loss sum, valid count) partial.

    Which logits are read: with ROWS (classes contiguous) only the valid pixels' rows, a predicate that is the same
    along each row's vector. Otherwise (pixels contiguous) every pixel of a labelled sample, valid or not (ignored
    ones are masked out afterwards): a load predicate that changes from pixel to pixel would split each thread's
    run of neighbouring pixels into scalar loads. The sample mask is one value per program unless MASK_PER_PIXEL
    (the ``[N, C]`` view, where pixels are samples)."""
    pid = tl.program_id(0)
    n = (pid // num_s_blocks).to(tl.int64)
    s = (pid % num_s_blocks).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = s < S
    t = tl.load(target_ptr + n * t_sn + s * t_ss, mask=s_ok, other=0)
    ok = s_ok & (t != ignore_index) & (t >= 0) & (t < C)  # out-of-range classes are skipped, never indexed
    read = s_ok
    if HAS_MASK:
        if MASK_PER_PIXEL:
            ok = ok & (tl.load(mask_ptr + n * m_sn + s * m_ss, mask=s_ok, other=0) != 0)
            read = ok
        else:
            labelled = tl.load(mask_ptr + n * m_sn) != 0  # this program's sample
            ok = ok & labelled
            read = s_ok & labelled
    if ROWS:
        read = ok
    inv_count = _inv_count(counts_ptr, num_counts, PARTIALS, COUNTS_P2)

    row_p = pred_ptr + n * p_sn + s * p_ss
    row_g = grad_ptr + n * g_sn + s * g_ss
    cols = tl.arange(0, BLOCK_C).to(tl.int64)
    if SINGLE_C:
        c_ok = cols < C
        x = tl.load(row_p[:, None] + cols[None, :] * p_sc, mask=read[:, None] & c_ok[None, :], other=float("-inf"))
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
        # float32's lowest finite value: invalid rows stay NaN-free in the loop (exp(m - m_new) is never inf - inf),
        # and rows of very negative logits (-1e31, masked_fill with finfo.min) still set the max
        m = tl.full([BLOCK_S], -3.4028234663852886e38, tl.float32)
        lsum = tl.zeros([BLOCK_S], tl.float32)
        x_t = tl.zeros([BLOCK_S], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cols
            x = tl.load(row_p[:, None] + cc[None, :] * p_sc, mask=read[:, None] & (cc < C)[None, :],
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
                x = tl.load(row_p[:, None] + cc[None, :] * p_sc, mask=read[:, None] & c_ok[None, :],
                            other=float("-inf")).to(tl.float32)  # fmt: skip
                hit = cc[None, :] == t[:, None]
                g = tl.exp(x - m[:, None]) * scale[:, None] - tl.where(hit, inv_count, 0.0)
                g = tl.where(ok[:, None], g, 0.0)
                tl.store(row_g[:, None] + cc[None, :] * g_sc, g.to(grad_ptr.dtype.element_ty),
                         mask=s_ok[:, None] & c_ok[None, :])  # fmt: skip
    row_loss = tl.where(ok, (m - x_t) + tl.log(lsum), 0.0)  # max - target first: exact for confident rows
    _finish(psum_ptr, pcount_ptr, first_slot + pid, tl.sum(row_loss, axis=0), tl.sum(ok.to(tl.int32), axis=0))
    _ticket(ticket_ptr, pid, psum_ptr, pcount_ptr, fin_gs_ptr, fin_w_ptr, fin_total_ptr, n0, l0, n1, l1, n2,
            l2, n3, l3, n4, l4, n5, l5, n6, l6, n7, l7, TICKET, NUM, HAS_WEIGHTS, MSE_MASK, FIN_BLOCK)  # fmt: skip


@triton.jit(do_not_specialize=["first_slot"])
def _ce_kernel(
    pred_ptr, target_ptr, mask_ptr, grad_ptr, counts_ptr, psum_ptr, pcount_ptr, S, C, num_s_blocks,
    num_counts, first_slot, ignore_index, p_sn, p_sc, p_ss, g_sn, g_sc, g_ss, t_sn, t_ss, m_sn, m_ss,
    HAS_MASK: tl.constexpr, MASK_PER_PIXEL: tl.constexpr, ROWS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    SINGLE_C: tl.constexpr, PARTIALS: tl.constexpr, COUNTS_P2: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """One task's cross entropy (``_ce_body``) without a tail: the multi-task forward's launches between its first
    and last. (psum_ptr fills the tail's unused pointer arguments.)"""
    _ce_body(
        pred_ptr, target_ptr, mask_ptr, grad_ptr, counts_ptr, psum_ptr, pcount_ptr, S, C, num_s_blocks,
        num_counts, first_slot, ignore_index, p_sn, p_sc, p_ss, g_sn, g_sc, g_ss, t_sn, t_ss, m_sn, m_ss, psum_ptr,
        psum_ptr, psum_ptr, psum_ptr, 0, psum_ptr, 0, psum_ptr, 0, psum_ptr, 0, psum_ptr, 0, psum_ptr, 0, psum_ptr, 0,
        psum_ptr, 0, psum_ptr, HAS_MASK, MASK_PER_PIXEL, ROWS, COMPUTE_GRAD, SINGLE_C, PARTIALS, COUNTS_P2, BLOCK_S,
        BLOCK_C, 0, 1, False, 0, 16,
    )  # fmt: skip


@triton.jit(do_not_specialize=_VARYING)
def _ce_kernel_chained(
    pred_ptr, target_ptr, mask_ptr, grad_ptr, counts_ptr, psum_ptr, pcount_ptr, S, C, num_s_blocks,
    num_counts, first_slot, ignore_index, p_sn, p_sc, p_ss, g_sn, g_sc, g_ss, t_sn, t_ss, m_sn, m_ss,
    ticket_ptr, fin_gs_ptr, fin_w_ptr, fin_total_ptr, n0, l0, n1, l1, n2, l2, n3, l3, n4, l4, n5, l5, n6, l6, n7, l7,
    HAS_MASK: tl.constexpr, MASK_PER_PIXEL: tl.constexpr, ROWS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    SINGLE_C: tl.constexpr, PARTIALS: tl.constexpr, COUNTS_P2: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr, TICKET: tl.constexpr, NUM: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    MSE_MASK: tl.constexpr, FIN_BLOCK: tl.constexpr,
):  # fmt: skip
    """``_ce_kernel`` with a tail (``_ticket``): the multi-task forward's first or last, finalizing, launch, and
    ``masked_loss``'s loss launch (finalizing)."""
    _ce_body(
        pred_ptr, target_ptr, mask_ptr, grad_ptr, counts_ptr, psum_ptr, pcount_ptr, S, C, num_s_blocks,
        num_counts, first_slot, ignore_index, p_sn, p_sc, p_ss, g_sn, g_sc, g_ss, t_sn, t_ss, m_sn, m_ss, ticket_ptr,
        fin_gs_ptr, fin_w_ptr, fin_total_ptr, n0, l0, n1, l1, n2, l2, n3, l3, n4, l4, n5, l5, n6, l6, n7, l7, HAS_MASK,
        MASK_PER_PIXEL, ROWS, COMPUTE_GRAD, SINGLE_C, PARTIALS, COUNTS_P2, BLOCK_S, BLOCK_C, TICKET, NUM, HAS_WEIGHTS,
        MSE_MASK, FIN_BLOCK,
    )  # fmt: skip


@triton.jit
def _elementwise_body(
    pred_ptr, target_ptr, mask_ptr, grad_ptr, counts_ptr, psum_ptr, pcount_ptr,
    total, M, num_counts, first_slot,
    ticket_ptr, fin_gs_ptr, fin_w_ptr, fin_total_ptr,
    n0, l0, n1, l1, n2, l2, n3, l3, n4, l4, n5, l5, n6, l6, n7, l7,
    KIND: tl.constexpr, HAS_MASK: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BIG_S: tl.constexpr,
    PARTIALS: tl.constexpr, COUNTS_P2: tl.constexpr, BLOCK: tl.constexpr,
    TICKET: tl.constexpr, NUM: tl.constexpr, HAS_WEIGHTS: tl.constexpr, MSE_MASK: tl.constexpr,
    FIN_BLOCK: tl.constexpr,
):  # fmt: skip
    """bce / l1 / mse over flat storage (sample n owns [n*M, (n+1)*M)): loss and gradient in one sweep (scaled as in
    ``_ce_body``)."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    inb = offs < total
    ok = inb
    if HAS_MASK:
        ok = ok & _labelled(mask_ptr, offs, inb, start, M, total, BIG_S)
    # unlabelled samples are not read at all
    t = tl.load(target_ptr + offs, mask=ok, other=0).to(tl.float32)
    p = tl.load(pred_ptr + offs, mask=ok, other=0).to(tl.float32)
    ok = ok & (t == t)
    inv_count = _inv_count(counts_ptr, num_counts, PARTIALS, COUNTS_P2)
    if KIND == 0:  # bce with logits, stable form
        e = tl.exp(-tl.abs(p))
        loss = tl.maximum(p, 0.0) - p * t + _log1p(e)
        g = tl.where(p >= 0, 1.0 / (1.0 + e), e / (1.0 + e)) - t
    elif KIND == 1:  # l1
        d = p - t
        loss = tl.abs(d)
        g = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    else:  # mse (partials mode stores d = p - t: 2d could overflow float16; the finalize's factor carries the 2)
        d = p - t
        loss = d * d
        g = d if PARTIALS else 2.0 * d
    _finish(psum_ptr, pcount_ptr, first_slot + pid, tl.sum(tl.where(ok, loss, 0.0), axis=0),
            tl.sum(ok.to(tl.int32), axis=0))  # fmt: skip
    if COMPUTE_GRAD:
        tl.store(grad_ptr + offs, tl.where(ok, g * inv_count, 0.0).to(grad_ptr.dtype.element_ty), mask=inb)
    _ticket(ticket_ptr, pid, psum_ptr, pcount_ptr, fin_gs_ptr, fin_w_ptr, fin_total_ptr, n0, l0, n1, l1, n2,
            l2, n3, l3, n4, l4, n5, l5, n6, l6, n7, l7, TICKET, NUM, HAS_WEIGHTS, MSE_MASK, FIN_BLOCK)  # fmt: skip


@triton.jit(do_not_specialize=["first_slot"])
def _elementwise_kernel(
    pred_ptr, target_ptr, mask_ptr, grad_ptr, counts_ptr, psum_ptr, pcount_ptr, total, M, num_counts,
    first_slot,
    KIND: tl.constexpr, HAS_MASK: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BIG_S: tl.constexpr, PARTIALS: tl.constexpr,
    COUNTS_P2: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One task's bce / l1 / mse (``_elementwise_body``) without a tail: the multi-task forward's launches between its
    first and last."""
    _elementwise_body(
        pred_ptr, target_ptr, mask_ptr, grad_ptr, counts_ptr, psum_ptr, pcount_ptr, total, M, num_counts,
        first_slot, psum_ptr, psum_ptr, psum_ptr, psum_ptr, 0, psum_ptr, 0, psum_ptr, 0, psum_ptr, 0, psum_ptr, 0,
        psum_ptr, 0, psum_ptr, 0, psum_ptr, 0, psum_ptr, KIND, HAS_MASK, COMPUTE_GRAD, BIG_S, PARTIALS, COUNTS_P2,
        BLOCK, 0, 1, False, 0, 16,
    )  # fmt: skip


@triton.jit(do_not_specialize=_VARYING)
def _elementwise_kernel_chained(
    pred_ptr, target_ptr, mask_ptr, grad_ptr, counts_ptr, psum_ptr, pcount_ptr, total, M, num_counts,
    first_slot,
    ticket_ptr, fin_gs_ptr, fin_w_ptr, fin_total_ptr, n0, l0, n1, l1, n2, l2, n3, l3, n4, l4, n5, l5, n6, l6, n7, l7,
    KIND: tl.constexpr, HAS_MASK: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BIG_S: tl.constexpr, PARTIALS: tl.constexpr,
    COUNTS_P2: tl.constexpr, BLOCK: tl.constexpr, TICKET: tl.constexpr, NUM: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    MSE_MASK: tl.constexpr, FIN_BLOCK: tl.constexpr,
):  # fmt: skip
    """``_elementwise_kernel`` with a tail (``_ticket``): the multi-task forward's first or last, finalizing, launch,
    and ``masked_loss``'s loss launch (finalizing)."""
    _elementwise_body(
        pred_ptr, target_ptr, mask_ptr, grad_ptr, counts_ptr, psum_ptr, pcount_ptr, total, M, num_counts,
        first_slot, ticket_ptr, fin_gs_ptr, fin_w_ptr, fin_total_ptr, n0, l0, n1, l1, n2, l2, n3, l3, n4, l4, n5, l5,
        n6, l6, n7, l7, KIND, HAS_MASK, COMPUTE_GRAD, BIG_S, PARTIALS, COUNTS_P2, BLOCK, TICKET, NUM, HAS_WEIGHTS,
        MSE_MASK, FIN_BLOCK,
    )  # fmt: skip


@triton.jit
def _finalize_slot(psum_ptr, pcount_ptr, first, num, loss_ptr, index, grad_scale_ptr, weights_ptr,
                   MSE: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """One task: sum its partials [first, first + num) (float64 / int64), write L_t and grad_scale[index] =
    1 / count (mse 2 / count, whose partials-mode gradient is p - t; both 0 without a valid element); return
    weights[index] * L_t. The partials are loaded from L2 (.cg): in the last launch's finalize, other programs of
    that launch wrote some of them."""
    acc_s = tl.zeros([BLOCK], tl.float64)
    acc_c = tl.zeros([BLOCK], tl.int64)
    for i in range(0, num, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        inb = idx < num
        acc_s += tl.load(psum_ptr + first + idx, mask=inb, other=0.0, cache_modifier=".cg").to(tl.float64)
        acc_c += tl.load(pcount_ptr + first + idx, mask=inb, other=0, cache_modifier=".cg").to(tl.int64)
    total = tl.sum(acc_s, axis=0)
    count = tl.sum(acc_c, axis=0)
    denom = tl.maximum(count, 1).to(tl.float64)
    loss = tl.where(count > 0, total / denom, 0.0).to(tl.float32)
    tl.store(loss_ptr, loss)
    if MSE:  # the partials mode stored p - t, not 2 (p - t)
        factor = 2.0 / denom
    else:
        factor = 1.0 / denom
    tl.store(grad_scale_ptr + index, tl.where(count > 0, factor.to(tl.float32), 0.0))
    weighted = loss
    if HAS_WEIGHTS:
        weighted = loss * tl.load(weights_ptr + index).to(tl.float32)
    return weighted


@triton.jit
def _finalize_tasks(
    psum_ptr, pcount_ptr, gs_ptr, w_ptr, total_ptr,
    n0, l0, n1, l1, n2, l2, n3, l3, n4, l4, n5, l5, n6, l6, n7, l7,
    NUM: tl.constexpr, HAS_WEIGHTS: tl.constexpr, MSE_MASK: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Up to 8 tasks whose partials lie one after another from psum_ptr / pcount_ptr (slot t: n{t} partials, loss
    l{t}; bit t of MSE_MASK: an mse task): losses, gradient factors (gs_ptr) and the total weighted by w_ptr
    (added to *total_ptr with ACCUMULATE)."""
    total = _finalize_slot(psum_ptr, pcount_ptr, 0, n0, l0, 0, gs_ptr, w_ptr, (MSE_MASK & 1) != 0, HAS_WEIGHTS, BLOCK)
    first = n0
    if NUM > 1:
        total += _finalize_slot(psum_ptr, pcount_ptr, first, n1, l1, 1, gs_ptr, w_ptr, (MSE_MASK & 2) != 0,
                                HAS_WEIGHTS, BLOCK)  # fmt: skip
        first += n1
    if NUM > 2:
        total += _finalize_slot(psum_ptr, pcount_ptr, first, n2, l2, 2, gs_ptr, w_ptr, (MSE_MASK & 4) != 0,
                                HAS_WEIGHTS, BLOCK)  # fmt: skip
        first += n2
    if NUM > 3:
        total += _finalize_slot(psum_ptr, pcount_ptr, first, n3, l3, 3, gs_ptr, w_ptr, (MSE_MASK & 8) != 0,
                                HAS_WEIGHTS, BLOCK)  # fmt: skip
        first += n3
    if NUM > 4:
        total += _finalize_slot(psum_ptr, pcount_ptr, first, n4, l4, 4, gs_ptr, w_ptr, (MSE_MASK & 16) != 0,
                                HAS_WEIGHTS, BLOCK)  # fmt: skip
        first += n4
    if NUM > 5:
        total += _finalize_slot(psum_ptr, pcount_ptr, first, n5, l5, 5, gs_ptr, w_ptr, (MSE_MASK & 32) != 0,
                                HAS_WEIGHTS, BLOCK)  # fmt: skip
        first += n5
    if NUM > 6:
        total += _finalize_slot(psum_ptr, pcount_ptr, first, n6, l6, 6, gs_ptr, w_ptr, (MSE_MASK & 64) != 0,
                                HAS_WEIGHTS, BLOCK)  # fmt: skip
        first += n6
    if NUM > 7:
        total += _finalize_slot(psum_ptr, pcount_ptr, first, n7, l7, 7, gs_ptr, w_ptr, (MSE_MASK & 128) != 0,
                                HAS_WEIGHTS, BLOCK)  # fmt: skip
    if ACCUMULATE:
        total += tl.load(total_ptr)
    tl.store(total_ptr, total)


@triton.jit(do_not_specialize=_SLOT_COUNTS)
def _finalize_kernel(
    psum_ptr, pcount_ptr, gs_ptr, w_ptr, total_ptr,
    n0, l0, n1, l1, n2, l2, n3, l3, n4, l4, n5, l5, n6, l6, n7, l7,
    NUM: tl.constexpr, HAS_WEIGHTS: tl.constexpr, MSE_MASK: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """One program: ``_finalize_tasks`` as a launch of its own (one task, or more than 8)."""
    _finalize_tasks(psum_ptr, pcount_ptr, gs_ptr, w_ptr, total_ptr, n0, l0, n1, l1, n2, l2, n3, l3, n4, l4, n5, l5,
                    n6, l6, n7, l7, NUM, HAS_WEIGHTS, MSE_MASK, ACCUMULATE, BLOCK)  # fmt: skip


@triton.jit
def _ticket(
    ticket_ptr, pid,
    psum_ptr, pcount_ptr, gs_ptr, w_ptr, total_ptr,
    n0, l0, n1, l1, n2, l2, n3, l3, n4, l4, n5, l5, n6, l6, n7, l7,
    TICKET: tl.constexpr, NUM: tl.constexpr, HAS_WEIGHTS: tl.constexpr, MSE_MASK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """A loss kernel's end (after its partial is stored): TICKET 1, the multi-task forward's first launch, program 0
    zeroes the ticket counter; TICKET 2, its last launch (or ``masked_loss``'s loss launch, whose count launch zeroed
    the counter), each program takes a ticket and the program that takes the last one runs ``_finalize_tasks`` over
    every task's partials. The earlier launches are complete (same stream), and this launch's partials are visible to
    the program that takes the last ticket through the ticket's acquire-release."""
    if TICKET == 1:
        if pid == 0:
            tl.store(ticket_ptr, 0)
    if TICKET == 2:
        tl.debug_barrier()  # every thread's partial store precedes the ticket's release
        taken = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
        if taken == tl.num_programs(0) - 1:
            _finalize_tasks(psum_ptr, pcount_ptr, gs_ptr, w_ptr, total_ptr, n0, l0, n1, l1, n2, l2, n3, l3, n4, l4,
                            n5, l5, n6, l6, n7, l7, NUM, HAS_WEIGHTS, MSE_MASK, False, BLOCK)  # fmt: skip


@triton.jit
def _slot_scale(scales_ptr, index, gt_ptr, g_total_ptr, weights_ptr, factor_ptr, FACTORS: tl.constexpr,
                HAS_TOTAL: tl.constexpr, HAS_WEIGHTS: tl.constexpr, HAS_G: tl.constexpr):  # fmt: skip
    """scales[index], or with FACTORS (g_total * weights[index] + g_task) * factor[index] (absent: 0, weight 1)."""
    if FACTORS:
        s = 0.0
        if HAS_TOTAL:
            s = tl.load(g_total_ptr).to(tl.float32)
            if HAS_WEIGHTS:
                s = s * tl.load(weights_ptr + index).to(tl.float32)
        if HAS_G:
            s = s + tl.load(gt_ptr).to(tl.float32)
        scale = s * tl.load(factor_ptr + index)
    else:
        scale = tl.load(scales_ptr + index)
    return scale


@triton.jit
def _scale_slot(pid, first_block, g_ptr, o_ptr, numel, scale, BLOCK: tl.constexpr):
    """out = grad * scale for the programs [first_block, first_block + cdiv(numel, BLOCK))."""
    local = pid - first_block
    if (local >= 0) & (local < tl.cdiv(numel, BLOCK)):
        offs = local.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < numel
        g = tl.load(g_ptr + offs, mask=inb, other=0).to(tl.float32)
        tl.store(o_ptr + offs, (g * scale).to(o_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _scale_grads_kernel(
    scales_ptr, total_ptr, w_ptr, factor_ptr,
    g0, o0, n0, f0, t0, g1, o1, n1, f1, t1, g2, o2, n2, f2, t2, g3, o3, n3, f3, t3,
    g4, o4, n4, f4, t4, g5, o5, n5, f5, t5, g6, o6, n6, f6, t6, g7, o7, n7, f7, t7,
    NUM: tl.constexpr, FACTORS: tl.constexpr, HAS_TOTAL: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    G_MASK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Grouped ``out[t] = grads[t] * scale_t``: each program finds its task slot by its block range. scale_t is
    ``scales[t]``, or with FACTORS computed from the upstream gradients: the total's (total_ptr, weighted by w_ptr)
    and slot t's own (t{t}, where bit t of G_MASK is set), times factor_ptr[t]."""
    pid = tl.program_id(0)
    scale = _slot_scale(scales_ptr, 0, t0, total_ptr, w_ptr, factor_ptr, FACTORS, HAS_TOTAL, HAS_WEIGHTS,
                        (G_MASK & 1) != 0)
    _scale_slot(pid, f0, g0, o0, n0, scale, BLOCK)
    if NUM > 1:
        scale = _slot_scale(scales_ptr, 1, t1, total_ptr, w_ptr, factor_ptr, FACTORS, HAS_TOTAL, HAS_WEIGHTS,
                            (G_MASK & 2) != 0)
        _scale_slot(pid, f1, g1, o1, n1, scale, BLOCK)
    if NUM > 2:
        scale = _slot_scale(scales_ptr, 2, t2, total_ptr, w_ptr, factor_ptr, FACTORS, HAS_TOTAL, HAS_WEIGHTS,
                            (G_MASK & 4) != 0)
        _scale_slot(pid, f2, g2, o2, n2, scale, BLOCK)
    if NUM > 3:
        scale = _slot_scale(scales_ptr, 3, t3, total_ptr, w_ptr, factor_ptr, FACTORS, HAS_TOTAL, HAS_WEIGHTS,
                            (G_MASK & 8) != 0)
        _scale_slot(pid, f3, g3, o3, n3, scale, BLOCK)
    if NUM > 4:
        scale = _slot_scale(scales_ptr, 4, t4, total_ptr, w_ptr, factor_ptr, FACTORS, HAS_TOTAL, HAS_WEIGHTS,
                            (G_MASK & 16) != 0)
        _scale_slot(pid, f4, g4, o4, n4, scale, BLOCK)
    if NUM > 5:
        scale = _slot_scale(scales_ptr, 5, t5, total_ptr, w_ptr, factor_ptr, FACTORS, HAS_TOTAL, HAS_WEIGHTS,
                            (G_MASK & 32) != 0)
        _scale_slot(pid, f5, g5, o5, n5, scale, BLOCK)
    if NUM > 6:
        scale = _slot_scale(scales_ptr, 6, t6, total_ptr, w_ptr, factor_ptr, FACTORS, HAS_TOTAL, HAS_WEIGHTS,
                            (G_MASK & 64) != 0)
        _scale_slot(pid, f6, g6, o6, n6, scale, BLOCK)
    if NUM > 7:
        scale = _slot_scale(scales_ptr, 7, t7, total_ptr, w_ptr, factor_ptr, FACTORS, HAS_TOTAL, HAS_WEIGHTS,
                            (G_MASK & 128) != 0)
        _scale_slot(pid, f7, g7, o7, n7, scale, BLOCK)


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
    """One task's outputs: the float32 0-dim loss and the gradient (pred's layout, as the fakes say; empty when not
    asked for). The one place they are allocated (tests poison them here)."""
    loss = torch.empty((), dtype=torch.float32, device=pred.device)
    grad = torch.empty_like(pred) if compute_grad else pred.new_empty(0)
    return loss, grad


def _alloc_ticket(device):
    """A ticket counter (``_ticket``), uninitialised: the first launch of the op zeroes it (tests poison it here)."""
    return torch.empty(1, dtype=torch.int32, device=device)


class _TaskPlan:
    """One task's kernels, prepared: the tensors in the layouts the kernels take and their arguments.

    ``grad`` is the output (pred's layout, as the fakes say); ``work_grad`` is where the kernel writes it (``grad``
    unless that layout does not fit the kernel: rare, then ``finish`` copies). ``blocks`` is the loss kernel's grid
    (= the number of partials it writes). ``kernels`` is the loss kernel and its form with a tail (``_ticket``);
    their arguments are ``tensors`` (pred, target, mask, gradient), then the three reduction pointers (counts, psum,
    pcount), ``sizes``, ``num_counts``, the first partial slot, ``strides`` (then the tail) and the ``constexprs``.
    """

    def __init__(self, grad, work_grad, blocks, count_args, kernels, tensors, sizes, strides, constexprs):
        self.grad, self.work_grad, self.blocks = grad, work_grad, blocks
        self._count_args, self._kernels = count_args, kernels
        self._tensors, self._sizes, self._strides, self._constexprs = tensors, sizes, strides, constexprs

    def count(self, launch, counts, ticket) -> int:
        """Normalised mode, first launch: partial valid counts into ``counts`` (and ``ticket`` zeroed); returns how
        many."""
        return _launch_count(launch, counts=counts, ticket=ticket, **self._count_args)

    def run(self, launch, psum, pcount, counts=None, num_counts=0, first_slot=0, tail=None) -> None:
        """The loss kernel, writing this task's partials from slot ``first_slot`` on: normalised (gradient divided
        by the count the ``counts`` pass found) or, without ``counts``, partials mode (gradient undivided).
        ``tail`` = ``(ticket, mode, (finalize args, finalize constexprs))`` makes it a first (mode 1: zeroes the
        ticket) or last, finalizing (mode 2), launch (see ``_ticket``). Without counts, pred stands in for the
        pointer (never read: the kernel branches on PARTIALS at compile time)."""
        if self.blocks == 0:
            return
        partials = counts is None
        reduction = (self._tensors[0] if partials else counts, psum, pcount)
        args = (*self._tensors, *reduction, *self._sizes, num_counts, first_slot, *self._strides)
        if tail is None:  # the lean kernel: fewer arguments, less host time per launch
            launch(self._kernels[0])[(self.blocks,)](*args, PARTIALS=partials, **self._constexprs)
            return
        ticket, mode, (fin_args, fin_consts) = tail
        launch(self._kernels[1])[(self.blocks,)](
            *args, ticket, *fin_args, PARTIALS=partials, TICKET=mode, FIN_BLOCK=FINALIZE_BLOCK, **fin_consts,
            **self._constexprs,
        )  # fmt: skip

    def finish(self) -> None:
        if self.work_grad is not self.grad and self.grad.numel():
            self.grad.copy_(self.work_grad)  # rare: the kernel could not write pred's own layout


def _launch_count(launch, target, mask_u8, has_mask, counts_total, counts, ticket, S, t_sn, t_ss, m_sn, m_ss, C,
                  ignore_index, is_ce):  # fmt: skip
    blocks = triton.cdiv(counts_total, COUNT_BLOCK)
    programs = max(1, min(COUNT_PROGRAMS, blocks))
    if launch is not None:
        launch(_count_kernel)[(programs,)](
            target, mask_u8, counts, ticket, counts_total, triton.cdiv(blocks, programs),
            S, t_sn, t_ss, m_sn, m_ss, C, ignore_index,
            IS_CE=is_ce, HAS_MASK=has_mask, BIG_S=bool(S >= COUNT_BLOCK), BLOCK=COUNT_BLOCK, num_warps=8,
        )  # fmt: skip
    return programs


def _plan(pred, target, mask, kind, ignore_index, compute_grad, grad) -> _TaskPlan:
    if kind == "ce":
        return _ce_plan(pred, target, mask, ignore_index, compute_grad, grad)
    return _elementwise_plan(pred, target, mask, kind, compute_grad, grad)


def masked_loss(pred, target, mask, kind, ignore_index=-100, compute_grad=True, launch=_direct):
    """Masked mean loss of one task and its gradient (see ``fastmtl::masked_loss`` in csrc/ops.cpp).

    Args:
        pred, target, mask, kind, ignore_index, compute_grad: as the native op; arguments are assumed valid.
        launch: wraps each kernel before launching (``torch.library.wrap_triton`` inside a ``triton_op``); ``None``
            allocates the outputs without launching anything (fake/meta implementations).

    Returns:
        ``(loss, grad)``: float32 0-dim loss, gradient with pred's shape, dtype and (dense) strides, or an empty
        tensor when ``compute_grad`` is false. Two launches: the valid count, then loss and gradient in one sweep,
        each program writing its partial, the program that finishes last summing them (``_ticket``).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    loss, grad = _alloc_outputs(pred, compute_grad)
    plan = _plan(pred, target, mask, kind, ignore_index, compute_grad, grad)
    if launch is None:
        return loss, plan.grad
    if plan.blocks == 0:  # no elements (and an empty gradient): nothing to count or finalize
        return loss.zero_(), plan.grad
    device = pred.device
    ints = torch.empty(COUNT_PROGRAMS + plan.blocks, dtype=torch.int32, device=device)
    counts, pcount = ints[:COUNT_PROGRAMS], ints[COUNT_PROGRAMS:]
    # psum, then the gradient factor and total that the finalize also writes and the one-task op has no use for
    floats = torch.empty(plan.blocks + 2, dtype=torch.float32, device=device)
    psum, unused = floats[: plan.blocks], floats[plan.blocks :]
    ticket = _alloc_ticket(device)
    num_counts = plan.count(launch, counts, ticket)
    finalize = _finalize_args([0], [0, plan.blocks], unused[:1], None, unused[1:], [loss], [kind])
    plan.run(launch, psum, pcount, counts=counts, num_counts=num_counts, tail=(ticket, 2, finalize))
    plan.finish()
    return loss, plan.grad


def _ce_plan(pred, target, mask, ignore_index, compute_grad, grad) -> _TaskPlan:
    if _collapsed_stride(pred.shape[2:], pred.stride()[2:]) is None:
        pred = pred.contiguous()
    if _collapsed_stride(target.shape[1:], target.stride()[1:]) is None:
        target = target.contiguous()
    work_grad = grad
    if compute_grad and _collapsed_stride(grad.shape[2:], grad.stride()[2:]) is None:
        work_grad = torch.empty_like(pred)
    N, C = pred.shape[0], pred.shape[1]
    S = math.prod(pred.shape[2:])
    p_sn, p_sc = pred.stride(0), pred.stride(1)
    p_ss = _collapsed_stride(pred.shape[2:], pred.stride()[2:])
    g_src = work_grad if compute_grad else pred
    g_sn, g_sc, g_ss = g_src.stride(0), g_src.stride(1), _collapsed_stride(g_src.shape[2:], g_src.stride()[2:])
    t_sn, t_ss = target.stride(0), _collapsed_stride(target.shape[1:], target.stride()[1:])
    m_sn, m_ss = (mask.stride(0) if mask is not None else 0), 0
    if pred.dim() == 2:  # [N, C] as [1, C, N]: rows become pixels of a single sample
        N, S = 1, N
        p_ss, g_ss, t_ss, m_ss = p_sn, g_sn, t_sn, m_sn
        p_sn = g_sn = t_sn = m_sn = 0
    mask_u8, has_mask = _mask_u8(mask, target)
    count_args = dict(target=target, mask_u8=mask_u8, has_mask=has_mask, counts_total=N * S, S=S, t_sn=t_sn,
                      t_ss=t_ss, m_sn=m_sn, m_ss=m_ss, C=C, ignore_index=ignore_index, is_ce=True)  # fmt: skip
    # constexpr block sizes are made concrete below (under dynamic-shape tracing this specialises on C and S)
    if p_sc == 1 and C > 1:  # classes contiguous ([N, C], channels_last): rows of BLOCK_C lanes
        block_c = min(triton.next_power_of_2(C), 1024)
        block_s = max(1, min(128, 4096 // block_c))
    else:  # pixels contiguous (NCHW): BLOCK_S pixels along the fast axis, loop over classes
        block_c = min(triton.next_power_of_2(max(C, 1)), 16)
        block_s = max(32, 4096 // block_c)
    block_s = min(block_s, triton.next_power_of_2(max(S, 1)))
    num_s_blocks = triton.cdiv(S, block_s)
    tensors = (pred, target, mask_u8, work_grad if compute_grad else pred)
    strides = (ignore_index, p_sn, p_sc, p_ss, g_sn, g_sc, g_ss, t_sn, t_ss, m_sn, m_ss)
    consts = dict(HAS_MASK=has_mask, MASK_PER_PIXEL=bool(has_mask and m_ss != 0), ROWS=bool(p_sc == 1 and C > 1),
                  COMPUTE_GRAD=compute_grad, SINGLE_C=bool(C <= block_c), COUNTS_P2=COUNT_PROGRAMS,
                  BLOCK_S=int(block_s), BLOCK_C=int(block_c),
                  num_warps=8 if block_s * block_c >= 4096 else 4)  # fmt: skip
    blocks = N * num_s_blocks if N * S else 0
    kernels = (_ce_kernel, _ce_kernel_chained)
    return _TaskPlan(grad, work_grad, blocks, count_args, kernels, tensors, (S, C, num_s_blocks), strides, consts)


def _elementwise_plan(pred, target, mask, kind, compute_grad, grad) -> _TaskPlan:
    if not _flat_by_sample(pred):
        pred = pred.contiguous()
    if not (_dense(target) and _same_layout(pred, target)):
        target = torch.empty_like(pred, dtype=target.dtype).copy_(target)  # rare: bring target to pred's layout
    work_grad = grad
    if compute_grad and not (_dense(grad) and _same_layout(grad, pred)):
        work_grad = torch.empty_like(pred)
    N = pred.shape[0]
    total = pred.numel()
    M = total // N if N else 0
    mask_u8, has_mask = _mask_u8(mask, target)
    m_sn = mask.stride(0) if mask is not None else 0
    if has_mask and m_sn != 1:
        mask_u8 = mask_u8.contiguous()
    # the targets in storage order: [N, M] with strides (M, 1)
    count_args = dict(target=target, mask_u8=mask_u8, has_mask=has_mask, counts_total=total, S=max(M, 1),
                      t_sn=max(M, 1), t_ss=1, m_sn=1, m_ss=0, C=0, ignore_index=0, is_ce=False)  # fmt: skip
    tensors = (pred, target, mask_u8, work_grad if compute_grad else pred)
    consts = dict(KIND=_ELEMENTWISE_CODE[kind], HAS_MASK=has_mask, COMPUTE_GRAD=compute_grad,
                  BIG_S=bool(M >= ELEMENTWISE_BLOCK), COUNTS_P2=COUNT_PROGRAMS, BLOCK=ELEMENTWISE_BLOCK,
                  num_warps=8)  # fmt: skip
    blocks = triton.cdiv(total, ELEMENTWISE_BLOCK)
    kernels = (_elementwise_kernel, _elementwise_kernel_chained)
    return _TaskPlan(grad, work_grad, blocks, count_args, kernels, tensors, (total, M), (), consts)


def _finalize_args(group, first, grad_scale, weights, total, losses, kinds):
    """``_finalize_tasks``'s arguments after the partials (gradient factors, weights, total, slots) and its
    constexprs, for the tasks of ``group`` (consecutive, at most 8)."""
    slots = []
    for i in range(SCALE_SLOTS):
        t = group[i] if i < len(group) else group[0]
        slots += [first[t + 1] - first[t] if i < len(group) else 0, losses[t]]
    begin = group[0]
    args = (grad_scale[begin:], weights[begin:] if weights is not None else grad_scale, total, *slots)
    mse_mask = sum(1 << i for i, t in enumerate(group) if kinds[t] == "mse")
    return args, dict(NUM=len(group), HAS_WEIGHTS=weights is not None, MSE_MASK=mse_mask)


def multitask_forward(preds, targets, masks, kinds, ignore_index, weights, compute_grad, launch=_direct):
    """Every task's loss and gradient up to a factor (see ``fastmtl::masked_multitask_loss_forward``).

    Per task one loss kernel in partials mode (element gradients, one (loss sum, valid count) partial per program,
    each target read once). For 2 to 8 tasks the last launch also finalizes (losses, factors, total: the
    program that finishes last, see ``_ticket``), so the forward is ``T`` launches; otherwise one finalize launch per
    8 tasks follows.

    Returns:
        ``(total, losses, grad_scale, grads)``: float32 0-dim total and losses, float32 ``[T]`` factors (1 / valid
        count, mse 2 / count, 0 without a valid element) with ``grads[t] * grad_scale[t] = d L_t / d pred_t``;
        ``grads[t]`` is empty where ``compute_grad[t]`` is false. ``launch=None`` only allocates.
    """
    device = preds[0].device
    outputs = [_alloc_outputs(p, bool(c)) for p, c in zip(preds, compute_grad)]
    losses = [loss for loss, _ in outputs]
    plans = [
        _plan(p, t, m, k, ignore_index, bool(c), grad)
        for p, t, m, k, c, (_, grad) in zip(preds, targets, masks, kinds, compute_grad, outputs)
    ]
    n = len(plans)
    total = _alloc_outputs(preds[0], False)[0]
    grad_scale = torch.empty(n, dtype=torch.float32, device=device)
    grads = [plan.grad for plan in plans]
    if launch is None:
        return total, losses, grad_scale, grads
    first = [0]
    for plan in plans:
        first.append(first[-1] + plan.blocks)
    psum = torch.empty(max(first[-1], 1), dtype=torch.float32, device=device)
    pcount = torch.empty(max(first[-1], 1), dtype=torch.int32, device=device)
    if weights is not None:
        weights = weights.to(torch.float32).contiguous()
    groups = [list(range(b, min(b + SCALE_SLOTS, n))) for b in range(0, n, SCALE_SLOTS)]
    finalize = [_finalize_args(g, first, grad_scale, weights, total, losses, kinds) for g in groups]
    launched = [t for t, plan in enumerate(plans) if plan.blocks]
    # The last launch can finalize when an earlier one of this forward zeroed its ticket counter.
    fused = len(groups) == 1 and len(launched) >= 2
    ticket = _alloc_ticket(device) if fused else None
    for t, plan in enumerate(plans):
        tail = None
        if fused and t in (launched[0], launched[-1]):
            tail = (ticket, 1 if t == launched[0] else 2, finalize[0])
        # every launch takes the whole psum / pcount (the last one reads all of them) and its first slot
        plan.run(launch, psum, pcount, first_slot=first[t], tail=tail)
        plan.finish()
    if not fused:
        for g, (group, (args, consts)) in enumerate(zip(groups, finalize)):
            begin = first[group[0]]
            launch(_finalize_kernel)[(1,)](psum[begin:], pcount[begin:], *args, ACCUMULATE=g > 0,
                                           BLOCK=FINALIZE_BLOCK, num_warps=4, **consts)  # fmt: skip
    return total, losses, grad_scale, grads


def multitask_backward(grads, grad_scale, grad_total, weights, grad_losses, launch=_direct, inplace=False):
    """``out[t] = grads[t] * (grad_total * weights[t] + grad_losses[t]) * grad_scale[t]`` (see
    ``fastmtl::masked_multitask_loss_backward``), the scales computed in the kernel: ``ceil(T / 8)`` launches.

    Absent ``grad_total`` / ``grad_losses[t]`` count as 0, absent ``weights`` as 1. With ``inplace`` the result is
    written into ``grads``. ``launch=None`` only allocates.
    """
    if grad_scale.numel() != len(grads):
        raise ValueError(f"grad_scale must have one factor per task ({len(grads)}), got {grad_scale.numel()}")
    factors = {"g_total": grad_total, "weights": weights, "factor": grad_scale, "g_tasks": grad_losses}
    return _scale(grads, None, factors, launch, inplace)


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
    return _scale(grads, scales, None, launch, inplace)


def _slot_scale_host(t, scales, factors):
    """The scale of task t as a 0-dim float32 tensor (for gradients the kernel does not take)."""
    if factors is None:
        return scales[t]
    s = torch.zeros((), dtype=torch.float32, device=factors["factor"].device)
    if factors["g_total"] is not None:
        s = factors["g_total"].float() * (factors["weights"][t].float() if factors["weights"] is not None else 1.0)
    if factors["g_tasks"][t] is not None:
        s = s + factors["g_tasks"][t].float()
    return s * factors["factor"][t]


def _check_disjoint(grads) -> None:
    """In-place scaling of tensors that share memory would race (and scale shared elements twice)."""
    spans = sorted((g.data_ptr(), g.data_ptr() + g.numel() * g.element_size()) for g in grads if g.numel())
    for (_, end), (start, _) in zip(spans[:-1], spans[1:]):
        if start < end:
            raise RuntimeError("in-place scaling: some of the gradients share memory; pass distinct tensors")


def _scale(grads, scales, factors, launch, inplace):
    if inplace:
        if launch is not None:
            _check_disjoint(grads)
        # Dense gradients are both input and output of the kernel; strided ones are scaled by ATen here and left
        # to the kernel as empty slots.
        for t, g in enumerate(grads):
            if not _dense(g) and launch is not None:  # float32: a half tensor scaled in place would round the scale
                g.copy_(g.float() * _slot_scale_host(t, scales, factors))
        grads = [g if _dense(g) else g.new_empty(0) for g in grads]
        outs = grads
    else:
        grads = [g if _dense(g) else g.contiguous() for g in grads]
        outs = [torch.empty_like(g) for g in grads]
    if launch is None:
        return outs
    ref = factors["factor"] if factors is not None else scales
    for first in range(0, len(grads), SCALE_SLOTS):
        group = list(range(first, min(first + SCALE_SLOTS, len(grads))))
        args, block, g_mask = [], 0, 0
        for i in range(SCALE_SLOTS):
            t = group[i] if i < len(group) else group[0]
            numel = grads[t].numel() if i < len(group) else 0
            g_task = factors["g_tasks"][t] if factors is not None and i < len(group) else None
            if g_task is not None:
                g_mask |= 1 << i
            args += [grads[t], outs[t], numel, block, g_task if g_task is not None else ref]
            block += triton.cdiv(numel, SCALE_BLOCK)
        if block == 0:
            continue
        if factors is None:
            pointers = (scales[first:], ref, ref, ref)
            flags = dict(FACTORS=False, HAS_TOTAL=False, HAS_WEIGHTS=False)
        else:
            g_total, weights = factors["g_total"], factors["weights"]
            pointers = (ref, g_total if g_total is not None else ref,
                        weights[first:] if weights is not None else ref, factors["factor"][first:])  # fmt: skip
            flags = dict(FACTORS=True, HAS_TOTAL=g_total is not None, HAS_WEIGHTS=weights is not None)
        launch(_scale_grads_kernel)[(block,)](
            *pointers, *args, NUM=len(group), G_MASK=g_mask, BLOCK=SCALE_BLOCK, num_warps=8, **flags
        )
    return outs
