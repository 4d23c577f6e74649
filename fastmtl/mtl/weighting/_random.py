"""Random orders of the other tasks, drawn on the device (used by PCGrad and GradVac)."""

from __future__ import annotations

import torch


def other_task_orders(k: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """``[K, K-1]`` int64: row ``i`` is a uniformly random order of the tasks other than ``i``.

    Drawn with ``generator`` (which must live on ``device``) or the device's global RNG; no host round trip.
    """
    keys = torch.rand(k, k - 1, device=device, generator=generator)
    ranks = keys.argsort(dim=1)
    return ranks + (ranks >= torch.arange(k, device=device)[:, None]).long()


def generator_state(generator: torch.Generator | None):
    """The generator's state for a state_dict (None without a generator)."""
    return None if generator is None else generator.get_state()


def restore_generator(generator: torch.Generator | None, state) -> None:
    """Restore a state saved by :func:`generator_state` (ignored without a generator)."""
    if generator is not None and state is not None:
        generator.set_state(state)
