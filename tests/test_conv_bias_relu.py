"""conv_bias_relu on the CPU backends (torch, cpp): parity, gradients, registration, compile, validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmtl
from fastmtl import backends
from fastmtl.ops import conv_bias_relu as op
from fastmtl.testing import TOLERANCES, rel_err

CPU_BACKENDS = [b for b in ("torch", "cpp") if backends.can_run(b, torch.device("cpu"))[0]]
needs_cpp = pytest.mark.skipif(not op.HAS_NATIVE, reason="the C++ extension fastmtl._C is not built")


def make_case(n, c_in, c_out, hw, k, groups=1, bias=True, dtype=torch.float32, channels_last=False):
    """Fresh random inputs (never zeros); the bias is shifted so the ReLU cuts a good share of outputs.

    ``channels_last``: x in channels_last; ``"model"``: the weight too, as ``model.to(memory_format=channels_last)``
    leaves a convolution's parameters."""
    x = torch.randn(n, c_in, *hw, dtype=torch.float64)
    w = torch.randn(c_out, c_in // groups, *k, dtype=torch.float64) / (c_in // groups * k[0] * k[1]) ** 0.5
    b = torch.randn(c_out, dtype=torch.float64) * 0.5 if bias else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    x_, w_, b_ = cast(x), cast(w), cast(b)
    if channels_last:
        x_ = x_.contiguous(memory_format=torch.channels_last)
    if channels_last == "model":
        w_ = w_.contiguous(memory_format=torch.channels_last)
    return (x, w, b), (x_, w_, b_)


def reference64(x, w, b, stride, padding, dilation, groups):
    return torch.relu(torch.nn.functional.conv2d(x, w, b, stride, padding, dilation, groups))


GRID = [
    # n, c_in, c_out, hw, k, stride, padding, dilation, groups
    (2, 3, 8, (9, 11), (3, 3), 1, 1, 1, 1),
    (1, 4, 6, (7, 7), (3, 3), 2, 0, 1, 1),
    (2, 8, 8, (10, 9), (3, 3), 1, 2, 2, 1),
    (3, 6, 9, (8, 8), (1, 1), 1, 0, 1, 3),
    (2, 8, 8, (6, 7), (3, 3), (2, 1), (1, 0), 1, 8),  # depthwise
    (1, 5, 7, (13, 5), (5, 3), 3, (2, 1), (1, 2), 1),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", GRID)
@pytest.mark.parametrize("channels_last", [False, True, "model"])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_backward_parity_float32(backend, case, channels_last, bias):
    n, c_in, c_out, hw, k, stride, padding, dilation, groups = case
    (x64, w64, b64), (x, w, b) = make_case(n, c_in, c_out, hw, k, groups, bias, channels_last=channels_last)
    for t in (x, w, b, x64, w64, b64):
        if t is not None:
            t.requires_grad_(True)
    with fastmtl.use_backend(backend):
        y = fastmtl.conv_bias_relu(x, w, b, stride, padding, dilation, groups)
    ref = reference64(x64, w64, b64, stride, padding, dilation, groups)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert rel_err(y, ref) <= TOLERANCES["conv"][torch.float32]
    if channels_last and backend == "cpp":
        assert y.is_contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn_like(ref)
    y.backward(grad_y.float())
    ref.backward(grad_y)
    assert rel_err(x.grad, x64.grad) <= TOLERANCES["conv"][torch.float32]
    assert rel_err(w.grad, w64.grad) <= TOLERANCES["conv"][torch.float32]
    if bias:
        assert rel_err(b.grad, b64.grad) <= TOLERANCES["conv"][torch.float32]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_low_precision_parity(backend, dtype, channels_last):
    (x64, w64, b64), (x, w, b) = make_case(2, 16, 16, (12, 12), (3, 3), dtype=dtype, channels_last=channels_last)
    # The reference sees the same rounded inputs, so only the op's own error is measured.
    x64, w64, b64 = x.double().requires_grad_(), w.double().requires_grad_(), b.double().requires_grad_()
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    with fastmtl.use_backend(backend):
        y = fastmtl.conv_bias_relu(x, w, b, 1, 1)
    ref = reference64(x64, w64, b64, 1, 1, 1, 1)
    assert y.dtype == dtype
    tol = TOLERANCES["conv"][dtype]
    assert rel_err(y, ref) <= tol
    g = torch.randn_like(ref)
    y.backward(g.to(dtype))
    ref.backward(g.to(dtype).double())
    for got, want in ((x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert got.dtype == dtype
        assert rel_err(got, want) <= tol


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batch_zero(backend):
    x = torch.randn(0, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    with fastmtl.use_backend(backend):
        y = fastmtl.conv_bias_relu(x, w, b, 1, 1)
    assert y.shape == (0, 4, 8, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.count_nonzero(w.grad) == 0 and torch.count_nonzero(b.grad) == 0


@needs_cpp
@pytest.mark.parametrize("algo", ["default", "library"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_native_algos_agree(algo, channels_last):
    (x64, w64, b64), (x, w, b) = make_case(2, 8, 12, (9, 10), (3, 3), channels_last=channels_last)
    y = torch.ops.fastmtl.conv_bias_relu(x, w, b, [1, 1], [1, 1], [1, 1], 1, algo)
    assert rel_err(y, reference64(x64, w64, b64, 1, 1, 1, 1)) <= 1e-4


@needs_cpp
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 5, 6), (2, 19, 9, 11)])  # vector lanes and tails in both layouts
def test_relu_bias_grad_epilogue(channels_last, dtype, shape):
    y = torch.relu(torch.randn(shape))
    y.view(-1)[:4] = torch.tensor([-0.0, float("inf"), float("nan"), -float("inf")])  # only +inf counts as > 0
    y = y.to(dtype)
    gy = torch.randn(shape).to(dtype)
    if channels_last:
        y, gy = (t.contiguous(memory_format=torch.channels_last) for t in (y, gy))
    gz, gb = torch.ops.fastmtl.relu_bias_grad(gy, y, True)
    want_gz = gy.double() * (y.double() > 0)
    assert torch.equal(gz.double(), want_gz)
    assert rel_err(gb, want_gz.sum(dim=(0, 2, 3))) <= TOLERANCES["conv"][dtype]
    _, no_bias = torch.ops.fastmtl.relu_bias_grad(gy, y, False)
    assert no_bias.numel() == 0


@needs_cpp
@pytest.mark.parametrize("case", [GRID[0], GRID[2], GRID[4]])
def test_gradcheck_float64(case):
    n, c_in, c_out, hw, k, stride, padding, dilation, groups = case
    (x, w, b), _ = make_case(n, c_in, c_out, (5, 6), k, groups)
    # Outputs must stay away from the ReLU kink, where finite differences (eps 1e-6) are meaningless.
    y = reference64(x, w, b, stride, padding, dilation, groups)
    pre = torch.nn.functional.conv2d(x, w, b, stride, padding, dilation, groups)
    margin = pre.abs().min().item()
    assert y.numel() > 0 and margin > 1e-5
    inputs = tuple(t.clone().requires_grad_() for t in (x, w, b))
    with fastmtl.use_backend("cpp"):
        assert torch.autograd.gradcheck(
            lambda x, w, b: fastmtl.conv_bias_relu(x, w, b, stride, padding, dilation, groups), inputs, eps=1e-6
        )


@needs_cpp
@pytest.mark.parametrize("channels_last", [False, True, "model"])
def test_opcheck(channels_last):
    _, (x, w, b) = make_case(2, 4, 6, (7, 8), (3, 3), channels_last=channels_last)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    args = [1, 1], [1, 1], [1, 1], 1
    torch.library.opcheck(torch.ops.fastmtl.conv_bias_relu.default, (x, w, b, *args, "default"))
    y = torch.ops.fastmtl.conv_bias_relu(x, w, b, *args, "default").detach()
    gy = torch.randn_like(y)
    torch.library.opcheck(
        torch.ops.fastmtl.conv_bias_relu_backward.default,
        (gy, y, x.detach(), w.detach(), *args, [True, True, True], "default"),
    )
    torch.library.opcheck(torch.ops.fastmtl.relu_bias_grad.default, (gy, y, True))


@needs_cpp
def test_torch_compile_fullgraph():
    _, (x, w, b) = make_case(2, 4, 8, (10, 10), (3, 3))

    def block(x, w, b):
        return fastmtl.conv_bias_relu(x, w, b, stride=1, padding=1).mean(dim=1)

    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    with fastmtl.use_backend("cpp"):
        compiled = torch.compile(block, fullgraph=True)
        out = compiled(x, w, b)
        eager = block(x, w, b)
    assert rel_err(out, eager) <= 1e-6
    out.sum().backward()
    assert w.grad is not None and rel_err(w.grad, torch.autograd.grad(eager.sum(), w)[0]) <= 1e-5


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 3),
    c_in=st.integers(1, 6),
    c_out=st.integers(1, 6),
    h=st.integers(3, 12),
    w=st.integers(3, 12),
    k=st.integers(1, 3),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    channels_last=st.booleans(),
    bias=st.booleans(),
)
def test_hypothesis_shapes(n, c_in, c_out, h, w, k, stride, padding, dilation, channels_last, bias):
    if (h + 2 * padding - dilation * (k - 1) - 1) < 0 or (w + 2 * padding - dilation * (k - 1) - 1) < 0:
        return  # no output: covered by the validation tests
    (x64, w64, b64), (x, wt, b) = make_case(n, c_in, c_out, (h, w), (k, k), 1, bias, channels_last=channels_last)
    ref = reference64(x64, w64, b64, stride, padding, dilation, 1)
    for backend in CPU_BACKENDS:
        with fastmtl.use_backend(backend):
            y = fastmtl.conv_bias_relu(x, wt, b, stride, padding, dilation)
        assert rel_err(y, ref) <= TOLERANCES["conv"][torch.float32]


# ---- validation -----------------------------------------------------------------------------------------------

X = torch.randn(2, 4, 8, 8)
W = torch.randn(6, 4, 3, 3)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x=torch.randn(4, 8, 8)), ValueError, "x must be 4-D"),
        (dict(x=X.int()), TypeError, "x must have dtype"),
        (dict(weight=torch.randn(6, 4, 3)), ValueError, "weight must be 4-D"),
        (dict(weight=W.half()), TypeError, "weight must have the dtype of x"),
        (dict(weight=torch.randn(6, 3, 3, 3)), ValueError, r"weight must have shape \[out_channels, 4"),
        (dict(groups=3), ValueError, "divisible by groups"),
        (dict(groups=0), ValueError, "groups must be an int >= 1"),
        (dict(bias=torch.randn(5)), ValueError, r"bias must have shape \[6\]"),
        (dict(bias=torch.randn(6, 1)), ValueError, "bias must be 1-D"),
        (dict(bias=torch.randn(6).half()), TypeError, "bias must have the dtype of x"),
        (dict(stride=0), ValueError, "stride must be >= 1"),
        (dict(stride=(1, 2, 3)), TypeError, "stride must be an int or a pair"),
        (dict(padding=-1), ValueError, "padding must be >= 0"),
        (dict(dilation=0), ValueError, "dilation must be >= 1"),
        (dict(weight=torch.randn(6, 4, 11, 11)), ValueError, "output size must be >= 1"),
        (dict(x=[1, 2]), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_validation_errors(kwargs, error, match):
    args = dict(x=X, weight=W, bias=None, stride=1, padding=0, dilation=1, groups=1)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fastmtl.conv_bias_relu(**args)


def test_backend_that_cannot_run_raises():
    with fastmtl.use_backend("cuda"):
        if not backends.can_run("cuda", X.device)[0]:
            with pytest.raises(backends.BackendUnavailableError, match="cuda"):
                fastmtl.conv_bias_relu(X, W)
