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
    lookahead_affinity,
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
        self.lookahead = LookaheadAffinityTracker(self.task_names, every=self.every)  # lr: set at each measurement

    def due(self, step: int) -> bool:
        """Whether ``step`` (0-based, counted over the run) is a measuring step."""
        return step % self.every == 0

    def before_step(self, step: int, model, batch, loss_fn: Callable, shared_params, lr: float) -> None:
        """Lookahead affinity on this batch when due (parameters and ``.grad`` are left as they were)."""
        if not self.due(step):
            return
        self.lookahead.lr = float(lr)
        matrix = lookahead_affinity(model, batch, loss_fn, shared_params, self.lookahead.lr, task_names=self.task_names)
        self.lookahead.add(_mean_over_processes(matrix))

    def before_backward(self, step: int, losses, features, weighting) -> None:
        """Loss-level weighting: the task-gradient cosine on ``features`` when due (the graph is kept)."""
        if getattr(weighting, "family", "loss") == "gradient" or not self.due(step):
            return
        self.cosine.add(_mean_over_processes(task_gradient_cosine(losses, features, self.task_names)))

    def after_backward(self, weighting) -> None:
        """Gradient-level weighting: the cosine of this step's Gramian."""
        gram = getattr(weighting, "last_gram", None)
        if getattr(weighting, "family", "loss") == "gradient" and gram is not None:
            self.cosine.update(gram=gram)

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


def _mean_over_processes(matrix: torch.Tensor) -> torch.Tensor:
    """The mean of this measurement over the processes (the matrix itself in a single process)."""
    world = distributed.world_size()
    if world == 1:
        return matrix
    return distributed.all_reduce_sum(matrix.detach().double().clone()) / world
