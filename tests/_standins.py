"""Test-only stand-ins for pieces built on other branches (FusedConv2dReLU, masked_multitask_loss, the weighting
package). :func:`install` patches them in only while main still has the placeholder, so the same tests run
against the real implementations as soon as they land."""

from __future__ import annotations

import importlib
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

import fastmtl


class StandInConvReLU(nn.Module):
    """relu(conv2d) through fastmtl.conv_bias_relu, with nn.Conv2d's parameter shapes and initialisation."""

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True):
        super().__init__()
        ref = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, dilation, groups, bias)
        self.weight, self.bias = ref.weight, ref.bias
        self.args = (stride, padding, dilation, groups)

    def forward(self, x):
        w, b = self.weight, self.bias
        if torch.is_autocast_enabled(x.device.type):  # the op has no autocast rule: run it in the autocast dtype
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w, b = x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)
        return fastmtl.conv_bias_relu(x, w, b, *self.args)


def standin_loss(preds, targets, kinds, masks=None, weights=None, ignore_index=-100):
    """Float64-free eager version of the masked multi-task loss contract (brief section 2)."""
    per_task = {}
    for t, kind in kinds.items():
        p, y = preds[t].float(), targets[t]
        m = torch.ones(p.shape[0], dtype=torch.bool, device=p.device) if masks is None or t not in masks else masks[t]
        if kind == "ce":
            el = F.cross_entropy(p, y, reduction="none", ignore_index=ignore_index)
            valid = (y != ignore_index) & m.view(-1, *([1] * (y.dim() - 1)))
        else:
            valid = ~torch.isnan(y) & m.view(-1, *([1] * (y.dim() - 1)))
            yy = torch.where(valid, y, torch.zeros_like(y))
            if kind == "bce":
                el = F.binary_cross_entropy_with_logits(p, yy, reduction="none")
            elif kind == "l1":
                el = (p - yy).abs()
            else:
                el = (p - yy) ** 2
        el = torch.where(valid, el, torch.zeros_like(el))
        per_task[t] = el.sum() / valid.sum().clamp_min(1)
    total = sum((1.0 if weights is None else weights[t]) * l for t, l in per_task.items())
    return total, per_task


class StandInEW:
    """Equal weighting with the Weighting interface."""

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


def _placeholder(fn) -> bool:
    try:
        fn()
    except NotImplementedError:
        return True
    except Exception:
        return False
    return False


def install(monkeypatch) -> None:
    """Patch in the stand-ins where main still has placeholders."""
    from fastmtl.nn import conv

    if _placeholder(lambda: conv.FusedConv2dReLU(1, 1, 1)):
        monkeypatch.setattr(conv, "FusedConv2dReLU", StandInConvReLU)
    x = {"a": torch.randn(2, 3)}
    if _placeholder(lambda: fastmtl.masked_multitask_loss(x, {"a": torch.tensor([0, 1])}, {"a": "ce"})):
        monkeypatch.setattr(fastmtl, "masked_multitask_loss", standin_loss)
    try:
        importlib.import_module("fastmtl.mtl.weighting")
    except ImportError:
        module = types.ModuleType("fastmtl.mtl.weighting")
        module.create = lambda name, task_names, **options: StandInEW(task_names, options.get("weights"))
        monkeypatch.setitem(sys.modules, "fastmtl.mtl.weighting", module)
