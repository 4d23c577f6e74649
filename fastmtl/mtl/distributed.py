"""Multi-process training with ``torch.distributed`` (``torchrun``): process group set-up and the collectives the
:class:`~fastmtl.mtl.Trainer` needs.

The Trainer does not wrap the model in ``DistributedDataParallel``: gradient-level weighting takes the per-task
gradients with ``torch.autograd.grad`` and accumulates the heads' gradients itself, which DDP's reducer (hooked on
``.grad`` accumulation) would not see. Instead every step makes three small, explicit collectives, all through
PyTorch's own process group (gloo on CPU, NCCL on GPU):

1. :func:`global_losses`: one all-reduce of ``[3K]`` (valid-element counts, count-weighted losses, labelled
   samples) so that every rank's per-task loss has the value of the loss over the *global* batch, and a gradient
   that, averaged over the ranks, is the gradient of that global loss (each rank weighted by its valid elements);
2. gradient-level weighting only: the ``K x K`` Gramian (representation mode) or the ``[K, P]`` per-task gradients
   (parameter mode) are all-reduced before the weights are solved (:func:`gram_reducer`, :func:`grads_reducer`),
   so every rank combines with the same weights;
3. :func:`average_gradients`: one all-reduce of every parameter gradient, flattened into one buffer.

With these, ``W`` ranks with batch ``b`` each take the same step as one process with batch ``W * b``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    """Whether the environment of a ``torchrun`` worker is set (``WORLD_SIZE`` and ``RANK``)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(device: str = "auto") -> torch.device | None:
    """Join the process group described by ``torchrun``'s environment, once; return this rank's device.

    NCCL when the training device is CUDA (each rank on ``cuda:LOCAL_RANK``), gloo otherwise. Returns None (and
    does nothing) outside torchrun.
    """
    if not launched_by_torchrun():
        return None
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if wants_cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but no CUDA device is visible")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if wants_cuda else "gloo")
    return torch.device("cuda", local_rank) if wants_cuda else torch.device("cpu")


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place; returned for chaining (identity in a single process)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy ``src``'s parameters and buffers to every rank (so all ranks start from the same model)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=src)


def global_losses(
    losses: Mapping[str, torch.Tensor],
    elements: Mapping[str, torch.Tensor],
    counts: Mapping[str, torch.Tensor],
    names: Sequence[str],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-task losses over the global batch, and the global labelled-sample counts, with one all-reduce.

    ``losses[t]`` is this rank's mean loss over its ``elements[t]`` valid elements (see
    :func:`fastmtl.reference.masked_loss.valid_elements`); ``counts[t]`` its labelled samples. The returned loss
    has the value ``L_t = sum_r e_rt L_rt / E_t`` (identical on every rank, 0 where ``E_t == 0``) and the gradient
    of ``W * e_t / E_t * L_t,local``, so that the mean over the ranks of the gradients is the gradient of ``L_t``.
    """
    world = world_size()
    local = torch.stack([losses[t] for t in names])
    dtype = torch.promote_types(local.dtype, torch.float32)
    local = local.to(dtype)
    e_local = torch.stack([torch.as_tensor(elements[t], device=local.device) for t in names]).to(dtype)
    n_local = torch.stack([torch.as_tensor(counts[t], device=local.device) for t in names]).to(dtype)
    packed = all_reduce_sum(torch.cat([e_local, e_local * local.detach(), n_local]))
    k = len(names)
    e_global, n_global = packed[:k], packed[2 * k :]
    value = torch.where(e_global > 0, packed[k : 2 * k] / e_global.clamp_min(1), torch.zeros_like(local))
    scaled = local * (world * e_local / e_global.clamp_min(1))
    pooled = scaled - scaled.detach() + value
    return ({t: pooled[i] for i, t in enumerate(names)},
            {t: n_global[i].round().to(torch.int64) for i, t in enumerate(names)})


def gram_reducer(world: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Representation mode: the Gramian of the global batch's per-task gradients from each rank's own.

    A rank's task gradients w.r.t. its own features are ``W`` times its block of the global gradient (see
    :func:`global_losses`), and the blocks are disjoint, so the global Gramian is ``sum_r G_r / W**2``.
    """
    return lambda gram: all_reduce_sum(gram) / (world * world)


def grads_reducer(world: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Parameter mode: the per-task gradients of the global batch, the mean of each rank's ``[K, P]``."""
    return lambda grads: all_reduce_sum(grads.contiguous()) / world


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Average ``.grad`` over the ranks with one all-reduce (a missing gradient counts as zeros, and is set)."""
    world = world_size()
    if world == 1:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        all_reduce_sum(flat).div_(world)
        start = 0
        for p in group:
            p.grad.copy_(flat[start : start + p.numel()].view_as(p.grad))
            start += p.numel()


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
