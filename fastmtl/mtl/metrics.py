"""Multi-task metrics, accumulated on the device and read once at the end of an evaluation.

Every meter takes ``update(pred, target, mask)`` where ``mask`` (bool ``[N]``) marks the samples that have a label;
unlabelled samples never contribute. ``compute()`` returns ``{metric: float}`` (NaN when nothing was labelled).

* :class:`ConfusionMatrix` ("ce"): ``accuracy`` (per-sample predictions), ``miou`` and ``pixel_acc`` (dense);
  ``miou`` averages IoU over the classes that occur in the targets or the predictions.
* :class:`RegressionError` ("l1", "mse"): ``abs_err`` = mean |pred - target| and ``rel_err`` =
  mean |pred - target| / |target| over valid elements (target not NaN, and |target| > 0 for rel_err).
* :class:`MultiLabelF1` ("bce"): micro-averaged ``f1`` over all labels, a label predicted when its logit > 0.

:func:`delta_m` gives the relative multi-task gain against single-task baselines.
"""

from __future__ import annotations

import math

import torch

from fastmtl.mtl.tasks import LOWER_IS_BETTER, Task


class ConfusionMatrix:
    """Confusion matrix of a classification task, ``[num_classes, num_classes]`` (rows: target, cols: prediction).

    Args:
        num_classes: number of classes.
        ignore_index: target value that marks an unlabelled element.
    """

    def __init__(self, num_classes: int, ignore_index: int = -100):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = None

    def update(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add a batch: ``logits [N, C, *]``, ``target [N, *]`` int, ``mask [N]`` bool."""
        pred = logits.argmax(dim=1)
        valid = target != self.ignore_index
        if mask is not None:
            valid = valid & mask.view(-1, *([1] * (target.dim() - 1)))
        t, p = target[valid].long(), pred[valid].long()
        counts = torch.bincount(t * self.num_classes + p, minlength=self.num_classes**2)
        counts = counts.view(self.num_classes, self.num_classes)
        self.matrix = counts if self.matrix is None else self.matrix + counts

    def reduce_(self, reduce) -> None:
        """Replace the counts by ``reduce(counts)`` (e.g. a sum over processes; every process must have updated)."""
        self.matrix = reduce(self.matrix)

    def compute(self) -> dict[str, float]:
        """``accuracy``, ``pixel_acc`` (both the fraction of correct elements) and ``miou``."""
        if self.matrix is None or int(self.matrix.sum()) == 0:
            return {"accuracy": math.nan, "pixel_acc": math.nan, "miou": math.nan}
        m = self.matrix.double().cpu()
        correct = m.diag()
        acc = float(correct.sum() / m.sum())
        union = m.sum(0) + m.sum(1) - correct
        present = union > 0
        miou = float((correct[present] / union[present]).mean())
        return {"accuracy": acc, "pixel_acc": acc, "miou": miou}


class RegressionError:
    """Absolute and relative error of a dense regression task over valid elements (target not NaN)."""

    def __init__(self):
        self.sums = None

    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add a batch: ``pred`` and ``target`` of the same shape ``[N, *]``, ``mask [N]`` bool."""
        valid = ~torch.isnan(target)
        if mask is not None:
            valid = valid & mask.view(-1, *([1] * (target.dim() - 1)))
        t = torch.where(valid, target, torch.zeros_like(target)).double()
        err = torch.where(valid, (pred.double() - t).abs(), torch.zeros_like(t))
        rel_valid = valid & (t != 0)
        rel = torch.where(rel_valid, err / torch.where(rel_valid, t.abs(), torch.ones_like(t)), torch.zeros_like(t))
        sums = torch.stack([err.sum(), valid.sum().double(), rel.sum(), rel_valid.sum().double()])
        self.sums = sums if self.sums is None else self.sums + sums

    def reduce_(self, reduce) -> None:
        """Replace the sums by ``reduce(sums)`` (e.g. a sum over processes; every process must have updated)."""
        self.sums = reduce(self.sums)

    def compute(self) -> dict[str, float]:
        """``abs_err`` and ``rel_err`` (NaN when no element was valid)."""
        if self.sums is None:
            return {"abs_err": math.nan, "rel_err": math.nan}
        err, n, rel, n_rel = self.sums.cpu().tolist()
        return {"abs_err": err / n if n else math.nan, "rel_err": rel / n_rel if n_rel else math.nan}


class MultiLabelF1:
    """Micro-averaged F1 of a multi-label task (a label is predicted when its logit > 0, true when target > 0.5)."""

    def __init__(self):
        self.counts = None

    def update(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add a batch: ``logits`` and ``target`` ``[N, L]``, ``mask [N]`` bool."""
        if mask is not None:
            logits, target = logits[mask], target[mask]
        pred, true = logits > 0, target > 0.5
        counts = torch.stack([(pred & true).sum(), (pred & ~true).sum(), (~pred & true).sum(), torch.tensor(
            pred.shape[0], device=pred.device)])
        self.counts = counts if self.counts is None else self.counts + counts

    def reduce_(self, reduce) -> None:
        """Replace the counts by ``reduce(counts)`` (e.g. a sum over processes; every process must have updated)."""
        self.counts = reduce(self.counts)

    def compute(self) -> dict[str, float]:
        """``f1`` = 2 TP / (2 TP + FP + FN) (1.0 when there is nothing to find and nothing was predicted)."""
        if self.counts is None or int(self.counts[3]) == 0:
            return {"f1": math.nan}
        tp, fp, fn, _ = self.counts.cpu().tolist()
        denom = 2 * tp + fp + fn
        return {"f1": 2 * tp / denom if denom else 1.0}


def meter_for(task: Task, num_classes: int | None = None):
    """A fresh meter that computes ``task``'s metrics."""
    if task.kind == "ce":
        n = task.num_classes or num_classes
        if n is None:
            raise ValueError("a 'ce' task needs num_classes for its confusion matrix")
        return ConfusionMatrix(n)
    if task.kind in ("l1", "mse"):
        return RegressionError()
    return MultiLabelF1()


class MultiTaskMeter:
    """One meter per task; ``compute()`` returns ``{task: {metric: value}}`` restricted to each task's metrics."""

    def __init__(self, tasks: dict[str, Task]):
        self.tasks = tasks
        self.meters: dict[str, object] = {}

    def update(self, preds: dict, targets: dict, masks: dict | None = None) -> None:
        """Add a batch of predictions, targets and per-sample masks (dicts keyed by task)."""
        for name, task in self.tasks.items():
            if name not in self.meters:
                self.meters[name] = meter_for(task, num_classes=preds[name].shape[1])
            self.meters[name].update(preds[name].detach(), targets[name], None if masks is None else masks.get(name))

    def reduce_(self, reduce) -> None:
        """Apply ``reduce`` (e.g. :func:`fastmtl.mtl.distributed.all_reduce_sum`) to every meter's accumulators.

        Every task's meter must exist (at least one ``update``), in the same task order on every process.
        """
        missing = [t for t in self.tasks if t not in self.meters]
        if missing:
            raise RuntimeError(f"cannot reduce meters that were never updated: {missing}")
        for name in self.tasks:
            self.meters[name].reduce_(reduce)

    def compute(self) -> dict[str, dict[str, float]]:
        """Metrics of every task."""
        out = {}
        for name, task in self.tasks.items():
            values = self.meters[name].compute() if name in self.meters else {}
            out[name] = {m: values.get(m, math.nan) for m in task.metrics}
        return out


def delta_m(results: dict, baselines: dict, lower_is_better: dict | None = None) -> float:
    """Relative multi-task gain in percent (Maninis et al., 2019), positive when the multi-task model is better.

    ``Δm = 100 / T * Σ_t (1 / |M_t|) Σ_{m in M_t} s_m (R_{t,m} - B_{t,m}) / B_{t,m}``, with ``s_m = +1`` for
    metrics where higher is better and ``-1`` where lower is better (``abs_err``, ``rel_err`` by default).

    Args:
        results: ``{task: {metric: value}}`` of the multi-task model.
        baselines: the same structure for single-task models; only the metrics named here are compared.
        lower_is_better: metric -> bool, overriding the defaults.
    """
    lower = dict(LOWER_IS_BETTER)
    lower.update(lower_is_better or {})
    if not baselines:
        raise ValueError("baselines must name at least one task")
    total = 0.0
    for task, base in baselines.items():
        if task not in results:
            raise KeyError(f"results have no task {task!r}")
        if not base:
            raise ValueError(f"baselines for task {task!r} name no metric")
        gains = []
        for metric, b in base.items():
            if b == 0:
                raise ValueError(f"baseline {task}/{metric} is zero: the relative gain is undefined")
            sign = -1.0 if lower.get(metric, False) else 1.0
            gains.append(sign * (results[task][metric] - b) / b)
        total += sum(gains) / len(gains)
    return 100.0 * total / len(baselines)
