"""Collect what benchmarks/gpu_check.sh wrote under OUT into OUT/results.json and OUT/summary.md."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402  (benchmarks/report.py, beside this file)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def test_counts(log: str) -> dict:
    """passed/failed/skipped/error counts from pytest's closing line (empty if pytest did not finish)."""
    closing = [line for line in log.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    counts = {}
    for num, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed)", closing[-1] if closing else ""):
        counts[word.rstrip("s") if word.startswith("error") else word] = int(num)
    return counts


def main(argv=None) -> int:
    """Write results.json and summary.md; print the summary."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = args.out
    env = _read(os.path.join(out, "env.txt"))
    tests_log = _read(os.path.join(out, "tests.log"))
    rows = []
    for name in sorted(os.listdir(out)):
        if name.startswith("bench") and name.endswith(".json"):  # bench.json, or one bench_<file>.json per file
            try:
                rows += report.load_rows(os.path.join(out, name))
            except ValueError:  # a run stopped at its time limit leaves an empty file: its results are lost
                print(f"gpu_summary: {name} holds no results (the run was stopped?)", file=sys.stderr)
    table = report.ratio_table(rows)
    bandwidth = json.loads(_read(os.path.join(out, "bandwidth.json")) or "{}")
    failures = re.findall(r"^(?:FAILED|ERROR) (\S+)", tests_log, flags=re.M)
    skipped = _read(os.path.join(out, "skipped.txt")).split("\n")
    results = {
        "skipped_for_deadline": [s for s in skipped if s],
        "env": env.strip().splitlines(),
        "tests": test_counts(tests_log),
        "test_failures": failures,
        "bandwidth": bandwidth,
        "benchmarks": table,
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = ["# fastmtl GPU check", "", "## Device and versions", "", "```", env.strip(), "```", ""]
    lines += ["## CUDA tests", "", f"counts: {results['tests']}", ""]
    lines += [f"- FAILED {name}" for name in failures] + [""]
    if results["skipped_for_deadline"]:
        lines += ["Not run (under 10 s left for them): " + ", ".join(results["skipped_for_deadline"]), ""]
    if bandwidth:
        lines += ["## Bandwidth", "", f"copy: {bandwidth.get('copy_GBps', 0):.0f} GB/s (read + write)", ""]
        lines += ["| kernel | shape | ms | GB/s | of copy |", "|---|---|---:|---:|---:|"]
        for k in bandwidth.get("kernels", []):
            lines.append(f"| {k['kernel']} | {k['shape']} | {k['ms']:.3f} | {k['GBps']:.0f} | {100 * k['of_copy']:.1f}% |")
        lines.append("")
    lines += ["## Benchmarks (ratios > 1 mean faster than the baseline)", "", report.markdown(table), ""]
    text = "\n".join(lines)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
