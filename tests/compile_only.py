"""Scripts run against fastmtl's Triton kernels compiled for sm_90 on a machine without a GPU (tests only).

``run(script)`` runs ``script`` in a fresh Python without ``TRITON_INTERPRET``, after installing the stand-in
driver of ``benchmarks/triton_compile_check.py`` (every launch compiles for sm_90 and runs nothing), with that module
imported as ``triton_compile_check``. The script prints what the test checks (the PTX of the compiled kernels:
``triton_compile_check.compiled_ptx`` / ``float_atomics``).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"

_PRELUDE = """import sys
sys.path.insert(0, sys.argv[1])
import triton_compile_check
triton_compile_check.install_compile_only_driver(90)
"""


def run(script: str, timeout: int = 600) -> str:
    """The script's standard output; the calling test fails on a non-zero exit and skips where the benchmarks
    folder (with triton_compile_check.py) is not beside the tests."""
    if not (BENCHMARKS / "triton_compile_check.py").exists():
        pytest.skip("benchmarks/triton_compile_check.py is not beside the tests")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-P", "-c", _PRELUDE + script, str(BENCHMARKS)], env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
