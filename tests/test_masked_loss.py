"""Parity of fastmtl.masked_multitask_loss with a float64 reference, on every backend that runs here.

Grid: kinds x shapes (incl. 3-channel l1 normals) x dtypes x layouts (NCHW, channels_last) x sample masks (none, all,
random, empty) x element holes (ignore_index for ce, NaN targets otherwise). Plus hypothesis-drawn cases, a
multi-task batch with weights, float64 gradcheck, and determinism across thread counts.
"""

from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmtl
from fastmtl.ops import masked_loss as masked_loss_ops
from fastmtl.reference import masked_loss as reference
from fastmtl.testing import TOLERANCES, rel_err

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HAS_TRITON_LOSS = masked_loss_ops.triton_available()  # the module imports: triton is installed


def backend_params():
    """torch and cpp always; triton when its module is installed (skipped otherwise, saying why)."""
    params = [pytest.param("torch"), pytest.param("cpp")]
    params.append(
        pytest.param(
            "triton",
            marks=pytest.mark.skipif(
                not HAS_TRITON_LOSS, reason="fastmtl.ops.masked_loss_triton cannot be imported (is triton installed?)"
            ),
        )
    )
    return params


def make_task(kind, shape, dtype=torch.float32, layout="contiguous", mask_kind="none", holes=False, ignore_index=-100):
    """Random (pred, target, mask) of one task. Holes: ~30% ignore_index (ce) or NaN (others) targets."""
    n = shape[0]
    pred = torch.randn(shape, dtype=torch.float32) * 2.0
    if kind == "ce":
        target = torch.randint(0, shape[1], (n, *shape[2:]))
        if holes:
            target[torch.rand(target.shape) < 0.3] = ignore_index
    else:
        target = torch.rand(shape) if kind == "bce" else torch.randn(shape)
        if holes:
            target[torch.rand(shape) < 0.3] = float("nan")
    pred = pred.to(dtype)
    if layout == "channels_last":
        pred = pred.contiguous(memory_format=torch.channels_last)
        if kind != "ce":
            target = target.contiguous(memory_format=torch.channels_last)
    mask = {
        "none": None,
        "all": torch.ones(n, dtype=torch.bool),
        "random": torch.arange(n) % 3 != 1,
        "empty": torch.zeros(n, dtype=torch.bool),
    }[mask_kind]
    return pred, target, mask


def run_one(backend, kind, pred, target, mask, ignore_index=-100, weight=None):
    """Loss and pred's gradient through the public API with one task."""
    pred = pred.detach().clone().requires_grad_(True)
    with fastmtl.use_backend(backend):
        total, per_task = fastmtl.masked_multitask_loss(
            {"t": pred},
            {"t": target},
            {"t": kind},
            masks=None if mask is None else {"t": mask},
            weights=None if weight is None else {"t": weight},
            ignore_index=ignore_index,
        )
    total.backward()
    return per_task["t"], pred.grad


def oracle(kind, pred, target, mask, ignore_index=-100):
    """float64 loss and gradient of the (already rounded) inputs."""
    tgt = target if kind == "ce" else target.double()
    return reference.masked_loss(pred.double(), tgt, mask, kind, ignore_index, True)


SHAPES = [
    ("ce", (6, 5)),
    ("ce", (3, 4, 5, 6)),
    ("ce", (2, 3, 17)),
    ("bce", (6, 4)),
    ("bce", (3, 1, 5, 6)),
    ("l1", (3, 3, 5, 6)),  # surface normals
    ("l1", (7,)),
    ("mse", (3, 1, 5, 6)),  # depth
    ("mse", (5, 3)),
]


@pytest.mark.parametrize("holes", [False, True], ids=["labelled", "holes"])
@pytest.mark.parametrize("mask_kind", ["none", "all", "random", "empty"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("kind,shape", SHAPES, ids=[f"{k}-{'x'.join(map(str, s))}" for k, s in SHAPES])
@pytest.mark.parametrize("backend", backend_params())
def test_parity_contiguous(backend, kind, shape, dtype, mask_kind, holes):
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("bf16 is wrong in the Triton interpreter")
    pred, target, mask = make_task(kind, shape, dtype, "contiguous", mask_kind, holes)
    loss, grad = run_one(backend, kind, pred, target, mask)
    ref_loss, ref_grad = oracle(kind, pred, target, mask)
    tol = TOLERANCES["loss"][dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == dtype and grad.shape == pred.shape
    assert rel_err(loss, ref_loss) <= tol
    assert rel_err(grad, ref_grad) <= tol
    if mask_kind == "empty":
        assert loss.item() == 0.0 and not grad.any()


@pytest.mark.parametrize("holes", [False, True], ids=["labelled", "holes"])
@pytest.mark.parametrize("mask_kind", ["none", "random", "empty"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("kind,shape", [s for s in SHAPES if len(s[1]) == 4], ids=lambda v: str(v))
@pytest.mark.parametrize("backend", backend_params())
def test_parity_channels_last(backend, kind, shape, dtype, mask_kind, holes):
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("bf16 is wrong in the Triton interpreter")
    pred, target, mask = make_task(kind, shape, dtype, "channels_last", mask_kind, holes)
    loss, grad = run_one(backend, kind, pred, target, mask)
    ref_loss, ref_grad = oracle(kind, pred, target, mask)
    tol = TOLERANCES["loss"][dtype]
    assert rel_err(loss, ref_loss) <= tol
    assert rel_err(grad, ref_grad) <= tol
    assert grad.stride() == pred.stride(), "the gradient must keep pred's layout"


@pytest.mark.parametrize("backend", backend_params())
def test_non_dense_pred_and_mixed_target_layout(backend):
    """A sliced (non-dense) pred and an NCHW target for a channels_last pred give the right values."""
    base = torch.randn(4, 6, 5, 6)
    pred = base[:, ::2]  # [4, 3, 5, 6], not dense
    target = torch.randn(4, 3, 5, 6)
    loss, grad = run_one(backend, "l1", pred, target, None)
    ref_loss, ref_grad = oracle("l1", pred, target, None)
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5
    pred_cl = torch.randn(4, 3, 5, 6).contiguous(memory_format=torch.channels_last)
    loss, grad = run_one(backend, "mse", pred_cl, target, None)
    ref_loss, ref_grad = oracle("mse", pred_cl, target, None)
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5
    pred_ce = base[:, :, :, ::2]  # [4, 6, 5, 3] strided logits
    target_ce = torch.randint(0, 6, (4, 5, 3))
    loss, grad = run_one(backend, "ce", pred_ce, target_ce, None)
    ref_loss, ref_grad = oracle("ce", pred_ce, target_ce, None)
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("ignore_index", [-100, 2, 255])
@pytest.mark.parametrize("backend", backend_params())
def test_custom_ignore_index(backend, ignore_index):
    pred = torch.randn(3, 4, 5, 6)
    target = torch.randint(0, 4, (3, 5, 6))
    target[:, 0] = ignore_index
    loss, grad = run_one(backend, "ce", pred, target, None, ignore_index=ignore_index)
    ref_loss, ref_grad = oracle("ce", pred, target, None, ignore_index)
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5
    if ignore_index == 2:  # class 2 is a real class here: its elements must be skipped, nothing else
        assert not grad.permute(0, 2, 3, 1)[target == 2].any()


@pytest.mark.parametrize("backend", backend_params())
def test_multitask_batch_with_weights(backend):
    """Four tasks of every kind at once, float weights: total and each gradient against the float64 composition."""
    tasks = {
        "seg": ("ce", (4, 5, 6, 7), "random", True),
        "depth": ("l1", (4, 1, 6, 7), "random", True),
        "normals": ("l1", (4, 3, 6, 7), "none", False),
        "attr": ("bce", (4, 6), "all", True),
        "cls": ("ce", (4, 10), "empty", False),
        "reg": ("mse", (4, 2), "none", True),
    }
    weights = {"seg": 1.0, "depth": 0.5, "normals": 2.0, "attr": 0.25, "cls": 3.0}
    preds, targets, kinds, masks = {}, {}, {}, {}
    for name, (kind, shape, mask_kind, holes) in tasks.items():
        pred, target, mask = make_task(kind, shape, torch.float32, "contiguous", mask_kind, holes)
        preds[name] = pred.requires_grad_(True)
        targets[name], kinds[name] = target, kind
        if mask is not None:
            masks[name] = mask
    with fastmtl.use_backend(backend):
        total, per_task = fastmtl.masked_multitask_loss(preds, targets, kinds, masks, weights)
    total.backward()
    ref_total = 0.0
    for name, kind in kinds.items():
        ref_loss, ref_grad = oracle(kind, preds[name].detach(), targets[name], masks.get(name))
        w = weights.get(name, 1.0)
        ref_total = ref_total + w * ref_loss
        assert rel_err(per_task[name], ref_loss) <= 1e-5, name
        assert rel_err(preds[name].grad, w * ref_grad) <= 1e-5, name
    assert rel_err(total, ref_total) <= 1e-5
    assert per_task["cls"].item() == 0.0


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(reference.KINDS),
    n=st.integers(1, 5),
    channels=st.integers(1, 7),
    spatial=st.lists(st.integers(1, 6), min_size=0, max_size=2),
    channels_last=st.booleans(),
    mask_p=st.sampled_from([None, 0.0, 0.5, 1.0]),
    hole_p=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_cpp_matches_reference(kind, n, channels, spatial, channels_last, mask_p, hole_p, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (n, channels, *spatial)
    pred = torch.randn(shape, generator=g) * 3
    if channels_last and len(shape) == 4:
        pred = pred.contiguous(memory_format=torch.channels_last)
    if kind == "ce":
        target = torch.randint(0, channels, (n, *spatial), generator=g)
        target[torch.rand(target.shape, generator=g) < hole_p] = -100
    else:
        target = torch.rand(shape, generator=g)
        target[torch.rand(shape, generator=g) < hole_p] = float("nan")
    mask = None if mask_p is None else torch.rand(n, generator=g) < mask_p
    loss, grad = run_one("cpp", kind, pred, target, mask)
    ref_loss, ref_grad = oracle(kind, pred, target, mask)
    assert rel_err(loss, ref_loss) <= 1e-5
    assert rel_err(grad, ref_grad) <= 1e-5
    assert torch.isfinite(grad).all() and torch.isfinite(loss)


@pytest.mark.parametrize("kind", reference.KINDS)
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck_float64(backend, kind):
    """float64 preds use float64 math on these backends, so autograd's gradcheck applies."""
    shape = (3, 4, 3, 2)
    pred, target, mask = make_task(kind, shape, torch.float64, "contiguous", "random", True)
    if kind == "l1":
        pred = pred + 0.1 * torch.sign(pred - target.double().nan_to_num())  # stay away from the kink at 0
    pred = pred.detach().requires_grad_(True)

    def f(x):
        with fastmtl.use_backend(backend):
            total, per_task = fastmtl.masked_multitask_loss({"t": x}, {"t": target}, {"t": kind}, {"t": mask})
        return total

    assert torch.autograd.gradcheck(f, (pred,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind,shape", [("ce", (4, 13, 24, 20)), ("ce", (64, 10)), ("l1", (4, 3, 24, 20))])
def test_cpp_deterministic_across_thread_counts(kind, shape):
    """Reductions use fixed work items combined in order: bitwise equal results with 1 and 2 threads."""
    pred, target, mask = make_task(kind, shape, torch.float32, "contiguous", "random", True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        loss1, grad1 = torch.ops.fastmtl.masked_loss(pred, target, mask, kind, -100, True)
        torch.set_num_threads(2)
        loss2, grad2 = torch.ops.fastmtl.masked_loss(pred, target, mask, kind, -100, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(loss1, loss2) and torch.equal(grad1, grad2)


def test_cpp_ce_large_class_count():
    """[N, C] rows with a vocabulary-sized C (online softmax over many classes)."""
    pred = torch.randn(8, 5000) * 4
    target = torch.randint(0, 5000, (8,))
    target[3] = -100
    loss, grad = run_one("cpp", "ce", pred, target, None)
    ref_loss, ref_grad = oracle("ce", pred, target, None)
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5


def test_cpp_extreme_logits_stay_finite():
    """Large logits (|x| ~ 1e4) must not overflow the softmax or the bce log-sigmoid."""
    pred = torch.randn(4, 6, 3, 3) * 1e4
    target = torch.randint(0, 6, (4, 3, 3))
    loss, grad = run_one("cpp", "ce", pred, target, None)
    ref_loss, ref_grad = oracle("ce", pred, target, None)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5
    y = torch.rand(4, 6, 3, 3)
    loss, grad = run_one("cpp", "bce", pred, y, None)
    ref_loss, ref_grad = oracle("bce", pred, y, None)
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5


def backend_device_params():
    """backend_params() on the CPU, and the cuda and triton backends on a GPU (``@pytest.mark.cuda``)."""
    cpu = [pytest.param(p.values[0], "cpu", marks=p.marks, id=f"{p.values[0]}-cpu") for p in backend_params()]
    return cpu + [pytest.param(b, "cuda", marks=pytest.mark.cuda, id=f"{b}-cuda") for b in ("cuda", "triton")]


# (bce with a +inf logit is left out: its loss is inf or NaN depending on the target, inf - inf)
@pytest.mark.parametrize(("kind", "value"), [("ce", float("nan")), ("ce", float("inf")), ("bce", float("nan"))])
@pytest.mark.parametrize("layout", ["rows", "nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("backend, device", backend_device_params())
def test_non_finite_logits_show_as_in_pytorch(backend, device, dtype, layout, kind, value):
    """A NaN or +inf logit (a diverging model, a low-precision overflow) must not be hidden: the loss and the
    gradient are NaN exactly where the float64 reference's are, and equal to it elsewhere."""
    if backend == "triton" and dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("bf16 is wrong in the Triton interpreter")
    shape = (4, 5) if layout == "rows" else (3, 5, 4, 6)
    pred = torch.randn(shape, device=device).to(dtype)
    if layout == "channels_last":
        pred = pred.contiguous(memory_format=torch.channels_last)
    where = (1, 2) if layout == "rows" else (1, 2, 3, 1)
    pred[where] = value
    if kind == "ce":
        target = torch.randint(0, 5, (shape[0], *shape[2:]), device=device)
    else:
        target = torch.rand(shape, device=device)
    loss, grad = run_one(backend, kind, pred, target, None)
    ref_loss, ref_grad = oracle(kind, pred, target, None)
    assert torch.isnan(ref_loss) and torch.isnan(loss)
    assert torch.equal(torch.isnan(grad), torch.isnan(ref_grad))
    finite = ~torch.isnan(ref_grad)
    assert rel_err(grad[finite], ref_grad[finite]) <= TOLERANCES["loss"][dtype]


@pytest.mark.parametrize("backend, device", backend_device_params())
@pytest.mark.parametrize("shape", [(2, 20, 3, 4), (3, 20)])
def test_very_negative_logits_keep_their_softmax(backend, device, shape):
    """Every logit at -1e31 (e.g. masked_fill with a huge negative): the softmax is uniform, loss log(C)."""
    pred = torch.full(shape, -1e31, device=device)
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]), device=device)
    loss, grad = run_one(backend, "ce", pred, target, None)
    ref_loss, ref_grad = oracle("ce", pred, target, None)
    assert rel_err(loss, ref_loss) <= 1e-6 and rel_err(grad, ref_grad) <= 1e-6
