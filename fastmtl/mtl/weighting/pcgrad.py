"""Projecting conflicting gradients."""

from __future__ import annotations

import torch

from fastmtl.mtl.weighting import _random
from fastmtl.mtl.weighting.base import GradientWeighting, masked_gram, register


def pcgrad_coefficients(gram: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """``[K, K]`` matrix ``C``: the projected gradient of task ``i`` is ``sum_j C[i, j] g_j``.

    Task ``i`` visits the other tasks in ``orders[i]``; whenever its current projected gradient ``g_i'`` has a
    negative inner product with ``g_j``, the component along ``g_j`` is removed:
    ``g_i' <- g_i' - (g_i' . g_j / |g_j|^2) g_j``. Inner products come from the Gramian, so the whole procedure is
    ``K - 1`` rounds of ``K x K`` work, every task at once.
    """
    k = gram.shape[0]
    coefficients = torch.eye(k, dtype=gram.dtype, device=gram.device)
    squared_norms = gram.diagonal().clamp_min(torch.finfo(gram.dtype).tiny)
    for step in range(k - 1):
        j = orders[:, step : step + 1]  # [K, 1]: the task each row projects against in this round
        dots = (coefficients @ gram).gather(1, j)  # g_i' . g_j
        shift = dots.clamp_max(0) / squared_norms[j]
        coefficients = coefficients.scatter_add(1, j, -shift)
    return coefficients


@register("pcgrad")
class PCGrad(GradientWeighting):
    """PCGrad of Yu, Kumar, Gupta, Levine, Hausman and Finn, "Gradient Surgery for Multi-Task Learning",
    NeurIPS 2020 (arXiv:2001.06782).

    Each task's gradient is projected onto the normal plane of every other task's gradient it conflicts with
    (negative inner product), visiting the others in a random order; the update is the sum of the projected
    gradients. Orthogonal or agreeing gradients are left alone (PCGrad is then plain EW). The returned weights are
    the coefficients of the update on the original gradients. A task without labels in the step is not projected
    against (its gradient counts as zero), so the others' projections are those of PCGrad on them alone.

    Args:
        task_names: the tasks.
        generator: ``torch.Generator`` on the gradients' device for the random orders (default: global RNG).
        mode, scale_heads: see :class:`GradientWeighting`.
    """

    def __init__(self, task_names, *, generator: torch.Generator | None = None, **options):
        super().__init__(task_names, **options)
        self.generator = generator

    def compute_weights(self, gram, losses, active=None, precision=None, loss_scale=None):
        """Column sums of :func:`pcgrad_coefficients` for fresh random orders, on the ``active`` tasks' Gramian."""
        orders = _random.other_task_orders(gram.shape[0], gram.device, self.generator)
        return pcgrad_coefficients(masked_gram(gram, active), orders).sum(0)

    def get_extra_state(self):
        return {"generator": _random.generator_state(self.generator)}

    def set_extra_state(self, state):
        _random.restore_generator(self.generator, state.get("generator"))
