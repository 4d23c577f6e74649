"""Task weighting, review fixes: Nash-MTL solves only on fresh steps, Aligned-MTL's rank under bf16/fp16,
CAGrad/UPGrad/PCGrad leave tasks without labels out, a float loss scale makes no tensor, DWA after an epoch with a
zero loss."""

import pytest
import torch
from torch import nn

from fastmtl.mtl import weighting
from fastmtl.mtl.weighting import nash_mtl

D = torch.float64


def names(k):
    return [f"t{i}" for i in range(k)]


def random_grads(k, p=9, seed=0, dtype=D):
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- 1. Nash-MTL solves only on fresh steps ----------------------------------------------------------------------


@pytest.fixture
def solves(monkeypatch):
    """Counts the Nash solves (calls of :func:`nash_mtl.nash_weights`)."""
    calls = []
    solve = nash_mtl.nash_weights

    def counted(gram, steps=20):
        calls.append(gram.shape[0])
        return solve(gram, steps)

    monkeypatch.setattr(nash_mtl, "nash_weights", counted)
    return calls


def test_nash_solves_only_on_fresh_steps_while_a_task_drops_out_and_returns(solves):
    update_every, k = 3, 3
    strategy = weighting.create("nash_mtl", names(k), update_every=update_every)
    # task 1's labels per step: left out of the solves of steps 3 and 6, back on steps 4 and 8 (not fresh)
    labelled = [True, False, True, False, True, True, False, False, True, True]
    for step, has_labels in enumerate(labelled):
        grads = random_grads(k, seed=step)
        counts = torch.full((k,), 4.0, dtype=D)
        if not has_labels:
            grads[1], counts[1] = 0, 0
        _, weights = strategy.combine(grads, None, counts)
        assert torch.isfinite(weights).all() and float(weights.max()) < 1e2, step
        assert (weights[1] > 0) == has_labels, step  # a returning task takes part before the next solve
        fresh_steps = step // update_every + 1
        assert len(solves) == fresh_steps, (step, len(solves))


def test_nash_stand_in_without_any_cached_weight_is_that_of_orthogonal_gradients(solves):
    strategy = weighting.create("nash_mtl", names(2), update_every=2)
    strategy.combine(random_grads(2, seed=1), None, torch.zeros(2, dtype=D))  # fresh, no task: nothing cached
    grads = torch.diag(torch.tensor([2.0, 0.5], dtype=D))  # orthogonal: the stand-in is the exact solution
    _, weights = strategy.combine(grads, None, torch.ones(2, dtype=D))
    assert len(solves) == 1
    torch.testing.assert_close(weights, weighting.gram_weights("nash_mtl", grads @ grads.T), rtol=1e-6, atol=0)


# ---- 2. Aligned-MTL: rank of bf16 / fp16 gradients ------------------------------------------------------------


def aligned_definition(grads):
    """Aligned-MTL's coefficients ``B 1`` in float64 with every eigenvalue kept (full rank)."""
    gram = grads.double() @ grads.double().T
    values, vectors = torch.linalg.eigh(gram)
    return (values.min().sqrt() * (vectors * values.rsqrt()) @ vectors.T).sum(1)


@pytest.mark.parametrize("dtype, cosine", [(torch.bfloat16, 0.995), (torch.float16, 0.999)])
@pytest.mark.parametrize("p", [64, 4096])
def test_aligned_mtl_keeps_independent_low_precision_gradients(dtype, cosine, p):
    for seed in range(4):
        base, other = random_grads(2, p, seed=seed)
        other = other - (other @ base) / (base @ base) * base
        other = other / other.norm() * base.norm()
        # at an angle far above the dtype's rounding (sin 0.1 / 0.045 vs eps 0.008 / 0.001), eigenvalue ratio
        # (1 - cos) / (1 + cos) below the old cutoff K eps
        second = cosine * base + (1 - cosine**2) ** 0.5 * other
        grads = torch.stack([base, second]).to(dtype)
        _, weights = weighting.create("aligned_mtl", names(2)).combine(grads)
        expected = aligned_definition(grads)
        torch.testing.assert_close(weights.double(), expected, rtol=2e-2, atol=0)
        assert float(weights.max()) < 0.5  # rank 1 would give the plain sum, coefficients ~1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [10, 1000, 100000])
@pytest.mark.parametrize("factor", [1.0, 3.0, -0.37])
def test_aligned_mtl_rank_one_low_precision_gradients(dtype, p, factor):
    for seed in range(4):
        g = random_grads(1, p, seed=seed, dtype=torch.float32)[0]
        grads = torch.stack([g, factor * g]).to(dtype)  # each rounded to the dtype: rank 1 up to rounding
        direction, _ = weighting.create("aligned_mtl", names(2)).combine(grads)
        expected = grads.float().sum(0)  # rank 1: the sum itself
        # two directions kept would give ~0 (the aligned rows have the tiny norm sqrt(lambda_min))
        assert float((direction - expected).norm()) < 1e-2 * float(expected.norm()), (seed, direction)


# ---- 3. CAGrad, UPGrad, PCGrad leave a task without labels out --------------------------------------------------


@pytest.mark.parametrize("name", ["cagrad", "upgrad", "pcgrad"])
@pytest.mark.parametrize("empty", [2, 0])
@pytest.mark.parametrize("zero_gradient", [True, False])
def test_an_unlabelled_task_leaves_the_update_of_the_others_alone(name, empty, zero_gradient):
    others = random_grads(2, seed=3)
    others[1] = -0.6 * others[0] + 0.5 * others[1]  # a conflicting pair
    keep = [i for i in range(3) if i != empty]
    grads = torch.zeros(3, others.shape[1], dtype=D)
    grads[keep] = others
    if not zero_gradient:  # count 0 but a gradient (a regulariser, say) that conflicts with both others
        grads[empty] = -(others[0] + others[1]) + 0.3 * random_grads(1, seed=4)[0]
    counts = torch.full((3,), 5.0, dtype=D)
    counts[empty] = 0
    direction, weights = weighting.create(name, names(3)).combine(grads, None, counts)
    expected, expected_weights = weighting.create(name, names(2)).combine(others)
    assert float(weights[empty]) == 0.0
    # the QP ridge is relative to the mean squared norm over all K tasks: 1e-10 apart
    torch.testing.assert_close(weights[keep], expected_weights, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(direction, expected, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("name", ["cagrad", "upgrad", "pcgrad"])
def test_no_task_with_labels_stays_finite_without_masking_in_the_caller(name):
    gram = random_grads(3, seed=5) @ random_grads(3, seed=5).T
    strategy = weighting.create(name, names(3))
    weights = strategy.compute_weights(gram, None, active=torch.zeros(3, dtype=torch.bool))
    assert torch.isfinite(weights).all()


def test_cagrad_many_tasks_leaves_an_unlabelled_task_out():
    others = random_grads(11, p=20, seed=6)
    grads = torch.cat([others[:4], torch.zeros(1, 20, dtype=D), others[4:]])
    counts = torch.full((12,), 3.0, dtype=D)
    counts[4] = 0
    direction, weights = weighting.create("cagrad", names(12)).combine(grads, None, counts)
    expected, _ = weighting.create("cagrad", names(11)).combine(others)
    assert float(weights[4]) == 0.0
    torch.testing.assert_close(direction, expected, rtol=1e-9, atol=1e-12)


# ---- 4. a float loss scale: plain arithmetic, no tensor built from it ------------------------------------------


@pytest.fixture
def scalar_tensors(monkeypatch):
    """Records each torch.as_tensor / torch.tensor call made from a Python number (on CUDA: a host-to-device copy)."""
    made = []
    for name in ("as_tensor", "tensor"):
        original = getattr(torch, name)

        def spy(data, *args, _original=original, _name=name, **kwargs):
            if isinstance(data, (int, float)):
                made.append((_name, data))
            return _original(data, *args, **kwargs)

        monkeypatch.setattr(torch, name, spy)
    return made


@pytest.mark.parametrize("name, options", [("nash_mtl", {"max_norm": 0.5}), ("mgda", {"normalize": "l2"})])
def test_a_float_loss_scale_equals_a_tensor_one_without_making_a_tensor(name, options, scalar_tensors):
    grads = random_grads(3, seed=7) * 1024.0
    as_tensor, _ = weighting.create(name, names(3), **options).combine(grads, None, None, torch.full((), 1024.0))
    assert not scalar_tensors
    as_float, weights = weighting.create(name, names(3), **options).combine(grads, None, None, 1024.0)
    assert not scalar_tensors, scalar_tensors
    torch.testing.assert_close(as_float, as_tensor, rtol=1e-12, atol=0)
    plain, _ = weighting.create(name, names(3), **options).combine(grads / 1024.0)
    torch.testing.assert_close(as_float / 1024.0, plain, rtol=1e-9, atol=1e-12)  # the scale is applied
    assert torch.isfinite(weights).all()


def test_gradnorm_with_a_float_loss_scale_makes_no_tensor(scalar_tensors):
    grads, losses = random_grads(3, seed=8), torch.tensor([0.8, 1.5, 0.3], dtype=D)
    with_float, with_tensor = weighting.create("gradnorm", names(3)), weighting.create("gradnorm", names(3))
    with_float.combine(grads * 512.0, losses, None, 512.0)
    assert not scalar_tensors, scalar_tensors
    with_tensor.combine(grads * 512.0, losses, None, torch.full((), 512.0))
    torch.testing.assert_close(with_float.loss_weights.grad, with_tensor.loss_weights.grad)
    assert float(with_float.loss_weights.grad.abs().max()) > 1.0  # carries the scale


def test_backward_with_a_float_loss_scale_makes_no_tensor(scalar_tensors):
    torch.manual_seed(0)
    trunk, heads = nn.Linear(4, 6), nn.ModuleList([nn.Linear(6, 1), nn.Linear(6, 1)])
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    f = trunk(x)
    losses = {"a": ((heads[0](f) - y) ** 2).mean(), "b": ((heads[1](f) + y) ** 2).mean()}
    weighting.create("nash_mtl", ["a", "b"], max_norm=1.0).backward(losses, features=[f], loss_scale=256.0)
    assert not scalar_tensors, scalar_tensors
    assert torch.isfinite(trunk.weight.grad).all()


# ---- 5. DWA: the last epoch's loss must be positive too --------------------------------------------------------


@pytest.mark.parametrize("last", [0.0, -0.5, float("inf"), float("nan")])
def test_dwa_ratio_is_one_when_the_last_epoch_loss_is_not_positive(last):
    w = weighting.dwa_weights(torch.tensor([[0.8, 1.0, 2.0], [last, 0.9, 1.0]], dtype=D))
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w.sum(), torch.tensor(3.0, dtype=D))
    torch.testing.assert_close(w, 3 * torch.softmax(torch.tensor([1.0, 0.9, 0.5], dtype=D) / 2.0, 0))


def test_dwa_strategy_after_an_epoch_with_a_zero_loss():
    dwa = weighting.create("dwa", ["a", "b"])
    dwa.epoch_end({"a": 0.8, "b": 1.0})
    dwa.epoch_end({"a": 0.0, "b": 0.5})  # no labels for a in this epoch
    expected = 2 * torch.softmax(torch.tensor([1.0, 0.5]) / 2.0, 0)
    torch.testing.assert_close(dwa.weights, expected)
    dwa.epoch_end({"a": 0.6, "b": 0.5})  # a is back: no earlier loss to compare with
    torch.testing.assert_close(dwa.weights, torch.ones(2))
