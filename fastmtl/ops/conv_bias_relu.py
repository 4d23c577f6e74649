"""``fastmtl.conv_bias_relu``: ``relu(conv2d(x, weight, bias))`` as one op, on every backend.

Registered ops (namespace ``fastmtl``):

* ``conv_bias_relu`` / ``conv_bias_relu_backward`` / ``relu_bias_grad`` - native (schemas in ``csrc/ops.cpp``;
  CPU kernels in ``csrc/cpu/conv_bias_relu.cpp``, CUDA in ``csrc/cuda/conv_bias_relu.cu`` and
  ``csrc/cuda/relu_bias_grad.cu``, autograd in ``csrc/autograd.cpp``). Fake implementations are registered here, so
  ``torch.compile`` traces them and ``opcheck`` passes.
* ``conv_bias_relu_triton`` - the Triton kernels of ``fastmtl.kernels.conv_bias_relu`` (registered lazily, the first
  time the triton backend is used, since importing Triton is slow).

The backward saves the output ``y`` (not the pre-activation): ``y > 0`` is the ReLU mask.
"""

from __future__ import annotations

import torch

from fastmtl import _native, backends
from fastmtl.ops import conv_flops
from fastmtl.ops._checks import FLOAT_DTYPES, check_same, check_tensor, pair
from fastmtl.reference import conv_bias_relu as reference

NATIVE = "fastmtl::conv_bias_relu"
NATIVE_BACKWARD = "fastmtl::conv_bias_relu_backward"
NATIVE_EPILOGUE = "fastmtl::relu_bias_grad"


def output_hw(in_hw, kernel_hw, stride, padding, dilation) -> tuple[int, int]:
    """Spatial output size of a convolution."""
    return tuple(
        (in_hw[d] + 2 * padding[d] - dilation[d] * (kernel_hw[d] - 1) - 1) // stride[d] + 1 for d in range(2)
    )


def resolve_padding(padding, kernel_hw, stride, dilation) -> tuple[int, int]:
    """``padding`` as a symmetric pair of ints: an int, a pair, or ``nn.Conv2d``'s ``"valid"`` / ``"same"``.

    ``"same"`` needs stride 1 (as in ``nn.Conv2d``) and an even total padding ``dilation * (kernel - 1)`` per side,
    since the fused op pads both sides equally. Raises ValueError otherwise.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding != "same":
            raise ValueError(f"padding must be an int, a pair of ints, 'valid' or 'same', got {padding!r}")
        if tuple(stride) != (1, 1):
            raise ValueError(f"padding='same' needs stride 1 (as in nn.Conv2d), got stride {tuple(stride)}")
        totals = [dilation[d] * (kernel_hw[d] - 1) for d in range(2)]
        if any(t % 2 for t in totals):
            raise ValueError(
                f"padding='same' with kernel size {tuple(kernel_hw)} and dilation {tuple(dilation)} needs asymmetric "
                "padding, which the fused op does not support; use an odd kernel size"
            )
        return (totals[0] // 2, totals[1] // 2)
    return pair("padding", padding, 0)


def validate(x, weight, bias, stride, padding, dilation, groups):
    """Check the arguments of :func:`conv_bias_relu`; return (stride, padding, dilation) as pairs.

    Raises TypeError / ValueError naming the argument and what was expected.
    """
    check_tensor("x", x, dim=4, dtypes=FLOAT_DTYPES + (torch.float64,))
    check_tensor("weight", weight, dim=4)
    check_same("weight", weight, "x", x)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    out_ch, in_per_group = weight.shape[0], weight.shape[1]
    if x.shape[1] % groups or out_ch % groups:
        raise ValueError(
            f"x channels ({x.shape[1]}) and weight out-channels ({out_ch}) must both be divisible by "
            f"groups ({groups})"
        )
    if in_per_group != x.shape[1] // groups:
        raise ValueError(
            f"weight must have shape [out_channels, {x.shape[1] // groups}, kH, kW] for x with {x.shape[1]} "
            f"channels and groups={groups}, got {tuple(weight.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias, dim=1)
        check_same("bias", bias, "x", x)
        if bias.shape[0] != out_ch:
            raise ValueError(f"bias must have shape [{out_ch}], got {tuple(bias.shape)}")
    stride = pair("stride", stride, 1)
    dilation = pair("dilation", dilation, 1)
    padding = resolve_padding(padding, weight.shape[2:], stride, dilation)
    out = output_hw(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    if min(out) < 1:
        raise ValueError(
            f"output size must be >= 1, got {out} for input {tuple(x.shape[2:])}, kernel {tuple(weight.shape[2:])}, "
            f"stride {stride}, padding {padding}, dilation {dilation}"
        )
    return stride, padding, dilation


def _output_like(x, weight, stride, padding, dilation):
    """An empty output of the right shape, in x's layout (channels_last stays channels_last)."""
    out = output_hw(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    shape = (x.shape[0], weight.shape[0], *out)
    fmt = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
    return x.new_empty(shape).contiguous(memory_format=fmt)


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


# ---- registrations for the native op --------------------------------------------------------------------------


def _fake_forward(x, weight, bias, stride, padding, dilation, groups, algo):
    return _output_like(x, weight, stride, padding, dilation)


def _fake_backward(grad_y, y, x, weight, stride, padding, dilation, groups, output_mask, algo):
    grad_x = torch.empty_like(x) if output_mask[0] else x.new_empty(0)
    grad_w = torch.empty_like(weight) if output_mask[1] else weight.new_empty(0)
    grad_b = y.new_empty(weight.shape[0]) if output_mask[2] else y.new_empty(0)
    return grad_x, grad_w, grad_b


def _fake_epilogue(grad_y, y, compute_bias_grad):
    return torch.empty_like(y), y.new_empty(y.shape[1] if compute_bias_grad else 0)


def _register_native() -> bool:
    if not _native.has_cpp():
        return False
    _native.has_cuda_build()  # imports fastmtl._C_cuda where built: registers the CUDA kernels of the ops
    torch.library.register_fake(NATIVE, _fake_forward)
    torch.library.register_fake(NATIVE_BACKWARD, _fake_backward)
    torch.library.register_fake(NATIVE_EPILOGUE, _fake_epilogue)
    conv_flops.register(NATIVE, NATIVE_BACKWARD)
    return True


HAS_NATIVE = _register_native()


# ---- dispatch -------------------------------------------------------------------------------------------------


def _run_torch(x, weight, bias, stride, padding, dilation, groups):
    return reference.conv_bias_relu(x, weight, bias, stride, padding, dilation, groups)


def _run_native(x, weight, bias, stride, padding, dilation, groups, algo="default"):
    return torch.ops.fastmtl.conv_bias_relu(x, weight, bias, list(stride), list(padding), list(dilation), groups, algo)


def _run_triton(x, weight, bias, stride, padding, dilation, groups):
    from fastmtl.ops import conv_bias_relu_triton

    return conv_bias_relu_triton.run(x, weight, bias, stride, padding, dilation, groups)


RUNNERS = {"torch": _run_torch, "cpp": _run_native, "cuda": _run_native, "triton": _run_triton}


@torch.compiler.assume_constant_result
def _inside_functorch_transform() -> bool:
    """True inside ``torch.func`` transforms (grad, vmap, ...), where the fused ops' autograd cannot run.

    Evaluated, not traced, under torch.compile: Dynamo models ``peek_interpreter_stack()`` as an object even when
    the stack is empty (every compiled graph would take the reference), while the real stack at trace time is the
    one the traced call runs under (Dynamo traces a compiled ``grad``/``vmap`` through the transform).
    """
    return torch._C._functorch.peek_interpreter_stack() is not None


@torch.compiler.assume_constant_result
def _selected_backend(device: torch.device) -> str:
    # Resolved once per trace under torch.compile: the backend choice is a Python-level constant.
    return backends.select(device)


def conv_bias_relu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> torch.Tensor:
    """Fused ``relu(conv2d(x, weight, bias, stride, padding, dilation, groups))``.

    Args:
        x: input ``[N, C_in, H, W]``, float32 / float16 / bfloat16, NCHW or channels_last (float64 is accepted
            for gradient checks: the cpp backend computes it, the GPU backends hand it to the torch reference).
        weight: ``[C_out, C_in / groups, kH, kW]``, same dtype and device as ``x``.
        bias: optional ``[C_out]``.
        stride, padding, dilation: an int or a pair (stride, dilation >= 1; padding >= 0); padding may also be
            ``"valid"`` or ``"same"`` (symmetric only: see :func:`resolve_padding`).
        groups: number of channel groups.

    Returns:
        ``y`` of shape ``[N, C_out, H_out, W_out]`` in x's layout. Differentiable with respect to x, weight and bias.

    The backend follows :mod:`fastmtl.backends`; inside ``torch.func`` transforms (``grad``, ``vmap``, ...) the
    ``torch`` reference runs, as the fused ops' autograd does not support them. On the CPU (``cpp``) float16 is
    computed in float32 and rounded once, as the CPU has no fast float16 convolution.
    """
    stride, padding, dilation = validate(x, weight, bias, stride, padding, dilation, groups)
    if bias is not None:
        bias = bias.contiguous()  # the kernels index the bias densely (a view or an expanded bias would be misread)
    if _inside_functorch_transform():
        return _run_torch(x, weight, bias, stride, padding, dilation, groups)
    backend = _selected_backend(x.device)
    if backend == backends.AUTO:
        from fastmtl import autotune

        backend = autotune.choose_conv_bias_relu(x, weight, bias, stride, padding, dilation, groups)
    backend, _, algo = backend.partition(":")  # autotune may name an algorithm: "cuda:library"
    if x.dtype == torch.float64 and backend in ("cuda", "triton"):
        backend = "torch"
    if backend in ("cpp", "cuda") and not HAS_NATIVE:
        raise backends.BackendUnavailableError(f"backend {backend!r} needs fastmtl._C, which is not built")
    if algo and backend in ("cpp", "cuda"):
        return RUNNERS[backend](x, weight, bias, stride, padding, dilation, groups, algo=algo)
    return RUNNERS[backend](x, weight, bias, stride, padding, dilation, groups)
