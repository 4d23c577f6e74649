"""The Triton backend of the masked loss: ops ``fastmtl::masked_loss_triton``, ``masked_loss_scale_grads_triton``
and its in-place form ``masked_loss_scale_grads_triton_``; ``masked_multitask_loss_forward_triton`` and
``masked_multitask_loss_backward_triton`` (+ in-place form), what ``masked_multitask_loss`` runs.

Same contract as the native ops ``fastmtl::masked_loss`` / ``masked_loss_scale_grads(_)`` /
``masked_multitask_loss_forward`` / ``masked_multitask_loss_backward(_)`` (csrc/ops.cpp), run by the kernels of
:mod:`fastmtl.kernels.masked_loss`. Importing this module imports Triton (slow), so the op layer
(:mod:`fastmtl.ops.masked_loss`) imports it only when the triton backend is used.

The ops are registered with ``torch.library.triton_op`` + ``wrap_triton`` where torch has them (>= 2.6), so
``torch.compile`` sees the kernels; older torch, and the interpreter (``TRITON_INTERPRET=1``, where wrap_triton cannot
trace), get an opaque ``custom_op`` with a fake implementation instead.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from fastmtl import backends
from fastmtl.kernels import masked_loss as kernels

LOSS_OP = "fastmtl::masked_loss_triton"
SCALE_OP = "fastmtl::masked_loss_scale_grads_triton"
SCALE_INPLACE_OP = "fastmtl::masked_loss_scale_grads_triton_"
FORWARD_OP = "fastmtl::masked_multitask_loss_forward_triton"
BACKWARD_OP = "fastmtl::masked_multitask_loss_backward_triton"
BACKWARD_INPLACE_OP = "fastmtl::masked_multitask_loss_backward_triton_"


def _implementations(launch):
    """Each op as ``(name, mutated arguments, function)``, its kernels launched through ``launch``
    (``torch.library.wrap_triton``, a direct launch, or ``None`` for the fake implementations, which only
    allocate the outputs)."""

    def loss(
        pred: Tensor, target: Tensor, mask: Optional[Tensor], kind: str, ignore_index: int, compute_grad: bool
    ) -> Tuple[Tensor, Tensor]:
        return kernels.masked_loss(pred, target, mask, kind, ignore_index, compute_grad, launch=launch)

    def scale(grads: List[Tensor], scales: Tensor) -> List[Tensor]:
        return kernels.scale_grads(grads, scales, launch=launch)

    def scale_inplace(grads: List[Tensor], scales: Tensor) -> None:
        kernels.scale_grads(grads, scales, launch=launch, inplace=True)

    def forward(
        preds: List[Tensor], targets: List[Tensor], masks: List[Optional[Tensor]], kinds: str,
        ignore_index: int, weights: Optional[Tensor], compute_grad: List[bool],
    ) -> Tuple[Tensor, List[Tensor], Tensor, List[Tensor]]:  # fmt: skip
        # kinds joined by commas: custom ops have no list-of-str arguments
        return kernels.multitask_forward(preds, targets, masks, kinds.split(","), ignore_index, weights,
                                         compute_grad, launch)  # fmt: skip

    def backward(
        grads: List[Tensor], grad_scale: Tensor, grad_total: Optional[Tensor], weights: Optional[Tensor],
        grad_losses: List[Optional[Tensor]],
    ) -> List[Tensor]:  # fmt: skip
        return kernels.multitask_backward(grads, grad_scale, grad_total, weights, grad_losses, launch)

    def backward_inplace(
        grads: List[Tensor], grad_scale: Tensor, grad_total: Optional[Tensor], weights: Optional[Tensor],
        grad_losses: List[Optional[Tensor]],
    ) -> None:  # fmt: skip
        kernels.multitask_backward(grads, grad_scale, grad_total, weights, grad_losses, launch, inplace=True)

    return [
        (LOSS_OP, (), loss),
        (SCALE_OP, (), scale),
        (SCALE_INPLACE_OP, ("grads",), scale_inplace),
        (FORWARD_OP, (), forward),
        (BACKWARD_OP, (), backward),
        (BACKWARD_INPLACE_OP, ("grads",), backward_inplace),
    ]


def _register() -> None:
    # Under the interpreter wrap_triton cannot trace the kernels (they would vanish from a traced graph), so the
    # ops are opaque custom ops there, with the same functions launching nothing as their fakes.
    if hasattr(torch.library, "triton_op") and not backends.triton_interpret():
        for name, mutates, fn in _implementations(torch.library.wrap_triton):
            torch.library.triton_op(name, mutates_args=mutates)(fn)
        return
    fakes = {name: fn for name, _, fn in _implementations(None)}
    for name, mutates, fn in _implementations(kernels._direct):
        torch.library.custom_op(name, mutates_args=mutates)(fn).register_fake(fakes[name])


_register()


def masked_loss(
    pred: Tensor, target: Tensor, mask: Optional[Tensor], kind: str, ignore_index: int = -100, compute_grad: bool = True
) -> Tuple[Tensor, Tensor]:
    """One task's masked mean loss and its gradient on the Triton backend (arguments already validated).

    Returns ``(loss, grad)``: the float32 0-dim mean of the element losses over valid elements (exactly 0.0 when
    there is none) and ``d loss / d pred`` in pred's dtype and layout (an empty tensor when ``compute_grad`` is
    false). Two kernel launches: the valid count, then loss and gradient in one sweep.

    Like the functions below, this calls the registered op while torch.compile traces and the launcher directly
    otherwise: in eager mode the custom-op dispatch costs more host time than small kernels take.
    """
    if torch.compiler.is_compiling():
        return torch.ops.fastmtl.masked_loss_triton(pred, target, mask, kind, int(ignore_index), bool(compute_grad))
    return kernels.masked_loss(pred, target, mask, kind, int(ignore_index), bool(compute_grad))


def scale_grads(grads: List[Tensor], scales: Tensor) -> List[Tensor]:
    """``[grads[t] * scales[t] for t]`` as new tensors, in one launch for up to 8 tasks (``scales``: float32 [T])."""
    if torch.compiler.is_compiling():
        return torch.ops.fastmtl.masked_loss_scale_grads_triton(list(grads), scales)
    return kernels.scale_grads(list(grads), scales)


def scale_grads_(grads: List[Tensor], scales: Tensor) -> None:
    """``grads[t] *= scales[t]`` in place, in one launch for up to 8 tasks (``scales``: float32 [T])."""
    if torch.compiler.is_compiling():
        torch.ops.fastmtl.masked_loss_scale_grads_triton_(list(grads), scales)
    else:
        kernels.scale_grads(list(grads), scales, inplace=True)


def multitask_forward(preds, targets, masks, kinds, ignore_index, weights, compute_grad):
    """All tasks' losses and gradients up to a factor on the Triton backend (arguments already validated): returns
    ``(total, losses, grad_scale, grads)`` as ``fastmtl::masked_multitask_loss_forward``, in ``T`` launches
    (2 to 8 tasks; else ``T + ceil(T / 8)``)."""
    flags = [bool(c) for c in compute_grad]
    if torch.compiler.is_compiling():  # the op takes the kinds joined by commas (custom ops have no str lists)
        return torch.ops.fastmtl.masked_multitask_loss_forward_triton(
            list(preds), list(targets), list(masks), ",".join(kinds), int(ignore_index), weights, flags
        )
    return kernels.multitask_forward(preds, targets, masks, list(kinds), int(ignore_index), weights, flags)


def multitask_backward(grads, grad_scale, grad_total, weights, grad_losses):
    """``grads[t] * (grad_total * weights[t] + grad_losses[t]) * grad_scale[t]`` as new tensors, one launch for up
    to 8 tasks."""
    args = (list(grads), grad_scale, grad_total, weights, list(grad_losses))
    if torch.compiler.is_compiling():
        return torch.ops.fastmtl.masked_multitask_loss_backward_triton(*args)
    return kernels.multitask_backward(*args)


def multitask_backward_(grads, grad_scale, grad_total, weights, grad_losses) -> None:
    """The same, written into ``grads``."""
    args = (list(grads), grad_scale, grad_total, weights, list(grad_losses))
    if torch.compiler.is_compiling():
        torch.ops.fastmtl.masked_multitask_loss_backward_triton_(*args)
    else:
        kernels.multitask_backward(*args, inplace=True)
