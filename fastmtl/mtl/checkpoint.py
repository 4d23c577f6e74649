"""Checkpoints written atomically, and the random-number state that a resumed run must restore."""

from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch


def save_atomic(obj, path: str) -> None:
    """``torch.save(obj)`` to a temporary file in the same directory, then rename it over ``path``: a reader (or
    a crash) never sees a half-written checkpoint."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: str) -> dict:
    """Load a checkpoint written by :func:`save_atomic` (tensors on the CPU)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict:
    """The state of Python's, NumPy's and torch's (CPU and CUDA) generators."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
