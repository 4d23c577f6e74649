"""The ``triton`` backend of ``fastmtl.conv_bias_relu``: Triton kernels registered as torch.library ops.

Registered ops (namespace ``fastmtl``), all over ``groups == 1`` convolutions:

* ``conv_bias_relu_triton(x, weight, bias, stride, padding, dilation) -> y`` - the fused implicit-GEMM forward.
  Autograd is registered: it saves ``y`` (its ``y > 0`` is the ReLU mask), ``x`` and ``weight``, and calls
* ``conv_bias_relu_triton_backward(grad_y, y, x, weight, stride, padding, dilation, output_mask, impl)
  -> (grad_x, grad_weight, grad_bias)`` - the fused ReLU/bias-gradient epilogue, then the input and weight
  gradients by Triton implicit GEMM (``impl="triton"``) or by ATen's ``convolution_backward`` (``impl="aten"``).
* ``relu_bias_grad_triton(grad_y, y, compute_bias_grad) -> (grad_z, grad_bias)`` - the epilogue alone.

With ``torch.library.triton_op`` (torch >= 2.6) the kernels are launched through ``wrap_triton``, so
``torch.compile`` sees into them. On older torch, and under ``TRITON_INTERPRET=1`` (where ``wrap_triton`` hands
back the interpreted kernel untouched, so fake tensors would reach the interpreter), the ops are opaque
``custom_op`` s with the fake implementations below.

``fastmtl.conv_bias_relu`` calls the registered op while torch.compile traces, and in eager mode an autograd
Function running the same launchers directly (the torch.library layers cost more host time than small kernels).

This module imports Triton; ``fastmtl.ops.conv_bias_relu`` imports it only when the triton backend is used.
Kernels: ``fastmtl.kernels.conv_bias_relu``.
"""

import os
from typing import List, Optional, Tuple

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from fastmtl.kernels import conv_bias_relu as kernels
from fastmtl.ops import conv_flops
from fastmtl.reference import conv_bias_relu as reference

FORWARD = "fastmtl::conv_bias_relu_triton"
BACKWARD = "fastmtl::conv_bias_relu_triton_backward"
EPILOGUE = "fastmtl::relu_bias_grad_triton"

BACKWARD_IMPL_ENV = "FASTMTL_TRITON_CONV_BACKWARD"
BACKWARD_IMPLS = kernels.BACKWARD_IMPLS
# "aten" until the H100 benchmarks show the Triton dgrad/wgrad beating cuDNN (issue 3: measured, not assumed).
DEFAULT_BACKWARD_IMPL = "aten"

HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
USES_TRITON_OP = HAS_TRITON_OP and not kernels.INTERPRET
_WRAP = torch.library.wrap_triton if USES_TRITON_OP else None

_backward_impl: Optional[str] = None


def set_backward_impl(impl: Optional[str]) -> None:
    """Choose how the autograd backward computes the input and weight gradients: ``"triton"`` or ``"aten"``.

    ``None`` restores the default (env ``FASTMTL_TRITON_CONV_BACKWARD``, else ``"aten"``). The choice is read
    when the forward runs (and is a constant under ``torch.compile``).
    """
    global _backward_impl
    if impl is not None and impl not in BACKWARD_IMPLS:
        raise ValueError(f"impl must be one of {BACKWARD_IMPLS} or None, got {impl!r}")
    _backward_impl = impl


def backward_impl() -> str:
    """The backward implementation in force: ``set_backward_impl``, else the environment, else the default."""
    if _backward_impl is not None:
        return _backward_impl
    impl = os.environ.get(BACKWARD_IMPL_ENV) or DEFAULT_BACKWARD_IMPL
    if impl not in BACKWARD_IMPLS:
        raise ValueError(f"{BACKWARD_IMPL_ENV} must be one of {BACKWARD_IMPLS}, got {impl!r}")
    return impl


# ---- op bodies (schemas are inferred from the annotations: keep them torch.library-friendly) --------------------


def _forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
) -> torch.Tensor:
    return kernels.conv_bias_relu_forward(x, weight, bias, stride, padding, dilation, wrap=_WRAP)


def _backward_op(
    grad_y: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    output_mask: List[bool],
    impl: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernels.conv_backward(grad_y, y, x, weight, stride, padding, dilation, output_mask, impl, wrap=_WRAP)


def _epilogue(grad_y: torch.Tensor, y: torch.Tensor, compute_bias_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return kernels.relu_bias_grad(grad_y, y, compute_bias_grad, wrap=_WRAP)


# ---- fake implementations (used where triton_op is not: it traces the bodies itself) ---------------------------
# They mirror the launchers' output layouts exactly (kernels.memory_format of the input they follow).


def _fake_forward(x, weight, bias, stride, padding, dilation):
    ho, wo = kernels.output_hw(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, padding, dilation)
    shape = (x.shape[0], weight.shape[0], ho, wo)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=kernels.memory_format(x))


def _fake_backward(grad_y, y, x, weight, stride, padding, dilation, output_mask, impl):
    grad_x = torch.empty_like(x, memory_format=kernels.memory_format(x)) if output_mask[0] else x.new_empty(0)
    grad_w = (
        torch.empty_like(weight, memory_format=kernels.memory_format(weight)) if output_mask[1] else weight.new_empty(0)
    )
    grad_b = y.new_empty(weight.shape[0]) if output_mask[2] else y.new_empty(0)
    return grad_x, grad_w, grad_b


def _fake_epilogue(grad_y, y, compute_bias_grad):
    grad_z = torch.empty_like(y, memory_format=kernels.memory_format(y))
    return grad_z, y.new_empty(y.shape[1] if compute_bias_grad else 0)


def _define(name, body, fake):
    if USES_TRITON_OP:
        return torch.library.triton_op(name, body, mutates_args=())
    op = torch.library.custom_op(name, body, mutates_args=())
    op.register_fake(fake)
    return op


conv_bias_relu_triton = _define(FORWARD, _forward, _fake_forward)
conv_bias_relu_triton_backward = _define(BACKWARD, _backward_op, _fake_backward)
relu_bias_grad_triton = _define(EPILOGUE, _epilogue, _fake_epilogue)
conv_flops.register(FORWARD, BACKWARD)


# ---- autograd ----------------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, weight, output)
    # An output nobody back-propagates into (e.g. another task's head under a per-task torch.autograd.grad)
    # arrives as None instead of a materialised zero tensor, and its backward is skipped.
    ctx.set_materialize_grads(False)
    ctx.conv_args = (stride, padding, dilation)
    ctx.has_bias = bias is not None
    ctx.impl = backward_impl()


def _gradients(ctx, grad_y, backward):
    """The autograd backward of both forms: ``backward`` is the registered op (traced) or the launcher (eager)."""
    if grad_y is None:
        return (None, None, None, None, None, None)
    x, weight, y = ctx.saved_tensors
    stride, padding, dilation = ctx.conv_args
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    mask = [bool(need_x), bool(need_w), bool(need_b and ctx.has_bias)]
    if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
        grad_x, grad_w, grad_b = reference.conv_bias_relu_backward(
            grad_y, y, x, weight, stride, padding, dilation, 1, mask
        )
    else:
        grad_x, grad_w, grad_b = backward(grad_y, y, x, weight, stride, padding, dilation, mask, ctx.impl)
    return (
        grad_x if mask[0] else None,
        grad_w if mask[1] else None,
        grad_b if mask[2] else None,
        None,
        None,
        None,
    )


def _autograd_backward(ctx, grad_y):
    return _gradients(ctx, grad_y, torch.ops.fastmtl.conv_bias_relu_triton_backward)


torch.library.register_autograd(FORWARD, _autograd_backward, setup_context=_setup_context)


class _EagerConvBiasReluTriton(torch.autograd.Function):
    """The registered op's kernels, saved tensors and backward, called without the torch.library layers.

    In eager mode the custom-op dispatch and its Python autograd wrapper cost more host time than a small
    convolution's kernels (on an H100, 0.24 ms of wall time per forward against 0.03 ms on the device), so
    :func:`run` takes this path unless torch.compile is tracing (the registered op is what it must see).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):
        y = kernels.conv_bias_relu_forward(x, weight, bias, stride, padding, dilation)
        _setup_context(ctx, (x, weight, bias, stride, padding, dilation), y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _gradients(ctx, grad_y, kernels.conv_backward)


# ---- entry point used by fastmtl.ops.conv_bias_relu -------------------------------------------------------------


def run(x, weight, bias, stride, padding, dilation, groups):
    """``relu(conv2d(...))`` on the triton backend; arguments already validated (pairs for stride/padding/dilation).

    ``groups > 1`` is not implemented in Triton: it falls back to the PyTorch reference
    (``fastmtl.reference.conv_bias_relu``), autograd included.
    """
    if groups != 1:
        return reference.conv_bias_relu(x, weight, bias, stride, padding, dilation, groups)
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        # what torch.compile or a dispatch mode (FlopCounterMode, ...) sees is the registered op
        return torch.ops.fastmtl.conv_bias_relu_triton(x, weight, bias, list(stride), list(padding), list(dilation))
    return _EagerConvBiasReluTriton.apply(x, weight, bias, list(stride), list(padding), list(dilation))
