"""Fast Adaptive Multitask Optimization."""

from __future__ import annotations

import torch
from fastmtl.mtl.weighting.base import LossWeighting, register


@register("famo")
class FAMO(LossWeighting):
    """FAMO of Liu, Liang, Chen and Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023
    (arXiv:2306.03792).

    Task logits ``xi`` give ``z = softmax(xi)``; the step minimises ``sum_t z_t log(L_t - m_t + eps) / c`` with
    ``c = sum_t z_t / (L_t - m_t + eps)`` (detached), so task ``t``'s loss gets the gradient weight
    ``z_t / (c (L_t - m_t + eps))`` (returned as its weight) and every task's log-loss falls at a balanced rate.
    ``xi`` is then moved by its own Adam (``lr``, weight decay ``gamma``) along the softmax Jacobian times the
    observed log-loss decrease ``log L_prev - log L_now``. One difference from the paper: the decrease is measured
    on the next step's batch rather than by a second forward pass on the same batch, so FAMO costs nothing extra.
    ``xi`` and its Adam moments are buffers managed here, not parameters of the model's optimizer (so
    ``parameters()`` is empty and ``state_dict()`` holds the whole state).

    Args:
        task_names: the tasks.
        lr: Adam learning rate for ``xi`` (0.025 in the paper).
        gamma: weight decay of ``xi`` (1e-3).
        min_losses: lower bounds ``m_t`` of the losses (0.0).
        eps: added inside the logarithm (1e-8).
    """

    def __init__(self, task_names, *, lr: float = 0.025, gamma: float = 1e-3, min_losses: float = 0.0,
                 eps: float = 1e-8):  # fmt: skip
        super().__init__(task_names)
        k = len(self.task_names)
        self.lr, self.gamma = float(lr), float(gamma)
        self.register_buffer("logits", torch.zeros(k))
        self.register_buffer("adam_mean", torch.zeros(k))
        self.register_buffer("adam_square", torch.zeros(k))
        self.adam_steps = 0
        self.min_losses = float(min_losses)
        self.eps = float(eps)
        self.register_buffer("previous_losses", torch.full((k,), float("nan")))

    def _shifted(self, losses: torch.Tensor) -> torch.Tensor:
        return losses - self.min_losses + self.eps

    def update(self, losses: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Move the logits by the log-loss decrease since the previous step (no-op on the first step).

        Only the ``active`` tasks (default: all) take part: the others' logits, Adam moments and previous losses
        are left as they are, and the softmax Jacobian is that of the active tasks' logits.
        """
        with torch.no_grad():
            if active is None:
                active = torch.ones_like(self.logits, dtype=torch.bool)
            current = self._shifted(losses.detach().to(self.logits.dtype)).clamp_min(self.eps).log()
            previous = self.previous_losses
            decrease = torch.where(active, torch.nan_to_num(previous - current, nan=0.0), 0.0)  # first step: 0
            z = _masked_softmax(self.logits, active)
            grad = z * (decrease - (z * decrease).sum()) + self.gamma * self.logits
            self._adam_step(grad, active)
            self.previous_losses.copy_(torch.where(active, current, previous))

    def _adam_step(self, grad: torch.Tensor, active: torch.Tensor, beta1: float = 0.9, beta2: float = 0.999,
                   eps: float = 1e-8) -> None:  # fmt: skip
        self.adam_steps += 1
        self.adam_mean.copy_(torch.where(active, beta1 * self.adam_mean + (1 - beta1) * grad, self.adam_mean))
        self.adam_square.copy_(torch.where(active, beta2 * self.adam_square + (1 - beta2) * grad**2, self.adam_square))
        mean = self.adam_mean / (1 - beta1**self.adam_steps)
        square = self.adam_square / (1 - beta2**self.adam_steps)
        self.logits.sub_(torch.where(active, self.lr * mean / (square.sqrt() + eps), 0.0))

    def total_loss(self, losses, counts):
        """Update ``xi`` from the loss decrease, then ``(sum_t z_t log(L_t - m_t + eps) / c, effective weights)``.

        Tasks without labels (``counts`` 0, or a zero loss when no counts are given) are left out: weight 0, and
        the others' weights are those of FAMO on the remaining tasks (a zero loss would otherwise make ``c`` huge
        and wipe out the whole step).
        """
        active = losses.detach() > 0 if counts is None else counts > 0
        self.update(losses, active)
        z = _masked_softmax(self.logits, active).to(losses.dtype)
        shifted = self._shifted(losses).clamp_min(self.eps)
        c = torch.where(active, z / shifted.detach(), 0.0).sum()
        c = c.clamp_min(torch.finfo(c.dtype).tiny)  # no task in the step: total 0, weights 0
        total = torch.where(active, z * shifted.log(), 0.0).sum() / c
        return total, torch.where(active, z / (c * shifted.detach()), 0.0)

    def get_extra_state(self):
        return {"adam_steps": self.adam_steps}

    def set_extra_state(self, state):
        self.adam_steps = int(state["adam_steps"])


def _masked_softmax(logits: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Softmax over the ``active`` entries of ``logits``; 0 elsewhere (all 0 when none is active)."""
    shifted = torch.where(active, logits, torch.full_like(logits, float("-inf")))
    z = torch.softmax(shifted, dim=0)
    return torch.where(active, z, 0.0)
