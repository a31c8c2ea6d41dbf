"""Issue 12, prover part: never lie, never fall over.

Each test is a hostile input that once gave a wrong verdict (a false "proved", a true step
refuted, a false step numerically confirmed) or a crash, checked through the public entry
points (verify_paths, Prover.check, Prover.check_domain)."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sympy as sp

from derive.prover import engine as P
from derive.language.domains import Domain
from derive.language.loader import loads
from derive.prover.engine import CONFIRMED, PROVED, REFUTED, UNPROVED, Prover, time_limit
from derive.prover.verify import verify_paths

ROOT = Path(__file__).resolve().parent.parent


def _file(symbols, lines, definitions=None, chains=None):
    out = ["[symbols]"] + [f'{k} = "{v}"' for k, v in symbols.items()]
    if definitions:
        out.append("[definitions]")
        for name, (expr, dom) in definitions.items():
            out.append(f'{name} = {{ expr = "{expr}", domain = "{dom}" }}')
    out += ["[[derivation]]", 'id = "d"']
    for cid, ls in (chains or {"c": lines}).items():
        out += ["[[derivation.chain]]", f'id = "{cid}"', "lines = [" + ", ".join(f'"{l}"' for l in ls) + "]"]
    return "\n".join(out) + "\n"


def run(tmp_path, text, **kw):
    p = tmp_path / "hostile.toml"
    p.write_text(text)
    report = verify_paths([p], **kw)
    assert not report.errors, report.errors
    return report


def step(report, chain="c", index=1):
    return next(c for c in report.checks if c.chain == chain and c.kind == "step" and c.index == index)


def domain(report, name):
    return next(c for c in report.checks if c.kind == "domain" and c.lhs == name)


def prover_for(text):
    df = loads(text)
    d = df.derivations[0]
    return Prover(d.context, instances=d.instances, instance_symbols=d.instance_symbols), d.context


# ------------------------------------------------------------------------------------------
# 1. a declared domain is used only once proved


def test_unproved_finite_domain_is_not_case_split(tmp_path):
    r = run(tmp_path, _file({"x": "real"}, ["q", "1"], {"q": ("where(x == 1/7, 5, 1)", "{1}")}))
    dom = domain(r, "q")
    assert dom.verdict.status == REFUTED  # the threshold point x = 1/7 is sampled
    assert dom.verdict.counterexample["point"] == {"x": "1/7"}
    s = step(r)
    assert s.verdict.status == REFUTED, s.verdict
    assert s.verdict.counterexample["point"] == {"x": "1/7"}
    assert s.verdict.counterexample["lhs"] != s.verdict.counterexample["rhs"]
    assert r.exit_code() == 1


def test_unproved_finite_domain_where_no_sample_can_refute(tmp_path):
    """x^3 == 2 is never met by a rational sample: the numbers cannot refute the domain,
    so only the rule 'assume a domain once proved' keeps q = 1 from being proved."""
    r = run(tmp_path, _file({"x": "real"}, None, {"q": ("where(x^3 == 2, 5, 1)", "{1}"),
                                                   "p": ("where(x^3 == 2, -1, 1)", "(0, oo)")},
                            chains={"c": ["q", "1"], "a": ["abs(p)", "p"]}))
    assert domain(r, "q").verdict.status != PROVED
    assert domain(r, "p").verdict.status != PROVED
    assert step(r).verdict.status != PROVED
    assert step(r, "a").verdict.status != PROVED
    assert r.exit_code() == 1


def test_a_where_branch_no_sample_takes_is_never_confirmed(tmp_path):
    """q = 1 is false at x = 2^(1/3); no rational point meets x^3 == 2, so the numbers say
    nothing about that branch: --allow-numeric must not accept the step."""
    r = run(tmp_path, _file({"x": "real"}, ["q", "1"], {"q": ("where(x^3 == 2, 5, 1)", "{1}")}),
            allow_numeric=True)
    for c in (step(r), domain(r, "q")):
        assert c.verdict.status == UNPROVED, c.verdict
        assert "where() branch" in c.verdict.detail and "Eq(x**3, 2)" in c.verdict.detail
    assert r.exit_code() == 1


def test_q_times_x_with_a_wrong_finite_domain(tmp_path):
    r = run(tmp_path, _file({"x": "real"}, ["q*x", "x"], {"q": ("where(x <= 100, 1, 2)", "{1}")}))
    s = step(r)
    assert s.verdict.status == REFUTED
    assert sp.Rational(s.verdict.counterexample["point"]["x"]) > 100
    assert domain(r, "q").verdict.status == REFUTED


def test_domain_of_goes_through_proof(tmp_path):
    prover, ctx = prover_for(_file({"x": "real", "y": "{-1, 1}"}, ["q", "1"],
                                   {"q": ("where(x == 1/7, 5, 1)", "{1}")}))
    q, y = ctx.names["q"], ctx.names["y"]
    assert prover.domain_of(q) is None  # declared, not proved: nothing may assume it
    assert prover.domain_of(y) is not None  # a base symbol's domain is the file's assumption
    assert list(prover._case_values({q})) == [{}]  # no case split over the unproved {1}
    assert prover._param_subs({q}) == {}


def test_finite_domain_of_a_definition_can_be_proved_and_used(tmp_path):
    r = run(tmp_path, _file({"x": "real"}, ["q^2", "q"], {"q": ("where(x > 0, 1, 0)", "{0, 1}")}),
            strategies=["algebra", "domains"])
    assert domain(r, "q").verdict.status == PROVED
    s = step(r)
    assert s.verdict.status == PROVED and s.verdict.method.startswith("domains")
    assert r.exit_code() == 0


# ------------------------------------------------------------------------------------------
# 2. true steps are not refuted


def test_cancellation_past_twelve_digits_is_not_a_counterexample(tmp_path):
    r = run(tmp_path, _file({"x": "real"}, ["(x + 1e20)^2 - 1e40", "x^2 + 2e20*x"]))
    assert step(r).verdict.status == PROVED
    # and numerically the two sides agree at every point, certainly
    prover, ctx = prover_for(_file({"x": "real"}, ["x", "x"]))
    x = ctx.names["x"]
    lhs, rhs = (x + sp.Integer(10) ** 20) ** 2 - sp.Integer(10) ** 40, x ** 2 + 2 * sp.Integer(10) ** 20 * x
    scan = prover.numeric_scan(lhs, rhs, prover.points(P.CONFIRM_POINTS))
    assert scan.cex is None and scan.agree > 0.8 * scan.total


def test_huge_exponent_is_not_refuted(tmp_path):
    r = run(tmp_path, _file({"x": "real"}, ["(x^2+1)^(1e50)", "(x^4+2*x^2+1)^(5e49)"]))
    assert step(r).verdict.status == PROVED


def test_huge_exponent_false_step_is_still_refuted(tmp_path):
    r = run(tmp_path, _file({"x": "real"}, ["(x^2+1)^(1e50)", "(x^2+2)^(1e50)"]))
    s = step(r)
    assert s.verdict.status == REFUTED
    assert s.verdict.counterexample["lhs"] != s.verdict.counterexample["rhs"]


def test_closed_bound_is_compared_exactly(tmp_path):
    r = run(tmp_path, _file({"x": "real"}, ["p", "1/(3 + x^2)"], {"p": ("1/(3 + x^2)", "(0, 1/3]")}))
    assert domain(r, "p").verdict.status == PROVED
    assert r.exit_code() == 0
    d = Domain.parse("(0, 1/3]")
    import mpmath
    assert d.contains(sp.Rational(1, 3)) and not d.contains(sp.Rational(1, 3) + sp.Rational(1, 10**30))
    mpmath.iv.dps = 40
    try:
        below, above = P._ends(mpmath.iv.mpf(1) / 3)  # a 40-digit enclosure of 1/3
    finally:
        mpmath.iv.dps = 15
    # compared exactly at their own precision (no rounding to floats or to the working precision)
    assert d.contains(below) and not d.contains(above) and float(above) == float(below)
    assert d.locate(below, above) is None  # straddles 1/3: undecided, never "outside"
    assert d.locate(above, above + 1) is False


def test_open_bound_value_is_outside(tmp_path):
    r = run(tmp_path, _file({"x": "real"}, ["p", "1/(3 + x^2)"], {"p": ("1/(3 + x^2)", "(0, 1/3)")}))
    dom = domain(r, "p")
    assert dom.verdict.status == REFUTED and dom.verdict.counterexample["point"] == {"x": "0"}


# ------------------------------------------------------------------------------------------
# 3. --allow-numeric never accepts a false step


@pytest.mark.parametrize("lines", [
    ["exp(300 + x^2) - 1", "exp(300 + x^2)"],  # -1 under a relative tolerance near e^300
    ["x", "x + 1e-400"],
    ["where(x > 10, 0, x)", "x"],  # samples once only in [-6, 6]
])
def test_false_steps_are_refuted_even_with_allow_numeric(tmp_path, lines):
    r = run(tmp_path, _file({"x": "real"}, lines), allow_numeric=True)
    s = step(r)
    assert s.verdict.status == REFUTED, s.verdict
    cex = s.verdict.counterexample
    assert cex["lhs"] != cex["rhs"]  # the printed values visibly differ
    assert r.exit_code() == 1


def test_where_threshold_counterexample_is_past_the_threshold(tmp_path):
    r = run(tmp_path, _file({"x": "real"}, ["where(x > 10, 0, x)", "x"]), allow_numeric=True)
    assert sp.Rational(step(r).verdict.counterexample["point"]["x"]) > 10


def test_one_side_undefined_is_a_domain_error(tmp_path):
    # (y^2)^g is real everywhere, y^(2g) is not for y = -1 and g not a multiple of 1/2 (issue 13)
    r = run(tmp_path, _file({"y": "{-1, 1}", "g": "real"}, ["(y^2)^g", "y^(2*g)"]), allow_numeric=True)
    s = step(r)
    assert s.verdict.status == REFUTED, s.verdict
    # at g = 1/2 the right side is (-1)^1 = -1 (an integer exponent at that point), the left 1
    assert s.verdict.counterexample["point"]["y"] == "-1"
    assert r.exit_code() == 1


def test_dropped_points_refuse_confirmation(tmp_path):
    # both sides undefined at most points of y = -1: dropped, too many to confirm
    r = run(tmp_path, _file({"y": "{-1, 1}", "g": "real"}, ["y^(g/3)*(y^2)^g", "y^(g/3)*y^(2*g)"]),
            allow_numeric=True)
    s = step(r)
    assert s.verdict.status in (UNPROVED, PROVED), s.verdict
    if s.verdict.status == UNPROVED:
        assert "dropped" in s.verdict.detail and "non-integer power" in s.verdict.detail


def test_confirmation_samples_every_scale():
    prover, ctx = prover_for(_file({"x": "real", "u": "(-oo, 0)", "p": "(0, 1)"}, ["x", "x"]))
    pts = prover.points(P.CONFIRM_POINTS)
    x, u, p = ctx.names["x"], ctx.names["u"], ctx.names["p"]
    xs = [pt[x] for pt in pts]
    assert max(xs) >= 10**12 and min(xs) <= -10**12
    assert any(0 < v <= sp.Rational(1, 10**20) for v in xs) and any(-sp.Rational(1, 10**20) <= v < 0 for v in xs)
    assert min(pt[u] for pt in pts) <= -10**12 and max(pt[u] for pt in pts) > -sp.Rational(1, 10**19)
    assert any(1 - pt[p] <= sp.Rational(1, 10**19) for pt in pts) and any(pt[p] <= sp.Rational(1, 10**19) for pt in pts)
    assert all(Domain.parse("(0, 1)").contains(pt[p]) and pt[u] < 0 for pt in pts)
    # the screening points do not change (the errata's counterexamples stay as reported)
    assert prover.points(P.SCREEN_POINTS) == prover.points(8) + prover.points(P.SCREEN_POINTS)[8:]


def test_true_step_still_confirmed_with_huge_points_dropped(tmp_path):
    r = run(tmp_path, _file({"x": "real"}, ["log(1 + exp(x))", "x + log(1 + exp(-x))"]),
            strategies=["algebra"], allow_numeric=True)
    s = step(r)
    assert s.verdict.status == CONFIRMED, s.verdict
    assert r.exit_code() == 0


# ------------------------------------------------------------------------------------------
# 4. time limits


def _armed():
    return signal.getitimer(signal.ITIMER_REAL) != (0.0, 0.0)


def test_step_timeout_inf_means_no_limit(tmp_path):
    r = run(tmp_path, _file({"x": "real"}, ["2*x", "x + x"]), step_timeout=float("inf"))
    assert step(r).verdict.status == PROVED
    for lim in (float("inf"), float("nan"), 1e300, None):
        with time_limit(lim):
            assert not _armed()


def test_tiny_time_limits_always_disarm():
    handler = signal.getsignal(signal.SIGALRM)
    for i in range(300):
        try:
            with time_limit(1e-6):  # rounded up to a millisecond: it expires at any point of the block
                sum(range(i * 100))
        except P.StrategyTimeout:
            pass
        assert not _armed()
        assert signal.getsignal(signal.SIGALRM) is handler
    with pytest.raises(P.StrategyTimeout):
        with time_limit(0):
            pass


def test_tiny_step_timeout_does_not_kill_the_process(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text(_file({"x": "real"}, ["x", "x + 1e-400"]))
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from derive.prover.verify import verify_paths
        for _ in range(3):
            r = verify_paths([{str(p)!r}], step_timeout=1e-6)
        time.sleep(0.6)  # a timer left armed (0.2 s repeat) would kill us here with SIGALRM
        print("survived", r.checks[0].verdict.status)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert "survived refuted" in out.stdout


# ------------------------------------------------------------------------------------------
# 5. finite products are never materialised


def test_six_symbols_with_sixty_values_each(tmp_path):
    vals = "{" + ", ".join(str(i) for i in range(60)) + "}"
    syms = {f"a{i}": vals for i in range(6)}
    prod = "*".join(f"a{i}" for i in range(6))
    text = _file(syms, None, chains={"sum": ["a0+a1+a2+a3+a4+a5", "a5+a4+a3+a2+a1+a0"],
                                     "abs": [f"abs({prod})", prod]})
    p = tmp_path / "big.toml"
    p.write_text(text)
    code = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        from derive.prover.verify import verify_paths
        r = verify_paths([{str(p)!r}])
        for c in r.checks:
            print(c.chain, c.verdict.status, c.verdict.detail)
        print("maxrss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("sum proved")
    assert lines[1].startswith("abs numerically confirmed") and "too many cases" in lines[1]
    assert int(lines[-1].split()[1]) < 1_000_000  # well under a GB (the product alone was over 4 GB)
    # the k-th point is the k-th combination, decoded without listing the product
    prover, ctx = prover_for(text)
    pts = prover.points(P.CONFIRM_POINTS)
    a5 = ctx.names["a5"]
    assert [pt[a5] for pt in pts[:3]] == [0, 1, 2]


# ------------------------------------------------------------------------------------------
# 6. failures become verdicts, not tracebacks


def test_non_finite_expressions_are_unproved_not_a_traceback():
    prover, ctx = prover_for(_file({"x": "real"}, ["x", "x"]))
    x = ctx.names["x"]
    for lhs in (x + 0 * (sp.Integer(1) / 0), x + sp.log(0), x + sp.nan):
        v = prover.check(lhs, x)
        assert v.status == UNPROVED and v.method == "not a finite expression", v
    # the evaluator on its own: no value, never an exception
    pl = P._prepare_numeric(sp.log(x - x))
    res = P.compare_at(pl, P._prepare_numeric(x), {x: sp.Integer(1)})
    assert res.kind == "invalid"


@pytest.mark.parametrize("exc", [MemoryError, RecursionError, OverflowError])
def test_errors_in_numeric_confirmation_become_unproved(monkeypatch, exc):
    prover, ctx = prover_for(_file({"x": "real"}, ["x", "x"]))
    prover.strategies = ["algebra"]
    x = ctx.names["x"]
    calls = []
    real = Prover.numeric_scan

    def scan(self, *a, **k):
        calls.append(1)
        if len(calls) > 1:  # the confirmation, after the counterexample search
            raise exc("simulated")
        return real(self, *a, **k)

    monkeypatch.setattr(Prover, "numeric_scan", scan)
    v = prover.check(sp.log(1 + sp.exp(x)), x + sp.log(1 + sp.exp(-x)))
    assert v.status == UNPROVED and exc.__name__ in v.detail, v
    assert v.method in ("memory limit", "too large", "overflow")


def test_memory_error_in_the_evaluator_drops_points(monkeypatch):
    prover, ctx = prover_for(_file({"x": "real"}, ["x", "x"]))
    prover.strategies = ["algebra"]
    x = ctx.names["x"]

    def boom(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(P, "compare_at", boom)
    v = prover.check(sp.log(1 + sp.exp(x)), x + sp.log(1 + sp.exp(-x)))
    assert v.status == UNPROVED and "MemoryError" in v.detail, v


def test_memory_error_in_a_strategy_is_named(monkeypatch):
    prover, ctx = prover_for(_file({"x": "real", "p": "(0, 1)", "g": "real"}, ["x", "x"]))
    p, g = ctx.names["p"], ctx.names["g"]

    def boom(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(P, "normalise", boom)
    v = prover.check((1 - p) ** g / (1 - p), (1 - p) ** (g - 1))
    assert v.status in (PROVED, CONFIRMED)  # the other strategies still ran
    assert any(t.endswith("memory limit") for t in v.tried), v.tried


def test_errors_anywhere_in_a_step_or_a_domain_check_become_verdicts(monkeypatch):
    prover, ctx = prover_for(_file({"x": "real"}, ["p", "p"], {"p": ("1/(1 + exp(-x))", "(0, 1)")}))
    p, x = ctx.names["p"], ctx.names["x"]

    def deep(*a, **k):
        raise RecursionError("deep")

    monkeypatch.setattr(P.Resolver, "resolve", deep)
    v = prover.check(p, x)
    assert v.status == UNPROVED and v.method == "too large"
    monkeypatch.setattr(Prover, "_domain_point", lambda *a, **k: (_ for _ in ()).throw(OverflowError("big")))
    d = prover.check_domain(p)
    assert d.status == UNPROVED and d.method == "overflow" and "OverflowError" in d.detail


# ------------------------------------------------------------------------------------------
# determinism


def test_verdicts_do_not_depend_on_the_hash_seed(tmp_path):
    p = tmp_path / "mix.toml"
    p.write_text(_file({"x": "real", "y": "{-1, 1}", "g": "real"}, None,
                       {"q": ("where(x > 0, 1, 0)", "{0, 1}")},
                       chains={"a": ["where(x > 10, 0, x)", "x"], "b": ["(y^2)^g", "y^(2*g)"],
                               "c": ["q^2", "q"], "d": ["exp(300 + x^2) - 1", "exp(300 + x^2)"]}))
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from derive.prover.verify import verify_paths
        r = verify_paths([{str(p)!r}])
        for c in r.checks:
            print(c.chain, c.kind, c.verdict.status, c.verdict.method, c.verdict.counterexample, c.verdict.detail)
    """)
    outs = []
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        outs.append(out.stdout)
    assert outs[0] == outs[1]
