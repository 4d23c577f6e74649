"""Argument checks shared by the ops: each error names the argument and what was expected."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, *, dim: int | None = None, dtypes=None) -> None:
    """Raise TypeError/ValueError unless ``t`` is a tensor of the given rank and dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Raise unless ``t`` has the dtype and device of ``ref``."""
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def pair(name: str, value, minimum: int) -> tuple[int, int]:
    """Normalise an int or a pair of ints to a pair, each at least ``minimum``."""
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        if value[0] >= minimum and value[1] >= minimum:  # a module's own normalised pair: on every call
            return value
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        a, b = (int(v) for v in value)
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if a < minimum or b < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return a, b
