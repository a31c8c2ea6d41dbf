"""The layouts and target kinds of the templates, through the generated modules themselves.

For each kind (elementwise soft targets; softmax class indices, Poly-1; softmax class
probabilities, label smoothing) the generated C and NumPy kernels agree with each other and
with the definition evaluated directly in mpmath (the loss as written, its gradient by
numerical differentiation of that loss at 60 digits, never the derived closed form), on
ordinary and saturated inputs, with no NaN or inf for finite input; and with torch where it
defines the loss.  The kernels are called through the generated files (the runtime API is
built on top of them elsewhere).
"""
from __future__ import annotations

import ctypes
import importlib.util
import subprocess
import sys
from pathlib import Path

import mpmath
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "generated"
DTYPES = {"f32": (np.float32, ctypes.c_float), "f64": (np.float64, ctypes.c_double)}
ELABEL = 2  # DERIVE_ELABEL

# a soft-target loss written for this test: the sigmoid cross-entropy with t in [0, 1], and a
# kernel whose loss is a where() both of whose branches overflow in the other one's regime
SOFT = """
[file]
title = "soft-target layout test"
module = "soft_layout"

[symbols]
x = "real"
t = "[0, 1]"
s = "(0, oo)"

[definitions]
p = { expr = "sigmoid(x)", domain = "(0, 1)" }

[[derivation]]
id = "soft_ce"

[[derivation.chain]]
id = "loss"
export = "soft_ce_loss"
lines = ["-s*(t*log(p) + (1 - t)*log(1 - p))", { expr = "s*(t*softplus(-x) + (1 - t)*softplus(x))", rule = "logs" }]

[[derivation.chain]]
id = "grad"
export = "soft_ce_grad"
lines = ["D(-s*(t*log(p) + (1 - t)*log(1 - p)), x)", { expr = "s*(sigmoid(x) - t)", rule = "chain rule" }]

[[derivation.chain]]
id = "split"
export = "split_softplus"
lines = ["softplus(x)", { expr = "where(x < 0, log1p(exp(x)), x + log1p(exp(-x)))", rule = "take e^x out for x >= 0" }]

[[kernel]]
name = "soft_ce"
layout = "elementwise"
target = "soft"
loss = "soft_ce_loss"
grad = "soft_ce_grad"
params = ["s"]
defaults = { s = 1.0 }
conditioned = "sigmoid(x) - t cancels when the prediction matches the target"

[[kernel]]
name = "binary_ce"
layout = "elementwise"
target = "binary"
loss = "soft_ce_loss"
grad = "soft_ce_grad"
params = ["s"]
soft = "soft_ce"

[[kernel]]
name = "split_softplus"
layout = "elementwise"
target = "soft"
loss = "split_softplus"
grad = "split_softplus"
"""


def _compiler():
    from derive.runtime import cbuild

    try:
        return cbuild.find_compiler()
    except cbuild.BuildError:
        return None


class Module:
    """A generated module: its NumPy functions and (with a compiler) its C library."""

    def __init__(self, folder: Path, name: str, tmp: Path):
        spec = importlib.util.spec_from_file_location(f"test_layouts_{name}", folder / f"{name}.py")
        self.py = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.py)
        self.name = name
        self.lib = None
        cc = _compiler()
        if cc is not None:
            so = tmp / f"lib{name}.so"
            res = subprocess.run([*cc, "-std=c99", "-O2", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wextra",
                                  "-Werror", "-fPIC", "-shared", "-I", str(folder), str(folder / f"{name}.c"), "-o",
                                  str(so), "-lm"], capture_output=True, text=True, timeout=300)
            assert res.returncode == 0, res.stderr
            self.lib = ctypes.CDLL(str(so))

    def c(self, kernel, dt):
        if self.lib is None:
            pytest.skip("no C compiler")
        return getattr(self.lib, f"derive_{kernel}_{dt}")


def _ptr(a, ct):
    return a.ctypes.data_as(ctypes.POINTER(ct)) if a is not None else None


@pytest.fixture(scope="module")
def soft(tmp_path_factory):
    from derive.codegen import render_all, _write

    tmp = tmp_path_factory.mktemp("soft")
    path = tmp / "soft_layout.toml"
    path.write_text(SOFT)
    from derive.prover.verify import verify_paths

    report = verify_paths([path])
    assert {c.verdict.status for c in report.checks} == {"proved"}
    _write(tmp / "gen", render_all(path))
    return Module(tmp / "gen", "soft_layout", tmp)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shipped")
    return {m: Module(GENERATED, m, tmp) for m in ("poly1", "label_smoothing")}


# ---------------------------------------------------------------------------------------------
# elementwise, soft targets

def _elementwise_c(mod, kernel, dt, x, t, *params, want=True):
    T, ct = DTYPES[dt]
    fn = mod.c(kernel, dt)
    fn.argtypes = [ctypes.c_size_t] + [ctypes.POINTER(ct)] * 2 + [ct] * len(params) + [ctypes.POINTER(ct)] * 2
    fn.restype = ctypes.c_int
    loss, grad = np.empty_like(x), np.empty_like(x)
    rc = fn(x.size, _ptr(x, ct), _ptr(t, ct), *params, _ptr(loss, ct), _ptr(grad, ct))
    return rc, loss, grad


def _mp_soft_ce(x, t, s):
    """The definition -s (t log p + (1 - t) log(1 - p)), p = 1/(1 + e^-x), and its derivative by numerical
    differentiation, at 60 digits (mpmath's exponent range holds e^(+-max))."""
    with mpmath.workdps(60):
        t, s = mpmath.mpf(float(t)), mpmath.mpf(float(s))

        def f(v):
            # p and 1 - p as exact quotients: 1 - p would round to 0 at 60 digits for v > 140
            p, one_minus_p = 1 / (1 + mpmath.exp(-v)), 1 / (1 + mpmath.exp(v))
            return -s * (t * mpmath.log(p) + (1 - t) * mpmath.log(one_minus_p))

        xv = mpmath.mpf(float(x))
        h = mpmath.mpf(10) ** -25 * max(1, abs(xv))
        return float(f(xv)), float(mpmath.diff(f, xv, h=h))


def _soft_inputs(dt):
    big = float(np.finfo(DTYPES[dt][0]).max)
    x = np.array([-30, -3.5, -1, -1e-3, 0, 1e-3, 0.7, 2, 9, 30, 1e4, -1e4, big, -big, 15, -15], dtype=DTYPES[dt][0])
    t = np.array([0, 0.1, 0.5, 1, 0.25, 0.9, 1, 0, 0.3, 1, 0.5, 0.02, 0.5, 0.99, 0.999999, 1e-6],
                 dtype=DTYPES[dt][0])
    return x, t


@pytest.mark.parametrize("dt", ["f32", "f64"])
def test_soft_targets_match_the_definition_on_both_backends(soft, dt):
    x, t = _soft_inputs(dt)
    s = DTYPES[dt][0](0.75)  # s*max stays finite: the exact loss is representable at x = -max
    loss, grad = soft.py.soft_ce_f32(x, t, s) if dt == "f32" else soft.py.soft_ce_f64(x, t, s)
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
    eps = float(np.finfo(DTYPES[dt][0]).eps)
    for i in range(x.size):
        el, eg = _mp_soft_ce(x[i], t[i], s)
        # the loss is a sum of non-negative terms: relative error; the gradient s*(p - t) cancels when
        # p is close to t (the kernel is declared conditioned): error relative to s*(p + t)
        assert abs(loss[i] - el) <= 8 * eps * abs(el) + 1e-300, (dt, x[i], t[i], loss[i], el)
        p = 1 / (1 + mpmath.exp(-mpmath.mpf(float(x[i]))))
        assert abs(grad[i] - eg) <= 8 * eps * float(s * (p + mpmath.mpf(float(t[i])))), (dt, x[i], t[i], grad[i], eg)
    rc, lc, gc = _elementwise_c(soft, "soft_ce", dt, x, t, s)
    assert rc == 0
    np.testing.assert_allclose(lc, loss, rtol=8 * eps, atol=0)
    np.testing.assert_allclose(gc, grad, rtol=0, atol=8 * eps * 0.75 * 2)


@pytest.mark.parametrize("dt", ["f32", "f64"])
def test_soft_kernel_gives_the_binary_kernel_at_labels_0_and_1(soft, dt):
    T = DTYPES[dt][0]
    x = np.linspace(-40, 40, 257).astype(T)
    for label in (0, 1):
        t = np.full_like(x, label)
        ls, gs = getattr(soft.py, f"soft_ce_{dt}")(x, t, T(2))
        lb, gb = getattr(soft.py, f"binary_ce_{dt}")(x, t, T(2))
        np.testing.assert_array_equal(ls, lb)
        np.testing.assert_array_equal(gs, gb)
        rc, lc, gc = _elementwise_c(soft, "binary_ce", dt, x, t, T(2))
        assert rc == 0
        np.testing.assert_allclose(lc, lb, rtol=4 * np.finfo(T).eps)


@pytest.mark.parametrize("dt", ["f32", "f64"])
def test_soft_targets_outside_the_unit_interval_are_rejected(soft, dt):
    T, ct = DTYPES[dt]
    x = np.linspace(-3, 3, 3000).astype(T)
    t = np.full_like(x, 0.5)
    assert _elementwise_c(soft, "soft_ce", dt, x, t, T(1))[0] == 0
    fb = getattr(soft.lib, f"derive_soft_layout_first_bad_target_{dt}")
    fb.argtypes, fb.restype = [ctypes.c_size_t, ctypes.POINTER(ct)], ctypes.c_size_t
    assert fb(t.size, _ptr(t, ct)) == t.size
    for bad in (-1e-7, 1.0000001, 2, -3, np.nan, np.inf):
        tb = t.copy()
        tb[2049] = bad
        rc, loss, grad = _elementwise_c(soft, "soft_ce", dt, x, tb, T(1))
        assert rc == ELABEL, bad
        assert fb(tb.size, _ptr(tb, ct)) == 2049
        # every output is still written, the bad target counted as 1 (as the NumPy kernel does)
        ln, gn = getattr(soft.py, f"soft_ce_{dt}")(x, tb, T(1))
        one = tb.copy()
        one[2049] = 1
        l1, g1 = getattr(soft.py, f"soft_ce_{dt}")(x, one, T(1))
        np.testing.assert_array_equal(ln, l1)
        assert np.isfinite(loss).all() and np.isfinite(grad).all()
    # the binary kernel rejects a soft target (its labels are 0 or 1)
    assert _elementwise_c(soft, "binary_ce", dt, x, t, T(1))[0] == ELABEL


@pytest.mark.parametrize("dt", ["f32", "f64"])
def test_a_where_whose_other_branch_overflows_does_not_reach_the_result(soft, dt):
    """where(x < 0, log1p(e^x), x + log1p(e^-x)): e^x is inf for large x and e^-x for very negative x, in the
    branch not taken; both backends give softplus, finite everywhere."""
    T = DTYPES[dt][0]
    big = float(np.finfo(T).max)
    x = np.array([-big, -1e4, -800, -100, -1, 0, 1, 100, 800, 1e4, big], dtype=T)
    t = np.zeros_like(x)
    loss, _ = getattr(soft.py, f"split_softplus_{dt}")(x, t)
    rc, lc, _ = _elementwise_c(soft, "split_softplus", dt, x, t)
    assert rc == 0
    with mpmath.workdps(40):
        exact = np.array([float(mpmath.log1p(mpmath.exp(mpmath.mpf(float(v))))) for v in x])
    eps = float(np.finfo(T).eps)
    for got in (loss, lc):
        assert np.isfinite(got).all(), got
        np.testing.assert_allclose(got, exact.astype(T), rtol=4 * eps, atol=float(np.finfo(T).tiny))


# ---------------------------------------------------------------------------------------------
# softmax rows: reference by mpmath

def _rows(dt, rng):
    T = DTYPES[dt][0]
    x = rng.normal(size=(6, 5)) * 3
    x[0] = [1e3, 0, -2, 1, 999]  # dominated by 1e3
    x[1] = [-1e3, 1e3, 1e3 - 1e-3, 0, 5]
    x[2] = [40, -40, 0, 0, 0]
    x[3] = [0, 0, 0, 0, 0]
    return x.astype(T)


def _mp_logsoftmax(row):
    xs = [v if isinstance(v, mpmath.mpf) else mpmath.mpf(float(v)) for v in row]
    m = max(xs)
    lse = m + mpmath.log(mpmath.fsum(mpmath.exp(v - m) for v in xs))
    return [v - lse for v in xs]


def _mp_grad(f, row):
    """d f / d x_j by numerical differentiation of f at 60 digits."""
    xs = [mpmath.mpf(float(v)) for v in row]
    out = []
    for j in range(len(xs)):
        def fj(v, j=j):
            ys = list(xs)
            ys[j] = v
            return f(ys)

        out.append(float(mpmath.diff(fj, xs[j], h=mpmath.mpf(10) ** -25)))
    return out


def _rowwise_c(mod, kernel, dt, x, second, second_ct, *tail):
    T, ct = DTYPES[dt]
    fn = mod.c(kernel, dt)
    n, k = x.shape
    loss, grad = np.empty(n, dtype=T), np.empty_like(x)
    fn.argtypes = ([ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ct), ctypes.POINTER(second_ct)]
                   + [ct if not isinstance(a, int) else ctypes.c_int64 for a in tail] + [ctypes.POINTER(ct)] * 2)
    fn.restype = ctypes.c_int
    rc = fn(n, k, _ptr(x, ct), _ptr(second, second_ct), *tail, _ptr(loss, ct), _ptr(grad, ct))
    return rc, loss, grad


@pytest.mark.parametrize("dt", ["f32", "f64"])
@pytest.mark.parametrize("epsilon", [0.0, 0.1, 1.0])
def test_class_probs_match_the_definition_on_both_backends(shipped, dt, epsilon):
    mod = shipped["label_smoothing"]
    T, ct = DTYPES[dt]
    rng = np.random.default_rng(3)
    x = _rows(dt, rng)
    q = rng.random(x.shape)
    q[1] = [0, 1, 0, 0, 0]
    q[2] = [0.5, 0, 0.5, 0, 0]
    q /= q.sum(axis=1, keepdims=True)
    q = q.astype(T)
    loss, grad = getattr(mod.py, f"label_smoothed_ce_{dt}")(x, q, T(epsilon))
    rc, lc, gc = _rowwise_c(mod, "label_smoothed_ce", dt, x, q, ct, T(epsilon))
    assert rc == 0
    eps = float(np.finfo(T).eps)
    for got_l, got_g in ((loss, grad), (lc, gc)):
        assert np.isfinite(got_l).all() and np.isfinite(got_g).all()
    k = x.shape[1]
    with mpmath.workdps(60):
        for r in range(x.shape[0]):
            qs = [(1 - mpmath.mpf(float(epsilon))) * mpmath.mpf(float(v)) + mpmath.mpf(float(epsilon)) / k
                  for v in q[r]]

            def f(xs, qs=qs):
                m = max(xs)
                lse = m + mpmath.log(mpmath.fsum(mpmath.exp(v - m) for v in xs))
                return -mpmath.fsum(w * (v - lse) for w, v in zip(qs, xs))

            el = float(f([mpmath.mpf(float(v)) for v in x[r]]))
            eg = _mp_grad(f, x[r])
            # the loss: a sum of non-negative terms; the gradient p_j sum q' - q'_j: error relative to its terms
            scale = [float(p) + float(w) for p, w in zip([mpmath.exp(u) for u in _mp_logsoftmax(x[r])], qs)]
            for got_l, got_g in ((loss, grad), (lc, gc)):
                assert abs(got_l[r] - el) <= 16 * eps * abs(el) + 16 * eps, (dt, epsilon, r, got_l[r], el)
                for j in range(k):
                    assert abs(got_g[r, j] - eg[j]) <= 16 * eps * scale[j], (dt, epsilon, r, j, got_g[r, j], eg[j])
    np.testing.assert_allclose(lc, loss, rtol=16 * eps, atol=16 * eps)
    np.testing.assert_allclose(gc, grad, rtol=0, atol=32 * eps)


def test_class_probs_match_torch_cross_entropy_with_label_smoothing(shipped):
    torch = pytest.importorskip("torch")
    mod = shipped["label_smoothing"]
    rng = np.random.default_rng(5)
    x = _rows("f64", rng)
    q = rng.random(x.shape)
    q /= q.sum(axis=1, keepdims=True)
    for epsilon in (0.0, 0.1, 0.6):
        xt = torch.tensor(x, requires_grad=True)
        ref = torch.nn.functional.cross_entropy(xt, torch.tensor(q), label_smoothing=epsilon, reduction="none")
        ref.sum().backward()
        for loss, grad in (mod.py.label_smoothed_ce_f64(x, q, epsilon),
                           _rowwise_c(mod, "label_smoothed_ce", "f64", x, q, ctypes.c_double, epsilon)[1:]):
            np.testing.assert_allclose(loss, ref.detach().numpy(), rtol=1e-13, atol=1e-13)
            np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("dt", ["f32", "f64"])
def test_class_probs_outside_the_unit_interval_are_rejected(shipped, dt):
    mod = shipped["label_smoothing"]
    T, ct = DTYPES[dt]
    x = np.zeros((4, 3), dtype=T)
    for bad in (-0.1, 1.5, np.nan):
        q = np.full((4, 3), 1 / 3, dtype=T)
        q[2, 1] = bad
        rc, loss, grad = _rowwise_c(mod, "label_smoothed_ce", dt, x, q, ct, T(0.1))
        assert rc == ELABEL, bad
        fb = getattr(mod.lib, f"derive_label_smoothing_first_bad_target_{dt}")
        fb.argtypes, fb.restype = [ctypes.c_size_t, ctypes.POINTER(ct)], ctypes.c_size_t
        assert fb(q.size, _ptr(q, ct)) == 7


@pytest.mark.parametrize("dt", ["f32", "f64"])
@pytest.mark.parametrize("epsilon", [1.0, -1.0, 4.0])
def test_poly1_matches_the_papers_definition_on_both_backends(shipped, dt, epsilon):
    mod = shipped["poly1"]
    T, ct = DTYPES[dt]
    rng = np.random.default_rng(7)
    x = _rows(dt, rng)
    target = np.array([0, 2, 1, 3, -100, 4], dtype=np.int64)
    loss, grad = getattr(mod.py, f"poly1_softmax_{dt}")(x, target, T(epsilon), -100)
    rc, lc, gc = _rowwise_c(mod, "poly1_softmax", dt, x, target, ctypes.c_int64, T(epsilon), -100)
    assert rc == 0
    eps = float(np.finfo(T).eps)
    with mpmath.workdps(60):
        for r in range(x.shape[0]):
            if target[r] == -100:
                for got_l, got_g in ((loss, grad), (lc, gc)):
                    assert got_l[r] == 0 and not got_g[r].any()
                continue

            def f(xs, tr=int(target[r])):
                pt = mpmath.exp(_mp_logsoftmax(xs)[tr])
                return -mpmath.log(pt) + epsilon * (1 - pt)

            el = float(f([mpmath.mpf(float(v)) for v in x[r]]))
            eg = _mp_grad(f, x[r])
            p = [float(mpmath.exp(u)) for u in _mp_logsoftmax(x[r])]
            coef = 1 + abs(epsilon)
            for got_l, got_g in ((loss, grad), (lc, gc)):
                assert np.isfinite(got_l[r]) and np.isfinite(got_g[r]).all()
                assert abs(got_l[r] - el) <= 16 * eps * (abs(el) + abs(epsilon)), (dt, r, got_l[r], el)
                for j in range(x.shape[1]):
                    assert abs(got_g[r, j] - eg[j]) <= 16 * eps * coef * (p[j] + (j == target[r])), \
                        (dt, r, j, got_g[r, j], eg[j])


def test_poly1_matches_torch(shipped):
    torch = pytest.importorskip("torch")
    mod = shipped["poly1"]
    x = _rows("f64", np.random.default_rng(11))
    target = np.array([0, 2, 1, 3, 4, 1], dtype=np.int64)
    xt = torch.tensor(x, requires_grad=True)
    ce = torch.nn.functional.cross_entropy(xt, torch.tensor(target), reduction="none")
    ref = ce + 1.0 * (1 - torch.exp(-ce))  # Leng et al.'s reference implementation: ce + epsilon*(1 - p_t)
    ref.sum().backward()
    loss, grad = mod.py.poly1_softmax_f64(x, target, 1.0, -100)
    np.testing.assert_allclose(loss, ref.detach().numpy(), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=0, atol=1e-14)


def test_the_new_layouts_come_from_the_declarations():
    """The generated tables say which layout and target each shipped kernel has, from its [[kernel]] table."""
    from derive.codegen.kernels import shipped_kernels

    decls = {k.name: k for k in shipped_kernels()}
    for module in ("poly1", "label_smoothing"):
        spec = importlib.util.spec_from_file_location(f"test_layouts_table_{module}", GENERATED / f"{module}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        for name, row in mod.KERNELS.items():
            d = decls[name]
            assert (row["kind"], row["target"], row["conditioned"]) == (d.kind, d.target, d.conditioned)
            assert d.module == module
    assert decls["label_smoothed_ce"].kind == "rowprobs" and decls["label_smoothed_ce"].conditioned
    assert decls["poly1_softmax"].kind == "rowwise"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
