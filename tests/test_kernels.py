"""The generated kernels: C against NumPy, against the closed forms, mpmath and finite
differences; the Python API (reductions, argument checks); the C build and its cache."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import derive
from derive.runtime import cbuild
from derive.runtime import losses as L
from derive.measure import reference as R

ROOT = Path(__file__).resolve().parent.parent
DTYPES = (np.float32, np.float64)
TOL = {np.float32: 2e-6, np.float64: 4e-15}


def _have_c():
    try:
        cbuild.load()
        return True
    except cbuild.BuildError:
        return False


HAVE_C = _have_c()
needs_c = pytest.mark.skipif(not HAVE_C, reason="no C compiler")
BACKENDS = ["numpy"] + (["c"] if HAVE_C else [])

# kernel name -> (API function, parameter sets)
ELEMENTWISE = {
    "sigmoid_ce": (lambda x, t, p, **kw: L.sigmoid_cross_entropy(x, t, **kw), [()]),
    "sigmoid_focal": (lambda x, t, p, **kw: L.binary_focal_loss(x, t, gamma=p[0], **kw), [(0.0,), (0.5,), (2.0,), (5.0,)]),
    "sigmoid_focal_alpha": (lambda x, t, p, **kw: L.sigmoid_focal_loss(x, t, alpha=p[0], gamma=p[1], **kw),
                            [(0.25, 2.0), (1.0, 0.25), (-1.0, 2.0), (0.0, 1.0)]),
    "focal_star": (lambda x, t, p, **kw: L.focal_loss_star(x, t, gamma=p[0], beta=p[1], **kw),
                   [(1.0, 0.0), (5.0, 1.0), (0.25, -2.0)]),
}


def _inputs(dtype, n=200, seed=0):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.uniform(-30, 30, n), [0.0, -1e-30, 1e-30, 40.0, -40.0, 1e4, -1e4]])
    big = float(np.finfo(dtype).max)
    x = np.concatenate([x, [big, -big]]).astype(dtype)
    t = (rng.random(x.size) < 0.5).astype(dtype)
    return x, t


# ------------------------------------------------------------------------------------------
# C against NumPy


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_c_matches_numpy_elementwise(name, dtype):
    fn, params = ELEMENTWISE[name]
    x, t = _inputs(dtype)
    for p in params:
        lc, gc = fn(x, t, p, backend="c", return_grad=True)
        ln, gn = fn(x, t, p, backend="numpy", return_grad=True)
        assert lc.dtype == ln.dtype == dtype and gc.dtype == gn.dtype == dtype
        assert np.all(np.isfinite(lc)) and np.all(np.isfinite(gc)), (name, p)
        np.testing.assert_allclose(lc, ln, rtol=2 * TOL[dtype], atol=float(np.finfo(dtype).tiny) * 4)
        np.testing.assert_allclose(gc, gn, rtol=2 * TOL[dtype], atol=float(np.finfo(dtype).tiny) * 4)


def _softmax_inputs(dtype, n=12, k=7, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-30, 30, size=(n, k))
    x[0, 3] = 1e3
    x[1, :] = float(np.finfo(dtype).max)
    x[1, 0] = -float(np.finfo(dtype).max)
    t = rng.integers(0, k, n)
    t[1] = 0
    t[2] = -100
    return x.astype(dtype), t


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
def test_c_matches_numpy_softmax(dtype):
    x, t = _softmax_inputs(dtype)
    k = x.shape[1]
    cases = [lambda **kw: L.softmax_cross_entropy(x, t, **kw)]
    for alpha in (None, 0.25, np.linspace(0.1, 0.9, k)):
        for gamma in (0.0, 0.5, 2.0, 5.0):
            cases.append(lambda alpha=alpha, gamma=gamma, **kw: L.softmax_focal_loss(x, t, alpha=alpha, gamma=gamma,
                                                                                     **kw))
    for case in cases:
        lc, gc = case(backend="c", return_grad=True)
        ln, gn = case(backend="numpy", return_grad=True)
        assert lc.dtype == dtype and gc.dtype == dtype and gc.shape == x.shape
        assert np.all(np.isfinite(lc)) and np.all(np.isfinite(gc))
        np.testing.assert_allclose(lc, ln, rtol=2 * TOL[dtype], atol=float(np.finfo(dtype).tiny) * 4)
        np.testing.assert_allclose(gc, gn, rtol=2 * TOL[dtype], atol=float(np.finfo(dtype).tiny) * 4)
        assert lc[2] == 0 and np.all(gc[2] == 0), "ignored row"


# ------------------------------------------------------------------------------------------
# against the closed forms, mpmath and finite differences


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_against_the_notes_closed_form_evaluated_directly(name, backend):
    """Where the literal closed form is still accurate (|x| <= 8), it agrees with the kernels."""
    fn, params = ELEMENTWISE[name]
    floss, fgrad = R.closed_form_numpy(name)
    x = np.linspace(-8, 8, 161)
    for dtype in DTYPES:
        xx = x.astype(dtype)
        for t0 in (0.0, 1.0):
            t = np.full_like(xx, t0)
            for p in params:
                if name == "sigmoid_focal_alpha" and p[0] < 0:
                    continue  # alpha < 0 is the API's switch, not part of the closed form
                loss, grad = fn(xx, t, p, backend=backend, return_grad=True)
                x64 = xx.astype(np.float64)
                # the literal form loses digits as e^(-|argument|): keep its argument within 8
                keep = np.abs(p[0] * x64 + p[1]) <= 8 if name == "focal_star" else slice(None)
                tol = 1e-9 if dtype == np.float64 else 2e-5
                np.testing.assert_allclose(loss[keep], floss(x64, t, *p)[keep], rtol=tol, atol=1e-300)
                np.testing.assert_allclose(grad[keep], fgrad(x64, t, *p)[keep], rtol=tol, atol=1e-300)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_against_the_notes_closed_form(backend):
    floss, fcoef = R.closed_form_numpy("softmax_focal")
    rng = np.random.default_rng(3)
    x = rng.uniform(-4, 4, size=(20, 6))
    t = rng.integers(0, 6, 20)
    e = np.exp(x)
    p = e / e.sum(axis=1, keepdims=True)
    pt = p[np.arange(20), t]
    onehot = np.eye(6)[t]
    for gamma in (0.0, 0.5, 2.0):
        loss, grad = L.softmax_focal_loss(x, t, alpha=0.25, gamma=gamma, backend=backend, return_grad=True)
        np.testing.assert_allclose(loss, floss(pt, 0.25, gamma), rtol=1e-11)
        np.testing.assert_allclose(grad, fcoef(pt, 0.25, gamma)[:, None] * (p - onehot), rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_elementwise_against_mpmath(name, dtype, backend):
    fn, params = ELEMENTWISE[name]
    rng = np.random.default_rng(5)
    x = rng.uniform(-30, 30, 60).astype(dtype)
    t = (rng.random(60) < 0.5).astype(dtype)
    for p in params:
        pt = tuple(float(np.asarray(v, dtype=dtype)) for v in p)
        loss, grad = fn(x, t, pt, backend=backend, return_grad=True)
        ref_l, ref_g = R.elementwise(name, x, t, pt)
        assert R.rel_errors(loss, ref_l, dtype).max() <= TOL[dtype], (name, p)
        assert R.rel_errors(grad, ref_g, dtype).max() <= TOL[dtype], (name, p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_against_mpmath(dtype, backend):
    rng = np.random.default_rng(7)
    x = rng.uniform(-30, 30, size=(6, 9)).astype(dtype)
    t = rng.integers(0, 9, 6)
    for alpha, gamma in ((None, 0.0), (0.25, 2.0), (np.linspace(0, 1, 9).astype(dtype), 0.5)):
        loss, grad = L.softmax_focal_loss(x, t, alpha=alpha, gamma=gamma, backend=backend, return_grad=True)
        ref_l, ref_g = R.rowwise("softmax_focal", x, t, alpha, gamma)
        assert R.rel_errors(loss, ref_l, dtype).max() <= TOL[dtype]
        assert R.rel_errors(grad, [v for row in ref_g for v in row], dtype).max() <= TOL[dtype]
    loss, grad = L.softmax_cross_entropy(x, t, backend=backend, return_grad=True)
    ref_l, ref_g = R.rowwise("softmax_ce", x, t)  # params in declared order: none
    assert R.rel_errors(loss, ref_l, dtype).max() <= TOL[dtype]
    assert R.rel_errors(grad, [v for row in ref_g for v in row], dtype).max() <= TOL[dtype]


# central differences of the generated forward: step and tolerance per dtype
FD = {np.float64: (1e-6, 2e-7), np.float32: (2.0 ** -7, 5e-3)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_gradient_matches_central_differences_elementwise(name, dtype, backend):
    fn, params = ELEMENTWISE[name]
    h_rel, tol = FD[dtype]
    x = np.linspace(-6, 6, 25).astype(dtype)
    for t0 in (0.0, 1.0):
        t = np.full_like(x, t0)
        for p in params:
            _, grad = fn(x, t, p, backend=backend, return_grad=True)
            h = (h_rel * np.maximum(1.0, np.abs(x))).astype(dtype)
            hx = ((x + h) - (x - h)).astype(np.float64)  # the step actually taken
            up = fn(x + h, t, p, backend=backend).astype(np.float64)
            down = fn(x - h, t, p, backend=backend).astype(np.float64)
            fd = (up - down) / hx
            scale = np.maximum(np.abs(fd), 1e-3)
            assert np.max(np.abs(grad - fd) / scale) <= tol, (name, p, t0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_matches_central_differences_softmax(dtype, backend):
    h_rel, tol = FD[dtype]
    rng = np.random.default_rng(11)
    x = rng.uniform(-3, 3, size=(4, 5)).astype(dtype)
    t = np.array([0, 4, 2, -100])
    for fn in (lambda x, **kw: L.softmax_cross_entropy(x, t, **kw),
               lambda x, **kw: L.softmax_focal_loss(x, t, alpha=0.25, gamma=2.0, **kw),
               lambda x, **kw: L.softmax_focal_loss(x, t, alpha=np.linspace(0.2, 1, 5), gamma=0.5, **kw)):
        _, grad = fn(x, backend=backend, return_grad=True, reduction="sum")
        fd = np.zeros_like(grad, dtype=np.float64)
        for i in range(x.shape[0]):
            for j in range(x.shape[1]):
                h = dtype(h_rel * max(1.0, abs(float(x[i, j]))))
                xp, xm = x.copy(), x.copy()
                xp[i, j] += h
                xm[i, j] -= h
                step = float(xp[i, j]) - float(xm[i, j])
                fd[i, j] = (float(fn(xp, backend=backend, reduction="sum"))
                            - float(fn(xm, backend=backend, reduction="sum"))) / step
        assert np.max(np.abs(grad - fd) / np.maximum(np.abs(fd), 1e-2)) <= tol


# ------------------------------------------------------------------------------------------
# hypothesis properties over random shapes, logits and parameters

_logit = st.one_of(st.floats(-30, 30, allow_nan=False), st.sampled_from([0.0, 1e4, -1e4, 1e30, -1e30]))
_shape = st.lists(st.integers(1, 5), min_size=1, max_size=3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=_shape, data=st.data(), gamma=st.floats(0, 5), alpha=st.floats(0, 1), beta=st.floats(-5, 5),
       dtype=st.sampled_from(DTYPES))
def test_property_sigmoid_family(shape, data, gamma, alpha, beta, dtype):
    n = int(np.prod(shape))
    x = np.array(data.draw(st.lists(_logit, min_size=n, max_size=n)), dtype=dtype).reshape(shape)
    t = np.array(data.draw(st.lists(st.sampled_from([0, 1]), min_size=n, max_size=n)), dtype=dtype).reshape(shape)
    gamma_star = max(gamma, 0.01)
    calls = [
        ("sigmoid_ce", (), lambda **kw: L.sigmoid_cross_entropy(x, t, **kw)),
        ("sigmoid_focal", (gamma,), lambda **kw: L.binary_focal_loss(x, t, gamma=gamma, **kw)),
        ("sigmoid_focal_alpha", (alpha, gamma), lambda **kw: L.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, **kw)),
        ("focal_star", (gamma_star, beta), lambda **kw: L.focal_loss_star(x, t, gamma=gamma_star, beta=beta, **kw)),
    ]
    y = 2 * t.astype(np.float64) - 1
    for name, params, call in calls:
        results = {b: call(backend=b, return_grad=True) for b in BACKENDS}
        loss, grad = results["numpy"]
        assert loss.shape == grad.shape == x.shape and loss.dtype == grad.dtype == dtype
        assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad)), name
        assert np.all(loss >= 0), name
        assert np.all(grad * y <= 0), name  # the gradient pushes x_t up
        if "c" in results:
            lc, gc = results["c"]
            np.testing.assert_allclose(lc, loss, rtol=2 * TOL[dtype], atol=4 * float(np.finfo(dtype).tiny))
            np.testing.assert_allclose(gc, grad, rtol=2 * TOL[dtype], atol=4 * float(np.finfo(dtype).tiny))
        # one element against mpmath
        i = data.draw(st.integers(0, n - 1))
        xi, ti = x.reshape(-1)[i:i + 1], t.reshape(-1)[i:i + 1]
        if abs(float(xi[0])) <= 30:
            typed = tuple(float(np.asarray(p, dtype=dtype)) for p in params)
            ref_l, ref_g = R.elementwise(name, xi, ti, typed)
            assert R.rel_errors(loss.reshape(-1)[i:i + 1], ref_l, dtype).max() <= TOL[dtype], name
            assert R.rel_errors(grad.reshape(-1)[i:i + 1], ref_g, dtype).max() <= TOL[dtype], name


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 6), k=st.integers(1, 12), data=st.data(), gamma=st.floats(0, 5), alpha=st.floats(0, 1),
       dtype=st.sampled_from(DTYPES), per_class=st.booleans())
def test_property_softmax(n, k, data, gamma, alpha, dtype, per_class):
    x = np.array(data.draw(st.lists(_logit, min_size=n * k, max_size=n * k)), dtype=dtype).reshape(n, k)
    t = np.array(data.draw(st.lists(st.sampled_from(list(range(k)) + [-100]), min_size=n, max_size=n)))
    a = np.array(data.draw(st.lists(st.floats(0, 1), min_size=k, max_size=k)), dtype=dtype) if per_class else alpha
    results = {b: L.softmax_focal_loss(x, t, alpha=a, gamma=gamma, backend=b, return_grad=True) for b in BACKENDS}
    loss, grad = results["numpy"]
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
    assert np.all(loss >= 0)
    valid = t != -100
    rows = np.arange(n)[valid]
    assert np.all(grad[rows, t[valid]] <= 0)
    mask = np.ones_like(grad, dtype=bool)
    mask[rows, t[valid]] = False
    assert np.all(grad[mask] >= 0)
    assert np.all(grad[~valid] == 0) and np.all(loss[~valid] == 0)
    if "c" in results:
        lc, gc = results["c"]
        np.testing.assert_allclose(lc, loss, rtol=2 * TOL[dtype], atol=4 * float(np.finfo(dtype).tiny))
        np.testing.assert_allclose(gc, grad, rtol=2 * TOL[dtype], atol=4 * float(np.finfo(dtype).tiny))
    if np.all(np.abs(x) <= 30):
        ref_l, ref_g = R.rowwise("softmax_focal", x, t, a, float(np.asarray(gamma, dtype=dtype)))
        assert R.rel_errors(loss, ref_l, dtype).max() <= TOL[dtype]
        assert R.rel_errors(grad, [v for row in ref_g for v in row], dtype).max() <= TOL[dtype]


# ------------------------------------------------------------------------------------------
# the Python API


def test_lazy_reexport_from_package():
    assert derive.sigmoid_focal_loss is L.sigmoid_focal_loss
    assert derive.softmax_focal_loss is L.softmax_focal_loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_and_their_gradients(backend):
    x, t = _inputs(np.float64, n=30)
    loss, grad = L.sigmoid_focal_loss(x, t, backend=backend, return_grad=True)
    s, gs = L.sigmoid_focal_loss(x, t, reduction="sum", backend=backend, return_grad=True)
    m, gm = L.sigmoid_focal_loss(x, t, reduction="mean", backend=backend, return_grad=True)
    assert s == pytest.approx(loss.sum(), rel=1e-14) and m == pytest.approx(loss.mean(), rel=1e-14)
    np.testing.assert_array_equal(gs, grad)
    np.testing.assert_allclose(gm, grad / x.size, rtol=1e-15)
    xs, ts = _softmax_inputs(np.float64)
    per_row, g = L.softmax_cross_entropy(xs, ts, backend=backend, return_grad=True)
    mean, gmean = L.softmax_cross_entropy(xs, ts, reduction="mean", backend=backend, return_grad=True)
    valid = np.count_nonzero(ts != -100)
    assert mean == pytest.approx(per_row.sum() / valid, rel=1e-14)
    np.testing.assert_allclose(gmean, g / valid, rtol=1e-15)
    assert L.softmax_cross_entropy(xs[2:3], ts[2:3], reduction="mean", backend=backend) == 0.0  # all ignored


@pytest.mark.parametrize("backend", BACKENDS)
def test_special_cases_agree(backend):
    x, t = _inputs(np.float64, n=50)
    x, t = x[:-2], t[:-2]  # no +-max here: their mean overflows
    ce = L.sigmoid_cross_entropy(x, t, backend=backend, return_grad=True)
    for a, b in zip(ce, L.binary_focal_loss(x, t, gamma=0.0, backend=backend, return_grad=True)):
        np.testing.assert_allclose(a, b, rtol=1e-15)
    for a, b in zip(L.sigmoid_focal_loss(x, t, alpha=-1, gamma=2.0, backend=backend, return_grad=True),
                    L.binary_focal_loss(x, t, gamma=2.0, backend=backend, return_grad=True)):
        np.testing.assert_array_equal(a, b)
    xs, ts = _softmax_inputs(np.float64)
    for a, b in zip(L.softmax_cross_entropy(xs, ts, backend=backend, return_grad=True),
                    L.softmax_focal_loss(xs, ts, gamma=0.0, backend=backend, return_grad=True)):
        np.testing.assert_allclose(a, b, rtol=1e-15, atol=1e-300)
    assert np.allclose(L.binary_cross_entropy_with_logits(x, t, backend=backend), ce[0].mean(), rtol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torchvision_values(backend):
    """torchvision's sigmoid_focal_loss written out with its own definitions, at moderate x."""
    x = np.linspace(-5, 5, 21)
    t = (np.arange(21) % 2).astype(float)
    p = 1 / (1 + np.exp(-x))
    ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    expected = (0.25 * t + 0.75 * (1 - t)) * ce * (1 - p_t) ** 2
    np.testing.assert_allclose(L.sigmoid_focal_loss(x, t, backend=backend), expected, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input_and_nan_isolation(backend):
    x, t = _inputs(np.float64, n=40)
    x2 = np.stack([x, x], axis=1)[:, 0]  # a strided view
    assert not x2.flags.c_contiguous
    np.testing.assert_array_equal(L.binary_focal_loss(x2, t, backend=backend), L.binary_focal_loss(x, t, backend=backend))
    xn = x.copy()
    xn[5] = np.nan
    loss, grad = L.binary_focal_loss(xn, t, backend=backend, return_grad=True)
    assert np.isnan(loss[5]) and np.isnan(grad[5])
    assert np.all(np.isfinite(np.delete(loss, 5))) and np.all(np.isfinite(np.delete(grad, 5)))
    xs, ts = _softmax_inputs(np.float64)
    xs = xs.copy()
    xs[4, 2] = np.nan
    loss, grad = L.softmax_focal_loss(xs, ts, backend=backend, return_grad=True)
    assert np.isnan(loss[4]) and np.all(np.isnan(grad[4]))
    assert np.all(np.isfinite(np.delete(loss, 4))) and np.all(np.isfinite(np.delete(grad, 4, axis=0)))
    wide = np.asfortranarray(_softmax_inputs(np.float64)[0])
    np.testing.assert_array_equal(L.softmax_cross_entropy(wide, ts, backend=backend),
                                  L.softmax_cross_entropy(np.ascontiguousarray(wide), ts, backend=backend))


@pytest.mark.parametrize("call, exc, word", [
    (lambda: L.sigmoid_focal_loss(np.arange(3), np.zeros(3)), TypeError, "inputs"),
    (lambda: L.sigmoid_focal_loss(np.zeros(3, np.float16), np.zeros(3)), TypeError, "inputs"),
    (lambda: L.sigmoid_focal_loss(np.zeros(3), np.zeros(4)), ValueError, "targets"),
    (lambda: L.sigmoid_focal_loss(np.zeros(3), np.array([0, 2, 1])), ValueError, "targets"),
    (lambda: L.sigmoid_focal_loss(np.zeros(3), np.array(["a", "b", "c"])), TypeError, "targets"),
    (lambda: L.sigmoid_focal_loss(np.zeros(3), np.zeros(3), gamma=-0.5), ValueError, "gamma"),
    (lambda: L.sigmoid_focal_loss(np.zeros(3), np.zeros(3), gamma=float("nan")), ValueError, "gamma"),
    (lambda: L.sigmoid_focal_loss(np.zeros(3), np.zeros(3), alpha=1.5), ValueError, "alpha"),
    (lambda: L.sigmoid_focal_loss(np.zeros(3), np.zeros(3), alpha="x"), TypeError, "alpha"),
    (lambda: L.sigmoid_focal_loss(np.zeros(3), np.zeros(3), reduction="avg"), ValueError, "reduction"),
    (lambda: L.sigmoid_focal_loss(np.zeros(3), np.zeros(3), backend="gpu"), ValueError, "backend"),
    (lambda: L.focal_loss_star(np.zeros(3), np.zeros(3), gamma=0.0), ValueError, "gamma"),
    (lambda: L.softmax_focal_loss(np.zeros(3), np.zeros(3, int)), ValueError, "inputs"),
    (lambda: L.softmax_focal_loss(np.zeros((3, 4)), np.zeros(3)), TypeError, "targets"),
    (lambda: L.softmax_focal_loss(np.zeros((3, 4)), np.array([0, 4, 1])), ValueError, "targets"),
    (lambda: L.softmax_focal_loss(np.zeros((3, 4)), np.array([0, 1])), ValueError, "targets"),
    (lambda: L.softmax_focal_loss(np.zeros((3, 4)), np.zeros(3, int), alpha=[0.1, 0.2]), ValueError, "alpha"),
    (lambda: L.softmax_focal_loss(np.zeros((3, 4)), np.zeros(3, int), alpha=[0.1, 0.2, 2, 0]), ValueError, "alpha"),
    (lambda: L.softmax_focal_loss(np.zeros((3, 4)), np.zeros(3, int), gamma=-1), ValueError, "gamma"),
    (lambda: L.softmax_focal_loss(np.zeros((3, 4)), np.zeros(3, int), ignore_index=1.5), TypeError, "ignore_index"),
])
def test_bad_arguments_name_the_argument(call, exc, word):
    with pytest.raises(exc, match=word):
        call()


# ------------------------------------------------------------------------------------------
# the generated NumPy module itself: outputs given, blocks, shortcuts, memory


def _np_module():
    return cbuild.load_numpy_module()


def _np_cases(dtype):
    """(kernel function, positional arguments, output shapes) for every NumPy kernel."""
    mod = _np_module()
    sfx = "f32" if dtype == np.float32 else "f64"
    rng = np.random.default_rng(21)
    big = float(np.finfo(dtype).max)
    x = np.concatenate([rng.uniform(-30, 30, 340), [0.0, 1e4, -1e4, big, -big]]).astype(dtype).reshape(5, 69)
    t = (rng.random(x.shape) < 0.5).astype(dtype)
    x[2, 7] = np.nan
    d = dtype
    cases = [(f"sigmoid_ce_{sfx}", (x, t)), (f"sigmoid_focal_{sfx}", (x, t, d(0.5))),
             (f"sigmoid_focal_{sfx}", (x, t, d(0.0))), (f"sigmoid_focal_{sfx}", (x, t, d(0.25))),
             (f"sigmoid_focal_alpha_{sfx}", (x, t, d(0.25), d(2.0))), (f"sigmoid_focal_alpha_{sfx}", (x, t, d(-1), d(1.0))),
             (f"focal_star_{sfx}", (x, t, d(2.0), d(1.0)))]
    out = [(getattr(mod, name), args, (x.shape, x.shape)) for name, args in cases]
    for k in (1, 2, 7):
        xs = rng.uniform(-30, 30, size=(41, k)).astype(dtype)
        xs[3, 0] = 1e3
        xs[4, :] = big
        xs[5, -1] = np.nan
        ts = rng.integers(0, k, 41)
        ts[[6, 7, 40]] = -100
        ts[5 if k > 1 else 8] = -100  # an ignored row that holds a NaN (k > 1), or not
        alphas = (d(0.25), np.linspace(0.1, 1, k).astype(dtype))
        out.append((getattr(mod, f"softmax_ce_{sfx}"), (xs, ts, -100), ((41,), xs.shape)))
        for alpha, gamma in zip(alphas, (d(0.5), d(2.0))):
            out.append((getattr(mod, f"softmax_focal_{sfx}"), (xs, ts, alpha, gamma, -100), ((41,), xs.shape)))
    return out


def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_kernels_fill_and_return_the_outputs_they_are_given(dtype):
    for fn, args, (lshape, gshape) in _np_cases(dtype):
        want = fn(*args)
        loss, grad = np.full(lshape, 7.0, dtype=dtype), np.full(gshape, 7.0, dtype=dtype)
        got = fn(*args, loss=loss, grad=grad)
        assert got[0] is loss and got[1] is grad, fn.__name__
        assert _same(loss, want[0]) and _same(grad, want[1]), fn.__name__
        only_loss = fn(*args, loss=np.empty(lshape, dtype=dtype))  # one given, the other allocated
        assert _same(only_loss[0], want[0]) and _same(only_loss[1], want[1]), fn.__name__
    mod = _np_module()
    sfx = "f32" if dtype == np.float32 else "f64"
    e = np.empty((0,), dtype=dtype)
    loss, grad = np.empty((0,), dtype=dtype), np.empty((0,), dtype=dtype)
    assert getattr(mod, f"sigmoid_focal_{sfx}")(e, e, dtype(2), loss=loss, grad=grad) == (loss, grad)
    xs, ts = np.empty((0, 4), dtype=dtype), np.empty((0,), dtype=np.int64)
    loss, grad = getattr(mod, f"softmax_focal_{sfx}")(xs, ts, dtype(1), dtype(2), -100)
    assert loss.shape == (0,) and grad.shape == (0, 4) and loss.dtype == grad.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_results_do_not_depend_on_the_block_sizes(dtype, monkeypatch):
    """Tiny blocks (a NaN, +-max and ignored rows land on every kind of boundary) give the
    same bits as the default blocks; a NaN still only reaches its own element or row."""
    mod = _np_module()
    want = [fn(*args) for fn, args, _ in _np_cases(dtype)]
    for block, row_block, rows in ((7, 13, 3), (64, 5, 1), (1, 1, 100)):
        monkeypatch.setattr(mod, "_BLOCK", block)
        monkeypatch.setattr(mod, "_ROW_BLOCK", row_block)
        monkeypatch.setattr(mod, "_ROWS", rows)
        for (fn, args, _), (wl, wg) in zip(_np_cases(dtype), want):
            loss, grad = fn(*args)
            assert _same(loss, wl) and _same(grad, wg), (fn.__name__, block, row_block, rows)
    for (fn, args, _), (loss, grad) in zip(_np_cases(dtype), want):
        if fn.__name__.startswith("softmax"):
            ts = args[1]
            assert np.all(loss[ts == -100] == 0) and np.all(grad[ts == -100] == 0), fn.__name__
            nan_rows = np.isnan(args[0]).any(axis=1) & (ts != -100)
            assert np.all(np.isnan(loss) == nan_rows), fn.__name__
            assert np.all(np.isnan(grad).any(axis=1) == nan_rows), fn.__name__
            assert np.all(np.isnan(grad[nan_rows])), fn.__name__
        else:
            nan = np.isnan(args[0])
            assert np.array_equal(np.isnan(loss), nan) and np.array_equal(np.isnan(grad), nan), fn.__name__


@pytest.mark.parametrize("dtype", DTYPES)
def test_pow_shortcuts_are_correctly_rounded_and_keep_pow_0_0(dtype):
    """_pow's gamma = 2, 1, 1/2, 0 shortcuts give the correctly rounded b**gamma, and
    numpy.power's special cases: pow(0, 0) = pow(NaN, 0) = 1, NaN otherwise stays NaN."""
    import mpmath

    pw = _np_module()._pow
    tiny = float(np.finfo(dtype).smallest_subnormal)
    rng = np.random.default_rng(4)
    b = np.concatenate([rng.random(200), rng.random(50) * 1e-20, [0.0, 1.0, tiny, 2 * tiny, 0.5, 1 - 1e-7]]).astype(dtype)
    bits = 24 if dtype == np.float32 else 53
    for p in (2.0, 1.0, 0.5, 0.0):
        got = np.broadcast_to(pw(b, dtype(p)), b.shape)
        for v, g in zip(b.tolist(), got.tolist()):
            with mpmath.workprec(200):
                exact = mpmath.power(mpmath.mpf(v), mpmath.mpf(p)) if (v, p) != (0.0, 0.0) else mpmath.mpf(1)
            with mpmath.workprec(bits):
                rounded = float(+exact)
            assert g == float(dtype(rounded)), (p, v, g, rounded)
    special = np.array([np.nan, 0.0], dtype=dtype)
    for p in (2.0, 1.0, 0.5, 0.0, 0.25):
        got = np.broadcast_to(pw(special, dtype(p)), special.shape)
        want = np.power(special, dtype(p))
        assert np.array_equal(got, want, equal_nan=True), p
    assert np.array_equal(pw(b, dtype(0.25)), np.power(b, dtype(0.25)))


def test_numpy_kernels_never_promote_silently():
    """A float64 NumPy scalar would turn a float32 block into float64: that is an error, not a
    silent cast; Python numbers (as the docs pass them) are fine."""
    mod = _np_module()
    x = np.linspace(-3, 3, 9).astype(np.float32)
    t = (x > 0).astype(np.float32)
    for gamma in (0.5, 2, 0.3):
        loss, grad = mod.sigmoid_focal_f32(x, t, gamma)
        assert loss.dtype == grad.dtype == np.float32
    loss, grad = mod.softmax_focal_f32(np.stack([x, -x], axis=1), np.zeros(9, np.int64), 0.25, 0.3, -100)
    assert loss.dtype == grad.dtype == np.float32
    with pytest.raises(TypeError):
        mod.sigmoid_focal_f32(x, t, np.float64(0.3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_kernels_work_in_blocks_not_in_array_sized_temporaries(dtype):
    """Peak memory of a call with its outputs given stays at a few blocks, however large the
    input (NumPy reports its arrays to tracemalloc); before blocks it was some 15 copies."""
    import tracemalloc

    mod = _np_module()
    sfx = "f32" if dtype == np.float32 else "f64"
    n = 1 << 20
    rng = np.random.default_rng(5)
    x = rng.uniform(-30, 30, n).astype(dtype)
    t = (rng.random(n) < 0.5).astype(dtype)
    xs, ts = x.reshape(-1, 64), rng.integers(0, 64, n // 64)
    calls = [lambda: getattr(mod, f"sigmoid_focal_{sfx}")(x, t, dtype(0.3), loss=np.empty_like(x), grad=np.empty_like(x)),
             lambda: getattr(mod, f"focal_star_{sfx}")(x, t, dtype(2), dtype(1), loss=np.empty_like(x),
                                                       grad=np.empty_like(x)),
             lambda: getattr(mod, f"softmax_focal_{sfx}")(xs, ts, dtype(0.25), dtype(0.3), -100,
                                                          loss=np.empty(n // 64, dtype), grad=np.empty_like(xs))]
    for call in calls:
        outputs = x.nbytes + x.nbytes + (n // 64) * x.itemsize  # allocated by the lambdas, at most
        tracemalloc.start()
        try:
            call()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak - outputs < x.nbytes // 2, (peak, outputs)


# ------------------------------------------------------------------------------------------
# the C build: cache, corrupt entries, missing compiler, a plain C program


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DERIVE_CACHE_DIR", str(tmp_path / "cache"))
    saved = dict(cbuild._LOADED)
    cbuild._LOADED.clear()
    cbuild._RECENT.clear()
    yield tmp_path / "cache"
    cbuild._RECENT.clear()
    cbuild._LOADED.clear()
    cbuild._LOADED.update(saved)


_BUILD_SCRIPT = """
import numpy as np
from derive.runtime import cbuild
from derive.runtime import losses
real = cbuild.compile_library
def counting(*a, **kw):
    print("COMPILED")
    return real(*a, **kw)
cbuild.compile_library = counting
x = np.linspace(-5, 5, 11); t = (x > 0).astype(float)
a = losses.binary_focal_loss(x, t, backend="c"); b = losses.binary_focal_loss(x, t, backend="numpy")
assert np.allclose(a, b, rtol=1e-14), (a, b)
print("OK")
"""


@needs_c
def test_build_is_cached_and_a_corrupt_entry_is_rebuilt(tmp_path):
    """Fresh processes (a loaded library must never be overwritten in place)."""
    import sys

    env = dict(os.environ, DERIVE_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))

    def run():
        res = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT], env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr
        return "COMPILED" in res.stdout

    assert run(), "the first use did not compile"
    (lib,) = list((tmp_path / "cache").glob(f"libderive_focal_*{cbuild._lib_suffix()}"))
    assert cbuild.digest_path(lib).is_file(), "no SHA-256 recorded beside the library"
    assert not list((tmp_path / "cache").glob("*.tmp")), "temporary file left behind"
    assert not run(), "a cached library was rebuilt"
    lib.write_bytes(b"not a shared library")
    assert run(), "a corrupt entry was not rebuilt"
    assert not run()


@needs_c
def test_loaded_library_is_reused_and_a_changed_source_rebuilt(fresh_cache, tmp_path, monkeypatch):
    """Calls in a loop reuse the loaded library without looking at the files; a regenerated
    source is picked up at the next lookup (at most cbuild._RECHECK_S later)."""
    import shutil

    gen = tmp_path / "generated"
    shutil.copytree(ROOT / "generated", gen)
    lib = cbuild.load(gen)
    calls = []
    real_stat = os.stat
    monkeypatch.setattr(cbuild.os, "stat", lambda *a, **k: calls.append(a) or real_stat(*a, **k))
    assert all(cbuild.load(gen) is lib for _ in range(100)) and not calls  # no file lookups
    monkeypatch.setattr(cbuild.os, "stat", real_stat)
    src = gen / "focal_kernels.c"
    src.write_text(src.read_text() + "/* regenerated */\n")
    time.sleep(cbuild._RECHECK_S + 0.1)
    lib2 = cbuild.load(gen)
    assert lib2 is not lib and cbuild.load(gen) is lib2


def test_missing_compiler_is_a_clear_error_and_numpy_still_works(fresh_cache, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_cache / "no-such-cc"))
    with pytest.raises(cbuild.CompilerNotFoundError, match="backend='numpy'"):
        L.binary_focal_loss(np.zeros(3), np.zeros(3), backend="c")
    x, t = _inputs(np.float64, n=10)
    a = L.binary_focal_loss(x, t, backend="numpy")
    with pytest.warns(L.CBackendUnavailableWarning, match="no-such-cc"):
        b = L.binary_focal_loss(x, t, backend="auto")
    np.testing.assert_array_equal(a, b)
    assert L.available_backends() == ["numpy"]  # warned once above, not again


@needs_c
def test_plain_c_program_uses_header_and_library(tmp_path):
    lib = cbuild.library_path()
    exe = tmp_path / "example"
    cc = cbuild.find_compiler()
    res = subprocess.run([*cc, "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-I", str(ROOT / "generated"),
                          str(ROOT / "tests" / "c" / "example.c"), str(lib), "-lm", "-o", str(exe),
                          f"-Wl,-rpath,{lib.parent}"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all checks passed" in run.stdout
    assert cbuild.source_digest() in run.stdout
