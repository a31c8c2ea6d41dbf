"""ASL (derive/derivations/asl.toml, kernel asl): the shipped kernels (derive.kernels.asl, C and NumPy, float32 and
float64) and the proved second derivative (asl_hess_f64, derive_asl_hess_f64) against a direct mpmath evaluation of
the paper's formula at 60 digits, L = -t (1 - p)^gamma_pos log p - (1 - t) p_m^gamma_neg log(1 - p_m),
p_m = max(p - clip, 0), with its gradient written out by hand and the second derivative by mpmath.diff of it.

Accuracy is relative to the condition number of the exact function (the kernel is declared conditioned):
|computed - exact| <= bound * max(1, kappa) * |exact|, kappa = sum over x, t, gamma_pos, gamma_neg, clip of
|v df/dv / f|; where the exact value is 0 (p <= clip, t = 0) the kernel must return exactly 0."""
from __future__ import annotations

import ctypes

import mpmath as mp
import numpy as np
import pytest

import derive
from derive.prover.engine import PROVED, REFUTED
from derive.runtime import cbuild

mp.mp.dps = 60
ASL = derive.kernels.asl
GAMMA_POS, GAMMA_NEG, CLIPS = (0.0, 1.0), (0.0, 0.5, 1.0, 4.0, 20.0), (0.0, 0.05, 0.3)
TARGETS = (0.0, 1.0, 0.3)


def _logit(q):
    return float(mp.log(mp.mpf(q) / (1 - mp.mpf(q))))


def xs_for(clip):
    """A grid over [-30, 30] (off the integers) plus the points where p = clip +- 1e-6."""
    xs = list(np.linspace(-30, 30, 31) + 0.0625)
    if clip > 0:
        xs += [_logit(clip + 1e-6), _logit(clip - 1e-6)]
    return np.array(xs)


def loss_mp(x, t, gp, gn, m):
    x, t, gp, gn, m = (mp.mpf(v) for v in (x, t, gp, gn, m))
    p = 1 / (1 + mp.exp(-x))
    pm = p - m if p > m else mp.mpf(0)
    neg = pm ** gn * mp.log(1 - pm) if pm > 0 else mp.mpf(0)
    return -t * (1 - p) ** gp * mp.log(p) - (1 - t) * neg


def grad_mp(x, t, gp, gn, m):
    """dL/dx by hand: dp/dx = p(1 - p), d p_m/dx = p(1 - p) where p > clip (else p_m = 0)."""
    x, t, gp, gn, m = (mp.mpf(v) for v in (x, t, gp, gn, m))
    p = 1 / (1 + mp.exp(-x))
    pos = -gp * p * (1 - p) ** gp * mp.log(p) + (1 - p) ** (gp + 1)
    neg = mp.mpf(0)
    if p > m:
        pm = p - m
        neg = p * (1 - p) * (gn * pm ** (gn - 1) * mp.log(1 - pm) - pm ** gn / (1 - pm))
    return -t * pos - (1 - t) * neg


def hess_mp(x, t, gp, gn, m):
    return mp.diff(lambda v: grad_mp(v, t, gp, gn, m), mp.mpf(x))


def kappa(f, args):
    """sum over the nonzero inputs v of |v df/dv / f| (f(args) != 0)."""
    f0 = f(*args)
    total = mp.mpf(0)
    for i, v in enumerate(args):
        if v == 0:
            continue

        def g(u, i=i):
            a = list(args)
            a[i] = u
            return f(*a)
        total += abs(mp.mpf(v) * mp.diff(g, mp.mpf(v)) / f0)
    return total


_EXACT = {}


def _exact(fn, a):
    """(fn(*a), kappa), computed once for the backends and dtypes that meet the same point."""
    if (fn, a) not in _EXACT:
        e = fn(*a)
        _EXACT[(fn, a)] = (e, kappa(fn, a) if e != 0 else None)
    return _EXACT[(fn, a)]


def _check(computed, exact_fn, x, args, bound, what):
    """computed (an array over x) against exact_fn at every x: |computed - exact| / max(|exact|, tiny) within
    bound * max(1, kappa), tiny the dtype's smallest normal number (an exact value below it underflows)."""
    tiny = mp.mpf(float(np.finfo(computed.dtype).tiny))
    bad = []
    for xv, c in zip(x, computed):
        a = (float(xv),) + args
        e, k = _exact(exact_fn, a)
        if not np.isfinite(c):
            bad.append((xv, c, e, "not finite"))
        elif e == 0:
            if c != 0:
                bad.append((xv, c, e, "exact 0"))
        else:
            err = abs(mp.mpf(float(c)) - e) / max(abs(e), tiny)
            tol = bound * max(1, k)
            if err > tol:
                bad.append((xv, c, float(e), f"rel {float(err):.3g} > {float(tol):.3g}"))
    assert not bad, f"{what} {args}: {bad[:4]}"


@pytest.mark.parametrize("backend", ["c", "numpy"])
@pytest.mark.parametrize("dtype,bound", [(np.float64, 4e-15), (np.float32, 2e-6)])
def test_loss_and_grad_against_the_paper(backend, dtype, bound):
    for gp in GAMMA_POS:
        for gn in GAMMA_NEG:
            for m in CLIPS:
                x = xs_for(m).astype(dtype)
                for t in TARGETS:
                    tt = np.full_like(x, t)
                    loss, grad = ASL(x, tt, gp, gn, m, backend=backend, return_grad=True)
                    assert loss.dtype == dtype and grad.dtype == dtype
                    _check(loss, loss_mp, x, (t, gp, gn, m), bound, f"{backend} {dtype.__name__} loss")
                    _check(grad, grad_mp, x, (t, gp, gn, m), bound, f"{backend} {dtype.__name__} grad")


def test_exact_zero_where_p_is_below_the_margin():
    """t = 0 and p <= clip: p_m = 0, the loss and its gradient are exactly 0 (not a rounded p_m^gamma log(1 - p_m))."""
    x = np.array([-30.0, -5.0, _logit(0.05) - 1e-9, _logit(0.3) - 1e-3])
    for backend in ("c", "numpy"):
        for dtype in (np.float64, np.float32):
            loss, grad = ASL(x.astype(dtype), np.zeros(4, dtype), 0.0, 0.5, 0.3, backend=backend, return_grad=True)
            assert np.all(loss == 0) and np.all(grad == 0), (backend, dtype, loss, grad)


@pytest.mark.parametrize("backend", ["c", "numpy"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_saturated_logits_finite_with_correct_signs(backend, dtype):
    big = float(np.finfo(dtype).max)
    x = np.array([1e4, -1e4, big, -big], dtype=dtype)
    for gp in GAMMA_POS:
        for gn in GAMMA_NEG:
            for m in CLIPS:
                for t in TARGETS:
                    loss, grad = ASL(x, np.full_like(x, t), gp, gn, m, backend=backend, return_grad=True)
                    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad)), (gp, gn, m, t, loss, grad)
                    assert np.all(loss >= 0), (gp, gn, m, t, loss)
                    if t == 1:  # only the positive term: decreasing in x
                        assert np.all(grad <= 0), (gp, gn, m, t, grad)
                    if t == 0:  # only the negative term: increasing in x
                        assert np.all(grad >= 0), (gp, gn, m, t, grad)
                    # the values the limits give: at x = -max with t = 1 the loss is softplus(-x) ~ |x| (gamma_pos = 0)
                    if t == 1 and gp == 0:
                        assert loss[3] == pytest.approx(big) and grad[3] == -1
                    if t == 0 and m == 0:  # p_m = p -> 1: the loss grows like x, its gradient -> 1
                        assert loss[2] == pytest.approx(big) and grad[2] == pytest.approx(1)


# -- the second derivative -----------------------------------------------------------------------------------

def _hess_numpy(x, t, gp, gn, m):
    mod = cbuild.load_numpy_module(cbuild.GENERATED_DIR, "asl")
    return mod.asl_hess_f64(x, t, gp, gn, m)


def _hess_c(x, t, gp, gn, m):
    try:
        lib = cbuild.load(cbuild.GENERATED_DIR, "asl")
    except cbuild.BuildError as exc:
        pytest.skip(f"no C library: {exc}")
    fn = lib.derive_asl_hess_f64
    ptr = ctypes.POINTER(ctypes.c_double)
    fn.argtypes = [ctypes.c_size_t, ptr, ptr] + [ctypes.c_double] * 3 + [ptr]
    fn.restype = ctypes.c_int
    x, t = np.ascontiguousarray(x, np.float64), np.ascontiguousarray(t, np.float64)
    out = np.empty_like(x)
    assert fn(x.size, x.ctypes.data_as(ptr), t.ctypes.data_as(ptr), gp, gn, m, out.ctypes.data_as(ptr)) == 0
    return out


HESS = {"numpy": _hess_numpy, "c": _hess_c}


@pytest.mark.parametrize("backend", ["c", "numpy"])
def test_hess_against_mpmath(backend):
    """Within 1e-13 * max(1, kappa of the second derivative); exactly 0 where it is (p <= clip, t = 0)."""
    for gp in GAMMA_POS:
        for gn in (0.0, 0.5, 4.0, 20.0):
            for m in CLIPS:
                x = xs_for(m)[::3] if m == 0 else np.concatenate([xs_for(m)[::3], xs_for(m)[-2:]])
                for t in TARGETS:
                    h = HESS[backend](x, np.full_like(x, t), gp, gn, m)
                    _check(h, hess_mp, x, (t, gp, gn, m), 1e-13, f"{backend} hess")


@pytest.mark.parametrize("backend", ["c", "numpy"])
def test_hess_against_central_differences_of_the_gradient(backend):
    x = np.linspace(-12, 12, 49) + 0.03
    for gp in GAMMA_POS:
        for gn in GAMMA_NEG:
            for m in CLIPS:
                for t in TARGETS:
                    # away from the margin, where the gradient has a kink (gamma_neg = 0) or a steep p_m^gamma_neg
                    p = 1 / (1 + np.exp(-x))
                    xx = x[np.abs(p - m) > 0.01]
                    tt = np.full_like(xx, t)
                    step = 1e-5
                    _, gp_ = ASL(xx + step, tt, gp, gn, m, backend=backend, return_grad=True)
                    _, gm_ = ASL(xx - step, tt, gp, gn, m, backend=backend, return_grad=True)
                    fd = (gp_ - gm_) / (2 * step)
                    h = HESS[backend](xx, tt, gp, gn, m)
                    np.testing.assert_allclose(h, fd, rtol=1e-5, atol=1e-8, err_msg=f"{(gp, gn, m, t)}")


@pytest.mark.parametrize("backend", ["c", "numpy"])
def test_hess_finite_at_saturated_logits_and_near_the_margin(backend):
    big = float(np.finfo(np.float64).max)
    x = np.array([1e4, -1e4, big, -big, 800.0, -800.0, _logit(0.05) + 1e-9])
    for gp in (0.0, 1.0, 2.0):
        for gn in GAMMA_NEG:
            for m in CLIPS:
                for t in TARGETS:
                    h = HESS[backend](x, np.full_like(x, t), gp, gn, m)
                    assert np.all(np.isfinite(h)), (gp, gn, m, t, h)


def test_hess_backends_agree():
    x = np.concatenate([np.linspace(-40, 40, 161), [_logit(0.05) + 1e-7, _logit(0.3) - 1e-7]])
    for gn in GAMMA_NEG:
        for t in TARGETS:
            a = _hess_numpy(x, np.full_like(x, t), 1.0, gn, 0.05)
            b = _hess_c(x, np.full_like(x, t), 1.0, gn, 0.05)
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=0)


# -- the official implementation ---------------------------------------------------------------------------------

def test_against_the_official_formula_binary_targets():
    """Alibaba-MIIL/ASL AsymmetricLoss (losses.py) with eps = 0, in torch float64, for binary t at ordinary x (the
    file's header says where it differs otherwise: its eps clamps and its mixed weight for soft t)."""
    torch = pytest.importorskip("torch")
    x = torch.linspace(-8, 8, 97, dtype=torch.float64) + 0.01
    for gp in GAMMA_POS:
        for gn in GAMMA_NEG:
            for m in CLIPS:
                for t in (0.0, 1.0):
                    tt = torch.full_like(x, t)
                    xs_pos = torch.sigmoid(x)
                    xs_neg = (1 - xs_pos + m).clamp(max=1)
                    pt = xs_pos * tt + xs_neg * (1 - tt)
                    gamma_t = gp * tt + gn * (1 - tt)
                    ref = -(tt * torch.log(xs_pos) + (1 - tt) * torch.log(xs_neg)) * torch.pow(1 - pt, gamma_t)
                    ours = ASL(x.numpy(), tt.numpy(), gp, gn, m)
                    # the official 1 - pt = 1 - (1 - p + m) loses digits as p_m -> 0: compare where p_m > 0.01
                    keep = (t == 1) | ((xs_pos - m) > 0.01) | ((xs_pos - m) <= 0)
                    np.testing.assert_allclose(ours[keep.numpy()], ref.numpy()[keep.numpy()], rtol=1e-12, atol=0,
                                               err_msg=f"{(gp, gn, m, t)}")


# -- the prover's closed-end split the file's guards need -----------------------------------------------------------

def test_guard_at_the_closed_end_of_a_parameter_is_proved_and_a_wrong_one_refuted(tmp_path):
    """where(clip > 0, log1p(clip/sigmoid(-x)), 0) = log1p(clip/sigmoid(-x)) for clip in [0, 1): the false case is
    clip = 0, which the prover substitutes; the same guard with the wrong limit (1) is refuted."""
    from derive.prover.verify import verify_paths
    src = """[file]
title = "guards"
[symbols]
x = { domain = "real" }
clip = { domain = "[0, 1)" }
[[derivation]]
id = "g"
title = "g"
[[derivation.chain]]
id = "%s"
lines = ["log1p(clip/sigmoid(-x))", { expr = "where(clip > 0, log1p(clip/sigmoid(-x)), %s)", rule = "r" }]
"""
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text(src % ("ok", "0"))
    bad.write_text(src % ("wrong", "1"))
    rg, rb = verify_paths([good]), verify_paths([bad])
    assert not rg.errors and rg.checks and all(c.verdict.status == PROVED for c in rg.checks), rg.checks
    assert rg.exit_code() == 0
    assert not rb.errors and REFUTED in [c.verdict.status for c in rb.checks], rb.checks
    assert rb.exit_code() == 1
