"""``fastmtl train`` end to end on a tiny configuration, resume, and bad input (exit code 2)."""

import json
import shutil
import subprocess
import sys

import pytest
import torch


from fastmtl import cli

TINY = ["--tasks", "cls,seg", "--train-size", "32", "--val-size", "16", "--batch-size", "16", "--threads", "1",
        "--quiet"]


def test_train_end_to_end_then_resume(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", *TINY, "--epochs", "1", "--out", str(out), "--missing-labels", "cls=0.5,seg=0.2",
                   "--backend", "torch", "--seed", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "miou" in printed and "curves.png" in printed
    data = json.loads((out / "metrics.json").read_text())
    assert data["config"]["missing_labels"] == {"cls": 0.5, "seg": 0.2}
    assert data["config"]["backend"] == "torch" and data["config"]["seed"] == 3
    assert 0.0 <= data["final"]["cls"]["accuracy"] <= 1.0 and 0.0 <= data["final"]["seg"]["miou"] <= 1.0
    assert (out / "curves.png").exists() and (out / "checkpoint.pt").exists()

    # Resume with a larger epoch budget: the saved settings are reused, only --epochs changes.
    rc = cli.main(["train", "--resume", str(out), "--epochs", "2", "--quiet"])
    assert rc == 0
    data = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in data["history"]] == [1, 2]
    assert data["config"]["seed"] == 3 and data["config"]["epochs"] == 2


def test_weighting_options_and_affinity_reach_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", *TINY, "--epochs", "1", "--out", str(out), "--weighting", "cagrad",
                   "--weighting-opt", "c=0.25", "--weighting-opt", "mode=params", "--affinity"])
    assert rc == 0
    data = json.loads((out / "metrics.json").read_text())
    assert data["config"]["weighting"] == "cagrad"
    assert data["config"]["weighting_options"] == {"c": 0.25, "mode": "params"}
    assert data["config"]["affinity_every"] == 25 and data["affinity"]["lookahead"]["updates"] == 1
    assert (out / "affinity.png").exists() and (out / "affinity_cosine.png").exists()
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert checkpoint["weighting"] is not None and "affinity" in checkpoint

    # Resuming keeps the options (naming the same strategy again too); another strategy is refused.
    args = cli.build_parser().parse_args(["train", "--resume", str(out)])
    assert args.run.__module__ == "fastmtl.commands.train"
    from fastmtl.commands.train import build_config

    assert build_config(args).weighting_options == {"c": 0.25, "mode": "params"}
    args = cli.build_parser().parse_args(["train", "--resume", str(out), "--weighting", "cagrad"])
    assert build_config(args).weighting_options == {"c": 0.25, "mode": "params"}
    args = cli.build_parser().parse_args(["train", "--resume", str(out), "--weighting", "ew"])
    with pytest.raises(ValueError, match="--weighting ew.*cagrad"):
        build_config(args)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "cls,colour"], "--tasks"),
        (["--tasks", ""], "--tasks"),
        (["--missing-labels", "1.5"], "--missing-labels"),
        (["--missing-labels", "depthh=0.2"], "unknown task"),
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "x"], "--batch-size"),
        (["--backend", "opencl"], "--backend"),
        (["--amp", "fp8"], "--amp"),
        (["--resume", "/nonexistent/run"], "--resume"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
        (["--lr", "-1"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--seed", "-1"], "--seed"),
        (["--seed", str(2**32)], "--seed"),
        (["--seed", "x"], "--seed"),
        (["--threads", "-1"], "--threads"),
        (["--device", "meta"], "--device meta"),
        (["--device", "tpu"], "--device tpu"),
        (["--device", "cuda:99"], "--device cuda:99"),
        (["--batch-size", "0"], "--batch-size"),
        (["--train-size", "-5"], "--train-size"),
        (["--val-size", "0"], "--val-size"),
        (["--weighting-opt", "alpha"], "--weighting-opt"),
        (["--weighting-opt", "=1"], "--weighting-opt"),
        (["--weighting", "cagrad", "--weighting-opt", "cc=0.5", "--epochs", "1", "--train-size", "16",
          "--val-size", "8", "--out", "/tmp/fastmtl-never-written"], "'cc'"),
        (["--weighting", "nope"], "unknown weighting"),
        (["--affinity", "0"], "--affinity"),
    ],
)
def test_bad_input_exits_2_with_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "error" in err


def test_console_script_bad_input_exit_code():
    """The real entry point (``python -m fastmtl``) exits 2 with a usage message."""
    proc = subprocess.run([sys.executable, "-P", "-m", "fastmtl", "train", "--tasks", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--tasks" in proc.stderr and "expected distinct comma-separated task names" in proc.stderr


def test_config_rejects_a_seed_numpy_cannot_take():
    from fastmtl.mtl.config import TrainConfig

    for seed in (-1, 2**32, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            TrainConfig(seed=seed).validate()
    assert TrainConfig(seed=2**32 - 1).validate().seed == 2**32 - 1


@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device cuda"),
    (["--device", "tpu"], "--device tpu"),
    (["--device", "meta"], "--device meta"),
])
def test_bench_bad_device_exits_2_with_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--quick", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "error" in err


@pytest.fixture(scope="module")
def fixed_run(tmp_path_factory):
    """A one-epoch run with the default (fixed) weighting, not to be modified by the tests that read it."""
    out = tmp_path_factory.mktemp("fixed") / "run"
    assert cli.main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("argv, message", [
    (["--weighting", "pcgrad"], "--weighting pcgrad: the checkpoint was trained with weighting fixed"),
    (["--weighting", "uw"], "--weighting uw: the checkpoint was trained with weighting fixed"),
    (["--tasks", "cls,depth"], "--tasks cls,depth: the checkpoint was trained on cls,seg"),
    (["--tasks", "seg,cls"], "--tasks seg,cls"),
    (["--amp", "fp16"], "--amp fp16: the checkpoint was trained with --amp off"),
])
def test_resume_refuses_a_state_it_cannot_restore(fixed_run, argv, message, capsys):
    before = (fixed_run / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--resume", str(fixed_run), "--epochs", "2", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert (fixed_run / "checkpoint.pt").read_bytes() == before


def test_resume_of_an_unreadable_checkpoint_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for target in (tmp_path / "empty", tmp_path / "notes.txt"):
        with pytest.raises(SystemExit) as exc:
            cli.main(["train", "--resume", str(target)])
        assert exc.value.code == 2
        assert "--resume" in capsys.readouterr().err


def _epoch(run) -> int:
    return torch.load(run / "checkpoint.pt", weights_only=False)["epoch"]


def test_resume_writes_into_the_checkpoints_directory(tmp_path, monkeypatch, capsys):
    """A copied run resumes into the copy, whatever the saved (relative) --out and the current directory."""
    first = tmp_path / "first"
    first.mkdir()
    monkeypatch.chdir(first)
    assert cli.main(["train", *TINY, "--epochs", "1", "--out", "run"]) == 0  # saved out: the relative "run"
    shutil.copytree(first / "run", tmp_path / "copy")

    # From the original's directory, the saved "run" would be the original run: it must stay at epoch 1.
    assert cli.main(["train", "--resume", str(tmp_path / "copy"), "--epochs", "2", "--quiet"]) == 0
    assert _epoch(first / "run") == 1 and _epoch(tmp_path / "copy") == 2
    # From another directory, the saved "run" would be a new directory there.
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--resume", "copy/checkpoint.pt", "--epochs", "3", "--quiet"]) == 0
    assert _epoch(tmp_path / "copy") == 3 and not (tmp_path / "run").exists()
    data = json.loads((tmp_path / "copy" / "metrics.json").read_text())
    assert [h["epoch"] for h in data["history"]] == [1, 2, 3]

    # --out still chooses where a resumed run writes.
    from fastmtl.commands.train import build_config

    args = cli.build_parser().parse_args(["train", "--resume", "copy", "--out", "elsewhere"])
    assert build_config(args).out == "elsewhere"
