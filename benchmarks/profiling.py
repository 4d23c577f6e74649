"""Shared by the profile_*.py scripts: host time and per-kernel device time of a CUDA step under torch.profiler."""

from __future__ import annotations

import torch

from fastmtl.autotune import enqueue_ms


def profile_step(step, steps: int, warmup: int = 3):
    """Run ``step`` ``steps`` times; return (host_us, rows).

    host_us: host time per step with the launches queued behind each other (no waiting for the device).
    rows: ``(device_us_per_step, launches_per_step, kernel_name)``, slowest first, from ``torch.profiler``.
    """
    host_us = enqueue_ms(step, warmup, steps) / steps * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
        if device_us > 0:
            rows.append((device_us / steps, event.count / steps, event.key))
    rows.sort(reverse=True)
    return host_us, rows


def profile_variant(variant: str, title: str, make_step, steps: int) -> None:
    """Profile the step ``make_step()`` returns and print it as ``"<variant> <title>"``; a failure is printed instead,
    so the caller goes on with its other variants."""
    try:
        host_us, rows = profile_step(make_step(), steps)
    except Exception as exc:  # noqa: BLE001 - report and go on
        print(f"\n{variant}: failed: {str(exc).splitlines()[0][:200]}")
        return
    print_profile(f"{variant} {title}", host_us, rows)


def print_profile(title: str, host_us: float, rows, top: int = 12) -> None:
    """Print the step's totals (device time, launches, host time), then its slowest kernels."""
    total = sum(r[0] for r in rows)
    launches = sum(r[1] for r in rows)
    print(f"\n{title}: {total:.1f} us of device time in {launches:.0f} launches, {host_us:.1f} us of host time "
          "per step")
    for us, count, name in rows[:top]:
        print(f"  {us:8.1f} us  x{count:g}  {name[:110]}")
