"""The runtime: the generated kernels as functions a user calls.

:mod:`~derive.runtime.cbuild` compiles and caches the generated C; :mod:`~derive.runtime.losses`
holds the public losses (``derive.sigmoid_focal_loss`` and friends) built from the ``[[kernel]]``
declarations; :mod:`~derive.runtime.kernel_files` is ``derive.load(FILE)`` for a user's own file.
Previous stage: :mod:`derive.codegen`; next: :mod:`derive.measure`.
"""
