"""Focal losses from the proved kernels, with the signatures torchvision users know.

Every function takes NumPy arrays (or anything ``numpy.asarray`` accepts) of float32 or
float64 logits, and returns the loss (and, with ``return_grad=True``, its gradient with
respect to the logits) in the logits' dtype, computed in one fused pass by the generated
kernels:

* ``backend="c"``: the generated C library (compiled on first use and cached, see
  :mod:`derive.cbuild`), or :class:`derive.cbuild.BuildError` naming why it cannot be built
  or loaded; ``backend="numpy"``: the generated NumPy module; ``backend="auto"`` (default):
  C when the library builds and loads, else NumPy with one
  :class:`CBackendUnavailableWarning` naming the cause (no compiler, an unusable cache
  folder, ...), given once per configuration (``$CC``, ``$PATH``, cache folder variables) per
  process, which then stays on NumPy without trying again.
* ``reduction``: ``"none"`` (per element / per row), ``"sum"`` or ``"mean"``.  With
  ``return_grad=True`` the gradient is that of the reduced loss (for ``"none"``: of each
  element's loss with respect to its own logits, i.e. the backward pass with ones).
  Softmax ``"mean"`` divides by the number of rows whose target is not ``ignore_index``
  (as ``torch.nn.functional.cross_entropy`` does); a mean over nothing is 0, not NaN.

``out=(loss, grad)``: preallocated outputs, filled in place and returned (a training loop
reuses them instead of allocating two fresh arrays per call, which costs more than the kernel
on large inputs).  ``loss`` has the per-element (sigmoid) or per-row (softmax) shape, ``grad``
the shape of the logits or None (then not computed unless ``return_grad``); both in the logits'
dtype, C-contiguous, writeable, and sharing no memory with the inputs or each other.  With a
``"sum"``/``"mean"`` reduction ``loss`` holds the unreduced values and the scalar is returned.

``threads``: None (default) uses all threads (OpenMP, for calls on at least
``DERIVE_PARALLEL_MIN`` = 32768 values; smaller ones stay serial), at most
:data:`MAX_THREADS` = 256 (``DERIVE_MAX_THREADS``; a larger ``OMP_NUM_THREADS`` is clamped);
an integer from 1 to 256 caps them, anything else (0, negative, above 256, not an integer)
raises ValueError naming ``threads``.  In a process forked after the kernels ran on several
threads (``os.fork``, multiprocessing "fork", DataLoader workers) they run on one thread:
OpenMP's thread pool does not survive fork, and the child would otherwise hang.  The C
backend only; results do not depend on it.

Binary labels are 0 or 1 (any numeric or bool dtype); softmax targets are integer class
indices, or ``ignore_index`` for rows that get zero loss and zero gradient.  Any other label
or target raises ValueError naming it.  The C backend checks binary labels of the logits'
dtype in the pass that computes the outputs (no pass of its own over the labels), so with
``out=`` those arrays have been written when that error is raised; every other argument
error is raised before anything is written.
"""
from __future__ import annotations

import numbers
import os
import warnings

import numpy as np

from . import cbuild

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
    "MAX_THREADS",
]

#: The most threads a call may ask for (``DERIVE_MAX_THREADS`` of generated/focal_kernels.h).
MAX_THREADS = 256


class CBackendUnavailableWarning(RuntimeWarning):
    """``backend="auto"`` uses NumPy because the C library cannot be built or loaded."""

_REDUCTIONS = ("none", "sum", "mean")
_BACKENDS = ("auto", "c", "numpy")
_DTYPES = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}


# ------------------------------------------------------------------------------------------
# argument checks: each error names the argument


def _logits(inputs, name="inputs"):
    arr = np.asarray(inputs)
    if arr.dtype not in _DTYPES:
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr)


_ELABEL = 2  # DERIVE_ELABEL of focal_kernels.h: a label neither 0 nor 1
_LABEL_CHUNK = 1 << 16  # labels checked per NumPy step: temporaries stay small


def _binary_labels(targets, x, name="targets", backend="numpy"):
    arr = np.asarray(targets)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold numeric labels 0 or 1, got dtype {arr.dtype}")
    if arr.shape != x.shape:
        raise ValueError(f"{name} has shape {arr.shape}, but inputs has shape {x.shape}")
    if backend == "c" and arr.dtype == x.dtype:
        # the C kernels check the labels in the pass that computes the outputs (DERIVE_ELABEL)
        return np.ascontiguousarray(arr)
    flat = arr.reshape(-1)
    for lo in range(0, flat.size, _LABEL_CHUNK):
        chunk = flat[lo:lo + _LABEL_CHUNK]
        ok = (chunk == 0) | (chunk == 1)
        if not ok.all():
            raise ValueError(f"{name} must hold labels 0 or 1, found {chunk[~ok][0]!r}")
    return np.ascontiguousarray(arr, dtype=x.dtype)


def _threads(threads):
    if threads is None:
        return 0
    if (isinstance(threads, bool) or not isinstance(threads, (numbers.Integral, np.integer))
            or not 1 <= threads <= MAX_THREADS):
        raise ValueError(f"threads must be None (all cores, at most {MAX_THREADS}) or an integer from 1 to "
                         f"{MAX_THREADS}, got {threads!r}")
    return int(threads)


def _scalar(name, value):
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _in_domain(value, dom):
    lo, lo_open, hi, hi_open = dom
    if lo is not None and (value < lo or (lo_open and value == lo)):
        return False
    if hi is not None and (value > hi or (hi_open and value == hi)):
        return False
    return True


def _describe(dom):
    lo, lo_open, hi, hi_open = dom
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    return " and ".join(parts) or "finite"


def _param(kernel_info, name, value, allow_off=False):
    """A scalar parameter checked against its domain in the derivation file."""
    value = _scalar(name, value)
    if allow_off and value < 0:
        return value
    dom = kernel_info["domains"][name]
    if not _in_domain(value, dom):
        extra = " (or negative for no weighting)" if allow_off else ""
        raise ValueError(f"{name} must be {_describe(dom)}{extra}, got {value:g}")
    return value


def _reduction(reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, _REDUCTIONS))}, got {reduction!r}")
    return reduction


def _out_array(arr, label, x, shape, others):
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{label} must be a NumPy array, got {type(arr).__name__}")
    if arr.dtype != x.dtype:
        raise TypeError(f"{label} must have the dtype of inputs ({x.dtype}), got {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{label} must have shape {shape}, got {arr.shape}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{label} must be C-contiguous")
    if not arr.flags.writeable:
        raise ValueError(f"{label} is read-only")
    for name, other in others:
        if other is not None and np.may_share_memory(arr, other):
            raise ValueError(f"{label} shares memory with {name}: outputs must not overlap the inputs or each other")
    return arr


def _outputs(out, x, loss_shape, inputs):
    """The checked ``out=(loss, grad)`` arrays, or (None, None)."""
    if out is None:
        return None, None
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError("out must be a pair (loss, grad) of arrays (grad may be None)")
    loss, grad = out
    if loss is None:
        raise TypeError("out[0] must be a NumPy array for the loss, got None")
    loss = _out_array(loss, "out[0]", x, loss_shape, inputs)
    if grad is not None:
        grad = _out_array(grad, "out[1]", x, x.shape, list(inputs) + [("out[0]", loss)])
    return loss, grad


# what decides whether the C library builds and where it is cached
_CONFIG_ENV = ("CC", "PATH", "DERIVE_CACHE_DIR", "XDG_CACHE_HOME", "HOME", "DERIVE_OPENMP", "DERIVE_NATIVE")
_C_UNAVAILABLE: dict = {}  # configuration -> the BuildError for which "auto" uses NumPy


def _c_works(stacklevel):
    """Whether the C library loads; when not, warn once for this configuration, and do not try
    again with it (a failed build would otherwise be retried, and warned about, on every call)."""
    if _C_UNAVAILABLE and tuple(map(os.environ.get, _CONFIG_ENV)) in _C_UNAVAILABLE:
        return False
    try:
        cbuild.load()
        return True
    except cbuild.BuildError as exc:
        _C_UNAVAILABLE[tuple(map(os.environ.get, _CONFIG_ENV))] = exc
        warnings.warn(f"derive: using the NumPy backend (same results, slower) because the C kernels cannot be "
                      f"built or loaded: {exc}", CBackendUnavailableWarning, stacklevel=stacklevel + 1)
        return False


def _backend(backend):
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, _BACKENDS))}, got {backend!r}")
    if backend == "auto":
        return "c" if _c_works(stacklevel=4) else "numpy"
    return backend


def available_backends():
    """The backends that work here: always "numpy", and "c" when the C library builds and
    loads (else one :class:`CBackendUnavailableWarning` naming the cause, as for "auto")."""
    return ["c", "numpy"] if _c_works(stacklevel=2) else ["numpy"]


def _info(name):
    return cbuild.load_numpy_module().KERNELS[name]


# ------------------------------------------------------------------------------------------
# calling the kernels


def _ptr(arr, ct):
    import ctypes

    return arr.ctypes.data_as(ctypes.POINTER(ct)) if arr is not None else None


def _call_elementwise(name, x, t, params, backend, want_grad, threads=0, out=(None, None)):
    dt = _DTYPES[x.dtype]
    out_loss, out_grad = out
    if backend == "numpy":
        fn = getattr(cbuild.load_numpy_module(), f"{name}_{dt}")
        typed = [x.dtype.type(p) for p in params]
        loss, grad = fn(x, t, *typed, loss=out_loss, grad=out_grad)  # filled in place when given
        return loss, (grad if want_grad else None)
    import ctypes

    lib = cbuild.load()
    ct = ctypes.c_float if dt == "f32" else ctypes.c_double
    flat_x, flat_t = x.reshape(-1), t.reshape(-1)
    loss = out_loss.reshape(-1) if out_loss is not None else np.empty_like(flat_x)
    if out_grad is not None:
        grad = out_grad.reshape(-1)
    else:
        grad = np.empty_like(flat_x) if want_grad else None
    lib.derive_set_num_threads(threads)  # per calling thread; 0: all
    rc = getattr(lib, f"derive_{name}_{dt}")(flat_x.size, _ptr(flat_x, ct), _ptr(flat_t, ct), *params,
                                              _ptr(loss, ct), _ptr(grad, ct))
    if rc == _ELABEL:
        first = getattr(lib, f"derive_first_bad_label_{dt}")(flat_t.size, _ptr(flat_t, ct))
        raise ValueError(f"targets must hold labels 0 or 1, found {flat_t[first]!r}")
    if rc != 0:
        raise ValueError(f"the C kernel {name} rejected its arguments (code {rc})")
    loss = out_loss if out_loss is not None else loss.reshape(x.shape)
    if out_grad is not None:
        return loss, out_grad
    return loss, (grad.reshape(x.shape) if want_grad else None)


def _call_rowwise(name, x, target, alpha_vec, params, ignore_index, backend, want_grad, threads=0, out=(None, None)):
    dt = _DTYPES[x.dtype]
    info = _info(name)
    out_loss, out_grad = out
    if backend == "numpy":
        fn = getattr(cbuild.load_numpy_module(), f"{name}_{dt}")
        args = []
        for pname, p in zip(info["params"], params):
            if pname == "alpha" and info["class_alpha"] and alpha_vec is not None:
                args.append(alpha_vec)
            else:
                args.append(x.dtype.type(p))
        loss, grad = fn(x, target, *args, ignore_index, loss=out_loss, grad=out_grad)
        return loss, (grad if want_grad else None)
    import ctypes

    lib = cbuild.load()
    ct = ctypes.c_float if dt == "f32" else ctypes.c_double
    n, k = x.shape
    loss = out_loss if out_loss is not None else np.empty(n, dtype=x.dtype)
    if out_grad is not None:
        grad = out_grad
    else:
        grad = np.empty_like(x) if want_grad else None
    lib.derive_set_num_threads(threads)  # per calling thread; 0: all
    args = []
    for pname, p in zip(info["params"], params):
        if pname == "alpha" and info["class_alpha"]:
            args += [_ptr(alpha_vec, ct), p]
        else:
            args.append(p)
    rc = getattr(lib, f"derive_{name}_{dt}")(n, k, _ptr(x, ct), _ptr(target, ctypes.c_int64), *args,
                                              ignore_index, _ptr(loss, ct), _ptr(grad, ct))
    if rc != 0:
        _check_class_targets(target, k, ignore_index)  # names the bad target, if that was it
        raise ValueError(f"the C kernel {name} rejected its arguments (code {rc})")
    return loss, grad


def _reduce(loss, grad, reduction, count, return_grad):
    if reduction == "none":
        out = loss
    else:
        total = loss.dtype.type(np.sum(loss, dtype=np.float64))
        if reduction == "sum":
            out = total
        else:
            out = loss.dtype.type(total / count) if count else loss.dtype.type(0)
            if grad is not None and count:
                np.divide(grad, grad.dtype.type(count), out=grad)  # our own array: in place
    return (out, grad) if return_grad else out


def _elementwise(name, inputs, targets, params, reduction, backend, return_grad, threads=None, out=None):
    reduction = _reduction(reduction)
    threads = _threads(threads)
    x = _logits(inputs)
    backend = _backend(backend)
    t = _binary_labels(targets, x, backend=backend)
    outs = _outputs(out, x, x.shape, [("inputs", x), ("targets", t)])
    loss, grad = _call_elementwise(name, x, t, params, backend, return_grad or outs[1] is not None, threads, outs)
    return _reduce(loss, grad, reduction, x.size, return_grad)


# ------------------------------------------------------------------------------------------
# sigmoid family


def sigmoid_cross_entropy(inputs, targets, reduction="none", *, backend="auto", return_grad=False, threads=None, out=None):
    """-log p_t with p_t = sigmoid(x) for label 1 and 1 - sigmoid(x) for label 0."""
    return _elementwise("sigmoid_ce", inputs, targets, (), reduction, backend, return_grad, threads, out)


def binary_cross_entropy_with_logits(inputs, targets, reduction="mean", *, backend="auto", return_grad=False, threads=None, out=None):
    """torch.nn.functional.binary_cross_entropy_with_logits (labels 0/1, no weights)."""
    return sigmoid_cross_entropy(inputs, targets, reduction, backend=backend, return_grad=return_grad, threads=threads,
                                 out=out)


def binary_focal_loss(inputs, targets, gamma=2.0, reduction="none", *, backend="auto", return_grad=False, threads=None, out=None):
    """-(1 - p_t)^gamma log p_t (the note's focal loss, no alpha weighting)."""
    info = _info("sigmoid_focal")
    gamma = _param(info, "gamma", gamma)
    return _elementwise("sigmoid_focal", inputs, targets, (gamma,), reduction, backend, return_grad, threads, out)


def sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0, reduction="none", *, backend="auto",
                       return_grad=False, threads=None, out=None):
    """torchvision.ops.sigmoid_focal_loss: alpha_t*(1 - p_t)^gamma*CE, alpha < 0 means no weighting."""
    info = _info("sigmoid_focal_alpha")
    alpha = _param(info, "alpha", alpha, allow_off=True)
    gamma = _param(info, "gamma", gamma)
    return _elementwise("sigmoid_focal_alpha", inputs, targets, (alpha, gamma), reduction, backend, return_grad, threads, out)


def focal_loss_star(inputs, targets, gamma=2.0, beta=1.0, reduction="none", *, backend="auto", return_grad=False, threads=None, out=None):
    """FL* of Lin et al.: -log(sigmoid(gamma*x_t + beta))/gamma, gamma > 0."""
    info = _info("focal_star")
    gamma = _param(info, "gamma", gamma)
    beta = _param(info, "beta", beta)
    return _elementwise("focal_star", inputs, targets, (gamma, beta), reduction, backend, return_grad, threads, out)


# ------------------------------------------------------------------------------------------
# softmax family


def _class_targets(targets, x, ignore_index, name="targets", check=True):
    """int64 class indices; ``check=False`` leaves the range check to the C kernel, which
    validates every target before writing anything (then :func:`_check_class_targets` names
    the bad one)."""
    arr = np.asarray(targets)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array of class indices, got dtype {arr.dtype}")
    n, k = x.shape
    if arr.shape != (n,):
        raise ValueError(f"{name} has shape {arr.shape}, but inputs has {n} rows: expected ({n},)")
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds {arr.max()}, outside [0, {k})")
    arr = np.ascontiguousarray(arr.astype(np.int64, copy=False))  # int64 targets are not copied
    if check:
        _check_class_targets(arr, k, ignore_index, name)
    return arr


def _check_class_targets(arr, k, ignore_index, name="targets"):
    for lo in range(0, arr.size, _LABEL_CHUNK):  # small temporaries
        chunk = arr[lo:lo + _LABEL_CHUNK]
        bad = (chunk != ignore_index) & ((chunk < 0) | (chunk >= k))
        if np.any(bad):
            raise ValueError(f"{name} must hold class indices in [0, {k}) or ignore_index={ignore_index}, "
                             f"found {chunk[bad][0]}")


def _count_not_ignored(t, ignore_index):
    return sum(int(np.count_nonzero(t[lo:lo + _LABEL_CHUNK] != ignore_index)) for lo in range(0, t.size, _LABEL_CHUNK))


def _softmax_logits(inputs):
    x = _logits(inputs)
    if x.ndim != 2:
        raise ValueError(f"inputs must be 2-D (N, K) logits, got shape {x.shape}")
    if x.shape[1] == 0:
        raise ValueError("inputs must have at least one class (K >= 1)")
    return x


def _ignore_index(ignore_index):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (numbers.Integral, np.integer)):
        raise TypeError(f"ignore_index must be an integer, got {type(ignore_index).__name__}")
    ignore_index = int(ignore_index)
    if not np.iinfo(np.int64).min <= ignore_index <= np.iinfo(np.int64).max:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    return ignore_index


def _rowwise(name, inputs, targets, alpha_vec, params, ignore_index, reduction, backend, return_grad, threads=None,
             out=None):
    reduction = _reduction(reduction)
    threads = _threads(threads)
    x = _softmax_logits(inputs)
    ignore_index = _ignore_index(ignore_index)
    backend = _backend(backend)
    t = _class_targets(targets, x, ignore_index, check=backend != "c")
    outs = _outputs(out, x, (x.shape[0],), [("inputs", x), ("targets", t), ("alpha", alpha_vec)])
    loss, grad = _call_rowwise(name, x, t, alpha_vec, params, ignore_index, backend, return_grad or outs[1] is not None,
                               threads, outs)
    count = _count_not_ignored(t, ignore_index) if reduction == "mean" else t.size
    return _reduce(loss, grad, reduction, count, return_grad)


def softmax_cross_entropy(inputs, targets, ignore_index=-100, reduction="none", *, backend="auto",
                          return_grad=False, threads=None, out=None):
    """-log softmax(x)[t] per row of (N, K) logits; rows with target == ignore_index give 0."""
    return _rowwise("softmax_ce", inputs, targets, None, (), ignore_index, reduction, backend, return_grad, threads, out)


def softmax_focal_loss(inputs, targets, alpha=None, gamma=2.0, ignore_index=-100, reduction="none", *,
                       backend="auto", return_grad=False, threads=None, out=None):
    """-alpha_t (1 - p_t)^gamma log p_t with p = softmax(x) per row; alpha is None (1), a scalar,
    or one weight per class."""
    info = _info("softmax_focal")
    gamma = _param(info, "gamma", gamma)
    x_dtype = np.asarray(inputs).dtype
    alpha_vec = None
    if alpha is None:
        alpha = 1.0
    elif np.ndim(alpha) == 0:
        alpha = _param(info, "alpha", alpha)
    else:
        arr = np.asarray(alpha)
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"alpha must be a number or an array of per-class weights, got dtype {arr.dtype}")
        k = np.shape(inputs)[-1] if np.ndim(inputs) == 2 else None
        if arr.ndim != 1 or (k is not None and arr.shape[0] != k):
            raise ValueError(f"alpha must be a scalar or have shape ({k},) (one weight per class), got {arr.shape}")
        dom = info["domains"]["alpha"]
        ok = np.isfinite(arr) & np.array([_in_domain(float(a), dom) for a in arr.ravel()], dtype=bool)
        if not np.all(ok):
            raise ValueError(f"alpha must be {_describe(dom)} for every class, found {arr[~ok][0]!r}")
        alpha_vec = np.ascontiguousarray(arr, dtype=x_dtype if x_dtype in _DTYPES else np.float64)
        alpha = 1.0
    return _rowwise("softmax_focal", inputs, targets, alpha_vec, (alpha, gamma), ignore_index, reduction, backend,
                    return_grad, threads, out)
