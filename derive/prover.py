"""The proof engine: decide whether two sides of a step are equal on the stated domains.

For a step ``lhs = rhs`` the engine

1. resolves every ``D(f, v)`` by the chain rule through the definitions (:func:`resolve`);
2. looks for a counterexample at sample points of the domains, evaluated with mpmath at
   high precision (a disagreement is re-checked at twice the precision before it counts);
3. tries symbolic strategies in order, each under a time limit, and names the first that
   shows ``lhs - rhs == 0``:

   * ``algebra``: rational simplification with defined symbols kept as atoms;
   * ``domains (atoms)``: case split over finite label sets and over the sign (+, -, 0) of
     real symbols under ``abs`` or in a ``where`` condition, positivity parametrisation of
     interval symbols (``p -> 1/(1+w)``, ``w > 0``), power/log expansion valid for positive
     bases, then rational simplification; defined symbols stay atoms over their declared
     (and separately proved) domains;
   * ``domains (definitions expanded)``: the same after substituting every definition, with
     ``exp(x) -> t > 0`` so that sigmoid/softplus identities become rational ones;
   * ``simplify``: SymPy's ``simplify`` on each case, as a last resort;

4. if no strategy succeeds, checks many more points: agreement everywhere is reported as
   *numerically confirmed*, weaker evidence than a proof.
"""
from __future__ import annotations

import contextlib
import itertools
import random
import signal
import threading
import time
from dataclasses import dataclass, field

import mpmath
import sympy as sp

from .domains import Domain
from .functions import D, expm1, log1p, rewrite_elementary, sigmoid, softplus, xexpm1inv

PROVED, CONFIRMED, REFUTED, UNPROVED = "proved", "numerically confirmed", "refuted", "unproved"

DEFAULT_SEED = 20261128
SCREEN_POINTS = 12
CONFIRM_POINTS = 60
DPS = 40


class StrategyTimeout(BaseException):
    """Raised by the alarm.  A BaseException, so that SymPy's ``except Exception`` cannot
    swallow it and let a runaway strategy go on."""


_ALARM_ACTIVE = [False]


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise StrategyTimeout in this block after ``seconds``.

    ``None`` means no limit; a limit already spent raises at once.  Only the main thread can
    take signals; elsewhere the block runs unbounded.  Nested blocks run under the outer
    alarm.  The alarm repeats every 0.2 s until the block is left, in case library code
    catches even BaseException once."""
    if seconds is not None and seconds <= 0:
        raise StrategyTimeout()
    if seconds is None or _ALARM_ACTIVE[0] or threading.current_thread() is not threading.main_thread():
        yield
        return
    active = [True]

    def handler(signum, frame):
        if active[0]:
            raise StrategyTimeout()

    old = signal.signal(signal.SIGALRM, handler)
    _ALARM_ACTIVE[0] = True
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.2)
    try:
        yield
    finally:
        active[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        _ALARM_ACTIVE[0] = False


@dataclass
class Verdict:
    status: str
    method: str = ""
    counterexample: dict | None = None
    seconds: float = 0.0
    detail: str = ""
    tried: list = field(default_factory=list)

    def to_json(self):
        return {
            "verdict": self.status,
            "method": self.method,
            "counterexample": self.counterexample,
            "seconds": round(self.seconds, 4),
            "detail": self.detail,
        }


# ------------------------------------------------------------------------------------------
# Derivatives through definitions


class Resolver:
    """Resolves ``D(f, v)`` for one context by the chain rule through its definitions."""

    def __init__(self, ctx):
        self.ctx = ctx
        self._deps: dict = {}
        self._dcache: dict = {}

    def depends(self, sym, v) -> bool:
        """Whether defined symbol ``sym`` depends on ``v`` (not looking inside ``v`` itself)."""
        key = (sym, v)
        if key not in self._deps:
            rhs = self.ctx.definitions.get(sym)
            if rhs is None:
                self._deps[key] = False
            else:
                self._deps[key] = any(s == v or (s in self.ctx.definitions and self.depends(s, v))
                                      for s in rhs.free_symbols)
        return self._deps[key]

    def derivative(self, f, v):
        f = self.resolve(f)
        total = sp.S.Zero
        for s in f.free_symbols:
            if s == v:
                ds = sp.S.One
            elif s in self.ctx.definitions and self.depends(s, v):
                ds = self.symbol_derivative(s, v)
            else:
                continue
            total += sp.diff(f, s) * ds
        return total

    def symbol_derivative(self, s, v):
        key = (s, v)
        if key not in self._dcache:
            self._dcache[key] = self.derivative(self.ctx.definitions[s], v)
        return self._dcache[key]

    def resolve(self, expr):
        if not isinstance(expr, sp.Basic) or not expr.has(D):
            return expr
        return expr.replace(lambda e: isinstance(e, D), lambda e: self.derivative(e.args[0], e.args[1]))


# ------------------------------------------------------------------------------------------
# Numeric evaluation


class _Invalid(Exception):
    """The expression has no real value at this point (log of a negative number, 1/0, ...)."""


def _prepare_numeric(expr):
    """Prepare ``expr`` for evaluation with mpmath by a tree walk (no code generation)."""
    return rewrite_elementary(expr)


def _mp(value):
    if isinstance(value, sp.Rational):
        return mpmath.mpf(int(value.p)) / int(value.q)
    return mpmath.mpf(value)


def _walk(e, env, memo):
    hit = memo.get(e)
    if hit is not None:
        return hit
    if e.is_Symbol:
        if e not in env:
            raise _Invalid(f"no value for {e}")
        val = env[e]
    elif e.is_Rational:
        val = _mp(e)
    elif e.is_Add:
        val = mpmath.fsum(_walk(a, env, memo) for a in e.args)
    elif e.is_Mul:
        val = mpmath.mpf(1)
        for a in e.args:
            val *= _walk(a, env, memo)
    elif e.is_Pow:
        b = _walk(e.base, env, memo)
        if e.exp.is_Integer:
            if b == 0 and e.exp < 0:
                raise _Invalid("division by zero")
            val = b ** int(e.exp)
        else:
            x = _walk(e.exp, env, memo)
            if b < 0:
                raise _Invalid("negative base")
            if b == 0:
                if x < 0:
                    raise _Invalid("0 to a negative power")
                val = mpmath.mpf(1) if x == 0 else mpmath.mpf(0)
            else:
                val = mpmath.power(b, x)
    elif isinstance(e, sp.exp):
        val = mpmath.exp(_walk(e.args[0], env, memo))
    elif isinstance(e, sp.log):
        a = _walk(e.args[0], env, memo)
        if a <= 0:
            raise _Invalid("log of a non-positive number")
        val = mpmath.log(a)
    elif isinstance(e, sp.Abs):
        val = abs(_walk(e.args[0], env, memo))
    elif isinstance(e, sp.Piecewise):
        for value, cond in e.args:
            if cond is sp.true or _truth(cond, env, memo):
                val = _walk(value, env, memo)
                break
        else:
            raise _Invalid("no branch of a piecewise expression applies")
    elif e.is_Number or e.is_NumberSymbol:
        val = mpmath.mpf(sp.N(e, mpmath.mp.dps + 5))
    else:
        raise _Invalid(f"cannot evaluate {type(e).__name__}")
    memo[e] = val
    return val


def _truth(cond, env, memo):
    if cond in (sp.true, True):
        return True
    if cond in (sp.false, False):
        return False
    ops = {sp.Eq: lambda a, b: a == b, sp.Ne: lambda a, b: a != b, sp.StrictLessThan: lambda a, b: a < b,
           sp.LessThan: lambda a, b: a <= b, sp.StrictGreaterThan: lambda a, b: a > b,
           sp.GreaterThan: lambda a, b: a >= b}
    for cls, fn in ops.items():
        if isinstance(cond, cls):
            return fn(_walk(cond.lhs, env, memo), _walk(cond.rhs, env, memo))
    if isinstance(cond, sp.And):
        return all(_truth(c, env, memo) for c in cond.args)
    if isinstance(cond, sp.Or):
        return any(_truth(c, env, memo) for c in cond.args)
    raise _Invalid(f"cannot evaluate condition {cond}")


def _eval(prepared, point):
    env = {s: _mp(v) for s, v in point.items()}
    try:
        val = _walk(prepared, env, {})
    except (_Invalid, ZeroDivisionError, ValueError, OverflowError):
        return None
    if not isinstance(val, mpmath.mpf) or not mpmath.isfinite(val):
        return None
    return val


def _differs(a, b, dps):
    tol = mpmath.mpf(10) ** (-(dps - 12))
    return abs(a - b) > tol * max(1, abs(a), abs(b))


# ------------------------------------------------------------------------------------------
# Symbolic normalisation


def _positive_base(expr):
    try:
        return sp.factor(sp.cancel(sp.together(expr)))
    except (sp.PolynomialError, NotImplementedError, TypeError):
        return expr


def normalise(expr, log_subs=None):
    """Rewrite ``expr`` so that identities valid for positive bases become rational ones."""
    e = rewrite_elementary(expr)
    e = e.replace(lambda a: a.is_Pow and not a.exp.is_Integer, lambda a: sp.Pow(_positive_base(a.base), a.exp))
    e = e.replace(lambda a: isinstance(a, sp.log), lambda a: sp.log(_positive_base(a.args[0])))
    e = sp.expand_power_base(e)
    e = sp.powdenest(e)
    e = sp.expand_power_exp(e)
    e = sp.expand_log(e)
    if log_subs:
        e = e.xreplace(log_subs)
    e = sp.expand_power_exp(e)
    return e


def _is_zero(expr) -> bool:
    if expr == 0:
        return True
    try:
        return sp.cancel(sp.together(expr)) == 0
    except (sp.PolynomialError, NotImplementedError, TypeError, ValueError):
        return False


def _exp_to_rational(expr, real_syms):
    """exp(c*x + ...) -> t_x**c * exp(...) with t_x > 0 for real base symbols x.

    Returns the new expression and {log(t_x): x} to undo logs of t_x afterwards."""
    ts = {x: sp.Dummy("t_" + x.name, positive=True) for x in real_syms}

    def split(arg):
        arg = sp.expand(arg)
        out = sp.S.One
        rest = sp.S.Zero
        for term in sp.Add.make_args(arg):
            coeff, tail = term.as_coeff_Mul()
            if tail in ts and coeff.is_Rational:
                out *= ts[tail] ** coeff
            else:
                rest += term
        return out * sp.exp(rest) if rest != 0 else out

    e = expr.replace(lambda a: isinstance(a, sp.exp), lambda a: split(a.args[0]))
    used = {x: t for x, t in ts.items() if e.has(t)}
    e = e.xreplace({x: sp.log(t) for x, t in used.items()})
    return e, {sp.log(t): sp.log(t) for t in used.values()}


# ------------------------------------------------------------------------------------------


#: key (for --strategies) -> name shown in reports, in the order they are tried
STRATEGIES = {
    "algebra": "algebra (defined symbols as atoms)",
    "domains": "domains: case split + positivity substitution + power/log expansion",
    "expanded": "definitions expanded + exp(x)->t>0 + case split + power/log expansion",
    "simplify": "definitions expanded + case split + simplify",
}


class Prover:
    """Checks steps for one derivation context."""

    def __init__(self, ctx, seed: int = DEFAULT_SEED, step_timeout: float = 4.0, deadline: float | None = None,
                 instances=None, instance_symbols=None, strategies=None):
        self.ctx = ctx
        self.strategies = strategies  # None: all; else a collection of keys of STRATEGIES
        self.seed = seed
        self.step_timeout = step_timeout
        self.deadline = deadline
        self.resolver = Resolver(ctx)
        self.instances = instances or {}
        self.instance_symbols = instance_symbols or {}
        self._points = None
        self.proved_domains: set = set()  # defined symbols whose declared domain is proved

    # -- domains of the base symbols -------------------------------------------------------
    def base_domain(self, s) -> Domain:
        return self.ctx.domains.get(s) or Domain.parse("real")

    def points(self, count):
        """Sample points over the base symbols (fixed seed: the report names it)."""
        if self._points is None or len(self._points) < count:
            rng = random.Random(self.seed)
            bases = sorted(self.ctx.base_symbols, key=lambda s: s.name)
            samples = {s: self.base_domain(s).samples(rng, count) for s in bases}
            finite = [s for s in bases if self.base_domain(s).is_finite]
            combos = list(itertools.product(*[self.base_domain(s).values for s in finite])) or [()]
            pts = []
            for k in range(count):
                pt = {}
                for j, s in enumerate(bases):
                    if s in finite:
                        continue
                    vals = samples[s]
                    # decorrelate simple values across symbols while keeping them simple
                    pt[s] = vals[(k + 3 * j) % len(vals)] if k < len(vals) else vals[k]
                for s, v in zip(finite, combos[k % len(combos)]):
                    pt[s] = v
                pts.append(pt)
            self._points = pts
        return self._points[:count]

    def instance_points(self, name, count):
        rng = random.Random(f"{self.seed}:{name}")
        values = self.instances[name]
        extra = self.instance_symbols.get(name, {})
        out = []
        for pt in self.points(count):
            q = dict(pt)
            for s, dom in extra.items():
                q[s] = dom.samples(rng, 8)[rng.randrange(8)]
            out.append(q)
        return out

    # -- numeric -----------------------------------------------------------------------------
    def numeric_compare(self, lhs_full, rhs_full, points, dps=DPS):
        """Return (agreements, counterexample or None, points skipped)."""
        with mpmath.workdps(dps):
            pl, pr = _prepare_numeric(lhs_full), _prepare_numeric(rhs_full)
            agree, skipped = 0, 0
            for pt in points:
                a, b = _eval(pl, pt), _eval(pr, pt)
                if a is None or b is None:
                    skipped += 1
                    continue
                if _differs(a, b, dps):
                    with mpmath.workdps(2 * dps):  # a disagreement must survive more digits
                        a2, b2 = _eval(pl, pt), _eval(pr, pt)
                        if a2 is not None and b2 is not None and _differs(a2, b2, 2 * dps):
                            used = lhs_full.free_symbols | rhs_full.free_symbols
                            return agree, {
                                "point": {s.name: str(v) for s, v in sorted(pt.items(), key=lambda kv: kv[0].name)
                                          if s in used},
                                "lhs": mpmath.nstr(a2, 12),
                                "rhs": mpmath.nstr(b2, 12),
                            }, skipped
                agree += 1
            return agree, None, skipped

    # -- symbolic ----------------------------------------------------------------------------
    def _case_values(self, syms, expr=None):
        """Every combination of the finite label values, times the sign cases of ``expr``:
        each real symbol inside an ``abs`` or a ``where`` condition is taken as +s', -s'
        (s' > 0) and 0, which covers the reals, so that abs and where resolve in each case."""
        finite = sorted((s for s in syms if s in self.ctx.domains and self.ctx.domains[s].is_finite),
                        key=lambda s: s.name)
        cases = [dict(zip(finite, vals)) for vals in itertools.product(*[self.ctx.domains[s].values for s in finite])]
        signed = self._sign_symbols(expr) if expr is not None else []
        if not signed:
            return cases
        signs = []
        for s in signed:
            pos = sp.Symbol(f"{s.name}__pos", positive=True)
            signs.append((pos, -pos, sp.S.Zero))
        return [{**case, **dict(zip(signed, vals))} for case in cases for vals in itertools.product(*signs)]

    def _sign_symbols(self, expr, limit=3):
        """Real symbols of unbounded domain under abs or in a where condition (at most ``limit``)."""
        found = set()
        for node in sp.preorder_traversal(expr):
            if isinstance(node, sp.Abs):
                found |= node.args[0].free_symbols
            elif isinstance(node, sp.Piecewise):
                for _, cond in node.args:
                    if not isinstance(cond, bool):
                        found |= getattr(cond, "free_symbols", set())
        out = []
        for s in sorted(found, key=lambda s: s.name):
            dom = self.ctx.domains.get(s)
            if s.is_real and (dom is None or (not dom.is_finite and dom.lo is None and dom.hi is None)):
                out.append(s)
        return out if len(out) <= limit else []

    def _param_subs(self, syms, atoms_ok=True):
        subs = {}
        for s in syms:
            dom = self.ctx.domains.get(s)
            if dom is None or dom.is_finite:
                continue
            if s in self.ctx.definitions and (not atoms_ok or s not in self.proved_domains):
                continue
            if dom.lo is None and dom.hi is None:
                continue
            expr, _ = dom.parametrise(s.name)
            subs[s] = expr
        return subs

    def _strategies(self, d_atoms, d_full):
        def algebra():
            return _is_zero(sp.expand(d_atoms)) or _is_zero(d_atoms)

        def atoms():
            syms = d_atoms.free_symbols
            for case in self._case_values(syms, d_atoms):
                e = d_atoms.xreplace(case)
                e = e.xreplace(self._param_subs(e.free_symbols))
                if not _is_zero(normalise(e)):
                    return False
            return True

        def expanded():
            syms = d_full.free_symbols
            for case in self._case_values(syms, d_full):
                e = d_full.xreplace(case)
                e = rewrite_elementary(e)
                e = e.xreplace(self._param_subs(e.free_symbols, atoms_ok=False))
                reals = [s for s in e.free_symbols if isinstance(s, sp.Symbol) and not isinstance(s, sp.Dummy)
                         and s.is_real]
                e, log_subs = _exp_to_rational(e, reals)
                if not _is_zero(normalise(e, log_subs)):
                    return False
            return True

        def simplified():
            for case in self._case_values(d_full.free_symbols, d_full):
                e = rewrite_elementary(d_full.xreplace(case))
                e = e.xreplace(self._param_subs(e.free_symbols, atoms_ok=False))
                if sp.simplify(e) != 0:
                    return False
            return True

        fns = {"algebra": algebra, "domains": atoms, "expanded": expanded, "simplify": simplified}
        return [(STRATEGIES[k], fns[k]) for k in STRATEGIES if self.strategies is None or k in self.strategies]

    def _limit(self, floor: float = 0.0):
        lim = max(self.step_timeout, floor)
        if self.deadline is not None:
            lim = min(lim, self.deadline - time.monotonic())
        return lim

    def check(self, lhs, rhs) -> Verdict:
        """Decide lhs == rhs on the context's domains."""
        t0 = time.monotonic()
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return Verdict(UNPROVED, "time limit", seconds=0.0, detail="the run's --timeout was reached")
        try:
            with time_limit(self._limit(floor=2.0)):
                L, R = self.resolver.resolve(lhs), self.resolver.resolve(rhs)
                Lf, Rf = self.ctx.expand(L), self.ctx.expand(R)
        except StrategyTimeout:
            return Verdict(UNPROVED, "time limit", seconds=time.monotonic() - t0,
                           detail="resolving derivatives ran past the time limit")
        except (RecursionError, MemoryError):
            return Verdict(UNPROVED, "too large", seconds=time.monotonic() - t0,
                           detail="the expression is too large to differentiate")
        except Exception as exc:  # a SymPy failure on odd input must not crash the run
            return Verdict(UNPROVED, "cannot differentiate", seconds=time.monotonic() - t0,
                           detail=f"{type(exc).__name__}: {exc}"[:200])
        # 1. counterexample search
        try:
            with time_limit(self._limit(floor=2.0)):
                _, cex, _ = self.numeric_compare(Lf, Rf, self.points(SCREEN_POINTS))
        except StrategyTimeout:
            cex = None
        except (RecursionError, MemoryError):
            cex = None
        if cex is not None:
            return Verdict(REFUTED, f"counterexample (mpmath, {DPS} and {2 * DPS} digits)", cex,
                           time.monotonic() - t0)
        # 2. symbolic strategies
        tried = []
        for name, fn in self._strategies(L - R, Lf - Rf):
            lim = self._limit()
            if lim <= 0:
                tried.append(f"{name}: time limit")
                break
            try:
                with time_limit(lim):
                    ok = fn()
            except StrategyTimeout:
                tried.append(f"{name}: time limit")
                continue
            except (RecursionError, MemoryError):
                tried.append(f"{name}: too large")
                continue
            except Exception as exc:  # SymPy raises many kinds; a failed strategy is not a crash
                tried.append(f"{name}: {type(exc).__name__}")
                continue
            if ok:
                return Verdict(PROVED, name, seconds=time.monotonic() - t0, tried=tried)
            tried.append(f"{name}: no")
        # 3. numeric confirmation (weaker evidence)
        return self._confirm(Lf, Rf, t0, tried)

    def _confirm(self, Lf, Rf, t0, tried):
        try:
            with time_limit(self._limit(floor=2.0)):
                agree, cex, skipped = self.numeric_compare(Lf, Rf, self.points(CONFIRM_POINTS))
                notes = [f"{agree} points"]
                for name in sorted(self.instances):
                    a2, cex2, _ = self.numeric_compare(
                        Lf.xreplace(self.instances[name]), Rf.xreplace(self.instances[name]),
                        self.instance_points(name, 20))
                    cex = cex or cex2
                    notes.append(f"{name}: {a2} points")
        except StrategyTimeout:
            return Verdict(UNPROVED, "time limit", seconds=time.monotonic() - t0, tried=tried,
                           detail="; ".join(tried))
        if cex is not None:
            return Verdict(REFUTED, f"counterexample (mpmath, {DPS} and {2 * DPS} digits)", cex,
                           time.monotonic() - t0, tried=tried)
        if any(t.endswith("time limit") for t in tried):
            return Verdict(UNPROVED, "time limit", seconds=time.monotonic() - t0, tried=tried,
                           detail="symbolic strategies ran out of time; numerically "
                                  + ", ".join(notes) + " agree")
        if agree == 0:
            return Verdict(UNPROVED, "no valid sample point", seconds=time.monotonic() - t0, tried=tried,
                           detail="; ".join(tried))
        return Verdict(CONFIRMED, f"mpmath at {DPS} digits, seed {self.seed}: " + ", ".join(notes),
                       seconds=time.monotonic() - t0, tried=tried, detail="; ".join(tried))

    # -- domains of definitions ------------------------------------------------------------
    def check_domain(self, sym) -> Verdict:
        """Prove that a definition takes values in its declared domain."""
        t0 = time.monotonic()
        try:
            return self._check_domain(sym, t0)
        except StrategyTimeout:
            return Verdict(UNPROVED, "time limit", seconds=time.monotonic() - t0)

    def _outside(self, expr, dom, v, pt, t0):
        return Verdict(REFUTED, "value outside the declared domain", {
            "point": {s.name: str(pt[s]) for s in sorted(expr.free_symbols, key=lambda s: s.name)},
            "lhs": mpmath.nstr(v, 12), "rhs": dom.pretty()}, time.monotonic() - t0)

    def _check_domain(self, sym, t0) -> Verdict:
        dom = self.ctx.domains[sym]
        expr = self.ctx.expand(self.ctx.definitions[sym])
        # numeric first: a value outside the domain refutes the declaration
        with time_limit(self._limit(floor=2.0)), mpmath.workdps(DPS):
            prep = _prepare_numeric(expr)
            for pt in self.points(SCREEN_POINTS):
                v = _eval(prep, pt)
                if v is not None and not dom.contains(v):
                    return self._outside(expr, dom, v, pt, t0)
        if dom.is_finite:
            return Verdict(UNPROVED, "finite domains of definitions are not proved", seconds=time.monotonic() - t0)
        conds = []
        if dom.lo is not None:
            conds.append((expr - dom.lo, dom.lo_open))
        if dom.hi is not None:
            conds.append((dom.hi - expr, dom.hi_open))
        proved = True
        try:
            with time_limit(self._limit()):
                for case in self._case_values(expr.free_symbols):
                    for c, strict in conds:
                        e = rewrite_elementary(c.xreplace(case))
                        e = e.xreplace(self._param_subs(e.free_symbols, atoms_ok=False))
                        reals = [s for s in e.free_symbols if not isinstance(s, sp.Dummy) and s.is_real]
                        e, _ = _exp_to_rational(e, reals)
                        # w > 0 (or >= 0) inside exp: e^w = 1 + v with v > 0 (>= 0) makes the sign visible
                        e = e.xreplace({w: sp.log(1 + sp.Dummy(w.name, positive=w.is_positive,
                                                                nonnegative=True))
                                        for w in e.free_symbols if isinstance(w, sp.Dummy) and w.is_nonnegative
                                        and any(w in a.free_symbols for a in e.atoms(sp.exp))})
                        e = sp.factor(sp.cancel(sp.together(e)))
                        if not (e.is_positive if strict else e.is_nonnegative):
                            proved = False
        except StrategyTimeout:
            proved = False
        except Exception:  # SymPy failure: fall back to numeric evidence
            proved = False
        if not proved:
            return self._domain_confirm(sym, expr, dom, t0)
        self.proved_domains.add(sym)
        return Verdict(PROVED, "case split + exp(x)->t>0 + sign of factored form", seconds=time.monotonic() - t0)

    def _domain_confirm(self, sym, expr, dom, t0):
        try:
            return self._domain_confirm_points(sym, expr, dom, t0)
        except StrategyTimeout:
            return Verdict(UNPROVED, "time limit", seconds=time.monotonic() - t0)

    def _domain_confirm_points(self, sym, expr, dom, t0):
        with time_limit(self._limit(floor=2.0)), mpmath.workdps(DPS):
            prep = _prepare_numeric(expr)
            n = 0
            for pt in self.points(CONFIRM_POINTS):
                v = _eval(prep, pt)
                if v is not None:
                    if not dom.contains(v):
                        return self._outside(expr, dom, v, pt, t0)
                    n += 1
        return Verdict(CONFIRMED, f"{n} sample points inside the domain", seconds=time.monotonic() - t0)
