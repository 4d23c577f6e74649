"""The README's Python examples run as written, and the results its comments state hold.

Each ```python block of README.md is executed in order in one namespace that first defines the names the examples
leave to the reader (``logits``, ``images``, ``existing_conv``, ``grads``, ...), small and on the CPU.
"""

from __future__ import annotations

import os
import pathlib
import re

import pytest
import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    if not README.exists():
        pytest.skip("README.md is not beside the tests (installed package)")
    return re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.S | re.M)


def _reader_names() -> dict:
    """What the examples assume the reader has: a small labelled batch, images, a conv, per-task gradients."""
    torch.manual_seed(0)
    n = 4
    return {
        "logits": torch.randn(n, 10, requires_grad=True),
        "labels": torch.randint(0, 10, (n,)),
        "seg_logits": torch.randn(n, 5, 8, 8, requires_grad=True),
        "seg_labels": torch.randint(0, 5, (n, 8, 8)),
        "depth": torch.randn(n, 1, 8, 8, requires_grad=True),
        "depth_gt": torch.where(torch.rand(n, 1, 8, 8) < 0.2, float("nan"), torch.rand(n, 1, 8, 8)),
        "has_cls": torch.tensor([True, False, True, True]),
        "has_seg": torch.tensor([False, True, True, False]),
        "images": torch.randn(2, 3, 32, 32),
        "existing_conv": torch.nn.Conv2d(64, 128, 3, padding=1),
        "grads": torch.randn(2, 50),
    }


def _run_all() -> dict:
    pytest.importorskip("torchvision", reason="the README's fuse example uses torchvision's resnet18")
    namespace = _reader_names()
    for block in _python_blocks():
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102  (our own README)
    return namespace


@pytest.fixture(scope="module")
def readme_namespace():
    return _run_all()


def test_readme_has_examples():
    assert len(_python_blocks()) >= 5


def test_readme_backends_comment(readme_namespace):
    """"['torch', 'cpp'] on a CPU machine; + 'cuda', 'triton' with a GPU" (the tests also run Triton's
    interpreter on the CPU: TRITON_INTERPRET=1 makes 'triton' available there)."""
    import fastmtl

    names = fastmtl.available_backends()
    assert names[0] == "torch"
    if not torch.cuda.is_available():
        interpreter = {"triton"} if os.environ.get("TRITON_INTERPRET") == "1" else set()
        assert set(names) <= {"torch", "cpp"} | interpreter


def test_readme_conv_example(readme_namespace):
    """"== relu(conv2d(x, w, b, 1, 1))", and the backward reached the parameters."""
    ns = readme_namespace
    want = torch.relu(torch.nn.functional.conv2d(ns["x"], ns["w"].detach(), ns["b"].detach(), 1, 1))
    assert torch.allclose(ns["y"].detach(), want, rtol=1e-4, atol=1e-4)
    assert ns["w"].grad is not None and ns["b"].grad is not None


def test_readme_loss_example(readme_namespace):
    """The multi-task loss example: per-task losses for every task, gradients for every prediction."""
    ns = readme_namespace
    assert set(ns["per_task"]) == {"cls", "seg", "depth"}
    assert torch.isfinite(ns["total"]).item()
    for name in ("logits", "seg_logits", "depth"):
        assert ns[name].grad is not None and torch.isfinite(ns[name].grad).all()


def test_readme_fuse_report_comment(readme_namespace):
    """The counts in "# 9 fused, and why the other 11 convs were not" are what fuse reports for resnet18."""
    block = next(b for b in _python_blocks() if "fastmtl_fuse_report" in b)
    fused, left = re.search(r"# (\d+) fused, and why the other (\d+) convs", block).groups()
    report = str(readme_namespace["model"].fastmtl_fuse_report)
    assert f"fused {fused} convolution(s)" in report and f"left {left} alone" in report


def test_readme_trunk_comment(readme_namespace):
    """"one feature map per stage"."""
    assert len(readme_namespace["feats"]) == 3


def test_readme_weighting_comment(readme_namespace):
    """The strategies listed in the comment are exactly those weighting.available() returns."""
    block = next(b for b in _python_blocks() if "weighting.available()" in b)
    comment = re.search(r"weighting\.available\(\)\s+#(.*?)\ncombined", block, flags=re.S).group(1)
    listed = set(re.sub(r"[#|]", " ", comment).split())
    assert listed == set(readme_namespace["weighting"].available())
    assert readme_namespace["combined"].shape == (50,)
