"""Shared by the masked-loss backend tests (test_masked_loss_triton.py, test_masked_loss_emulated.py,
test_masked_loss_gpu.py): the float64 oracle, input makers and the parity check.

The oracle is written here, independent of the op layer: element losses masked by (sample mask AND element valid),
mean over the valid count (0 when there is none), gradient by autograd.
"""

from __future__ import annotations

import pytest
import torch

from fastmtl.testing import TOLERANCES, rel_err

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BF16_INTERPRETER = "bf16 arithmetic is wrong in the Triton interpreter (runs on a GPU only)"

CE_CASES = [
    ((37, 5), "contiguous"),  # [N, C]: one class block, rows as pixels
    ((6, 1500), "contiguous"),  # [N, C] with C over the class block: online softmax loop
    ((3, 13, 6, 7), "contiguous"),  # NCHW
    ((3, 13, 6, 7), "channels_last"),
    ((2, 40, 5, 3), "contiguous"),  # NCHW with C over the class block
    ((4, 6, 9), "contiguous"),  # [N, C, L]
    ((2, 3, 48, 48), "contiguous"),  # S >= the count block: block-wise sample index
]


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
    """A [n] sample mask: None ("none"), all False ("empty"), or random with sample 0 labelled."""
    if mode == "none":
        return None
    if mode == "empty":
        return torch.zeros(n, dtype=torch.bool, device=device)
    mask = torch.rand(n, device=device) > 0.4
    mask[0] = True
    return mask


def make_ce(shape, layout, dtype=torch.float32, C_out_of_range=True, device=DEVICE):
    """Logits of `shape` (NCHW or channels_last) and int64 targets: every 5th ignored, two out of range."""
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
    """Predictions and float targets of `shape` for bce / l1 / mse, every 3rd target NaN (no label)."""
    pred = (2 * torch.randn(shape, device=device)).to(dtype)
    target = torch.rand(shape, device=device) if kind == "bce" else torch.randn(shape, device=device)
    target.view(-1)[::3] = float("nan")  # no label
    if layout == "channels_last":
        pred = pred.contiguous(memory_format=torch.channels_last)
        target = target.contiguous(memory_format=torch.channels_last)
    return pred, target


def check(out, pred, target, mask, kind, ignore_index=-100, dtype=torch.float32):
    """Assert that a backend's (loss, grad) matches the float64 reference within the dtype's tolerance."""
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
    """Skip a bf16 case on the CPU (the Triton interpreter), with the reason."""
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip(BF16_INTERPRETER)


def large_mse_task(device=DEVICE):
    """A float16 mse task whose differences (about 5e4) fit float16 but whose doubled element gradient 2 (p - t) does
    not: the partials mode must not overflow where the normalised gradient is finite."""
    pred = (3e4 + 100 * torch.rand(3, 40, device=device)).to(torch.float16)
    target = torch.full((3, 40), -2e4, device=device)
    target.view(-1)[::3] = float("nan")
    return pred, target, make_mask(3, "random", device=device), "mse"


def assert_bitwise_equal(a, b):
    """Assert that a and b (tensors, None, or nested lists and tuples of them) hold the same bytes."""
    for x, y in zip(a, b, strict=True):
        if isinstance(x, (list, tuple)):
            assert_bitwise_equal(x, y)
        elif x is not None or y is not None:
            a, b = (t.detach().reshape(-1).view(torch.uint8) for t in (x, y))
            assert torch.equal(a, b), "not bitwise the same"
