"""Domains of symbols: real line, intervals and finite label sets.

A domain knows three things the proof engine needs:

* how to *parametrise* it by a fresh SymPy symbol whose assumptions make positivity
  explicit (``p`` in (0, 1) becomes ``1/(1 + w)`` with ``w > 0``, so ``1 - p = w/(1 + w)`` is
  visibly positive and ``(1 - p)**gamma`` can be split);
* the values to *sample* for numeric checks (a few simple values first, then random ones);
* for a finite set, the values to *case-split* on.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from fractions import Fraction

import sympy as sp


class DomainError(ValueError):
    pass


_INF = {"oo": None, "+oo": None, "inf": None, "+inf": None, "-oo": None, "-inf": None}


def _parse_number(text: str) -> sp.Rational:
    text = text.strip()
    if not re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)(/\d+)?", text):
        raise DomainError(f"{text!r} is not a number")
    if "/" in text:
        num, den = text.split("/")
        if int(den) == 0:
            raise DomainError(f"{text!r} divides by zero")
        return sp.Rational(sp.Rational(num), int(den))
    return sp.Rational(text)


def _fraction(value):
    """The exact value of an int, Fraction, SymPy rational or mpf as a Fraction; None for an
    mpf whose binary exponent is too large to expand (compared by magnitude instead)."""
    if isinstance(value, Fraction):
        return value
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, sp.Rational):
        return Fraction(int(value.p), int(value.q))
    if isinstance(value, float):
        return Fraction(value)
    import mpmath

    # an mpf is taken as it is: mpmath.mpf(v) would round it to the working precision
    v = value if isinstance(value, mpmath.mpf) else mpmath.mpf(value)
    if not mpmath.isfinite(v):
        raise DomainError(f"{value!r} is not a finite number")
    man, exp = v.man_exp
    if abs(exp) > 100_000:
        return None
    return Fraction(int(man)) * (Fraction(2) ** int(exp))


def _cmp(value, bound) -> int:
    """Exact sign of value - bound (-1, 0, 1); bound is rational, value rational or mpf."""
    b = _fraction(bound)
    a = _fraction(value)
    if a is not None:
        return (a > b) - (a < b)
    import mpmath

    # a binary exponent beyond 100000 bits: |value| is far from any rational bound we use
    v = value if isinstance(value, mpmath.mpf) else mpmath.mpf(value)
    sign = 1 if v > 0 else -1
    if mpmath.mag(v) > 0 or b == 0:
        return sign
    return (0 > b) - (0 < b)  # |value| below 2^-100000: it compares with b as 0 does


@dataclass(frozen=True)
class Domain:
    """A subset of the real line: an interval (possibly unbounded) or a finite set."""

    text: str
    lo: sp.Rational | None = None  # None means -oo
    hi: sp.Rational | None = None  # None means +oo
    lo_open: bool = True
    hi_open: bool = True
    values: tuple | None = None  # finite set
    integer: bool = False  # only the integers of the interval ("integer [2, oo)")
    nonzero: bool = False  # the interval without 0 ("nonzero": the reals without 0)

    # -- construction --------------------------------------------------------------------
    @staticmethod
    def parse(text) -> "Domain":
        if not isinstance(text, str):
            raise DomainError(f"a domain is a string such as \"real\" or \"(0, 1)\", got {text!r}")
        t = text.strip()
        m = re.fullmatch(r"(integer|nonzero)(?:\s+(.*))?", t, re.S)
        if m:
            kind, rest = m.group(1), (m.group(2) or "real").strip()
            if rest in ("integer", "nonzero") or rest.startswith("{") or rest.startswith("integer") \
                    or rest.startswith("nonzero"):
                raise DomainError(f"domain {text!r}: write {kind} alone or {kind} with an interval, "
                                  f"e.g. \"{kind} [1, oo)\"")
            d = Domain.parse(rest)
            if kind == "integer":
                lo = None if d.lo is None else sp.ceiling(d.lo) if not (d.lo_open and d.lo.is_integer) \
                    else d.lo + 1
                hi = None if d.hi is None else sp.floor(d.hi) if not (d.hi_open and d.hi.is_integer) \
                    else d.hi - 1
                if lo is not None and hi is not None and lo > hi:
                    raise DomainError(f"domain {text!r} holds no integer")
                return Domain(t, lo, hi, lo is None, hi is None, None, integer=True)
            if d.lo is not None and d.hi is not None and d.lo == 0 and d.hi == 0:
                raise DomainError(f"domain {text!r} is empty")
            return Domain(t, d.lo, d.hi, d.lo_open, d.hi_open, None, nonzero=True)
        named = {
            "real": "(-oo, oo)",
            "positive": "(0, oo)",
            "nonnegative": "[0, oo)",
            "negative": "(-oo, 0)",
            "nonpositive": "(-oo, 0]",
        }
        if t in named:
            d = Domain.parse(named[t])
            return Domain(t, d.lo, d.hi, d.lo_open, d.hi_open, None)
        if t.startswith("{") and t.endswith("}"):
            inner = t[1:-1].strip()
            if not inner:
                raise DomainError(f"domain {text!r} is the empty set")
            vals = []
            for part in inner.split(","):
                v = _parse_number(part)
                if v not in vals:
                    vals.append(v)
            return Domain(t, values=tuple(sorted(vals)))
        m = re.fullmatch(r"([\(\[])\s*([^,]+?)\s*,\s*([^,]+?)\s*([\)\]])", t)
        if not m:
            raise DomainError(
                f"cannot read domain {text!r}; use real, positive, nonnegative, negative, "
                "an interval such as (0, 1) or [0, oo), or a finite set such as {-1, 1}"
            )
        lb, lo_t, hi_t, rb = m.groups()
        lo = None if lo_t.strip() in ("-oo", "-inf") else _parse_number(lo_t)
        hi = None if hi_t.strip() in ("oo", "+oo", "inf", "+inf") else _parse_number(hi_t)
        if lo_t.strip() in ("oo", "+oo", "inf", "+inf") or hi_t.strip() in ("-oo", "-inf"):
            raise DomainError(f"domain {text!r} is empty (bounds in the wrong order)")
        lo_open, hi_open = lb == "(", rb == ")"
        if lo is None and not lo_open or hi is None and not hi_open:
            raise DomainError(f"domain {text!r}: an infinite bound must be open")
        if lo is not None and hi is not None:
            if lo > hi or (lo == hi and (lo_open or hi_open)):
                raise DomainError(f"domain {text!r} is empty (it contradicts itself)")
        return Domain(t, lo, hi, lo_open, hi_open, None)

    # -- queries ---------------------------------------------------------------------------
    @property
    def is_finite(self) -> bool:
        return self.values is not None

    def contains(self, value) -> bool:
        """Whether a real number (int, Fraction, mpf, SymPy number) lies in the domain.

        The comparison is exact (rational arithmetic, never floats): 1/3 lies in (0, 1/3]."""
        if self.is_finite:
            return any(_cmp(value, v) == 0 for v in self.values)
        if self.integer:
            f = _fraction(value)
            if f is None or f.denominator != 1:
                return False
        if self.nonzero and _cmp(value, 0) == 0:
            return False
        if self.lo is not None:
            c = _cmp(value, self.lo)
            if c < 0 or (self.lo_open and c == 0):
                return False
        if self.hi is not None:
            c = _cmp(value, self.hi)
            if c > 0 or (self.hi_open and c == 0):
                return False
        return True

    def locate(self, lo, hi):
        """Where a real number known only to lie in [lo, hi] is: True (certainly inside the
        domain), False (certainly outside) or None (the enclosure is too wide to tell).
        ``lo`` and ``hi`` are exact numbers (mpf endpoints of an interval, rationals)."""
        if self.is_finite:
            hits = [v for v in self.values if _cmp(lo, v) <= 0 <= _cmp(hi, v)]
            if not hits:
                return False
            if len(hits) == 1 and _cmp(lo, hi) == 0:
                return True
            return None
        a, b = self.contains(lo), self.contains(hi)
        if self.integer or self.nonzero:
            if _cmp(lo, hi) == 0:
                return a
            if self.nonzero and a and b and (_cmp(lo, 0) > 0 or _cmp(hi, 0) < 0):
                return True
            return False if (not a and not b and self._outside_bounds(lo, hi)) else None
        if a and b:
            return True  # an interval is convex
        if self.lo is not None:
            c = _cmp(hi, self.lo)
            if c < 0 or (self.lo_open and c == 0):
                return False
        if self.hi is not None:
            c = _cmp(lo, self.hi)
            if c > 0 or (self.hi_open and c == 0):
                return False
        return None

    def _outside_bounds(self, lo, hi) -> bool:
        if self.lo is not None:
            c = _cmp(hi, self.lo)
            if c < 0 or (self.lo_open and c == 0):
                return True
        if self.hi is not None:
            c = _cmp(lo, self.hi)
            if c > 0 or (self.hi_open and c == 0):
                return True
        return False

    def pretty(self) -> str:
        if self.integer:
            if self.lo is None and self.hi is None:
                return "integer"
            return "integer " + Domain(self.text, self.lo, self.hi, self.lo_open, self.hi_open).pretty()
        if self.nonzero:
            if self.lo is None and self.hi is None:
                return "nonzero"
            return "nonzero " + Domain(self.text, self.lo, self.hi, self.lo_open, self.hi_open).pretty()
        if self.is_finite:
            return "{" + ", ".join(str(v) for v in self.values) + "}"
        if self.lo is None and self.hi is None:
            return "real"
        lo = "-oo" if self.lo is None else str(self.lo)
        hi = "oo" if self.hi is None else str(self.hi)
        return ("(" if self.lo_open else "[") + f"{lo}, {hi}" + (")" if self.hi_open else "]")

    # -- proof support ---------------------------------------------------------------------
    def parametrise(self, name: str):
        """Return (expression, fresh symbol) so that the expression ranges over the domain.

        The fresh symbol carries SymPy assumptions (positive / nonnegative / real).
        For a finite set returns None: those are case-split instead.
        """
        if self.is_finite:
            return None
        lo, hi = self.lo, self.hi
        if self.integer:  # lo + w, hi - w with w a nonnegative integer, or an integer
            if lo is not None:
                w = sp.Dummy(name, integer=True, nonnegative=True)
                return lo + w, w
            if hi is not None:
                w = sp.Dummy(name, integer=True, nonnegative=True)
                return hi - w, w
            w = sp.Dummy(name, integer=True)
            return w, w
        if self.nonzero and (lo is None or lo < 0) and (hi is None or hi > 0):
            w = sp.Dummy(name, real=True, nonzero=True)  # the sign is case-split instead
            return w, w
        if lo is None and hi is None:
            w = sp.Dummy(name, real=True)
            return w, w
        if hi is None:  # (lo, oo) or [lo, oo)
            w = sp.Dummy(name, positive=True) if self.lo_open else sp.Dummy(name, nonnegative=True)
            return lo + w, w
        if lo is None:  # (-oo, hi) or (-oo, hi]
            w = sp.Dummy(name, positive=True) if self.hi_open else sp.Dummy(name, nonnegative=True)
            return hi - w, w
        width = hi - lo
        if self.lo_open and self.hi_open:
            w = sp.Dummy(name, positive=True)
            return lo + width / (1 + w), w
        if self.lo_open:  # (lo, hi]
            w = sp.Dummy(name, nonnegative=True)
            return lo + width / (1 + w), w
        if self.hi_open:  # [lo, hi)
            w = sp.Dummy(name, nonnegative=True)
            return hi - width / (1 + w), w
        # [lo, hi]: lo + width * v with v in [0, 1]; v is only known to be nonnegative here
        w = sp.Dummy(name, nonnegative=True)
        return lo + width * w / (1 + w), w  # covers [lo, hi); hi itself is checked numerically

    def scale_samples(self) -> list[sp.Rational]:
        """Values at every scale the domain allows, in a fixed order: tiny and huge
        magnitudes of both signs, and points a hair inside each finite bound (the moderate
        values come from :meth:`samples`)."""
        if self.is_finite:
            return []
        if self.integer:
            base = self.lo if self.lo is not None else (self.hi if self.hi is not None else 0)
            cands = [base + 1000, base - 1000, base + 10**12, base - 10**12, base + 1001, base - 999]
            return [c for c in dict.fromkeys(sp.Integer(c) for c in cands) if self.contains(c)]
        tiny, big, huge = sp.Rational(1, 10**20), sp.Integer(1000), sp.Integer(10**12)
        cands = []
        if self.lo is None and self.hi is None:
            cands = [tiny, -tiny, big, -big, huge, -huge, sp.Rational(1, 10**6), -sp.Rational(10**6, 7)]
        elif self.hi is None:
            cands = [self.lo + tiny, self.lo + big, self.lo + huge, self.lo + sp.Rational(1, 10**6)]
        elif self.lo is None:
            cands = [self.hi - tiny, self.hi - big, self.hi - huge, self.hi - sp.Rational(1, 10**6)]
        else:
            w = self.hi - self.lo
            cands = [self.lo + w * tiny, self.hi - w * tiny, self.lo + w / 10**6, self.hi - w / 10**6]
        out = []
        for c in cands:
            if self.contains(c) and c not in out:
                out.append(c)
        return out

    def samples(self, rng: random.Random, count: int) -> list[sp.Rational]:
        """Simple values first, then random ones; every value lies in the domain."""
        if self.is_finite:
            return [self.values[i % len(self.values)] for i in range(count)]
        if self.integer:
            return self._integer_samples(rng, count)
        nice = [Fraction(v) for v in ("1", "1/3", "2", "-1", "1/2", "3", "-2", "0", "5/7", "-1/3", "7/2", "4")]
        out = [v for v in nice if self.contains(v)]
        # endpoints of closed intervals are worth testing (gamma = 0, alpha = 1)
        for bound, is_open in ((self.lo, self.lo_open), (self.hi, self.hi_open)):
            if bound is not None and not is_open:
                out.insert(1, Fraction(int(bound.p), int(bound.q)))
        lo = float(self.lo) if self.lo is not None else -6.0
        hi = float(self.hi) if self.hi is not None else 6.0
        if self.lo is not None and self.hi is None:
            hi = lo + 8.0
        if self.hi is not None and self.lo is None:
            lo = hi - 8.0
        while len(out) < count:
            v = Fraction(rng.uniform(lo, hi)).limit_denominator(10_000)
            if self.contains(v):
                out.append(v)
        return [sp.Rational(v.numerator, v.denominator) for v in out[:count]]


    def _integer_samples(self, rng, count):
        """Integers of the domain: the bounds, 0, odd and even values of both signs, then
        random ones (bounded domains with few integers repeat them)."""
        out = []
        lo = int(self.lo) if self.lo is not None else None
        hi = int(self.hi) if self.hi is not None else None
        start = lo if lo is not None else (hi if hi is not None else 0)
        for v in (start, start + 1, start + 2, start + 3, 0, 1, 2, 3, -1, -2, 5, 7, 10, 4, -3, 6):
            f = Fraction(v)
            if self.contains(f) and f not in out:
                out.append(f)
        a = lo if lo is not None else (hi - 40 if hi is not None else -20)
        b = hi if hi is not None else a + 40
        tries = 0
        while len(out) < count and tries < 100 * count:
            tries += 1
            f = Fraction(rng.randint(a, b))
            if self.contains(f) and (f not in out or b - a + 1 <= len(out)):
                out.append(f)
        while len(out) < count:
            out.append(out[len(out) % max(1, len(out))])
        return [sp.Rational(v.numerator, v.denominator) for v in out[:count]]


REAL = Domain.parse("real")
