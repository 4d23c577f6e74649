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


def conv_bias_relu_backward(
    grad_y: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride,
    padding,
    dilation,
    groups: int,
    output_mask: list[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``y = relu(conv2d(x, weight, bias))`` for x, weight and bias, from PyTorch's differentiable ops.

    The fused backends' autograd uses this when the backward itself is recorded (``create_graph=True``: gradient
    penalties, input-gradient regularisers), so that the gradients can be differentiated again. ``output_mask`` says
    which of the three to compute; the others are None.
    """
    grad_z = torch.ops.aten.threshold_backward(grad_y, y, 0)
    bias_sizes = [weight.shape[0]] if output_mask[2] else None
    grads = torch.ops.aten.convolution_backward(
        grad_z, x, weight, bias_sizes, list(stride), list(padding), list(dilation), False, [0, 0], groups, output_mask
    )
    return tuple(g if need else None for g, need in zip(grads, output_mask))
