"""``FusedTrunk``: a VGG/SegNet-style convolutional trunk made of FusedConv2dReLU blocks and pooling."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import fx, nn

from fastmtl.nn.conv import FusedConv2dReLU
from fastmtl.nn.fuse import fuse, fuse_report

POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}
_POOL_TYPES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)


def _stage_spec(stages, depths) -> list[tuple[int, int]]:
    """Normalise ``stages`` (pairs ``(width, depth)``, or widths with ``depths``) into ``[(width, depth), ...]``."""
    if not isinstance(stages, Sequence) or isinstance(stages, str) or len(stages) == 0:
        raise ValueError(f"stages must be a non-empty list of (width, depth) pairs or of widths, got {stages!r}")
    if all(isinstance(s, (tuple, list)) for s in stages):
        if depths is not None:
            raise ValueError("depths must not be given when stages are (width, depth) pairs")
        spec = [tuple(s) for s in stages]
    else:
        if depths is None:
            depths = 2
        if isinstance(depths, int):
            depths = [depths] * len(stages)
        if len(depths) != len(stages):
            raise ValueError(f"depths must be an int or have one entry per stage ({len(stages)}), got {depths!r}")
        spec = list(zip(stages, depths))
    for s in spec:
        if len(s) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in s):
            raise ValueError(f"each stage must be (width >= 1, depth >= 1) as ints, got {s!r}")
    return spec


class FusedTrunk(nn.Module):
    """A convolutional trunk for multi-task models: stages of 3x3 :class:`FusedConv2dReLU` blocks, each followed
    by 2x2 pooling (VGG / SegNet encoder style). No normalisation layers, so every block stays fused in training.

    Args:
        in_channels: channels of the input image.
        stages: ``[(width, depth), ...]``, e.g. ``[(32, 2), (64, 2), (128, 2)]``, or a list of widths with
            ``depths``.
        depths: an int (same depth for every stage, default 2) or one depth per stage; only with a list of widths.
        kernel_size: odd kernel size of every block (default 3, padded to keep the spatial size).
        pool: ``"max"`` (default), ``"avg"`` or None (no pooling: every stage keeps the input resolution).
        return_features: when True, ``forward`` returns the list of every stage's output (after its pooling),
            for dense heads; else only the last one.
        bias: whether the convolutions have a bias.

    Attributes ``feature_channels`` and ``feature_strides`` give the channels and the downsampling factor of each
    stage output; ``out_channels`` is the last stage's width. Weights use Kaiming-normal initialisation (fan-in,
    ReLU gain) and zero biases, which keeps activations at a steady scale through a normalisation-free stack.

    Works with channels_last inputs (keep the module in channels_last too: ``trunk.to(memory_format=...)``),
    under autocast (the convolutions run in the autocast dtype) and under ``torch.compile``.
    """

    def __init__(
        self,
        in_channels: int,
        stages,
        depths=None,
        *,
        kernel_size: int = 3,
        pool: str | None = "max",
        return_features: bool = False,
        bias: bool = True,
    ):
        super().__init__()
        if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
            raise ValueError(f"in_channels must be an int >= 1, got {in_channels!r}")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd int >= 1, got {kernel_size!r}")
        if pool is not None and pool not in POOLS:
            raise ValueError(f"pool must be one of {sorted(POOLS)} or None, got {pool!r}")
        spec = _stage_spec(stages, depths)
        self.in_channels = in_channels
        self.return_features = bool(return_features)
        self.stages = nn.ModuleList()
        channels = in_channels
        for width, depth in spec:
            blocks: list[nn.Module] = []
            for _ in range(depth):
                blocks.append(FusedConv2dReLU(channels, width, kernel_size, padding=kernel_size // 2, bias=bias))
                channels = width
            if pool is not None:
                blocks.append(POOLS[pool](2))
            self.stages.append(nn.Sequential(*blocks))
        self.feature_channels = [width for width, _ in spec]
        self.feature_strides = [2 ** (i + 1) if pool is not None else 1 for i in range(len(spec))]
        self.out_channels = self.feature_channels[-1]
        self.body: nn.Module | None = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, FusedConv2dReLU):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @classmethod
    def from_module(cls, module: nn.Module, return_features: bool = False) -> "FusedTrunk":
        """Wrap an existing trunk after fusing a copy of it with :func:`fastmtl.fuse` (``module`` is untouched).

        The fused copy is ``trunk.body`` (so its ``state_dict`` keys gain the prefix ``body.``;
        ``trunk.body.load_state_dict(original_checkpoint)`` loads an original checkpoint where no BatchNorm was
        folded) and ``trunk.fuse_report`` says what was fused.

        ``return_features``: False returns what the module returns. True returns the list of the outputs of the
        module's pooling layers (``nn.MaxPool2d``, ``nn.AvgPool2d`` and their adaptive forms, as modules) in call
        order, followed by the final output when that is not the last pooling output: the stage boundaries of a
        VGG/SegNet-style trunk, as for a native FusedTrunk. A module without pooling modules, or whose pooling
        outputs cannot be located because fx could not trace it, raises ValueError here.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        body = fuse(module, inplace=False)
        trunk = cls.__new__(cls)
        nn.Module.__init__(trunk)
        trunk.in_channels = None
        trunk.stages = None
        trunk.feature_channels = None
        trunk.feature_strides = None
        trunk.out_channels = None
        trunk.return_features = bool(return_features)
        trunk.fuse_report = fuse_report(body)
        if return_features:
            body = _return_pool_outputs(body)
        trunk.body = body
        trunk.training = module.training
        return trunk

    def forward(self, x: torch.Tensor):
        """The last stage's output, or the list of every stage's output when ``return_features`` is True."""
        if self.body is not None:
            return self.body(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features if self.return_features else x


def _return_pool_outputs(body: nn.Module) -> fx.GraphModule:
    """Rewrite a fused GraphModule to return ``[pool outputs..., final output]`` (see FusedTrunk.from_module)."""
    if not isinstance(body, fx.GraphModule):
        report = fuse_report(body)
        why = report.trace_error if report is not None else "not traced"
        raise ValueError(
            f"return_features=True needs a module torch.fx can trace, to find its pooling layers ({why}); "
            "use return_features=False or make the module return its features itself"
        )
    modules = dict(body.named_modules())
    pools = [
        n for n in body.graph.nodes if n.op == "call_module" and isinstance(modules.get(n.target), _POOL_TYPES)
    ]
    if not pools:
        raise ValueError(
            "return_features=True found no pooling module (nn.MaxPool2d / nn.AvgPool2d / adaptive) in the module; "
            "use return_features=False or make the module return its features itself"
        )
    output = next(n for n in body.graph.nodes if n.op == "output")
    final = output.args[0]
    features = list(pools)
    if final is not pools[-1]:
        features.append(final)
    output.args = (features,)
    body.graph.lint()
    body.recompile()
    return body
