"""MultiDigits: determinism, split disjointness, target consistency, missing labels, bad arguments."""

import numpy as np
import pytest
import torch

from fastmtl.data import MultiDigits
from fastmtl.data import multidigits as md


@pytest.fixture(scope="module")
def small():
    return MultiDigits("train", 64, missing_labels=0.3, seed=3)


def test_same_seed_same_scenes_other_seed_differs(small):
    again = MultiDigits("train", 64, missing_labels=0.3, seed=3)
    other = MultiDigits("train", 64, missing_labels=0.3, seed=4)
    assert torch.equal(small.images, again.images)
    for t in small.tasks:
        assert torch.equal(small.masks[t], again.masks[t])
        assert torch.equal(small._targets[t].nan_to_num(-1), again._targets[t].nan_to_num(-1))
    assert not torch.equal(small.images, other.images)


def test_splits_use_disjoint_source_digits():
    parts = {s: md._source_digits(s)[0].reshape(-1, 64) for s in md.SPLITS}
    assert sum(len(p) for p in parts.values()) == 1797
    keys = {s: {p.tobytes() for p in parts[s]} for s in parts}
    # load_digits has a few exact duplicate images; the partition is by index, so compare index sets too.
    from sklearn.datasets import load_digits

    order = np.random.default_rng(md._PARTITION_SEED).permutation(1797)
    assert len(set(order[:1078]) & set(order[1078:1437])) == 0
    assert len(keys["train"] & keys["val"]) <= 2 and len(keys["train"] & keys["test"]) <= 2
    assert len(load_digits().target) == 1797


def test_item_structure_and_types(small):
    item = small[0]
    assert item["image"].shape == (1, 48, 48) and item["image"].dtype == torch.float32
    assert item["targets"]["cls"].dtype == torch.int64 and item["targets"]["cls"].dim() == 0
    assert item["targets"]["seg"].shape == (48, 48) and item["targets"]["seg"].dtype == torch.int64
    assert item["targets"]["depth"].shape == (1, 48, 48)
    assert item["targets"]["attr"].shape == (10,)
    assert set(item["masks"]) == {"cls", "seg", "depth", "attr"}
    assert all(m.dtype == torch.bool for m in item["masks"].values())


def test_targets_agree_with_each_other(small):
    b = small.batch(torch.arange(len(small)))
    seg, depth, attr, cls = (b["targets"][t] for t in ("seg", "depth", "attr", "cls"))
    assert torch.equal(torch.isnan(depth[:, 0]), seg == 0)  # depth exactly on digit pixels
    d = depth[~torch.isnan(depth)]
    assert d.min() >= 2.0 - 1e-6 and d.max() <= 4.0 + 1e-6
    for i in range(len(small)):
        visible = set((seg[i].unique() - 1).tolist()) - {-1}
        assert visible == set(torch.nonzero(attr[i]).flatten().tolist())
        assert int(cls[i]) in visible  # the nearest digit is never hidden
        # the nearest digit is the one with the smallest depth
        nearest = depth[i, 0][seg[i] == int(cls[i]) + 1].min()
        assert torch.isclose(nearest, d.new_tensor(float(depth[i, 0].nan_to_num(99).min())))


def test_missing_label_fraction_and_dict(small):
    big = MultiDigits("val", 400, missing_labels={"seg": 0.5}, seed=0)
    assert big.masks["cls"].all() and big.masks["depth"].all()
    assert 0.4 < (~big.masks["seg"]).float().mean() < 0.6
    frac = torch.stack([(~m).float().mean() for m in small.masks.values()]).mean()
    assert 0.2 < frac < 0.4
    # masks do not change the scenes
    full = MultiDigits("train", 64, seed=3)
    assert torch.equal(full.images, small.images) and full.masks["cls"].all()


def test_task_subset():
    d = MultiDigits("test", 8, tasks=["seg"], seed=0)
    assert list(d.batch([0, 1])["targets"]) == ["seg"] and d.kinds == {"seg": "ce"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(split="dev"), "split"),
        (dict(size=0), "size"),
        (dict(missing_labels=1.0), "missing_labels"),
        (dict(missing_labels={"colour": 0.1}), "unknown task"),
        (dict(missing_labels="lots"), "missing_labels"),
        (dict(tasks=["cls", "normals"]), "tasks"),
        (dict(image_size=16), "image_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    kwargs = {"size": 4, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        MultiDigits(**kwargs)
