"""Measurement: how accurate and how fast the kernels are.

:mod:`~derive.measure.reference` evaluates each kernel's original definitions with mpmath;
:mod:`~derive.measure.accuracy` is ``derive accuracy`` (errors against those references);
:mod:`~derive.measure.bench` and :mod:`~derive.measure.bench_kernels` are ``derive bench``
(the kernels beside NumPy, PyTorch and JAX, and the verifier).  Previous stage:
:mod:`derive.runtime`; next: :mod:`derive.docs`.
"""
