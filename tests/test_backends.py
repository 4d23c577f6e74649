"""The backend registry: availability, selection rules, thread-locality, errors."""

from __future__ import annotations

import threading

import pytest
import torch

import fastmtl
from fastmtl import _native, backends


def test_available_backends_lists_torch_and_cpp():
    names = fastmtl.available_backends()
    assert names[0] == "torch"
    assert ("cpp" in names) == _native.has_cpp()
    assert set(names) <= set(backends.BACKENDS)


def test_status_explains_unavailable_backends():
    status = backends.backend_status()
    assert set(status) == set(backends.BACKENDS)
    for name, (ok, why) in status.items():
        assert why, f"{name} has no status text"
    if not torch.cuda.is_available():
        assert not status["cuda"][0]
        assert "no GPU visible" in status["cuda"][1] or "not built" in status["cuda"][1]


def test_auto_on_cpu_prefers_cpp():
    with fastmtl.use_backend("auto"):
        assert backends.select(torch.device("cpu")) == ("cpp" if _native.has_cpp() else "torch")


def test_use_backend_nests_and_restores():
    before = backends.current_backend()
    with fastmtl.use_backend("torch"):
        assert backends.current_backend() == "torch"
        with fastmtl.use_backend("auto"):
            assert backends.current_backend() == "auto"
        assert backends.current_backend() == "torch"
    assert backends.current_backend() == before


def test_use_backend_is_thread_local():
    seen = {}

    def worker():
        seen["other"] = backends.current_backend()

    with fastmtl.use_backend("torch"):
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert backends.current_backend() == "torch"
    assert seen["other"] != "torch" or backends.current_backend() == "torch"


def test_set_backend_and_env(monkeypatch):
    monkeypatch.setattr(backends, "_global_choice", None)
    monkeypatch.setenv("FASTMTL_BACKEND", "torch")
    assert backends.current_backend() == "torch"
    fastmtl.set_backend("auto")
    assert backends.current_backend() == "auto"
    with fastmtl.use_backend("torch"):
        assert backends.current_backend() == "torch"


def test_unknown_backend_name_raises():
    with pytest.raises(ValueError, match="backend must be one of"):
        fastmtl.set_backend("numpy")
    with pytest.raises(ValueError, match="backend must be one of"):
        with fastmtl.use_backend("tpu"):
            pass


def test_cpp_cannot_run_cuda_tensors():
    ok, why = backends.can_run("cpp", torch.device("cuda"))
    assert not ok and why


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    pytest.importorskip("triton", reason="without triton the backend is refused for that reason instead")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        ok, why = backends.can_run("triton", torch.device("cpu"))
        assert not ok and "TRITON_INTERPRET" in why
