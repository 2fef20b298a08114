"""Triton kernels, each wrapped as its own custom op (``torch.ops.visionops.triton_*``), chosen with backend="triton".

Importing a submodule needs the `triton` package. Under ``TRITON_INTERPRET=1`` (set before importing visionops) the
kernels also run on CPU tensors, which is how the test-suite runs them without a GPU.
"""

try:
    import triton  # noqa: F401
except ImportError:  # backend="triton" then raises a clear ValueError (visionops._registry)
    pass
else:
    # each module registers its torch.ops.visionops.triton_* ops
    from visionops.triton import anchors, box_coder, nms, roi  # noqa: F401
