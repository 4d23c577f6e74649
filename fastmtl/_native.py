"""Loading of the compiled extensions, remembering why one is missing.

``fastmtl._C`` holds the op schemas and the C++ CPU kernels; ``fastmtl._C_cuda`` the CUDA kernels. Importing either
runs its ``TORCH_LIBRARY`` registrations. A missing extension is not an error here: the registry reports it and the
ops fall back to the PyTorch reference.
"""

from __future__ import annotations

import functools
import importlib


@functools.lru_cache(maxsize=None)
def load(module: str) -> tuple[bool, str]:
    """Import ``fastmtl.<module>`` once; return (loaded, reason it is not)."""
    if module == "_C_cuda":
        loaded, why = load("_C")  # the CUDA kernels register against the schemas in _C
        if not loaded:
            return False, f"needs fastmtl._C ({why})"
    try:
        importlib.import_module(f"fastmtl.{module}")
    except ImportError as exc:
        return False, f"not built ({exc})"
    return True, ""


def has_cpp() -> bool:
    """Whether the C++ CPU extension is importable."""
    return load("_C")[0]


def has_cuda_build() -> bool:
    """Whether the CUDA extension is importable (it imports without a GPU)."""
    return load("_C_cuda")[0]
