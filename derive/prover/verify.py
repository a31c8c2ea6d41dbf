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

#: the default CPU-time budget of each proof strategy (``--step-timeout``), in seconds of process CPU
#: time: generous (the slowest strategy that proves a step of the shipped files takes under 2.5 s
#: of CPU), so that no ordinary step is decided by it (engine.time_limit)
DEFAULT_STEP_SECONDS = 6.0


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
    cache: str = ""  # the proof cache: "replayed" (a cached proof proved it again), "miss", "stale", ...

    @property
    def limit(self) -> str:
        """"time"/"memory" when the verdict came from a limit (see limit_of), else ""."""
        return limit_of(self)

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
            "limit": self.limit or None,
            "cache": self.cache or None,
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
    jobs: int = 1  # worker processes the checks ran on (1: this process)
    cache: dict | None = None  # the proof cache: folder and counts of hits, misses (None: off)

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

    def limited(self):
        """The checks whose verdict came from a limit (time or memory; see limit_of)."""
        return [c for c in self.checks if c.limit]


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


def _chain_specs(chain):
    """The checks of a chain, in report order: (kind, i, j, fixed) with ``fixed`` True for the
    corrected lines (errata)."""
    n = len(chain.lines)
    marked = {l.index for l in chain.lines if l.erratum}
    specs = [("step", k - 1, k, False) for k in range(1, n)]
    if n >= 3:
        specs.append(("end-to-end", 0, n - 1, False))
    if marked:
        specs += [("corrected step", k - 1, k, True) for k in range(1, n) if (k - 1) in marked or k in marked]
        if n >= 3:
            specs.append(("corrected end-to-end", 0, n - 1, True))
    return specs


def _instances(prover, lhs, rhs, verdict):
    """Numeric confirmation of a step for each concrete instance (e.g. K = 2, 3, 7 classes):
    ({instance: text}, the message of a disagreement or "")."""
    from derive.prover.engine import StrategyTimeout, time_limit

    out, message = {}, ""
    if not prover.instances or verdict.status == REFUTED:
        return out, message
    try:
        with time_limit(prover._limit(floor=2.0)):
            Lf = prover.ctx.expand(prover.resolver.resolve(lhs))
            Rf = prover.ctx.expand(prover.resolver.resolve(rhs))
            for name in sorted(prover.instances):
                vals = prover.instances[name]
                agree, cex, _ = prover.numeric_compare(Lf.xreplace(vals), Rf.xreplace(vals),
                                                       prover.instance_points(name, 8))
                if cex is not None:
                    message = f"instance {name} disagrees: {cex}"
                    out[name] = f"counterexample {cex}"
                else:
                    out[name] = f"{agree} points agree"
    except StrategyTimeout:
        out["time limit"] = "instances not all checked"
    except (MemoryError, RecursionError, OverflowError) as exc:  # a verdict, never a traceback
        out["error"] = f"instances not all checked: {type(exc).__name__}"
    return out, message


class _Runner:
    """Runs the tasks of a run, in this process or in a worker process (workers.run_tasks):
    ("domains", file, derivation) proves the declared domains of one derivation, in order;
    ("check", file, derivation, chain, kind, i, j, fixed, proved, use_cache) one check, with
    ``proved`` the names of the defined symbols whose domains are proved (the first task's
    result).  Results are plain data (verdicts, texts), the same wherever they are computed."""

    def __init__(self, files, seed, step_timeout, deadline, strategies, cache_folder):
        from derive.prover.cache import ProofCache

        self.files = files
        self.seed, self.step_timeout, self.deadline, self.strategies = seed, step_timeout, deadline, strategies
        self.cache = ProofCache(cache_folder) if cache_folder else None
        self._provers: dict = {}

    def __call__(self, payload):
        if payload[0] == "domains":
            return self.domains(*payload[1:])
        return self.check(*payload[1:])

    def prover(self, fi, di, ci=None, proved=()):
        deriv = self.files[fi].derivations[di]
        extra = list(getattr(deriv.chains[ci], "assume", []) or []) if ci is not None else []
        key = (fi, di, ci if extra else None)
        prover = self._provers.get(key)
        if prover is None:
            # a chain's own assumptions, for its checks only (its own sample points too)
            prover = Prover(deriv.context, seed=self.seed, step_timeout=self.step_timeout, deadline=self.deadline,
                            instances=deriv.instances, instance_symbols=deriv.instance_symbols,
                            strategies=self.strategies, assumptions=list(getattr(deriv, "assume", []) or []) + extra)
            self._provers[key] = prover
        names = deriv.context.names
        prover.proved_domains = {names[n] for n in proved if n in names}
        return prover

    def domains(self, fi, di):
        deriv = self.files[fi].derivations[di]
        prover = self.prover(fi, di)
        return [prover.check_domain(sym) for sym in _used_domains(deriv)]

    def check(self, fi, di, ci, kind, i, j, fixed, proved, use_cache=True):
        from derive.prover.cache import TRANSITIVITY, check_key
        from derive.prover.engine import STRATEGIES

        lines = self.files[fi].derivations[di].chains[ci].lines
        exprs = [l.erratum.corrected if fixed and l.erratum else l.expr for l in lines]
        a, b = exprs[i], exprs[j]
        prover = self.prover(fi, di, ci, proved)
        e2e = kind.endswith("end-to-end")
        key, event, verdict = None, "", None
        if self.cache is not None:
            try:
                key = check_key(prover, "end-to-end" if e2e else "step", a, b)
            except (RecursionError, MemoryError, ValueError, TypeError):  # srepr of a monster: no cache
                key = None
        hit = self.cache.get(key) if key is not None and use_cache else None
        if hit == TRANSITIVITY and e2e:
            # the direct check's counterexample search only; the chain's steps decide (see verify_files)
            verdict = prover.check(a, b, only=[], confirm=False)
            if verdict.status != REFUTED:
                verdict.detail = "a proof by transitivity is cached: only the counterexample search ran"
                event = "transitivity"
        elif hit in STRATEGIES and (self.strategies is None or hit in self.strategies):
            replay = prover.check(a, b, only=[hit], confirm=False)
            if replay.status in (PROVED, REFUTED):  # refuted: by the same search a full check starts with
                verdict, event = replay, "replayed"
            else:
                event = "stale"
        if verdict is None:
            verdict = prover.check(a, b)
            if verdict.status == PROVED and verdict.strategy and key is not None:
                self.cache.put(key, verdict.strategy, verdict.method)
            event = event or ("miss" if key is not None else "")
        instances, message = _instances(prover, a, b, verdict)
        return {"verdict": verdict, "instances": instances, "message": message, "key": key, "cache": event}


def _make_runner(*args):
    return _Runner(*args)


#: a task's wall-clock backstop in a worker: this many times the backstop of one block (a check
#: runs a few blocks: derivatives, the counterexample search, the strategies, the confirmation)
TASK_BLOCKS = 8


def _limit_verdict(died):
    """The verdict of a check whose worker was stopped (workers.Died)."""
    method = "memory limit" if died.reason == "memory" else "time limit"
    return Verdict(UNPROVED, method, seconds=died.seconds, detail=died.detail)


def _error_verdict(text):
    if text == "memory":
        return Verdict(UNPROVED, "memory limit", detail="MemoryError: the worker ran out of memory under its cap")
    return Verdict(UNPROVED, "internal error", detail=str(text)[:300])


def limit_of(check) -> str:
    """"time" or "memory" when ``check``'s verdict came from a limit (a strategy, the numeric
    confirmation or the whole check stopped by the time limit or the memory cap, so that more
    time or memory might have given another verdict); "" otherwise.  A proof or a counterexample
    never comes from a limit, whatever ran out before it."""
    v = check.verdict
    found = []
    if v.status not in (PROVED, REFUTED):
        texts = [v.method] + [t for t in v.tried if isinstance(t, str)]
        for word in ("time", "memory"):
            if any(t == f"{word} limit" or t.endswith(f": {word} limit") for t in texts):
                found.append(word)
    if v.status != REFUTED and "time limit" in check.instances and "time" not in found:
        found.append("time")
    return " and ".join(found)


class Verifier:
    """Verifies derivation files into a Report.

    ``jobs``: worker processes (1: in this process; None: one per usable core); ``cache``: the
    proof cache (None: the default folder unless DERIVE_NO_CACHE is set; False: none; a folder;
    a cache.ProofCache); ``memory_mb``: each worker's memory cap (None: workers.default_memory_mb).
    The verdicts are the same for every ``jobs`` and with or without the cache."""

    def __init__(self, seed=DEFAULT_SEED, step_timeout=DEFAULT_STEP_SECONDS, timeout=None, allow_numeric=False, strategies=None,
                 progress=None, jobs=1, cache=None, memory_mb=None):
        from derive.prover.cache import open_cache

        self.strategies = strategies
        self.seed = seed
        self.step_timeout = step_timeout
        self.deadline = time.monotonic() + timeout if timeout else None
        self.allow_numeric = allow_numeric
        self.progress = progress  # see verify_paths
        self.done = 0
        self.total = 0
        self.jobs = jobs
        self.cache = open_cache(cache)
        self.memory_mb = memory_mb
        self.cache_events: dict = {}  # "replayed", "miss", "stale", "transitivity" -> count
        self.jobs_used = 1

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
        self.verify_files([(str(df.path) if name is None else str(name), df)], report)

    # -- running the checks ----------------------------------------------------------------
    def _tasks(self, files):
        tasks = []
        for fi, (_, df) in enumerate(files):
            for di, deriv in enumerate(df.derivations):
                dom = ("domains", fi, di)
                used = _used_domains(deriv)
                if used:
                    tasks.append((dom, ("domains", fi, di), ()))
                for ci, chain in enumerate(deriv.chains):
                    for kind, i, j, fixed in _chain_specs(chain):
                        tid = ("check", fi, di, ci, kind, i, j, fixed)
                        tasks.append((tid, tid + ((), True), (dom,) if used else ()))
        return tasks

    def _bind(self, files):
        """Fills in a check's proved domains from its derivation's domain task, at hand-out."""
        def bind(payload, results):
            if payload[0] != "check":
                return payload
            fi, di = payload[1], payload[2]
            verdicts = results.get(("domains", fi, di))
            if not isinstance(verdicts, list):
                return payload
            used = _used_domains(files[fi][1].derivations[di])
            proved = tuple(sym.name for sym, v in zip(used, verdicts) if v.status == PROVED)
            return payload[:8] + (proved,) + payload[9:]
        return bind

    def _run(self, files, tasks):
        """{task id: result} for ``tasks``, here (jobs 1) or on worker processes."""
        from derive.prover import workers
        from derive.prover.engine import wall_backstop

        bind = self._bind(files)

        def on_start(tid, payload):
            _, fi = payload[0], payload[1]
            deriv = files[fi][1].derivations[payload[2]]
            n = len(_used_domains(deriv)) if payload[0] == "domains" else 1
            for _ in range(n):
                self._tick(files[fi][0], deriv)

        folder = str(self.cache.folder) if self.cache is not None else None
        args = ([df for _, df in files], self.seed, self.step_timeout, self.deadline, self.strategies, folder)
        jobs = workers.usable_cores() if self.jobs is None else max(1, int(self.jobs))
        jobs = min(jobs, sum(1 for t in tasks if t[1][0] == "check"))
        self.jobs_used = max(self.jobs_used, jobs, 1)
        if jobs <= 1:
            runner, results = _Runner(*args), {}
            for tid, payload, _ in tasks:
                payload = bind(payload, results)
                on_start(tid, payload)
                results[tid] = runner(payload)
            return results

        block = max(float(self.step_timeout), 2.0)
        task_wall = None if block > 1e6 else TASK_BLOCKS * wall_backstop(block) + 60.0

        def wall_limit(payload):
            if self.deadline is None:
                return task_wall
            left = self.deadline - time.monotonic() + 10.0  # the workers stop themselves at the deadline
            return left if task_wall is None else min(task_wall, left)

        memory = self.memory_mb if self.memory_mb is not None else workers.default_memory_mb(jobs)

        return workers.run_tasks(tasks, jobs=jobs, make_runner=_make_runner, runner_args=args, memory_mb=memory,
                                 wall_limit=wall_limit, on_start=on_start, bind=bind)

    def verify_files(self, files, report: Report):
        """Verify ``files``, a list of (name as given, DerivationFile), into ``report`` in order."""
        if self.total < self.done + 1:  # called directly, not through verify_paths
            self.total = self.done + sum(count_checks(df) for _, df in files)
        tasks = self._tasks(files)
        results = self._run(files, tasks)
        # an end-to-end check replayed as "proved by transitivity" whose steps are not all proved
        # this time: its direct check is run in full after all
        redo = []
        for tid, payload, deps in tasks:
            res = results.get(tid)
            if isinstance(res, dict) and res.get("cache") == "transitivity" \
                    and not self._steps_proved(files, results, tid):
                redo.append((tid, payload[:9] + (False,), deps))
        if redo:
            self.total += len(redo)
            bind = self._bind(files)
            results.update(self._run(files, [(t, bind(p, results), ()) for t, p, _ in redo]))
        for fi, (path, df) in enumerate(files):
            self._assemble_file(fi, path, df, results, report)

    def _steps_proved(self, files, results, tid):
        _, fi, di, ci, kind, i, j, fixed = tid
        chain = files[fi][1].derivations[di].chains[ci]
        n = len(chain.lines)
        steps = {}
        for k in range(1, n):
            steps[k] = results.get(("check", fi, di, ci, "step", k - 1, k, False))
            if fixed and ("check", fi, di, ci, "corrected step", k - 1, k, True) in results:
                steps[k] = results[("check", fi, di, ci, "corrected step", k - 1, k, True)]
        return all(isinstance(r, dict) and r["verdict"].status == PROVED for r in steps.values())

    # -- the report ------------------------------------------------------------------------
    def _result(self, res):
        """(verdict, instances, message, key, cache event) of a task's result."""
        from derive.prover.workers import Died

        if isinstance(res, dict):
            event = res.get("cache") or ""
            if event:
                self.cache_events[event] = self.cache_events.get(event, 0) + 1
            return res["verdict"], dict(res["instances"]), res["message"], res.get("key"), event
        if isinstance(res, Died):
            return _limit_verdict(res), {}, "", None, ""
        text = res[1] if isinstance(res, tuple) and len(res) == 2 else repr(res)
        return _error_verdict(text), {}, "", None, ""

    def _assemble_file(self, fi, path, df, results, report):
        file_no = len(report.files)
        report.files.append((path, df.title))
        first, first_err = len(report.checks), len(report.errata)
        n_err = first_err
        fname = df.path.name
        for di, deriv in enumerate(df.derivations):
            ctx = deriv.context
            used = _used_domains(deriv)
            res = results.get(("domains", fi, di))
            if isinstance(res, list):
                verdicts = res
            else:
                v = self._result(res)[0] if res is not None else _error_verdict("not run")
                verdicts = [v] * len(used)
            for sym, v in zip(used, verdicts):
                report.checks.append(Check(
                    fname, deriv.id, None, "domain", None, sym.name, ctx.domains[sym].pretty(),
                    _tex(sym, ctx), ctx.domains[sym].pretty(), v,
                    rule=f"{sym.name} = {ctx.definitions[sym]} lies in {ctx.domains[sym].pretty()}",
                    status=self.status_of(v),
                    message="" if v.status == PROVED else
                    "declared domain not proved: proofs treat this symbol as an unconstrained real"))
            for ci, chain in enumerate(deriv.chains):
                n_err = self._chain(fname, deriv, chain, report, n_err,
                                    lambda kind, i, j, fixed, ci=ci: results.get(("check", fi, di, ci, kind, i, j, fixed)))
        for c in report.checks[first:]:
            c.path, c.file_no = path, file_no
        for e in report.errata[first_err:]:
            e.path, e.file_no = path, file_no

    def _chain(self, fname, deriv, chain, report, n_err, result_of):
        from derive.prover.cache import TRANSITIVITY

        ctx = deriv.context
        lines = chain.lines
        n = len(lines)
        written = [l.expr for l in lines]
        fixed = [l.erratum.corrected if l.erratum else l.expr for l in lines]
        marked = {l.index for l in lines if l.erratum}

        texts = [l.text for l in lines]
        fixed_texts = [l.erratum.corrected_text if l.erratum else l.text for l in lines]
        keys = {}

        def run(kind, i, j, exprs):
            a, b = exprs[i], exprs[j]
            shown = fixed_texts if exprs is fixed else texts
            v, instances, message, key, event = self._result(result_of(kind, i, j, exprs is fixed))
            rule = lines[j].rule if kind.endswith("step") else "the chain's first line equals its last"
            c = Check(fname, deriv.id, chain.id, kind, j if kind.endswith("step") else None,
                      shown[i], shown[j], _tex(a, ctx), _tex(b, ctx), v, rule=rule,
                      note_latex=lines[j].latex, instances=instances, cache=event)
            if message:
                c.status, c.message = FAIL, message
            keys[id(c)] = key
            report.checks.append(c)
            return c

        def remember(e2e):  # an end-to-end check proved by transitivity: cached as such
            if self.cache is not None and e2e is not None and e2e.verdict.status == PROVED \
                    and e2e.verdict.method.startswith("transitivity") and e2e.cache != "transitivity" \
                    and keys.get(id(e2e)):
                self.cache.put(keys[id(e2e)], TRANSITIVITY, e2e.verdict.method)

        checks = [run("step", k - 1, k, written) for k in range(1, n)]
        e2e = run("end-to-end", 0, n - 1, written) if n >= 3 else None
        _by_transitivity(e2e, checks)
        remember(e2e)
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
        remember(fixed_e2e)
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


def verify_paths(paths, *, seed=DEFAULT_SEED, step_timeout=DEFAULT_STEP_SECONDS, timeout=None, allow_numeric=False,
                 strategies=None, progress=None, jobs=1, cache=None, memory_mb=None) -> Report:
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

    ``jobs``, ``cache``, ``memory_mb``: see Verifier (worker processes, the proof cache, the
    workers' memory cap); the verdicts do not depend on them.
    """
    from derive.language.loader import DerivationFileError

    t0 = time.monotonic()
    report = Report(seed=seed, allow_numeric=allow_numeric)
    verifier = Verifier(seed, step_timeout, timeout, allow_numeric, strategies, progress=progress, jobs=jobs,
                        cache=cache, memory_mb=memory_mb)
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
        verifier.verify_files(files, report)
        report.jobs = verifier.jobs_used
        if verifier.cache is not None:
            report.cache = {"folder": str(verifier.cache.folder), **verifier.cache_events}
    report.seconds = time.monotonic() - t0
    return report
