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


@pytest.fixture
def bench(benchmark, request):
    """``bench(fn, op=, mode=, shape=, dtype=, backend=, device=)``: warm up, record metadata, time ``fn``.

    On CUDA every timed call ends with a synchronize, and the peak memory of one call (above what was allocated
    before it) is recorded as ``extra_info["peak_mem_bytes"]``.
    """

    def run(fn, *, op: str, mode: str, shape: str, dtype, backend: str, device: torch.device):
        dtype_name = str(dtype).replace("torch.", "")
        benchmark.group = f"{op} | {mode} | {shape} | {dtype_name} | {device.type}"
        benchmark.extra_info.update(
            op=op, mode=mode, shape=shape, dtype=dtype_name, backend=backend, device=device.type
        )
        if device.type == "cuda":

            def timed():
                fn()
                torch.cuda.synchronize()

            timed()  # warm-up: compilation, autotuning, allocator
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            timed()
            benchmark.extra_info["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - before
        else:
            timed = fn
            if timing_enabled(request.config):
                timed()  # warm-up (the smoke run calls fn once, below)
        return benchmark(timed)

    return run
