"""Pure PyTorch conv+bias+ReLU: the ``torch`` backend and the oracle of the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_bias_relu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> torch.Tensor:
    """``relu(conv2d(x, weight, bias))`` with PyTorch's own kernels (autograd included)."""
    return torch.relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups))
