"""The default MultiDigits setup: datasets, tasks and model built from a :class:`TrainConfig`."""

from __future__ import annotations

import torch
from torch import nn

from fastmtl.data.multidigits import TASKS as DATA_TASKS
from fastmtl.data.multidigits import MultiDigits
from fastmtl.mtl.config import TrainConfig
from fastmtl.mtl.model import MultiTaskModel
from fastmtl.mtl.tasks import Task
from fastmtl.nn import FusedConv2dReLU, FusedTrunk
from fastmtl.nn.heads import ClassificationHead, DenseHead


class StemTrunk(nn.Module):
    """The default trunk: a stem at reduced resolution, then a :class:`fastmtl.FusedTrunk`.

    The stem is a fused 3x3 conv+ReLU with stride ``stem_stride`` (2 by default: on a CPU the time goes where the
    pixels are) and a second fused 3x3 conv+ReLU, ``widths[0]`` channels. The FusedTrunk has a stage per further
    width (two fused 3x3 conv+ReLU blocks, then 2x2 max pooling). ``forward`` returns the stem output and every
    stage output, shallow to deep, for heads with skip connections; ``out_channels`` lists their channels.
    """

    def __init__(self, in_channels: int, widths: list[int], stem_stride: int = 2):
        super().__init__()
        w0 = widths[0]
        self.stem = nn.Sequential(
            FusedConv2dReLU(in_channels, w0, 3, stride=stem_stride, padding=1),
            FusedConv2dReLU(w0, w0, 3, padding=1),
        )
        self.body = FusedTrunk(w0, list(widths[1:]), depths=2, return_features=True) if len(widths) > 1 else None
        self.out_channels = list(widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stem output, then each FusedTrunk stage's output."""
        x = self.stem(x)
        return [x] if self.body is None else [x, *self.body(x)]


def build_tasks(config: TrainConfig) -> dict[str, Task]:
    """A :class:`Task` per configured MultiDigits task."""
    return {
        t: Task(DATA_TASKS[t]["kind"], num_classes=DATA_TASKS[t]["num_outputs"] if DATA_TASKS[t]["kind"] == "ce"
                else None, dense=DATA_TASKS[t]["dense"])
        for t in config.tasks
    }


def build_model(config: TrainConfig) -> MultiTaskModel:
    """Shared :class:`StemTrunk` + a ClassificationHead or DenseHead per task (seeded by ``config.seed``)."""
    torch.manual_seed(config.seed)
    trunk = StemTrunk(1, list(config.widths), stem_stride=config.stem_stride)
    heads = {}
    for t in config.tasks:
        spec = DATA_TASKS[t]
        if spec["dense"]:
            heads[t] = DenseHead(trunk.out_channels, spec["num_outputs"], width=config.decoder_width)
        else:
            heads[t] = ClassificationHead(trunk.out_channels[-1], spec["num_outputs"], hidden=config.head_hidden)
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
