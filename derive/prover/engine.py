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

import _signal
import contextlib
import itertools
import math
import random
import threading
import time
from dataclasses import dataclass, field

import mpmath
import sympy as sp

from derive.language.domains import Domain
from derive.language.functions import D, expm1, log1p, rewrite_elementary, sigmoid, softplus, xexpm1inv

PROVED, CONFIRMED, REFUTED, UNPROVED = "proved", "numerically confirmed", "refuted", "unproved"

DEFAULT_SEED = 20261128
SCREEN_POINTS = 12
CONFIRM_POINTS = 60
DPS = 40


class StrategyTimeout(BaseException):
    """Raised by the timer.  A BaseException, so that SymPy's ``except Exception`` cannot
    swallow it and let a runaway strategy go on."""


class WallClockTimeout(StrategyTimeout):
    """Raised by the wall-clock backstop (or the run's --timeout), not by the CPU-time limit."""


_ALARM_ACTIVE = [False]

#: limits above this (seconds) are no limit: setitimer cannot take inf or huge values
MAX_TIMER = 1e6
#: the smallest timer armed; a smaller positive limit is rounded up to it (it still expires)
MIN_TIMER = 1e-3
#: the wall-clock backstop of a CPU-time limit of L seconds: WALL_FACTOR * L + WALL_SLACK seconds.
#: Far above L, so that only a block stuck off the CPU (or a machine many times oversubscribed)
#: meets it: on a busy machine a block gets less CPU per wall-clock second, not more work to do.
WALL_FACTOR = 10.0
WALL_SLACK = 30.0


class Budget(float):
    """A CPU-time limit in seconds that also carries the run's wall-clock deadline (a
    time.monotonic() value, or None): the block's wall-clock backstop never runs past it."""

    deadline = None

    def __new__(cls, seconds, deadline=None):
        obj = super().__new__(cls, seconds)
        obj.deadline = deadline
        return obj


def wall_backstop(seconds: float) -> float:
    """The wall-clock backstop of a CPU-time limit (see WALL_FACTOR)."""
    return WALL_FACTOR * seconds + WALL_SLACK


def _foreign_callback(frame) -> bool:
    """Whether the interrupted frame is third-party code other than SymPy/mpmath (the strategies run
    SymPy, mpmath and derive; anything else running is a callback: gc, weakref finalisers)."""
    name = getattr(getattr(frame, "f_code", None), "co_filename", "") or ""
    third_party = "site-packages" in name or "dist-packages" in name
    return third_party and "/sympy/" not in name and "/mpmath/" not in name


#: handlers a block could not put back (a MemoryError in its ``finally``), put back by the next block
_PENDING_RESTORE: list = []


def _disarm(old_prof, old_alrm):
    """Stop both timers, then put the previous handlers back (with the C-level calls: the
    ``signal`` module's wrappers build enums, which allocates).  Called with the handlers already
    inert.  A block stopped at the memory cap ends with its frames still holding the memory while
    the MemoryError unwinds: should a call fail then, the inert handlers stay installed and the
    next block puts the previous ones back (_settle), once the memory is free again."""
    try:
        _signal.setitimer(_signal.ITIMER_PROF, 0)
        _signal.setitimer(_signal.ITIMER_REAL, 0)
        _signal.signal(_signal.SIGPROF, old_prof)
        _signal.signal(_signal.SIGALRM, old_alrm)
    except MemoryError:
        _PENDING_RESTORE[:] = [(old_prof, old_alrm)]


def _settle():
    """Finish the disarm of a block that ended in a MemoryError (see _disarm)."""
    if _PENDING_RESTORE:
        old_prof, old_alrm = _PENDING_RESTORE.pop()
        _signal.setitimer(_signal.ITIMER_PROF, 0)
        _signal.setitimer(_signal.ITIMER_REAL, 0)
        _signal.signal(_signal.SIGPROF, old_prof)
        _signal.signal(_signal.SIGALRM, old_alrm)


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise StrategyTimeout in this block once it has used ``seconds`` of CPU time.

    The limit is process CPU time (ITIMER_PROF: user and system time of this process), not
    wall-clock time, so that a busy machine, which gives the block fewer CPU seconds per
    wall-clock second, does not change where it stops: the verdicts do not depend on the load.
    A wall-clock backstop (wall_backstop(seconds), SIGALRM) stops a block that makes no progress
    on the CPU; a Budget's deadline (``derive verify --timeout``) bounds the backstop too, and
    then raises WallClockTimeout.

    ``None``, inf, NaN and limits beyond MAX_TIMER mean no limit; a limit already spent
    raises at once.  Only the main thread can take signals; elsewhere the block runs
    unbounded.  Nested blocks run under the outer timers.  The timers repeat every 0.2 s
    until the block is left, in case library code catches even BaseException once.

    The timers are armed inside the ``try`` and always disarmed in the ``finally``, which a
    signal arriving while it runs cannot cut short: no timer outlives the block."""
    deadline = getattr(seconds, "deadline", None)
    if seconds is not None:
        try:
            seconds = float(seconds)
        except (TypeError, ValueError):
            seconds = None
    if seconds is not None and (math.isnan(seconds) or seconds > MAX_TIMER):
        seconds = None
    if seconds is not None and seconds <= 0:
        raise WallClockTimeout() if deadline is not None and time.monotonic() >= deadline else StrategyTimeout()
    if seconds is None or _ALARM_ACTIVE[0] or threading.current_thread() is not threading.main_thread():
        yield
        return
    wall = wall_backstop(seconds)
    if deadline is not None:
        wall = min(wall, deadline - time.monotonic())
        if wall <= 0:
            raise WallClockTimeout()
    active = [True]

    def on_cpu(signum, frame):
        # a signal that lands in another library's gc or weakref callback (torch, jax, hypothesis)
        # would be swallowed there as an unraisable exception: let the repeating timer fire again
        if active[0] and not _foreign_callback(frame):
            raise StrategyTimeout()

    def on_wall(signum, frame):
        if active[0] and not _foreign_callback(frame):
            raise WallClockTimeout()

    _settle()
    old_prof = _signal.signal(_signal.SIGPROF, on_cpu)
    try:
        old_alrm = _signal.signal(_signal.SIGALRM, on_wall)
    except BaseException:
        _signal.signal(_signal.SIGPROF, old_prof)
        raise
    _ALARM_ACTIVE[0] = True
    try:
        _signal.setitimer(_signal.ITIMER_PROF, max(seconds, MIN_TIMER), 0.2)
        _signal.setitimer(_signal.ITIMER_REAL, max(wall, MIN_TIMER), 0.2)
        yield
    finally:
        # first make the handlers inert (no allocation: a block may end at the memory cap), so that
        # neither a late signal nor a failed disarm can leave later blocks without limits
        active[0] = False
        _ALARM_ACTIVE[0] = False
        _disarm(old_prof, old_alrm)


@dataclass
class Verdict:
    status: str
    method: str = ""
    counterexample: dict | None = None
    seconds: float = 0.0
    detail: str = ""
    tried: list = field(default_factory=list)
    strategy: str = ""  # the key (in STRATEGIES) of the strategy that proved the step, when one did

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
        if total.has(sp.DiracDelta, sp.Heaviside):
            # d sign(v)/dv = 0 wherever it exists; SymPy writes 2*DiracDelta(v)
            total = total.replace(lambda e: isinstance(e, sp.DiracDelta), lambda e: sp.S.Zero)
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
    """The expression certainly has no real value at this point (log of a negative number,
    1/0, ...)."""


class _DomainError(_Invalid):
    """The value is undefined by the rules of real arithmetic at this point (log of a
    non-positive number, division by zero, 0 to a negative power, a non-integer power of a
    negative number): a step whose other side has a real value here is refuted."""


class _Undecided(Exception):
    """The interval enclosure at this precision is too wide to decide a branch, a sign or a
    base (a where() condition at its threshold, log of an enclosure around 0, ...)."""


#: agreement at a point means |lhs - rhs| below 10^-AGREE_DIGITS times the smallest nonzero
#: magnitude met while evaluating either side (so a constant -1 beside e^300 counts)
AGREE_DIGITS = 20
#: precision (decimal digits) beyond which a point is dropped as undecidable
MAX_DPS = 800
_LOG10_2 = 0.30102999566398120


def _prepare_numeric(expr):
    """Prepare ``expr`` for evaluation with mpmath by a tree walk (no code generation).
    xexpm1inv stays: it is 1 at u = 0, where its rewrite u/(e^u - 1) is 0/0."""
    keep = {}

    def hold(u):
        d = sp.Dummy("xexpm1inv")
        keep[d] = xexpm1inv(u)
        return d

    e = expr.replace(xexpm1inv, hold) if expr.has(xexpm1inv) else expr
    e = rewrite_elementary(e)
    if keep:
        e = e.xreplace({d: xexpm1inv(_prepare_numeric(f.args[0])) for d, f in keep.items()})
    return e


_IV = mpmath.iv


def _ends(v):
    lo, hi = v._mpi_
    return mpmath.mp.make_mpf(lo), mpmath.mp.make_mpf(hi)


_IV_CACHE: dict = {}


def _iv_rational(value):
    """Enclosure of a rational at the current interval precision (cached)."""
    key = (value, _IV.prec)
    hit = _IV_CACHE.get(key)
    if hit is None:
        p, q = int(value.p), int(value.q)
        hit = _IV.mpf(p) if q == 1 else _IV.mpf(p) / q
        if len(_IV_CACHE) > 100_000:
            _IV_CACHE.clear()
        _IV_CACHE[key] = hit
    return hit


class _Eval:
    """Rigorous evaluation with mpmath interval arithmetic at one precision.

    Every value is an enclosure [lo, hi] of the exact real value, so two sides whose
    enclosures are disjoint certainly differ, however large the cancellation or the
    magnitudes.  The walk records the largest and the smallest nonzero magnitude (as binary
    exponents) it met, from which the precision needed to resolve a difference follows."""

    def __init__(self, env, exact=None):
        self.env = env
        self.exact = exact  # the point as SymPy rationals, for conditions at a threshold
        self.taken = set()  # (piecewise node, branch index) taken at this point
        self.memo = {}
        self.max_mag = None
        self.min_mag = None

    def _note(self, val):
        (ls, lm, le, lb), (hs, hm, he, hb) = val._mpi_  # raw (sign, man, exp, bc) endpoints
        if (not lm and (le or lb)) or (not hm and (he or hb)):
            raise _Undecided("an enclosure is unbounded")
        m = max(le + lb if lm else -10**9, he + hb if hm else -10**9)
        if m > -10**9 and (self.max_mag is None or m > self.max_mag):
            self.max_mag = m
        if lm and hm and ls == hs:  # 0 is not in the enclosure
            n = min(le + lb, he + hb) - 1
            if self.min_mag is None or n < self.min_mag:
                self.min_mag = n

    def walk(self, e):
        hit = self.memo.get(e)
        if hit is not None:
            return hit
        val = self._walk(e)
        self._note(val)
        self.memo[e] = val
        return val

    def _walk(self, e):
        w = self.walk
        if e.is_Symbol:
            if e not in self.env:
                raise _Invalid(f"no value for {e}")
            return self.env[e]
        if e.is_Rational:
            return _iv_rational(e)
        if e in (sp.nan, sp.zoo, sp.oo, sp.S.NegativeInfinity) or e.is_Number and not e.is_finite:
            raise _Invalid("not a finite number")
        if e.is_Add:
            val = _IV.mpf(0)
            for a in e.args:
                val = val + w(a)
            return val
        if e.is_Mul:
            val = _IV.mpf(1)
            for a in e.args:
                val = val * w(a)
            return val
        if e.is_Pow:
            return self._pow(e)
        if isinstance(e, sp.exp):
            return _IV.exp(w(e.args[0]))
        if isinstance(e, sp.log):
            a = w(e.args[0])
            lo, hi = _ends(a)
            if hi <= 0:
                raise _DomainError("log of 0" if lo == hi == 0 else "log of a negative number" if hi < 0
                                   else "log of a non-positive number")
            if lo <= 0:
                raise _Undecided("log of an enclosure of 0")
            return _IV.log(a)
        if isinstance(e, sp.Abs):
            return abs(w(e.args[0]))
        if isinstance(e, sp.sign):
            lo, hi = _ends(w(e.args[0]))
            if lo > 0:
                return _IV.mpf(1)
            if hi < 0:
                return _IV.mpf(-1)
            if lo == hi == 0:
                return _IV.mpf(0)
            raise _Undecided("sign of an enclosure of 0")
        if isinstance(e, (sp.tanh, sp.sinh, sp.cosh)):
            a = w(e.args[0])
            if isinstance(e, sp.tanh):
                lo, hi = _ends(a)
                if lo == hi == 0:
                    return _IV.mpf(0)
                # 1 - 2/(e^(2a) + 1): one occurrence of a, so the enclosure stays tight
                if lo >= 0:
                    return 1 - 2 / (_IV.exp(2 * a) + 1)
                return -(1 - 2 / (_IV.exp(-2 * a) + 1))
            ea, eb = _IV.exp(a), _IV.exp(-a)
            return (ea - eb) / 2 if isinstance(e, sp.sinh) else (ea + eb) / 2
        if isinstance(e, xexpm1inv):
            a = w(e.args[0])
            lo, hi = _ends(a)
            if lo == hi == 0:
                return _IV.mpf(1)
            if lo <= 0 <= hi:
                raise _Undecided("xexpm1inv of an enclosure of 0")
            return a / (_IV.exp(a) - 1)
        if isinstance(e, sp.Piecewise):
            for i, (value, cond) in enumerate(e.args):
                t = self.truth(cond)
                if t is None:
                    raise _Undecided("a where() condition is at its threshold")
                if t:
                    self.taken.add((e, i))
                    return w(value)
            raise _Invalid("no branch of a piecewise expression applies")
        if e is sp.pi:
            return _IV.pi
        if e is sp.E:
            return _IV.e
        if e.is_Float:
            return _IV.mpf(mpmath.mp.make_mpf(e._mpf_))
        if e.is_Number or e.is_NumberSymbol:
            v = mpmath.mpf(sp.N(e, _IV.dps + 20)._mpf_)
            if not mpmath.isfinite(v):
                raise _Invalid("not a finite number")
            eps = abs(v) * mpmath.mpf(2) ** (-_IV.prec - 20) + mpmath.mpf(2) ** (-_IV.prec * 4)
            return _IV.mpf([v - eps, v + eps])
        raise _Invalid(f"cannot evaluate {type(e).__name__}")

    def _pow(self, e):
        b = self.walk(e.base)
        lo, hi = _ends(b)
        if e.exp.is_Integer:
            return self._int_pow(b, lo, hi, int(e.exp))
        x = self.walk(e.exp)
        xl, xh = _ends(x)
        if xl == xh and mpmath.isint(xl) and (hi <= 0 or lo <= 0):
            # an exponent that is an integer at this point ((-1)^(2g) at g = 1)
            return self._int_pow(b, lo, hi, int(xl))
        if hi < 0:
            if mpmath.floor(xl) != mpmath.floor(xh) or mpmath.isint(xl) or mpmath.isint(xh):
                raise _Undecided("a negative number to an exponent that may be an integer")
            raise _DomainError("a non-integer power of a negative number")
        if lo == 0 and hi == 0:
            if xl > 0:
                return _IV.mpf(0)
            if xh < 0:
                raise _DomainError("0 to a negative power")
            if xl == 0 and xh == 0:
                return _IV.mpf(1)
            raise _Undecided("0 to a power of unknown sign")
        if lo <= 0:
            raise _Undecided("a power of an enclosure of 0")
        return _IV.exp(x * _IV.log(b))

    def _int_pow(self, b, lo, hi, n):
        if True:
            if lo == 0 and hi == 0:
                if n < 0:
                    raise _DomainError("division by zero")
                return _IV.mpf(1) if n == 0 else _IV.mpf(0)
            if n < 0 and lo <= 0 <= hi:
                raise _Undecided("division by an enclosure of 0")
            if abs(n) <= 64:
                return b ** n
            if lo > 0:
                return _IV.exp(n * _IV.log(b))
            if hi < 0:
                r = _IV.exp(n * _IV.log(-b))
                return r if n % 2 == 0 else -r
            raise _Undecided("a large power of an enclosure of 0")

    def truth(self, cond):
        """True, False, or None when the enclosures do not decide the condition."""
        if cond in (sp.true, True):
            return True
        if cond in (sp.false, False):
            return False
        if isinstance(cond, sp.And):
            ts = [self.truth(c) for c in cond.args]
            return False if False in ts else (None if None in ts else True)
        if isinstance(cond, sp.Or):
            ts = [self.truth(c) for c in cond.args]
            return True if True in ts else (None if None in ts else False)
        if isinstance(cond, sp.Not):
            t = self.truth(cond.args[0])
            return None if t is None else not t
        if isinstance(cond, sp.core.relational.Relational):
            t = self._interval_truth(cond)
            if t is None and self.exact is not None:
                # at its threshold (x == 1/7 at x = 1/7): decide exactly when both sides are
                # rational at the point
                try:
                    d = (cond.lhs - cond.rhs).xreplace(self.exact)
                except Exception:
                    d = None
                if d is not None and d.is_Rational:
                    return bool(cond.func(d, 0))
            return t
        raise _Invalid(f"cannot evaluate condition {cond}")

    def _interval_truth(self, cond):
        al, ah = _ends(self.walk(cond.lhs))
        bl, bh = _ends(self.walk(cond.rhs))
        if isinstance(cond, (sp.Eq, sp.Ne)):
            eq = True if (al == ah == bl == bh) else (False if ah < bl or bh < al else None)
            return eq if eq is None or isinstance(cond, sp.Eq) else not eq
        if isinstance(cond, (sp.StrictGreaterThan, sp.GreaterThan)):
            al, ah, bl, bh = bl, bh, al, ah  # a > b is b < a
        strict = isinstance(cond, (sp.StrictLessThan, sp.StrictGreaterThan))
        if (ah < bl) if strict else (ah <= bl):
            return True
        if (al >= bh) if strict else (al > bh):
            return False
        return None


def _ieval(prepared, point, dps):
    """(enclosure, evaluator) of ``prepared`` at ``point`` with ``dps`` digits; raises
    _Invalid (certainly no real value) or _Undecided."""
    old = _IV.prec
    try:
        _IV.dps = dps
        exact = {s: sp.Rational(v) for s, v in point.items()}
        ev = _Eval({s: _iv_rational(v) for s, v in exact.items()}, exact)
        try:
            val = ev.walk(prepared)
        except (ZeroDivisionError, ValueError, OverflowError, TypeError, ArithmeticError) as exc:
            raise _Undecided(f"{type(exc).__name__} in the evaluator") from None
        return val, ev
    finally:
        _IV.prec = old


def _mid(v):
    lo, hi = _ends(v)
    return (lo + hi) / 2


def _show_pair(a, b, dps):
    """Both values printed with 12 digits, or with the fewest digits (plus two) that make
    the texts differ: a counterexample never shows two equal numbers."""
    with mpmath.workdps(dps + 10):
        x, y = _mid(a), _mid(b)

        def texts(n):
            return mpmath.nstr(x, n), mpmath.nstr(y, n)

        if texts(12)[0] != texts(12)[1]:
            return texts(12)
        lo, hi = 12, 24
        while texts(hi)[0] == texts(hi)[1] and hi < dps + 10:
            lo, hi = hi, min(dps + 10, 2 * hi)
        while hi - lo > 1:  # fewest digits that differ
            mid = (lo + hi) // 2
            if texts(mid)[0] != texts(mid)[1]:
                hi = mid
            else:
                lo = mid
        return texts(hi + 2)


@dataclass
class PointResult:
    kind: str  # "agree", "differ", "invalid", "undecided", "domain" (one side undefined, the other real)
    reason: str = ""
    side: str = ""  # "domain": the undefined side, "left" or "right"
    lhs: object = None
    rhs: object = None
    dps: int = DPS
    taken: frozenset = frozenset()  # where() branches taken at the point


def _tight(v, dps):
    """Whether an enclosure is known to AGREE_DIGITS significant digits."""
    lo, hi = _ends(v)
    if lo == hi:
        return True
    if lo <= 0 <= hi:
        return False
    return (hi - lo) <= min(abs(lo), abs(hi)) * mpmath.mpf(10) ** (-AGREE_DIGITS)


def _span_digits(*evs):
    mx = [e.max_mag for e in evs if e.max_mag is not None]
    mn = [e.min_mag for e in evs if e.min_mag is not None]
    if not mx or not mn:
        return 0, None
    return max(0, int((max(mx) - min(mn)) * _LOG10_2) + 1), min(mn)


def compare_at(pl, pr, point, dps=DPS, max_dps=MAX_DPS) -> PointResult:
    """Compare two prepared sides at one point, raising the precision until the answer is
    certain: "differ" (disjoint enclosures), "agree" (|lhs - rhs| below 10^-AGREE_DIGITS of
    the smallest magnitude involved), "invalid" (a side has no real value) or "undecided"
    (not resolved within ``max_dps`` digits)."""
    P = dps
    reason = ""
    while True:
        sides = []
        for prep in (pl, pr):
            try:
                sides.append(_ieval(prep, point, P))
            except _Invalid as exc:
                sides.append(exc)
            except _Undecided as exc:
                sides.append(exc)
        bad = [x for x in sides if isinstance(x, Exception)]
        if bad:
            dom = [isinstance(x, _DomainError) for x in sides]
            und = [isinstance(x, _Undecided) for x in sides]
            if dom[0] != dom[1] and not any(und):
                # a domain error on one side only, a real value on the other: refuted at this point
                k = 0 if dom[0] else 1
                return PointResult("domain", str(sides[k]), side=("left", "right")[k], dps=P,
                                   lhs=None if k == 0 else sides[0][0], rhs=None if k == 1 else sides[1][0])
            inval = [x for x in bad if isinstance(x, _Invalid)]
            if inval and not (any(dom) and any(und)):
                return PointResult("invalid", str(inval[0]), dps=P)
            reason = str(next(x for x in bad if isinstance(x, _Undecided)))
            if P >= max_dps:
                return PointResult("undecided", reason, dps=P)
            P = min(max_dps, 2 * P)
            continue
        (L, el), (R, er) = sides
        ll, lh = _ends(L)
        rl, rh = _ends(R)
        if lh < rl or rh < ll:
            return PointResult("differ", lhs=L, rhs=R, dps=P)
        span, min_mag = _span_digits(el, er)
        need = span + AGREE_DIGITS + 10
        if P < need:
            if need > max_dps:
                if P < max_dps and not (_tight(L, P) and _tight(R, P)):
                    # agreement is out of reach; with enclosures this loose, more digits may
                    # still separate the sides ((x^2+1)^1e50 against (x^2+2)^1e50)
                    P = max_dps
                    continue
                return PointResult("undecided", f"magnitudes too far apart to resolve with {max_dps} digits",
                                   dps=P)
            P = need
            continue
        width = max(lh - rl, rh - ll)
        if width == 0 or min_mag is None:
            if width == 0:
                return PointResult("agree", lhs=L, rhs=R, dps=P, taken=frozenset(el.taken | er.taken))
            tol = mpmath.mpf(10) ** (-AGREE_DIGITS)
        else:
            tol = mpmath.mpf(2) ** min_mag * mpmath.mpf(10) ** (-AGREE_DIGITS)
        if width <= tol:
            return PointResult("agree", lhs=L, rhs=R, dps=P, taken=frozenset(el.taken | er.taken))
        extra = int(mpmath.log10(width / tol)) + 10
        if P >= max_dps or extra < 1:
            return PointResult("undecided", "the enclosures stay too wide", dps=P)
        P = min(max_dps, P + extra)


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
_STRATEGY_KEY = {name: key for key, name in STRATEGIES.items()}


class TooManyCases(Exception):
    """A case split would have more cases than MAX_CASES."""


#: the most cases one strategy splits a step into (finite labels times signs)
MAX_CASES = 4096
#: numeric confirmation is refused when more than this fraction of the points is dropped
#: because a side has no real value there ((-1)^(2g) for y = -1)...
MAX_INVALID_FRACTION = 0.2
#: ...or when more than this fraction is dropped for any reason (precision included: the
#: huge-magnitude points of exp-heavy steps cannot all be resolved)
MAX_DROPPED_FRACTION = 1 / 3
#: the most extra points placed at and around where()/abs thresholds
MAX_THRESHOLD_POINTS = 40


#: integer powers above this are never expanded into polynomials
HUGE_POWER = 1000


def _huge_powers(expr) -> bool:
    return any(a.exp.is_Integer and abs(a.exp) > HUGE_POWER for a in expr.atoms(sp.Pow))


def _fail_reason(exc) -> tuple[str, str]:
    """(method, detail) of an unproved verdict for an exception a step ran into."""
    if isinstance(exc, MemoryError):
        return "memory limit", "MemoryError: the expression or the case split is too large for memory"
    if isinstance(exc, RecursionError):
        return "too large", "RecursionError: the expression is too deeply nested"
    if isinstance(exc, OverflowError):
        return "overflow", f"OverflowError: {exc}"[:200]
    return "internal error", f"{type(exc).__name__}: {exc}"[:200]


def _unbounded(dom) -> bool:
    """The whole real line (or the reals without 0): a symbol a case split may solve for."""
    return dom is None or (not dom.is_finite and not dom.integer and dom.lo is None and dom.hi is None)


def _hyperbolic_to_exp(e):
    if e.has(sp.tanh, sp.sinh, sp.cosh):
        return e.rewrite(sp.exp)
    return e


#: the most nested splits of where()/abs/sign conditions one case goes through
MAX_SPLIT_DEPTH = 6


def _undecided(rel):
    return not isinstance(rel, bool) and rel not in (sp.true, sp.false)


def _split_targets(expr):
    """Expressions whose sign decides a branch: lhs - rhs of each relation of a where()
    condition, the argument of each abs and sign; plus the undecided conditions themselves."""
    targets, conds = [], []
    for node in sp.preorder_traversal(expr):
        if isinstance(node, sp.Piecewise):
            for _, cond in node.args:
                if _undecided(cond):
                    conds.append(cond)
                    for r in sp.preorder_traversal(cond):
                        if isinstance(r, sp.core.relational.Relational):
                            targets.append(r.lhs - r.rhs)
        elif isinstance(node, (sp.Abs, sp.sign)):
            targets.append(node.args[0])
    return targets, conds


def _forced_root(cond, value):
    """{v: root} when the case cond = value leaves one point of a symbol v: t = lhs - rhs = 0 because the case
    says t == 0, or t > 0 is false where t >= 0 is known (a bounded parameter at its closed end: clip > 0 false
    with clip in [0, 1) is clip = 0), and t's numerator is linear in v with a nonzero rational coefficient (the
    case's points all have v = root: substituting it is exact).  Else None (the condition alone is replaced)."""
    if not isinstance(cond, sp.core.relational.Relational):
        return None
    try:
        t = sp.factor(sp.cancel(sp.together(cond.lhs - cond.rhs)))  # as _decide_relation: signs show factored
    except Exception:
        return None
    zero = {(sp.Eq, True): True, (sp.Ne, False): True,
            (sp.StrictGreaterThan, False): t.is_nonnegative, (sp.LessThan, True): t.is_nonnegative,
            (sp.StrictLessThan, False): t.is_nonpositive, (sp.GreaterThan, True): t.is_nonpositive}
    if not zero.get((type(cond), value is sp.true)):
        return None
    try:
        num, _ = sp.fraction(t)
        for v in sorted(num.free_symbols, key=sp.default_sort_key):
            poly = sp.Poly(num, v)
            if poly.degree() != 1:
                continue
            a, r = poly.all_coeffs()
            if a.is_Rational and a != 0 and not r.has(v):
                return {v: -r / a}
    except Exception:
        return None
    return None


def _decide_relation(rel):
    """sp.true / sp.false when the sign of lhs - rhs, factored, is known from the symbols'
    assumptions; else None."""
    try:
        t = sp.factor(sp.cancel(sp.together(rel.lhs - rel.rhs)))
    except Exception:
        return None
    pos, neg, zero = t.is_positive, t.is_negative, t.is_zero
    nonneg, nonpos = t.is_nonnegative, t.is_nonpositive
    if isinstance(rel, sp.Eq) or isinstance(rel, sp.Ne):
        truth = True if zero else (False if (pos or neg) else None)
        if truth is None:
            return None
        truth = truth if isinstance(rel, sp.Eq) else not truth
    elif isinstance(rel, sp.StrictGreaterThan):
        truth = True if pos else (False if nonpos else None)
    elif isinstance(rel, sp.GreaterThan):
        truth = True if nonneg else (False if neg else None)
    elif isinstance(rel, sp.StrictLessThan):
        truth = True if neg else (False if nonneg else None)
    elif isinstance(rel, sp.LessThan):
        truth = True if nonpos else (False if pos else None)
    else:
        return None
    if truth is None:
        return None
    return sp.true if truth else sp.false


def _non_finite(expr) -> bool:
    return isinstance(expr, sp.Basic) and (expr.has(sp.nan, sp.zoo, sp.oo, sp.S.NegativeInfinity))


@dataclass
class Scan:
    """Outcome of comparing two sides at a list of points."""

    agree: int = 0
    cex: dict | None = None
    dropped: dict = field(default_factory=dict)  # reason -> count
    total: int = 0
    dps: int = DPS  # the precision at which the counterexample was found
    taken: set = field(default_factory=set)  # where() branches taken at agreeing points

    def untaken(self):
        """Conditions of where() branches that no agreeing point took: the numbers say
        nothing about those branches (x^3 == 2 is met by no rational point)."""
        nodes = {e for e, _ in self.taken}
        return sorted({str(c) for e in nodes for i, (_, c) in enumerate(e.args)
                       if (e, i) not in self.taken and c is not sp.false})

    @property
    def n_dropped(self):
        return sum(self.dropped.values())

    @property
    def n_invalid(self):
        return sum(n for why, n in self.dropped.items() if not why.startswith("undecided"))

    def too_many_dropped(self):
        return (self.n_invalid > MAX_INVALID_FRACTION * self.total
                or self.n_dropped > MAX_DROPPED_FRACTION * self.total)

    def describe_drops(self):
        if not self.dropped:
            return ""
        parts = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items(), key=lambda kv: (-kv[1], kv[0])))
        return f"{self.n_dropped} of {self.total} sample points dropped ({parts})"


def _refuted(scan, t0, tried=None) -> Verdict:
    cex = scan.cex
    if "reason" in cex:  # a domain error: one side undefined where the other has a real value
        method = f"domain error: {cex['reason']} (mpmath, {scan.dps} and {2 * scan.dps} digits)"
    else:
        method = f"counterexample (mpmath, {scan.dps} and {2 * scan.dps} digits)"
    return Verdict(REFUTED, method, cex, time.monotonic() - t0, tried=tried or [])


class Prover:
    """Checks steps for one derivation context."""

    def __init__(self, ctx, seed: int = DEFAULT_SEED, step_timeout: float = 4.0, deadline: float | None = None,
                 instances=None, instance_symbols=None, strategies=None, assumptions=None):
        self.ctx = ctx
        self.assumptions = list(assumptions or [])  # conditions relating symbols (assume = [...])
        self.strategies = strategies  # None: all; else a collection of keys of STRATEGIES
        self.seed = seed
        self.step_timeout = step_timeout
        self.deadline = deadline
        self.resolver = Resolver(ctx)
        self.instances = instances or {}
        self.instance_symbols = instance_symbols or {}
        self._points: dict = {}
        self.proved_domains: set = set()  # defined symbols whose declared domain is proved
        self._sums = None  # indices, families and sums: derive.prover.sums decides the steps that use them
        if getattr(ctx, "indexed", False):
            from derive.prover.sums import IndexedChecker

            self._sums = IndexedChecker(self)

    # -- domains ---------------------------------------------------------------------------
    def base_domain(self, s) -> Domain:
        return self.ctx.domains.get(s) or Domain.parse("real")

    def domain_of(self, s):
        """The domain a proof may assume for ``s``: a base symbol's declared domain (the
        file's assumption), a defined symbol's declared domain only once it is proved (the
        ``domain`` checks); None otherwise.  Every assumption, case split and substitution
        of the strategies goes through here."""
        dom = self.ctx.domains.get(s)
        if dom is None:
            return None
        if s in self.ctx.definitions and s not in self.proved_domains:
            return None
        return dom

    # -- sample points ---------------------------------------------------------------------
    def _build_points(self, count):
        rng = random.Random(self.seed)
        bases = sorted(self.ctx.base_symbols, key=lambda s: s.name)
        samples = {s: self.base_domain(s).samples(rng, count) for s in bases}
        finite = [s for s in bases if self.base_domain(s).is_finite]
        sizes = [len(self.base_domain(s).values) for s in finite]
        total = math.prod(sizes) if sizes else 1
        pts = []
        for k in range(count):
            pt = {}
            for j, s in enumerate(bases):
                if s in finite:
                    continue
                vals = samples[s]
                # decorrelate simple values across symbols while keeping them simple
                pt[s] = vals[(k + 3 * j) % len(vals)] if k < len(vals) else vals[k]
            # the (k mod total)-th combination of the finite values, in itertools.product
            # order, decoded without ever listing the product (60^6 combinations are fine)
            i = k % total
            for s, n in zip(reversed(finite), reversed(sizes)):
                pt[s] = self.base_domain(s).values[i % n]
                i //= n
            pts.append(pt)
        return pts, bases, finite

    def _scale_points(self, base_pts, bases, finite):
        """Points at every scale the domains allow (tiny, huge, both signs, a hair inside
        the bounds): all continuous symbols scaled together, and one at a time."""
        conts = [s for s in bases if s not in finite]
        scales = {s: self.base_domain(s).scale_samples() for s in conts}
        n = max((len(v) for v in scales.values()), default=0)
        out = []
        for i in range(n):
            pt = dict(base_pts[i % len(base_pts)])
            for j, s in enumerate(conts):
                sc = scales[s]
                if sc:
                    pt[s] = sc[(i + j) % len(sc)]
            out.append(pt)
            s = conts[i % len(conts)]
            if scales[s] and len(conts) > 1:
                pt2 = dict(base_pts[(i + 1) % len(base_pts)])
                pt2[s] = scales[s][i % len(scales[s])]
                out.append(pt2)
        return out

    def points(self, count):
        """Sample points over the base symbols (fixed seed: the report names it).

        Up to SCREEN_POINTS, the screening points (always the same ones); beyond, the
        confirmation points, which add points at every scale of the domains."""
        key = SCREEN_POINTS if count <= SCREEN_POINTS else count
        if key not in self._points:
            pts, bases, finite = self._build_points(key)
            if key > SCREEN_POINTS and pts:
                pts = pts + self._scale_points(pts, bases, finite)
            self._points[key] = self.satisfying(pts)
        pts = self._points[key]
        return pts[:count] if count <= SCREEN_POINTS else pts

    def threshold_points(self, exprs, base_pts):
        """Points at and around the thresholds of where() conditions and abs() arguments that
        are linear in a continuous base symbol (x > 10: x = 10, 10 +- 1e-9, 10 +- 1/2,
        10 +- (1 + |10|)), the other symbols taken from the first base points."""
        rels = []
        for expr in exprs:
            for node in sp.preorder_traversal(expr):
                if isinstance(node, sp.Piecewise):
                    for _, cond in node.args:
                        if isinstance(cond, sp.Basic):
                            rels.extend(c for c in sp.preorder_traversal(cond)
                                        if isinstance(c, sp.core.relational.Relational))
                elif isinstance(node, sp.Abs):
                    rels.append(node.args[0])
        # where a side may be undefined: a denominator, a log's argument, the base of a
        # non-integer power (x/x at x = 0, log(s) at s <= 0): both sides of each root
        for expr in exprs:
            for node in sp.preorder_traversal(expr):
                if node.is_Pow and (node.exp.is_negative or not node.exp.is_Integer) and node.base.free_symbols:
                    rels.append(node.base)
                elif isinstance(node, sp.log) and node.args[0].free_symbols:
                    rels.append(node.args[0])
                elif isinstance(node, sp.sign):
                    rels.append(node.args[0])
        out, seen = [], set()
        for rel in sorted(set(rels), key=sp.default_sort_key):
            d = rel.lhs - rel.rhs if isinstance(rel, sp.core.relational.Relational) else rel
            for s in sorted(d.free_symbols, key=lambda s: s.name):
                dom = self.ctx.domains.get(s)
                if s in self.ctx.definitions or (dom is not None and dom.is_finite):
                    continue
                dom = dom or Domain.parse("real")
                try:
                    poly = sp.Poly(d, s)
                except (sp.PolynomialError, sp.GeneratorsNeeded, Exception):
                    continue
                if poly.degree() != 1:
                    continue
                a, b = poly.all_coeffs()
                for base in base_pts[:2]:
                    av, bv = a.xreplace(base), b.xreplace(base)
                    if not (av.is_Rational and bv.is_Rational) or av == 0:
                        continue
                    c = -bv / av
                    for delta in (0, sp.Rational(1, 10**9), -sp.Rational(1, 10**9), sp.Rational(1, 2),
                                  -sp.Rational(1, 2), 1 + abs(c), -1 - abs(c)):
                        v = c + delta
                        if (s, v, id(base)) in seen or not dom.contains(v):
                            continue
                        seen.add((s, v, id(base)))
                        pt = dict(base)
                        pt[s] = v
                        if self.assumptions and not self._holds(pt):
                            continue
                        out.append(pt)
                        if len(out) >= MAX_THRESHOLD_POINTS:
                            return out
        return out

    # -- assumptions (assume = ["sigma > s"]) --------------------------------------------
    def _assumed(self):
        """The assumptions with definitions expanded, ready for the evaluator (cached)."""
        key = tuple(self.assumptions)
        hit = getattr(self, "_assumed_cache", None)
        if hit is None or hit[0] != key:
            conds = [_prepare_numeric(self.ctx.expand(c)) for c in self.assumptions]
            hit = (key, conds)
            self._assumed_cache = hit
        return hit[1]

    def _holds(self, pt) -> bool:
        conds = self._assumed()
        if not conds:
            return True
        try:
            exact = {s: sp.Rational(v) for s, v in pt.items()}
            old = _IV.prec
            try:
                _IV.dps = DPS
                ev = _Eval({s: _iv_rational(v) for s, v in exact.items()}, exact)
                return all(ev.truth(c) is True for c in conds)
            finally:
                _IV.prec = old
        except (_Invalid, _Undecided, ArithmeticError, ValueError, TypeError):
            return False

    def satisfying(self, pts):
        """The points that satisfy every assumption: each point that does not is moved along
        a symbol in which the assumption is linear (sigma > s: s = sigma - 1/2, ...) to one
        that does, or dropped."""
        if not self.assumptions:
            return pts
        conds = self._assumed()
        out = []
        for k, pt in enumerate(pts):
            q = dict(pt)
            for _ in range(2):
                if self._holds(q):
                    break
                for c in conds:
                    for rel in (c.args if isinstance(c, sp.And) else (c,)):
                        if isinstance(rel, sp.core.relational.Relational):
                            q = self._repair(q, rel, k)
            if self._holds(q):
                out.append(q)
        return out

    _OFFSETS = (sp.Rational(1, 2), sp.Integer(1), sp.Integer(3), sp.Rational(1, 10**6), sp.Rational(7, 3),
                sp.Integer(10), sp.Rational(1, 10), sp.Integer(1000))

    def _repair(self, pt, rel, k):
        try:
            exact = {s: sp.Rational(v) for s, v in pt.items()}
            if rel.xreplace(exact) in (sp.true, True):
                return pt
        except Exception:
            pass
        d = rel.lhs - rel.rhs
        cands = sorted((s for s in d.free_symbols if s in pt and not self.base_domain(s).is_finite),
                       key=lambda s: (not _unbounded(self.base_domain(s)), s.name))
        for v in cands:
            rest = {s: sp.Rational(x) for s, x in pt.items() if s != v}
            try:
                poly = sp.Poly(d.xreplace(rest), v)
            except Exception:
                continue
            if poly.degree() != 1:
                continue
            a, b = poly.all_coeffs()
            if not (a.is_Rational and b.is_Rational) or a == 0:
                continue
            if isinstance(rel, (sp.Eq,)):
                targets = [sp.S.Zero]
            elif isinstance(rel, (sp.StrictGreaterThan, sp.Ne)):
                targets = list(self._OFFSETS)
            elif isinstance(rel, sp.GreaterThan):
                targets = [sp.S.Zero] + list(self._OFFSETS) if k % 4 == 0 else list(self._OFFSETS)
            elif isinstance(rel, sp.StrictLessThan):
                targets = [-o for o in self._OFFSETS]
            else:
                targets = [sp.S.Zero] + [-o for o in self._OFFSETS] if k % 4 == 0 else [-o for o in self._OFFSETS]
            n = len(targets)
            for j in range(n):
                t = targets[(k + j) % n] if len(targets) > 1 else targets[0]
                val = (t - b) / a
                if self.base_domain(v).contains(val):
                    q = dict(pt)
                    q[v] = val
                    return q
        return pt

    def instance_points(self, name, count):
        """Points for a concrete instance (K = 3 classes...): the moderate points only, the
        scales being covered by the general check."""
        rng = random.Random(f"{self.seed}:{name}")
        extra = self.instance_symbols.get(name, {})
        out = []
        base = self.points(count) if count <= SCREEN_POINTS else self._build_points(count)[0]
        for pt in base:
            q = dict(pt)
            for s, dom in extra.items():
                q[s] = dom.samples(rng, 8)[rng.randrange(8)]
            out.append(q)
        return self.satisfying(out)

    # -- numeric -----------------------------------------------------------------------------
    def numeric_scan(self, lhs_full, rhs_full, points, dps=DPS) -> Scan:
        """Compare both sides at each point with interval arithmetic (:func:`compare_at`):
        a counterexample is certain (disjoint enclosures, shown again at twice the
        precision); points where a side has no real value or the precision cap is reached
        are dropped and counted by reason."""
        scan = Scan()
        pl, pr = _prepare_numeric(lhs_full), _prepare_numeric(rhs_full)
        used = lhs_full.free_symbols | rhs_full.free_symbols
        for pt in points:
            scan.total += 1
            try:
                res = compare_at(pl, pr, pt, dps)
                if res.kind == "domain":
                    res2 = compare_at(pl, pr, pt, min(MAX_DPS * 2, 2 * res.dps), max_dps=min(MAX_DPS * 2, 2 * res.dps))
                    if res2.kind == "domain" and res2.side == res.side:
                        scan.dps = res.dps
                        other = res.rhs if res.side == "left" else res.lhs
                        with mpmath.workdps(20):
                            shown = mpmath.nstr(_mid(other), 12)
                        undefined = f"undefined ({res.reason})"
                        point = {s.name: str(v) for s, v in sorted(pt.items(), key=lambda kv: kv[0].name)
                                 if s in used}
                        scan.cex = {
                            "point": point,
                            "lhs": undefined if res.side == "left" else shown,
                            "rhs": undefined if res.side == "right" else shown,
                            "reason": f"{res.side} side undefined at "
                                      + ", ".join(f"{k} = {v}" for k, v in point.items()) + f": {res.reason}",
                        }
                        return scan
                    res = res2 if res2.kind != "domain" else res
                if res.kind == "differ":
                    scan.dps = res.dps
                    P2 = min(MAX_DPS * 2, 2 * res.dps)
                    res2 = compare_at(pl, pr, pt, P2, max_dps=P2)
                    if res2.kind == "differ":
                        res = res2
                    a, b = _show_pair(res.lhs, res.rhs, res.dps)
                    scan.cex = {
                        "point": {s.name: str(v) for s, v in sorted(pt.items(), key=lambda kv: kv[0].name)
                                  if s in used},
                        "lhs": a,
                        "rhs": b,
                    }
                    return scan
            except (MemoryError, RecursionError) as exc:
                res = PointResult("undecided", f"{type(exc).__name__} in the evaluator")
            if res.kind == "agree":
                scan.agree += 1
                scan.taken |= res.taken
            else:
                why = res.reason if res.kind == "invalid" else f"undecided: {res.reason}"
                scan.dropped[why] = scan.dropped.get(why, 0) + 1
        return scan

    def numeric_compare(self, lhs_full, rhs_full, points, dps=DPS):
        """Return (agreements, counterexample or None, points dropped)."""
        scan = self.numeric_scan(lhs_full, rhs_full, points, dps)
        return scan.agree, scan.cex, scan.n_dropped

    # -- symbolic ----------------------------------------------------------------------------
    def _case_values(self, syms, expr=None):
        """Every combination of the finite label values, times the sign cases of ``expr``:
        each real symbol inside an ``abs`` or a ``where`` condition is taken as +s', -s'
        (s' > 0) and 0, which covers the reals, so that abs and where resolve in each case.

        A generator (cases are made one at a time); raises TooManyCases beyond MAX_CASES."""
        finite = sorted((s for s in syms if (d := self.domain_of(s)) is not None and d.is_finite),
                        key=lambda s: s.name)
        signed = self._sign_symbols(expr) if expr is not None else []
        n = math.prod(len(self.domain_of(s).values) for s in finite) * 3 ** len(signed)
        if n > MAX_CASES:
            raise TooManyCases(f"{n} cases")
        signs = []
        for s in signed:
            pos = sp.Symbol(f"{s.name}__pos", positive=True)
            dom = self.domain_of(s)
            signs.append((pos, -pos) if dom is not None and dom.nonzero else (pos, -pos, sp.S.Zero))
        for vals in itertools.product(*[self.domain_of(s).values for s in finite]):
            case = dict(zip(finite, vals))
            for svals in itertools.product(*signs):
                yield {**case, **dict(zip(signed, svals))}

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
            dom = self.domain_of(s)
            if isinstance(s, sp.Dummy) or s.is_nonnegative is not None or s.is_nonpositive is not None:
                continue  # a sign already known (d > 0 of an assumption)
            if s.is_real and (dom is None or (not dom.is_finite and dom.lo is None and dom.hi is None)):
                out.append(s)
        return out if len(out) <= limit else []

    def _solvable(self, t, atoms_ok, fallback=False):
        """(v, a, r) with t = a*v + r, a a nonzero rational and v a symbol over the whole real
        line (a base symbol, or a defined symbol used as an atom without a proved domain), or
        None."""
        best = None
        order = sorted(t.free_symbols, key=lambda s: (isinstance(s, sp.Dummy), s.name))
        if fallback:  # any symbol: the substitution still covers every point (a superset)
            order = sorted(t.free_symbols, key=lambda s: (not (not isinstance(s, sp.Dummy) and _unbounded(
                self.domain_of(s))), not isinstance(s, sp.Dummy), s.name))
        for v in order:
            if not isinstance(v, sp.Symbol):
                continue
            if v in self.ctx.definitions and not atoms_ok:
                continue
            if not fallback:
                if isinstance(v, sp.Dummy) or not _unbounded(self.domain_of(v)):
                    continue
            try:
                poly = sp.Poly(t, v)
            except Exception:
                continue
            if poly.degree() != 1:
                continue
            a, r = poly.all_coeffs()
            # a nonzero for every value of the other symbols: v <-> t is one to one
            if (a.is_Rational and a != 0 or a.is_positive or a.is_negative) and not a.has(v) and not r.has(v):
                best = (v, a, r)
                break
        return best

    def _apply_assumptions(self, expr, atoms_ok, case=None):
        """Substitute each assumption a > b (>=, <, <=, ==) into ``expr`` as a = b + d with a
        fresh d > 0 (>= 0, ...), solving for a symbol in which a - b is linear: the cases are
        then only those the assumption allows."""
        conds = [c if atoms_ok else self.ctx.expand(c) for c in self.assumptions]
        if case:
            conds = [c.xreplace(case) for c in conds]
            if any(c is sp.false for c in conds):
                return None  # no point of this case satisfies the assumptions
        rels = []
        for c in conds:
            rels.extend(c.args if isinstance(c, sp.And) else (c,))
        for k in range(len(rels)):
            rel = rels[k]  # with the substitutions of the assumptions before it
            if not isinstance(rel, sp.core.relational.Relational) or isinstance(rel, sp.Ne):
                continue
            t = rel.lhs - rel.rhs
            sol = self._solvable(t, atoms_ok, fallback=True)
            if sol is None:
                continue
            v, a, r = sol
            if isinstance(rel, sp.Eq):
                target = sp.S.Zero
            else:
                strict = isinstance(rel, (sp.StrictGreaterThan, sp.StrictLessThan))
                d = sp.Dummy("d", positive=True) if strict else sp.Dummy("d", nonnegative=True)
                target = d if isinstance(rel, (sp.StrictGreaterThan, sp.GreaterThan)) else -d
            sub = {v: (target - r) / a}
            expr = expr.xreplace(sub)
            rels = [x.xreplace(sub) if isinstance(x, sp.Basic) else x for x in rels]
        return expr

    def _split(self, expr, atoms_ok, prepare=None):
        """The cases of ``expr`` one after another (a generator): the assumptions made
        explicit, the finite labels and the signs of symbols under abs or in a where()
        condition (:meth:`_case_values`), the interval symbols parametrised, and then every
        abs, sign or where() condition that is still undecided split by :meth:`_refine`.
        Raises TooManyCases beyond MAX_CASES."""
        count = [0]
        for fcase in self._case_values(expr.free_symbols):  # the finite labels
            e0 = expr.xreplace(fcase)
            if self.assumptions:
                e0 = self._apply_assumptions(e0, atoms_ok, fcase)
                if e0 is None:
                    continue
            for case in self._case_values(set(), e0):  # the signs
                e = e0.xreplace(case)
                if prepare is not None:
                    e = prepare(e)
                e = e.xreplace(self._param_subs(e.free_symbols, atoms_ok))
                yield from self._refine(e, atoms_ok, 0, count)

    def _refine(self, e, atoms_ok, depth, count):
        """Split the first undecided abs/sign/where() of ``e``: solved for a symbol over the
        reals (t = a*v + r: v = (c - r)/a for c = d, -d, 0 with d > 0), else, for a condition,
        one case where it holds and one where it does not (sound: each case is an identity on
        all values), for abs(t) the cases t and -t, for sign(t) the values 1, -1, 0."""
        targets, conds = _split_targets(e) if depth < MAX_SPLIT_DEPTH else ([], [])
        decided = {}
        for cond in set(conds):  # a condition whose factored difference has a known sign
            for rel in sp.preorder_traversal(cond):
                if isinstance(rel, sp.core.relational.Relational) and rel not in decided:
                    value = _decide_relation(rel)
                    if value is not None:
                        decided[rel] = value
        if decided:
            yield from self._refine(e.xreplace(decided), atoms_ok, depth, count)
            return
        for t in sorted(set(targets), key=sp.default_sort_key):
            if t.is_positive is not None or t.is_zero is not None or t.is_negative is not None:
                if t.is_positive or t.is_negative or t.is_zero:
                    continue
            sol = self._solvable(t, atoms_ok)
            if sol is None:
                continue
            v, a, r = sol
            pos = sp.Dummy(f"{v.name}_split", positive=True)
            dom = self.domain_of(v)
            zero_ok = not (dom is not None and dom.nonzero and r == 0)
            for c in (pos, -pos, sp.S.Zero) if zero_ok else (pos, -pos):
                yield from self._refine(e.xreplace({v: (c - r) / a}), atoms_ok, depth + 1, count)
            return
        if conds:
            cond = sorted(set(conds), key=sp.default_sort_key)[0]
            for value in (sp.true, sp.false):
                case = e.xreplace({cond: value})
                at = _forced_root(cond, value)
                yield from self._refine(case.xreplace(at) if at else case, atoms_ok, depth + 1, count)
            return
        for node in sorted((n for n in e.atoms(sp.Abs, sp.sign)
                            if not (n.args[0].is_positive or n.args[0].is_negative or n.args[0].is_zero)),
                           key=sp.default_sort_key)[:1] if depth < MAX_SPLIT_DEPTH else []:
            t = node.args[0]
            vals = (t, -t) if isinstance(node, sp.Abs) else (sp.S.One, -sp.S.One, sp.S.Zero)
            for val in vals:
                yield from self._refine(e.xreplace({node: val}), atoms_ok, depth + 1, count)
            return
        count[0] += 1
        if count[0] > MAX_CASES:
            raise TooManyCases(f"more than {MAX_CASES} cases")
        yield e

    def _param_subs(self, syms, atoms_ok=True):
        subs = {}
        for s in sorted(syms, key=lambda s: getattr(s, "name", str(s))):
            if s in self.ctx.definitions and not atoms_ok:
                continue
            dom = self.domain_of(s)
            if dom is None or dom.is_finite:
                continue
            if dom.lo is None and dom.hi is None:
                continue
            expr, _ = dom.parametrise(s.name)
            subs[s] = expr
        return subs

    def _strategies(self, d_atoms, d_full):
        def algebra():
            if _huge_powers(d_atoms):
                # (x^4 + 2x^2 + 1)^(5e49): never expanded; with its base factored the power
                # combines with (x^2 + 1)^(1e50) structurally
                e = d_atoms.replace(lambda a: a.is_Pow and a.exp.is_Integer and abs(a.exp) > HUGE_POWER,
                                    lambda a: sp.Pow(_positive_base(a.base), a.exp))
                return e == 0
            return _is_zero(sp.expand(d_atoms)) or _is_zero(d_atoms)

        def atoms():
            for e in self._split(d_atoms, True):
                if not _is_zero(normalise(e)):
                    return False
            return True

        def expanded():
            for e in self._split(d_full, False, lambda x: _hyperbolic_to_exp(rewrite_elementary(x))):
                reals = [s for s in e.free_symbols if isinstance(s, sp.Symbol) and not isinstance(s, sp.Dummy)
                         and s.is_real]
                e, log_subs = _exp_to_rational(e, reals)
                if not _is_zero(normalise(e, log_subs)):
                    return False
            return True

        def simplified():
            for e in self._split(d_full, False, rewrite_elementary):
                if sp.simplify(e) != 0:
                    return False
            return True

        fns = {"algebra": algebra, "domains": atoms, "expanded": expanded, "simplify": simplified}
        order = getattr(self, "strategy_order", None) or STRATEGIES  # a lowered sum step: expanded before domains
        return [(STRATEGIES[k], fns[k]) for k in order if self.strategies is None or k in self.strategies]

    def _limit(self, floor: float = 0.0):
        """The CPU-time budget of one block (see time_limit), with the run's deadline."""
        lim = max(self.step_timeout, floor)
        if self.deadline is not None:
            lim = min(lim, self.deadline - time.monotonic())
        return Budget(lim, self.deadline)

    def check(self, lhs, rhs, only=None, confirm=True) -> Verdict:
        """Decide lhs == rhs on the context's domains.  Never raises for a step: whatever
        the step runs into (memory, recursion, overflow, a library failure) becomes an
        unproved verdict that says so.

        ``only``: the keys of STRATEGIES to try (the proof cache's replay of the one strategy
        that proved the step before; [] tries none); ``confirm=False``: no numeric confirmation
        when no strategy proves it (the verdict is then unproved, "not searched")."""
        t0 = time.monotonic()
        try:
            return self._check(lhs, rhs, t0, only, confirm)
        except StrategyTimeout:
            return Verdict(UNPROVED, "time limit", seconds=time.monotonic() - t0,
                           detail="the step ran past the time limit")
        except Exception as exc:
            method, detail = _fail_reason(exc)
            return Verdict(UNPROVED, method, seconds=time.monotonic() - t0, detail=detail)

    def _check(self, lhs, rhs, t0, only=None, confirm=True) -> Verdict:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return Verdict(UNPROVED, "time limit", seconds=0.0, detail="the run's --timeout was reached")
        if self._sums is not None:
            verdict = self._sums.check(lhs, rhs, t0)
            if verdict is not None:
                return verdict
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
        if _non_finite(Lf) or _non_finite(Rf):
            return Verdict(UNPROVED, "not a finite expression", seconds=time.monotonic() - t0,
                           detail="a side contains nan, zoo or oo (a division by zero or log(0) in a constant)")
        thresholds = None
        # 1. counterexample search
        scan = None
        try:
            with time_limit(self._limit(floor=2.0)):
                thresholds = self.threshold_points((Lf, Rf), self.points(SCREEN_POINTS))
                scan = self.numeric_scan(Lf, Rf, self.points(SCREEN_POINTS) + thresholds)
        except StrategyTimeout:
            scan = None
        except (RecursionError, MemoryError, OverflowError):
            scan = None
        if scan is not None and scan.cex is not None:
            return _refuted(scan, t0)
        # 2. symbolic strategies
        name, tried = self._prove(L, R, Lf, Rf, only)
        if name is not None:
            return Verdict(PROVED, name, seconds=time.monotonic() - t0, tried=tried,
                           strategy=_STRATEGY_KEY.get(name, ""))
        if not confirm:
            return Verdict(UNPROVED, "not searched", seconds=time.monotonic() - t0, tried=tried,
                           detail="only " + (", ".join(only) if only else "the counterexample search") + " ran")
        # 3. numeric confirmation (weaker evidence)
        return self._confirm(Lf, Rf, t0, tried, thresholds or [])

    def prove(self, lhs, rhs):
        """The symbolic strategies alone (no sample points): (the name of the strategy that shows lhs == rhs, or
        None, [what each strategy tried]).  derive.prover.sums proves each lowered case of an indexed step so."""
        try:
            with time_limit(self._limit(floor=2.0)):
                L, R = self.resolver.resolve(lhs), self.resolver.resolve(rhs)
                Lf, Rf = self.ctx.expand(L), self.ctx.expand(R)
        except StrategyTimeout:
            return None, ["resolving derivatives: time limit"]
        except Exception as exc:
            return None, [f"resolving derivatives: {type(exc).__name__}"]
        if _non_finite(Lf) or _non_finite(Rf):
            return None, ["not a finite expression"]
        return self._prove(L, R, Lf, Rf)

    def _prove(self, L, R, Lf, Rf, only=None):
        tried = []
        for name, fn in self._strategies(L - R, Lf - Rf):
            if only is not None and _STRATEGY_KEY.get(name) not in only:
                continue
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
            except TooManyCases as exc:
                tried.append(f"{name}: too many cases ({exc})")
                continue
            except MemoryError:
                tried.append(f"{name}: memory limit")
                continue
            except RecursionError:
                tried.append(f"{name}: too large")
                continue
            except Exception as exc:  # SymPy raises many kinds; a failed strategy is not a crash
                tried.append(f"{name}: {type(exc).__name__}")
                continue
            if ok:
                return name, tried
            tried.append(f"{name}: no")
        return None, tried

    def _confirm(self, Lf, Rf, t0, tried, thresholds):
        notes = []
        try:
            with time_limit(self._limit(floor=2.0)):
                scan = self.numeric_scan(Lf, Rf, self.points(CONFIRM_POINTS) + thresholds)
                notes.append(f"{scan.agree} points")
                for name in sorted(self.instances):
                    if scan.cex is not None:
                        break
                    s2 = self.numeric_scan(Lf.xreplace(self.instances[name]), Rf.xreplace(self.instances[name]),
                                           self.instance_points(name, 20))
                    notes.append(f"{name}: {s2.agree} points")
                    if s2.cex is not None:
                        scan = s2
                        break
                    scan.agree += s2.agree
                    scan.total += s2.total
                    for why, n in s2.dropped.items():
                        scan.dropped[why] = scan.dropped.get(why, 0) + n
                cex = scan.cex
        except StrategyTimeout:
            return Verdict(UNPROVED, "time limit", seconds=time.monotonic() - t0, tried=tried,
                           detail="; ".join(tried))
        except Exception as exc:  # memory, recursion, overflow: unproved, with the reason
            method, detail = _fail_reason(exc)
            return Verdict(UNPROVED, method, seconds=time.monotonic() - t0, tried=tried,
                           detail=f"numeric confirmation: {detail}; " + "; ".join(tried))
        if cex is not None:
            return _refuted(scan, t0, tried)
        drops = scan.describe_drops()
        if any(t.endswith("time limit") for t in tried):
            return Verdict(UNPROVED, "time limit", seconds=time.monotonic() - t0, tried=tried,
                           detail="symbolic strategies ran out of time; numerically "
                                  + ", ".join(notes) + " agree" + (f"; {drops}" if drops else ""))
        if scan.agree == 0:
            return Verdict(UNPROVED, "no valid sample point", seconds=time.monotonic() - t0, tried=tried,
                           detail="; ".join([drops] + tried if drops else tried))
        if scan.too_many_dropped():
            return Verdict(UNPROVED, "numeric check inconclusive", seconds=time.monotonic() - t0, tried=tried,
                           detail=f"{drops}: too many to confirm; " + "; ".join(tried))
        untaken = scan.untaken()
        if untaken:
            return Verdict(UNPROVED, "numeric check inconclusive", seconds=time.monotonic() - t0, tried=tried,
                           detail=f"no sample point takes the where() branch for {', '.join(untaken)[:200]}; "
                                  + "; ".join(tried))
        method = f"mpmath at {DPS} digits, seed {self.seed}: " + ", ".join(notes)
        if drops:
            method += f" ({drops})"
        return Verdict(CONFIRMED, method, seconds=time.monotonic() - t0, tried=tried, detail="; ".join(tried))

    # -- domains of definitions ------------------------------------------------------------
    def check_domain(self, sym) -> Verdict:
        """Prove that a definition takes values in its declared domain."""
        t0 = time.monotonic()
        try:
            return self._check_domain(sym, t0)
        except StrategyTimeout:
            return Verdict(UNPROVED, "time limit", seconds=time.monotonic() - t0)
        except Exception as exc:
            method, detail = _fail_reason(exc)
            return Verdict(UNPROVED, method, seconds=time.monotonic() - t0, detail=detail)

    def _domain_point(self, prep, expr, dom, pt):
        """("inside" | "outside" | "invalid" | "undecided", value text) for one point; an
        outside value is certain: an interval enclosure wholly outside the domain (compared
        exactly), or the exact rational value."""
        P = DPS
        while True:
            try:
                V, ev = _ieval(prep, pt, P)
            except _Invalid as exc:
                return "invalid", str(exc)
            except _Undecided as exc:
                if P >= MAX_DPS // 4:
                    break
                P *= 2
                continue
            lo, hi = _ends(V)
            where = dom.locate(lo, hi)
            if where is True:
                self._taken = ev.taken
                return "inside", ""
            if where is False:
                with mpmath.workdps(P + 10):
                    m = _mid(V)
                    n = 12
                    while True:  # print enough digits that the printed value is outside too
                        text = mpmath.nstr(m, n)
                        try:
                            if not dom.contains(sp.Rational(text)) or n >= P:
                                return "outside", text
                        except (ValueError, TypeError):
                            return "outside", text
                        n = min(P, 2 * n)
            if P >= 200:
                break
            P *= 2
        try:  # on a closed bound (1/3 in (0, 1/3]) or at a finite value: the exact value
            v = expr.xreplace({s: sp.Rational(x) for s, x in pt.items()})
            if v.is_Rational:
                return ("inside", "") if dom.contains(v) else ("outside", str(v))
        except Exception:
            pass
        return "undecided", "the enclosure straddles a bound"

    def _outside(self, expr, dom, text, pt, t0):
        return Verdict(REFUTED, "value outside the declared domain", {
            "point": {s.name: str(pt[s]) for s in sorted(expr.free_symbols, key=lambda s: s.name)},
            "lhs": text, "rhs": dom.pretty()}, time.monotonic() - t0)

    def _check_domain(self, sym, t0) -> Verdict:
        if self._sums is not None:
            verdict = self._sums.check_domain(sym, t0)
            if verdict is not None:
                return verdict
        dom = self.ctx.domains[sym]
        expr = self.ctx.expand(self.ctx.definitions[sym])
        if _non_finite(expr):
            return Verdict(UNPROVED, "not a finite expression", seconds=time.monotonic() - t0,
                           detail="the definition contains nan, zoo or oo")
        # numeric first: a value certainly outside the domain refutes the declaration
        with time_limit(self._limit(floor=2.0)):
            prep = _prepare_numeric(expr)
            base = self.points(SCREEN_POINTS)
            for pt in base + self.threshold_points([expr], base):
                where, text = self._domain_point(prep, expr, dom, pt)
                if where == "outside":
                    return self._outside(expr, dom, text, pt, t0)
        proved = True
        try:
            with time_limit(self._limit()):
                if dom.is_finite:
                    proved = self._prove_finite_domain(expr, dom)
                else:
                    proved = self._prove_interval_domain(expr, dom)
        except StrategyTimeout:
            proved = False
        except Exception:  # SymPy failure, too many cases: fall back to numeric evidence
            proved = False
        if not proved:
            return self._domain_confirm(sym, expr, dom, t0)
        self.proved_domains.add(sym)
        method = ("case split + each case (each branch) one of the values" if dom.is_finite
                  else "case split + exp(x)->t>0 + sign of factored form")
        return Verdict(PROVED, method, seconds=time.monotonic() - t0)

    def _prove_finite_domain(self, expr, dom):
        def member(e):
            if isinstance(e, sp.Piecewise):  # a where() takes one of its branch values
                return all(member(v) for v, _ in e.args)
            e = rewrite_elementary(e)
            return any(_is_zero(e - v) for v in dom.values)

        for case in self._case_values(expr.free_symbols, expr):
            if not member(expr.xreplace(case)):
                return False
        return True

    def _prove_interval_domain(self, expr, dom):
        conds = []
        if dom.lo is not None:
            conds.append((expr - dom.lo, dom.lo_open))
        if dom.hi is not None:
            conds.append((dom.hi - expr, dom.hi_open))
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
                    return False
        return True

    def _domain_confirm(self, sym, expr, dom, t0):
        try:
            return self._domain_confirm_points(sym, expr, dom, t0)
        except StrategyTimeout:
            return Verdict(UNPROVED, "time limit", seconds=time.monotonic() - t0)
        except Exception as exc:
            method, detail = _fail_reason(exc)
            return Verdict(UNPROVED, method, seconds=time.monotonic() - t0, detail=detail)

    def _domain_confirm_points(self, sym, expr, dom, t0):
        with time_limit(self._limit(floor=2.0)):
            prep = _prepare_numeric(expr)
            pts = self.points(CONFIRM_POINTS)
            pts = pts + self.threshold_points([expr], pts)
            scan = Scan(total=len(pts))
            for pt in pts:
                where, text = self._domain_point(prep, expr, dom, pt)
                if where == "outside":
                    return self._outside(expr, dom, text, pt, t0)
                if where == "inside":
                    scan.agree += 1
                    scan.taken |= getattr(self, "_taken", set())
                    self._taken = set()
                else:
                    why = text if where == "invalid" else f"undecided: {text}"
                    scan.dropped[why] = scan.dropped.get(why, 0) + 1
        drops = scan.describe_drops()
        if scan.agree == 0 or scan.too_many_dropped():
            return Verdict(UNPROVED, "numeric check inconclusive", seconds=time.monotonic() - t0,
                           detail=drops or "no valid sample point")
        if scan.untaken():
            return Verdict(UNPROVED, "numeric check inconclusive", seconds=time.monotonic() - t0,
                           detail=f"no sample point takes the where() branch for {', '.join(scan.untaken())[:200]}")
        return Verdict(CONFIRMED, f"{scan.agree} sample points inside the domain" + (f" ({drops})" if drops else ""),
                       seconds=time.monotonic() - t0)
