"""Indexed families and sums over classes: ``x[k]``, ``sum(f, k)``, ``delta(a, b)``, ``D(f, x[j])``.

A step that uses them is decided in two ways that never mix:

* **Proof for every K** (the number of classes stays a symbol).  The free indices of the step (``t``,
  ``j``, ...) are split into cases by which of them are equal (``j == t``, ``j != t``); in each case the
  step is *lowered* to an ordinary scalar step: each distinct index becomes a class of its own, a member
  ``x[t]`` a real symbol, ``delta`` 1 or 0, and each ``sum(f, k)`` the terms of the distinct classes plus
  the sum over the K - m other classes, written with atoms: ``sum_{k not t, j} (a*exp(x[k]) + b)`` is
  ``a*R + b*(K - 2)`` with ``R`` a symbol that stands for ``sum exp(x[k])`` over the other classes
  (R >= 0, or R > 0 when the declared least K leaves at least one other class).  The lowered step is an
  identity in ordinary symbols; the proof engine proves it for *all* values of those symbols (the atoms
  taken as independent reals in their sign domain: a superset of the values they can take), which
  proves the step for every K.  A term of a sum that cannot be separated into a factor free of the
  summed index times a product of members (``log(S + exp(x[k]))``) makes the case unproved, never
  "proved".
* **Numbers at concrete sizes** (refutation and confirmation).  The step is instantiated at K = 2, 3 and
  7 classes (the sums written out, the indices given values that realise each case), and compared with
  mpmath at sample points of the families' domains: a counterexample is a possible point (K an integer
  of its domain, every index in 0..K-1, distinct indices where the case says so) and names them all.
"""
from __future__ import annotations

import itertools
import time

import sympy as sp

from derive.language.domains import Domain
from derive.language.functions import D
from derive.language.loader import Context, subs_free

#: the sizes every indexed step is instantiated at (those of each size symbol's domain)
SIZES = (2, 3, 7)
#: the most free indices of one size that a step may split into equality cases (Bell(4) = 15 cases)
MAX_FREE_INDICES = 4


class LoweringError(Exception):
    """A step cannot be lowered to a scalar one (an inseparable term of a sum, a nested sum over the same
    classes, a derivative by a parameter inside a sum over the other classes)."""


_GENERIC = object()  # the summed index in the sum over the other classes


def _partitions(items):
    """Every partition of ``items`` into blocks (set partitions), in a fixed order."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1:]
        yield [[first]] + part


class Lowering:
    """One case of the indices, lowered into an ordinary context.

    ``rep``: free index symbol -> its value (a representative index symbol, or an Integer at a concrete
    size); ``specials``: size symbol -> the distinct values of that size; ``concrete``: size symbol ->
    Integer when the sizes are instantiated (then every class is special and there is no rest)."""

    def __init__(self, ctx: Context, rep: dict, specials: dict, concrete: dict | None = None):
        self.ctx = ctx
        self.rep = rep
        self.specials = specials
        self.concrete = concrete
        self.sizes = ctx.index_size
        self.names: dict = {}
        self.domains: dict = {}
        self.definitions: dict = {}
        self.origin: dict = {}  # lowered defined symbol -> the original definition symbol (S, or p's label)
        self.atoms: dict = {}  # key (summand with generic members) -> atom symbol
        self.atom_keys: dict = {}
        self._generic: dict = {}
        self._memo: dict = {}
        self._lowering: set = set()

    # -- symbols ---------------------------------------------------------------------------
    def _add_base(self, sym, dom):
        if sym.name not in self.names:
            self.names[sym.name] = sym
            self.domains[sym] = dom

    def _member_name(self, base, value):
        return f"{base.label.name}[{value}]"

    def _family_symbol(self, base, value):
        dom = self.ctx.families[base]
        kw = {k: v for k, v in base.assumptions0.items() if k in ("real", "integer", "positive", "nonnegative")}
        sym = sp.Symbol(self._member_name(base, value), **(kw or {"real": True}))
        self._add_base(sym, dom)
        return sym

    def _generic_symbol(self, base):
        sym = self._generic.get(base)
        if sym is None:
            kw = {k: v for k, v in base.assumptions0.items() if k in ("real", "integer", "positive", "nonnegative")}
            sym = sp.Dummy(f"{base.label.name}[k]", **(kw or {"real": True}))
            self._generic[base] = sym
        return sym

    def _defined(self, sym, rhs_fn, origin):
        """A lowered definition, added (after everything it uses) the first time it is met."""
        if sym in self.definitions or sym in self._lowering:
            if sym in self._lowering:
                raise LoweringError(f"definition {origin} refers to itself through its members")
            return sym
        self._lowering.add(sym)
        try:
            rhs = rhs_fn()
        finally:
            self._lowering.discard(sym)
        self.names[sym.name] = sym
        self.definitions[sym] = rhs
        self.origin[sym] = origin
        dom = self.ctx.domains.get(origin)
        if dom is not None:
            self.domains[sym] = dom
        return sym

    def member(self, label, value):
        """The lowered member p[value] of the indexed definition with label ``label``."""
        k, base = self.ctx.indexed_defs[label]
        sym = sp.Symbol(self._member_name(base, value), real=True)
        return self._defined(sym, lambda: self.lower(self.ctx.definitions[label], {k: value}), label)

    def _value(self, idx, env):
        if idx in env:
            return env[idx]
        if idx in self.rep:
            return self.rep[idx]
        if idx in self.sizes and not isinstance(idx, sp.IndexedBase):
            raise LoweringError(f"index {idx} has no value in this case")
        return None

    def _size_value(self, size):
        if self.concrete is not None and size in self.concrete:
            return self.concrete[size]
        return size

    # -- expressions -----------------------------------------------------------------------
    def lower(self, e, env=None):
        env = env or {}
        key = (e, tuple(sorted(((str(a), id(b) if b is _GENERIC else b) for a, b in env.items()), key=str)))
        hit = self._memo.get(key)
        if hit is None:
            hit = self._lower(e, env)
            self._memo[key] = hit
        return hit

    def _lower(self, e, env):
        if not isinstance(e, sp.Basic):
            return e
        if isinstance(e, sp.Sum):
            return self._sum(e, env)
        if isinstance(e, sp.Indexed):
            base = e.base
            val = self._value(e.indices[0], env)
            if val is None:
                raise LoweringError(f"{e}: its index is not a declared index")
            if val is _GENERIC:
                if base.label in self.ctx.indexed_defs:
                    k, _ = self.ctx.indexed_defs[base.label]
                    return self.lower(self.ctx.definitions[base.label], {k: _GENERIC})
                return self._generic_symbol(base)
            if base.label in self.ctx.indexed_defs:
                return self.member(base.label, val)
            return self._family_symbol(base, val)
        if isinstance(e, sp.KroneckerDelta):
            a, b = (self._value(i, env) for i in e.args)
            if a is None or b is None:
                raise LoweringError(f"{e}: delta of something that is not an index")
            if a is _GENERIC and b is _GENERIC:
                return sp.S.One
            if a is _GENERIC or b is _GENERIC:
                return sp.S.Zero  # the other classes differ from every distinct index of the case
            return sp.S.One if a == b else sp.S.Zero
        if isinstance(e, (sp.Eq, sp.Ne)) and e.lhs in self.sizes and e.rhs in self.sizes \
                and not isinstance(e.lhs, sp.IndexedBase) and not isinstance(e.rhs, sp.IndexedBase):
            a, b = self._value(e.lhs, env), self._value(e.rhs, env)
            if a is _GENERIC or b is _GENERIC:
                same = a is b
            else:
                same = a == b
            return sp.true if same == isinstance(e, sp.Eq) else sp.false
        if isinstance(e, sp.Symbol):
            if e in self.sizes:  # an index used as a number (t/K)
                val = self._value(e, env)
                if val is _GENERIC:
                    raise LoweringError(f"the summed index {e} used as a number")
                if isinstance(val, sp.Integer):
                    return val
                self._add_base(val, Domain.parse("integer [0, oo)"))
                return val
            if self.concrete is not None and e in self.concrete:
                return self.concrete[e]
            if e in self.ctx.definitions:
                if e in self.ctx.indexed_defs:
                    raise LoweringError(f"{e} is an indexed definition: write {e}[k]")
                return self._defined(e, lambda: self.lower(self.ctx.definitions[e], {}), e)
            dom = self.ctx.domains.get(e)
            if dom is not None:
                self._add_base(e, dom)
            return e
        if isinstance(e, D):
            f, v = e.args
            lv = self.lower(v, env)
            if not isinstance(lv, sp.Symbol):
                raise LoweringError(f"D(f, {v}): the variable lowers to {lv}")
            return D(self.lower(f, env), lv)
        if not e.args:
            return e
        args = [self.lower(a, env) for a in e.args]
        return e.func(*args)

    def _sum(self, e, env):
        f = e.function
        (k, _, _), = e.limits
        size = self.sizes[k]
        if k in env and env[k] is _GENERIC or any(v is _GENERIC for v in env.values()) and _uses(f, env):
            raise LoweringError(f"a sum over {k} inside a sum over the other classes that depends on its index")
        vals = self.specials.get(size, [])
        terms = [self.lower(f, {**env, k: v}) for v in vals]
        if self.concrete is None:
            terms.append(self._rest(f, k, env, size, len(vals)))
        return sp.Add(*terms)

    def _rest(self, f, k, env, size, m):
        """The sum of f over the classes other than the case's distinct indices, with atoms."""
        g = self.lower(f, {**env, k: _GENERIC})
        gens = set(self._generic.values())
        if not g.has(*gens) if gens else True:
            return g * (size - m)
        # the lowered scalar definitions (S) inside the summand, expanded: their sign is then known
        full = self._full()
        g = g.xreplace(full) if full else g
        # log(e^{v/T}/S) = v/T - log(S) needs T > 0 known: the base symbols carry their domains' signs
        signed, back = _signed(g, self.domains)
        g = sp.expand_log(g.xreplace(signed))
        g = sp.expand(g, power_exp=False, power_base=False, log=False, multinomial=True, mul=True).xreplace(back)
        nonempty = self._least(size) > m
        out = sp.S.Zero
        for term in sp.Add.make_args(g):
            dep, indep = [], []
            for fac in sp.Mul.make_args(term):
                (dep if fac.has(*gens) else indep).append(fac)
            if not dep:
                out += term * (size - m)
                continue
            key = sp.Mul(*dep)
            bad = [s for s in key.free_symbols if s not in gens and (s in self.definitions or s.name in self.names
                                                                     and "[" in s.name)]
            if bad:
                raise LoweringError(f"a term of a sum over the other classes, {key}, depends on "
                                    f"{', '.join(sorted(map(str, bad)))} and cannot be separated")
            out += sp.Mul(*indep) * self._atom(key, nonempty)
        return out

    def _least(self, size):
        dom = self.ctx.domains.get(size)
        return int(dom.lo) if dom is not None and dom.lo is not None else 1

    def _atom(self, key, nonempty):
        hit = self.atoms.get(key)
        if hit is not None:
            return hit
        name = "sum'(" + str(key).replace("_", "") + ")"
        signed, _ = _signed(key, self.domains)
        key_s = key.xreplace(signed)
        if key_s.is_positive:
            sym = sp.Symbol(name, positive=True) if nonempty else sp.Symbol(name, nonnegative=True)
            dom = Domain.parse("(0, oo)" if nonempty else "[0, oo)")
        elif key_s.is_nonnegative:
            sym, dom = sp.Symbol(name, nonnegative=True), Domain.parse("[0, oo)")
        elif key_s.is_negative:
            sym = sp.Symbol(name, negative=True) if nonempty else sp.Symbol(name, nonpositive=True)
            dom = Domain.parse("(-oo, 0)" if nonempty else "(-oo, 0]")
        elif key_s.is_nonpositive:
            sym, dom = sp.Symbol(name, nonpositive=True), Domain.parse("(-oo, 0]")
        else:
            sym, dom = sp.Symbol(name, real=True), Domain.parse("real")
        self.atoms[key] = sym
        self.atom_keys[sym] = key
        self._add_base(sym, dom)
        return sym

    def _full(self):
        cache = {}
        for sym, rhs in self.definitions.items():
            cache[sym] = rhs.xreplace(cache)
        return cache

    def context(self) -> Context:
        return Context(dict(self.names), dict(self.domains), dict(self.definitions), {})

    def check_atoms(self, exprs, diff_vars):
        """A derivative by a symbol that an atom of the other classes depends on cannot treat the atom as a
        constant: refuse (the case stays unproved)."""
        used = set()
        full = self._full()
        for e in exprs:
            used |= (e.xreplace(full) if full else e).free_symbols
        for atom in used & set(self.atom_keys):
            hit = self.atom_keys[atom].free_symbols & diff_vars
            if hit:
                raise LoweringError(f"D(f, {sorted(map(str, hit))[0]}) of a sum over the other classes whose terms "
                                    f"depend on it ({self.atom_keys[atom]})")


def _signed(e, domains):
    """({symbol: a Dummy with the sign its domain gives}, the way back) for the free symbols of ``e``."""
    to, back = {}, {}
    for s in e.free_symbols:
        dom = domains.get(s)
        if dom is None or dom.is_finite or dom.lo is None or s.is_nonnegative:
            continue
        if dom.lo > 0 or (dom.lo == 0 and dom.lo_open):
            d = sp.Dummy(s.name, positive=True)
        elif dom.lo >= 0:
            d = sp.Dummy(s.name, nonnegative=True)
        else:
            continue
        to[s], back[d] = d, s
    return to, back


def sign_proof(expr, dom, domains) -> bool:
    """Whether SymPy's assumptions show ``expr`` (base symbols only) inside the interval ``dom``: the
    differences with its bounds, made one fraction and factored, have a known sign once each symbol
    carries the sign of its domain."""
    if dom.is_finite:
        return False
    signed, _ = _signed(expr, domains)
    e = expr.xreplace(signed)
    for diff, strict in ((e - dom.lo, dom.lo_open) if dom.lo is not None else (None, None),
                         (dom.hi - e, dom.hi_open) if dom.hi is not None else (None, None)):
        if diff is None:
            continue
        try:
            f = sp.factor(sp.cancel(sp.together(diff)))
        except Exception:
            return False
        if not (f.is_positive if strict else f.is_nonnegative):
            return False
    return True


def _uses(f, env):
    return bool(f.free_symbols & set(env))


def _diff_vars(exprs):
    out = set()
    for e in exprs:
        for d in e.atoms(D):
            v = d.args[1]
            if isinstance(v, sp.Symbol):
                out.add(v)
    return out


def _has_indexed(e) -> bool:
    return isinstance(e, sp.Basic) and e.has(sp.Sum, sp.Indexed, sp.KroneckerDelta)


class IndexedChecker:
    """The checks of one Prover whose context declares indices, families or sums (see the module)."""

    def __init__(self, prover):
        self.prover = prover
        self.ctx = prover.ctx
        self.proved: set = set()  # original definitions whose declared domain is proved for every K

    # -- what a step involves ------------------------------------------------------------------
    def _indexed(self, exprs) -> bool:
        full = [self.ctx.expand(e) for e in exprs]
        idx = {s for s in self.ctx.index_size if isinstance(s, sp.Symbol)}
        return any(_has_indexed(e) or (e.free_symbols & idx) for e in full)

    def free_indices(self, exprs):
        idx = {s for s in self.ctx.index_size if isinstance(s, sp.Symbol)}
        found = set()
        for e in exprs:
            found |= self.ctx.expand(e).free_symbols & idx
        return sorted(found, key=lambda s: s.name)

    def cases(self, free):
        """[(rep, specials, description)] for every equality pattern of the free indices, per size."""
        by_size: dict = {}
        for s in free:
            by_size.setdefault(self.ctx.index_size[s], []).append(s)
        for size, items in by_size.items():
            if len(items) > MAX_FREE_INDICES:
                raise LoweringError(f"{len(items)} free indices over 0..{size}-1; the limit is {MAX_FREE_INDICES}")
        sizes = sorted(by_size, key=lambda s: s.name)
        # every size symbol that a sum ranges over has a (possibly empty) list of specials
        all_sizes = {v for v in self.ctx.index_size.values()}
        out = []
        for parts in itertools.product(*[list(_partitions(by_size[s])) for s in sizes]):
            rep, specials, desc = {}, {z: [] for z in all_sizes}, []
            for size, part in zip(sizes, parts):
                for block in part:
                    r = block[0]
                    for s in block:
                        rep[s] = r
                    specials[size].append(r)
                    if len(block) > 1:
                        desc.append(" == ".join(s.name for s in block))
                if len(part) > 1:
                    desc.append(" != ".join(b[0].name for b in part) if len(part) == 2 else
                                "distinct " + ", ".join(b[0].name for b in part))
            out.append((rep, specials, "; ".join(desc) or "one class"))
        return out

    # -- concrete sizes ----------------------------------------------------------------------------
    def _size_values(self, size):
        dom = self.ctx.domains.get(size)
        vals = [v for v in SIZES if dom is None or dom.contains(v)]
        if dom is not None and dom.lo is not None and int(dom.lo) not in vals and dom.contains(int(dom.lo)):
            vals.insert(0, int(dom.lo))
        return vals

    def instances(self, rep, specials, many=False):
        """(concrete sizes, values of the representatives) realising the case, at each size of SIZES."""
        sizes = sorted({self.ctx.index_size[r] for r in set(rep.values())} | set(specials), key=lambda s: s.name)
        per = {z: self._size_values(z) for z in sizes}
        n = max((len(v) for v in per.values()), default=0)
        out = []
        for i in range(n):
            conc = {z: sp.Integer(per[z][min(i, len(per[z]) - 1)]) for z in sizes}
            reps_by_size = {z: specials.get(z, []) for z in sizes}
            if any(len(reps_by_size[z]) > int(conc[z]) for z in sizes):
                continue
            choices = []
            for z in sizes:
                m, kv = len(reps_by_size[z]), int(conc[z])
                perms = list(itertools.permutations(range(kv), m))
                picks = perms if many and len(perms) <= 6 else \
                    [perms[(len(perms) // 2 + 1) % len(perms)]] + ([perms[0], perms[-1]] if many else [])
                choices.append([(z, p) for p in dict.fromkeys(picks)])
            for combo in itertools.product(*choices):
                values = {}
                for z, p in combo:
                    for r, v in zip(reps_by_size[z], p):
                        values[r] = sp.Integer(v)
                out.append((conc, values))
        return out

    def _concrete(self, rep, specials, conc, values, exprs):
        crep = {s: values[r] for s, r in rep.items()}
        cspec = {z: [sp.Integer(v) for v in range(int(conc[z]))] for z in specials}
        for z in conc:
            cspec.setdefault(z, [sp.Integer(v) for v in range(int(conc[z]))])
        low = Lowering(self.ctx, crep, cspec, concrete=conc)
        lowered = [low.lower(e) for e in exprs]
        return low, lowered

    def _scan(self, lhs, rhs, rep, specials, many):
        """A counterexample at a concrete size, as (cex dict, scan dps), or None; and the points agreeing."""
        from derive.prover.engine import CONFIRM_POINTS, SCREEN_POINTS, Prover

        agree = 0
        notes = []
        for conc, values in self.instances(rep, specials, many):
            assume = list(self.prover.assumptions)
            low, lowered = self._concrete(rep, specials, conc, values, [lhs, rhs] + assume)
            conds = lowered[2:]
            if any(c is sp.false for c in conds):
                continue
            conds = [c for c in conds if c is not sp.true]
            cp = Prover(low.context(), seed=self.prover.seed, step_timeout=self.prover.step_timeout,
                        deadline=self.prover.deadline, assumptions=conds)
            L = cp.ctx.expand(cp.resolver.resolve(lowered[0]))
            R = cp.ctx.expand(cp.resolver.resolve(lowered[1]))
            pts = cp.points(CONFIRM_POINTS if many else SCREEN_POINTS)
            pts = pts + cp.threshold_points((L, R), pts)
            scan = cp.numeric_scan(L, R, pts)
            if scan.cex is not None:
                where = {z.name: str(v) for z, v in conc.items()}
                where.update({s.name: str(values[r]) for s, r in sorted(rep.items(), key=lambda kv: kv[0].name)})
                scan.cex["point"] = {**where, **scan.cex["point"]}
                if "reason" in scan.cex:
                    scan.cex["reason"] = scan.cex["reason"].replace(
                        "undefined at ", "undefined at " + ", ".join(f"{k} = {v}" for k, v in where.items()) + ", ", 1)
                return scan, agree, notes
            agree += scan.agree
            notes.append(", ".join(f"{z.name} = {v}" for z, v in conc.items()))
        return None, agree, notes

    # -- steps ---------------------------------------------------------------------------------
    def check(self, lhs, rhs, t0):
        from derive.prover.engine import CONFIRMED, PROVED, REFUTED, UNPROVED, Verdict, _refuted

        p = self.prover
        if not self._indexed([lhs, rhs] + list(p.assumptions)):
            return None  # an ordinary step: the plain engine decides it
        try:
            free = self.free_indices([lhs, rhs] + list(p.assumptions))
            cases = self.cases(free)
        except LoweringError as exc:
            return Verdict(UNPROVED, "indices", seconds=time.monotonic() - t0, detail=str(exc))
        from derive.prover.engine import StrategyTimeout, time_limit

        # 1. counterexamples at K = 2, 3, 7, in every case of the indices
        for rep, specials, desc in cases:
            try:
                with time_limit(p._limit(floor=2.0)):
                    scan, _, _ = self._scan(lhs, rhs, rep, specials, many=False)
            except LoweringError as exc:
                return Verdict(UNPROVED, "indices", seconds=time.monotonic() - t0, detail=str(exc))
            except StrategyTimeout:
                scan = None
            if scan is not None:
                v = _refuted(scan, t0)
                v.method = f"{v.method} at {', '.join(f'{k} = {x}' for k, x in list(scan.cex['point'].items()))}" \
                    if "reason" not in scan.cex else v.method
                v.detail = f"case {desc}"
                return v
        # 2. a proof for every K, case by case
        methods, failed = [], []
        diff_vars = _diff_vars([lhs, rhs])
        for rep, specials, desc in cases:
            try:
                low = Lowering(self.ctx, rep, specials)
                lowered = [low.lower(e) for e in [lhs, rhs] + list(p.assumptions)]
                low.check_atoms(lowered[:2], diff_vars)
            except LoweringError as exc:
                failed.append(f"{desc}: {exc}")
                continue
            conds = lowered[2:]
            if any(c is sp.false for c in conds):
                methods.append(f"{desc}: excluded by the assumptions")
                continue
            conds = [c for c in conds if c is not sp.true]
            lp = self._lowered_prover(low, conds)
            name, tried = lp.prove(lowered[0], lowered[1])
            if name is not None:
                methods.append(f"{desc}: {name}")
            else:
                failed.append(f"{desc}: " + ("; ".join(tried) or "no strategy"))
        if not failed:
            return Verdict(PROVED, f"every {self._size_names()} (indices split: " + "; ".join(methods) + ")",
                           seconds=time.monotonic() - t0)
        # 3. numbers at more points and index values (weaker evidence)
        total, notes = 0, []
        for rep, specials, desc in cases:
            try:
                with time_limit(p._limit(floor=2.0)):
                    scan, agree, n = self._scan(lhs, rhs, rep, specials, many=True)
            except StrategyTimeout:
                return Verdict(UNPROVED, "time limit", seconds=time.monotonic() - t0, tried=failed,
                               detail="numbers at K = 2, 3, 7 ran past the time limit; " + "; ".join(failed))
            if scan is not None:
                v = _refuted(scan, t0, failed)
                v.detail = f"case {desc}"
                return v
            total += agree
            notes += n
        if total == 0:
            return Verdict(UNPROVED, "no valid sample point", seconds=time.monotonic() - t0, tried=failed,
                           detail="; ".join(failed))
        return Verdict(CONFIRMED, f"mpmath, seed {p.seed}: {total} points at "
                       + "; ".join(dict.fromkeys(notes)), seconds=time.monotonic() - t0, tried=failed,
                       detail="not proved for every K: " + "; ".join(failed))

    def _lowered_prover(self, low, conds):
        from derive.prover.engine import Prover

        p = self.prover
        lp = Prover(low.context(), seed=p.seed, step_timeout=p.step_timeout, deadline=p.deadline,
                    strategies=p.strategies, assumptions=conds)
        lp.proved_domains = {s for s, o in low.origin.items() if o in self.proved}
        # a lowered step is an identity in exp() of the members and the atoms: the expanded strategy is the
        # one that decides most of them; the domains strategy (definitions as atoms) rarely can
        lp.strategy_order = ("expanded", "algebra", "simplify", "domains")
        return lp

    # -- domains of definitions ----------------------------------------------------------------------
    def check_domain(self, sym, t0):
        from derive.prover.engine import PROVED, REFUTED, UNPROVED, Verdict

        ctx = self.ctx
        label_index = ctx.indexed_defs.get(sym)
        if label_index is None and not self._indexed([sym]):
            return None
        extra = [label_index[1][label_index[0]]] if label_index else [sym]
        expr = extra[0]
        try:
            cases = self.cases(self.free_indices(extra))
        except LoweringError as exc:
            return Verdict(UNPROVED, "indices", seconds=time.monotonic() - t0, detail=str(exc))
        from derive.prover.engine import Prover

        # numbers first: a value outside the domain at K = 2, 3, 7 refutes the declaration
        for rep, specials, desc in cases:
            for conc, values in self.instances(rep, specials):
                try:
                    low, (target,) = self._concrete(rep, specials, conc, values, [expr])
                except LoweringError as exc:
                    return Verdict(UNPROVED, "indices", seconds=time.monotonic() - t0, detail=str(exc))
                cp = Prover(low.context(), seed=self.prover.seed, step_timeout=self.prover.step_timeout,
                            deadline=self.prover.deadline)
                full = cp.ctx.expand(cp.ctx.definitions[target])
                dom = ctx.domains[sym]
                prep = __import__("derive.prover.engine", fromlist=["_prepare_numeric"])._prepare_numeric(full)
                for pt in cp.points(12):
                    where, text = cp._domain_point(prep, full, dom, pt)
                    if where == "outside":
                        v = cp._outside(full, dom, text, pt, t0)
                        v.counterexample["point"] = {**{z.name: str(x) for z, x in conc.items()},
                                                     **{s.name: str(values[r]) for s, r in rep.items()},
                                                     **v.counterexample["point"]}
                        return v
        methods = []
        for rep, specials, desc in cases:
            try:
                low = Lowering(ctx, rep, specials)
                target = low.lower(expr)
            except LoweringError as exc:
                return Verdict(UNPROVED, "indices", seconds=time.monotonic() - t0, detail=f"{desc}: {exc}")
            lp = self._lowered_prover(low, [])
            v = lp.check_domain(target)
            if v.status != PROVED and sign_proof(lp.ctx.expand(target), ctx.domains[sym], lp.ctx.domains):
                v = Verdict(PROVED, "signs of the factored differences with the bounds (each symbol's domain "
                            "as its sign)")
            if v.status != PROVED:
                why = v.method if v.status != REFUTED else "not proved for every value of the lowered symbols"
                return Verdict(UNPROVED, why, seconds=time.monotonic() - t0, detail=f"case {desc}: {v.detail}")
            methods.append(v.method)
        self.proved.add(sym)
        self.prover.proved_domains.add(sym)
        return Verdict(PROVED, f"every {self._size_names()}: " + "; ".join(dict.fromkeys(methods)),
                       seconds=time.monotonic() - t0)

    def _size_names(self):
        return ", ".join(sorted({s.name for s in self.ctx.index_size.values()}))
