"""Benchmark setup shared by benchmarks/bench_*.py.

Plain ``pytest`` runs every benchmark body once as a smoke test (timing disabled); ``pytest benchmarks
--benchmark-only`` times them. Each benchmark records ``extra_info`` = op, mode, shape, dtype, backend, device
(and peak memory on CUDA) so that ``benchmarks/report.py`` can put ratios side by side.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # lets the triton smoke cases run on CPU tensors


CUDA_CALLS_PER_ROUND = 20  # see bench(): CUDA rounds time this many calls, then one synchronize


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Disable timing unless the run asked for benchmarks (``--benchmark-only`` or ``--benchmark-enable``)."""
    opt = config.option
    if not getattr(opt, "benchmark_only", False) and not getattr(opt, "benchmark_enable", False):
        opt.benchmark_disable = True


def timing_enabled(config) -> bool:
    """Whether this run times benchmarks (as opposed to the once-through smoke run)."""
    return not getattr(config.option, "benchmark_disable", False)


@pytest.fixture
def smoke(request) -> bool:
    """True in the smoke run (plain ``pytest``), where each body runs once and is not timed."""
    return not timing_enabled(request.config)


def _device_ms(fn) -> tuple[float | None, str]:
    """``(device ms of one call, "")`` from CUDA-graph replays, or ``(None, why)`` when ``fn`` cannot be captured."""
    from fastmtl.testing import graph_replay_ms

    try:
        return graph_replay_ms(fn), ""
    except Exception as exc:  # noqa: BLE001 - not capturable: no device time for this variant, and why
        torch.cuda.synchronize()
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


@pytest.fixture
def bench(benchmark, request):
    """``bench(fn, op=, mode=, shape=, dtype=, backend=, device=)``: warm up, record metadata,
    time ``fn``.

    On CUDA one timed round makes ``CUDA_CALLS_PER_ROUND`` calls back to back and then synchronizes, so the time
    per call is the steady-state cost of a call inside a training step (host work overlapping device work, as in
    real use) rather than one call's latency plus a synchronize; ``extra_info["calls_per_round"]`` records the
    count and ``benchmarks/report.py`` divides by it. The peak memory of one call (above what was allocated
    before it) is recorded as ``extra_info["peak_mem_bytes"]``, and the device time of one call, from replays
    of a CUDA graph holding it (no host overhead, no launch gaps), as ``extra_info["device_ms"]`` (None where
    the call cannot be captured, e.g. boolean indexing, which synchronizes, with the reason in
    ``extra_info["device_ms_why_not"]``).
    """

    def run(fn, *, op: str, mode: str, shape: str, dtype, backend: str, device: torch.device):
        dtype_name = str(dtype).replace("torch.", "")
        benchmark.group = f"{op} | {mode} | {shape} | {dtype_name} | {device.type}"
        benchmark.extra_info.update(
            op=op, mode=mode, shape=shape, dtype=dtype_name, backend=backend, device=device.type
        )
        if device.type == "cuda":

            fn()  # warm-up: compilation, autotuning, allocator
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            benchmark.extra_info["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - before
            benchmark.extra_info["calls_per_round"] = CUDA_CALLS_PER_ROUND
            ms, why = _device_ms(fn)
            benchmark.extra_info["device_ms"] = ms
            if why:
                benchmark.extra_info["device_ms_why_not"] = why

            def timed():
                for _ in range(CUDA_CALLS_PER_ROUND):
                    fn()
                torch.cuda.synchronize()
        else:
            timed = fn
            if timing_enabled(request.config):
                timed()  # warm-up (the smoke run calls fn once, below)
        return benchmark(timed)

    return run
