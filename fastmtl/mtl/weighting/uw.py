"""Uncertainty weighting with learned log-variances."""

from __future__ import annotations

import torch
from torch import nn

from fastmtl.mtl.weighting.base import LossWeighting, register


@register("uw")
class UncertaintyWeighting(LossWeighting):
    """Uncertainty weighting (UW) of Kendall, Gal and Cipolla, "Multi-Task Learning Using Uncertainty to Weigh
    Losses for Scene Geometry and Semantics", CVPR 2018 (arXiv:1705.07115).

    One learned log-variance ``s_t = log sigma_t^2`` per task; ``total = sum_t exp(-s_t) L_t + s_t`` (the common
    form that drops the paper's factor 1/2 for regression tasks). ``d total / d s_t = 1 - exp(-s_t) L_t``, so
    ``s_t`` settles at ``log L_t``. Give ``weighting.parameters()`` to the optimizer.

    Args:
        task_names: the tasks.
        init: the initial log-variance of every task (0.0: weights start at 1).
    """

    def __init__(self, task_names, *, init: float = 0.0):
        super().__init__(task_names)
        self.log_vars = nn.Parameter(torch.full((len(self.task_names),), float(init)))

    def total_loss(self, losses, counts):
        """``(sum_t exp(-s_t) L_t + s_t, exp(-s))``."""
        s = self.log_vars.to(losses.dtype)
        weights = torch.exp(-s)
        return (weights * losses + s).sum(), weights
