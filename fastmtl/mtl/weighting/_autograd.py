"""Autograd plumbing for gradient-level weighting: per-task gradients, head parameters, one trunk backward.

For each task ``t`` one ``torch.autograd.grad`` call returns its gradient with respect to the shared tensors
(``features`` in representation mode, ``shared_params`` in parameter mode) *and* to its own head's parameters.
Only the head is traversed in representation mode (the trunk lies behind ``features`` and is not needed), so the
K calls cost K head backwards (plus, for features computed from other features, the trunk between them);
the trunk is then back-propagated once with the combined gradient.

A task's head parameters are the leaves of its loss's graph reached without passing through the shared tensors
(``features``), found by walking ``grad_fn`` nodes; parameters listed as shared are never counted as a head's.
A parameter that several tasks reach behind the features (a shared neck) gets the sum of their gradients, as
under EW.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def as_tensor_list(tensors, what: str) -> list[torch.Tensor]:
    """Check ``tensors`` is a non-empty tensor or sequence of tensors; return it as a list."""
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    tensors = list(tensors)
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError(f"{what} must be a non-empty list of tensors")
    return tensors


def head_parameters(loss: torch.Tensor, stop_at: Sequence[torch.Tensor], exclude: Sequence[torch.Tensor]):
    """Leaf tensors requiring grad that ``loss`` depends on without going through ``stop_at`` (minus ``exclude``)."""
    if loss.grad_fn is None:
        return []
    # Node wrappers are kept alive in ``visited`` / ``stop_nodes`` so that their ids stay unique.
    stop_nodes = {id(n): n for n in (t.grad_fn for t in stop_at) if n is not None}
    skip = {id(t) for t in stop_at} | {id(t) for t in exclude}
    found, visited, stack = [], {}, [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited or id(node) in stop_nodes:
            continue
        visited[id(node)] = node
        leaf = getattr(node, "variable", None)
        if leaf is not None:
            if id(leaf) not in skip:
                found.append(leaf)
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def task_gradients(losses: Sequence[torch.Tensor], wrt: Sequence[torch.Tensor], stop_at: Sequence[torch.Tensor]):
    """Per-task gradients: ``([K, P] flattened gradients w.r.t. wrt, [[(head param, grad)] per task])``.

    The rows are float32 (float64 when ``wrt`` is float64); a tensor a task does not reach contributes zeros.
    """
    acc_dtype = torch.float64 if all(t.dtype == torch.float64 for t in wrt) else torch.float32
    sizes = [t.numel() for t in wrt]
    device = wrt[0].device
    grads = torch.empty(len(losses), sum(sizes), dtype=acc_dtype, device=device)
    head_grads = []
    live = [i for i, t in enumerate(wrt) if t.requires_grad]  # a frozen part of the trunk gets zeros
    for row, loss in enumerate(losses):
        heads = head_parameters(loss, stop_at, wrt)
        got = [None] * (len(wrt) + len(heads))
        if loss.requires_grad:  # a constant loss (e.g. a task with no label anywhere) has no gradient
            inputs = [wrt[i] for i in live] + heads
            if inputs:
                computed = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
                for i, g in zip(live, computed):
                    got[i] = g
                got[len(wrt) :] = computed[len(live) :]
        start = 0
        for size, g in zip(sizes, got[: len(wrt)]):
            part = grads[row, start : start + size]
            if g is None:
                part.zero_()
            else:
                part.copy_(g.reshape(-1))
            start += size
        head_grads.append([(p, g) for p, g in zip(heads, got[len(wrt) :]) if g is not None])
    return grads, head_grads


def _split_like(direction: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    pieces, start = [], 0
    for t in tensors:
        pieces.append(direction[start : start + t.numel()].view(t.shape).to(t.dtype))
        start += t.numel()
    return pieces


def backward_through(features: Sequence[torch.Tensor], direction: torch.Tensor) -> None:
    """Back-propagate the combined ``[P]`` gradient of the representation through the trunk, once.

    The per-task gradients are total derivatives: when one feature feeds another (multi-scale trunks), the
    gradient of the earlier one already contains the path through the later one. A hook therefore *replaces*
    the gradient arriving at each feature by its combined total, so that no path is counted twice.
    """
    pairs = [(t, g) for t, g in zip(features, _split_like(direction, features)) if t.requires_grad]
    if not pairs:
        return
    handles = [t.register_hook(lambda _incoming, total=g: total) for t, g in pairs] if len(pairs) > 1 else []
    try:
        torch.autograd.backward([t for t, _ in pairs], grad_tensors=[g for _, g in pairs])
    finally:
        for handle in handles:
            handle.remove()


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad.detach().to(param.dtype).clone()
    else:
        param.grad.add_(grad.to(param.grad.dtype))


def accumulate_into(params: Sequence[torch.Tensor], direction: torch.Tensor) -> None:
    """Add the combined ``[P]`` gradient into the shared parameters' ``.grad`` (parameter mode)."""
    with torch.no_grad():
        for p, g in zip(params, _split_like(direction, params)):
            _accumulate(p, g)


def accumulate_heads(head_grads, weights: torch.Tensor | None) -> None:
    """Add each head's own-task gradient into its ``.grad``, multiplied by the task weight when given."""
    with torch.no_grad():
        for task, pairs in enumerate(head_grads):
            for p, g in pairs:
                _accumulate(p, g if weights is None else g * weights[task].to(g.dtype))
