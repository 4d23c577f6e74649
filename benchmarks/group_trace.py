"""Experiment (CUDA only): where the grouped masked-loss forward spends its time, tile by tile.

    python benchmarks/group_trace.py [OUT_DIR]

Runs the forward kernels of the NYUv2-like batch of benchmarks/bandwidth.py with FASTMTL_CUDA_GROUP_TRACE set, so that
the grouped kernel records every tile it runs (task, count or loss tile, SM, block, and its start, the end of its wait
for the task's count, and its end, on the GPU's global timer), and prints what the records say: how long each SM had
work, when the SMs started and ran out of tiles, the count phase, the loss tiles' waits, the last block's finalize,
and tile durations by task and kind. It does so for each setting of BUILDS (the default, the build that prefetches
its loss tiles' reads to L2, one-block tiles at the end of the schedule). The records of each setting's last call
are kept as group_trace_<name>.csv in OUT_DIR (default: the current directory). In the prefetch build a loss tile's
"wait for the count" includes issuing its prefetches.

The times are those of a plain call (no CUDA graph), after warm-up calls; reading the timer adds a few instructions per
tile.
"""

from __future__ import annotations

import collections
import csv
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bandwidth  # noqa: E402

TRACE_CALLS = 3  # the last one is reported
BUILDS = {  # name: its variables
    "default": {},
    "prefetch": {"FASTMTL_CUDA_GROUP_PREFETCH": "1"},
    "small_tail": {"FASTMTL_CUDA_GROUP_SMALL_TAIL": "1"},
}


def read_trace(path: str) -> list[dict[str, int]]:
    """The tile records of FASTMTL_CUDA_GROUP_TRACE's CSV, as ints, in tile order."""
    with open(path, newline="") as f:
        return [{k: int(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _spread(values: list[float]) -> str:
    return f"min {min(values):.1f} / mean {statistics.fmean(values):.1f} / max {max(values):.1f}"


def summarize(records: list[dict[str, int]], task_names: list[str]) -> list[str]:
    """The report's lines for one call's records (times in us from the first tile's start)."""
    finalize = [r for r in records if r["is_loss"] == 2]
    records = [r for r in records if r["is_loss"] != 2]
    t0 = min(r["start_ns"] for r in records)
    span = (max(r["end_ns"] for r in records) - t0) / 1e3
    lines = [f"{len(records)} tiles, {len({r['block'] for r in records})} blocks on {len({r['sm'] for r in records})} "
             f"SMs; first tile start to last tile end: {span:.1f} us"]  # fmt: skip
    by_sm = collections.defaultdict(list)
    for r in records:
        by_sm[r["sm"]].append(((r["start_ns"] - t0) / 1e3, (r["end_ns"] - t0) / 1e3))
    busy, first, last = [], [], []
    for intervals in by_sm.values():  # an SM runs several blocks at once: the union of its tiles' intervals
        intervals.sort()
        total, (cur_a, cur_b) = 0.0, intervals[0]
        for a, b in intervals[1:]:
            if a > cur_b:
                total, cur_a, cur_b = total + cur_b - cur_a, a, b
            else:
                cur_b = max(cur_b, b)
        busy.append(total + cur_b - cur_a)
        first.append(intervals[0][0])
        last.append(max(b for _, b in intervals))
    lines.append(f"per SM, us with a tile running: {_spread(busy)} (of {span:.1f}: "
                 f"{100 * statistics.fmean(busy) / span:.0f}% on average)")  # fmt: skip
    lines.append(f"per SM, first tile start: {_spread(first)} us; last tile end: {_spread(last)} us")
    count = [r for r in records if not r["is_loss"]]
    loss = [r for r in records if r["is_loss"]]
    if count:
        lines.append(f"count tiles: {len(count)}, from {(min(r['start_ns'] for r in count) - t0) / 1e3:.1f} to "
                     f"{(max(r['end_ns'] for r in count) - t0) / 1e3:.1f} us")  # fmt: skip
    if loss:
        waits = [(r["counted_ns"] - r["start_ns"]) / 1e3 for r in loss]
        lines.append(f"loss tiles: {len(loss)}; wait for the count: total {sum(waits):.1f} us, "
                     f"{sum(w > 0.5 for w in waits)} tiles over 0.5 us, longest {max(waits):.1f} us")  # fmt: skip
    for r in finalize:
        lines.append(f"finalize (the last block, on SM {r['sm']}): {(r['end_ns'] - r['start_ns']) / 1e3:.1f} us, from "
                     f"{(r['start_ns'] - t0) / 1e3:.1f} us ({(r['start_ns'] - t0) / 1e3 - span:.1f} after the last "
                     "tile end)")  # fmt: skip
    per_block = collections.Counter(r["block"] for r in records)
    lines.append(f"tiles per block: min {min(per_block.values())} / max {max(per_block.values())}")
    groups = collections.defaultdict(list)
    for r in records:
        name = task_names[r["task"]] if r["task"] < len(task_names) else str(r["task"])
        groups[(name, "loss" if r["is_loss"] else "count")].append((r["end_ns"] - r["counted_ns"]) / 1e3)
    lines.append("tile durations (after any wait), us:")
    for (name, kind), d in sorted(groups.items()):
        lines.append(f"  {name:8s} {kind:5s} {len(d):5d} tiles  median {statistics.median(d):.2f}  max {max(d):.2f}")
    return lines


def _restore(saved: dict[str, str | None]) -> None:
    """Put environment variables back as they were (None: unset)."""
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def main(argv: list[str]) -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 0
    out_dir = argv[0] if argv else "."
    os.makedirs(out_dir, exist_ok=True)
    shape, _, cases = bandwidth.loss_cases()
    forward = cases["cuda masked_multitask_loss_forward (fwd kernels), graph"][1]
    status = 0
    for build, variables in BUILDS.items():
        path = os.path.join(out_dir, f"group_trace_{build}.csv")
        saved = {k: os.environ.get(k) for k in ("FASTMTL_CUDA_GROUP_TRACE", *variables)}
        os.environ.update(variables)
        try:
            for _ in range(5):
                forward()
            torch.cuda.synchronize()
            os.environ["FASTMTL_CUDA_GROUP_TRACE"] = path
            for _ in range(TRACE_CALLS):
                forward()
        finally:
            _restore(saved)
        records = read_trace(path)
        print(f"{shape}: grouped forward trace, {build} build, call {TRACE_CALLS} of {TRACE_CALLS} ({path})")
        if not records:
            print("no tile records: the grouped launch did not run")
            status = 1
            continue
        for line in summarize(records, ["seg", "depth", "normals", "cls"]):
            print(line)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
