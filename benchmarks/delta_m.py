"""Δm of every task-weighting strategy against single-task runs on MultiDigits.

    python benchmarks/delta_m.py [--tasks cls,seg] [--epochs 15] [--train-size 3000] [--val-size 1000]
                                 [--seed 0] [--strategies ew,pcgrad,...] [--out-dir DIR] [--threads 1]

Trains one single-task model per task (``--weighting ew``) and one multi-task model per weighting strategy, every
run a ``sys.executable -m fastmtl train`` subprocess with the same settings, into ``OUT_DIR/single/<task>/`` and
``OUT_DIR/mtl/<strategy>/`` (``metrics.json``, ``curves.png`` and ``train.log``; ``checkpoint.pt`` is deleted once a
run is complete). Runs are sequential. A run whose ``metrics.json`` already holds every epoch is reused, and one
interrupted after an epoch resumes from its checkpoint, so the benchmark can be stopped and started again; a
``metrics.json`` written with other settings is an error rather than silently mixed in.

Writes ``OUT_DIR/delta_m.json`` (settings, baselines, each strategy's final validation metrics, Δm and training
seconds) and ``OUT_DIR/delta_m.md`` (one table, sorted by Δm, best first). Δm (Maninis et al., 2019, see
:func:`fastmtl.mtl.metrics.delta_m`) is the mean relative gain over tasks in percent, positive when the multi-task
model beats the single-task ones. Training seconds are the sum of the runs' epoch times (training plus the
per-epoch validation), without process start-up and data generation. A diverged run's metrics and Δm are NaN
(written as ``NaN`` in the JSON, as ``metrics.json`` does) and sort last. The JSON's top-level ``wall_s`` is the
duration of the invocation that wrote it (runs it reused are not counted).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

BASELINE = "single-task"  # the row of the single-task models in the table
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line options (``--strategies`` defaults to every registered weighting strategy)."""
    today = datetime.date.today().isoformat()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="cls,seg", help="comma-separated tasks (default cls,seg: the demo's)")
    p.add_argument("--epochs", type=int, default=15, help="epochs of every run (default 15, the demo's)")
    p.add_argument("--train-size", type=int, default=3000, help="training scenes (default 3000, the demo's)")
    p.add_argument("--val-size", type=int, default=1000, help="validation scenes (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run (default 0)")
    p.add_argument("--strategies", help="comma-separated weighting strategies (default: all of them)")
    p.add_argument("--out-dir", type=Path, default=RESULTS / f"{today}-cpu" / "delta_m",
                   help="output directory (default benchmarks/results/<today>-cpu/delta_m)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of each run (default 1)")
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    from fastmtl.mtl import weighting

    available = weighting.available()
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()] if args.strategies else available
    unknown = [s for s in args.strategies if s not in available]
    if unknown:
        p.error(f"unknown strategies {unknown}; available: {','.join(available)}")
    return args


def git_commit() -> str | None:
    """``git describe --always --dirty`` of the repository holding this script (None outside a git checkout)."""
    result = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                            capture_output=True, text=True)
    return result.stdout.strip() or None


def _load_metrics(out: Path) -> dict | None:
    path = out / "metrics.json"
    if not path.exists():
        return None
    with open(path) as f:
        return json.load(f)


def train(out: Path, tasks: list[str], strategy: str, args: argparse.Namespace) -> dict:
    """Run (or reuse, or resume) one ``fastmtl train`` into ``out``; returns its ``metrics.json`` content plus
    ``wall_s`` (seconds of the subprocess, None when reused) or ``error`` (when the run failed)."""
    wanted = {"tasks": tasks, "weighting": strategy, "epochs": args.epochs, "train_size": args.train_size,
              "val_size": args.val_size, "seed": args.seed}
    metrics = _load_metrics(out)
    if metrics is not None:
        config = metrics["config"]
        mismatched = {k: config.get(k) for k in wanted if config.get(k) != wanted[k]}
        if mismatched:
            sys.exit(f"{out / 'metrics.json'} was written with other settings {mismatched}; expected {wanted}; "
                     "delete it or choose another --out-dir")
        if len(metrics["history"]) >= args.epochs:
            (out / "checkpoint.pt").unlink(missing_ok=True)
            print(f"  {out}: reused", flush=True)
            return {**metrics, "wall_s": None}
    # -P: the installed fastmtl, not the source tree of the current directory
    cmd = [sys.executable, "-P", "-m", "fastmtl", "train", "--tasks", ",".join(tasks), "--weighting", strategy,
           "--epochs", str(args.epochs), "--train-size", str(args.train_size), "--val-size", str(args.val_size),
           "--seed", str(args.seed), "--threads", str(args.threads), "--quiet", "--out", str(out)]
    checkpoint = out / "checkpoint.pt"
    if metrics is not None and checkpoint.exists():
        cmd += ["--resume", str(checkpoint)]
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(out / "train.log", "a") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    metrics = _load_metrics(out)
    if code != 0 or metrics is None:
        print(f"  {out}: FAILED (exit code {code}, see {out / 'train.log'})", flush=True)
        return {"error": f"exit code {code}", "wall_s": wall}
    checkpoint.unlink(missing_ok=True)
    print(f"  {out}: {wall:.0f}s", flush=True)
    return {**metrics, "wall_s": wall}


def train_seconds(metrics: dict) -> float:
    """Sum of the epoch times of a run."""
    return sum(epoch["time_s"] for epoch in metrics["history"])


def build_report(args: argparse.Namespace, singles: dict[str, dict], runs: dict[str, dict]) -> dict:
    """The content of ``delta_m.json`` from the single-task runs (by task) and the multi-task runs (by strategy)."""
    from fastmtl.mtl.metrics import delta_m

    baselines = {task: singles[task]["final"][task] for task in args.tasks}
    strategies = {}
    for name, metrics in runs.items():
        if "error" in metrics:
            strategies[name] = {"error": metrics["error"]}
            continue
        strategies[name] = {
            "final": metrics["final"],
            "delta_m": delta_m(metrics["final"], baselines),
            "train_s": train_seconds(metrics),
            "wall_s": metrics["wall_s"],
        }
    return {
        "settings": {"tasks": args.tasks, "epochs": args.epochs, "train_size": args.train_size,
                     "val_size": args.val_size, "seed": args.seed, "threads": args.threads,
                     "torch": version("torch"), "python": sys.version.split()[0],
                     "commit": git_commit(), "date": datetime.date.today().isoformat()},
        "baselines": baselines,
        "baseline_train_s": {task: train_seconds(singles[task]) for task in args.tasks},
        "strategies": strategies,
    }


def _fmt(x: float, digits: int) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else str(x)


def render_markdown(report: dict) -> str:
    """``delta_m.md``: a settings line and one table, strategies sorted by Δm (best first, failed and NaN last),
    with the single-task models as a row of Δm 0 whose train time is the sum of their runs'."""
    s = report["settings"]
    columns = [(task, metric) for task, values in report["baselines"].items() for metric in values]
    header = (f"Δm vs single-task on MultiDigits: tasks {','.join(s['tasks'])}, {s['epochs']} epochs, "
              f"{s['train_size']} train / {s['val_size']} val scenes, seed {s['seed']}, {s['threads']} CPU thread(s), "
              f"torch {s['torch']}, {s['date']}.")
    lines = [header, "",
             "| strategy | Δm % | " + " | ".join(f"{t} {m}" for t, m in columns) + " | train time s |",
             "|---|---:|" + "---:|" * len(columns) + "---:|"]
    rows = [(BASELINE, {"final": report["baselines"], "delta_m": 0.0,
                        "train_s": sum(report["baseline_train_s"].values())})]
    rows += list(report["strategies"].items())
    rows.sort(key=lambda r: -r[1]["delta_m"] if math.isfinite(r[1].get("delta_m", math.nan)) else math.inf)
    for name, row in rows:
        if "error" in row:
            lines.append(f"| {name} | failed ({row['error']}) |" + " |" * (len(columns) + 1))
            continue
        values = [_fmt(row["final"][t][m], 4) for t, m in columns]
        lines.append(f"| {name} | {_fmt(row['delta_m'], 2)} | " + " | ".join(values)
                     + f" | {_fmt(row['train_s'], 0)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 1 when a run failed, else 0."""
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    singles = {}
    for task in args.tasks:
        singles[task] = train(args.out_dir / "single" / task, [task], "ew", args)
        if "error" in singles[task]:
            return 1  # no baseline: no Δm
    runs = {name: train(args.out_dir / "mtl" / name, args.tasks, name, args) for name in args.strategies}
    report = build_report(args, singles, runs)
    report["wall_s"] = time.perf_counter() - start
    (args.out_dir / "delta_m.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    (args.out_dir / "delta_m.md").write_text(markdown)
    print(markdown, end="")
    print(f"wall time {report['wall_s']:.0f}s; results in {args.out_dir}")
    return int(any("error" in r for r in runs.values()))


if __name__ == "__main__":
    sys.exit(main())
