"""The note, verified: every correct step proved, every error found by the tool itself."""
import json

import pytest

from derive.cli import main
from derive.language.loader import load_file
from derive.prover.engine import PROVED, REFUTED
from derive.prover.verify import ERRATUM, FAIL, Report, Verifier


def test_note_verifies_with_exit_0(note_report):
    assert note_report.exit_code() == 0, [c.message for c in note_report.failed]


def test_every_correct_step_is_proved_not_merely_confirmed(note_report):
    for c in note_report.checks:
        assert c.verdict.status in (PROVED, REFUTED), (c.derivation, c.chain, c.index, c.verdict)
        if c.verdict.status == REFUTED:
            assert c.status == ERRATUM and c.erratum, (c.derivation, c.chain, c.index)


def test_covers_every_chain_and_line_of_the_note(note_report, note_path):
    df = load_file(note_path)
    steps = {(c.derivation, c.chain, c.index) for c in note_report.checks if c.kind == "step"}
    for d in df.derivations:
        for ch in d.chains:
            for k in range(1, len(ch.lines)):
                assert (d.id, ch.id, k) in steps
    # the six areas of the note are all there
    ids = {d.id for d in df.derivations}
    assert {"sigmoid_pt", "sigmoid_dpt_dx", "cross_entropy", "focal_sigmoid", "focal_star",
            "softmax_dpi_dxi", "softmax_dpi_dxj", "softmax_focal_dpt", "softmax_focal_dxi",
            "softmax_focal_dxj"} <= ids
    assert len(next(c for d in df.derivations if d.id == "focal_sigmoid" for c in d.chains).lines) == 6


def test_errors_are_found_without_the_errata(note_path):
    """Strip every erratum: the refuted steps are exactly those touching the marked lines."""
    df = load_file(note_path)
    marked = set()
    for d in df.derivations:
        for ch in d.chains:
            for line in ch.lines:
                if line.erratum:
                    marked.add((d.id, ch.id, line.index))
                    line.erratum = None
    assert len(marked) >= 5
    report = Report()
    Verifier().verify_file(df, report)
    refuted_steps = {(c.derivation, c.chain, c.index) for c in report.checks
                     if c.kind == "step" and c.verdict.status == REFUTED}
    # every marked line is refuted by a step into or out of it, or by the chain's end-to-end check
    for (d, ch, k) in marked:
        touching = {(d, ch, k), (d, ch, k + 1)} & refuted_steps
        e2e = any(c.kind == "end-to-end" and c.verdict.status == REFUTED and (c.derivation, c.chain) == (d, ch)
                  for c in report.checks)
        assert touching or e2e, (d, ch, k)
    # and no step between two unmarked lines is refuted: no correct line is flagged
    for (d, ch, k) in refuted_steps:
        assert (d, ch, k - 1) in marked or (d, ch, k) in marked, (d, ch, k)
    assert report.exit_code() == 1


def test_errata_have_counterexamples_and_proved_corrections(note_report):
    assert len(note_report.errata) >= 5
    for e in note_report.errata:
        assert e.status == "ok"
        assert e.refuted_by and e.refuted_by[0].verdict.counterexample
        cex = e.refuted_by[0].verdict.counterexample
        assert cex["point"] and cex["lhs"] != cex["rhs"]
        assert e.corrected_checks and all(c.verdict.status == PROVED for c in e.corrected_checks)


def test_softmax_holds_for_k_2_3_7(note_report):
    soft = [c for c in note_report.checks if c.derivation.startswith("softmax") and c.kind != "domain"
            and c.derivation != "softmax_focal_dpt" and not c.derivation.startswith("softmax_sum")]
    assert soft
    for c in soft:
        assert set(c.instances) == {"K2", "K3", "K7"}
        assert all("agree" in v for v in c.instances.values())
    # the same derivations written with sums over the K classes: proved for every K (no instances)
    summed = [c for c in note_report.checks if c.derivation.startswith("softmax_sum")]
    assert summed
    for c in summed:
        assert c.verdict.status == PROVED and c.verdict.method.startswith("every K"), (c.derivation, c.verdict.method)


@pytest.mark.parametrize("deriv, chain, k", [("softmax_focal_dxj", "dfl_dxj", 3),
                                               ("softmax_focal_dxi", "dfl_dxi", 3)])
def test_domain_aware_strategy_needed_for_factored_softmax_line(note_report, note_path, deriv, chain, k):
    """simplify(a - b) alone does not prove the (1 - p_i)^gamma / (1 - p_i) lines; ours does."""
    import sympy as sp

    from derive.prover.engine import Resolver

    df = load_file(note_path)
    d = next(d for d in df.derivations if d.id == deriv)
    r = Resolver(d.context)
    ch = next(c for c in d.chains if c.id == chain)
    a, b = r.resolve(ch.lines[k - 1].expr), r.resolve(ch.lines[k].expr)
    assert sp.simplify(a - b) != 0
    assert sp.simplify(d.context.expand(a - b)) != 0
    c = next(c for c in note_report.checks if (c.derivation, c.chain, c.index) == (deriv, chain, k))
    assert c.verdict.status == PROVED and "positivity" in c.verdict.method


def _write_variant(tmp_path, note_path, old, new, name="variant.toml"):
    text = note_path.read_text()
    assert text.count(old) == 1, old
    p = tmp_path / name
    p.write_text(text.replace(old, new))
    return p


FINAL = '"y*(1 - p_t)^gamma*(gamma*p_t*log(p_t) + (p_t - 1))"'


@pytest.mark.parametrize("wrong", [
    '"-y*(1 - p_t)^gamma*(gamma*p_t*log(p_t) + (p_t - 1))"',      # flipped sign
    '"y*(1 - p_t)^gamma*(p_t*log(p_t) + (p_t - 1))"',             # dropped factor gamma
    '"y*(1 - p_t)^(gamma - 1)*(gamma*p_t*log(p_t) + (p_t - 1))"',  # gamma - 1 where gamma belongs
])
def test_injected_error_is_refuted(tmp_path, note_path, capsys, wrong):
    p = _write_variant(tmp_path, note_path, FINAL, wrong)
    rc = main(["verify", "--json", str(p)])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1
    bad = [c for c in out["checks"] if c["status"] == FAIL]
    assert bad and all(c["derivation"] == "focal_sigmoid" for c in bad)
    step = next(c for c in bad if c["kind"] == "step")
    assert step["step"] == 5 and step["verdict"] == "refuted"
    assert step["counterexample"]["point"] and step["counterexample"]["lhs"] != step["counterexample"]["rhs"]


def test_stale_erratum_fails(tmp_path, note_path, capsys):
    # an erratum on a correct line: the tool must refuse it
    p = _write_variant(tmp_path, note_path, '{ expr = "p_i*(1 - p_i)", latex = \'p_i(1 - p_i)\', rule = "factor p_i" }',
                       '{ expr = "p_i*(1 - p_i)", rule = "factor p_i", erratum = { corrected = "p_i - p_i^2", why = "bogus" } }')
    rc = main(["verify", str(p)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "stale erratum" in out


def test_json_report_fields(note_path, capsys):
    rc = main(["verify", "--json", str(note_path)])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["exit_code"] == 0
    c = next(c for c in data["checks"] if c["kind"] == "step")
    for key in ("derivation", "step", "expression", "latex", "verdict", "method", "counterexample", "seconds"):
        assert key in c
    assert data["errata"] and data["errata"][0]["counterexample"]


def test_text_report_names_strategies_and_times(note_path, capsys):
    assert main(["verify", str(note_path)]) == 0
    out = capsys.readouterr().out
    assert "case split" in out and "positivity substitution" in out and " s  " in out
    assert "result: OK" in out and "Errata" in out


def test_numeric_only_needs_allow_numeric(tmp_path, capsys):
    p = tmp_path / "n.toml"
    p.write_text('[symbols]\nx = "real"\n[[derivation]]\nid = "d"\n[[derivation.chain]]\n'
                 'lines = ["log(1 + exp(x))", "x + log(1 + exp(-x))"]\n')
    # plain algebra cannot prove a softplus identity: the step can only be confirmed numerically
    assert main(["verify", "--strategies", "algebra", str(p)]) == 1
    assert "CONFIRMED" in capsys.readouterr().out
    assert main(["verify", "--strategies", "algebra", "--allow-numeric", str(p)]) == 0
    capsys.readouterr()
    assert main(["verify", str(p)]) == 0  # with every strategy, it is proved
    assert "proved" in capsys.readouterr().out


def test_time_limit_gives_unproved_and_other_steps_still_run(tmp_path, capsys):
    p = tmp_path / "slow.toml"
    p.write_text('[symbols]\nx = "real"\n[[derivation]]\nid = "d"\n'
                 '[[derivation.chain]]\nid = "slow"\nlines = ["(x^2 + 2*x + 1)^150", "(x + 1)^300"]\n'
                 '[[derivation.chain]]\nid = "fast"\nlines = ["2*x", "x + x"]\n')
    rc = main(["verify", "--json", "--step-timeout", "0.2", str(p)])
    data = json.loads(capsys.readouterr().out)
    assert rc == 1
    by_chain = {c["chain"]: c for c in data["checks"]}
    assert by_chain["slow"]["verdict"] == "unproved" and by_chain["slow"]["method"] == "time limit"
    assert by_chain["fast"]["verdict"] == "proved"


def test_whole_run_timeout(note_path, capsys):
    import time as _time

    t0 = _time.monotonic()
    rc = main(["verify", "--json", "--timeout", "0.5", str(note_path)])
    elapsed = _time.monotonic() - t0
    data = json.loads(capsys.readouterr().out)
    assert rc == 1
    assert any(c["verdict"] == "unproved" and c["method"] == "time limit" for c in data["checks"])
    assert elapsed < 5


def test_readme_lists_the_errata_the_tool_found(note_report):
    """README's errata table names exactly the errata of the report (id, derivation, chain, line)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = re.findall(r"^\| (E\d+) \| (\w+) / (\w+), line (\d+) \|", readme, re.M)
    listed = {(i, d, c, int(k)) for i, d, c, k in rows}
    found = {(e.id, e.derivation, e.chain, e.line) for e in note_report.errata}
    assert listed == found


def test_abs_and_where_are_proved_by_a_sign_split(tmp_path, capsys):
    p = tmp_path / "signs.toml"
    p.write_text('[symbols]\nv = "real"\n[[derivation]]\nid = "d"\n'
                 '[[derivation.chain]]\nid = "softplus"\n'
                 'lines = ["log(1 + exp(v))", "where(v > 0, v, 0) + log1p(exp(-abs(v)))"]\n'
                 '[[derivation.chain]]\nid = "abs"\nlines = ["abs(v)", "where(v > 0, v, -v)"]\n'
                 '[[derivation.chain]]\nid = "at_zero"\nlines = ["where(v >= 0, 1, 0)", "where(v > 0, 1, 0)"]\n')
    rc = main(["verify", "--json", str(p)])
    data = json.loads(capsys.readouterr().out)
    by_chain = {c["chain"]: c for c in data["checks"] if c["step"] != "end-to-end"}
    assert by_chain["softplus"]["verdict"] == PROVED and by_chain["abs"]["verdict"] == PROVED
    # wrong only at v = 0: the v = 0 case of the split keeps it from being proved
    assert by_chain["at_zero"]["verdict"] != PROVED
    assert rc == 1
