"""derive: verify hand-written gradient derivations with SymPy and generate kernels from them.

The loss functions (``sigmoid_focal_loss`` and friends) live in :mod:`derive.losses` and are
re-exported here lazily, so that ``import derive`` stays cheap for kernel users.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY_MODULES = ("losses",)

#: The public API: the loss functions (each documented: ``help(derive.sigmoid_focal_loss)``).
__all__ = [
    "sigmoid_cross_entropy",
    "binary_cross_entropy_with_logits",
    "binary_focal_loss",
    "sigmoid_focal_loss",
    "focal_loss_star",
    "softmax_cross_entropy",
    "softmax_focal_loss",
    "available_backends",
    "CBackendUnavailableWarning",
    "__version__",
]


def __dir__():
    return sorted(set(globals()) | set(__all__))


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
