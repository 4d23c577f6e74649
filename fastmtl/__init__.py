"""fastmtl: fast multi-task learning for CNNs.

Fused kernels (conv+bias+ReLU, masked multi-task loss) on four backends (torch, cpp, cuda, triton), drop-in
modules, and an MTL toolkit (``fastmtl.mtl``, ``fastmtl.data``).
"""

from fastmtl.backends import available_backends, set_backend, use_backend
from fastmtl.ops.conv_bias_relu import conv_bias_relu

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "available_backends",
    "conv_bias_relu",
    "set_backend",
    "use_backend",
]
