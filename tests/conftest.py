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

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a visible CUDA GPU")



@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
