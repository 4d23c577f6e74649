"""Module-level benchmarks: what fuse() and FusedTrunk buy in a whole model.

* ``resnet18_eval`` (mode ``fwd``): torchvision ResNet-18 in eval mode (random weights, no download), the original
  (``eager``, and ``compile`` = torch.compile of it) against ``fastmtl.fuse(model)`` (9 conv+BN+ReLU sites fused,
  BN folded) run on each fastmtl backend. CPU: 8x3x128x128 float32; CUDA: 32x3x224x224 bf16 channels_last.
* ``trunk_train_step`` (mode ``fwd+bwd+sgd``): one SGD step (forward, loss, backward, optimizer step) of
  ``FusedTrunk(3, [(32, 2), (64, 2), (128, 2)])`` on each fastmtl backend against the same trunk built from
  ``nn.Conv2d + nn.ReLU`` (``eager``, and ``compile``). CPU: 8x3x64x64 float32; CUDA: 32x3x128x128 under bf16
  autocast, channels_last.

torch.compile variants are timed only when benchmarks are timed (the smoke run skips their long compile).
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from torch import nn

import fastmtl
from fastmtl import FusedConv2dReLU, FusedTrunk, backends

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import compile_static  # noqa: E402  (beside this file)

torchvision = pytest.importorskip("torchvision", reason="the module benchmarks time torchvision's ResNet-18")

CUDA = torch.cuda.is_available()
TRUNK_STAGES = [(32, 2), (64, 2), (128, 2)]
VARIANTS = ["eager", "compile", "torch", "cpp", "cuda", "triton", "auto"]

# (device, shape, dtype, channels_last)
RESNET_CASES = [pytest.param("cpu", (8, 3, 128, 128), torch.float32, False, id="cpu-8x3x128x128-float32")]
TRUNK_CASES = [pytest.param("cpu", (8, 3, 64, 64), torch.float32, False, id="cpu-8x3x64x64-float32")]
if CUDA:
    RESNET_CASES.append(
        pytest.param("cuda", (32, 3, 224, 224), torch.bfloat16, True, id="cuda-32x3x224x224-bf16-cl")
    )
    TRUNK_CASES.append(pytest.param("cuda", (32, 3, 128, 128), torch.bfloat16, True, id="cuda-32x3x128x128-bf16-cl"))


def _skip_unless_variant(variant: str, device: str, smoke: bool) -> None:
    if variant in ("eager", "compile"):
        if variant == "compile" and smoke:
            pytest.skip("smoke run: torch.compile of a whole model is timed only with --benchmark-only")
        return
    if variant == "auto":
        if device != "cuda":
            pytest.skip("auto is a distinct variant on CUDA only (on the CPU it is cpp)")
        return
    ok, why = backends.can_run(variant, torch.device(device))
    if not ok:
        pytest.skip(f"backend {variant} cannot run {device} tensors here: {why}")
    if variant == "triton" and device == "cpu":
        pytest.skip("triton on CPU tensors is the interpreter: far too slow for whole models")


def _with_backend(fn, variant: str):
    if variant in ("eager", "compile"):
        return fn

    def run(*args):
        with fastmtl.use_backend(variant):
            return fn(*args)

    return run


def _resnet18(device, dtype, channels_last) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # non-trivial BN statistics, as a trained model has
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model = model.eval().to(device=device, dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


@pytest.mark.parametrize("device, shape, dtype, channels_last", RESNET_CASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_resnet18_eval(bench, smoke, variant, device, shape, dtype, channels_last):
    _skip_unless_variant(variant, device, smoke)
    model = _resnet18(device, dtype, channels_last)
    if variant not in ("eager", "compile"):
        model = fastmtl.fuse(model)
        assert fastmtl.nn.fuse_report(model).num_fused == 9
    elif variant == "compile":
        model = compile_static(model)
    x = torch.randn(*shape, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def forward(inp):
        with torch.no_grad():
            return model(inp)

    forward = _with_backend(forward, variant)
    name = "x".join(map(str, shape)) + ("-cl" if channels_last else "")
    bench(lambda: forward(x), op="resnet18_eval", mode="fwd", shape=name, dtype=dtype, backend=variant,
          device=torch.device(device))


def _unfused_twin(trunk: FusedTrunk) -> nn.Sequential:
    """The same trunk from nn.Conv2d + nn.ReLU, with the same weights."""
    stages = []
    for stage in trunk.stages:
        layers: list[nn.Module] = []
        for m in stage:
            if isinstance(m, FusedConv2dReLU):
                conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, padding=m.padding)
                conv.load_state_dict(m.state_dict())
                layers += [conv, nn.ReLU(inplace=True)]
            else:
                layers.append(copy.deepcopy(m))
        stages.append(nn.Sequential(*layers))
    return nn.Sequential(*stages)


@pytest.mark.parametrize("device, shape, dtype, channels_last", TRUNK_CASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_trunk_train_step(bench, smoke, variant, device, shape, dtype, channels_last):
    _skip_unless_variant(variant, device, smoke)
    torch.manual_seed(0)
    trunk = FusedTrunk(shape[1], TRUNK_STAGES)
    model: nn.Module = trunk if variant not in ("eager", "compile") else _unfused_twin(trunk)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    forward = compile_static(model) if variant == "compile" else model
    x = torch.randn(*shape, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    use_autocast = dtype != torch.float32  # low precision = autocast with float32 parameters, as in training

    def step(inp):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype, enabled=use_autocast):
            y = forward(inp)
        loss = y.float().square().mean()
        loss.backward()
        optimizer.step()
        return loss

    step = _with_backend(step, variant)
    name = "x".join(map(str, shape)) + ("-cl" if channels_last else "")
    bench(lambda: step(x), op="trunk_train_step", mode="fwd+bwd+sgd", shape=name, dtype=dtype, backend=variant,
          device=torch.device(device))
