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
