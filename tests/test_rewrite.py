"""derive.rewrite: a loss the package does not ship, written naively, gets a stable kernel from the proved rules.

The file below spells the focal loss out with 1/(1 + exp(-x)) and log, as a textbook does, and its [[kernel]]
points at those closed forms (rewrite = true).  The generator rewrites them with the rules of
derive/rewrite/rules.toml, proves each result equal to its closed form, and the kernel must then meet the
accuracy bounds of `derive accuracy` against mpmath references, with no NaN or inf at |x| = 1e4, and name the
rules that fired in its generated code.
"""
from __future__ import annotations

import numpy as np
import pytest
import sympy as sp

NAIVE = '''
[file]
title = "A focal loss written naively"
module = "naive_focal_test"

[symbols]
x = { domain = "real" }
t = { domain = "{0, 1}" }
gamma = { domain = "[0, oo)" }

[definitions]
y = { expr = "2*t - 1" }
p_t = { expr = "1/(1 + exp(-y*x))", domain = "(0, 1)" }

[[derivation]]
id = "naive_focal"

[[derivation.chain]]
id = "loss"
export = "naive_loss"
lines = ["-(1 - p_t)^gamma*log(p_t)", { expr = "-(1 - 1/(1 + exp(-y*x)))^gamma*log(1/(1 + exp(-y*x)))", rule = "p_t written out" }]

[[derivation.chain]]
id = "grad"
export = "naive_grad"
lines = ["D(-(1 - p_t)^gamma*log(p_t), x)", { expr = "y*(1 - p_t)^gamma*(gamma*p_t*log(p_t) + p_t - 1)", rule = "product rule" }]

[[kernel]]
name = "naive_focal"
layout = "elementwise"
target = "binary"
loss = "naive_loss"
grad = "naive_grad"
params = ["gamma"]
defaults = { gamma = 2.0 }
rewrite = true
'''


@pytest.fixture(scope="module")
def naive(tmp_path_factory):
    path = tmp_path_factory.mktemp("naive") / "naive_focal.toml"
    path.write_text(NAIVE, encoding="utf-8")
    return path


def test_every_rule_is_proved_and_phased():
    from derive import rewrite as rw

    rs = rw.rules()
    names = {r.name for r in rs.rules}
    for need in ("sigmoid_from_exp", "log_sigmoid", "one_minus_sigmoid", "sigmoid_power_log_space", "log_softmax",
                 "expm1_from_exp", "one_minus_exp", "log_over_pm1", "log1p_from_log", "power_product_merge",
                 "removable_power_safe", "removable_power_expm1", "distribute_bounded", "distribute_singular_power",
                 "removable_power_times_base", "scaled_one_minus_exp", "sigmoid_minus_target", "log1p_minus_sigmoid"):
        assert need in names
    failed = [c for c in rs.report.checks if c.verdict.status != "proved"]
    assert not failed and len(rs.report.checks) >= len(rs.rules)
    assert [p for p, _ in rs.phases][0] == "recognise"


def test_naive_closed_forms_rewritten(naive):
    from derive.codegen import kernels as K
    from derive.language.loader import load_file

    f = load_file(naive)
    prep = K.prepare(f.kernels[0], f)
    assert prep.rewrites["loss"][:1] == ["sigmoid_from_exp"]
    assert {"log_sigmoid", "one_minus_sigmoid", "sigmoid_power_log_space"} <= set(prep.rewrites["loss"])
    assert "sigmoid_minus_one" in prep.rewrites["grad"]
    for e in prep.exprs.values():  # nothing of the naive form is left: no log, no exp of the logit
        assert not e.has(sp.log) and not e.has(sp.exp)


def test_singular_power_kept_as_ratio():
    """(1 - p)^(gamma - 1) u with gamma >= 0: gamma - 1 may be negative, so the power is not left merged."""
    from derive import rewrite as rw
    from derive.language.domains import Domain

    u, g = sp.Symbol("u", real=True), sp.Symbol("gamma", real=True)
    doms = {u: Domain.parse("(-oo, 0)"), g: Domain.parse("[0, oo)")}
    closed = -g * (1 - sp.exp(u)) ** (g - 1) * u
    new, fired = rw.rewrite(closed, doms)
    assert "removable_power_expm1" in fired and not new.has(sp.exp)
    assert all(not (p.is_Pow and (p.exp - g).is_number and p.exp != g) for p in sp.preorder_traversal(new))
    doms[g] = Domain.parse("[1, oo)")  # and (1 - p)^gamma alone is not touched: its exponent is >= 0
    new2, fired2 = rw.rewrite(-(1 - sp.exp(u)) ** g * u, doms)
    assert "removable_power_expm1" not in fired2


def test_naive_kernel_accuracy_and_saturation(naive):
    import derive
    from derive.measure import accuracy as A

    rows = A.measure(backends=("c", "numpy"), quick=True, files=[str(naive)])
    assert rows
    for r in rows:
        assert r.ok, (r.dtype, r.backend, r.params, r.loss_err, r.grad_err, r.note)
    k = derive.load(str(naive))
    for dt in (np.float32, np.float64):
        x = np.array([-1e4, -1e4, 1e4, 1e4, -30.0, 30.0], dtype=dt)
        t = np.array([0, 1, 0, 1, 1, 0], dtype=dt)
        for gamma in (0.0, 0.5, 2.0, 20.0):
            loss, grad = k.naive_focal(x, t, gamma=gamma, reduction="none", return_grad=True)
            assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad)), (dt, gamma, loss, grad)
    sources = "".join(p.read_text() for p in k.generated.iterdir() if p.suffix in (".c", ".py"))
    assert "rewritten from the closed form by derive.rewrite: naive_loss: sigmoid_from_exp" in sources
    assert "log_sigmoid" in sources and "sigmoid_minus_one" in sources


def test_a_rule_that_is_not_proved_is_refused(tmp_path):
    """A false rule (1 - sigmoid(v) -> sigmoid(v)) is refuted by the prover and never used."""
    from derive import rewrite as rw

    rules = tmp_path / "rules.toml"
    rules.write_text('''[symbols]
v = "real"
[[derivation]]
id = "wrong"
[[derivation.chain]]
id = "rule"
lines = ["1 - sigmoid(v)", "sigmoid(v)"]
''')
    phases = tmp_path / "phases.toml"
    phases.write_text('[[phase]]\nname = "p"\nrules = [{ rule = "wrong", cost = 1 }]\n')
    with pytest.raises(rw.RewriteError, match="rule 'wrong' is not proved"):
        rw.rules(rules, phases)


def test_a_rewritten_form_the_prover_does_not_prove_stops_the_build(naive, monkeypatch):
    """If the engine's result were not equal to the closed form, the kernel build fails naming the export."""
    from derive import rewrite as rw
    from derive.codegen import kernels as K
    from derive.language.loader import DerivationFileError, load_file

    f = load_file(naive)
    monkeypatch.setattr(K, "_REWRITTEN", {})
    monkeypatch.setattr(rw, "rewrite", lambda expr, domains, ruleset=None: (expr + 1, ["sigmoid_from_exp"]))
    with pytest.raises(DerivationFileError, match=r"rewrite: the rules' form of naive_loss .* is not proved"):
        K.prepare(f.kernels[0], f)


# -- the rules that let the second derivatives and the soft-target CE come from their closed forms --------

def _numeric(expr, *syms):
    """expr as a NumPy function, with sigmoid, softplus, expm1 and xexpm1inv evaluated stably (so that a NaN or
    inf can only come from the form's own structure, not from a naive helper)."""
    def sigmoid(v):
        e = np.exp(-np.abs(v))
        return np.where(v >= 0, 1, e) / (1 + e)

    mods = [{"sigmoid": sigmoid, "softplus": lambda v: np.logaddexp(0, v), "expm1": np.expm1,
             "log1p": np.log1p, "xexpm1inv": lambda u: np.where(u == 0, 1.0, u / np.expm1(np.where(u == 0, 1.0, u)))},
            "numpy"]
    return sp.lambdify(syms, expr, modules=mods)


def _ruleset_without(name):
    from derive import rewrite as rw

    rs = rw.rules()
    return rw.RuleSet(tuple(r for r in rs.rules if r.name != name), rs.phases, rs.report)


def test_distribute_bounded_keeps_the_focal_hess_finite_at_saturated_logits():
    """The focal loss's second derivative in its closed form: with rule distribute_bounded the rules' form is
    finite at x_t = -1e308 (for gamma >= 2, gamma*softplus(-x_t) overflows there, sigmoid(x_t) underflows);
    without it the sigmoid multiplies the overflowed sum and gives 0*inf = NaN."""
    from derive import rewrite as rw
    from derive.language.domains import Domain

    x, g = sp.Symbol("x", real=True), sp.Symbol("gamma", real=True)
    doms = {x: Domain.parse("real"), g: Domain.parse("[0, oo)")}
    p = 1 / (1 + sp.exp(-x))
    closed = (1 - p) ** g * p * (g ** 2 * p * (-sp.log(p)) + (1 - p) * (1 + 2 * g + g * sp.log(p)))
    new, fired = rw.rewrite(closed, doms)
    assert "distribute_bounded" in fired
    assert rw.prove_equal(closed, new, _ctx(doms)).status == "proved"
    old, fired_old = rw.rewrite(closed, doms, _ruleset_without("distribute_bounded"))
    assert "distribute_bounded" not in fired_old
    xs = np.array([-1e308, -1e4, -30.0, 0.5, 30.0, 1e4, 1e308])
    with np.errstate(all="ignore"):
        for gv in (0.5, 2.0, 20.0):
            got = _numeric(rw.to_helpers(new), x, g)(xs, gv)
            assert np.isfinite(got).all(), (gv, got)
            bad = _numeric(rw.to_helpers(old), x, g)(xs, gv)
            if gv >= 2:  # gamma*softplus(1e308) overflows: the failure the rule is for
                assert np.isnan(bad[0]), (gv, bad)


def _ctx(doms):
    from derive.language.loader import Context

    return Context(names={s.name: s for s in doms}, domains=dict(doms), definitions={})


def test_singular_power_distributed_and_cancelled_term_by_term():
    """softmax focal's (1 - p_t) dC/du in its closed form has (1 - p)^(gamma - 1), inf at p = 1 for gamma < 1,
    times a sum with one term carrying 1 - p and the other u: the rules distribute the power and cancel it in
    each term; the result is finite where p rounds to 1 (u = -1e-30), the closed form is not."""
    from derive import rewrite as rw
    from derive.language.domains import Domain

    u, g, a = (sp.Symbol(n, real=True) for n in ("u", "gamma", "alpha"))
    doms = {u: Domain.parse("(-oo, 0)"), g: Domain.parse("[0, oo)"), a: Domain.parse("[0, 1]")}
    p = sp.exp(u)
    closed = -a * g * p * (1 - p) ** (g - 1) * (2 * (1 - p) + u * (1 - g * p))
    new, fired = rw.rewrite(closed, doms)
    for need in ("scaled_one_minus_exp", "distribute_singular_power", "removable_power_times_base",
                 "removable_power_expm1"):
        assert need in fired, fired
    assert all(not (q.is_Pow and q.exp == g - 1) for q in sp.preorder_traversal(new))
    us = np.array([-1e-30, -1e-8, -0.5, -30.0, -700.0])
    with np.errstate(all="ignore"):
        got = _numeric(new, u, g, a)(us, 0.5, 1.0)
        naive = _numeric(closed, u, g, a)(us, 0.5, 1.0)
    assert np.isfinite(got).all(), got
    assert not np.isfinite(naive[0])
    np.testing.assert_allclose(got[1:4], naive[1:4], rtol=1e-7)


def test_soft_target_difference_and_log_of_the_complement():
    """p - t for a soft t: rule sigmoid_minus_target takes it from the complements where x >= 0 (t close to 1
    and p close to 1: the naive difference keeps 6 digits, the rules' form all); log(1 - p): log1p_from_log
    fires first, and log1p_minus_sigmoid must still reach -softplus(x), finite at x = 100 (log1p(-1) = -inf)."""
    import mpmath as mp

    from derive import rewrite as rw
    from derive.language.domains import Domain

    x, t = sp.Symbol("x", real=True), sp.Symbol("t", real=True)
    doms = {x: Domain.parse("real"), t: Domain.parse("[0, 1]")}
    p = 1 / (1 + sp.exp(-x))
    grad, fired = rw.rewrite(p - t, doms)
    assert "sigmoid_minus_target" in fired and grad.has(sp.Piecewise)
    xv, tv = np.linspace(20.0, 35.0, 61), 1 - 1e-10
    with mp.workdps(50):
        exact = np.array([float(1 / (1 + mp.exp(-mp.mpf(v))) - mp.mpf(tv)) for v in xv])
    omt = sp.Symbol("omt", real=True)  # 1 - t formed first, as the kernels' common-subexpression pass forms it
    got = _numeric(grad.subs(1 - t, omt), x, t, omt)(xv, np.full_like(xv, tv), np.full_like(xv, 1 - tv))
    naive = _numeric(p - t, x, t)(xv, np.full_like(xv, tv))
    assert np.max(np.abs(got - exact) / np.abs(exact)) <= 1e-14
    assert np.max(np.abs(naive - exact) / np.abs(exact)) > 1e-8  # what the rule is for
    loss, fired = rw.rewrite(-(t * sp.log(p) + (1 - t) * sp.log(1 - p)), doms)
    assert "log1p_minus_sigmoid" in fired and not loss.has(sp.log) and not loss.has(rw.log1p)
    val = _numeric(loss, x, t)(np.array([100.0, -100.0, 1e4]), np.array([0.5, 0.5, 0.0]))
    np.testing.assert_allclose(val, [50.0, 50.0, 1e4], rtol=1e-12)


def test_rules_kernels_as_accurate_as_the_hand_written_ones():
    """The shipped kernels whose forms the rules now find, against the same kernels generated from the
    hand-written forms they replaced (derive/measure/hand_forms.toml), over derive accuracy's quick grid and
    random points: both within the bounds, and the rules' errors no larger than the hand-written ones' (up
    to a rounding difference of a few ulp: the forms differ in where a negation sits)."""
    from derive.measure import accuracy as A
    from derive.measure.bench_rewrite import HAND_FILE

    hand = A.measure(backends=("c", "numpy"), quick=True, files=[str(HAND_FILE)])
    names = sorted({r.kernel for r in hand})
    assert names == ["sigmoid_ce", "sigmoid_focal", "sigmoid_focal_alpha", "softmax_ce", "softmax_focal"]
    rules = {(r.kernel, r.dtype, r.backend, r.params): r for r in A.measure(backends=("c", "numpy"), quick=True,
                                                                            kernels=names)}
    assert len(rules) == len(hand)
    for h in hand:
        r = rules[(h.kernel, h.dtype, h.backend, h.params)]
        assert h.ok and r.ok, (h, r)
        slack = 4 * np.finfo(h.dtype).eps
        assert r.loss_err <= h.loss_err + slack and r.grad_err <= h.grad_err + slack, (h, r)


def test_rules_find_the_hand_written_forms():
    """The loss and gradient forms the rules find are the hand-written ones, expression for expression (so the
    generated loops are the same code), and of the second derivatives only the focal losses' differ (the
    distributed sum, no slower: make bench times both)."""
    from derive.measure.bench_rewrite import same_forms

    same = same_forms()
    assert {k: v for k, v in same.items() if not k.endswith(":second")} == dict.fromkeys(
        ["sigmoid_ce", "sigmoid_focal", "sigmoid_focal_alpha", "softmax_ce", "softmax_focal"], True)
    assert same["sigmoid_ce:second"] and same["softmax_ce:second"]
    assert not same["sigmoid_focal:second"] and not same["sigmoid_focal_alpha:second"]
