"""Which proved expressions make up each kernel, and how they become lines of code.

A kernel here is *data*: the names of the exported (proved) lines it evaluates and which of
the derivation's symbols the template supplies.  Every formula comes from
``derive/derivations/stable_forms.toml`` through the loader: definitions are substituted
(except the few the template computes itself, see ``weight`` and ``compensated``), the
outputs of one kernel go through one common-subexpression elimination, and each backend's
printer writes them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import sympy as sp

from ..loader import load_file
from .printers import C_CONFIGS, abs_key, c_printer, magnitude_rank, numpy_printer, with_sigmoid_pow

PACKAGE_DIR = Path(__file__).resolve().parent.parent
STABLE_FORMS = PACKAGE_DIR / "derivations" / "stable_forms.toml"


@dataclass(frozen=True)
class Elementwise:
    """Per-element loss and d loss / d x from logits x and labels t in {0, 1}."""

    name: str
    loss: str  # export names
    grad: str
    params: tuple  # scalar parameters, in C argument order (symbol names)
    title: str
    weight: str | None = None  # a definition the template evaluates only when alpha >= 0 (else 1)
    compensated: tuple | None = None  # (definition, factor): formed as factor*b + c with an error-free transform

    kind = "elementwise"


@dataclass(frozen=True)
class Rowwise:
    """Softmax over the last axis of (N, K) logits with integer targets."""

    name: str
    loss: str  # exports in u = log p_t (and the row's alpha and gamma)
    coef: str
    target_factor: str
    params: tuple
    title: str
    class_alpha: bool = False  # alpha is a scalar or a per-class vector

    kind = "rowwise"


KERNELS = (
    Elementwise("sigmoid_ce", "sigmoid_ce_loss", "sigmoid_ce_grad", (),
                "sigmoid cross-entropy (binary_cross_entropy_with_logits)"),
    Elementwise("sigmoid_focal", "sigmoid_focal_loss", "sigmoid_focal_grad", ("gamma",),
                "sigmoid focal loss -(1 - p_t)^gamma log p_t"),
    Elementwise("sigmoid_focal_alpha", "sigmoid_focal_alpha_loss", "sigmoid_focal_alpha_grad", ("alpha", "gamma"),
                "alpha-balanced sigmoid focal loss (torchvision, Detectron; alpha < 0: no weighting)",
                weight="alpha_t"),
    Elementwise("focal_star", "focal_star_loss", "focal_star_grad", ("gamma", "beta"),
                "FL*: -log(sigmoid(gamma*x_t + beta))/gamma (gamma > 0)",
                compensated=("z", "gamma")),
    Rowwise("softmax_ce", "softmax_ce_loss", "softmax_ce_coef", "softmax_pt_minus_one", (),
            "softmax cross-entropy with an ignore label"),
    Rowwise("softmax_focal", "softmax_focal_loss", "softmax_focal_coef", "softmax_pt_minus_one", ("alpha", "gamma"),
            "softmax focal loss -alpha_t (1 - p_t)^gamma log p_t (alpha scalar or per class) with an ignore label",
            class_alpha=True),
)

# Names the templates give the symbols they supply.
ELEMENT_VARS = {"x": "xi", "t": "ti", "zh": "zh", "zl": "zl"}
ROW_VARS = {"u": "u", "alpha": "alpha_t"}


@dataclass
class Printed:
    """One kernel's code for one backend and dtype."""

    temps: list  # [(name, code)]
    outputs: dict  # output name -> code
    extra: dict = field(default_factory=dict)  # e.g. weight / compensated pieces


@dataclass
class Prepared:
    spec: object
    exprs: dict  # output name -> SymPy expression in the template's variables
    extra_exprs: dict  # weight definition, compensated factors
    export_names: dict  # output name -> export name (for comments)
    derivation: str


def _context_of(f, export):
    did, _ = f.export_derivation[export]
    for d in f.derivations:
        if d.id == did:
            return d.context, did
    raise KeyError(export)  # pragma: no cover


def _expand_except(ctx, expr, keep):
    """Substitute the context's definitions, except those named in ``keep``."""
    full = {}
    for sym, rhs in ctx.definitions.items():  # dependency order
        if sym.name in keep:
            continue
        full[sym] = rhs.xreplace(full)
    prev = None
    while prev != expr:
        prev, expr = expr, expr.xreplace(full)
    return expr


def _rename(expr, mapping):
    subs = {s: sp.Symbol(mapping.get(s.name, s.name), real=True) for s in expr.free_symbols}
    return expr.xreplace(subs)


def prepare(spec, f) -> Prepared:
    """The SymPy expressions of one kernel, in the variables its template provides."""
    if spec.kind == "elementwise":
        outs = {"loss": spec.loss, "grad": spec.grad}
    else:
        outs = {"loss": spec.loss, "coef": spec.coef, "target": spec.target_factor}
    ctx, did = _context_of(f, spec.loss)
    for export in outs.values():
        if export not in f.exports:
            raise KeyError(f"{STABLE_FORMS.name} exports no {export!r} (needed by kernel {spec.name})")
        if _context_of(f, export)[1] != did:
            raise ValueError(f"kernel {spec.name}: exports come from different derivations")
    keep = set()
    extra = {}
    if getattr(spec, "weight", None):
        keep.add(spec.weight)
    comp = getattr(spec, "compensated", None)
    if comp:
        keep.add(comp[0])
    exprs = {k: _expand_except(ctx, f.exports[e], keep) for k, e in outs.items()}
    if spec.kind == "elementwise" and spec.weight:
        wsym = ctx.names[spec.weight]
        extra["weight"] = _rename(_expand_except(ctx, wsym, set()), ELEMENT_VARS)
        exprs = {k: v.xreplace({wsym: sp.Symbol(spec.weight, real=True)}) for k, v in exprs.items()}
    if comp:
        zname, factor = comp
        zsym = ctx.names[zname]
        zdef = _expand_except(ctx, zsym, set())
        a = ctx.names[factor]
        c, ab = zdef.as_independent(a, as_Add=True)
        b = ab / a  # keeps x*(2t - 1): 2*t*x - x would overflow for |x| > max/2
        if b.has(a) or sp.expand(a * b + c - zdef) != 0:
            raise ValueError(f"kernel {spec.name}: {zname} = {zdef} is not {factor}*b + c")
        extra["comp_a"] = _rename(a, ELEMENT_VARS)
        extra["comp_b"] = _rename(b, ELEMENT_VARS)
        extra["comp_c"] = _rename(c, ELEMENT_VARS)
        zh, zl = sp.Symbol("zh", real=True), sp.Symbol("zl", real=True)
        # first-order correction: f(z_hi + z_lo) = f(z_hi) + f'(z_hi) z_lo + O(z_lo^2)
        exprs = {k: v.xreplace({zsym: zh}) + sp.diff(v, zsym).xreplace({zsym: zh}) * zl for k, v in exprs.items()}
    mapping = ELEMENT_VARS if spec.kind == "elementwise" else ROW_VARS
    exprs = {k: _rename(v, mapping) for k, v in exprs.items()}
    allowed = set(mapping.values()) | set(spec.params) | ({spec.weight} if getattr(spec, "weight", None) else set())
    for k, v in exprs.items():
        bad = {s.name for s in v.free_symbols} - allowed
        if bad:
            raise ValueError(f"kernel {spec.name}: output {k} uses {sorted(bad)}, which the template does not supply")
    return Prepared(spec, exprs, extra, outs, did)


def _cse(exprs: dict):
    names = list(exprs)
    temps, reduced = sp.cse([exprs[n] for n in names], symbols=sp.numbered_symbols("c"), order="canonical")
    return temps, dict(zip(names, reduced))


def _ranks(temps):
    ranks = {}
    for s, e in temps:
        ranks[s] = magnitude_rank(e, ranks)
    return ranks


def print_c(prep: Prepared, dtype: str) -> Printed:
    temps, reduced = _cse({k: with_sigmoid_pow(v) for k, v in prep.exprs.items()})
    pr = c_printer(dtype, _ranks(temps))
    return Printed([(str(s), pr.doprint(e)) for s, e in temps], {k: pr.doprint(v) for k, v in reduced.items()},
                   {k: pr.doprint(v) for k, v in prep.extra_exprs.items()})


_LOGISTIC = ("sigmoid", "softplus")  # the functions that share e^-|v| in the NumPy module


def _shared_logistic(temps, reduced):
    """Which arguments of sigmoid/softplus to share an ``_expabs`` between, and where.

    Returns (negations, shared, lines): temporaries defined as -w, w a symbol (-> w); v -> the name of
    its shared temporary, for every v (up to sign) that two or more distinct calls use; and
    [(position in temps, name, v)] for the lines that compute them, each placed before the
    first temporary that uses it (position len(temps): only the outputs use it)."""
    negations = {s: -e for s, e in temps if e.is_Mul and e.args[0] == -1 and (-e).is_Symbol}
    calls, first = {}, {}
    exprs = [e for _, e in temps] + [reduced[k] for k in reduced]
    for pos, expr in enumerate(exprs):
        for node in sp.preorder_traversal(expr):
            if type(node).__name__ in _LOGISTIC:
                key = abs_key(node.args[0], negations)
                calls.setdefault(key, set()).add(node)
                first.setdefault(key, min(pos, len(temps)))
    shared, lines = {}, []
    for key in sorted(calls, key=lambda k: (first[k], sp.default_sort_key(k))):
        if len(calls[key]) < 2 or not key.is_Symbol:
            continue  # one call: nothing to share; an expression: no name to hang it on
        name = "%s_e" % key.name
        shared[key] = name
        lines.append((first[key], name, key))
    return negations, shared, lines


def print_numpy(prep: Prepared) -> Printed:
    temps, reduced = _cse(prep.exprs)
    negations, shared, lines = _shared_logistic(temps, reduced)
    pr = numpy_printer(_ranks(temps), shared, negations)
    printed = [(str(s), pr.doprint(e)) for s, e in temps]
    for pos, name, key in reversed(lines):  # from the last position: earlier ones stay valid
        v = pr.doprint(key)
        printed.insert(pos, (name, "_expabs(%s)  # e^-|%s|, 1 + e^-|%s|: shared by sigmoid and softplus of +-%s"
                             % (v, v, v, v)))
    return Printed(printed, {k: pr.doprint(v) for k, v in reduced.items()},
                   {k: pr.doprint(v) for k, v in prep.extra_exprs.items()})


def load_kernels(path=STABLE_FORMS):
    f = load_file(path)
    return f, [prepare(spec, f) for spec in KERNELS]


__all__ = ["KERNELS", "Elementwise", "Rowwise", "prepare", "print_c", "print_numpy", "load_kernels", "C_CONFIGS",
           "STABLE_FORMS"]
