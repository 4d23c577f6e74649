"""Task weighting with tasks that have no labels in a batch (or an epoch), and under fp16 loss scaling.

The rule: nothing turns an empty task into NaN or inf, and a task without labels leaves the other tasks' update
as it is when the task is simply absent (where the strategy has no state that depends on the task set).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmtl
from fastmtl.mtl import weighting
from fastmtl.mtl.weighting import _qp

D = torch.float64
GRADIENT_LEVEL = ["gradnorm", "pcgrad", "mgda", "cagrad", "imtl_g", "gradvac", "aligned_mtl", "upgrad", "nash_mtl"]
LOSS_LEVEL = ["ew", "datasize", "uw", "dwa", "rlw", "famo"]


def names(k):
    return [f"t{i}" for i in range(k)]


def fresh_grads(k, p=9, seed=0):
    """Random ``[K, P]`` gradients with a conflicting pair (fresh values, never zeros)."""
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(k, p, generator=g, dtype=D)
    grads[1] = -0.6 * grads[0] + 0.5 * grads[1]
    return grads


def with_empty(grads, empty):
    """``grads`` with a zero row inserted at ``empty`` (a task without labels), and the matching ``[K]`` counts."""
    k = grads.shape[0] + 1
    full = torch.zeros(k, grads.shape[1], dtype=grads.dtype)
    keep = [i for i in range(k) if i != empty]
    full[keep] = grads
    counts = torch.full((k,), 5.0, dtype=D)
    counts[empty] = 0
    return full, counts, keep


def combine(name, grads, losses=None, counts=None, loss_scale=None, **options):
    strategy = weighting.create(name, names(grads.shape[0]), **options)
    return strategy.combine(grads, losses, counts, loss_scale)


# ---- 1. DWA ------------------------------------------------------------------------------------------------


def test_dwa_ratio_is_one_for_a_task_without_an_earlier_loss():
    w = weighting.dwa_weights(torch.tensor([[0.0, 1.0], [0.0, 0.9]]))
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w, 2 * torch.softmax(torch.tensor([1.0, 0.9]) / 2.0, 0))
    w = weighting.dwa_weights(torch.tensor([[0.0, 1.0], [0.7, 0.9]]))  # x / 0: no earlier loss to compare with
    torch.testing.assert_close(w, 2 * torch.softmax(torch.tensor([1.0, 0.9]) / 2.0, 0))
    w = weighting.dwa_weights(torch.tensor([[2.0, 1.0], [float("nan"), 0.5]]))
    assert torch.isfinite(w).all()


def test_dwa_strategy_survives_an_epoch_without_labels():
    dwa = weighting.create("dwa", ["a", "b"])
    dwa.epoch_end({"a": 0.0, "b": 1.0})
    dwa.epoch_end({"a": 0.0, "b": 0.5})
    dwa.epoch_end({"a": 0.8, "b": 0.4})
    assert torch.isfinite(dwa.weights).all()
    la, lb = torch.tensor(1.0, requires_grad=True), torch.tensor(1.0, requires_grad=True)
    w = dwa.backward({"a": la, "b": lb})
    assert torch.isfinite(la.grad) and torch.isfinite(lb.grad) and torch.isfinite(w["a"])


# ---- shared: empty tasks in the solve -----------------------------------------------------------------------


@pytest.mark.parametrize("name", GRADIENT_LEVEL)
@pytest.mark.parametrize("empty", [0, 1, 2])
def test_an_empty_task_gets_weight_zero_and_stays_finite(name, empty):
    grads, counts, _ = with_empty(fresh_grads(2, seed=empty), empty)
    losses = torch.tensor([0.7, 1.3, 0.4], dtype=D)
    losses[empty] = 0
    direction, weights = combine(name, grads, losses, counts)
    assert torch.isfinite(direction).all() and torch.isfinite(weights).all()
    assert float(weights[empty]) == 0.0
    assert float(weights.abs().max()) < 1e3


@pytest.mark.parametrize("name", GRADIENT_LEVEL)
def test_no_task_with_labels_gives_a_zero_update(name):
    grads = fresh_grads(3)
    losses = torch.ones(3, dtype=D)
    direction, weights = combine(name, grads, losses, torch.zeros(3, dtype=D))
    assert torch.equal(weights, torch.zeros(3, dtype=D)), name
    assert torch.equal(direction, torch.zeros_like(direction)), name


@pytest.mark.parametrize(
    "name, options",
    [
        ("mgda", {}),
        ("mgda", {"normalize": "l2"}),
        ("mgda", {"normalize": "loss"}),
        ("mgda", {"normalize": "loss+"}),
        ("imtl_g", {}),
        ("aligned_mtl", {}),
        ("nash_mtl", {}),
        ("cagrad", {}),
        ("upgrad", {}),
    ],
)
@pytest.mark.parametrize("empty", [0, 2, 3])
def test_an_empty_task_leaves_the_others_update_as_if_absent(name, options, empty):
    others = fresh_grads(3, seed=10 + empty)
    grads, counts, keep = with_empty(others, empty)
    losses = torch.tensor([0.9, 1.4, 0.6, 1.1], dtype=D)
    losses[empty] = 0
    direction, weights = combine(name, grads, losses, counts, **options)
    expected, expected_weights = combine(name, others, losses[keep], **options)
    torch.testing.assert_close(direction, expected, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(weights[keep], expected_weights, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("name", ["mgda", "imtl_g", "nash_mtl"])
def test_a_zero_gradient_is_left_out_without_counts(name):
    others = fresh_grads(3, seed=4)
    grads, _, keep = with_empty(others, 1)
    expected = weighting.aggregate(name, others)
    torch.testing.assert_close(weighting.aggregate(name, grads), expected, rtol=1e-7, atol=1e-12)
    assert float(weighting.gram_weights(name, grads @ grads.T)[1]) == 0.0
    assert float(expected.norm()) > 1e-3  # before the fix: MGDA and IMTL-G gave 0, Nash a 1e5 weight


def test_mgda_many_tasks_leaves_an_empty_task_out():
    others = torch.randn(_qp.MAX_EXACT_TASKS + 2, 20, generator=torch.Generator().manual_seed(5), dtype=D)
    grads, counts, keep = with_empty(others, 3)
    direction, weights = combine("mgda", grads, None, counts)
    expected, _ = combine("mgda", others)
    assert float(weights[3]) == 0.0 and abs(float(weights.sum()) - 1) < 1e-9
    torch.testing.assert_close(direction, expected, rtol=1e-6, atol=1e-9)


def test_min_norm_simplex_respects_the_allowed_coordinates():
    gram = fresh_grads(4, seed=6) @ fresh_grads(4, seed=6).T
    allowed = torch.tensor([True, False, True, True])
    w = _qp.min_norm_simplex(gram, allowed)
    sub = _qp.min_norm_simplex(gram[allowed][:, allowed])
    assert float(w[1]) == 0.0
    torch.testing.assert_close(w[allowed], sub, rtol=1e-9, atol=1e-12)
    assert torch.equal(_qp.min_norm_simplex(gram, torch.zeros(4, dtype=torch.bool)), torch.zeros(4, dtype=D))


# ---- 2. GradNorm -------------------------------------------------------------------------------------------


def test_gradnorm_records_the_initial_loss_on_the_first_labelled_step():
    grads = fresh_grads(3, seed=7)
    strategy = weighting.create("gradnorm", names(3))
    empty_grads, counts, _ = with_empty(grads[[0, 2]], 1)
    strategy.combine(empty_grads, torch.tensor([1.2, 0.0, 0.8], dtype=D), counts)
    assert torch.isnan(strategy.initial_losses[1]) and float(strategy.initial_losses[0]) == pytest.approx(1.2)
    assert float(strategy.loss_weights.grad[1]) == 0.0
    strategy.loss_weights.grad = None
    _, weights = strategy.combine(grads, torch.tensor([1.0, 0.9, 0.7], dtype=D), torch.full((3,), 4.0, dtype=D))
    assert float(strategy.initial_losses[1]) == pytest.approx(0.9)
    assert torch.isfinite(weights).all() and torch.isfinite(strategy.loss_weights.grad).all()


def test_gradnorm_leaves_an_empty_task_out_of_the_ratios_and_targets():
    others = fresh_grads(2, seed=8)
    losses = torch.tensor([1.3, 0.0, 0.6], dtype=D)
    grads, counts, keep = with_empty(others, 1)
    three = weighting.create("gradnorm", names(3))
    two = weighting.create("gradnorm", names(2))
    with torch.no_grad():
        three.initial_losses.copy_(torch.tensor([2.0, 1.5, 1.0]))
        two.initial_losses.copy_(torch.tensor([2.0, 1.0]))
        three.loss_weights.copy_(torch.tensor([1.2, 0.9, 0.9]))
        two.loss_weights.copy_(torch.tensor([1.2, 0.8]))  # the same weights, renormalised to sum to 2
    three.combine(grads, losses, counts)
    two.combine(others, losses[keep])
    # 3/3 vs 2/2 renormalisation: the same w, so the same targets and the same signs
    torch.testing.assert_close(three.loss_weights.grad[keep], two.loss_weights.grad)
    assert float(three.loss_weights.grad[1]) == 0.0
    assert float(three.initial_losses[1]) == 1.5


def test_gradnorm_state_round_trips_with_an_unrecorded_task():
    grads, counts, _ = with_empty(fresh_grads(2, seed=9)[:1], 0)
    first = weighting.create("gradnorm", names(2))
    first.combine(grads, torch.tensor([0.0, 1.1], dtype=D), counts)
    second = weighting.create("gradnorm", names(2))
    second.load_state_dict(first.state_dict())
    assert torch.isnan(second.initial_losses[0]) and float(second.initial_losses[1]) == pytest.approx(1.1)


# ---- 3. Nash-MTL with update_every ---------------------------------------------------------------------------


def test_nash_a_task_returning_between_solves_gets_a_stand_in_until_the_next_one():
    step0, step1, step2 = fresh_grads(3, seed=11), fresh_grads(3, seed=12), fresh_grads(3, seed=22)
    strategy = weighting.create("nash_mtl", names(3), update_every=2)
    empty, counts, _ = with_empty(step0[[0, 2]], 1)
    _, w0 = strategy.combine(empty, None, counts)
    assert float(w0[1]) == 0.0 and float(w0.max()) < 1e2
    _, w1 = strategy.combine(step1, None, torch.full((3,), 3.0, dtype=D))  # not fresh: no solve
    assert torch.equal(w1[[0, 2]], w0[[0, 2]])
    torch.testing.assert_close(w1[1], w0[[0, 2]].mean(), rtol=1e-12, atol=0)
    _, w2 = strategy.combine(step2)  # fresh: a solve with every task
    torch.testing.assert_close(w2, combine("nash_mtl", step2)[1], rtol=1e-7, atol=1e-12)


def test_nash_cached_weights_are_reused_while_the_tasks_stay():
    step0, step1 = fresh_grads(3, seed=13), fresh_grads(3, seed=14)
    strategy = weighting.create("nash_mtl", names(3), update_every=2)
    _, w0 = strategy.combine(step0)
    _, w1 = strategy.combine(step1)
    assert torch.equal(w0, w1)
    # a task leaving keeps the others' cached weights
    empty, counts, keep = with_empty(step1[[0, 2]], 1)
    strategy = weighting.create("nash_mtl", names(3), update_every=2)
    _, w0 = strategy.combine(step0)
    _, w1 = strategy.combine(empty, None, counts)
    assert float(w1[1]) == 0.0 and torch.equal(w1[[0, 2]], w0[[0, 2]])


def test_nash_with_zero_gradients_reports_finite_weights():
    grads, counts, _ = with_empty(fresh_grads(2, seed=15), 0)
    _, weights = combine("nash_mtl", grads, None, counts, max_norm=1.0)
    assert float(weights[0]) == 0.0 and float(weights.max()) < 1e2
    _, weights = combine("nash_mtl", torch.zeros(3, 4, dtype=D))
    assert torch.equal(weights, torch.zeros(3, dtype=D))


# ---- 4. fp16 loss scaling -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, options",
    [
        ("mgda", {"normalize": "l2"}),
        ("mgda", {"normalize": "loss+"}),
        ("nash_mtl", {"max_norm": 0.5}),
        ("mgda", {}),
        ("imtl_g", {}),
        ("cagrad", {}),
        ("aligned_mtl", {}),
    ],
)
@pytest.mark.parametrize("scale", [65536.0, 2.0**-8])
def test_scaled_gradients_give_the_scaled_update(name, options, scale):
    grads = fresh_grads(3, seed=16)
    losses = torch.tensor([0.8, 1.5, 0.3], dtype=D)
    plain, weights = combine(name, grads, losses, **options)
    scaled, _ = combine(name, grads * scale, losses, loss_scale=torch.tensor(scale, dtype=D), **options)
    rtol = 1e-3 if name == "cagrad" else 1e-7
    torch.testing.assert_close(scaled / scale, plain, rtol=rtol, atol=1e-12)
    if name == "nash_mtl":
        assert float(plain.norm()) == pytest.approx(0.5, rel=1e-9)  # the clip bounds the unscaled update


def test_gradnorm_weight_gradient_carries_the_loss_scale():
    grads = fresh_grads(3, seed=17)
    losses = torch.tensor([0.8, 1.5, 0.3], dtype=D)
    plain, scaled = weighting.create("gradnorm", names(3)), weighting.create("gradnorm", names(3))
    plain.combine(grads, losses)
    scaled.combine(grads * 1024.0, losses, loss_scale=1024.0)
    torch.testing.assert_close(scaled.loss_weights.grad, 1024.0 * plain.loss_weights.grad)


@pytest.mark.parametrize("name, options", [("mgda", {"normalize": "l2"}), ("nash_mtl", {"max_norm": 1.0})])
def test_backward_with_a_loss_scale_matches_the_unscaled_step(name, options):
    def trunk_grad(loss_scale):
        torch.manual_seed(0)
        trunk, heads = nn.Linear(4, 6), nn.ModuleList([nn.Linear(6, 1), nn.Linear(6, 1)])
        x, y = torch.randn(8, 4), torch.randn(8, 1)
        f = trunk(x)
        losses = {"a": F.mse_loss(heads[0](f), y), "b": F.mse_loss(heads[1](f), -y)}
        weighting.create(name, ["a", "b"], **options).backward(losses, features=[f], loss_scale=loss_scale)
        return trunk.weight.grad / (1.0 if loss_scale is None else float(loss_scale))

    torch.testing.assert_close(trunk_grad(torch.tensor(65536.0)), trunk_grad(None), rtol=1e-4, atol=1e-7)


# ---- 5. FAMO -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("counted", [True, False])
def test_famo_leaves_an_empty_task_out(counted):
    famo3 = weighting.create("famo", ["a", "b", "c"], lr=0.1)
    famo2 = weighting.create("famo", ["a", "c"], lr=0.1)
    g = torch.Generator().manual_seed(18)
    for step in range(3):
        values = (torch.rand(3, generator=g, dtype=D) + 0.2).tolist()
        values[1] = 0.0 if step == 2 else values[1]
        before_b = (famo3.logits[1].clone(), famo3.adam_mean[1].clone(), famo3.previous_losses[1].clone())
        losses3 = {n: torch.tensor(v, requires_grad=True) for n, v in zip("abc", values)}
        counts = {"a": 4, "b": 0 if step == 2 else 4, "c": 4} if counted else None
        w3 = famo3.backward(losses3, counts=counts)
        if step == 2:
            losses2 = {n: torch.tensor(values[i], requires_grad=True) for n, i in (("a", 0), ("c", 2))}
            famo2.backward(losses2)
            assert float(w3["b"]) == 0.0 and float(losses3["b"].grad) == 0.0
            for n in "ac":
                assert torch.isfinite(w3[n]) and float(w3[n]) > 0.1  # before the fix: ~1e-8
            # the softmax over the tasks present is proportional to the one over all: same gradient weights
            # as FAMO on the two tasks with the same logits
            with torch.no_grad():
                famo2.logits.copy_(famo3.logits[[0, 2]])
            z = torch.softmax(famo3.logits[[0, 2]].double(), 0)
            shifted = torch.tensor([values[0], values[2]], dtype=D) + famo3.eps
            expected = z / ((z / shifted).sum() * shifted)
            torch.testing.assert_close(torch.stack([w3["a"], w3["c"]]).double(), expected.to(w3["a"].dtype).double())
            assert torch.equal(famo3.logits[1], before_b[0]) and torch.equal(famo3.adam_mean[1], before_b[1])
            assert torch.equal(famo3.previous_losses[1], before_b[2])
        else:
            famo2.backward({"a": torch.tensor(values[0], requires_grad=True),
                            "c": torch.tensor(values[2], requires_grad=True)})  # fmt: skip


def test_famo_without_any_labels_is_a_zero_step():
    famo = weighting.create("famo", ["a", "b"])
    losses = {n: torch.tensor(0.0, requires_grad=True) for n in "ab"}
    w = famo.backward(losses, counts={"a": 0, "b": 0})
    assert all(float(v) == 0.0 for v in w.values())
    assert all(float(loss.grad) == 0.0 for loss in losses.values())
    assert torch.equal(famo.logits, torch.zeros(2))


# ---- 6. Aligned-MTL rank tolerance ---------------------------------------------------------------------------


@pytest.mark.parametrize("p", [10, 1000, 100000])
def test_aligned_mtl_rank_one_float32_gradients(p):
    for seed in range(8):
        g = torch.randn(p, generator=torch.Generator().manual_seed(seed))
        d = weighting.aggregate("aligned_mtl", torch.stack([g, 3 * g]))
        expected = 4 * g.norm()  # rank 1: the sum itself (lambda_min is that of the one kept direction)
        assert abs(float(d.norm()) - float(expected)) < 1e-3 * float(expected), (p, seed)


# ---- 7. reported weights -------------------------------------------------------------------------------------


@pytest.mark.parametrize("empty", [0, 1])
def test_cagrad_reports_zero_for_an_empty_task_and_keeps_its_update(empty):
    others = fresh_grads(2, seed=19 + empty)
    grads, counts, _ = with_empty(others, empty)
    strategy = weighting.create("cagrad", names(3))
    direction, weights = strategy.combine(grads, None, counts)
    assert float(weights[empty]) == 0.0 and float(weights.abs().max()) < 10
    expected, _ = combine("cagrad", others)  # CAGrad of the labelled tasks alone
    torch.testing.assert_close(direction, expected, rtol=1e-9, atol=1e-12)


# ---- the whole step: masked losses with a task without labels --------------------------------------------------


@pytest.mark.parametrize("name", LOSS_LEVEL + GRADIENT_LEVEL)
@pytest.mark.parametrize("mode", ["representation", "params"])
def test_a_step_with_an_unlabelled_task_is_finite(name, mode):
    if mode == "params" and name in LOSS_LEVEL:
        pytest.skip("loss-level strategies have no mode")
    tasks = ["a", "b", "c"]
    torch.manual_seed(3)
    trunk = nn.Sequential(nn.Linear(5, 8), nn.ReLU())
    heads = nn.ModuleDict({t: nn.Linear(8, 3) for t in tasks})
    options = {} if name in LOSS_LEVEL else {"mode": mode}
    strategy = weighting.create(name, tasks, **options)
    x = torch.randn(6, 5)
    targets = {t: torch.randint(0, 3, (6,)) for t in tasks}
    for step in range(3):
        masks = {t: torch.ones(6, dtype=torch.bool) for t in tasks}
        masks["b"][:] = step == 2  # b has labels on the last step only
        features = trunk(x)
        _, per_task = fastmtl.masked_multitask_loss(
            {t: heads[t](features) for t in tasks}, targets, {t: "ce" for t in tasks}, masks
        )
        for p in [*trunk.parameters(), *heads.parameters(), *strategy.parameters()]:
            p.grad = None
        counts = {t: m.sum() for t, m in masks.items()}
        w = strategy.backward(per_task, features=[features], shared_params=list(trunk.parameters()), counts=counts)
        strategy.epoch_end({t: float(per_task[t].detach()) for t in tasks})
        grads = [p.grad for p in [*trunk.parameters(), *heads.parameters()] if p.grad is not None]
        assert all(torch.isfinite(g).all() for g in grads), (name, step)
        assert all(torch.isfinite(v) and float(v.abs()) < 1e3 for v in w.values()), (name, step, w)
        if step < 2 and name not in ("ew", "uw", "dwa", "rlw"):
            assert float(w["b"]) == 0.0, (name, w)


def test_a_subclass_with_the_two_argument_compute_weights_still_works():
    class Halves(weighting.GradientWeighting):
        """Every task weighted 1/2 (written against ``compute_weights(gram, losses)``)."""

        def compute_weights(self, gram, losses):
            return torch.full((gram.shape[0],), 0.5, dtype=gram.dtype, device=gram.device)

    grads, counts, _ = with_empty(fresh_grads(2, seed=21), 1)
    direction, weights = Halves(names(3)).combine(grads, None, counts)
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.0, 0.5], dtype=D))
    torch.testing.assert_close(direction, 0.5 * grads.sum(0))


def test_gradvac_targets_of_pairs_with_an_empty_task_stay():
    grads, counts, keep = with_empty(fresh_grads(2), empty=2)
    strategy = weighting.create("gradvac", names(3), beta=0.5)
    strategy.targets.fill_(0.3)  # learned similarities from earlier steps
    strategy.combine(grads, None, counts)
    targets, off_diagonal = strategy.targets, ~torch.eye(3, dtype=torch.bool)
    # never moved towards the empty task's "cosine" (0)
    assert (targets[2][off_diagonal[2]] == 0.3).all() and (targets[:, 2][off_diagonal[:, 2]] == 0.3).all()
    assert targets[0, 1] != 0.3 and targets[1, 0] != 0.3  # the labelled pair still learns its similarity
