"""The backend registry: which implementations exist here, and which one an op call uses.

Backends:

* ``torch``  - pure PyTorch (``fastmtl.reference``): runs everywhere, the fallback and the test oracle.
* ``cpp``    - the C++ CPU extension (OpenMP, oneDNN through ATen): CPU tensors.
* ``cuda``   - the C++/CUDA extension: CUDA tensors.
* ``triton`` - Triton kernels: CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` (tests).

Selection, in order: the innermost ``use_backend`` of the calling thread, then ``set_backend``, then the
environment variable ``FASTMTL_BACKEND``, then ``"auto"``. Under ``"auto"``, CPU tensors go to ``cpp`` when it is
built, else ``torch``; CUDA tensors go to the fastest of the GPU backends as measured per shape by
:mod:`fastmtl.autotune` (or the fixed order cuda, triton, torch when ``FASTMTL_AUTOTUNE=0``). Naming a backend that
cannot run the given tensors raises :class:`BackendUnavailableError`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
from typing import Iterator

import torch

from fastmtl import _native

BACKENDS = ("torch", "cpp", "cuda", "triton")
AUTO = "auto"
GPU_ORDER = ("cuda", "triton", "torch")

_local = threading.local()
_global_choice: str | None = None


class BackendUnavailableError(RuntimeError):
    """Raised when the requested backend cannot run the given tensors."""


def _check_name(name: str) -> str:
    if name != AUTO and name not in BACKENDS:
        raise ValueError(f"backend must be one of {(AUTO,) + BACKENDS}, got {name!r}")
    return name


def triton_interpret() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET=1``), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_importable() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    return True, ""


def backend_status() -> dict[str, tuple[bool, str]]:
    """For each backend: (usable on this machine for some device, a human-readable status)."""
    return dict(_status(torch.cuda.is_available(), triton_interpret()))


@functools.lru_cache(maxsize=None)
def _status(gpu: bool, interpret: bool) -> dict[str, tuple[bool, str]]:
    # Cached: it is consulted on every op call, and what is built or visible does not change within a process.
    status = {"torch": (True, "available (pure PyTorch)")}
    cpp_ok, cpp_why = _native.load("_C")
    status["cpp"] = (cpp_ok, "available (CPU tensors)" if cpp_ok else cpp_why)
    cuda_ok, cuda_why = _native.load("_C_cuda")
    if not cuda_ok:
        status["cuda"] = (False, cuda_why)
    elif not gpu:
        status["cuda"] = (False, "built, no GPU visible")
    else:
        status["cuda"] = (True, f"available ({torch.cuda.get_device_name()})")
    tri_ok, tri_why = _triton_importable()
    if not tri_ok:
        status["triton"] = (False, tri_why)
    elif gpu:
        status["triton"] = (True, "available (CUDA tensors)")
    elif interpret:
        status["triton"] = (True, "available in the interpreter (TRITON_INTERPRET=1, CPU tensors)")
    else:
        status["triton"] = (False, "needs a CUDA device or TRITON_INTERPRET=1")
    return status


def available_backends() -> list[str]:
    """Names of the backends usable on this machine, e.g. ``['torch', 'cpp']`` on a CPU-only machine."""
    return [name for name, (ok, _) in backend_status().items() if ok]


def can_run(backend: str, device: torch.device) -> tuple[bool, str]:
    """Whether ``backend`` can run tensors on ``device``; if not, why."""
    if backend == "torch":
        return True, ""
    if backend == "cpp":  # on every CPU op call: only the (cached) build status matters, not the GPU or Triton
        ok, why = _native.load("_C")
        return (ok and device.type == "cpu"), (why if not ok else "cpp runs CPU tensors only")
    ok, why = _status(torch.cuda.is_available(), triton_interpret())[backend]
    if backend == "cuda":
        return (ok and device.type == "cuda"), (why if not ok else "cuda runs CUDA tensors only")
    if not ok:
        return False, why
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and triton_interpret():
        return True, ""
    return False, "triton runs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1"


def set_backend(name: str) -> None:
    """Set the process-wide backend (``"auto"`` or one of :data:`BACKENDS`)."""
    global _global_choice
    _global_choice = _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use ``name`` for fastmtl ops called by this thread inside the ``with`` block."""
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(_check_name(name))
    try:
        yield
    finally:
        stack.pop()


def current_backend() -> str:
    """The backend name in force for this thread (possibly ``"auto"``)."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    if _global_choice is not None:
        return _global_choice
    return _check_name(os.environ.get("FASTMTL_BACKEND", AUTO) or AUTO)


def gpu_candidates(device: torch.device) -> list[str]:
    """The backends ``auto`` may choose from for CUDA tensors, in fixed preference order."""
    return [b for b in GPU_ORDER if can_run(b, device)[0]]


def select(device: torch.device) -> str:
    """Resolve the backend for tensors on ``device``.

    Returns a concrete backend name, or ``"auto"`` for CUDA tensors under auto selection (the op then asks
    :mod:`fastmtl.autotune` to pick among :func:`gpu_candidates`).
    """
    name = current_backend()
    if name == AUTO:
        if device.type == "cuda":
            return AUTO
        return "cpp" if can_run("cpp", device)[0] else "torch"
    ok, why = can_run(name, device)
    if not ok:
        raise BackendUnavailableError(f"backend {name!r} cannot run {device.type} tensors here: {why}")
    return name
