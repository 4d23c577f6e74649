"""Unconflicting projection of gradients (Jacobian descent)."""

from __future__ import annotations

import torch

from fastmtl.mtl.weighting import _qp
from fastmtl.mtl.weighting.base import GradientWeighting, masked_gram, register


@register("upgrad")
class UPGrad(GradientWeighting):
    """UPGrad of Quinton and Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (arXiv:2406.16232).

    Each task gradient ``g_i`` is projected onto the dual cone of all task gradients (the directions that
    conflict with none): the projection is ``G^T u_i`` with ``u_i = argmin_{u >= e_i} u^T M u`` (``M`` the
    Gramian), a box-constrained QP solved exactly on the device. The update is the mean of the projections,
    coefficients ``mean_i u_i``; it has a non-negative inner product with every ``g_i``. Only the tasks with
    labels in the step take part (the mean is over their projections, the cone is theirs): the update is the one
    UPGrad gives those tasks alone.
    """

    def compute_weights(self, gram, losses, active=None, precision=None, loss_scale=None):
        """``mean_i u_i`` over the dual-cone projections of the ``active`` tasks (all when None)."""
        k = gram.shape[0]
        if active is None:
            active = torch.ones(k, dtype=torch.bool, device=gram.device)
        lower = torch.eye(k, dtype=gram.dtype, device=gram.device)  # column i: the bound e_i
        projections = _qp.min_quadratic_above(masked_gram(gram, active), lower)
        share = active.to(gram.dtype) / active.sum().clamp_min(1).to(gram.dtype)
        return projections @ share
