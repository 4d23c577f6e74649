"""Gradient normalisation."""

from __future__ import annotations

import torch
from torch import nn

from fastmtl.mtl.weighting.base import GradientWeighting, register


@register("gradnorm")
class GradNorm(GradientWeighting):
    """GradNorm of Chen, Badrinarayanan, Lee and Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks", ICML 2018 (arXiv:1711.02257).

    Learned weights ``w_t`` (parameters: give ``weighting.parameters()`` to the optimizer) are pushed so that the
    weighted gradient norms ``G_t = w_t |g_t|`` (``g_t`` w.r.t. the shared representation, or the shared
    parameters in ``mode="params"``) approach ``mean(G) r_t^alpha``, where ``r_t`` is task ``t``'s loss ratio
    ``L_t / L_t(0)`` relative to the mean ratio. The loss ``sum_t |G_t - target_t|`` (targets constant) has the
    closed-form gradient ``sign(G_t - target_t) |g_t|`` w.r.t. ``w_t``, written into ``w.grad`` here, so no
    second-order backward is needed. The weights are renormalised to sum to ``K`` at each step; the update is
    ``sum_t w_t g_t`` and the heads get ``w_t``-scaled gradients.

    Args:
        task_names: the tasks.
        alpha: the asymmetry (1.5 in the paper).
        mode, scale_heads: see :class:`GradientWeighting`.
    """

    default_scale_heads = True
    needs_losses = True

    def __init__(self, task_names, *, alpha: float = 1.5, **options):
        super().__init__(task_names, **options)
        self.alpha = float(alpha)
        k = len(self.task_names)
        self.loss_weights = nn.Parameter(torch.ones(k))
        self.register_buffer("initial_losses", torch.full((k,), float("nan")))

    def compute_weights(self, gram, losses, active=None, precision=None, loss_scale=None):
        """Renormalised weights; sets their ``.grad`` from the GradNorm loss.

        Only the tasks in this step (``active``, with a positive loss) enter the loss ratios and the targets; a
        task's initial loss is recorded on the first step it is in, and the others' weights get no gradient.
        """
        if losses is None:
            raise ValueError("gradnorm needs the losses")
        k = gram.shape[0]
        with torch.no_grad():
            w = self.loss_weights
            w.mul_(k / w.sum().clamp_min(1e-30))
            present = losses > 0 if active is None else active & (losses > 0)
            record = present & torch.isnan(self.initial_losses)
            self.initial_losses.copy_(torch.where(record, losses.to(w.dtype), self.initial_losses))
            initial = self.initial_losses.to(losses.dtype)
            ratio = torch.where(present, losses / torch.where(present, initial, 1.0).clamp_min(1e-30), 0.0)
            relative = ratio / _mean(ratio, present).clamp_min(1e-30)
            norms = gram.diagonal().clamp_min(0).sqrt()
            weighted = w.to(gram.dtype) * norms
            target = _mean(weighted, present) * relative**self.alpha
            # the model's gradients carry loss_scale, and the optimizer unscales these with them
            if isinstance(loss_scale, torch.Tensor):
                scale = loss_scale.to(device=gram.device, dtype=gram.dtype)
            else:
                scale = 1.0 if loss_scale is None else float(loss_scale)
            grad = torch.where(present, torch.sign(weighted - target) * norms * scale, 0.0).to(w.dtype)
            w.grad = grad if w.grad is None else w.grad + grad
        return w.detach().to(gram.dtype)


def _mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (0 when the mask is empty), without a host synchronisation."""
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp_min(1).to(values.dtype)
