"""Numerical rewrites as proved rules: from a plain closed form to a form floating point evaluates.

The rules are data: each is a derivation of ``rules.toml`` (its chain goes from the pattern to the
replacement; the domains of its symbols are the side conditions), and ``phases.toml`` puts them in named
phases with a cost.  :func:`rules` verifies ``rules.toml`` with the prover once per process and keeps only
the rules whose every check is proved: a rule that is not proved is never applied.

:func:`rewrite` applies the phases in order, each to a fixpoint, innermost nodes first; at a node the rules
of the phase are tried by (cost, order in phases.toml) and the first whose pattern matches with its side
conditions met fires.  The result and the list of fired rules are deterministic (SymPy's canonical order of
arguments, a fixed rule order).  The caller proves the result equal to the closed form it started from
(:func:`prove_equal`), as the hand-written chains are proved.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import sympy as sp

from derive.language.domains import Domain
from derive.language.functions import expm1, log1p, sigmoid, softplus, xexpm1inv

RULES_FILE = Path(__file__).resolve().parent / "rules.toml"
PHASES_FILE = Path(__file__).resolve().parent / "phases.toml"

#: the prover's time limit per step when the rules are verified before use (seconds)
STEP_TIMEOUT = 30.0
#: the guards a phases.toml entry may name: "singular_power" fires only where a matched power's exponent may
#: be negative; "unbounded_sum" only where the matched sum has a term that grows with the logits;
#: "outside_where" only outside every where() (a rule whose replacement is a where() that keeps the pattern in
#: one branch: inside it, it would fire again)
GUARDS = (None, "singular_power", "unbounded_sum", "outside_where")
#: the functions whose values grow without bound with the logits (the unbounded_sum guard)
UNBOUNDED_FUNCS = (softplus, sp.log, xexpm1inv)

#: fixpoint guard: at most this many passes of one phase over an expression
MAX_PASSES = 40


class RewriteError(Exception):
    """A rule file that does not load or prove, or a rewritten form the prover cannot prove."""


@dataclass(frozen=True)
class Rule:
    name: str
    phase: str
    cost: int
    order: int  # position in phases.toml
    title: str
    pattern: sp.Expr
    replacement: sp.Expr
    domains: dict  # Symbol -> Domain (the side conditions)
    sympy: bool = False  # SymPy performs it on construction: listed, not applied
    template: bool = False  # the templates apply it (the softmax row reduction): listed, not applied
    guard: str | None = None  # one of GUARDS: when a matched rule may fire (see phases.toml)

    @property
    def applied(self) -> bool:
        return not (self.sympy or self.template)


@dataclass
class RuleSet:
    rules: tuple  # every rule of phases.toml, proved, in phase order
    phases: tuple  # (name, what), in order
    report: object  # the verifier's Report of rules.toml (docs render the proofs from it)

    def by_name(self, name):
        return next(r for r in self.rules if r.name == name)


_CACHE = {}


def _read_phases(path=PHASES_FILE):
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover
        import tomli as tomllib
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RewriteError(f"{path}: cannot read it: {exc}") from None
    phases = data.get("phase")
    if not isinstance(phases, list) or not phases:
        raise RewriteError(f"{path}: needs [[phase]] tables")
    out = []
    for i, ph in enumerate(phases):
        if not isinstance(ph, dict) or not isinstance(ph.get("name"), str) or not isinstance(ph.get("rules"), list):
            raise RewriteError(f"{path}: phase #{i + 1} needs name = \"...\" and rules = [...]")
        entries = []
        for e in ph["rules"]:
            if (not isinstance(e, dict) or not isinstance(e.get("rule"), str) or isinstance(e.get("cost"), bool)
                    or not isinstance(e.get("cost"), int) or set(e) - {"rule", "cost", "sympy", "template", "guard"}
                    or e.get("guard") not in GUARDS):
                raise RewriteError(f"{path}: phase {ph['name']!r}: each rule is {{ rule = \"<id>\", cost = <int> }} "
                                   f"(optional sympy / template = true), got {e!r}")
            entries.append(e)
        out.append((ph["name"], ph.get("what", ""), entries))
    return out


def rules(rules_file=RULES_FILE, phases_file=PHASES_FILE) -> RuleSet:
    """The proved rules (verified once per process; RewriteError when a rule is missing or not proved)."""
    key = (str(rules_file), str(phases_file))
    if key in _CACHE:
        return _CACHE[key]
    from derive.language.loader import DerivationFileError, load_file
    from derive.prover.verify import OK, verify_paths

    try:
        df = load_file(rules_file)
    except DerivationFileError as exc:
        raise RewriteError(str(exc)) from None
    # a generous step limit: on a loaded machine a step that proves in 0.5 s must not come back unproved
    # (and so refuse the rule) for lack of time
    report = verify_paths([rules_file], step_timeout=STEP_TIMEOUT)
    if report.errors:
        raise RewriteError("; ".join(m for _, m in report.errors))
    bad = {c.derivation for c in report.checks if c.status != OK or c.verdict.status != "proved"}
    by_id = {d.id: d for d in df.derivations}
    out, seen = [], set()
    phases = _read_phases(phases_file)
    order = 0
    for pname, _what, entries in phases:
        for e in entries:
            name = e["rule"]
            d = by_id.get(name)
            if d is None:
                raise RewriteError(f"{phases_file}: phase {pname!r} names rule {name!r}, which {rules_file} "
                                   "does not derive")
            if name in seen:
                raise RewriteError(f"{phases_file}: rule {name!r} is in two phases")
            seen.add(name)
            if name in bad:
                raise RewriteError(f"{rules_file}: rule {name!r} is not proved (its chain's checks: "
                                   + ", ".join(sorted({c.verdict.status for c in report.checks
                                                       if c.derivation == name})) + "): it must not be used")
            chain = next(c for c in d.chains if c.id == "rule")
            pat, rep = chain.lines[0].expr, chain.lines[-1].expr
            doms = {s: d.context.domains.get(s) or Domain.parse("real") for s in pat.free_symbols}
            built = pat.is_Symbol or pat == rep  # SymPy already built the pattern as its replacement
            if built and not e.get("sympy"):
                raise RewriteError(f"{phases_file}: rule {name!r}: SymPy builds its pattern {pat} as the "
                                   "replacement itself; mark it sympy = true")
            out.append(Rule(name, pname, e["cost"], order, d.title, pat, rep, doms,
                            bool(e.get("sympy")), bool(e.get("template")), e.get("guard")))
            order += 1
    missing = set(by_id) - seen
    if missing:
        raise RewriteError(f"{phases_file}: rules of {rules_file} in no phase: {', '.join(sorted(missing))}")
    rs = RuleSet(tuple(out), tuple((n, w) for n, w, _ in phases), report)
    _CACHE[key] = rs
    return rs


# -- side conditions: a conservative range of the matched expression ---------------------------

_INF = sp.oo


def _range(e, domains):
    """(lo, hi, lo_open, hi_open) enclosing e, or None when unknown (the side condition then fails)."""
    if e.is_Number:
        return (e, e, False, False)
    if e.is_Symbol:
        d = domains.get(e)
        if d is None:
            return None
        if d.values is not None:
            vals = [sp.nsimplify(v) for v in d.values]
            return (min(vals), max(vals), False, False)
        lo = -_INF if d.lo is None else d.lo
        hi = _INF if d.hi is None else d.hi
        return (lo, hi, d.lo_open or d.lo is None, d.hi_open or d.hi is None)
    if isinstance(e, sigmoid):  # of any real argument (the logits times labels are real, if of no known range)
        return (sp.Integer(0), sp.Integer(1), True, True) if _real(e.args[0], domains) else None
    if isinstance(e, (sp.exp, softplus)):
        return (sp.Integer(0), _INF, True, True) if _real(e.args[0], domains) else None
    if isinstance(e, expm1):
        r = _range(e.args[0], domains)
        if r is None:
            return None
        if r[1] <= 0:
            return (sp.Integer(-1), sp.Integer(0), True, r[3] or r[1] < 0)
        return (sp.Integer(-1), _INF, True, True)
    if e.is_Mul and len(e.args) == 2 and e.args[0] == -1:
        r = _range(e.args[1], domains)
        return None if r is None else (-r[1], -r[0], r[3], r[2])
    if e.is_Add:
        rs = [_range(a, domains) for a in e.args]
        if any(r is None for r in rs):
            return None
        return (sum((r[0] for r in rs), sp.Integer(0)), sum((r[1] for r in rs), sp.Integer(0)),
                any(r[2] for r in rs), any(r[3] for r in rs))
    return None


def _values(e, domains, limit=16):
    """The finite set of values e takes (labels t in {0, 1}: 2t - 1 in {-1, 1}), or None."""
    if e.is_Number:
        return {e}
    if e.is_Symbol:
        d = domains.get(e)
        return {sp.nsimplify(v) for v in d.values} if d is not None and d.values is not None else None
    if e.is_Add or e.is_Mul:
        parts = [_values(a, domains, limit) for a in e.args]
        if any(p is None for p in parts):
            return None
        free = [a for a in e.args if not a.is_Number]
        if len({s for a in free for s in a.free_symbols}) != sum(len(a.free_symbols) for a in free):
            return None  # a symbol in two terms: the values are not independent
        out = {sp.Integer(0) if e.is_Add else sp.Integer(1)}
        for p in parts:
            out = {(a + b) if e.is_Add else (a * b) for a in out for b in p}
            if len(out) > limit:
                return None
        return out
    return None


def _real(e, domains) -> bool:
    """Whether e is known real: a known range, or SymPy's assumptions (every symbol real)."""
    return _range(e, domains) is not None or e.is_real is True


def _within(e, dom: Domain, domains) -> bool:
    if dom.values is None and dom.lo is None and dom.hi is None and not dom.integer and not dom.nonzero:
        return e.is_real is not False  # "real": every real expression (the kernels' are real)
    if dom.values is not None or dom.integer or dom.nonzero:
        vals = _values(e, domains)
        return vals is not None and all(dom.contains(float(v)) for v in vals)
    r = _range(e, domains)
    if r is None:
        return False
    lo, hi, lo_open, hi_open = r
    if dom.lo is not None and (lo < dom.lo or (lo == dom.lo and dom.lo_open and not lo_open)):
        return False
    if dom.hi is not None and (hi > dom.hi or (hi == dom.hi and dom.hi_open and not hi_open)):
        return False
    return True


# -- matching -----------------------------------------------------------------------------------

def _wild_pattern(rule, domains):
    wilds = {s: sp.Wild("w_" + s.name, properties=[lambda m, _d=dom: _within(m, _d, domains)])
             for s, dom in rule.domains.items()}
    return rule.pattern.xreplace(wilds), wilds


def _match(node, pattern, wilds):
    """The substitution making pattern equal node, or None; an Add or Mul pattern also matches a sub-sum or
    sub-product of a node of the same kind (returned with the arguments it leaves over)."""
    def ok(m, part):  # SymPy's matcher also returns looser solutions: keep only an exact instance
        # and the same shape: a wild exponent matching 1 must not make a Mul pattern match a bare factor
        return (m is not None and all(w in m for w in wilds.values()) and pattern.xreplace(m) == part
                and (pattern.func is part.func or isinstance(pattern, sp.Wild))
                and (not pattern.is_Add and not pattern.is_Mul or len(pattern.args) == len(part.args))
                # and a sum in the pattern matches a sum: b*(v + w) must not match b*c with v = 0
                and all(sub.xreplace(m).is_Add for sub in sp.preorder_traversal(pattern) if sub.is_Add))

    m = node.match(pattern)
    if ok(m, node):
        return m, None
    if type(node) is type(pattern) and node.func in (sp.Add, sp.Mul) and len(node.args) > len(pattern.args):
        n = len(pattern.args)
        for idx in itertools.combinations(range(len(node.args)), n):
            part = node.func(*[node.args[i] for i in idx])
            m = part.match(pattern)
            if ok(m, part):
                rest = [a for i, a in enumerate(node.args) if i not in idx]
                return m, rest
    return None


def _singular(instance, domains) -> bool:
    """Whether some power of ``instance`` has an exponent that may be negative over the domains."""
    for p in sp.preorder_traversal(instance):
        if p.is_Pow:
            r = _range(p.exp, domains)
            if r is None or r[0] < 0:
                return True
    return False


def _unbounded_sum(instance) -> bool:
    """Whether a sum in ``instance`` (the matched pattern) has a term that grows with the logits."""
    for p in sp.preorder_traversal(instance):
        if p.is_Add and any(a.has(*UNBOUNDED_FUNCS) for a in p.args):
            return True
    return False


def _guard_holds(rule, instance, domains) -> bool:
    if rule.guard == "singular_power":
        return _singular(instance, domains)
    if rule.guard == "unbounded_sum":
        return _unbounded_sum(instance)
    return True


def _calls(e) -> int:
    """The function calls (exp, log, sigmoid, ...) and non-integer powers in e: what evaluating it costs."""
    return sum(1 for p in sp.preorder_traversal(e)
               if isinstance(p, sp.Function) or (p.is_Pow and not p.exp.is_Integer))


def _apply_once(expr, candidates, domains, fired, in_where=False):
    """One bottom-up pass; returns the new expression (fired: rule names appended as they fire).

    At a node, every candidate rule is matched; the one whose replacement costs least fires: the rule's
    cost plus the calls in the matched parts its replacement keeps (log1p(s) for log(1 + s) costs 1 plus
    what s costs, so for s = e^v it ties with softplus(v), and the order in phases.toml decides)."""
    if expr.is_Atom:
        return expr
    inner = in_where or isinstance(expr, sp.Piecewise)
    args = tuple(_apply_once(a, candidates, domains, fired, inner) for a in expr.args)
    node = expr.func(*args) if args != expr.args else expr
    best = None
    for rule in candidates:
        pattern, wilds = _wild_pattern(rule, domains)
        hit = _match(node, pattern, wilds)
        if hit is None:
            continue
        m, rest = hit
        subs = {s: m[wilds[s]] for s in rule.domains}
        if rule.guard == "outside_where":
            if in_where:
                continue
        elif rule.guard and not _guard_holds(rule, rule.pattern.xreplace(subs), domains):
            continue
        new = rule.replacement.xreplace(subs)
        if rest is not None:
            new = node.func(new, *rest)
        if new == node:
            continue
        kept = sum(_calls(v) for s, v in subs.items() if rule.replacement.has(s))
        key = (rule.cost + kept, rule.order)
        if best is None or key < best[0]:
            best = (key, rule, new)
    if best is None:
        return node
    fired.append(best[1].name)
    return best[2]


def rewrite(expr, domains, ruleset: RuleSet | None = None):
    """(rewritten expression, fired rule names in firing order, each once).  ``domains``: Symbol -> Domain of
    the expression's symbols (the kernel's derivation context), for the side conditions."""
    rs = ruleset or rules()
    fired = []
    for pname, _ in rs.phases:
        cands = sorted((r for r in rs.rules if r.phase == pname and r.applied), key=lambda r: (r.cost, r.order))
        if not cands:
            continue
        for _ in range(MAX_PASSES):
            new = _apply_once(expr, cands, domains, fired)
            if new == expr:
                break
            expr = new
        else:
            raise RewriteError(f"phase {pname!r} did not reach a fixpoint in {MAX_PASSES} passes")
    return _negation_out(expr), list(dict.fromkeys(fired))


def _negation_out(expr):
    """A product with a sum whose every term is negative, as the negated product of the negated sum:
    y*(-a - b) -> -y*(a + b).  Not a rule (no value changes, the result is proved with the rest): the kernels
    then negate once per element instead of once per term (the hand-written forms' shape; about 10% of
    the float32 sigmoid focal kernel's time)."""
    def fits(e):
        return e.is_Mul and any(a.is_Add and all(t.could_extract_minus_sign() for t in a.args) for a in e.args)

    def flip(e):
        out, sign = [], 1
        for a in e.args:
            if a.is_Add and all(t.could_extract_minus_sign() for t in a.args):
                a, sign = sp.Add(*[-t for t in a.args]), -sign
            out.append(a)
        return sign * sp.Mul(*out)

    return expr.replace(fits, flip)


def prove_equal(closed, result, ctx, step_timeout=8.0):
    """The prover's verdict on closed = result in the derivation context ``ctx``."""
    from derive.prover.engine import Prover

    return Prover(ctx, step_timeout=step_timeout).check(closed, result)


def to_helpers(expr):
    """The printing form: e^(-g softplus(-v)) (rule sigmoid_power_log_space's replacement) as sigmoid(v)^g,
    which the printers evaluate with the sigmoid_pow helper, the same log-space form (with g*softplus(-v)
    kept as hi + lo)."""
    def is_lsp(e):
        if not isinstance(e, sp.exp):
            return False
        coeff, factors = e.args[0].as_coeff_mul()
        sps = [f for f in factors if isinstance(f, softplus)]
        return coeff.is_negative and len(sps) == 1

    def lower(e):
        coeff, factors = e.args[0].as_coeff_mul()
        spf = next(f for f in factors if isinstance(f, softplus))
        g = -coeff * sp.Mul(*[f for f in factors if f is not spf])
        return sigmoid(-spf.args[0]) ** g

    return expr.replace(is_lsp, lower)


__all__ = ["Rule", "RuleSet", "RewriteError", "GUARDS", "rules", "rewrite", "prove_equal", "to_helpers",
           "RULES_FILE", "PHASES_FILE", "log1p", "xexpm1inv"]
