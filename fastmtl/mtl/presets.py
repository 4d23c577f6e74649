"""The default MultiDigits setup: datasets, tasks and model built from a :class:`TrainConfig`."""

from __future__ import annotations

import torch
from torch import nn

from fastmtl.data.multidigits import TASKS as DATA_TASKS
from fastmtl.data.multidigits import MultiDigits
from fastmtl.mtl.config import TrainConfig
from fastmtl.mtl.model import MultiTaskModel
from fastmtl.mtl.tasks import Task
from fastmtl.nn import conv as _conv  # looked up at call time (swappable in tests)
from fastmtl.nn.heads import ClassificationHead, DenseHead


class StagedTrunk(nn.Module):
    """A conv trunk returning one feature map per stage (shallow to deep), for heads with skip connections.

    Stage 0 is a 3x3 conv with stride ``stem_stride`` (2 by default: the CPU time goes where the pixels are) and a
    3x3 conv; each later stage halves the resolution (max pooling) and applies two 3x3 convs; every conv is a fused
    conv+ReLU with ``widths[k]`` channels.
    """

    def __init__(self, in_channels: int, widths: list[int], stem_stride: int = 2):
        super().__init__()
        stages, ch = [], in_channels
        for k, w in enumerate(widths):
            first = _conv.FusedConv2dReLU(ch, w, 3, stride=1 if k else stem_stride, padding=1)
            layers = ([nn.MaxPool2d(2)] if k else []) + [first, _conv.FusedConv2dReLU(w, w, 3, padding=1)]
            stages.append(nn.Sequential(*layers))
            ch = w
        self.stages = nn.ModuleList(stages)
        self.out_channels = list(widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of every stage."""
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def build_tasks(config: TrainConfig) -> dict[str, Task]:
    """A :class:`Task` per configured MultiDigits task."""
    return {
        t: Task(DATA_TASKS[t]["kind"], num_classes=DATA_TASKS[t]["num_outputs"] if DATA_TASKS[t]["kind"] == "ce"
                else None, dense=DATA_TASKS[t]["dense"])
        for t in config.tasks
    }


def build_model(config: TrainConfig) -> MultiTaskModel:
    """Shared :class:`StagedTrunk` + a ClassificationHead or DenseHead per task (seeded by ``config.seed``)."""
    torch.manual_seed(config.seed)
    trunk = StagedTrunk(1, list(config.widths), stem_stride=config.stem_stride)
    heads = {}
    for t in config.tasks:
        spec = DATA_TASKS[t]
        if spec["dense"]:
            heads[t] = DenseHead(trunk.out_channels, spec["num_outputs"], width=config.decoder_width)
        else:
            heads[t] = ClassificationHead(trunk.out_channels[-1], spec["num_outputs"])
    model = MultiTaskModel(trunk, heads)
    _init_relu_convs(model)
    return model


def _init_relu_convs(model: nn.Module) -> None:
    # There is no normalisation layer between fused conv+ReLU blocks, so He initialisation keeps the activations'
    # scale through the depth (PyTorch's default conv init shrinks it and training stalls for epochs).
    for module in model.modules():
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if isinstance(weight, nn.Parameter) and weight.dim() == 4 and not isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu")
            if isinstance(bias, nn.Parameter):
                nn.init.zeros_(bias)


def build_datasets(config: TrainConfig) -> tuple[MultiDigits, MultiDigits]:
    """(train, val) MultiDigits; labels go missing in the training set only (validation is fully labelled)."""
    common = dict(image_size=config.image_size, tasks=config.tasks, seed=config.seed)
    train = MultiDigits("train", config.train_size, missing_labels=config.missing_labels, **common)
    val = MultiDigits("val", config.val_size, **common)
    return train, val
