"""Datasets for multi-task learning: :class:`MultiDigits` (embedded, no download)."""

from fastmtl.data.multidigits import MultiDigits

__all__ = ["MultiDigits"]
