"""MultiTaskModel: a shared trunk and one head per task (hard parameter sharing)."""

from __future__ import annotations

import torch
from torch import nn


class MultiTaskModel(nn.Module):
    """A shared trunk followed by per-task heads.

    Args:
        trunk: a module mapping the input to its features: a tensor or a list of tensors (shallow to deep).
        heads: task name -> head module; each head receives the list of trunk features. A head whose ``forward``
            takes an ``out_size`` argument (like :class:`fastmtl.nn.heads.DenseHead`) is given the input's size.

    ``forward(x) == decode(encode(x))``. ``encode`` exposes the shared representation so that gradient-level
    weighting can differentiate each task's loss with respect to it.
    """

    def __init__(self, trunk: nn.Module, heads: dict[str, nn.Module]):
        super().__init__()
        if not heads:
            raise ValueError("heads must name at least one task")
        self.trunk = trunk
        self.heads = nn.ModuleDict(heads)
        self._dense = {name: _takes_out_size(head) for name, head in heads.items()}

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The shared representation: the trunk's features, as a list (shallow to deep)."""
        out = self.trunk(x)
        return [out] if isinstance(out, torch.Tensor) else list(out)

    def decode(self, features: list[torch.Tensor], out_size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """Each head's prediction from the shared features; dense heads resize to ``out_size`` when given
        (otherwise they answer at the resolution of the shallowest feature)."""
        return {
            name: head(features, out_size=out_size) if self._dense[name] else head(features)
            for name, head in self.heads.items()
        }

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predictions of every task: ``{task: tensor}``."""
        return self.decode(self.encode(x), out_size=tuple(x.shape[-2:]))

    def shared_parameters(self) -> list[nn.Parameter]:
        """The trunk's trainable parameters (shared by all tasks)."""
        return [p for p in self.trunk.parameters() if p.requires_grad]

    def task_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable parameters of one task's head."""
        return [p for p in self.heads[name].parameters() if p.requires_grad]


def _takes_out_size(head: nn.Module) -> bool:
    import inspect

    try:
        return "out_size" in inspect.signature(head.forward).parameters
    except (TypeError, ValueError):
        return False
