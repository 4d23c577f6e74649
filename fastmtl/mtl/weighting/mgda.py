"""Multiple-gradient descent (min-norm point of the gradients' convex hull)."""

from __future__ import annotations

import torch

from fastmtl.mtl.weighting import _qp
from fastmtl.mtl.weighting.base import GradientWeighting, register

_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


@register("mgda")
class MGDA(GradientWeighting):
    """MGDA as multi-objective optimisation, Sener and Koltun, "Multi-Task Learning as Multi-Objective
    Optimization", NeurIPS 2018 (arXiv:1810.04650); after Désidéri's multiple-gradient descent (2012).

    The update is the min-norm point ``sum_t a_t g_t`` of the convex hull of the task gradients, ``a`` on the
    simplex, solved exactly on the device (:func:`fastmtl.mtl.weighting._qp.min_norm_simplex`). In the default
    representation mode the gradients are taken w.r.t. the shared representation, which is the paper's MGDA-UB
    (upper bound) variant: one trunk backward instead of one per task. ``mode="params"`` is plain MGDA.

    Args:
        task_names: the tasks.
        normalize: gradient normalisation before solving, as in the paper's code: ``"none"`` (default, the exact
            min-norm point), ``"l2"`` (divide ``g_t`` by its norm), ``"loss"`` (by ``L_t``), ``"loss+"`` (by
            ``L_t |g_t|``). The weights then apply to the normalised gradients.
        mode, scale_heads: see :class:`GradientWeighting`.
    """

    def __init__(self, task_names, *, normalize: str = "none", **options):
        super().__init__(task_names, **options)
        if normalize not in _NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {_NORMALIZATIONS}, got {normalize!r}")
        self.normalize = normalize
        if normalize in ("loss", "loss+"):
            self.needs_losses = True

    def compute_weights(self, gram, losses, active=None, precision=None, loss_scale=None):
        """Min-norm simplex weights of the (optionally normalised) gradients, as coefficients on the originals.

        Only the ``active`` tasks enter the hull: with partial labels a task without labels has a zero gradient,
        whose min-norm point (zero) would stop every other task.
        """
        if active is None:
            active = torch.ones(gram.shape[0], dtype=torch.bool, device=gram.device)
        norms = gram.diagonal().clamp_min(0).sqrt()
        tiny = torch.finfo(gram.dtype).tiny
        if self.normalize == "none":
            scale = torch.ones_like(norms)
        elif self.normalize == "l2":
            scale = 1 / norms.clamp_min(tiny)
        else:
            if losses is None:
                raise ValueError(f"mgda with normalize={self.normalize!r} needs the losses")
            denominator = losses if self.normalize == "loss" else losses * norms
            scale = 1 / denominator.clamp_min(tiny)
        scale = torch.where(active, scale, 0.0)
        scaled = gram * scale[:, None] * scale[None, :]
        return _qp.min_norm_simplex(scaled, active) * scale
