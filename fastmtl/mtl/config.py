"""TrainConfig: every setting of a training run (saved in ``metrics.json`` and in checkpoints)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from fastmtl.data.multidigits import TASKS as DATA_TASKS

MAX_SEED = 2**32 - 1  # NumPy's data generator rejects negative seeds; the batch order's seed must fit in 64 bits


@dataclass
class TrainConfig:
    """Settings of :class:`fastmtl.mtl.Trainer` and of ``fastmtl train`` (defaults: the ``make demo`` run).

    Data: ``tasks`` (MultiDigits task names), ``train_size`` / ``val_size`` scenes, ``image_size``,
    ``missing_labels`` (a fraction for every task, or a dict task -> fraction).
    Model: ``widths`` of the trunk's stages, ``stem_stride`` of its first conv, ``decoder_width`` of the dense heads,
    ``head_hidden`` width of the classification heads' hidden layer (0: linear).
    Optimisation: AdamW with ``lr`` / ``weight_decay``, linear warm-up (``warmup`` fraction) then cosine decay, ``grad_clip``
    (max gradient norm, 0 = off), ``epochs``, ``batch_size``; loss weighting ``weighting`` with
    ``weighting_options`` (``"fixed"`` defaults to each Task's weight; ``"ew"``: equal weights).
    Execution: ``device`` ("auto", "cpu", "cuda", "cuda:1"...), ``backend`` (a fastmtl backend or "auto"),
    ``amp`` (None, "bf16", "fp16"), ``channels_last``, ``compile``, ``num_threads`` (CPU threads, 0 = torch's
    default), ``seed``, ``progress`` (tqdm bars), ``out`` (directory for checkpoint.pt, metrics.json, curves.png).
    Diagnostics: ``affinity_every`` (0 = off): measure task affinity every that many steps (see
    :mod:`fastmtl.mtl.affinity_monitor`).
    """

    tasks: list = field(default_factory=lambda: ["cls", "seg"])
    train_size: int = 3000
    val_size: int = 1000
    image_size: int = 48
    missing_labels: object = 0.3
    widths: list = field(default_factory=lambda: [16, 24, 48])
    stem_stride: int = 2
    decoder_width: int = 32
    head_hidden: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup: float = 0.05
    grad_clip: float = 5.0
    epochs: int = 15
    batch_size: int = 32
    weighting: str = "fixed"
    weighting_options: dict = field(default_factory=dict)
    device: str = "auto"
    backend: str = "auto"
    amp: str | None = None
    channels_last: bool = False
    compile: bool = False
    num_threads: int = 0
    seed: int = 0
    progress: bool = True
    out: str | None = None
    affinity_every: int = 0

    def validate(self) -> "TrainConfig":
        """Check every field; raise ValueError naming the field and what was expected. Returns self."""
        tasks = list(self.tasks)
        if not tasks or any(t not in DATA_TASKS for t in tasks) or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must be distinct names from {list(DATA_TASKS)}, got {self.tasks!r}")
        for name in ("train_size", "val_size", "epochs", "batch_size", "image_size", "decoder_width", "stem_stride"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if not self.widths or any(not isinstance(w, int) or w < 1 for w in self.widths):
            raise ValueError(f"widths must be a non-empty list of positive ints, got {self.widths!r}")
        for name in ("lr", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0 or (name == "lr" and v == 0):
                raise ValueError(f"{name} must be a number >= 0 (lr > 0), got {v!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup!r}")
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {self.amp!r}")
        if not isinstance(self.head_hidden, int) or self.head_hidden < 0:
            raise ValueError(f"head_hidden must be an int >= 0, got {self.head_hidden!r}")
        if not isinstance(self.weighting_options, dict) or not all(isinstance(k, str) for k in self.weighting_options):
            raise ValueError(f"weighting_options must be a dict of option name -> value, got {self.weighting_options!r}")
        if not isinstance(self.affinity_every, int) or isinstance(self.affinity_every, bool) or self.affinity_every < 0:
            raise ValueError(f"affinity_every must be an int >= 0 (0 = off), got {self.affinity_every!r}")
        if not isinstance(self.num_threads, int) or self.num_threads < 0:
            raise ValueError(f"num_threads must be an int >= 0, got {self.num_threads!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an int in [0, {MAX_SEED}], got {self.seed!r}")
        from fastmtl.data.multidigits import _missing_fractions

        _missing_fractions(self.missing_labels, tasks)
        return self

    def to_dict(self) -> dict:
        """A JSON-serialisable copy."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """Rebuild from :meth:`to_dict` output (unknown keys are an error)."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {sorted(unknown)}")
        return cls(**data)
