"""Soft and class-probability targets, torch's shapes, 0-d inputs, and every shipped kernel callable.

Truth is computed, never typed in: mpmath at 40 digits (always) and torch in float64 (when it
imports).  float32 results are compared with that truth within the accuracy bounds, not bit for
bit with torch.  Where a loss is ill-conditioned (a soft target next to the prediction: p - t),
the bound is relative to the condition number kappa = sum_v |v df/dv / f| over the continuous
inputs v (the logit and the target), as ``conditioned`` kernels are measured.
"""
from __future__ import annotations

import mpmath as mp
import numpy as np
import pytest

import derive
from derive.runtime import cbuild
from derive.runtime import losses as L

BOUND = {np.float32: 2e-6, np.float64: 4e-15}  # the README's accuracy bounds, relative to max(1, kappa)


def _backends():
    return ["numpy"] + (["c"] if "c" in L.available_backends() else [])


BACKENDS = _backends()
DTYPES = [np.float32, np.float64]


# ------------------------------------------------------------------------------------------
# soft binary targets


def _mp_soft(x, t, alpha, gamma):
    """torchvision's sigmoid_focal_loss with a real target t, at mpmath precision (alpha None:
    no alpha_t; gamma 0: the cross-entropy)."""
    p = 1 / (1 + mp.exp(-x))
    ce = -(t * mp.log(p) + (1 - t) * mp.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    w = 1 if alpha is None else alpha * t + (1 - alpha) * (1 - t)
    return w * ce * (1 - p_t) ** gamma if gamma else w * ce


def _mp_truth(x, t, alpha, gamma):
    """(loss, grad, kappa of loss, kappa of grad) at 40 digits, derivatives by mpmath."""
    with mp.workdps(40):
        x, t = mp.mpf(float(x)), mp.mpf(float(t))
        f = lambda a, b: _mp_soft(a, b, alpha, gamma)  # noqa: E731
        g = lambda a, b: mp.diff(lambda v: f(v, b), a)  # noqa: E731
        loss, grad = f(x, t), g(x, t)
        dl = (x * grad, t * mp.diff(lambda v: f(x, v), t))
        dg = (x * mp.diff(lambda v: g(v, t), x), t * mp.diff(lambda v: g(x, v), t))

        def kappa(val, parts):
            return float(sum(abs(d) for d in parts) / abs(val)) if val != 0 else float("inf")

        return float(loss), float(grad), kappa(loss, dl), kappa(grad, dg)


_SOFT_CASES = [  # public function, its keyword arguments, (alpha, gamma) of the formula
    ("sigmoid_cross_entropy", {}, (None, 0)),
    ("binary_focal_loss", {"gamma": 2.0}, (None, 2)),
    ("binary_focal_loss", {"gamma": 0.5}, (None, mp.mpf(1) / 2)),
    ("sigmoid_focal_loss", {"alpha": 0.25, "gamma": 2.0}, (mp.mpf(1) / 4, 2)),
    ("sigmoid_focal_loss", {"alpha": -1, "gamma": 2.0}, (None, 2)),
]


def _soft_grid():
    x = np.array([-30.0, -12.0, -3.5, -1.0, -0.25, 0.0, 0.3, 1.0, 2.0, 7.0, 15.0, 30.0])
    t = np.array([0.0, 1e-3, 0.1, 0.3, 0.5, 0.77, 0.9, 0.999, 1.0])
    xx, tt = np.meshgrid(x, t)
    # the targets are not all 0 or 1, so the soft kernel computes every element, 0 and 1 included
    return xx.ravel(), tt.ravel()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,kw,formula", _SOFT_CASES, ids=[f"{c[0]}-{c[1]}" for c in _SOFT_CASES])
def test_soft_targets_against_mpmath(name, kw, formula, dtype, backend):
    x, t = _soft_grid()
    xs, ts = x.astype(dtype), t.astype(dtype)
    loss, grad = getattr(L, name)(xs, ts, reduction="none", return_grad=True, backend=backend, **kw)
    assert loss.dtype == dtype and grad.dtype == dtype and loss.shape == x.shape
    worst = 0.0
    for i in range(x.size):
        # the truth at the rounded inputs: the kernel saw xs[i], ts[i]
        ref_l, ref_g, k_l, k_g = _mp_truth(xs[i], ts[i], *formula)
        for got, ref, kappa in ((loss[i], ref_l, k_l), (grad[i], ref_g, k_g)):
            err = abs(float(got) - ref) / max(abs(ref), 1e-300) if ref != 0 else abs(float(got))
            rel = err / max(1.0, kappa)
            worst = max(worst, rel)
            assert rel <= BOUND[dtype], (name, kw, float(xs[i]), float(ts[i]), float(got), ref, kappa)
    assert worst > 0  # the comparison saw rounding, so it compared computed values


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_soft_targets_against_torch(dtype, backend):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(7, 11)) * 6).astype(dtype)
    t = rng.random((7, 11)).astype(dtype)
    t[0, :3] = (0, 1, 0)

    def torch_truth(formula, reduction):
        xt = torch.tensor(x.astype(np.float64), requires_grad=True)
        tt = torch.tensor(t.astype(np.float64))
        loss = formula(xt, tt)
        loss = {"none": loss, "sum": loss.sum(), "mean": loss.mean()}[reduction]
        loss.backward(torch.ones_like(loss))
        return loss.detach().numpy(), xt.grad.numpy()

    def tv_focal(alpha, gamma):  # torchvision.ops.sigmoid_focal_loss, written out
        def f(xt, tt):
            p = torch.sigmoid(xt)
            ce = F.binary_cross_entropy_with_logits(xt, tt, reduction="none")
            p_t = p * tt + (1 - p) * (1 - tt)
            loss = ce * (1 - p_t) ** gamma
            return (alpha * tt + (1 - alpha) * (1 - tt)) * loss if alpha >= 0 else loss
        return f

    cases = [
        ("binary_cross_entropy_with_logits", {}, lambda a, b: F.binary_cross_entropy_with_logits(a, b, reduction="none")),
        ("sigmoid_cross_entropy", {}, lambda a, b: F.binary_cross_entropy_with_logits(a, b, reduction="none")),
        ("binary_focal_loss", {"gamma": 2.0}, tv_focal(-1, 2.0)),
        ("sigmoid_focal_loss", {"alpha": 0.25, "gamma": 2.0}, tv_focal(0.25, 2.0)),
        ("sigmoid_focal_loss", {"alpha": 0.6, "gamma": 0.5}, tv_focal(0.6, 0.5)),
    ]
    # float32 results against float64 truth; the loss is well conditioned here (|x| <= ~20, the
    # gradient's cancellation p - t costs at most an absolute eps)
    tol = {np.float32: 4e-6, np.float64: 1e-13}[dtype]
    for name, kw, formula in cases:
        for reduction in ("none", "sum", "mean"):
            ref_l, ref_g = torch_truth(formula, reduction)
            got_l, got_g = getattr(L, name)(x, t, reduction=reduction, return_grad=True, backend=backend, **kw)
            np.testing.assert_allclose(np.asarray(got_l, np.float64), ref_l, rtol=tol, atol=0, err_msg=name)
            scale = np.abs(ref_g).max()
            np.testing.assert_allclose(got_g, ref_g, rtol=tol, atol=tol * scale, err_msg=f"{name} {reduction}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_soft_kernels_give_the_binary_values_at_labels(dtype, backend):
    """One soft value sends the whole array to the soft kernel; its 0/1 entries then agree with
    the binary kernel within the accuracy bound (the two are different proved forms)."""
    x = np.linspace(-25, 25, 201).astype(dtype)
    t = (np.arange(201) % 2).astype(dtype)
    mixed = t.copy()
    mixed[37] = 0.5  # at x = -15.75
    for name, kw, _ in _SOFT_CASES:
        fn = getattr(L, name)
        b_l, b_g = fn(x, t, return_grad=True, backend=backend, **kw)
        s_l, s_g = fn(x, mixed, return_grad=True, backend=backend, **kw)
        keep = np.arange(201) != 37
        for b, s in ((b_l, s_l), (b_g, s_g)):
            rel = np.abs(b[keep].astype(np.float64) - s[keep]) / np.maximum(np.abs(b[keep].astype(np.float64)), 1e-300)
            assert rel.max() <= 4 * BOUND[dtype], (name, kw, rel.max())
        assert not np.array_equal(s_l[37], b_l[37])  # the soft value itself is not a label's


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_target_errors_name_the_argument_and_value(backend):
    x = np.zeros(5)
    for bad in (-0.25, 1.5, np.nan):
        t = np.array([0, 0.5, 1, bad, 0.2])
        for name, kw, _ in _SOFT_CASES:
            with pytest.raises(ValueError, match=r"targets must hold values in \[0, 1\].*found " + (
                    "nan" if np.isnan(bad) else repr(bad))):
                getattr(L, name)(x, t, backend=backend, **kw)
    with pytest.raises(ValueError, match=r"soft targets are not defined for FL\*.*found 0\.5"):
        L.focal_loss_star(x, np.array([0, 0.5, 1, 1, 0]), backend=backend)
    with pytest.raises(TypeError, match="targets must hold numeric values in"):
        L.sigmoid_focal_loss(x, np.array(["a"] * 5), backend=backend)


@pytest.mark.skipif("c" not in BACKENDS, reason="no C compiler")
def test_binary_labels_cost_no_extra_pass(monkeypatch):
    """With C and labels of the logits' dtype, binary labels are checked only by the kernel's own
    pass: no Python pass over the targets (the soft kernel is chosen from at most the first
    _SOFT_PROBE labels)."""
    seen = []
    real = L._first_bad
    monkeypatch.setattr(L, "_first_bad", lambda flat, ok, start=0: seen.append(flat.size) or real(flat, ok, start))
    x = np.linspace(-5, 5, 100_000).astype(np.float32)
    t = (np.arange(x.size) % 2).astype(np.float32)
    probe = []
    real_probe = L._is_binary
    monkeypatch.setattr(L, "_is_binary", lambda v: probe.append(v.size) or real_probe(v))
    L.sigmoid_focal_loss(x, t, backend="c")
    assert seen == [] and probe == [L._SOFT_PROBE]
    t[-1] = 0.25  # a soft target past the probe: found by the kernel's pass, then the soft kernel
    got = L.sigmoid_focal_loss(x, t, backend="c")
    ref = L.sigmoid_focal_loss(x.astype(np.float64), t.astype(np.float64), backend="numpy")
    assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max()


# ------------------------------------------------------------------------------------------
# class-probability targets and label smoothing


def _mp_probs_row(x, q, eps):
    """(loss, grad, grad's scale) of one row: -sum q'_k log p_k, p_j sum q' - q'_j; the scale
    |p_j sum q'| + |q'_j| is what the gradient's cancellation is relative to."""
    with mp.workdps(40):
        x = [mp.mpf(float(v)) for v in x]
        K = len(x)
        qq = [(1 - mp.mpf(float(eps))) * mp.mpf(float(v)) + mp.mpf(float(eps)) / K for v in q]
        m = max(x)
        lse = m + mp.log(mp.fsum(mp.exp(v - m) for v in x))
        logp = [v - lse for v in x]
        s = mp.fsum(qq)
        loss = -mp.fsum(a * b for a, b in zip(qq, logp))
        grad = [mp.exp(lp) * s - a for lp, a in zip(logp, qq)]
        scale = [abs(mp.exp(lp) * s) + abs(a) for lp, a in zip(logp, qq)]
        return float(loss), [float(g) for g in grad], [float(c) for c in scale]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_probability_targets_against_mpmath(dtype, backend):
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(9, 6)) * 8).astype(dtype)
    x[0] = (1e3, 0, -3, 2, 1e3 - 1, -1e3)  # a row dominated by 1e3
    q = rng.random((9, 6))
    q[1] = (0, 0, 1, 0, 0, 0)
    q /= q.sum(axis=1, keepdims=True)
    q = q.astype(dtype)
    for eps in (0.0, 0.1, 1.0):
        loss, grad = L.softmax_cross_entropy(x, q, label_smoothing=eps, return_grad=True, backend=backend)
        assert loss.shape == (9,) and grad.shape == x.shape and loss.dtype == dtype
        for i in range(9):
            ref_l, ref_g, scale = _mp_probs_row(x[i], q[i], eps)
            assert abs(float(loss[i]) - ref_l) <= 2 * BOUND[dtype] * abs(ref_l), (eps, i, loss[i], ref_l)
            for j in range(6):
                assert abs(float(grad[i, j]) - ref_g[j]) <= 2 * BOUND[dtype] * scale[j], (eps, i, j)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_probability_targets_and_label_smoothing_against_torch(dtype, backend):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(5, 4, 3, 2)) * 4).astype(dtype)  # (N, K, d1, d2)
    q = rng.random(x.shape)
    q = (q / q.sum(axis=1, keepdims=True)).astype(dtype)
    idx = rng.integers(0, 4, (5, 3, 2))
    idx[0, 0, 0] = idx[4, 2, 1] = -100
    tol = {np.float32: 4e-6, np.float64: 1e-13}[dtype]
    for targets in (q, idx, q[:, :, 0, 0], idx[:, 0, 0]):
        logits = x if targets.ndim != 2 - (targets.dtype.kind == "i") else x[:, :, 0, 0]
        for eps in (0.0, 0.1, 0.35):
            for reduction in ("none", "sum", "mean"):
                xt = torch.tensor(logits.astype(np.float64), requires_grad=True)
                tt = torch.tensor(targets.astype(np.float64) if targets.dtype.kind == "f" else targets)
                ref = F.cross_entropy(xt, tt, reduction=reduction, label_smoothing=eps)
                ref.backward(torch.ones_like(ref))
                got_l, got_g = L.softmax_cross_entropy(logits, targets, reduction=reduction, label_smoothing=eps,
                                                       return_grad=True, backend=backend)
                assert np.shape(got_l) == tuple(ref.shape) and got_g.shape == logits.shape
                np.testing.assert_allclose(np.asarray(got_l, np.float64), ref.detach().numpy(), rtol=tol,
                                           atol=tol * float(ref.detach().abs().max()))
                np.testing.assert_allclose(got_g, xt.grad.numpy(), rtol=tol, atol=tol * float(xt.grad.abs().max()),
                                           err_msg=f"{targets.dtype} {eps} {reduction}")


def test_probability_target_errors():
    x = np.zeros((3, 4))
    q = np.full((3, 4), 0.25)
    with pytest.raises(ValueError, match=r"targets must hold class probabilities in \[0, 1\], found -0\.5"):
        L.softmax_cross_entropy(x, np.where(np.eye(3, 4) > 0, -0.5, q))
    with pytest.raises(ValueError, match="found nan"):
        L.softmax_cross_entropy(x, np.where(np.eye(3, 4) > 0, np.nan, q))
    with pytest.raises(ValueError, match=r"label_smoothing must be >= 0 and <= 1, got 1\.5"):
        L.softmax_cross_entropy(x, q, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"label_smoothing must be >= 0 and <= 1, got -0\.1"):
        L.softmax_cross_entropy(x, np.array([0, 1, 2]), label_smoothing=-0.1)
    with pytest.raises(TypeError, match="label_smoothing must be a real number"):
        L.softmax_cross_entropy(x, q, label_smoothing="0.1")
    with pytest.raises(ValueError, match="class probabilities .* not defined for softmax focal loss"):
        L.softmax_focal_loss(x, q)
    with pytest.raises(TypeError, match="targets must be an integer array of class indices"):
        L.softmax_cross_entropy(x, np.zeros(3))  # floats of the index shape: neither kind
    with pytest.raises(ValueError, match=r"take class indices of shape \(3,\)"):
        L.softmax_cross_entropy(x, np.zeros((3, 1), dtype=np.int64))


# ------------------------------------------------------------------------------------------
# shapes: (N, K, d1, ...), (K,), 0-d


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_spatial_logits_against_torch(dtype, backend):
    """(N, K, d1, d2) logits, (N, d1, d2) class indices: torch's loss shape and gradient."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    x = (rng.normal(size=(3, 5, 4, 2)) * 5).astype(dtype)
    t = rng.integers(0, 5, (3, 4, 2))
    t[1, 2, 0] = -100
    tol = {np.float32: 4e-6, np.float64: 1e-13}[dtype]
    for reduction in ("none", "sum", "mean"):
        xt = torch.tensor(x.astype(np.float64), requires_grad=True)
        ref = torch.nn.functional.cross_entropy(xt, torch.tensor(t), reduction=reduction)
        ref.backward(torch.ones_like(ref))
        got_l, got_g = L.softmax_cross_entropy(x, t, reduction=reduction, return_grad=True, backend=backend)
        assert np.shape(got_l) == tuple(ref.shape) and got_g.shape == x.shape and got_g.flags.c_contiguous
        np.testing.assert_allclose(np.asarray(got_l, np.float64), ref.detach().numpy(), rtol=tol, atol=0)
        np.testing.assert_allclose(got_g, xt.grad.numpy(), rtol=tol, atol=tol * float(xt.grad.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_spatial_logits_are_rows_of_the_class_axis(backend):
    """Every softmax function on (N, K, d1, d2) equals the same function on the (N*d1*d2, K) rows
    (the class axis moved last), and (K,) equals one row; out= takes the torch shapes."""
    rng = np.random.default_rng(13)
    x = rng.normal(size=(2, 4, 3, 5)) * 3
    t = rng.integers(0, 4, (2, 3, 5))
    t[0, 0, 0] = -100
    rows = np.moveaxis(x, 1, -1).reshape(-1, 4)
    calls = [lambda a, b, **kw: L.softmax_cross_entropy(a, b, **kw),
             lambda a, b, **kw: L.softmax_focal_loss(a, b, alpha=np.array([0.1, 0.2, 0.3, 0.4]), gamma=0.5, **kw),
             lambda a, b, **kw: derive.kernels.poly1_softmax(a, b, **kw)]
    for call in calls:
        l2, g2 = call(rows, t.reshape(-1), return_grad=True, backend=backend)
        l4, g4 = call(x, t, return_grad=True, backend=backend)
        np.testing.assert_array_equal(l4, l2.reshape(2, 3, 5))
        np.testing.assert_array_equal(g4, np.moveaxis(g2.reshape(2, 3, 5, 4), -1, 1))
        out = (np.full((2, 3, 5), np.nan), np.full(x.shape, np.nan))
        got = call(x, t, return_grad=True, backend=backend, out=out)
        assert got[0] is out[0] and got[1] is out[1]
        np.testing.assert_array_equal(out[0], l4)
        np.testing.assert_array_equal(out[1], g4)
        l1, g1 = call(x[1, :, 2, 3], t[1, 2, 3], return_grad=True, backend=backend)
        assert l1.shape == () and g1.shape == (4,)
        np.testing.assert_array_equal(l1, l4[1, 2, 3])
        np.testing.assert_array_equal(g1, g4[1, :, 2, 3])
    with pytest.raises(ValueError, match=r"out\[0\] must have shape \(2, 3, 5\)"):
        L.softmax_cross_entropy(x, t, backend=backend, out=(np.empty(30), None))
    with pytest.raises(ValueError, match="got a 0-d array"):
        L.softmax_cross_entropy(np.float64(1.0), 0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_d_inputs_give_zero_d_outputs(dtype, backend):
    x, t = dtype(1.5), dtype(0.0)
    for name, kw, _ in _SOFT_CASES + [("focal_loss_star", {"gamma": 2.0, "beta": 1.0}, None)]:
        fn = getattr(L, name)
        loss, grad = fn(x, t, return_grad=True, backend=backend, **kw)
        assert loss.shape == () and grad.shape == () and loss.dtype == dtype, name
        ref_l, ref_g = fn(np.array([x]), np.array([t]), return_grad=True, backend=backend, **kw)
        assert loss == ref_l[0] and grad == ref_g[0]
        out = (np.empty((), dtype), np.empty((), dtype))
        got = fn(x, t, return_grad=True, backend=backend, out=out, **kw)
        assert got[0] is out[0] and got[1] is out[1] and out[0] == ref_l[0]
        total = fn(x, t, reduction="sum", backend=backend, **kw)
        assert np.ndim(total) == 0 and total == ref_l[0]
    soft = L.sigmoid_focal_loss(x, dtype(0.3), backend=backend)
    assert soft.shape == ()


# ------------------------------------------------------------------------------------------
# every shipped kernel, callable


def test_every_shipped_kernel_is_callable_on_both_backends():
    from derive.codegen.kernels import shipped_kernels

    decls = shipped_kernels()
    assert [k.name for k in decls] == derive.kernels.kernel_names
    modules = {k.module for k in decls}
    assert {"focal_kernels", "poly1", "label_smoothing"} <= modules
    assert set(derive.kernels.modules) == modules
    rng = np.random.default_rng(17)
    for k in decls:
        fn = getattr(derive.kernels, k.name)
        assert getattr(derive.shipped(k.module), k.name).__name__ == k.name
        x = rng.normal(size=(6, 4)) * 3
        if k.layout == "elementwise":
            t = rng.random((6, 4)) if k.target == "soft" else (rng.random((6, 4)) > 0.5).astype(float)
        elif k.target == "class_probs":
            t = rng.random((6, 4))
            t /= t.sum(axis=1, keepdims=True)
        else:
            t = rng.integers(0, 4, 6)
        results = [fn(x, t, reduction="sum", return_grad=True, backend=b) for b in BACKENDS]
        for loss, grad in results:
            assert np.isfinite(loss) and np.all(np.isfinite(grad)) and grad.shape == x.shape, k.name
        for loss, grad in results[1:]:
            np.testing.assert_allclose(loss, results[0][0], rtol=1e-13)
            np.testing.assert_allclose(grad, results[0][1], rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="no shipped module 'nope'; the shipped modules are 'focal_kernels'"):
        derive.shipped("nope")


def test_the_public_losses_call_the_shipped_kernels():
    """derive.kernels.<kernel> and the public loss that names it compute the same values."""
    rng = np.random.default_rng(19)
    x = rng.normal(size=(8, 5)) * 4
    q = rng.random((8, 5))
    q /= q.sum(axis=1, keepdims=True)
    np.testing.assert_array_equal(derive.kernels.label_smoothed_ce(x, q, 0.2, reduction="sum"),
                                  L.softmax_cross_entropy(x, q, label_smoothing=0.2, reduction="sum"))
    t = rng.random((8, 5))
    np.testing.assert_array_equal(derive.kernels.sigmoid_focal_alpha_soft(x, t, 0.3, 1.5),
                                  L.sigmoid_focal_loss(x, t, alpha=0.3, gamma=1.5))


@pytest.mark.skipif("c" not in BACKENDS, reason="no C compiler")
def test_cache_files_are_named_by_module(tmp_path, monkeypatch):
    monkeypatch.setenv("DERIVE_CACHE_DIR", str(tmp_path / "cache"))
    saved_loaded, saved_recent = dict(cbuild._LOADED), dict(cbuild._RECENT)
    cbuild._LOADED.clear()
    cbuild._RECENT.clear()
    try:
        x = np.zeros((2, 3))
        derive.kernels.poly1_softmax(x, np.array([0, 1]), backend="c")
        L.softmax_cross_entropy(x, np.full((2, 3), 1 / 3), backend="c")
        names = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.suffix == ".so")
        assert [n.rsplit("_", 1)[0] for n in names] == ["libderive_label_smoothing", "libderive_poly1"], names
    finally:
        cbuild._LOADED.clear()
        cbuild._LOADED.update(saved_loaded)
        cbuild._RECENT.clear()
        cbuild._RECENT.update(saved_recent)
