"""FusedConv2dReLU: parity with Conv2d + ReLU, parameter sharing, state_dict compatibility, autocast, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmtl
from fastmtl import FusedConv2dReLU
from fastmtl.testing import TOLERANCES, OpCounter, rel_err

CONFIGS = [
    dict(in_channels=3, out_channels=8, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 1), stride=2, padding=(1, 0), bias=False),
    dict(in_channels=4, out_channels=8, kernel_size=3, dilation=2, padding=2, groups=2),
    dict(in_channels=5, out_channels=7, kernel_size=1),
]


def _reference(conv_kwargs, fused, x):
    """float64 relu(conv2d) with the fused module's parameters."""
    b = fused.bias.double() if fused.bias is not None else None
    return torch.relu(
        F.conv2d(x.double(), fused.weight.double(), b, fused.stride, fused.padding, fused.dilation, fused.groups)
    )


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_forward_backward_match_float64_reference(kwargs):
    fused = FusedConv2dReLU(**kwargs)
    x = torch.randn(2, kwargs["in_channels"], 9, 10, requires_grad=True)
    y = fused(x)
    x64 = x.detach().double().requires_grad_()
    params64 = [p.detach().double().requires_grad_() for p in (fused.weight, fused.bias) if p is not None]
    b64 = params64[1] if fused.bias is not None else None
    ref = torch.relu(F.conv2d(x64, params64[0], b64, fused.stride, fused.padding, fused.dilation, fused.groups))
    tol = TOLERANCES["conv"][torch.float32]
    assert y.shape == ref.shape
    assert rel_err(y, ref) <= tol
    g = torch.randn_like(ref)
    y.backward(g.float())
    ref.backward(g)
    assert rel_err(x.grad, x64.grad) <= tol
    assert rel_err(fused.weight.grad, params64[0].grad) <= tol
    if fused.bias is not None:
        assert rel_err(fused.bias.grad, b64.grad) <= tol


def test_parameters_named_shaped_and_initialised_as_conv2d():
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 12, 3, padding=1, groups=3)
    torch.manual_seed(1)
    fused = FusedConv2dReLU(6, 12, 3, padding=1, groups=3)
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in conv.named_parameters()]
    for (_, p), (_, q) in zip(fused.named_parameters(), conv.named_parameters()):
        assert p.shape == q.shape
        assert torch.equal(p, q)  # same init order and distribution as nn.Conv2d
    assert "bias" not in FusedConv2dReLU(3, 4, 3, bias=False).state_dict()


def test_state_dict_loads_both_ways():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    fused = FusedConv2dReLU(3, 8, 3, padding=1)
    fused.load_state_dict(conv.state_dict())
    x = torch.randn(2, 3, 8, 8)
    assert rel_err(fused(x), torch.relu(conv(x))) <= 1e-5
    conv2 = nn.Conv2d(3, 8, 3, padding=1)
    conv2.load_state_dict(fused.state_dict())
    assert torch.equal(conv2.weight, conv.weight)


def test_from_conv_shares_parameters():
    conv = nn.Conv2d(3, 8, 3, stride=2, padding="valid", bias=False)
    fused = FusedConv2dReLU.from_conv(conv)
    assert fused.weight is conv.weight and fused.bias is None
    assert fused.stride == (2, 2) and fused.padding == (0, 0)
    with torch.no_grad():
        conv.weight.mul_(2)
    x = torch.randn(1, 3, 9, 9)
    assert rel_err(fused(x), torch.relu(conv(x))) <= 1e-5


def test_from_conv_same_padding():
    conv = nn.Conv2d(3, 4, 5, padding="same", dilation=2)
    fused = FusedConv2dReLU.from_conv(conv)
    assert fused.padding == (4, 4) and fused.bias is conv.bias
    x = torch.randn(1, 3, 10, 10)
    assert rel_err(fused(x), torch.relu(conv(x))) <= 1e-5


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_from_conv_refuses_other_padding_modes(mode):
    with pytest.raises(ValueError, match="padding_mode"):
        FusedConv2dReLU.from_conv(nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode))
    with pytest.raises(ValueError, match="padding_mode"):
        FusedConv2dReLU(3, 4, 3, padding=1, padding_mode=mode)


def test_from_conv_refuses_non_conv_and_asymmetric_same():
    with pytest.raises(ValueError, match="nn.Conv2d"):
        FusedConv2dReLU.from_conv(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="asymmetric"):
        FusedConv2dReLU.from_conv(nn.Conv2d(3, 4, 4, padding="same"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(in_channels=0, out_channels=4, kernel_size=3), "in_channels"),
        (dict(in_channels=3, out_channels=4, kernel_size=3, groups=2), "divisible by groups"),
        (dict(in_channels=3, out_channels=4, kernel_size=(3, 3, 3)), "kernel_size"),
        (dict(in_channels=3, out_channels=4, kernel_size=3, padding="same", stride=2), "stride 1"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedConv2dReLU(**kwargs)


def test_repr_reads_like_conv2d():
    text = repr(FusedConv2dReLU(3, 16, 3, padding=1, groups=1, bias=False))
    assert text == "FusedConv2dReLU(3, 16, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)"


def test_channels_last_preserved():
    fused = FusedConv2dReLU(8, 16, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 7, 7).to(memory_format=torch.channels_last)
    y = fused(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    ref = torch.relu(F.conv2d(x.double(), fused.weight.double(), fused.bias.double(), padding=1))
    assert rel_err(y, ref) <= TOLERANCES["conv"][torch.float32]


def test_autocast_bf16_on_cpu_runs_in_bf16_with_fp32_parameter_grads():
    fused = FusedConv2dReLU(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused(x)
    assert y.dtype == torch.bfloat16
    ref = torch.relu(F.conv2d(x.double(), fused.weight.double(), fused.bias.double(), padding=1))
    assert rel_err(y, ref) <= TOLERANCES["conv"][torch.bfloat16]
    y.float().sum().backward()
    assert fused.weight.grad.dtype == torch.float32 and fused.bias.grad.dtype == torch.float32


def test_autocast_leaves_float64_alone():
    fused = FusedConv2dReLU(3, 4, 3).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused(torch.randn(1, 3, 5, 5, dtype=torch.float64))
    assert y.dtype == torch.float64


def test_uses_selected_backend():
    fused = FusedConv2dReLU(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 6, 6)
    outs = {}
    for backend in fastmtl.available_backends():
        if backend in ("torch", "cpp"):
            with fastmtl.use_backend(backend):
                outs[backend] = fused(x)
    assert "torch" in outs
    for y in outs.values():
        assert rel_err(y, outs["torch"]) <= 1e-5


def test_train_refused_when_inference_only():
    fused = FusedConv2dReLU(3, 4, 3)
    fused.inference_only = True
    fused.eval()
    with pytest.raises(RuntimeError, match="inference only"):
        fused.train()
    assert not fused.training


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_channels_last_matches_float64(dtype):
    fused = FusedConv2dReLU(16, 32, 3, padding=1).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4, 16, 20, 20, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=dtype):
        y = fused(x)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    ref = torch.relu(F.conv2d(x.double(), fused.weight.double(), fused.bias.double(), padding=1))
    assert rel_err(y, ref) <= TOLERANCES["conv"][dtype]
    y.float().sum().backward()
    assert fused.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_a_branch_without_gradient_skips_its_backward(backend):
    """torch.autograd.grad of one head's loss must not run the other head's convolution backward (per-task
    gradients of gradient-level weighting would otherwise cost K backwards of every head). The per-task losses
    come out of one masked_multitask_loss node, so both heads are reachable from either loss."""
    if not fastmtl.backends.can_run(backend, torch.device("cpu"))[0]:
        pytest.skip(f"backend {backend} cannot run CPU tensors here")
    torch.manual_seed(0)
    shared = torch.randn(2, 4, 8, 8, requires_grad=True)
    head_a, head_b = FusedConv2dReLU(4, 4, 3, padding=1), FusedConv2dReLU(4, 4, 3, padding=1)
    targets = {"a": torch.randn(2, 4, 8, 8), "b": torch.randn(2, 4, 8, 8)}
    kinds = {"a": "mse", "b": "mse"}
    with fastmtl.use_backend(backend):
        _, losses = fastmtl.masked_multitask_loss({"a": head_a(shared), "b": head_b(shared)}, targets, kinds)
        loss_a, loss_b = losses["a"], losses["b"]
        with OpCounter() as counter:
            (grad_a,) = torch.autograd.grad(loss_a, shared, retain_graph=True)
        (expected,) = torch.autograd.grad(F.mse_loss(head_a(shared), targets["a"]), shared)
    assert torch.allclose(grad_a, expected)
    if backend == "cpp":  # the fused op: one backward call, for head a only
        assert counter.counts.get("fastmtl.conv_bias_relu_backward", 0) == 1, counter.counts
    else:  # the reference, and triton's default backward (fused epilogue, then ATen): one convolution backward
        assert counter.counts.get("aten.convolution_backward", 0) == 1, counter.counts
    (grad_b,) = torch.autograd.grad(loss_b, shared)  # and the other head still back-propagates
    assert grad_b.abs().sum() > 0


def test_unbatched_input_as_conv2d():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    fused = FusedConv2dReLU.from_conv(conv)
    x = torch.randn(3, 6, 5, requires_grad=True)
    y = fused(x)
    ref = torch.relu(conv(x.detach()))
    assert y.shape == (4, 6, 5)
    assert rel_err(y, ref) <= 1e-5
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_meta_tensors_give_shapes_without_computing():
    fused = FusedConv2dReLU(3, 4, 3, stride=2, device="meta")
    y = fused(torch.empty(2, 3, 9, 9, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 4, 4, 4)


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        ([[1.0]], TypeError, "x must be a torch.Tensor"),
        (torch.ones(1, 3, 5, 5, dtype=torch.int64), TypeError, r"x must have the dtype of weight \(torch.float32\)"),
        (torch.ones(1, 3, 5, 5, dtype=torch.float64), TypeError, r"x must have the dtype of weight"),
    ],
)
def test_forward_rejects_bad_input_naming_it(x, error, match):
    with pytest.raises(error, match=match):
        FusedConv2dReLU(3, 4, 3)(x)
