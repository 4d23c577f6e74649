"""Measured backend choice for CUDA tensors under ``auto``.

The first call for a key (op, shapes, strides, dtypes, arguments, training or inference) times each candidate
with CUDA events and remembers the fastest, in memory and, when ``FASTMTL_AUTOTUNE_CACHE`` names a file, on disk
(JSON, read once, rewritten after each new choice). A choice is a backend name, optionally with an algorithm
after a colon: ``"cuda:library"`` runs the native op with ``algo="library"``.

What "fastest" means is ``FASTMTL_AUTOTUNE_METRIC``:

* ``device`` (default): the GPU time per call (:func:`device_time_ms`), host overhead excluded. In a training step
  the host enqueues ahead of the GPU, so the kernels' own time is what the step pays; a candidate that is quicker
  to launch but slower on the GPU loses.
* ``wall``: the time per call of calls issued back to back (:func:`time_ms`), host overhead included where it
  exceeds the device time: for loops too small to keep the GPU busy.

A cache file holds choices made under one metric: delete it after switching.

Candidates within ``FASTMTL_AUTOTUNE_TOLERANCE`` (a fraction, default 0.03) of the fastest count as tied, and a tie
goes to the earliest candidate in the preference order: a lead that small is within the timing noise, and the earlier
candidates cost less host time per call (on an H100, 2026-11-27: cuDNN + our epilogue and Triton within 1% on
device for a trunk layer's forward + backward, Triton's call twice as long in wall time).

Candidates of ``conv_bias_relu`` (fixed preference order): ``cuda:library`` (cuDNN convolution with the fused bias
+ ReLU, and our backward epilogue), ``cuda:implicit_gemm`` (our tensor-core kernel, only where it applies),
``triton``, ``torch``. When inputs require grad, a candidate is timed forward + backward, so the choice reflects
training cost; otherwise forward only.

No measurement happens:

* with ``FASTMTL_AUTOTUNE=0``: the fixed order decides (``cuda`` with its default algorithm, then triton, torch);
* while ``torch.use_deterministic_algorithms(True)`` is on: likewise, a cached choice if there is one (from
  ``FASTMTL_AUTOTUNE_CACHE``, say), else the fixed order, uncached. Every candidate is deterministic, but they round
  differently, and a choice made by timing can change from run to run (and with it the results in their last
  bits), as ``torch.backends.cudnn.benchmark`` can;
* while ``torch.compile`` traces (tensors are fake there): a cached choice if there is one, else the fixed order;
* while a CUDA graph is being captured (timing would synchronize inside the capture): likewise, and the
  uncached fallback is not remembered, so a later eager call still measures.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Callable

import torch

from fastmtl import backends

_cache: dict[str, str] = {}
_timings: dict[str, dict[str, float]] = {}
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
            stored = json.load(f)
    except (OSError, ValueError):
        return
    if isinstance(stored, dict):
        for key, value in stored.items():
            if isinstance(value, str):
                _cache.setdefault(key, value)  # a choice made in this process wins over the file


def _save_disk() -> None:
    path = _disk_path()
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(_cache, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # the on-disk cache is an optimisation: an unwritable path must not break the op


def cached_choices() -> dict[str, str]:
    """A copy of the cache: key -> chosen backend (``backend`` or ``backend:algo``)."""
    _load_disk()
    return dict(_cache)


def timings() -> dict[str, dict[str, float]]:
    """Median milliseconds of each candidate, per key, for the choices measured in this process."""
    return {key: dict(value) for key, value in _timings.items()}


def clear() -> None:
    """Forget every cached choice and timing (memory only; the disk file is read again on next use)."""
    global _disk_loaded
    with _lock:
        _cache.clear()
        _timings.clear()
        _disk_loaded = False


def time_ms(fn: Callable[[], object], warmup: int = 3, repeat: int = 10, calls: int = 5) -> float:
    """Median time per call of ``fn()`` in milliseconds, timed with CUDA events on the current stream.

    Each of the ``repeat`` samples times ``calls`` calls back to back, so a sample is the steady-state cost of a
    call inside a stream of work (host overhead counts where it exceeds the device time, as in training), not
    one call's latency.
    """
    for _ in range(warmup):
        fn()
    return _median_ms_per_call(fn, repeat, calls)


def _median_ms_per_call(fn: Callable[[], object], repeat: int, calls: int, before=None) -> float:
    """Median over ``repeat`` samples of CUDA-event time per call, each sample ``calls`` calls back to back;
    ``before()`` (if given) is enqueued ahead of each sample's start event."""
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if before is not None:
            before()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    times.sort()
    return times[len(times) // 2]


_cycles_per_ms: float | None = None


def _sleep_cycles_per_ms() -> float:
    """GPU clock cycles per millisecond of ``torch.cuda._sleep``, measured once with CUDA events."""
    global _cycles_per_ms
    if _cycles_per_ms is None:
        cycles = 1_000_000
        torch.cuda._sleep(cycles)  # warm-up: the first launch loads the kernel
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _cycles_per_ms = cycles / max(start.elapsed_time(end), 1e-3)
    return _cycles_per_ms


def enqueue_ms(fn: Callable[[], object], warmup: int, calls: int) -> float:
    """Host time in milliseconds to queue ``calls`` calls of ``fn()`` after ``warmup`` calls, the GPU drained before
    and after (the launches are not waited for, so this is the host's cost of a step)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    host_ms = (time.perf_counter() - begin) * 1e3
    torch.cuda.synchronize()
    return host_ms


def device_time_ms(fn: Callable[[], object], warmup: int = 3, repeat: int = 10, calls: int = 5) -> float:
    """Median GPU time per call of ``fn()`` in milliseconds, host overhead excluded.

    Before each sample a sleep kernel holds the stream for about twice the host time of enqueuing ``calls`` calls
    (measured after the warm-up), and the start event is recorded behind it. By the time the GPU reaches the
    event, every call of the sample is queued, so the events time the kernels back to back with no host gaps.
    """
    host_ms = enqueue_ms(fn, warmup, calls)
    # at least 1 ms of cover, at most 100 ms (a host that slow is timed partly: the sample still counts the GPU time)
    cover_ms = min(max(2.0 * host_ms, 1.0), 100.0)
    cycles = int(cover_ms * _sleep_cycles_per_ms())
    return _median_ms_per_call(fn, repeat, calls, before=lambda: torch.cuda._sleep(cycles))


METRICS = ("device", "wall")


def metric() -> str:
    """``FASTMTL_AUTOTUNE_METRIC``: ``device`` (default) or ``wall`` (see the module docstring)."""
    value = os.environ.get("FASTMTL_AUTOTUNE_METRIC", "device")
    if value not in METRICS:
        raise ValueError(f"FASTMTL_AUTOTUNE_METRIC must be one of {METRICS}, got {value!r}")
    return value


def tolerance() -> float:
    """``FASTMTL_AUTOTUNE_TOLERANCE``: how much slower than the fastest a preferred candidate may be and still be
    chosen, as a fraction (default 0.03; 0: the fastest always wins)."""
    raw = os.environ.get("FASTMTL_AUTOTUNE_TOLERANCE", "0.03")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"FASTMTL_AUTOTUNE_TOLERANCE must be a fraction in [0, 1), got {raw!r}")
    return value


def default_timer() -> Callable[[Callable[[], object]], float]:
    """The timer of the current metric: :func:`device_time_ms` or :func:`time_ms`."""
    return device_time_ms if metric() == "device" else time_ms


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _reproducible_only() -> bool:
    # A timed choice could differ between runs: no measuring while PyTorch is asked for deterministic algorithms.
    return torch.are_deterministic_algorithms_enabled()


def choose(
    key: str,
    candidates: dict[str, Callable[[], object]],
    fallback: str | None = None,
    timer: Callable[[Callable[[], object]], float] | None = None,
) -> str:
    """The fastest of ``candidates`` (name -> zero-argument runner, in preference order) for ``key``, measured once
    and cached; among candidates within :func:`tolerance` of the fastest, the earliest.

    ``fallback`` (default: the first candidate) is returned, and not cached, when measuring is off
    (``FASTMTL_AUTOTUNE=0``, ``torch.use_deterministic_algorithms(True)``), impossible (torch.compile tracing, CUDA
    graph capture) or when every candidate raised. A candidate that raises is skipped: it cannot run this case.
    ``timer`` replaces the metric's timer (:func:`default_timer`; tests use it).
    """
    _load_disk()
    fallback = fallback if fallback is not None else next(iter(candidates))
    cached = _cache.get(key)
    if cached is not None:
        return cached
    if not enabled() or _reproducible_only() or torch.compiler.is_compiling() or _capturing():
        return fallback
    timer = timer or default_timer()
    margin = tolerance()
    measured: dict[str, float] = {}
    for name, runner in candidates.items():
        try:
            measured[name] = timer(runner)
        except Exception:  # noqa: BLE001 - a candidate that cannot run this case is not a choice
            continue
    if not measured:
        return fallback
    fastest = min(measured.values())
    limit = fastest * (1.0 + margin)
    best = next(name for name, ms in measured.items() if ms <= limit)  # the earliest of the (near-)fastest
    with _lock:
        _cache[key] = best
        _timings[key] = measured
        _save_disk()
    return best


def _tensor_meta(t: torch.Tensor | None):
    """Shape, strides and dtype of a tensor as plain Python values (None for None)."""
    if t is None:
        return None
    return (tuple(t.shape), tuple(t.stride()), t.dtype)


_keys: dict[tuple, str] = {}  # (op, parts) -> _key(op, parts): a pure function, memoised for the per-call path


def _key(op: str, parts) -> str:
    memo = _keys.get((op, parts))
    if memo is not None:
        return memo

    def fmt(part):
        if part is None:
            return "None"
        if isinstance(part, tuple) and len(part) == 3 and isinstance(part[2], torch.dtype):
            return f"{part[0]}/{part[1]}/{str(part[2]).replace('torch.', '')}"
        return str(part)

    key = "|".join([op] + [fmt(p) for p in parts])
    if len(_keys) < 4096:  # bounded: shapes that change every call must not grow it without end
        _keys[(op, parts)] = key
    return key


def implicit_gemm_applies(x: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    """Whether the CUDA ``implicit_gemm`` algorithm runs this case (mirrors csrc/cuda/conv_bias_relu_aten.cpp)."""
    if x.dtype not in (torch.float16, torch.bfloat16) or groups != 1 or x.device.type != "cuda":
        return False
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    return torch.cuda.get_device_capability(x.device)[0] >= 8


def conv_bias_relu_candidates(device: torch.device, implicit_gemm: bool = True) -> list[str]:
    """The choices of ``conv_bias_relu`` for CUDA tensors on ``device``, in fixed preference order."""
    names = []
    for backend in backends.gpu_candidates(device):
        if backend == "cuda":
            names += ["cuda:library"] + (["cuda:implicit_gemm"] if implicit_gemm else [])
        else:
            names.append(backend)
    return names


def _fixed_choice(device: torch.device) -> str:
    names = backends.gpu_candidates(device)
    return names[0] if names else "torch"


@torch.compiler.assume_constant_result
def _choice_without_timing(op: str, parts: tuple, device: torch.device) -> str:
    # Evaluated (not traced) once per trace under torch.compile, on plain Python values: the cached choice,
    # else the fixed order.
    _load_disk()
    return _cache.get(_key(op, parts), _fixed_choice(device))


def _needs_grad(x, weight, bias) -> bool:
    # Written without a generator expression so that torch.compile traces it without a graph break.
    wants = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    return torch.is_grad_enabled() and wants


def _conv_parts(x, weight, bias, stride, padding, dilation, groups, training) -> tuple:
    return (
        _tensor_meta(x),
        _tensor_meta(weight),
        _tensor_meta(bias),
        (tuple(stride), tuple(padding), tuple(dilation), groups),
        "train" if training else "infer",
    )


def conv_bias_relu_key(x, weight, bias, stride, padding, dilation, groups) -> str:
    """The cache key of a ``conv_bias_relu`` call (stride, padding, dilation as pairs), as the dispatcher forms it."""
    training = _needs_grad(x, weight, bias)
    return _key("conv_bias_relu", _conv_parts(x, weight, bias, stride, padding, dilation, groups, training))


def choose_conv_bias_relu(x, weight, bias, stride, padding, dilation, groups) -> str:
    """Choice (``backend`` or ``backend:algo``) for a CUDA ``conv_bias_relu`` call under ``auto``."""
    training = _needs_grad(x, weight, bias)
    parts = _conv_parts(x, weight, bias, stride, padding, dilation, groups, training)
    if torch.compiler.is_compiling():
        return _choice_without_timing("conv_bias_relu", parts, x.device)
    key = _key("conv_bias_relu", parts)
    _load_disk()
    cached = _cache.get(key)
    if cached is not None:  # the common case: answer before building any candidate runner
        return cached
    names = conv_bias_relu_candidates(x.device, implicit_gemm_applies(x, weight, groups))
    candidates = {name: _conv_runner(name, x, weight, bias, stride, padding, dilation, groups, training) for name in names}
    if not candidates:
        return "torch"
    return choose(key, candidates, fallback=_fixed_choice(x.device))


def _conv_runner(name, x, weight, bias, stride, padding, dilation, groups, training) -> Callable[[], object]:
    """A zero-argument function running one candidate on copies of the inputs (forward, + backward if training)."""
    from fastmtl.ops import conv_bias_relu as op

    backend, _, algo = name.partition(":")
    run = op.RUNNERS[backend]
    kwargs = {"algo": algo} if algo else {}
    if not training:

        def forward():
            with torch.no_grad():
                return run(x, weight, bias, stride, padding, dilation, groups, **kwargs)

        return forward

    leaves = [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in (x, weight, bias)]
    grad_y: list[torch.Tensor] = []

    def forward_backward():
        y = run(*leaves, stride, padding, dilation, groups, **kwargs)
        if not grad_y:
            grad_y.append(torch.randn_like(y))
        inputs = [t for t in leaves if t is not None and t.requires_grad]
        torch.autograd.grad(y, inputs, grad_y[0])

    return forward_backward
