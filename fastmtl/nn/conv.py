"""``FusedConv2dReLU``: ``relu(conv2d(x))`` as one module, calling :func:`fastmtl.conv_bias_relu`.

Its parameters are named, shaped and initialised as :class:`torch.nn.Conv2d`'s (``weight``, ``bias``), so a
checkpoint of a ``Conv2d`` loads into it and back. :meth:`FusedConv2dReLU.from_conv` wraps an existing convolution
and shares its ``Parameter`` objects.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastmtl.ops.conv_bias_relu import conv_bias_relu, resolve_padding

_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _pair(name: str, value) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast compute dtype for ``device_type`` if autocast is enabled there, else None.

    Works with the ``device_type`` API of torch >= 2.4 and falls back to the older per-device functions.
    """
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type without autocast (e.g. "meta")
        return None
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            enabled = torch.is_autocast_cpu_enabled()
        elif device_type == "cuda":
            enabled = torch.is_autocast_enabled()
        else:
            return None
    if not enabled:
        return None
    getter = getattr(torch, "get_autocast_dtype", None)
    if getter is not None:
        return getter(device_type)
    return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


class FusedConv2dReLU(nn.Module):
    """``relu(conv2d(x, weight, bias))`` in one fused op (:func:`fastmtl.conv_bias_relu`).

    A drop-in replacement for ``nn.Sequential(nn.Conv2d(...), nn.ReLU())``: same arguments as ``nn.Conv2d``
    (``padding_mode`` must be ``"zeros"``), parameters ``weight`` ``[out, in / groups, kH, kW]`` and ``bias``
    ``[out]`` initialised as ``nn.Conv2d`` does. Under autocast the input and parameters are cast to the autocast
    dtype, as autocast would do for a convolution. The backend follows :mod:`fastmtl.backends` (float64, for
    gradient checks: ``cpp`` computes it, the GPU backends run the ``torch`` reference).

    Attribute ``inference_only`` is set by :func:`fastmtl.fuse` when a BatchNorm was folded into the weights:
    such a module refuses ``train()``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode must be 'zeros' (the fused op pads with zeros), got {padding_mode!r}")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        kernel_size = _pair("kernel_size", kernel_size)
        stride = _pair("stride", stride)
        dilation = _pair("dilation", dilation)
        self._configure(
            in_channels, out_channels, kernel_size, stride, resolve_padding(padding, kernel_size, stride, dilation),
            dilation, groups,
        )
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *kernel_size, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def _configure(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups) -> None:
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.inference_only = False

    def reset_parameters(self) -> None:
        """Initialise as ``nn.Conv2d.reset_parameters`` does (Kaiming-uniform weight, uniform bias)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
            if fan_in > 0:
                bound = 1 / math.sqrt(fan_in)
                nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "FusedConv2dReLU":
        """A fused module computing ``relu(conv(x))`` that shares ``conv``'s ``weight`` and ``bias`` Parameters.

        Raises ValueError for what the fused op cannot compute: ``padding_mode`` other than ``"zeros"``,
        asymmetric ``"same"`` padding, a parametrized weight (e.g. weight norm), uninitialised lazy parameters.
        """
        reason = unsupported_reason(conv)
        if reason is not None:
            raise ValueError(f"FusedConv2dReLU.from_conv cannot wrap this convolution: {reason}")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused._configure(
            conv.in_channels,
            conv.out_channels,
            tuple(conv.kernel_size),
            tuple(conv.stride),
            resolve_padding(conv.padding, tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation)),
            tuple(conv.dilation),
            conv.groups,
        )
        fused.weight = conv.weight
        if conv.bias is None:
            fused.register_parameter("bias", None)
        else:
            fused.bias = conv.bias
        fused.train(conv.training)
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(conv2d(x, weight, bias))`` for x ``[N, C, H, W]``, or unbatched ``[C, H, W]`` as nn.Conv2d takes."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 3:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        weight, bias = self.weight, self.bias
        dtype = autocast_dtype(x.device.type)
        if dtype is not None:
            # The custom op has no autocast rule, so cast here as autocast does for a convolution.
            if x.dtype in _AUTOCAST_ELIGIBLE:
                x = x.to(dtype)
            if weight.dtype in _AUTOCAST_ELIGIBLE:
                weight = weight.to(dtype)
            if bias is not None and bias.dtype in _AUTOCAST_ELIGIBLE:
                bias = bias.to(dtype)
        if x.dtype != weight.dtype:  # (the op would name weight; here the input is what the caller chose)
            raise TypeError(f"x must have the dtype of weight ({weight.dtype}), got {x.dtype}")
        return conv_bias_relu(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def train(self, mode: bool = True) -> "FusedConv2dReLU":
        """Set training mode; refused when a BatchNorm was folded into this module (``inference_only``)."""
        if mode and getattr(self, "inference_only", False):
            raise RuntimeError(
                "this FusedConv2dReLU has a BatchNorm folded into its weights by fastmtl.fuse() and is for inference "
                "only: training it would train the folded weights, not the BatchNorm. Train the original model, or "
                "fuse it in training mode (no folding), and fuse an eval() copy for inference. Modules that "
                "train() reached before this one (an unfused BatchNorm, a Dropout) are now in training mode: call "
                ".eval() on the model to switch them back."
            )
        return super().train(mode)

    def extra_repr(self) -> str:
        """``in, out, kernel_size=..., stride=...`` as nn.Conv2d prints it (defaults left out)."""
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        if self.inference_only:
            text += ", inference_only=True"
        return text


def unsupported_reason(conv: nn.Module) -> str | None:
    """Why ``conv`` cannot become a :class:`FusedConv2dReLU`, or None when it can."""
    if not isinstance(conv, nn.Conv2d):
        return f"expected an nn.Conv2d, got {type(conv).__name__}"
    if isinstance(conv, nn.modules.lazy.LazyModuleMixin) and conv.has_uninitialized_params():
        return "its lazy parameters are not initialised yet (run one forward first)"
    for method in ("forward", "_conv_forward"):
        if getattr(type(conv), method) is not getattr(nn.Conv2d, method):
            return f"{type(conv).__name__} overrides nn.Conv2d.{method}"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros' is fused)"
    if nn.utils.parametrize.is_parametrized(conv):
        return "its weight is parametrized (e.g. weight norm)"
    try:
        resolve_padding(conv.padding, tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation))
    except ValueError as err:
        return str(err)
    return None
