"""Conflict-averse gradient descent."""

from __future__ import annotations

import torch

from fastmtl.mtl.weighting import _qp
from fastmtl.mtl.weighting.base import GradientWeighting, masked_gram, register


def cagrad_objective(
    w: torch.Tensor, gram: torch.Tensor, c: float, active: torch.Tensor | None = None
) -> torch.Tensor:
    """CAGrad's dual objective ``w . (G g0) + c |g0| |G^T w|`` for weights ``w`` ``[..., K]`` (``g0`` the mean
    gradient of the ``active`` tasks, all when None)."""
    mean_dots, g0_norm = _mean_gradient(gram, active)
    quad = torch.einsum("...i,ij,...j->...", w, gram, w).clamp_min(0)
    return w @ mean_dots + c * g0_norm * quad.sqrt()


def _mean_gradient(gram: torch.Tensor, active: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G g0, |g0|)`` for ``g0`` the mean gradient of the ``active`` tasks (all when None)."""
    if active is None:
        share = torch.full((gram.shape[0],), 1.0 / gram.shape[0], dtype=gram.dtype, device=gram.device)
    else:
        share = active.to(gram.dtype) / active.sum().clamp_min(1).to(gram.dtype)
    return gram @ share, (share @ gram @ share).clamp_min(0).sqrt()


@register("cagrad")
class CAGrad(GradientWeighting):
    """CAGrad of Liu, Liu, Jin, Stone and Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021 (arXiv:2110.14048).

    The update ``d`` maximises the worst task improvement ``min_i g_i . d`` within a ball of radius ``c |g0|``
    around the mean gradient ``g0``. Its dual: ``w* = argmin_{w in simplex} w . (G g0) + c |g0| |G^T w|``, then
    ``d = g0 + (c |g0| / |g_w|) g_w`` with ``g_w = G^T w*``; ``c = 0`` gives the mean gradient. The simplex
    problem is solved on the device as a family of exact quadratic programs (see :meth:`solve`). Only the tasks
    with labels in the step take part (``g0`` is their mean, ``w*`` lives on their simplex): the update is the
    one CAGrad gives those tasks alone.

    Args:
        task_names: the tasks.
        c: the radius factor (0.5 in the paper's image experiments).
        rescale: 0 returns ``d``; 1 (default, as in the paper's code) ``d / (1 + c^2)``; 2 ``d / (1 + c)``.
        steps: projected-gradient steps of the inner solve when there are more than 10 tasks (100).
        mode, scale_heads: see :class:`GradientWeighting`.
    """

    def __init__(self, task_names, *, c: float = 0.5, rescale: int = 1, steps: int = 100, **options):
        super().__init__(task_names, **options)
        c, rescale, steps = float(c), int(rescale), int(steps)  # options may arrive as strings from a CLI
        if not c >= 0:
            raise ValueError(f"c must be non-negative, got {c}")
        if rescale not in (0, 1, 2):
            raise ValueError(f"rescale must be 0, 1 or 2, got {rescale}")
        if int(steps) < 1:
            raise ValueError(f"steps must be positive, got {steps}")
        self.c, self.rescale, self.steps = float(c), int(rescale), int(steps)

    def solve(self, gram: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """The dual weights ``w*`` on the simplex of the ``active`` tasks (all when None; ``gram`` is masked).

        ``sqrt(q) = min_{r > 0} q / (2 r) + r / 2``, so for a fixed ``r`` the dual is a quadratic program on the
        simplex (solved exactly, :func:`fastmtl.mtl.weighting._qp.simplex_qp`); the optimal ``r`` is ``|g_w*|``.
        ``r`` is scanned on a log grid and then on a fine grid around the best point, all in two batched solves,
        keeping the ``w`` with the smallest true objective. With more than ``_qp.MAX_EXACT_TASKS`` tasks,
        ``steps`` projected-gradient steps are used instead.
        """
        k = gram.shape[0]
        if active is None:
            active = torch.ones(k, dtype=torch.bool, device=gram.device)
        gram = masked_gram(gram, active)
        mean_norm = gram.diagonal().sum() / active.sum().clamp_min(1).to(gram.dtype)
        gram = gram / mean_norm.clamp_min(torch.finfo(gram.dtype).tiny)
        if k > _qp.MAX_EXACT_TASKS:
            return self._solve_iterative(gram, active)
        mean_dots, g0_norm = _mean_gradient(gram, active)
        radius = self.c * g0_norm
        top = gram.diagonal().amax().clamp_min(1e-30).sqrt()  # |g_w| <= the largest gradient norm
        exponents = torch.linspace(-4, 0, 48, dtype=gram.dtype, device=gram.device)
        coarse = top * 10**exponents
        w = _qp.simplex_qp(gram, mean_dots, radius / coarse, active)
        best = cagrad_objective(w, gram, self.c, active).argmin()
        low = coarse.gather(0, (best - 1).clamp_min(0).reshape(1))
        high = coarse.gather(0, (best + 1).clamp_max(coarse.shape[0] - 1).reshape(1))
        fine = low + (high - low) * torch.linspace(0, 1, 32, dtype=gram.dtype, device=gram.device)
        w = torch.cat([w, _qp.simplex_qp(gram, mean_dots, radius / fine, active)])
        values = cagrad_objective(w, gram, self.c, active)
        return w.index_select(0, values.argmin().reshape(1))[0]

    def _solve_iterative(self, gram: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        if active is None:
            active = torch.ones(gram.shape[0], dtype=torch.bool, device=gram.device)
        w = active.to(gram.dtype) / active.sum().clamp_min(1).to(gram.dtype)
        best_w, best_value = w, cagrad_objective(w, gram, self.c, active)
        mean_dots, g0_norm = _mean_gradient(gram, active)
        radius = self.c * g0_norm
        excluded = torch.full_like(w, -1e30)  # keeps the inactive coordinates at 0 through the projection
        for step in range(self.steps):
            gw_norm = (w @ gram @ w).clamp_min(1e-20).sqrt()
            grad = mean_dots + radius * (gram @ w) / gw_norm
            w = _qp.project_simplex(torch.where(active, w - grad * (0.5 / (step + 1) ** 0.5), excluded))
            value = cagrad_objective(w, gram, self.c, active)
            better = value < best_value
            best_w = torch.where(better, w, best_w)
            best_value = torch.where(better, value, best_value)
        return best_w

    def compute_weights(self, gram, losses, active=None, precision=None, loss_scale=None):
        """Coefficients of ``d`` on the task gradients: ``1/K + (c |g0| / |g_w|) w*``, rescaled, with ``K`` and
        ``g0`` those of the ``active`` tasks (the others get 0)."""
        if active is None:
            active = torch.ones(gram.shape[0], dtype=torch.bool, device=gram.device)
        gram = masked_gram(gram, active)
        coefficients = active.to(gram.dtype) / active.sum().clamp_min(1).to(gram.dtype)
        if self.c > 0:
            w = self.solve(gram, active)
            _, g0_norm = _mean_gradient(gram, active)
            gw_norm = (w @ gram @ w).clamp_min(0).sqrt()
            coefficients = coefficients + self.c * g0_norm / gw_norm.clamp_min(1e-30) * w
        if self.rescale == 1:
            coefficients = coefficients / (1 + self.c**2)
        elif self.rescale == 2:
            coefficients = coefficients / (1 + self.c)
        return coefficients
