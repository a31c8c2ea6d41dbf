"""derive.torch: the proved kernels as PyTorch ops, with autograd (double backward included) and torch.compile.

``pip install 'derive-gradients[torch]'`` (PyTorch 2.4 or newer); ``import derive`` never imports
torch, this module does.  CPU tensors only (the generated C kernels, through the tensors' data
pointers: no ``.numpy()``, no copy of contiguous float32/float64 input).

Drop-ins, with the conventions of the functions they replace:

* :func:`sigmoid_focal_loss` (torchvision.ops.sigmoid_focal_loss: any shape, soft targets in
  [0, 1], ``alpha < 0`` for no weighting), :func:`binary_cross_entropy_with_logits`;
* :func:`softmax_focal_loss` and :func:`cross_entropy` (torch.nn.functional.cross_entropy: classes
  on axis 1, (N, K), (N, K, d1, ...) or (K,) logits, ``ignore_index``, class-probability targets,
  per-class ``weight``, ``label_smoothing``);
* modules :class:`SigmoidFocalLoss`, :class:`SoftmaxFocalLoss`, :class:`CrossEntropyLoss`,
  :class:`BCEWithLogitsLoss` (each with its function's defaults);
* ``derive.torch.kernels.<kernel>(x, t, *params, reduction="none")``: every kernel of every shipped
  derivation file, and :func:`load` (``derive.torch.load("my_loss.toml")``) for a file of your own,
  verified and generated as by :func:`derive.load`.

Each is a ``torch.library.custom_op`` (namespace ``derive``; ``register_fake`` for torch.compile
and meta tensors; ``register_autograd`` from the fused gradient of the same pass as the loss) and
its second derivative, proved like the first (``derive_<kernel>_hess`` / ``_hvp``): ``gradgradcheck``
passes and ``torch.autograd.functional.hvp``/``hessian`` work; a third derivative raises
:class:`ThirdDerivativeError`.  Targets, parameters and weights are not differentiated (a target
that requires grad is refused).

Dtypes and error: float32 and float64 are computed in their own dtype (the kernels' bound, about
2e-6 relative in float32 at ordinary inputs, see ``derive accuracy``); float16 and bfloat16 are
computed in float32 and rounded once to the input dtype, so their error is that rounding, 2^-11
(float16) or 2^-8 (bfloat16) relative, plus the float32 kernel's 2e-6 (reductions are summed in
float32 before that rounding).  Non-contiguous inputs are made contiguous (one copy), as are
softmax logits of shape (N, K, d1, ...) (the classes moved last, as the kernels read rows).

``reduction="sum"`` and ``"mean"`` (elementwise and class-index kernels) run one reduced kernel
pass: the loss summed in the pass that writes the gradient (in double, compensated, in a fixed
order: the same on any thread count), the gradient written pre-scaled; a backward with an
incoming gradient of 1 (``loss.backward()``) hands it on without another pass.

"mean" follows torch, except that a mean over no rows (every target ``ignore_index``, or all
their weights 0) is 0 with gradient 0, where torch gives NaN: one batch of padding then adds
nothing, instead of turning every parameter into NaN.
"""
from __future__ import annotations

import inspect
import math
import numbers

import torch
import torch.nn.functional as F

from derive.runtime import losses as _losses
from derive.runtime import torch_ops as _ops
from derive.runtime.torch_ops import KernelOps, ThirdDerivativeError

_REDUCTIONS = ("none", "sum", "mean")
_HALF = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------
# argument checks (each error names the argument)


def _logits(inputs, name="input"):
    """(x in float32/float64, the dtype to return): float16/bfloat16 computed in float32."""
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.device.type not in ("cpu", "meta", "cuda"):  # cuda: derive.runtime.cuda_ops
        raise ValueError(f"{name} is on {inputs.device}: the derive kernels run on CPU and CUDA tensors")
    if inputs.dtype in (torch.float32, torch.float64):
        return inputs, inputs.dtype
    if inputs.dtype in _HALF:
        return inputs.float(), inputs.dtype
    raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {inputs.dtype}")


def _targets(targets, name="target"):
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(targets).__name__}")
    if targets.requires_grad:
        raise ValueError(f"{name} requires grad, but derive.torch does not differentiate with respect to targets "
                         f"(no derivative in them is derived): pass {name}.detach()")
    return targets


def _reduction(reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of 'none', 'sum', 'mean', got {reduction!r}")
    return reduction


def _reduce(loss, reduction, count=None):
    """``loss`` reduced; "mean" divides by ``count`` (a tensor or int; the number of values when
    None), and a mean over nothing is 0 (see the module's docstring)."""
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    if count is None:
        return total / loss.numel() if loss.numel() else total
    if isinstance(count, torch.Tensor):
        return total / torch.where(count > 0, count, torch.ones_like(count)).to(total.dtype)
    return total / count if count else total


def _rows(x):
    """Logits (N, K), (K,) or (N, K, d1, ...) as (M, K) rows, and the loss's shape."""
    if x.dim() == 0:
        raise ValueError("input must be (N, K) or (N, K, d1, ...) logits (classes on axis 1) or one row (K,), "
                         "got a 0-d tensor")
    if x.shape[1 if x.dim() >= 2 else 0] == 0:
        raise ValueError(f"input must have at least one class (K >= 1 on axis {1 if x.dim() >= 2 else 0}), got shape "
                         f"{tuple(x.shape)}")
    if x.dim() == 1:
        return x.unsqueeze(0), ()
    if x.dim() == 2:
        return x, tuple(x.shape[:1])
    lead = (x.shape[0],) + tuple(x.shape[2:])
    return x.movedim(1, -1).reshape(-1, x.shape[1]), lead


def _is_probs(targets, x):
    """Class probabilities: floating targets of the logits' shape (torch's rule)."""
    return targets.dtype.is_floating_point and tuple(targets.shape) == tuple(x.shape)


def _class_targets(targets, x, lead, name="target"):
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices of shape {lead} (or class probabilities of the "
                        f"shape of input, {tuple(x.shape)}), got dtype {targets.dtype} and shape {tuple(targets.shape)}")
    if tuple(targets.shape) != tuple(lead):
        raise ValueError(f"{name} has shape {tuple(targets.shape)}, but input of shape {tuple(x.shape)} takes class "
                         f"indices of shape {tuple(lead)} (or class probabilities of shape {tuple(x.shape)})")
    return targets.reshape(-1)


def _prob_rows(targets, x):
    """Class probabilities in the layout of the logits' rows."""
    q = targets.to(x.dtype)
    if x.dim() == 1:
        return q.unsqueeze(0)
    if x.dim() == 2:
        return q
    return q.movedim(1, -1).reshape(-1, x.shape[1])


def _ignore_index(ignore_index):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an integer, got {type(ignore_index).__name__}")
    return int(ignore_index)


def _shipped_ops(kernel) -> KernelOps:
    """The ops of a shipped kernel (by name, whichever module declares it)."""
    return _all().ops(kernel)


def _scalar(name, value):
    """A finite real number (pure Python: torch.compile traces it without NumPy)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _param(ops, name, value, allow_off=False, label=None):
    """A scalar parameter checked against its domain in the derivation file (the checks and
    messages of derive.runtime.losses); ``label``: the name the caller knows it by."""
    label = label or name
    value = _scalar(label, value)
    if allow_off and value < 0:
        return value
    dom = ops.info["domains"][name]
    if not _losses._in_domain(value, dom):
        extra = " (or negative for no weighting)" if allow_off else ""
        raise ValueError(f"{label} must be {_losses._describe(dom)}{extra}, got {value:g}")
    return value


_CHECKED: dict = {}  # (kernel, (type, value) of each argument) -> the checked parameters (eager calls)


def _checked(ops, alpha, gamma):
    """``_scalar_params(ops, {"alpha": alpha, "gamma": gamma})``, remembered for the values of
    earlier eager calls (a training loop passes the same numbers every step); by type and value,
    so True is not taken for 1.  Under torch.compile, checked every time (traced once)."""
    if torch.compiler.is_compiling():
        return _scalar_params(ops, {"alpha": alpha, "gamma": gamma})
    try:
        key = (ops.qualname, type(alpha), alpha, type(gamma), gamma)
        values = _CHECKED.get(key)
    except TypeError:  # an unhashable argument (a tensor is hashable; a list is not): checked
        return _scalar_params(ops, {"alpha": alpha, "gamma": gamma})
    if values is None:
        values = _scalar_params(ops, {"alpha": alpha, "gamma": gamma})
        if isinstance(alpha, (int, float)) and isinstance(gamma, (int, float)) and len(_CHECKED) < 4096:
            _CHECKED[key] = values
    return values


def _scalar_params(ops, params):
    """The declared scalar parameters in the kernel's order (``params``: name -> value); a
    no_weight_below_zero one may be negative, a per-class alpha is checked by the kernel."""
    info = ops.info
    return tuple(params[n] if (ops.class_alpha and n == "alpha") else
                 _param(ops, n, params[n], allow_off=n in info["no_weight_below_zero"]) for n in ops.params)


# ------------------------------------------------------------------------------------------
# the generic calls: one per layout


_MODE = {"sum": 0, "mean": 1}  # the reduced ops' modes


def _elementwise(ops, inputs, targets, values, reduction):
    x, dtype = _logits(inputs)
    t = _targets(targets)
    if t.shape != x.shape:
        raise ValueError(f"target has shape {tuple(t.shape)}, but input has shape {tuple(x.shape)}")
    # summed in the kernel's pass, gradient pre-scaled (CPU; the CUDA kernels have no reduced entry: loss + grad)
    if reduction != "none" and ops.red is not None and x.device.type != "cuda":
        loss = ops.reduced(x, t, *values, _MODE[reduction])
    else:
        loss = _reduce(ops.apply(x, t, *values)[0], reduction)
    return loss if loss.dtype == dtype else loss.to(dtype)


def _class_index(ops, inputs, targets, alpha_vec, values, ignore_index, reduction, weights=None, scale=None):
    """A class-index kernel on any torch layout; ``weights``: the per-row weights "mean" divides by
    (torch's weighted mean), else the count of rows that are not ignored; ``scale``: a factor of
    the "none" and "sum" results (before the rounding to a float16/bfloat16 input's dtype)."""
    x, dtype = _logits(inputs)
    t = _targets(targets)
    rows, lead = _rows(x)
    if _is_probs(t, x):
        raise ValueError(f"target holds class probabilities (floats of the shape of input), which are not defined "
                         f"for {ops.info['title']}: no kernel declares them; give class indices of shape {lead}")
    flat = _class_targets(t, x, lead)
    args = (rows, flat) + ((alpha_vec,) if ops.class_alpha else ()) + tuple(values) + (ignore_index,)
    # summed in the kernel's pass, gradient pre-scaled (CPU; the CUDA kernels have no reduced entry: loss + grad)
    if reduction != "none" and ops.red is not None and x.device.type != "cuda":
        # "mean": over the rows not ignored, or (``weights``: cross_entropy's per-class weights, the
        # kernel's alpha_vec) over their alpha_t, torch's weighted mean (mode 2)
        mode = 0 if reduction == "sum" else (1 if weights is None else 2)
        out = ops.reduced(*args, mode)
        if scale is not None and reduction != "mean":
            out = out * scale.to(out.dtype)
        return out if out.dtype == dtype else out.to(dtype)
    loss = ops.apply(*args)[0]
    count = None
    if reduction == "mean":
        valid = flat != ignore_index
        count = valid.sum() if weights is None else weights(flat, valid)
    out = _reduce(loss.reshape(lead), reduction, count)
    if scale is not None and reduction != "mean":
        out = out * scale.to(out.dtype)
    return out.to(dtype)


def _class_probs(ops, inputs, targets, values, reduction, valid=None):
    """A class-probability kernel; ``valid`` (rows): class-index targets made one-hot, the others'
    loss 0 and "mean" over them only."""
    x, dtype = _logits(inputs)
    rows, lead = _rows(x)
    q = targets
    loss = ops.apply(rows, q, *values)[0]
    count = None
    if valid is not None:
        loss = loss * valid.to(loss.dtype)
        count = valid.sum()
    return _reduce(loss.reshape(lead), reduction, count).to(dtype)


# ------------------------------------------------------------------------------------------
# every kernel of a set of generated modules, named by the kernel


_DROP = ("backend", "return_grad", "threads", "out")


class TorchKernels:
    """One function per kernel, named by the kernel: ``f(inputs, targets, *params, [ignore_index],
    reduction="none")`` with the parameters and defaults of the derivation file (per element or
    per row, autograd and double backward included); ``ops(name)`` gives its :class:`KernelOps`
    (``.op``, the loss op; ``.op2``, the second-derivative op)."""

    def __init__(self, loaded, shipped: bool):
        """``loaded``: a :class:`derive.runtime.kernel_files.LoadedKernels` (its generated folder,
        modules and functions' signatures)."""
        self._what = repr(loaded)
        self._ops = {}
        for module, names in loaded.modules.items():
            src = (loaded.generated, module)
            prefix = _ops.prefix_of(src, shipped)
            for name in names:
                ops = _ops.kernel_ops(name, src, prefix)
                self._ops[name] = ops
                sig = inspect.signature(getattr(loaded, name))
                sig = sig.replace(parameters=[p for n, p in sig.parameters.items() if n not in _DROP])
                setattr(self, name, _kernel_function(ops, sig, getattr(loaded, name).__doc__))

    @property
    def kernel_names(self) -> list:
        return list(self._ops)

    def ops(self, name) -> KernelOps:
        if name not in self._ops:
            raise KeyError(f"no kernel {name!r}; the kernels are {', '.join(self._ops)}")
        return self._ops[name]

    def __repr__(self):
        return self._what.replace("<derive kernels", "<derive.torch kernels", 1)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._ops))


def _kernel_function(ops, sig, numpy_doc):
    """The torch function of one kernel: arguments bound by hand (no inspect at call time, which
    torch.compile would not trace), each parameter checked against its declared domain."""
    names = [n for n in sig.parameters if n not in ("inputs", "targets")]
    defaults = {n: p.default for n, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
    positional = [n for n, p in sig.parameters.items() if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD][2:]
    name = ops.name

    def kernel(inputs, targets, *args, **kwargs):
        if len(args) > len(positional):
            raise TypeError(f"{name}() takes at most {len(positional) + 2} positional arguments, got {len(args) + 2}")
        a = dict(zip(positional, args))
        for key, value in kwargs.items():
            if key not in names:
                raise TypeError(f"{name}() got an unexpected keyword argument {key!r}")
            if key in a:
                raise TypeError(f"{name}() got multiple values for argument {key!r}")
            a[key] = value
        for key in names:
            if key not in a:
                if key not in defaults:
                    raise TypeError(f"{name}() missing required argument {key!r}")
                a[key] = defaults[key]
        reduction = _reduction(a["reduction"])
        if ops.layout == "elementwise":
            values = _scalar_params(ops, a)
            return _elementwise(ops, inputs, targets, values, reduction)
        if ops.layout == "class_probs":
            values = tuple(_param(ops, p, a[p]) for p in ops.params)
            x, _ = _logits(inputs)
            t = _targets(targets)
            if not _is_probs(t, x):
                raise ValueError(f"targets must be class probabilities of the shape of inputs, {tuple(x.shape)} "
                                 f"(floats in [0, 1]), got dtype {t.dtype} and shape {tuple(t.shape)}")
            return _class_probs(ops, inputs, _prob_rows(t, x), values, reduction)
        params = dict(a)
        alpha_vec = None
        if ops.class_alpha:
            params["alpha"], alpha_vec = _class_alpha(ops, a.get("alpha"), inputs)
        values = _scalar_params(ops, params)
        return _class_index(ops, inputs, targets, alpha_vec, values, _ignore_index(a["ignore_index"]), reduction)

    kernel.__name__ = kernel.__qualname__ = name
    kernel.__signature__ = sig
    doc = (numpy_doc or "").replace("array_like of float32 or float64", "torch.Tensor (CPU) of float32, float64, "
                                    "float16 or bfloat16 (those two computed in float32)")
    doc = doc.replace("array_like", "torch.Tensor")
    kernel.__doc__ = doc.replace(
        "backend : \"auto\", \"c\" or \"numpy\"; return_grad, threads, out: as for derive.runtime.losses",
        (f"Through the custom ops {ops.qualname} (loss and fused gradient) and {ops.qualname}_{ops.second} "
         "(double backward)" if ops.second else
         f"Through the custom op {ops.qualname} (loss and fused gradient); no second derivative is declared, so "
         "double backward raises ThirdDerivativeError") + "; targets and parameters are not differentiated.")
    return kernel


def _class_alpha(ops, alpha, inputs):
    """A per-class alpha: (scalar, tensor or None), None for no weighting, a number for every
    class, a tensor (or sequence) for one weight per class (checked in [0, 1] by the kernel)."""
    if alpha is None:
        return 1.0, None
    if isinstance(alpha, torch.Tensor):
        if alpha.dim() == 0:
            alpha = alpha.item()
        else:
            if alpha.requires_grad:
                raise ValueError("alpha requires grad, but derive.torch does not differentiate with respect to the "
                                 "per-class weights: pass alpha.detach()")
            return 1.0, _class_vector(alpha, inputs, "alpha")
    elif isinstance(alpha, (list, tuple)):
        return 1.0, _class_vector(torch.tensor(alpha, dtype=torch.float64), inputs, "alpha")
    return _param(ops, "alpha", alpha), None


def _class_vector(w, inputs, name):
    k = inputs.shape[1] if inputs.dim() >= 2 else inputs.shape[0]
    if w.dim() != 1 or w.shape[0] != k:
        raise ValueError(f"{name} must be a scalar or have shape ({k},) (one weight per class), got {tuple(w.shape)}")
    if not w.dtype.is_floating_point and w.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must hold per-class weights (floats), got dtype {w.dtype}")
    dtype = torch.float64 if inputs.dtype == torch.float64 else torch.float32
    return w.to(dtype)


def load(path, *, step_timeout: float = 4.0, timeout: float | None = None) -> TorchKernels:
    """The kernels of the derivation file ``path`` as torch functions: verified and generated by
    :func:`derive.load` (a kernel that uses an unproved line is refused), its ops registered as
    ``derive::u<source digest>_<module>_<kernel>`` (loading the same file again reuses them)."""
    from derive.runtime import kernel_files

    return TorchKernels(kernel_files.load(path, step_timeout=step_timeout, timeout=timeout), shipped=False)


def shipped(module: str | None = None) -> TorchKernels:
    """The kernels of the shipped derivation files (all, or those of ``module``) as torch functions."""
    from derive.runtime import kernel_files

    if module is None:
        return _all()
    return TorchKernels(kernel_files.shipped(module), shipped=True)


# ------------------------------------------------------------------------------------------
# drop-ins


def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2,
                       reduction: str = "none") -> torch.Tensor:
    """torchvision.ops.sigmoid_focal_loss, from the proved kernels.

    ``inputs``: logits of any shape; ``targets``: the same shape, labels 0 or 1 or soft targets in
    [0, 1] (then the soft kernel: ce = BCE-with-logits(x, t), p_t = p t + (1 - p)(1 - t));
    loss = alpha_t ce (1 - p_t)^gamma with alpha_t = alpha t + (1 - alpha)(1 - t), or no weighting
    for ``alpha < 0``; gamma >= 0.  ``reduction``: "none", "mean" or "sum".  Finite loss and
    gradients at saturated logits (x_t = 40, gamma = 0.5), where torchvision's formula gives NaN."""
    ops = _shipped_ops("sigmoid_focal_alpha")
    values = _checked(ops, alpha, gamma)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"Invalid Value for arg 'reduction': '{reduction} \n Supported reduction modes: 'none', "
                         "'mean', 'sum'")
    return _elementwise(ops, inputs, targets, values, reduction)


def binary_cross_entropy_with_logits(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                                     reduction: str = "mean", pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """torch.nn.functional.binary_cross_entropy_with_logits, from the proved kernel ``sigmoid_ce``
    (soft targets in [0, 1]: ``sigmoid_ce_soft``).  ``weight`` (broadcast to the input) multiplies
    each element's loss before the reduction, as in torch; ``pos_weight`` is not supported (no
    shipped kernel declares it: ValueError)."""
    if pos_weight is not None:
        raise ValueError("pos_weight is not supported by derive.torch.binary_cross_entropy_with_logits: no shipped "
                         "kernel declares it")
    reduction = _reduction(reduction)
    loss = _elementwise(_shipped_ops("sigmoid_ce"), input, target, (), "none")
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction)


def softmax_focal_loss(input: torch.Tensor, target: torch.Tensor, alpha=None, gamma: float = 2.0,
                       ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Softmax focal loss -alpha_t (1 - p_t)^gamma log p_t with F.cross_entropy's conventions.

    ``input``: (N, K), (N, K, d1, ...) or (K,) logits, classes on axis 1; ``target``: class indices
    of the shape without axis 1, or ``ignore_index`` (loss 0, gradient 0, not counted by "mean");
    ``alpha``: None (no weighting), a number in [0, 1], or one weight per class (shape (K,)); gamma
    >= 0 (gamma = 0: cross-entropy).  "mean" divides by the number of rows not ignored (alpha is the
    focal balance, not F.cross_entropy's ``weight``; a mean over none is 0)."""
    ops = _shipped_ops("softmax_focal")
    reduction = _reduction(reduction)
    a, alpha_vec = _class_alpha(ops, alpha, input)
    values = _scalar_params(ops, {"alpha": a, "gamma": gamma})
    return _class_index(ops, input, target, alpha_vec, values, _ignore_index(ignore_index), reduction)


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """torch.nn.functional.cross_entropy, from the proved kernels.

    Class indices: ``softmax_ce``; with ``weight`` (one per class, >= 0) the softmax focal kernel
    with gamma = 0 and per-class alpha = weight / max(weight) (the loss times max(weight); "mean"
    divides by the sum of the targets' weights, as torch does); with ``label_smoothing`` the
    kernel ``label_smoothed_ce`` on one-hot rows (ignored rows 0, "mean" over the others).
    Class probabilities (floats of the input's shape): ``label_smoothed_ce``, "mean" over all
    rows.  ``weight`` together with class probabilities or label_smoothing is not supported (no
    kernel declares it: ValueError).  A mean over no rows is 0, not torch's NaN."""
    reduction = _reduction(reduction)
    smoothing = _scalar("label_smoothing", label_smoothing)
    x, _ = _logits(input)
    t = _targets(target)
    probs = _is_probs(t, x)
    if weight is not None and (probs or smoothing != 0):
        raise ValueError("weight with class-probability targets or label_smoothing is not supported by "
                         "derive.torch.cross_entropy: no shipped kernel declares per-class weights there")
    ii = _ignore_index(ignore_index)
    if probs or smoothing != 0:
        ops = _shipped_ops("label_smoothed_ce")
        eps = _param(ops, "epsilon", smoothing, label="label_smoothing")
        if probs:
            return _class_probs(ops, input, _prob_rows(t, x), (eps,), reduction)
        rows, lead = _rows(x)
        flat = _class_targets(t, x, lead)
        valid = flat != ii
        k = rows.shape[1]
        onehot = F.one_hot(torch.where(valid, flat, torch.zeros_like(flat)).to(torch.int64), k)
        q = onehot.to(rows.dtype) * valid.unsqueeze(-1).to(rows.dtype)
        return _class_probs(ops, input, q, (eps,), reduction, valid=valid)
    if weight is None:
        return _class_index(_shipped_ops("softmax_ce"), input, t, None, (), ii, reduction)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor of one weight per class, got {type(weight).__name__}")
    if weight.requires_grad:
        raise ValueError("weight requires grad, but derive.torch does not differentiate with respect to the class "
                         "weights: pass weight.detach()")
    ops = _shipped_ops("softmax_focal")
    w = _class_vector(weight, x, "weight")
    top = w.max() if w.numel() else torch.ones((), dtype=w.dtype)
    top = torch.where(top > 0, top, torch.ones_like(top))  # all zero: the loss is 0 (torch: 0, NaN for "mean")
    scaled = w / top  # in [0, 1] (a negative or NaN weight: ValueError from the kernel's check)

    def weights(flat, valid):
        return (scaled[torch.where(valid, flat, torch.zeros_like(flat))] * valid.to(scaled.dtype)).sum()

    values = _scalar_params(ops, {"alpha": 1.0, "gamma": 0.0})
    return _class_index(ops, input, t, scaled, values, ii, reduction, weights=weights, scale=top)


# ------------------------------------------------------------------------------------------
# modules


class SigmoidFocalLoss(torch.nn.Module):
    """:func:`sigmoid_focal_loss` as a module (the same defaults)."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none"):
        super().__init__()
        self.alpha, self.gamma, self.reduction = alpha, gamma, _reduction(reduction)

    def forward(self, inputs, targets):
        return sigmoid_focal_loss(inputs, targets, self.alpha, self.gamma, self.reduction)


class BCEWithLogitsLoss(torch.nn.Module):
    """:func:`binary_cross_entropy_with_logits` as a module (torch.nn.BCEWithLogitsLoss without pos_weight)."""

    def __init__(self, weight: torch.Tensor | None = None, reduction: str = "mean"):
        super().__init__()
        self.register_buffer("weight", weight)
        self.reduction = _reduction(reduction)

    def forward(self, input, target):
        return binary_cross_entropy_with_logits(input, target, self.weight, self.reduction)


class SoftmaxFocalLoss(torch.nn.Module):
    """:func:`softmax_focal_loss` as a module (the same defaults; a per-class alpha is a buffer)."""

    def __init__(self, alpha=None, gamma: float = 2.0, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        if isinstance(alpha, (list, tuple)):
            alpha = torch.tensor(alpha, dtype=torch.float32)
        if isinstance(alpha, torch.Tensor):
            self.register_buffer("alpha", alpha)
        else:
            self.alpha = alpha
        self.gamma, self.ignore_index, self.reduction = gamma, _ignore_index(ignore_index), _reduction(reduction)

    def forward(self, input, target):
        return softmax_focal_loss(input, target, self.alpha, self.gamma, self.ignore_index, self.reduction)


class CrossEntropyLoss(torch.nn.Module):
    """:func:`cross_entropy` as a module (torch.nn.CrossEntropyLoss's arguments and defaults)."""

    def __init__(self, weight: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction = _ignore_index(ignore_index), _reduction(reduction)
        self.label_smoothing = label_smoothing

    def forward(self, input, target):
        return cross_entropy(input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing)


_KERNELS: list = []


def _all() -> TorchKernels:
    """Every kernel of every shipped file (their ops registered at import: torch.compile cannot
    trace the reading of the shipped files' [[kernel]] tables inside a compiled function)."""
    if not _KERNELS:
        from derive.runtime import kernel_files

        _KERNELS.append(TorchKernels(kernel_files.shipped(), shipped=True))
    return _KERNELS[0]


#: every kernel of every shipped derivation file: ``derive.torch.kernels.<kernel>(x, t, ...)``
kernels = _all()

__all__ = ["sigmoid_focal_loss", "binary_cross_entropy_with_logits", "softmax_focal_loss", "cross_entropy",
           "SigmoidFocalLoss", "BCEWithLogitsLoss", "SoftmaxFocalLoss", "CrossEntropyLoss", "kernels", "load",
           "shipped", "TorchKernels", "KernelOps", "ThirdDerivativeError"]
