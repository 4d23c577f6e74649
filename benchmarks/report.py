"""Turn a pytest-benchmark JSON file into one table of ratios.

    python benchmarks/report.py BENCH.json [--markdown OUT.md] [--json OUT.json]

Rows are grouped by (op, mode, shape, dtype, device). For each backend the table gives the median time, the speed
ratio against eager PyTorch and against torch.compile (baseline median / this median: > 1 means faster), and the
peak-memory ratio against eager (this / eager: < 1 means less memory; CUDA only), and on CUDA the device time of one
call (CUDA graph replay: kernels alone, no host overhead) with its ratios against eager's and compile's. Baselines
are the rows named "eager" and "compile" (or "compile-max-autotune", the faster of the two; for device time, the
faster by device time) in the same group, measured in the same run. For ``auto`` rows that record it, the backend
column names the dispatcher's choice.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

EAGER_NAMES = ("eager", "eager_index", "ew")  # the fastest of these is the baseline ("ew": weighting)
COMPILE_NAMES = ("compile", "compile-max-autotune")  # the faster of the two is the baseline


def load_rows(path: str) -> list[dict]:
    """One dict per benchmark: its extra_info plus median (seconds)."""
    with open(path) as f:
        data = json.load(f)
    rows = []
    for bench in data.get("benchmarks", []):
        info = dict(bench.get("extra_info", {}))
        info.setdefault("backend", bench.get("name", "?"))
        # CUDA rounds make several calls before one synchronize (benchmarks/conftest.py): time per call.
        info["median"] = bench["stats"]["median"] / info.get("calls_per_round", 1)
        info["name"] = bench.get("fullname", bench.get("name"))
        rows.append(info)
    return rows


def _baseline(group: list[dict], names, by: str = "median") -> dict | None:
    candidates = [r for r in group if r.get("backend") in names and r.get(by) is not None]
    return min(candidates, key=lambda r: r[by]) if candidates else None


def ratio_table(rows: list[dict]) -> list[dict]:
    """Rows annotated with vs_eager, vs_compile and mem_vs_eager."""
    groups = defaultdict(list)
    for r in rows:
        key = tuple(r.get(k, "") for k in ("op", "mode", "shape", "dtype", "device"))
        groups[key].append(r)
    table = []
    for key in sorted(groups):
        group = groups[key]
        eager = _baseline(group, EAGER_NAMES)
        compiled = _baseline(group, COMPILE_NAMES)
        compiled_device = _baseline(group, COMPILE_NAMES, by="device_ms")
        for r in sorted(group, key=lambda r: r["median"]):
            out = dict(zip(("op", "mode", "shape", "dtype", "device"), key))
            out["backend"] = r["backend"]
            out["median_ms"] = r["median"] * 1e3
            out["vs_eager"] = eager["median"] / r["median"] if eager else None
            out["vs_compile"] = compiled["median"] / r["median"] if compiled else None
            dev, dev0 = r.get("device_ms"), eager.get("device_ms") if eager else None
            out["device_ms"] = dev
            out["device_vs_eager"] = dev0 / dev if dev and dev0 else None
            dev_c = compiled_device["device_ms"] if compiled_device else None
            out["device_vs_compile"] = dev_c / dev if dev and dev_c else None
            if r.get("choice"):
                out["backend"] = f"{r['backend']} ({r['choice']})"
            mem, mem0 = r.get("peak_mem_bytes"), eager.get("peak_mem_bytes") if eager else None
            out["mem_vs_eager"] = mem / mem0 if mem is not None and mem0 else None
            table.append(out)
    return table


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(table: list[dict]) -> str:
    """The table as GitHub markdown."""
    lines = [
        "| op | mode | shape | dtype | device | backend | median ms | vs eager | vs compile | peak mem vs eager "
        "| device ms | device vs eager | device vs compile |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        lines.append(
            f"| {r['op']} | {r['mode']} | {r['shape']} | {r['dtype']} | {r['device']} | {r['backend']} | "
            f"{r['median_ms']:.3f} | {_fmt(r['vs_eager'], '.2f')}x | {_fmt(r['vs_compile'], '.2f')}x | "
            f"{_fmt(r['mem_vs_eager'], '.2f')} | {_fmt(r.get('device_ms'), '.3f')} | "
            f"{_fmt(r.get('device_vs_eager'), '.2f')}x | {_fmt(r.get('device_vs_compile'), '.2f')}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    """Print the table; optionally write it as markdown and JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json_file")
    parser.add_argument("--markdown", help="also write the table to this markdown file")
    parser.add_argument("--json", help="also write the table to this JSON file")
    args = parser.parse_args(argv)
    table = ratio_table(load_rows(args.json_file))
    text = markdown(table)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
