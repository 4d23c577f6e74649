"""The interface every task-weighting strategy implements, and the registry behind ``weighting.create``.

Two families share one call, ``backward(losses, features=..., shared_params=..., counts=...)``:

* loss-level strategies (:class:`LossWeighting`) form ``total = sum_t w_t L_t`` (plus any regulariser of their
  own) and back-propagate it once;
* gradient-level strategies (:class:`GradientWeighting`) take each task's gradient with respect to the shared
  representation (or the shared parameters), combine the ``[K, P]`` gradients on the device, and back-propagate
  the combination through the trunk once (see :mod:`fastmtl.mtl.weighting._autograd`).

Strategies are ``nn.Module`` objects: learned weights are parameters (give ``weighting.parameters()`` to the
optimizer), running state lives in buffers or in the extra state, so ``state_dict()`` / ``load_state_dict()`` and
``.to(device)`` work as for any module. Move a weighting to the training device before building the optimizer.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fastmtl.mtl.weighting import _autograd

_REGISTRY: dict[str, type["Weighting"]] = {}


def register(name: str):
    """Class decorator: make a strategy available to ``weighting.create(name, ...)`` under ``name``."""

    def decorate(cls):
        if name in _REGISTRY:
            raise RuntimeError(f"weighting {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def registry() -> dict[str, type["Weighting"]]:
    """The registered strategy classes by name (a copy)."""
    return dict(_REGISTRY)


class Weighting(nn.Module):
    """Base class of every strategy: task names, loss checking, and the ``backward`` contract.

    Args:
        task_names: the tasks, in the order used by every ``[K]`` tensor of the strategy.
    """

    name = "?"
    family = "loss"

    def __init__(self, task_names: Sequence[str]):
        super().__init__()
        if isinstance(task_names, str):
            raise TypeError("task_names must be a sequence of task names, not a single string")
        names = tuple(task_names)
        if not names:
            raise ValueError("task_names must name at least one task")
        if not all(isinstance(n, str) for n in names):
            raise TypeError(f"task_names must be strings, got {names!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"task_names contain a duplicate: {names!r}")
        self.task_names = names

    @property
    def num_tasks(self) -> int:
        """K, the number of tasks."""
        return len(self.task_names)

    def backward(
        self,
        losses: Mapping[str, torch.Tensor],
        *,
        features: Sequence[torch.Tensor] | None = None,
        shared_params: Sequence[torch.Tensor] | None = None,
        counts: Mapping[str, torch.Tensor] | None = None,
        loss_scale: torch.Tensor | float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the whole backward pass for one step and return the task weights used (0-dim, detached).

        Args:
            losses: per-task 0-dim losses keyed by task name, each carrying its own autograd graph. Pass them
                unscaled, also with fp16 loss scaling (see ``loss_scale``).
            features: the shared representation the heads consume (gradient-level strategies).
            shared_params: the trunk's parameters (parameter mode of gradient-level strategies).
            counts: labelled samples per task in the batch (data-size weighting).
            loss_scale: fp16 loss scaling: every gradient written (the strategy's own parameters' included) is
                multiplied by it, while the weights are computed from the unscaled losses (UW's ``+ s`` term,
                FAMO's and GradNorm's loss ratios would be wrong on scaled losses). With a GradScaler, pass
                ``scaler.scale(torch.ones((), device=device))`` (a device tensor: no host synchronisation) and
                unscale the optimizer as usual.
        """
        raise NotImplementedError

    def epoch_end(self, epoch_mean_losses: Mapping[str, float]) -> None:
        """Tell the strategy an epoch ended, with each task's mean training loss (used by DWA; others ignore it)."""

    def extra_repr(self) -> str:
        return f"tasks={list(self.task_names)}"

    # helpers for subclasses -------------------------------------------------------------------------------

    def _loss_vector(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Check ``losses`` names exactly the tasks and hold 0-dim tensors; stack them into ``[K]``."""
        if not isinstance(losses, Mapping):
            raise TypeError(f"losses must be a dict of task name -> 0-dim tensor, got {type(losses).__name__}")
        if set(losses) != set(self.task_names):
            raise ValueError(
                f"losses must have exactly the tasks {list(self.task_names)}, got {sorted(losses)}"
            )
        for name in self.task_names:
            loss = losses[name]
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError(f"losses[{name!r}] must be a 0-dim tensor, got {_describe(loss)}")
        vec = torch.stack([losses[n].float() if losses[n].dtype in _LOW else losses[n] for n in self.task_names])
        self._check_device(vec.device)
        return vec

    def _count_vector(self, counts: Mapping[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """Check ``counts`` names exactly the tasks; stack them into a ``[K]`` tensor shaped like ``like``."""
        if not isinstance(counts, Mapping) or set(counts) != set(self.task_names):
            got = sorted(counts) if isinstance(counts, Mapping) else type(counts).__name__
            raise ValueError(f"counts must be a dict with exactly the tasks {list(self.task_names)}, got {got}")
        return torch.stack(
            [torch.as_tensor(counts[n], device=like.device).reshape(()).to(like.dtype) for n in self.task_names]
        )

    def _weights_dict(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        weights = weights.detach()
        return {name: weights[i] for i, name in enumerate(self.task_names)}

    def _check_device(self, device: torch.device) -> None:
        for tensor in list(self.parameters()) + list(self.buffers()):
            if tensor.device != device:
                raise RuntimeError(
                    f"weighting {self.name!r} lives on {tensor.device} but the losses are on {device}: "
                    f"call .to({str(device)!r}) on the weighting before building the optimizer"
                )
            return


_LOW = (torch.float16, torch.bfloat16)


def active_tasks(
    gram: torch.Tensor, counts: torch.Tensor | None = None, precision: float | None = None
) -> torch.Tensor:
    """``[K]`` bool: the tasks with labels (``counts > 0``, when given) and a gradient that is not ~zero.

    A gradient counts as zero when its squared norm is below ``precision^2`` times the largest one: below the
    rounding of the Gramian, where a solve would only amplify noise (or divide by zero).
    """
    if precision is None:
        precision = torch.finfo(gram.dtype).eps
    diagonal = gram.diagonal()
    floor = (diagonal.amax() * precision**2).clamp_min(torch.finfo(gram.dtype).tiny)
    active = diagonal > floor
    if counts is not None:
        active = active & (counts.to(gram.device) > 0)
    return active


@functools.lru_cache(maxsize=None)
def _keywords(method) -> frozenset[str] | None:
    """The keyword arguments ``method`` accepts (None: any), so that a subclass written against the older
    ``compute_weights(gram, losses)`` keeps working (its inactive tasks' coefficients are still zeroed)."""
    parameters = inspect.signature(method).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(p.name for p in parameters)


def _gram_precision(grads: torch.Tensor, work: torch.Tensor) -> float:
    """Relative rounding noise of ``work @ work.T``'s eigenvalues near zero (relative to the largest one).

    Two terms: ``eps_g^2`` from the gradients' rounding to their dtype (an eigenvalue of the Gramian is a squared
    singular value of the gradients, and a relative perturbation ``eps_g`` of them lifts a zero one to at most
    ``eps_g^2`` times the trace), plus ``eps_w sqrt(P)`` from the rounding of the P-term dot products in
    ``work``'s dtype (a perturbation of the Gramian's entries themselves, ``sqrt(P)`` for random rounding errors).
    """
    return torch.finfo(grads.dtype).eps ** 2 + torch.finfo(work.dtype).eps * max(work.shape[1], 1) ** 0.5


def masked_gram(gram: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
    """``gram`` with the rows and columns of inactive tasks zeroed (``active`` None: unchanged)."""
    if active is None:
        return gram
    keep = active.to(gram.dtype)
    return gram * keep[:, None] * keep[None, :]


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _as_bool(value, name: str) -> bool:
    """A bool option that may arrive as a string from the command line ("true"/"false"/"1"/"0")."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return bool(value)


class LossWeighting(Weighting):
    """A strategy that weights the losses: ``total_loss`` builds the scalar, ``backward`` back-propagates it."""

    family = "loss"

    def total_loss(
        self, losses: torch.Tensor, counts: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(total, weights)`` for the ``[K]`` loss vector (and ``[K]`` labelled counts, if given)."""
        raise NotImplementedError

    def backward(self, losses, *, features=None, shared_params=None, counts=None, loss_scale=None):
        """Back-propagate the weighted total once; return the weights (see :meth:`Weighting.backward`)."""
        vec = self._loss_vector(losses)
        count_vec = None if counts is None else self._count_vector(counts, vec)
        total, weights = self.total_loss(vec, count_vec)
        if loss_scale is not None:
            total = total * loss_scale
        total.backward()
        return self._weights_dict(weights)


class GradientWeighting(Weighting):
    """A strategy that combines per-task gradients: ``[K, P]`` in, one ``[P]`` direction out.

    Every gradient-level method here combines the gradients linearly, ``d = sum_t w_t g_t``, with coefficients
    ``w`` computed from the ``K x K`` Gramian (``compute_weights``), so the solve costs nothing next to the
    backward pass and never leaves the device.

    Args:
        task_names: the tasks.
        mode: ``"representation"`` (default): gradients w.r.t. the shared representation ``features``; the trunk
            is back-propagated once with the combined gradient (for MGDA this is MGDA-UB). ``"params"``: gradients
            w.r.t. ``shared_params`` (one trunk backward per task), the combination written into their ``.grad``.
        scale_heads: whether each head's parameter gradient is multiplied by its task's weight (as if
            ``sum_t w_t L_t`` had been back-propagated) or left as its own task's plain gradient.

    Attributes ``reduce_gram`` and ``reduce_grads`` (None by default) are set by the distributed Trainer: they map
    this process's Gramian (representation mode) or ``[K, P]`` gradients (parameter mode) to those of the global
    batch (see :mod:`fastmtl.mtl.distributed`), so that every process solves for the same weights.
    """

    family = "gradient"
    default_scale_heads = False
    needs_losses = False  # True where compute_weights uses the losses (GradNorm)

    def __init__(self, task_names, *, mode: str = "representation", scale_heads: bool | None = None):
        super().__init__(task_names)
        if mode not in ("representation", "params"):
            raise ValueError(f"mode must be 'representation' or 'params', got {mode!r}")
        self.mode = mode
        self.scale_heads = self.default_scale_heads if scale_heads is None else _as_bool(scale_heads, "scale_heads")
        self.last_gram: torch.Tensor | None = None
        self.reduce_gram = None
        self.reduce_grads = None

    def compute_weights(
        self,
        gram: torch.Tensor,
        losses: torch.Tensor | None,
        active: torch.Tensor | None = None,
        precision: float | None = None,
        loss_scale: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """Return the ``[K]`` combination coefficients from the ``K x K`` Gramian (and the detached losses).

        Args:
            gram: the Gramian of the unscaled gradients (float64).
            losses: the detached ``[K]`` losses, or None.
            active: ``[K]`` bool, the tasks with labels and a nonzero gradient (None: all); the solve is made from
                these only, and the others' coefficients are zeroed by the caller.
            precision: the rounding noise of ``gram``'s near-zero eigenvalues relative to its largest: the
                gradients' rounding (the square of their dtype's epsilon) plus that of the Gramian's dot products
                (None: the epsilon of ``gram``'s dtype). Below it a direction is not known to be there.
            loss_scale: the fp16 loss scale the gradients that ``d`` combines were multiplied by (None: 1).
        """
        raise NotImplementedError

    def weights_from_gram(
        self,
        gram: torch.Tensor,
        losses: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
        loss_scale: torch.Tensor | float | None = None,
        precision: float | None = None,
    ) -> torch.Tensor:
        """``[K]`` coefficients for gradients with Gramian ``gram`` (times ``loss_scale``^2 when given).

        Tasks without labels (``counts``) or with a ~zero gradient get coefficient 0 and take no part in the solve.
        ``precision`` as in :meth:`compute_weights`.
        """
        epsilon = torch.finfo(gram.dtype).eps  # a squared norm has no cancellation: accurate to its dtype
        if precision is None:
            precision = epsilon
        gram = gram.double()
        if isinstance(loss_scale, torch.Tensor):
            gram = gram / loss_scale.to(device=gram.device, dtype=gram.dtype) ** 2
        elif loss_scale is not None:
            gram = gram / float(loss_scale) ** 2  # a Python number: no tensor to copy to the device
        active = active_tasks(gram, counts, epsilon)
        losses = None if losses is None else losses.detach().double()
        context = {"active": active, "precision": precision, "loss_scale": loss_scale}
        accepted = _keywords(type(self).compute_weights)
        context = {key: value for key, value in context.items() if accepted is None or key in accepted}
        weights = self.compute_weights(gram, losses, **context)
        return torch.where(active, weights, torch.zeros_like(weights))

    def combine(
        self,
        grads: torch.Tensor,
        losses: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
        loss_scale: torch.Tensor | float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Combine ``[K, P]`` gradients: return ``(direction [P], weights [K])``. Keeps ``last_gram``.

        ``counts`` (``[K]`` labelled samples) and ``loss_scale`` (the factor the gradients carry) as in
        :meth:`weights_from_gram`.
        """
        work = grads if grads.dtype in (torch.float32, torch.float64) else grads.float()
        if self.reduce_grads is not None:
            work = self.reduce_grads(work)
        gram = work @ work.T
        if self.reduce_gram is not None:
            gram = self.reduce_gram(gram)
        self.last_gram = gram
        weights = self.weights_from_gram(gram, losses, counts, loss_scale, _gram_precision(grads, work))
        weights = weights.to(work.dtype)
        return weights @ work, weights

    def backward(self, losses, *, features=None, shared_params=None, counts=None, loss_scale=None):
        """Per-task gradients, on-device combination, one trunk backward (see :class:`GradientWeighting`).

        With ``loss_scale`` the per-task gradients are taken of the scaled losses (no fp16 underflow); every
        strategy sees the Gramian of the unscaled gradients, so its update carries exactly the scale, and the losses
        it reads are unscaled. With ``counts``, tasks without labels in the batch take no part in the solve.
        """
        vec = self._loss_vector(losses)
        count_vec = None if counts is None else self._count_vector(counts, vec)
        loss_list = [losses[n] for n in self.task_names]
        if loss_scale is not None:
            loss_list = [loss * loss_scale for loss in loss_list]
        if self.mode == "representation":
            if features is None:
                raise ValueError(f"weighting {self.name!r} in representation mode needs features=[...]")
            wrt = _autograd.as_tensor_list(features, "features")
            stop = wrt
        else:
            if shared_params is None:
                raise ValueError(f"weighting {self.name!r} in params mode needs shared_params=[...]")
            wrt = _autograd.as_tensor_list(shared_params, "shared_params")
            stop = _autograd.as_tensor_list(features, "features") if features is not None else []
        grads, head_grads = _autograd.task_gradients(loss_list, wrt, stop)
        direction, weights = self.combine(grads, vec, count_vec, loss_scale)
        if self.mode == "representation":
            _autograd.backward_through(wrt, direction)
        else:
            _autograd.accumulate_into(wrt, direction)
        _autograd.accumulate_heads(head_grads, weights if self.scale_heads else None)
        return self._weights_dict(weights)
