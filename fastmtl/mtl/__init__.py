"""Multi-task learning: tasks, the shared-trunk model, loss weighting, metrics and the trainer.

``from fastmtl.mtl import MultiTaskModel, Task, Trainer, TrainConfig, weighting, metrics``
"""

import importlib

from fastmtl.mtl import metrics
from fastmtl.mtl.config import TrainConfig
from fastmtl.mtl.model import MultiTaskModel
from fastmtl.mtl.tasks import Task
from fastmtl.mtl.trainer import Trainer

__all__ = ["MultiTaskModel", "Task", "TrainConfig", "Trainer", "metrics", "weighting"]


def __getattr__(name):
    # The weighting subpackage is imported on first use (it is developed separately and may import more).
    if name == "weighting":
        return importlib.import_module("fastmtl.mtl.weighting")
    raise AttributeError(f"module 'fastmtl.mtl' has no attribute {name!r}")
