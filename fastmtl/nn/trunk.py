"""Placeholder: FusedTrunk lands with its issue (see README)."""


def FusedTrunk(*args, **kwargs):
    """Not implemented yet."""
    raise NotImplementedError("FusedTrunk is not implemented yet")
