"""Triton kernels of fastmtl, installed as the subpackage fastmtl.kernels."""
