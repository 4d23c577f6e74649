"""Triton kernels for the fused ``relu(conv2d(x, weight) + bias)`` and its backward.

Plain host launchers around ``@triton.jit`` kernels; no op registration here (that is
``fastmtl/ops/conv_bias_relu_triton.py``). Every launcher accepts ``wrap``, a function applied to each kernel
before it is launched: the op module passes ``torch.library.wrap_triton`` so ``torch.compile`` can trace the
launches; eager callers leave it ``None``.

Layout: NHWC (channels_last) is the fast path, NCHW works through strides. Dtypes: float16 / bfloat16 with
float32 accumulation, and float32 (tensor-core tf32 only when ``torch.backends.cuda.matmul.allow_tf32`` is true,
else ``input_precision="ieee"``). Convolutions here handle ``groups == 1`` only: the op routes ``groups > 1`` to
the PyTorch reference before reaching these launchers.

Kernels:

* :func:`conv_bias_relu_forward` - implicit GEMM, M = N*H_out*W_out, N_gemm = C_out, K = C_in*kH*kW iterated as
  (kh, kw, C_in block) so NHWC loads are contiguous along C; for C_in < 16 (the RGB stem) K is flattened instead so
  the few input channels do not pad a whole block per tap. Bias and ReLU are applied to the fp32 accumulator.
* :func:`relu_bias_grad` - ``grad_z = grad_y * (y > 0)`` and ``grad_bias = sum_{N,H,W} grad_z`` in one read of
  ``grad_y`` and ``y``: per-program fp32 partial sums, then one small kernel sums them in a fixed order
  (deterministic, no atomics).
* :func:`conv_input_grad` / :func:`conv_weight_grad` - implicit-GEMM dgrad and wgrad (split-K with fp32 partials,
  deterministic) on ``grad_z``; :func:`conv_backward` chooses them (``impl="triton"``) or ATen's
  ``convolution_backward`` (``impl="aten"``, cuDNN on a GPU).

Indexing is int32 unless a tensor has 2**31 elements or more, then int64 (the ``INT64`` specialisation).
Under ``TRITON_INTERPRET=1`` each autotuned kernel has a single small config (the interpreter would run every one);
``FASTMTL_TRITON_AUTOTUNE=0`` keeps only the first GPU config of each list (quick GPU test runs, no tuning).
Sizes are read as Python ints in the launchers (under dynamic-shape tracing that specialises on them).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
INT32_MAX = 2**31 - 1
FLAT_K_MAX_CIN = 15  # below 16 input channels the forward flattens (kh, kw, c) into one K axis


AUTOTUNE = os.environ.get("FASTMTL_TRITON_AUTOTUNE", "1") != "0"


def _configs(gpu: list[tuple[int, int, int, int, int]], interpret: tuple[int, int, int]) -> list[triton.Config]:
    """Autotune configs from (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tuples; one config when interpreted."""
    if INTERPRET:
        m, n, k = interpret
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=4, num_stages=1)]
    if not AUTOTUNE:
        gpu = gpu[:1]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, n, k, w, s in gpu
    ]


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): big square tiles for wide layers, narrow-N tiles for C_out <= 64,
# BLOCK_K=32 tiles for few input channels (the stem).
FORWARD_CONFIGS = _configs(
    [
        (128, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 32, 64, 4, 4),
        (128, 64, 32, 4, 4),
        (64, 64, 32, 4, 3),
    ],
    interpret=(64, 32, 16),
)
# dgrad: same GEMM shape as the forward (M = N*H*W, N_gemm = C_in, K = C_out*kH*kW).
DGRAD_CONFIGS = _configs(
    [
        (128, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 32, 64, 4, 4),
        (64, 64, 32, 4, 3),
    ],
    interpret=(64, 32, 32),
)
# wgrad: per tap, M = C_out, N_gemm = C_in, K = N*H_out*W_out (split across programs).
WGRAD_CONFIGS = _configs(
    [
        (64, 64, 64, 4, 4),
        (128, 64, 64, 8, 3),
        (64, 128, 64, 8, 3),
        (32, 64, 64, 4, 4),
        (64, 32, 64, 4, 4),
        (32, 32, 128, 4, 3),
    ],
    interpret=(32, 32, 64),
)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs a reduction grid should aim for: a few waves on a GPU, a handful in the interpreter."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return 4 * _sm_count(index)


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``: tf32 for float32 only when PyTorch allows it, else exact ("ieee")."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"  # the default; ignored for 16-bit operands


def _needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether some element offset of these tensors (views included: the largest stride reach) exceeds int32."""
    return any(
        t.numel() > 0 and sum((int(size) - 1) * abs(int(st)) for size, st in zip(t.shape, t.stride())) > INT32_MAX
        or t.numel() > INT32_MAX
        for t in tensors
    )


def _is_channels_last(t: torch.Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a (non-ambiguous) NHWC-dense 4-D tensor, else contiguous: the layout outputs follow."""
    return torch.channels_last if _is_channels_last(t) else torch.contiguous_format


def output_hw(h, w, kh, kw, stride, padding, dilation) -> tuple[int, int]:
    """Spatial output size of a convolution."""
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ho, wo


def _ints(values) -> list[int]:
    return [int(v) for v in values]


def _launch(kernel, wrap):
    return wrap(kernel) if wrap is not None else kernel


# Row tiles per group in the launch order of the GEMM kernels. A module-level constexpr rather than a defaulted kernel
# parameter: torch.compile (Inductor) compiles user kernels without applying a constexpr parameter's default
# (seen with triton 3.6 / torch 2.11 on an H100: "'NoneType' object has no attribute 'type'").
GROUP_M = tl.constexpr(8)


@triton.jit
def _grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Map a linear program id to (tile_m, tile_n), GROUP_M row tiles at a time, so neighbours share operands in L2."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % group_rows
    tile_n = (pid % per_group) // group_rows
    return tile_m, tile_n


# ---- forward ----------------------------------------------------------------------------------------------------


@triton.autotune(configs=FORWARD_CONFIGS, key=["M", "C_out", "C_in", "K_total", "sxc"])
@triton.jit
def _conv_bias_relu_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    C_in, H, W, C_out, H_out, W_out,
    sxn, sxc, sxh, sxw,
    swo, swc, swh, sww,
    syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    M, K_total,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, FLAT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    tile_m, tile_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(C_out, BLOCK_N), GROUP_M)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < C_out
    ow = offs_m % W_out
    oh = (offs_m // W_out) % H_out
    nb = offs_m // (W_out * H_out)
    if INT64:
        nb = nb.to(tl.int64)
        oh = oh.to(tl.int64)
        ow = ow.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_rows = x_ptr + nb * sxn  # [BLOCK_M] image base of each output pixel
    w_cols = w_ptr + offs_n * swo  # [BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        # K index k = (r * KW + s) * C_in + c, gathered per element: for tiny C_in (RGB) this wastes far less.
        for k0 in range(0, K_total, BLOCK_K):
            ks = k0 + offs_k
            k_ok = ks < K_total
            c = ks % C_in
            rs = ks // C_in
            r = rs // KW
            s = rs % KW
            ih = ih0[:, None] + (r * dil_h)[None, :]
            iw = iw0[:, None] + (s * dil_w)[None, :]
            a_ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_rows[:, None] + ih * sxh + iw * sxw + (c * sxc)[None, :], mask=a_ok, other=0.0)
            w_off = c * swc + r * swh + s * sww
            b = tl.load(w_cols[None, :] + w_off[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    else:
        c_blocks = tl.cdiv(C_in, BLOCK_K)
        for it in range(0, KH * KW * c_blocks):
            rs = it // c_blocks
            c = (it % c_blocks) * BLOCK_K + offs_k
            r = rs // KW
            s = rs % KW
            ih = ih0 + r * dil_h
            iw = iw0 + s * dil_w
            pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            c_ok = c < C_in
            a_ptrs = x_rows[:, None] + (ih * sxh + iw * sxw)[:, None] + (c * sxc)[None, :]
            a = tl.load(a_ptrs, mask=pix_ok[:, None] & c_ok[None, :], other=0.0)
            b_ptrs = w_cols[None, :] + (c * swc)[:, None] + (r * swh + s * sww)
            b = tl.load(b_ptrs, mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc = tl.maximum(acc, 0.0)
    y_ptrs = y_ptr + (nb * syn + oh * syh + ow * syw)[:, None] + (offs_n * syc)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def conv_bias_relu_forward(x, weight, bias, stride, padding, dilation, *, wrap=None) -> torch.Tensor:
    """``relu(conv2d(x, weight, bias, stride, padding, dilation))`` for ``groups == 1``, in x's memory format.

    Args:
        x: ``[N, C_in, H, W]`` float32/float16/bfloat16, any strides (NHWC fastest).
        weight: ``[C_out, C_in, kH, kW]``, x's dtype; copied to channels_last if it is not (small).
        bias: ``[C_out]`` or None.
        stride, padding, dilation: pairs of ints.
        wrap: applied to the kernel before launch (``torch.library.wrap_triton`` inside a ``triton_op``).

    Arguments are assumed valid (the op validates them). ``groups > 1`` is not handled here.
    """
    n, c_in, h, w = _ints(x.shape)
    c_out, _, kh, kw = _ints(weight.shape)
    stride, padding, dilation = _ints(stride), _ints(padding), _ints(dilation)
    ho, wo = output_hw(h, w, kh, kw, stride, padding, dilation)
    y = torch.empty((n, c_out, ho, wo), device=x.device, dtype=x.dtype, memory_format=memory_format(x))
    wt = weight.contiguous(memory_format=torch.channels_last)
    m = n * ho * wo
    k_total = c_in * kh * kw
    has_bias = bias is not None
    if y.numel() == 0:
        return y

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(c_out, meta["BLOCK_N"]),)

    _launch(_conv_bias_relu_fwd_kernel, wrap)[grid](
        x, wt, bias if has_bias else wt, y,
        c_in, h, w, c_out, ho, wo,
        *_ints(x.stride()), *_ints(wt.stride()), *_ints(y.stride()),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        m, k_total,
        KH=kh, KW=kw, HAS_BIAS=has_bias, FLAT_K=c_in <= FLAT_K_MAX_CIN,
        DOT_PRECISION=dot_precision(x.dtype), INT64=_needs_int64(x, y),
    )  # fmt: skip
    return y


# ---- backward epilogue: grad_z = grad_y * (y > 0), grad_bias = sum grad_z ------------------------------------------


@triton.jit
def _relu_bias_grad_rows_kernel(
    gy_ptr, y_ptr, gz_ptr, part_ptr,
    R, C, rows_per_prog,
    COMPUTE_BIAS: tl.constexpr, INT64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Channels-last ``[R = N*H*W, C]``: program (i, j) covers rows [i*rows_per_prog, ...) of column block j."""
    pid_r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    row_start = pid_r * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, R)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        if INT64:
            rows = rows.to(tl.int64)
        ok = (rows < row_end)[:, None] & c_ok[None, :]
        offs = rows[:, None] * C + cols[None, :]
        gy = tl.load(gy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        yv = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        gz = tl.where(yv > 0.0, gy, 0.0)
        tl.store(gz_ptr + offs, gz.to(gz_ptr.dtype.element_ty), mask=ok)
        acc += gz
    if COMPUTE_BIAS:
        tl.store(part_ptr + pid_r * C + cols, tl.sum(acc, axis=0), mask=c_ok)


@triton.jit
def _relu_bias_grad_planes_kernel(
    gy_ptr, y_ptr, gz_ptr, part_ptr,
    P, HW, hw_per_prog,
    COMPUTE_BIAS: tl.constexpr, INT64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr,
):  # fmt: skip
    """NCHW ``[P = N*C planes, HW]``: program (i, j) covers planes block i, pixels [j*hw_per_prog, ...)."""
    planes = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = planes < P
    pid_s = tl.program_id(1)
    hw_start = pid_s * hw_per_prog
    hw_end = tl.minimum(hw_start + hw_per_prog, HW)
    if INT64:
        planes = planes.to(tl.int64)
    acc = tl.zeros((BLOCK_P, BLOCK_HW), dtype=tl.float32)
    for h0 in range(hw_start, hw_end, BLOCK_HW):
        hws = h0 + tl.arange(0, BLOCK_HW)
        ok = p_ok[:, None] & (hws < hw_end)[None, :]
        offs = planes[:, None] * HW + hws[None, :]
        gy = tl.load(gy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        yv = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        gz = tl.where(yv > 0.0, gy, 0.0)
        tl.store(gz_ptr + offs, gz.to(gz_ptr.dtype.element_ty), mask=ok)
        acc += gz
    if COMPUTE_BIAS:
        tl.store(part_ptr + pid_s * P + planes, tl.sum(acc, axis=1), mask=p_ok)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, rows, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[c] = sum over rows of part[row, c] (fp32 in a fixed order), cast to out's dtype: one launch."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        ok = (r < rows)[:, None] & c_ok[None, :]
        acc += tl.load(part_ptr + r[:, None] * C + cols[None, :], mask=ok, other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=c_ok)


def _sum_partials(part, c, dtype, wrap):
    """Column sums of the fp32 partials ``part`` viewed as ``[rows, c]``, as a ``[c]`` tensor of ``dtype``."""
    rows = part.numel() // c
    out = torch.empty(c, device=part.device, dtype=dtype)
    block_c = min(triton.next_power_of_2(c), 128)
    _launch(_sum_partials_kernel, wrap)[(triton.cdiv(c, block_c),)](
        part, out, rows, c, BLOCK_R=32, BLOCK_C=block_c, num_warps=4
    )
    return out


def _split(total: int, parts: int, align: int) -> int:
    """Chunk length (a multiple of ``align``) that splits ``total`` into at most ``parts`` chunks."""
    chunk = triton.cdiv(total, max(1, parts))
    return max(align, triton.cdiv(chunk, align) * align)


def relu_bias_grad(grad_y, y, compute_bias_grad: bool = True, *, wrap=None):
    """``(grad_z, grad_bias)`` with ``grad_z = grad_y * (y > 0)`` and ``grad_bias[c] = sum_{n,h,w} grad_z``.

    One pass over ``grad_y`` and ``y`` (fp32 accumulation). ``y`` is NCHW- or NHWC-contiguous (else made so);
    ``grad_y`` is brought to y's strides. ``grad_z`` has y's strides; ``grad_bias`` is y's dtype, or an empty
    tensor when ``compute_bias_grad`` is false. Deterministic: partial sums per program, then a fixed-order sum.
    """
    fmt = memory_format(y)
    y = y.contiguous(memory_format=fmt)
    if grad_y.stride() != y.stride():
        grad_y = grad_y.contiguous(memory_format=fmt)
    n, c, h, w = _ints(y.shape)
    grad_z = torch.empty_like(y)
    int64 = _needs_int64(y)
    programs = target_programs(y.device)
    if y.numel() == 0:
        grad_b = y.new_zeros(c if compute_bias_grad else 0)
        return grad_z, grad_b
    if fmt == torch.channels_last:
        rows = n * h * w
        block_c = min(triton.next_power_of_2(c), 64)
        block_r = 64 if INTERPRET else max(16, 4096 // block_c)
        col_blocks = triton.cdiv(c, block_c)
        rows_per_prog = _split(rows, max(1, programs // col_blocks), block_r)
        row_blocks = triton.cdiv(rows, rows_per_prog)
        part = torch.empty((row_blocks, c), device=y.device, dtype=torch.float32)
        _launch(_relu_bias_grad_rows_kernel, wrap)[(row_blocks, col_blocks)](
            grad_y, y, grad_z, part, rows, c, rows_per_prog,
            COMPUTE_BIAS=compute_bias_grad, INT64=int64, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
        )  # fmt: skip
        grad_b = _sum_partials(part, c, y.dtype, wrap) if compute_bias_grad else None
    else:
        planes, hw = n * c, h * w
        block_hw = min(triton.next_power_of_2(hw), 1024)
        block_p = max(1, 4096 // block_hw)
        plane_blocks = triton.cdiv(planes, block_p)
        hw_per_prog = _split(hw, max(1, programs // plane_blocks), block_hw)
        splits = triton.cdiv(hw, hw_per_prog)
        part = torch.empty((splits, planes), device=y.device, dtype=torch.float32)
        _launch(_relu_bias_grad_planes_kernel, wrap)[(plane_blocks, splits)](
            grad_y, y, grad_z, part, planes, hw, hw_per_prog,
            COMPUTE_BIAS=compute_bias_grad, INT64=int64, BLOCK_P=block_p, BLOCK_HW=block_hw, num_warps=4,
        )  # fmt: skip
        grad_b = _sum_partials(part, c, y.dtype, wrap) if compute_bias_grad else None  # part is [splits, n, c]
    return grad_z, (grad_b if compute_bias_grad else y.new_empty(0))


# ---- input gradient (dgrad) ----------------------------------------------------------------------------------------


@triton.autotune(configs=DGRAD_CONFIGS, key=["M", "C_in", "C_out", "K_total", "sgc"])
@triton.jit
def _conv_dgrad_kernel(
    gz_ptr, w_ptr, gx_ptr,
    C_in, H, W, C_out, H_out, W_out,
    sgn, sgc, sgh, sgw,
    swo, swc, swh, sww,
    sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    M, K_total,
    KH: tl.constexpr, KW: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """grad_x[n, ci, ih, iw] = sum over (kh, kw, co) of grad_z[n, co, oh, ow] * w[co, ci, kh, kw], where
    ih = oh*stride - pad + kh*dil (taps whose oh is fractional or out of range contribute nothing)."""
    tile_m, tile_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(C_in, BLOCK_N), GROUP_M)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < C_in
    iw = offs_m % W
    ih = (offs_m // W) % H
    nb = offs_m // (W * H)
    if INT64:
        nb = nb.to(tl.int64)
        ih = ih.to(tl.int64)
        iw = iw.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    g_rows = gz_ptr + nb * sgn
    w_cols = w_ptr + offs_n * swc

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    co_blocks = tl.cdiv(C_out, BLOCK_K)
    for it in range(0, KH * KW * co_blocks):
        rs = it // co_blocks
        co = (it % co_blocks) * BLOCK_K + offs_k
        r = rs // KW
        s = rs % KW
        th = ih + pad_h - r * dil_h
        tw = iw + pad_w - s * dil_w
        oh = th // stride_h
        ow = tw // stride_w
        pix_ok = m_ok & (th >= 0) & (tw >= 0) & (oh * stride_h == th) & (ow * stride_w == tw)
        pix_ok = pix_ok & (oh < H_out) & (ow < W_out)
        co_ok = co < C_out
        a_ptrs = g_rows[:, None] + (oh * sgh + ow * sgw)[:, None] + (co * sgc)[None, :]
        a = tl.load(a_ptrs, mask=pix_ok[:, None] & co_ok[None, :], other=0.0)
        b_ptrs = w_cols[None, :] + (co * swo)[:, None] + (r * swh + s * sww)
        b = tl.load(b_ptrs, mask=co_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    gx_ptrs = gx_ptr + (nb * sxn + ih * sxh + iw * sxw)[:, None] + (offs_n * sxc)[None, :]
    tl.store(gx_ptrs, acc.to(gx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def conv_input_grad(grad_z, x, weight, stride, padding, dilation, *, wrap=None) -> torch.Tensor:
    """Gradient of ``conv2d(x, weight)`` (groups 1) with respect to ``x``, given ``grad_z``; in x's memory format.

    Only ``x``'s shape, dtype, device and layout are used. Implicit GEMM over (kh, kw, C_out block); with stride
    > 1 the taps that do not land on an output pixel are masked (a 1/(sH*sW) efficiency loss).
    """
    n, c_in, h, w = _ints(x.shape)
    c_out, _, kh, kw = _ints(weight.shape)
    _, _, ho, wo = _ints(grad_z.shape)
    stride, padding, dilation = _ints(stride), _ints(padding), _ints(dilation)
    grad_x = torch.empty_like(x, memory_format=memory_format(x))
    wt = weight.contiguous(memory_format=torch.channels_last)
    m = n * h * w
    if grad_x.numel() == 0 or grad_z.numel() == 0:
        return grad_x.zero_()

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(c_in, meta["BLOCK_N"]),)

    _launch(_conv_dgrad_kernel, wrap)[grid](
        grad_z, wt, grad_x,
        c_in, h, w, c_out, ho, wo,
        *_ints(grad_z.stride()), *_ints(wt.stride()), *_ints(grad_x.stride()),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        m, c_out * kh * kw,
        KH=kh, KW=kw, DOT_PRECISION=dot_precision(x.dtype), INT64=_needs_int64(grad_z, grad_x),
    )  # fmt: skip
    return grad_x


# ---- weight gradient (wgrad) ---------------------------------------------------------------------------------------


@triton.autotune(configs=WGRAD_CONFIGS, key=["C_out", "C_in", "P", "pix_per_split", "KHW", "sgc"])
@triton.jit
def _conv_wgrad_kernel(
    gz_ptr, x_ptr, part_ptr,
    C_in, H, W, C_out, H_out, W_out,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    P, pix_per_split, KHW,
    KW: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """part[split, co, kh, kw, ci] = sum over the split's output pixels p of grad_z[p, co] * x[p shifted by tap, ci].

    Grid: (co tiles * ci tiles, kH*kW taps, splits of the N*H_out*W_out pixels).
    """
    num_n = tl.cdiv(C_in, BLOCK_N)
    tile_m = tl.program_id(0) // num_n
    tile_n = tl.program_id(0) % num_n
    tap = tl.program_id(1)
    split = tl.program_id(2)
    r = tap // KW
    s = tap % KW
    co = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ci = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < C_out
    ci_ok = ci < C_in
    if INT64:
        co = co.to(tl.int64)
        ci = ci.to(tl.int64)
    p_start = split * pix_per_split
    p_end = tl.minimum(p_start + pix_per_split, P)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(p_start, p_end, BLOCK_K):
        p = p0 + tl.arange(0, BLOCK_K)
        p_ok = p < p_end
        ow = p % W_out
        oh = (p // W_out) % H_out
        nb = p // (W_out * H_out)
        if INT64:
            nb = nb.to(tl.int64)
            oh = oh.to(tl.int64)
            ow = ow.to(tl.int64)
        ih = oh * stride_h - pad_h + r * dil_h
        iw = ow * stride_w - pad_w + s * dil_w
        x_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a_ptrs = gz_ptr + (co * sgc)[:, None] + (nb * sgn + oh * sgh + ow * sgw)[None, :]
        a = tl.load(a_ptrs, mask=co_ok[:, None] & p_ok[None, :], other=0.0)
        b_ptrs = x_ptr + (nb * sxn + ih * sxh + iw * sxw)[:, None] + (ci * sxc)[None, :]
        b = tl.load(b_ptrs, mask=x_ok[:, None] & ci_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    # partials laid out [split, C_out, KH*KW, C_in]
    out = part_ptr + ((split * C_out + co) * KHW + tap)[:, None] * C_in + ci[None, :]
    tl.store(out, acc, mask=co_ok[:, None] & ci_ok[None, :])


def conv_weight_grad(grad_z, x, weight, stride, padding, dilation, *, wrap=None) -> torch.Tensor:
    """Gradient of ``conv2d(x, weight)`` (groups 1) with respect to ``weight``, in weight's memory format.

    Split-K implicit GEMM: the N*H_out*W_out pixels are cut into splits so the grid fills the GPU; each program
    writes an fp32 partial and the partials are summed in a fixed order (deterministic).
    """
    n, c_in, h, w = _ints(x.shape)
    c_out, _, kh, kw = _ints(weight.shape)
    _, _, ho, wo = _ints(grad_z.shape)
    stride, padding, dilation = _ints(stride), _ints(padding), _ints(dilation)
    pixels = n * ho * wo
    if pixels == 0 or weight.numel() == 0:
        return torch.zeros_like(weight, memory_format=memory_format(weight))
    tiles = triton.cdiv(c_out, 64) * triton.cdiv(c_in, 64) * kh * kw  # nominal 64x64 tiles
    pix_per_split = _split(pixels, max(1, target_programs(x.device) // tiles), 256)
    splits = triton.cdiv(pixels, pix_per_split)
    part = torch.empty((splits, c_out, kh * kw, c_in), device=x.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(c_out, meta["BLOCK_M"]) * triton.cdiv(c_in, meta["BLOCK_N"]), kh * kw, splits)

    _launch(_conv_wgrad_kernel, wrap)[grid](
        grad_z, x, part,
        c_in, h, w, c_out, ho, wo,
        *_ints(grad_z.stride()), *_ints(x.stride()),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        pixels, pix_per_split, kh * kw,
        KW=kw, DOT_PRECISION=dot_precision(x.dtype), INT64=_needs_int64(grad_z, x),
    )  # fmt: skip
    grad_w = part.sum(0).view(c_out, kh, kw, c_in).permute(0, 3, 1, 2).to(weight.dtype)
    return grad_w.contiguous(memory_format=memory_format(weight))


# ---- the whole backward --------------------------------------------------------------------------------------------

BACKWARD_IMPLS = ("triton", "aten")


def conv_backward(grad_y, y, x, weight, stride, padding, dilation, output_mask, impl="triton", *, wrap=None):
    """Gradients ``(grad_x, grad_weight, grad_bias)`` of ``y = relu(conv2d(x, weight, bias))``, groups 1.

    The fused epilogue :func:`relu_bias_grad` always runs first (one read of ``grad_y`` and ``y``). Then the input
    and weight gradients come from the Triton implicit GEMMs (``impl="triton"``) or from ATen's
    ``convolution_backward`` on ``grad_z`` (``impl="aten"``: cuDNN on a GPU). Which is faster is measured by the
    benchmarks, not assumed. Entries of ``output_mask`` that are false give empty tensors.
    """
    if impl not in BACKWARD_IMPLS:
        raise ValueError(f"impl must be one of {BACKWARD_IMPLS}, got {impl!r}")
    need_x, need_w, need_b = (bool(v) for v in output_mask)
    grad_z, grad_b = relu_bias_grad(grad_y, y, need_b, wrap=wrap)
    grad_x = x.new_empty(0)
    grad_w = weight.new_empty(0)
    if impl == "aten":
        if need_x or need_w:
            gx, gw, _ = torch.ops.aten.convolution_backward(
                grad_z, x, weight, None, list(stride), list(padding), list(dilation), False, [0, 0], 1,
                [need_x, need_w, False],
            )  # fmt: skip
            # same layouts as the Triton path (and the fake implementation)
            grad_x = gx.contiguous(memory_format=memory_format(x)) if need_x else grad_x
            grad_w = gw.contiguous(memory_format=memory_format(weight)) if need_w else grad_w
    else:
        if need_x:
            grad_x = conv_input_grad(grad_z, x, weight, stride, padding, dilation, wrap=wrap)
        if need_w:
            grad_w = conv_weight_grad(grad_z, x, weight, stride, padding, dilation, wrap=wrap)
    return grad_x, grad_w, grad_b
