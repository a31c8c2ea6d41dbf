"""derive.jax: every shipped kernel as a JAX function (issue 15).

Parametrised over derive.codegen.kernels.shipped_kernels() (no list of names): jit, grad and vmap
work; jax.grad matches central finite differences of the function itself; second derivatives
(jax.hessian, grad of grad, jvp of grad, vmap of hessian) equal finite differences of the gradient
and JAX's own autodiff of the file's original definition (the loss line as the paper writes it,
printed to jax.numpy by SymPy, nothing typed here); the pure_callback backend equals the FFI one.
The optax drop-ins are compared in float32 with optax, both against mpmath truth from the same
original definitions (derive.measure.reference).  Saturated logits (|x| = 20, 40, 100, gamma =
0.5): derive's gradients and second derivatives are finite and match mpmath; optax 0.2.8's
gradients are finite there too (log-space focal weight since 0.2.5), but its float32 autodiff
second derivative at x = 20 is 12% off (-1.855e-8 against the exact -1.649e-8), which the
saturated test shows derive's is not.
"""
from __future__ import annotations

import functools
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import derive  # noqa: E402
from derive.codegen.kernels import shipped_kernels  # noqa: E402

DECLS = shipped_kernels()
RUNTIME = (jax.errors.JaxRuntimeError, ValueError)
IDS = [k.name for k in DECLS]


@pytest.fixture(autouse=True, scope="module")
def x64():
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


@pytest.fixture(scope="module")
def dj():
    import derive.jax

    return derive.jax


def _params(decl):
    """The declared defaults, in order (every shipped kernel declares them)."""
    return {p: decl.defaults[p] for p in decl.params}


def _case(decl, seed=0, dtype=np.float64):
    """Ordinary inputs of the kernel's layout: logits, targets, and (softmax) K."""
    rng = np.random.default_rng(seed)
    if decl.layout == "elementwise":
        x = rng.normal(size=12) * 3
        t = rng.uniform(0.05, 0.95, size=12) if decl.target == "soft" else (rng.uniform(size=12) > 0.5) * 1.0
        return x.astype(dtype), t.astype(dtype)
    x = (rng.normal(size=(4, 5)) * 2).astype(dtype)
    if decl.target == "class_probs":
        return x, rng.dirichlet(np.ones(5), size=4).astype(dtype)
    t = rng.integers(0, 5, size=4)
    t[2] = -100  # an ignored row: loss 0, gradient 0
    return x, t


def _f(dj, decl, t, **kw):
    fn = getattr(dj.kernels, decl.name)
    return lambda x: jnp.sum(fn(x, t, **kw))


def _fd_grad(f, x, h=1e-5):
    """Central differences of the scalar f, every coordinate at once (vmap over x +- h e_i)."""
    flat = x.reshape(-1)
    eye = jnp.eye(flat.size, dtype=x.dtype) * h
    fp = jax.vmap(lambda d: f((flat + d).reshape(x.shape)))(eye)
    fm = jax.vmap(lambda d: f((flat - d).reshape(x.shape)))(eye)
    return ((fp - fm) / (2 * h)).reshape(x.shape)


def _fd_jac(g, x, h=1e-5):
    flat = x.reshape(-1)
    eye = jnp.eye(flat.size, dtype=x.dtype) * h
    gp = jax.vmap(lambda d: g((flat + d).reshape(x.shape)).reshape(-1))(eye)
    gm = jax.vmap(lambda d: g((flat - d).reshape(x.shape)).reshape(-1))(eye)
    return (gp - gm) / (2 * h)  # [i, j] = d g_j / d x_i


def _naive(decl):
    """JAX's autodiff target: the kernel's loss from its file's original lines (SymPy -> jax.numpy)."""
    import sympy as sp
    from derive.measure.reference import reference_for

    ref = reference_for(decl.name)
    expr = ref.original(ref.roles[0])
    fn = sp.lambdify([ref._sym(a) for a in ref.args], expr, modules="jax")
    params = _params(decl)
    vals = [params[p] for p in decl.params]
    if decl.layout == "elementwise":
        return lambda x, t: fn(x, t, *vals)
    if decl.target == "class_probs":
        return lambda x, q: jnp.sum(fn(jax.nn.log_softmax(x, axis=-1), q, x.shape[-1], *vals), axis=-1)

    def rows(x, t):
        valid = t != -100
        tt = jnp.where(valid, t, 0)
        u = jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), tt[:, None], axis=-1)[:, 0]
        return jnp.where(valid, fn(u, *vals), 0.0)
    return rows


@pytest.mark.parametrize("decl", DECLS, ids=IDS)
def test_jit_grad_vmap_and_finite_differences(dj, decl):
    x, t = _case(decl)
    fn = getattr(dj.kernels, decl.name)
    loss = fn(x, t)
    # the same kernel as derive.kernels.<name> on NumPy (softmax (N, K): the class axis is last and 1)
    np.testing.assert_allclose(np.asarray(loss), getattr(derive.kernels, decl.name)(x, t, backend="c"),
                               rtol=1e-14, atol=0)
    np.testing.assert_array_equal(np.asarray(jax.jit(fn)(x, t)), np.asarray(loss))
    f = _f(dj, decl, t)
    g = jax.grad(f)(x)
    _, g_np = getattr(derive.kernels, decl.name)(x, t, reduction="sum", return_grad=True, backend="c")
    np.testing.assert_allclose(np.asarray(g), g_np, rtol=1e-14, atol=0)
    np.testing.assert_allclose(np.asarray(g), np.asarray(_fd_grad(f, jnp.asarray(x))), rtol=1e-7, atol=1e-9)
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.grad(f))(x)), np.asarray(g))
    x2, _ = _case(decl, seed=1)
    vg = jax.vmap(jax.grad(f))(jnp.stack([x, x2]))
    np.testing.assert_allclose(np.asarray(vg[0]), np.asarray(g), rtol=1e-14)
    np.testing.assert_allclose(np.asarray(vg[1]), np.asarray(jax.grad(f)(x2)), rtol=1e-14)
    # vmap over the targets too (one batch entry per target array), and jvp of the loss
    vl = jax.vmap(fn)(jnp.stack([x, x2]), jnp.stack([t, t]))
    np.testing.assert_allclose(np.asarray(vl[1]), np.asarray(fn(x2, t)), rtol=1e-14)
    w = np.random.default_rng(2).normal(size=x.shape)
    _, tan = jax.jvp(f, (jnp.asarray(x),), (jnp.asarray(w),))
    np.testing.assert_allclose(float(tan), float(jnp.vdot(g, w)), rtol=1e-13)


@pytest.mark.parametrize("decl", DECLS, ids=IDS)
def test_second_derivatives(dj, decl):
    x, t = _case(decl)
    x = jnp.asarray(x)
    f = _f(dj, decl, t)
    if not dj.kernels.kernel(decl.name).info.get("second"):  # the generated module has no hess/hvp
        with pytest.raises(NotImplementedError, match="declares no second derivative"):
            jax.hessian(f)(x)
        return
    H = jax.hessian(f)(x).reshape(x.size, x.size)
    np.testing.assert_allclose(np.asarray(H), np.asarray(H.T), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(np.asarray(H), np.asarray(_fd_jac(jax.grad(f), x)), rtol=1e-6, atol=1e-8)
    naive = _naive(decl)
    Hn = jax.hessian(lambda x: jnp.sum(naive(x, jnp.asarray(t))))(x).reshape(x.size, x.size)
    np.testing.assert_allclose(np.asarray(H), np.asarray(Hn), rtol=1e-9, atol=1e-12)
    assert np.abs(np.asarray(H)).max() > 0  # a real second derivative, not a silent zero
    w = jnp.asarray(np.random.default_rng(3).normal(size=x.shape))
    hw = (H @ w.reshape(-1)).reshape(x.shape)
    gg = jax.grad(lambda x: jnp.vdot(jax.grad(f)(x), w))(x)  # reverse over reverse
    np.testing.assert_allclose(np.asarray(gg), np.asarray(hw), rtol=1e-12, atol=1e-15)
    _, jg = jax.jvp(jax.grad(f), (x,), (w,))  # forward over reverse
    np.testing.assert_allclose(np.asarray(jg), np.asarray(hw), rtol=1e-12, atol=1e-15)
    x2, _ = _case(decl, seed=1)
    vh = jax.jit(jax.vmap(jax.hessian(f)))(jnp.stack([x, jnp.asarray(x2)]))
    np.testing.assert_allclose(np.asarray(vh[0]).reshape(H.shape), np.asarray(H), rtol=1e-13, atol=1e-16)
    with pytest.raises(NotImplementedError, match="third derivative"):
        jax.grad(lambda x: jnp.vdot(jax.grad(lambda y: jnp.vdot(jax.grad(f)(y), w))(x), w))(x)


@pytest.mark.parametrize("decl", DECLS, ids=IDS)
def test_callback_backend_equals_ffi(dj, decl):
    x, t = _case(decl, seed=4)
    fn = getattr(dj.kernels, decl.name)
    f_ffi, f_cb = _f(dj, decl, t, backend="ffi"), _f(dj, decl, t, backend="callback")
    np.testing.assert_allclose(np.asarray(fn(x, t, backend="callback")), np.asarray(fn(x, t, backend="ffi")),
                               rtol=1e-13, atol=1e-300)
    second = dj.kernels.kernel(decl.name).info.get("second")
    d = jax.hessian if second else jax.grad
    np.testing.assert_allclose(np.asarray(jax.jit(d(f_cb))(x)), np.asarray(d(f_ffi)(x)), rtol=1e-12, atol=1e-15)
    if decl.params:  # vmap over a parameter: one kernel call per value, both backends
        p = decl.params[-1]
        vals = jnp.asarray([decl.defaults[p], decl.defaults[p] * 0.5 + 0.01])
        for backend in ("ffi", "callback"):
            batched = jax.vmap(lambda v: fn(x, t, **{p: v}, backend=backend))(vals)
            for i in range(2):
                np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(fn(x, t, **{p: float(vals[i])})),
                                           rtol=1e-13, atol=1e-300)


def _rel(a, ref, floor):
    ref = np.asarray([float(r) for r in ref]).reshape(np.shape(a))
    return np.abs(np.asarray(a, np.float64) - ref) / np.maximum(np.abs(ref), floor)


def test_optax_dropins_against_mpmath(dj):
    """Each drop-in and optax, both in float32, against mpmath truth: derive within a few float32
    ulps (2^-20 relative), optax within float32 error (2^-13: a different loss would be off by far
    more); soft targets relative to max(1, kappa), the condition number of the exact function
    (the kernels' 'conditioned' bound: near sigmoid(x) = t the gradient is a difference), softmax
    gradients relative to the row's scale."""
    optax = pytest.importorskip("optax")
    from derive.measure.reference import reference_for

    rng = np.random.default_rng(5)
    x = (rng.normal(size=16) * 4).astype(np.float32)
    ours, theirs = [], []
    for labels in ((rng.uniform(size=16) > 0.5).astype(np.float32), rng.uniform(0.1, 0.9, 16).astype(np.float32)):
        for alpha, gamma in ((None, 2.0), (0.25, 0.5)):
            soft = labels.min() > 0
            name = ("sigmoid_focal" if alpha is None else "sigmoid_focal_alpha") + ("_soft" if soft else "")
            params = (gamma,) if alpha is None else (alpha, gamma)
            ref = reference_for(name)
            ref_l, ref_g = ref.values(x, labels, params)
            kl, kg = ref.kappa(x, labels, params, np.float32) if ref.conditioned else (1.0, 1.0)
            mine = lambda z: dj.sigmoid_focal_loss(z, labels, alpha=alpha, gamma=gamma)  # noqa: E731
            other = lambda z: optax.sigmoid_focal_loss(z, labels, alpha=alpha, gamma=gamma)  # noqa: E731
            for fn, acc in ((mine, ours), (other, theirs)):
                acc.append((_rel(fn(x), ref_l, 1e-30) / np.maximum(1, kl)).max())
                acc.append((_rel(jax.grad(lambda z: jnp.sum(fn(z)))(x), ref_g, 1e-30) / np.maximum(1, kg)).max())
    xr = (rng.normal(size=(8, 7)) * 3).astype(np.float32)
    lab = rng.integers(0, 7, 8)
    q = rng.dirichlet(np.ones(7), 8).astype(np.float32)
    cases = [("softmax_ce", (), lab, dj.softmax_cross_entropy_with_integer_labels,
              optax.softmax_cross_entropy_with_integer_labels, lab),
             ("label_smoothed_ce", (0.0,), q, dj.softmax_cross_entropy, optax.softmax_cross_entropy, q),
             ("poly1_softmax", (2.0,), lab, dj.poly_loss_cross_entropy, optax.losses.poly_loss_cross_entropy,
              np.eye(7, dtype=np.float32)[lab])]
    for name, params, target, mine, other, labels in cases:
        ref_l, ref_g = reference_for(name).values(xr.astype(np.float64), target, params, ignore_index=-100)
        scale = np.asarray([max(abs(float(v)) for v in row) for row in ref_g])[:, None]
        flat_g = [v for row in ref_g for v in row]
        for fn, acc in ((mine, ours), (other, theirs)):
            acc.append(_rel(fn(xr, labels), ref_l, 1e-30).max())
            g = np.asarray(jax.grad(lambda z: jnp.sum(fn(z, labels)))(xr), np.float64)
            acc.append((np.abs(g - np.asarray([float(v) for v in flat_g]).reshape(g.shape)) / scale).max())
    assert max(ours) < 2.0 ** -20, ours
    assert max(theirs) < 2.0 ** -13, theirs


@functools.lru_cache(maxsize=None)
def _exact_focal_derivatives(x, label, gamma="0.5"):
    """d/dx and d2/dx2 of -(1 - p_t)^gamma log p_t at x (mpmath's differences at 150 digits: at
    x_t = 100 the second derivative is about e^-100 of a loss of 100)."""
    import mpmath as mp

    with mp.workdps(150):
        def fl(v):
            p = 1 / (1 + mp.exp(-v))
            pt = p if label == 1 else 1 - p
            return -(1 - pt) ** mp.mpf(gamma) * mp.log(pt)
        return float(mp.diff(fl, mp.mpf(x), 1)), float(mp.diff(fl, mp.mpf(x), 2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_saturated_logits_are_finite_and_exact(dj, dtype):
    """x_t = -100 ... 100 with gamma = 0.5, where (1 - p_t)^(gamma - 1) overflows in the textbook
    gradient: finite first and second derivatives, equal to mpmath."""
    x = np.array([-100.0, -40.0, -20.0, 20.0, 40.0, 100.0], dtype)
    for label in (0.0, 1.0):
        t = np.full_like(x, label)
        f = lambda z: jnp.sum(dj.sigmoid_focal_loss(z, t, gamma=0.5))  # noqa: E731
        g = np.asarray(jax.grad(f)(x), np.float64)
        h = np.asarray(jax.hessian(f)(x), np.float64).diagonal()
        assert np.isfinite(g).all() and np.isfinite(h).all()
        tiny = np.finfo(dtype).tiny
        for i, xi in enumerate(x):
            d1, d2 = _exact_focal_derivatives(float(xi), label)
            for got, want in ((g[i], d1), (h[i], d2)):
                if abs(want) < tiny:  # below the dtype's normal range: only the sign (or zero) is asked
                    assert abs(got) <= 2 * tiny
                    continue
                assert abs(got - want) <= 2e-6 * abs(want), (xi, label, got, want)
    rows = jnp.asarray(np.array([[100.0, -100.0, 0.0], [-100.0, 100.0, 0.0]], dtype))
    for gamma in (0.5, 2.0):
        fr = lambda z: jnp.sum(dj.kernels.softmax_focal(z, jnp.array([0, 0]), gamma=gamma))  # noqa: E731
        assert np.isfinite(np.asarray(jax.grad(fr)(rows))).all()
        assert np.isfinite(np.asarray(jax.hessian(fr)(rows))).all()


def test_half_precision_computed_in_float32(dj):
    x32 = np.linspace(-6, 6, 25).astype(np.float32)
    t = (x32 > 0.5).astype(np.float32)
    for half in (jnp.bfloat16, jnp.float16):
        xh = jnp.asarray(x32).astype(half)
        out = dj.sigmoid_focal_loss(xh, t, gamma=2.0)
        assert out.dtype == half
        want = dj.sigmoid_focal_loss(xh.astype(jnp.float32), t, gamma=2.0).astype(half)
        np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))
        g = jax.grad(lambda z: jnp.sum(dj.sigmoid_focal_loss(z, t).astype(jnp.float32)))(xh)
        assert g.dtype == half and np.isfinite(np.asarray(g, np.float32)).all()


def test_errors_name_the_argument(dj):
    x = jnp.linspace(-2.0, 2.0, 6)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        dj.sigmoid_focal_loss(x, x > 0, gamma=-1.0)
    with pytest.raises(RUNTIME, match=r"gamma = -1 \(must be >= 0\)"):  # traced: the kernel
        jax.jit(lambda g: dj.sigmoid_focal_loss(x, x > 0, gamma=g))(-1.0).block_until_ready()
    # found by the kernel when it runs: JaxRuntimeError (some eager paths of jax raise it as ValueError)
    with pytest.raises(RUNTIME, match=r"focal_star: targets must hold labels 0 or 1, found 0.5"):
        dj.kernels.focal_star(x, jnp.full(6, 0.5)).block_until_ready()
    with pytest.raises(RUNTIME, match=r"values in \[0, 1\].*found 2 at flat index 1"):
        dj.sigmoid_focal_loss(x, jnp.array([0, 2, 0, 1, 1, 0.5])).block_until_ready()
    xr = jnp.zeros((3, 4))
    with pytest.raises(RUNTIME, match=r"class indices in \[0, 4\), found 7 at row 1"):
        jax.jit(dj.softmax_cross_entropy_with_integer_labels)(xr, jnp.array([0, 7, 1])).block_until_ready()
    with pytest.raises(TypeError, match="logits must be a floating-point array"):
        dj.sigmoid_focal_loss(jnp.arange(3), jnp.zeros(3))
    with pytest.raises(ValueError, match="labels has shape"):
        dj.sigmoid_focal_loss(x, jnp.zeros(4))
    with pytest.raises(NotImplementedError, match="with respect to labels"):
        jax.grad(lambda q: jnp.sum(dj.softmax_cross_entropy(xr, q)))(jnp.full((3, 4), 0.25))
    with pytest.raises(ValueError, match="backend must be one of"):
        dj.sigmoid_focal_loss(x, x > 0, backend="gpu")
    with pytest.raises(ValueError, match="one weight per class"):
        dj.kernels.softmax_focal(xr, jnp.array([0, 1, 2]), alpha=jnp.ones(3))


def test_per_class_alpha_and_ignore_index(dj):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(5, 4))
    t = np.array([0, 3, -100, 2, 1])
    alpha = np.array([0.1, 0.4, 0.7, 1.0])
    got = dj.kernels.softmax_focal(x, t, alpha=alpha, gamma=2.0)
    want = derive.kernels.softmax_focal(x, t, alpha=alpha, gamma=2.0, backend="c")
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-14)
    g = jax.grad(lambda z: jnp.sum(dj.kernels.softmax_focal(z, t, alpha=alpha)))(x)
    assert not np.asarray(g)[2].any()  # the ignored row
    _, want_g = derive.kernels.softmax_focal(x, t, alpha=alpha, reduction="sum", return_grad=True, backend="c")
    np.testing.assert_allclose(np.asarray(g), want_g, rtol=1e-14)


def test_user_file_through_the_loader(dj, tmp_path):
    """derive.jax.load(FILE): a file of one's own (here a copy of poly1.toml), verified and generated
    by derive.load, then the same JAX functions."""
    from derive.resources import derivations_dir

    path = tmp_path / "my_poly.toml"
    path.write_text((derivations_dir() / "poly1.toml").read_text())
    mine = dj.load(path)
    assert mine.kernel_names == ["poly1_softmax"]
    x = np.random.default_rng(7).normal(size=(3, 6))
    t = np.array([1, 5, 0])
    f = lambda z: jnp.sum(mine.poly1_softmax(z, t, epsilon=0.5))  # noqa: E731
    g = lambda z: jnp.sum(dj.kernels.poly1_softmax(z, t, epsilon=0.5))  # noqa: E731
    np.testing.assert_allclose(float(f(x)), float(g(x)), rtol=1e-14)
    np.testing.assert_allclose(np.asarray(jax.hessian(f)(x)), np.asarray(jax.hessian(g)(x)), rtol=1e-14)


def test_import_derive_without_jax():
    code = ("import sys; sys.modules['jax'] = None\n"
            "import derive, numpy as np\n"
            "print(derive.kernels.sigmoid_focal(np.zeros(2), np.ones(2)).dtype)\n"
            "try:\n    import derive.jax\nexcept ImportError as e:\n    print('ImportError:', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["float64", "ImportError: derive.jax needs JAX: pip install "
                                       "'derive-gradients[jax]' (or pip install jax)"]


def test_without_x64_int32_labels_and_float32(dj):
    """JAX's default (no x64): labels are int32 (widened by the shim for the int64 C kernels) and
    logits float32; the results are those of the x64 run's float32 computation."""
    rng = np.random.default_rng(8)
    x = (rng.normal(size=(6, 5)) * 2).astype(np.float32)
    lab = np.array([0, 1, 2, 3, 4, 0])
    want = np.asarray(dj.softmax_cross_entropy_with_integer_labels(x, lab))
    want_h = np.asarray(jax.hessian(lambda z: jnp.sum(dj.kernels.softmax_focal(z, lab)))(x))
    with jax.enable_x64(False):
        labels = jnp.asarray(lab)
        assert labels.dtype == jnp.int32
        got = dj.softmax_cross_entropy_with_integer_labels(jnp.asarray(x), labels)
        got_h = jax.hessian(lambda z: jnp.sum(dj.kernels.softmax_focal(z, labels)))(jnp.asarray(x))
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), want)
        np.testing.assert_array_equal(np.asarray(got_h), want_h)


def test_without_the_ffi_shim_auto_falls_back_to_callback(dj, monkeypatch):
    from derive.runtime import cbuild, jax_ops

    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(cbuild.CompilerNotFoundError, match="CXX='/nonexistent/c\\+\\+' was not found"):
        jax_ops.find_cxx()
    x = jnp.linspace(-3.0, 3.0, 7)
    want = dj.sigmoid_focal_loss(x, x > 0, backend="ffi")
    monkeypatch.setattr(jax_ops, "_FFI", {"shim": cbuild.BuildError("no C++ compiler (test)")})
    monkeypatch.setattr(jax_ops, "_WARNED", set())
    with pytest.warns(dj.JaxFFIUnavailableWarning, match="pure_callback.*no C\\+\\+ compiler \\(test\\)"):
        got = dj.sigmoid_focal_loss(x, x > 0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-13)
    with pytest.raises(cbuild.BuildError, match="no C\\+\\+ compiler"):
        dj.sigmoid_focal_loss(x, x > 0, backend="ffi")
