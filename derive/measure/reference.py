"""High-precision references for the kernels, from the *original* definitions.

The reference of each kernel is the first line of its chains in ``stable_forms.toml``: the
loss as the note (or torchvision) defines it, and the gradient ``D(loss, x)`` resolved by
the proof engine's chain rule, so it is independent of the stable forms the kernels
evaluate.  Both are evaluated with mpmath at ``40 + (digits lost to cancellation)``
significant digits: ``1 - p_t`` at ``x_t = 30`` loses 13 digits, so the working precision
grows with |x|; the softmax rows get the digits that ``1 - p_t`` needs when the target
dominates.  :func:`closed_form_numpy` gives the same lines as a literal float64 NumPy
transcription (accurate only for moderate logits), for comparison.
"""
from __future__ import annotations

import functools
import math

import mpmath
import numpy as np
import sympy as sp

from derive.language.functions import D, rewrite_elementary
from derive.language.loader import load_file

BASE_DPS = 40


@functools.lru_cache(maxsize=None)
def _file():
    from derive.codegen.kernels import STABLE_FORMS

    return load_file(STABLE_FORMS)


@functools.lru_cache(maxsize=None)
def _specs():
    from derive.codegen.kernels import shipped_kernels

    return {k.name: k for k in shipped_kernels()}


def _chain(export):
    f = _file()
    did, cid = f.export_derivation[export]
    d = next(d for d in f.derivations if d.id == did)
    c = next(c for c in d.chains if c.id == cid)
    return d, c


def _original(export, line=0, off=None):
    """The chain's line (default: the first), with derivatives resolved and definitions expanded.

    ``off`` names a weight definition (alpha_t) to replace by 1: torchvision's alpha < 0."""
    from derive.prover.engine import Resolver

    d, c = _chain(export)
    expr = c.lines[line].expr
    if expr.has(D):
        expr = Resolver(d.context).resolve(expr)
    if off:
        expr = expr.xreplace({d.context.names[off]: sp.S.One})
    return rewrite_elementary(d.context.expand(expr)), d.context


def _note_line(export):
    """The note's closed form: the line after D(...) in a gradient chain, else the first line."""
    d, c = _chain(export)
    return 1 if c.lines[0].expr.has(D) else 0


@functools.lru_cache(maxsize=None)
def _mp_function(export, args, off=None):
    expr, ctx = _original(export, 0, off)
    syms = [ctx.names[a] for a in args]
    extra = expr.free_symbols - set(syms)
    if extra:
        raise ValueError(f"{export}: reference depends on {sorted(map(str, extra))}")
    return sp.lambdify(syms, expr, modules="mpmath")


@functools.lru_cache(maxsize=None)
def _np_function(export, args, line):
    expr, ctx = _original(export, line)
    syms = [ctx.names[a] for a in args]
    return sp.lambdify(syms, expr, modules="numpy")


def _mpf(v):
    return mpmath.mpf(float(v))


def _digits_for(*mags):
    """Digits that 1 - sigmoid(v) loses for |v| up to the largest magnitude given."""
    m = max((abs(float(v)) for v in mags), default=0.0)
    return BASE_DPS + int(m / 2.302585092994046) + 5


def elementwise(name, x, t, params):
    """mpmath references (loss, grad) for an elementwise kernel: lists of mpf, one per element."""
    spec = _specs()[name]
    args = ("x", "t") + tuple(spec.params)
    pvals = [float(p) for p in params]
    off = _weight_off(spec, pvals)
    floss, fgrad = _mp_function(spec.loss, args, off), _mp_function(spec.grad, args, off)
    x = np.asarray(x, dtype=np.float64).ravel()
    t = np.asarray(t).ravel()
    loss, grad = [], []
    scale = max([abs(p) for p in pvals[:1]] + [1.0])  # gamma scales z in FL*
    beta = abs(pvals[1]) if name == "focal_star" and len(pvals) > 1 else 0.0
    for xi, ti in zip(x.tolist(), t.tolist()):
        with mpmath.workdps(_digits_for(xi * scale + beta, xi)):
            a = [_mpf(xi), mpmath.mpf(int(ti != 0))] + [_mpf(p) for p in pvals]
            loss.append(+floss(*a))
            grad.append(+fgrad(*a))
    return loss, grad


def _weight_off(spec, pvals):
    """alpha < 0 switches the weight off (torchvision): the reference then has alpha_t = 1."""
    if getattr(spec, "weight", None) and pvals[list(spec.params).index("alpha")] < 0:
        return spec.weight
    return None


def rowwise(name, x, target, alpha, gamma, ignore_index=-100):
    """mpmath references (loss per row, grad rows) for a softmax kernel.

    The loss and the coefficient C are the note's lines in p_t, with p_t = e^(x_t)/sum e^(x_k)
    computed at a precision that keeps 40 digits of 1 - p_t; the gradient is C*(p_k - [k == t])
    as in the note."""
    spec = _specs()[name]
    args = ("u",) + tuple(p for p in spec.params)
    floss = _mp_function(spec.loss, args)
    fcoef = _mp_function(spec.coef, args)
    x = np.asarray(x, dtype=np.float64)
    n, k = x.shape
    alpha_arr = None if alpha is None or np.ndim(alpha) == 0 else np.asarray(alpha, dtype=np.float64)
    losses, grads = [], []
    for r in range(n):
        tr = int(target[r])
        if tr == ignore_index:
            losses.append(mpmath.mpf(0))
            grads.append([mpmath.mpf(0)] * k)
            continue
        row = x[r].tolist()
        # 1 - p_t ~ sum of e^(x_j - x_t) over j != t: enough digits to see it against 1
        others = [v for j, v in enumerate(row) if j != tr]
        lead = (row[tr] - max(others)) if others else 0.0
        dps = BASE_DPS + 10 + int(max(lead, 0.0) / 2.302585092994046) + int(math.log10(k + 1))
        with mpmath.workdps(dps):
            xs = [_mpf(v) for v in row]
            lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in xs))
            u = xs[tr] - lse
            if abs(u) < mpmath.mpf(10) ** (-dps + 5):
                u = mpmath.mpf(0)  # p_t = 1 to the working precision (a single class: log e^x rounds to x +- ulp)
            a = float(alpha_arr[tr]) if alpha_arr is not None else float(1.0 if alpha is None else alpha)
            pv = {"alpha": _mpf(a), "gamma": _mpf(gamma)}
            params = [pv[p] for p in spec.params]
            losses.append(+floss(u, *params) if u != 0 else mpmath.mpf(0))
            coef = fcoef(u, *params) if u != 0 else _limit_coef(fcoef, params, dps)
            grads.append([+(coef * (mpmath.exp(v - lse) - (1 if j == tr else 0))) for j, v in enumerate(xs)])
    return losses, grads


def _limit_coef(fcoef, params, dps):
    # p_t == 1 to every digit: the coefficient's limit, approached from u < 0
    with mpmath.workdps(dps):
        return fcoef(-mpmath.mpf(10) ** (-dps + 5), *params)


def stable_sign_elementwise(name, x, t, params):
    """Signs of the exact loss and gradient for any finite input, from the proved stable forms
    evaluated with mpmath (whose exponent range is unbounded): used beyond |x| = 30."""
    spec = _specs()[name]
    f = _file()
    args = ("x", "t") + tuple(spec.params)
    out = []
    off = _weight_off(spec, [float(p) for p in params])
    for export in (spec.loss, spec.grad):
        d, _ = _chain(export)
        expr = f.exports[export]
        if off:
            expr = expr.xreplace({d.context.names[off]: sp.S.One})
        expr = rewrite_elementary(d.context.expand(expr))
        fn = sp.lambdify([d.context.names[a] for a in args], expr, modules="mpmath")
        with mpmath.workdps(30):
            vals = [fn(_mpf(xi), mpmath.mpf(int(ti != 0)), *[_mpf(p) for p in params])
                    for xi, ti in zip(np.ravel(x).tolist(), np.ravel(t).tolist())]
        out.append(np.array([int(mpmath.sign(v)) for v in vals]))
    return out[0], out[1]


def closed_form_numpy(name):
    """The note's closed forms transcribed literally into float64 NumPy: (loss_fn, grad_fn).

    Elementwise: functions of (x, t, *params).  Softmax: functions of (p_t, *params) giving
    the loss and the coefficient C of (p_k - [k == t])."""
    spec = _specs()[name]
    if spec.kind == "elementwise":
        args = ("x", "t") + tuple(spec.params)
        return (_np_function(spec.loss, args, 0), _np_function(spec.grad, args, _note_line(spec.grad)))
    d, _ = _chain(spec.loss)
    p = d.context.names["p"]
    u = d.context.names["u"]
    out = []
    for export in (spec.loss, spec.coef):
        expr, ctx = _original(export)
        expr = expr.xreplace({u: sp.log(p)})  # exp(log(p)) is p
        out.append(sp.lambdify([p] + [ctx.names[a] for a in spec.params], expr, modules="numpy"))
    return tuple(out)


def rel_errors(computed, reference, dtype):
    """|computed - reference| / max(|reference|, smallest normal of dtype), per element (float64)."""
    tiny = mpmath.mpf(float(np.finfo(dtype).tiny))
    comp = np.asarray(computed).ravel().tolist()
    out = np.empty(len(comp))
    with mpmath.workdps(30):
        for i, (c, r) in enumerate(zip(comp, reference)):
            if not math.isfinite(c):
                out[i] = math.inf
                continue
            out[i] = float(abs(mpmath.mpf(c) - r) / max(abs(r), tiny))
    return out


__all__ = ["elementwise", "rowwise", "closed_form_numpy", "rel_errors", "stable_sign_elementwise", "BASE_DPS"]
