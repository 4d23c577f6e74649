"""``fastmtl bench``: a short side-by-side of conv_bias_relu against eager PyTorch, printed as a table.

For the full suite with torch.compile baselines and memory, use ``make bench`` (pytest-benchmark).
"""

from __future__ import annotations

import statistics
import time

SHAPES = [  # (label, N, C_in, H, W, C_out)
    ("8x64x56x56 -> 64", 8, 64, 56, 56, 64),
    ("8x3x128x128 -> 32 (stem)", 8, 3, 128, 128, 32),
]
MORE_SHAPES = [("8x32x64x64 -> 64", 8, 32, 64, 64, 64), ("8x64x32x32 -> 128", 8, 64, 32, 32, 128)]


def add_parser(sub):
    """Register the subcommand."""
    p = sub.add_parser("bench", help="quick side-by-side timing of conv_bias_relu against eager PyTorch")
    p.add_argument("--quick", action="store_true", help="two shapes, few repeats (seconds)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if visible)")
    p.add_argument("--channels-last", action="store_true", help="channels_last inputs")
    p.set_defaults(run=run, parser=p)


def _median_ms(fn, repeat: int, cuda: bool) -> float:
    import torch

    fn()  # warm-up
    times = []
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(args) -> int:
    """Time eager relu(conv2d) and every available backend; print ms and speed ratios."""
    import torch
    import torch.nn.functional as F

    import fastmtl
    from fastmtl import backends
    from fastmtl.commands import check_device

    if args.device:
        device = check_device(args.parser, args.device)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    names = [b for b in backends.BACKENDS if backends.can_run(b, device)[0] and b != "torch"]
    if device.type == "cpu":
        names = [b for b in names if b != "triton"]  # the interpreter is for tests, not timing
    repeat = 5 if args.quick else 20
    shapes = SHAPES if args.quick else SHAPES + MORE_SHAPES
    print(f"conv_bias_relu (3x3, padding 1) on {device.type}, {str(dtype).replace('torch.', '')}, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, {torch.get_num_threads()} CPU threads; "
          f"median of {repeat}; ratio = eager time / backend time (> 1 is faster)")
    header = f"{'shape':28s} {'mode':8s} {'eager ms':>9s} " + " ".join(f"{n + ' ms':>9s} {'ratio':>6s}" for n in names)
    print(header)
    print("-" * len(header))
    for label, n, c_in, h, w, c_out in shapes:
        torch.manual_seed(0)
        x = torch.randn(n, c_in, h, w, device=device, dtype=dtype)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weight = (torch.randn(c_out, c_in, 3, 3, device=device) / (9 * c_in) ** 0.5).to(dtype).requires_grad_()
        bias = torch.zeros(c_out, device=device, dtype=dtype).normal_(0, 0.1).requires_grad_()
        x.requires_grad_(c_in > 3)
        grad = None

        def make(fn, backward):
            def step():
                nonlocal grad
                if not backward:
                    with torch.no_grad():
                        return fn()
                y = fn()
                if grad is None:
                    grad = torch.randn_like(y)
                return torch.autograd.grad(y, [t for t in (x, weight, bias) if t.requires_grad], grad)

            return step

        for mode in ("fwd", "fwd+bwd"):
            backward = mode == "fwd+bwd"
            eager = _median_ms(make(lambda: torch.relu(F.conv2d(x, weight, bias, 1, 1)), backward), repeat, cuda)
            cells = []
            for name in names:

                def fused(name=name):
                    with fastmtl.use_backend(name):
                        return fastmtl.conv_bias_relu(x, weight, bias, 1, 1)

                ms = _median_ms(make(fused, backward), repeat, cuda)
                cells.append(f"{ms:9.2f} {eager / ms:5.2f}x")
            print(f"{label:28s} {mode:8s} {eager:9.2f} " + " ".join(cells))
    return 0
