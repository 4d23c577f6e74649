"""Measured backend choice for CUDA tensors under ``auto``.

The first call for a key (op, shapes, strides, dtype, arguments) times each candidate backend with CUDA events
and remembers the fastest, in memory and, when ``FASTMTL_AUTOTUNE_CACHE`` names a file, on disk (JSON).
``FASTMTL_AUTOTUNE=0`` skips the measurement and takes the first candidate of the fixed order
(:data:`fastmtl.backends.GPU_ORDER`). While ``torch.compile`` traces, a cached choice is used if there is one,
else the fixed order.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Callable

import torch

from fastmtl import backends

_cache: dict[str, str] = {}
_lock = threading.Lock()
_disk_loaded = False


def enabled() -> bool:
    """Whether choices are measured (``FASTMTL_AUTOTUNE`` unset or not ``0``)."""
    return os.environ.get("FASTMTL_AUTOTUNE", "1") != "0"


def _disk_path() -> str | None:
    return os.environ.get("FASTMTL_AUTOTUNE_CACHE") or None


def _load_disk() -> None:
    global _disk_loaded
    path = _disk_path()
    if _disk_loaded or not path:
        return
    _disk_loaded = True
    try:
        with open(path) as f:
            _cache.update({k: v for k, v in json.load(f).items() if isinstance(v, str)})
    except (OSError, ValueError):
        pass


def _save_disk() -> None:
    path = _disk_path()
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(_cache, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def cached_choices() -> dict[str, str]:
    """A copy of the cache: key -> chosen backend."""
    _load_disk()
    return dict(_cache)


def clear() -> None:
    """Forget every cached choice (memory only)."""
    _cache.clear()


def time_ms(fn: Callable[[], object], warmup: int = 3, repeat: int = 10) -> float:
    """Median time of ``fn()`` in milliseconds, timed with CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def choose(key: str, candidates: dict[str, Callable[[], object]]) -> str:
    """The fastest backend of ``candidates`` (name -> zero-argument runner) for ``key``, measured once.

    A candidate that raises is skipped (it cannot run this case). The order of ``candidates`` is the fallback
    order used when measuring is off or impossible.
    """
    _load_disk()
    names = list(candidates)
    if key in _cache and _cache[key] in candidates:
        return _cache[key]
    if not enabled() or torch.compiler.is_compiling():
        return names[0]
    best, best_ms = None, float("inf")
    for name in names:
        try:
            ms = time_ms(candidates[name])
        except Exception:  # noqa: BLE001 - a candidate that cannot run this case is not a choice
            continue
        if ms < best_ms:
            best, best_ms = name, ms
    best = best or names[-1]
    with _lock:
        _cache[key] = best
        _save_disk()
    return best


def tensor_key(t: torch.Tensor | None) -> str:
    """Shape, strides and dtype of a tensor, as a cache-key fragment."""
    if t is None:
        return "None"
    return f"{tuple(t.shape)}/{t.stride()}/{str(t.dtype).replace('torch.', '')}"


def choose_conv_bias_relu(x, weight, bias, stride, padding, dilation, groups) -> str:
    """Backend for a CUDA ``conv_bias_relu`` call under ``auto``."""
    from fastmtl.ops import conv_bias_relu as op

    key = "|".join(
        ["conv_bias_relu", tensor_key(x), tensor_key(weight), tensor_key(bias), str((stride, padding, dilation, groups))]
    )
    names = backends.gpu_candidates(x.device)
    candidates = {
        name: (lambda name=name: op.RUNNERS[name](x, weight, bias, stride, padding, dilation, groups)) for name in names
    }
    with torch.no_grad():
        return choose(key, candidates)
