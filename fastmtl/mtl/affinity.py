"""Task-affinity diagnostics: which tasks help each other, and which transfer negatively.

Two measures, both ``K x K`` matrices over the tasks:

* **gradient cosine**: ``cos(g_i, g_j)`` between the task gradients on the shared representation. The
  gradient-level weightings already have the Gramian of every step (``weighting.last_gram``), so
  :class:`GradientCosineTracker` keeps a running mean at no extra cost; :func:`task_gradient_cosine` computes it
  on demand for any strategy (K head backwards, no parameter gradient touched).
* **lookahead inter-task affinity** of Fifty, Amid, Zhao, Yu, Anil and Finn, "Efficiently Identifying Task
  Groupings for Multi-Task Learning", NeurIPS 2021 (arXiv:2109.04617):
  ``Z[i, j] = 1 - L_j(theta_s - lr grad_{theta_s} L_i) / L_j(theta_s)``, the relative change of task ``j``'s
  loss on the batch after a lookahead step of the shared parameters on task ``i`` alone. Positive: ``i``'s update
  helps ``j``; negative: negative transfer. :func:`lookahead_affinity` computes it for one batch,
  :class:`LookaheadAffinityTracker` every N steps with a running mean.

:func:`plot_affinity` draws either matrix as a heatmap PNG.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "GradientCosineTracker",
    "LookaheadAffinityTracker",
    "cosine_from_gram",
    "lookahead_affinity",
    "plot_affinity",
    "task_gradient_cosine",
]


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """``[K, K]`` cosine similarities from a Gramian ``G G^T`` (0 where a gradient is zero; 1 on the diagonal)."""
    if not isinstance(gram, torch.Tensor) or gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square [K, K] tensor, got {getattr(gram, 'shape', gram)!r}")
    norms = gram.diagonal().clamp_min(0).sqrt()
    denominator = norms[:, None] * norms[None, :]
    cosine = torch.where(denominator > 0, gram / denominator.clamp_min(1e-30), torch.zeros_like(gram))
    eye = torch.eye(gram.shape[0], dtype=torch.bool, device=gram.device)
    return torch.where(eye, torch.ones_like(cosine), cosine.clamp(-1, 1))


def _stack(losses: Mapping[str, torch.Tensor], names: Sequence[str]) -> list[torch.Tensor]:
    if set(losses) != set(names):
        raise ValueError(f"losses must have exactly the tasks {list(names)}, got {sorted(losses)}")
    return [losses[n] for n in names]


def task_gradient_cosine(
    losses: Mapping[str, torch.Tensor], features: Sequence[torch.Tensor], task_names: Sequence[str] | None = None
) -> torch.Tensor:
    """``[K, K]`` cosine similarity of the task gradients w.r.t. the shared ``features``, computed now.

    The graphs are kept (``retain_graph``), so the step's backward can follow; no ``.grad`` is written.
    """
    names = list(task_names) if task_names is not None else list(losses)
    features = [features] if isinstance(features, torch.Tensor) else list(features)
    rows = []
    for loss in _stack(losses, names):
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, features, retain_graph=True, allow_unused=True)
        else:
            grads = [None] * len(features)
        rows.append(
            torch.cat([(torch.zeros_like(f) if g is None else g).reshape(-1).float() for f, g in zip(features, grads)])
        )
    matrix = torch.stack(rows)
    return cosine_from_gram(matrix @ matrix.T)


class _RunningMatrix:
    """Running mean of ``[K, K]`` matrices kept on their device (the step count is a host integer)."""

    def __init__(self, task_names: Sequence[str]):
        self.task_names = tuple(task_names)
        if not self.task_names or len(set(self.task_names)) != len(self.task_names):
            raise ValueError(f"task_names must be distinct and non-empty, got {self.task_names!r}")
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, matrix: torch.Tensor) -> None:
        """Add one ``[K, K]`` measurement to the running mean (kept on its device)."""
        k = len(self.task_names)
        if matrix.shape != (k, k):
            raise ValueError(
                f"expected a [{k}, {k}] matrix for tasks {list(self.task_names)}, got {tuple(matrix.shape)}"
            )
        matrix = matrix.detach().double()
        self.total = matrix.clone() if self.total is None else self.total + matrix.to(self.total.device)
        self.count += 1

    def matrix(self) -> torch.Tensor | None:
        """The mean so far (``None`` before the first update)."""
        return None if self.total is None else self.total / self.count

    def reset(self) -> None:
        """Forget every update."""
        self.total, self.count = None, 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary: ``{"tasks": [...], "matrix": [[...]] or None, "updates": n}`` (copies to the host)."""
        mean = self.matrix()
        return {
            "tasks": list(self.task_names),
            "matrix": None if mean is None else mean.cpu().tolist(),
            "updates": self.count,
        }

    def state_dict(self) -> dict[str, Any]:
        """The running sum and count."""
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.total, self.count = state["total"], int(state["count"])


class GradientCosineTracker(_RunningMatrix):
    """Running mean of the task-gradient cosine matrix on the shared representation.

    Feed it the Gramian a gradient-level weighting computed this step (``tracker.update(weighting.last_gram)``)
    or a ``[K, P]`` gradient matrix; the update stays on the device.
    """

    def update(self, gram: torch.Tensor | None = None, *, grads: torch.Tensor | None = None) -> None:
        """Add one step's cosines, from its Gramian ``[K, K]`` or its gradients ``grads`` ``[K, P]``."""
        if (gram is None) == (grads is None):
            raise ValueError("give exactly one of gram or grads")
        if grads is not None:
            grads = grads.float() if grads.dtype not in (torch.float32, torch.float64) else grads
            gram = grads @ grads.T
        self.add(cosine_from_gram(gram))


def _sgd(param: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    return param - lr * grad


def lookahead_affinity(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[[nn.Module, Any], Mapping[str, torch.Tensor]],
    shared_params: Sequence[torch.Tensor],
    lr: float,
    *,
    task_names: Sequence[str] | None = None,
    update: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Lookahead inter-task affinity ``Z[i, j]`` of Fifty et al. (NeurIPS 2021) on one batch.

    Args:
        model: the multi-task model; its buffers (e.g. BatchNorm statistics) and parameters are restored after.
        batch: whatever ``loss_fn`` needs.
        loss_fn: ``loss_fn(model, batch) -> {task: 0-dim loss}``.
        shared_params: the shared (trunk) parameters the lookahead steps move.
        lr: the lookahead learning rate (use the optimizer's).
        task_names: the row/column order (default: the order of ``loss_fn``'s dict).
        update: ``update(param, grad, lr) -> new param`` for the lookahead step (default: SGD).

    Returns:
        ``[K, K]`` float64: ``Z[i, j] = 1 - L_j(after a step on task i) / L_j(before)`` (0 where ``L_j`` is 0).
        Rows are the source task, columns the task whose loss is measured. The model's ``.grad`` is untouched.
    """
    params = [shared_params] if isinstance(shared_params, torch.Tensor) else list(shared_params)
    if not params:
        raise ValueError("shared_params must be a non-empty list of parameters")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    step = update or _sgd
    saved_params = [p.detach().clone() for p in params]
    saved_buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        losses = loss_fn(model, batch)
        names = list(task_names) if task_names is not None else list(losses)
        before_list = _stack(losses, names)
        before = torch.stack([loss.detach().double() for loss in before_list])
        task_grads = []  # all first: the lookahead steps below modify the parameters the graph saved
        for i, loss in enumerate(before_list):
            if loss.requires_grad:
                task_grads.append(torch.autograd.grad(loss, params, retain_graph=i < len(names) - 1, allow_unused=True))
            else:
                task_grads.append([None] * len(params))
        del losses, before_list
        rows = []
        for grads in task_grads:
            with torch.no_grad():
                for p, saved, g in zip(params, saved_params, grads):
                    p.copy_(saved if g is None else step(saved, g, lr))
                after = loss_fn(model, batch)
                after = torch.stack([after[n].detach().double() for n in names])
                rows.append(torch.where(before != 0, 1 - after / torch.where(before != 0, before, 1.0), 0.0))
        return torch.stack(rows)
    finally:
        with torch.no_grad():
            for p, saved in zip(params, saved_params):
                p.copy_(saved)
            for name, b in model.named_buffers():
                b.copy_(saved_buffers[name])


class LookaheadAffinityTracker(_RunningMatrix):
    """Running mean of :func:`lookahead_affinity`, measured every ``every`` steps.

    Args:
        task_names: the tasks (row/column order).
        every: measure when ``step % every == 0``.
        lr: the lookahead learning rate.
    """

    def __init__(self, task_names: Sequence[str], *, every: int = 10, lr: float = 0.01):
        super().__init__(task_names)
        if int(every) < 1 or not lr > 0:
            raise ValueError(f"every must be >= 1 and lr > 0, got every={every}, lr={lr}")
        self.every, self.lr = int(every), float(lr)

    def maybe_update(self, step: int, model, batch, loss_fn, shared_params, **options) -> torch.Tensor | None:
        """Measure on this batch when ``step`` is due; return the new matrix (or ``None`` when not due)."""
        if step % self.every != 0:
            return None
        matrix = lookahead_affinity(
            model, batch, loss_fn, shared_params, self.lr, task_names=self.task_names, **options
        )
        self.add(matrix)
        return matrix


def plot_affinity(matrix, task_names: Sequence[str], path, *, title: str | None = None) -> str:
    """Draw ``matrix`` ``[K, K]`` as an annotated heatmap PNG at ``path`` (matplotlib, Agg); return the path.

    A diverging colour map centred on zero shows negative transfer (blue) against positive (red). The colour scale
    is set by the off-diagonal entries (the diagonal, a task's effect on itself, would otherwise wash them out);
    every cell is annotated with its value.
    """
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot's backend alone

    values = torch.as_tensor(matrix).detach().double().cpu()
    names = list(task_names)
    if values.dim() != 2 or values.shape != (len(names), len(names)):
        raise ValueError(f"matrix must be [K, K] for the {len(names)} task names, got {tuple(values.shape)}")
    off_diagonal = values[~torch.eye(len(names), dtype=torch.bool)]
    limit = float(off_diagonal.abs().max()) if off_diagonal.numel() else 0.0
    limit = limit or float(values.abs().max()) or 1.0
    size = 1.2 + 0.8 * len(names)
    figure = Figure(figsize=(size + 1.2, size))
    axes = figure.add_subplot()
    image = axes.imshow(values.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
    axes.set_xticks(range(len(names)), labels=names, rotation=45, ha="right")
    axes.set_yticks(range(len(names)), labels=names)
    for i in range(len(names)):
        for j in range(len(names)):
            axes.text(j, i, f"{values[i, j]:.2g}", ha="center", va="center", fontsize=8)
    if title:
        axes.set_title(title)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return str(path)
