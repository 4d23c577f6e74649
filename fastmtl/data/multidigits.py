"""MultiDigits: small multi-task scenes built from scikit-learn's real handwritten digits (no download).

Each scene is a grey image (1 x S x S, S = 48 by default) holding 1-3 digits from ``sklearn.datasets.load_digits``
(8 x 8, 1797 digits), each scaled by a factor in [2, 4] and placed at a random position. A digit's depth is
``8 / scale`` (the larger it appears, the nearer it is: depths lie in [2, 4]); nearer digits are also brighter,
and the nearest is larger than the others by at least a quarter of the scale range. Nearer digits occlude farther
ones: a digit covers the pixels where its upsampled ink exceeds a threshold, plus a one-pixel background halo that
keeps its outline visible.

Tasks (``MultiDigits.TASKS``):

* ``cls``   - class of the nearest digit: int64 scalar, loss kind ``"ce"`` over 10 classes.
* ``seg``   - per-pixel class: int64 ``[S, S]``, 0 = background, 1 + digit elsewhere (11 classes, ``"ce"``).
* ``depth`` - per-pixel depth: float32 ``[1, S, S]`` on digit pixels, NaN on the background (``"l1"``).
* ``attr``  - which digits are visible in the scene: float32 ``[10]`` of 0/1 (``"bce"``).

Splits ``train`` / ``val`` / ``test`` use disjoint source digits (a fixed 60/20/20 partition of the 1797 digits),
so validation measures generalisation to unseen handwriting. Everything is deterministic for a given ``seed``.

``missing_labels`` hides labels: for each task, each sample independently loses its label with the given
probability; its mask is then False (its target is kept, but a masked loss and the metrics must ignore it).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

TASKS: dict[str, dict] = {
    "cls": {"kind": "ce", "num_outputs": 10, "dense": False},
    "seg": {"kind": "ce", "num_outputs": 11, "dense": True},
    "depth": {"kind": "l1", "num_outputs": 1, "dense": True},
    "attr": {"kind": "bce", "num_outputs": 10, "dense": False},
}
SPLITS = ("train", "val", "test")
DEFAULT_SIZES = {"train": 4000, "val": 1000, "test": 1000}
_SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
_PARTITION_SEED = 20261126  # fixed, so the splits' source digits never overlap whatever ``seed`` is
_INK_THRESHOLD = 0.25  # fraction of full ink above which an upsampled pixel belongs to the digit


def _source_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [n, 8, 8] float32 in [0, 1], labels [n]) of the source digits reserved for ``split``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(_PARTITION_SEED).permutation(len(digits.target))
    n_train = int(round(_SPLIT_FRACTIONS[0] * len(order)))
    n_val = int(round(_SPLIT_FRACTIONS[1] * len(order)))
    parts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    idx = np.sort(parts[split])
    return (digits.images[idx] / 16.0).astype(np.float32), digits.target[idx].astype(np.int64)


def _draw_scales(rng: np.random.Generator, count: int, scale) -> np.ndarray:
    """Scales of ``count`` digits; the nearest (largest) exceeds the others by a clear margin so "nearest" is
    well defined (at least a quarter of the scale range)."""
    gap = 0.25 * (scale[1] - scale[0])
    while True:
        scales = rng.uniform(scale[0], scale[1], count)
        if count == 1 or np.sort(scales)[-1] - np.sort(scales)[-2] >= gap:
            return scales


def _missing_fractions(missing_labels, tasks) -> dict[str, float]:
    if isinstance(missing_labels, dict):
        unknown = set(missing_labels) - set(tasks)
        if unknown:
            raise ValueError(f"missing_labels names unknown task(s) {sorted(unknown)}; tasks are {list(tasks)}")
        fractions = {t: missing_labels.get(t, 0.0) for t in tasks}
    elif isinstance(missing_labels, (int, float)) and not isinstance(missing_labels, bool):
        fractions = {t: float(missing_labels) for t in tasks}
    else:
        raise TypeError(f"missing_labels must be a float in [0, 1) or a dict task -> float, got {missing_labels!r}")
    for t, f in fractions.items():
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0.0 <= f < 1.0:
            raise ValueError(f"missing_labels for task {t!r} must be a fraction in [0, 1), got {f!r}")
    return {t: float(f) for t, f in fractions.items()}


class MultiDigits(torch.utils.data.Dataset):
    """Multi-task scenes of real handwritten digits (see the module docstring).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (disjoint source digits).
        size: number of scenes (default 4000 / 1000 / 1000 for train / val / test).
        image_size: side of the square image, >= 32 (default 48).
        digits: (min, max) digits per scene (default (1, 3)).
        scale: (min, max) upscaling factor of the 8 x 8 digits (default (2, 4)).
        tasks: the tasks to provide (default all of ``TASKS``).
        missing_labels: probability that a sample's label is missing, one float for every task or a dict
            task -> float (absent tasks: 0); values in [0, 1).
        seed: scenes and missing labels are a pure function of (split, seed, the arguments above).

    Items are dicts ``{"image": [1, S, S] float32, "targets": {task: tensor}, "masks": {task: bool scalar}}``;
    :meth:`batch` returns the same structure stacked over a list of indices (faster than a DataLoader here).
    """

    TASKS = TASKS

    def __init__(
        self,
        split: str = "train",
        size: int | None = None,
        *,
        image_size: int = 48,
        digits: tuple[int, int] = (1, 3),
        scale: tuple[float, float] = (2.0, 4.0),
        tasks=None,
        missing_labels=0.0,
        seed: int = 0,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        size = DEFAULT_SIZES[split] if size is None else size
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if not isinstance(image_size, int) or image_size < 32:
            raise ValueError(f"image_size must be an int >= 32, got {image_size!r}")
        lo, hi = digits
        if not 1 <= lo <= hi <= 5:
            raise ValueError(f"digits must be (min, max) with 1 <= min <= max <= 5, got {digits!r}")
        s_lo, s_hi = scale
        if not 1.0 <= s_lo <= s_hi or 8 * s_hi > image_size:
            raise ValueError(f"scale must be (min, max) with 1 <= min <= max <= image_size / 8, got {scale!r}")
        tasks = list(TASKS) if tasks is None else list(tasks)
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"tasks must be a non-empty subset of {list(TASKS)}, got {tasks!r}")

        self.split, self.size, self.image_size, self.seed = split, size, image_size, seed
        self.tasks = tasks
        self.missing_labels = _missing_fractions(missing_labels, tasks)
        split_seed = [seed, SPLITS.index(split)]
        self._render(np.random.default_rng(split_seed), digits, scale)
        self._draw_masks(np.random.default_rng(split_seed + [1]))

    # ---- construction ------------------------------------------------------------------------------------------

    def _render(self, rng: np.random.Generator, digits, scale) -> None:
        src_images, src_labels = _source_digits(self.split)
        src = torch.from_numpy(src_images)[:, None]
        n, size = self.size, self.image_size
        image = torch.zeros(n, 1, size, size)
        seg = torch.zeros(n, size, size, dtype=torch.uint8)
        depth = torch.full((n, 1, size, size), float("nan"))
        cls = torch.zeros(n, dtype=torch.int64)
        cache = {}

        def shapes(pick: int, side: int):
            # (upsampled digit, its ink, the one-pixel halo around the ink), cached: sides are whole pixels.
            if (pick, side) not in cache:
                patch = F.interpolate(src[pick : pick + 1], size=(side, side), mode="bilinear", align_corners=False)
                patch = patch[0, 0]
                ink = patch > _INK_THRESHOLD
                halo = F.max_pool2d(ink[None, None].float(), 3, stride=1, padding=1)[0, 0].bool() & ~ink
                cache[pick, side] = (patch, ink, halo)
            return cache[pick, side]

        for i in range(n):
            count = int(rng.integers(digits[0], digits[1] + 1))
            picks = rng.integers(0, len(src_labels), count)
            scales = _draw_scales(rng, count, scale)
            # Paint far to near, so nearer digits overwrite (occlude) farther ones.
            for k in np.argsort(scales):
                side = int(round(8 * scales[k]))
                patch, ink, halo = shapes(int(picks[k]), side)
                y, x = (int(v) for v in rng.integers(0, size - side + 1, 2))
                brightness = 0.6 + 0.4 * (scales[k] - scale[0]) / max(scale[1] - scale[0], 1e-6)
                region = (slice(y, y + side), slice(x, x + side))
                img, lab, dep = image[i, 0][region], seg[i][region], depth[i, 0][region]
                img[halo], lab[halo], dep[halo] = 0.0, 0, float("nan")
                img[ink] = patch[ink] * float(brightness)
                lab[ink] = 1 + int(src_labels[picks[k]])
                dep[ink] = 8.0 / float(scales[k])
            cls[i] = int(src_labels[picks[np.argmax(scales)]])
        noise = torch.from_numpy(rng.normal(0.0, 0.05, size=image.shape).astype(np.float32))
        self.images = (image + noise).clamp_(0.0, 1.0)
        attr = torch.zeros(n, 10)
        for c in range(10):
            attr[:, c] = (seg == c + 1).flatten(1).any(1).float()
        self._targets = {"cls": cls, "seg": seg, "depth": depth, "attr": attr}

    def _draw_masks(self, rng: np.random.Generator) -> None:
        self.masks = {}
        for t in TASKS:  # draw for every task in a fixed order, so a task's mask does not depend on the others
            keep = torch.from_numpy(rng.random(self.size) >= self.missing_labels.get(t, 0.0))
            if t in self.tasks:
                self.masks[t] = keep

    # ---- access ------------------------------------------------------------------------------------------------

    @property
    def kinds(self) -> dict[str, str]:
        """Loss kind of each provided task (``"ce"``, ``"l1"``, ``"bce"``)."""
        return {t: TASKS[t]["kind"] for t in self.tasks}

    @property
    def num_outputs(self) -> dict[str, int]:
        """Number of output channels a head needs for each provided task."""
        return {t: TASKS[t]["num_outputs"] for t in self.tasks}

    def __len__(self) -> int:
        return self.size

    def batch(self, index) -> dict:
        """The samples at ``index`` (an int64 tensor or a list of ints), stacked: same structure as an item."""
        index = torch.as_tensor(index, dtype=torch.int64)
        targets = {}
        for t in self.tasks:
            value = self._targets[t][index]
            targets[t] = value.long() if t == "seg" else value
        return {"image": self.images[index], "targets": targets, "masks": {t: self.masks[t][index] for t in self.tasks}}

    def __getitem__(self, i: int) -> dict:
        if not -self.size <= i < self.size:
            raise IndexError(f"index {i} out of range for MultiDigits of size {self.size}")
        item = self.batch(torch.tensor([i]))
        return {
            "image": item["image"][0],
            "targets": {t: v[0] for t, v in item["targets"].items()},
            "masks": {t: v[0] for t, v in item["masks"].items()},
        }

    def __repr__(self) -> str:
        return (f"MultiDigits(split={self.split!r}, size={self.size}, image_size={self.image_size}, "
                f"tasks={self.tasks}, missing_labels={self.missing_labels}, seed={self.seed})")
