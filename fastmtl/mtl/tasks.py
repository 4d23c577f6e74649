"""A task's description: loss kind, metrics, and fixed loss weight."""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("ce", "bce", "l1", "mse")
METRICS = ("accuracy", "miou", "pixel_acc", "abs_err", "rel_err", "f1")
LOWER_IS_BETTER = {"abs_err": True, "rel_err": True}


def default_metrics(kind: str, dense: bool) -> tuple[str, ...]:
    """The metrics reported for a task of this kind: ce -> accuracy (or miou, pixel_acc when dense),
    l1/mse -> abs_err, rel_err, bce -> f1."""
    if kind == "ce":
        return ("miou", "pixel_acc") if dense else ("accuracy",)
    if kind in ("l1", "mse"):
        return ("abs_err", "rel_err")
    return ("f1",)


@dataclass
class Task:
    """One task of a multi-task model.

    Args:
        kind: loss kind, one of ``"ce"``, ``"bce"``, ``"l1"``, ``"mse"`` (as in :func:`fastmtl.masked_multitask_loss`).
        metrics: names from :data:`METRICS`; ``None`` picks :func:`default_metrics` for ``kind`` and ``dense``.
        weight: fixed loss weight (used by the ``"fixed"`` weighting).
        num_classes: classes of a "ce" task (needed for mIoU's confusion matrix; inferred from the logits if None).
        dense: whether predictions are per pixel (segmentation, depth) rather than per sample.
    """

    kind: str
    metrics: tuple[str, ...] | None = None
    weight: float = 1.0
    num_classes: int | None = None
    dense: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Task kind must be one of {KINDS}, got {self.kind!r}")
        if self.metrics is None:
            self.metrics = default_metrics(self.kind, self.dense)
        self.metrics = tuple(self.metrics)
        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise ValueError(f"unknown metric(s) {bad}; expected names from {METRICS}")
        if not isinstance(self.weight, (int, float)) or self.weight < 0:
            raise ValueError(f"Task weight must be a number >= 0, got {self.weight!r}")
