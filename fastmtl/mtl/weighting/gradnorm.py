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

    def compute_weights(self, gram, losses):
        """Renormalised weights; sets their ``.grad`` from the GradNorm loss."""
        if losses is None:
            raise ValueError("gradnorm needs the losses")
        k = gram.shape[0]
        with torch.no_grad():
            w = self.loss_weights
            w.mul_(k / w.sum().clamp_min(1e-30))
            initial = torch.where(torch.isnan(self.initial_losses), losses.to(w.dtype), self.initial_losses)
            self.initial_losses.copy_(initial)
            ratio = losses / initial.to(losses.dtype).clamp_min(1e-30)
            relative = ratio / ratio.mean().clamp_min(1e-30)
            norms = gram.diagonal().clamp_min(0).sqrt()
            weighted = w.to(gram.dtype) * norms
            target = weighted.mean() * relative**self.alpha
            grad = (torch.sign(weighted - target) * norms).to(w.dtype)  # scaled like the model's under loss_scale
            w.grad = grad if w.grad is None else w.grad + grad
        return w.detach().to(gram.dtype)
