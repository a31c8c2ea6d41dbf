"""Text and JSON renderings of a verification report.

The text report escapes every control and bidi character that comes from a file (titles, ids,
expressions, errata, messages): a file cannot erase its own lines or fake a result.  JSON is
written with ``ensure_ascii``, which escapes them as \\uXXXX.  Files are told apart by their
position in the run (Check.file_no), and JSON's ``file`` is the path as given."""
from __future__ import annotations

import json
import textwrap

from derive.language.loader import safe_text
from derive.prover.engine import CONFIRMED, PROVED, REFUTED, UNPROVED
from derive.prover.verify import ERRATUM, FAIL, OK, Report

_MARK = {PROVED: "proved", CONFIRMED: "CONFIRMED (numeric only)", REFUTED: "REFUTED", UNPROVED: "UNPROVED"}


def sanitize(text) -> str:
    """Text from a file made safe to print on a terminal: control characters (newline
    included), DEL, C1 controls and bidi overrides written as escapes (\\x1b, \\u202e)."""
    return safe_text(text)


def _short(text: str, width: int) -> str:
    text = sanitize(text)
    return text if len(text) <= width else text[: width - 3] + "..."


def _cex(c) -> str:
    if not c:
        return ""
    pt = ", ".join(f"{sanitize(k)} = {sanitize(v)}" for k, v in c["point"].items())
    return f"at {pt}: left {sanitize(c['lhs'])}, right {sanitize(c['rhs'])}"


def _check_lines(c, verbose):
    s = sanitize
    if c.kind == "domain":
        label = f"domain   {s(c.lhs)} in {s(c.rhs)}"
    else:
        tag = {"step": f"step {c.index}", "end-to-end": "end-to-end",
               "corrected step": f"step {c.index}'", "corrected end-to-end": "end-to-end'"}[c.kind]
        label = f"{s(c.chain)}:{tag:<12} {_short(c.lhs, 38)} = {_short(c.rhs, 60)}"
    v = c.verdict
    flag = {OK: "  ", ERRATUM: "E ", FAIL: "!!"}[c.status]
    out = [f"{flag} {label}"]
    detail = f"     {_MARK[v.status]:<9} {v.seconds:6.2f} s  {s(v.method)}"
    if c.erratum:
        detail += f"  [{s(c.erratum)}]"
    if c.limit:  # the verdict came from a limit: more time or memory might have decided otherwise
        detail += f"  [limit: {c.limit}]"
    if verbose and c.cache == "replayed":
        detail += "  (proof cache: the cached strategy proved it again)"
    out.append(detail)
    if v.counterexample:
        out.append(f"     counterexample {_cex(v.counterexample)}")
    if c.instances and (verbose or c.status == FAIL):
        out.append("     instances: " + "; ".join(f"{s(k)} {s(m)}" for k, m in c.instances.items()))
    if c.message:
        out.append(f"     -> {s(c.message)}")
    if verbose and v.tried:
        out.append("     tried: " + "; ".join(s(t) for t in v.tried))
    return out


def _erratum_lines(e):
    s = sanitize
    out = [f"  {s(e.id)} {s(e.derivation)}/{s(e.chain)} line {e.line}: {s(e.written)}"]
    for line in textwrap.wrap(s(e.why), 90):
        out.append(f"       {line}")
    for c in e.refuted_by[:1]:
        if c.verdict.counterexample:
            out.append(f"       refuted {_cex(c.verdict.counterexample)}")
    state = "proved" if e.status == OK else "NOT PROVED"
    out.append(f"       corrected: {s(e.corrected)}  ({state})")
    if e.message:
        out.append(f"       -> {s(e.message)}")
    return out


def render_text(report: Report, verbose: bool = False, quiet: bool = False) -> str:
    """The report as text, in file order.  ``quiet``: only what fails (checks marked !!, i.e.
    refuted without an erratum, unproved, only numerically confirmed, instance disagreements;
    stale errata and unproved corrections; malformed files) and the summary line.  Everything
    taken from a file is escaped (see sanitize): a file cannot drive the terminal."""
    out = []
    if report.errors:
        for _, msg in report.errors:
            out.append(f"error: {sanitize(msg)}")
        return "\n".join(out) + "\n"
    if not quiet:
        out.append(f"derive verify: seed {report.seed} for sample points"
                   + ("; numeric confirmation accepted (--allow-numeric)" if report.allow_numeric else "")
                   + (f"; {report.jobs} worker processes" if report.jobs > 1 else ""))
    by_file: dict = {}
    for c in report.checks:
        by_file.setdefault(c.file_no, []).append(c)
    for file_no, (path, title) in enumerate(report.files):
        checks = by_file.get(file_no, [])
        if quiet:
            checks = [c for c in checks if c.status == FAIL]
            if not checks:
                continue
        out.append("")
        out.append(f"== {sanitize(path)}: {sanitize(title)}")
        current = None
        for c in checks:
            if c.derivation != current:
                current = c.derivation
                out.append(f"-- {sanitize(current)}")
            out.extend(_check_lines(c, verbose))
    errata = [e for e in report.errata if e.status == FAIL] if quiet else report.errata
    if errata:
        out.append("")
        out.append("Errata that fail (stale, or the correction not proved):" if quiet else
                   "Errata (lines of the file that are wrong as written):")
        for e in errata:
            if quiet and len(report.files) > 1:
                out.append(f"  in {sanitize(e.path or e.file)}")
            out.extend(_erratum_lines(e))
    counts = report.counts()
    n = len(report.checks)
    if out:
        out.append("")
    out.append(
        f"{n} checks: {counts.get(PROVED, 0)} proved, {counts.get(CONFIRMED, 0)} numerically confirmed, "
        f"{counts.get(REFUTED, 0)} refuted ({sum(1 for c in report.checks if c.status == ERRATUM)} "
        f"explained by {len(report.errata)} {'erratum' if len(report.errata) == 1 else 'errata'}), "
        f"{counts.get(UNPROVED, 0)} unproved; "
        + _limits_text(report)
        + f"{report.seconds:.2f} s")
    failed = report.failed
    out.append("result: OK" if not failed else f"result: FAILED ({len(failed)} problem(s) marked !! above)")
    return "\n".join(out) + "\n"


def _limits_text(report) -> str:
    """"3 verdicts from a limit (time 2, memory 1); " when any verdict came from one."""
    limited = report.limited()
    if not limited:
        return ""
    from collections import Counter

    kinds = Counter(k for c in limited for k in c.limit.split(" and "))
    return (f"{len(limited)} {'verdict' if len(limited) == 1 else 'verdicts'} from a limit ("
            + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) + "); ")


def render_json(report: Report) -> str:
    data = {
        "seed": report.seed,
        "allow_numeric": report.allow_numeric,
        "seconds": round(report.seconds, 3),
        "exit_code": report.exit_code(),
        "errors": [{"file": p, "message": m} for p, m in report.errors],
        "files": [{"path": p, "title": t} for p, t in report.files],
        "checks": [c.to_json() for c in report.checks],
        "errata": [
            {
                "id": e.id,
                "file": e.path or e.file,
                "derivation": e.derivation,
                "chain": e.chain,
                "line": e.line,
                "written": e.written,
                "written_latex": e.written_latex,
                "corrected": e.corrected,
                "why": e.why,
                "counterexample": next((c.verdict.counterexample for c in e.refuted_by
                                        if c.verdict.counterexample), None),
                "status": e.status,
                "message": e.message,
            }
            for e in report.errata
        ],
        "summary": {k: v for k, v in report.counts().items()},
        "limited": len(report.limited()),
        "jobs": report.jobs,
        "cache": report.cache,
    }
    return json.dumps(data, indent=2, sort_keys=False) + "\n"
