"""Focal losses from the proved kernels, with the signatures torchvision users know.

Every function takes NumPy arrays (or anything ``numpy.asarray`` accepts) of float32 or
float64 logits, and returns the loss (and, with ``return_grad=True``, its gradient with
respect to the logits) in the logits' dtype, computed in one fused pass by the generated
kernels:

* ``backend="c"``: the generated C library (compiled on first use and cached, see
  :mod:`derive.runtime.cbuild`), or :class:`derive.runtime.cbuild.BuildError` naming why it cannot be built
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

Elementwise targets are labels 0 or 1 (any numeric or bool dtype), or soft targets in [0, 1]
for a kernel whose file names a soft version (``soft = "<kernel>"``; FL* has none and refuses
them): binary labels cost no pass beyond the kernel's own, and the first targets that are not
all 0 or 1 send the call to the soft kernel.  Softmax logits are (N, K), (N, K, d1, ...) or
(K,), classes on axis 1 (torch's layout; the loss has the shape without axis 1); targets are
integer class indices of that shape, or ``ignore_index`` for rows that get zero loss and zero
gradient, or (softmax cross-entropy) class probabilities of the logits' shape.  Any other
label or target raises ValueError naming it.  The C backend checks elementwise targets of the
logits' dtype in the pass that computes the outputs (no pass of its own over them), so with
``out=`` those arrays have been written when that error is raised; every other argument
error is raised before anything is written.
"""
from __future__ import annotations

import numbers
import os
import warnings

from typing import Literal, Optional, Sequence, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike

from derive.runtime import cbuild

#: ``reduction=`` values, ``backend=`` values, the ``out=`` pair, and what a loss returns
Reduction = Literal["none", "sum", "mean"]
Backend = Literal["auto", "c", "numpy"]
Outputs = Optional[Tuple[np.ndarray, Optional[np.ndarray]]]
LossValue = Union[np.ndarray, np.floating]
LossResult = Union[LossValue, Tuple[LossValue, np.ndarray]]

#: The most threads a call may ask for (``DERIVE_MAX_THREADS`` of generated/focal_kernels.h).
MAX_THREADS = 256


class CBackendUnavailableWarning(RuntimeWarning):
    """``backend="auto"`` uses NumPy because the C library cannot be built or loaded."""

_REDUCTIONS = ("none", "sum", "mean")
_BACKENDS = ("auto", "c", "numpy")
_DTYPES = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}


# ------------------------------------------------------------------------------------------
# argument checks: each error names the argument


def _contiguous(arr, dtype=None):
    """``arr`` C-contiguous in ``dtype``, copied only when needed; a 0-d array stays 0-d
    (``np.ascontiguousarray`` would make it 1-d)."""
    return np.require(arr, dtype=dtype, requirements="C")


def _logits(inputs, name="inputs"):
    arr = np.asarray(inputs)
    if arr.dtype not in _DTYPES:
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {arr.dtype}")
    return _contiguous(arr)


_ELABEL = 2  # DERIVE_ELABEL of the generated headers: a label neither 0 nor 1 (a soft kernel: outside [0, 1])
_LABEL_CHUNK = 1 << 16  # labels checked per NumPy step: temporaries stay small
_SOFT_PROBE = 4096  # labels looked at before a C call whose kernel has a soft version (not a full pass)


def _first_bad(flat, ok, start=0):
    """The first value of ``flat`` from ``start`` on for which ``ok`` is false, or None (chunked:
    small temporaries)."""
    for lo in range(start, flat.size, _LABEL_CHUNK):
        chunk = flat[lo:lo + _LABEL_CHUNK]
        good = ok(chunk)
        if not good.all():
            return chunk[~good][0].item()
    return None


def _is_binary(v):
    return (v == 0) | (v == 1)


def _is_soft(v):
    return (v >= 0) & (v <= 1)  # NaN fails both


def _soft_error(name, value):
    return ValueError(f"{name} must hold values in [0, 1] (labels 0 or 1, or soft targets), found {value!r}")


def _binary_error(info, name, value):
    if 0 < value < 1:
        return ValueError(f"soft targets are not defined for {info['title']} (its kernel names no soft kernel): "
                          f"{name} must hold labels 0 or 1, found {value!r}")
    return ValueError(f"{name} must hold labels 0 or 1, found {value!r}")


def _elementwise_targets(targets, x, info, backend, name="targets"):
    """The targets as the kernel reads them, and which kernel: ``(t, "binary")``, checked;
    ``(t, "unchecked")``, labels of the logits' dtype that the C kernel checks in the pass that
    computes the outputs (DERIVE_ELABEL: then the soft kernel, if any, or the error);
    ``(t, "soft")``, values in [0, 1] for the kernel's soft version (or a soft kernel itself).
    Binary labels cost no pass beyond today's: NumPy's one chunked check, which stops at the
    first value that is not 0 or 1, or none for C."""
    arr = np.asarray(targets)
    soft = info.get("target") == "soft" or bool(info.get("soft"))
    if arr.dtype.kind not in "biuf":
        what = "values in [0, 1]" if soft else "labels 0 or 1"
        raise TypeError(f"{name} must hold numeric {what}, got dtype {arr.dtype}")
    if arr.shape != x.shape:
        raise ValueError(f"{name} has shape {arr.shape}, but inputs has shape {x.shape}")
    flat = arr.reshape(-1)
    if info.get("target") == "soft":  # a soft kernel called directly
        if backend == "c" and arr.dtype == x.dtype:
            return _contiguous(arr), "unchecked"  # the C kernel checks 0 <= t <= 1 in its pass
        bad = _first_bad(flat, _is_soft)
        if bad is not None:
            raise _soft_error(name, bad)
        return _contiguous(arr, x.dtype), "soft"
    if backend == "c" and arr.dtype == x.dtype:
        if not soft or _is_binary(flat[:_SOFT_PROBE]).all():
            return _contiguous(arr), "unchecked"
        start = 0  # soft targets seen in the first values: straight to the soft kernel
    else:
        bad = _first_bad(flat, _is_binary)
        if bad is None:
            return _contiguous(arr, x.dtype), "binary"
        if not soft:
            raise _binary_error(info, name, bad)
        start = 0
    bad = _first_bad(flat, _is_soft, start)
    if bad is not None:
        raise _soft_error(name, bad)
    return _contiguous(arr, x.dtype), "soft"


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


def _param(kernel_info, name, value, allow_off=False, label=None):
    """A scalar parameter checked against its domain in the derivation file; ``label``: the
    name the caller knows it by (``label_smoothing`` for the kernel's ``epsilon``)."""
    label = label or name
    value = _scalar(label, value)
    if allow_off and value < 0:
        return value
    dom = kernel_info["domains"][name]
    if not _in_domain(value, dom):
        extra = " (or negative for no weighting)" if allow_off else ""
        raise ValueError(f"{label} must be {_describe(dom)}{extra}, got {value:g}")
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

#: A generated module: (folder, module name), its files ``<folder>/<module>.{py,c,h}``.
#: SHIPPED is the shipped focal kernels' (generated/focal_kernels.*).
Source = Tuple[os.PathLike, str]
SHIPPED: Source = (cbuild.GENERATED_DIR, cbuild.DEFAULT_MODULE)


def _shipped(module: str) -> Source:
    """The generated module ``module`` of the package (generated/<module>.*)."""
    return (cbuild.GENERATED_DIR, module)


def _c_works(stacklevel, src: Source = SHIPPED):
    """Whether the C library of the generated module ``src`` loads; when not, warn once for this
    configuration, and do not try again with it (a failed build would otherwise be retried, and
    warned about, on every call)."""
    config = (*map(os.environ.get, _CONFIG_ENV), str(src[0]), src[1])
    if _C_UNAVAILABLE and config in _C_UNAVAILABLE:
        return False
    try:
        cbuild.load(*src)
        return True
    except cbuild.BuildError as exc:
        _C_UNAVAILABLE[config] = exc
        warnings.warn(f"derive: using the NumPy backend (same results, slower) because the C kernels cannot be "
                      f"built or loaded: {exc}", CBackendUnavailableWarning, stacklevel=stacklevel + 1)
        return False


def _backend(backend, src: Source = SHIPPED):
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, _BACKENDS))}, got {backend!r}")
    if backend == "auto":
        return "c" if _c_works(stacklevel=4, src=src) else "numpy"
    return backend


def available_backends() -> list:
    """The backends that work here: always "numpy", and "c" when the C library builds and
    loads (else one :class:`CBackendUnavailableWarning` naming the cause, as for "auto")."""
    return ["c", "numpy"] if _c_works(stacklevel=2) else ["numpy"]


def _info(name, src: Source = SHIPPED):
    """A kernel's row of the generated module's KERNELS table (its params, their domains, ...)."""
    return cbuild.load_numpy_module(*src).KERNELS[name]


def _scalar_params(info, params):
    """The declared scalar parameters, checked against their domains, in the kernel's argument
    order (``params``: name -> value).  A parameter of ``no_weight_below_zero`` may be negative
    (no weighting); a per-class one (``class_alpha``) is checked by :func:`_class_weights`."""
    return tuple(p if (info["class_alpha"] and name == "alpha") else
                 _param(info, name, p, allow_off=name in info["no_weight_below_zero"])
                 for name, p in ((n, params[n]) for n in info["params"]))


# ------------------------------------------------------------------------------------------
# documentation: numpydoc sections shared by the public functions

_DOC_ELEMENTWISE_IO = """\
inputs : array_like of float32 or float64, any shape (0-d included)
    Logits x. Any other dtype raises TypeError (convert first, e.g. ``x.astype(np.float32)``);
    a non-contiguous or read-only array is read (copied when not C-contiguous), never written.
targets : array_like, the shape of `inputs`
    Labels t, 0 or 1, of any numeric or bool dtype; x_t = x for t = 1 and -x for t = 0.
    {soft}"""

_DOC_SOFT = {
    True: """Soft targets, t in [0, 1] (label smoothing, mixup, distillation: not all 0 or 1), go to the
    kernel's soft version, torchvision's definition with a real t (see Notes); binary labels cost
    no extra pass.  t < 0, t > 1 or NaN raises ValueError naming the value.""",
    False: """Soft targets (values strictly between 0 and 1) raise ValueError: this loss is not
    defined for them.""",
}

_DOC_SOFTMAX_IO = """\
inputs : array_like of float32 or float64, shape (N, K), (N, K, d1, ...) or (K,)
    Logits with the K >= 1 classes on axis 1 (torch's layout; (K,) is one row).  Any other
    dtype raises TypeError.
targets : array_like, shape (N,), (N, d1, ...) or () (the shape of `inputs` without axis 1)
    Integers: the class index of each row, in [0, K), or `ignore_index`.
    {probs}"""

_DOC_PROBS = {
    True: """Or floats of the shape of `inputs`: class probabilities q in [0, 1] (rows need not sum
    to 1, as in torch), computed by the kernel ``label_smoothed_ce`` of
    derive/derivations/label_smoothing.toml.""",
    False: """Floats of the shape of `inputs` (class probabilities) raise ValueError: this loss is
    not defined for them.""",
}

_DOC_IGNORE = """\
ignore_index : int, default -100
    Target value of rows that get loss 0 and gradient 0 and are not counted by "mean"
    (``torch.nn.functional.cross_entropy``'s convention)."""

_DOC_COMMON = """\
reduction : {{"none", "sum", "mean"}}, default {reduction!r}
    "none": one loss per {unit}; "sum": their sum; "mean": their mean{mean_note}.  Sums are
    accumulated in float64 and rounded once to the dtype of `inputs`.
backend : {{"auto", "c", "numpy"}}, default "auto"
    "c": the generated C library, compiled on first use and cached (``$DERIVE_CACHE_DIR``, else
    ``~/.cache/derive``); "numpy": the generated NumPy module (no compiler needed); "auto": C
    when the library builds and loads, else NumPy with one `CBackendUnavailableWarning`.
return_grad : bool, default False
    Also return the gradient of the (reduced) loss with respect to `inputs`, from the same
    fused pass.  For "none" it is each {unit}'s loss differentiated with respect to its own
    logits (the backward pass with a gradient of ones).
threads : int or None, default None
    C backend only: at most this many OpenMP threads (1 to `MAX_THREADS`); None: all cores.
    Calls on fewer than 32768 values run on one thread.  Results do not depend on it.
out : (ndarray, ndarray or None), optional
    Preallocated ``(loss, grad)`` filled in place and returned: `loss` of the unreduced shape
    ({loss_shape}), `grad` of the shape of `inputs` or None; both of the dtype of
    `inputs`, C-contiguous, writeable, sharing no memory with the inputs or each other."""

_DOC_RETURNS = """\
Returns
-------
loss : ndarray or numpy scalar
    In the dtype of `inputs`: {loss_shape_ret} for "none", a scalar for "sum" and "mean".
grad : ndarray, only with ``return_grad=True``
    Shape and dtype of `inputs`.  Finite for every finite logit, however saturated.

Raises
------
TypeError
    A dtype or a type that is not accepted (each message names the argument).
ValueError
    {value_errors}; a bad `reduction`, `backend`, `threads` or `out`.
derive.runtime.cbuild.BuildError
    ``backend="c"`` and the C library cannot be compiled or loaded (the message says why).

Notes
-----
{notes}"""


#: the public loss functions, in the order they are defined (each registered by _document)
_PUBLIC_LOSSES: list = []


def _document(summary, params="", *, kind="elementwise", reduction="none", value_errors="", notes="",
              examples="", soft=False, probs=False, after_reduction=""):
    """Give a public loss function its numpydoc docstring (one source for the shared sections).
    ``soft``: soft binary targets are accepted; ``probs``: class-probability targets are;
    ``after_reduction``: parameters documented between `reduction` and `backend`."""
    softmax = kind == "softmax"
    unit = "row" if softmax else "element"
    loss_shape = "(N,), (N, d1, ...) or ()" if softmax else "the shape of `inputs`"
    mean_note = (" over the rows whose target is not `ignore_index` (0 when there is none)"
                 + (";\n    with class probabilities, over all rows (torch's convention)" if probs else "")) if softmax else ""
    parts = [_DOC_SOFTMAX_IO.format(probs=_DOC_PROBS[probs]) if softmax
             else _DOC_ELEMENTWISE_IO.format(soft=_DOC_SOFT[soft])]
    if params:
        parts.append(params)
    if softmax:
        parts.append(_DOC_IGNORE)
    common = _DOC_COMMON.format(reduction=reduction, unit=unit, mean_note=mean_note, loss_shape=loss_shape)
    if after_reduction:
        at = common.index("backend : ")
        common = common[:at] + after_reduction.rstrip("\n") + "\n" + common[at:]
    parts.append(common)
    label_error = ("a target outside [0, K) that is not `ignore_index`" if softmax
                   else "a target outside [0, 1] or NaN (the first one is named)" if soft
                   else "a label other than 0 or 1 (the first one is named)")
    doc = "\n\n".join([summary, "Parameters\n----------\n" + "\n".join(parts),
                        _DOC_RETURNS.format(loss_shape_ret=f"shape {loss_shape}" if softmax else "the shape of `inputs`",
                                            notes=notes.strip() or "-",
                                            value_errors="; ".join(filter(None, [label_error, value_errors])))])
    doc = doc.replace("ValueError\n    a ", "ValueError\n    A ")
    if examples:
        doc += "\n\nExamples\n--------\n" + examples.strip()

    def apply(fn):
        fn.__doc__ = doc
        _PUBLIC_LOSSES.append(fn.__name__)
        return fn

    return apply


_DOC_GAMMA = """\
gamma : float, default 2.0
    Focusing exponent, gamma >= 0 (0 gives the cross-entropy); any real gamma, also in (0, 1),
    where ``(1 - p)^(gamma - 1)`` written out is NaN at saturated logits."""

_SOFT_CE_NOTES = """

Soft targets: ce = t softplus(-x) + (1 - t) softplus(x), which is
``F.binary_cross_entropy_with_logits`` with a real t, from the kernel ``sigmoid_ce_soft``."""

_SOFT_FOCAL_NOTES = """

Soft targets: ce as for `sigmoid_cross_entropy`, 1 - p_t = t sigmoid(-x) + (1 - t) sigmoid(x)
and loss = alpha_t ce (1 - p_t)^gamma (torchvision's formula with a real t), from the kernel
the binary one names with ``soft = "..."`` in derive/derivations/stable_forms.toml."""

_SIGMOID_NOTES = """\
p_t = sigmoid(x_t).  The kernel evaluates the proved stable forms of
``derive/derivations/stable_forms.toml`` (log p_t = -softplus(-x_t), 1 - p_t = sigmoid(-x_t),
(1 - p_t)^gamma = exp(-gamma softplus(x_t))), so no subtraction 1 - p, no log of a rounded
probability and no clamp: the loss is exact far past |x| = 17 (float32) and 37 (float64), where
1 - p rounds to 0, and stays finite and correctly signed up to the largest float."""


# ------------------------------------------------------------------------------------------
# calling the kernels


def _ptr(arr, ct):
    import ctypes

    return arr.ctypes.data_as(ctypes.POINTER(ct)) if arr is not None else None


def _call_elementwise(name, x, t, params, backend, want_grad, threads=0, out=(None, None), src: Source = SHIPPED):
    """Run one elementwise kernel; returns (loss, grad, rc), rc the C kernel's return code (0 for
    NumPy): DERIVE_ELABEL has written every output and is the caller's to handle."""
    dt = _DTYPES[x.dtype]
    out_loss, out_grad = out
    if backend == "numpy":
        fn = getattr(cbuild.load_numpy_module(*src), f"{name}_{dt}")
        typed = [x.dtype.type(p) for p in params]
        loss, grad = fn(x, t, *typed, loss=out_loss, grad=out_grad)  # filled in place when given
        return loss, (grad if want_grad else None), 0
    import ctypes

    lib = cbuild.load(*src)
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
    if rc not in (0, _ELABEL):
        raise ValueError(f"the C kernel {name} rejected its arguments (code {rc})")
    loss = out_loss if out_loss is not None else loss.reshape(x.shape)
    if out_grad is not None:
        return loss, out_grad, rc
    return loss, (grad.reshape(x.shape) if want_grad else None), rc


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


def _elementwise(name, inputs, targets, params, reduction, backend, return_grad, threads=None, out=None,
                 src: Source = SHIPPED):
    """The one path of every elementwise kernel: ``params`` maps the kernel's declared parameters
    to the values given; each is checked against its declared domain.  Targets that are not all
    0 or 1 go to the kernel's soft version (``soft = "..."`` in its file; the same parameters),
    or are refused when it has none."""
    info = _info(name, src)
    values = _scalar_params(info, params)
    reduction = _reduction(reduction)
    threads = _threads(threads)
    x = _logits(inputs)
    backend = _backend(backend, src)
    t, kind = _elementwise_targets(targets, x, info, backend)
    outs = _outputs(out, x, x.shape, [("inputs", x), ("targets", t)])
    want_grad = return_grad or outs[1] is not None
    soft = info.get("soft")
    run = soft if kind == "soft" and soft else name
    loss, grad, rc = _call_elementwise(run, x, t, values, backend, want_grad, threads, outs, src)
    if rc == _ELABEL:  # the C kernel saw a label that is not 0 or 1 (or, a soft kernel, outside [0, 1])
        flat = t.reshape(-1)
        if info.get("target") == "soft" or run == soft:
            bad = _first_bad(flat, _is_soft)
            raise _soft_error("targets", bad) if bad is not None else ValueError(
                f"the C kernel {run} rejected its targets (code {rc})")
        lib = cbuild.load(*src)
        first = getattr(lib, f"derive_first_bad_label_{_DTYPES[x.dtype]}")(flat.size, _ptr(flat, _ctype(x)))
        if not soft:
            raise _binary_error(info, "targets", flat[first].item())
        bad = _first_bad(flat, _is_soft, first)
        if bad is not None:
            raise _soft_error("targets", bad)
        loss, grad, rc = _call_elementwise(soft, x, t, values, backend, want_grad, threads, outs, src)
        if rc != 0:
            raise ValueError(f"the C kernel {soft} rejected its targets (code {rc})")
    return _reduce(loss, grad, reduction, x.size, return_grad)


def _ctype(x):
    import ctypes

    return ctypes.c_float if x.dtype == np.float32 else ctypes.c_double


def _call_rowwise(name, x, target, alpha_vec, params, ignore_index, backend, want_grad, threads=0, out=(None, None),
                  src: Source = SHIPPED):
    dt = _DTYPES[x.dtype]
    info = _info(name, src)
    out_loss, out_grad = out
    if backend == "numpy":
        fn = getattr(cbuild.load_numpy_module(*src), f"{name}_{dt}")
        args = []
        for pname, p in zip(info["params"], params):
            if pname == "alpha" and info["class_alpha"] and alpha_vec is not None:
                args.append(alpha_vec)
            else:
                args.append(x.dtype.type(p))
        loss, grad = fn(x, target, *args, ignore_index, loss=out_loss, grad=out_grad)
        return loss, (grad if want_grad else None)
    import ctypes

    lib = cbuild.load(*src)
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


# ------------------------------------------------------------------------------------------
# sigmoid family


@_document("""Sigmoid cross-entropy of logits: -log p_t, p_t = sigmoid(x) for label 1 and 1 - sigmoid(x) for 0.""",
           soft=True, notes=_SIGMOID_NOTES + _SOFT_CE_NOTES, examples="""\
>>> import numpy as np, derive
>>> x = np.array([-2.0, 0.0, 3.0]); t = np.array([0.0, 1.0, 1.0])
>>> loss, grad = derive.sigmoid_cross_entropy(x, t, return_grad=True, backend="numpy")
>>> np.round(loss, 4), np.round(grad, 4)
(array([0.1269, 0.6931, 0.0486]), array([ 0.1192, -0.5   , -0.0474]))""")
def sigmoid_cross_entropy(inputs: ArrayLike, targets: ArrayLike, reduction: Reduction = "none", *,
                          backend: Backend = "auto", return_grad: bool = False, threads: Optional[int] = None,
                          out: Outputs = None) -> LossResult:
    return _elementwise("sigmoid_ce", inputs, targets, {}, reduction, backend, return_grad, threads, out)


@_document("""``torch.nn.functional.binary_cross_entropy_with_logits`` (labels 0/1, no weights): mean by default.""",
           reduction="mean", soft=True,
           notes="The same kernel as `sigmoid_cross_entropy`, with torch's default reduction.\n\n"
           + _SIGMOID_NOTES + _SOFT_CE_NOTES)
def binary_cross_entropy_with_logits(inputs: ArrayLike, targets: ArrayLike, reduction: Reduction = "mean", *,
                                     backend: Backend = "auto", return_grad: bool = False,
                                     threads: Optional[int] = None, out: Outputs = None) -> LossResult:
    return sigmoid_cross_entropy(inputs, targets, reduction, backend=backend, return_grad=return_grad, threads=threads,
                                 out=out)


@_document("""Focal loss -(1 - p_t)^gamma log p_t of logits, p_t = sigmoid(x_t) (the note's FL, no alpha).""",
           _DOC_GAMMA, value_errors="gamma < 0 or not finite", soft=True, notes=_SIGMOID_NOTES + _SOFT_FOCAL_NOTES)
def binary_focal_loss(inputs: ArrayLike, targets: ArrayLike, gamma: float = 2.0, reduction: Reduction = "none", *,
                      backend: Backend = "auto", return_grad: bool = False, threads: Optional[int] = None,
                      out: Outputs = None) -> LossResult:
    return _elementwise("sigmoid_focal", inputs, targets, {"gamma": gamma}, reduction, backend, return_grad, threads,
                        out)


@_document("""``torchvision.ops.sigmoid_focal_loss``: alpha_t (1 - p_t)^gamma CE(x, t), p_t = sigmoid(x_t).""",
           """\
alpha : float, default 0.25
    Weight of the positives, in [0, 1]; alpha_t = alpha for t = 1 and 1 - alpha for t = 0.
    A negative alpha means no weighting (alpha_t = 1), as in torchvision.
""" + _DOC_GAMMA, value_errors="alpha > 1, gamma < 0, or either not finite", soft=True,
           notes=_SIGMOID_NOTES + "\n\nThe signature, defaults and results are torchvision's (and Detectron's)."
           + _SOFT_FOCAL_NOTES + "  alpha_t = alpha t + (1 - alpha)(1 - t).",
           examples="""\
>>> import numpy as np, derive
>>> x = np.array([-5.0, 0.0, 5.0], dtype=np.float32); t = np.array([0, 1, 1], dtype=np.float32)
>>> derive.sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0, reduction="sum", backend="numpy").dtype
dtype('float32')""")
def sigmoid_focal_loss(inputs: ArrayLike, targets: ArrayLike, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: Reduction = "none", *, backend: Backend = "auto", return_grad: bool = False,
                       threads: Optional[int] = None, out: Outputs = None) -> LossResult:
    return _elementwise("sigmoid_focal_alpha", inputs, targets, {"alpha": alpha, "gamma": gamma}, reduction, backend,
                        return_grad, threads, out)


@_document("""FL* of Lin et al. (Focal Loss paper, appendix): -log(sigmoid(gamma x_t + beta)) / gamma.""",
           """\
gamma : float, default 2.0
    gamma > 0 (FL* divides by it).
beta : float, default 1.0
    Any finite shift.""", value_errors="gamma <= 0, or gamma or beta not finite",
           notes="""\
z = gamma x_t + beta is formed with its rounding error kept (exact product in float64 for
float32 input), and -log sigmoid(z) = softplus(-z) never takes the log of a rounded probability.""")
def focal_loss_star(inputs: ArrayLike, targets: ArrayLike, gamma: float = 2.0, beta: float = 1.0,
                    reduction: Reduction = "none", *, backend: Backend = "auto", return_grad: bool = False,
                    threads: Optional[int] = None, out: Outputs = None) -> LossResult:
    return _elementwise("focal_star", inputs, targets, {"gamma": gamma, "beta": beta}, reduction, backend, return_grad,
                        threads, out)


# ------------------------------------------------------------------------------------------
# softmax family


def _rows(inputs):
    """Softmax logits as rows: (x, rows, lead), ``rows`` the (M, K) matrix of the class vectors
    (a copy with the class axis last for (N, K, d1, ...)), ``lead`` the shape of the loss:
    (N,) for (N, K), (N, d1, ...) for (N, K, d1, ...), () for (K,) (torch's shapes)."""
    x = _logits(inputs)
    if x.ndim == 0:
        raise ValueError("inputs must be (N, K) or (N, K, d1, ...) logits (classes on axis 1) or one row (K,), "
                         "got a 0-d array")
    k = x.shape[1] if x.ndim >= 2 else x.shape[0]
    if k == 0:
        raise ValueError(f"inputs must have at least one class (K >= 1 on axis {1 if x.ndim >= 2 else 0}), "
                         f"got shape {x.shape}")
    if x.ndim == 1:
        return x, x.reshape(1, k), ()
    if x.ndim == 2:
        return x, x, x.shape[:1]
    lead = x.shape[:1] + x.shape[2:]
    return x, np.ascontiguousarray(np.moveaxis(x, 1, -1)).reshape(-1, k), lead


def _grad_of_rows(grad_rows, x, lead, out_grad):
    """The (M, K) row gradient in the shape of the logits: into ``out_grad`` when given (copied
    there for (N, K, d1, ...), whose class axis is not last)."""
    if grad_rows is None:
        return out_grad
    if x.ndim <= 2:
        return out_grad if out_grad is not None else grad_rows.reshape(x.shape)  # the kernel wrote into out_grad
    shaped = np.moveaxis(grad_rows.reshape(lead + x.shape[1:2]), -1, 1)
    if out_grad is not None:
        np.copyto(out_grad, shaped)
        return out_grad
    return np.ascontiguousarray(shaped)


def _row_outputs(out, x, lead, inputs):
    """The checked ``out=`` pair and what the row kernel writes into: the loss as (M,) (a view of
    out[0]), the gradient as (M, K) (a view of out[1] for (K,) and (N, K), else None: written
    into a temporary and copied)."""
    loss, grad = _outputs(out, x, lead, inputs)
    rows_loss = loss.reshape(-1) if loss is not None else None
    rows_grad = grad.reshape(-1, x.shape[-1] if x.ndim == 1 else x.shape[1]) if (
        grad is not None and x.ndim <= 2) else None
    return (loss, grad), (rows_loss, rows_grad)


def _class_targets(targets, x, lead, ignore_index, name="targets", check=True):
    """int64 class indices, flattened to one per row; ``check=False`` leaves the range check to
    the C kernel, which validates every target before writing anything (then
    :func:`_check_class_targets` names the bad one)."""
    arr = np.asarray(targets)
    k = x.shape[1] if x.ndim >= 2 else x.shape[0]
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array of class indices (or class probabilities of the shape of "
                        f"inputs, {x.shape}), got dtype {arr.dtype} and shape {arr.shape}")
    if arr.shape != lead:
        raise ValueError(f"{name} has shape {arr.shape}, but inputs of shape {x.shape} take class indices of shape "
                         f"{lead} (or class probabilities of shape {x.shape})")
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds {arr.max()}, outside [0, {k})")
    arr = np.ascontiguousarray(arr.astype(np.int64, copy=False)).reshape(-1)  # int64 targets are not copied
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


def _is_probs(targets, x):
    """Whether ``targets`` are class probabilities: floats of the logits' shape (torch's rule)."""
    arr = np.asarray(targets)
    return arr.dtype.kind == "f" and arr.shape == x.shape


def _prob_targets(targets, x, name="targets"):
    """Class probabilities of the logits' shape, as (M, K) rows in the logits' dtype, each value in
    [0, 1] (rows need not sum to 1, as in torch; the error names the first bad value)."""
    arr = np.asarray(targets)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold class probabilities (floats of the shape of inputs), got dtype {arr.dtype}")
    if arr.shape != x.shape:
        raise ValueError(f"{name} has shape {arr.shape}, but class probabilities must have the shape of inputs, "
                         f"{x.shape}")
    bad = _first_bad(arr.reshape(-1), _is_soft)
    if bad is not None:
        raise ValueError(f"{name} must hold class probabilities in [0, 1], found {bad!r}")
    _, rows, _ = _rows(_contiguous(arr, x.dtype))
    return _contiguous(rows)


def _count_not_ignored(t, ignore_index):
    return sum(int(np.count_nonzero(t[lo:lo + _LABEL_CHUNK] != ignore_index)) for lo in range(0, t.size, _LABEL_CHUNK))


def _ignore_index(ignore_index):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (numbers.Integral, np.integer)):
        raise TypeError(f"ignore_index must be an integer, got {type(ignore_index).__name__}")
    ignore_index = int(ignore_index)
    if not np.iinfo(np.int64).min <= ignore_index <= np.iinfo(np.int64).max:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    return ignore_index


def _class_weights(info, alpha, inputs):
    """A per-class ``alpha`` (class_alpha): (scalar, vector or None).  None: no weighting
    (alpha_t = 1); a number: the same weight for every class; an array: one per class."""
    if alpha is None:
        return 1.0, None
    if np.ndim(alpha) == 0:
        return _param(info, "alpha", alpha), None
    arr = np.asarray(alpha)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"alpha must be a number or an array of per-class weights, got dtype {arr.dtype}")
    shape = np.shape(inputs)
    k = shape[1] if len(shape) >= 2 else (shape[0] if len(shape) == 1 else None)
    if arr.ndim != 1 or (k is not None and arr.shape[0] != k):
        raise ValueError(f"alpha must be a scalar or have shape ({k},) (one weight per class), got {arr.shape}")
    dom = info["domains"]["alpha"]
    ok = np.isfinite(arr) & np.array([_in_domain(float(a), dom) for a in arr.ravel()], dtype=bool)
    if not np.all(ok):
        raise ValueError(f"alpha must be {_describe(dom)} for every class, found {arr[~ok][0].item()!r}")
    x_dtype = np.asarray(inputs).dtype
    return 1.0, np.ascontiguousarray(arr, dtype=x_dtype if x_dtype in _DTYPES else np.float64)


def _call_probs(name, x, q, params, backend, want_grad, threads=0, out=(None, None), src: Source = SHIPPED):
    """Run one class-probability kernel on (M, K) rows ``x`` and ``q``: (loss (M,), grad (M, K) or None)."""
    dt = _DTYPES[x.dtype]
    out_loss, out_grad = out
    if backend == "numpy":
        fn = getattr(cbuild.load_numpy_module(*src), f"{name}_{dt}")
        loss, grad = fn(x, q, *(x.dtype.type(p) for p in params), loss=out_loss, grad=out_grad)
        return loss, (grad if want_grad else None)
    lib = cbuild.load(*src)
    ct = _ctype(x)
    n, k = x.shape
    loss = out_loss if out_loss is not None else np.empty(n, dtype=x.dtype)
    grad = out_grad if out_grad is not None else (np.empty_like(x) if want_grad else None)
    lib.derive_set_num_threads(threads)  # per calling thread; 0: all
    rc = getattr(lib, f"derive_{name}_{dt}")(n, k, _ptr(x, ct), _ptr(q, ct), *params, _ptr(loss, ct), _ptr(grad, ct))
    if rc != 0:
        raise ValueError(f"the C kernel {name} rejected its arguments (code {rc})")
    return loss, grad


def _probs(name, inputs, targets, params, reduction, backend, return_grad, threads=None, out=None,
           src: Source = SHIPPED, *, names=None, ignore_index=None):
    """The one path of every class-probability kernel (target "class_probs"): targets of the
    logits' shape, in [0, 1]; "mean" divides by the number of rows (torch's convention for
    probability targets).  Integer ``targets`` with ``ignore_index`` (label smoothing of class
    indices): one-hot rows, the ignored rows' loss and gradient 0, "mean" over the others.
    ``names``: the public names of the parameters, for the error messages."""
    info = _info(name, src)
    values = tuple(_param(info, p, params[p], label=(names or {}).get(p)) for p in info["params"])
    reduction = _reduction(reduction)
    threads = _threads(threads)
    x, rows, lead = _rows(inputs)
    backend = _backend(backend, src)
    if ignore_index is None:
        q = _prob_targets(targets, x)
        valid = None
    else:
        t = _class_targets(targets, x, lead, ignore_index)
        valid = t != ignore_index
        q = np.zeros_like(rows)
        q[np.flatnonzero(valid), t[valid]] = 1
    outs, row_outs = _row_outputs(out, x, lead, [("inputs", x), ("targets", q)])
    want_grad = return_grad or outs[1] is not None
    loss, grad = _call_probs(name, rows, q, values, backend, want_grad, threads, row_outs, src)
    if valid is not None and not valid.all():
        loss[~valid] = 0
        if grad is not None:
            grad[~valid] = 0
    count = int(np.count_nonzero(valid)) if valid is not None else rows.shape[0]
    loss = outs[0] if outs[0] is not None else loss.reshape(lead)
    return _reduce(loss, _grad_of_rows(grad, x, lead, outs[1]), reduction, count, return_grad)


def _rowwise(name, inputs, targets, params, ignore_index, reduction, backend, return_grad, threads=None,
             out=None, src: Source = SHIPPED, *, probs=None):
    """The one path of every softmax (class-index) kernel: ``params`` maps the kernel's declared
    parameters to the values given, each checked against its declared domain (a ``class_alpha``
    alpha may also be None or one weight per class).  Logits (N, K), (N, K, d1, ...) or (K,),
    class indices of the loss's shape.  Float targets of the logits' shape are class
    probabilities: ``probs`` is the call for them (a class-probability kernel), else they are
    refused."""
    info = _info(name, src)
    if np.ndim(inputs) >= 1 and _is_probs(targets, np.asarray(inputs)):
        if probs is None:
            raise ValueError(f"targets are class probabilities (floats of the shape of inputs), which are not defined "
                             f"for {info['title']}: no kernel declares them; give class indices of shape "
                             f"{_rows(inputs)[2]}")
        return probs()
    alpha_vec = None
    if info["class_alpha"]:
        params = dict(params)
        params["alpha"], alpha_vec = _class_weights(info, params.get("alpha"), inputs)
    values = _scalar_params(info, params)
    reduction = _reduction(reduction)
    threads = _threads(threads)
    x, rows, lead = _rows(inputs)
    ignore_index = _ignore_index(ignore_index)
    backend = _backend(backend, src)
    t = _class_targets(targets, x, lead, ignore_index, check=backend != "c")
    outs, row_outs = _row_outputs(out, x, lead, [("inputs", x), ("targets", t), ("alpha", alpha_vec)])
    loss, grad = _call_rowwise(name, rows, t, alpha_vec, values, ignore_index, backend,
                               return_grad or outs[1] is not None, threads, row_outs, src)
    count = _count_not_ignored(t, ignore_index) if reduction == "mean" else t.size
    loss = outs[0] if outs[0] is not None else loss.reshape(lead)
    return _reduce(loss, _grad_of_rows(grad, x, lead, outs[1]), reduction, count, return_grad)


_SOFTMAX_NOTES = """\
log p_t = x_t - m - log(sum_k exp(x_k - m)) with m the row maximum (log-softmax), the row sum
compensated; the gradient is p - onehot(t) (times the focal factor), with no 1 - p by subtraction."""


@_document("""Softmax cross-entropy -log softmax(x)[t] per row of the logits (``F.cross_entropy``).""",
           kind="softmax", probs=True, after_reduction="""\
label_smoothing : float, default 0.0
    In [0, 1], torch's: the targets become (1 - label_smoothing) q + label_smoothing/K, q the
    class probabilities or the one-hot rows of the class indices (ignored rows stay 0).
""", value_errors="a class probability outside [0, 1] or NaN; label_smoothing outside [0, 1]",
           notes=_SOFTMAX_NOTES + """

Class probabilities, and class indices with label_smoothing > 0, use the kernel
``label_smoothed_ce`` (derive/derivations/label_smoothing.toml): loss = -sum_k q'_k log p_k and
grad = p sum_k q'_k - q', with log p_k = x_k - m - log S.""", examples="""\
>>> import numpy as np, derive
>>> x = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]); t = np.array([0, -100])
>>> np.round(derive.softmax_cross_entropy(x, t, backend="numpy"), 4)
array([0.1698, 0.    ])""")
def softmax_cross_entropy(inputs: ArrayLike, targets: ArrayLike, ignore_index: int = -100,
                          reduction: Reduction = "none", label_smoothing: float = 0.0, *, backend: Backend = "auto",
                          return_grad: bool = False, threads: Optional[int] = None,
                          out: Outputs = None) -> LossResult:
    def smoothed(index_targets=False):  # the label_smoothing module's class-probability kernel
        return _probs("label_smoothed_ce", inputs, targets, {"epsilon": label_smoothing}, reduction, backend,
                      return_grad, threads, out, _shipped("label_smoothing"), names={"epsilon": "label_smoothing"},
                      ignore_index=_ignore_index(ignore_index) if index_targets else None)

    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real) or label_smoothing != 0:
        if not (np.ndim(inputs) >= 1 and _is_probs(targets, np.asarray(inputs))):
            return smoothed(index_targets=True)  # one-hot rows, smoothed (checks label_smoothing)
    return _rowwise("softmax_ce", inputs, targets, {}, ignore_index, reduction, backend, return_grad, threads, out,
                    probs=smoothed)


@_document("""Softmax focal loss -alpha_t (1 - p_t)^gamma log p_t per row, p = softmax(x) over the K classes.""",
           """\
alpha : None, float or array_like of shape (K,), default None
    None: no weighting (alpha_t = 1); a float in [0, 1]: the same weight for every class; an
    array: one weight per class (alpha_t = alpha[t]), each in [0, 1].
""" + _DOC_GAMMA, kind="softmax", value_errors="alpha or gamma out of range or not finite; alpha of the wrong shape",
           notes=_SOFTMAX_NOTES + "  (1 - p_t)^gamma is evaluated in log space where gamma is not an integer.")
def softmax_focal_loss(inputs: ArrayLike, targets: ArrayLike, alpha: Union[None, float, Sequence[float], np.ndarray] = None,
                       gamma: float = 2.0, ignore_index: int = -100, reduction: Reduction = "none", *,
                       backend: Backend = "auto", return_grad: bool = False, threads: Optional[int] = None,
                       out: Outputs = None) -> LossResult:
    return _rowwise("softmax_focal", inputs, targets, {"alpha": alpha, "gamma": gamma}, ignore_index, reduction,
                    backend, return_grad, threads, out)


# the losses defined above (their definitions are the only list of them), then the rest of the API
__all__ = [*_PUBLIC_LOSSES, "available_backends", "CBackendUnavailableWarning", "MAX_THREADS"]
