"""``fastmtl train`` end to end on a tiny configuration, resume, and bad input (exit code 2)."""

import json
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

    # Resuming keeps the options; naming another strategy drops them.
    args = cli.build_parser().parse_args(["train", "--resume", str(out)])
    assert args.run.__module__ == "fastmtl.commands.train"
    from fastmtl.commands.train import build_config

    assert build_config(args).weighting_options == {"c": 0.25, "mode": "params"}
    args = cli.build_parser().parse_args(["train", "--resume", str(out), "--weighting", "ew"])
    assert build_config(args).weighting_options == {}


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
