"""Random loss weighting."""

from __future__ import annotations

import torch

from fastmtl.mtl.weighting.base import LossWeighting, register


@register("rlw")
class RandomLossWeighting(LossWeighting):
    """Random loss weighting (RLW) of Lin, Ye, Xu, Shi and Zhang, "Reasonable Effectiveness of Random Weighting:
    A Litmus Test for Multi-Task Learning", TMLR 2022 (arXiv:2111.10603).

    Every step draws ``z ~ N(0, I_K)`` and uses ``w = softmax(z)`` (weights sum to 1, as in the paper).

    Args:
        task_names: the tasks.
        generator: a ``torch.Generator`` on the losses' device, for reproducible draws (default: the global RNG).
    """

    def __init__(self, task_names, *, generator: torch.Generator | None = None):
        super().__init__(task_names)
        self.generator = generator

    def total_loss(self, losses, counts):
        """``(sum_t w_t L_t, w)`` with freshly drawn ``w``."""
        z = torch.randn(losses.shape[0], generator=self.generator, device=losses.device, dtype=losses.dtype)
        w = torch.softmax(z, dim=0)
        return (w * losses.to(w.dtype)).sum(), w

    def get_extra_state(self):
        return {"generator": None if self.generator is None else self.generator.get_state()}

    def set_extra_state(self, state):
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])
