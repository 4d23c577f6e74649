"""Training-step time of task weightings: EW against gradient-level methods in representation mode.

The model is a 3-stage conv trunk (3 -> 32 -> 64 -> 128 channels, 3x3 convolutions, ReLU, 2x2 max-pooling after
each stage) with 4 heads on its 128x6x6 output: two classification heads (global pool + linear) and two dense
heads (3x3 conv + ReLU + 1x1 conv, per-pixel regression and 5-class segmentation); batch 32 of 48x48 images.
One step is zero_grad, forward, ``weighting.backward`` and an SGD step. Target: PCGrad and MGDA in
representation mode within 1.3x of EW. ``pcgrad-params`` (one trunk backward per task) shows what the
representation mode saves.

Run ``python -m pytest benchmarks/bench_weighting.py --benchmark-only`` (plain ``pytest`` only smoke-runs it), or
``python benchmarks/bench_weighting.py ew pcgrad mgda`` for round-robin medians and ratios (fairer on a busy machine).

``test_demo_model_train_step`` times the same on the ``make demo`` model through ``Trainer.train_step``.

Measured 2026-11-27 on the shared 2-core build machine, 1 thread, round-robin medians over 3 runs of 10 rounds (EW
110-235 ms/step, the machine's load varied): PCGrad 1.03-1.05x EW, MGDA 1.02-1.08x, IMTL-G 1.01-1.04x, Nash-MTL
0.91-1.05x, UPGrad 1.02-1.07x, CAGrad 1.03-1.09x, GradVac 1.04-1.11x, Aligned-MTL 1.00-1.11x, GradNorm
1.03-1.09x; PCGrad in parameter mode 2.3-2.6x.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmtl.mtl import weighting

TASKS = ["digit", "parity", "depth", "segment"]
BATCH, SIZE = 32, 48
METHODS = ["ew", "pcgrad", "mgda", "imtl_g", "nash_mtl", "upgrad", "cagrad", "pcgrad-params"]
CUDA = torch.cuda.is_available()


class BenchModel(nn.Module):
    """3-stage conv trunk and 4 heads (see the module docstring)."""

    def __init__(self):
        super().__init__()
        layers, channels = [], 3
        for out in (32, 64, 128):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        self.trunk = nn.Sequential(*layers)
        self.digit, self.parity = nn.Linear(128, 10), nn.Linear(128, 2)

        def dense(out):
            return nn.Sequential(nn.Conv2d(128, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, out, 1))

        self.depth, self.segment = dense(1), dense(5)

    def losses(self, batch):
        x, digit, parity, depth, segment = batch
        features = [self.trunk(x)]
        z = features[0]
        pooled = z.mean((2, 3))
        losses = {
            "digit": F.cross_entropy(self.digit(pooled).float(), digit),
            "parity": F.cross_entropy(self.parity(pooled).float(), parity),
            "depth": F.l1_loss(self.depth(z).float().squeeze(1), depth),
            "segment": F.cross_entropy(self.segment(z).float(), segment),
        }
        return losses, features


def make_batch(device):
    g = torch.Generator().manual_seed(0)
    side = SIZE // 8
    batch = (
        torch.randn(BATCH, 3, SIZE, SIZE, generator=g),
        torch.randint(0, 10, (BATCH,), generator=g),
        torch.randint(0, 2, (BATCH,), generator=g),
        torch.rand(BATCH, side, side, generator=g),
        torch.randint(0, 5, (BATCH, side, side), generator=g),
    )
    return tuple(t.to(device) for t in batch)


def _cases():
    cases = [pytest.param("cpu", m, torch.float32, id=f"cpu-fp32-{m}") for m in METHODS]
    if CUDA:
        cases += [pytest.param("cuda", m, torch.bfloat16, id=f"cuda-bf16-{m}") for m in METHODS]
    return cases


@pytest.mark.parametrize("device, method, dtype", _cases())
def test_train_step(bench, device, method, dtype):
    torch.manual_seed(0)
    device = torch.device(device)
    model = BenchModel().to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    name, mode = (method.split("-")[0], "params") if method.endswith("-params") else (method, "representation")
    options = {} if weighting.registry()[name].family == "loss" else {"mode": mode}
    strategy = weighting.create(name, TASKS, **options).to(device)
    optimizer = torch.optim.SGD(list(model.parameters()) + list(strategy.parameters()), lr=1e-3)
    batch = make_batch(device)
    shared = list(model.trunk.parameters())

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            losses, features = model.losses(batch)
        strategy.backward(losses, features=features, shared_params=shared)
        optimizer.step()

    bench(
        step,
        op="train_step",
        mode="fwd+bwd+sgd",
        shape=f"{BATCH}x3x{SIZE}x{SIZE} trunk3 heads4",
        dtype=dtype,
        backend=method,
        device=device,
    )
    # every parameter got a gradient
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


DEMO_METHODS = ["ew", "pcgrad", "mgda", "pcgrad-params"]


def _demo_cases():
    cases = [pytest.param("cpu", m, id=f"cpu-{m}") for m in DEMO_METHODS]
    if CUDA:
        cases += [pytest.param("cuda", m, id=f"cuda-{m}") for m in DEMO_METHODS]
    return cases


@pytest.mark.parametrize("device, method", _demo_cases())
def test_demo_model_train_step(bench, device, method):
    """One ``Trainer.train_step`` of the ``make demo`` model (multi-scale trunk, dense heads with skips) on tasks
    cls, seg, depth, batch 32 of 48x48 MultiDigits scenes, default backend: the target is PCGrad and MGDA in
    representation mode within 1.3x of EW."""
    from fastmtl.mtl import Trainer, presets
    from fastmtl.mtl.config import TrainConfig

    name, mode = (method.split("-")[0], "params") if method.endswith("-params") else (method, None)
    config = TrainConfig(tasks=["cls", "seg", "depth"], train_size=BATCH, val_size=8, weighting=name,
                         weighting_options={"mode": mode} if mode else {}, progress=False, device=device)
    train, val = presets.build_datasets(config)
    trainer = Trainer(presets.build_model(config), presets.build_tasks(config), train, val, config)
    batch = {k: (v.to(trainer.device) if isinstance(v, torch.Tensor) else {t: x.to(trainer.device)
                                                                           for t, x in v.items()})
             for k, v in train.batch(torch.arange(BATCH)).items()}

    def step():
        trainer.train_step(batch)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()

    bench(step, op="demo_train_step", mode="fwd+bwd+adamw", shape=f"{BATCH}x1x48x48 cls,seg,depth",
          dtype=torch.float32, backend=method, device=trainer.device)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainer.model.parameters())


def _interleaved_ratios(methods=("ew", "pcgrad", "mgda"), rounds=15, device="cpu"):
    """Time the methods round-robin (fair under a noisy, shared machine); return each one's median step in ms."""
    import time

    device = torch.device(device)
    steps = {}
    for method in methods:
        torch.manual_seed(0)
        model = BenchModel().to(device)
        name, mode = (method.split("-")[0], "params") if method.endswith("-params") else (method, "representation")
        options = {} if weighting.registry()[name].family == "loss" else {"mode": mode}
        strategy = weighting.create(name, TASKS, **options).to(device)
        optimizer = torch.optim.SGD(list(model.parameters()) + list(strategy.parameters()), lr=1e-3)
        batch, shared = make_batch(device), list(model.trunk.parameters())

        def step(model=model, strategy=strategy, optimizer=optimizer, batch=batch, shared=shared):
            optimizer.zero_grad(set_to_none=True)
            losses, features = model.losses(batch)
            strategy.backward(losses, features=features, shared_params=shared)
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()

        step()
        steps[method] = step
    times = {m: [] for m in methods}
    for _ in range(rounds):
        for method in methods:
            start = time.perf_counter()
            steps[method]()
            times[method].append((time.perf_counter() - start) * 1e3)
    return {m: sorted(t)[len(t) // 2] for m, t in times.items()}


if __name__ == "__main__":
    import sys

    chosen = sys.argv[1:] or ["ew", "pcgrad", "mgda"]
    medians = _interleaved_ratios(chosen)
    for method, ms in medians.items():
        print(f"{method:>14}: {ms:8.1f} ms/step  ({ms / medians[chosen[0]]:.2f}x {chosen[0]})")
