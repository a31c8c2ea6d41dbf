"""PyTorch custom ops over the generated C kernels: the implementation of :mod:`derive.torch`.

Every kernel of a generated module (the shipped files' ``generated/<module>.*``, or a user's
file rendered by :func:`derive.load`) becomes two ``torch.library.custom_op`` ops in the
namespace ``derive``:

* ``<prefix><kernel>``: ``(x, target, <params>) -> (loss, grad)``, the kernel's fused pass: the
  loss per element (elementwise) or per row (softmax, x of shape (M, K)) and its gradient with
  respect to x.  Its autograd (``register_autograd``) is ``dx = g_loss * grad`` from the saved
  gradient (no second pass), plus, when the saved gradient is itself differentiated (double
  backward), the second op applied to that gradient's incoming gradient.
* ``<prefix><kernel>_hess`` (elementwise: ``d grad_i / d x_i``, the proved second derivative)
  or ``<prefix><kernel>_hvp`` (softmax: the Hessian of each row's loss times a vector ``v``),
  from the generated ``derive_<kernel>_hess_<dt>`` / ``derive_<kernel>_hvp_<dt>``.  The HVP's own
  gradient with respect to ``v`` is the HVP again (the Hessian is symmetric), which is what
  ``torch.autograd.functional.hvp`` needs; a third derivative in x is not derived and raises.

* ``<prefix><kernel>_reduced`` (elementwise and class-index kernels): ``(<the op's arguments>,
  int mode) -> (loss, grad)`` with the loss a 0-d tensor, the sum (mode 0) or mean (1; 2: the
  alpha_t-weighted mean of torch's ``weight``) formed in the kernel's pass
  (``derive_<kernel>_reduced_<dt>``: compensated, in a fixed order, the same on any thread count)
  and grad pre-scaled: no loss array, no reduction pass, and in eager mode no ``g * grad`` pass
  when the incoming gradient is 1.  The drop-ins with reduction "sum"/"mean" run it.

``<prefix>`` is ``<module>_`` for a shipped module and ``u<digest>_`` (the generated C source's
digest) for a user's file, so that two files never register the same name and loading one file
twice reuses its ops.  ``register_fake`` gives shapes and dtypes (torch.compile, meta tensors).

The ops take CPU tensors of float32 or float64 and pass their data pointers to the C library
(:mod:`derive.runtime.cbuild`): contiguous inputs are not copied; non-contiguous ones are made
contiguous (one copy); targets of another dtype are converted to the logits' (one copy).
float16 and bfloat16 are handled by :mod:`derive.torch`'s functions, which compute in float32.
Outputs of 4 MiB and more are advised as transparent huge pages before the kernel first writes
them (see :func:`_empty`), and the eager reduced path reuses its gradient buffers once nothing
references them (:class:`_GradPool`, ``REUSE_GRAD``).
"""
from __future__ import annotations

import ctypes
import keyword
import sys
import threading

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from derive.runtime import cbuild
from derive.runtime import losses

_ELABEL = 2  # DERIVE_ELABEL: a label neither 0 nor 1 (a soft kernel: a target outside [0, 1]), outputs written
_SOFT_PROBE = 4096  # targets looked at before a binary kernel that has a soft version (not a full pass)
_PARALLEL_MIN = 32768  # DERIVE_PARALLEL_MIN of the generated headers: smaller calls run on one thread
_DT = {torch.float32: "f32", torch.float64: "f64"}
_CT = {"f32": ctypes.c_float, "f64": ctypes.c_double}
# argument names the schema of an op uses itself (or that torch's schema language reserves)
_RESERVED = {"x", "target", "alpha_vec", "ignore_index", "v", "out", "self", "Tensor", "float", "int", "bool"}


class ThirdDerivativeError(RuntimeError):
    """A third derivative was asked for: the derivation files prove the loss, its gradient and
    its second derivative, nothing beyond."""


# ------------------------------------------------------------------------------------------
# the C functions, with argument types of our own (pointers as void*: data_ptr() goes straight in)

_FUNCS: dict = {}


def _cfunc(src, cname, kinds):
    """``(lib, fn)``: the C function ``cname`` of the module ``src`` = (folder, module), with
    argtypes from ``kinds`` ('n' size_t, 'p' pointer, 'f' a float of the dtype of ``cname``'s
    suffix, 'i' int64, 'd' double, 'm' int).  A fresh function object (``lib[cname]``), so cbuild's own declarations
    (ctypes pointers, for NumPy callers) stay as they are."""
    lib = cbuild.load(*src)  # built on first use; the same object while the files stay the same
    key = (id(lib), cname)
    entry = _FUNCS.get(key)
    if entry is None:
        ct = _CT[cname.rsplit("_", 1)[1]]
        types = {"n": ctypes.c_size_t, "p": ctypes.c_void_p, "f": ct, "i": ctypes.c_int64, "d": ctypes.c_double,
                 "m": ctypes.c_int}
        try:
            fn = lib[cname]
        except AttributeError:
            raise cbuild.BuildError(f"the C kernels of {src[1]} define no {cname}: regenerate them") from None
        fn.argtypes = [types[k] for k in kinds]
        fn.restype = ctypes.c_int
        entry = _FUNCS[key] = (lib, fn)
    return entry


# ------------------------------------------------------------------------------------------
# checks inside the ops (each error one line naming the argument)


def _check_logits(x, op, ndim=None):
    if x.dtype not in _DT:
        raise TypeError(f"{op}: x must be float32 or float64, got {x.dtype} (derive.torch's functions compute "
                        "float16 and bfloat16 in float32)")
    if x.device.type != "cpu":
        raise ValueError(f"{op}: the derive kernels run on CPU tensors, got x on {x.device}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{op}: x must be {'(M, K) rows' if ndim == 2 else f'{ndim}-d'}, got shape {tuple(x.shape)}")


def _same_shape(a, x, name, op):
    if tuple(a.shape) != tuple(x.shape):
        raise ValueError(f"{op}: {name} has shape {tuple(a.shape)}, but x has shape {tuple(x.shape)}")
    if a.device.type != "cpu":
        raise ValueError(f"{op}: the derive kernels run on CPU tensors, got {name} on {a.device}")


def _first(mask, values):
    """The first value of ``values`` where ``mask`` holds (the caller knows there is one)."""
    return values.reshape(-1)[mask.reshape(-1).nonzero()[0, 0]].item()


def _not_binary(t):
    return ~((t == 0) | (t == 1))


def _not_soft(t):
    return ~((t >= 0) & (t <= 1))  # NaN included


def _elementwise_targets(t, x, op):
    _same_shape(t, x, "t", op)
    if t.dtype.is_complex or not (t.dtype.is_floating_point or t.dtype in (torch.bool, torch.uint8, torch.int8,
                                                                            torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"{op}: t must hold numeric targets, got dtype {t.dtype}")
    return t.to(x.dtype).contiguous()  # no copy when already of the logits' dtype and contiguous

def _elementwise_inputs(x, t, op):
    """``(x, t, dt)`` as the elementwise C kernels take them: checked logits, contiguous, the targets
    in the logits' dtype and shape (one copy only where needed); ``dt`` the kernels' dtype suffix."""
    dt = _DT.get(x.dtype)
    if dt is None or not x.is_cpu:
        _check_logits(x, op)
    if not x.is_contiguous():
        x = x.contiguous()
    if t.dtype != x.dtype or t.shape != x.shape or not t.is_cpu or not t.is_contiguous():
        t = _elementwise_targets(t, x, op)
    return x, t, dt


def _class_targets(target, m, op):
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{op}: target must hold integer class indices, got dtype {target.dtype}")
    if tuple(target.shape) != (m,):
        raise ValueError(f"{op}: target must have shape ({m},) (one class index per row of x), "
                         f"got {tuple(target.shape)}")
    return target.to(torch.int64).contiguous()


def _bad_class(target, k, ignore_index, op):
    bad = (target != ignore_index) & ((target < 0) | (target >= k))
    if bool(bad.any()):
        return ValueError(f"{op}: target must hold class indices in [0, {k}) or ignore_index={ignore_index}, "
                          f"found {_first(bad, target)}")
    return None


def _alpha_vec(alpha_vec, x, op):
    if alpha_vec is None:
        return None
    if tuple(alpha_vec.shape) != (x.shape[1],):
        raise ValueError(f"{op}: the per-class weights must have shape ({x.shape[1]},), one per class, "
                         f"got {tuple(alpha_vec.shape)}")
    return alpha_vec.to(x.dtype).contiguous()


def _bad_alpha(alpha_vec, op):
    if alpha_vec is None:
        return None
    bad = ~((alpha_vec >= 0) & (alpha_vec <= 1))
    if bool(bad.any()):
        return ValueError(f"{op}: the per-class weights (alpha) must be in [0, 1] for every class, found "
                          f"{_first(bad, alpha_vec)!r}")
    return None


def _ptr(t):
    return t.data_ptr() if t is not None else None


# ------------------------------------------------------------------------------------------
# outputs in transparent huge pages

_HUGE = 1 << 21  # the x86-64 / arm64 (4 KiB base pages) transparent huge page
_THP_MIN = 4 << 20  # outputs from 4 MiB on: below, the few page faults cost less than the call
_MADV_HUGEPAGE = 14  # Linux's value on every architecture


def _libc_madvise():
    """libc's madvise (Linux), or None (another system, or no libc to load)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # pragma: no cover - a libc without madvise
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _libc_madvise()


_SCALARS = {torch.float32: torch.empty((), dtype=torch.float32), torch.float64: torch.empty((), dtype=torch.float64)}


def _scalar_out(dtype):
    """A fresh 0-d tensor of ``dtype`` (empty_like of a template: torch.empty parses its
    shape and dtype arguments slower than the kernel runs on a thousand values)."""
    return torch.empty_like(_SCALARS[dtype])


def _empty(shape, dtype, like=None):
    """``torch.empty(shape, dtype)`` (``torch.empty_like(like)`` for a contiguous ``like`` of that
    shape and dtype: cheaper per call), its whole 2 MiB pages asked for as transparent huge pages
    (madvise(MADV_HUGEPAGE), before anything touches them) when it is large.  torch's CPU allocator
    asks for them only under THP_MEM_ALLOC_ENABLE=1 (NumPy always does for large arrays): without
    it a fresh 40 MB output faults in 10,000 pages of 4 KiB as the kernel first writes it, which
    costs more than the kernel's own pass.  The advice changes no value: a kernel that does not
    support it (THP "never", another system) refuses it, and the pages are ordinary ones."""
    out = torch.empty_like(like) if like is not None else torch.empty(shape, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    if nbytes >= _THP_MIN and _MADVISE is not None:
        start = out.data_ptr()
        lo = (start + _HUGE - 1) & -_HUGE
        hi = (start + nbytes) & -_HUGE
        if hi > lo:
            _MADVISE(lo, hi - lo, _MADV_HUGEPAGE)  # its result ignored: advice (EINVAL where THP is off)
    return out


#: whether the eager reduced path writes its gradient into a buffer of an earlier call that
#: nothing references any more (see :class:`_GradPool`); False: a fresh output every call
REUSE_GRAD = True
_POOL_SLOTS = 4  # buffers kept per kernel and dtype (a loss called on several sizes in one step)


def _storage_refs_fn():
    """(storage reference count of a tensor, the count of a tensor that nothing else references),
    or None where torch does not say (then nothing is reused)."""
    try:
        count = torch._C._storage_Use_Count
        probe = torch.empty(1)
        alone = count(probe.untyped_storage()._cdata)
        view = probe[:]
        if count(probe.untyped_storage()._cdata) != alone + 1:
            return None
        del view
        return (lambda t: count(t.untyped_storage()._cdata)), alone
    except (AttributeError, RuntimeError, TypeError):  # pragma: no cover - another torch
        return None


_REFS = _storage_refs_fn()


class _GradPool:
    """Gradient buffers of the eager reduced path, reused once nothing references them.

    A training step's logits gradient lives from the loss's forward to the end of backward (or
    as a leaf's ``.grad`` until ``zero_grad``), then its storage is freed, and the next step's
    fresh 40 MB output costs page faults and the kernel's zeroing of every page as the kernel
    first writes it: more than the kernel's own pass.  The pool keeps up to ``_POOL_SLOTS``
    large buffers per dtype and hands one out again only when torch counts no reference to its
    storage but the pool's own (no tensor, view, saved tensor, ``.grad``, NumPy array or DLPack
    capsule), under a lock, so no two calls share one.  Only the eager path uses it (a compiled
    graph allocates its own outputs); ``REUSE_GRAD = False`` turns it off.  The cost: the
    buffers stay allocated between steps (as torch's CUDA caching allocator keeps its blocks)."""

    def __init__(self):
        self._slots = {}
        self._lock = threading.Lock()

    def take(self, shape, dtype, n, like=None):
        if _REFS is None or not REUSE_GRAD:
            return _empty(shape, dtype, like)
        count, alone = _REFS
        with self._lock:
            slots = self._slots.setdefault(dtype, [])
            for buf in slots:
                if buf.numel() >= n and count(buf) == alone:
                    return buf[:n].view(shape)  # the view's reference marks it as taken
            buf = _empty(n, dtype)
            if len(slots) >= _POOL_SLOTS:
                slots.pop(0)
            slots.append(buf)
            return buf.view(shape)


# ------------------------------------------------------------------------------------------
# one kernel's ops


class KernelOps:
    """The custom ops of one kernel of a generated module, and how to call them.

    ``layout`` is "elementwise", "class_index" or "class_probs"; ``params`` the kernel's declared
    scalar parameters in order (a per-class ``alpha`` is the op's ``alpha_vec`` tensor beside
    its scalar ``alpha``); ``info`` its row of the module's KERNELS table."""

    def __init__(self, name, src, prefix):
        self.name = name
        self.src = (src[0], src[1])
        self.info = info = cbuild.load_numpy_module(*self.src).KERNELS[name]
        self.params = tuple(info["params"])
        self.class_alpha = bool(info["class_alpha"])
        if info["kind"] == "elementwise":
            self.layout = "elementwise"
        else:
            self.layout = "class_probs" if info.get("target") == "class_probs" else "class_index"
        self.soft = info.get("soft") if self.layout == "elementwise" else None
        self.second = info.get("second")
        self.qualname = f"derive::{prefix}{name}"
        self._kind_cache = {}
        self._build()
        self._build_reduced()

    # the C argument lists ------------------------------------------------------------------

    def _kinds(self, second):
        """The argument kinds of the C function (see :func:`_cfunc`)."""
        fl = ["f"] * len(self.params)
        if self.layout == "elementwise":
            return ["n", "p", "p", *fl, "p"] + ([] if second else ["p"])
        if self.layout == "class_probs":
            return ["n", "n", "p", "p", *fl, "p", "p"]
        scal = []
        for p in self.params:
            scal += ["p", "f"] if (self.class_alpha and p == "alpha") else ["f"]
        return ["n", "n", "p", "p", *scal, "i", "p", "p"]

    def _c(self, kernel, second, dt, work):
        """The C function, its library's thread count set to torch's for calls large enough to
        use threads (``work`` values; smaller ones run on one thread whatever it is)."""
        kinds = self._kind_cache.get(second)
        if kinds is None:
            kinds = self._kind_cache[second] = self._kinds(second)
        suffix = f"_{self.second}" if second else ""
        lib, fn = _cfunc(self.src, f"derive_{kernel}{suffix}_{dt}", kinds)
        if work >= _PARALLEL_MIN:
            lib.derive_set_num_threads(torch.get_num_threads())  # torch's intra-op setting, per calling thread
        return fn

    def _c_params(self, alpha_vec, params):
        out = []
        for p, value in zip(self.params, params):
            if self.class_alpha and p == "alpha":
                out += [_ptr(alpha_vec), value]
            else:
                out.append(value)
        return out

    # the implementations ----------------------------------------------------------------------

    def _elementwise(self, x, t, params, second, v=None):
        """Run the kernel (or its soft version, for targets that are not all 0 or 1): (loss, grad),
        or the hess values when ``second``."""
        op = self.qualname
        x, t, dt = _elementwise_inputs(x, t, op)
        shape, dtype = x.shape, x.dtype
        outs = [_empty(shape, dtype, x)] if second else [_empty(shape, dtype, x), _empty(shape, dtype, x)]
        n = x.numel()
        ptrs = [o.data_ptr() for o in outs]

        def run(kernel):
            return self._c(kernel, second, dt, n)(n, x.data_ptr(), t.data_ptr(), *params, *ptrs)

        kernel, rc = self._run_elementwise(run, t, n)
        if rc != 0:
            raise ValueError(f"{op}: the C kernel {kernel} rejected its arguments (code {rc}; parameters {params})")
        return outs[0] if second else (outs[0], outs[1])

    def _run_elementwise(self, run, t, n):
        """``(kernel, rc)``: ``run(kernel)`` on the kernel, or on its soft version for targets that
        are not all 0 or 1; a target outside the kernels' domain raises (one line, the value)."""
        kernel = self.name
        if self.soft and n > _SOFT_PROBE and bool(_not_binary(t.reshape(-1)[:_SOFT_PROBE]).any()):
            kernel = self.soft  # soft targets among the first values: no wasted binary pass
        rc = run(kernel)
        if rc == _ELABEL:
            if self.info.get("target") == "soft" or kernel == self.soft:
                bad = _not_soft(t)
                if bool(bad.any()):
                    raise losses._soft_error("targets", _first(bad, t))
            elif self.soft is None:
                raise losses._binary_error(self.info, "targets", _first(_not_binary(t), t))
            else:
                bad = _not_soft(t)
                if bool(bad.any()):
                    raise losses._soft_error("targets", _first(bad, t))
                kernel = self.soft
                rc = run(kernel)
        return kernel, rc

    def _rows(self, x, target, alpha_vec, params, ignore_index, second, v=None):
        op = self.qualname
        _check_logits(x, op, ndim=2)
        x = x.contiguous()
        m, k = x.shape
        if self.layout == "class_probs":
            _same_shape(target, x, "q", op)
            if not target.dtype.is_floating_point:
                raise TypeError(f"{op}: q must hold class probabilities (floats), got dtype {target.dtype}")
            target = target.to(x.dtype).contiguous()
            tail = []
        else:
            target = _class_targets(target, m, op)
            alpha_vec = _alpha_vec(alpha_vec, x, op)
            tail = [ignore_index]
        if second:
            _same_shape(v, x, "v", op)
            v = v.to(x.dtype).contiguous()
            outs = [v, _empty(x.shape, x.dtype, x)]
        else:
            outs = [_empty(m, x.dtype), _empty(x.shape, x.dtype, x)]
        fn = self._c(self.name, second, _DT[x.dtype], m * k)
        rc = fn(m, k, _ptr(x), _ptr(target), *self._c_params(alpha_vec, params), *tail, *map(_ptr, outs))
        if rc != 0:
            if self.layout == "class_probs":
                bad = _not_soft(target)
                if bool(bad.any()):
                    raise ValueError(f"{op}: q must hold class probabilities in [0, 1], found {_first(bad, target)!r}")
            else:
                err = _bad_class(target, k, ignore_index, op) or _bad_alpha(alpha_vec, op)
                if err is not None:
                    raise err
            raise ValueError(f"{op}: the C kernel {self.name} rejected its arguments (code {rc}; parameters {params})")
        return outs[1] if second else (outs[0], outs[1])

    # the reduced implementations: the loss summed in the kernel's pass -----------------------

    def _cred(self, kernel, dt, work):
        """The reduced C function ``derive_<kernel>_reduced_<dt>`` (see :meth:`_c`)."""
        key = (kernel, dt)
        kinds = self._red_kinds
        entry = self._red_names.get(key)
        if entry is None:
            entry = self._red_names[key] = f"derive_{kernel}_reduced_{dt}"
        lib, fn = _cfunc(self.src, entry, kinds)
        if work >= _PARALLEL_MIN:
            lib.derive_set_num_threads(torch.get_num_threads())
        return fn

    def _reduced_kinds(self):
        fl = ["f"] * len(self.params)
        if self.layout == "elementwise":
            return ["n", "p", "p", *fl, "d", "p", "p"]
        scal = []
        for p in self.params:
            scal += ["p", "f"] if (self.class_alpha and p == "alpha") else ["f"]
        return ["n", "n", "p", "p", *scal, "i", "d", "m", "p", "p"]

    def _check_mode(self, mode):
        top = 2 if (self.layout == "class_index" and self.class_alpha) else 1
        if not (isinstance(mode, int) and 0 <= mode <= top):
            raise ValueError(f"{self.qualname}_reduced: mode must be 0 (sum), 1 (mean)"
                             + (" or 2 (mean weighted by alpha_t)" if top == 2 else "") + f", got {mode!r}")

    def _elementwise_reduced(self, x, t, params, mode, want_grad=True, reuse=False):
        """(the loss summed (mode 0) or averaged (mode 1) over the elements, a 0-d tensor; its
        gradient, or None when not ``want_grad``), from one pass of the reduced kernel."""
        op = self.qualname
        if mode != 0 and mode != 1:
            self._check_mode(mode)
        x, t, dt = _elementwise_inputs(x, t, op)
        n = x.numel()
        loss = _scalar_out(x.dtype)
        grad = None
        if want_grad:
            big = n * x.element_size() >= _THP_MIN
            grad = self._pool.take(x.shape, x.dtype, n, x) if reuse and big else _empty(x.shape, x.dtype, x)
        scale = 1.0 if mode == 0 else (1.0 / n if n else 0.0)
        lp, gp = loss.data_ptr(), _ptr(grad)
        if self.soft is None or n <= _SOFT_PROBE:  # one call, no closure (the usual case)
            if self._cred(self.name, dt, n)(n, x.data_ptr(), t.data_ptr(), *params, scale, lp, gp) == 0:
                return loss, grad
            # a label outside the kernel's domain (or soft targets): as below, from the start

        def run(kernel):
            return self._cred(kernel, dt, n)(n, x.data_ptr(), t.data_ptr(), *params, scale, lp, gp)

        kernel, rc = self._run_elementwise(run, t, n)
        if rc != 0:
            raise ValueError(f"{op}: the C kernel {kernel} rejected its arguments (code {rc}; parameters {params})")
        return loss, grad

    def _rows_reduced(self, x, target, alpha_vec, params, ignore_index, mode, want_grad=True, reuse=False):
        """(the rows' loss summed (mode 0), averaged over the rows not ignored (1) or weighted by
        their alpha_t (2), a 0-d tensor; its gradient, or None when not ``want_grad``)."""
        op = self.qualname
        self._check_mode(mode)
        _check_logits(x, op, ndim=2)
        x = x.contiguous()
        m, k = x.shape
        target = _class_targets(target, m, op)
        alpha_vec = _alpha_vec(alpha_vec, x, op)
        loss = _scalar_out(x.dtype)
        grad = None
        if want_grad:
            big = m * k * x.element_size() >= _THP_MIN
            grad = self._pool.take(x.shape, x.dtype, m * k, x) if reuse and big else _empty(x.shape, x.dtype, x)
        fn = self._cred(self.name, _DT[x.dtype], m * k)
        rc = fn(m, k, _ptr(x), _ptr(target), *self._c_params(alpha_vec, params), ignore_index, 1.0, mode,
                loss.data_ptr(), _ptr(grad))
        if rc != 0:
            err = _bad_class(target, k, ignore_index, op) or _bad_alpha(alpha_vec, op)
            if err is not None:
                raise err
            raise ValueError(f"{op}: the C kernel {self.name}_reduced rejected its arguments (code {rc}; "
                             f"parameters {params})")
        return loss, grad

    def _reduced_impl(self, args, want_grad=True, reuse=False):
        x, target, alpha_vec, params, ii, mode = self._split(args)
        if self.layout == "elementwise":
            return self._elementwise_reduced(x, target, params, mode, want_grad, reuse)
        return self._rows_reduced(x, target, alpha_vec, params, ii, mode, want_grad, reuse)

    def _reduced_factor(self, x, target, alpha_vec, params, ii, mode):
        """The factor f of the reduced gradient (grad = f * the per-element or per-row gradient):
        what the double backward multiplies the second derivative by (a tensor or a float)."""
        if mode == 0:
            return 1.0
        if self.layout == "elementwise":
            n = x.numel()
            return 1.0 / n if n else 0.0
        valid = target != ii
        if mode == 1:
            den = valid.sum().to(x.dtype)
        else:
            if alpha_vec is None:
                alpha = params[self.params.index("alpha")]
                den = valid.sum().to(x.dtype) * alpha
            else:
                den = (alpha_vec.to(x.dtype)[torch.where(valid, target, torch.zeros_like(target)).long()]
                       * valid.to(x.dtype)).sum()
        return torch.where(den > 0, 1 / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))

    # the ops ----------------------------------------------------------------------------------

    def _arg_names(self):
        names = []
        for i, p in enumerate(self.params):
            ok = p.isidentifier() and not keyword.iskeyword(p) and p not in _RESERVED
            names.append(p if ok else f"p{i}_{p}")
        return names

    def _schema(self, second):
        floats = [f"float {n}" for n in self._arg_names()]
        if self.layout == "elementwise":
            args = ["Tensor x", "Tensor t", *floats]
        elif self.layout == "class_probs":
            args = ["Tensor x", "Tensor q", *floats]
        else:
            args = ["Tensor x", "Tensor target"] + (["Tensor? alpha_vec"] if self.class_alpha else []) + floats + [
                "int ignore_index"]
        if second and self.layout != "elementwise":
            args.append("Tensor v")
        return "(" + ", ".join(args) + ") -> " + ("Tensor" if second else "(Tensor, Tensor)")

    def _split(self, args):
        """(x, target, alpha_vec, params, ignore_index, v) from an op's positional arguments (v: the
        second op's vector, or the reduced op's mode)."""
        x, target = args[0], args[1]
        i = 2
        alpha_vec = None
        if self.layout == "class_index" and self.class_alpha:
            alpha_vec = args[2]
            i = 3
        params = tuple(args[i:i + len(self.params)])
        i += len(self.params)
        ignore_index = None
        if self.layout == "class_index":
            ignore_index = args[i]
            i += 1
        v = args[i] if i < len(args) else None
        return x, target, alpha_vec, params, ignore_index, v

    def _build(self):
        kernel = self

        def fwd_impl(*args):
            x, target, alpha_vec, params, ii, _ = kernel._split(args)
            if kernel.layout == "elementwise":
                return kernel._elementwise(x, target, params, False)
            return kernel._rows(x, target, alpha_vec, params, ii, False)

        def fwd_fake(*args):
            x = args[0]
            loss_shape = x.shape if kernel.layout == "elementwise" else x.shape[:1]
            return x.new_empty(loss_shape), x.new_empty(x.shape)

        self.op = torch.library.custom_op(self.qualname, mutates_args=(), device_types="cpu",
                                          schema=self._schema(False))(fwd_impl)
        self.op.register_fake(fwd_fake)
        self.op2 = None
        if self.second is not None:
            def second_impl(*args):
                x, target, alpha_vec, params, ii, v = kernel._split(args)
                if kernel.layout == "elementwise":
                    return kernel._elementwise(x, target, params, True)
                return kernel._rows(x, target, alpha_vec, params, ii, True, v)

            def second_fake(*args):
                return args[0].new_empty(args[0].shape)

            self.op2 = torch.library.custom_op(f"{self.qualname}_{self.second}", mutates_args=(), device_types="cpu",
                                               schema=self._schema(True))(second_impl)
            self.op2.register_fake(second_fake)
            self.op2.register_autograd(self._second_backward, setup_context=self._second_setup)
        self.op.register_autograd(self._backward, setup_context=self._setup)
        from derive.runtime import cuda_ops  # CUDA tensors: the generated .cu kernels (built on first use)

        cuda_ops.register(self)

        class Fused(torch.autograd.Function):
            """The eager path: the op's implementation and autograd without the dispatcher's cost."""

            @staticmethod
            def forward(ctx, *args):  # forward(ctx, ...): no setup_context, whose apply binds a signature per call
                output = fwd_impl(*args)
                kernel._setup(ctx, args, output)
                return output

            @staticmethod
            def backward(ctx, g_loss, g_grad):
                return kernel._backward(ctx, g_loss, g_grad)

        Fused.__name__ = Fused.__qualname__ = f"{self.qualname.replace('::', '_')}_eager"
        self._fused = Fused
        self._fwd_impl = fwd_impl

    def _build_reduced(self):
        """The reduced op ``<qualname>_reduced``: ``(<the op's arguments>, int mode) -> (loss, grad)``,
        the loss a 0-d tensor (mode 0: the sum; 1: the mean over the elements, or over the rows not
        ignored; 2, a per-class alpha kernel: the mean weighted by alpha_t, torch's weighted mean)
        and grad its gradient, pre-scaled, from one pass of ``derive_<kernel>_reduced_<dt>``: no
        loss array written, no ``g * grad`` pass when the incoming gradient is 1 (eager)."""
        self.red = None
        self._red_names = {}
        self._pool = _GradPool()
        if self.layout == "class_probs":  # no reduced C entry point for class probabilities (yet)
            return
        self._red_kinds = self._reduced_kinds()
        self._red_alpha = self.layout == "class_index" and self.class_alpha  # args[2] is alpha_vec
        kernel = self

        def red_impl(*args):
            return kernel._reduced_impl(args)

        def red_fake(*args):
            x = args[0]
            return x.new_empty(()), x.new_empty(x.shape)

        base = self._schema(False)
        schema = base[:base.index(") ->")] + ", int mode) -> (Tensor, Tensor)"
        self.red = torch.library.custom_op(f"{self.qualname}_reduced", mutates_args=(), device_types="cpu",
                                           schema=schema)(red_impl)
        self.red.register_fake(red_fake)
        self.red.register_autograd(self._red_backward, setup_context=self._red_setup)

        class FusedReduced(torch.autograd.Function):
            """The eager path of the reduced op (see :class:`Fused`), with one output, the loss (each
            output costs autograd bookkeeping per call): the pre-scaled gradient is saved beside the
            inputs, and the backward hands it on as it is when the incoming gradient is 1.  Under
            create_graph=True (double backward, HVPs) the backward differentiates the gradient
            through the per-element op instead (one more pass: see :meth:`_red_eager_backward`)."""

            @staticmethod
            def forward(ctx, *args):
                loss, grad = kernel._reduced_impl(args, reuse=True)  # the gradient in a pooled buffer
                ctx.save_for_backward(args[0], args[1], args[2] if kernel._red_alpha else None, grad)
                ctx.args = args
                return loss

            @staticmethod
            def backward(ctx, g_loss):
                return kernel._red_eager_backward(ctx, g_loss)

        FusedReduced.__name__ = FusedReduced.__qualname__ = f"{self.qualname.replace('::', '_')}_reduced_eager"
        self._fused_red = FusedReduced

    def reduced(self, *args):
        """The reduced loss (a 0-d tensor) of the reduced op's arguments (the op's, then ``mode``),
        with autograd: the custom op under torch.compile, export, tracing, meta/fake or wrapped
        tensors; else the same implementation through an autograd.Function, or, when nothing
        needs a gradient (no grad mode, or x not requiring grad), the kernel alone with no
        gradient written."""
        x = args[0]
        if (type(x) is not torch.Tensor or not x.is_cpu or torch.compiler.is_compiling()
                or _dispatch_mode() is not None or _wrapped(x)):
            return self.red(*args)[0]
        if not (x.requires_grad and torch.is_grad_enabled()):
            return self._reduced_impl(args, want_grad=False)[0]
        return self._fused_red.apply(*args)

    def _red_eager_backward(self, ctx, g_loss):
        x, target, alpha_vec, grad = ctx.saved_tensors
        n_inputs = len(ctx.args)
        if g_loss is None:
            return (None,) * n_inputs
        if not torch.is_grad_enabled():  # first order: the saved gradient, times g unless g is 1
            if not _keep_graph() and g_loss.dim() == 0 and g_loss.item() == 1.0:
                # the usual loss.backward(): the saved gradient is the answer, handed on without a
                # pass over it (autograd then takes it as x.grad without a copy); not when the graph
                # is kept (a second backward would add into the saved gradient through x.grad)
                return (grad,) + (None,) * (n_inputs - 1)
            return (g_loss * grad,) + (None,) * (n_inputs - 1)
        # create_graph=True: the gradient as a differentiable function of x, from the per-element op
        # (whose backward applies the proved second derivative), scaled and reduced as the forward was
        if self.op2 is None:
            raise ThirdDerivativeError(f"kernel {self.name!r} declares no second derivative (hess, dcoef or d2term "
                                       "in its [[kernel]] table): its gradient cannot be differentiated "
                                       "(backward with create_graph=True, double backward, HVPs)")
        xs, _, _, params, ii, mode = self._split(ctx.args)
        op_args = (x, target) + ((alpha_vec,) if self._red_alpha else ()) + tuple(params) + (
            (ii,) if self.layout == "class_index" else ())
        per = self.apply(*op_args)[1]
        f = self._reduced_factor(x, target, alpha_vec, params, ii, mode)
        return (g_loss * (per * f),) + (None,) * (n_inputs - 1)

    def _red_setup(self, ctx, inputs, output):
        x, target, alpha_vec, params, ii, mode = self._split(inputs)
        ctx.set_materialize_grads(False)
        if self.op2 is None:
            ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, target, alpha_vec, output[1])
        ctx.rest = (params, ii, mode)
        ctx.n_inputs = len(inputs)

    def _red_backward(self, ctx, g_loss, g_grad, eager=False):
        x, target, alpha_vec, grad = ctx.saved_tensors
        params, ii, mode = ctx.rest
        if self.op2 is None and (g_grad is not None or torch.is_grad_enabled()):
            raise ThirdDerivativeError(f"kernel {self.name!r} declares no second derivative (hess, dcoef or d2term "
                                       "in its [[kernel]] table): its gradient cannot be differentiated "
                                       "(backward with create_graph=True, double backward, HVPs)")
        dx = None
        if g_loss is not None:
            if (eager and not torch.is_grad_enabled() and not _keep_graph() and g_loss.dim() == 0
                    and g_loss.item() == 1.0):
                # the usual loss.backward(): the saved gradient is the answer, handed on without a
                # pass over it (autograd then takes it as x.grad without a copy); not when the graph
                # is kept (a second backward would add into the saved gradient through x.grad)
                dx = grad
            else:
                dx = g_loss * grad
        if g_grad is not None:  # double backward: f * (the second derivative applied to g_grad)
            f = self._reduced_factor(x, target, alpha_vec, params, ii, mode)
            if self.layout == "elementwise":
                term = g_grad * self.op2(*self._second_args(x, target, alpha_vec, params, ii)) * f
            else:
                term = self.op2(*self._second_args(x, target, alpha_vec, params, ii, g_grad * f))
            dx = term if dx is None else dx + term
        return (dx,) + (None,) * (ctx.n_inputs - 1)

    def apply(self, *args):
        """``(loss, grad)`` of the op's arguments, with autograd: the custom op under torch.compile,
        export, tracing, meta/fake or wrapped tensors; else (plain CPU tensors, eager) the same
        implementation and backward through an autograd.Function, which costs about half as much
        per call as the dispatcher's path (the two are tested equal)."""
        x = args[0]
        if (torch.compiler.is_compiling() or type(x) is not torch.Tensor or not x.is_cpu
                or _dispatch_mode() is not None or _wrapped(x)):
            return self.op(*args)
        if not (x.requires_grad and torch.is_grad_enabled()):  # nothing to differentiate: the kernel alone
            return self._fwd_impl(*args)
        return self._fused.apply(*args)

    # autograd ---------------------------------------------------------------------------------

    def _setup(self, ctx, inputs, output):
        x, target, alpha_vec, params, ii, _ = self._split(inputs)
        ctx.set_materialize_grads(False)  # the gradient output unused (first order): None, no HVP computed
        if self.op2 is None:  # no second derivative declared: the gradient output is a constant to autograd,
            ctx.mark_non_differentiable(output[1])  # and _backward refuses create_graph (see there)
        ctx.save_for_backward(x, target, alpha_vec, output[1])
        ctx.rest = (params, ii)
        ctx.n_inputs = len(inputs)

    def _second_args(self, x, target, alpha_vec, params, ii, v=None):
        if self.layout == "elementwise":
            return (x, target, *params)
        if self.layout == "class_probs":
            return (x, target, *params, v)
        return (x, target, *((alpha_vec,) if self.class_alpha else ()), *params, ii, v)

    def _backward(self, ctx, g_loss, g_grad):
        x, target, alpha_vec, grad = ctx.saved_tensors
        params, ii = ctx.rest
        if self.op2 is None and (g_grad is not None or torch.is_grad_enabled()):
            # create_graph=True would differentiate g_loss * grad with grad a constant: a wrong second derivative
            raise ThirdDerivativeError(f"kernel {self.name!r} declares no second derivative (hess, dcoef or d2term "
                                       "in its [[kernel]] table): its gradient cannot be differentiated "
                                       "(backward with create_graph=True, double backward, HVPs)")
        dx = None
        if g_loss is not None:
            dx = g_loss * grad if self.layout == "elementwise" else g_loss.unsqueeze(-1) * grad
        if g_grad is not None:  # the gradient output is differentiated: double backward
            if self.layout == "elementwise":
                term = g_grad * self.op2(*self._second_args(x, target, alpha_vec, params, ii))
            else:
                term = self.op2(*self._second_args(x, target, alpha_vec, params, ii, g_grad))
            dx = term if dx is None else dx + term
        return (dx,) + (None,) * (ctx.n_inputs - 1)

    def _second_setup(self, ctx, inputs, output):
        x, target, alpha_vec, params, ii, v = self._split(inputs)
        ctx.save_for_backward(x, target, alpha_vec)
        ctx.rest = (params, ii)
        ctx.n_inputs = len(inputs)

    def _second_backward(self, ctx, g_out):
        x, target, alpha_vec = ctx.saved_tensors
        params, ii = ctx.rest
        if ctx.needs_input_grad[0] and _engine_needs(x):
            raise ThirdDerivativeError(f"third derivatives of kernel {self.name!r} are not derived (its file proves the "
                                       "loss, the gradient and the second derivative): differentiate at most twice "
                                       "with respect to the logits")
        grads = [None] * ctx.n_inputs
        if self.layout != "elementwise" and ctx.needs_input_grad[-1] and g_out is not None:
            # d(H v)/dv = H, symmetric: the HVP of the incoming gradient (torch.autograd.functional.hvp)
            grads[-1] = self.op2(*self._second_args(x, target, alpha_vec, params, ii, g_out))
        return tuple(grads)


def _dispatch_mode():
    """The innermost Python dispatch mode (make_fx, FakeTensorMode, ...), or None."""
    return _get_current_dispatch_mode()


def _wrapped(x) -> bool:
    """A functorch-wrapped tensor (torch.func.grad, vmap): the custom op's path."""
    try:
        return torch._C._functorch.is_functorch_wrapped_tensor(x)
    except AttributeError:  # pragma: no cover - another torch
        return True


def _keep_graph() -> bool:
    """Whether the running backward pass keeps the graph (retain_graph=True); True where that
    cannot be told."""
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except (AttributeError, RuntimeError):  # pragma: no cover - another torch
        return True


def _engine_needs(x) -> bool:
    """Whether the running backward pass will use a gradient for ``x`` (a third derivative),
    as torch.utils.checkpoint asks it; True where that cannot be told."""
    try:
        if x.grad_fn is not None:
            node = x.grad_fn
        else:
            with torch.enable_grad():
                node = x.view_as(x).grad_fn.next_functions[0][0]  # the leaf's gradient accumulator
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):
        return True


_OPS: dict = {}  # qualified op name -> KernelOps (an op name is registered once per process)


def kernel_ops(name, src, prefix) -> KernelOps:
    """The ops of kernel ``name`` of the generated module ``src`` = (folder, module), registered
    on first use under ``derive::<prefix><name>``."""
    qual = f"derive::{prefix}{name}"
    ops = _OPS.get(qual)
    if ops is None:
        ops = _OPS[qual] = KernelOps(name, src, prefix)
    return ops


def prefix_of(src, shipped: bool) -> str:
    """``<module>_`` for a shipped module; ``u<source digest>_`` for a user's file (its generated
    header's DERIVE_<MODULE>_SOURCE: the same file gives the same ops, two files never clash)."""
    if shipped:
        return f"{src[1]}_"
    return f"u{cbuild.source_digest(src[0], src[1])}_{src[1]}_"
