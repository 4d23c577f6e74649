"""Small quadratic programs on the K x K Gramian, solved on its device without host synchronisation.

``K`` is the number of tasks (a handful), so for ``K <= MAX_EXACT_TASKS`` the programs are solved exactly by
enumerating every active set at once: one batched ``torch.linalg.solve_ex`` over the ``2^K`` candidate systems,
then the feasible candidate with the smallest objective is picked with ``argmin`` (the optimum of a strictly
convex program is the solution of its own active set's equality system, and every other feasible candidate has
a larger objective). Larger ``K`` falls back to a fixed number of accelerated projected-gradient steps. Nothing
branches on a tensor value, so the solve never waits for the device.

All solvers take float64 Gramians; a ridge of ``RIDGE`` times the mean diagonal keeps every system regular.
"""

from __future__ import annotations

import functools

import torch

MAX_EXACT_TASKS = 10
RIDGE = 1e-10
ITERATIVE_STEPS = 500


@functools.lru_cache(maxsize=32)
def _subset_masks(k: int, device: str, include_empty: bool) -> torch.Tensor:
    """``[S, K]`` bool: every subset of ``range(k)`` (the empty one first when included)."""
    codes = torch.arange(0 if include_empty else 1, 2**k)
    bits = 2 ** torch.arange(k)
    return ((codes[:, None] & bits) != 0).to(device)


def regularize(gram: torch.Tensor) -> torch.Tensor:
    """``gram`` plus a tiny ridge relative to its scale (so singular Gramians still give regular systems)."""
    k = gram.shape[0]
    scale = gram.diagonal().mean().clamp_min(0)
    return gram + (scale * RIDGE + 1e-30) * torch.eye(k, dtype=gram.dtype, device=gram.device)


def min_norm_simplex(gram: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """``argmin_{w in simplex} w^T gram w``: the weights of the min-norm point of the gradients' convex hull.

    With ``allowed`` (``[K]`` bool), only those coordinates may be nonzero (all zero when none is allowed).
    """
    gram = regularize(gram)
    k = gram.shape[0]
    if allowed is None:
        allowed = torch.ones(k, dtype=torch.bool, device=gram.device)
    if k == 1:
        return allowed.to(gram.dtype)
    if k > MAX_EXACT_TASKS:
        return torch.where(allowed, _min_norm_simplex_iterative(gram, allowed), 0.0)
    masks = _subset_masks(k, str(gram.device), False)  # [S, K]
    within = ~(masks & ~allowed).any(1)
    inside = masks.to(gram.dtype)
    pair = inside[:, :, None] * inside[:, None, :]
    system = torch.zeros(masks.shape[0], k + 1, k + 1, dtype=gram.dtype, device=gram.device)
    system[:, :k, :k] = gram * pair + torch.diag_embed(1 - inside)
    system[:, :k, k] = inside
    system[:, k, :k] = inside
    rhs = torch.zeros(masks.shape[0], k + 1, 1, dtype=gram.dtype, device=gram.device)
    rhs[:, k] = 1
    solution, info = torch.linalg.solve_ex(system, rhs)
    w = solution[:, :k, 0]
    chosen = _pick_best(w, gram, (w >= -1e-9).all(1) & (info == 0) & within, simplex=True)
    return torch.where(allowed, chosen, 0.0)


def simplex_qp(
    gram: torch.Tensor, linear: torch.Tensor, curvature: torch.Tensor, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """For each ``curvature[t]``: ``argmin_{w in simplex} linear . w + curvature[t] / 2 w^T gram w``; ``[T, K]``.

    Exact (all active sets of all ``T`` problems in one batched solve) for ``K <= MAX_EXACT_TASKS``; iterative
    otherwise. With ``allowed`` (``[K]`` bool), only those coordinates may be nonzero (all zero when none is).
    """
    gram = regularize(gram)
    k = gram.shape[0]
    if allowed is None:
        allowed = torch.ones(k, dtype=torch.bool, device=gram.device)
    if k > MAX_EXACT_TASKS:
        solutions = [_simplex_qp_iterative(gram, linear, float_c, allowed) for float_c in curvature.unbind(0)]
        return torch.where(allowed, torch.stack(solutions), 0.0)
    masks = _subset_masks(k, str(gram.device), False)  # [S, K]
    within = ~(masks & ~allowed).any(1)
    inside = masks.to(gram.dtype)
    pair = inside[:, :, None] * inside[:, None, :]
    t, s = curvature.shape[0], masks.shape[0]
    system = torch.zeros(t, s, k + 1, k + 1, dtype=gram.dtype, device=gram.device)
    system[:, :, :k, :k] = curvature[:, None, None, None] * gram * pair + torch.diag_embed(1 - inside)
    system[:, :, :k, k] = inside
    system[:, :, k, :k] = inside
    rhs = torch.zeros(t, s, k + 1, 1, dtype=gram.dtype, device=gram.device)
    rhs[:, :, :k, 0] = -linear * inside
    rhs[:, :, k, 0] = 1
    solution, info = torch.linalg.solve_ex(system, rhs)
    w = solution[..., :k, 0]  # [T, S, K]
    feasible = (w >= -1e-9).all(-1) & (info == 0) & within
    values = w @ linear + 0.5 * curvature[:, None] * torch.einsum("tsk,kj,tsj->ts", w, gram, w)
    values = torch.where(feasible, values, torch.full_like(values, float("inf")))
    best = values.argmin(1)  # [T]
    chosen = w.gather(1, best[:, None, None].expand(t, 1, k))[:, 0].clamp_min(0)
    chosen = torch.where(allowed, chosen, 0.0)
    return chosen / chosen.sum(-1, keepdim=True).clamp_min(torch.finfo(gram.dtype).tiny)


def _simplex_qp_iterative(gram, linear, curvature, allowed):
    step = 1.0 / (curvature * gram.diagonal().sum()).clamp_min(1e-30)
    inside = allowed.to(gram.dtype)
    w = inside / inside.sum().clamp_min(1)
    y, t = w, 1.0
    excluded = torch.full_like(w, -1e30)  # as in _min_norm_simplex_iterative
    for _ in range(ITERATIVE_STEPS):
        w_next = project_simplex(torch.where(allowed, y - step * (linear + curvature * (gram @ y)), excluded))
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = w_next + ((t - 1) / t_next) * (w_next - w)
        w, t = w_next, t_next
    return w


def min_quadratic_above(gram: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """For each column ``c`` of ``lower`` ``[K, C]``: ``argmin_{u >= lower[:, c]} u^T gram u``; returns ``[K, C]``."""
    gram = regularize(gram)
    k = gram.shape[0]
    if k > MAX_EXACT_TASKS:
        return _min_quadratic_above_iterative(gram, lower)
    masks = _subset_masks(k, str(gram.device), True)  # free coordinates of each candidate
    free = masks.to(gram.dtype)
    pair = free[:, :, None] * free[:, None, :]
    system = gram * pair + torch.diag_embed(1 - free)  # [S, K, K]
    fixed = (1 - free)[:, :, None] * lower[None]  # [S, K, C]: lower bound on fixed coordinates, 0 elsewhere
    rhs = torch.where(masks[:, :, None], -(gram @ fixed), lower[None])
    u, info = torch.linalg.solve_ex(system, rhs)  # [S, K, C]
    scale = 1 + lower.abs().amax(0)  # [C]
    feasible = (u >= lower[None] - 1e-9 * scale).all(1) & (info == 0)[:, None]  # [S, C]
    values = torch.einsum("skc,kj,sjc->sc", u, gram, u)
    values = torch.where(feasible, values, torch.full_like(values, float("inf")))
    best = values.argmin(0)  # [C]
    chosen = u.gather(0, best[None, None, :].expand(1, k, u.shape[2]))[0]
    return torch.maximum(chosen, lower)


def _pick_best(w: torch.Tensor, gram: torch.Tensor, feasible: torch.Tensor, simplex: bool) -> torch.Tensor:
    values = torch.einsum("sk,kj,sj->s", w, gram, w)
    values = torch.where(feasible, values, torch.full_like(values, float("inf")))
    chosen = w.index_select(0, values.argmin().reshape(1))[0].clamp_min(0)  # no host read of the index
    return chosen / chosen.sum() if simplex else chosen


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of ``v`` (``[..., K]``) onto the probability simplex (sort-based)."""
    k = v.shape[-1]
    sorted_v, _ = torch.sort(v, dim=-1, descending=True)
    cumulative = sorted_v.cumsum(-1) - 1
    index = torch.arange(1, k + 1, dtype=v.dtype, device=v.device)
    active = (sorted_v - cumulative / index) > 0
    count = active.sum(-1, keepdim=True).clamp_min(1)
    theta = cumulative.gather(-1, count - 1) / count.to(v.dtype)
    return (v - theta).clamp_min(0)


def _step_size(gram: torch.Tensor) -> torch.Tensor:
    return 1.0 / gram.diagonal().sum().clamp_min(1e-30)  # trace >= largest eigenvalue


def _min_norm_simplex_iterative(gram: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    inside = allowed.to(gram.dtype)
    step = _step_size(gram)
    w = inside / inside.sum().clamp_min(1)
    y, t = w, 1.0
    # far below any reachable value, so the projection gives the excluded coordinates 0 (and no NaN if all are)
    excluded = torch.full_like(w, -1e30)
    for _ in range(ITERATIVE_STEPS):
        w_next = project_simplex(torch.where(allowed, y - step * (gram @ y), excluded))
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = w_next + ((t - 1) / t_next) * (w_next - w)
        w, t = w_next, t_next
    return w


def _min_quadratic_above_iterative(gram: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    step = _step_size(gram)
    u = lower.clone()
    y, t = u, 1.0
    for _ in range(ITERATIVE_STEPS):
        u_next = torch.maximum(y - step * (gram @ y), lower)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = u_next + ((t - 1) / t_next) * (u_next - u)
        u, t = u_next, t_next
    return u
