"""Issue 13 (part 1): functions, conditions, domains, assumptions and domain errors.

Each derivation of tests/literature/ is proved in full (every check "proved"), and each has
broken twins, one per error class (sign, dropped factor, exponent off by one, true at one
parameter value only, a domain error, a branch error), made by replacing one line's text:
each twin is refuted with a counterexample at a point of the declared domains."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import sympy as sp

from derive.language.domains import Domain
from derive.language.loader import load_file, loads
from derive.language.parser import ParseError, parse_expression
from derive.prover.engine import PROVED, REFUTED
from derive.prover.verify import Verifier, Report, verify_paths

LIT = Path(__file__).resolve().parent / "literature"
FILES = sorted(LIT.glob("*.toml"))


def _verify(path):
    return verify_paths([str(path)])


def _verify_twin(path, new):
    """Verify a twin: when the broken text is a chain line, only the chains with that line (and every
    domain declaration), which keeps the sum files' twins quick; else the whole file."""
    df = load_file(path)
    target = new.strip('"')
    for d in df.derivations:
        hit = [ch for ch in d.chains if any(target in line.text for line in ch.lines)]
        if hit:
            d.chains = hit
    report = Report()
    Verifier().verify_file(df, report)
    return report


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_literature_file_fully_proved(path):
    report = _verify(path)
    bad = [(c.derivation, c.chain, c.kind, c.index, c.verdict.status, c.verdict.method) for c in report.checks
           if c.verdict.status != PROVED]
    assert not bad, bad
    assert report.exit_code() == 0


#: file -> [(error class, line text as written, broken text)]
TWINS = {
    "huber_smooth_l1": [
        ("sign", '"where(abs(r) <= delta, r, delta*sign(r))"', '"where(abs(r) <= delta, -r, delta*sign(r))"'),
        ("dropped factor", '"where(abs(r) < beta, r/beta, sign(r))"', '"where(abs(r) < beta, r, sign(r))"'),
        ("exponent", '"where(abs(r) <= delta, r, delta*sign(r))"', '"where(abs(r) <= delta, r^2, delta*sign(r))"'),
        ("one value", '"clamp(r/beta, -1, 1)"', '"clamp(r, -1, 1)"'),
        ("domain", '"clamp(r, -delta, delta)"', '"r*min(1, delta/abs(r))"'),
        ("branch", '"clamp(r, -delta, delta)"', '"clamp(r, -delta, 2*delta)"'),
    ],
    "logcosh_charbonnier": [
        ("sign", '"sinh(r)/cosh(r)"', '"-sinh(r)/cosh(r)"'),
        ("dropped factor", '"(exp(2*r) - 1)/(exp(2*r) + 1)"', '"(exp(r) - 1)/(exp(r) + 1)"'),
        ("exponent", '"r/sqrt(r^2 + eps^2)"', '"r/(r^2 + eps^2)"'),
        ("one value", '"r/charb"', '"r/(charb*eps)"'),
        ("domain", '"r + log(1 + exp(-2*r)) - log(2)"', '"2*log(exp(r/2)*cosh(r)^(1/2))"'),
        ("branch", '"tanh(r)"', '"where(r > 0, tanh(r), -tanh(r))"'),
    ],
    "gaussian_nll": [
        ("sign", '"(mu - y)/sigma^2"', '"(y - mu)/sigma^2"'),
        ("dropped factor", '"k*(sigma^2 - (y - mu)^2)/sigma^3"', '"(sigma^2 - (y - mu)^2)/sigma^3"'),
        ("exponent", '"1/sigma - (y - mu)^2/sigma^3"', '"1/sigma - (y - mu)^2/sigma^2"'),
        ("one value", '"(mu - y)/sigma^2"', '"(mu - y)/sigma"'),
        ("domain", 'sigma = "positive"', 'sigma = "real"'),
        ("branch", '"where(D(nll, sigma) < 0, D(nll, sigma), 0)"', '"where(D(nll, sigma) > 0, D(nll, sigma), 0)"'),
    ],
    "hinge": [
        ("sign", '"where(y*x < m, -y, 0)"', '"where(y*x < m, y, 0)"'),
        ("dropped factor", '"-2*y*max(0, m - y*x)"', '"-y*max(0, m - y*x)"'),
        ("exponent", '"where(y*x < m, 2*(x - m*y), 0)"', '"where(y*x < m, 2*(x - m*y)^2, 0)"'),
        ("one value", '"2*(x - m*y)"', '"2*(x - y)"'),
        ("domain", '"-2*y*max(0, m - y*x)"', '"-2*y*sqrt(m - y*x)^2"'),
        ("branch", '"where(y*x < m, -y, 0)"', '"where(y*x > m, -y, 0)"'),
    ],
    # sums over classes and vector targets (derive.prover.sums): every K, refuted at K = 2, 3 or 7
    "softmax_label_smoothing": [
        ("sign", '"p[j] - q[j]"', '"q[j] - p[j]"'),
        ("dropped factor", '"log(S) - (1 - eps)*x[t] - eps/K*sum(x[k], k)"',
         '"log(S) - (1 - eps)*x[t] - eps*sum(x[k], k)"'),
        ("exponent", '"p[j] - (1 - eps)*delta(j, t) - eps/K"', '"p[j] - (1 - eps)*delta(j, t) - eps/K^2"'),
        ("one value", '"p[j] - (1 - eps)*delta(j, t) - eps/K"', '"p[j] - (1 - eps)*delta(j, t) - eps/2"'),
        # cross-entropy as KL + entropy: q log q is undefined where a target is 0 (eps = 0)
        ("domain", '"log(S) - (1 - eps)*x[t] - eps/K*sum(x[k], k)"',
         '"sum(q[k]*log(q[k]/p[k]), k) - sum(q[k]*log(q[k]), k)"'),
        ("branch", '"where(j == t, ', '"where(j != t, '),
    ],
    "softmax_focal_sums": [
        ("sign", '"p[t]*(delta(j, t) - p[j])"', '"p[t]*(p[j] - delta(j, t))"'),
        ("dropped factor", '"p[t]*(delta(j, t) - p[j])"', '"delta(j, t) - p[j]"'),
        ("exponent", '"alpha*(1 - p[t])^gamma*(gamma*p[t]*log(p[t])/(1 - p[t]) - 1)*(delta(j, t) - p[j])"',
         '"alpha*(1 - p[t])^(gamma + 1)*(gamma*p[t]*log(p[t])/(1 - p[t]) - 1)*(delta(j, t) - p[j])"'),
        ("one value", '"alpha*(1 - p[t])^gamma*(gamma*p[t]*log(p[t])/(1 - p[t]) - 1)*(delta(j, t) - p[j])"',
         '"alpha*(1 - p[t])*(gamma*p[t]*log(p[t])/(1 - p[t]) - 1)*(delta(j, t) - p[j])"'),
        ("domain", '"alpha*(1 - p[t])^gamma*(gamma*p[t]*log(p[t])/(1 - p[t]) - 1)*(delta(j, t) - p[j])"',
         # a factor gamma - 1 cancelled: undefined at gamma = 1
         '"alpha*(1 - p[t])^gamma*((gamma^2 - gamma)/(gamma - 1)*p[t]*log(p[t])/(1 - p[t]) - 1)*(delta(j, t) - p[j])"'),
        ("branch", '"where(j == t, ', '"where(j != t, '),
    ],
    "distillation_kl": [
        ("sign", '"T*(p[j] - q[j])"', '"T*(q[j] - p[j])"'),
        ("dropped factor", '"z[j]/T - log(Sz)"', '"z[j] - log(Sz)"'),
        ("exponent", '"T*(p[j] - q[j])"', '"T^2*(p[j] - q[j])"'),
        ("one value", '"T*(sum(q[k], k)*p[j] - q[j])"', '"T*((K - 1)*p[j] - q[j])"'),
        ("domain", '"T*(p[j] - q[j])"', '"T*(p[j] - q[j])*(z[j]^2 - v[j]^2)/((z[j] - v[j])*(z[j] + v[j]))"'),
        ("branch", '"where(j == t, ', '"where(j != t, '),
    ],
    "poisson_negbin_nll": [
        ("sign", '"exp(eta[j]) - c[j]"', '"c[j] - exp(eta[j])"'),
        ("dropped factor", '"2*(1 - y/mu)"', '"1 - y/mu"'),
        ("exponent", '"2*(mu - y)/mu"', '"2*(mu - y)/mu^2"'),
        ("one value", '"r*(mu - y)/(mu*(mu + r))"', '"(mu - y)/(mu*(mu + 1))"'),
        ("domain", '"2*(mu - y)/mu"', '"2*(mu - y)*(y^2 - y)/(mu*y*(y - 1))"'),
        ("branch", '"2*(where(y > 0, ', '"2*(where(y > 1, '),
    ],
    "dice_vnet": [
        ("sign", '"2*(g[j]*U - 2*p[j]*I)/U^2"', '"2*(2*p[j]*I - g[j]*U)/U^2"'),
        ("dropped factor", '"(4*p[j]*I - 2*g[j]*U)/U^2"', '"(2*p[j]*I - 2*g[j]*U)/U^2"'),
        ("exponent", '"2*(g[j]*U - 2*p[j]*I)/U^2"', '"2*(g[j]*U - 2*p[j]*I)/U^3"'),
        # the overlap of voxel j alone for the whole sum: true when N = 1
        ("one value", '"2*(g[j]*U - 2*p[j]*I)/U^2"', '"2*(g[j]*U - 2*p[j]*p[j]*g[j])/U^2"'),
        ("domain", '"(4*p[j]*I - 2*g[j]*U)/U^2"', '"(4*p[j]*I - 2*g[j]*U)*(g[j]^2 + g[j])/(U^2*g[j]*(g[j] + 1))"'),
        ("branch", '"where(g[j] == 0, ', '"where(g[j] == 1, '),
    ],
}


def _in_domains(deriv, chain_id, point):
    """Whether a counterexample's point is a possible one: every symbol in its domain, every family member
    x[c] in the family's domain with 0 <= c < its size, every index in 0..size-1, the assumptions true."""
    ctx = deriv.context
    vals, members = {}, []
    for name, text in point.items():
        v = sp.Rational(text)
        m = re.fullmatch(r"([A-Za-z][A-Za-z0-9_]*)\[(\d+)\]", name)
        if m:
            base = ctx.names[m.group(1)]
            assert ctx.families[base].contains(v), (name, v)
            members.append((base, int(m.group(2))))
            continue
        s = ctx.names[name]
        assert ctx.domains[s].contains(v), (name, v)
        vals[s] = v
    sizes = ctx.index_size
    for s, v in vals.items():
        if s in sizes:  # an index: in 0..K-1 at the point's K
            assert 0 <= v < vals[sizes[s]], (s, v)
    for base, c in members:
        assert c < vals[sizes[base]], (base, c)
    chain = next(ch for ch in deriv.chains if ch.id == chain_id) if chain_id else None
    for cond in deriv.assume + (chain.assume if chain else []):
        assert bool(ctx.expand(cond).xreplace(vals)), (cond, vals)


def _twin_cases():
    for stem, twins in TWINS.items():
        for kind, old, new in twins:
            yield pytest.param(stem, kind, old, new, id=f"{stem}-{kind.replace(' ', '_')}")


@pytest.mark.parametrize("stem,kind,old,new", list(_twin_cases()))
def test_broken_twin_refuted(tmp_path, stem, kind, old, new):
    text = (LIT / f"{stem}.toml").read_text()
    assert text.count(old) == 1, (stem, old)
    path = tmp_path / f"{stem}_{kind.replace(' ', '_')}.toml"
    path.write_text(text.replace(old, new))
    report = _verify_twin(path, new)
    refuted = [c for c in report.checks if c.verdict.status == REFUTED]
    assert refuted, [(c.chain, c.kind, c.verdict.status) for c in report.checks]
    assert report.exit_code() == 1
    df = load_file(path)
    for c in refuted:  # every counterexample lies in the declared domains
        deriv = next(d for d in df.derivations if d.id == c.derivation)
        _in_domains(deriv, c.chain, c.verdict.counterexample["point"])


def test_domain_twin_names_the_reason(tmp_path):
    text = (LIT / "gaussian_nll.toml").read_text().replace('sigma = "positive"', 'sigma = "real"')
    path = tmp_path / "g.toml"
    path.write_text(text)
    report = _verify(path)
    c = next(c for c in report.checks if c.chain == "logscale")
    assert c.verdict.status == REFUTED
    assert "right side undefined at" in c.verdict.method and "log of a negative number" in c.verdict.method
    assert "undefined" in c.verdict.counterexample["rhs"]


# -- the language ----------------------------------------------------------------------------------
X, Y = sp.symbols("x y", real=True)
NAMES = {"x": X, "y": Y}


@pytest.mark.parametrize("text", ["tanh(x)", "sinh(x)", "cosh(x)", "sign(x)", "max(x, y)", "max(x, y, 0)",
                                  "min(x, 1)", "clamp(x, -1, 1)", "where(x > 0 and y < 1, x, y)",
                                  "where(not x > 0 or y == 1, x, y)", "where((x > 0) and (y > 0), 1, 2)"])
def test_new_functions_and_conditions_parse(text):
    parse_expression(text, NAMES)


@pytest.mark.parametrize("text,message", [
    ("x and y", "joins conditions"), ("max(x)", "2 to"), ("not x", "negates a condition"),
    ("where(x > 0, x > 1, 2)", "not a value"), ("and", "joins two conditions"),
])
def test_condition_errors_are_clear(text, message):
    with pytest.raises(ParseError) as exc:
        parse_expression(text, NAMES)
    assert message in str(exc.value) and "unbalanced" not in str(exc.value)


def test_domains_integer_and_nonzero():
    d = Domain.parse("integer [2, oo)")
    assert d.contains(2) and d.contains(7) and not d.contains(1) and not d.contains(sp.Rational(5, 2))
    import random
    vals = d.samples(random.Random(0), 12)
    assert all(d.contains(v) for v in vals) and any(v % 2 == 0 for v in vals) and any(v % 2 == 1 for v in vals)
    nz = Domain.parse("nonzero")
    assert not nz.contains(0) and nz.contains(-1) and nz.contains(sp.Rational(1, 3))
    assert 0 not in nz.samples(random.Random(0), 20) + nz.scale_samples()


def _one(text):
    path_text = text
    df = loads(path_text, "t.toml")
    report = Report()
    Verifier().verify_file(df, report)
    return report


def test_abs_derivative_is_sign_and_evaluates():
    r = _one('[symbols]\nx = "real"\n[[derivation]]\nid = "a"\n[[derivation.chain]]\nid = "c"\n'
             'lines = ["D(abs(x), x)", "sign(x)", "where(x > 0, 1, where(x < 0, -1, 0))"]\n')
    assert all(c.verdict.status == PROVED for c in r.checks), [c.verdict for c in r.checks]
    # sign(0) = 0: a closed form that says -1 at x = 0 is refuted there
    r = _one('[symbols]\nx = "real"\n[[derivation]]\nid = "a"\n[[derivation.chain]]\nid = "c"\n'
             'lines = ["D(abs(x), x)", "where(x > 0, 1, -1)"]\n')
    c = r.checks[0]
    assert c.verdict.status == REFUTED and c.verdict.counterexample["point"]["x"] == "0"


def test_where_on_defined_and_bounded_symbols_is_split():
    r = _one('[symbols]\ns = "real"\nsigma = "positive"\n[definitions]\nq = "sigma - s"\n'
             '[[derivation]]\nid = "a"\n[[derivation.chain]]\nid = "c"\n'
             'lines = ["where(q > 0, q, -q)", "abs(sigma - s)"]\n'
             '[[derivation.chain]]\nid = "d"\nlines = ["where(sigma > s, sigma - s, 0)", "max(sigma - s, 0)"]\n')
    assert all(c.verdict.status == PROVED for c in r.checks), [c.verdict for c in r.checks]
    assert all(c.verdict.seconds < 3 for c in r.checks)


def test_assume_on_derivation_and_chain():
    text = ('[symbols]\ns = "real"\nsigma = "positive"\n'
            '[[derivation]]\nid = "a"\nassume = ["sigma > s"]\n[[derivation.chain]]\nid = "c"\n'
            'lines = ["where(sigma > s, log(sigma - s), 0)", "log(sigma - s)"]\n'
            '[[derivation.chain]]\nid = "d"\nassume = ["s < 0"]\nlines = ["abs(s) + abs(sigma - s)", "sigma - 2*s"]\n'
            '[[derivation.chain]]\nid = "e"\nlines = ["abs(s)", "-s"]\n')
    r = _one(text)
    st = {c.chain: c.verdict.status for c in r.checks}
    assert st == {"c": PROVED, "d": PROVED, "e": REFUTED}, [c.verdict for c in r.checks]
    # the refutation of e respects the derivation's assumption sigma > s
    pt = r.checks[-1].verdict.counterexample["point"]
    assert sp.Rational(pt["s"]) > 0


def test_domain_error_refuted_with_reason():
    r = _one('[symbols]\ns = "real"\n[[derivation]]\nid = "a"\n[[derivation.chain]]\nid = "c"\n'
             'lines = ["log(s^2)", "2*log(s)"]\n[[derivation.chain]]\nid = "d"\nlines = ["(s^2 - s)/(s - 1)", "s"]\n')
    a, b = r.checks
    assert a.verdict.status == REFUTED and "right side undefined at s = " in a.verdict.method
    assert "log of a negative number" in a.verdict.method
    assert b.verdict.status == REFUTED and "division by zero" in b.verdict.method
    assert b.verdict.counterexample["point"]["s"] == "1"
