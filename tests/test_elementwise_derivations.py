"""The elementwise kernels of stable_forms.toml with soft targets, and FL* past the float range.

Each kernel runs through the generated module (generated/focal_kernels.py, and its C library
through ctypes), never through the public losses, so that these tests check what the
derivations produce.  References are computed here with mpmath from the libraries' own
definitions (torchvision.ops.sigmoid_focal_loss, binary_cross_entropy_with_logits, the Focal
Loss paper's FL*), not from the kernels' stable forms.
"""
from __future__ import annotations

import ctypes

import mpmath as mp
import numpy as np
import pytest

from derive.runtime import cbuild

MODULE = "focal_kernels"
DTYPES = {np.float32: "f32", np.float64: "f64"}
#: the plain accuracy bounds of `derive accuracy`; conditioned kernels: bound * max(1, kappa)
BOUND = {np.float32: 2e-6, np.float64: 4e-15}
BACKENDS = ["numpy", "c"]


@pytest.fixture(scope="module")
def numpy_module():
    return cbuild.load_numpy_module(cbuild.GENERATED_DIR, MODULE)


def _c_lib():
    try:
        return cbuild.load(cbuild.GENERATED_DIR, MODULE)
    except cbuild.BuildError as exc:  # no compiler: the NumPy half still runs
        pytest.skip(f"C kernels unavailable: {exc}")


def run(kernel, backend, x, t, *params, numpy_module=None):
    """(loss, grad) of one generated kernel on float arrays x, t of one dtype."""
    dt = x.dtype.type
    t = np.ascontiguousarray(t, dtype=dt)
    if backend == "numpy":
        fn = getattr(numpy_module, f"{kernel}_{DTYPES[dt]}")
        return fn(x, t, *[dt(p) for p in params])
    lib = _c_lib()
    ptr = ctypes.POINTER(ctypes.c_float if dt is np.float32 else ctypes.c_double)
    loss, grad = np.empty_like(x), np.empty_like(x)
    rc = getattr(lib, f"derive_{kernel}_{DTYPES[dt]}")(x.size, x.ctypes.data_as(ptr), t.ctypes.data_as(ptr), *params,
                                                        loss.ctypes.data_as(ptr), grad.ctypes.data_as(ptr))
    assert rc == 0, f"{kernel}: C return code {rc}"
    return loss, grad


# ---- references (mpmath, the libraries' definitions) ----------------------------------------

mp.mp.dps = 50


def tv_loss(x, t, gamma=None, alpha=None):
    """torchvision's sigmoid_focal_loss with soft t (gamma None: binary_cross_entropy_with_logits)."""
    p = 1 / (1 + mp.exp(-x))
    ce = -(t * mp.log(p) + (1 - t) * mp.log(1 - p))
    if gamma is None:
        return ce
    loss = ce * (1 - (p * t + (1 - p) * (1 - t))) ** gamma
    if alpha is not None and alpha >= 0:
        loss *= alpha * t + (1 - alpha) * (1 - t)
    return loss


def tv_grad(x, t, gamma=None, alpha=None):
    return mp.diff(lambda v: tv_loss(v, t, gamma, alpha), x)


def kappa(fun, args):
    """sum over the continuous inputs v of |v df/dv / f| (the conditioned kernels' measure)."""
    f0 = fun(*args)
    total = mp.mpf(0)
    for i, v in enumerate(args):
        if v == 0:
            continue
        d = mp.diff(lambda u: fun(*[u if j == i else w for j, w in enumerate(args)]), v)
        total += abs(v * d / f0)
    return total


SOFT = [  # (soft kernel, binary kernel, params (names), gammas)
    ("sigmoid_ce_soft", "sigmoid_ce", (), [None]),
    ("sigmoid_focal_soft", "sigmoid_focal", ("gamma",), [0.0, 0.5, 2.0]),
    ("sigmoid_focal_alpha_soft", "sigmoid_focal_alpha", ("alpha", "gamma"), [0.5, 2.0]),
]


def _params(names, gamma, alpha=0.25):
    return [{"alpha": alpha, "gamma": gamma}[n] for n in names]


def _cases():
    for soft, binary, names, gammas in SOFT:
        for gamma in gammas:
            yield pytest.param(soft, binary, names, gamma, id=f"{soft}-g{gamma}")


# ---- soft kernels ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("soft,binary,names,gamma", list(_cases()))
def test_soft_equals_binary_at_labels(soft, binary, names, gamma, dtype, backend, numpy_module):
    """At t in {0, 1} the soft kernel gives the binary kernel's loss and gradient."""
    x = np.concatenate([np.linspace(-30, 30, 241), [-1e4, 1e4, -88.5, 88.5, -745.5, 745.5]]).astype(dtype)
    params = _params(names, gamma)
    eps = np.finfo(dtype).eps
    for label in (0.0, 1.0):
        t = np.full_like(x, label)
        ls, gs = run(soft, backend, x, t, *params, numpy_module=numpy_module)
        lb, gb = run(binary, backend, x, t, *params, numpy_module=numpy_module)
        # the soft kernel takes pow of a rounded 1 - p_t where the binary kernel works in log space:
        # (1 + gamma) roundings of 1 - p_t apart at most
        rtol = 8 * eps * (1 + (gamma or 0))
        tiny = np.finfo(dtype).tiny
        for a, b, what in ((ls, lb, "loss"), (gs, gb, "grad")):
            assert np.all(np.isfinite(a)), (what, label)
            np.testing.assert_allclose(a, b, rtol=rtol, atol=tiny / eps, err_msg=f"{what} at t = {label}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("soft,binary,names,gamma", list(_cases()))
def test_soft_against_torchvision_definition(soft, binary, names, gamma, dtype, backend, numpy_module):
    """At soft t the kernels agree with mpmath's evaluation of torchvision's formula within the
    conditioned bound: |error| <= bound * max(1, kappa)."""
    xs = np.linspace(-20, 20, 41).astype(dtype)
    alpha = 0.25 if "alpha" in names else None
    params = _params(names, gamma)
    tiny = np.finfo(dtype).tiny
    worst = 0.0
    for tv in (1e-3, 0.1, 0.5, 0.9, 0.999):
        t = dtype(tv)
        loss, grad = run(soft, backend, xs, np.full_like(xs, t), *params, numpy_module=numpy_module)
        for i, xv in enumerate(xs):
            args = [mp.mpf(float(xv)), mp.mpf(float(t))] + [mp.mpf(p) for p in params]

            def lf(x, t, *pp):
                return tv_loss(x, t, pp[-1] if pp else None, pp[0] if len(pp) == 2 else alpha)

            def gf(x, t, *pp):
                return mp.diff(lambda v: lf(v, t, *pp), x)

            for got, fun in ((loss[i], lf), (grad[i], gf)):
                exact = fun(*args)
                if abs(exact) < tiny:
                    continue
                err = float(abs(mp.mpf(float(got)) - exact) / abs(exact))
                if err > BOUND[dtype]:
                    err /= max(1.0, float(kappa(fun, args)))
                worst = max(worst, err)
    assert worst <= BOUND[dtype], f"{soft}: worst error {worst:.3g} over max(1, kappa)"


def test_soft_ce_against_torch(numpy_module):
    """sigmoid_ce_soft is torch's binary_cross_entropy_with_logits with soft targets (loss and autograd)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.normal(0, 8, 500), [-50.0, 50.0, 0.0]])
    t = np.concatenate([rng.uniform(0, 1, 500), [0.3, 0.7, 0.5]])
    xt = torch.tensor(x, requires_grad=True)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(xt, torch.tensor(t), reduction="none")
    ref.sum().backward()
    for backend in BACKENDS:
        loss, grad = run("sigmoid_ce_soft", backend, x, t, numpy_module=numpy_module)
        np.testing.assert_allclose(loss, ref.detach().numpy(), rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-12, atol=1e-15)


def test_soft_focal_against_torchvision_formula_in_torch(numpy_module):
    """sigmoid_focal_alpha_soft is torchvision's sigmoid_focal_loss (its formula, in torch float64) at soft t."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    x = rng.normal(0, 4, 400)
    t = rng.uniform(0, 1, 400)
    for alpha, gamma in ((0.25, 2.0), (-1.0, 0.5)):
        xt = torch.tensor(x, requires_grad=True)
        tt = torch.tensor(t)
        p = torch.sigmoid(xt)
        ce = torch.nn.functional.binary_cross_entropy_with_logits(xt, tt, reduction="none")
        ref = ce * (1 - (p * tt + (1 - p) * (1 - tt))) ** gamma
        if alpha >= 0:
            ref = (alpha * tt + (1 - alpha) * (1 - tt)) * ref
        ref.sum().backward()
        for backend in BACKENDS:
            loss, grad = run("sigmoid_focal_alpha_soft", backend, x, t, alpha, gamma, numpy_module=numpy_module)
            np.testing.assert_allclose(loss, ref.detach().numpy(), rtol=1e-12, atol=1e-300)
            np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_soft_kernels_finite_at_extremes(dtype, backend, numpy_module):
    """No NaN or inf at |x| = 1e4 and +-max, for t at, near and between the labels and every gamma."""
    big = np.finfo(dtype).max
    x = np.array([-big, -1e4, -200.0, 200.0, 1e4, big], dtype=dtype)
    for soft, _, names, _ in SOFT:
        for gamma in ([None] if not names else [0.0, 0.5, 2.0, 20.0]):
            params = _params(names, gamma) if names else []
            for tv in (0.0, 1.0, 1e-7, 0.3, 0.5, 1 - 1e-7):
                t = np.full_like(x, tv)
                loss, grad = run(soft, backend, x, t, *params, numpy_module=numpy_module)
                assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad)), (soft, gamma, tv, loss, grad)
                assert np.all(loss >= 0), (soft, gamma, tv, loss)
                # d loss/dx has the sign of p - t far from the decision boundary: + for x -> +oo
                # (unless t = 1 there), - for x -> -oo (unless t = 0)
                if tv < 1:
                    assert grad[-1] >= 0, (soft, gamma, tv, grad)
                if tv > 0:
                    assert grad[0] <= 0, (soft, gamma, tv, grad)


# ---- FL* past the float range ------------------------------------------------------------------

def fl_star_exact(x, t, gamma, beta):
    """-log(sigmoid(gamma*x_t + beta))/gamma with x_t = (2t - 1)x (the Focal Loss paper's FL*)."""
    z = gamma * (2 * t - 1) * x + beta
    return (mp.log1p(mp.exp(-z)) if z > -50 else -z + mp.log1p(mp.exp(z))) / gamma


@pytest.mark.parametrize("backend", BACKENDS)
def test_focal_star_beyond_float_range(backend, numpy_module):
    """At x = -1e38, gamma = 7.77 (float32) gamma*x overflows: the loss is still about 1e38
    (it was float max/gamma = 4.38e37), within 2e-6 relative of the exact value, both labels."""
    x = np.array([-1e38, 1e38, -3.4e38, 3.4e38], dtype=np.float32)
    t = np.array([1.0, 0.0, 1.0, 0.0], dtype=np.float32)
    for gamma, beta in ((7.77, 1.0), (2.0, -3.0), (100.0, 0.0)):
        loss, grad = run("focal_star", backend, x, t, gamma, beta, numpy_module=numpy_module)
        for i in range(x.size):
            exact = fl_star_exact(mp.mpf(float(x[i])), int(t[i]), mp.mpf(np.float32(gamma).item()),
                                  mp.mpf(np.float32(beta).item()))
            assert abs(mp.mpf(float(loss[i])) - exact) <= 2e-6 * exact, (gamma, beta, x[i], loss[i], exact)
        np.testing.assert_array_equal(grad, [-1.0, 1.0, -1.0, 1.0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_focal_star_accuracy_kept(dtype, backend, numpy_module):
    """The where() that avoids a huge z keeps ordinary inputs at the plain bound, for betas of both
    signs and sizes (the branch z < -|beta| is taken on part of the grid)."""
    xs = np.concatenate([np.linspace(-30, 30, 61), [-1e6, 1e6]]).astype(dtype)
    worst = 0.0
    for gamma, beta in ((2.0, 1.0), (0.5, -4.0), (5.0, 20.0), (1.0, 0.0)):
        g, b = dtype(gamma).item(), dtype(beta).item()
        for label in (0, 1):
            loss, _ = run("focal_star", backend, xs, np.full_like(xs, label), gamma, beta, numpy_module=numpy_module)
            for i, xv in enumerate(xs):
                exact = fl_star_exact(mp.mpf(float(xv)), label, mp.mpf(g), mp.mpf(b))
                if exact < np.finfo(dtype).tiny:
                    continue
                worst = max(worst, float(abs(mp.mpf(float(loss[i])) - exact) / exact))
    assert worst <= BOUND[dtype], worst
