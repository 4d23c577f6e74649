"""The torch.compile baseline of the benchmarks, compiled as a model's own call site would be."""

from __future__ import annotations

import torch


def compile_static(fn, mode: str | None = None):
    """``torch.compile(fn, mode=mode)`` with static shapes and a fresh Dynamo cache.

    Dynamo keys its cache by code object, so the compiles of one function (or one module class) in a process share
    it: after the first shape, later compiles take dynamic shapes ("automatic dynamic"), which a model's layer, always
    called with one shape, never gets. Each benchmark case compiles its baseline from scratch, with static shapes.
    """
    torch._dynamo.reset()
    return torch.compile(fn, mode=mode, dynamic=False)
