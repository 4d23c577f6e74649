"""``curves.png``: per-task losses and metrics per epoch (matplotlib, Agg backend)."""

from __future__ import annotations


def plot_curves(history: list[dict], path: str) -> None:
    """One row per task: train/val loss on the left, validation metrics on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    tasks = list(history[0]["train_loss"])
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(9, 2.6 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        ax = axes[row, 0]
        ax.plot(epochs, [h["train_loss"][task] for h in history], "o-", label="train")
        ax.plot(epochs, [h["val_loss"][task] for h in history], "s--", label="val")
        ax.set_title(f"{task}: loss")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        ax = axes[row, 1]
        for metric in history[0]["val"][task]:
            ax.plot(epochs, [h["val"][task][metric] for h in history], "o-", label=metric)
        ax.set_title(f"{task}: validation metrics")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
