"""Task weighting, the backward pass: each strategy's ``backward`` on a toy two-head model against autograd."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmtl.mtl import weighting
from fastmtl.mtl.weighting import _autograd

LOSS_LEVEL = ["ew", "fixed", "datasize", "uw", "dwa", "rlw", "famo"]
GRADIENT_LEVEL = ["gradnorm", "pcgrad", "mgda", "cagrad", "imtl_g", "gradvac", "aligned_mtl", "upgrad", "nash_mtl"]
TASKS = ["a", "b"]


def options(name, seed=0):
    """Constructor options that make each strategy deterministic."""
    if name == "fixed":
        return {"weights": {"a": 0.5, "b": 2.0}}
    if name in ("rlw", "pcgrad", "gradvac"):
        return {"generator": torch.Generator().manual_seed(seed)}
    return {}


class Toy(nn.Module):
    """A two-layer trunk whose two outputs feed two heads (head a reads both, head b the second)."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.trunk1, self.trunk2 = nn.Linear(5, 6), nn.Linear(6, 4)
        self.head_a, self.head_b = nn.Linear(10, 1), nn.Linear(4, 3)
        self.to(dtype)

    def shared(self):
        return list(self.trunk1.parameters()) + list(self.trunk2.parameters())

    def encode(self, x):
        z1 = torch.tanh(self.trunk1(x))
        return [z1, torch.tanh(self.trunk2(z1))]

    def losses(self, features, batch):
        _, ya, yb = batch
        la = F.mse_loss(self.head_a(torch.cat(features, 1)).squeeze(1), ya)
        lb = F.cross_entropy(self.head_b(features[1]), yb)
        return {"a": la, "b": lb}


def make_batch(n=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=dtype)
    return x, torch.randn(n, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def grads_of(model):
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def run(strategy, model, batch, counts=None):
    model.zero_grad(set_to_none=True)
    features = model.encode(batch[0])
    losses = model.losses(features, batch)
    used = strategy.backward(losses, features=features, shared_params=model.shared(), counts=counts)
    return used, grads_of(model)


def assert_grads_close(got, expected, rtol=1e-10):
    assert got.keys() == expected.keys()
    for name in got:
        assert got[name] is not None, name
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=1e-12, msg=name)


def weighted_sum_grads(model, batch, weights):
    """Gradients of sum_t w_t L_t for every model parameter (w detached)."""
    model.zero_grad(set_to_none=True)
    losses = model.losses(model.encode(batch[0]), batch)
    sum(weights[t].detach() * losses[t] for t in TASKS).backward()
    return grads_of(model)


def test_ew_backward_is_the_sum_of_the_losses():
    model, batch = Toy(), make_batch()
    used, got = run(weighting.create("ew", TASKS), model, batch)
    assert all(float(w) == 1.0 for w in used.values())
    model.zero_grad(set_to_none=True)
    losses = model.losses(model.encode(batch[0]), batch)
    (losses["a"] + losses["b"]).backward()
    assert_grads_close(got, grads_of(model))


@pytest.mark.parametrize("name", LOSS_LEVEL)
def test_loss_level_backward_is_the_weighted_sum(name):
    model, batch = Toy(), make_batch()
    strategy = weighting.create(name, TASKS, **options(name)).to(torch.float64)
    counts = {"a": torch.tensor(3), "b": torch.tensor(5)}
    used, got = run(strategy, model, batch, counts=counts)
    assert set(used) == set(TASKS) and all(w.dim() == 0 and not w.requires_grad for w in used.values())
    assert_grads_close(got, weighted_sum_grads(model, batch, used))


def test_uw_backward_trains_the_log_variances():
    model, batch = Toy(), make_batch()
    uw = weighting.create("uw", TASKS, init=0.2).to(torch.float64)
    run(uw, model, batch)
    losses = model.losses(model.encode(batch[0]), batch)
    expected = 1 - torch.exp(-uw.log_vars.detach()) * torch.stack([losses["a"].detach(), losses["b"].detach()])
    torch.testing.assert_close(uw.log_vars.grad, expected)


@pytest.mark.parametrize("name", GRADIENT_LEVEL)
def test_gradient_level_backward_matches_autograd(name):
    """Trunk: grad of sum_t w_t L_t (the combined representation gradient, back-propagated once); heads: their
    own task's gradient, times w_t where the strategy scales heads."""
    model, batch = Toy(), make_batch()
    strategy = weighting.create(name, TASKS, **options(name))
    used, got = run(strategy, model, batch)
    expected = weighted_sum_grads(model, batch, used)
    if not strategy.scale_heads:
        unweighted = weighted_sum_grads(model, batch, {t: torch.tensor(1.0, dtype=torch.float64) for t in TASKS})
        for key in expected:
            if key.startswith("head"):
                expected[key] = unweighted[key]
    assert_grads_close(got, expected, rtol=1e-9)


@pytest.mark.parametrize("name", GRADIENT_LEVEL)
def test_gradient_level_weights_come_from_the_representation_gradients(name):
    model, batch = Toy(), make_batch()
    used, _ = run(weighting.create(name, TASKS, **options(name, seed=3)), model, batch)
    features = model.encode(batch[0])
    losses = model.losses(features, batch)
    rows = []
    for t in TASKS:
        grads = torch.autograd.grad(losses[t], features, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    twin = weighting.create(name, TASKS, **options(name, seed=3))
    _, weights = twin.combine(torch.stack(rows), torch.stack([losses[t].detach() for t in TASKS]))
    torch.testing.assert_close(torch.stack([used[t] for t in TASKS]), weights, rtol=1e-9, atol=1e-12)


def test_pcgrad_representation_mode_equals_the_manual_computation():
    model, batch = Toy(), make_batch()
    _, got = run(weighting.create("pcgrad", TASKS, generator=torch.Generator().manual_seed(1)), model, batch)
    features = model.encode(batch[0])
    losses = model.losses(features, batch)
    per_task = [torch.autograd.grad(losses[t], features, retain_graph=True) for t in TASKS]
    grads = torch.stack([torch.cat([g.reshape(-1) for g in gs]) for gs in per_task])
    direction = weighting.aggregate("pcgrad", grads, generator=torch.Generator().manual_seed(1))
    # Per-task gradients are total derivatives (z1's includes the path through z2), so the combined one at z1
    # drives trunk1 and the combined one at z2 drives trunk2.
    pieces = [direction[:48].view(8, 6), direction[48:].view(8, 4)]
    trunk1 = torch.autograd.grad(features[0], list(model.trunk1.parameters()), pieces[0], retain_graph=True)
    trunk2 = torch.autograd.grad(features[1], list(model.trunk2.parameters()), pieces[1], retain_graph=True)
    trunk = trunk1 + trunk2
    head_a = torch.autograd.grad(losses["a"], list(model.head_a.parameters()), retain_graph=True)
    head_b = torch.autograd.grad(losses["b"], list(model.head_b.parameters()))
    expected = dict(zip(["trunk1.weight", "trunk1.bias", "trunk2.weight", "trunk2.bias"], trunk))
    expected.update(zip(["head_a.weight", "head_a.bias"], head_a))
    expected.update(zip(["head_b.weight", "head_b.bias"], head_b))
    assert_grads_close(got, expected)


@pytest.mark.parametrize("name", ["pcgrad", "mgda", "nash_mtl", "gradnorm"])
def test_parameter_mode_combines_the_trunk_parameter_gradients(name):
    model, batch = Toy(), make_batch()
    used, got = run(weighting.create(name, TASKS, mode="params", **options(name, seed=2)), model, batch)
    features = model.encode(batch[0])
    losses = model.losses(features, batch)
    shared = model.shared()
    grads = torch.stack(
        [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], shared, retain_graph=True)]) for t in TASKS]
    )
    twin = weighting.create(name, TASKS, mode="params", **options(name, seed=2))
    direction, weights = twin.combine(grads, torch.stack([losses[t].detach() for t in TASKS]))
    torch.testing.assert_close(torch.stack([used[t] for t in TASKS]), weights, rtol=1e-9, atol=1e-12)
    flat = torch.cat([got[k].reshape(-1) for k in ("trunk1.weight", "trunk1.bias", "trunk2.weight", "trunk2.bias")])
    torch.testing.assert_close(flat, direction, rtol=1e-9, atol=1e-12)


def test_head_parameters_are_found_behind_the_features():
    model, batch = Toy(), make_batch()
    features = model.encode(batch[0])
    losses = model.losses(features, batch)
    found = _autograd.head_parameters(losses["a"], features, model.shared())
    assert {id(p) for p in found} == {id(p) for p in model.head_a.parameters()}
    everything = _autograd.head_parameters(losses["b"], [], model.shared())
    assert {id(p) for p in everything} == {id(p) for p in model.head_b.parameters()}


def test_a_task_with_a_constant_loss_contributes_nothing():
    model, batch = Toy(), make_batch()
    features = model.encode(batch[0])
    losses = model.losses(features, batch)
    losses["b"] = torch.zeros((), dtype=torch.float64)
    weighting.create("pcgrad", TASKS).backward(losses, features=features)
    got = grads_of(model)
    model.zero_grad(set_to_none=True)
    model.losses(model.encode(batch[0]), batch)["a"].backward()
    expected = grads_of(model)
    for key in ("trunk1.weight", "trunk2.bias", "head_a.weight"):
        torch.testing.assert_close(got[key], expected[key])
    assert got["head_b.weight"] is None


def test_backward_accumulates_into_existing_gradients():
    model, batch = Toy(), make_batch()
    strategy = weighting.create("mgda", TASKS)
    _, once = run(strategy, model, batch)
    features = model.encode(batch[0])
    strategy.backward(model.losses(features, batch), features=features)
    for key, value in grads_of(model).items():
        torch.testing.assert_close(value, 2 * once[key])


def test_backward_rejects_bad_input():
    model, batch = Toy(), make_batch()
    features = model.encode(batch[0])
    losses = model.losses(features, batch)
    with pytest.raises(ValueError, match="features"):
        weighting.create("pcgrad", TASKS).backward(losses)
    with pytest.raises(ValueError, match="shared_params"):
        weighting.create("pcgrad", TASKS, mode="params").backward(losses, features=features)
    with pytest.raises(ValueError, match="exactly the tasks"):
        weighting.create("ew", TASKS).backward({"a": losses["a"]})
    with pytest.raises(ValueError, match="0-dim"):
        weighting.create("ew", TASKS).backward({"a": losses["a"], "b": torch.ones(2)})


class ConvToy(nn.Module):
    """A small conv trunk with two heads, for the autocast test."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head_a, self.head_b = nn.Conv2d(8, 1, 1), nn.Linear(8, 4)

    def step(self, strategy, x, ya, yb):
        features = [self.trunk(x)]
        la = F.mse_loss(self.head_a(features[0]).float().squeeze(1), ya)
        lb = F.cross_entropy(self.head_b(features[0].mean((2, 3))).float(), yb)
        return strategy.backward({"a": la, "b": lb}, features=features, shared_params=list(self.trunk.parameters()))


@functools.lru_cache(maxsize=None)
def _autocast_errors(name):
    """Relative error of each parameter gradient under bf16 autocast against float32, for strategy ``name``."""
    g = torch.Generator().manual_seed(0)
    x, ya = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 8, 8, generator=g)
    yb = torch.randint(0, 4, (4,), generator=g)
    torch.manual_seed(0)
    reference = ConvToy()
    model = copy.deepcopy(reference)
    reference.step(weighting.create(name, TASKS, **options(name)), x, ya, yb)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        used = model.step(weighting.create(name, TASKS, **options(name)), x, ya, yb)
    assert all(torch.isfinite(w) for w in used.values())
    errors = {}
    for (key, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.grad is not None and p.grad.dtype == torch.float32, key
        errors[key] = float((p.grad - q.grad).norm() / q.grad.norm())
    return errors


@pytest.mark.parametrize("name", ["uw", "famo"] + GRADIENT_LEVEL)
def test_bfloat16_autocast_on_cpu(name):
    """Under bf16 autocast every strategy runs, and strays from its float32 result about as far as EW does."""
    baseline = dict(_autocast_errors("ew"))
    assert max(baseline.values()) < 0.5
    for key, error in _autocast_errors(name).items():
        assert error < 2 * baseline[key] + 0.05, (key, error, baseline[key])


def _state_dict_copy(module):
    return copy.deepcopy(module.state_dict())


@pytest.mark.parametrize("name", LOSS_LEVEL + GRADIENT_LEVEL)
def test_state_dict_round_trip(name):
    model, batches = Toy(), [make_batch(seed=s) for s in range(4)]
    first = weighting.create(name, TASKS, **options(name, seed=0)).to(torch.float64)
    counts = {"a": torch.tensor(2), "b": torch.tensor(7)}
    for step, batch in enumerate(batches[:2]):
        run(first, model, batch, counts)
        first.epoch_end({"a": 1.0 + step, "b": 2.0 / (1 + step)})
        if list(first.parameters()):
            with torch.no_grad():
                for p in first.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
    saved = _state_dict_copy(first)
    second = weighting.create(name, TASKS, **options(name, seed=99)).to(torch.float64)
    second.load_state_dict(saved)
    twin = copy.deepcopy(model)
    used_first, grads_first = run(first, model, batches[2], counts)
    used_second, grads_second = run(second, twin, batches[2], counts)
    for t in TASKS:
        torch.testing.assert_close(used_first[t], used_second[t], rtol=0, atol=0)
    assert_grads_close(grads_first, grads_second, rtol=0)


def test_a_frozen_feature_gets_no_gradient_and_the_rest_still_trains():
    model, batch = Toy(), make_batch()
    features = model.encode(batch[0])
    features[0] = features[0].detach()  # as if the first stage were frozen
    losses = model.losses(features, batch)
    weighting.create("mgda", TASKS).backward(losses, features=features)
    assert model.trunk2.weight.grad is not None and model.head_a.weight.grad is not None
    assert torch.isfinite(model.trunk2.weight.grad).all()


@pytest.mark.parametrize("name", ["uw", "famo", "gradnorm", "pcgrad", "mgda", "nash_mtl"])
def test_loss_scale_scales_every_gradient_and_no_weight(name):
    """fp16 loss scaling: gradients (the strategy's own parameters' too) are S times the unscaled ones."""
    scale = torch.tensor(1024.0, dtype=torch.float64)
    results = []
    for loss_scale in (None, scale):
        torch.manual_seed(0)
        model, batch = Toy(), make_batch()
        strategy = weighting.create(name, TASKS, **options(name)).to(torch.float64)
        features = model.encode(batch[0])
        used = strategy.backward(model.losses(features, batch), features=features, loss_scale=loss_scale)
        own = [p.grad.clone() for p in strategy.parameters()]
        results.append((used, grads_of(model), own))
    (used, plain, own), (used_scaled, scaled, own_scaled) = results
    for t in TASKS:
        torch.testing.assert_close(used_scaled[t], used[t], rtol=1e-9, atol=0)
    for key in plain:
        torch.testing.assert_close(scaled[key], scale * plain[key], rtol=1e-9, atol=1e-12)
    for a, b in zip(own, own_scaled):
        torch.testing.assert_close(b, scale * a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", LOSS_LEVEL + GRADIENT_LEVEL)
def test_a_short_training_run_lowers_both_losses(name):
    """30 Adam steps on a fixed batch with each strategy (its own parameters trained too) lower both task losses."""
    torch.manual_seed(0)
    model, batch = Toy(), make_batch(n=16)
    strategy = weighting.create(name, TASKS, **options(name)).to(torch.float64)
    optimizer = torch.optim.Adam([*model.parameters(), *strategy.parameters()], lr=1e-2)
    counts = {"a": torch.tensor(16), "b": torch.tensor(16)}
    with torch.no_grad():
        first = {t: float(v) for t, v in model.losses(model.encode(batch[0]), batch).items()}
    for epoch in range(30):
        optimizer.zero_grad(set_to_none=True)
        run(strategy, model, batch, counts)
        optimizer.step()
        if epoch % 5 == 4:
            with torch.no_grad():
                strategy.epoch_end({t: float(v) for t, v in model.losses(model.encode(batch[0]), batch).items()})
    with torch.no_grad():
        last = {t: float(v) for t, v in model.losses(model.encode(batch[0]), batch).items()}
    for t in TASKS:
        assert last[t] < 0.9 * first[t], (t, first[t], last[t])
