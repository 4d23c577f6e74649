"""Shared test setup.

Without a GPU, Triton kernels run in the interpreter on CPU tensors: TRITON_INTERPRET must be set before any
kernel is defined, hence here, before fastmtl.kernels can be imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False



def pytest_collection_modifyitems(config, items):
    """Tests marked ``@pytest.mark.cuda`` skip, saying why, where no GPU is visible (they run in gpu_check.sh)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a visible CUDA GPU (runs in benchmarks/gpu_check.sh)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)



@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
