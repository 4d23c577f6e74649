"""Drop-in modules: FusedConv2dReLU, FusedTrunk, fuse() (and fuse_report / FuseReport)."""

from fastmtl.nn.conv import FusedConv2dReLU
from fastmtl.nn.fuse import FuseReport, fuse, fuse_report
from fastmtl.nn.trunk import FusedTrunk

__all__ = ["FuseReport", "FusedConv2dReLU", "FusedTrunk", "fuse", "fuse_report"]
