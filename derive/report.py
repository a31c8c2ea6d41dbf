"""Text and JSON renderings of a verification report."""
from __future__ import annotations

import json
import textwrap

from .prover import CONFIRMED, PROVED, REFUTED, UNPROVED
from .verify import ERRATUM, FAIL, OK, Report

_MARK = {PROVED: "proved", CONFIRMED: "CONFIRMED (numeric only)", REFUTED: "REFUTED", UNPROVED: "UNPROVED"}


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _cex(c) -> str:
    if not c:
        return ""
    pt = ", ".join(f"{k} = {v}" for k, v in c["point"].items())
    return f"at {pt}: left {c['lhs']}, right {c['rhs']}"


def render_text(report: Report, verbose: bool = False) -> str:
    out = []
    if report.errors:
        for _, msg in report.errors:
            out.append(f"error: {msg}")
        return "\n".join(out) + "\n"
    out.append(f"derive verify: seed {report.seed} for sample points"
               + ("; numeric confirmation accepted (--allow-numeric)" if report.allow_numeric else ""))
    for path, title in report.files:
        out.append("")
        out.append(f"== {path}: {title}")
        current = None
        for c in report.checks:
            if c.file != path.split("/")[-1]:
                continue
            if c.derivation != current:
                current = c.derivation
                out.append(f"-- {current}")
            if c.kind == "domain":
                label = f"domain   {c.lhs} in {c.rhs}"
            else:
                tag = {"step": f"step {c.index}", "end-to-end": "end-to-end",
                       "corrected step": f"step {c.index}'", "corrected end-to-end": "end-to-end'"}[c.kind]
                label = f"{c.chain}:{tag:<12} {_short(c.lhs, 38)} = {_short(c.rhs, 60)}"
            v = c.verdict
            flag = {OK: "  ", ERRATUM: "E ", FAIL: "!!"}[c.status]
            out.append(f"{flag} {label}")
            detail = f"     {_MARK[v.status]:<9} {v.seconds:6.2f} s  {v.method}"
            if c.erratum:
                detail += f"  [{c.erratum}]"
            out.append(detail)
            if v.counterexample:
                out.append(f"     counterexample {_cex(v.counterexample)}")
            if c.instances and (verbose or c.status == FAIL):
                out.append("     instances: " + "; ".join(f"{k} {m}" for k, m in c.instances.items()))
            if c.message:
                out.append(f"     -> {c.message}")
            if verbose and v.tried:
                out.append("     tried: " + "; ".join(v.tried))
    if report.errata:
        out.append("")
        out.append("Errata (lines of the file that are wrong as written):")
        for e in report.errata:
            out.append(f"  {e.id} {e.derivation}/{e.chain} line {e.line}: {e.written}")
            for line in textwrap.wrap(e.why, 90):
                out.append(f"       {line}")
            for c in e.refuted_by[:1]:
                if c.verdict.counterexample:
                    out.append(f"       refuted {_cex(c.verdict.counterexample)}")
            state = "proved" if e.status == OK else "NOT PROVED"
            out.append(f"       corrected: {e.corrected}  ({state})")
            if e.message:
                out.append(f"       -> {e.message}")
    counts = report.counts()
    n = len(report.checks)
    out.append("")
    out.append(
        f"{n} checks: {counts.get(PROVED, 0)} proved, {counts.get(CONFIRMED, 0)} numerically confirmed, "
        f"{counts.get(REFUTED, 0)} refuted ({sum(1 for c in report.checks if c.status == ERRATUM)} "
        f"explained by {len(report.errata)} errata), {counts.get(UNPROVED, 0)} unproved; "
        f"{report.seconds:.2f} s")
    failed = report.failed
    out.append("result: OK" if not failed else f"result: FAILED ({len(failed)} problem(s) marked !! above)")
    return "\n".join(out) + "\n"


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
                "file": e.file,
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
    }
    return json.dumps(data, indent=2, sort_keys=False) + "\n"
