"""Trainer: fit / evaluate a :class:`MultiTaskModel` with the fused masked multi-task loss.

One training step: forward (``encode`` then ``decode``, under autocast when ``amp`` is set) ->
``fastmtl.masked_multitask_loss`` (per-task losses over labelled samples only) -> ``weighting.backward`` (the
weighting strategy runs the backward pass: the Trainer never calls ``loss.backward`` itself) -> unscale (fp16),
gradient clipping, optimizer and scheduler steps.

Each epoch ends with an evaluation on the validation set, an atomic checkpoint (``checkpoint.pt``), ``metrics.json``
and ``curves.png`` in ``config.out``. A run resumed from a checkpoint continues exactly as the uninterrupted run:
the batch order of epoch ``e`` is a pure function of ``(seed, e)``, and model, optimizer, scheduler, grad scaler,
weighting state and every RNG are restored.

Under ``torchrun`` (a ``torch.distributed`` process group is initialised before the Trainer is built, see
:mod:`fastmtl.mtl.distributed`) each process trains on its share of every batch and the step is the one a single
process would take on the whole batch: losses over the global batch, the weighting's Gramian or per-task gradients
reduced before its solve, parameter gradients averaged, validation metrics summed over the processes. Only rank 0
logs and writes files; ``metrics.json`` records ``world_size``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time

import torch

import fastmtl
from fastmtl.mtl import checkpoint as ckpt
from fastmtl.mtl import distributed
from fastmtl.mtl.affinity_monitor import AffinityMonitor
from fastmtl.mtl.config import TrainConfig
from fastmtl.mtl.metrics import MultiTaskMeter
from fastmtl.mtl.model import MultiTaskModel
from fastmtl.mtl.tasks import Task
from fastmtl.reference.masked_loss import valid_elements

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
CURVES = "curves.png"


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> the current CUDA device if one is visible, else the CPU; anything else as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but no CUDA device is visible")
    return device


def _fetch(data, index: torch.Tensor) -> dict:
    """A batch of ``data`` (its ``batch(index)`` when it has one, else its items stacked)."""
    if hasattr(data, "batch"):
        return data.batch(index)
    return torch.utils.data.default_collate([data[int(i)] for i in index])


def _to(batch: dict, device: torch.device, channels_last: bool) -> dict:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return {
        "image": batch["image"].to(device, non_blocking=True).contiguous(memory_format=fmt),
        "targets": {t: v.to(device, non_blocking=True) for t, v in batch["targets"].items()},
        "masks": {t: v.to(device, non_blocking=True) for t, v in batch["masks"].items()},
    }


class Trainer:
    """Train and evaluate a multi-task model.

    Args:
        model: the :class:`MultiTaskModel`; its heads' names must match ``tasks``.
        tasks: task name -> :class:`Task` (loss kind, metrics, fixed weight).
        train_data, val_data: datasets with ``__len__`` and ``batch(index)`` (like MultiDigits) or items as dicts
            ``{"image", "targets", "masks"}``.
        config: a :class:`TrainConfig` (``out=None`` writes nothing).
        weighting: a Weighting object; default ``weighting.create(config.weighting, task names, **options)``.

    ``world_size`` and ``rank`` are read from the ``torch.distributed`` process group (1 and 0 without one).
    """

    def __init__(self, model: MultiTaskModel, tasks: dict[str, Task], train_data, val_data, config: TrainConfig,
                 weighting=None):
        self.config = config.validate()
        if set(model.heads) != set(tasks):
            raise ValueError(f"model heads {sorted(model.heads)} and tasks {sorted(tasks)} must name the same tasks")
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device)
        self.world_size, self.rank = distributed.world_size(), distributed.rank()
        if len(val_data) < self.world_size:
            raise ValueError(f"the validation set ({len(val_data)} samples) needs at least one sample per process "
                             f"({self.world_size} processes)")
        self.tasks = tasks
        self.kinds = {t: task.kind for t, task in tasks.items()}
        self.train_data, self.val_data = train_data, val_data
        self.model = model.to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.weighting = weighting if weighting is not None else self._create_weighting()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if isinstance(self.weighting, torch.nn.Module):  # learnable weights and buffers live with the model
            self.weighting.to(self.device)
        extra = [p for p in self.weighting.parameters() if p.requires_grad]
        if self.world_size > 1:
            self._join_process_group()
        self.optimizer = torch.optim.AdamW(
            [{"params": params}, {"params": extra, "weight_decay": 0.0}] if extra else params,
            lr=config.lr, weight_decay=config.weight_decay,
        )
        self.steps_per_epoch = math.ceil(len(train_data) / (config.batch_size * self.world_size))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self.affinity = AffinityMonitor(list(tasks), config.affinity_every) if config.affinity_every else None
        self._encode, self._decode = self.model.encode, self.model.decode
        if config.compile:
            self._encode, self._decode = torch.compile(self._encode), torch.compile(self._decode)
        self.epoch = 0  # completed epochs
        self.history: list[dict] = []

    # ---- set-up helpers ----------------------------------------------------------------------------------------

    def _create_weighting(self):
        from fastmtl.mtl import weighting

        options = dict(self.config.weighting_options)
        if self.config.weighting == "fixed" and "weights" not in options:
            options["weights"] = {t: task.weight for t, task in self.tasks.items()}
        return weighting.create(self.config.weighting, list(self.tasks), **options)

    def _join_process_group(self) -> None:
        """Start every rank from rank 0's model and weighting; make gradient-level weighting reduce its inputs."""
        distributed.broadcast_module(self.model)
        if isinstance(self.weighting, torch.nn.Module):
            distributed.broadcast_module(self.weighting)
        if getattr(self.weighting, "family", None) == "gradient":
            if self.weighting.mode == "representation":
                self.weighting.reduce_gram = distributed.gram_reducer(self.world_size)
            else:
                self.weighting.reduce_grads = distributed.grads_reducer(self.world_size)

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up over ``warmup`` of the run, then cosine decay to 1% of the peak. Reads ``config.epochs``
        live, so a run resumed with more epochs stretches the remaining schedule."""
        total = max(1, self.config.epochs * self.steps_per_epoch)
        warm = max(1, int(self.config.warmup * total))
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress))

    @property
    def is_main(self) -> bool:
        """Whether this process logs and writes files."""
        return self.rank == 0

    def _autocast(self):
        if self.config.amp is None:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _backend(self):
        if self.config.backend == "auto":
            return contextlib.nullcontext()
        return fastmtl.use_backend(self.config.backend)

    def _epoch_indices(self, epoch: int) -> torch.Tensor:
        """This process's sample order for ``epoch``: a pure function of (seed, epoch), so resuming is exact.

        With ``W`` processes, process ``r`` takes every ``W``-th sample from ``r``, so step ``s`` of all of them
        together covers the samples a single process with ``W`` times the batch would; the order is padded with
        its first samples to a multiple of ``W`` so every process takes the same number of steps.
        """
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.train_data), generator=g)
        pad = -len(order) % self.world_size
        if pad:
            order = torch.cat([order, order[:pad]])
        return order[self.rank :: self.world_size]

    # ---- one step ----------------------------------------------------------------------------------------------

    def _losses(self, preds: dict, batch: dict) -> dict[str, torch.Tensor]:
        _, per_task = fastmtl.masked_multitask_loss(preds, batch["targets"], self.kinds, masks=batch["masks"])
        return per_task

    def train_step(self, batch: dict) -> tuple[dict, dict, dict]:
        """One optimisation step; returns (per-task losses, weights used, labelled-sample counts) as tensors, all of
        the global batch when distributed."""
        self.model.train()
        step = self.scheduler.last_epoch  # optimisation steps taken so far in the run
        if self.affinity is not None:
            self.affinity.before_step(step, self.model, batch, self._lookahead_losses,
                                      self.model.shared_parameters(), self.scheduler.get_last_lr()[0])
        with self._autocast():
            features = self._encode(batch["image"])
            head_inputs = self._cut(features)
            preds = self._decode(head_inputs, out_size=tuple(batch["image"].shape[-2:]))
        losses = self._losses(preds, batch)
        counts = {t: m.sum() for t, m in batch["masks"].items()}
        if self.world_size > 1:  # the global batch's losses and counts, identical on every process
            elements = {t: valid_elements(batch["targets"][t], batch["masks"][t], self.kinds[t], p.shape[1]).sum()
                        for t, p in preds.items()}
            losses, counts = distributed.global_losses(losses, elements, counts, list(self.tasks))
        if self.affinity is not None:
            self.affinity.before_backward(step, losses, features, self.weighting)
        self.optimizer.zero_grad(set_to_none=True)
        # fp16: the strategy sees the unscaled losses (UW, FAMO, GradNorm read their values) and scales the
        # gradients itself through loss_scale, so nothing underflows and the weights are not skewed by the scale.
        loss_scale = self.scaler.scale(torch.ones((), device=self.device)) if self.scaler.is_enabled() else None
        weights = self.weighting.backward(
            losses, features=head_inputs, shared_params=self.model.shared_parameters(), counts=counts,
            loss_scale=loss_scale,
        )
        if head_inputs is not features:  # the trunk, once, with the combined gradient of its outputs
            pairs = [(f, h.grad) for f, h in zip(features, head_inputs) if f.requires_grad and h.grad is not None]
            if pairs:
                torch.autograd.backward([f for f, _ in pairs], grad_tensors=[g for _, g in pairs])
        if self.affinity is not None:
            self.affinity.after_backward(self.weighting)
        if self.world_size > 1:
            distributed.average_gradients([*self.model.parameters(), *self.weighting.parameters()])
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return {t: l.detach() for t, l in losses.items()}, weights, counts

    def _cut(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The heads' inputs: detached leaves for a gradient-level strategy in representation mode, else
        ``features`` itself.

        The heads of a multi-scale trunk read features computed from one another (stem -> stage 1 -> stage 2);
        a task's gradient w.r.t. the shallow ones would then run back through the whole trunk, once per task. On
        leaves, the per-task gradients stop at the representation (partial derivatives w.r.t. each feature), and
        :meth:`train_step` back-propagates their combination through the trunk once.
        """
        w = self.weighting
        if getattr(w, "family", None) != "gradient" or getattr(w, "mode", None) != "representation":
            return features
        return [f.detach().requires_grad_(f.requires_grad) for f in features]

    def _lookahead_losses(self, model, batch: dict) -> dict[str, torch.Tensor]:
        with self._autocast():
            preds = model(batch["image"])
        return self._losses(preds, batch)

    # ---- epochs ------------------------------------------------------------------------------------------------

    def train_epoch(self, epoch: int) -> tuple[dict[str, float], dict[str, float]]:
        """Train one epoch; returns (mean loss per task over labelled samples, mean weight per task)."""
        order = self._epoch_indices(epoch)
        bs = self.config.batch_size
        names = list(self.tasks)
        loss_sum = torch.zeros(len(names), dtype=torch.float64, device=self.device)
        count_sum = torch.zeros(len(names), dtype=torch.float64, device=self.device)
        weight_sum = torch.zeros(len(names), dtype=torch.float64, device=self.device)
        bar = self._progress(range(0, len(order), bs), desc=f"epoch {epoch + 1}/{self.config.epochs}")
        for step, start in enumerate(bar):
            batch = _to(_fetch(self.train_data, order[start : start + bs]), self.device, self.config.channels_last)
            losses, weights, counts = self.train_step(batch)
            n = torch.stack([counts[t] for t in names]).double()
            loss_sum += torch.stack([losses[t] for t in names]).double() * n
            count_sum += n
            weight_sum += torch.stack([torch.as_tensor(weights[t], device=self.device).detach() for t in names]).double()
            if hasattr(bar, "set_postfix") and (step % 10 == 0 or start + bs >= len(order)):
                running = (loss_sum / count_sum.clamp_min(1)).tolist()
                bar.set_postfix({t: f"{v:.3f}" for t, v in zip(names, running)})
        steps = max(1, math.ceil(len(order) / bs))
        mean_loss = (loss_sum / count_sum.clamp_min(1)).tolist()
        mean_weight = (weight_sum / steps).tolist()
        return dict(zip(names, mean_loss)), dict(zip(names, mean_weight))

    @torch.no_grad()
    def evaluate(self, data=None) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """(mean loss per task, metrics ``{task: {metric: value}}``) on ``data`` (default: the validation set)."""
        data = self.val_data if data is None else data
        self.model.eval()
        meter = MultiTaskMeter(self.tasks)
        names = list(self.tasks)
        loss_sum = torch.zeros(len(names), dtype=torch.float64, device=self.device)
        count_sum = torch.zeros(len(names), dtype=torch.float64, device=self.device)
        bs = self.config.batch_size * 2
        share = torch.arange(len(data))[self.rank :: self.world_size]
        with self._backend():
            for start in range(0, len(share), bs):
                index = share[start : start + bs]
                batch = _to(_fetch(data, index), self.device, self.config.channels_last)
                with self._autocast():
                    preds = self._decode(self._encode(batch["image"]), out_size=tuple(batch["image"].shape[-2:]))
                preds = {t: p.float() for t, p in preds.items()}
                losses = self._losses(preds, batch)
                n = torch.stack([batch["masks"][t].sum() for t in names]).double()
                loss_sum += torch.stack([losses[t].detach() for t in names]).double() * n
                count_sum += n
                meter.update(preds, batch["targets"], batch["masks"])
        if self.world_size > 1:
            meter.reduce_(distributed.all_reduce_sum)
            distributed.all_reduce_sum(loss_sum)
            distributed.all_reduce_sum(count_sum)
        mean_loss = (loss_sum / count_sum.clamp_min(1)).tolist()
        return dict(zip(names, mean_loss)), meter.compute()

    def fit(self, resume: str | None = None, stop_after: int | None = None) -> dict:
        """Train up to ``config.epochs`` (or stop once ``stop_after`` epochs are complete, as an interrupted run
        would); with ``resume``, first restore a checkpoint (a file, or a directory holding checkpoint.pt).
        Returns the content of ``metrics.json``."""
        if resume is not None:
            self.load_checkpoint(resume)
        last = self.config.epochs if stop_after is None else min(stop_after, self.config.epochs)
        with self._backend():
            while self.epoch < last:
                start = time.perf_counter()
                train_loss, weights = self.train_epoch(self.epoch)
                self.weighting.epoch_end(train_loss)
                val_loss, val_metrics = self.evaluate()
                self.epoch += 1
                self.history.append({
                    "epoch": self.epoch, "lr": self.scheduler.get_last_lr()[0], "train_loss": train_loss,
                    "val_loss": val_loss, "val": val_metrics, "weights": weights,
                    "time_s": time.perf_counter() - start,
                })
                if self.affinity is not None:
                    self.history[-1]["affinity"] = self.affinity.as_dict()
                self._log_epoch(self.history[-1])
                self._write_outputs()
        return self.summary()

    # ---- outputs -----------------------------------------------------------------------------------------------

    def summary(self) -> dict:
        """The ``metrics.json`` content: config, world_size, history and the final validation metrics."""
        return {
            "config": self.config.to_dict(),
            "world_size": self.world_size,
            "history": self.history,
            "final": self.history[-1]["val"] if self.history else {},
            **({"affinity": self.affinity.as_dict()} if self.affinity is not None else {}),
        }

    def _progress(self, iterable, desc: str):
        if not (self.config.progress and self.is_main):
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)

    def _log_epoch(self, entry: dict) -> None:
        if not (self.config.progress and self.is_main):
            return
        parts = [f"epoch {entry['epoch']}/{self.config.epochs} ({entry['time_s']:.1f}s)"]
        for t in self.tasks:
            metrics = " ".join(f"{m}={v:.4f}" for m, v in entry["val"][t].items())
            parts.append(f"{t}: loss {entry['train_loss'][t]:.4f}/{entry['val_loss'][t]:.4f} {metrics}")
        print(" | ".join(parts), flush=True)

    def _write_outputs(self) -> None:
        out = self.config.out
        if out is None or not self.is_main:
            return
        os.makedirs(out, exist_ok=True)
        ckpt.save_atomic(self.state_dict(), os.path.join(out, CHECKPOINT))
        tmp = os.path.join(out, METRICS + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.summary(), f, indent=2)
        os.replace(tmp, os.path.join(out, METRICS))
        from fastmtl.mtl.plots import plot_curves

        plot_curves(self.history, os.path.join(out, CURVES))
        if self.affinity is not None:
            self.affinity.plot(out)

    # ---- checkpoints -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a resumed run needs."""
        return {
            "epoch": self.epoch,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "weighting": self.weighting.state_dict(),
            "history": self.history,
            "rng": ckpt.rng_state(),
            **({"affinity": self.affinity.state_dict()} if self.affinity is not None else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.weighting.load_state_dict(state["weighting"])
        self.history = list(state["history"])
        self.epoch = int(state["epoch"])
        if self.affinity is not None and "affinity" in state:
            self.affinity.load_state_dict(state["affinity"])
        ckpt.set_rng_state(state["rng"])

    def load_checkpoint(self, path: str) -> None:
        """Restore a checkpoint file, or ``checkpoint.pt`` inside a directory."""
        if os.path.isdir(path):
            path = os.path.join(path, CHECKPOINT)
        self.load_state_dict(ckpt.load(path))
