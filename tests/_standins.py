"""Test-only stand-in for the weighting package while it is still on its own branch: :func:`install` provides a
minimal equal/fixed weighting with the Weighting interface only where ``fastmtl.mtl.weighting`` cannot be imported,
so the same tests run against the real package as soon as it lands."""

from __future__ import annotations

import importlib
import sys
import types

import torch


class StandInEW:
    """Equal (or fixed) weighting with the Weighting interface."""

    def __init__(self, task_names, weights=None):
        self.weights = {t: float((weights or {}).get(t, 1.0)) for t in task_names}

    def backward(self, losses, *, features, shared_params, counts=None):
        sum(self.weights[t] * l for t, l in losses.items()).backward()
        return {t: torch.tensor(w) for t, w in self.weights.items()}

    def parameters(self):
        return []

    def epoch_end(self, epoch_mean_losses):
        pass

    def state_dict(self):
        return {"weights": dict(self.weights)}

    def load_state_dict(self, state):
        self.weights = dict(state["weights"])


def install(monkeypatch) -> None:
    """Provide ``fastmtl.mtl.weighting`` where the real package is absent."""
    try:
        importlib.import_module("fastmtl.mtl.weighting")
    except ImportError:
        module = types.ModuleType("fastmtl.mtl.weighting")
        module.create = lambda name, task_names, **options: StandInEW(task_names, options.get("weights"))
        monkeypatch.setitem(sys.modules, "fastmtl.mtl.weighting", module)
