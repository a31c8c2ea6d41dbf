"""Code printers: one per backend, each next to its configuration.

SymPy's own printers do the work (``C99CodePrinter`` with a float32/float64 type alias, so
that ``exp`` becomes ``expf`` and literals get an ``F`` in float32; ``NumPyPrinter`` for the
NumPy module).  The subclasses only add the functions SymPy does not know: ``sigmoid``,
``softplus``, ``xexpm1inv`` and ``expm1mx`` become calls to small helpers defined once in each template, so
that ``softplus`` is printed as a softplus, never as ``log(1 + exp(...))``.  ``log1p`` and
``expm1`` are SymPy's and print as themselves.

Both backends print sigmoid(v)^g with a symbolic g (gamma) as one helper call (``sigmoid_pow``,
see :func:`with_sigmoid_pow`) that evaluates e^(-g softplus(-v)) with g*softplus(-v) kept as
hi + lo: a pow of a rounded sigmoid multiplies the sigmoid's rounding error by g.

NumPy only (the C output does not depend on it): sigmoid, softplus and sigmoid_pow calls whose
arguments agree up to sign take the name of a shared ``_expabs(v)`` temporary, and any other
power with a symbolic exponent prints as ``_pow``, which has shortcuts for gamma = 0, 1/2, 1, 2.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp
from sympy.codegen.ast import float32, float64, real
from sympy.printing.c import C99CodePrinter
from sympy.printing.numpy import NumPyPrinter


#: Symbols the templates supply whose values may be huge (logits, u = log p_t, z).
UNBOUNDED_NAMES = frozenset({"xi", "u", "zh", "zl"})


def magnitude_rank(expr, ranks=None) -> int:
    """0: in [0, 1] (sigmoid, its powers, e^u with u <= 0); 1: moderate (parameters, labels,
    numbers); 2: possibly huge (softplus, xexpm1inv, expm1mx, logits, u).

    Products are printed in increasing rank so that C and NumPy, which multiply left to
    right, form 0*gamma before multiplying by a huge softplus: 0*(gamma*huge) could be
    0*inf = NaN, (0*gamma)*huge is 0.
    """
    ranks = ranks or {}
    if expr in ranks:
        return ranks[expr]
    if expr.is_Number:
        return 1
    if expr.is_Symbol:
        return 2 if expr.name in UNBOUNDED_NAMES else 1
    name = type(expr).__name__
    if name in ("sigmoid", "sigmoid_pow") or (name == "exp" and _rank_arg(expr, ranks) <= 2):
        return 0
    if name in ("softplus", "xexpm1inv", "expm1mx", "log", "log1p"):
        return 2
    if expr.is_Pow:
        base = magnitude_rank(expr.base, ranks)
        return 0 if base == 0 and not expr.exp.is_negative else max(base, 1)
    return max((magnitude_rank(a, ranks) for a in expr.args), default=1)


def _rank_arg(expr, ranks):
    # exp only appears as e^u with u = log p_t <= 0 in the kernels
    return 0 if expr.args[0].is_Symbol and expr.args[0].name == "u" else 3


class _SafeMulMixin:
    """Print products in increasing magnitude rank (see :func:`magnitude_rank`)."""

    ranks: dict = {}

    def _print_Mul(self, expr):
        from sympy.printing.precedence import precedence

        coeff, factors = expr.as_coeff_mul()
        sign = ""
        if coeff.is_negative:
            sign, coeff = "-", -coeff
        num, den = [], []
        for f in factors:
            if f.is_Pow and f.exp.is_Integer and f.exp.is_negative:
                den.append(f.base ** (-f.exp))
            else:
                num.append(f)
        if coeff != 1:
            if coeff.is_Integer or not coeff.is_Rational:
                num.insert(0, coeff)
            else:
                num.insert(0, coeff.p) if coeff.p != 1 else None
                den.insert(0, sp.Integer(coeff.q))
        num = sorted(num, key=lambda f: magnitude_rank(f, self.ranks))  # stable: keeps SymPy's order within a rank
        prec = precedence(expr)
        text = "*".join(self.parenthesize(f, prec) for f in num) if num else "1"
        if den:
            d = "*".join(self.parenthesize(f, prec) for f in den)
            text = "%s/%s" % (text, d if len(den) == 1 and not den[0].is_Mul else "(%s)" % d)
        return sign + text


class sigmoid_pow(sp.Function):
    """sigmoid(v)^g with a symbolic g, kept whole through the C kernels' CSE so that it prints
    as one helper call, evaluated in log space (kernel_helpers.sigmoid_power in
    stable_forms.toml proves the form the helper evaluates)."""

    nargs = 2


def with_sigmoid_pow(expr):
    """Replace sigmoid(v)^g (g not a number) by sigmoid_pow(v, g)."""
    return expr.replace(lambda e: e.is_Pow and type(e.base).__name__ == "sigmoid" and not e.exp.is_Number,
                        lambda e: sigmoid_pow(e.base.args[0], e.exp))


@dataclass(frozen=True)
class CConfig:
    """How one floating type is spelt in C."""

    dtype: str  # "f32" / "f64"
    ctype: str  # "float" / "double"
    suffix: str  # suffix of the helpers and of the libm functions: "f" / ""
    max_name: str  # FLT_MAX / DBL_MAX
    exp_zero: str  # a w > 0 with e^-w = 0 in this type (its smallest subnormal is e^-103.3 / e^-744.4)


C_CONFIGS = {
    "f32": CConfig("f32", "float", "f", "FLT_MAX", "128"),
    "f64": CConfig("f64", "double", "", "DBL_MAX", "1024"),
}


class KernelCPrinter(_SafeMulMixin, C99CodePrinter):
    """C99 for one floating type; derive's functions go to the template's inline helpers."""

    def __init__(self, config: CConfig):
        alias = float32 if config.dtype == "f32" else float64
        super().__init__({"type_aliases": {real: alias}, "strict": True})
        self.config = config

    def _helper(self, name, expr):
        return "derive_%s%s(%s)" % (name, self.config.suffix, self._print(expr.args[0]))

    def _print_sigmoid(self, expr):
        return self._helper("sigmoid", expr)

    def _print_softplus(self, expr):
        return self._helper("softplus", expr)

    def _print_xexpm1inv(self, expr):
        return self._helper("xexpm1inv", expr)

    def _print_expm1mx(self, expr):
        return self._helper("expm1mx", expr)

    def _print_sigmoid_pow(self, expr):
        v, g = expr.args
        return "derive_sigmoid_pow%s(%s, %s)" % (self.config.suffix, self._print(v), self._print(g))

    def _print_Piecewise(self, expr):
        # where(c, a, b) as one ternary: only the selected value reaches the result (a vectorized select
        # may compute both, but an inf or NaN of the other branch is discarded, never combined)
        *pieces, (last, cond) = _pieces(expr)
        text = self._print(last)
        for e, c in reversed(pieces):
            text = "(%s ? %s : %s)" % (self._print(c), self._print(e), text)
        return text

    def _print_Max(self, expr):
        # selects, and a + b when neither comparison holds: a NaN of either argument stays NaN (fmax drops it)
        return _fold(expr.args, lambda a, b: "(%s < %s ? %s : (%s >= %s ? %s : %s + %s))" % (a, b, b, a, b, a, a, b),
                     self._print)

    def _print_Min(self, expr):
        return _fold(expr.args, lambda a, b: "(%s > %s ? %s : (%s <= %s ? %s : %s + %s))" % (a, b, b, a, b, a, a, b),
                     self._print)

    def _print_D(self, expr):  # pragma: no cover - a derivative can never reach a kernel
        raise ValueError("an unresolved derivative D(...) cannot be printed as code")


def _pieces(expr):
    """The (value, condition) pairs of a Piecewise whose last condition is True (as where(c, a, b) gives)."""
    pieces = list(expr.args)
    if pieces[-1][1] != sp.true:
        raise ValueError(f"a Piecewise without an otherwise branch cannot be printed: {expr}")
    return pieces


def _fold(args, pair, prn):
    text = prn(args[-1])
    for a in reversed(args[:-1]):
        text = pair(prn(a), text)
    return text


@dataclass(frozen=True)
class CudaConfig:
    """How one compute type is spelt in CUDA C++ (templates/kernels.cu.j2), and the storage types
    (what the tensors hold) that are computed in it: float16 and bfloat16 are loaded into float32,
    computed there and rounded once when stored."""

    dtype: str  # the compute type: "f32" / "f64"
    ctype: str  # "float" / "double"
    suffix: str  # helpers' and libdevice functions' suffix: "f" / ""
    max_name: str  # FLT_MAX / DBL_MAX
    exp_zero: str  # as CConfig.exp_zero
    storage: tuple  # ((storage dtype, its CUDA type), ...), the launchers' suffixes


CUDA_CONFIGS = {
    "f32": CudaConfig("f32", "float", "f", "FLT_MAX", "128",
                      (("f32", "float"), ("f16", "__half"), ("bf16", "__nv_bfloat16"))),
    "f64": CudaConfig("f64", "double", "", "DBL_MAX", "1024", (("f64", "double"),)),
}


class KernelCudaPrinter(KernelCPrinter):
    """CUDA device code for one compute type: the C99 printer's output (libdevice has the same
    expf, log1pf, expm1f, ... as libm, literals keep their F suffix in float32), except that a
    power with a symbolic exponent (gamma) prints as the template's ``derive_pow``, which takes
    b*b, b and 1 for exponents 2, 1 and 0 exactly as the C build's constant-folded pow does (the
    CUDA kernels pass integer gammas as template constants; libdevice's pow is not folded), and a
    square as b*b (GCC folds pow(b, 2) so)."""

    def __init__(self, config: CudaConfig):
        super().__init__(C_CONFIGS[config.dtype])
        self.cuda_config = config

    def _print_Pow(self, expr, rational=False):
        base, exp = expr.as_base_exp()
        if not exp.is_Number:
            return "derive_pow%s(%s, %s)" % (self.config.suffix, self._print(base), self._print(exp))
        if exp == 2:  # what GCC folds pow(b, 2) to (exact: one rounding); libdevice's pow is not folded
            b = self.parenthesize(base, 1000)
            return "(%s*%s)" % (b, b)
        return super()._print_Pow(expr)


def cuda_printer(dtype: str, ranks=None) -> KernelCudaPrinter:
    p = KernelCudaPrinter(CUDA_CONFIGS[dtype])
    p.ranks = dict(ranks or {})
    return p


class KernelNumPyPrinter(_SafeMulMixin, NumPyPrinter):
    """NumPy expressions (module alias ``numpy``); helpers are module-level functions.

    ``shared`` maps an argument v (up to sign, see :func:`abs_key`) to the name of a temporary
    holding ``_expabs(v)`` = (e^-|v|, 1 + e^-|v|): sigmoid(+-v) and softplus(+-v) then print
    as ``_sigmoid(v, name)`` / ``_softplus(v, name)`` and share one exp.  ``negations`` maps a
    temporary defined as -w to w, so that c2 = -c1 and c1 share."""

    shared: dict = {}
    negations: dict = {}

    def __init__(self):
        super().__init__({"fully_qualified_modules": True, "strict": True})

    def _helper(self, name, expr):
        return "_%s(%s)" % (name, self._print(expr.args[0]))

    def _shared_helper(self, name, expr):
        arg = expr.args[0]
        shared = self.shared.get(abs_key(arg, self.negations))
        if shared is None:
            return self._helper(name, expr)
        return "_%s(%s, %s)" % (name, self._print(arg), shared)

    def _print_sigmoid(self, expr):
        return self._shared_helper("sigmoid", expr)

    def _print_softplus(self, expr):
        return self._shared_helper("softplus", expr)

    def _print_xexpm1inv(self, expr):
        return self._helper("xexpm1inv", expr)

    def _print_expm1mx(self, expr):
        return self._helper("expm1mx", expr)

    def _print_sigmoid_pow(self, expr):
        # the template's _sigmoid_pow: e^(-g softplus(-v)) with g*softplus(-v) kept as hi + lo, as C's helper
        v, g = expr.args
        shared = self.shared.get(abs_key(v, self.negations))
        return "_sigmoid_pow(%s, %s%s)" % (self._print(v), self._print(g), ", " + shared if shared else "")

    def _print_Pow(self, expr, rational=False):
        # numpy.power and _pow keep pow(0, 0) = 1, which gamma = 0 needs; _pow (a scalar
        # exponent such as gamma) takes exact shortcuts for 0, 1/2, 1 and 2.
        base, exp = expr.as_base_exp()
        if exp.is_Integer and exp == -1:
            return "1/%s" % self.parenthesize(base, 1000)
        if exp.is_Number:
            return "numpy.power(%s, %s)" % (self._print(base), self._print(exp))
        return "_pow(%s, %s)" % (self._print(base), self._print(exp))

    def _print_Piecewise(self, expr):
        # numpy.where selects per element: an inf or NaN of the branch not taken never reaches the result
        *pieces, (last, cond) = _pieces(expr)
        text = self._print(last)
        for e, c in reversed(pieces):
            text = "numpy.where(%s, %s, %s)" % (self._print(c), self._print(e), text)
        return text

    def _print_Max(self, expr):  # numpy.maximum propagates NaN
        return _fold(expr.args, lambda a, b: "numpy.maximum(%s, %s)" % (a, b), self._print)

    def _print_Min(self, expr):
        return _fold(expr.args, lambda a, b: "numpy.minimum(%s, %s)" % (a, b), self._print)

    def _print_D(self, expr):  # pragma: no cover
        raise ValueError("an unresolved derivative D(...) cannot be printed as code")


def abs_key(arg, negations=None):
    """The v with arg = v or arg = -v (-v written as -1*v, or a temporary defined as -v), so
    that sigmoid(v), sigmoid(-v), softplus(v) and softplus(-v) are grouped: |arg| = |v|."""
    negations = negations or {}
    for _ in range(len(negations) + 1):
        if arg.is_Mul and arg.args[0] == -1:
            arg = -arg
        elif arg in negations:
            arg = negations[arg]
        else:
            break
    return arg


def c_printer(dtype: str, ranks=None) -> KernelCPrinter:
    p = KernelCPrinter(C_CONFIGS[dtype])
    p.ranks = dict(ranks or {})
    return p


def numpy_printer(ranks=None, shared=None, negations=None) -> KernelNumPyPrinter:
    p = KernelNumPyPrinter()
    p.ranks = dict(ranks or {})
    p.shared = dict(shared or {})
    p.negations = dict(negations or {})
    return p


__all__ = ["magnitude_rank", "sigmoid_pow", "with_sigmoid_pow", "abs_key", "CConfig", "C_CONFIGS", "KernelCPrinter", "KernelNumPyPrinter", "c_printer", "numpy_printer", "CudaConfig", "CUDA_CONFIGS",
           "KernelCudaPrinter", "cuda_printer", "sp"]
