"""Gradient vaccine."""

from __future__ import annotations

import torch

from fastmtl.mtl.weighting import _random
from fastmtl.mtl.weighting.base import GradientWeighting, register


@register("gradvac")
class GradVac(GradientWeighting):
    """GradVac of Wang, Tsvetkov, Firat and Cao, "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models", ICLR 2021 (arXiv:2010.05874).

    Like PCGrad but towards a learned target similarity: for each task ``i`` and each other task ``j`` (random
    order), when ``cos(g_i', g_j)`` is below the running target ``phi_ij``, ``g_i'`` gets the multiple of ``g_j``
    that lifts the cosine to ``phi_ij``:
    ``g_i' += |g_i'| (phi_ij sqrt(1 - c^2) - c sqrt(1 - phi_ij^2)) / (|g_j| sqrt(1 - phi_ij^2)) g_j``; the target
    follows ``phi_ij <- (1 - beta) phi_ij + beta c``. The update is the sum of the ``g_i'``. Applied to the whole
    shared representation (one group), with ``K - 1`` rounds of ``K x K`` work on the device.

    Args:
        task_names: the tasks.
        beta: EMA rate of the target similarities (0.01 as in the paper).
        generator: ``torch.Generator`` on the gradients' device for the random orders.
        mode, scale_heads: see :class:`GradientWeighting`.
    """

    def __init__(self, task_names, *, beta: float = 0.01, generator: torch.Generator | None = None, **options):
        super().__init__(task_names, **options)
        beta = float(beta)
        if not 0 <= beta <= 1:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.beta = float(beta)
        self.generator = generator
        k = len(self.task_names)
        self.register_buffer("targets", torch.zeros(k, k, dtype=torch.float64))

    def compute_weights(self, gram, losses, active=None, precision=None, loss_scale=None):
        """Column sums of the vaccinated gradients' coefficients; updates the target similarities of the pairs
        whose tasks are both ``active`` (a task without labels has no direction: its cosines say nothing)."""
        k = gram.shape[0]
        if active is None:
            active = torch.ones(k, dtype=torch.bool, device=gram.device)
        orders = _random.other_task_orders(k, gram.device, self.generator)
        targets = self.targets.to(gram.dtype)
        coefficients = torch.eye(k, dtype=gram.dtype, device=gram.device)
        tiny = 1e-30
        rows = torch.arange(k, device=gram.device)[:, None]
        for step in range(k - 1):
            j = orders[:, step : step + 1]
            projected = coefficients @ gram  # [i, m] = g_i' . g_m
            dots = projected.gather(1, j)
            own_norm = (projected * coefficients).sum(1, keepdim=True).clamp_min(0).sqrt()
            other_norm = gram.diagonal()[j].clamp_min(0).sqrt()
            cosine = dots / (own_norm * other_norm).clamp_min(tiny)
            target = targets.gather(1, j)
            root_c = (1 - cosine**2).clamp_min(0).sqrt()
            root_t = (1 - target**2).clamp_min(0).sqrt()
            boost = own_norm * (target * root_c - cosine * root_t) / (other_norm * root_t).clamp_min(tiny)
            boost = torch.where(cosine < target, boost, torch.zeros_like(boost))
            coefficients = coefficients.scatter_add(1, j, boost)
            moved = (1 - self.beta) * target + self.beta * cosine
            targets = targets.index_put((rows, j), torch.where(active[:, None] & active[j], moved, target))
        with torch.no_grad():
            self.targets.copy_(targets.to(self.targets.dtype))
        return coefficients.sum(0)

    def get_extra_state(self):
        return {"generator": _random.generator_state(self.generator)}

    def set_extra_state(self, state):
        _random.restore_generator(self.generator, state.get("generator"))
