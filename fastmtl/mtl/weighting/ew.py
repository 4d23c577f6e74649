"""Equal and fixed loss weights."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fastmtl.mtl.weighting.base import LossWeighting, register


@register("ew")
class EqualWeighting(LossWeighting):
    """Equal weighting (EW): ``total = sum_t L_t``, the usual multi-task baseline."""

    def total_loss(self, losses, counts):
        """``(sum_t L_t, ones)``."""
        return losses.sum(), torch.ones_like(losses.detach())


@register("fixed")
class FixedWeighting(LossWeighting):
    """Fixed, user-chosen weights: ``total = sum_t w_t L_t``.

    Args:
        task_names: the tasks.
        weights: a dict giving every task's weight (a finite float).
    """

    def __init__(self, task_names, *, weights: Mapping[str, float]):
        super().__init__(task_names)
        if not isinstance(weights, Mapping) or set(weights) != set(self.task_names):
            got = sorted(weights) if isinstance(weights, Mapping) else type(weights).__name__
            raise ValueError(f"weights must be a dict with exactly the tasks {list(self.task_names)}, got {got}")
        values = torch.tensor([float(weights[n]) for n in self.task_names], dtype=torch.float32)
        if not torch.isfinite(values).all():
            raise ValueError(f"weights must be finite, got {dict(weights)}")
        self.register_buffer("weights", values)

    def total_loss(self, losses, counts):
        """``(sum_t w_t L_t, w)``."""
        w = self.weights.to(losses.dtype)
        return (w * losses).sum(), w
