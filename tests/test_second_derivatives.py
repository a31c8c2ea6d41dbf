"""The second-derivative kernels (double backward) of every shipped [[kernel]]: derive_<kernel>_hess_<dt>
(elementwise d grad / d x) and derive_<kernel>_hvp_<dt> (softmax: a row's Hessian times v), C and NumPy, float64.

Each is checked against central finite differences of the kernel's own generated gradient, against mpmath second
derivatives of the loss as the file first writes it (its loss chain's first line, definitions substituted), for
symmetry (H v . w == v . H w), and for finiteness at saturated logits with gamma = 0.5, where the literal second
derivative has (1 - p_t)^(gamma - 2)."""
from __future__ import annotations

import ctypes

import mpmath
import numpy as np
import pytest
import sympy as sp

from derive.codegen.kernels import shipped_kernels
from derive.language.functions import rewrite_elementary
from derive.language.loader import load_file
from derive.runtime import cbuild

KERNELS = shipped_kernels()
ELEMENTWISE = [k for k in KERNELS if k.kind == "elementwise"]
ROWWISE = [k for k in KERNELS if k.kind == "rowwise"]
ROWPROBS = [k for k in KERNELS if k.kind == "rowprobs"]
F64, PTR = ctypes.c_double, ctypes.POINTER(ctypes.c_double)
I64P = ctypes.POINTER(ctypes.c_int64)
IGNORE = -100


def test_every_shipped_kernel_has_a_second_derivative():
    assert KERNELS and all(k.second for k in KERNELS), [k.name for k in KERNELS if not k.second]
    for k in KERNELS:
        role = {"elementwise": "hess", "rowwise": "dcoef", "rowprobs": "d2term"}[k.kind]
        assert getattr(k, role) == k.second == k.exports[role]


_PY, _LIB = {}, {}


def _py(k):
    if k.module not in _PY:
        _PY[k.module] = cbuild.load_numpy_module(cbuild.GENERATED_DIR, k.module)
    return _PY[k.module]


def _lib(k):
    if k.module not in _LIB:
        try:
            _LIB[k.module] = cbuild.load(cbuild.GENERATED_DIR, k.module)
        except cbuild.BuildError as exc:
            _LIB[k.module] = exc
    if isinstance(_LIB[k.module], Exception):
        pytest.skip(f"no C library: {_LIB[k.module]}")
    return _LIB[k.module]


def _p(a, ptr=PTR):
    return a.ctypes.data_as(ptr)


def _params(k, **over):
    vals = dict(k.defaults)
    vals.update({p: v for p, v in over.items() if p in k.params})
    return [vals.get(p, 1.0) for p in k.params]


def _param_sets(k):
    sets = [_params(k)]
    if "gamma" in k.params:
        sets += [_params(k, gamma=0.5), _params(k, gamma=0.0), _params(k, gamma=3.0)]
    if "epsilon" in k.params:
        sets += [_params(k, epsilon=0.3)]
    return [ps for ps in sets if all(k.domains[n].contains(v) for n, v in zip(k.params, ps))]


# -- the functions under test ------------------------------------------------------------------

def hess(k, backend, x, t, params):
    if backend == "numpy":
        return getattr(_py(k), f"{k.name}_hess_f64")(x, t, *params)
    fn = getattr(_lib(k), f"derive_{k.name}_hess_f64")
    fn.argtypes = [ctypes.c_size_t, PTR, PTR] + [F64] * len(params) + [PTR]
    fn.restype = ctypes.c_int
    out = np.full(x.shape, np.nan)
    assert fn(x.size, _p(x), _p(t), *params, _p(out)) == 0
    return out


def grad(k, x, t, params):
    return getattr(_py(k), f"{k.name}_f64")(x, t, *params)[1]


def _row_params(k, params):
    """(C arguments, NumPy arguments): a class_alpha alpha is (alpha_vec, alpha) in C."""
    c_args, py_args, types = [], [], []
    for name, v in zip(k.params, params):
        if name == "alpha" and k.class_alpha:
            vec = v if np.ndim(v) else None
            c_args += [_p(vec) if vec is not None else None, 0.0 if vec is not None else v]
            types += [PTR, F64]
        else:
            c_args.append(v)
            types.append(F64)
        py_args.append(v)
    return c_args, py_args, types


def hvp(k, backend, x, tq, params, v):
    n, kk = x.shape
    c_args, py_args, types = _row_params(k, params)
    if backend == "numpy":
        fn = getattr(_py(k), f"{k.name}_hvp_f64")
        return fn(x, tq, *py_args, IGNORE, v) if k.kind == "rowwise" else fn(x, tq, *py_args, v)
    fn = getattr(_lib(k), f"derive_{k.name}_hvp_f64")
    out = np.full(x.shape, np.nan)
    if k.kind == "rowwise":
        fn.argtypes = [ctypes.c_size_t, ctypes.c_size_t, PTR, I64P] + types + [ctypes.c_int64, PTR, PTR]
        args = [n, kk, _p(x), _p(tq, I64P)] + c_args + [IGNORE, _p(v), _p(out)]
    else:
        fn.argtypes = [ctypes.c_size_t, ctypes.c_size_t, PTR, PTR] + types + [PTR, PTR]
        args = [n, kk, _p(x), _p(tq)] + c_args + [_p(v), _p(out)]
    fn.restype = ctypes.c_int
    assert fn(*args) == 0
    return out


def row_grad(k, x, tq, params):
    fn = getattr(_py(k), f"{k.name}_f64")
    return fn(x, tq, *params, IGNORE)[1] if k.kind == "rowwise" else fn(x, tq, *params)[1]


# -- the references: the loss as the file first writes it, in mpmath -------------------------------

def _original(k, role):
    """The first line of the chain exporting k.exports[role], definitions substituted, as an mpmath function of
    (the template's symbols..., params...)."""
    f = load_file(k.path)
    did, cid = f.export_derivation[k.exports[role]]
    d = next(d for d in f.derivations if d.id == did)
    chain = next(c for c in d.chains if c.id == cid)
    expr = rewrite_elementary(d.context.expand(chain.lines[0].expr))
    names = {"elementwise": ("x", "t"), "rowwise": ("u",), "rowprobs": ("u", "q", "K")}[k.kind] + k.params
    syms = [d.context.names[n] for n in names]
    assert expr.free_symbols <= set(syms), (k.name, expr.free_symbols)
    return sp.lambdify(syms, expr, modules="mpmath")


def exact_hess(k, x, t, params):
    f = _original(k, "loss")
    with mpmath.workdps(60):
        return np.array([float(mpmath.diff(lambda v: f(v, mpmath.mpf(float(ti)), *map(mpmath.mpf, params)),
                                           mpmath.mpf(float(xi)), 2)) for xi, ti in zip(x, t)])


def _row_loss(k, params):
    """The loss of one row as an mpmath function of its logits."""
    if k.kind == "rowwise":
        f = _original(k, "loss")

        def loss(xs, t, alpha_t=None):
            s = mpmath.fsum(mpmath.exp(v) for v in xs)
            u = xs[t] - mpmath.log(s)
            ps = [alpha_t if (n == "alpha" and alpha_t is not None) else mpmath.mpf(v)
                  for n, v in zip(k.params, params)]
            return f(u, *ps)
        return loss
    f = _original(k, "term")

    def loss(xs, q, alpha_t=None):
        s = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in xs))
        kf = mpmath.mpf(len(xs))
        return mpmath.fsum(f(v - s, mpmath.mpf(float(qj)), kf, *map(mpmath.mpf, params)) for v, qj in zip(xs, q))
    return loss


def exact_row_hessian(k, xr, tq, params, alpha_t=None):
    loss = _row_loss(k, params)
    kk = len(xr)
    with mpmath.workdps(40):
        x0 = [mpmath.mpf(float(v)) for v in xr]
        h = np.empty((kk, kk))
        for i in range(kk):
            for j in range(i, kk):
                order = [0] * kk
                order[i] += 1
                order[j] += 1
                h[i, j] = h[j, i] = float(mpmath.diff(lambda *xs: loss(list(xs), tq, alpha_t), x0, tuple(order)))
    return h


# -- elementwise ----------------------------------------------------------------------------------

def _targets(k):
    return [0.0, 1.0] if k.target == "binary" else [0.0, 0.3, 0.7, 1.0]


@pytest.mark.parametrize("backend", ["numpy", "c"])
@pytest.mark.parametrize("k", ELEMENTWISE, ids=lambda k: k.name)
def test_hess_is_the_derivative_of_the_kernels_gradient(k, backend):
    x = np.linspace(-8, 8, 33)
    for params in _param_sets(k):
        for tv in _targets(k):
            t = np.full_like(x, tv)
            h = 1e-5
            fd = (grad(k, x + h, t, params) - grad(k, x - h, t, params)) / (2 * h)
            got = hess(k, backend, x, t, params)
            np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-8, err_msg=f"{k.name} t={tv} params={params}")


@pytest.mark.parametrize("backend", ["numpy", "c"])
@pytest.mark.parametrize("k", ELEMENTWISE, ids=lambda k: k.name)
def test_hess_against_mpmath_second_derivative_of_the_definition(k, backend):
    x = np.array([-30.0, -9.0, -2.5, -0.4, 0.0, 0.3, 1.7, 6.0, 20.0])
    for params in _param_sets(k)[:2]:
        for tv in _targets(k):
            t = np.full_like(x, tv)
            exact = exact_hess(k, x, t, params)
            got = hess(k, backend, x, t, params)
            np.testing.assert_allclose(got, exact, rtol=1e-11, atol=1e-14, err_msg=f"{k.name} t={tv} params={params}")


@pytest.mark.parametrize("backend", ["numpy", "c"])
@pytest.mark.parametrize("k", ELEMENTWISE, ids=lambda k: k.name)
def test_hess_finite_and_accurate_at_saturated_logits(k, backend):
    """x_t = +-20, +-40 against mpmath (relative error, gamma = 0.5); |x| = 1e4, 1e308 and the largest double
    finite for gamma in {0.5, 2, 20} (gamma * softplus(-x_t) overflows there: a form that multiplies it by an
    underflowed sigmoid gave 0*inf = NaN)."""
    big = np.finfo(np.float64).max
    for g in (0.5, 2.0, 20.0):
        params = _params(k, gamma=g, gamma_pos=g, gamma_neg=g)
        for tv in _targets(k):
            x = np.array([-big, -1e308, -1e4, -40.0, -20.0, 20.0, 40.0, 1e4, 1e308, big])
            t = np.full_like(x, tv)
            got = hess(k, backend, x, t, params)
            assert np.isfinite(got).all(), (k.name, g, tv, got)
            if g == 0.5:
                mid = slice(3, 7)
                exact = exact_hess(k, x[mid], t[mid], params)
                np.testing.assert_allclose(got[mid], exact, rtol=1e-9, atol=0, err_msg=f"{k.name} t={tv}")


# -- softmax: Hessian-vector products -------------------------------------------------------------

def _rows(k, rng, n=5, kk=4):
    x = rng.normal(0, 2, (n, kk))
    if k.kind == "rowwise":
        tq = rng.integers(0, kk, n).astype(np.int64)
        tq[-1] = IGNORE
    else:
        q = rng.random((n, kk))
        tq = q / q.sum(axis=1, keepdims=True)
        tq[-1] = rng.random(kk)  # probabilities that need not sum to 1
    return x, tq


def _row_param_sets(k, kk):
    sets = _param_sets(k)
    if any(n == "alpha" for n in k.params) and k.class_alpha:
        sets.append([np.linspace(0.2, 0.9, kk) if n == "alpha" else v for n, v in zip(k.params, _params(k, gamma=0.5))])
    return sets


@pytest.mark.parametrize("backend", ["numpy", "c"])
@pytest.mark.parametrize("k", ROWWISE + ROWPROBS, ids=lambda k: k.name)
def test_hvp_is_the_derivative_of_the_kernels_gradient(k, backend):
    rng = np.random.default_rng(15)
    x, tq = _rows(k, rng)
    for params in _row_param_sets(k, x.shape[1]):
        for _ in range(3):
            v = rng.normal(size=x.shape)
            h = 1e-5
            fd = (row_grad(k, x + h * v, tq, params) - row_grad(k, x - h * v, tq, params)) / (2 * h)
            got = hvp(k, backend, x, tq, params, v)
            np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-8, err_msg=f"{k.name} params={params}")
            if k.kind == "rowwise":
                assert (got[-1] == 0).all()  # the ignored row


@pytest.mark.parametrize("backend", ["numpy", "c"])
@pytest.mark.parametrize("k", ROWWISE + ROWPROBS, ids=lambda k: k.name)
def test_hvp_against_mpmath_hessian_of_the_definition(k, backend):
    rng = np.random.default_rng(7)
    x, tq = _rows(k, rng, n=3, kk=3)
    if k.kind == "rowwise":
        tq[-1] = 1
    for params in _row_param_sets(k, x.shape[1])[:2]:
        v = rng.normal(size=x.shape)
        got = hvp(k, backend, x, tq, params, v)
        for r in range(x.shape[0]):
            alpha_t = None
            if k.class_alpha and np.ndim(params[k.params.index("alpha")]):
                alpha_t = mpmath.mpf(float(params[k.params.index("alpha")][tq[r]]))
            exact = exact_row_hessian(k, x[r], tq[r], params, alpha_t) @ v[r]
            np.testing.assert_allclose(got[r], exact, rtol=1e-10, atol=1e-13, err_msg=f"{k.name} row {r}")


@pytest.mark.parametrize("backend", ["numpy", "c"])
@pytest.mark.parametrize("k", ROWWISE + ROWPROBS, ids=lambda k: k.name)
def test_hvp_is_symmetric(k, backend):
    rng = np.random.default_rng(3)
    x, tq = _rows(k, rng, n=6, kk=7)
    for params in _row_param_sets(k, x.shape[1]):
        v, w = rng.normal(size=x.shape), rng.normal(size=x.shape)
        hv, hw = hvp(k, backend, x, tq, params, v), hvp(k, backend, x, tq, params, w)
        a, b = np.sum(hv * w, axis=1), np.sum(v * hw, axis=1)
        scale = np.sum(np.abs(hv * w), axis=1) + np.sum(np.abs(v * hw), axis=1) + 1e-300
        assert (np.abs(a - b) <= 1e-13 * scale).all(), (k.name, a, b)


@pytest.mark.parametrize("backend", ["numpy", "c"])
@pytest.mark.parametrize("k", ROWWISE + ROWPROBS, ids=lambda k: k.name)
def test_hvp_finite_at_saturated_logits(k, backend):
    """x_t = 20, 40 above the others, rows scaled to 1e4, gamma = 0.5; the x_t = 20, 40 rows against mpmath."""
    kk = 4
    x = np.zeros((6, kk))
    x[0, 1], x[1, 1] = 20.0, 40.0
    x[2] = [1e4, -1e4, 0.0, 5e3]
    x[3] = [-1e4, 1e4, 1e4, 0.0]
    x[4, 1] = 800.0  # every other class underflows: p_t = 1 exactly
    x[5] = [1e308, -1e308, 0.0, 1.0]
    if k.kind == "rowwise":
        tq = np.array([1, 1, 0, 1, 1, 0], dtype=np.int64)
    else:
        tq = np.zeros((6, kk))
        tq[:, 1] = 0.9
        tq[:, 0] = 0.1
    params = _params(k, gamma=0.5)
    v = np.random.default_rng(1).normal(size=x.shape)
    got = hvp(k, backend, x, tq, params, v)
    assert np.isfinite(got).all(), (k.name, got)
    for r in (0, 1):
        exact = exact_row_hessian(k, x[r], tq[r], params) @ v[r]
        np.testing.assert_allclose(got[r], exact, rtol=1e-8, atol=1e-300, err_msg=f"{k.name} row {r}")


# -- the loader's checks of hess / dcoef / d2term ---------------------------------------------------

_FILE = """
[file]
title = "scratch"

[symbols]
x = "real"
t = "{0, 1}"
s = "(0, oo)"

[definitions]
p_t = { expr = "1/(1 + exp(-(2*t - 1)*x))", domain = "(0, 1)" }

[[derivation]]
id = "d"
title = "s times the cross-entropy"

[[derivation.chain]]
id = "loss"
export = "l"
lines = ["-s*log(p_t)", "s*softplus(-(2*t - 1)*x)"]

[[derivation.chain]]
id = "grad"
export = "g"
lines = ["D(-s*log(p_t), x)", "-s*(2*t - 1)*sigmoid(-(2*t - 1)*x)"]

[[derivation.chain]]
id = "hess"
export = "h"
lines = ["HESS_FIRST", "s*sigmoid(x)*sigmoid(-x)"]

[[kernel]]
name = "scaled"
layout = "elementwise"
target = "binary"
loss = "l"
grad = "g"
params = ["s"]
HESS_KEY
"""


def _load(first="D(D(-s*log(p_t), x), x)", key='hess = "h"'):
    from derive.language.loader import loads

    return loads(_FILE.replace("HESS_FIRST", first).replace("HESS_KEY", key), path="scratch.toml")


def test_loader_takes_hess_from_the_gradients_derivative():
    k = _load().kernels[0]
    assert k.hess == k.second == "h" and k.exports["hess"] == "h"
    # D(<any line of the grad chain>, x) ties the Hessian to the gradient the kernel evaluates
    assert _load(first="D(-s*(2*t - 1)*sigmoid(-(2*t - 1)*x), x)").kernels[0].hess == "h"
    assert _load(key="").kernels[0].hess is None  # optional


@pytest.mark.parametrize("first, key, needle", [
    ("s*sigmoid(x)*sigmoid(-x)", 'hess = "h"', "must start from D(<a line of the grad chain"),
    ("D(-log(p_t), x)", 'hess = "h"', "must start from D(<a line of the grad chain"),
    ("D(D(-s*log(p_t), x), s)", 'hess = "h"', "must start from D(<a line of the grad chain"),
    ("D(D(-s*log(p_t), x), x)", 'hess = "nope"', "exports no 'nope'"),
    ("D(D(-s*log(p_t), x), x)", 'hess = 3', "hess must be the name of an export"),
    ("D(D(-s*log(p_t), x), x)", 'dcoef = "h"', "unknown key 'dcoef' for layout 'elementwise'"),
])
def test_loader_refuses_a_hess_not_tied_to_the_gradient(first, key, needle):
    from derive.language.loader import DerivationFileError

    with pytest.raises(DerivationFileError) as exc:
        _load(first=first, key=key)
    assert needle in str(exc.value) and "scaled" in str(exc.value), str(exc.value)


def test_loader_refuses_a_dcoef_without_the_factor_one_minus_p():
    import re

    from derive.language.loader import DerivationFileError, loads

    text = next(k.path for k in ROWWISE if k.module == "poly1").read_text(encoding="utf-8")
    loads(text, path="poly1.toml")  # as shipped
    bad = re.sub(r'"-\(1 - p_t\)\*D\(D\(', '"-D(D(', text, count=1)
    assert bad != text
    with pytest.raises(DerivationFileError) as exc:
        loads(bad, path="poly1.toml")
    assert "dcoef: chain 'dcoef' must start from (1 - p_t)*D(" in str(exc.value)
    wrong_sign = re.sub(r'"-\(1 - p_t\)\*D\(D\(', '"(1 - p_t)*D(D(', text, count=1)
    with pytest.raises(DerivationFileError):
        loads(wrong_sign, path="poly1.toml")


def test_a_kernel_named_like_another_kernels_second_derivative_is_refused():
    from derive.language.loader import DerivationFileError

    with pytest.raises(DerivationFileError) as exc:
        _load(key='hess = "h"\n\n[[kernel]]\nname = "scaled_hess"\nlayout = "elementwise"\ntarget = "binary"\n'
                  'loss = "l"\ngrad = "g"\nparams = ["s"]\n')
    assert "derive_scaled_hess_f32" in str(exc.value)


def test_loader_refuses_a_d2term_that_is_not_the_derivative_of_dterm():
    from derive.language.loader import DerivationFileError, loads

    text = next(k.path for k in ROWPROBS).read_text(encoding="utf-8")
    loads(text, path="label_smoothing.toml")  # as shipped
    bad = text.replace('"D(D(-q_s*log(p), u), u)"', '"D(-q_s*log(p), u)"', 1)
    assert bad != text
    with pytest.raises(DerivationFileError) as exc:
        loads(bad, path="label_smoothing.toml")
    assert "d2term: chain 'd2term' must start from D(<a line of the dterm chain" in str(exc.value)
