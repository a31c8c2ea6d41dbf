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
                 "removable_power_safe", "removable_power_expm1"):
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
