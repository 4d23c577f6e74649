"""Metrics against direct numpy computations; unlabelled samples never count; Δm sign convention."""

import math

import numpy as np
import pytest
import torch

from fastmtl.mtl import Task, metrics


def _miou_numpy(target, pred, n):
    ious = []
    for c in range(n):
        inter = np.sum((target == c) & (pred == c))
        union = np.sum((target == c) | (pred == c))
        if union:
            ious.append(inter / union)
    return float(np.mean(ious))


def test_confusion_matrix_matches_numpy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, 7, 9, generator=g)
    target = torch.randint(0, 5, (6, 7, 9), generator=g)
    target[0, 0, :3] = -100  # ignored elements
    mask = torch.tensor([True, True, False, True, True, False])
    m = metrics.ConfusionMatrix(5)
    m.update(logits[:3], target[:3], mask[:3])
    m.update(logits[3:], target[3:], mask[3:])
    out = m.compute()
    t = target[mask].numpy().ravel()
    p = logits[mask].argmax(1).numpy().ravel()
    keep = t != -100
    t, p = t[keep], p[keep]
    assert out["pixel_acc"] == pytest.approx(np.mean(t == p), abs=1e-12)
    assert out["miou"] == pytest.approx(_miou_numpy(t, p, 5), abs=1e-12)


def test_accuracy_per_sample():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 5.0]])
    target = torch.tensor([0, 0, 1, 1])
    m = metrics.ConfusionMatrix(2)
    m.update(logits, target, torch.tensor([True, True, False, True]))
    assert m.compute()["accuracy"] == pytest.approx(2 / 3)


def test_regression_error_matches_numpy():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(4, 1, 5, 5, generator=g)
    target = torch.rand(4, 1, 5, 5, generator=g) + 0.5
    target[target < 0.7] = float("nan")
    mask = torch.tensor([True, False, True, True])
    m = metrics.RegressionError()
    m.update(pred, target, mask)
    p, t = pred[mask].numpy(), target[mask].numpy()
    v = ~np.isnan(t)
    out = m.compute()
    assert out["abs_err"] == pytest.approx(np.mean(np.abs(p[v] - t[v])), rel=1e-9)
    assert out["rel_err"] == pytest.approx(np.mean(np.abs(p[v] - t[v]) / np.abs(t[v])), rel=1e-9)


def test_multilabel_f1_matches_sklearn():
    from sklearn.metrics import f1_score

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(12, 10, generator=g)
    target = (torch.rand(12, 10, generator=g) > 0.7).float()
    mask = torch.rand(12, generator=g) > 0.3
    m = metrics.MultiLabelF1()
    m.update(logits[:5], target[:5], mask[:5])
    m.update(logits[5:], target[5:], mask[5:])
    expected = f1_score(target[mask].numpy(), (logits[mask] > 0).numpy(), average="micro")
    assert m.compute()["f1"] == pytest.approx(expected, abs=1e-12)


def test_unlabelled_samples_never_count():
    """Changing the targets or predictions of unlabelled samples leaves every metric unchanged."""
    g = torch.Generator().manual_seed(3)
    tasks = {"c": Task("ce"), "s": Task("ce", dense=True, num_classes=4), "d": Task("l1"), "a": Task("bce")}
    preds = {"c": torch.randn(8, 3, generator=g), "s": torch.randn(8, 4, 6, 6, generator=g),
             "d": torch.randn(8, 1, 6, 6, generator=g), "a": torch.randn(8, 5, generator=g)}
    targets = {"c": torch.randint(0, 3, (8,), generator=g), "s": torch.randint(0, 4, (8, 6, 6), generator=g),
               "d": torch.rand(8, 1, 6, 6, generator=g) + 1, "a": (torch.rand(8, 5, generator=g) > 0.5).float()}
    masks = {t: torch.rand(8, generator=g) > 0.4 for t in tasks}
    a = metrics.MultiTaskMeter(tasks)
    a.update(preds, targets, masks)
    preds2 = {t: p.clone() for t, p in preds.items()}
    targets2 = {t: v.clone() for t, v in targets.items()}
    for t in tasks:
        off = ~masks[t]
        preds2[t][off] = torch.randn_like(preds2[t][off]) * 10
        targets2[t][off] = targets2[t][off].flip(0) if targets2[t].dtype == torch.int64 else 7.0
    b = metrics.MultiTaskMeter(tasks)
    b.update(preds2, targets2, masks)
    assert a.compute() == b.compute()
    assert set(a.compute()["s"]) == {"miou", "pixel_acc"} and set(a.compute()["d"]) == {"abs_err", "rel_err"}


def test_nothing_labelled_gives_nan():
    m = metrics.ConfusionMatrix(3)
    m.update(torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([False, False]))
    assert math.isnan(m.compute()["accuracy"])


def test_delta_m_sign_convention():
    base = {"seg": {"miou": 0.5}, "depth": {"abs_err": 0.2}}
    better = {"seg": {"miou": 0.55}, "depth": {"abs_err": 0.18}}  # +10% and 10% lower error
    assert metrics.delta_m(better, base) == pytest.approx(10.0)
    worse = {"seg": {"miou": 0.45}, "depth": {"abs_err": 0.22}}
    assert metrics.delta_m(worse, base) == pytest.approx(-10.0)
    with pytest.raises(ValueError, match="zero"):
        metrics.delta_m(better, {"seg": {"miou": 0.0}})
