"""Triton kernels, each wrapped as its own custom op (``torch.ops.visionops.triton_*``), chosen with backend="triton".

Importing a submodule needs the `triton` package. Under ``TRITON_INTERPRET=1`` (set before importing visionops) the
kernels also run on CPU tensors, which is how the test-suite runs them without a GPU. Every public module here is
imported when triton is installed, so its ops exist as soon as visionops is imported.
"""

import importlib
import pkgutil

try:
    import triton  # noqa: F401
except ImportError:  # backend="triton" then raises a clear ValueError (visionops._registry)
    pass
else:
    for _info in pkgutil.iter_modules(__path__):
        if not _info.name.startswith("_") and _info.name != "compile_check":
            importlib.import_module(f"{__name__}.{_info.name}")
