"""Unconflicting projection of gradients (Jacobian descent)."""

from __future__ import annotations

import torch

from fastmtl.mtl.weighting import _qp
from fastmtl.mtl.weighting.base import GradientWeighting, register


@register("upgrad")
class UPGrad(GradientWeighting):
    """UPGrad of Quinton and Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (arXiv:2406.16232).

    Each task gradient ``g_i`` is projected onto the dual cone of all task gradients (the directions that
    conflict with none): the projection is ``G^T u_i`` with ``u_i = argmin_{u >= e_i} u^T M u`` (``M`` the
    Gramian), a box-constrained QP solved exactly on the device. The update is the mean of the projections,
    coefficients ``mean_i u_i``; it has a non-negative inner product with every ``g_i``.
    """

    def compute_weights(self, gram, losses, active=None, precision=None, loss_scale=None):
        """``mean_i u_i`` over the K dual-cone projections."""
        k = gram.shape[0]
        lower = torch.eye(k, dtype=gram.dtype, device=gram.device)  # column i: the bound e_i
        return _qp.min_quadratic_above(gram, lower).mean(1)
