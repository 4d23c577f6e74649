"""fastmtl.autotune: the choice cache (memory and disk), FASTMTL_AUTOTUNE=0, the paths that must not time
(torch.compile tracing, CUDA graph capture), candidate lists and runners; CUDA-marked tests time real kernels."""

from __future__ import annotations

import json

import pytest
import torch

import fastmtl
from fastmtl import autotune, backends
from fastmtl.ops import conv_bias_relu as op
from fastmtl.testing import TOLERANCES, rel_err


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.delenv("FASTMTL_AUTOTUNE", raising=False)
    monkeypatch.delenv("FASTMTL_AUTOTUNE_CACHE", raising=False)
    monkeypatch.delenv("FASTMTL_AUTOTUNE_METRIC", raising=False)
    autotune.clear()
    yield
    autotune.clear()


class FakeTimer:
    """Returns a fixed time per runner and counts the calls."""

    def __init__(self, times):
        self.times = times
        self.calls = []

    def __call__(self, runner):
        name = runner()
        self.calls.append(name)
        return self.times[name]


def runners(*names):
    return {name: (lambda name=name: name) for name in names}


def failing():
    raise RuntimeError("cannot run this case")


def test_metric_picks_the_timer(monkeypatch):
    """Device time by default (host overhead excluded), wall time on request, a clear error otherwise."""
    assert autotune.metric() == "device" and autotune.default_timer() is autotune.device_time_ms
    monkeypatch.setenv("FASTMTL_AUTOTUNE_METRIC", "wall")
    assert autotune.default_timer() is autotune.time_ms
    monkeypatch.setenv("FASTMTL_AUTOTUNE_METRIC", "host")
    with pytest.raises(ValueError, match="FASTMTL_AUTOTUNE_METRIC must be one of"):
        autotune.choose("k", runners("a", "b"))
    assert autotune.cached_choices() == {}


def test_choose_measures_with_the_metric_timer(monkeypatch):
    timer = FakeTimer({"a": 2.0, "b": 1.0})
    monkeypatch.setattr(autotune, "device_time_ms", timer)
    assert autotune.choose("k", runners("a", "b")) == "b" and sorted(timer.calls) == ["a", "b"]


def test_choose_picks_fastest_and_caches():
    timer = FakeTimer({"a": 3.0, "b": 1.0, "c": 2.0})
    assert autotune.choose("k", runners("a", "b", "c"), timer=timer) == "b"
    assert sorted(timer.calls) == ["a", "b", "c"]
    assert autotune.cached_choices() == {"k": "b"}
    assert autotune.timings()["k"] == {"a": 3.0, "b": 1.0, "c": 2.0}
    # A second call for the same key is answered from the cache, without timing.
    assert autotune.choose("k", runners("a", "b", "c"), timer=timer) == "b"
    assert len(timer.calls) == 3
    # Another key is measured separately.
    assert autotune.choose("k2", runners("a", "c"), timer=timer) == "c"
    assert autotune.cached_choices() == {"k": "b", "k2": "c"}


def test_tie_goes_to_preferred_candidate():
    timer = FakeTimer({"a": 1.0, "b": 1.0})
    assert autotune.choose("tie", runners("a", "b"), timer=timer) == "a"


def test_near_tie_within_tolerance_goes_to_preferred_candidate(monkeypatch):
    monkeypatch.delenv("FASTMTL_AUTOTUNE_TOLERANCE", raising=False)
    timer = FakeTimer({"a": 1.029, "b": 1.0, "c": 1.01})
    assert autotune.choose("near", runners("a", "b", "c"), timer=timer) == "a"
    timer = FakeTimer({"a": 1.031, "b": 1.0, "c": 1.01})
    assert autotune.choose("outside", runners("a", "c", "b"), timer=timer) == "c"
    assert autotune.timings()["outside"] == {"a": 1.031, "c": 1.01, "b": 1.0}


def test_tolerance_zero_takes_the_fastest(monkeypatch):
    monkeypatch.setenv("FASTMTL_AUTOTUNE_TOLERANCE", "0")
    timer = FakeTimer({"a": 1.001, "b": 1.0})
    assert autotune.choose("k", runners("a", "b"), timer=timer) == "b"


@pytest.mark.parametrize("raw", ["-0.1", "1", "nan", "fast"])
def test_bad_tolerance_is_refused_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv("FASTMTL_AUTOTUNE_TOLERANCE", raw)
    with pytest.raises(ValueError, match="FASTMTL_AUTOTUNE_TOLERANCE"):
        autotune.choose("k", runners("a", "b"), timer=FakeTimer({"a": 1.0, "b": 1.0}))


def test_failing_candidate_is_skipped():
    timer = FakeTimer({"b": 5.0})
    candidates = {"a": failing, **runners("b")}
    assert autotune.choose("k", candidates, timer=timer) == "b"


def test_all_failing_returns_fallback_uncached():
    assert autotune.choose("k", {"a": failing, "b": failing}, fallback="b", timer=FakeTimer({})) == "b"
    assert autotune.cached_choices() == {}


def test_autotune_off_uses_fixed_order(monkeypatch):
    monkeypatch.setenv("FASTMTL_AUTOTUNE", "0")
    assert not autotune.enabled()
    timer = FakeTimer({"a": 3.0, "b": 1.0})
    assert autotune.choose("k", runners("a", "b"), timer=timer) == "a"
    assert autotune.choose("k", runners("a", "b"), fallback="b", timer=timer) == "b"
    assert timer.calls == []
    assert autotune.cached_choices() == {}


def test_deterministic_algorithms_use_cached_or_fixed_order_without_timing():
    """With torch.use_deterministic_algorithms(True) a choice is never timed (it could change from run to run): a
    cached one is kept, else the fallback, uncached; timing resumes when the flag is off."""
    timer = FakeTimer({"a": 3.0, "b": 1.0})
    assert autotune.choose("cached", runners("a", "b"), timer=timer) == "b"
    timer.calls.clear()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert autotune.choose("cached", runners("a", "b"), timer=timer) == "b"
        assert autotune.choose("new", runners("a", "b"), fallback="a", timer=timer) == "a"
    finally:
        torch.use_deterministic_algorithms(was)
    assert timer.calls == [] and "new" not in autotune.cached_choices()
    assert autotune.choose("new", runners("a", "b"), timer=timer) == "b"


def test_capture_does_not_time_or_cache(monkeypatch):
    monkeypatch.setattr(autotune, "_capturing", lambda: True)
    timer = FakeTimer({"a": 3.0, "b": 1.0})
    assert autotune.choose("k", runners("a", "b"), fallback="a", timer=timer) == "a"
    assert timer.calls == [] and autotune.cached_choices() == {}
    # A choice cached before the capture is still used during it.
    autotune._cache["k"] = "b"
    assert autotune.choose("k", runners("a", "b"), timer=timer) == "b"


def test_disk_round_trip(tmp_path, monkeypatch):
    path = tmp_path / "autotune.json"
    monkeypatch.setenv("FASTMTL_AUTOTUNE_CACHE", str(path))
    timer = FakeTimer({"a": 2.0, "b": 1.0})
    assert autotune.choose("k", runners("a", "b"), timer=timer) == "b"
    assert json.loads(path.read_text()) == {"k": "b"}
    autotune.clear()  # a new process, as far as the cache knows
    assert autotune.cached_choices() == {"k": "b"}
    assert autotune.choose("k", runners("a", "b"), timer=timer) == "b"
    assert len(timer.calls) == 2  # only the first choice was timed
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_or_missing_disk_cache_is_ignored(tmp_path, monkeypatch):
    path = tmp_path / "autotune.json"
    path.write_text("{not json")
    monkeypatch.setenv("FASTMTL_AUTOTUNE_CACHE", str(path))
    assert autotune.cached_choices() == {}
    autotune.clear()
    monkeypatch.setenv("FASTMTL_AUTOTUNE_CACHE", str(tmp_path / "missing" / "x.json"))  # unwritable directory
    assert autotune.choose("k", runners("a"), timer=FakeTimer({"a": 1.0})) == "a"


def test_key_covers_shape_strides_dtype_args_and_grad_mode():
    x = torch.randn(2, 4, 8, 8)
    w = torch.randn(6, 4, 3, 3)
    b = torch.randn(6)
    args = ((1, 1), (1, 1), (1, 1), 1)
    base = autotune.conv_bias_relu_key(x, w, b, *args)
    assert base.startswith("conv_bias_relu|") and "float32" in base and base.endswith("infer")
    assert autotune.conv_bias_relu_key(x.contiguous(memory_format=torch.channels_last), w, b, *args) != base
    assert autotune.conv_bias_relu_key(x.half(), w.half(), b.half(), *args) != base
    assert autotune.conv_bias_relu_key(x, w, None, *args) != base
    assert autotune.conv_bias_relu_key(x, w, b, (2, 2), (1, 1), (1, 1), 1) != base
    trained = autotune.conv_bias_relu_key(x, w.requires_grad_(), b, *args)
    assert trained.endswith("train")
    with torch.no_grad():
        assert autotune.conv_bias_relu_key(x, w, b, *args) == base


def test_candidates_order(monkeypatch):
    monkeypatch.setattr(backends, "gpu_candidates", lambda device: ["cuda", "triton", "torch"])
    dev = torch.device("cpu")
    assert autotune.conv_bias_relu_candidates(dev) == ["cuda:library", "cuda:implicit_gemm", "triton", "torch"]
    assert autotune.conv_bias_relu_candidates(dev, implicit_gemm=False) == ["cuda:library", "triton", "torch"]
    assert autotune._fixed_choice(dev) == "cuda"
    monkeypatch.setattr(backends, "gpu_candidates", lambda device: [])
    assert autotune._fixed_choice(dev) == "torch"


def test_implicit_gemm_applies_only_to_cuda_half_channels_last():
    x = torch.randn(1, 8, 4, 4, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 8, 3, 3, dtype=torch.float16)
    assert not autotune.implicit_gemm_applies(x, w, 1)  # CPU tensor


@pytest.mark.parametrize("training", [False, True])
def test_runner_leaves_inputs_untouched(training):
    x = torch.randn(2, 3, 6, 6, requires_grad=training)
    w = torch.randn(4, 3, 3, 3, requires_grad=training)
    b = torch.randn(4, requires_grad=training)
    runner = autotune._conv_runner("torch", x, w, b, (1, 1), (1, 1), (1, 1), 1, training)
    runner()
    runner()
    assert x.grad is None and w.grad is None and b.grad is None


@pytest.mark.skipif(not op.HAS_NATIVE, reason="the C++ extension fastmtl._C is not built")
def test_runner_passes_algo_to_native(monkeypatch):
    seen = []

    def spy(*args, algo="default"):
        seen.append(algo)
        return torch.zeros(1)

    monkeypatch.setitem(op.RUNNERS, "cpp", spy)
    x, w = torch.randn(1, 2, 4, 4), torch.randn(2, 2, 3, 3)
    autotune._conv_runner("cpp:library", x, w, None, (1, 1), (0, 0), (1, 1), 1, False)()
    assert seen == ["library"]


@pytest.mark.skipif(not op.HAS_NATIVE, reason="the C++ extension fastmtl._C is not built")
def test_dispatch_runs_backend_and_algo_of_choice(monkeypatch):
    """The op splits an autotune choice "backend:algo" and hands the algo to the native runner."""
    seen = []
    real = op.RUNNERS["cpp"]

    def spy(*args, **kwargs):
        seen.append(kwargs.get("algo"))
        return real(*args, **kwargs)

    monkeypatch.setitem(op.RUNNERS, "cpp", spy)
    monkeypatch.setattr(op, "_selected_backend", lambda device: backends.AUTO)
    monkeypatch.setattr(autotune, "choose_conv_bias_relu", lambda *args: "cpp:library")
    x, w, b = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(4)
    y = fastmtl.conv_bias_relu(x, w, b, padding=1)
    assert seen == ["library"]
    ref = torch.relu(torch.nn.functional.conv2d(x, w, b, padding=1))
    assert torch.allclose(y, ref, atol=1e-5)


def _compiled_choice(x, w, b):
    choice = autotune.choose_conv_bias_relu(x, w, b, (1, 1), (1, 1), (1, 1), 1)
    return x * (2.0 if choice == "torch" else 3.0)


def test_compile_uses_cached_choice_without_timing(monkeypatch):
    """Under torch.compile nothing is timed: the cached choice is used, else the fixed order."""
    monkeypatch.setattr(autotune, "time_ms", lambda fn, **kw: pytest.fail("timed while compiling"))
    monkeypatch.setattr(autotune, "device_time_ms", lambda fn, **kw: pytest.fail("timed while compiling"))
    x, w, b = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3), torch.randn(3)
    key = autotune.conv_bias_relu_key(x, w, b, (1, 1), (1, 1), (1, 1), 1)

    torch._dynamo.reset()
    autotune._cache[key] = "torch"
    out = torch.compile(_compiled_choice, fullgraph=True, backend="eager")(x, w, b)
    assert torch.equal(out, x * 2.0)

    torch._dynamo.reset()
    autotune.clear()
    monkeypatch.setattr(backends, "gpu_candidates", lambda device: ["triton", "torch"])
    out = torch.compile(_compiled_choice, fullgraph=True, backend="eager")(x, w, b)
    assert torch.equal(out, x * 3.0)  # fixed order: triton first
    assert autotune.cached_choices() == {}
    torch._dynamo.reset()


# ---- on a GPU ---------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("training", [False, True])
def test_cuda_auto_measures_once_and_is_correct(training):
    dev = "cuda"
    x = torch.randn(2, 16, 12, 12, device=dev, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(32, 16, 3, 3, device=dev, dtype=torch.float16) / 12).requires_grad_(training)
    b = torch.randn(32, device=dev, dtype=torch.float16)
    with fastmtl.use_backend("auto"):
        y = fastmtl.conv_bias_relu(x, w, b, padding=1)
    key = autotune.conv_bias_relu_key(x, w, b, (1, 1), (1, 1), (1, 1), 1)
    choice = autotune.cached_choices()[key]
    names = autotune.conv_bias_relu_candidates(x.device)
    assert choice in names
    assert set(autotune.timings()[key]) <= set(names) and "cuda:library" in autotune.timings()[key]
    ref = torch.relu(torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding=1))
    assert rel_err(y, ref) <= TOLERANCES["conv"][torch.float16]
    if training:
        y.sum().backward()
        assert w.grad is not None and torch.isfinite(w.grad).all()


@pytest.mark.cuda
def test_cuda_graph_capture_does_not_time(monkeypatch):
    monkeypatch.setattr(autotune, "time_ms", lambda fn, **kw: pytest.fail("timed during capture"))
    monkeypatch.setattr(autotune, "device_time_ms", lambda fn, **kw: pytest.fail("timed during capture"))
    dev = "cuda"
    x = torch.randn(2, 8, 10, 10, device=dev)
    w = torch.randn(8, 8, 3, 3, device=dev) / 8
    b = torch.randn(8, device=dev)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), fastmtl.use_backend("cuda"):
        fastmtl.conv_bias_relu(x, w, b, padding=1)  # warm up outside the capture (lazy init)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with fastmtl.use_backend("auto"), torch.cuda.graph(graph):
        y = fastmtl.conv_bias_relu(x, w, b, padding=1)
    graph.replay()
    torch.cuda.synchronize()
    assert autotune.cached_choices() == {}
    ref = torch.relu(torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding=1))
    assert rel_err(y, ref) <= TOLERANCES["conv"][torch.float32]


@pytest.mark.cuda
def test_cuda_device_time_excludes_host_overhead():
    """A call that sleeps 3 ms on the host around 20 tiny kernels: its wall time per call is over 3 ms, its device
    time (the sleep kernel covering the host's enqueueing) a small fraction of that."""
    import time

    t = torch.zeros(16, device="cuda")

    def host_heavy():
        time.sleep(0.003)
        for _ in range(20):
            t.add_(1.0)

    wall = autotune.time_ms(host_heavy, warmup=1, repeat=3, calls=3)
    device = autotune.device_time_ms(host_heavy, warmup=1, repeat=3, calls=3)
    assert wall > 3.0 and device < 1.0, (wall, device)
