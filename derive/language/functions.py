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

__all__ = ["sigmoid", "softplus", "log1p", "expm1", "xexpm1inv", "D", "rewrite_elementary"]


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
    """Replace sigmoid, softplus, log1p, expm1 and xexpm1inv by exp and log."""
    return expr.replace(sigmoid, lambda x: 1 / (1 + sp.exp(-x))) \
        .replace(softplus, lambda x: sp.log(1 + sp.exp(x))) \
        .replace(log1p, lambda x: sp.log(1 + x)) \
        .replace(expm1, lambda x: sp.exp(x) - 1) \
        .replace(xexpm1inv, lambda u: u / (sp.exp(u) - 1))
