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
import re
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


# A PTX atomic that adds floating-point values (packed f16x2 / bf16x2 included): its sum depends on the order in which
# programs finish, so a kernel holding one is not run-to-run deterministic.
FLOAT_ATOMIC = re.compile(r"\b(?:atom|red)\.[\w.]*\.(?:f16|bf16|f32|f64)(?:x2)?\b")


def compiled_ptx(module):
    """(kernel name, PTX) of every kernel of ``module`` compiled so far, autotuned and heuristic ones included."""
    for name in dir(module):
        fn = getattr(module, name)
        while fn is not None and not hasattr(fn, "device_caches"):  # autotuner / heuristics wrappers
            fn = getattr(fn, "fn", None)
        for cache in getattr(fn, "device_caches", {}).values():
            for kernel in cache[0].values():
                yield name, kernel.asm["ptx"]


def float_atomics(module) -> dict:
    """``{"compiled": kernels compiled so far, "float_atomics": {kernel name: sorted atomic ops}}`` for ``module``
    (kernels without one left out)."""
    found, compiled = {}, 0
    for name, ptx in compiled_ptx(module):
        compiled += 1
        found.setdefault(name, set()).update(FLOAT_ATOMIC.findall(ptx))
    return {"compiled": compiled, "float_atomics": {k: sorted(v) for k, v in found.items() if v}}


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

    fwd = conv.conv_bias_relu_forward
    found = [
        (f"conv fwd {tag} s1p1", lambda: fwd(x, w, b, (1, 1), (1, 1), (1, 1))),
        (f"conv fwd {tag} s2p0d2 nobias", lambda: fwd(x, w, None, (2, 2), (0, 0), (2, 2))),
        (f"conv fwd {tag} stem", lambda: fwd(x[:, :3].contiguous(memory_format=torch.channels_last), w[:, :3].contiguous(),
                                             b, (1, 1), (1, 1), (1, 1))),
    ]
    memory_format = torch.contiguous_format if x.is_contiguous() else torch.channels_last
    y = torch.relu(torch.randn(2, 32, 9, 10)).to(x.dtype).contiguous(memory_format=memory_format)
    gy = torch.randn_like(y)
    found.append((f"relu_bias_grad {tag}", lambda: conv.relu_bias_grad(gy, y, True)))
    for stride in (1, 2):
        ys = y[:, :, ::stride, ::stride].contiguous(memory_format=memory_format)
        found.append((
            f"conv_backward triton {tag} stride {stride}",
            lambda ys=ys, stride=stride: conv.conv_backward(
                torch.randn_like(ys), ys, x, w, (stride, stride), (1, 1), (1, 1), [True, True, True], impl="triton"
            ),
        ))
    return found


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
