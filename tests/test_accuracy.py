"""Accuracy over the whole range, asserted for every kernel of every shipped file (the bounds of
`derive accuracy` on its --quick grid), and the measurement itself: a naive kernel must fail."""
from __future__ import annotations

import textwrap
from fractions import Fraction

import mpmath
import numpy as np
import pytest

from derive.codegen.kernels import shipped_kernels
from derive.measure import accuracy as A
from derive.measure import reference as R
from derive.runtime import losses

BACKENDS = losses.available_backends()
KERNELS = shipped_kernels()


@pytest.mark.parametrize("spec", KERNELS, ids=[k.name for k in KERNELS])
def test_every_shipped_kernel_is_within_its_bounds(spec):
    rows = A.measure(backends=BACKENDS, quick=True, kernels=[spec.name])
    assert {r.backend for r in rows} == set(BACKENDS) and {r.dtype for r in rows} == {"float32", "float64"}
    assert len(rows) == len(BACKENDS) * 2 * len(A.param_grid(spec, quick=True))
    bad = [r for r in rows if not r.ok]
    assert not bad, "\n" + A.format_table(bad) + "\n" + "\n".join(f for r in bad for f in r.failures)


NAIVE = """\
[file]
title = "A kernel that evaluates the closed form literally"

[symbols]
x = "real"
t = "{0, 1}"

[definitions]
y = "2*t - 1"
x_t = "y*x"
p_t = { expr = "1/(1 + exp(-x_t))", domain = "(0, 1)" }

[[derivation]]
id = "naive"
title = "cross-entropy, as written"

[[derivation.chain]]
id = "loss"
export = "naive_loss"
lines = ["-log(p_t)", "-log(1/(1 + exp(-x_t)))"]

[[derivation.chain]]
id = "grad"
export = "naive_grad"
lines = ["D(-log(p_t), x)", "-y*(1 - 1/(1 + exp(-x_t)))"]

[[kernel]]
name = "naive_ce"
title = "cross-entropy through 1/(1 + e^-x_t)"
layout = "elementwise"
target = "binary"
loss = "naive_loss"
grad = "naive_grad"
"""


def test_a_naive_kernel_fails_and_the_point_is_named(tmp_path, capsys):
    path = tmp_path / "naive.toml"
    path.write_text(NAIVE)
    assert A.main([str(path), "--quick", "--backend", "numpy"]) == 1
    out, err = capsys.readouterr()
    assert "naive_ce" in out and " NO" in out
    fails = [line for line in err.splitlines() if line.startswith("FAIL naive_ce")]
    assert fails and all(" at x = " in line and ", t = " in line for line in fails)
    # the point named is where the literal form loses: 1 + e^-x_t rounds, |x_t| well above 1
    x = float(fails[0].split(" at x = ")[1].split(",")[0])
    assert abs(x) > 5


def test_the_reference_holds_where_the_original_needs_thousands_of_digits():
    """x = +-1e4 (1 - p_t ~ e^-1e4) and rows dominated by 1e3: the original definitions, at the
    precision the reference chooses, equal the proved stable forms (mpmath, no exponent range)
    to 20 digits, for every kernel; and the value is not the 0 that too few digits would give."""
    for spec in KERNELS:
        ref = R.reference_for(spec)
        params = A._typed_params(A.param_grid(spec)[0], np.float64, 3, spec)
        if spec.layout == "elementwise":
            x = np.array([-1e4, 1e4, -1e4, 1e4])
            t = np.array([0.0, 0.0, 1.0, 1.0])
        else:
            x = np.array([[1e3, 0.0, -1.0], [0.0, 1e3, 2.0]])
            t = np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]) if spec.target == "class_probs" else np.array([0, 0])
        exact = ref.values(x, t, params)
        stable = ref.values(x, t, params, stable=True)
        for a, b in zip(exact, stable):
            a = np.ravel(np.array(a, dtype=object))
            b = np.ravel(np.array(b, dtype=object))
            for u, v in zip(a, b):
                assert abs(u - v) <= abs(v) * mpmath.mpf(10) ** -20, (spec.name, u, v)
        assert any(v != 0 and abs(v) < 1e-300 for v in np.ravel(np.array(exact[1], dtype=object))), spec.name


def test_past_the_digit_cap_the_reference_says_so():
    spec = next(k for k in KERNELS if k.layout == "elementwise")
    ref = R.reference_for(spec)
    params = A.param_grid(spec)[0]
    with pytest.raises(R.ReferenceUnavailable, match="digits"):
        ref.values(np.array([1e300]), np.array([0.0]), params)
    sl, sg = ref.signs(np.array([1e300, -1e300]), np.array([0.0, 0.0]), params)
    assert sl.shape == sg.shape == (2,)


PARAMS = """\
[file]
title = "parameters for the grid"

[symbols]
x = "real"
t = "{0, 1}"
gamma = "[0, oo)"
alpha = "[0, 1]"
beta = "real"

[definitions]
y = "2*t - 1"
x_t = "y*x"
p_t = { expr = "1/(1 + exp(-x_t))", domain = "(0, 1)" }
alpha_t = "alpha*t + (1 - alpha)*(1 - t)"

[[derivation]]
id = "d"
title = "weighted"

[[derivation.chain]]
id = "loss"
export = "l"
lines = ["-alpha_t*(1 - p_t)^gamma*log(p_t) + beta*0", "-alpha_t*(1 - p_t)^gamma*log(p_t)"]

[[derivation.chain]]
id = "grad"
export = "g"
lines = ["D(-alpha_t*(1 - p_t)^gamma*log(p_t), x)", "alpha_t*y*(1 - p_t)^gamma*(gamma*p_t*log(p_t) + p_t - 1)"]

[[kernel]]
name = "k"
title = "k"
layout = "elementwise"
target = "binary"
loss = "l"
grad = "g"
params = ["alpha", "gamma", "beta"]
defaults = { alpha = 0.25, gamma = 2.0, beta = 0.5 }
weight = "alpha_t"
"""


def test_the_parameter_grid_comes_from_the_declaration(tmp_path):
    from derive.language.loader import load_file

    path = tmp_path / "params.toml"
    path.write_text(PARAMS)
    spec = load_file(path).kernels[0]
    vals = A.param_values(spec)
    assert {0.0, 1.0, 0.25, -1.0} <= set(vals["alpha"])  # closed ends, default, weight off
    assert max(vals["gamma"]) == 20.0 and 0.0 in vals["gamma"]  # unbounded above: exponents up to 20
    assert 0.0 in vals["beta"] and 0.5 in vals["beta"] and min(vals["beta"]) < 0 < max(vals["beta"])
    combos = A.param_grid(spec)
    assert combos[0] == (0.25, 2.0, 0.5)  # the defaults first
    assert len(combos) == len(set(combos)) <= 1 + sum(len(v) - 1 for v in vals.values()) + 2
    for i, p in enumerate(spec.params):  # each value of each parameter met, the others at their defaults
        for v in vals[p]:
            assert any(c[i] == v and all(c[j] == combos[0][j] for j in range(3) if j != i) for c in combos)
    quick = A.param_grid(spec, quick=True)
    assert set(quick) < set(combos) and len(quick) < len(combos)


def test_grid_is_not_dyadic():
    """gamma*x must be rounded on the grid, or FL*'s compensation would go untested."""
    for points in (A.QUICK["points"], A.FULL["points"]):
        x = A.grid(points)
        assert x[0] == -30 and x[-1] == 30 and np.all(np.diff(x) > 0) and np.all(np.abs(x) <= 30)
        rounded = [Fraction(5.0 * v) != 5 * Fraction(v) for v in x]
        assert sum(rounded) > points // 2
        xf = x.astype(np.float32)
        assert sum(Fraction(float(np.float32(5) * v)) != 5 * Fraction(float(v)) for v in xf) > points // 2


def test_accuracy_command_prints_the_table_and_json(tmp_path, capsys):
    names = [KERNELS[0].name, next(k.name for k in KERNELS if k.layout == "softmax")]
    out_json = tmp_path / "acc.json"
    code = A.main(["--quick", "--backend", "numpy", "--json", str(out_json)] + [a for n in names for a in ("--kernel", n)])
    out = capsys.readouterr().out
    import json

    data = json.loads(out_json.read_text())
    assert {r["kernel"] for r in data["rows"]} == set(names)
    assert code == (0 if all(r["ok"] for r in data["rows"]) else 1)
    for n in names:
        assert n in out
    assert "float32" in out and "float64" in out and "kappa" in out


def test_unknown_kernel_and_missing_file_are_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        A.main(["--kernel", "no_such_kernel"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        A.main(["/no/such/file.toml"])
    assert exc.value.code == 2
    assert "no such file" in capsys.readouterr().err


CONDITIONED = [k for k in KERNELS if getattr(k, "conditioned", None)]


@pytest.mark.skipif(not CONDITIONED, reason="no shipped kernel declares conditioned")
@pytest.mark.parametrize("spec", CONDITIONED, ids=[k.name for k in CONDITIONED])
def test_kappa_is_the_condition_number_of_the_reference(spec):
    """kappa (from SymPy's derivatives and the softmax Jacobian) against central differences of
    the reference itself in every continuous input: x (every logit), a soft t or q, the params."""
    ref = R.reference_for(spec)
    params = [float(spec.defaults.get(p, 0.5)) or 0.5 for p in spec.params]
    rng = np.random.default_rng(3)
    if spec.layout == "elementwise":
        cases = [(np.array([v]), np.array([t])) for v, t in ((-3.0, 0.3), (0.7, 0.999), (4.0, 0.25))]
    else:
        cases = [(rng.uniform(-3, 3, (1, 3)), rng.dirichlet(np.ones(3), 1) if spec.target == "class_probs"
                  else np.array([1]))]

    def outputs(x, t, p):
        loss, grad = ref.values(x, t, tuple(p))
        return [loss[0]] + (list(grad[0]) if spec.layout != "elementwise" else [grad[0]])

    for x, t in cases:
        kl, kg = ref.kappa(x, t, tuple(params))
        got = [float(kl[0])] + [float(v) for v in np.ravel(kg)]
        base = outputs(x, t, params)
        sums = [mpmath.mpf(0)] * len(base)
        inputs = [("x", i) for i in range(x.size)] + [("p", i) for i in range(len(params))]
        if spec.target in ("soft", "class_probs"):
            inputs += [("t", i) for i in range(np.size(t))]
        for kind, i in inputs:
            arrays = {"x": x, "t": np.asarray(t, dtype=np.float64), "p": np.array(params)}
            v = arrays[kind].ravel()[i]
            if v == 0:
                continue
            h = abs(v) * 1e-7
            up, dn = {k: a.copy() for k, a in arrays.items()}, {k: a.copy() for k, a in arrays.items()}
            up[kind].ravel()[i] = v + h
            dn[kind].ravel()[i] = v - h
            step = (up[kind].ravel()[i] - dn[kind].ravel()[i])
            fu, fd = outputs(up["x"], up["t"], up["p"]), outputs(dn["x"], dn["t"], dn["p"])
            for j in range(len(base)):
                sums[j] += abs(v * (fu[j] - fd[j]) / step)
        for j, (f, s) in enumerate(zip(base, sums)):
            want = float(s / abs(f))
            assert got[j] == pytest.approx(want, rel=1e-4, abs=1e-9), (spec.name, x, t, j)
