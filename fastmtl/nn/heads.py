"""Task heads for :class:`fastmtl.mtl.MultiTaskModel`: they read the trunk's list of features (shallow to deep).

* :class:`ClassificationHead` - global average pooling of the deepest feature map, then a linear layer.
* :class:`DenseHead` - a light U-Net-style decoder back to the input resolution, using the skip features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastmtl.nn.conv import FusedConv2dReLU


class ClassificationHead(nn.Module):
    """Pool the deepest feature map and classify: ``[N, C, h, w] -> [N, num_outputs]``.

    Args:
        in_channels: channels of the deepest trunk feature.
        num_outputs: number of logits (classes, or labels for multi-label "bce" tasks).
        hidden: width of an optional hidden layer (0: a single linear layer).
    """

    def __init__(self, in_channels: int, num_outputs: int, hidden: int = 0):
        super().__init__()
        if hidden:
            self.mlp = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(), nn.Linear(hidden, num_outputs))
        else:
            self.mlp = nn.Linear(in_channels, num_outputs)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Logits ``[N, num_outputs]`` from the deepest of ``features``."""
        return self.mlp(features[-1].mean(dim=(2, 3)))


class DenseHead(nn.Module):
    """Decode per-pixel outputs at the input resolution from the trunk's features.

    Starting from the deepest feature, each step upsamples x2 (nearest), concatenates the next shallower feature
    (the skip connection) and applies a fused 3x3 conv+ReLU of width ``width``; a final 1x1 convolution gives
    ``num_outputs`` channels, upsampled to ``out_size`` when the shallowest feature is smaller than the input.

    Args:
        in_channels: channels of each trunk feature, shallow to deep (as the trunk returns them).
        num_outputs: output channels (classes for "ce", 1 for depth).
        width: channels of the decoder's convolutions (an int, or one per decoder step, deep to shallow).
    """

    def __init__(self, in_channels: list[int], num_outputs: int, width=32):
        super().__init__()
        in_channels = list(in_channels)
        steps = len(in_channels) - 1
        widths = [width] * max(steps, 1) if isinstance(width, int) else list(width)
        if len(widths) < max(steps, 1):
            raise ValueError(f"width needs {steps} values (one per decoder step), got {width!r}")
        blocks, ch = [], in_channels[-1]
        for k in range(steps):
            skip = in_channels[-2 - k]
            blocks.append(FusedConv2dReLU(ch + skip, widths[k], 3, padding=1))
            ch = widths[k]
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Conv2d(ch, num_outputs, 1)

    def forward(self, features: list[torch.Tensor], out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Per-pixel outputs ``[N, num_outputs, H, W]`` (``H, W`` = ``out_size`` or the shallowest feature's size)."""
        x = features[-1]
        for k, block in enumerate(self.blocks):
            skip = features[-2 - k]
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = block(torch.cat([x, skip], dim=1))
        y = self.out(x)
        if out_size is not None and tuple(y.shape[-2:]) != tuple(out_size):
            y = F.interpolate(y, size=out_size, mode="bilinear", align_corners=False)
        return y
