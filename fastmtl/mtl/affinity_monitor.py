"""AffinityMonitor: the task-affinity diagnostics of :mod:`fastmtl.mtl.affinity` measured during training.

The :class:`~fastmtl.mtl.Trainer` builds one when ``config.affinity_every`` is set (``fastmtl train --affinity N``):

* gradient cosine: with a gradient-level weighting, every step, from the Gramian the strategy already computed
  (no extra work); with a loss-level one, every ``N`` steps, from ``K`` head backwards before the step's backward;
* lookahead inter-task affinity (Fifty et al., 2021): every ``N`` steps on the step's batch, with an SGD lookahead
  at the current learning rate, before the step.

Both are running means over the run, kept in checkpoints, written to ``metrics.json`` (``"affinity"``) and drawn
as ``affinity.png`` (lookahead) and ``affinity_cosine.png`` (gradient cosine). Under ``torch.distributed`` the
measurements are averaged over the processes (the Gramian of a gradient-level weighting is already global).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from fastmtl.mtl import distributed
from fastmtl.mtl.affinity import (
    GradientCosineTracker,
    LookaheadAffinityTracker,
    plot_affinity,
    task_gradient_cosine,
)

LOOKAHEAD_PNG = "affinity.png"
COSINE_PNG = "affinity_cosine.png"


class AffinityMonitor:
    """Running gradient-cosine and lookahead-affinity matrices of one training run.

    Args:
        task_names: the tasks (row/column order).
        every: measure the lookahead affinity (and, for loss-level weighting, the cosine) every ``every`` steps.
    """

    def __init__(self, task_names: Sequence[str], every: int):
        if int(every) < 1:
            raise ValueError(f"every must be a positive number of steps, got {every!r}")
        self.task_names = list(task_names)
        self.every = int(every)
        self.cosine = GradientCosineTracker(self.task_names)
        self.lookahead = LookaheadAffinityTracker(self.task_names, every=self.every, lr=1.0)

    def due(self, step: int) -> bool:
        """Whether ``step`` (0-based, counted over the run) is a measuring step."""
        return step % self.every == 0

    def before_step(self, step: int, model, batch, loss_fn: Callable, shared_params, lr: float) -> None:
        """Lookahead affinity on this batch when due (parameters and ``.grad`` are left as they were)."""
        if not self.due(step):
            return
        self.lookahead.lr = float(lr)
        matrix = self.lookahead.maybe_update(step, model, batch, loss_fn, shared_params)
        if matrix is not None and distributed.world_size() > 1:
            self._replace_last(self.lookahead, matrix)

    def before_backward(self, step: int, losses, features, weighting) -> None:
        """Loss-level weighting: the task-gradient cosine on ``features`` when due (the graph is kept)."""
        if getattr(weighting, "family", "loss") == "gradient" or not self.due(step):
            return
        matrix = task_gradient_cosine(losses, features, self.task_names)
        if distributed.world_size() > 1:
            matrix = distributed.all_reduce_sum(matrix.double()) / distributed.world_size()
        self.cosine.update(gram=matrix)  # unit diagonal: the cosine of this 'Gramian' is the matrix itself

    def after_backward(self, weighting) -> None:
        """Gradient-level weighting: the cosine of this step's Gramian."""
        gram = getattr(weighting, "last_gram", None)
        if getattr(weighting, "family", "loss") == "gradient" and gram is not None:
            self.cosine.update(gram=gram)

    @staticmethod
    def _replace_last(tracker, matrix: torch.Tensor) -> None:
        # The tracker added this rank's matrix; swap it for the mean over the ranks.
        mean = distributed.all_reduce_sum(matrix.detach().double().clone()) / distributed.world_size()
        tracker.total = tracker.total - matrix.double().to(tracker.total.device) + mean.to(tracker.total.device)

    def as_dict(self) -> dict:
        """JSON-ready ``{"every", "gradient_cosine", "lookahead"}`` (each ``{"tasks", "matrix", "updates"}``)."""
        return {"every": self.every, "gradient_cosine": self.cosine.as_dict(), "lookahead": self.lookahead.as_dict()}

    def plot(self, out_dir: str) -> list[str]:
        """Write the heatmaps that have data to ``out_dir``; return their paths."""
        written = []
        for tracker, name, title in (
            (self.lookahead, LOOKAHEAD_PNG, "lookahead inter-task affinity (row helps column)"),
            (self.cosine, COSINE_PNG, "task-gradient cosine on the shared representation"),
        ):
            matrix = tracker.matrix()
            if matrix is not None:
                written.append(plot_affinity(matrix, self.task_names, os.path.join(out_dir, name), title=title))
        return written

    def state_dict(self) -> dict:
        """Both running means."""
        return {"cosine": self.cosine.state_dict(), "lookahead": self.lookahead.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.cosine.load_state_dict(state["cosine"])
        self.lookahead.load_state_dict(state["lookahead"])
