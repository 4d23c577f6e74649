"""Distributed training: 2 processes (torchrun, gloo) with batch b each take the steps of 1 process with batch 2b.

The 2-process runs go through the real entry point, ``torchrun --standalone --nproc_per_node=2 -m fastmtl train``;
the collectives' pieces are also checked in a single process.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastmtl import cli
from fastmtl.mtl import distributed
from fastmtl.mtl.metrics import ConfusionMatrix, MultiLabelF1, MultiTaskMeter, RegressionError
from fastmtl.mtl.tasks import Task
from fastmtl.reference.masked_loss import valid_elements

COMMON = ["--tasks", "cls,seg,depth,attr", "--epochs", "2", "--train-size", "96", "--val-size", "30",
          "--missing-labels", "0.3", "--seed", "4", "--quiet"]
RTOL = 1e-4  # float32, 12 steps of AdamW: summation order differs between 1 and 2 processes


def _torchrun(out, argv, tmp_path):
    # TMPDIR: torchrun's own temporary folders (torchelastic_*) stay inside the test's folder, not in /tmp.
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "fastmtl", "train", *COMMON, *argv, "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)


# PCGrad in parameter mode on these 4 tasks is ill-conditioned (a tiny task gradient gets a coefficient ~30), so
# float32 summation-order noise grows over steps: it is compared after its first step, where a rank combining with
# its own weights (no reduction of the [K, P] gradients) would already be far off.
CASES = {
    "ew": (["--weighting", "ew"], [], RTOL),
    "pcgrad": (["--weighting", "pcgrad"], [], RTOL),
    "pcgrad-params": (["--weighting", "pcgrad", "--weighting-opt", "mode=params"], ["--train-size", "16"], 1e-3),
    "uw": (["--weighting", "uw", "--affinity", "4"], [], RTOL),  # affinity: measured on both, parameters untouched
}


@pytest.mark.parametrize("case", CASES)
def test_two_processes_match_one_with_twice_the_batch(case, tmp_path):
    weighting, extra, rtol = CASES[case]
    weighting = weighting + extra
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(["train", *COMMON, *weighting, "--batch-size", "16", "--threads", "1", "--out", str(one)]) == 0
    printed = _torchrun(two, [*weighting, "--batch-size", "8"], tmp_path)
    assert printed.count("fastmtl train:") == 1 and "2 processes" in printed  # rank 0 prints, once

    a = torch.load(one / "checkpoint.pt", weights_only=False)
    b = torch.load(two / "checkpoint.pt", weights_only=False)
    assert _max_rel_diff(a["model"], b["model"]) < rtol
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"]  # same number of steps
    ma, mb = json.loads((one / "metrics.json").read_text()), json.loads((two / "metrics.json").read_text())
    assert ma["world_size"] == 1 and mb["world_size"] == 2
    for task, metrics in ma["final"].items():  # validation metrics reduced over both processes' shares
        for name, value in metrics.items():
            assert mb["final"][task][name] == pytest.approx(value, rel=1e-3, abs=1e-4), (task, name)
    if "affinity" in ma:  # averaged over the processes' shares: finite, same shape and count as one process's
        for key in ("gradient_cosine", "lookahead"):
            a_aff, b_aff = ma["affinity"][key], mb["affinity"][key]
            assert a_aff["updates"] == b_aff["updates"] > 0
            assert torch.isfinite(torch.tensor(b_aff["matrix"])).all()
    for ea, eb in zip(ma["history"], mb["history"]):
        for task in ea["train_loss"]:
            assert eb["train_loss"][task] == pytest.approx(ea["train_loss"][task], rel=rtol)
            assert eb["weights"][task] == pytest.approx(ea["weights"][task], rel=rtol)


def test_single_process_helpers_are_identities():
    assert distributed.world_size() == 1 and distributed.rank() == 0
    t = torch.randn(3)
    assert distributed.all_reduce_sum(t) is t
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    before = p.grad.clone()
    distributed.average_gradients([p])
    assert torch.equal(p.grad, before)


def test_global_losses_in_one_process_keep_values_and_gradients():
    x = torch.randn(5, requires_grad=True)
    losses = {"a": (x**2).mean(), "b": x.sum()}
    elements = {"a": torch.tensor(5), "b": torch.tensor(0)}  # "b" has no valid element: value 0
    counts = {"a": torch.tensor(3), "b": torch.tensor(0)}
    pooled, global_counts = distributed.global_losses(losses, elements, counts, ["a", "b"])
    assert torch.allclose(pooled["a"], losses["a"]) and float(pooled["b"].detach()) == 0.0
    assert int(global_counts["a"]) == 3 and int(global_counts["b"]) == 0
    (g,) = torch.autograd.grad(pooled["a"], x)
    assert torch.allclose(g, 2 * x.detach() / 5)


def test_reducers_scale_for_the_global_batch():
    gram = torch.randn(3, 3)
    assert torch.allclose(distributed.gram_reducer(2)(gram.clone()), gram / 4)
    grads = torch.randn(3, 7)
    assert torch.allclose(distributed.grads_reducer(2)(grads.clone()), grads / 2)


def test_valid_elements_follow_the_loss_semantics():
    target = torch.tensor([[0, -100, 3], [1, 2, 9]])
    mask = torch.tensor([True, False])
    valid = valid_elements(target, mask, "ce", num_classes=5)
    assert valid.tolist() == [[True, False, True], [False, False, False]]
    reg = torch.tensor([[0.5, float("nan")], [1.0, 2.0]])
    assert valid_elements(reg, None, "l1").tolist() == [[True, False], [True, True]]
    with pytest.raises(ValueError, match="num_classes"):
        valid_elements(target, None, "ce")


def test_meters_reduce_their_accumulators():
    tasks = {"c": Task("ce", num_classes=3), "r": Task("l1"), "m": Task("bce")}
    meter = MultiTaskMeter(tasks)
    with pytest.raises(RuntimeError, match="never updated"):
        meter.reduce_(lambda t: t)
    preds = {"c": torch.randn(4, 3), "r": torch.randn(4, 2), "m": torch.randn(4, 5)}
    targets = {"c": torch.randint(0, 3, (4,)), "r": torch.randn(4, 2), "m": (torch.rand(4, 5) > 0.5).float()}
    meter.update(preds, targets)
    single = meter.compute()
    meter.reduce_(lambda t: t * 2)  # two identical shares: every metric is unchanged
    assert meter.compute() == single
    assert isinstance(meter.meters["c"], ConfusionMatrix) and int(meter.meters["c"].matrix.sum()) == 8
    assert isinstance(meter.meters["r"], RegressionError) and isinstance(meter.meters["m"], MultiLabelF1)
