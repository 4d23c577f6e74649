"""Dynamic Weight Average."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fastmtl.mtl.weighting.base import LossWeighting, register


def dwa_weights(loss_history: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Dynamic Weight Average weights from ``[E, K]`` per-epoch mean losses (Liu, Johns and Davison, CVPR 2019).

    ``w_k = K softmax_k(r / T)`` with ``r_k = L_k(E-1) / L_k(E-2)``, the ratio of the last two epochs' losses;
    all ones while fewer than two epochs are known. A task whose loss in either epoch is not positive (no labels
    in that epoch) or whose ratio is not finite gets ``r_k = 1``, as if its loss had not changed.
    """
    history = torch.as_tensor(loss_history)
    if history.dim() != 2 or history.shape[1] < 1:
        raise ValueError(f"loss_history must be [E, K] per-epoch mean losses, got shape {tuple(history.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    k = history.shape[1]
    dtype = history.dtype if history.is_floating_point() else torch.float32
    if history.shape[0] < 2:
        return torch.ones(k, dtype=dtype, device=history.device)
    history = history.to(dtype)
    previous = history[-2]
    ratio = history[-1] / torch.where(previous > 0, previous, torch.ones_like(previous))
    known = (previous > 0) & (history[-1] > 0) & torch.isfinite(ratio)
    ratio = torch.where(known, ratio, torch.ones_like(ratio))
    return k * torch.softmax(ratio / temperature, dim=0)


@register("dwa")
class DynamicWeightAverage(LossWeighting):
    """Dynamic Weight Average (DWA) of Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention",
    CVPR 2019 (arXiv:1803.10704).

    Each epoch's weights come from the ratio of the two previous epochs' mean losses (:func:`dwa_weights`): a
    task whose loss fell more slowly gets more weight. Call ``epoch_end`` with the epoch's mean losses.

    Args:
        task_names: the tasks.
        temperature: ``T`` (2.0 in the paper); larger is closer to equal weights.
    """

    def __init__(self, task_names, *, temperature: float = 2.0):
        super().__init__(task_names)
        temperature = float(temperature)
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.history: list[list[float]] = []
        self.register_buffer("weights", torch.ones(len(self.task_names)))

    def total_loss(self, losses, counts):
        """``(sum_t w_t L_t, w)`` with this epoch's weights."""
        w = self.weights.to(losses.dtype)
        return (w * losses).sum(), w

    def epoch_end(self, epoch_mean_losses: Mapping[str, float]) -> None:
        """Record the epoch's mean losses and compute the next epoch's weights."""
        if set(epoch_mean_losses) != set(self.task_names):
            raise ValueError(f"epoch_mean_losses must have exactly the tasks {list(self.task_names)}")
        self.history.append([float(epoch_mean_losses[n]) for n in self.task_names])
        history = torch.tensor(self.history[-2:], dtype=torch.float64)
        self.weights.copy_(dwa_weights(history, self.temperature).to(self.weights.dtype))

    def get_extra_state(self):
        return {"history": [list(row) for row in self.history]}

    def set_extra_state(self, state):
        self.history = [list(row) for row in state["history"]]
