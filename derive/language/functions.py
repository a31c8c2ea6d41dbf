"""SymPy functions the derivations and kernels share.

``sigmoid`` and ``softplus`` are not in SymPy.  They are defined here once, with their
derivatives and their rewrite to exp/log, so that the proof engine can expand them and the
code printers can emit a numerically stable implementation instead of ``log(1 + exp(x))``.
``log1p`` and ``expm1`` are SymPy's own (``sympy.codegen.cfunctions``), re-exported.

``D(f, v)`` is the derivative *as the author writes it*: it stays unevaluated until the
proof engine resolves it against the definitions of a derivation file (chain rule through
defined symbols), so a chain line keeps its shape for display.
"""
from __future__ import annotations

import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p

__all__ = ["sigmoid", "softplus", "log1p", "expm1", "xexpm1inv", "expm1mx", "D", "rewrite_elementary"]


class sigmoid(sp.Function):
    """The logistic function 1/(1 + exp(-x))."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_zero:
            return sp.S.Half
        return None

    def fdiff(self, argindex=1):
        x = self.args[0]
        return sigmoid(x) * (1 - sigmoid(x))

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return 1 / (1 + sp.exp(-x))

    _eval_rewrite_as_elementary = _eval_rewrite_as_exp

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_positive(self):
        if self.args[0].is_real:
            return True
        return None

    def _latex(self, printer, exp=None):
        tex = r"\sigma\left(%s\right)" % printer._print(self.args[0])
        return tex if exp is None else r"%s^{%s}" % (tex, exp)


class softplus(sp.Function):
    """log(1 + exp(x)), evaluated stably by the kernels as max(x, 0) + log1p(exp(-|x|))."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_zero:
            return sp.log(2)
        return None

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return sp.log(1 + sp.exp(x))

    _eval_rewrite_as_elementary = _eval_rewrite_as_exp

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_positive(self):
        if self.args[0].is_real:
            return True
        return None

    def _latex(self, printer, exp=None):
        tex = r"\operatorname{softplus}\left(%s\right)" % printer._print(self.args[0])
        return tex if exp is None else r"%s^{%s}" % (tex, exp)


class xexpm1inv(sp.Function):
    """u / expm1(u), continued by its limit 1 at u = 0 (the kernels select 1 there).

    It is log(p)/(p - 1) written in u = log(p): finite as p -> 1, where the literal ratio
    is 0/0.
    """

    nargs = 1

    @classmethod
    def eval(cls, u):
        if u.is_zero:
            return sp.S.One
        return None

    def fdiff(self, argindex=1):
        u = self.args[0]
        return (sp.exp(u) - 1 - u * sp.exp(u)) / (sp.exp(u) - 1) ** 2

    def _eval_rewrite_as_exp(self, u, **kwargs):
        return u / (sp.exp(u) - 1)

    _eval_rewrite_as_elementary = _eval_rewrite_as_exp

    def _latex(self, printer, exp=None):
        tex = r"\frac{%s}{\operatorname{expm1}\left(%s\right)}" % ((printer._print(self.args[0]),) * 2)
        return tex if exp is None else r"\left(%s\right)^{%s}" % (tex, exp)


def _expm1mx_value(u):
    """e^u - 1 - u at a number: mpmath (at the working precision plus the bits that expm1(u) - u
    cancels, so that the result has them all), a NumPy array or a float (series below |u| = 1/2,
    as the kernels evaluate it).  Used by ``lambdify`` (``expm1mx._imp_``)."""
    import mpmath

    if isinstance(u, (mpmath.mpf, mpmath.mpc)) or type(u).__module__.startswith("mpmath"):
        if u == 0:
            return mpmath.mpf(0)
        if mpmath.mag(u) < -mpmath.mp.prec:  # u^2/2 (1 + u/3) is e^u - 1 - u to every digit
            return u * u / 2 * (1 + u / 3)
        extra = max(0, -mpmath.mag(u)) + 8
        with mpmath.workprec(mpmath.mp.prec + extra):
            r = mpmath.expm1(u) - u
        return +r
    import numpy

    v = numpy.asarray(u, dtype=float)
    small = numpy.abs(v) < 0.5
    s = numpy.ones_like(v)
    with numpy.errstate(all="ignore"):  # u*u of a large u overflows in the branch not taken
        for k in range(16, 2, -1):  # u^2/2 (1 + u/3 (1 + u/4 (1 + ...))), to u^16/16!
            s = 1 + s * v / k
        out = numpy.where(small, v * v / 2 * s, numpy.expm1(v) - v)
    return out if numpy.ndim(u) else float(out)


class expm1mx(sp.Function):
    """e^u - 1 - u, i.e. expm1(u) - u without its cancellation near u = 0 (it is u^2/2 there).

    Written so that a sum such as -u + expm1(u), whose two terms cancel as u -> 0, can be
    rewritten into terms of one sign: for u <= 0, expm1mx(u) >= 0.  The kernels evaluate it
    by its series for |u| < 1/2 and as expm1(u) - u beyond (where at most a factor 4.4 of
    the last bit is lost)."""

    nargs = 1
    _imp_ = staticmethod(_expm1mx_value)

    @classmethod
    def eval(cls, u):
        if u.is_zero:
            return sp.S.Zero
        return None

    def fdiff(self, argindex=1):
        return expm1(self.args[0])

    def _eval_rewrite_as_exp(self, u, **kwargs):
        return sp.exp(u) - 1 - u

    _eval_rewrite_as_elementary = _eval_rewrite_as_exp

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_nonnegative(self):
        if self.args[0].is_real:
            return True  # e^u >= 1 + u
        return None

    def _latex(self, printer, exp=None):
        tex = r"\operatorname{expm1mx}\left(%s\right)" % printer._print(self.args[0])
        return tex if exp is None else r"%s^{%s}" % (tex, exp)


class D(sp.Function):
    """Unevaluated derivative d f / d v, resolved by the proof engine."""

    nargs = 2

    def _latex(self, printer):
        f, v = self.args
        fl = printer._print(f)
        if not isinstance(f, (sp.Symbol, sp.Function)):
            fl = r"\left(%s\right)" % fl
        return r"\frac{\partial %s}{\partial %s}" % (fl, printer._print(v))

    def _sympystr(self, printer):
        return "D(%s, %s)" % (printer._print(self.args[0]), printer._print(self.args[1]))


def rewrite_elementary(expr: sp.Expr) -> sp.Expr:
    """Replace sigmoid, softplus, log1p, expm1, xexpm1inv and expm1mx by exp and log."""
    return expr.replace(sigmoid, lambda x: 1 / (1 + sp.exp(-x))) \
        .replace(softplus, lambda x: sp.log(1 + sp.exp(x))) \
        .replace(log1p, lambda x: sp.log(1 + x)) \
        .replace(expm1, lambda x: sp.exp(x) - 1) \
        .replace(xexpm1inv, lambda u: u / (sp.exp(u) - 1)) \
        .replace(expm1mx, lambda u: sp.exp(u) - 1 - u)
