"""Compile fastmtl's Triton kernels for a GPU target on a machine without a GPU.

    python benchmarks/triton_compile_check.py [--arch 90]

The Triton interpreter (our CPU tests) is lenient: it accepts programs the real compiler rejects (tl.dot shapes,
dtype mixes, layouts). This script installs a stand-in Triton driver that reports an sm_<arch> target and turns
every kernel launch into a compile-only warm-up, then runs the host launchers of fastmtl.kernels on CPU tensors over
a grid of representative cases, so that every kernel specialisation (and every autotune config) goes through the
real NVIDIA compiler down to a cubin. Outputs are garbage (nothing runs); only compile errors matter. Exit code 1 if
any case fails to compile.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)


def install_compile_only_driver(arch: int) -> None:
    """Make Triton compile for ``sm_<arch>`` and never launch."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime import autotuner, driver, jit

    class CompileOnlyDriver(DriverBase):
        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            return lambda *a, **k: [1.0, 1.0, 1.0]

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_device_interface(self):
            return torch.cuda

        def get_empty_cache_for_benchmark(self):
            return torch.empty(0)

        def clear_cache(self, cache):
            pass

    driver.set_active(CompileOnlyDriver())
    original_run = jit.JITFunction.run

    def compile_only_run(self, *args, grid, warmup, **kwargs):
        return original_run(self, *args, grid=grid, warmup=True, **kwargs)

    jit.JITFunction.run = compile_only_run

    def autotune_all_configs(self, *args, **kwargs):
        # Compile every config instead of benchmarking them.
        for config in self.configs:
            merged = dict(kwargs, **config.all_kwargs())
            self.fn.run(*args, **merged)
        return None

    autotuner.Autotuner.run = autotune_all_configs
    triton.runtime.driver = driver


def cases():
    """(name, zero-argument callable) pairs covering the kernels' specialisations."""
    import torch

    from fastmtl.kernels import conv_bias_relu as conv
    from fastmtl.kernels import masked_loss as loss

    out = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for cl in (True, False):
            x = torch.randn(2, 16, 9, 10).to(dtype)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            w = torch.randn(32, 16, 3, 3).to(dtype)
            b = torch.randn(32).to(dtype)
            tag = f"{str(dtype)[6:]}-{'cl' if cl else 'nchw'}"
            out += conv_cases(conv, tag, x, w, b)
            out += loss_cases(loss, tag, dtype, cl)
    return out


def conv_cases(conv, tag, x, w, b):
    """Conv forward, epilogue and gradient kernels via their host launchers."""
    import torch

    found = []
    for name in ("conv_bias_relu_fwd", "conv_bias_relu_forward", "conv_bias_relu"):
        if hasattr(conv, name):
            fwd = getattr(conv, name)
            found.append((f"conv fwd {tag} s1p1", lambda fwd=fwd: fwd(x, w, b, (1, 1), (1, 1), (1, 1), 1)))
            found.append((f"conv fwd {tag} s2p0d2 nobias", lambda fwd=fwd: fwd(x, w, None, (2, 2), (0, 0), (2, 2), 1)))
            break
    y = torch.relu(torch.randn(2, 32, 9, 10)).to(x.dtype).contiguous(memory_format=torch.channels_last
                                                                     if not x.is_contiguous() else torch.contiguous_format)
    gy = torch.randn_like(y)
    if hasattr(conv, "relu_bias_grad"):
        found.append((f"relu_bias_grad {tag}", lambda: conv.relu_bias_grad(gy, y, True)))
    for name in ("conv_backward", "conv_bias_relu_backward"):
        if hasattr(conv, name):
            bwd = getattr(conv, name)
            found.append((f"{name} {tag}", lambda bwd=bwd: _call_backward(bwd, gy, y, x, w)))
    return found


def _call_backward(bwd, gy, y, x, w):
    import inspect

    params = inspect.signature(bwd).parameters
    kwargs = {"impl": "triton"} if "impl" in params else {}
    try:
        return bwd(gy, y, x, w, (1, 1), (1, 1), (1, 1), 1, [True, True, True], **kwargs)
    except TypeError:
        return bwd(gy, y, x, w, (1, 1), (1, 1), (1, 1), 1, **kwargs)


def loss_cases(loss, tag, dtype, cl):
    """Masked-loss kernels for each kind and layout."""
    import torch

    n = 4
    found = []
    logits = torch.randn(n, 13, 6, 7).to(dtype)
    if cl:
        logits = logits.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 13, (n, 6, 7))
    mask = torch.rand(n) > 0.3
    found.append((f"loss ce-4d {tag}", lambda: loss.masked_loss(logits, target, mask, "ce", -100, True)))
    found.append((f"loss ce-2d {tag}", lambda: loss.masked_loss(torch.randn(n, 10).to(dtype), torch.randint(0, 10, (n,)),
                                                               None, "ce", -100, True)))
    dense = torch.randn(n, 3, 6, 7).to(dtype)
    for kind in ("bce", "l1", "mse"):
        t = torch.rand(n, 3, 6, 7).to(dtype)
        found.append((f"loss {kind} {tag}", lambda kind=kind, t=t: loss.masked_loss(dense, t, mask, kind, -100, True)))
    if hasattr(loss, "scale_grads"):
        found.append((f"scale_grads {tag}", lambda: loss.scale_grads([dense, logits], torch.ones(2))))
    return found


def main(argv=None) -> int:
    """Compile every case; print one line each; exit 1 on any failure."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args(argv)
    install_compile_only_driver(args.arch)
    failures = 0
    for name, fn in cases():
        try:
            fn()
            print(f"ok      {name}")
        except Exception as exc:  # noqa: BLE001 - report every failing case
            failures += 1
            first = str(exc).strip().splitlines()
            print(f"FAILED  {name}: {type(exc).__name__}: {first[0][:300] if first else ''}")
            if os.environ.get("VERBOSE"):
                traceback.print_exc()
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
