"""Drop-in modules: FusedConv2dReLU, FusedTrunk, fuse()."""
