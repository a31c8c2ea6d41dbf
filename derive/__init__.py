"""derive: verify hand-written gradient derivations with SymPy and generate kernels from them.

The loss functions (``sigmoid_focal_loss`` and friends, each documented: ``help(derive.sigmoid_focal_loss)``)
live in :mod:`derive.runtime.losses` and are re-exported here lazily, so that ``import derive`` stays cheap
for users of the verifier alone.  ``derive.__all__`` is :data:`derive.runtime.losses.__all__` and the version.
``derive.kernels`` has every kernel of every shipped derivation file (``derive.kernels.asl(x, t)``),
``derive.shipped(MODULE)`` those of one file, ``derive.load(FILE)`` those of your own file
(:mod:`derive.runtime.kernel_files`).
"""

__version__ = "0.1.0"

_LAZY_MODULES = ("runtime.losses", "runtime.kernel_files")


def _public() -> list:
    from derive.runtime import losses

    return [*losses.__all__, "__version__"]


def __getattr__(name):  # PEP 562: lazy re-export of the kernel API (and of __all__, for `import *`)
    import importlib
    import importlib.util

    if name == "__all__":
        return _public()
    if name == "kernels":  # every shipped kernel, built once (it reads the shipped files' [[kernel]] tables)
        from derive.runtime import kernel_files

        globals()["kernels"] = kernel_files.shipped()
        return globals()["kernels"]
    if name.startswith("__") or importlib.util.find_spec(f"derive.{name}") is not None:
        # dunders, and `from derive import cli`: a submodule is imported by the import system, not
        # looked up in the (heavier) kernel modules
        raise AttributeError(f"module 'derive' has no attribute {name!r}")
    for mod in _LAZY_MODULES:
        try:
            module = importlib.import_module(f"derive.{mod}")
        except ModuleNotFoundError:
            continue
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'derive' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_public()))
