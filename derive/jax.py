"""derive.jax: the proved kernels as JAX functions (jit, grad, vmap, second derivatives) on CPU.

``pip install 'derive-gradients[jax]'``; ``import derive`` works without JAX, this module needs it.

* Drop-ins for optax's losses (same arguments, same semantics, per-element or per-row loss, no
  reduction): :func:`sigmoid_focal_loss`, :func:`softmax_cross_entropy`,
  :func:`softmax_cross_entropy_with_integer_labels`, :func:`poly_loss_cross_entropy` (integer
  or one-hot labels).
* ``derive.jax.kernels.<kernel>(inputs, targets, *params)``: every kernel of every shipped
  derivation file (``derive.jax.kernels.kernel_names``), with the parameters and defaults of
  ``derive.kernels.<kernel>``; softmax kernels take the classes on the LAST axis (JAX's
  convention, not torch's axis 1) and return one loss per row.
* ``derive.jax.load("my_loss.toml")``: the kernels of your own file, verified and generated as
  by ``derive.load``.

Each call runs the generated C kernel through XLA's FFI (a small C++ shim compiled once
against jaxlib's headers and cached; see :mod:`derive.runtime.jax_ops`): loss and gradient
in one call, the gradient fused; ``jax.hessian``, ``jax.grad(jax.grad(f))`` and jvp-of-grad use
the proved second derivatives of the derivation files (hess / Hessian-vector-product kernels).
Without a C++ compiler (or a C compiler) the same functions run through ``jax.pure_callback``
on the generated NumPy kernels, with one :class:`JaxFFIUnavailableWarning`; ``backend=
"callback"`` asks for that.  float32 and float64 are computed as such; float16 and bfloat16
inputs are computed in float32 and the loss rounded to the input dtype (error: the float32
kernel's bound plus one rounding to the input type, half an ulp: 2^-11 relative for float16,
2^-8 for bfloat16).  Targets and parameters are not differentiated: asking for their
derivative raises (wrap them in ``jax.lax.stop_gradient``); so does a third derivative.
Invalid targets (a label that is not 0 or 1 for a kernel without a soft version, a value
outside [0, 1], a class index outside [0, K)) are found by the kernel in its own pass and raise
``jax.errors.JaxRuntimeError`` (INVALID_ARGUMENT; some eager dispatch paths of jax re-raise it as
ValueError) naming the kernel, the value and its index when the computation runs; a known
parameter outside its domain raises ValueError at the call, a traced one when it runs.
"""
from __future__ import annotations

from derive.runtime import jax_ops as _ops
from derive.runtime.jax_ops import JaxFFIUnavailableWarning, JaxKernels, NO_IGNORE

_ops._jax()  # a clear ImportError now when JAX is missing


def __getattr__(name):  # PEP 562: the kernels are built on first use (they read the shipped files)
    if name == "kernels":
        globals()["kernels"] = _ops.shipped()
        return globals()["kernels"]
    raise AttributeError(f"module 'derive.jax' has no attribute {name!r}")


def load(path, **kwargs) -> JaxKernels:
    """The kernels of the derivation file ``path`` as JAX functions (``derive.load``'s checks:
    the file is verified, and refused when a line a kernel uses is not proved)."""
    return _ops.load(path, **kwargs)


def _kernel(name):
    return _ops.shipped().kernel(name)


def _class_axis_last(logits, axis, where, fn):
    import jax.numpy as jnp

    if where is not None:
        raise NotImplementedError(f"derive.jax.{fn}: where= is not supported (mask the loss afterwards)")
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"derive.jax.{fn}: axis must be an integer (one class axis), got {axis!r}")
    logits = jnp.asarray(logits)
    if logits.ndim == 0:
        raise ValueError(f"derive.jax.{fn}: logits must have a class axis, got a 0-d array")
    if not -logits.ndim <= axis < logits.ndim:
        raise ValueError(f"derive.jax.{fn}: axis {axis} is out of range for logits of {logits.ndim} axes")
    return jnp.moveaxis(logits, axis, -1), axis % logits.ndim


def sigmoid_focal_loss(logits, labels, *, alpha=None, gamma=2.0, backend="auto"):
    """Sigmoid focal loss per element, as ``optax.sigmoid_focal_loss``.

    ``ce * (1 - p_t)^gamma`` with ``p_t = p*labels + (1 - p)*(1 - labels)``, times ``alpha_t =
    alpha*labels + (1 - alpha)*(1 - labels)`` when ``alpha`` is not None.  ``labels``
    broadcastable to ``logits``, 0 or 1 or soft in [0, 1] (then the soft kernel of
    stable_forms.toml); ``alpha`` None or in [0, 1]; ``gamma >= 0``.  Kernels ``sigmoid_focal``
    and ``sigmoid_focal_alpha`` (soft versions ``*_soft``): the gradient is finite at every
    finite logit, e.g. |x| = 100 with gamma = 0.5."""
    if alpha is None:
        return _ops.evaluate(_kernel("sigmoid_focal"), logits, labels, {"gamma": gamma}, backend=backend,
                             names=("logits", "labels"))
    return _ops.evaluate(_kernel("sigmoid_focal_alpha"), logits, labels, {"alpha": alpha, "gamma": gamma},
                         backend=backend, names=("logits", "labels"))


def sigmoid_binary_cross_entropy(logits, labels, *, backend="auto"):
    """Sigmoid cross-entropy per element, as ``optax.sigmoid_binary_cross_entropy`` (labels 0/1
    or soft in [0, 1], broadcastable to logits); kernel ``sigmoid_ce`` (soft: ``sigmoid_ce_soft``)."""
    return _ops.evaluate(_kernel("sigmoid_ce"), logits, labels, {}, backend=backend, names=("logits", "labels"))


def softmax_cross_entropy(logits, labels, axis=-1, where=None, *, backend="auto"):
    """Softmax cross-entropy per row with probability labels, as ``optax.softmax_cross_entropy``:
    ``-sum(labels * log_softmax(logits), axis)``, labels of the shape of logits with values in
    [0, 1] (rows need not sum to 1).  Kernel ``label_smoothed_ce`` with epsilon = 0."""
    x, ax = _class_axis_last(logits, axis, where, "softmax_cross_entropy")
    import jax.numpy as jnp

    q = jnp.moveaxis(jnp.asarray(labels), ax, -1) if jnp.ndim(labels) == x.ndim else labels
    return _ops.evaluate(_kernel("label_smoothed_ce"), x, q, {"epsilon": 0.0}, backend=backend,
                         names=("logits", "labels"))


def softmax_cross_entropy_with_integer_labels(logits, labels, axis=-1, where=None, *, backend="auto"):
    """Softmax cross-entropy per row with integer labels, as optax's function of this name:
    ``logsumexp(logits) - logits[label]``, labels in [0, K) (anything else raises: optax
    would read another class).  Kernel ``softmax_ce`` without an ignore label."""
    x, _ = _class_axis_last(logits, axis, where, "softmax_cross_entropy_with_integer_labels")
    return _ops.evaluate(_kernel("softmax_ce"), x, labels, {}, ignore_index=NO_IGNORE, backend=backend,
                         names=("logits", "labels"))


def poly_loss_cross_entropy(logits, labels, *, epsilon=2.0, axis=-1, where=None, backend="auto"):
    """Poly-1 loss per row, as ``optax.poly_loss_cross_entropy`` for one-hot ``labels`` (of the
    shape of logits), or integer class indices: ``CE + epsilon * (1 - p_t)``.  Kernel
    ``poly1_softmax``.  Soft (not one-hot) probability labels raise ValueError when known."""
    import jax.numpy as jnp
    import numpy as np

    x, ax = _class_axis_last(logits, axis, where, "poly_loss_cross_entropy")
    labels = jnp.asarray(labels)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        target = labels
    else:
        q = jnp.moveaxis(labels, ax, -1)
        known = _ops._concrete(q)
        if known is not None and not (np.isin(known, (0, 1)).all() and (np.sum(known, axis=-1) == 1).all()):
            raise ValueError("derive.jax.poly_loss_cross_entropy: labels must be one-hot (or integer class "
                             "indices); the poly1_softmax kernel is not derived for soft labels")
        target = jnp.argmax(q, axis=-1)
    return _ops.evaluate(_kernel("poly1_softmax"), x, target, {"epsilon": epsilon}, ignore_index=NO_IGNORE,
                         backend=backend, names=("logits", "labels"))


__all__ = ["sigmoid_focal_loss", "sigmoid_binary_cross_entropy", "softmax_cross_entropy",
           "softmax_cross_entropy_with_integer_labels", "poly_loss_cross_entropy", "load", "kernels",
           "JaxKernels", "JaxFFIUnavailableWarning"]
