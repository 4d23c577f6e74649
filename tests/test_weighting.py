"""Task weighting, functional core: each strategy on cases derivable by hand, and invariants."""

import itertools

import pytest
import torch

from fastmtl.mtl import weighting
from fastmtl.mtl.weighting import _qp, _random
from fastmtl.mtl.weighting.cagrad import cagrad_objective
from fastmtl.mtl.weighting.pcgrad import pcgrad_coefficients

GRADIENT_METHODS = ["pcgrad", "mgda", "cagrad", "imtl_g", "gradvac", "aligned_mtl", "upgrad", "nash_mtl"]
D = torch.float64


def seeded(name, seed=0):
    """Options that fix the random orders of PCGrad and GradVac (nothing for the others)."""
    return {"generator": torch.Generator().manual_seed(seed)} if name in ("pcgrad", "gradvac") else {}


def conflicting(k=3, p=7, seed=0):
    """Random gradients with at least one conflicting pair (fresh values, never zeros)."""
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(k, p, generator=g, dtype=D)
    grads[1] = -0.7 * grads[0] + 0.5 * grads[1]
    return grads


def test_available_lists_every_strategy():
    names = set(weighting.available())
    assert names == {
        "ew", "fixed", "datasize", "uw", "dwa", "rlw", "famo",
        "gradnorm", "pcgrad", "mgda", "cagrad", "imtl_g", "gradvac", "aligned_mtl", "upgrad", "nash_mtl",
    }  # fmt: skip
    for name in names:
        cls = type(weighting.create(name, ["a", "b"], **({"weights": {"a": 1, "b": 2}} if name == "fixed" else {})))
        assert cls.__doc__ and (name in ("ew", "fixed", "datasize") or "20" in cls.__doc__), name  # cites a year


def test_create_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown weighting"):
        weighting.create("nope", ["a"])
    with pytest.raises(ValueError, match="duplicate"):
        weighting.create("ew", ["a", "a"])
    with pytest.raises(TypeError, match="single string"):
        weighting.create("ew", "ab")
    with pytest.raises(ValueError, match="exactly the tasks"):
        weighting.create("fixed", ["a", "b"], weights={"a": 1.0})
    with pytest.raises(TypeError, match="mgda"):
        weighting.create("mgda", ["a"], bogus=1)
    with pytest.raises(ValueError, match="mode"):
        weighting.create("pcgrad", ["a"], mode="weights")
    with pytest.raises(ValueError, match=r"\[K, P\]"):
        weighting.aggregate("pcgrad", torch.ones(3))
    with pytest.raises(ValueError, match="gradient-level"):
        weighting.aggregate("gradnorm", torch.ones(2, 3))


# ---- PCGrad -----------------------------------------------------------------------------------------------


def test_pcgrad_orthogonal_gradients_are_summed():
    grads = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, -3.0]], dtype=D)
    torch.testing.assert_close(weighting.aggregate("pcgrad", grads), grads.sum(0), rtol=0, atol=1e-15)


def test_pcgrad_agreeing_gradients_are_summed():
    grads = torch.tensor([[1.0, 0.5], [0.3, 2.0]], dtype=D)
    torch.testing.assert_close(weighting.aggregate("pcgrad", grads), grads.sum(0), rtol=0, atol=1e-15)


def test_pcgrad_projects_two_conflicting_gradients_exactly():
    g1, g2 = torch.tensor([1.0, 0.0], dtype=D), torch.tensor([-1.0, 1.0], dtype=D)
    # g1' = g1 - (g1.g2 / |g2|^2) g2 = (0.5, 0.5); g2' = g2 - (g2.g1 / |g1|^2) g1 = (0, 1)
    out = weighting.aggregate("pcgrad", torch.stack([g1, g2]))
    torch.testing.assert_close(out, torch.tensor([0.5, 1.5], dtype=D), rtol=0, atol=1e-15)


def test_pcgrad_matches_sequential_projection_in_gradient_space():
    grads = conflicting(k=4, p=9, seed=3)
    orders = _random.other_task_orders(4, grads.device, torch.Generator().manual_seed(5))
    expected = []
    for i in range(4):
        g = grads[i].clone()
        for j in orders[i].tolist():
            dot = g @ grads[j]
            if dot < 0:
                g = g - dot / (grads[j] @ grads[j]) * grads[j]
        expected.append(g)
    coefficients = pcgrad_coefficients(grads @ grads.T, orders)
    torch.testing.assert_close(coefficients @ grads, torch.stack(expected), rtol=1e-12, atol=1e-12)


def test_other_task_orders_are_permutations_of_the_others():
    orders = _random.other_task_orders(5, torch.device("cpu"), torch.Generator().manual_seed(0))
    for i, row in enumerate(orders.tolist()):
        assert sorted(row) == [j for j in range(5) if j != i]


def test_pcgrad_generator_makes_it_deterministic():
    grads = conflicting(k=4, seed=1)
    a = weighting.aggregate("pcgrad", grads, generator=torch.Generator().manual_seed(7))
    b = weighting.aggregate("pcgrad", grads, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


# ---- MGDA -------------------------------------------------------------------------------------------------


def test_mgda_two_tasks_closed_form():
    for seed in range(5):
        g1, g2 = torch.randn(2, 6, generator=torch.Generator().manual_seed(seed), dtype=D)
        # argmin over a in [0, 1] of |a g1 + (1 - a) g2|^2
        a = ((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2))).clamp(0, 1)
        expected = a * g1 + (1 - a) * g2
        torch.testing.assert_close(weighting.aggregate("mgda", torch.stack([g1, g2])), expected, rtol=1e-8, atol=1e-10)


def test_mgda_is_the_min_norm_point_of_the_hull():
    grads = conflicting(k=3, p=5, seed=2)
    out = weighting.aggregate("mgda", grads)
    # brute force over a 1/200 grid of the simplex
    steps = 200
    points = [(i, j, steps - i - j) for i, j in itertools.product(range(steps + 1), repeat=2) if i + j <= steps]
    w = torch.tensor(points, dtype=D) / steps
    best = float((w @ grads).norm(dim=1).min())
    assert float(out.norm()) <= best + 1e-12
    assert float(out.norm()) >= best - 0.05 * best


@pytest.mark.parametrize("k", [2, 5, 12])  # 12 exercises the iterative solver
def test_mgda_satisfies_the_min_norm_optimality_condition(k):
    grads = torch.randn(k, 4 * k, generator=torch.Generator().manual_seed(k), dtype=D)
    grads[1] = -grads[0] + 0.1 * grads[1]
    d = weighting.aggregate("mgda", grads)
    w = weighting.gram_weights("mgda", grads @ grads.T)
    assert torch.all(w >= 0) and abs(float(w.sum()) - 1) < 1e-9
    # d is the min-norm point of the hull iff g_i . d >= |d|^2 for every i (equality on the support)
    scale = float((grads**2).sum(1).max())
    tol = 1e-8 * scale if k <= _qp.MAX_EXACT_TASKS else 1e-4 * scale
    assert float((grads @ d - d @ d).min()) >= -tol
    support = w > 1e-6
    assert float((grads @ d - d @ d)[support].abs().max()) <= tol


def test_mgda_normalize_l2_equals_mgda_of_unit_gradients():
    grads = conflicting(seed=4)
    units = grads / grads.norm(dim=1, keepdim=True)
    out = weighting.aggregate("mgda", grads, normalize="l2")
    torch.testing.assert_close(out, weighting.aggregate("mgda", units), rtol=1e-9, atol=1e-12)


# ---- CAGrad -----------------------------------------------------------------------------------------------


def test_cagrad_with_c_zero_is_the_mean():
    grads = conflicting(seed=5)
    torch.testing.assert_close(weighting.aggregate("cagrad", grads, c=0.0), grads.mean(0), rtol=1e-14, atol=1e-14)


def test_cagrad_two_tasks_solves_its_dual_and_stays_in_the_ball():
    grads = conflicting(k=2, p=6, seed=6)
    gram = grads @ grads.T
    c = 0.5
    strategy = weighting.create("cagrad", ["a", "b"], c=c, rescale=0, steps=300)
    w = strategy.solve(gram)
    grid = torch.linspace(0, 1, 2001, dtype=D)
    values = cagrad_objective(torch.stack([grid, 1 - grid], 1), gram, c)
    assert float(cagrad_objective(w, gram, c)) <= float(values.min()) + 1e-4 * float(values.abs().max())
    d = weighting.aggregate("cagrad", grads, c=c, rescale=0, steps=300)
    g0 = grads.mean(0)
    assert abs(float((d - g0).norm()) - c * float(g0.norm())) <= 1e-9 * float(g0.norm())
    # the worst task improves at least as much as under the plain mean (g0 lies in the ball)
    assert float((grads @ d).min()) >= float((grads @ g0).min()) - 1e-9


def test_simplex_qp_matches_a_grid_for_three_tasks():
    grads = conflicting(k=3, p=5, seed=15)
    gram = grads @ grads.T
    linear = torch.tensor([0.3, -0.2, 0.1], dtype=D)
    curvature = torch.tensor([0.1, 1.0, 10.0], dtype=D)
    w = _qp.simplex_qp(gram, linear, curvature)
    steps = 150
    points = [(i, j, steps - i - j) for i, j in itertools.product(range(steps + 1), repeat=2) if i + j <= steps]
    grid = torch.tensor(points, dtype=D) / steps
    for t, lam in enumerate(curvature):
        value = lambda v: v @ linear + 0.5 * lam * torch.einsum("...k,kj,...j->...", v, gram, v)  # noqa: E731
        assert float(value(w[t])) <= float(value(grid).min()) + 1e-12
        assert abs(float(w[t].sum()) - 1) < 1e-12 and torch.all(w[t] >= 0)


def test_cagrad_exact_solve_agrees_with_long_projected_gradient():
    grads = conflicting(k=4, p=9, seed=16)
    gram = grads @ grads.T
    gram = gram / gram.diagonal().mean()
    exact = weighting.create("cagrad", list("abcd"), c=0.5).solve(gram)
    iterative = weighting.create("cagrad", list("abcd"), c=0.5, steps=3000)._solve_iterative(gram)
    a, b = cagrad_objective(exact, gram, 0.5), cagrad_objective(iterative, gram, 0.5)
    assert float(a) <= float(b) + 1e-5 * abs(float(b))


def test_cagrad_rescale_divides_by_one_plus_c_squared():
    grads = conflicting(seed=7)
    raw = weighting.aggregate("cagrad", grads, c=0.4, rescale=0)
    torch.testing.assert_close(weighting.aggregate("cagrad", grads, c=0.4, rescale=1), raw / 1.16)


# ---- IMTL-G -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 5])
def test_imtl_g_has_equal_projections_on_every_unit_gradient(k):
    grads = torch.randn(k, 10, generator=torch.Generator().manual_seed(k), dtype=D)
    d = weighting.aggregate("imtl_g", grads)
    projections = grads @ d / grads.norm(dim=1)
    torch.testing.assert_close(projections, projections[:1].expand(k), rtol=1e-8, atol=1e-10)
    w = weighting.gram_weights("imtl_g", grads @ grads.T)
    assert abs(float(w.sum()) - 1) < 1e-10


# ---- GradVac ----------------------------------------------------------------------------------------------


def test_gradvac_with_zero_targets_and_no_update_is_pcgrad():
    grads = conflicting(k=4, seed=8)
    a = weighting.aggregate("gradvac", grads, beta=0.0, generator=torch.Generator().manual_seed(1))
    b = weighting.aggregate("pcgrad", grads, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradvac_lifts_the_cosine_to_its_target_and_tracks_it():
    grads = torch.tensor([[1.0, 0.2], [-0.3, 1.0]], dtype=D)  # cosine ~ -0.1
    strategy = weighting.create("gradvac", ["a", "b"], beta=0.25)
    strategy.targets.fill_(0.5)
    coefficients_sum = strategy.compute_weights(grads @ grads.T, None)
    d = coefficients_sum @ grads
    # With K = 2 each task has one partner: g1' = g1 + w12 g2 and g2' = g2 + w21 g1, d = g1' + g2'.
    cos = float(grads[0] @ grads[1] / (grads[0].norm() * grads[1].norm()))
    g1_new = d - grads[1] - (coefficients_sum[0] - 1) * grads[0]  # = g1 + w12 g2
    assert abs(float(g1_new @ grads[1] / (g1_new.norm() * grads[1].norm())) - 0.5) < 1e-12
    torch.testing.assert_close(strategy.targets[0, 1], torch.tensor(0.75 * 0.5 + 0.25 * cos, dtype=D))


# ---- Aligned-MTL ------------------------------------------------------------------------------------------


def test_aligned_mtl_orthogonal_equal_norm_gradients_are_summed():
    grads = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=D)
    torch.testing.assert_close(weighting.aggregate("aligned_mtl", grads), grads.sum(0))


def test_aligned_mtl_matches_its_definition():
    grads = conflicting(k=3, seed=9)
    gram = grads @ grads.T
    values, vectors = torch.linalg.eigh(gram)
    balance = values.min().sqrt() * vectors @ torch.diag(values.rsqrt()) @ vectors.T
    aligned = balance @ grads  # rows orthogonal with norm sqrt(lambda_min)
    torch.testing.assert_close(aligned @ aligned.T, values.min() * torch.eye(3, dtype=D), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(weighting.aggregate("aligned_mtl", grads), aligned.sum(0), rtol=1e-9, atol=1e-12)


def test_aligned_mtl_rank_deficient_gradients_stay_finite():
    grads = conflicting(k=3, seed=10)
    grads[2] = grads[0] + grads[1]
    assert torch.isfinite(weighting.aggregate("aligned_mtl", grads)).all()


# ---- UPGrad -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 4, 11])  # 11 exercises the iterative solver
def test_upgrad_conflicts_with_no_task(k):
    grads = torch.randn(k, 3 * k, generator=torch.Generator().manual_seed(k), dtype=D)
    grads[1] = -grads[0] + 0.2 * grads[1]
    d = weighting.aggregate("upgrad", grads)
    scale = float((grads**2).sum(1).max())
    tol = 1e-9 * scale if k <= _qp.MAX_EXACT_TASKS else 1e-3 * scale
    assert float((grads @ d).min()) >= -tol
    assert float(d.norm()) > 0


def test_upgrad_without_conflict_is_the_mean():
    grads = torch.tensor([[1.0, 0.2, 0.0], [0.5, 1.0, 0.1], [0.1, 0.1, 1.0]], dtype=D)
    torch.testing.assert_close(weighting.aggregate("upgrad", grads), grads.mean(0), rtol=1e-9, atol=1e-12)


def test_upgrad_projection_solves_its_box_qp():
    grads = conflicting(k=3, seed=11)
    gram = grads @ grads.T
    u = _qp.min_quadratic_above(gram, torch.eye(3, dtype=D))
    for i in range(3):
        # KKT of min u^T M u s.t. u >= e_i: M u >= 0, with equality where u_j > e_ij
        slack = gram @ u[:, i]
        assert float(slack.min()) >= -1e-9
        free = u[:, i] > torch.eye(3, dtype=D)[:, i] + 1e-9
        assert float(torch.cat([slack[free].abs(), torch.zeros(1, dtype=D)]).max()) <= 1e-9


# ---- Nash-MTL ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 6])
def test_nash_mtl_satisfies_the_bargaining_condition(k):
    grads = torch.randn(k, 12, generator=torch.Generator().manual_seed(k), dtype=D)
    grads[1] = -0.5 * grads[0] + grads[1]
    gram = grads @ grads.T
    normalised = gram / torch.linalg.matrix_norm(gram)
    a = weighting.gram_weights("nash_mtl", gram)
    assert torch.all(a > 0)
    torch.testing.assert_close(normalised @ a, 1 / a, rtol=1e-8, atol=1e-10)


def test_nash_mtl_orthogonal_gradients_closed_form():
    grads = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=D)
    gram = grads @ grads.T
    a = weighting.gram_weights("nash_mtl", gram)
    torch.testing.assert_close(a, torch.linalg.matrix_norm(gram).sqrt() / torch.tensor([3.0, 1.0], dtype=D))


# ---- invariants -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GRADIENT_METHODS)
@pytest.mark.parametrize("scale", [1e-3, 7.0])
def test_gradient_methods_are_scale_equivariant(name, scale):
    grads = conflicting(k=3, seed=12)
    base = weighting.aggregate(name, grads, **seeded(name))
    scaled = weighting.aggregate(name, scale * grads, **seeded(name))
    rtol = 1e-3 if name == "cagrad" else 1e-7  # CAGrad's inner solve is iterative (same iterates up to rounding)
    torch.testing.assert_close(scaled, scale * base, rtol=rtol, atol=1e-12 * scale)


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_gram_weights_reproduce_aggregate(name):
    grads = conflicting(k=4, seed=13)
    w = weighting.gram_weights(name, grads @ grads.T, **seeded(name, 2))
    torch.testing.assert_close(w @ grads, weighting.aggregate(name, grads, **seeded(name, 2)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", GRADIENT_METHODS + ["ew"])
def test_single_task_is_left_alone_up_to_scale(name):
    grads = torch.randn(1, 5, dtype=D)
    out = weighting.aggregate(name, grads)
    cosine = float(out @ grads[0] / (out.norm() * grads[0].norm()))
    assert abs(cosine - 1) < 1e-12


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_float32_and_bfloat16_gradients(name):
    grads = conflicting(k=3, seed=14)
    ref = weighting.aggregate(name, grads, **seeded(name))
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        out = weighting.aggregate(name, grads.to(dtype), **seeded(name))
        assert out.dtype == dtype
        assert float((out.double() - ref).norm() / ref.norm()) < tol, name


def test_solvers_handle_identical_and_zero_gradients():
    same = torch.ones(3, 4, dtype=D)
    for name in GRADIENT_METHODS:
        assert torch.isfinite(weighting.aggregate(name, same)).all(), name
    zero = torch.zeros(2, 4, dtype=D)
    for name in GRADIENT_METHODS:
        assert torch.equal(weighting.aggregate(name, zero), torch.zeros(4, dtype=D)), name


# ---- loss-level -------------------------------------------------------------------------------------------


def test_dwa_weights_from_a_history():
    assert torch.equal(weighting.dwa_weights(torch.ones(1, 3)), torch.ones(3))
    history = torch.tensor([[4.0, 2.0, 1.0], [2.0, 2.0, 2.0], [1.0, 1.0, 3.0]], dtype=D)
    r = history[-1] / history[-2]  # 0.5, 0.5, 1.5
    e = torch.exp(r / 2.0)
    torch.testing.assert_close(weighting.dwa_weights(history), 3 * e / e.sum())
    torch.testing.assert_close(weighting.dwa_weights(history, temperature=1e9), torch.ones(3, dtype=D))
    with pytest.raises(ValueError, match=r"\[E, K\]"):
        weighting.dwa_weights(torch.ones(3))


def test_dwa_strategy_updates_at_epoch_end():
    dwa = weighting.create("dwa", ["a", "b"])
    losses = {"a": torch.tensor(1.0, requires_grad=True), "b": torch.tensor(2.0, requires_grad=True)}
    assert torch.equal(torch.stack(list(dwa.backward(losses).values())), torch.ones(2))
    dwa.epoch_end({"a": 2.0, "b": 1.0})
    dwa.epoch_end({"a": 1.0, "b": 1.0})  # ratios 0.5, 1.0
    w = dwa.backward({"a": torch.tensor(1.0, requires_grad=True), "b": torch.tensor(2.0, requires_grad=True)})
    expected = weighting.dwa_weights(torch.tensor([[2.0, 1.0], [1.0, 1.0]]))
    torch.testing.assert_close(torch.stack([w["a"], w["b"]]), expected)
    assert float(w["b"]) > float(w["a"])  # the task whose loss fell less gets more weight


def test_uw_weight_gradient():
    uw = weighting.create("uw", ["a", "b"], init=0.3)
    la = torch.tensor(2.0, requires_grad=True)
    lb = torch.tensor(0.5, requires_grad=True)
    w = uw.backward({"a": la, "b": lb})
    s = torch.tensor([0.3, 0.3])
    # total = sum exp(-s) L + s: d/ds = 1 - exp(-s) L, d/dL = exp(-s)
    torch.testing.assert_close(uw.log_vars.grad, 1 - torch.exp(-s) * torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(la.grad, torch.exp(-s[0]))
    torch.testing.assert_close(w["a"], torch.exp(-s[0]))


def test_datasize_weights_by_labelled_counts():
    ds = weighting.create("datasize", ["a", "b", "c"])
    losses = {n: torch.tensor(v, requires_grad=True) for n, v in zip("abc", (1.0, 2.0, 3.0))}
    w = ds.backward(losses, counts={"a": torch.tensor(2), "b": torch.tensor(6), "c": torch.tensor(0)})
    torch.testing.assert_close(torch.stack([w[n] for n in "abc"]), torch.tensor([0.75, 2.25, 0.0]))
    torch.testing.assert_close(losses["b"].grad, torch.tensor(2.25))
    with pytest.raises(ValueError, match="counts"):
        ds.backward({n: torch.tensor(1.0, requires_grad=True) for n in "abc"})
    fixed = weighting.create("datasize", ["a", "b"], counts={"a": 1, "b": 3})
    w = fixed.backward({"a": torch.tensor(1.0, requires_grad=True), "b": torch.tensor(1.0, requires_grad=True)})
    torch.testing.assert_close(torch.stack([w["a"], w["b"]]), torch.tensor([0.5, 1.5]))


def test_rlw_draws_softmax_weights_reproducibly():
    def draw(seed):
        rlw = weighting.create("rlw", ["a", "b", "c"], generator=torch.Generator().manual_seed(seed))
        return torch.stack(list(rlw.backward({n: torch.tensor(1.0, requires_grad=True) for n in "abc"}).values()))

    a, b = draw(3), draw(3)
    assert torch.equal(a, b) and not torch.equal(a, draw(4))
    assert abs(float(a.sum()) - 1) < 1e-6 and torch.all(a > 0)


def test_famo_weights_and_logit_update():
    famo = weighting.create("famo", ["a", "b"], lr=0.1)
    la, lb = torch.tensor(2.0, requires_grad=True), torch.tensor(0.5, requires_grad=True)
    w = famo.backward({"a": la, "b": lb})
    # first step: z uniform; the gradient weight of L_t is z_t / (c L_t) with c = sum z / L, i.e. proportional to 1/L
    c = 0.5 / 2.0 + 0.5 / 0.5
    torch.testing.assert_close(la.grad, torch.tensor(0.5 / (c * 2.0)))
    torch.testing.assert_close(lb.grad, torch.tensor(0.5 / (c * 0.5)))
    torch.testing.assert_close(w["a"], la.grad)
    assert torch.equal(famo.logits, torch.zeros(2))  # no decrease known yet: no move
    # next step: task a's loss halves, b's stays; a improved more, so its logit goes down
    famo.backward({"a": torch.tensor(1.0, requires_grad=True), "b": torch.tensor(0.5, requires_grad=True)})
    assert float(famo.logits[0]) < 0 < float(famo.logits[1])
    assert list(famo.parameters()) == []


def test_options_given_as_strings_from_a_command_line():
    cagrad = weighting.create("cagrad", ["a", "b"], c="0.3", rescale="0", steps="50")
    assert (cagrad.c, cagrad.rescale, cagrad.steps) == (0.3, 0, 50)
    assert weighting.create("pcgrad", ["a"], scale_heads="false").scale_heads is False
    assert weighting.create("mgda", ["a"], scale_heads="true").scale_heads is True
    assert weighting.create("nash_mtl", ["a"], steps="5").steps == 5
    assert weighting.create("dwa", ["a"], temperature="3").temperature == 3.0
    with pytest.raises(ValueError, match="scale_heads"):
        weighting.create("pcgrad", ["a"], scale_heads="maybe")
