"""What the documentation shows, as plain data built from one verification report.

Everything here comes from :func:`derive.prover.verify.verify_paths` (verdicts, strategies,
counterexamples, the SymPy LaTeX of each parsed line) and :func:`derive.language.loader.load_file`
(the note's own LaTeX, the rules, the errata, the ``[[kernel]]`` tables): nothing about a derivation is typed here.
Both renderings (Markdown and HTML) are made from the same objects, in the files' order.
Times are left out on purpose: they change from run to run, and ``docs/`` must not.
"""
from __future__ import annotations

import inspect
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from derive.prover.engine import CONFIRMED, PROVED, REFUTED, STRATEGIES, UNPROVED
from derive.prover.verify import ERRATUM, FAIL, OK, Report
from derive.docs.mathtex import Math, MathRenderer, latex_of

from derive.resources import generated_dir, logical_path

VERDICTS = (PROVED, CONFIRMED, REFUTED, UNPROVED)

def __getattr__(name):  # PEP 562: computed on first use (reading the derivation file)
    if name == "KERNEL_API":
        return kernel_api()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def kernel_api() -> dict:
    """The Python functions of derive.runtime.losses that call each generated kernel: the ``functions``
    key of each ``[[kernel]]`` table of stable_forms.toml (tests check it).  ``KERNEL_API``."""
    from derive.codegen.kernels import shipped_kernels

    return {k.name: tuple(k.functions) for k in shipped_kernels()}


#: The kernels' exports that each role names (codegen's kernel specs).
EXPORT_ROLES = ("loss", "grad", "coef", "target_factor")


def check_label(c) -> str:
    """A check's identifier, exactly as ``derive verify`` prints it (without padding)."""
    if c.kind == "domain":
        return f"domain {c.lhs}"
    tag = {"step": f"step {c.index}", "end-to-end": "end-to-end",
           "corrected step": f"step {c.index}'", "corrected end-to-end": "end-to-end'"}[c.kind]
    return f"{c.chain}:{tag}"


def check_anchor(c) -> str:
    label = check_label(c).replace("'", "-corrected")
    return re.sub(r"[^A-Za-z0-9_-]+", "-", label).strip("-")


def format_counterexample(cex) -> str | None:
    if not cex:
        return None
    point = ", ".join(f"{k} = {v}" for k, v in sorted(cex["point"].items()))
    return f"at {point}: left {cex['lhs']}, right {cex['rhs']}"


def repo_path(path) -> str:
    """A file's path in the repository (the same from a wheel or a checkout)."""
    return logical_path(path)


# ------------------------------------------------------------------------------------------


@dataclass
class CheckView:
    label: str
    anchor: str
    kind: str
    verdict: str  # proved / numerically confirmed / refuted / unproved
    method: str
    status: str  # ok / erratum / fail
    erratum: str | None
    lhs: str
    rhs: str
    lhs_math: Math
    rhs_math: Math
    rule: str | None
    counterexample: str | None
    instances: list  # [(name, text)]
    message: str


@dataclass
class ErratumView:
    id: str
    why: str
    written: str
    corrected: str
    corrected_note: Math | None  # the corrected line in the note's notation, when the file gives it
    corrected_parsed: Math | None
    counterexample: str | None
    refuted_by: list  # labels
    proved: bool
    page: str = ""  # page key of its derivation
    derivation: str = ""
    chain: str = ""
    line: int = 0
    anchor: str = ""


@dataclass
class LineView:
    index: int
    text: str
    note: Math | None  # the note's LaTeX for this line
    parsed: Math | None  # SymPy's LaTeX of the parsed line
    rule: str | None
    step: CheckView | None  # the check from line index-1 to this line
    erratum: ErratumView | None
    corrected_step: CheckView | None


@dataclass
class ChainView:
    id: str
    note: str | None
    source: Math | None  # the note's whole line
    export: str | None
    export_anchor: str | None  # its section of the stable-forms page
    used_by: list  # [(kernel page key, kernel name, role)]
    lines: list
    end_to_end: CheckView | None
    corrected_end_to_end: CheckView | None

    @property
    def checks(self):
        out = [l.step for l in self.lines if l.step] + [l.corrected_step for l in self.lines if l.corrected_step]
        return out + [c for c in (self.end_to_end, self.corrected_end_to_end) if c]


@dataclass
class DerivationPage:
    key: str  # page key: "<file stem>/<derivation id>"
    file: str  # repository path of the derivation file
    file_title: str
    id: str
    title: str
    note: str | None
    domains: list
    chains: list
    errata: list
    counts: dict  # verdict -> number, over every check of the page
    steps: int = 0  # steps as written (kind == "step")

    @property
    def checks(self):
        return self.domains + [c for ch in self.chains for c in ch.checks]

    @property
    def summary(self) -> str:
        parts = [f"{self.counts[v]} {v}" for v in VERDICTS if self.counts.get(v)]
        return ", ".join(parts)


@dataclass
class FileView:
    path: str  # repository path
    stem: str
    title: str
    source: str | None
    pages: list
    steps: int
    steps_proved: int
    steps_refuted: int
    errata: list
    checks: int
    counts: dict


@dataclass
class ParamView:
    name: str
    domain: str  # as the derivation declares it: [0, oo), (0, 1], real, ...
    default: str | None  # as printed: 2, 0.25; None when the declaration gives none
    note: str | None  # what a value outside the domain means (alpha < 0 turns the weight off)


@dataclass
class KernelView:
    key: str  # page key: "kernels/<name>" ("kernels/<module>.<name>" when two modules share a name)
    name: str
    title: str
    module: str  # the file's [file] module: the generated files are <module>.{py,c,h}
    file: str  # repository path of its derivation file (its name, for a file outside the repository)
    file_in_repo: bool  # whether ``file`` is a path of the repository (pages link it)
    derivation: str  # the derivation its exports come from
    derivation_page: str  # that derivation's page key
    layout: str
    layout_what: str  # what the layout computes per element / per row
    target: str
    target_what: str  # what the target kind takes (loader.TARGETS)
    params: list  # [ParamView]
    api: list  # [(function name, signature, first docstring line)]
    load_call: str  # how derive.load(FILE) calls it, for a kernel no public function calls
    exports: list  # [(role, export name, stable-forms anchor)]
    conditioned: str | None  # why its accuracy is measured relative to the condition number
    soft: str | None  # the key of the soft-target kernel it hands non-binary targets to
    soft_of: list  # the keys of the binary kernels that hand it their soft targets
    generated: dict  # ".py"/".c"/".h" -> repository path, or None when rendered in memory (not shipped)
    numpy_lines: dict  # dtype suffix -> line number of the def in generated/<module>.py
    c_lines: dict  # dtype suffix -> line number in generated/<module>.c
    h_lines: dict
    numpy_code: str  # the f64 NumPy function, as generated
    figures: list  # figure stems: its value figure, its accuracy figure
    #: [(role, export, [(rule page key, rule name)])]: the roles derive.rewrite stabilised, with the rules fired
    rewrites: list = field(default_factory=list)


@dataclass
class Docs:
    report: Report
    files: list
    pages: list
    errata: list
    stable_chains: list  # [(page, chain)] of chains with an export, in file order
    kernels: list
    strategies: dict
    seed: int
    step_timeout: float
    math_log: object
    totals: dict = field(default_factory=dict)
    supporting: list = field(default_factory=list)  # [(page, chain)]: no export, in a file with exports
    bounds: dict = field(default_factory=dict)  # dtype name -> accuracy bound of the kernels
    kernel_decls: list = field(default_factory=list)  # the KernelDecls behind ``kernels``, in the same order
    kernel_keys: dict = field(default_factory=dict)  # (file name, kernel name) -> kernel page key
    modules: list = field(default_factory=list)  # [(module, derivation file, {suffix: repository path or None})]


# ------------------------------------------------------------------------------------------


class _Builder:
    def __init__(self, report: Report, step_timeout: float):
        self.report = report
        self.step_timeout = step_timeout
        self.math = MathRenderer()
        self.by_key = {}
        for c in report.checks:
            self.by_key.setdefault((c.file, c.derivation, c.chain, c.kind, c.index), c)
        from derive.docs.numerics import load

        self.loaded = [load(str(path)) for path, _ in report.files]
        kernels = [k for f in self.loaded for k in f.kernels]
        self.kernel_keys = kernel_keys(kernels)
        self.export_count = Counter(e for f in self.loaded for e in f.exports)
        self.used_by = {key: [(self.kernel_keys[(f, k.name)], k.name, role) for role, k in users]
                        for key, users in _export_users(kernels).items() for f in (key[0],)}

    def m(self, tex):
        return self.math(tex) if tex else None

    def export_anchor(self, stem, export) -> str:
        """export-<name>, or export-<file stem>-<name> for a name that two files export."""
        return f"export-{export}" if self.export_count[export] <= 1 else f"export-{stem}-{export}"

    def view(self, c, lhs_tex=None, rhs_tex=None) -> CheckView:
        """``lhs_tex``/``rhs_tex``: LaTeX of the two sides, when the report's may be a fallback."""
        v = c.verdict
        instances = [(k, c.instances[k]) for k in sorted(c.instances)]
        return CheckView(check_label(c), check_anchor(c), c.kind, v.status, v.method, c.status, c.erratum,
                         c.lhs, c.rhs, self.math(lhs_tex or c.lhs_latex), self.math(rhs_tex or c.rhs_latex), c.rule,
                         format_counterexample(v.counterexample), instances, c.message)

    def build(self) -> Docs:
        rep = self.report
        files, pages, errata, stable = [], [], [], []
        errata_by = {(e.file, e.derivation, e.chain, e.line): e for e in rep.errata}
        for (path, title), df in zip(rep.files, self.loaded):
            fname = Path(path).name
            stem = Path(path).stem
            fpages = []
            for d in df.derivations:
                page = self.derivation(df, d, fname, stem, errata_by)
                fpages.append(page)
                for ch in page.chains:
                    if ch.export:
                        stable.append((page, ch))
            fchecks = [c for c in rep.checks if c.file == fname]
            steps = [c for c in fchecks if c.kind == "step"]
            ferr = [e for p in fpages for e in p.errata]
            files.append(FileView(repo_path(path), stem, title, df.source, fpages, len(steps),
                                  sum(c.verdict.status == PROVED for c in steps),
                                  sum(c.verdict.status == REFUTED for c in steps), ferr, len(fchecks),
                                  dict(Counter(c.verdict.status for c in fchecks))))
            pages += fpages
            errata += ferr
        docs = Docs(rep, files, pages, errata, stable, _kernels(self.loaded, self.kernel_keys, self.export_anchor), dict(STRATEGIES), rep.seed, self.step_timeout,
                    self.math.log)
        docs.kernel_decls = [k for f in self.loaded for k in f.kernels]
        docs.kernel_keys = self.kernel_keys
        seen = {}
        for kv in docs.kernels:
            seen.setdefault(kv.module, (kv.module, kv.file, kv.file_in_repo, kv.generated))
        docs.modules = list(seen.values())
        from derive.measure.accuracy import BOUNDS

        docs.bounds = dict(BOUNDS)
        for f in files:
            if any(ch.export for p in f.pages for ch in p.chains):
                docs.supporting += [(p, ch) for p in f.pages for ch in p.chains if not ch.export]
        counts = Counter(c.verdict.status for c in rep.checks)
        docs.totals = {
            "checks": len(rep.checks),
            "counts": {v: counts.get(v, 0) for v in VERDICTS},
            "explained": sum(1 for c in rep.checks if c.status == ERRATUM),
            "failed": len(rep.failed),
            "errata": len(rep.errata),
            "exit_code": rep.exit_code(),
        }
        return docs

    def derivation(self, df, d, fname, stem, errata_by) -> DerivationPage:
        key = f"{stem}/{d.id}"
        domains = [self.view(c) for c in self.report.checks
                   if c.file == fname and c.derivation == d.id and c.kind == "domain"]
        chains, page_errata = [], []
        names = d.context.latex_names
        for ch in d.chains:
            get = lambda kind, i=None, _ch=ch: self.by_key.get((fname, d.id, _ch.id, kind, i))  # noqa: E731
            written = [latex_of(line.expr, names) for line in ch.lines]
            fixed = [latex_of(line.erratum.corrected, names) if line.erratum else written[line.index]
                     for line in ch.lines]
            lines = []
            for line in ch.lines:
                k = line.index
                step = get("step", k) if k else None
                cstep = get("corrected step", k) if k else None
                ev = None
                if line.erratum:
                    rec = errata_by.get((fname, d.id, ch.id, k))
                    if rec is None:  # pragma: no cover - the verifier records every marked line
                        raise ValueError(f"{fname}: {d.id}/{ch.id} line {k}: erratum missing from the report")
                    cex = next((format_counterexample(c.verdict.counterexample) for c in rec.refuted_by
                                if c.verdict.counterexample), None)
                    ev = ErratumView(rec.id, rec.why, rec.written, rec.corrected, self.m(line.erratum.latex),
                                     self.m(fixed[k]), cex, [check_label(c) for c in rec.refuted_by],
                                     rec.status == OK, key, d.id, ch.id, k, f"erratum-{rec.id}")
                    page_errata.append(ev)
                lines.append(LineView(k, line.text, self.m(line.latex), self.m(written[k]), line.rule,
                                      self.view(step, written[k - 1], written[k]) if step else None, ev,
                                      self.view(cstep, fixed[k - 1], fixed[k]) if cstep else None))
            e2e, ce2e = get("end-to-end"), get("corrected end-to-end")
            chains.append(ChainView(ch.id, ch.note, self.m(ch.source), ch.export,
                                    self.export_anchor(stem, ch.export) if ch.export else None, self.used_by.get((fname, ch.export), []),
                                    lines, self.view(e2e, written[0], written[-1]) if e2e else None,
                                    self.view(ce2e, fixed[0], fixed[-1]) if ce2e else None))
        page = DerivationPage(key, repo_path(df.path), df.title, d.id, d.title, d.note, domains, chains,
                              page_errata, {})
        page.counts = dict(Counter(c.verdict for c in page.checks))
        page.steps = sum(1 for c in page.checks if c.kind == "step")
        mine = [c for c in self.report.checks if c.file == fname and c.derivation == d.id]
        if len(mine) != len(page.checks):  # every check of the report is on its page, once
            shown = {c.label for c in page.checks}
            missing = sorted(check_label(c) for c in mine if check_label(c) not in shown)
            raise ValueError(f"{key}: checks of the report not placed on the page: {missing}")
        return page


def _export_users(kernels):
    """(file name, export) -> [(kernel page key, kernel name, role)]."""
    users = {}
    for k in kernels:
        for role, export in k.exports.items():
            users.setdefault((Path(str(k.path)).name, export), []).append((role, k))
    return users


def _def_lines(text: str, pattern: str) -> dict:
    out = {}
    for i, line in enumerate(text.splitlines(), start=1):
        m = re.match(pattern, line)
        if m and m["suffix"] not in out:
            out[m["suffix"]] = i
    return out


def _function_source(text: str, name: str) -> str:
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(f"def {name}("))
    end = start + 1
    while end < len(lines) and (not lines[end] or lines[end][0] in " \t"):
        end += 1
    while not lines[end - 1].strip():
        end -= 1
    return "\n".join(lines[start:end])


#: what each layout computes, for the kernel pages
LAYOUT_WHAT = {
    "elementwise": "one loss and one gradient d loss/dx per element",
    "softmax": "per row of (N, K) logits: m = max, the compensated sum S, u_k = x_k - m - log S = log p_k; "
               "one loss per row and the gradient with respect to every logit",
}


def kernel_keys(kernels) -> dict:
    """(file name, kernel name) -> page key: kernels/<name>, or kernels/<module>.<name> for a
    name that two files declare."""
    count = Counter(k.name for k in kernels)
    return {(Path(str(k.path)).name, k.name): f"kernels/{k.name}" if count[k.name] == 1
            else f"kernels/{k.module}.{k.name}" for k in kernels}


def _param_views(k) -> list:
    out = []
    for p in k.params:
        d = k.defaults.get(p)
        note = None
        if k.weight and p == "alpha":
            note = f"a negative alpha turns the weight {k.weight} off (it is 1)"
        if k.class_alpha and p == "alpha":
            note = ((note + "; ") if note else "") + "one number, or one weight per class"
        out.append(ParamView(p, k.domains[p].pretty(), None if d is None else f"{d:g}", note))
    return out


def _load_call(k, keys) -> str:
    from derive.runtime.kernel_files import _signature

    return f"derive.load({Path(str(k.path)).name!r}).{k.name}{_signature(k)}"


def _kernels(files, keys, anchor):
    """One view per [[kernel]] of the loaded ``files``, in file order."""
    from derive.docs import numerics
    from derive.language.loader import TARGETS
    from derive.runtime import losses

    views = []
    by_name = {(Path(str(k.path)).name, k.name): k for f in files for k in f.kernels}
    for f in files:
        gen = numerics.generated(str(f.path)) if f.kernels else None
        for k in f.kernels:
            fname = Path(str(k.path)).name
            api = []
            for fn in k.functions:
                func = getattr(losses, fn, None)
                if func is None:
                    raise ValueError(f"{f.path}: kernel {k.name!r}: functions names {fn!r}, which "
                                     "derive.runtime.losses does not define")
                doc = (inspect.getdoc(func) or "").splitlines()
                api.append((fn, str(inspect.signature(func)), doc[0] if doc else ""))
            exports = [(role, e, anchor(Path(str(k.path)).stem, e)) for role, e in k.exports.items()]
            soft = getattr(k, "soft", None)
            soft_of = [keys[(fname, o.name)] for o in f.kernels if getattr(o, "soft", None) == k.name]
            py, c, h = gen.texts[".py"], gen.texts[".c"], gen.texts[".h"]
            views.append(KernelView(
                keys[(fname, k.name)], k.name, k.title, k.module, repo_path(k.path), _in_repo(k.path),
                k.derivation, f"{Path(str(k.path)).stem}/{k.derivation}", k.layout, LAYOUT_WHAT[k.layout],
                k.target, TARGETS[k.target], _param_views(k), api, _load_call(k, keys), exports,
                getattr(k, "conditioned", None), keys[(fname, soft)] if soft and (fname, soft) in by_name else None,
                soft_of, {s: (gen.path(s) if gen.committed else None) for s in (".py", ".c", ".h")},
                _def_lines(py, rf"def {k.name}_(?P<suffix>f32|f64)\("),
                _def_lines(c, rf"int derive_{k.name}_(?P<suffix>f32|f64)\("),
                _def_lines(h, rf"int derive_{k.name}_(?P<suffix>f32|f64)\("),
                _function_source(py, f"{k.name}_f64"),
                [f"values_{keys[(fname, k.name)].split('/', 1)[1]}", f"accuracy_{keys[(fname, k.name)].split('/', 1)[1]}"],
                _rewrite_views(k, f),
            ))
    return views


def _rewrite_views(k, f) -> list:
    """[(role, export, [(page key of the rule's proof, rule name)])] of the roles derive.rewrite stabilises."""
    from derive.codegen.kernels import rewrite_of
    from derive.rewrite import RULES_FILE

    stem = RULES_FILE.stem
    return [(role, k.exports[role], [(f"{stem}/{r}", r) for r in rewrite_of(k, f, k.exports[role])[1]])
            for role in getattr(k, "rewrite", ()) if role in k.exports]


def _in_repo(path) -> bool:
    """Whether a file is one of the repository's (the pages link those, and cite others by name)."""
    from derive.resources import DataFilesMissing, PACKAGE_DIR, data_root

    p = Path(str(path)).resolve()
    try:
        roots = (data_root().resolve(), PACKAGE_DIR.parent)
    except DataFilesMissing:
        roots = (PACKAGE_DIR.parent,)
    return any(p.is_relative_to(r) for r in roots)


def build_model(report: Report, step_timeout: float = 4.0) -> Docs:
    return _Builder(report, step_timeout).build()
