"""Which proved expressions make up each kernel, and how they become lines of code.

A kernel here is *data*: a ``[[kernel]]`` table of its derivation file (parsed and checked by
:mod:`derive.language.loader` into a ``KernelDecl``) names the exported (proved) lines it evaluates,
its layout and parameters.  Every formula comes from the file through the loader: definitions are substituted
(except the few the template computes itself, see ``weight`` and ``compensated``), the
outputs of one kernel go through one common-subexpression elimination, and each backend's
printer writes them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import sympy as sp

from derive.language.loader import DerivationFileError, load_file, second_name
from derive.codegen.printers import C_CONFIGS, abs_key, c_printer, magnitude_rank, numpy_printer, with_sigmoid_pow

PACKAGE_DIR = Path(__file__).resolve().parent.parent
DERIVATIONS_DIR = PACKAGE_DIR / "derivations"
STABLE_FORMS = DERIVATIONS_DIR / "stable_forms.toml"


def shipped_files() -> tuple:
    """Every derivation file of derive/derivations/ with [[kernel]] tables (stable_forms.toml first, then by
    name): generated/ holds
    <module>.{py,c,h} for each (the TOML is read for the tables only; nothing is proved or printed here)."""
    try:  # Python 3.11+
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover
        import tomli as tomllib

    files = []
    # the focal kernels' stable forms first (the first shipped kernels), then the others by name
    for path in sorted(DERIVATIONS_DIR.glob("*.toml"), key=lambda p: (p != STABLE_FORMS, p.name)):
        try:
            tables = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DerivationFileError(path, f"cannot read it: {exc}") from None
        if tables.get("kernel"):
            files.append(path)
    return tuple(files)


_SHIPPED = None


def shipped_kernels() -> tuple:
    """The kernels declared by the [[kernel]] tables of every shipped file (loader.KernelDecl, with .module
    and .path), file by file in :func:`shipped_files` order, each file's in its order.  Kernel names are
    unique across the files (they name the C functions derive_<kernel>_f32/_f64, which two modules linked
    into one program must not share)."""
    global _SHIPPED
    if _SHIPPED is None:
        kernels, seen = [], {}
        for path in shipped_files():
            for k in load_file(path).kernels:
                if k.name in seen or second_name(k) in seen:
                    raise DerivationFileError(path, f"kernel name also declared by {seen[k.name].name}: shipped "
                                              "kernel names must be unique (they name the C functions)",
                                              kernel=k.name)
                seen[k.name] = path
                if second_name(k):
                    seen[second_name(k)] = path
                kernels.append(k)
        _SHIPPED = tuple(kernels)
    return _SHIPPED


# Names the templates give the symbols they supply.
ELEMENT_VARS = {"x": "xi", "t": "ti", "zh": "zh", "zl": "zl"}
ROW_VARS = {"u": "u", "alpha": "alpha_t"}
#: class_probs: u = log p_k, q = the target probability of class k, K = the number of classes (a float)
PROB_VARS = {"u": "u", "q": "qk", "K": "kf"}
#: the template's variables, per KernelDecl.kind
TEMPLATE_VARS = {"elementwise": ELEMENT_VARS, "rowwise": ROW_VARS, "rowprobs": PROB_VARS}
#: output name -> export role, per KernelDecl.kind
OUTPUT_ROLES = {"elementwise": {"loss": "loss", "grad": "grad"},
                "rowwise": {"loss": "loss", "coef": "coef", "target": "target_factor"},
                "rowprobs": {"term": "term", "dterm": "dterm"}}
#: the second-derivative kernels (double backward): output name -> export role, per KernelDecl.kind.  The
#: Hessian-vector products of the softmax layouts need the first derivative's pieces beside the second's.
SECOND_ROLES = {"elementwise": {"hess": "hess"},
                "rowwise": {"coef": "coef", "target": "target_factor", "dcoef": "dcoef"},
                "rowprobs": {"dterm": "dterm", "d2term": "d2term"}}
#: the generated second-derivative function's suffix, per KernelDecl.kind: derive_<kernel>_<suffix>_<dt>
SECOND_SUFFIX = {"elementwise": "hess", "rowwise": "hvp", "rowprobs": "hvp"}


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
    rewrites: dict = field(default_factory=dict)  # output name -> the rules derive.rewrite fired (in order)


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


def prepare(spec, f, roles=None) -> Prepared:
    """The SymPy expressions of one kernel, in the variables its template provides (``roles``: output name ->
    export role, default the kernel's own outputs, OUTPUT_ROLES)."""
    roles = OUTPUT_ROLES[spec.kind] if roles is None else roles
    outs = {out: spec.exports[role] for out, role in roles.items()}
    ctx, did = _context_of(f, next(iter(outs.values())))
    for export in outs.values():  # the loader checked these; a KernelDecl built by hand may not be
        if export not in f.exports:
            raise DerivationFileError(f.path, f"the file exports no {export!r}", kernel=spec.name)
        if _context_of(f, export)[1] != did:
            raise DerivationFileError(f.path, "the exports come from different derivations", kernel=spec.name)
    keep = set()
    extra = {}
    if getattr(spec, "weight", None):
        keep.add(spec.weight)
    comp = getattr(spec, "compensated", None)
    if comp:
        keep.add(comp[0])
    exprs = {k: _expand_except(ctx, f.exports[e], keep) for k, e in outs.items()}
    fired = {}
    for k, e in outs.items():
        role = roles[k]
        if role in getattr(spec, "rewrite", ()):
            exprs[k], fired[k] = _rewritten(spec, f, ctx, e, exprs[k], keep)
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
            raise DerivationFileError(f.path, f"compensated: {zname} = {zdef} is not {factor}*b + c", kernel=spec.name)
        extra["comp_a"] = _rename(a, ELEMENT_VARS)
        extra["comp_b"] = _rename(b, ELEMENT_VARS)
        extra["comp_c"] = _rename(c, ELEMENT_VARS)
        zh, zl = sp.Symbol("zh", real=True), sp.Symbol("zl", real=True)
        # first-order correction: f(z_hi + z_lo) = f(z_hi) + f'(z_hi) z_lo + O(z_lo^2)
        exprs = {k: v.xreplace({zsym: zh}) + sp.diff(v, zsym).xreplace({zsym: zh}) * zl for k, v in exprs.items()}
    mapping = TEMPLATE_VARS[spec.kind]
    exprs = {k: _rename(v, mapping) for k, v in exprs.items()}
    allowed = set(mapping.values()) | set(spec.params) | ({spec.weight} if getattr(spec, "weight", None) else set())
    for k, v in exprs.items():
        bad = {s.name for s in v.free_symbols} - allowed
        if bad:
            raise DerivationFileError(
                f.path, f"{outs[k]} ({k}) uses {', '.join(sorted(bad))}, which neither the {spec.layout} template "
                f"(it supplies {', '.join(sorted(k for k in mapping if len(k) == 1 or k == 'alpha'))}) nor the "
                f"params supply: add them to params", kernel=spec.name)
    return Prepared(spec, exprs, extra, outs, did, fired)


_REWRITTEN = {}


def rewrite_of(spec, f, export):
    """(the proved form derive.rewrite gives ``export`` of kernel ``spec``, in its printing form, with the
    kernel's weight definition kept as its symbol as prepare() keeps it; the rules fired)."""
    ctx, _ = _context_of(f, export)
    keep = {spec.weight} if getattr(spec, "weight", None) else set()
    return _rewritten(spec, f, ctx, export, _expand_except(ctx, f.exports[export], keep), keep)


def rewritten_export(spec, f, export):
    """The proved form derive.rewrite gives ``export`` (rewrite_of's first item)."""
    return rewrite_of(spec, f, export)[0]


def _rewritten(spec, f, ctx, export, expr, keep):
    """The closed form ``expr`` of ``export`` rewritten by derive.rewrite's proved rules, proved equal to it by
    the prover (DerivationFileError when it is not), in its printing form; and the fired rules."""
    from derive.rewrite import RewriteError, prove_equal, rewrite, to_helpers

    key = (str(f.path), export, tuple(sorted(keep)), sp.srepr(expr))
    hit = _REWRITTEN.get(key)
    if hit is not None:
        return hit
    try:
        new, fired = rewrite(expr, ctx.domains)
    except RewriteError as exc:
        raise DerivationFileError(f.path, f"rewrite: {exc}", kernel=spec.name) from None
    verdict = prove_equal(f.exports[export], new, ctx)
    if verdict.status != "proved":
        raise DerivationFileError(
            f.path, f"rewrite: the rules' form of {export} ({', '.join(fired) or 'no rule fired'}) is not proved "
            f"equal to its closed form: {verdict.status}" + (f" ({verdict.detail})" if verdict.detail else "")
            + f"; the form was {str(new)[:300]}", kernel=spec.name)
    out = (to_helpers(new), fired)
    _REWRITTEN[key] = out
    return out


def rewrites_text(prep) -> list:
    """One comment line per rewritten export: "<export>: rule, rule, ..." (derive.rewrite's fired rules)."""
    return ["%s: %s" % (prep.export_names[k], ", ".join(r) or "no rule fired") for k, r in prep.rewrites.items()]


def prepare_second(spec, f):
    """The second-derivative kernel's expressions (SECOND_ROLES), or None when the kernel declares no
    hess / dcoef / d2term."""
    roles = SECOND_ROLES[spec.kind]
    if any(r not in spec.exports for r in roles.values()):
        return None
    return prepare(spec, f, roles)


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


_LOGISTIC = ("sigmoid", "softplus", "sigmoid_pow")  # the functions that share e^-|v| in the NumPy module


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
    temps, reduced = _cse({k: with_sigmoid_pow(v) for k, v in prep.exprs.items()})
    negations, shared, lines = _shared_logistic(temps, reduced)
    pr = numpy_printer(_ranks(temps), shared, negations)
    printed = [(str(s), pr.doprint(e)) for s, e in temps]
    for pos, name, key in reversed(lines):  # from the last position: earlier ones stay valid
        v = pr.doprint(key)
        printed.insert(pos, (name, "_expabs(%s)  # e^-|%s|, 1 + e^-|%s|: shared by sigmoid and softplus of +-%s"
                             % (v, v, v, v)))
    return Printed(printed, {k: pr.doprint(v) for k, v in reduced.items()},
                   {k: pr.doprint(v) for k, v in prep.extra_exprs.items()})


def load_kernels(path=STABLE_FORMS, file=None):
    """The loaded file and its declared kernels, prepared (DerivationFileError when it declares none)."""
    f = file if file is not None else load_file(path)
    if not f.kernels:
        raise DerivationFileError(f.path, "declares no [[kernel]]: nothing to generate")
    return f, [prepare(spec, f) for spec in f.kernels]


__all__ = ["shipped_files", "shipped_kernels", "prepare", "rewrites_text", "rewritten_export", "rewrite_of", "prepare_second", "SECOND_ROLES", "SECOND_SUFFIX", "print_c", "print_numpy", "load_kernels", "C_CONFIGS",
           "STABLE_FORMS", "DERIVATIONS_DIR"]
