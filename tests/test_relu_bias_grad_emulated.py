"""The CUDA kernels of relu_bias_grad (csrc/cuda/relu_bias_grad.cu) on the CPU, under tests/cuda_emulation.py.

grad_z = grad_y * (y > 0) and grad_bias = the sum of grad_z over N, H, W, against float64, for NHWC and NCHW, every
dtype, the 16-byte vector and the element paths, several partial-row counts (the SM count chooses them), with and
without the bias gradient; outputs and the partials workspace poisoned first. The same kernels on a GPU:
tests/test_conv_bias_relu_cuda.py (run by benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from fastmtl.testing import rel_err

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cuda_emulation  # noqa: E402  (beside this file)

_SHIM = r"""
#include "conv_bias_relu.h"
using namespace fastmtl::cuda;
extern "C" {
int64_t emu_partial_rows(int dtype, int channels_last, int64_t N, int64_t C, int64_t HW, int sms) {
  return relu_bias_grad_partial_rows(dtype, channels_last != 0, N, C, HW, sms);
}
int emu_relu_bias_grad(int dtype, int channels_last, const void* grad_y, const void* y, void* grad_z, void* grad_bias,
                       void* partials, int64_t N, int64_t C, int64_t HW, int sms) {
  return relu_bias_grad(dtype, channels_last != 0, grad_y, y, grad_z, grad_bias, partials, N, C, HW, sms, nullptr);
}
}
"""

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
# The bias sums accumulate in float32 (float64 for float64) and are rounded once to the dtype.
BIAS_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The launchers of relu_bias_grad.cu built for the CPU emulation, loaded with ctypes."""
    import ctypes

    lib = cuda_emulation.build(tmp_path_factory.mktemp("relu_bias_grad_emulation"), {"relu_bias_grad.cu": 3},
                               ["conv_bias_relu.h", "numeric.cuh"], _SHIM)  # fmt: skip
    lib.emu_partial_rows.restype = ctypes.c_int64
    return lib


def _run(lib, grad_y, y, channels_last, compute_bias_grad, sms):
    """The launcher on poisoned outputs: (grad_z, grad_bias or None, launches)."""
    import ctypes

    N, C = y.shape[:2]
    HW = y[0, 0].numel()
    code = DTYPE_CODE[y.dtype]
    grad_z = torch.full_like(y, float("nan"))
    grad_bias = partials = None
    if compute_bias_grad:
        rows = lib.emu_partial_rows(code, int(channels_last), N, C, HW, sms)
        assert rows >= 1
        acc = torch.float64 if y.dtype == torch.float64 else torch.float32
        partials = torch.full((rows, C), float("nan"), dtype=acc)
        grad_bias = torch.full((C,), float("nan"), dtype=y.dtype)
    lib.emu_take_launches()
    ptr = cuda_emulation.ptr
    err = lib.emu_relu_bias_grad(code, int(channels_last), ptr(grad_y), ptr(y), ptr(grad_z), ptr(grad_bias),
                                 ptr(partials), ctypes.c_int64(N), ctypes.c_int64(C), ctypes.c_int64(HW), sms)  # fmt: skip
    assert err == 0
    return grad_z, grad_bias, lib.emu_take_launches()


def _inputs(shape, dtype, channels_last, offset=0):
    """grad_y and y in the layout, y with a good share of zeros and negatives; ``offset`` elements into a larger
    buffer (1: no 16-byte alignment, the element path)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    n = torch.Size(shape).numel()

    def make(values):
        buf = torch.empty(n + offset, dtype=dtype)
        out = buf[offset:].view(shape) if not channels_last else buf[offset:].view(
            shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)  # fmt: skip
        out.copy_(values)
        assert out.is_contiguous(memory_format=fmt)
        return out

    y = torch.relu(torch.randn(shape, dtype=torch.float64)).to(dtype)
    y[..., ::3] = -1.0  # negative outputs cannot come from a ReLU, but the kernel must still mask them
    return make(torch.randn(shape, dtype=torch.float64).to(dtype)), make(y)


def _check(grad_y, y, grad_z, grad_bias):
    expect = torch.where(y.double() > 0, grad_y.double(), torch.zeros((), dtype=torch.float64))
    assert torch.equal(grad_z.double(), expect), "grad_z is grad_y where y > 0, else 0, exactly"
    if grad_bias is not None:
        assert rel_err(grad_bias, expect.sum(dim=(0, 2, 3))) <= BIAS_TOL[y.dtype]


@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=str)
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("shape", [(2, 16, 6, 8), (3, 5, 7, 3), (1, 40, 12, 12)], ids=str)
@pytest.mark.parametrize("sms", [1, 132])
def test_relu_bias_grad_matches_float64(emu, dtype, channels_last, shape, sms):
    grad_y, y = _inputs(shape, dtype, channels_last)
    grad_z, grad_bias, launches = _run(emu, grad_y, y, channels_last, True, sms)
    _check(grad_y, y, grad_z, grad_bias)
    assert launches == 2  # the epilogue and the fixed-order sum of its partials


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    "shape,channels_last",
    [((2, 300, 5, 7), True), ((2, 520, 3, 3), True), ((4, 3, 40, 40), False), ((6, 2, 30, 30), False)],
    ids=["nhwc-2-blocks-of-channels", "nhwc-3-blocks-of-channels", "nchw-images-split", "nchw-wide-planes"],
)
def test_relu_bias_grad_wide_grids(emu, shape, channels_last, dtype):
    """Grids that the small cases leave at one block: several blocks across the NHWC channels, NCHW image ranges split
    over partial rows, and NCHW planes wider than a block (the walk over (image, vector) carries into the image)."""
    grad_y, y = _inputs(shape, dtype, channels_last)
    grad_z, grad_bias, _ = _run(emu, grad_y, y, channels_last, True, 132)
    _check(grad_y, y, grad_z, grad_bias)


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_relu_bias_grad_misaligned_takes_the_element_path(emu, channels_last):
    grad_y, y = _inputs((2, 16, 4, 8), torch.bfloat16, channels_last, offset=1)
    assert grad_y.data_ptr() % 16 != 0
    grad_z, grad_bias, _ = _run(emu, grad_y, y, channels_last, True, 132)
    _check(grad_y, y, grad_z, grad_bias)


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_relu_bias_grad_without_bias_is_one_launch(emu, channels_last):
    grad_y, y = _inputs((2, 16, 5, 5), torch.float16, channels_last)
    grad_z, grad_bias, launches = _run(emu, grad_y, y, channels_last, False, 132)
    _check(grad_y, y, grad_z, None)
    assert grad_bias is None and launches == 1


def test_relu_bias_grad_many_partial_rows_is_deterministic(emu):
    """Many rows per channel (hundreds of partial rows): the sum is right and bitwise the same whatever order the
    blocks run in (the emulation's block order: by index, then random)."""
    grad_y, y = _inputs((8, 8, 64, 64), torch.float32, True)
    sums = []
    for seed in (0, 1, 2):
        emu.emu_set_block_order(seed)
        try:
            grad_z, grad_bias, _ = _run(emu, grad_y, y, True, True, 132)
        finally:
            emu.emu_set_block_order(0)
        _check(grad_y, y, grad_z, grad_bias)
        sums.append(grad_bias)
    assert emu.emu_partial_rows(0, 1, 8, 8, 64 * 64, 132) >= 256
    assert torch.equal(sums[0], sums[1]) and torch.equal(sums[0], sums[2])
