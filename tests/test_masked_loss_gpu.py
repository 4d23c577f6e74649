"""GPU backends of the per-task masked loss: the Triton kernels and the native CUDA op.

Without a GPU the Triton tests run in the interpreter (TRITON_INTERPRET=1, set by conftest) on small CPU tensors;
with a GPU the same tests run on CUDA tensors, and the ``@pytest.mark.cuda`` tests add the native CUDA op, large
shapes, CUDA graph capture, the sync-debug check and opcheck on the CUDA implementation.

The oracle is a float64 reference written here (independent of the op layer): element losses masked by
(sample mask AND element valid), mean over the valid count (0 when there is none), gradient by autograd.
"""

from __future__ import annotations

import pytest
import torch

from fastmtl.testing import TOLERANCES, rel_err

triton = pytest.importorskip("triton")

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Rows without a valid target compute -inf/NaN intermediates that the kernels mask out with tl.where; numpy (the
# interpreter's engine) warns about them.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
BF16_INTERPRETER = "bf16 arithmetic is wrong in the Triton interpreter (runs on a GPU only)"


@pytest.fixture(scope="module")
def tri():
    from fastmtl.ops import masked_loss_triton

    return masked_loss_triton


@pytest.fixture(scope="module")
def kernels():
    from fastmtl.kernels import masked_loss

    return masked_loss


# ---- reference and inputs -------------------------------------------------------------------------------------


def reference(pred, target, mask, kind, ignore_index=-100):
    """float64 (loss, grad) of one task."""
    p = pred.detach().to("cpu", torch.float64).requires_grad_()
    target = target.cpu()
    if kind == "ce":
        C = p.shape[1]
        valid = (target != ignore_index) & (target >= 0) & (target < C)
        logp = torch.log_softmax(p, dim=1)
        picked = logp.gather(1, torch.where(valid, target, 0).unsqueeze(1)).squeeze(1)
        elem = -picked
    else:
        t = target.to(torch.float64)
        valid = ~torch.isnan(t)
        t = torch.where(valid, t, 0.0)
        if kind == "bce":
            elem = torch.nn.functional.binary_cross_entropy_with_logits(p, t, reduction="none")
        elif kind == "l1":
            elem = (p - t).abs()
        else:
            elem = (p - t) ** 2
    if mask is not None:
        valid = valid & mask.cpu().view(-1, *([1] * (valid.dim() - 1)))
    count = valid.sum()
    loss = torch.where(valid, elem, 0.0).sum() / count.clamp(min=1)
    (grad,) = torch.autograd.grad(loss, p)
    return loss.detach(), grad


def make_mask(n, mode, device=DEVICE):
    if mode == "none":
        return None
    if mode == "empty":
        return torch.zeros(n, dtype=torch.bool, device=device)
    mask = torch.rand(n, device=device) > 0.4
    mask[0] = True
    return mask


def make_ce(shape, layout, dtype=torch.float32, C_out_of_range=True, device=DEVICE):
    pred = (3 * torch.randn(shape, device=device)).to(dtype)
    if layout == "channels_last":
        pred = pred.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    target = torch.randint(0, C, (shape[0],) + tuple(shape[2:]), device=device)
    flat = target.view(-1)
    flat[::5] = -100  # ignored
    if C_out_of_range and flat.numel() > 3:
        flat[1] = C + 3  # out of range: skipped, never read
        flat[3] = -7
    return pred, target


def make_dense(kind, shape, layout, dtype=torch.float32, device=DEVICE):
    pred = (2 * torch.randn(shape, device=device)).to(dtype)
    target = torch.rand(shape, device=device) if kind == "bce" else torch.randn(shape, device=device)
    target.view(-1)[::3] = float("nan")  # no label
    if layout == "channels_last":
        pred = pred.contiguous(memory_format=torch.channels_last)
        target = target.contiguous(memory_format=torch.channels_last)
    return pred, target


def check(out, pred, target, mask, kind, ignore_index=-100, dtype=torch.float32):
    loss, grad = out
    ref_loss, ref_grad = reference(pred, target, mask, kind, ignore_index)
    tol = TOLERANCES["loss"][dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == pred.dtype and grad.shape == pred.shape
    assert grad.stride() == pred.stride(), "grad must have pred's layout"
    if ref_loss.item() == 0.0:
        assert loss.item() == 0.0
        assert torch.count_nonzero(grad).item() == 0
    else:
        assert rel_err(loss, ref_loss) <= tol, (loss.item(), ref_loss.item())
        assert rel_err(grad, ref_grad) <= tol
    assert torch.isfinite(grad).all()


def skip_bf16_interpreter(dtype, device=DEVICE):
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip(BF16_INTERPRETER)


@pytest.fixture
def poisoned(kernels, monkeypatch):
    """Make the Triton launcher's outputs start as NaN, so a test fails unless every element is written."""
    alloc = kernels._alloc_outputs

    def poisoned_alloc(pred, compute_grad):
        loss, grad = alloc(pred, compute_grad)
        return loss.fill_(float("nan")), grad.fill_(float("nan"))

    monkeypatch.setattr(kernels, "_alloc_outputs", poisoned_alloc)


# ---- Triton (interpreter on CPU, or CUDA) -----------------------------------------------------------------------

CE_CASES = [
    ((37, 5), "contiguous"),  # [N, C]: one class block, rows as pixels
    ((6, 1500), "contiguous"),  # [N, C] with C over the class block: online softmax loop
    ((3, 13, 6, 7), "contiguous"),  # NCHW
    ((3, 13, 6, 7), "channels_last"),
    ((2, 40, 5, 3), "contiguous"),  # NCHW with C over the class block
    ((4, 6, 9), "contiguous"),  # [N, C, L]
]


@pytest.mark.parametrize("shape,layout", CE_CASES)
@pytest.mark.parametrize("mask_mode", ["none", "random", "empty"])
def test_triton_ce_parity(tri, poisoned, shape, layout, mask_mode):
    pred, target = make_ce(shape, layout)
    mask = make_mask(shape[0], mask_mode)
    before = pred.clone()
    check(tri.masked_loss(pred, target, mask, "ce", -100, True), pred, target, mask, "ce")
    assert torch.equal(pred, before), "pred must never be written"


@pytest.mark.parametrize("kind", ["bce", "l1", "mse"])
@pytest.mark.parametrize(
    "shape,layout",
    [((5, 3, 6, 4), "contiguous"), ((5, 3, 6, 4), "channels_last"), ((300, 1), "contiguous"), ((3, 5000), "contiguous")],
)
@pytest.mark.parametrize("mask_mode", ["none", "random", "empty"])
def test_triton_elementwise_parity(tri, poisoned, kind, shape, layout, mask_mode):
    pred, target = make_dense(kind, shape, layout)
    mask = make_mask(shape[0], mask_mode)
    before = pred.clone()
    check(tri.masked_loss(pred, target, mask, kind, -100, True), pred, target, mask, kind)
    assert torch.equal(pred, before), "pred must never be written"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["ce", "bce", "l1", "mse"])
def test_triton_low_precision(tri, poisoned, dtype, kind):
    skip_bf16_interpreter(dtype)
    mask = make_mask(4, "random")
    if kind == "ce":
        pred, target = make_ce((4, 13, 5, 6), "channels_last", dtype)
    else:
        pred, target = make_dense(kind, (4, 3, 5, 6), "contiguous", dtype)
    check(tri.masked_loss(pred, target, mask, kind, -100, True), pred, target, mask, kind, dtype=dtype)


def test_triton_fp16_target_with_fp32_pred(tri):
    pred, target = make_dense("mse", (4, 7, 3), "contiguous")
    target = target.half()
    mask = make_mask(4, "random")
    check(tri.masked_loss(pred, target, mask, "mse", -100, True), pred, target, mask, "mse")


def test_triton_ignore_index_inside_class_range(tri):
    pred, target = make_ce((4, 5, 3, 3), "contiguous", C_out_of_range=False)
    target.view(-1)[::2] = 2  # class 2 is the ignored one
    check(tri.masked_loss(pred, target, None, "ce", 2, True), pred, target, None, "ce", ignore_index=2)


@pytest.mark.parametrize("kind", ["ce", "bce", "l1", "mse"])
def test_triton_all_invalid_gives_zero(tri, poisoned, kind):
    """Every element ignored (not just masked samples): exactly 0.0 and an all-zero gradient, never NaN."""
    if kind == "ce":
        pred, target = make_ce((3, 4, 5), "contiguous")
        target.fill_(-100)
    else:
        pred, target = make_dense(kind, (3, 4, 5), "contiguous")
        target.fill_(float("nan"))
    loss, grad = tri.masked_loss(pred, target, None, kind, -100, True)
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad).item() == 0 and not torch.isnan(grad).any()


@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_triton_zero_samples(tri, kind):
    pred = torch.randn(0, 4, 3, device=DEVICE)
    target = torch.zeros(0, 3, dtype=torch.long, device=DEVICE) if kind == "ce" else torch.randn(0, 4, 3, device=DEVICE)
    loss, grad = tri.masked_loss(pred, target, None, kind, -100, True)
    assert loss.item() == 0.0 and grad.shape == pred.shape


@pytest.mark.parametrize("kind", ["ce", "l1"])
def test_triton_without_grad(tri, poisoned, kind):
    if kind == "ce":
        pred, target = make_ce((3, 6, 4, 4), "contiguous")
    else:
        pred, target = make_dense(kind, (3, 6, 4, 4), "contiguous")
    mask = make_mask(3, "random")
    loss, grad = tri.masked_loss(pred, target, mask, kind, -100, False)
    assert grad.numel() == 0
    assert rel_err(loss, reference(pred, target, mask, kind)[0]) <= 1e-5


def test_triton_strided_inputs(tri):
    """Non-collapsible / sliced inputs and a strided mask are handled (copied where needed), grads stay right."""
    big = torch.randn(6, 7, 8, 10, device=DEVICE)
    pred = big[::2, :, 1:7, ::2]  # spatial dims no longer one progression
    target = torch.randint(0, 7, (3, 6, 5), device=DEVICE)
    mask_store = torch.tensor([True, False, True, True, False, True], device=DEVICE)
    mask = mask_store[::2]
    loss, grad = tri.masked_loss(pred, target, mask, "ce", -100, True)
    ref_loss, ref_grad = reference(pred, target, mask, "ce")
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5

    pred = torch.randn(5, 12, device=DEVICE).t()  # [12, 5], dim 0 not outermost
    target = torch.randn(12, 5, device=DEVICE)
    mask = make_mask(12, "random")
    loss, grad = tri.masked_loss(pred, target, mask, "mse", -100, True)
    ref_loss, ref_grad = reference(pred, target, mask, "mse")
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5

    pred, target = make_dense("l1", (4, 3, 5, 6), "channels_last")
    target = target.contiguous()  # target layout differs from pred's
    loss, grad = tri.masked_loss(pred, target, None, "l1", -100, True)
    ref_loss, ref_grad = reference(pred, target, None, "l1")
    assert grad.stride() == pred.stride()
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5


def test_triton_bce_saturated_logits(tri):
    pred = torch.tensor([[30.0, -30.0, 80.0, -80.0, 0.0, 1e-3]], device=DEVICE)
    target = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.5, 1.0]], device=DEVICE)
    loss, grad = tri.masked_loss(pred, target, None, "bce", -100, True)
    ref_loss, ref_grad = reference(pred, target, None, "bce")
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("num_tasks", [1, 3, 10])  # 10 > 8 slots: two launches
def test_triton_scale_grads(tri, num_tasks):
    dtypes = [torch.float32, torch.float16] if DEVICE == "cpu" else DTYPES
    grads = []
    for i in range(num_tasks):
        g = torch.randn(2 + i, 3, 5, 4, device=DEVICE).to(dtypes[i % len(dtypes)])
        if i % 2:
            g = g.contiguous(memory_format=torch.channels_last)
        grads.append(g)
    grads.append(torch.randn(0, 3, device=DEVICE))
    scales = torch.randn(len(grads), device=DEVICE)
    before = [g.clone() for g in grads]
    outs = tri.scale_grads(grads, scales)
    for g, b, o, s in zip(grads, before, outs, scales):
        assert torch.equal(g, b), "inputs must not be written"
        assert o.dtype == g.dtype and o.shape == g.shape and o.stride() == g.stride()
        expected = (g.double() * s.double()).to(g.dtype)
        assert rel_err(o, expected) <= TOLERANCES["loss"][g.dtype]


@pytest.mark.parametrize("kind", ["ce", "bce"])
def test_triton_launch_count(kernels, kind):
    """Two launches per task forward (count, fused loss+grad); one grouped launch scales up to 8 tasks' grads."""
    launched = []

    def counting(kernel):
        launched.append(kernel)
        return kernel

    if kind == "ce":
        pred, target = make_ce((3, 5, 4, 2), "contiguous")
    else:
        pred, target = make_dense(kind, (3, 5, 4), "contiguous")
    kernels.masked_loss(pred, target, make_mask(3, "random"), kind, -100, True, launch=counting)
    assert len(launched) == 2
    launched.clear()
    kernels.scale_grads([torch.randn(3, 4, device=DEVICE) for _ in range(8)], torch.rand(8, device=DEVICE), counting)
    assert len(launched) == 1


def test_triton_opcheck(tri):
    pred, target = make_ce((3, 5, 4, 2), "channels_last")
    mask = make_mask(3, "random")
    torch.library.opcheck(torch.ops.fastmtl.masked_loss_triton.default, (pred, target, mask, "ce", -100, True))
    pred, target = make_dense("bce", (3, 2, 4), "contiguous")
    torch.library.opcheck(torch.ops.fastmtl.masked_loss_triton.default, (pred, target, None, "bce", -100, False))
    grads = [torch.randn(3, 4, device=DEVICE), torch.randn(2, 5, device=DEVICE)]
    torch.library.opcheck(
        torch.ops.fastmtl.masked_loss_scale_grads_triton.default, (grads, torch.rand(2, device=DEVICE))
    )


# ---- CUDA (native op and Triton on the GPU) ---------------------------------------------------------------------


def _native():
    from fastmtl import _native

    ok, why = _native.load("_C_cuda")
    if not ok:
        pytest.fail(f"the CUDA extension must be built on a GPU machine: {why}")
    return torch.ops.fastmtl.masked_loss


def _run(backend, tri, pred, target, mask, kind, ignore_index=-100, compute_grad=True):
    if backend == "cuda":
        return _native()(pred, target, mask, kind, ignore_index, compute_grad)
    return tri.masked_loss(pred, target, mask, kind, ignore_index, compute_grad)


GPU_CE_CASES = CE_CASES + [((2, 300, 7), "contiguous"), ((5, 200), "contiguous"), ((7, 2), "contiguous")]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,layout", GPU_CE_CASES)
@pytest.mark.parametrize("mask_mode", ["none", "random", "empty"])
def test_gpu_ce_parity(tri, backend, dtype, shape, layout, mask_mode):
    pred, target = make_ce(shape, layout, dtype, device="cuda")
    mask = make_mask(shape[0], mask_mode, device="cuda")
    before = pred.clone()
    check(_run(backend, tri, pred, target, mask, "ce"), pred, target, mask, "ce", dtype=dtype)
    assert torch.equal(pred, before)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bce", "l1", "mse"])
@pytest.mark.parametrize(
    "shape,layout",
    [((5, 3, 6, 4), "contiguous"), ((5, 3, 6, 4), "channels_last"), ((300, 1), "contiguous"), ((3, 5001), "contiguous")],
)
@pytest.mark.parametrize("mask_mode", ["none", "random", "empty"])
def test_gpu_elementwise_parity(tri, backend, dtype, kind, shape, layout, mask_mode):
    pred, target = make_dense(kind, shape, layout, dtype, device="cuda")
    mask = make_mask(shape[0], mask_mode, device="cuda")
    before = pred.clone()
    check(_run(backend, tri, pred, target, mask, kind), pred, target, mask, kind, dtype=dtype)
    assert torch.equal(pred, before)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["ce", "bce", "l1", "mse"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gpu_triton_low_precision(tri, dtype, kind, layout):
    """Triton on the GPU in fp16/bf16 (fp32 Triton parity is covered by the unmarked tests, which run on CUDA)."""
    mask = make_mask(4, "random", device="cuda")
    if kind == "ce":
        pred, target = make_ce((4, 13, 5, 6), layout, dtype, device="cuda")
    else:
        pred, target = make_dense(kind, (4, 3, 5, 6), layout, dtype, device="cuda")
    check(tri.masked_loss(pred, target, mask, kind, -100, True), pred, target, mask, kind, dtype=dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_unaligned_and_strided(tri, backend):
    """Offsets that break 16-byte alignment take the scalar path; sliced preds are handled."""
    storage = torch.randn(3 * 1001 + 1, device="cuda")
    pred = storage[1:].view(3, 1001)  # 4-byte offset
    target = torch.randn(3 * 1001 + 1, device="cuda")[1:].view(3, 1001)
    target.view(-1)[::7] = float("nan")
    mask = make_mask(3, "random", device="cuda")
    check(_run(backend, tri, pred, target, mask, "mse"), pred, target, mask, "mse")
    big = torch.randn(6, 7, 8, 10, device="cuda")
    pred = big[::2, :, 1:7, ::2]
    target = torch.randint(0, 7, (3, 6, 5), device="cuda")
    loss, grad = _run(backend, tri, pred, target, None, "ce")
    ref_loss, ref_grad = reference(pred, target, None, "ce")
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_large_shapes(tri, layout, dtype):
    """The NYUv2-like sizes: 13-class segmentation 8x13x288x384, depth with holes, 3-channel normals, attributes."""
    mask = make_mask(8, "random", device="cuda")
    cases = [("ce", make_ce((8, 13, 288, 384), layout, dtype, device="cuda"))]
    for kind, shape in (("l1", (8, 1, 288, 384)), ("l1", (8, 3, 288, 384)), ("bce", (8, 40)), ("mse", (8, 1, 288, 384))):
        cases.append((kind, make_dense(kind, shape, layout if len(shape) == 4 else "contiguous", dtype, device="cuda")))
    for kind, (pred, target) in cases:
        ref_loss, ref_grad = reference(pred, target, mask, kind)
        tol = TOLERANCES["loss"][dtype]
        for backend in ("cuda", "triton"):
            loss, grad = _run(backend, tri, pred, target, mask, kind)
            assert grad.stride() == pred.stride()
            assert rel_err(loss, ref_loss) <= tol, (backend, kind)
            assert rel_err(grad, ref_grad) <= tol, (backend, kind)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_launch_count(tri, backend):
    """Kernels actually run on the GPU: 2 per task forward, 1 for the grouped gradient scaling."""
    pred, target = make_ce((4, 13, 16, 16), "contiguous", device="cuda")
    dpred, dtarget = make_dense("l1", (4, 1, 16, 16), "contiguous", device="cuda")
    mask = make_mask(4, "random", device="cuda")
    scale = torch.ops.fastmtl.masked_loss_scale_grads if backend == "cuda" else tri.scale_grads
    ce = _run(backend, tri, pred, target, mask, "ce")  # warm-up (Triton compiles)
    l1 = _run(backend, tri, dpred, dtarget, mask, "l1")
    scale([ce[1], l1[1]], torch.rand(2, device="cuda"))
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        ce = _run(backend, tri, pred, target, mask, "ce")
        torch.cuda.synchronize()
    forward_kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(forward_kernels) == 2, [e.name for e in forward_kernels]
    with torch.profiler.profile(activities=activities) as prof:
        scale([ce[1], l1[1]], torch.rand(2, device="cuda"))
        torch.cuda.synchronize()
    kernels_run = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    # torch.rand is one kernel, the grouped scaling is the other
    assert len(kernels_run) == 2, [e.name for e in kernels_run]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_scale_grads(tri, backend):
    grads = [torch.randn(4 + i, 3, 9, 7, device="cuda", dtype=DTYPES[i % 3]) for i in range(5)]
    grads[1] = grads[1].contiguous(memory_format=torch.channels_last)
    scales = torch.randn(len(grads), device="cuda")
    if backend == "cuda":
        _native()
        outs = torch.ops.fastmtl.masked_loss_scale_grads(grads, scales)
    else:
        outs = tri.scale_grads(grads, scales)
    for g, o, s in zip(grads, outs, scales):
        assert o.stride() == g.stride() and o.dtype == g.dtype
        assert rel_err(o, (g.double() * s.double()).to(g.dtype)) <= TOLERANCES["loss"][g.dtype]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_no_host_sync_and_graph_capture(tri, backend):
    """No host synchronisation (sync debug mode 'error'), and the loss is capturable in a CUDA graph and replays."""
    mask = make_mask(4, "random", device="cuda")
    pred, target = make_ce((4, 13, 16, 16), "contiguous", device="cuda")
    dpred, dtarget = make_dense("l1", (4, 1, 16, 16), "contiguous", device="cuda")
    scales = torch.rand(2, device="cuda")

    def step():
        ce = _run(backend, tri, pred, target, mask, "ce")
        l1 = _run(backend, tri, dpred, dtarget, mask, "l1")
        if backend == "cuda":
            outs = torch.ops.fastmtl.masked_loss_scale_grads([ce[1], l1[1]], scales)
        else:
            outs = tri.scale_grads([ce[1], l1[1]], scales)
        return ce[0], l1[0], outs

    step()  # compile / warm up outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ce_loss, l1_loss, outs = step()
    # new data in the captured input buffers, then replay
    pred.copy_(torch.randn_like(pred))
    dpred.copy_(torch.randn_like(dpred))
    graph.replay()
    torch.cuda.synchronize()
    ref_ce, ref_ce_grad = reference(pred, target, mask, "ce")
    ref_l1, ref_l1_grad = reference(dpred, dtarget, mask, "l1")
    assert rel_err(ce_loss, ref_ce) <= 1e-5 and rel_err(l1_loss, ref_l1) <= 1e-5
    assert rel_err(outs[0], ref_ce_grad * scales[0].double().cpu()) <= 1e-5
    assert rel_err(outs[1], ref_l1_grad * scales[1].double().cpu()) <= 1e-5


@pytest.mark.cuda
def test_gpu_opcheck_native():
    op = _native().default
    import fastmtl.ops.masked_loss  # noqa: F401  (registers the fake implementation and autograd)

    pred, target = make_ce((3, 5, 4, 2), "channels_last", device="cuda")
    torch.library.opcheck(op, (pred, target, make_mask(3, "random", device="cuda"), "ce", -100, True))
    pred, target = make_dense("mse", (3, 2, 4), "contiguous", device="cuda")
    torch.library.opcheck(op, (pred, target, None, "mse", -100, False))
    grads = [torch.randn(3, 4, device="cuda"), torch.randn(2, 5, device="cuda", dtype=torch.float16)]
    torch.library.opcheck(torch.ops.fastmtl.masked_loss_scale_grads.default, (grads, torch.rand(2, device="cuda")))


@pytest.mark.cuda
def test_gpu_opcheck_triton(tri):
    pred, target = make_ce((3, 5, 4, 2), "contiguous", device="cuda")
    torch.library.opcheck(torch.ops.fastmtl.masked_loss_triton.default, (pred, target, None, "ce", -100, True))
