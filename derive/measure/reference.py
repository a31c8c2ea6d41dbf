"""High-precision references for any declared kernel, from its file's *original* definitions.

A kernel is data (a ``[[kernel]]`` table, :class:`derive.language.loader.KernelDecl`), and so is
its reference: the first line of each exported chain (the loss as the paper, the note or
torchvision defines it) and, for a gradient chain, its ``D(...)`` line resolved by the proof
engine's chain rule, definitions expanded.  Nothing here knows a kernel by name; what a layout
means comes from its target kind:

* elementwise ``binary`` / ``soft``: ``loss(x, t, params)`` and ``grad(x, t, params)``;
* softmax ``class_index``: the loss and coefficient lines in p_t with p_t = e^(x_t)/sum_k e^(x_k),
  grad_k = coef*(p_k - [k == t]), ignored rows zero;
* softmax ``class_probs``: loss = sum_k term(u_k, q_k, K), grad_j = sum_k dterm_k*([k == j] - p_j)
  with dterm = d term/du taken by SymPy from the term's first line (not the file's dterm chain).

A ``weight`` definition is replaced by 1 when alpha < 0 (torchvision's "no weighting"); a
``class_alpha`` kernel takes alpha per class (the target's).

**Working precision, generically.** Every expression is evaluated once at low precision while
the arguments of its exponentials are recorded: 1 + e^-v loses about v/ln(10) digits, and an
exponential is the only place these expressions lose digits by magnitude, so the working
precision starts at 40 + max|v|/ln(10) digits (softmax rows: the spread of the row).  The value
is then taken at d and at 2d digits and accepted when the two agree to 20 significant digits
(or are both exactly zero: a true zero, since d already covers every exponential); otherwise d
doubles, up to :data:`MAX_DPS` digits, past which :class:`ReferenceUnavailable` names the point.
So x = +-1e4 (4,300 digits) and rows dominated by 1e3 are exact; +-(largest float) is not, and
:meth:`Reference.signs` then gives the signs from the proved stable forms (mpmath has no
exponent range, and the stable forms lose no digits).

**Condition numbers.** For a kernel that declares ``conditioned``, :meth:`Reference.kappa` gives,
per output value f, kappa = sum over the continuous inputs v (x, a soft t or the probabilities
q, the parameters) of |v*df/dv| / max(|f|, tiny), from SymPy's derivatives of the same original
expressions (softmax: the exact Jacobian through u_k = x_k - log sum e^x).

API (used by :mod:`derive.measure.accuracy` and :mod:`derive.docs.plots`):
:func:`reference_for`, :class:`Reference` (``values``, ``signs``, ``kappa``, ``closed_form_numpy``),
:func:`find_kernel`, :func:`rel_errors`, and the short forms :func:`elementwise`,
:func:`rowwise`, :func:`closed_form_numpy` by kernel name (shipped kernels).
"""
from __future__ import annotations

import functools
import math

import mpmath
import numpy as np
import sympy as sp

from derive.language.functions import D, rewrite_elementary
from derive.language.loader import load_file

#: digits kept beyond those the exponentials cost
BASE_DPS = 40
#: significant digits the two evaluations (d and 2d digits) must share
AGREE_DIGITS = 20
#: the most digits a reference is evaluated at (ReferenceUnavailable beyond)
MAX_DPS = 20000
#: signs (Reference.signs) come from the original definitions up to this many digits, else from the
#: proved stable forms (exact signs at 50 digits, and 100 times cheaper at x = 1e4)
SIGN_DPS = 1000
_LN10 = math.log(10.0)


class ReferenceUnavailable(ArithmeticError):
    """The original definitions cannot be evaluated to 20 agreeing digits within MAX_DPS digits."""


# ------------------------------------------------------------------------------------------
# which kernel, from which file


@functools.lru_cache(maxsize=None)
def _loaded(path):
    return load_file(path)


def find_kernel(name, path=None):
    """(KernelDecl, loaded file) of the kernel ``name``: of the file ``path``, else of the shipped files."""
    if path is not None:
        f = _loaded(str(path))
        for k in f.kernels:
            if k.name == name:
                return k, f
        raise KeyError(f"{path}: no kernel {name!r}; it declares {', '.join(k.name for k in f.kernels) or 'none'}")
    from derive.codegen.kernels import shipped_kernels

    for k in shipped_kernels():
        if k.name == name:
            kpath = getattr(k, "path", None)
            if kpath is None:
                from derive.codegen.kernels import STABLE_FORMS as kpath
            return k, _loaded(str(kpath))
    raise KeyError(f"no shipped kernel {name!r}")


def reference_for(kernel, path=None):
    """The :class:`Reference` of a kernel: a KernelDecl (with its file from ``path`` or its own
    ``path``), or a kernel name (of ``path``, else of the shipped files).  Cached."""
    if isinstance(kernel, str):
        spec, f = find_kernel(kernel, path)
    else:
        spec = kernel
        kpath = path or getattr(spec, "path", None)
        if kpath is None:
            spec, f = find_kernel(spec.name)
        else:
            f = _loaded(str(kpath))
    return _reference(spec, f)


_REFS: dict = {}


def _reference(spec, f):
    key = (id(spec), id(f))
    if key not in _REFS:
        _REFS[key] = (spec, f, Reference(spec, f))  # spec and f kept alive: their ids stay theirs
    return _REFS[key][2]


# ------------------------------------------------------------------------------------------
# mpmath namespaces: the original forms with recorded exponentials, the stable forms exact


class _ExpTracker:
    """exp that records the largest |argument| it sees (the digits 1 + e^-v needs)."""

    def __init__(self):
        self.worst = 0.0

    def __call__(self, v):
        try:
            m = abs(float(v))
        except (TypeError, ValueError, OverflowError):
            m = math.inf
        if not m <= self.worst:
            self.worst = m if m == m else math.inf
        return mpmath.exp(v)


_TRACK = _ExpTracker()


def _softplus(v):
    return v + mpmath.log1p(_TRACK(-v)) if v > 0 else mpmath.log1p(_TRACK(v))


def _xexpm1inv(u):
    return mpmath.mpf(1) if u == 0 else u / mpmath.expm1(u)


_ORIGINAL_NS = [{"exp": _TRACK}, "mpmath"]
# the stable forms record their exponentials too: SymPy's ordering may write 1 - t - sigmoid(-x)
_STABLE_NS = [{"sigmoid": lambda v: 1 / (1 + _TRACK(-v)), "softplus": _softplus, "log1p": mpmath.log1p,
               "expm1": mpmath.expm1, "xexpm1inv": _xexpm1inv, "exp": _TRACK}, "mpmath"]


def _mpf(v):
    return mpmath.mpf(float(v))


def _partial(f, df, args, i):
    """d f/d args[i]: SymPy's derivative ``df``, or, where that is not finite although f is (0*log(0)
    from d/dgamma of 0^gamma in a branch that a where() multiplies by 0), a central difference
    at the working precision (step 10^(-dps/4) relative: both its errors far below 20 digits)."""
    v = df(*args)
    if mpmath.isfinite(v):
        return v
    h = max(abs(args[i]), mpmath.mpf(1)) * mpmath.mpf(10) ** (-(mpmath.mp.dps // 4))
    up, dn = list(args), list(args)
    up[i] += h
    dn[i] -= h
    return (f(*up) - f(*dn)) / (2 * h)


def _agree(a, b):
    if a == b:
        return True
    if not (mpmath.isfinite(a) and mpmath.isfinite(b)):
        return False
    return abs(a - b) <= abs(b) * mpmath.mpf(10) ** (-AGREE_DIGITS)


def _digits(worst, cap=MAX_DPS):
    d = BASE_DPS + int(worst / _LN10) + 5 if worst < cap * _LN10 else None
    return d if d is not None and 2 * d <= cap else None


def _adaptive(evaluate, where, cap=MAX_DPS):
    """``evaluate()`` -> list of mpf, under the working precision chosen as the module docstring says:
    evaluated at d digits while the exponentials are recorded (d raised and the value taken again
    when they need more), then at 2d; accepted when the two agree.  Returns (values, digits)."""
    d = _digits(0.0)
    while True:
        _TRACK.worst = 0.0
        with mpmath.workdps(d):
            try:
                a = [+v for v in evaluate()]
            except (ZeroDivisionError, ValueError, OverflowError):
                a = None  # a pole met by rounding: again at the precision the exponentials ask for
        need = _digits(_TRACK.worst, cap)
        if need is None:
            raise ReferenceUnavailable(f"{where}: the exponentials need more than {cap} digits")
        if need > d or a is None:
            d = max(need, 2 * d if a is None else need)
            if 2 * d > cap:
                raise ReferenceUnavailable(f"{where}: no finite value within {cap} digits")
            continue
        with mpmath.workdps(2 * d):
            b = [+v for v in evaluate()]
        if all(_agree(u, v) for u, v in zip(a, b)):
            return b, 2 * d
        d *= 2
        if 2 * d > cap:
            raise ReferenceUnavailable(f"{where}: no {AGREE_DIGITS} agreeing digits at {d} and {2 * d} digits")


# ------------------------------------------------------------------------------------------
# the reference of one kernel


class Reference:
    """The exact loss and gradient of one kernel (mpmath), from its file's original definitions."""

    def __init__(self, spec, f):
        self.spec, self.file = spec, f
        self.name = spec.name
        self.layout = spec.layout
        self.target = spec.target
        self.params = tuple(spec.params)
        self.conditioned = getattr(spec, "conditioned", None)
        did = spec.derivation
        self.derivation = next(d for d in f.derivations if d.id == did)
        self.ctx = self.derivation.context
        if self.layout == "elementwise":
            self.args = ("x", "t") + self.params
            self.roles = ("loss", "grad")
        elif self.target == "class_probs":
            self.args = ("u", "q", "K") + self.params
            self.roles = ("term", "dterm")
        else:
            self.args = ("u",) + self.params
            self.roles = ("loss", "coef")
        self.continuous = tuple(a for a in self.args if a not in ("x", "u", "K")
                                and not (a == "t" and self.target == "binary"))
        self._fns = {}

    # -- expressions ------------------------------------------------------------------------
    def _chain(self, export):
        did, cid = self.file.export_derivation[export]
        d = next(d for d in self.file.derivations if d.id == did)
        return d, next(c for c in d.chains if c.id == cid)

    def _sym(self, name):
        s = self.ctx.names.get(name)
        return s if s is not None else sp.Symbol(name, real=True)

    def original(self, role, weight_off=False, line=0):
        """The SymPy expression of the role's chain line ``line`` (default: the first), ``D``
        resolved, definitions expanded (a ``weight`` definition replaced by 1 when ``weight_off``).
        class_probs' ``dterm`` is d term/du of the term's first line."""
        from derive.prover.engine import Resolver

        if self.target == "class_probs" and role == "dterm" and line == 0:
            return sp.diff(self.original("term", weight_off), self._sym("u"))
        d, c = self._chain(self.spec.exports[role])
        expr = c.lines[line].expr
        if expr.has(D):
            expr = Resolver(d.context).resolve(expr)
        if weight_off and getattr(self.spec, "weight", None):
            expr = expr.xreplace({d.context.names[self.spec.weight]: sp.S.One})
        expr = rewrite_elementary(d.context.expand(expr))
        extra = {s.name for s in expr.free_symbols} - set(self.args)
        if extra:
            raise ValueError(f"{self.file.path}: kernel {self.name}: the reference of {role} depends on "
                             f"{', '.join(sorted(extra))}, which the {self.layout} layout does not supply")
        return expr

    def stable(self, role, weight_off=False):
        """The proved last line the kernel evaluates (definitions expanded), for signs past MAX_DPS."""
        export = self.spec.exports[role]
        d, _ = self._chain(export)
        expr = self.file.exports[export]
        if role in getattr(self.spec, "rewrite", ()):  # the kernel evaluates derive.rewrite's proved form
            from derive.codegen.kernels import rewritten_export

            expr = rewritten_export(self.spec, self.file, export)
        if weight_off and getattr(self.spec, "weight", None):
            expr = expr.xreplace({d.context.names[self.spec.weight]: sp.S.One})
        return d.context.expand(expr)

    def _fn(self, kind, role, weight_off=False, wrt=None):
        key = (kind, role, weight_off, wrt)
        if key not in self._fns:
            if kind == "stable":
                roles = {"grad": "grad", "loss": "loss", "coef": "coef", "term": "term", "dterm": "dterm",
                         "target_factor": "target_factor"}
                expr, ns = self.stable(roles[role], weight_off), _STABLE_NS
            else:
                expr, ns = self.original(role, weight_off), _ORIGINAL_NS
            if wrt is not None:
                expr = sp.diff(expr, self._sym(wrt))
            self._fns[key] = sp.lambdify([self._sym(a) for a in self.args], expr, modules=ns, cse=True)
        return self._fns[key]

    def weight_off(self, params):
        """Whether these parameter values turn the kernel's weight off (alpha < 0)."""
        return bool(getattr(self.spec, "weight", None)) and float(dict(zip(self.params, params))["alpha"]) < 0

    # -- values -----------------------------------------------------------------------------
    def values(self, x, t, params=(), ignore_index=-100, stable=False, cap=MAX_DPS, fixed=False):
        """(loss, grad) as lists of mpf: elementwise one per element (flattened); softmax one loss
        per row and one list of K gradients per row.  ``t``: labels or soft targets (elementwise),
        class indices (class_index) or an (N, K) array of probabilities (class_probs); ``params``
        in the kernel's order (a class_alpha alpha may be None or one value per class).
        ``stable``: the proved stable forms the kernel evaluates instead (a check of the reference,
        and signs where the originals need too many digits); ``cap``: the most digits
        (ReferenceUnavailable beyond); ``fixed``: 50 digits, no agreement check (last resort for signs)."""
        params = tuple(params)
        if len(params) != len(self.params):
            raise TypeError(f"kernel {self.name} takes {len(self.params)} parameters "
                            f"({', '.join(self.params) or 'none'}), got {len(params)}")
        if self.layout == "elementwise":
            return self._elementwise(x, t, params, stable, cap, fixed)
        return self._rows(x, t, params, ignore_index, stable, cap, fixed)

    def _elementwise(self, x, t, params, stable, cap, fixed):
        off = self.weight_off(params)
        kind = "stable" if stable else "original"
        fl, fg = self._fn(kind, "loss", off), self._fn(kind, "grad", off)
        xs = np.asarray(x, dtype=np.float64).ravel().tolist()
        ts = np.broadcast_to(np.asarray(t, dtype=np.float64), np.shape(x)).ravel().tolist()
        loss, grad = [], []
        for xi, ti in zip(xs, ts):
            def ev(xi=xi, ti=ti):
                a = [_mpf(xi), _mpf(ti)] + [_mpf(p) for p in params]
                return [fl(*a), fg(*a)]
            if fixed:
                with mpmath.workdps(50):
                    v = ev()
            else:
                v, _ = _adaptive(ev, f"kernel {self.name} at x = {xi!r}, t = {ti!r}, params {params}", cap)
            loss.append(v[0])
            grad.append(v[1])
        return loss, grad

    def _row_params(self, params, target):
        """The parameters of one row as mpf (a class_alpha alpha: the target's weight; None: 1)."""
        out = []
        for name, v in zip(self.params, params):
            if getattr(self.spec, "class_alpha", False) and name == "alpha":
                if v is None:
                    v = 1.0
                elif np.ndim(v) > 0:
                    v = np.asarray(v, dtype=np.float64)[target]
            out.append(_mpf(v))
        return out

    def _row_u(self, row):
        """(logits, u_k = log p_k) of one row: u_k = (x_k - m) - log1p(sum over the other classes of
        e^(x_j - m)), m the row maximum, whose own term 1 is left out of the sum (no 1 + tiny)."""
        m = max(row)
        top = row.index(m)
        xs = [_mpf(v) for v in row]
        rest = mpmath.fsum(_TRACK(v - xs[top]) for j, v in enumerate(xs) if j != top)
        lse = mpmath.log1p(rest)
        return xs, [(v - xs[top]) - lse for v in xs]

    def _rows(self, x, target, params, ignore_index, stable, cap, fixed):
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"kernel {self.name}: softmax references take (N, K) logits, got shape {x.shape}")
        n, k = x.shape
        off = self.weight_off(params)
        kind = "stable" if stable else "original"
        probs = self.target == "class_probs"
        if probs:
            q = np.asarray(target, dtype=np.float64)
            fterm, fd = self._fn(kind, "term", off), self._fn(kind, "dterm", off)
        else:
            fl, fc = self._fn(kind, "loss", off), self._fn(kind, "coef", off)
            ftf = self._fn("stable", "target_factor", off) if stable else None
        losses, grads = [], []
        for r in range(n):
            row = x[r].tolist()
            if not probs:
                tr = int(target[r])
                if tr == ignore_index:
                    losses.append(mpmath.mpf(0))
                    grads.append([mpmath.mpf(0)] * k)
                    continue

            def ev(r=r, row=row):
                _, us = self._row_u(row)
                ps = [mpmath.exp(u) for u in us]
                if probs:
                    pr = self._row_params(params, None)
                    kk = mpmath.mpf(k)
                    qs = [_mpf(v) for v in q[r].tolist()]
                    terms = [fterm(u, qq, kk, *pr) for u, qq in zip(us, qs)]
                    dts = [fd(u, qq, kk, *pr) for u, qq in zip(us, qs)]
                    g = mpmath.fsum(dts)
                    return [mpmath.fsum(terms)] + [dt - p * g for dt, p in zip(dts, ps)]
                pr = self._row_params(params, tr)
                u = uc = us[tr]
                if u == 0:  # p_t = 1 to every digit (one class): the coefficient's limit from u < 0
                    uc = -mpmath.mpf(10) ** (-(mpmath.mp.dps // 2))
                c = fc(uc, *pr)
                tf = ftf(u, *pr) if stable else ps[tr] - 1
                return [fl(u, *pr)] + [c * (tf if j == tr else p) for j, p in enumerate(ps)]
            if fixed:
                with mpmath.workdps(50):
                    v = ev()
            else:
                v, _ = _adaptive(ev, f"kernel {self.name}, row {r}, params {params}", cap)
            losses.append(v[0])
            grads.append(v[1:])
        return losses, grads

    def signs(self, x, t, params=(), ignore_index=-100):
        """Signs (-1, 0, 1; NaN: unknown) of the exact loss and gradient, float arrays shaped like
        ``values``: from the original definitions where SIGN_DPS digits suffice (rows dominated by
        1e3), else from the proved stable forms where SIGN_DPS digits suffice (x = +-1e4), else
        from the stable forms at 50 digits (mpmath has no exponent range: +-(largest float)),
        where a 0 is no sign (the stable form may cancel, as x + softplus(-x) does)."""
        def one(xs, ts):
            for stable in (False, True):
                try:
                    return self.values(xs, ts, params, ignore_index, stable=stable, cap=SIGN_DPS), False
                except ReferenceUnavailable:
                    pass
            return self.values(xs, ts, params, ignore_index, stable=True, fixed=True), True

        def sign(v, last):
            return math.nan if last and v == 0 else float(mpmath.sign(v))
        out_l, out_g = [], []
        if self.layout == "elementwise":  # one point at a time: one huge x costs no other point its exactness
            xs = np.asarray(x, dtype=np.float64).ravel()
            ts = np.broadcast_to(np.asarray(t, dtype=np.float64), np.shape(x)).ravel()
            for xi, ti in zip(xs, ts):
                ((li,), (gi,)), last = one(np.array([xi]), np.array([ti]))
                out_l.append(sign(li, last))
                out_g.append(sign(gi, last))
            return np.array(out_l), np.array(out_g)
        x = np.asarray(x, dtype=np.float64)
        for r in range(x.shape[0]):
            ((li,), (gi,)), last = one(x[r:r + 1], np.asarray(t)[r:r + 1])
            out_l.append(sign(li, last))
            out_g.append([sign(v, last) for v in gi])
        return np.array(out_l), np.array(out_g)

    # -- condition numbers ------------------------------------------------------------------
    def kappa(self, x, t, params=(), dtype=np.float64):
        """Condition numbers (loss, grad) of the exact function, float64 arrays shaped like
        ``values`` (grad of softmax: (N, K)): sum over the continuous inputs v of
        |v*df/dv| / max(|f|, smallest normal of dtype).  Elementwise inputs: x, a soft t, the
        params; softmax: every logit of the row, q (class_probs), the params."""
        tiny = float(np.finfo(dtype).tiny)
        params = tuple(params)
        if self.layout == "elementwise":
            return self._kappa_elementwise(x, t, params, tiny)
        return self._kappa_rows(x, t, params, tiny)

    def _kappa_elementwise(self, x, t, params, tiny):
        off = self.weight_off(params)
        wrt = ["x"] + [v for v in self.continuous if not (off and v == "alpha")]
        fns = {role: (self._fn("original", role, off), [self._fn("original", role, off, v) for v in wrt])
               for role in ("loss", "grad")}
        xs = np.asarray(x, dtype=np.float64).ravel().tolist()
        ts = np.broadcast_to(np.asarray(t, dtype=np.float64), np.shape(x)).ravel().tolist()
        out = {"loss": [], "grad": []}
        for xi, ti in zip(xs, ts):
            vals = {"x": _mpf(xi), "t": _mpf(ti), **{p: _mpf(v) for p, v in zip(self.params, params)}}
            a = [vals[n] for n in self.args]

            def ev(a=a):
                res = []
                for role in ("loss", "grad"):
                    f, ds = fns[role]
                    res.append(f(*a))
                    res.extend(abs(vals[v] * _partial(f, dv, a, self.args.index(v))) if vals[v] != 0
                               else mpmath.mpf(0) for v, dv in zip(wrt, ds))
                return res
            v, _ = _adaptive(ev, f"kernel {self.name} (condition number) at x = {xi!r}, t = {ti!r}")
            n = len(wrt) + 1
            for i, role in enumerate(("loss", "grad")):
                f, parts = v[i * n], v[i * n + 1:(i + 1) * n]
                out[role].append(float(mpmath.fsum(parts) / max(abs(f), mpmath.mpf(tiny))))
        return np.array(out["loss"]), np.array(out["grad"])

    def _kappa_rows(self, x, target, params, tiny):
        x = np.asarray(x, dtype=np.float64)
        n, k = x.shape
        off = self.weight_off(params)
        probs = self.target == "class_probs"
        fa, fb = self.roles  # term, dterm / loss, coef
        f1, f2 = self._fn("original", fa, off), self._fn("original", fb, off)
        h2 = self._fn("original", fb, off, "u")  # d(dterm)/du, d(coef)/du
        pnames = [p for p in self.params if not (off and p == "alpha")]
        cont = (["q"] if probs else []) + pnames
        d1 = {v: self._fn("original", fa, off, v) for v in cont}
        d2 = {v: self._fn("original", fb, off, v) for v in cont}
        kl, kg = [], []
        for r in range(n):
            row = x[r].tolist()
            if not probs and int(target[r]) < 0:
                kl.append(0.0)
                kg.append([0.0] * k)
                continue
            tr = None if probs else int(target[r])

            def ev(r=r, row=row):
                _, us = self._row_u(row)
                ps = [mpmath.exp(u) for u in us]
                pr = self._row_params(params, tr)
                vals = dict(zip(self.params, pr))
                if probs:
                    kk = mpmath.mpf(k)
                    qs = [_mpf(v) for v in target[r].tolist()]
                    args = [[u, qq, kk] + pr for u, qq in zip(us, qs)]
                else:
                    args = [[us[tr]] + pr]
                a1 = [f1(*a) for a in args]
                a2 = [f2(*a) for a in args]
                h = [_partial(f2, h2, a, 0) for a in args]
                extra = []
                for v in cont:
                    if v == "q":
                        extra.append([qs[i] * _partial(f1, d1["q"], args[i], 1) for i in range(k)])
                        extra.append([qs[i] * _partial(f2, d2["q"], args[i], 1) for i in range(k)])
                    else:
                        j = self.args.index(v)
                        extra.append([vals[v] * _partial(f1, d1[v], a, j) if vals[v] != 0 else mpmath.mpf(0)
                                      for a in args])
                        extra.append([vals[v] * _partial(f2, d2[v], a, j) if vals[v] != 0 else mpmath.mpf(0)
                                      for a in args])
                flat = a1 + a2 + h + [e for ex in extra for e in ex] + ps
                return flat
            flat, _ = _adaptive(ev, f"kernel {self.name} (condition number), row {r}")
            m = len(flat) - k
            ps = np.array([float(v) for v in flat[m:]])
            xs = np.array(row)
            cnt = k if probs else 1
            a1, a2, h = flat[:cnt], flat[cnt:2 * cnt], flat[2 * cnt:3 * cnt]
            flat_extra = flat[3 * cnt:m]
            extra = [flat_extra[i * cnt:(i + 1) * cnt] for i in range(2 * len(cont))]
            if probs:
                loss = mpmath.fsum(a1)
                g_sum = mpmath.fsum(a2)
                hs = mpmath.fsum(h)
                grad = [a2[j] - _mpf(ps[j]) * g_sum for j in range(k)]
                gl = np.array([float(v) for v in grad])
                # d grad_j/dx_i = [i == j]*(h_j - p_j*G) + p_i*(p_j*(G + H) - h_j) - p_j*h_i
                aj = np.array([float(h[j]) for j in range(k)]) - ps * float(g_sum)
                bj = ps * float(g_sum + hs) - np.array([float(v) for v in h])
                hf = np.array([float(v) for v in h])
                jac = np.outer(ps, bj) - np.outer(hf, ps)
                jac[np.diag_indices(k)] += aj
                kx_g = np.abs(xs[:, None] * jac).sum(axis=0)
                kx_l = float(np.abs(xs * gl).sum())
                ke_l = 0.0
                ke_g = np.zeros(k)
                for i, v in enumerate(cont):
                    e1 = np.array([float(e) for e in extra[2 * i]])
                    e2 = np.array([float(e) for e in extra[2 * i + 1]])
                    if v == "q":  # q_i*d grad_j/dq_i = [i == j]*e2_j - p_j*e2_i, e2_i = q_i*d dterm_i/dq
                        ke_l += float(np.abs(e1).sum())
                        ae = np.abs(e2)
                        ke_g += ae * (1 - ps) + ps * (float(ae.sum()) - ae)
                    else:
                        ke_l += abs(float(e1.sum()))
                        ke_g += np.abs(e2 - ps * e2.sum())
                lf = abs(float(loss))
            else:
                loss, c, cu = a1[0], a2[0], h[0]
                delta = np.zeros(k)
                delta[tr] = 1.0
                fac = ps - delta
                gl = float(c) * fac
                # loss: dL/dx_i = -c*(p_i - [i == t]) (the kernel's own gradient)
                kx_l = float(np.abs(xs * gl).sum())
                # grad_j = c(u_t)*(p_j - [j == t]): d/dx_i = c'(u_t)*([i == t] - p_i)*(p_j - [j == t]) + c*p_j*([i == j] - p_i)
                jac = float(cu) * np.outer(delta - ps, fac) + float(c) * (np.diag(ps) - np.outer(ps, ps))
                kx_g = np.abs(xs[:, None] * jac).sum(axis=0)
                ke_l = sum(abs(float(extra[2 * i][0])) for i in range(len(cont)))
                ke_g = sum(np.abs(float(extra[2 * i + 1][0]) * fac) for i in range(len(cont))) \
                    if cont else np.zeros(k)
                lf = abs(float(loss))
            kl.append((kx_l + ke_l) / max(lf, tiny))
            kg.append(((kx_g + ke_g) / np.maximum(np.abs(gl), tiny)).tolist())
        return np.array(kl), np.array(kg)

    # -- the literal closed form in float64 -------------------------------------------------
    def closed_form_numpy(self):
        """The original lines transcribed literally into float64 NumPy: (loss_fn, grad_fn).

        Elementwise: functions of (x, t, *params), the gradient from the chain's closed form (the
        line after ``D(...)``).  class_index: functions of (p_t, *params): the loss and the
        coefficient of (p_k - [k == t]).  class_probs: functions of (p_k, q_k, K, *params): the term
        and d term/du."""
        if self.layout == "elementwise":
            args = [self._sym(a) for a in self.args]
            _, c = self._chain(self.spec.exports["grad"])
            gline = 1 if c.lines[0].expr.has(D) else 0
            return (sp.lambdify(args, self.original("loss"), modules="numpy"),
                    sp.lambdify(args, self.original("grad", line=gline), modules="numpy"))
        p = sp.Symbol("p_", positive=True)
        u = self._sym("u")
        rest = [self._sym(a) for a in self.args[1:]]
        out = []
        for role in self.roles:
            expr = self.original(role).xreplace({u: sp.log(p)})
            out.append(sp.lambdify([p] + rest, expr, modules="numpy"))
        return tuple(out)


# ------------------------------------------------------------------------------------------
# errors, and the short forms by kernel name


def rel_errors(computed, reference, dtype):
    """|computed - reference| / max(|reference|, smallest normal of dtype), per element (float64)."""
    tiny = mpmath.mpf(float(np.finfo(dtype).tiny))
    comp = np.asarray(computed).ravel().tolist()
    ref = list(reference)
    if len(ref) != len(comp):
        raise ValueError(f"{len(comp)} computed values against {len(ref)} reference values")
    out = np.empty(len(comp))
    with mpmath.workdps(30):
        for i, (c, r) in enumerate(zip(comp, ref)):
            if not math.isfinite(c):
                out[i] = math.inf
                continue
            out[i] = float(abs(mpmath.mpf(c) - r) / max(abs(r), tiny))
    return out


def elementwise(name, x, t, params=(), path=None):
    """mpmath references (loss, grad) of an elementwise kernel: lists of mpf, one per element."""
    return reference_for(name, path).values(x, t, params)


def rowwise(name, x, target, *params, ignore_index=-100, path=None):
    """mpmath references (loss per row, gradient rows) of a softmax kernel; ``params`` in the
    kernel's declared order (none for a kernel without parameters)."""
    return reference_for(name, path).values(x, target, params, ignore_index)


def closed_form_numpy(name, path=None):
    """The original lines in literal float64 NumPy (see :meth:`Reference.closed_form_numpy`)."""
    return reference_for(name, path).closed_form_numpy()


__all__ = ["Reference", "ReferenceUnavailable", "reference_for", "find_kernel", "rel_errors", "elementwise",
           "rowwise", "closed_form_numpy", "BASE_DPS", "AGREE_DIGITS", "MAX_DPS", "SIGN_DPS"]
