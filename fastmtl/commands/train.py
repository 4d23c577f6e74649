"""``fastmtl train``: train a multi-task model on MultiDigits (defaults: the ``make demo`` run).

Writes ``checkpoint.pt`` (each epoch, atomically), ``metrics.json`` and ``curves.png`` to ``--out`` and prints the
final per-task validation metrics. ``--resume DIR_OR_FILE`` continues a run from its checkpoint, with the run's
saved settings (options given explicitly override them; ``--tasks``, ``--weighting`` and a switch to ``--amp fp16``
are refused, as the checkpoint's model, weighting and grad-scaler states could not be restored) and writes into the
checkpoint's directory unless ``--out`` is given. Bad arguments exit with code 2 and a message.

Multi-process: ``torchrun --standalone --nproc_per_node=N -m fastmtl train ...`` trains with N processes (gloo on
the CPU, NCCL on GPUs, one GPU per process), ``--batch-size`` samples each; rank 0 prints and writes the outputs.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import math
import os
import time

from fastmtl.data.multidigits import TASKS as DATA_TASKS

BACKENDS = ("auto", "torch", "cpp", "cuda", "triton")


def _tasks(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in DATA_TASKS]
    if not names or bad or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected distinct comma-separated task names from {','.join(DATA_TASKS)}, got {text!r}")
    return names


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def _missing(text: str):
    """``0.3`` (every task) or ``cls=0.3,seg=0.5`` (per task, others 0)."""
    if "=" not in text:
        return _fraction(text)
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in DATA_TASKS:
            raise argparse.ArgumentTypeError(f"unknown task {name!r} in {text!r}; tasks are {','.join(DATA_TASKS)}")
        out[name] = _fraction(value)
    return out


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _seed(text: str) -> int:
    from fastmtl.mtl.config import MAX_SEED

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, {MAX_SEED}], got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, {MAX_SEED}], got {text!r}")
    return value


def _option(text: str) -> tuple[str, object]:
    """``name=value`` of a weighting option; the value read as a Python literal (number, bool, list) when it is
    one, else kept as a string (``mode=params``)."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return name, value.strip()


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


# option -> TrainConfig field (options left out on the command line keep the config's value)
FIELDS = {
    "tasks": "tasks", "weighting": "weighting", "epochs": "epochs", "batch_size": "batch_size",
    "missing_labels": "missing_labels", "backend": "backend", "amp": "amp", "channels_last": "channels_last",
    "compile": "compile", "out": "out", "seed": "seed", "device": "device", "lr": "lr", "train_size": "train_size",
    "val_size": "val_size", "threads": "num_threads", "progress": "progress", "affinity": "affinity_every",
}
AFFINITY_EVERY = 25  # --affinity without a number: measure every 25 steps


def add_parser(sub):
    """Register the subcommand."""
    S = argparse.SUPPRESS
    p = sub.add_parser("train", help="train a multi-task model on MultiDigits", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=S)
    p.add_argument("--tasks", type=_tasks, help="comma-separated tasks from cls,seg,depth,attr (default cls,seg)")
    p.add_argument("--weighting", help="loss weighting strategy (default fixed: each task's weight, 1.0)")
    p.add_argument("--weighting-opt", type=_option, action="append", metavar="NAME=VALUE",
                   help="an option of the weighting strategy, e.g. mode=params or temperature=2.0 (repeatable)")
    p.add_argument("--affinity", type=_positive_int, nargs="?", const=AFFINITY_EVERY, metavar="N",
                   help=f"measure task affinity every N steps (default {AFFINITY_EVERY}): metrics.json 'affinity', "
                        "affinity.png, affinity_cosine.png")
    p.add_argument("--epochs", type=_positive_int, help="epochs (default 15)")
    p.add_argument("--batch-size", type=_positive_int, help="batch size (default 32)")
    p.add_argument("--missing-labels", type=_missing, metavar="FRAC|TASK=FRAC,...",
                   help="fraction of training labels removed per task (default 0.3)")
    p.add_argument("--backend", choices=BACKENDS, help="fastmtl kernel backend (default auto)")
    p.add_argument("--amp", nargs="?", const="bf16", choices=("bf16", "fp16"),
                   help="mixed precision (--amp alone: bf16)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--out", help="output directory (default runs/latest)")
    p.add_argument("--resume", help="checkpoint file, or a run directory holding checkpoint.pt")
    p.add_argument("--seed", type=_seed, help="seed of data, initialisation and batch order (default 0)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--lr", type=_positive_float, help="peak learning rate (default 3e-3)")
    p.add_argument("--train-size", type=_positive_int, help="training scenes (default 3000)")
    p.add_argument("--val-size", type=_positive_int, help="validation scenes (default 1000)")
    p.add_argument("--threads", type=_non_negative_int, help="CPU threads (default 0: torch's choice)")
    p.add_argument("--quiet", dest="progress", action="store_false", help="no progress bars or epoch lines")
    p.set_defaults(run=run, parser=p)


def build_config(args):
    """The TrainConfig of this invocation (from the checkpoint when resuming, then explicit options).

    Raises ValueError for an unreadable checkpoint or an option a resumed run cannot change."""
    from fastmtl.mtl.config import TrainConfig

    resuming = bool(getattr(args, "resume", None))
    base = _resumed_config(args.resume) if resuming else TrainConfig(out="runs/latest")
    saved = dataclasses.replace(base)
    for option, field in FIELDS.items():
        if hasattr(args, option):
            setattr(base, field, getattr(args, option))
    if hasattr(args, "weighting_opt"):
        base.weighting_options = dict(args.weighting_opt)
    if resuming:
        _check_resumable(saved, base)
    return base.validate()


def _resumed_config(resume: str):
    """The config saved in the checkpoint ``resume`` names (a file, or a run directory), writing into the
    checkpoint's directory."""
    from fastmtl.mtl import checkpoint
    from fastmtl.mtl.config import TrainConfig
    from fastmtl.mtl.trainer import CHECKPOINT

    path = os.path.join(resume, CHECKPOINT) if os.path.isdir(resume) else resume
    try:
        config = TrainConfig.from_dict(checkpoint.load(path)["config"])
    except Exception as e:  # a missing file, another pickle, a checkpoint of something else
        raise ValueError(f"--resume: {path!r} is not a readable fastmtl checkpoint ({type(e).__name__}: {e})") from e
    # The saved ``out`` is where the run was first written: a copied or moved run must not write back there, and a
    # relative one would resolve against whatever the current directory is now.
    config.out = os.path.dirname(os.path.abspath(path))
    return config


def _check_resumable(saved, config) -> None:
    """Raise ValueError if ``config`` changes a setting whose state the checkpoint of ``saved`` cannot restore."""
    if list(config.tasks) != list(saved.tasks):
        raise ValueError(f"--tasks {','.join(config.tasks)}: the checkpoint was trained on {','.join(saved.tasks)}; "
                         "a resumed run keeps its tasks (start a new run with --out to train others)")
    if config.weighting != saved.weighting:
        raise ValueError(f"--weighting {config.weighting}: the checkpoint was trained with weighting "
                         f"{saved.weighting}; a resumed run keeps its strategy, whose state (and the optimizer's) "
                         f"it restores (start a new run with --out to train with {config.weighting})")
    if config.amp == "fp16" and saved.amp != "fp16":
        raise ValueError(f"--amp fp16: the checkpoint was trained with --amp {saved.amp or 'off'}, so it has no "
                         "fp16 grad-scaler state to resume (start a new run with --out to train with fp16)")


def run(args) -> int:
    """Build data, model and trainer from the options; train; print the final table."""
    parser = args.parser
    if getattr(args, "resume", None) and not os.path.exists(args.resume):
        parser.error(f"--resume: no checkpoint or run directory at {args.resume!r}")
    try:
        config = build_config(args)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    import torch

    import fastmtl
    from fastmtl.commands import check_device

    if config.backend != "auto" and config.backend not in fastmtl.available_backends():
        parser.error(f"--backend {config.backend} is not available here (available: "
                     f"{', '.join(fastmtl.available_backends())})")
    if config.device != "auto":
        check_device(parser, config.device)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)

    from fastmtl.mtl import distributed

    try:
        distributed.init_from_env(config.device)
    except ValueError as e:
        parser.error(f"--device: {e}")
    try:
        return _train(config, args)
    finally:
        distributed.shutdown()


def _train(config, args) -> int:
    import torch

    from fastmtl.mtl import Trainer, distributed, presets

    main = distributed.rank() == 0
    start = time.perf_counter()
    train, val = presets.build_datasets(config)
    model = presets.build_model(config)
    try:
        trainer = Trainer(model, presets.build_tasks(config), train, val, config)
    except (ValueError, KeyError, TypeError) as e:  # e.g. an unknown weighting name or option
        args.parser.error(str(e))
    if main:
        processes = f", {trainer.world_size} processes" if trainer.world_size > 1 else ""
        print(f"fastmtl train: tasks {','.join(config.tasks)}, {len(train)} train / {len(val)} val scenes, "
              f"{config.epochs} epochs on {trainer.device} (backend {config.backend}, "
              f"{torch.get_num_threads()} threads{processes}), out {config.out}", flush=True)
    summary = trainer.fit(resume=getattr(args, "resume", None))
    elapsed = time.perf_counter() - start
    if not main:
        return 0
    print_table(summary["final"])
    print(f"time {elapsed:.1f}s; metrics {os.path.join(config.out, 'metrics.json')}; "
          f"curves {os.path.join(config.out, 'curves.png')}")
    return 0


def print_table(final: dict) -> None:
    """The final per-task validation metrics, one row per (task, metric)."""
    print(f"{'task':8s} {'metric':10s} {'value':>8s}")
    for task, values in final.items():
        for metric, value in values.items():
            print(f"{task:8s} {metric:10s} {value:8.4f}")
