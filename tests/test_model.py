"""MultiTaskModel, heads and Task."""

import pytest
import torch
from torch import nn

import fastmtl
from fastmtl.mtl import MultiTaskModel, Task
from fastmtl.mtl import presets
from fastmtl.mtl.config import TrainConfig
from fastmtl.nn.heads import ClassificationHead, DenseHead


def _model():
    return presets.build_model(TrainConfig(tasks=["cls", "seg", "depth", "attr"], widths=[4, 8, 8], decoder_width=4))


def test_forward_shapes_and_encode_decode():
    model = _model()
    x = torch.randn(3, 1, 48, 48)
    out = model(x)
    assert out["cls"].shape == (3, 10) and out["attr"].shape == (3, 10)
    assert out["seg"].shape == (3, 11, 48, 48) and out["depth"].shape == (3, 1, 48, 48)
    features = model.encode(x)
    assert [f.shape[-1] for f in features] == [24, 12, 6]
    assert isinstance(model.trunk.body, fastmtl.FusedTrunk)
    again = model.decode(features, out_size=(48, 48))
    for t in out:
        assert torch.equal(out[t], again[t])


def test_gradient_through_features_reaches_trunk():
    """Per-task gradients w.r.t. the shared representation, as gradient-level weighting needs them."""
    model = _model()
    features = model.encode(torch.randn(2, 1, 48, 48))
    preds = model.decode(features, out_size=(48, 48))
    grads = torch.autograd.grad(preds["cls"].sum(), features, retain_graph=True)
    assert grads[-1] is not None and grads[-1].abs().sum() > 0
    grads = torch.autograd.grad(preds["seg"].sum(), features)
    assert all(g.abs().sum() > 0 for g in grads)  # the dense head uses every skip feature
    shared = {id(p) for p in model.shared_parameters()}
    assert shared and not shared & {id(p) for p in model.task_parameters("seg")}


def test_model_with_tensor_trunk_and_plain_heads():
    trunk = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU())
    model = MultiTaskModel(trunk, {"a": ClassificationHead(6, 3, hidden=5), "b": DenseHead([6], 2)})
    out = model(torch.randn(2, 1, 10, 10))
    assert out["a"].shape == (2, 3) and out["b"].shape == (2, 2, 10, 10)
    with pytest.raises(ValueError, match="heads"):
        MultiTaskModel(trunk, {})


def test_task_defaults_and_validation():
    assert Task("ce").metrics == ("accuracy",)
    assert Task("ce", dense=True).metrics == ("miou", "pixel_acc")
    assert Task("l1").metrics == ("abs_err", "rel_err") and Task("bce").metrics == ("f1",)
    with pytest.raises(ValueError, match="kind"):
        Task("hinge")
    with pytest.raises(ValueError, match="metric"):
        Task("ce", metrics=("top5",))
    with pytest.raises(ValueError, match="weight"):
        Task("ce", weight=-1.0)
