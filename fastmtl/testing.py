"""Helpers for parity tests, shared by fastmtl's own tests and by users checking a backend."""

from __future__ import annotations

import torch

TOLERANCES = {  # relative error against a float64 reference (brief, section 3)
    "loss": {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2},
    "conv": {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2},
}
TF32_TOLERANCE = 5e-3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` computed in float64 on the CPU (the plain norm of ``out`` when ``ref`` is zero).

    NaN anywhere gives NaN, which fails every ``<=`` comparison.
    """
    out = out.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    num = (out - ref).norm().item()
    den = ref.norm().item()
    return num / den if den > 0 else num


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor like ``t`` filled with NaN, to prove a kernel wrote every output element."""
    return torch.full_like(t, float("nan"))


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Context manager counting the ops dispatched while it is active: ``counts["aten.convolution_backward"]``.

    Keyed by op packet (``"namespace.name"``, overloads together). Shows how often a kernel actually runs, e.g. that
    a backward pass traverses a branch once.
    """

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def cpu_peak_bytes(fn) -> int:
    """Peak live bytes that one ``fn()`` adds on the CPU (its inputs excluded), from the profiler's memory timeline.

    The timeline (the data behind ``torch.profiler``'s ``export_memory_timeline``) has one event per allocation and
    free of every tensor, temporaries inside an op included, so the running sum of its creations minus its
    destructions is the live memory the call added, and its maximum the peak.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    running = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action.name == "CREATE":
            running += size
        elif action.name == "DESTROY":
            running -= size
        peak = max(peak, running)
    return peak


def graph_replay_ms(fn, replays: int = 10, repeat: int = 15) -> float:
    """Median device time of one ``fn()`` in ms, from timed replays of a CUDA graph holding it (no host overhead,
    no launch gaps). Raises what the capture raises where ``fn`` has no graph form (e.g. it synchronizes).

    ``fn`` runs once on a side stream first, as capture requires, so lazy initialisation stays out of the graph.
    """
    from fastmtl.autotune import time_ms

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay, warmup=1, repeat=repeat, calls=replays)


def assert_scales_in_place_like_copy(scale, scale_inplace, grads, scales) -> None:
    """``scale_inplace(grads, scales)`` writes into ``grads`` exactly what ``scale(grads, scales)`` returns."""
    want = scale(grads, scales)
    ptrs = [g.data_ptr() for g in grads]
    scale_inplace(grads, scales)
    for g, w, p in zip(grads, want, ptrs):
        assert g.data_ptr() == p, "scaled out of place"
        assert torch.equal(g, w), "in place and copying scaling must round alike"
