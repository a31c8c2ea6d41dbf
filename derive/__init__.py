"""derive: verify hand-written gradient derivations with SymPy and generate kernels from them.

The loss functions (``sigmoid_focal_loss`` and friends) live in :mod:`derive.losses` and are
re-exported here lazily, so that ``import derive`` stays cheap for kernel users.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY_MODULES = ("losses",)


def __getattr__(name):  # PEP 562: lazy re-export of the kernel API
    import importlib

    for mod in _LAZY_MODULES:
        try:
            module = importlib.import_module(f"derive.{mod}")
        except ModuleNotFoundError:
            continue
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'derive' has no attribute {name!r}")
