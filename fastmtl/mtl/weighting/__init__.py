"""Task weighting: how the per-task losses of a multi-task model become one update.

One interface, two families (every strategy a small file):

* loss-level: ``ew``, ``fixed``, ``datasize``, ``uw``, ``dwa``, ``rlw``, ``famo``;
* gradient-level: ``gradnorm``, ``pcgrad``, ``mgda``, ``cagrad``, ``imtl_g``, ``gradvac``, ``aligned_mtl``,
  ``upgrad``, ``nash_mtl``.

``create(name, task_names, **options)`` builds a strategy; ``strategy.backward(losses, features=...,
shared_params=..., counts=...)`` runs the whole backward pass of a step and returns the weights used. The
functional core, ``aggregate(name, grads)``, ``gram_weights(name, gram)`` and ``dwa_weights(history)``, is there
for testing and reuse.

Gradient-level strategies work, by default, on the gradients w.r.t. the shared representation (``features``):
K cheap head backwards, a ``K x K`` Gramian, a small solve on the device, one trunk backward with the combined
gradient (``mode="params"`` takes the gradients w.r.t. the trunk parameters instead, one trunk backward per task).
Each head's parameters get their own task's gradient (times the task weight for GradNorm and Nash-MTL). The
Gramian of the last step is kept as ``strategy.last_gram`` for :mod:`fastmtl.mtl.affinity`.

Typical use::

    strategy = weighting.create("pcgrad", ["digit", "parity"]).to(device)
    optimizer = torch.optim.SGD([*model.parameters(), *strategy.parameters()], lr=0.01)
    features = model.encode(x)
    _, per_task = fastmtl.masked_multitask_loss(model.decode(features), targets, kinds, masks)
    weights = strategy.backward(per_task, features=features, shared_params=list(model.trunk.parameters()))
    optimizer.step()
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Importing each strategy's module registers it.
from fastmtl.mtl.weighting import (  # noqa: F401
    aligned_mtl,
    cagrad,
    datasize,
    dwa,
    ew,
    famo,
    gradnorm,
    gradvac,
    imtl_g,
    mgda,
    nash_mtl,
    pcgrad,
    rlw,
    upgrad,
    uw,
)
from fastmtl.mtl.weighting.base import GradientWeighting, LossWeighting, Weighting, registry

__all__ = [
    "GradientWeighting",
    "LossWeighting",
    "Weighting",
    "aggregate",
    "available",
    "create",
    "dwa_weights",
    "gram_weights",
    "registry",
]


def available() -> list[str]:
    """Names accepted by :func:`create`, loss-level first, in a stable order."""
    classes = registry()
    return sorted(classes, key=lambda n: (classes[n].family != "loss", n))


def create(name: str, task_names: Sequence[str], **options) -> Weighting:
    """Build the strategy ``name`` for ``task_names`` with its ``options`` (see each class for them)."""
    classes = registry()
    if name not in classes:
        raise ValueError(f"unknown weighting {name!r}; available: {available()}")
    try:
        return classes[name](task_names, **options)
    except TypeError as error:
        raise TypeError(f"weighting {name!r}: {error}") from error


def _gradient_strategy(name: str, k: int, options) -> GradientWeighting:
    classes = registry()
    stateless = [n for n in available() if classes[n].family == "gradient" and not classes[n].needs_losses]
    if name in ("ew", "sum"):
        return None
    if name not in stateless:
        raise ValueError(f"aggregate supports 'ew' and the gradient-level strategies {stateless}, got {name!r}")
    return classes[name]([f"task{i}" for i in range(k)], **options)


def aggregate(name: str, grads: torch.Tensor, **options) -> torch.Tensor:
    """Combine ``[K, P]`` per-task gradients into one ``[P]`` direction with strategy ``name``.

    ``"ew"`` is the plain sum. Every gradient-level strategy except GradNorm (which needs losses and learned
    weights) is accepted, with the same options as :func:`create`. Example: ``aggregate("pcgrad", grads)`` is
    the sum of the PCGrad-projected gradients; ``aggregate("mgda", grads)`` the min-norm point of their hull.
    """
    if not isinstance(grads, torch.Tensor) or grads.dim() != 2 or grads.shape[0] < 1:
        raise ValueError(f"grads must be a [K, P] tensor with K >= 1, got {getattr(grads, 'shape', grads)!r}")
    strategy = _gradient_strategy(name, grads.shape[0], options)
    if strategy is None:
        return grads.sum(0)
    direction, _ = strategy.combine(grads)
    return direction.to(grads.dtype)


def gram_weights(name: str, gram: torch.Tensor, **options) -> torch.Tensor:
    """The ``[K]`` coefficients strategy ``name`` gives the gradients whose Gramian is ``gram`` ``[K, K]``.

    ``aggregate(name, grads) == gram_weights(name, grads @ grads.T) @ grads`` for every strategy here.
    """
    if not isinstance(gram, torch.Tensor) or gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square [K, K] tensor, got {getattr(gram, 'shape', gram)!r}")
    strategy = _gradient_strategy(name, gram.shape[0], options)
    if strategy is None:
        return torch.ones(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return strategy.weights_from_gram(gram).to(gram.dtype)


def dwa_weights(loss_history: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Dynamic Weight Average weights from ``[E, K]`` per-epoch mean losses (Liu et al., CVPR 2019).

    ``w_k = K softmax_k(r / T)`` with ``r_k = L_k(E-1) / L_k(E-2)``, the ratio of the last two epochs; all ones
    while fewer than two epochs are known.
    """
    from fastmtl.mtl.weighting.dwa import dwa_weights as _dwa

    return _dwa(loss_history, temperature)
