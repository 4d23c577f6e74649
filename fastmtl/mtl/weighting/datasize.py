"""Weights proportional to the amount of labelled data per task."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fastmtl.mtl.weighting.base import LossWeighting, register


@register("datasize")
class DataSizeWeighting(LossWeighting):
    """Data-size weighting: ``w_t = K n_t / sum_s n_s`` for ``n_t`` labelled samples of task ``t``.

    With partially labelled batches each ``L_t`` is a mean over task ``t``'s labelled samples only; weighting by
    the counts makes every label count the same, as if all labels were pooled (equal counts give EW).

    Args:
        task_names: the tasks.
        counts: optional fixed counts per task (e.g. labelled samples in the whole training set). Without them,
            ``backward`` needs ``counts=`` with the labelled count of each task in the batch.
    """

    def __init__(self, task_names, *, counts: Mapping[str, float] | None = None):
        super().__init__(task_names)
        if counts is not None:
            if not isinstance(counts, Mapping) or set(counts) != set(self.task_names):
                raise ValueError(f"counts must be a dict with exactly the tasks {list(self.task_names)}")
            values = torch.tensor([float(counts[n]) for n in self.task_names])
            if not torch.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
                raise ValueError(f"counts must be finite, non-negative and not all zero, got {dict(counts)}")
            self.register_buffer("counts", values)
        else:
            self.counts = None

    def total_loss(self, losses, counts):
        """``(sum_t w_t L_t, w)`` with ``w`` from the fixed counts, else from the batch's ``counts``."""
        if self.counts is not None:
            counts = self.counts.to(losses.dtype)
        elif counts is None:
            raise ValueError("datasize weighting needs counts= (labelled samples per task in the batch)")
        counts = counts.to(losses.dtype)
        total = counts.sum()
        k = losses.shape[0]
        # A batch with no label at all keeps equal weights (its losses are all zero anyway).
        w = torch.where(total > 0, k * counts / total.clamp_min(1e-12), torch.ones_like(counts))
        return (w * losses).sum(), w
