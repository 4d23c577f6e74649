"""``fastmtl.masked_multitask_loss``: several masked task losses, weighted and summed, with fused gradients.

Every backend implements the same two steps (``RUNNERS``), with no host synchronisation anywhere:

* forward (``masked_multitask_loss_forward``): each task's loss and its gradient, the gradient saved up to a
  per-task factor ``grad_scale[t]`` (empty: every factor 1), plus the weighted total. CUDA: a chain of one
  kernel per task (``T`` launches), each block writing its loss sum and valid count to a slot of its own: the
  first kernel, for the task with the smallest gradient, stores that gradient undivided, and every launch counts
  the valid elements of the next task, so each later one writes its gradient already divided by the valid count
  (float16 gradients stay undivided with their factor, as gradient / count would fall into float16's subnormals);
  each launch's block 0 sums the previous task's slots, and the last launch's last block its own and the total;
  Triton: one kernel per task writing the element gradient and per-program partials (each target read once), the
  last of them (for 2 to 8 tasks; else one more launch) finalizing the losses, the total and the factors
  ``1 / count`` in the program that finishes last (``T`` launches); CPU and torch: the per-task op. No fastmtl
  kernel adds floating-point values with atomics: the results are the same from run to run.
* backward (``masked_multitask_loss_backward``): one grouped scaling of the saved gradients by
  ``(g_total * w_t + g_per_task[t]) * grad_scale[t]``, computed on the device (CUDA and Triton: inside the one
  scaling kernel; on CUDA a scale of exactly 1 in place moves no memory). When autograd frees the graph after the
  backward (no ``retain_graph``), the in-place form scales the saved gradients themselves, so the backward
  allocates nothing of their size.

Registered ops (namespace ``fastmtl``, schemas in ``csrc/ops.cpp``): ``masked_loss`` (one task),
``masked_loss_scale_grads(_)``, ``masked_multitask_loss_forward`` and ``masked_multitask_loss_backward(_)``, with
CPU kernels in ``csrc/cpu/masked_loss.cpp`` and ``csrc/masked_multitask_loss.cpp``, CUDA kernels in
``csrc/cuda/masked_loss*``; and ``masked_multitask_loss``, all of it in one op with its autograd in C++
(``csrc/masked_multitask_loss.cpp``), which the cpp and cuda backends take in eager mode (the Python node below
costs more host time; torch.compile traces the Python node). Their fake implementations are registered here.
The Triton versions live in ``fastmtl.ops.masked_loss_triton``.
"""

from __future__ import annotations

import numbers

import torch

from fastmtl import _native, backends, debug
from fastmtl.reference import masked_loss as reference

KINDS = reference.KINDS
PRED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
NATIVE = "fastmtl::masked_loss"
NATIVE_SCALE = "fastmtl::masked_loss_scale_grads"
NATIVE_SCALE_INPLACE = "fastmtl::masked_loss_scale_grads_"
NATIVE_MULTITASK = "fastmtl::masked_multitask_loss"


# ---- validation -----------------------------------------------------------------------------------------------


def _check_keys(name: str, d, names: list[str], required: bool) -> None:
    if not isinstance(d, dict):
        raise TypeError(f"{name} must be a dict keyed by task name, got {type(d).__name__}")
    missing = [k for k in names if k not in d]
    if required and missing:
        raise KeyError(f"{name} has no entry for task(s) {missing} (tasks are the keys of preds: {names})")
    extra = [k for k in d if k not in names]
    if extra:
        raise KeyError(f"{name} has entries for unknown task(s) {extra} (tasks are the keys of preds: {names})")


def _check_task(name: str, pred, target, mask, kind, device) -> None:
    if kind not in KINDS:
        raise ValueError(f"kinds[{name!r}] must be one of {KINDS}, got {kind!r}")
    if not isinstance(pred, torch.Tensor):
        raise TypeError(f"preds[{name!r}] must be a torch.Tensor, got {type(pred).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"targets[{name!r}] must be a torch.Tensor, got {type(target).__name__}")
    if pred.dtype not in PRED_DTYPES:
        raise TypeError(f"preds[{name!r}] must be float32, float16, bfloat16 or float64, got {pred.dtype}")
    if pred.device != device:
        raise ValueError(f"preds[{name!r}] is on {pred.device}, but the first task's pred is on {device}")
    if target.device != device:
        raise ValueError(f"targets[{name!r}] must be on {device} (its pred's device), got {target.device}")
    if kind == "ce":
        if pred.dim() < 2:
            raise ValueError(f"preds[{name!r}] (ce) must be [N, C] or [N, C, *spatial], got shape {tuple(pred.shape)}")
        if target.dtype != torch.int64:
            raise TypeError(f"targets[{name!r}] (ce) must be int64 class indices, got {target.dtype}")
        expected = (pred.shape[0], *pred.shape[2:])
        if tuple(target.shape) != expected:
            raise ValueError(
                f"targets[{name!r}] (ce) must have shape {expected} for preds of shape {tuple(pred.shape)}, "
                f"got {tuple(target.shape)}"
            )
        if pred.shape[1] < 1:
            raise ValueError(f"preds[{name!r}] (ce) must have at least one class, got shape {tuple(pred.shape)}")
    else:
        if pred.dim() < 1:
            raise ValueError(f"preds[{name!r}] ({kind}) must be [N, ...], got a 0-dim tensor")
        if not target.is_floating_point():
            raise TypeError(f"targets[{name!r}] ({kind}) must be a float tensor (NaN = no label), got {target.dtype}")
        if target.shape != pred.shape:
            raise ValueError(
                f"targets[{name!r}] ({kind}) must have the shape of its pred {tuple(pred.shape)}, "
                f"got {tuple(target.shape)}"
            )
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"masks[{name!r}] must be a bool tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"masks[{name!r}] must be a bool tensor, got {mask.dtype}")
        if tuple(mask.shape) != (pred.shape[0],):
            raise ValueError(
                f"masks[{name!r}] must have shape [N] = [{pred.shape[0]}] (one flag per sample), got {tuple(mask.shape)}"
            )
        if mask.device != device:
            raise ValueError(f"masks[{name!r}] must be on {device}, got {mask.device}")


def _check_weight(name: str, w, device):
    if isinstance(w, bool) or not isinstance(w, (numbers.Real, torch.Tensor)):
        raise TypeError(f"weights[{name!r}] must be a float or a 0-dim tensor, got {type(w).__name__}")
    if isinstance(w, torch.Tensor):
        if w.dim() != 0 and tuple(w.shape) != (1,):
            raise ValueError(f"weights[{name!r}] must be a 0-dim tensor, got shape {tuple(w.shape)}")
        if not w.is_floating_point():
            raise TypeError(f"weights[{name!r}] must be a floating tensor, got {w.dtype}")
        if w.device != device:
            raise ValueError(f"weights[{name!r}] must be on {device} (the preds' device), got {w.device}")


def validate(preds, targets, kinds, masks=None, weights=None, ignore_index=-100) -> list[str]:
    """Check the arguments of :func:`masked_multitask_loss`; return the task names in order.

    Raises KeyError / TypeError / ValueError naming the argument and what was expected. Reads shapes, dtypes and
    devices only (never tensor values).
    """
    if not isinstance(preds, dict) or not preds:
        raise TypeError("preds must be a non-empty dict of task name -> tensor")
    names = list(preds)
    _check_keys("targets", targets, names, required=True)
    _check_keys("kinds", kinds, names, required=True)
    if masks is not None:
        _check_keys("masks", masks, names, required=False)
    if weights is not None:
        _check_keys("weights", weights, names, required=False)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -(2**63) <= int(ignore_index) < 2**63:
        raise ValueError(f"ignore_index must fit in int64 (the targets' dtype), got {ignore_index}")
    first = preds[names[0]]
    device = first.device if isinstance(first, torch.Tensor) else None
    for name in names:
        mask = masks.get(name) if masks is not None else None
        _check_task(name, preds[name], targets[name], mask, kinds[name], device)
        if weights is not None and name in weights:
            _check_weight(name, weights[name], device)
    return names


def class_range_error(name: str, pred, target, ignore_index: int) -> torch.Tensor:
    """A bool 0-dim tensor: whether task ``name``'s ce target holds a class outside [0, C) other than ignore_index."""
    num_classes = pred.shape[1]
    return ((target != ignore_index) & ((target < 0) | (target >= num_classes))).any()


def _check_class_range(names, preds, targets, kinds, ignore_index, cpu_checked_natively: bool = False) -> None:
    """Raise ValueError for out-of-range ce classes: always on the CPU, under ``fastmtl.debug()`` on other devices.

    On the CPU under torch.compile the check becomes an asynchronous assertion (RuntimeError) in the graph.
    ``cpu_checked_natively``: the native grouped op makes the CPU check itself (same message), so skip it here.
    """
    for name in names:
        if kinds[name] != "ce":
            continue
        pred, target = preds[name], targets[name]
        if pred.device.type == "cpu" and cpu_checked_natively:
            continue
        if pred.device.type != "cpu" and not debug.enabled():
            continue
        msg = (
            f"targets[{name!r}] (ce) holds a class index outside [0, {pred.shape[1]}) that is not "
            f"ignore_index={ignore_index}"
        )
        bad = class_range_error(name, pred, target, ignore_index)
        if torch.compiler.is_compiling():
            if pred.device.type == "cpu":
                torch._assert_async(~bad, msg)
            continue
        if bad.item():
            raise ValueError(msg)


# ---- registrations for the native ops ---------------------------------------------------------------------------


def _fake_masked_loss(pred, target, mask, kind, ignore_index, compute_grad):
    loss = pred.new_empty((), dtype=reference.math_dtype(pred.dtype))
    return loss, (torch.empty_like(pred) if compute_grad else pred.new_empty(0))


def _fake_scale_grads(grads, scales):
    return [torch.empty_like(g) for g in grads]


def _fake_scale_grads_inplace(grads, scales):
    return None


def _fake_total_and_losses(preds, weights):
    losses = [p.new_empty((), dtype=reference.math_dtype(p.dtype)) for p in preds]
    dtype = losses[0].dtype
    for loss in losses[1:]:
        dtype = torch.promote_types(dtype, loss.dtype)
    if weights is not None:
        dtype = torch.promote_types(dtype, weights.dtype)
    return preds[0].new_empty((), dtype=dtype), losses


def _fake_masked_multitask_loss(preds, targets, masks, kinds, names, ignore_index, weights):
    total, losses = _fake_total_and_losses(preds, weights)
    return [total, *losses]


def _fake_masked_multitask_loss_forward(preds, targets, masks, kinds, ignore_index, weights, compute_grad):
    total, losses = _fake_total_and_losses(preds, weights)
    # CPU: gradients already divided (every factor 1, an empty grad_scale); CUDA: a factor per task (1 for gradients
    # already divided; the chain's lead task and float16 ones are stored undivided: csrc/cuda/masked_loss.h).
    grad_scale = preds[0].new_empty((len(preds) if preds[0].device.type == "cuda" else 0,), dtype=torch.float32)
    grads = [torch.empty_like(p) if c else p.new_empty(0) for p, c in zip(preds, compute_grad)]
    return total, losses, grad_scale, grads


def _fake_masked_multitask_loss_backward(grads, grad_scale, grad_total, weights, grad_losses):
    return [torch.empty_like(g) for g in grads]


def _fake_masked_multitask_loss_backward_inplace(grads, grad_scale, grad_total, weights, grad_losses):
    return None


def _register_native() -> bool:
    if not _native.has_cpp():
        return False
    torch.library.register_fake(NATIVE, _fake_masked_loss)
    torch.library.register_fake(NATIVE_SCALE, _fake_scale_grads)
    torch.library.register_fake(NATIVE_SCALE_INPLACE, _fake_scale_grads_inplace)
    torch.library.register_fake(NATIVE_MULTITASK, _fake_masked_multitask_loss)
    torch.library.register_fake(NATIVE_MULTITASK + "_forward", _fake_masked_multitask_loss_forward)
    torch.library.register_fake(NATIVE_MULTITASK + "_backward", _fake_masked_multitask_loss_backward)
    torch.library.register_fake(NATIVE_MULTITASK + "_backward_", _fake_masked_multitask_loss_backward_inplace)
    return True


HAS_NATIVE = _register_native()


# ---- backends ---------------------------------------------------------------------------------------------------


def _triton_module():
    """``fastmtl.ops.masked_loss_triton``, or raise BackendUnavailableError saying why it cannot be used."""
    try:
        from fastmtl.ops import masked_loss_triton
    except ImportError as exc:
        raise backends.BackendUnavailableError(
            f"the triton backend of masked_multitask_loss is not available: fastmtl.ops.masked_loss_triton "
            f"cannot be imported ({exc})"
        ) from exc
    return masked_loss_triton


def triton_available() -> bool:
    """Whether ``fastmtl.ops.masked_loss_triton`` imports (the Triton kernels of this op are installed)."""
    try:
        _triton_module()
    except backends.BackendUnavailableError:
        return False
    return True


def backward_scales(grad_scale, grad_total, weights, grad_losses):
    """The [T] float32 scales of the backward: ``(grad_total * weights[t] + grad_losses[t]) * grad_scale[t]`` (absent
    terms count as 0, absent weights and an empty grad_scale as 1), as torch ops (the native CPU op computes the same
    in C++)."""
    n = len(grad_losses)
    scales = grad_scale.new_zeros(n, dtype=torch.float32)
    if grad_total is not None:
        scales = grad_total * weights if weights is not None else grad_total.expand(n)
    present = [g for g in grad_losses if g is not None]
    if present:
        zero = torch.zeros_like(present[0])
        scales = scales + torch.stack([g if g is not None else zero for g in grad_losses])
    if grad_scale.numel():
        scales = scales * grad_scale
    return scales.to(torch.float32).contiguous()


def _torch_forward(preds, targets, masks, kinds, ignore_index, weights, compute_grad):
    """The torch backend's ``masked_multitask_loss_forward``: the reference per task (normalised gradients, so the
    factors are 1)."""
    losses, grads = [], []
    for pred, target, mask, kind, needs in zip(preds, targets, masks, kinds, compute_grad):
        loss, grad = reference.masked_loss(pred, target, mask, kind, ignore_index, needs)
        losses.append(loss)
        grads.append(grad)
    stacked = torch.stack(losses)
    total = (stacked * weights).sum() if weights is not None else stacked.sum()
    return total, losses, preds[0].new_empty(0, dtype=torch.float32), grads  # empty: every factor is 1


def _torch_backward(grads, grad_scale, grad_total, weights, grad_losses):
    return reference.scale_grads(grads, backward_scales(grad_scale, grad_total, weights, grad_losses))


def _torch_backward_(grads, grad_scale, grad_total, weights, grad_losses):
    reference.scale_grads_(grads, backward_scales(grad_scale, grad_total, weights, grad_losses))


def _native_forward(preds, targets, masks, kinds, ignore_index, weights, compute_grad):
    return torch.ops.fastmtl.masked_multitask_loss_forward(
        list(preds), list(targets), list(masks), list(kinds), ignore_index, weights, list(compute_grad)
    )


def _native_backward(grads, grad_scale, grad_total, weights, grad_losses):
    return torch.ops.fastmtl.masked_multitask_loss_backward(grads, grad_scale, grad_total, weights, list(grad_losses))


def _native_backward_(grads, grad_scale, grad_total, weights, grad_losses):
    torch.ops.fastmtl.masked_multitask_loss_backward_(grads, grad_scale, grad_total, weights, list(grad_losses))


def _triton_forward(*args):
    return _triton_module().multitask_forward(*args)


def _triton_backward(*args):
    return _triton_module().multitask_backward(*args)


def _triton_backward_(*args):
    _triton_module().multitask_backward_(*args)


# backend -> (forward: (total, losses, grad_scale, grads) with grads[t] * grad_scale[t] = d L_t / d pred_t,
#             backward: scaled copies of the gradients, the same backward in place)
RUNNERS = {
    "torch": (_torch_forward, _torch_backward, _torch_backward_),
    "cpp": (_native_forward, _native_backward, _native_backward_),
    "cuda": (_native_forward, _native_backward, _native_backward_),
    "triton": (_triton_forward, _triton_backward, _triton_backward_),
}


def _graph_released_after_backward() -> bool:
    """Whether the running backward frees the graph afterwards (no ``retain_graph``), so that the gradients saved
    by the forward may be scaled in place: nothing reads them again.

    Evaluated when the backward runs, in eager mode only: a compiled backward is traced once and may later run
    with or without ``retain_graph`` (torch.compile's own runtime makes this check at run time, not in the graph).
    """
    if torch.compiler.is_compiling() or torch.is_grad_enabled():  # grad mode on: create_graph, the copy is recorded
        return False
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is not None and not keep_graph()


@torch.compiler.assume_constant_result
def _selected_backend(device: torch.device) -> str:
    # Resolved once per trace under torch.compile: the backend choice is a Python-level constant.
    backend = backends.select(device)
    if backend == backends.AUTO:  # CUDA tensors: fixed preference order, no measurement for the loss
        if HAS_NATIVE and backends.can_run("cuda", device)[0]:
            return "cuda"
        if backends.can_run("triton", device)[0] and triton_available():
            return "triton"
        return "torch"
    return backend


# ---- autograd ---------------------------------------------------------------------------------------------------


_NO_SECOND_DERIVATIVE = (
    b"fastmtl.masked_multitask_loss has no second derivative: its gradients are computed in the forward and saved"
)


def _refuse_double_backward(grads):
    """With create_graph (grad mode on in the backward), differentiating the returned gradients would give zero
    second derivatives (the saved gradients are constants to autograd): route them through DelayedError so that it
    raises. Unlike ``torch.autograd.function.once_differentiable`` this holds even when no upstream gradient requires
    grad: a gradient penalty on d loss / d preds has a nonzero second derivative through the loss itself
    (torch.compile has no double backward)."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return grads
    present = [g.detach().requires_grad_() for g in grads if g is not None]
    if not present:
        return grads
    wrapped = torch._C._functions.DelayedError(_NO_SECOND_DERIVATIVE, len(present))(*present)
    wrapped = iter(wrapped if isinstance(wrapped, tuple) else (wrapped,))
    return [next(wrapped) if g is not None else None for g in grads]


class _MaskedMultitaskLoss(torch.autograd.Function):
    """All tasks in one autograd node: the backend's forward computes every loss and gradient (up to a per-task
    factor), the backward scales the saved gradients in one call.

    Inputs: (backend, kinds, ignore_index, weights or None, *preds, *targets, *masks). Outputs:
    (total, *per_task_losses). Gradients are not materialised, so backward from ``per_task[t]`` alone returns a
    gradient for pred t only (None for the others) and never runs the other tasks' graphs.
    """

    @staticmethod
    def forward(ctx, backend, kinds, ignore_index, weights, *tensors):
        n = len(kinds)
        preds, targets, masks = tensors[:n], tensors[n : 2 * n], tensors[2 * n :]
        compute_grad = [bool(ctx.needs_input_grad[4 + t]) for t in range(n)]
        total, losses, grad_scale, grads = RUNNERS[backend][0](
            preds, targets, masks, kinds, ignore_index, weights, compute_grad
        )
        ctx.set_materialize_grads(False)
        ctx.backend = backend
        ctx.has_weights = weights is not None
        ctx.compute_grad = compute_grad
        ctx.save_for_backward(grad_scale, weights, *grads, *losses)
        return (total, *losses)

    @staticmethod
    def backward(ctx, grad_total, *grad_losses):
        grad_scale, weights, *saved = ctx.saved_tensors
        n = len(saved) // 2
        grads, losses = saved[:n], saved[n:]
        upstream = [grad_total is not None or grad_losses[t] is not None for t in range(n)]
        active = [ctx.needs_input_grad[4 + t] and ctx.compute_grad[t] and upstream[t] for t in range(n)]
        grad_preds = [None] * n
        if any(active):
            inputs = [grads[t] if active[t] else grads[t].new_empty(0) for t in range(n)]
            args = (grad_scale, grad_total, weights if ctx.has_weights else None, list(grad_losses))
            if _graph_released_after_backward():
                # The saved gradients die with the graph: scale them in place and hand them on (peak memory: one
                # gradient per task instead of two).
                RUNNERS[ctx.backend][2](inputs, *args)
                scaled = inputs
            else:
                scaled = RUNNERS[ctx.backend][1](inputs, *args)
            grad_preds = [scaled[t] if active[t] else None for t in range(n)]
            grad_preds = _refuse_double_backward(grad_preds)
        grad_weights = None
        if ctx.has_weights and ctx.needs_input_grad[3] and grad_total is not None:
            grad_weights = grad_total * torch.stack(losses)
        return (None, None, None, grad_weights, *grad_preds, *([None] * (2 * n)))


def _weight_vector(names, weights, like: torch.Tensor):
    """The weights as a float32 [T] tensor on the device (None when every weight is the default 1.0).

    Float weights become device tensors with ``new_full`` (a fill, never a host-to-device copy); tensor weights keep
    their autograd history through ``torch.stack``.
    """
    if weights is None:
        return None
    values = [weights.get(name, 1.0) for name in names]
    if all(not isinstance(w, torch.Tensor) and float(w) == 1.0 for w in values):
        return None
    parts = [
        w.reshape(()).to(torch.float32) if isinstance(w, torch.Tensor) else like.new_full((), float(w), dtype=torch.float32)
        for w in values
    ]
    return torch.stack(parts)


def masked_multitask_loss(preds, targets, kinds, masks=None, weights=None, ignore_index: int = -100):
    """Weighted sum of masked per-task mean losses, each fused with its gradient.

    Args:
        preds: dict task -> prediction. "ce": logits ``[N, C]`` or ``[N, C, *spatial]`` (NCHW or channels_last);
            "bce": logits ``[N, *]``; "l1" / "mse": ``[N, *]``. float32 / float16 / bfloat16 (float64 too: the GPU
            backends hand it to the torch reference).
        targets: dict task -> target. "ce": int64 ``[N]`` / ``[N, *spatial]``; else a float tensor of the pred's
            shape, NaN marking an element without a label ("bce" targets in [0, 1]).
        kinds: dict task -> "ce", "bce", "l1" or "mse".
        masks: optional dict task -> bool ``[N]``, True where sample n is labelled (missing entry = all True).
        weights: optional dict task -> float or 0-dim tensor (which may require grad); missing entry = 1.0.
        ignore_index: "ce" target value marking an unlabelled element.

    Returns:
        ``(total, per_task)``: ``total = sum_t weights[t] * L_t`` and ``per_task[t] = L_t``, 0-dim float32 tensors
        (float64 for float64 preds). ``L_t`` is the mean element loss over valid elements (sample labelled and
        element labelled), exactly 0 with a zero gradient when there is none. ``total`` carries autograd to every
        pred and tensor weight (``d total / d w_t = L_t``); each ``per_task[t]`` carries autograd to pred t alone.

    Errors: KeyError / TypeError / ValueError for bad arguments, before any kernel runs. A "ce" class index outside
    ``[0, C)`` (other than ignore_index) raises ValueError on the CPU; on CUDA the kernels skip it and
    ``fastmtl.debug()`` reports it. No host synchronisation otherwise.
    """
    names = validate(preds, targets, kinds, masks, weights, ignore_index)
    ignore_index = int(ignore_index)  # a NumPy integer too; the registered ops take a Python int
    first = preds[names[0]]
    backend = _selected_backend(first.device)
    if backend in ("cuda", "triton") and any(preds[n].dtype == torch.float64 for n in names):
        backend = "torch"  # float64 (gradient checks): the GPU kernels take float32 / float16 / bfloat16
    if backend in ("cpp", "cuda") and not HAS_NATIVE:
        raise backends.BackendUnavailableError(f"backend {backend!r} needs fastmtl._C, which is not built")
    if backend == "triton":
        _triton_module()
    # Eager cpp / cuda: the grouped native op, autograd in C++ (torch.compile traces the Python node below).
    native = backend in ("cpp", "cuda") and not torch.compiler.is_compiling()
    _check_class_range(names, preds, targets, kinds, ignore_index, cpu_checked_natively=native)
    masks = masks or {}
    if native:
        outputs = torch.ops.fastmtl.masked_multitask_loss(
            [preds[n] for n in names],
            [targets[n] for n in names],
            [masks.get(n) for n in names],
            [kinds[n] for n in names],
            names,
            ignore_index,
            _weight_vector(names, weights, first),
        )
        return outputs[0], dict(zip(names, outputs[1:]))
    outputs = _MaskedMultitaskLoss.apply(
        backend,
        tuple(kinds[n] for n in names),
        ignore_index,
        _weight_vector(names, weights, first),
        *(preds[n] for n in names),
        *(targets[n] for n in names),
        *(masks.get(n) for n in names),
    )
    return outputs[0], dict(zip(names, outputs[1:]))
