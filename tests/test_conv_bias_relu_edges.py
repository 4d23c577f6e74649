"""conv_bias_relu edge cases on every backend this machine runs: bias views, string padding, double backward.

Each runs on the device the tests use (CUDA where visible, else the CPU, with Triton in its interpreter) and is
compared with a float64 PyTorch reference by relative error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastmtl
from fastmtl import backends
from fastmtl.testing import TOLERANCES, rel_err

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = [b for b in backends.BACKENDS if backends.can_run(b, DEVICE)[0]]
TOL = TOLERANCES["conv"][torch.float32]


def _reference(x, w, b, stride=1, padding=0, dilation=1):
    b64 = None if b is None else b.double()
    return torch.relu(F.conv2d(x.double(), w.double(), b64, stride, padding, dilation))


def _inputs(c_in=3, c_out=4, hw=(6, 7), k=3):
    x = torch.randn(2, c_in, *hw, device=DEVICE)
    w = torch.randn(c_out, c_in, k, k, device=DEVICE) / (c_in * k * k) ** 0.5
    return x, w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["strided", "expanded"])
def test_bias_view_is_read_by_its_strides(backend, kind):
    x, w = _inputs()
    if kind == "strided":  # every other element of a longer vector: [b0, junk, b1, junk, ...]
        storage = torch.randn(8, device=DEVICE)
        storage[1::2] = 100.0
        bias = storage[::2]
    else:  # one value for every channel, stride 0
        bias = torch.tensor(0.5, device=DEVICE).expand(4)
    x.requires_grad_()
    with fastmtl.use_backend(backend):
        y = fastmtl.conv_bias_relu(x, w, bias, 1, 1)
    ref = _reference(x, w, bias, 1, 1)
    assert rel_err(y, ref) <= TOL
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    x64 = x.detach().double().requires_grad_()
    (gx64,) = torch.autograd.grad(_reference(x64, w, bias, 1, 1), x64, g.double())
    assert rel_err(gx, gx64) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("padding", "k", "dilation", "want"), [("valid", 3, 1, 0), ("same", 3, 1, 1), ("same", 2, 2, 1)]
)
def test_string_padding_as_conv2d(backend, padding, k, dilation, want):
    x, w = _inputs(k=k)
    b = torch.randn(4, device=DEVICE)
    with fastmtl.use_backend(backend):
        y = fastmtl.conv_bias_relu(x, w, b, 1, padding, dilation)
    ref = _reference(x, w, b, 1, padding, dilation)
    assert y.shape == ref.shape
    assert rel_err(y, ref) <= TOL
    assert rel_err(y, _reference(x, w, b, 1, want, dilation)) <= TOL


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"padding": "same", "stride": 2}, "needs stride 1"),
        ({"padding": "same", "k": 2}, "asymmetric"),
        ({"padding": "full"}, "'valid' or 'same'"),
    ],
)
def test_string_padding_errors(kwargs, match):
    x, w = _inputs(k=kwargs.pop("k", 3))
    with pytest.raises(ValueError, match=match):
        fastmtl.conv_bias_relu(x, w, None, kwargs.get("stride", 1), kwargs["padding"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_gradient_penalty(backend):
    """create_graph=True (a gradient penalty on the input): d penalty / d weight as PyTorch's."""
    x, w = _inputs()
    b = torch.randn(4, device=DEVICE) * 0.5
    g = torch.randn(2, 4, 6, 7, device=DEVICE)

    def penalty(x, w, b, fused):
        x = x.clone().requires_grad_()
        if fused:
            with fastmtl.use_backend(backend):
                y = fastmtl.conv_bias_relu(x, w, b, 1, 1)
        else:
            y = _reference(x, w, b, 1, 1)
        # y squared: the upstream gradient 2 y g depends on the weight too, as in an R1 or input-gradient penalty.
        (gx,) = torch.autograd.grad((y.square() * g.to(y.dtype)).sum(), x, create_graph=True)
        return (gx**2).sum()

    w1 = w.clone().requires_grad_()
    (got,) = torch.autograd.grad(penalty(x, w1, b, True), w1)
    w64 = w.double().requires_grad_()
    (want,) = torch.autograd.grad(penalty(x.double(), w64, b.double(), False), w64)
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups", [1, 2])
def test_flop_counter_counts_the_fused_convolution(backend, groups):
    """Forward: the convolution's FLOPs as PyTorch counts them; backward: one convolution's worth per gradient."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 4, 6, 7, device=DEVICE, requires_grad=True)
    w = torch.randn(6, 4 // groups, 3, 3, device=DEVICE, requires_grad=True)
    b = torch.randn(6, device=DEVICE, requires_grad=True)

    def flops(fn):  # (forward, forward + backward, the op families counted)
        with FlopCounterMode(display=False) as counter:
            y = fn()
            forward = counter.get_total_flops()
            y.sum().backward()
        return forward, counter.get_total_flops(), {str(op).split(".")[0] for op in counter.get_flop_counts()["Global"]}

    with fastmtl.use_backend(backend):
        got = flops(lambda: fastmtl.conv_bias_relu(x, w, b, 1, 1, 1, groups))
    want = flops(lambda: torch.relu(F.conv2d(x, w, b, 1, 1, 1, groups)))
    assert want[0] > 0 and got[0] == want[0]
    fused = backend in ("cpp", "cuda") or (backend == "triton" and groups == 1)  # else PyTorch's own conv runs
    assert got[2] == ({"fastmtl"} if fused else {"aten"})
    if fused:
        assert got[1] == 3 * got[0]  # input and weight gradients, one convolution's worth each
    if groups == 1 or not fused:  # (PyTorch's backward formula counts a grouped input gradient as if not grouped)
        assert got[1] == want[1]


@pytest.mark.parametrize("backend", BACKENDS + [backends.AUTO])
def test_torch_func_per_sample_gradients(backend):
    """vmap(grad(...)) (per-sample gradients): the torch reference runs inside the transforms, whatever the backend."""
    x = torch.randn(3, 3, 6, 6, device=DEVICE)
    w = torch.randn(5, 3, 3, 3, device=DEVICE)
    b = torch.randn(5, device=DEVICE)

    def loss(fn, w, xi):
        return fn(xi.unsqueeze(0), w, b, 1, 1).square().sum()

    def per_sample(fn):
        return torch.func.vmap(torch.func.grad(lambda w, xi: loss(fn, w, xi)), in_dims=(None, 0))(w, x)

    with fastmtl.use_backend(backend):
        got = per_sample(fastmtl.conv_bias_relu)
    want = torch.stack([torch.func.grad(lambda w: loss(_reference, w.double(), x[i].double()))(w) for i in range(3)])
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_compiled_graph_calls_the_fused_op(backend):
    """torch.compile keeps the fused op in its graph (the torch.func check once sent every traced call to conv2d)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.graph)
        return gm.forward

    x, w = _inputs()
    b = torch.randn(w.shape[0], device=DEVICE)
    with fastmtl.use_backend(backend):
        got = torch.compile(lambda x, w, b: fastmtl.conv_bias_relu(x, w, b, padding=1), backend=record)(x, w, b)
    targets = {str(node.target) for graph in graphs for node in graph.nodes if node.op == "call_function"}
    assert any(t.startswith("fastmtl.conv_bias_relu") for t in targets), targets
    assert not any("conv2d" in t for t in targets), targets
    assert rel_err(got, _reference(x, w, b, padding=1)) <= TOL


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("transform", ["grad", "vmap_grad", "jvp"])
def test_torch_func_transforms_under_torch_compile_fullgraph(backend, transform):
    """A transform compiled as a whole: Dynamo traces through it, and the reference must run inside it there too."""
    x = torch.randn(3, 3, 6, 6, device=DEVICE)
    w = torch.randn(5, 3, 3, 3, device=DEVICE) / 27**0.5
    b = torch.randn(5, device=DEVICE)

    def loss(w, x):
        return fastmtl.conv_bias_relu(x, w, b, 1, 1).square().sum()

    def loss64(w, x):
        return _reference(x, w, b, padding=1).square().sum()

    def apply(fn):
        if transform == "grad":
            return lambda w: torch.func.grad(fn)(w, x)
        if transform == "vmap_grad":
            per_sample = torch.func.vmap(torch.func.grad(lambda w, xi: fn(w, xi[None])), in_dims=(None, 0))
            return lambda w: per_sample(w, x)
        return lambda w: torch.func.jvp(lambda w: fn(w, x), (w,), (torch.ones_like(w),))[1]

    torch._dynamo.reset()
    with fastmtl.use_backend(backend):
        got = torch.compile(apply(loss), fullgraph=True)(w)
    assert rel_err(got, apply(loss64)(w.double())) <= TOL
