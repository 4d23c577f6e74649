"""The triton backend of conv+bias+ReLU: kernels, registered ops, autograd, dispatch.

Without a GPU these run in the Triton interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1), so
shapes stay small; on a GPU the same tests run on CUDA tensors, and the ``@pytest.mark.cuda`` ones add bfloat16,
large shapes, torch.compile with Inductor and CUDA graph capture. Everything is compared with a float64 reference
by relative error (fastmtl.testing); kernel outputs and scratch buffers are NaN-poisoned first.
"""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the triton backend needs the triton package")

import fastmtl  # noqa: E402
from fastmtl.kernels import conv_bias_relu as kernels  # noqa: E402
from fastmtl.ops import conv_bias_relu_triton as tri  # noqa: E402
from fastmtl.testing import TOLERANCES, rel_err  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compile_only  # noqa: E402  (beside this file: scripts against kernels compiled for sm_90)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CONV_TOL = TOLERANCES["conv"]
BF16_INTERPRETER_REASON = "bfloat16 is computed wrongly by the Triton interpreter (brief section 4); runs on a GPU"

# (N, C_in, H, W, C_out, kernel, stride, padding, dilation)
CASES = {
    "flatK-3x3-pad1": (2, 5, 9, 8, 12, (3, 3), (1, 1), (1, 1), (1, 1)),
    "blockK-stride2-dil-batch1": (1, 20, 9, 7, 40, (3, 3), (2, 2), (0, 1), (2, 1)),
    "1x1-odd": (3, 16, 5, 7, 9, (1, 1), (1, 1), (0, 0), (1, 1)),
    "rect-kernel-rgb": (2, 3, 11, 10, 17, (3, 2), (1, 2), (2, 0), (1, 1)),
}
LAYOUTS = ["nchw", "channels_last"]


@pytest.fixture
def poison(monkeypatch):
    """Fill every tensor the kernels allocate with torch.empty / empty_like with NaN (proves each is written)."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))


def make_inputs(case, layout, dtype, bias=True, requires_grad=False):
    """Fresh random inputs; layout "nchw", "channels_last" (x) or "model" (x and weight channels_last)."""
    n, ci, h, w, co, k, *_ = case
    x = torch.randn(n, ci, h, w, device=DEVICE, dtype=dtype)
    weight = torch.randn(co, ci, *k, device=DEVICE, dtype=dtype) / (ci * k[0] * k[1]) ** 0.5
    b = torch.randn(co, device=DEVICE, dtype=dtype) if bias else None
    if layout in ("channels_last", "model"):
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "model":  # the weight too, as model.to(memory_format=torch.channels_last) leaves it
        weight = weight.contiguous(memory_format=torch.channels_last)
    tensors = [x, weight, b]
    if requires_grad:
        for t in tensors:
            if t is not None:
                t.requires_grad_(True)
    return tensors


def reference(x, weight, b, stride, padding, dilation):
    """float64 CPU relu(conv2d) with autograd leaves, the oracle."""
    leaves = [None if t is None else t.detach().cpu().double().requires_grad_(True) for t in (x, weight, b)]
    return torch.relu(F.conv2d(leaves[0], leaves[1], leaves[2], stride, padding, dilation)), leaves


def conv_args(case):
    return [list(v) for v in case[6:]]


def skip_bf16_in_interpreter(dtype):
    if dtype == torch.bfloat16 and kernels.INTERPRET:
        pytest.skip(BF16_INTERPRETER_REASON)


# ---- forward ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_forward_matches_float64(case, layout, dtype, poison):
    skip_bf16_in_interpreter(dtype)
    x, weight, b = make_inputs(case, layout, dtype)
    stride, padding, dilation = conv_args(case)
    y = torch.ops.fastmtl.conv_bias_relu_triton(x, weight, b, stride, padding, dilation)
    ref, _ = reference(x, weight, b, stride, padding, dilation)
    assert y.shape == ref.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    assert rel_err(y, ref) <= CONV_TOL[dtype]
    assert (y >= 0).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_without_bias(layout, poison):
    case = CASES["flatK-3x3-pad1"]
    x, weight, _ = make_inputs(case, layout, torch.float32, bias=False)
    y = torch.ops.fastmtl.conv_bias_relu_triton(x, weight, None, *conv_args(case))
    ref, _ = reference(x, weight, None, *conv_args(case))
    assert rel_err(y, ref) <= CONV_TOL[torch.float32]


def test_forward_strided_input_view():
    """A non-contiguous x (a channel slice) is read through its strides."""
    base = torch.randn(2, 9, 8, 8, device=DEVICE)
    x = base[:, 2:8]
    weight = torch.randn(4, 6, 3, 3, device=DEVICE)
    y = torch.ops.fastmtl.conv_bias_relu_triton(x, weight, None, [1, 1], [1, 1], [1, 1])
    ref, _ = reference(x, weight, None, (1, 1), (1, 1), (1, 1))
    assert rel_err(y, ref) <= CONV_TOL[torch.float32]


# ---- backward -----------------------------------------------------------------------------------------------------


def check_backward(case, layout, dtype, impl, bias=True):
    x, weight, b = make_inputs(case, layout, dtype, bias=bias, requires_grad=True)
    stride, padding, dilation = conv_args(case)
    tri.set_backward_impl(impl)
    try:
        y = torch.ops.fastmtl.conv_bias_relu_triton(x, weight, b, stride, padding, dilation)
    finally:
        tri.set_backward_impl(None)
    ref, leaves = reference(x, weight, b, stride, padding, dilation)
    grad_y = torch.randn_like(ref)
    y.backward(grad_y.to(DEVICE, dtype))
    ref.backward(grad_y)
    tol = CONV_TOL[dtype]
    assert rel_err(x.grad, leaves[0].grad) <= tol
    assert rel_err(weight.grad, leaves[1].grad) <= tol
    assert weight.grad.shape == weight.shape
    if bias:
        assert rel_err(b.grad, leaves[2].grad) <= tol


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_backward_triton_matches_float64(case, layout, poison):
    check_backward(case, layout, torch.float32, "triton")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", [CASES["flatK-3x3-pad1"], CASES["blockK-stride2-dil-batch1"]], ids=["flatK", "blockK"])
def test_backward_aten_matches_float64(case, layout, poison):
    check_backward(case, layout, torch.float32, "aten")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES["flatK-3x3-pad1"], CASES["blockK-stride2-dil-batch1"]], ids=["flatK", "blockK"])
def test_backward_half_triton(case, dtype, poison):
    skip_bf16_in_interpreter(dtype)
    check_backward(case, "channels_last", dtype, "triton")


@pytest.mark.parametrize(
    "case,layout", [("blockK-stride2-dil-batch1", "nchw"), ("flatK-3x3-pad1", "channels_last")], ids=["nchw", "nhwc"]
)
def test_int64_indexing_path(case, layout, monkeypatch, poison):
    """The INT64 specialisation (taken for tensors of 2**31+ elements) computes the same thing, forced on small ones."""
    monkeypatch.setattr(kernels, "_needs_int64", lambda *tensors: True)
    check_backward(CASES[case], layout, torch.float32, "triton")


def test_backward_without_bias_and_partial_needs():
    case = CASES["1x1-odd"]
    check_backward(case, "channels_last", torch.float32, "triton", bias=False)
    x, weight, b = make_inputs(case, "nchw", torch.float32)
    weight.requires_grad_(True)  # only the weight needs a gradient
    y = torch.ops.fastmtl.conv_bias_relu_triton(x, weight, b, *conv_args(case))
    y.sum().backward()
    ref, leaves = reference(x, weight, b, *conv_args(case))
    ref.sum().backward()
    assert x.grad is None and b.grad is None
    assert rel_err(weight.grad, leaves[1].grad) <= CONV_TOL[torch.float32]


# ---- the epilogue kernel alone ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("compute_bias_grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    "shape,layout",
    [((2, 5, 7, 5), "channels_last"), ((3, 70, 3, 3), "channels_last"), ((2, 5, 7, 5), "nchw"), ((1, 3, 40, 40), "nchw")],
    ids=["nhwc-2progs", "nhwc-2colblocks", "nchw", "nchw-hwsplits"],
)
def test_relu_bias_grad(shape, layout, dtype, compute_bias_grad, poison):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    y = torch.relu(torch.randn(shape, device=DEVICE, dtype=dtype)).contiguous(memory_format=fmt)
    grad_y = torch.randn(shape, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt)
    grad_z, grad_b = torch.ops.fastmtl.relu_bias_grad_triton(grad_y, y, compute_bias_grad)
    want_z = grad_y.double() * (y > 0)
    assert grad_z.stride() == y.stride() and grad_z.dtype == dtype
    assert torch.equal(grad_z.double(), want_z)  # masking is exact
    if compute_bias_grad:
        assert grad_b.shape == (shape[1],) and grad_b.dtype == dtype
        assert rel_err(grad_b, want_z.sum((0, 2, 3))) <= TOLERANCES["loss"][dtype]
    else:
        assert grad_b.numel() == 0


def test_relu_bias_grad_layout_mismatch():
    """grad_y in NCHW while y is channels_last (autograd may hand over either): brought to y's layout."""
    y = torch.relu(torch.randn(2, 6, 5, 4, device=DEVICE)).contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn(2, 6, 5, 4, device=DEVICE)
    grad_z, grad_b = kernels.relu_bias_grad(grad_y, y)
    want = grad_y * (y > 0)
    assert torch.equal(grad_z, want)
    assert rel_err(grad_b, want.double().sum((0, 2, 3))) <= 1e-6


# ---- registration: opcheck, dispatch, torch.compile -------------------------------------------------------------------


def test_opcheck_forward():
    x, weight, b = make_inputs(CASES["flatK-3x3-pad1"], "channels_last", torch.float32, requires_grad=True)
    torch.library.opcheck(torch.ops.fastmtl.conv_bias_relu_triton.default, (x, weight, b, [1, 1], [1, 1], [1, 1]))
    torch.library.opcheck(torch.ops.fastmtl.conv_bias_relu_triton.default, (x, weight, None, [2, 1], [0, 1], [1, 2]))


@pytest.mark.parametrize("impl", ["triton", "aten"])
def test_opcheck_backward(impl):
    case = CASES["1x1-odd"]
    x, weight, b = make_inputs(case, "nchw", torch.float32)
    stride, padding, dilation = conv_args(case)
    y = torch.ops.fastmtl.conv_bias_relu_triton(x, weight, b, stride, padding, dilation)
    args = (torch.randn_like(y), y, x, weight, stride, padding, dilation, [True, True, True], impl)
    torch.library.opcheck(torch.ops.fastmtl.conv_bias_relu_triton_backward.default, args)
    args = (torch.randn_like(y), y, x, weight, stride, padding, dilation, [False, True, False], impl)
    torch.library.opcheck(torch.ops.fastmtl.conv_bias_relu_triton_backward.default, args)


@pytest.mark.parametrize("impl", ["triton", "aten"])
@pytest.mark.parametrize("case", ["flatK-3x3-pad1", "rect-kernel-rgb"])
def test_channels_last_weight(case, impl, poison):
    """A channels_last weight (a model moved to channels_last): parity, and the gradients in the layouts the fake
    implementation states (the weight's for grad_weight)."""
    check_backward(CASES[case], "model", torch.float32, impl)
    x, weight, b = make_inputs(CASES[case], "model", torch.float32)
    y = torch.ops.fastmtl.conv_bias_relu_triton(x, weight, b, *conv_args(CASES[case]))
    assert y.is_contiguous(memory_format=torch.channels_last)
    args = (torch.randn_like(y), y, x, weight, *conv_args(CASES[case]), [True, True, True], impl)
    grad_x, grad_w, _ = torch.ops.fastmtl.conv_bias_relu_triton_backward(*args)
    cl = torch.channels_last
    assert grad_x.is_contiguous(memory_format=cl) and grad_w.is_contiguous(memory_format=cl)
    torch.library.opcheck(torch.ops.fastmtl.conv_bias_relu_triton_backward.default, args)


def test_opcheck_epilogue():
    y = torch.relu(torch.randn(2, 5, 4, 3, device=DEVICE))
    grad_y = torch.randn_like(y)
    torch.library.opcheck(torch.ops.fastmtl.relu_bias_grad_triton.default, (grad_y, y, True))
    torch.library.opcheck(torch.ops.fastmtl.relu_bias_grad_triton.default, (grad_y, y, False))


def test_public_api_on_triton_backend():
    x, weight, b = make_inputs(CASES["rect-kernel-rgb"], "channels_last", torch.float32, requires_grad=True)
    with fastmtl.use_backend("triton"):
        y = fastmtl.conv_bias_relu(x, weight, b, stride=(1, 2), padding=(2, 0))
    ref, leaves = reference(x, weight, b, (1, 2), (2, 0), (1, 1))
    assert rel_err(y, ref) <= CONV_TOL[torch.float32]
    y.sum().backward()
    ref.sum().backward()
    for got, want in zip((x, weight, b), leaves):
        assert rel_err(got.grad, want.grad) <= CONV_TOL[torch.float32]


def test_groups_fall_back_to_reference():
    x = torch.randn(2, 6, 7, 7, device=DEVICE, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, device=DEVICE, requires_grad=True)
    with fastmtl.use_backend("triton"):
        y = fastmtl.conv_bias_relu(x, weight, None, padding=1, groups=2)
    ref = torch.relu(F.conv2d(x.detach().double().cpu(), weight.detach().double().cpu(), None, 1, 1, 1, 2))
    assert rel_err(y, ref) <= CONV_TOL[torch.float32]
    y.sum().backward()
    assert x.grad is not None and weight.grad is not None


def test_backward_impl_validation(monkeypatch):
    with pytest.raises(ValueError, match="impl"):
        tri.set_backward_impl("cudnn")
    monkeypatch.setenv(tri.BACKWARD_IMPL_ENV, "bogus")
    with pytest.raises(ValueError, match=tri.BACKWARD_IMPL_ENV):
        tri.backward_impl()
    monkeypatch.setenv(tri.BACKWARD_IMPL_ENV, "triton")
    assert tri.backward_impl() == "triton"
    x = torch.randn(1, 2, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="impl"):
        kernels.conv_backward(x, x, x, torch.randn(2, 2, 1, 1), (1, 1), (0, 0), (1, 1), [True] * 3, impl="x")


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) traces the op, its fake implementation and its autograd.

    In the interpreter the ops are opaque custom ops (``wrap_triton`` cannot trace interpreted kernels) and the
    backend is aot_eager (Inductor cannot lower interpreted Triton on CPU tensors); on a GPU the same test traces
    the triton_op through wrap_triton, and test_cuda_compile_inductor runs Inductor.
    """
    case = CASES["flatK-3x3-pad1"]
    x, weight, b = make_inputs(case, "channels_last", torch.float32, requires_grad=True)

    def fn(x, weight, b):
        return torch.ops.fastmtl.conv_bias_relu_triton(x, weight, b, [1, 1], [1, 1], [1, 1]).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    loss = compiled(x, weight, b)
    loss.backward()
    ref, leaves = reference(x, weight, b, (1, 1), (1, 1), (1, 1))
    ref.square().sum().backward()
    assert rel_err(loss, ref.square().sum()) <= CONV_TOL[torch.float32]
    for got, want in zip((x, weight, b), leaves):
        assert rel_err(got.grad, want.grad) <= CONV_TOL[torch.float32]


# ---- GPU only ---------------------------------------------------------------------------------------------------------

TRUNK_SHAPES = {  # (N, C_in, H, W, C_out, kernel, stride, padding, dilation)
    "32x64x56x56-3x3": (32, 64, 56, 56, 64, (3, 3), (1, 1), (1, 1), (1, 1)),
    "stem-8x3x288x384": (8, 3, 288, 384, 32, (3, 3), (1, 1), (1, 1), (1, 1)),
    "32x64x56x56-s2-to128": (32, 64, 56, 56, 128, (3, 3), (2, 2), (1, 1), (1, 1)),
}


def gpu_reference(x, weight, b, stride, padding, dilation):
    """float64 on the GPU (the CPU would take too long at these sizes)."""
    leaves = [None if t is None else t.detach().double().requires_grad_(True) for t in (x, weight, b)]
    return torch.relu(F.conv2d(leaves[0], leaves[1], leaves[2], stride, padding, dilation)), leaves


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(TRUNK_SHAPES.values()), ids=list(TRUNK_SHAPES))
def test_cuda_large_parity(case, dtype):
    """Triton forward and Triton dgrad/wgrad at trunk sizes (the aten backward runs in the small tests on CUDA)."""
    x, weight, b = make_inputs(case, "channels_last", dtype, requires_grad=True)
    stride, padding, dilation = conv_args(case)
    ref, leaves = gpu_reference(x, weight, b, stride, padding, dilation)
    grad_y = torch.randn_like(ref)
    # Outputs within rounding of the ReLU kink may land on either side of it in low precision; at millions of
    # outputs a few such flips move the input gradient by ~1e-3 relative, which says nothing about the kernels.
    pre = F.conv2d(*(t.detach() if t is not None else None for t in leaves), stride, padding, dilation)
    grad_y = grad_y.masked_fill(pre.abs() < KINK_MARGIN[dtype], 0.0)
    tri.set_backward_impl("triton")
    try:
        y = torch.ops.fastmtl.conv_bias_relu_triton(x, weight, b, stride, padding, dilation)
        y.backward(grad_y.to(dtype))
    finally:
        tri.set_backward_impl(None)
    ref.backward(grad_y)
    tol = CONV_TOL[dtype]
    assert rel_err(y, ref) <= tol
    for got, want in zip((x, weight, b), leaves):
        assert rel_err(got.grad, want.grad) <= tol


KINK_MARGIN = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 1e-1}


@pytest.mark.cuda
def test_cuda_tf32_when_allowed(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert kernels.dot_precision(torch.float32) == "tf32"
    case = TRUNK_SHAPES["32x64x56x56-3x3"]
    x, weight, b = make_inputs(case, "channels_last", torch.float32)
    y = torch.ops.fastmtl.conv_bias_relu_triton(x, weight, b, *conv_args(case))
    ref, _ = gpu_reference(x, weight, b, *conv_args(case))
    from fastmtl.testing import TF32_TOLERANCE

    assert rel_err(y, ref) <= TF32_TOLERANCE


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_epilogue_large(layout):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    y = torch.relu(torch.randn(8, 32, 288, 384, device="cuda", dtype=torch.bfloat16)).contiguous(memory_format=fmt)
    grad_y = torch.randn_like(y)
    grad_z, grad_b = kernels.relu_bias_grad(grad_y, y)
    want = grad_y.double() * (y > 0)
    assert torch.equal(grad_z.double(), want)
    assert rel_err(grad_b, want.sum((0, 2, 3))) <= TOLERANCES["loss"][torch.bfloat16]


@pytest.mark.cuda
def test_cuda_opcheck():
    x, weight, b = make_inputs(TRUNK_SHAPES["32x64x56x56-3x3"], "channels_last", torch.bfloat16, requires_grad=True)
    x = x[:2].detach().requires_grad_(True)
    torch.library.opcheck(torch.ops.fastmtl.conv_bias_relu_triton.default, (x, weight, b, [1, 1], [1, 1], [1, 1]))
    y = torch.relu(torch.randn(2, 64, 56, 56, device="cuda", dtype=torch.bfloat16))
    torch.library.opcheck(torch.ops.fastmtl.relu_bias_grad_triton.default, (torch.randn_like(y), y, True))


@pytest.mark.cuda
def test_cuda_compile_inductor():
    case = TRUNK_SHAPES["32x64x56x56-3x3"]
    x, weight, b = make_inputs(case, "channels_last", torch.bfloat16, requires_grad=True)

    def fn(x, weight, b):
        return torch.ops.fastmtl.conv_bias_relu_triton(x, weight, b, [1, 1], [1, 1], [1, 1]).float().square().mean()

    torch._dynamo.reset()
    loss = torch.compile(fn, fullgraph=True)(x, weight, b)
    loss.backward()
    ref, leaves = gpu_reference(x, weight, b, (1, 1), (1, 1), (1, 1))
    ref.square().mean().backward()
    assert rel_err(loss, ref.square().mean()) <= CONV_TOL[torch.bfloat16]
    for got, want in zip((x, weight, b), leaves):
        assert rel_err(got.grad, want.grad) <= CONV_TOL[torch.bfloat16]


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["triton", "aten"])
def test_cuda_graph_capture(impl):
    case = TRUNK_SHAPES["32x64x56x56-3x3"]
    x, weight, b = make_inputs(case, "channels_last", torch.float16, requires_grad=True)
    grad_y = torch.randn(32, 64, 56, 56, device="cuda", dtype=torch.float16).contiguous(
        memory_format=torch.channels_last
    )
    tri.set_backward_impl(impl)

    def step():
        x.grad = weight.grad = b.grad = None
        y = torch.ops.fastmtl.conv_bias_relu_triton(x, weight, b, [1, 1], [1, 1], [1, 1])
        y.backward(grad_y)
        return y

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # autotune and compile outside the capture
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = step()
        x.data.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
    finally:
        tri.set_backward_impl(None)
    ref, leaves = gpu_reference(x, weight, b, (1, 1), (1, 1), (1, 1))
    ref.backward(grad_y.double())
    assert rel_err(y, ref) <= CONV_TOL[torch.float16]
    assert rel_err(weight.grad, leaves[1].grad) <= CONV_TOL[torch.float16]


_SM90_COMPILE_SCRIPT = r"""
import json
from fastmtl.kernels import conv_bias_relu as conv

failed, ran = [], 0
for name, fn in triton_compile_check.cases():
    if name.startswith(("conv", "relu_bias_grad")) and "bfloat16-cl" in name:
        ran += 1
        try:
            fn()
        except Exception as exc:  # report every case that does not compile
            failed.append(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
print(json.dumps({"cases": ran, "failed": failed, **triton_compile_check.float_atomics(conv)}))
"""


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="compiles through a stand-in driver; with a GPU the tests run the kernels"
)
def test_kernels_compile_for_sm90_without_float_atomics():
    """The interpreter accepts programs the real compiler rejects: the forward, relu_bias_grad and backward kernels
    compile for sm_90 in the H100 configuration (bf16, channels_last, every autotune config), and no compiled kernel
    adds floating-point values with atomics (the split-K and bias sums are fixed-order: run-to-run deterministic)."""
    import json

    report = json.loads(compile_only.run(_SM90_COMPILE_SCRIPT, timeout=900).strip().splitlines()[-1])
    assert report["cases"] >= 6 and report["failed"] == [], report
    assert report["compiled"] >= 20 and report["float_atomics"] == {}, report
