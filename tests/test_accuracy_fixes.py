"""The points where ``derive accuracy`` found shipped kernels outside its bounds, each against the
mpmath reference of the kernel's original definition (derive.measure.reference), on both backends
and both dtypes, with the bounds of ``derive accuracy`` (2e-6 float32, 4e-15 float64, relative to
max(|exact|, smallest normal)).

* sigmoid_focal, sigmoid_focal_alpha with gamma = 20: NumPy took numpy.power of a rounded
  sigmoid (3.9e-6 in float32, 5.3e-15 in float64); it now evaluates e^(-gamma softplus(-v))
  with the exponent kept as hi + lo, as the C kernels do.
* sigmoid_focal_soft, sigmoid_focal_alpha_soft with gamma = 20 where w = 1 - p_t is close to 1 (t small,
  x large): a pow of the rounded w (4.6e-15 in float64 with kappa 0.54, 1.8e-6 in float32); the file now
  proves w^gamma = e^(gamma log1p(-p_t)) where p_t <= 1/2, p_t a sum of non-negative terms.
* asl, float32 gradients in the subnormal range (gamma_neg = 20): p_m^gamma_neg log(1 - p_m), subnormal, was
  divided by the small p_m (5.8e-6 and 3.9e-5 relative to the smallest normal); the file now proves the
  ratio -log(1 - p_m)/p_m formed first.
* poly1_softmax with epsilon at and near -1, p_t -> 1: -u - epsilon*expm1(u) and
  1 + epsilon*e^u cancelled (relative error 1); the file now proves forms of one-signed terms
  (expm1mx(u) = e^u - 1 - u).
"""
from __future__ import annotations

import importlib.util

import mpmath
import numpy as np
import pytest

import derive
from derive.language.functions import expm1mx
from derive.measure import reference as R
from derive.measure.accuracy import BOUNDS

DTYPES = {"float32": np.float32, "float64": np.float64}
BACKENDS = ("c", "numpy")


def _errors(computed, exact, dtype):
    return R.rel_errors(np.asarray(computed, dtype=np.float64), exact, dtype)


def _elementwise(kernel, module, x, t, params, backend, dtype):
    fn = getattr(derive.shipped(module), kernel)
    spec, _ = R.find_kernel(kernel)
    x = np.asarray(x, dtype=dtype)
    t = np.asarray(t, dtype=dtype)
    kwargs = dict(zip(spec.params, (dtype(p) for p in params)))
    loss, grad = fn(x, t, reduction="none", return_grad=True, backend=backend, **kwargs)
    ref_l, ref_g = R.reference_for(kernel).values(x, t, params)
    return _errors(loss, ref_l, dtype), _errors(grad, ref_g, dtype)


# ------------------------------------------------------------------------------------------
# 1. sigmoid(v)^gamma in the NumPy module


# the points of the failures (float64; float32: numpy.power gave 2.4e-6 at x = -0.9967 and -3.3967,
# t = 0, and 2.8e-6 at x = 4.2033, t = 1), and others across the range
FOCAL_POINTS = [(-3.267, 0.0), (20.03, 1.0), (14.54255993677384, 1.0), (-0.9967, 0.0), (-3.3967, 0.0), (4.2033, 1.0),
                (2.6033, 1.0), (-20.03, 0.0), (5.5, 1.0), (-0.3, 1.0), (60.0, 1.0), (-90.0, 0.0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel,params", [("sigmoid_focal", (20.0,)), ("sigmoid_focal", (5.0,)),
                                           ("sigmoid_focal", (0.25,)), ("sigmoid_focal_alpha", (0.25, 20.0)),
                                           ("sigmoid_focal_alpha", (-1.0, 20.0))])
def test_focal_power_of_the_sigmoid_is_within_the_bounds(kernel, params, dtype, backend):
    x = [p[0] for p in FOCAL_POINTS]
    t = [p[1] for p in FOCAL_POINTS]
    le, ge = _elementwise(kernel, "focal_kernels", x, t, params, backend, DTYPES[dtype])
    bound = BOUNDS[dtype]
    assert le.max() <= bound, (kernel, params, dtype, backend, x[int(le.argmax())], le.max())
    assert ge.max() <= bound, (kernel, params, dtype, backend, x[int(ge.argmax())], ge.max())


@pytest.mark.parametrize("dtype", DTYPES)
def test_focal_power_saturates_without_nan(dtype):
    """Past e^-hi's range the power is 0 (or, for a negative exponent, inf) and never NaN."""
    T = DTYPES[dtype]
    x = np.array([1e4, -1e4, float(np.finfo(T).max), -float(np.finfo(T).max), 0.0], dtype=T)
    t = np.array([1, 0, 1, 0, 1], dtype=T)
    for backend in BACKENDS:
        loss, grad = derive.shipped("focal_kernels").sigmoid_focal(x, t, gamma=T(20.0), reduction="none",
                                                                   return_grad=True, backend=backend)
        assert np.isfinite(loss).all() and np.isfinite(grad).all(), backend
        assert (loss[:4] == 0).all() and (grad[:4] == 0).all(), backend


# ------------------------------------------------------------------------------------------
# 3. soft targets: w^gamma near w = 1 (conditioned kernels: the bound times max(1, kappa))

# where the pow of w exceeded the bounds (float64: 4.2e-15 to 4.3e-15 at the first four; float32: 2.2e-6 to
# 2.3e-6 at the next three), the brief's point, and others on both sides of p_t = 1/2
SOFT_POINTS = [(6.0137, 0.001), (3.477757397904969, 0.00995), (27.2637, 0.00995), (3.2196825217437013, 0.001),
               (7.0137, 0.02), (8.0266, 0.00995), (5.38596, 0.001), (9.03, 0.00995), (-9.03, 0.99005),
               (-2.486, 0.001), (1.264, 0.999), (24.01, 0.3), (-5.236, 0.3), (0.0, 0.5), (3.0, 1.0), (-3.0, 0.0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel,params", [("sigmoid_focal_soft", (20.0,)), ("sigmoid_focal_soft", (2.0,)),
                                           ("sigmoid_focal_soft", (0.0,)), ("sigmoid_focal_alpha_soft", (0.25, 20.0)),
                                           ("sigmoid_focal_alpha_soft", (-1.0, 20.0))])
def test_soft_focal_power_near_one_is_within_the_bounds(kernel, params, dtype, backend):
    T = DTYPES[dtype]
    x = np.array([p[0] for p in SOFT_POINTS], dtype=T)
    t = np.array([p[1] for p in SOFT_POINTS], dtype=T)
    le, ge = _elementwise(kernel, "focal_kernels", x, t, params, backend, T)
    kl, kg = R.reference_for(kernel).kappa(x, t, params, T)
    bound = BOUNDS[dtype]
    le, ge = le / np.maximum(1, kl), ge / np.maximum(1, np.ravel(kg))
    assert le.max() <= bound, (kernel, params, dtype, backend, SOFT_POINTS[int(le.argmax())], le.max())
    assert ge.max() <= bound, (kernel, params, dtype, backend, SOFT_POINTS[int(ge.argmax())], ge.max())


# ------------------------------------------------------------------------------------------
# 4. ASL: float32 gradients in the subnormal range

ASL_CASES = [((0.0, 20.0, 0.05), [-2.7666666507720947, -2.8106882572174072, -2.77, -2.9, -3.1, -2.6]),
             ((20.0, 20.0, 0.5), [0.02842247299849987, 0.02934540994465351, 0.01, 0.04, 0.05]),
             ((0.0, 4.0, 0.05), [-2.77, -3.0, -2.5, 5.0]),
             # clip = 0: p_m = p is subnormal in float32 below x = -87; a common 1/p_m would overflow there
             ((0.0, 4.0, 0.0), [-93.46235656738281, -100.0, -89.0, -30.0, 3.0]),
             ((0.0, 0.0, 0.0), [-93.46235656738281, -100.0, -89.0, -30.0, 3.0])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("params,xs", ASL_CASES)
def test_asl_subnormal_gradients_are_within_the_bounds(params, xs, dtype, backend):
    T = DTYPES[dtype]
    x = np.array(xs * 4, dtype=T)
    t = np.repeat(np.array([0.0, 1e-3, 0.5, 0.999], dtype=T), len(xs))
    le, ge = _elementwise("asl", "asl", x, t, params, backend, T)
    kl, kg = R.reference_for("asl").kappa(x, t, params, T)
    bound = BOUNDS[dtype]
    le, ge = le / np.maximum(1, kl), ge / np.maximum(1, np.ravel(kg))
    assert le.max() <= bound, (params, dtype, backend, float(x[int(le.argmax())]), le.max())
    assert ge.max() <= bound, (params, dtype, backend, float(x[int(ge.argmax())]), ge.max())


# ------------------------------------------------------------------------------------------
# 2. Poly-1 at epsilon -> -1, p_t -> 1


def _poly1(x, target, epsilon, backend, dtype):
    fn = derive.shipped("poly1").poly1_softmax
    x = np.asarray(x, dtype=dtype)
    target = np.asarray(target, dtype=np.int64)
    loss, grad = fn(x, target, epsilon=dtype(epsilon), reduction="none", return_grad=True, backend=backend,
                    ignore_index=-100)
    # the reference at the epsilon the kernel gets (float32: -0.999 rounds to -0.99900001, and 1 + epsilon
    # moves by 1e-5 of itself)
    ref_l, ref_g = R.reference_for("poly1_softmax").values(x, target, (float(dtype(epsilon)),), -100)
    return _errors(loss, ref_l, dtype), _errors(grad, [g for row in ref_g for g in row], dtype)


POLY1_ROWS = [[3.74, -21.0], [3.74, -21.0, -19.5], [30.0, 0.0, 1.0], [0.0, 0.0], [-1.0, 2.0], [5e-8, 0.0]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epsilon", [-1.0, -0.999, -0.5, 0.0, 1.0])
def test_poly1_near_epsilon_minus_one_is_within_the_bounds(epsilon, dtype, backend):
    T = DTYPES[dtype]
    bound = BOUNDS[dtype]
    for row in POLY1_ROWS:
        le, ge = _poly1([row], [0], epsilon, backend, T)
        assert le.max() <= bound, (row, epsilon, dtype, backend, le.max())
        assert ge.max() <= bound, (row, epsilon, dtype, backend, ge.max())


def test_poly1_refuses_epsilon_below_minus_one():
    """Below -1 the coefficient 1 + epsilon*p_t changes sign inside (0, 1): the domain is [-1, oo)."""
    with pytest.raises(ValueError, match="epsilon"):
        derive.shipped("poly1").poly1_softmax(np.zeros((1, 2)), np.zeros(1, dtype=np.int64), epsilon=-1.5)


# ------------------------------------------------------------------------------------------
# expm1mx itself: the helper of both backends against mpmath


def _generated_numpy(module):
    from derive.codegen import GENERATED_DIR

    spec = importlib.util.spec_from_file_location(f"_fixes_{module}", GENERATED_DIR / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _mp_expm1mx(u):
    with mpmath.workdps(60):
        return mpmath.expm1(mpmath.mpf(float(u))) - mpmath.mpf(float(u))


@pytest.mark.parametrize("dtype", DTYPES)
def test_expm1mx_numpy_helper_and_reference(dtype):
    T = DTYPES[dtype]
    helper = _generated_numpy("poly1")._expm1mx
    us = np.array([0.0, -1e-30, -1e-8, -1e-3, -0.1, -0.4999, -0.5, -0.5001, -1.0, -3.0, -40.0, 1e-5, 0.3, 0.7,
                   -float(np.finfo(T).max)], dtype=T)
    exact = [_mp_expm1mx(u) for u in us]
    # the lambdify implementation used by the references (float64)
    got = np.array([float(expm1mx._imp_(float(u))) for u in us])
    assert (_errors(got, exact, np.float64) <= 2e-16 * 4).all()
    mp_got = [expm1mx._imp_(mpmath.mpf(float(u))) for u in us]
    with mpmath.workdps(60):
        assert all(abs(a - b) <= abs(b) * mpmath.mpf(10) ** -14 for a, b in zip(mp_got, exact))
    with np.errstate(all="ignore"):  # the series' u*u of the largest u overflows in the branch not taken
        got = helper(us)
    assert got.dtype == T
    err = _errors(got, exact, T)
    assert err.max() <= float(np.finfo(T).eps) * 3, err


# ------------------------------------------------------------------------------------------
# Poly-1's Hessian-vector product (double backward) at epsilon = -1, p_t -> 1: the coefficient it scales
# by is the stable (1 + epsilon) + epsilon*expm1(u), and dcoef = -epsilon e^u expm1(u) is a product


def _poly1_hvp(backend, x, target, epsilon, v):
    import ctypes

    from derive.runtime import cbuild

    if backend == "numpy":
        return cbuild.load_numpy_module(cbuild.GENERATED_DIR, "poly1").poly1_softmax_hvp_f64(x, target, epsilon,
                                                                                             -100, v)
    lib = cbuild.load(cbuild.GENERATED_DIR, "poly1")
    fn = lib.derive_poly1_softmax_hvp_f64
    dp, ip = ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_int64)
    fn.argtypes = [ctypes.c_size_t, ctypes.c_size_t, dp, ip, ctypes.c_double, ctypes.c_int64, dp, dp]
    fn.restype = ctypes.c_int
    out = np.full(x.shape, np.nan)
    assert fn(x.shape[0], x.shape[1], x.ctypes.data_as(dp), target.ctypes.data_as(ip), epsilon, -100,
              v.ctypes.data_as(dp), out.ctypes.data_as(dp)) == 0
    return out


def _mp_poly1_grad(row, t, epsilon):
    """The gradient of -log p_t + epsilon (1 - p_t) in the logits, from its definition (mpmath)."""
    m = max(row)
    e = [mpmath.exp(v - m) for v in row]
    s = mpmath.fsum(e)
    p = [v / s for v in e]
    coef = 1 + epsilon * p[t]  # -p_t dL/dp_t
    return [coef * (pk - (1 if k == t else 0)) for k, pk in enumerate(p)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("epsilon", [-1.0, -0.999, 1.0])
def test_poly1_hvp_near_epsilon_minus_one(epsilon, backend):
    x = np.array([[3.74, -21.0], [3.74, -21.0], [30.0, 0.0], [0.5, -0.25]])
    target = np.zeros(x.shape[0], dtype=np.int64)
    v = np.array([[1.0, -0.5], [0.25, 2.0], [1.0, 0.0], [-1.0, 1.0]])
    got = _poly1_hvp(backend, x, target, epsilon, v)
    with mpmath.workdps(80):
        for r in range(x.shape[0]):
            row, vr = [mpmath.mpf(float(a)) for a in x[r]], [mpmath.mpf(float(a)) for a in v[r]]
            for k in range(x.shape[1]):
                exact = mpmath.diff(lambda h: _mp_poly1_grad([a + h * b for a, b in zip(row, vr)], 0,
                                                             mpmath.mpf(epsilon))[k], 0)
                err = abs(mpmath.mpf(float(got[r, k])) - exact) / abs(exact)
                assert err < 1e-13, (r, k, epsilon, backend, float(got[r, k]), float(exact))
