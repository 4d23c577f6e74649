"""masked_multitask_loss: one test per known fused-loss bug class, autograd semantics, opcheck, torch.compile,
validation errors, the class-range check, and CUDA tests (cuda backend parity, no host sync, CUDA graph capture)."""

from __future__ import annotations

import csv

import pytest
import torch

import fastmtl
from fastmtl import backends
from fastmtl.ops import masked_loss as masked_loss_ops
from fastmtl.reference import masked_loss as reference
from fastmtl.testing import assert_scales_in_place_like_copy, cpu_peak_bytes, rel_err

HAS_TRITON_LOSS = masked_loss_ops.triton_available()  # the module imports: triton is installed
CPU_BACKENDS = ["torch", "cpp"] + (["triton"] if HAS_TRITON_LOSS else [])
TOLERANCES_BY_DTYPE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def batch(device="cpu", dtype=torch.float32, requires_grad=True):
    """A small 4-task batch: (preds, targets, kinds, masks)."""
    n = 4
    preds = {
        "seg": torch.randn(n, 5, 6, 7, device=device, dtype=dtype),
        "depth": torch.randn(n, 1, 6, 7, device=device, dtype=dtype),
        "attr": torch.randn(n, 3, device=device, dtype=dtype),
        "cls": torch.randn(n, 10, device=device, dtype=dtype),
    }
    for p in preds.values():
        p.requires_grad_(requires_grad)
    targets = {
        "seg": torch.randint(0, 5, (n, 6, 7), device=device),
        "depth": torch.randn(n, 1, 6, 7, device=device),
        "attr": torch.rand(n, 3, device=device),
        "cls": torch.randint(0, 10, (n,), device=device),
    }
    targets["depth"][:, :, :2] = float("nan")
    kinds = {"seg": "ce", "depth": "l1", "attr": "bce", "cls": "ce"}
    masks = {"seg": torch.tensor([True, False, True, True], device=device), "cls": torch.tensor([1, 1, 0, 1], device=device).bool()}
    return preds, targets, kinds, masks


def reference_grads(preds, targets, kinds, masks):
    """float64 (loss, grad) per task."""
    out = {}
    for name, kind in kinds.items():
        tgt = targets[name] if kind == "ce" else targets[name].double()
        out[name] = reference.masked_loss(preds[name].detach().double(), tgt, masks.get(name), kind, -100, True)
    return out


# ---- bug classes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_elements_ignored_gives_zero_loss_and_zero_grad(backend):
    preds, targets, kinds, _ = batch()
    targets["seg"].fill_(-100)
    targets["cls"].fill_(-100)
    targets["depth"].fill_(float("nan"))
    targets["attr"].fill_(float("nan"))
    with fastmtl.use_backend(backend):
        total, per_task = fastmtl.masked_multitask_loss(preds, targets, kinds)
    total.backward()
    assert total.item() == 0.0
    for name in preds:
        assert per_task[name].item() == 0.0
        assert torch.isfinite(preds[name].grad).all() and not preds[name].grad.any()
    # all samples masked out, with NaN logits at the masked samples: still exactly zero, no NaN leaks
    preds, targets, kinds, _ = batch()
    with torch.no_grad():
        for p in preds.values():
            p.fill_(float("nan"))
    masks = {name: torch.zeros(4, dtype=torch.bool) for name in preds}
    with fastmtl.use_backend(backend):
        total, per_task = fastmtl.masked_multitask_loss(preds, targets, kinds, masks)
    total.backward()
    assert total.item() == 0.0
    for name in preds:
        assert not preds[name].grad.isnan().any() and not preds[name].grad.any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_preds_are_never_modified(backend):
    preds, targets, kinds, masks = batch()
    before = {k: v.detach().clone() for k, v in preds.items()}
    with fastmtl.use_backend(backend):
        total, per_task = fastmtl.masked_multitask_loss(preds, targets, kinds, masks)
    total.backward()
    for name in preds:
        assert torch.equal(preds[name].detach(), before[name]), name
        assert preds[name].grad.data_ptr() != preds[name].data_ptr()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_upstream_gradient_other_than_one(backend):
    preds, targets, kinds, masks = batch()
    ref = reference_grads(preds, targets, kinds, masks)
    with fastmtl.use_backend(backend):
        total, per_task = fastmtl.masked_multitask_loss(preds, targets, kinds, masks)
    names = list(preds)
    # total with 3.5, and per_task["seg"] with -0.25 on top: seg gets (3.5 - 0.25) x its gradient
    grads = torch.autograd.grad(
        (total, per_task["seg"]), [preds[n] for n in names], (torch.tensor(3.5), torch.tensor(-0.25))
    )
    for name, grad in zip(names, grads):
        scale = 3.5 - 0.25 if name == "seg" else 3.5
        assert rel_err(grad, scale * ref[name][1]) <= 1e-5, name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_preds_without_requires_grad_still_give_the_loss(backend):
    preds, targets, kinds, masks = batch(requires_grad=False)
    ref = reference_grads(preds, targets, kinds, masks)
    with fastmtl.use_backend(backend):
        total, per_task = fastmtl.masked_multitask_loss(preds, targets, kinds, masks)
    assert not total.requires_grad
    for name in preds:
        assert rel_err(per_task[name], ref[name][0]) <= 1e-5
    # mixed: only "depth" requires grad
    preds["depth"].requires_grad_(True)
    with fastmtl.use_backend(backend):
        total, per_task = fastmtl.masked_multitask_loss(preds, targets, kinds, masks)
    total.backward()
    assert rel_err(total, sum(r[0] for r in ref.values())) <= 1e-5
    assert rel_err(preds["depth"].grad, ref["depth"][1]) <= 1e-5
    assert preds["seg"].grad is None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_per_task_backward_gives_that_task_alone(backend):
    preds, targets, kinds, masks = batch()
    ref = reference_grads(preds, targets, kinds, masks)
    with fastmtl.use_backend(backend):
        total, per_task = fastmtl.masked_multitask_loss(preds, targets, kinds, masks, weights={"seg": 5.0})
    per_task["seg"].backward(retain_graph=True)
    assert rel_err(preds["seg"].grad, ref["seg"][1]) <= 1e-5  # the weight does not apply to per_task
    for name in ("depth", "attr", "cls"):
        assert preds[name].grad is None, name
    preds["seg"].grad = None
    per_task["depth"].backward(retain_graph=True)
    assert preds["seg"].grad is None and rel_err(preds["depth"].grad, ref["depth"][1]) <= 1e-5
    total.backward()  # the same graph still gives the weighted total afterwards
    assert rel_err(preds["seg"].grad, 5.0 * ref["seg"][1]) <= 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tensor_weights_get_the_task_loss_as_gradient(backend):
    preds, targets, kinds, masks = batch()
    ref = reference_grads(preds, targets, kinds, masks)
    w_seg = torch.tensor(0.7, requires_grad=True)
    log_var = torch.tensor(-0.3, requires_grad=True)  # uncertainty-style weight computed from a parameter
    weights = {"seg": w_seg, "depth": torch.exp(-log_var), "attr": 2.0}
    with fastmtl.use_backend(backend):
        total, per_task = fastmtl.masked_multitask_loss(preds, targets, kinds, masks, weights)
    total.backward()
    expected = 0.7 * ref["seg"][0] + torch.exp(torch.tensor(0.3, dtype=torch.float64)) * ref["depth"][0]
    expected = expected + 2.0 * ref["attr"][0] + ref["cls"][0]
    assert rel_err(total, expected) <= 1e-5
    assert rel_err(w_seg.grad, ref["seg"][0]) <= 1e-5
    assert rel_err(log_var.grad, -torch.exp(torch.tensor(0.3, dtype=torch.float64)) * ref["depth"][0]) <= 1e-5
    assert rel_err(preds["seg"].grad, 0.7 * ref["seg"][1]) <= 1e-5
    assert rel_err(preds["attr"].grad, 2.0 * ref["attr"][1]) <= 1e-5


def test_cpp_and_torch_backends_agree():
    """cpp and torch give the same results through the whole API (losses and gradients)."""
    preds, targets, kinds, masks = batch()
    out = {}
    for backend in ("torch", "cpp"):
        for p in preds.values():
            p.grad = None
        with fastmtl.use_backend(backend):
            total, per_task = fastmtl.masked_multitask_loss(preds, targets, kinds, masks)
        total.backward()
        out[backend] = (total.detach(), {k: p.grad.clone() for k, p in preds.items()})
    assert rel_err(out["cpp"][0], out["torch"][0]) <= 1e-6
    for name in preds:
        assert rel_err(out["cpp"][1][name], out["torch"][1][name]) <= 1e-6


# ---- registered ops ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,shape,layout,dtype",
    [
        ("ce", (3, 4, 5, 6), "contiguous", torch.float32),
        ("ce", (3, 4, 5, 6), "channels_last", torch.float16),
        ("ce", (6, 5), "contiguous", torch.bfloat16),
        ("bce", (3, 2, 4), "contiguous", torch.float32),
        ("l1", (3, 3, 5, 6), "channels_last", torch.float32),
        ("mse", (5,), "contiguous", torch.float16),
    ],
)
@pytest.mark.parametrize("compute_grad", [True, False])
def test_opcheck_masked_loss(kind, shape, layout, dtype, compute_grad):
    pred = torch.randn(shape, dtype=dtype)
    if layout == "channels_last":
        pred = pred.contiguous(memory_format=torch.channels_last)
    if kind == "ce":
        target = torch.randint(0, shape[1], (shape[0], *shape[2:]))
    else:
        target = torch.rand(shape)
    mask = torch.arange(shape[0]) % 2 == 0
    for m in (mask, None):
        pred_in = pred.detach().requires_grad_(compute_grad and dtype == torch.float32)
        torch.library.opcheck(torch.ops.fastmtl.masked_loss.default, (pred_in, target, m, kind, -100, compute_grad))


def _grouped_args(weights_require_grad: bool):
    """Arguments of fastmtl::masked_multitask_loss for the small batch (float32, masks partly given); the same
    values on every call."""
    torch.manual_seed(0)
    preds, targets, kinds, masks = batch()
    names = list(preds)
    weights = torch.tensor([0.5, 1.0, 2.0, 0.25], requires_grad=weights_require_grad)
    return (
        [preds[n] for n in names],
        [targets[n] for n in names],
        [masks.get(n) for n in names],
        [kinds[n] for n in names],
        names,
        -100,
        weights,
    )


@pytest.mark.parametrize("weighted", [True, False])
def test_opcheck_masked_multitask_loss(weighted):
    args = list(_grouped_args(weights_require_grad=weighted))
    if not weighted:
        args[-1] = None
    torch.library.opcheck(torch.ops.fastmtl.masked_multitask_loss.default, tuple(args))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck_masked_multitask_loss_forward(device):
    preds, targets, kinds, masks = batch(device, requires_grad=False)
    names = list(preds)
    args = (
        [preds[n] for n in names],
        [targets[n] for n in names],
        [masks.get(n) for n in names],
        [kinds[n] for n in names],
        -100,
        torch.tensor([0.5, 1.0, 2.0, 0.25], device=device),
        [True, False, True, True],
    )
    torch.library.opcheck(torch.ops.fastmtl.masked_multitask_loss_forward.default, args)


def _backward_case(device, with_total, with_weights):
    """Arguments of masked_multitask_loss_backward and the float64 result it must give."""
    grads = [
        torch.randn(3, 4, 5, 6, device=device).contiguous(memory_format=torch.channels_last),
        torch.randn(4, 3, device=device, dtype=torch.float16),
        torch.randn(0, device=device),  # a task without gradient
        torch.randn(5, 2100, device=device, dtype=torch.bfloat16),
        torch.randn(4, 6, device=device)[:, ::2],  # strided: scaled by ATen
    ]
    n = len(grads)
    grad_scale = torch.rand(n, device=device)
    grad_total = torch.rand((), device=device) if with_total else None
    weights = torch.rand(n, device=device) + 0.5 if with_weights else None
    grad_losses = [torch.rand((), device=device), None, None, torch.rand((), device=device), None]
    want = []
    for t, g in enumerate(grads):
        scale = 0.0
        if with_total:
            scale = grad_total.item() * (weights[t].item() if with_weights else 1.0)
        if grad_losses[t] is not None:
            scale += grad_losses[t].item()
        want.append(g.double() * scale * grad_scale[t].item())
    return (grads, grad_scale, grad_total, weights, grad_losses), want


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("with_total,with_weights", [(True, True), (True, False), (False, False)])
def test_masked_multitask_loss_backward_ops(device, with_total, with_weights):
    """out[t] = grads[t] * (grad_total * w_t + grad_losses[t]) * grad_scale[t], by copy and in place; opcheck."""
    args, want = _backward_case(device, with_total, with_weights)
    copy_op = torch.ops.fastmtl.masked_multitask_loss_backward
    inplace_op = torch.ops.fastmtl.masked_multitask_loss_backward_
    outs = copy_op(*args)
    grads = [g.clone() for g in args[0]]
    inplace_op(grads, *args[1:])
    for out, inplace, ref, g in zip(outs, grads, want, args[0]):
        assert out.shape == g.shape and out.dtype == g.dtype
        assert rel_err(out, ref) <= TOLERANCES_BY_DTYPE[g.dtype]
        assert torch.equal(inplace, out)
    torch.library.opcheck(copy_op.default, args)
    torch.library.opcheck(inplace_op.default, ([g.clone() for g in args[0]], *args[1:]))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_in_place_scaling_refuses_tensors_that_share_memory(device):
    g = torch.randn(4, 5, device=device)
    before = g.clone()
    scales = torch.rand(2, device=device)
    with pytest.raises(RuntimeError, match="memory location"):
        torch.ops.fastmtl.masked_loss_scale_grads_([g, g], scales)
    with pytest.raises(RuntimeError, match="memory location"):
        torch.ops.fastmtl.masked_multitask_loss_backward_([g, g[1:]], scales, None, None, [scales[0], None])
    assert torch.equal(g, before)


def test_grouped_native_op_matches_the_python_node():
    """The eager cpp path (one native op, C++ autograd) and the Python autograd node agree on values and gradients:
    total and per-task backward, tensor weights, a task without gradient."""
    from fastmtl.ops import masked_loss as op

    results = []
    for grouped in (True, False):
        preds, targets, masks, kinds, names, ignore_index, weights = _grouped_args(weights_require_grad=True)
        preds[1].requires_grad_(False)
        if grouped:
            outs = torch.ops.fastmtl.masked_multitask_loss(preds, targets, masks, kinds, names, ignore_index, weights)
            assert "MaskedMultitaskLossFunction" in outs[0].grad_fn.name()
        else:
            outs = op._MaskedMultitaskLoss.apply("cpp", tuple(kinds), ignore_index, weights, *preds, *targets, *masks)
        leaves = [p for p in preds if p.requires_grad] + [weights]
        by_total = torch.autograd.grad(3.0 * outs[0], leaves, retain_graph=True)
        by_task = torch.autograd.grad(outs[1] - outs[3], [preds[0], preds[2]])
        results.append((outs, by_total, by_task))
    (outs_a, total_a, task_a), (outs_b, total_b, task_b) = results
    for a, b in zip([*outs_a, *total_a, *task_a], [*outs_b, *total_b, *task_b]):
        assert rel_err(a, b) <= 1e-6


def test_grouped_native_op_in_inference_mode():
    """Below autograd (inference mode) the op runs its forward alone: the same losses, no gradient computed."""
    args = _grouped_args(weights_require_grad=False)
    want = torch.ops.fastmtl.masked_multitask_loss(*args)
    with torch.inference_mode():
        got = torch.ops.fastmtl.masked_multitask_loss(*args)
    assert all(not g.requires_grad for g in got)
    for a, b in zip(want, got):
        assert torch.equal(a.detach(), b)


def test_eager_cpp_takes_the_grouped_native_op():
    preds, targets, kinds, masks = batch()
    with fastmtl.use_backend("cpp"):
        total, _ = fastmtl.masked_multitask_loss(preds, targets, kinds, masks)
    assert "MaskedMultitaskLossFunction" in total.grad_fn.name()


def _scale_inputs():
    return [
        torch.randn(3, 4, 5, 6).contiguous(memory_format=torch.channels_last),
        torch.randn(4, 3, dtype=torch.float16),
        torch.randn(0),
        torch.randn(5, dtype=torch.bfloat16),
        torch.randn(4, 6)[:, ::2],  # not dense: scaled by ATen (in float32, as the dense kernel rounds)
        torch.randn(4, 6, dtype=torch.float16)[:, ::2],
        torch.randn(4, 6, dtype=torch.bfloat16)[:, ::2],
    ]


def test_opcheck_scale_grads_inplace():
    grads = _scale_inputs()
    scales = torch.rand(len(grads))
    torch.library.opcheck(torch.ops.fastmtl.masked_loss_scale_grads_.default, ([g.clone() for g in grads], scales))
    assert_scales_in_place_like_copy(
        torch.ops.fastmtl.masked_loss_scale_grads, torch.ops.fastmtl.masked_loss_scale_grads_, grads, scales
    )


def test_reference_scale_in_place_matches_copy():
    grads = _scale_inputs()
    assert_scales_in_place_like_copy(reference.scale_grads, reference.scale_grads_, grads, torch.rand(len(grads)))


class _ScalingSpy:
    """Records, per backward, whether the saved gradients were scaled by copy or in place.

    The Python backends (torch, triton) are spied on through ``RUNNERS``; the native grouped op (cpp) scales from its
    C++ backward, so its calls of the two scaling ops are read from the profiler instead.
    """

    OPS = {"fastmtl::masked_multitask_loss_backward": "copy", "fastmtl::masked_multitask_loss_backward_": "in place"}

    def __init__(self, backend, monkeypatch):
        from fastmtl.ops import masked_loss as op

        self.backend, self.calls = backend, []
        if backend == "cpp":
            return
        forward, scale, scale_inplace = op.RUNNERS[backend]

        def spy_copy(grads, *args):
            self.calls.append("copy")
            return scale(grads, *args)

        def spy_inplace(grads, *args):
            self.calls.append("in place")
            scale_inplace(grads, *args)

        monkeypatch.setitem(op.RUNNERS, backend, (forward, spy_copy, spy_inplace))

    def run(self, fn):
        if self.backend != "cpp":
            return fn()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = fn()
        self.calls += [self.OPS[e.name] for e in prof.events() if e.name in self.OPS]
        return out


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_scales_in_place_only_when_the_graph_is_freed(backend, monkeypatch):
    """retain_graph keeps the saved gradients intact (copying scaling); the last backward scales them in place."""
    spy = _ScalingSpy(backend, monkeypatch)
    preds, targets, kinds, masks = batch()
    params = list(preds.values())
    with fastmtl.use_backend(backend):
        total, per_task = fastmtl.masked_multitask_loss(preds, targets, kinds, masks, weights={"seg": 0.5})
    first = spy.run(lambda: torch.autograd.grad(total, params, retain_graph=True))
    doubled = spy.run(lambda: torch.autograd.grad(total * 2, params, retain_graph=True))
    (seg,) = spy.run(lambda: torch.autograd.grad(per_task["seg"], preds["seg"], retain_graph=True))
    last = spy.run(lambda: torch.autograd.grad(total, params))
    assert spy.calls == ["copy", "copy", "copy", "in place"]
    for a, b, c in zip(first, doubled, last):
        assert rel_err(b, 2 * a) <= 1e-6, "a retained backward changed the saved gradients"
        assert torch.equal(a, c)
    assert rel_err(seg, 2 * first[0]) <= 1e-6  # the seg weight is 0.5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_create_graph_keeps_the_saved_gradients(backend):
    """create_graph=True (grad mode on in the backward) takes the copying scaling even without retain_graph."""
    preds, targets, kinds, masks = batch()
    params = list(preds.values())
    with fastmtl.use_backend(backend):
        total, _ = fastmtl.masked_multitask_loss(preds, targets, kinds, masks)
        want = torch.autograd.grad(total, params, retain_graph=True)
        got = torch.autograd.grad(total, params, create_graph=True, retain_graph=False)
    for a, b in zip(want, got):
        assert torch.equal(a, b.detach())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_second_derivative_raises_instead_of_being_zero(backend):
    """The gradients are computed in the forward (constants to autograd): differentiating them again must raise."""
    preds, targets, kinds, masks = batch()
    w = torch.tensor(0.5, requires_grad=True)
    with fastmtl.use_backend(backend):
        total, per_task = fastmtl.masked_multitask_loss(preds, targets, kinds, masks, weights={"seg": w})
    grads = torch.autograd.grad(total, list(preds.values()), create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        grads[0].square().sum().backward()  # e.g. a gradient penalty
    with pytest.raises(RuntimeError):  # the gradient is not connected to the preds: never a silent zero
        torch.autograd.grad(grads[0].sum(), preds["seg"])
    (seg_grad,) = torch.autograd.grad(per_task["seg"] * w, preds["seg"], create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        seg_grad.sum().backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_penalty_on_the_loss_gradient_raises(backend):
    """create_graph with a plain upstream gradient (nothing upstream requires grad): a penalty on d loss / d preds has
    a nonzero second derivative through the loss itself, which the op does not have: it must raise, not add zero."""
    preds, targets, kinds, masks = batch()
    with fastmtl.use_backend(backend):
        total, _ = fastmtl.masked_multitask_loss(preds, targets, kinds, masks)
    grads = torch.autograd.grad(total, list(preds.values()), create_graph=True)
    assert all(g.requires_grad for g in grads)
    with pytest.raises(RuntimeError, match="no second derivative"):
        sum(g.square().sum() for g in grads).backward()


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_backward_without_retain_allocates_no_gradient_sized_buffer(backend):
    """Peak memory: the freeing backward hands on the saved gradients; a retaining one must copy them."""
    pred = torch.randn(8, 13, 32, 32, requires_grad=True)
    target = torch.randint(0, 13, (8, 32, 32))
    with fastmtl.use_backend(backend):
        total, _ = fastmtl.masked_multitask_loss({"seg": pred}, {"seg": target}, {"seg": "ce"})
        retained = cpu_peak_bytes(lambda: torch.autograd.grad(total, [pred], retain_graph=True))
        freed = cpu_peak_bytes(lambda: torch.autograd.grad(total, [pred]))
    assert retained >= pred.nbytes
    assert freed < pred.nbytes // 8


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpp_forward_allocates_the_gradient_once(layout):
    """The forward's only pred-sized allocation is the saved gradient (no scratch copy of it)."""
    pred = torch.randn(8, 13, 32, 32, requires_grad=True)
    if layout == "channels_last":
        pred = pred.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    target = torch.randint(0, 13, (8, 32, 32))
    with fastmtl.use_backend("cpp"):
        peak = cpu_peak_bytes(lambda: fastmtl.masked_multitask_loss({"seg": pred}, {"seg": target}, {"seg": "ce"}))
    assert pred.nbytes <= peak < 1.25 * pred.nbytes


def test_opcheck_scale_grads():
    grads = [
        torch.randn(3, 4, 5, 6).contiguous(memory_format=torch.channels_last),
        torch.randn(4, 3, dtype=torch.float16),
        torch.randn(0),
        torch.randn(5, dtype=torch.bfloat16),
    ]
    scales = torch.rand(4)
    torch.library.opcheck(torch.ops.fastmtl.masked_loss_scale_grads.default, (grads, scales))
    out = torch.ops.fastmtl.masked_loss_scale_grads(grads, scales)
    for g, o, s in zip(grads, out, scales):
        assert o.stride() == g.stride() and o.dtype == g.dtype
        assert g.numel() == 0 or o.data_ptr() != g.data_ptr()
        assert rel_err(o, g.double() * s.double()) <= (1e-6 if g.dtype == torch.float32 else 1e-2)


def test_native_op_is_differentiable_on_its_own():
    pred = torch.randn(4, 5, requires_grad=True)
    target = torch.randint(0, 5, (4,))
    loss, _ = torch.ops.fastmtl.masked_loss(pred, target, None, "ce", -100, True)
    (2.0 * loss).backward()
    ref = reference.masked_loss(pred.detach().double(), target, None, "ce", -100, True)[1]
    assert rel_err(pred.grad, 2.0 * ref) <= 1e-6


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_torch_compile_fullgraph(backend):
    """The whole loss (forward + backward) traces without graph breaks and matches eager."""
    torch._dynamo.reset()
    preds, targets, kinds, masks = batch()
    w = torch.tensor(0.5, requires_grad=True)

    def loss_fn(seg, depth, attr, cls, w):
        p = {"seg": seg, "depth": depth, "attr": attr, "cls": cls}
        total, per_task = fastmtl.masked_multitask_loss(p, targets, kinds, masks, {"seg": w, "attr": 3.0})
        return total, per_task["depth"]

    args = [preds[n] for n in ("seg", "depth", "attr", "cls")] + [w]
    with fastmtl.use_backend(backend):
        compiled = torch.compile(loss_fn, fullgraph=True)
        total, depth = compiled(*args)
        (total + 0.5 * depth).backward()
        got = [a.grad.clone() for a in args]
        for a in args:
            a.grad = None
        total_e, depth_e = loss_fn(*args)
        (total_e + 0.5 * depth_e).backward()
    assert rel_err(total, total_e) <= 1e-6 and rel_err(depth, depth_e) <= 1e-6
    for g, a in zip(got, args):
        assert rel_err(g, a.grad) <= 1e-6
    torch._dynamo.reset()


# ---- validation ---------------------------------------------------------------------------------------------------


def _bad(**changes):
    preds, targets, kinds, masks = batch(requires_grad=False)
    args = {"preds": preds, "targets": targets, "kinds": kinds, "masks": masks, "weights": None}
    for key, fn in changes.items():
        args[key] = fn(args)
    return args


BAD_INPUTS = {
    "missing target": (KeyError, r"targets has no entry for task\(s\) \['cls'\]", dict(targets=lambda a: {k: v for k, v in a["targets"].items() if k != "cls"})),
    "missing kind": (KeyError, r"kinds has no entry", dict(kinds=lambda a: {k: v for k, v in a["kinds"].items() if k != "seg"})),
    "unknown mask key": (KeyError, r"masks has entries for unknown task\(s\) \['nope'\]", dict(masks=lambda a: {**a["masks"], "nope": torch.ones(4, dtype=torch.bool)})),
    "unknown weight key": (KeyError, r"weights has entries for unknown", dict(weights=lambda a: {"nope": 1.0})),
    "unknown kind": (ValueError, r"kinds\['attr'\] must be one of", dict(kinds=lambda a: {**a["kinds"], "attr": "hinge"})),
    "ce target dtype": (TypeError, r"targets\['seg'\] \(ce\) must be int64", dict(targets=lambda a: {**a["targets"], "seg": a["targets"]["seg"].int()})),
    "ce target shape": (ValueError, r"targets\['seg'\] \(ce\) must have shape \(4, 6, 7\)", dict(targets=lambda a: {**a["targets"], "seg": a["targets"]["seg"][:, :5]})),
    "l1 target shape": (ValueError, r"targets\['depth'\] \(l1\) must have the shape", dict(targets=lambda a: {**a["targets"], "depth": a["targets"]["depth"][:, 0]})),
    "l1 target dtype": (TypeError, r"targets\['depth'\] \(l1\) must be a float tensor", dict(targets=lambda a: {**a["targets"], "depth": a["targets"]["depth"].nan_to_num().long()})),
    "pred dtype": (TypeError, r"preds\['attr'\] must be float32", dict(preds=lambda a: {**a["preds"], "attr": a["preds"]["attr"].int()})),
    "pred not a tensor": (TypeError, r"preds\['attr'\] must be a torch.Tensor", dict(preds=lambda a: {**a["preds"], "attr": [1.0]})),
    "ce pred 1-D": (ValueError, r"preds\['cls'\] \(ce\) must be \[N, C\]", dict(preds=lambda a: {**a["preds"], "cls": torch.randn(4)}, targets=lambda a: {**a["targets"], "cls": torch.zeros(4, dtype=torch.long)})),
    "mask length": (ValueError, r"masks\['seg'\] must have shape \[N\] = \[4\]", dict(masks=lambda a: {"seg": torch.ones(3, dtype=torch.bool)})),
    "mask dtype": (TypeError, r"masks\['seg'\] must be a bool tensor", dict(masks=lambda a: {"seg": torch.ones(4)})),
    "weight type": (TypeError, r"weights\['seg'\] must be a float or a 0-dim tensor", dict(weights=lambda a: {"seg": "heavy"})),
    "weight shape": (ValueError, r"weights\['seg'\] must be a 0-dim tensor", dict(weights=lambda a: {"seg": torch.ones(2)})),
    "preds not a dict": (TypeError, r"preds must be a non-empty dict", dict(preds=lambda a: list(a["preds"].values()))),
    "empty preds": (TypeError, r"preds must be a non-empty dict", dict(preds=lambda a: {})),
    "targets not a dict": (TypeError, r"targets must be a dict", dict(targets=lambda a: list(a["targets"].values()))),
    "device mismatch": (ValueError, r"preds\['attr'\] is on meta", dict(preds=lambda a: {**a["preds"], "attr": a["preds"]["attr"].to("meta")})),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_validation_errors(case):
    exc, pattern, changes = BAD_INPUTS[case]
    with pytest.raises(exc, match=pattern):
        fastmtl.masked_multitask_loss(**_bad(**changes))


def test_bad_ignore_index_type():
    preds, targets, kinds, masks = batch(requires_grad=False)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        fastmtl.masked_multitask_loss(preds, targets, kinds, masks, ignore_index=1.5)
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        fastmtl.masked_multitask_loss(preds, targets, kinds, masks, ignore_index=2**63)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_numpy_integer_ignore_index(backend):
    """An ignore_index read from a NumPy array or config (np.int64) works as the same Python int."""
    np = pytest.importorskip("numpy")
    preds, targets, kinds, masks = batch(requires_grad=False)
    with fastmtl.use_backend(backend):
        want, _ = fastmtl.masked_multitask_loss(preds, targets, kinds, masks, ignore_index=3)
        got, _ = fastmtl.masked_multitask_loss(preds, targets, kinds, masks, ignore_index=np.int64(3))
    assert torch.equal(got, want)


@pytest.mark.parametrize("bad_class", [5, -1, 99])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_class_out_of_range_raises_on_cpu(backend, bad_class):
    preds, targets, kinds, masks = batch()
    targets["seg"][2, 3, 4] = bad_class
    with fastmtl.use_backend(backend), pytest.raises(ValueError, match=r"targets\['seg'\] \(ce\) holds a class index outside \[0, 5\)"):
        fastmtl.masked_multitask_loss(preds, targets, kinds, masks)
    with fastmtl.debug(), fastmtl.use_backend(backend), pytest.raises(ValueError, match="outside"):
        fastmtl.masked_multitask_loss(preds, targets, kinds, masks)


def test_cpp_kernel_skips_out_of_range_classes():
    """The kernel itself (what CUDA does without debug mode) treats out-of-range classes as ignored."""
    pred = torch.randn(3, 4, 5)
    target = torch.randint(0, 4, (3, 5))
    bad = target.clone()
    bad[0, 1] = 7
    bad[1, 2] = -3
    ignored = bad.clone()
    ignored[0, 1] = -100
    ignored[1, 2] = -100
    loss, grad = torch.ops.fastmtl.masked_loss(pred, bad, None, "ce", -100, True)
    ref_loss, ref_grad = reference.masked_loss(pred.double(), ignored, None, "ce", -100, True)
    assert rel_err(loss, ref_loss) <= 1e-6 and rel_err(grad, ref_grad) <= 1e-6


@pytest.mark.skipif(HAS_TRITON_LOSS, reason="fastmtl.ops.masked_loss_triton imports: the backend is available")
def test_triton_backend_not_available_error():
    preds, targets, kinds, masks = batch()
    with fastmtl.use_backend("triton"), pytest.raises(backends.BackendUnavailableError, match="not (available|installed)"):
        fastmtl.masked_multitask_loss(preds, targets, kinds, masks)


def _nan_weight_total(backend, device, no_samples=False):
    preds, targets, kinds, masks = batch(device)
    if no_samples:  # depth's batch is empty (N = 0, e.g. boolean-indexed to its labelled samples): no element at all
        preds["depth"] = preds["depth"].detach()[:0].requires_grad_()
        targets["depth"] = targets["depth"][:0]
    else:
        masks["depth"] = torch.zeros(4, dtype=torch.bool, device=device)  # no valid element: L_depth = 0
    with fastmtl.use_backend(backend):
        total, per_task = fastmtl.masked_multitask_loss(preds, targets, kinds, masks, {"depth": float("nan")})
    assert per_task["depth"].item() == 0.0
    return total


@pytest.mark.parametrize("no_samples", [False, True], ids=["all-masked", "no-samples"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_weight_on_a_task_without_labels_makes_the_total_nan(backend, no_samples):
    """weight * L_t with a NaN weight is NaN even when L_t is 0: a broken weight shows, the same on every backend,
    whether the task's samples are all masked out or it has none."""
    assert _nan_weight_total(backend, "cpu", no_samples).isnan().item()


# ---- CUDA (run on a lent GPU by benchmarks/gpu_check.sh) ---------------------------------------------------------


def _gpu_backends():
    out = []
    for name in ("cuda", "triton", "torch"):
        if backends.can_run(name, torch.device("cuda"))[0] and (name != "triton" or HAS_TRITON_LOSS):
            out.append(name)
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_backends_match_reference(dtype, layout):
    preds, targets, kinds, masks = batch("cuda", dtype)
    if layout == "channels_last":
        with torch.no_grad():
            preds = {k: (v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v).detach().requires_grad_(True) for k, v in preds.items()}
    ref = reference_grads(preds, targets, kinds, masks)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    for backend in _gpu_backends():
        for p in preds.values():
            p.grad = None
        with fastmtl.use_backend(backend):
            total, per_task = fastmtl.masked_multitask_loss(preds, targets, kinds, masks)
        total.backward()
        for name in preds:
            assert rel_err(per_task[name], ref[name][0]) <= tol, (backend, name)
            assert rel_err(preds[name].grad, ref[name][1]) <= tol, (backend, name)
            assert preds[name].grad.stride() == preds[name].stride(), (backend, name)


@pytest.mark.cuda
def test_cuda_no_host_sync():
    preds, targets, kinds, masks = batch("cuda")
    w = torch.tensor(0.5, device="cuda", requires_grad=True)
    for backend in _gpu_backends():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with fastmtl.use_backend(backend):
                total, per_task = fastmtl.masked_multitask_loss(preds, targets, kinds, masks, {"seg": w, "attr": 2.0})
            total.backward(retain_graph=True)
            per_task["depth"].backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "cuda"])
def test_cuda_float64_goes_to_the_reference(backend):
    preds, targets, kinds, masks = batch("cuda", torch.float64)
    ref = reference_grads(preds, targets, kinds, masks)
    with fastmtl.use_backend(backend):
        total, per_task = fastmtl.masked_multitask_loss(preds, targets, kinds, masks)
    total.backward()
    for name in preds:
        assert rel_err(per_task[name], ref[name][0]) <= 1e-12 and rel_err(preds[name].grad, ref[name][1]) <= 1e-12


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_multitask_loss_launches(backend):
    """Forward + backward of T tasks: cuda, a memset of the grouped forward's state and its one launch over every
    task; triton, T loss kernels, the last finalizing; then one scaling kernel that computes the scales itself. Plus
    the autograd engine's fill of the upstream gradient (torch.autograd.grad of a scalar)."""
    if backend == "triton" and not HAS_TRITON_LOSS:
        pytest.skip("triton is not installed")
    preds, targets, kinds, masks = batch("cuda")
    params = list(preds.values())

    def step():
        with fastmtl.use_backend(backend):
            total, _ = fastmtl.masked_multitask_loss(preds, targets, kinds, masks)
        return torch.autograd.grad(total, params)

    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if backend == "cuda":
        assert sum("grouped_forward_kernel" in k for k in kernels) == 1, kernels
        assert 2 <= len(kernels) <= 4, kernels
    else:
        assert len(preds) + 1 <= len(kernels) <= len(preds) + 2, kernels


def _cuda_step(preds, targets, kinds, masks):
    """One forward and backward of ``masked_multitask_loss`` on the cuda backend, under the environment as set:
    ([total, *per-task losses], the preds' gradients)."""
    with fastmtl.use_backend("cuda"):
        total, per_task = fastmtl.masked_multitask_loss(preds, targets, kinds, masks)
    return [total, *per_task.values()], list(torch.autograd.grad(total, list(preds.values())))


def _assert_gradients_equal_losses_close(outs):
    """Every run of ``outs`` ((losses, grads) pairs) against the first: gradients bitwise equal, losses and total
    within float32 rounding (slots summed in other groupings)."""
    for losses, grads in outs[1:]:
        for a, b in zip(outs[0][1], grads, strict=True):
            assert torch.equal(a, b)
        for a, b in zip(outs[0][0], losses, strict=True):
            assert abs(a.item() - b.item()) <= 1e-6 * abs(a.item())


@pytest.mark.cuda
def test_cuda_group_builds_agree_and_bad_values_raise(monkeypatch):
    """FASTMTL_CUDA_GROUP_BLOCKS (2 or 3 resident blocks per SM) and FASTMTL_CUDA_GROUP_PREFETCH (0 or 1: the loss
    tiles' reads prefetched to L2) pick the grouped forward's build: every build gives bitwise the same losses and
    gradients as the default; any other value raises, naming the variable."""
    preds, targets, kinds, masks = batch("cuda")
    outs = []
    for blocks in ("", "2", "3"):
        for prefetch in ("", "0", "1"):
            monkeypatch.setenv("FASTMTL_CUDA_GROUP_BLOCKS", blocks)
            monkeypatch.setenv("FASTMTL_CUDA_GROUP_PREFETCH", prefetch)
            losses, grads = _cuda_step(preds, targets, kinds, masks)
            outs.append([*losses, *grads])
    for out in outs[1:]:
        for a, b in zip(outs[0], out, strict=True):
            assert torch.equal(a, b)
    monkeypatch.setenv("FASTMTL_CUDA_GROUP_PREFETCH", "")
    for bad in ("4", "5"):
        monkeypatch.setenv("FASTMTL_CUDA_GROUP_BLOCKS", bad)
        with fastmtl.use_backend("cuda"), pytest.raises(RuntimeError, match="FASTMTL_CUDA_GROUP_BLOCKS must be 2 or 3"):
            fastmtl.masked_multitask_loss(preds, targets, kinds, masks)
    monkeypatch.setenv("FASTMTL_CUDA_GROUP_BLOCKS", "")
    for bad in ("2", "yes", "on"):
        monkeypatch.setenv("FASTMTL_CUDA_GROUP_PREFETCH", bad)
        with fastmtl.use_backend("cuda"), pytest.raises(RuntimeError, match="FASTMTL_CUDA_GROUP_PREFETCH must be 0 or 1"):
            fastmtl.masked_multitask_loss(preds, targets, kinds, masks)


@pytest.mark.cuda
def test_cuda_group_small_tail_keeps_gradients_and_a_bad_value_raises(monkeypatch):
    """FASTMTL_CUDA_GROUP_SMALL_TAIL=1 runs the grouped schedule's last wave of loss work as one-block tiles: gradients
    bitwise the same (each element is computed alike), losses within float32 rounding (slots summed in other
    groupings), with and without the prefetch; anything but 0 or 1 raises, naming the variable."""
    preds, targets, kinds, masks = batch("cuda")
    outs = []
    for value, prefetch in (("", ""), ("0", ""), ("1", ""), ("1", "1")):
        monkeypatch.setenv("FASTMTL_CUDA_GROUP_SMALL_TAIL", value)
        monkeypatch.setenv("FASTMTL_CUDA_GROUP_PREFETCH", prefetch)
        outs.append(_cuda_step(preds, targets, kinds, masks))
    _assert_gradients_equal_losses_close(outs)
    monkeypatch.setenv("FASTMTL_CUDA_GROUP_PREFETCH", "")
    for bad in ("2", "true"):
        monkeypatch.setenv("FASTMTL_CUDA_GROUP_SMALL_TAIL", bad)
        with fastmtl.use_backend("cuda"), pytest.raises(RuntimeError, match="FASTMTL_CUDA_GROUP_SMALL_TAIL must be 0 or 1"):
            fastmtl.masked_multitask_loss(preds, targets, kinds, masks)


@pytest.mark.cuda
def test_cuda_group_tile_kb_keeps_gradients_and_a_bad_value_raises(monkeypatch):
    """FASTMTL_CUDA_GROUP_TILE_KB sets how much a loss tile of the grouped forward moves (4 to 1024 KiB): gradients are
    bitwise the same for every tile size (each element is computed alike), losses and total within float32 rounding
    (slots summed in other groupings); anything else raises, naming the variable."""
    preds, targets, kinds, masks = batch("cuda")
    outs = []
    for value in ("", "4", "24", "96", "1024"):
        monkeypatch.setenv("FASTMTL_CUDA_GROUP_TILE_KB", value)
        outs.append(_cuda_step(preds, targets, kinds, masks))
    _assert_gradients_equal_losses_close(outs)
    for bad in ("3", "2000", "x", "-8", "48k"):
        monkeypatch.setenv("FASTMTL_CUDA_GROUP_TILE_KB", bad)
        with fastmtl.use_backend("cuda"), pytest.raises(RuntimeError, match="FASTMTL_CUDA_GROUP_TILE_KB must be"):
            fastmtl.masked_multitask_loss(preds, targets, kinds, masks)


@pytest.mark.cuda
def test_cuda_group_trace_records_every_tile(monkeypatch, tmp_path):
    """FASTMTL_CUDA_GROUP_TRACE=path: the grouped forward's results are bitwise unchanged, and the file holds one record
    per tile (tile ids 0..n-1, count tiles first, start <= counted <= end, a loss tile's count wait ending after its
    task's count tiles) and the finalize last; refused while capturing a CUDA graph."""
    preds, targets, kinds, masks = batch("cuda")

    def run():
        with fastmtl.use_backend("cuda"):
            total, per_task = fastmtl.masked_multitask_loss(preds, targets, kinds, masks)
        return [total, *per_task.values(), *torch.autograd.grad(total, list(preds.values()))]

    plain = run()
    path = tmp_path / "trace.csv"
    monkeypatch.setenv("FASTMTL_CUDA_GROUP_TRACE", str(path))
    traced = run()
    for a, b in zip(plain, traced, strict=True):
        assert torch.equal(a, b)
    rows = list(csv.DictReader(path.open()))
    finalize, tiles = rows[-1], rows[:-1]
    assert int(finalize["is_loss"]) == 2 and int(finalize["task"]) == -1
    assert [int(r["tile"]) for r in tiles] == list(range(len(tiles))) and len(tiles) >= 2 * len(preds)
    kinds_seen = [int(r["is_loss"]) for r in tiles]
    assert kinds_seen == sorted(kinds_seen) and set(kinds_seen) == {0, 1}
    for r in tiles:
        assert int(r["start_ns"]) <= int(r["counted_ns"]) <= int(r["end_ns"]) <= int(finalize["start_ns"])
        assert 0 <= int(r["task"]) < len(preds) and int(r["sm"]) >= 0
    for t in range(len(preds)):
        count_end = max(int(r["end_ns"]) for r in tiles if int(r["task"]) == t and r["is_loss"] == "0")
        assert all(int(r["counted_ns"]) >= count_end for r in tiles if int(r["task"]) == t and r["is_loss"] == "1")
    graph = torch.cuda.CUDAGraph()
    with fastmtl.use_backend("cuda"), pytest.raises(RuntimeError) as raised:
        with torch.cuda.graph(graph):
            fastmtl.masked_multitask_loss(preds, targets, kinds, masks)
    error, messages = raised.value, []
    while error is not None:  # ours, or the context of an error the end of the capture raised on top of it
        messages.append(str(error))
        error = error.__context__
    assert any("unset it while capturing" in m for m in messages), messages


def _chain_batch(name, dtype):
    """Batches for the GPU forwards' launch paths (CUDA grouped launch, or chain with a lead for mixed dtypes and
    more than 8 tasks; Triton finalize in the last launch)."""
    preds, targets, kinds, masks = batch("cuda", dtype)
    if name == "mse lead":  # the smallest gradient is an mse task, stored halved with factor 2 / count; its own
        # dtype makes the CUDA forward a chain
        aux_dtype = torch.float16 if dtype == torch.float32 else torch.float32
        preds["aux"] = torch.randn(4, 2, device="cuda", dtype=aux_dtype, requires_grad=True)
        targets["aux"] = torch.randn(4, 2, device="cuda")
        kinds["aux"] = "mse"
    elif name == "ten tasks":  # over Triton's 8 finalize slots
        for i in range(6):
            preds[f"extra{i}"] = torch.randn(4, 3 + i, device="cuda", dtype=dtype, requires_grad=True)
            targets[f"extra{i}"] = torch.randn(4, 3 + i, device="cuda")
            kinds[f"extra{i}"] = "l1"
    elif name == "one task with elements":
        for key in ("depth", "attr", "cls"):
            del preds[key], targets[key], kinds[key]
            masks.pop(key, None)
        preds["none"] = torch.randn(0, 3, device="cuda", dtype=dtype, requires_grad=True)
        targets["none"] = torch.randn(0, 3, device="cuda")
        kinds["none"] = "bce"
    return preds, targets, kinds, masks


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["four tasks", "mse lead", "ten tasks", "one task with elements"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_forward_paths_weighted_and_per_task(name, dtype):
    """Each launch path of the GPU forwards with a tensor weight that requires grad: the total's gradients (weighted),
    d total / d w = L_t, then one task's own backward (its per-task loss alone) for every task."""
    preds, targets, kinds, masks = _chain_batch(name, dtype)
    ref = reference_grads(preds, targets, kinds, masks)
    tols = {task: {torch.float32: 1e-5, torch.float16: 2e-3}[p.dtype] for task, p in preds.items()}
    first = next(iter(preds))
    for backend in _gpu_backends():
        w = torch.tensor(1.5, device="cuda", requires_grad=True)
        for p in preds.values():
            p.grad = None
        with fastmtl.use_backend(backend):
            scales = {task: 1.5 if i == 0 else 0.5 + 0.25 * i for i, task in enumerate(preds)}  # the lead's too
            weights = {task: w if task == first else scales[task] for task in preds}
            total, per_task = fastmtl.masked_multitask_loss(preds, targets, kinds, masks, weights)
            total.backward()
            for task, scale in scales.items():
                assert rel_err(per_task[task], ref[task][0]) <= tols[task], (backend, name, task)
                assert rel_err(preds[task].grad, scale * ref[task][1]) <= tols[task], (backend, name, task)
            assert rel_err(w.grad, ref[first][0]) <= tols[first], (backend, name)
            for task in preds:
                for p in preds.values():
                    p.grad = None
                _, per_task = fastmtl.masked_multitask_loss(preds, targets, kinds, masks)
                per_task[task].backward()
                assert rel_err(preds[task].grad, ref[task][1]) <= tols[task], (backend, name, task)


@pytest.mark.cuda
@pytest.mark.parametrize("no_samples", [False, True], ids=["all-masked", "no-samples"])
def test_cuda_nan_weight_on_a_task_without_labels_makes_the_total_nan(no_samples):
    for backend in _gpu_backends():
        assert _nan_weight_total(backend, "cuda", no_samples).isnan().item(), backend


@pytest.mark.cuda
def test_cuda_class_out_of_range_skipped_without_debug_and_raised_with_it():
    preds, targets, kinds, masks = batch("cuda")
    targets["seg"][0, 0, 0] = 17
    for backend in _gpu_backends():
        with fastmtl.use_backend(backend):
            total, per_task = fastmtl.masked_multitask_loss(preds, targets, kinds, masks)
            assert torch.isfinite(total).item()
            with fastmtl.debug(), pytest.raises(ValueError, match="outside"):
                fastmtl.masked_multitask_loss(preds, targets, kinds, masks)


@pytest.mark.cuda
def test_cuda_graph_capture_forward_and_backward():
    preds, targets, kinds, masks = batch("cuda")
    ref = reference_grads(preds, targets, kinds, masks)
    for backend in _gpu_backends():
        with fastmtl.use_backend(backend):
            static = {k: v.detach().clone().requires_grad_(True) for k, v in preds.items()}

            def step():
                for p in static.values():
                    p.grad = None
                total, _ = fastmtl.masked_multitask_loss(static, targets, kinds, masks, {"seg": 2.0})
                total.backward()
                return total

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm up (lazy init, allocator) outside the capture
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            for p in static.values():
                p.grad = None
            with torch.cuda.graph(graph):
                total_out = fastmtl.masked_multitask_loss(static, targets, kinds, masks, {"seg": 2.0})[0]
                grads_out = torch.autograd.grad(total_out, list(static.values()))
            graph.replay()
            torch.cuda.synchronize()
            expected = 2.0 * ref["seg"][0] + sum(ref[n][0] for n in ("depth", "attr", "cls"))
            assert rel_err(total_out, expected) <= 1e-5, backend
            for name, g in zip(static, grads_out):
                scale = 2.0 if name == "seg" else 1.0
                assert rel_err(g, scale * ref[name][1]) <= 1e-5, (backend, name)


def _unlabelled_logits_case(layout, device):
    """Cross-entropy logits with finite values, a copy with inf / -inf / NaN at every position without a label
    (ignored pixels, unlabelled samples), the targets and the sample mask."""
    g = torch.Generator().manual_seed(5)
    if layout in ("nchw", "channels_last"):
        n, c = 3, 5
        pred = torch.randn(n, c, 4, 8, generator=g)
        target = torch.randint(0, c, (n, 4, 8), generator=g)
        target[0, 0, :3] = -100
        target[2, 2, 2] = -100
        mask = torch.tensor([True, False, True])
        unlabelled = (target == -100)[:, None].expand_as(pred) | ~mask[:, None, None, None].expand_as(pred)
    else:  # [N, C] rows; "rows_t": a transposed view; "rows_expanded_mask": a stride-0 mask
        n, c = 7, 6
        pred = torch.randn(n, c, generator=g)
        target = torch.randint(0, c, (n,), generator=g)
        target[1] = -100
        mask = torch.ones(n, dtype=torch.bool)
        mask[4] = False
        if layout == "rows_expanded_mask":
            mask = torch.tensor([True]).expand(n)
        unlabelled = ((target == -100) | ~mask)[:, None].expand_as(pred)
    poison = torch.tensor([float("inf"), float("-inf"), float("nan")]).repeat(pred.numel())[: pred.numel()]
    poisoned = torch.where(unlabelled, poison.view_as(pred), pred)
    if layout == "channels_last":
        pred, poisoned = (t.contiguous(memory_format=torch.channels_last) for t in (pred, poisoned))
    if layout == "rows_t":
        pred, poisoned = (t.t().contiguous().t() for t in (pred, poisoned))
    to = lambda t: t.to(device)  # noqa: E731
    return to(pred), to(poisoned), to(target), to(mask), to(unlabelled)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows", "rows_t", "rows_expanded_mask"])
@pytest.mark.parametrize(
    "backend, device",
    [(b, "cpu") for b in CPU_BACKENDS] + [pytest.param(b, "cuda", marks=pytest.mark.cuda) for b in ("cuda", "triton")],
)
def test_nonfinite_logits_without_a_label_do_not_leak(backend, device, layout):
    """inf / NaN logits where no label is (ignored pixels, unlabelled samples; some kernels read them to load whole
    vectors) change neither the loss nor any gradient, and those positions get a zero gradient."""
    pred, poisoned, target, mask, unlabelled = _unlabelled_logits_case(layout, device)
    results = []
    for logits in (pred, poisoned):
        leaf = logits.detach().requires_grad_()
        with fastmtl.use_backend(backend):
            total, _ = fastmtl.masked_multitask_loss({"t": leaf}, {"t": target}, {"t": "ce"}, {"t": mask})
        total.backward()
        results.append((total.detach(), leaf.grad))
    (clean_total, clean_grad), (total, grad) = results
    assert torch.isfinite(total).item() and torch.isfinite(grad).all()
    assert rel_err(total, clean_total) <= 1e-6 and rel_err(grad, clean_grad) <= 1e-6
    assert (grad[unlabelled] == 0).all()


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
@pytest.mark.parametrize(
    "backend, device",
    [(b, "cpu") for b in CPU_BACKENDS] + [pytest.param(b, "cuda", marks=pytest.mark.cuda) for b in ("cuda", "triton")],
)
def test_confident_cross_entropy_keeps_its_precision(backend, device, layout):
    """Large logits with a clear winner (loss 3e-3 per pixel): the loss is (max - x[target]) + log(sum), not
    max + log(sum) - x[target], whose float32 rounding at the logits' magnitude (50: an ulp of 4e-6) costs 3.3e-4 of
    relative error here (2.3e-5 left, from the sum near 1)."""
    torch.manual_seed(0)
    n, c = 16, 10
    shape = (n * 8, c) if layout == "rows" else (n, c, 2, 4)
    logits = torch.full(shape, 42.0)
    target = torch.randint(0, c, (shape[0], *shape[2:]))
    logits.scatter_(1, target.unsqueeze(1), 50.0)  # the labelled class leads by 8 everywhere
    if layout == "channels_last":
        logits = logits.contiguous(memory_format=torch.channels_last)
    logits, target = logits.to(device), target.to(device)
    with fastmtl.use_backend(backend):
        _, per_task = fastmtl.masked_multitask_loss({"seg": logits}, {"seg": target}, {"seg": "ce"})
    want = torch.nn.functional.cross_entropy(logits.double(), target)
    assert 1e-3 < want.item() < 1e-2
    assert rel_err(per_task["seg"], want) <= 1e-4
