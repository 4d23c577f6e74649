"""conv_bias_relu on CUDA tensors (the cuda backend: csrc/cuda/conv_bias_relu*.{cu,cpp}).

Every algorithm against a float64 reference over a grid of shapes, dtypes and layouts; the backward against
float64 gradients; gradcheck in float64 (library path); opcheck on the three ops; CUDA graph capture of forward
and backward; torch.compile(fullgraph=True); the fused backward epilogue alone, including sizes and offsets
that rule out 16-byte vector accesses. All tests need a GPU (they skip elsewhere, saying so).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastmtl
from fastmtl.ops import conv_bias_relu as op
from fastmtl.testing import TOLERANCES, rel_err

pytestmark = pytest.mark.cuda

DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ALGOS = ["default", "library", "implicit_gemm"]

GRID = [
    # n, c_in, c_out, hw, kernel, stride, padding, dilation
    (2, 16, 32, (9, 11), (3, 3), (1, 1), (1, 1), (1, 1)),  # 16-byte loads (C_in % 8 == 0)
    (1, 3, 8, (13, 7), (3, 3), (2, 2), (1, 1), (1, 1)),  # stem-like, C_in = 3: element loads, batch 1
    (3, 8, 24, (10, 9), (3, 3), (1, 1), (2, 2), (2, 2)),  # dilation
    (2, 5, 7, (8, 8), (1, 1), (1, 1), (0, 0), (1, 1)),  # odd channel counts, C_out % 8 != 0
    (1, 24, 130, (6, 7), (5, 3), (2, 1), (2, 1), (1, 2)),  # several output-channel tiles, mixed args
    (5, 32, 64, (17, 19), (3, 3), (1, 1), (1, 1), (1, 1)),  # several output-pixel tiles
    (2, 72, 16, (5, 5), (3, 3), (1, 1), (0, 0), (1, 1)),  # long reduction (648), no padding
]


def poison_allocator(nbytes: int = 1 << 24) -> None:
    """Fill a block of the caching allocator with NaN and free it, so an output that is not fully written shows."""
    block = torch.full((nbytes // 4,), float("nan"), device=DEV)
    del block


def make_case(n, c_in, c_out, hw, k, dtype, channels_last, bias=True, groups=1):
    """Fresh random inputs in ``dtype`` on the GPU; the bias is shifted so the ReLU cuts a good share.

    ``channels_last``: x in channels_last; ``"model"``: the weight too, as ``model.to(memory_format=channels_last)``
    leaves a convolution's parameters."""
    x = torch.randn(n, c_in, *hw, device=DEV).to(dtype)
    w = (torch.randn(c_out, c_in // groups, *k, device=DEV) / (c_in // groups * k[0] * k[1]) ** 0.5).to(dtype)
    b = (torch.randn(c_out, device=DEV) * 0.5).to(dtype) if bias else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if channels_last == "model":
        w = w.contiguous(memory_format=torch.channels_last)
    return x, w, b


def reference(x, w, b, stride, padding, dilation, groups=1):
    """relu(conv2d) in float64 on the op's own (rounded) inputs: only the op's error is measured."""
    b64 = None if b is None else b.double()
    return torch.relu(F.conv2d(x.double(), w.double(), b64, stride, padding, dilation, groups))


def implicit_gemm_applies(x, groups=1):
    return x.dtype in (torch.float16, torch.bfloat16) and groups == 1 and not x.is_contiguous()


def call(x, w, b, stride, padding, dilation, groups, algo):
    return torch.ops.fastmtl.conv_bias_relu(x, w, b, list(stride), list(padding), list(dilation), groups, algo)


# ---- forward parity -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", GRID)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True, "model"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("algo", ALGOS)
def test_forward_parity(case, dtype, channels_last, bias, algo):
    n, c_in, c_out, hw, k, stride, padding, dilation = case
    x, w, b = make_case(n, c_in, c_out, hw, k, dtype, channels_last, bias)
    if algo == "implicit_gemm" and not implicit_gemm_applies(x):
        with pytest.raises(RuntimeError, match="implicit_gemm"):
            call(x, w, b, stride, padding, dilation, 1, algo)
        return
    poison_allocator()
    y = call(x, w, b, stride, padding, dilation, 1, algo)
    ref = reference(x, w, b, stride, padding, dilation)
    assert y.shape == ref.shape and y.dtype == dtype and y.device.type == "cuda"
    assert torch.isfinite(y).all(), "output not fully written (NaN from the poisoned allocator)"
    assert (y >= 0).all()
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    else:
        assert y.is_contiguous()
    assert rel_err(y, ref) <= TOLERANCES["conv"][dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_default_is_library(dtype):
    """cuDNN's fused kernel measured 3x faster than implicit_gemm on an H100: it is the default."""
    x, w, b = make_case(2, 16, 32, (9, 9), (3, 3), dtype, channels_last=True)
    args = ((1, 1), (1, 1), (1, 1), 1)
    assert torch.equal(call(x, w, b, *args, "default"), call(x, w, b, *args, "library"))


@pytest.mark.parametrize("algo", ["default", "library"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_groups_go_to_library(algo, dtype):
    x, w, b = make_case(2, 8, 12, (7, 9), (3, 3), dtype, channels_last=True, groups=4)
    y = call(x, w, b, (1, 1), (1, 1), (1, 1), 4, algo)
    assert rel_err(y, reference(x, w, b, (1, 1), (1, 1), (1, 1), 4)) <= TOLERANCES["conv"][dtype]
    why = "groups" if dtype != torch.float32 else "float16 or bfloat16"
    with pytest.raises(RuntimeError, match=why):
        call(x, w, b, (1, 1), (1, 1), (1, 1), 4, "implicit_gemm")


def test_misaligned_input_uses_element_loads():
    """A view that starts 2 bytes into its storage cannot use 16-byte loads; the result must not change."""
    base = torch.randn(1 + 2 * 10 * 10 * 16, device=DEV).half()
    x = base[1:].view(2, 10, 10, 16).permute(0, 3, 1, 2)  # channels_last strides, odd storage offset
    assert x.is_contiguous(memory_format=torch.channels_last) and x.data_ptr() % 16 != 0
    w = (torch.randn(8, 16, 3, 3, device=DEV) / 12).half()
    b = torch.randn(8, device=DEV).half()
    y = call(x, w, b, (1, 1), (1, 1), (1, 1), 1, "implicit_gemm")
    assert rel_err(y, reference(x, w, b, (1, 1), (1, 1), (1, 1))) <= TOLERANCES["conv"][torch.float16]


def test_empty_batch():
    x, w, b = make_case(1, 8, 8, (5, 5), (3, 3), torch.float16, channels_last=True)
    x = x[:0]
    for algo in ALGOS:
        y = call(x, w, b, (1, 1), (1, 1), (1, 1), 1, algo)
        assert y.shape == (0, 8, 5, 5)


def test_bad_algo_is_rejected():
    x, w, b = make_case(1, 8, 8, (5, 5), (3, 3), torch.float32, channels_last=False)
    with pytest.raises(RuntimeError, match="algo"):
        call(x, w, b, (1, 1), (1, 1), (1, 1), 1, "fastest")


# ---- backward parity ----------------------------------------------------------------------------------------


def reference_grads(x, w, b, y, grad_y, stride, padding, dilation, groups=1):
    """float64 gradients with the ReLU mask of the op's own output (so a rounding at z = 0 cannot differ)."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    z = F.conv2d(x64, w64, b64, stride, padding, dilation, groups)
    mask = (y.detach() > 0).double()
    inputs = [t for t in (x64, w64, b64) if t is not None]
    return torch.autograd.grad(z * mask, inputs, grad_y.double())


@pytest.mark.parametrize("case", GRID[:5])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True, "model"])
@pytest.mark.parametrize("bias", [True, False])
def test_backward_parity(case, dtype, channels_last, bias):
    n, c_in, c_out, hw, k, stride, padding, dilation = case
    x, w, b = make_case(n, c_in, c_out, hw, k, dtype, channels_last, bias)
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    with fastmtl.use_backend("cuda"):
        y = fastmtl.conv_bias_relu(x, w, b, stride, padding, dilation)
    grad_y = torch.randn_like(y)
    poison_allocator()
    grads = torch.autograd.grad(y, leaves, grad_y)
    refs = reference_grads(x, w, b, y, grad_y, stride, padding, dilation)
    tol = TOLERANCES["conv"][dtype]
    for name, g, r, leaf in zip("xwb", grads, refs, leaves):
        assert g.shape == leaf.shape and g.dtype == dtype, name
        assert rel_err(g, r) <= tol, name
    if channels_last:
        assert grads[0].is_contiguous(memory_format=torch.channels_last)
    # the weight's layout, as the fake implementation states (compared as a memory format: for a 1x1 kernel
    # the strides of its size-1 dimensions may differ and mean nothing)
    w_format = torch.channels_last if channels_last == "model" else torch.contiguous_format
    assert grads[1].is_contiguous(memory_format=w_format)


def test_backward_output_mask():
    x, w, b = make_case(2, 8, 8, (6, 6), (3, 3), torch.float16, channels_last=True)
    y = call(x, w, b, (1, 1), (1, 1), (1, 1), 1, "default")
    grad_y = torch.randn_like(y)
    args = ([1, 1], [1, 1], [1, 1], 1)
    gx, gw, gb = torch.ops.fastmtl.conv_bias_relu_backward(grad_y, y, x, w, *args, [False, True, False], "default")
    assert gx.numel() == 0 and gb.numel() == 0 and gw.shape == w.shape
    gx, gw, gb = torch.ops.fastmtl.conv_bias_relu_backward(grad_y, y, x, w, *args, [True, False, True], "default")
    assert gx.shape == x.shape and gw.numel() == 0 and gb.shape == (8,)


def test_gradcheck_float64_library():
    x = torch.randn(2, 3, 6, 5, device=DEV, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=DEV, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, device=DEV, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return call(x, w, b, (2, 1), (1, 1), (1, 1), 1, "library")

    assert torch.autograd.gradcheck(fn, (x, w, b))
    xl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(fn, (xl, w, b))


# ---- registration: opcheck, CUDA graphs, torch.compile ------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,channels_last,algo",
    [
        (torch.float16, True, "implicit_gemm"),
        (torch.bfloat16, True, "default"),
        (torch.bfloat16, "model", "default"),
        (torch.float16, "model", "implicit_gemm"),
        (torch.float32, False, "library"),
    ],
)
def test_opcheck(dtype, channels_last, algo):
    x, w, b = make_case(2, 8, 16, (7, 6), (3, 3), dtype, channels_last)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    args = ([1, 1], [1, 1], [1, 1], 1)
    torch.library.opcheck(torch.ops.fastmtl.conv_bias_relu.default, (x, w, b, *args, algo))
    with torch.no_grad():
        y = call(x, w, b, *args, algo)
    grad_y = torch.randn_like(y)
    torch.library.opcheck(
        torch.ops.fastmtl.conv_bias_relu_backward.default,
        (grad_y, y, x.detach(), w.detach(), *args, [True, True, True], algo),
    )
    torch.library.opcheck(torch.ops.fastmtl.relu_bias_grad.default, (grad_y, y, True))
    torch.library.opcheck(torch.ops.fastmtl.relu_bias_grad.default, (grad_y, y, False))


@pytest.mark.parametrize("dtype,channels_last", [(torch.float16, True), (torch.float32, False)])
def test_cuda_graph_forward_backward(dtype, channels_last):
    x, w, b = make_case(4, 16, 16, (12, 12), (3, 3), dtype, channels_last)
    w.requires_grad_(), b.requires_grad_()
    x.requires_grad_()
    grad_y = torch.randn(4, 16, 12, 12, device=DEV, dtype=dtype)

    def step():
        with fastmtl.use_backend("cuda"):
            y = fastmtl.conv_bias_relu(x, w, b, padding=1)
        y.backward(grad_y)
        return y

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            x.grad = w.grad = b.grad = None
            step()
    torch.cuda.current_stream().wait_stream(stream)
    eager = [t.grad.clone() for t in (x, w, b)]
    x.grad = w.grad = b.grad = None

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    graph.replay()
    torch.cuda.synchronize()
    with fastmtl.use_backend("cuda"), torch.no_grad():
        y_eager = fastmtl.conv_bias_relu(x, w, b, padding=1)
    assert rel_err(y, y_eager.double()) <= TOLERANCES["conv"][dtype]
    for got, want in zip((x.grad, w.grad, b.grad), eager):
        assert rel_err(got, want.double()) <= TOLERANCES["conv"][dtype]
    # New input values flow through the captured graph.
    with torch.no_grad():
        x.mul_(-1.0)
    graph.replay()
    torch.cuda.synchronize()
    with fastmtl.use_backend("cuda"), torch.no_grad():
        y_new = fastmtl.conv_bias_relu(x, w, b, padding=1)
    assert rel_err(y, y_new.double()) <= TOLERANCES["conv"][dtype]


@pytest.mark.parametrize("dtype,channels_last", [(torch.bfloat16, True), (torch.float32, False)])
def test_compile_fullgraph(dtype, channels_last):
    torch._dynamo.reset()
    x, w, b = make_case(2, 16, 8, (9, 9), (3, 3), dtype, channels_last)
    w.requires_grad_(), b.requires_grad_()

    def fn(x, w, b):
        return fastmtl.conv_bias_relu(x, w, b, stride=1, padding=1) * 2.0

    with fastmtl.use_backend("cuda"):
        compiled = torch.compile(fn, fullgraph=True)
        y = compiled(x, w, b)
        y_eager = fn(x, w, b)
    assert rel_err(y, y_eager.double()) <= TOLERANCES["conv"][dtype]
    (gw, gb) = torch.autograd.grad(y.float().sum(), (w, b))
    (gw_e, gb_e) = torch.autograd.grad(y_eager.float().sum(), (w, b))
    assert rel_err(gw, gw_e.double()) <= TOLERANCES["conv"][dtype]
    assert rel_err(gb, gb_e.double()) <= TOLERANCES["conv"][dtype]
    torch._dynamo.reset()


def test_compile_fullgraph_auto_uses_cached_choice():
    from fastmtl import autotune

    torch._dynamo.reset()
    autotune.clear()
    x, w, b = make_case(2, 16, 16, (8, 8), (3, 3), torch.float16, channels_last=True)
    with fastmtl.use_backend("auto"):
        eager = fastmtl.conv_bias_relu(x, w, b, padding=1)  # measures and caches
        assert len(autotune.cached_choices()) == 1
        compiled = torch.compile(lambda x, w, b: fastmtl.conv_bias_relu(x, w, b, padding=1), fullgraph=True)
        y = compiled(x, w, b)
    assert rel_err(y, eager.double()) <= TOLERANCES["conv"][torch.float16]
    autotune.clear()
    torch._dynamo.reset()


# ---- the fused backward epilogue alone ----------------------------------------------------------------------

EPILOGUE_SHAPES = [
    (2, 64, 9, 11),  # NCHW: HW odd (element path); NHWC: 16-byte path
    (3, 7, 5, 5),  # C and HW odd: element accesses in both layouts
    (1, 1, 3, 1),  # tiny
    (8, 128, 28, 28),  # many blocks and several partial rows per channel
    (33, 40, 4, 8),  # NCHW 16-byte path, many images
]


# float32 accumulation, one rounding to the output dtype (float64 accumulates in float64).
EPILOGUE_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _epilogue_inputs(shape, dtype, channels_last):
    y = torch.relu(torch.randn(shape, device=DEV)).to(dtype)  # exact zeros where ReLU cut
    grad_y = torch.randn(shape, device=DEV).to(dtype)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
        grad_y = grad_y.contiguous(memory_format=torch.channels_last)
    return grad_y, y


@pytest.mark.parametrize("shape", EPILOGUE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_relu_bias_grad(shape, dtype, channels_last):
    grad_y, y = _epilogue_inputs(shape, dtype, channels_last)
    poison_allocator()
    grad_z, grad_b = torch.ops.fastmtl.relu_bias_grad(grad_y, y, True)
    want = torch.where(y > 0, grad_y, torch.zeros_like(grad_y))
    assert torch.equal(grad_z, want)  # a select: exact
    assert grad_z.is_contiguous(memory_format=torch.channels_last) == y.is_contiguous(
        memory_format=torch.channels_last
    )
    ref_b = want.double().sum(dim=(0, 2, 3))
    assert grad_b.dtype == dtype and grad_b.shape == (shape[1],)
    assert rel_err(grad_b, ref_b) <= EPILOGUE_TOL[dtype]
    again = torch.ops.fastmtl.relu_bias_grad(grad_y, y, True)[1]
    assert torch.equal(grad_b, again)  # deterministic: no atomics
    grad_z2, empty = torch.ops.fastmtl.relu_bias_grad(grad_y, y, False)
    assert torch.equal(grad_z2, want) and empty.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_relu_bias_grad_misaligned_and_strided(dtype):
    n, c, h, w = 2, 16, 6, 8
    base = torch.randn(1 + n * c * h * w, device=DEV).to(dtype)
    y = torch.relu(base[1:]).view(n, c, h, w)  # starts one element into the storage: not 16-byte aligned
    grad_y = torch.randn(2 * n, c, h, w, device=DEV).to(dtype)[::2]  # non-contiguous: copied first
    grad_z, grad_b = torch.ops.fastmtl.relu_bias_grad(grad_y, y, True)
    want = torch.where(y > 0, grad_y, torch.zeros_like(grad_y))
    assert torch.equal(grad_z, want)
    assert rel_err(grad_b, want.double().sum(dim=(0, 2, 3))) <= 2e-3


def test_relu_bias_grad_3d():
    y = torch.relu(torch.randn(4, 12, 33, device=DEV))
    grad_y = torch.randn_like(y)
    grad_z, grad_b = torch.ops.fastmtl.relu_bias_grad(grad_y, y, True)
    want = torch.where(y > 0, grad_y, torch.zeros_like(grad_y))
    assert torch.equal(grad_z, want)
    assert rel_err(grad_b, want.double().sum(dim=(0, 2))) <= 1e-6


def test_relu_bias_grad_runs_on_current_stream():
    grad_y, y = _epilogue_inputs((4, 32, 16, 16), torch.float16, True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        grad_z, grad_b = torch.ops.fastmtl.relu_bias_grad(grad_y, y, True)
    stream.synchronize()
    assert torch.equal(grad_z, torch.where(y > 0, grad_y, torch.zeros_like(grad_y)))
