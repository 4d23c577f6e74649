"""FLOP counts of the conv_bias_relu ops for ``torch.utils.flop_counter.FlopCounterMode``.

A fused convolution counts as the convolution it replaces (the bias and ReLU are not counted, as PyTorch does not
count them either); its backward as the input and weight gradients it computes, one convolution's worth each.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import conv_flop_count, register_flop_formula


def _forward_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flop_count(list(x_shape), list(w_shape), list(out_shape), transposed=False)


def _backward_flops(grad_y_shape, y_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    # output_mask: the argument that is a list of bools (its position differs between the native and Triton ops)
    mask = next(a for a in args if isinstance(a, (list, tuple)) and a and all(isinstance(v, bool) for v in a))
    per_gradient = conv_flop_count(list(x_shape), list(w_shape), list(grad_y_shape), transposed=False)
    return per_gradient * (int(mask[0]) + int(mask[1]))


def register(forward: str, backward: str) -> None:
    """Register the formulas for the ops named ``forward`` and ``backward`` ("namespace::name"), once."""
    from torch.utils.flop_counter import flop_registry

    for name, formula in ((forward, _forward_flops), (backward, _backward_flops)):
        namespace, op = name.split("::")
        packet = getattr(getattr(torch.ops, namespace), op)
        if packet not in flop_registry:
            register_flop_formula(packet)(formula)
