"""Pure-PyTorch masked loss of one task and its gradient: the ``torch`` backend and the test oracle.

Semantics (shared by every backend, see :func:`fastmtl.masked_multitask_loss`): an element is valid when its sample
is labelled (``mask[n]``, all True when ``mask`` is None) and the element itself carries a label ("ce": target not
``ignore_index`` and inside ``[0, C)``; "bce", "l1", "mse": target not NaN). The loss is the mean of the element
losses over valid elements, exactly 0 when there is none; the gradient is ``d loss / d pred`` (zero at invalid
elements). Math is float32 for float32/float16/bfloat16 inputs and float64 for float64 inputs (the oracle). No host
synchronisation: the valid count stays on the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KINDS = ("ce", "bce", "l1", "mse")


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the loss is computed in (and the dtype of the returned loss): float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sample_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """``mask`` [N] reshaped to broadcast against ``like`` [N, ...]."""
    if mask is None:
        return None
    return mask.reshape(mask.shape[0], *([1] * (like.dim() - 1)))


def valid_elements(target: torch.Tensor, mask: torch.Tensor | None, kind: str, num_classes: int | None = None,
                   ignore_index: int = -100) -> torch.Tensor:
    """Bool tensor of the target's shape: the elements that count in the loss (see the module docstring).

    ``num_classes`` (the prediction's ``C``) is needed for "ce". The loss of a task is the mean over these, so
    their number is the weight of a batch's loss when several batches are pooled (distributed training).
    """
    if kind == "ce":
        if num_classes is None:
            raise ValueError("valid_elements: a 'ce' task needs num_classes")
        valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    else:
        valid = ~torch.isnan(target)
    m = _sample_mask(mask, target)
    return valid if m is None else valid & m


def element_losses(pred, target, mask, kind: str, ignore_index: int = -100):
    """Element losses, their gradients (unscaled) and the validity of each element, in the math dtype.

    Returns ``(losses, grads, valid)``: losses and valid have the target's shape for "ce" ([N, *spatial]) and
    pred's shape otherwise; grads has pred's shape. Invalid elements hold 0 in losses and grads.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    x = pred.to(math_dtype(pred.dtype))
    if kind == "ce":
        valid = valid_elements(target, mask, kind, x.shape[1], ignore_index)
        safe_target = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)
        log_probs = torch.log_softmax(x, dim=1)
        losses = -log_probs.gather(1, safe_target).squeeze(1)
        onehot = torch.zeros_like(x).scatter_(1, safe_target, 1.0)
        grads = torch.exp(log_probs) - onehot
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        return torch.where(valid, losses, zero), torch.where(valid.unsqueeze(1), grads, zero), valid
    y = target.to(x.dtype)
    valid = valid_elements(y, mask, kind)
    y = torch.where(valid, y, torch.zeros_like(y))
    if kind == "bce":
        losses = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        grads = torch.sigmoid(x) - y
    elif kind == "l1":
        losses = (x - y).abs()
        grads = torch.sign(x - y)
    else:  # mse
        losses = (x - y) ** 2
        grads = 2.0 * (x - y)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(valid, losses, zero), torch.where(valid, grads, zero), valid


def masked_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None,
    kind: str,
    ignore_index: int = -100,
    compute_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One task's masked mean loss and ``d loss / d pred``.

    Args:
        pred: logits / predictions ``[N, ...]`` ("ce": ``[N, C, *spatial]``), float32 / float16 / bfloat16 / float64.
        target: "ce": int64 ``[N, *spatial]``; else a float tensor of pred's shape (NaN = no label).
        mask: optional bool ``[N]``, True where the sample is labelled.
        kind: "ce", "bce", "l1" or "mse".
        ignore_index: "ce" targets equal to it are invalid.
        compute_grad: return the gradient (else an empty tensor).

    Returns:
        ``(loss, grad)``: loss a 0-dim tensor in the math dtype (float32, float64 for float64 preds), 0 when no
        element is valid; grad of pred's shape, dtype and layout, already divided by the valid count.
    """
    losses, grads, valid = element_losses(pred, target, mask, kind, ignore_index)
    count = valid.sum().clamp(min=1).to(losses.dtype)  # a sum over no element is 0, and 0 / 1 = 0
    loss = losses.sum() / count
    if not compute_grad:
        return loss, pred.new_empty(0)
    grad = torch.empty_like(pred)  # pred's layout (channels_last stays channels_last)
    grad.copy_(grads / count)
    return loss, grad


def scale_grads(grads: list[torch.Tensor], scales: torch.Tensor) -> list[torch.Tensor]:
    """``out[t] = grads[t] * scales[t]`` in float32 math, new tensors in each gradient's dtype."""
    out = []
    for t, g in enumerate(grads):
        o = torch.empty_like(g)
        o.copy_(g.to(math_dtype(g.dtype)) * scales[t].to(math_dtype(g.dtype)))
        out.append(o)
    return out


def scale_grads_(grads: list[torch.Tensor], scales: torch.Tensor) -> None:
    """``grads[t] *= scales[t]`` in place, with the rounding of :func:`scale_grads` (float32 math, one rounding)."""
    for t, g in enumerate(grads):
        scale = scales[t].to(math_dtype(g.dtype))
        if g.dtype == math_dtype(g.dtype):
            g.mul_(scale)
        else:  # multiplying a half tensor in place would round the scale to its dtype first
            g.copy_(g.to(scale.dtype) * scale)
