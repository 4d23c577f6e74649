"""Trainer: masks honoured, a short run lowers the loss, exact resume, atomic checkpoint, outputs."""

import json
import os

import pytest
import torch


import fastmtl
from fastmtl.mtl import Trainer, presets
from fastmtl.mtl import checkpoint as ckpt
from fastmtl.mtl.config import TrainConfig
from fastmtl.mtl.weighting.ew import EqualWeighting
from fastmtl.testing import OpCounter


@pytest.fixture(autouse=True)
def single_thread():
    torch.set_num_threads(1)  # tiny shapes: one thread is fastest on a shared machine


TINY = dict(tasks=["cls", "seg", "depth", "attr"], train_size=48, val_size=16, widths=[4, 8], decoder_width=4,
            batch_size=16, epochs=2, lr=3e-3, progress=False, num_threads=1)


def _trainer(out=None, **kw):
    cfg = TrainConfig(**{**TINY, **kw, "out": out})
    train, val = presets.build_datasets(cfg)
    return Trainer(presets.build_model(cfg), presets.build_tasks(cfg), train, val, cfg)


def test_short_train_lowers_the_loss():
    tr = _trainer(train_size=128, epochs=4, missing_labels=0.3)
    batch = tr.train_data.batch(torch.arange(64))
    with torch.no_grad():
        before = {t: float(l) for t, l in tr._losses(tr.model(batch["image"]), batch).items()}
    for epoch in range(4):
        tr.train_epoch(epoch)
    with torch.no_grad():
        after = {t: float(l) for t, l in tr._losses(tr.model(batch["image"]), batch).items()}
    assert sum(after.values()) < 0.8 * sum(before.values()), (before, after)


def test_unlabelled_samples_never_touch_the_loss(monkeypatch):
    """Gradients of a step are unchanged when the targets of unlabelled samples are scrambled."""
    tr = _trainer(missing_labels=0.5)
    batch = tr.train_data.batch(torch.arange(16))
    scrambled = {"image": batch["image"], "masks": batch["masks"], "targets": {}}
    for t, y in batch["targets"].items():
        y = y.clone()
        off = ~batch["masks"][t]
        assert off.any()
        y[off] = y[off].flip(0) + (1 if y.dtype == torch.int64 else 0.5) if y.dtype != torch.int64 else (
            (y[off] + 1) % (11 if t == "seg" else 10))
        scrambled["targets"][t] = y
    grads = []
    for b in (batch, scrambled):
        tr.model.zero_grad()
        preds = tr.model(b["image"])
        total = sum(tr._losses(preds, b).values())
        total.backward()
        grads.append([p.grad.clone() for p in tr.model.parameters() if p.grad is not None])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_resume_matches_uninterrupted_run(tmp_path):
    straight = _trainer(out=str(tmp_path / "a"), seed=5)
    straight.fit()
    first = _trainer(out=str(tmp_path / "b"), seed=5)
    first.fit(stop_after=1)
    assert first.epoch == 1
    torch.manual_seed(1234)  # disturb the global RNG: the checkpoint must restore it
    resumed = _trainer(out=str(tmp_path / "b"), seed=5)
    resumed.fit(resume=str(tmp_path / "b"))
    assert resumed.epoch == 2
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.history[-1]["val"] == resumed.history[-1]["val"]
    assert straight.optimizer.state_dict()["state"][0]["step"] == resumed.optimizer.state_dict()["state"][0]["step"]


@pytest.mark.parametrize("weighting", ["dwa", "famo", "uw", "gradvac", "pcgrad", "rlw"])
def test_resume_with_a_stateful_strategy_and_affinity_is_exact(weighting, tmp_path):
    """Weighting state (DWA's loss history, FAMO's logits and Adam moments, UW's learned log-variances, GradVac's
    targets, the random draws of PCGrad and RLW) and the affinity trackers survive a checkpoint bit for bit."""
    common = dict(seed=2, epochs=3, weighting=weighting, affinity_every=2, train_size=32)
    straight = _trainer(out=str(tmp_path / "a"), **common)
    straight.fit()
    first = _trainer(out=str(tmp_path / "b"), **common)
    first.fit(stop_after=2)
    torch.manual_seed(99)
    resumed = _trainer(out=str(tmp_path / "b"), **common)
    resumed.fit(resume=str(tmp_path / "b"))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    wa, wb = straight.weighting.state_dict(), resumed.weighting.state_dict()
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]) if isinstance(wa[k], torch.Tensor) else wa[k] == wb[k], k
    assert straight.history[-1]["weights"] == resumed.history[-1]["weights"]
    assert straight.summary()["affinity"] == resumed.summary()["affinity"]
    assert straight.affinity.lookahead.count == 3 and straight.affinity.cosine.count >= 3  # steps 0, 2, 4 of 6


def test_affinity_outputs(tmp_path):
    out = tmp_path / "run"
    summary = _trainer(out=str(out), epochs=1, affinity_every=1, weighting="mgda", train_size=32).fit()
    assert {"affinity.png", "affinity_cosine.png"} <= set(os.listdir(out))
    assert (out / "affinity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    affinity = json.loads((out / "metrics.json").read_text())["affinity"]
    assert affinity == json.loads(json.dumps(summary["affinity"])) and affinity["every"] == 1
    for key in ("gradient_cosine", "lookahead"):
        entry = affinity[key]
        assert entry["tasks"] == ["cls", "seg", "depth", "attr"] and entry["updates"] == 2  # two steps
        matrix = torch.tensor(entry["matrix"])
        assert matrix.shape == (4, 4) and torch.isfinite(matrix).all()
    cosine = torch.tensor(affinity["gradient_cosine"]["matrix"])
    assert torch.allclose(cosine.diagonal(), torch.ones(4)) and torch.allclose(cosine, cosine.T)
    assert (cosine.abs() <= 1).all()
    assert summary["history"][-1]["affinity"] == summary["affinity"]


def test_representation_mode_backpropagates_the_multiscale_trunk_once_and_exactly():
    """A gradient-level strategy whose weights are all 1 must produce EW's gradients on the multi-scale default
    model (its heads read the stem and every stage), with each trunk convolution back-propagated once."""
    from fastmtl.mtl.weighting.base import GradientWeighting

    class UnitWeights(GradientWeighting):
        def compute_weights(self, gram, losses):
            return torch.ones(gram.shape[0], dtype=gram.dtype, device=gram.device)

    grads, calls = {}, {}
    for name in ("ew", "unit"):
        cfg = TrainConfig(**{**TINY, "train_size": 16, "missing_labels": 0.3, "backend": "torch", "grad_clip": 0.0})
        train, val = presets.build_datasets(cfg)
        weighting = EqualWeighting(cfg.tasks) if name == "ew" else UnitWeights(cfg.tasks)
        tr = Trainer(presets.build_model(cfg), presets.build_tasks(cfg), train, val, cfg, weighting=weighting)
        with fastmtl.use_backend("torch"), OpCounter() as counter:
            tr.train_step(train.batch(torch.arange(16)))
        grads[name] = {n: p.grad.clone() for n, p in tr.model.named_parameters()}
        calls[name] = counter.counts.get("aten.convolution_backward", 0)
    assert grads["ew"].keys() == grads["unit"].keys()
    for n in grads["ew"]:
        assert torch.allclose(grads["ew"][n], grads["unit"][n], rtol=1e-4, atol=1e-7), n
    convs = sum(1 for m in tr.model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
                and m.weight.dim() == 4)
    assert calls["unit"] == calls["ew"] == convs  # every convolution (trunk and heads) back-propagated once


def test_outputs_and_metrics_json(tmp_path):
    out = tmp_path / "run"
    summary = _trainer(out=str(out), epochs=1).fit()
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "curves.png", "metrics.json"]
    data = json.loads((out / "metrics.json").read_text())
    assert data == json.loads(json.dumps(summary))
    assert set(data) == {"config", "world_size", "history", "final"} and data["world_size"] == 1
    assert set(data["final"]) == {"cls", "seg", "depth", "attr"}
    assert set(data["final"]["cls"]) == {"accuracy"} and set(data["final"]["seg"]) == {"miou", "pixel_acc"}
    assert set(data["final"]["depth"]) == {"abs_err", "rel_err"} and set(data["final"]["attr"]) == {"f1"}
    h = data["history"][0]
    assert set(h) >= {"epoch", "lr", "train_loss", "val_loss", "val", "weights", "time_s"}
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    ckpt.save_atomic({"v": 1}, str(path))

    def broken_save(obj, f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save_atomic({"v": 2}, str(path))
    monkeypatch.undo()
    assert ckpt.load(str(path)) == {"v": 1}
    assert os.listdir(tmp_path) == ["c.pt"]  # no temporary file left behind


def test_backend_and_amp_options_run():
    tr = _trainer(epochs=1, backend="torch", amp="bf16", channels_last=True, train_size=32)
    summary = tr.fit()
    assert set(summary["final"]) == {"cls", "seg", "depth", "attr"}


def test_weighting_object_is_used():
    calls = []

    class Recording(EqualWeighting):
        def backward(self, losses, *, features=None, shared_params=None, counts=None, loss_scale=None):
            calls.append((sorted(losses), len(features), len(shared_params), {t: int(c) for t, c in counts.items()}))
            return super().backward(losses, features=features, shared_params=shared_params, counts=counts,
                                    loss_scale=loss_scale)

    cfg = TrainConfig(**{**TINY, "epochs": 1, "train_size": 16, "missing_labels": 0.5})
    train, val = presets.build_datasets(cfg)
    tr = Trainer(presets.build_model(cfg), presets.build_tasks(cfg), train, val, cfg, weighting=Recording(cfg.tasks))
    tr.fit()
    assert len(calls) == 1
    names, n_features, n_shared, counts = calls[0]
    assert names == sorted(cfg.tasks) and n_features == 2 and n_shared == 8
    assert counts == {t: int(train.masks[t].sum()) for t in cfg.tasks}


def test_mismatched_heads_and_tasks():
    cfg = TrainConfig(**TINY)
    train, val = presets.build_datasets(cfg)
    tasks = presets.build_tasks(cfg)
    tasks.pop("attr")
    with pytest.raises(ValueError, match="same tasks"):
        Trainer(presets.build_model(cfg), tasks, train, val, cfg)


def test_fp16_strategy_sees_unscaled_losses_and_a_loss_scale():
    seen = []

    class Recording(EqualWeighting):
        def backward(self, losses, *, features=None, shared_params=None, counts=None, loss_scale=None):
            seen.append((max(float(l) for l in losses.values()), loss_scale))
            return super().backward(losses, features=features, shared_params=shared_params, counts=counts,
                                    loss_scale=loss_scale)

    cfg = TrainConfig(**{**TINY, "epochs": 1, "train_size": 16, "amp": "fp16", "backend": "torch"})
    train, val = presets.build_datasets(cfg)
    tr = Trainer(presets.build_model(cfg), presets.build_tasks(cfg), train, val, cfg, weighting=Recording(cfg.tasks))
    tr.fit()
    (largest_loss, loss_scale), = seen
    assert loss_scale is not None and float(loss_scale) >= 2.0 ** 10  # GradScaler's scale, passed separately
    assert largest_loss < 100.0  # the losses themselves are not multiplied by the scale
