"""``fastmtl.debug()``: a mode that allows host synchronisation to report errors kernels cannot raise.

Inside ``with fastmtl.debug():`` ops run extra checks that need the host to read device values, e.g. class indices
out of range in CUDA loss targets (which the kernels themselves skip, never reading out of bounds). Outside it, no op
synchronises with the host.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

_local = threading.local()


def enabled() -> bool:
    """Whether this thread is inside ``fastmtl.debug()``."""
    return getattr(_local, "depth", 0) > 0


@contextlib.contextmanager
def debug() -> Iterator[None]:
    """Enable checks that synchronise with the host for the ``with`` block (this thread only)."""
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1
