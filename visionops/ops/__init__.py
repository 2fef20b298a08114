"""The public op wrappers, one module per family: argument checks, docstrings with shapes, modules, and the family's
declarations in the op registry (visionops/_registry.py).

Every public module here (no leading underscore) is imported and its ``__all__`` exported, so a new family is one
new file and nothing to edit here.
"""

import importlib
import pkgutil

__all__ = []
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        _family = importlib.import_module(f"{__name__}.{_info.name}")
        __all__ += _family.__all__
        globals().update({_name: getattr(_family, _name) for _name in _family.__all__})
