"""Verify derivation files: every step of every chain, errata, corrected lines, domains."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import sympy as sp

from derive.language.loader import DerivationFile, TextSource, load_file, load_text
from derive.prover.engine import CONFIRMED, DEFAULT_SEED, PROVED, REFUTED, UNPROVED, Prover, Verdict

OK, ERRATUM, FAIL = "ok", "erratum", "fail"


def builtin_files() -> list[Path]:
    """The derivation files shipped with the package (the note and the kernels' stable forms), then the rules
    of derive.rewrite (derive/rewrite/rules.toml: each rule is proved here once)."""
    root = resources.files("derive") / "derivations"
    rules = Path(str(resources.files("derive") / "rewrite" / "rules.toml"))
    return sorted(Path(str(p)) for p in root.iterdir() if p.name.endswith(".toml")) + [rules]


def _by_transitivity(e2e, steps) -> None:
    """A chain's first line equals its last when every step between them is proved: equality is
    transitive, and every step is proved on the same domains and assumptions as the end-to-end check.
    The direct check runs first (its sample points are a second look at the steps); when it finds
    no proof and no counterexample, the end-to-end check is proved by the chain.  A refuted direct
    check with every step proved would mean a wrong proof somewhere: it stays refuted."""
    if e2e is None or e2e.verdict.status in (PROVED, REFUTED):
        return
    if not steps or any(c.verdict.status != PROVED for c in steps):
        return
    v = e2e.verdict
    e2e.verdict = Verdict(PROVED, method=f"transitivity: each of the chain's {len(steps)} steps proved",
                          seconds=v.seconds + sum(c.verdict.seconds for c in steps),
                          detail=f"the direct check was {v.status}" + (f" ({v.detail})" if v.detail else ""),
                          tried=list(v.tried))


@dataclass
class Check:
    file: str
    derivation: str
    chain: str | None
    kind: str  # "domain", "step", "end-to-end", "corrected step", "corrected end-to-end"
    index: int | None
    lhs: str
    rhs: str
    lhs_latex: str
    rhs_latex: str
    verdict: Verdict
    rule: str | None = None
    note_latex: str | None = None
    erratum: str | None = None  # erratum id this check belongs to
    status: str = OK
    message: str = ""
    instances: dict = field(default_factory=dict)
    path: str = ""  # the file as given (``file`` is its base name); "<stdin>" for standard input
    file_no: int = 0  # index of the file in Report.files: two files of the same name stay apart

    def to_json(self):
        out = {
            "file": self.path or self.file,
            "derivation": self.derivation,
            "chain": self.chain,
            "kind": self.kind,
            "step": self.index,
            "expression": f"{self.lhs} {'in' if self.kind == 'domain' else '='} {self.rhs}",
            "lhs": self.lhs,
            "rhs": self.rhs,
            "latex": f"{self.lhs_latex} = {self.rhs_latex}",
            "note_latex": self.note_latex,
            "rule": self.rule,
            "status": self.status,
            "erratum": self.erratum,
            "message": self.message,
            "instances": self.instances,
        }
        out.update(self.verdict.to_json())
        return out


@dataclass
class ErratumRecord:
    id: str
    file: str
    derivation: str
    chain: str
    line: int
    written: str
    written_latex: str | None
    corrected: str
    why: str
    refuted_by: list = field(default_factory=list)  # Check objects that refute the written line
    corrected_checks: list = field(default_factory=list)
    status: str = OK
    message: str = ""
    path: str = ""  # the file as given
    file_no: int = 0


@dataclass
class Report:
    files: list = field(default_factory=list)  # (path as given, title), in the order verified
    checks: list = field(default_factory=list)
    errata: list = field(default_factory=list)
    errors: list = field(default_factory=list)  # malformed files: (path, message)
    seconds: float = 0.0
    seed: int = DEFAULT_SEED
    allow_numeric: bool = False

    @property
    def failed(self):
        return [c for c in self.checks if c.status == FAIL] + [e for e in self.errata if e.status == FAIL]

    def exit_code(self) -> int:
        if self.errors:
            return 2
        return 1 if self.failed else 0

    def counts(self):
        from collections import Counter

        return Counter(c.verdict.status for c in self.checks)


def _tex(expr, ctx):
    try:
        return sp.latex(expr, symbol_names=ctx.latex_names) if ctx.latex_names else sp.latex(expr)
    except Exception:  # printing must never sink a report
        try:
            return str(expr)
        except Exception:
            return "(cannot be printed)"


def _used_domains(deriv):
    """The defined symbols with a declared domain that the derivation's lines use (transitively)."""
    ctx = deriv.context
    used = set()
    for chain in deriv.chains:
        for line in chain.lines:
            exprs = [line.expr] + ([line.erratum.corrected] if line.erratum else [])
            for e in exprs:
                used |= e.free_symbols
    frontier = list(used)
    while frontier:
        s = frontier.pop()
        for t in ctx.definitions.get(s, sp.S.Zero).free_symbols:
            if t not in used:
                used.add(t)
                frontier.append(t)
    return [sym for sym in ctx.definitions if sym in used and sym in ctx.domains]


def count_checks(df: DerivationFile) -> int:
    """How many checks verifying ``df`` makes (what a progress line counts to)."""
    total = 0
    for deriv in df.derivations:
        total += len(_used_domains(deriv))
        for chain in deriv.chains:
            n = len(chain.lines)
            total += (n - 1) + (n >= 3)
            marked = {l.index for l in chain.lines if l.erratum}
            if marked:
                total += sum(1 for k in range(1, n) if (k - 1) in marked or k in marked) + (n >= 3)
    return total


class Verifier:
    def __init__(self, seed=DEFAULT_SEED, step_timeout=4.0, timeout=None, allow_numeric=False, strategies=None,
                 progress=None):
        self.strategies = strategies
        self.seed = seed
        self.step_timeout = step_timeout
        self.deadline = time.monotonic() + timeout if timeout else None
        self.allow_numeric = allow_numeric
        self.progress = progress  # see verify_paths
        self.done = 0
        self.total = 0

    def _tick(self, path, deriv):
        self.done += 1
        if self.progress is None:
            return
        from derive.language.loader import safe_text

        try:
            self.progress(safe_text(path), safe_text(deriv.id), self.done, max(self.total, self.done))
        except Exception:  # a broken progress display (closed terminal) must not stop the checks
            self.progress = None

    def status_of(self, verdict: Verdict) -> str:
        if verdict.status == PROVED:
            return OK
        if verdict.status == CONFIRMED and self.allow_numeric:
            return OK
        return FAIL

    def verify_file(self, df: DerivationFile, report: Report, name=None):
        """Verify ``df`` into ``report``; ``name``: the file as given (default: df.path)."""
        path = str(df.path) if name is None else str(name)
        file_no = len(report.files)
        report.files.append((path, df.title))
        if self.total < self.done + 1:  # called directly, not through verify_paths
            self.total = self.done + count_checks(df)
        first, first_err = len(report.checks), len(report.errata)
        n_err = first_err
        fname = df.path.name
        for deriv in df.derivations:
            prover = Prover(deriv.context, seed=self.seed, step_timeout=self.step_timeout,
                            deadline=self.deadline, instances=deriv.instances,
                            instance_symbols=deriv.instance_symbols, strategies=self.strategies,
                            assumptions=getattr(deriv, "assume", []))
            self._domains(fname, deriv, prover, report, path)
            for chain in deriv.chains:
                extra = getattr(chain, "assume", [])
                if extra:  # the chain's own assumptions, for its checks only (new sample points too)
                    saved = prover.assumptions, prover._points
                    prover.assumptions, prover._points = saved[0] + list(extra), {}
                try:
                    n_err = self._chain(fname, deriv, chain, prover, report, n_err, path)
                finally:
                    if extra:
                        prover.assumptions, prover._points = saved
        for c in report.checks[first:]:
            c.path, c.file_no = path, file_no
        for e in report.errata[first_err:]:
            e.path, e.file_no = path, file_no

    def _domains(self, fname, deriv, prover, report, path=""):
        ctx = deriv.context
        for sym in _used_domains(deriv):
            self._tick(path, deriv)
            v = prover.check_domain(sym)
            report.checks.append(Check(
                fname, deriv.id, None, "domain", None, sym.name, ctx.domains[sym].pretty(),
                _tex(sym, ctx), ctx.domains[sym].pretty(), v,
                rule=f"{sym.name} = {ctx.definitions[sym]} lies in {ctx.domains[sym].pretty()}",
                status=self.status_of(v),
                message="" if v.status == PROVED else
                "declared domain not proved: proofs treat this symbol as an unconstrained real"))

    def _instances(self, prover, lhs, rhs, check):
        """Numeric confirmation of a step for each concrete instance (e.g. K = 2, 3, 7 classes)."""
        from derive.prover.engine import StrategyTimeout, time_limit

        if not prover.instances or check.verdict.status == REFUTED:
            return
        try:
            with time_limit(prover._limit(floor=2.0)):
                Lf = prover.ctx.expand(prover.resolver.resolve(lhs))
                Rf = prover.ctx.expand(prover.resolver.resolve(rhs))
                for name in sorted(prover.instances):
                    vals = prover.instances[name]
                    agree, cex, _ = prover.numeric_compare(Lf.xreplace(vals), Rf.xreplace(vals),
                                                           prover.instance_points(name, 8))
                    if cex is not None:
                        check.status = FAIL
                        check.message = f"instance {name} disagrees: {cex}"
                        check.instances[name] = f"counterexample {cex}"
                    else:
                        check.instances[name] = f"{agree} points agree"
        except StrategyTimeout:
            check.instances["time limit"] = "instances not all checked"
        except (MemoryError, RecursionError, OverflowError) as exc:  # a verdict, never a traceback
            check.instances["error"] = f"instances not all checked: {type(exc).__name__}"

    def _chain(self, fname, deriv, chain, prover, report, n_err, path=""):
        ctx = deriv.context
        lines = chain.lines
        n = len(lines)
        written = [l.expr for l in lines]
        fixed = [l.erratum.corrected if l.erratum else l.expr for l in lines]
        marked = {l.index for l in lines if l.erratum}

        texts = [l.text for l in lines]
        fixed_texts = [l.erratum.corrected_text if l.erratum else l.text for l in lines]

        def run(kind, i, j, exprs):
            a, b = exprs[i], exprs[j]
            shown = fixed_texts if exprs is fixed else texts
            self._tick(path, deriv)
            v = prover.check(a, b)
            rule = lines[j].rule if kind.endswith("step") else "the chain's first line equals its last"
            c = Check(fname, deriv.id, chain.id, kind, j if kind.endswith("step") else None,
                      shown[i], shown[j], _tex(a, ctx), _tex(b, ctx), v, rule=rule,
                      note_latex=lines[j].latex)
            self._instances(prover, a, b, c)
            report.checks.append(c)
            return c

        checks = [run("step", k - 1, k, written) for k in range(1, n)]
        e2e = run("end-to-end", 0, n - 1, written) if n >= 3 else None
        _by_transitivity(e2e, checks)
        for k, c in enumerate(checks, start=1):
            if c.status == FAIL and c.message:
                continue
            if c.verdict.status == REFUTED:
                if (k - 1) in marked or k in marked:
                    c.status = ERRATUM
                else:
                    c.status = FAIL
                    c.message = "refuted step with no erratum recorded"
            else:
                c.status = self.status_of(c.verdict) if not c.message else c.status
                if c.status == FAIL and not c.message:
                    c.message = f"step is {c.verdict.status}" + (f" ({c.verdict.detail})" if c.verdict.detail else "")
        if e2e is not None and not e2e.message:
            if e2e.verdict.status == REFUTED:
                e2e.status = ERRATUM if marked else FAIL
                if not marked:
                    e2e.message = "the chain's result is refuted with no erratum recorded"
            else:
                e2e.status = self.status_of(e2e.verdict)
                if e2e.status == FAIL:
                    e2e.message = f"end-to-end is {e2e.verdict.status}"
        if not marked:
            return n_err
        # errata: each marked line must be refuted by a check that touches it
        fixed_checks = []
        for k in range(1, n):
            if (k - 1) in marked or k in marked:
                fixed_checks.append(run("corrected step", k - 1, k, fixed))
        fixed_e2e = run("corrected end-to-end", 0, n - 1, fixed) if n >= 3 else None
        by_index = {c.index: c for c in checks}
        by_index.update({c.index: c for c in fixed_checks})  # the corrected chain's steps
        _by_transitivity(fixed_e2e, [by_index[k] for k in range(1, n)])
        for c in fixed_checks + ([fixed_e2e] if fixed_e2e else []):
            if not c.message:
                c.status = self.status_of(c.verdict)
                if c.status == FAIL:
                    c.message = f"the corrected line is not proved: {c.verdict.status}"
        for k in sorted(marked):
            n_err += 1
            line = lines[k]
            rec = ErratumRecord(f"E{n_err}", fname, deriv.id, chain.id, k, line.text, line.latex,
                                line.erratum.corrected_text, line.erratum.why)
            refuting = [c for c in checks if c.index in (k, k + 1) and c.verdict.status == REFUTED]
            if k == n - 1 and e2e is not None and e2e.verdict.status == REFUTED:
                refuting.append(e2e)
            rec.refuted_by = refuting
            rec.corrected_checks = [c for c in fixed_checks if c.index in (k, k + 1)]
            if k == n - 1 and fixed_e2e is not None:
                rec.corrected_checks.append(fixed_e2e)
            for c in refuting:
                c.erratum = c.erratum or rec.id
            if not refuting:
                rec.status = FAIL
                rec.message = ("stale erratum: no check refutes the line as written "
                               "(remove the erratum, or the tool missed the error)")
            elif any(c.status == FAIL for c in rec.corrected_checks):
                rec.status = FAIL
                rec.message = "the corrected line is not proved"
            report.errata.append(rec)
        return n_err


#: the least time loading is given under a --timeout (an ordinary file loads in a fraction of it)
LOAD_FLOOR_SECONDS = 2.0


def _source_name(src):
    if isinstance(src, TextSource):
        return src.name
    if isinstance(src, tuple):
        return src[0]
    return src


def verify_paths(paths, *, seed=DEFAULT_SEED, step_timeout=4.0, timeout=None, allow_numeric=False,
                 strategies=None, progress=None) -> Report:
    """Load every source, then (when all load) verify them in order.

    ``paths``: file paths, or derivations given as text: ``loader.TextSource(name, data)`` or a
    ``(name, data)`` pair, ``data`` the bytes or text (e.g. standard input, name "<stdin>"),
    under the same size limit as a file.  A file given twice (the same resolved path) is
    verified once.  ``timeout`` bounds loading and verifying together; loading is given at
    least LOAD_FLOOR_SECONDS, so that a tiny timeout still reads an ordinary file (its steps
    are then unproved) while a file that would take longer to load is a clear error (exit 2).

    ``progress``: called as ``progress(file, derivation_id, n, total)`` just before each check
    starts, n = 1, 2, ... total, where ``total`` is the number of checks of the whole run (all
    files); ``file`` is the path as given and both strings are already made safe to print
    (loader.safe_text).  An exception from it turns the progress display off.
    """
    from derive.language.loader import DerivationFileError

    t0 = time.monotonic()
    report = Report(seed=seed, allow_numeric=allow_numeric)
    verifier = Verifier(seed, step_timeout, timeout, allow_numeric, strategies, progress=progress)
    files, seen = [], set()
    load_deadline = None if verifier.deadline is None else max(verifier.deadline, t0 + LOAD_FLOOR_SECONDS)
    for p in paths:
        name = _source_name(p)
        try:
            if isinstance(p, (TextSource, tuple)):
                data = p.data if isinstance(p, TextSource) else p[1]
                df = load_text(data, name, deadline=load_deadline)
                key = ("text", len(files))
            else:
                try:
                    key = ("file", str(Path(p).resolve()))
                except (OSError, RuntimeError, ValueError):
                    key = ("file", str(p))
                if key in seen:
                    continue
                df = load_file(p, deadline=load_deadline)
            seen.add(key)
            files.append((str(name), df))
        except DerivationFileError as exc:
            report.errors.append((str(name), str(exc)))
    if not report.errors:
        verifier.total = sum(count_checks(df) for _, df in files)
        for name, df in files:
            verifier.verify_file(df, report, name=name)
    report.seconds = time.monotonic() - t0
    return report
