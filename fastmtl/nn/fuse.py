"""Placeholder: fuse lands with its issue (see README)."""


def fuse(*args, **kwargs):
    """Not implemented yet."""
    raise NotImplementedError("fuse is not implemented yet")
