"""Task weighting on CUDA: the same results as on the CPU, and no host synchronisation in a step.

Run by benchmarks/gpu_check.sh on a lent GPU (these tests skip, saying why, without one).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmtl.mtl import weighting

TASKS = ["a", "b", "c"]
ALL = ["ew", "fixed", "datasize", "uw", "dwa", "rlw", "famo",
       "gradnorm", "pcgrad", "mgda", "cagrad", "imtl_g", "gradvac", "aligned_mtl", "upgrad", "nash_mtl"]  # fmt: skip
# torch.linalg.eigh checks its convergence flag on the host (documented in AlignedMTL).
SYNCHRONISING = {"aligned_mtl"}


class Toy(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.heads = nn.ModuleDict({t: nn.Conv2d(8, 2, 1) for t in TASKS})
        self.to(dtype)

    def losses(self, x, ys):
        features = [self.trunk(x)]
        losses = {t: F.mse_loss(self.heads[t](features[0]), ys[i]) for i, t in enumerate(TASKS)}
        return losses, features


def options(name, device):
    if name == "fixed":
        return {"weights": {"a": 0.5, "b": 1.0, "c": 2.0}}
    if name in ("rlw", "pcgrad", "gradvac"):
        return {"generator": torch.Generator(device=device).manual_seed(0)}
    return {}


def step(model, strategy, x, ys, counts):
    model.zero_grad(set_to_none=True)
    losses, features = model.losses(x, ys)
    return strategy.backward(losses, features=features, shared_params=list(model.trunk.parameters()), counts=counts)


def inputs(device, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 6, 6, generator=g, dtype=dtype)
    ys = [torch.randn(4, 2, 6, 6, generator=g, dtype=dtype) for _ in TASKS]
    counts = {t: torch.tensor(i + 2) for i, t in enumerate(TASKS)}
    return x.to(device), [y.to(device) for y in ys], {t: c.to(device) for t, c in counts.items()}


@pytest.mark.cuda
@pytest.mark.parametrize("name", [n for n in ALL if n not in SYNCHRONISING])
def test_a_step_never_waits_for_the_device(name):
    device = torch.device("cuda")
    model = Toy(torch.float32).to(device)
    strategy = weighting.create(name, TASKS, **options(name, device)).to(device)
    x, ys, counts = inputs(device, torch.float32)
    step(model, strategy, x, ys, counts)  # warm-up: lazy initialisation, cached index tensors
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            step(model, strategy, x, ys, counts)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.cuda
@pytest.mark.parametrize("name", [n for n in ALL if n not in ("rlw", "pcgrad", "gradvac")])
def test_cuda_matches_cpu_in_float64(name):
    torch.manual_seed(0)
    cpu_model = Toy(torch.float64)
    cuda_model = Toy(torch.float64).cuda()
    cuda_model.load_state_dict(cpu_model.state_dict())
    grads = {}
    for device, model in (("cpu", cpu_model), ("cuda", cuda_model)):
        strategy = weighting.create(name, TASKS, **options(name, device)).to(device=device, dtype=torch.float64)
        x, ys, counts = inputs(device, torch.float64)
        step(model, strategy, x, ys, counts)
        used = step(model, strategy, x, ys, counts)
        grads[device] = ([used[t].cpu() for t in TASKS], [p.grad.cpu() for p in model.parameters()])
    for a, b in zip(grads["cpu"][0] + grads["cpu"][1], grads["cuda"][0] + grads["cuda"][1]):
        rtol = 1e-4 if name == "cagrad" else 1e-8  # CAGrad's iterative solve may take a different rounding path
        torch.testing.assert_close(b, a, rtol=rtol, atol=1e-10)
