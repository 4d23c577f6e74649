"""fastmtl: fast multi-task learning for CNNs.

Fused kernels (conv+bias+ReLU, masked multi-task loss) on four backends (torch, cpp, cuda, triton), drop-in
modules, and an MTL toolkit (``fastmtl.mtl``, ``fastmtl.data``).
"""

from fastmtl.backends import available_backends, set_backend, use_backend
from fastmtl.ops.conv_bias_relu import conv_bias_relu
from fastmtl.ops.masked_loss import masked_multitask_loss
from fastmtl.nn.conv import FusedConv2dReLU
from fastmtl.nn.trunk import FusedTrunk
from fastmtl.nn.fuse import fuse
from fastmtl.debug import debug

__version__ = "0.1.0"

__all__ = [
    "FusedConv2dReLU",
    "FusedTrunk",
    "__version__",
    "available_backends",
    "conv_bias_relu",
    "debug",
    "fuse",
    "masked_multitask_loss",
    "set_backend",
    "use_backend",
]
