"""benchmarks/group_trace.py's report of the grouped masked-loss forward's tile records (the part that runs without a
GPU): made-up records with known answers."""

from __future__ import annotations

import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def group_trace():
    if not (BENCHMARKS / "group_trace.py").exists():
        pytest.skip("the benchmarks folder is not beside the tests (installed package)")
    sys.path.insert(0, str(BENCHMARKS))
    import group_trace

    return group_trace


def _record(tile, task, is_loss, sm, block, start_us, counted_us, end_us):
    ns = 1000
    return {"tile": tile, "task": task, "is_loss": is_loss, "sm": sm, "block": block, "start_ns": 5000 + start_us * ns,
            "counted_ns": 5000 + counted_us * ns, "end_ns": 5000 + end_us * ns}  # fmt: skip


def test_report_of_known_records(group_trace, tmp_path):
    """Two SMs: SM 0 runs two overlapping tiles (busy 0-6 us, the union) then one after a gap (8-10); SM 1 one tile
    (1-3). One loss tile waits 2 us for its count. The finalize takes 3 us from 1 us after the last tile."""
    records = [
        _record(0, 0, 0, 0, 0, 0, 0, 4),
        _record(1, 1, 0, 0, 1, 2, 2, 6),
        _record(2, 0, 1, 1, 2, 1, 1, 3),
        _record(3, 0, 1, 0, 0, 8, 10, 10),
        _record(4, -1, 2, 1, 2, 11, 11, 14),  # the finalize
    ]
    path = tmp_path / "trace.csv"
    path.write_text("tile,task,is_loss,sm,block,start_ns,counted_ns,end_ns\n"
                    + "".join(",".join(str(r[k]) for k in r) + "\n" for r in records))  # fmt: skip
    assert group_trace.read_trace(str(path)) == records
    lines = group_trace.summarize(records, ["seg", "depth"])
    text = "\n".join(lines)
    assert "4 tiles, 3 blocks on 2 SMs; first tile start to last tile end: 10.0 us" in text
    assert "per SM, us with a tile running: min 2.0 / mean 5.0 / max 8.0" in text  # SM 0: 6 + 2, SM 1: 2
    assert "first tile start: min 0.0 / mean 0.5 / max 1.0 us; last tile end: min 3.0 / mean 6.5 / max 10.0" in text
    assert "count tiles: 2, from 0.0 to 6.0 us" in text
    assert "loss tiles: 2; wait for the count: total 2.0 us, 1 tiles over 0.5 us, longest 2.0 us" in text
    assert "tiles per block: min 1 / max 2" in text
    assert "finalize (the last block, on SM 1): 3.0 us, from 11.0 us (1.0 after the last tile end)" in text
    assert any(line.split()[:3] == ["seg", "loss", "2"] for line in lines)  # durations after the wait: 2 and 0 us
