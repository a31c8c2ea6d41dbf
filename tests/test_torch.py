"""derive.torch: the kernels as torch.library custom ops, with autograd, double backward and torch.compile.

References are computed, never written down: torchvision's sigmoid_focal_loss formula (as its
source defines it, below), F.cross_entropy and F.binary_cross_entropy_with_logits in float64,
a naive softmax focal formula, mpmath derivatives at saturated logits, torch's own finite
differences (gradcheck, gradgradcheck), and derive's NumPy API on the same inputs.
"""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import derive  # noqa: E402
from derive.codegen.kernels import shipped_kernels  # noqa: E402
from derive.runtime import cbuild  # noqa: E402


def _has_compiler():
    try:
        cbuild.find_compiler()
        return True
    except cbuild.BuildError:
        return False


pytestmark = pytest.mark.skipif(not _has_compiler(), reason="derive.torch runs the generated C kernels: no compiler")

dt = pytest.importorskip("derive.torch")
KERNELS = shipped_kernels()


def tv_sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """torchvision.ops.sigmoid_focal_loss, as torchvision's source defines it."""
    p = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss


def naive_softmax_focal(x, t, gamma):
    """-(1 - p_t)^gamma log p_t per row with p = softmax(x), written out."""
    p = torch.softmax(x, dim=1)
    pt = p.gather(1, t.unsqueeze(1)).squeeze(1)
    return -((1 - pt) ** gamma) * torch.log(pt)


# ------------------------------------------------------------------------------------------
# samples for every shipped kernel, from its declaration (no list of names)


def _param_value(decl, ops, name):
    if name in decl.defaults:
        return float(decl.defaults[name])
    lo, _, hi, _ = ops.info["domains"][name]
    if lo is not None and hi is not None:
        return (lo + hi) / 2
    return lo + 1.0 if lo is not None else (hi - 1.0 if hi is not None else 0.5)


def _sample(decl, dtype=torch.float64, scale=3.0, seed=0):
    """(ops, x, targets, alpha_vec, params, ignore_index) for one kernel: logits of the layout,
    targets of its kind (binary labels; soft ones for a soft kernel; class indices with one
    ignored row; class probabilities)."""
    ops = dt.kernels.ops(decl.name)
    g = torch.Generator().manual_seed(seed)
    params = tuple(_param_value(decl, ops, p) for p in ops.params)
    alpha_vec, ii = None, None
    if ops.layout == "elementwise":
        x = torch.randn(3, 4, generator=g, dtype=dtype) * scale
        u = torch.rand(3, 4, generator=g, dtype=dtype)
        t = u if ops.info["target"] == "soft" else (u > 0.5).to(dtype)
    elif ops.layout == "class_probs":
        x = torch.randn(5, 4, generator=g, dtype=dtype) * scale
        t = torch.softmax(torch.randn(5, 4, generator=g, dtype=dtype), dim=1)
    else:
        x = torch.randn(5, 4, generator=g, dtype=dtype) * scale
        t = torch.randint(0, 4, (5,), generator=g)
        ii = -100
        t[1] = ii
        if ops.class_alpha:
            alpha_vec = torch.tensor([0.25, 1.0, 0.5, 0.75], dtype=dtype)
    return ops, x, t, alpha_vec, params, ii


def _op_args(ops, x, t, alpha_vec, params, ii):
    if ops.layout == "class_index":
        return (x, t, *((alpha_vec,) if ops.class_alpha else ()), *params, ii)
    return (x, t, *params)


def _kernel_args(decl, ops, params, alpha_vec):
    """The keyword arguments of derive.torch.kernels.<kernel> and derive.kernels.<kernel>."""
    kw = dict(zip(ops.params, params))
    if ops.class_alpha:
        kw["alpha"] = alpha_vec
    return kw


@pytest.mark.parametrize("decl", KERNELS, ids=[k.name for k in KERNELS])
def test_opcheck_every_op(decl):
    """torch.library.opcheck (schema, autograd registration, fake tensors, AOT dispatch with dynamic
    shapes, forward and backward) on the loss op and on its second-derivative op."""
    ops, x, t, alpha_vec, params, ii = _sample(decl)
    args = _op_args(ops, x.requires_grad_(), t, alpha_vec, params, ii)
    torch.library.opcheck(ops.op, args)
    # the eager path (autograd.Function over the same implementation) gives the op's values and gradients
    xa, xb = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    la, ga = ops.apply(*_op_args(ops, xa, t, alpha_vec, params, ii))
    lb, gb = ops.op(*_op_args(ops, xb, t, alpha_vec, params, ii))
    assert type(la.grad_fn) is not type(lb.grad_fn)  # two paths, not one
    assert torch.equal(la, lb) and torch.equal(ga, gb)
    la.sum().backward()
    lb.sum().backward()
    assert torch.equal(xa.grad, xb.grad)
    if ops.op2 is None:  # no second derivative declared: double backward refused, not a wrong answer
        assert ops.info["second"] is None
        return
    if ops.layout == "elementwise":
        torch.library.opcheck(ops.op2, (x.detach(), t, *params))  # d hess/dx would be a third derivative
    else:
        v = torch.randn(x.shape, dtype=x.dtype).requires_grad_()
        torch.library.opcheck(ops.op2, (*_op_args(ops, x.detach(), t, alpha_vec, params, ii), v))


@pytest.mark.parametrize("decl", KERNELS, ids=[k.name for k in KERNELS])
def test_every_kernel_matches_numpy_api_and_gradchecks(decl):
    """derive.torch.kernels.<kernel> gives what derive.kernels.<kernel> (the NumPy API, C backend)
    gives, bit for bit (the same C code), loss and autograd gradient; gradcheck and gradgradcheck
    pass in float64 (finite differences of the loss and of the fused gradient)."""
    ops, x, t, alpha_vec, params, ii = _sample(decl)
    kw = _kernel_args(decl, ops, params, alpha_vec)
    if ii is not None:
        kw["ignore_index"] = ii
    fn = getattr(dt.kernels, decl.name)
    xg = x.clone().requires_grad_()
    loss = fn(xg, t, **kw)
    loss.sum().backward()
    np_kw = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref_loss, ref_grad = getattr(derive.kernels, decl.name)(x.numpy(), t.numpy(), **np_kw, backend="c",
                                                            return_grad=True)
    assert torch.equal(loss.detach(), torch.from_numpy(np.asarray(ref_loss)))
    assert torch.equal(xg.grad, torch.from_numpy(ref_grad))
    assert torch.autograd.gradcheck(lambda z: fn(z, t, **kw), (x.clone().requires_grad_(),))
    if ops.op2 is None:  # no second derivative declared (the [[kernel]] table names none): refused
        z = x.clone().requires_grad_()
        with pytest.raises(dt.ThirdDerivativeError, match="declares no second derivative"):
            torch.autograd.grad(fn(z, t, **kw).sum(), z, create_graph=True)
        return
    assert torch.autograd.gradgradcheck(lambda z: fn(z, t, **kw), (x.clone().requires_grad_(),))


def test_requires_grad_inputs_work():
    """The NumPy API cannot take a tensor that requires grad (torch refuses .numpy()); derive.torch
    takes it and its gradient is the fused one of the NumPy API."""
    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    t = (torch.rand(64) > 0.5).double()
    with pytest.raises(RuntimeError, match="requires grad"):
        derive.sigmoid_focal_loss(x, t)
    dt.sigmoid_focal_loss(x, t, reduction="sum").backward()
    _, grad = derive.sigmoid_focal_loss(x.detach().numpy(), t.numpy(), alpha=0.25, gamma=2.0, reduction="sum",
                                        return_grad=True, backend="c")
    assert torch.equal(x.grad, torch.from_numpy(grad))


# ------------------------------------------------------------------------------------------
# saturated logits: where the written-out formulas give NaN


def _mp_sigmoid_focal(alpha, gamma, y):
    import mpmath

    def f(x):
        p = 1 / (1 + mpmath.exp(-x))
        pt = p if y == 1 else 1 - p
        a = alpha if y == 1 else 1 - alpha
        return -a * (1 - pt) ** gamma * mpmath.log(pt)
    return f


def test_saturated_sigmoid_focal_gradients_are_finite_and_exact():
    """x_t = 20 and 40 with gamma = 0.5: torchvision's formula gives a NaN gradient (float64 at
    x_t = 40, float32 at x_t = 20: 1 - p_t rounds to 0 and (1 - p_t)^(gamma - 1) is inf); derive's
    gradient and second derivative are those of mpmath (50 digits) within 1e-13 relative, and
    gradcheck/gradgradcheck pass at ordinary and saturated logits."""
    import mpmath

    x = torch.tensor([20.0, -40.0, 40.0, -20.0, 0.7, -1.3], dtype=torch.float64)
    t = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64)  # x_t = 20, 40, 40, 20, 0.7, 1.3
    alpha, gamma = 0.25, 0.5
    xr = x.clone().requires_grad_()
    tv_sigmoid_focal_loss(xr, t, alpha, gamma).sum().backward()
    assert torch.isnan(xr.grad[1:3]).all(), xr.grad  # x_t = 40 in float64
    x32 = x.float().requires_grad_()
    tv_sigmoid_focal_loss(x32, t.float(), alpha, gamma).sum().backward()
    assert torch.isnan(x32.grad[0]) and torch.isnan(x32.grad[3]), x32.grad  # x_t = 20 in float32

    xd = x.clone().requires_grad_()
    loss = dt.sigmoid_focal_loss(xd, t, alpha, gamma)
    (grad,) = torch.autograd.grad(loss.sum(), xd, create_graph=True)
    (hess,) = torch.autograd.grad(grad.sum(), xd)  # elementwise: the diagonal
    mpmath.mp.dps = 50
    for i in range(len(x)):
        f = _mp_sigmoid_focal(mpmath.mpf(alpha), mpmath.mpf(gamma), int(t[i]))
        xi = mpmath.mpf(float(x[i]))
        for got, order in ((loss[i].item(), 0), (grad[i].item(), 1), (hess[i].item(), 2)):
            want = mpmath.diff(f, xi, order) if order else f(xi)
            assert np.isfinite(got)
            assert abs(mpmath.mpf(float(got)) - want) <= 1e-13 * abs(want), (i, order, float(got), want)
    for f32 in (False, True):  # the float32 gradient is finite there too
        xs = (x.float() if f32 else x).clone().requires_grad_()
        dt.sigmoid_focal_loss(xs, t.to(xs.dtype), alpha, gamma).sum().backward()
        assert torch.isfinite(xs.grad).all()
    fn = lambda z: dt.sigmoid_focal_loss(z, t, alpha, gamma)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(),))
    assert torch.autograd.gradgradcheck(fn, (x.clone().requires_grad_(),))


def test_saturated_softmax_focal_gradients_are_finite_and_exact():
    """Rows with x_t - x_k = 20 and 40, gamma = 0.5: the written-out formula's gradient is NaN at 40
    (float64); derive's gradient (autograd) and HVP (double backward) agree with mpmath, and
    gradcheck/gradgradcheck pass."""
    import mpmath

    x = torch.tensor([[20.0, 0.0, 0.0], [0.0, 40.0, 0.0], [0.3, -1.0, 2.0]], dtype=torch.float64)
    t = torch.tensor([0, 1, 2])
    gamma = 0.5
    xr = x.clone().requires_grad_()
    naive_softmax_focal(xr, t, gamma).sum().backward()
    assert torch.isnan(xr.grad[1]).all(), xr.grad
    xd = x.clone().requires_grad_()
    loss = dt.softmax_focal_loss(xd, t, gamma=gamma, reduction="sum")
    (grad,) = torch.autograd.grad(loss, xd, create_graph=True)
    v = torch.tensor([[1.0, -2.0, 0.5]] * 3, dtype=torch.float64)
    (hvp,) = torch.autograd.grad(grad, xd, v)
    grad = grad.detach()
    mpmath.mp.dps = 50

    def row_loss(r, *z):
        s = sum(mpmath.exp(zk) for zk in z)
        pt = mpmath.exp(z[int(t[r])]) / s
        return -(1 - pt) ** mpmath.mpf(gamma) * mpmath.log(pt)

    for r in range(3):
        z = [mpmath.mpf(float(v_)) for v_ in x[r]]
        f = lambda *a: row_loss(r, *a)  # noqa: E731
        for j in range(3):
            order = [0, 0, 0]
            order[j] = 1
            want = mpmath.diff(f, z, tuple(order))
            assert abs(mpmath.mpf(float(grad[r, j])) - want) <= 1e-13 * abs(want), (r, j, float(grad[r, j]), want)
            hv, scale = mpmath.mpf(0), mpmath.mpf(0)
            for k in range(3):
                o = [0, 0, 0]
                o[j] += 1
                o[k] += 1
                term = mpmath.diff(f, z, tuple(o)) * mpmath.mpf(float(v[r, k]))
                hv, scale = hv + term, scale + abs(term)
            assert abs(mpmath.mpf(float(hvp[r, j])) - hv) <= 1e-12 * scale, (r, j, float(hvp[r, j]), hv)
    fn = lambda z: dt.softmax_focal_loss(z, t, gamma=gamma, reduction="none")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(),))
    assert torch.autograd.gradgradcheck(fn, (x.clone().requires_grad_(),))


def test_hvp_and_hessian_equal_the_formulas_double_backward():
    """torch.autograd.functional.hvp and .hessian through derive's ops equal those of the written-out
    formulas (torch's own double backward) at moderate logits, float64; third order raises."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64) * 2
    t = torch.randint(0, 5, (4,), generator=g)
    v = torch.randn(4, 5, generator=g, dtype=torch.float64)
    for gamma in (0.0, 0.5, 2.0):
        ours = torch.autograd.functional.hvp(lambda z: dt.softmax_focal_loss(z, t, gamma=gamma, reduction="sum"), x, v)[1]
        ref = torch.autograd.functional.hvp(lambda z: naive_softmax_focal(z, t, gamma).sum(), x, v)[1]
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    xs, ts = x.reshape(-1), (torch.rand(20, generator=g, dtype=torch.float64) > 0.5).double()
    h = torch.autograd.functional.hessian(lambda z: dt.sigmoid_focal_loss(z, ts, reduction="sum"), xs)
    href = torch.autograd.functional.hessian(lambda z: tv_sigmoid_focal_loss(z, ts, reduction="sum"), xs)
    torch.testing.assert_close(h, href, rtol=1e-10, atol=1e-12)
    h = torch.autograd.functional.hessian(lambda z: dt.cross_entropy(z, t, reduction="sum"), x)
    href = torch.autograd.functional.hessian(lambda z: F.cross_entropy(z, t, reduction="sum"), x)
    torch.testing.assert_close(h, href, rtol=1e-10, atol=1e-12)
    for fn, z in ((lambda z: dt.cross_entropy(z, t), x), (lambda z: dt.sigmoid_focal_loss(z, ts).sum(), xs)):
        z = z.clone().requires_grad_()
        (gz,) = torch.autograd.grad(fn(z), z, create_graph=True)
        (hz,) = torch.autograd.grad(gz.sum(), z, create_graph=True)
        with pytest.raises(dt.ThirdDerivativeError, match="third derivatives"):
            torch.autograd.grad(hz.sum(), z)


# ------------------------------------------------------------------------------------------
# accuracy against the float64 references, each in its own float32 error


BOUND32 = 2e-6  # the float32 kernels' relative error bound at ordinary inputs (derive accuracy)


def _rel(a, ref, floor=1e-30):
    return ((a.double() - ref).abs() / ref.abs().clamp_min(floor)).max().item()


def _check_against(ours32, theirs32, ref64, bound=BOUND32):
    """Ours within the kernels' bound of the float64 reference, and within the reference
    implementation's own float32 error (plus ours) of its float32 result."""
    assert _rel(ours32, ref64) <= bound, _rel(ours32, ref64)
    theirs_err = (theirs32.double() - ref64).abs()
    assert ((ours32.double() - theirs32.double()).abs() <= theirs_err + bound * ref64.abs() + 1e-38).all()


def test_sigmoid_focal_matches_torchvision_within_float32_error():
    g = torch.Generator().manual_seed(1)
    x64 = torch.cat([torch.linspace(-12, 12, 241, dtype=torch.float64), torch.randn(200, generator=g, dtype=torch.float64)])
    for soft in (False, True):
        u = torch.rand(x64.shape, generator=g, dtype=torch.float64)
        t64 = u if soft else (u > 0.5).double()
        t64, t32 = t64.float().double(), t64.float()  # the same targets in both precisions
        x32 = x64.float()
        x64 = x32.double()
        for alpha, gamma in ((0.25, 2.0), (-1.0, 0.5), (0.5, 0.0)):
            refx = x64.clone().requires_grad_()
            ref = tv_sigmoid_focal_loss(refx, t64, alpha, gamma)
            ref.sum().backward()
            ox = x32.clone().requires_grad_()
            ours = dt.sigmoid_focal_loss(ox, t32, alpha, gamma)
            ours.sum().backward()
            tx = x32.clone().requires_grad_()
            theirs = tv_sigmoid_focal_loss(tx, t32, alpha, gamma)
            theirs.sum().backward()
            assert ours.dtype == torch.float32
            _check_against(ours.detach(), theirs.detach(), ref.detach())
            if not soft:  # the binary kernels' gradient: the plain relative bound
                _check_against(ox.grad, tx.grad, refx.grad)
            else:  # conditioned (the gradient vanishes at sigmoid(x) = t): absolute, on O(1) gradients
                assert (ox.grad.double() - refx.grad).abs().max() <= 4 * BOUND32
    xb = torch.randn(8, 3, dtype=torch.float64)
    tb = torch.rand(8, 3, dtype=torch.float64)
    w = torch.rand(3, dtype=torch.float64)
    for red in ("none", "sum", "mean"):
        torch.testing.assert_close(dt.binary_cross_entropy_with_logits(xb, tb, w, red),
                                   F.binary_cross_entropy_with_logits(xb, tb, w, reduction=red), rtol=1e-14, atol=0)


def test_cross_entropy_matches_torch_within_float32_error():
    """Class indices (plain, weighted with weights above 1 and a zero weight, label smoothing),
    class probabilities, (N, K, d1) logits, each reduction: float32 against torch's float64."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 5, 3, generator=g) * 4
    t = torch.randint(0, 5, (7, 3), generator=g)
    t[0, 0] = t[3, 2] = -100
    q = torch.softmax(torch.randn(7, 5, 3, generator=g), dim=1)
    w = torch.tensor([1.0, 2.5, 0.0, 0.3, 4.0])
    cases = [dict(), dict(weight=w), dict(label_smoothing=0.2), dict(target=q), dict(target=q, label_smoothing=0.1)]
    for case in cases:
        case = dict(case)
        tgt = case.pop("target", t)
        for red in ("none", "sum", "mean"):
            kw = dict(case, reduction=red)
            ref_kw = dict(kw, weight=w.double()) if "weight" in kw else kw
            xr = x.double().requires_grad_()
            ref = F.cross_entropy(xr, tgt.double() if tgt.is_floating_point() else tgt, **ref_kw)
            ref.sum().backward()
            xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
            ours = dt.cross_entropy(xo, tgt, **kw)
            theirs = F.cross_entropy(xt, tgt, **kw)
            ours.sum().backward()
            theirs.sum().backward()
            assert ours.shape == theirs.shape and ours.dtype == torch.float32
            bound = 8 * BOUND32 if red != "none" else BOUND32  # float32 sums
            keep = ref.detach().abs() > 0  # ignored rows and zero weights: both exactly 0
            assert (ours.detach()[~keep] == 0).all()
            _check_against(ours.detach()[keep], theirs.detach()[keep], ref.detach()[keep], bound)
            assert (xo.grad.double() - xr.grad).abs().max() <= 8 * BOUND32 * xr.grad.abs().max(), (case, red)


def test_mean_over_only_ignored_rows_is_zero_not_nan():
    """torch's mean over no rows is NaN (0/0); derive's is 0 with gradient 0 (documented)."""
    x = torch.randn(3, 4, requires_grad=True)
    t = torch.full((3,), -100)
    assert torch.isnan(F.cross_entropy(x, t))
    for loss in (dt.cross_entropy(x, t), dt.cross_entropy(x, t, weight=torch.ones(4)),
                 dt.softmax_focal_loss(x, t), dt.cross_entropy(x, t, label_smoothing=0.1)):
        assert loss.item() == 0
        (gx,) = torch.autograd.grad(loss, x)
        assert (gx == 0).all()


@pytest.mark.parametrize("dtype,unit", [(torch.float16, 2.0 ** -11), (torch.bfloat16, 2.0 ** -8)])
def test_half_precision_within_the_stated_bound(dtype, unit):
    """float16/bfloat16 are computed in float32 and rounded once: relative error at most the unit
    roundoff plus the float32 kernel's 2e-6 (float16 below its normal range: 2^-25 absolute)."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(300, generator=g) * 4).to(dtype)
    t = (torch.rand(300, generator=g) > 0.5).to(dtype)
    tiny = 2.0 ** -25 if dtype == torch.float16 else 1e-38
    xh = x.clone().requires_grad_()
    loss = dt.sigmoid_focal_loss(xh, t)
    loss.sum().backward()
    assert loss.dtype == dtype and xh.grad.dtype == dtype
    xr = x.double().requires_grad_()
    ref = tv_sigmoid_focal_loss(xr, t.double())
    ref.sum().backward()
    bound = unit + BOUND32
    assert ((loss.double() - ref).abs() <= bound * ref.abs() + tiny).all()
    assert ((xh.grad.double() - xr.grad).abs() <= bound * xr.grad.abs() + tiny).all()
    xs = (torch.randn(6, 4, generator=g) * 3).to(dtype)
    ts = torch.randint(0, 4, (6,), generator=g)
    ce = dt.cross_entropy(xs, ts, reduction="none")
    ref = F.cross_entropy(xs.double(), ts, reduction="none")
    assert ce.dtype == dtype and ((ce.double() - ref).abs() <= bound * ref.abs() + tiny).all()


# ------------------------------------------------------------------------------------------
# torch.compile, training, layouts, errors


def test_torch_compile_fullgraph_gives_the_eager_results():
    """One small model using every drop-in (functions and modules) compiles with fullgraph=True (a
    graph break raises) and gives the eager loss and parameter gradients."""
    torch.manual_seed(0)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 4)
            self.ce = dt.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 3.0]))
            self.sfl = dt.SoftmaxFocalLoss(alpha=[0.25, 0.5, 1.0, 0.75], gamma=0.5)
            self.bce = dt.BCEWithLogitsLoss()
            self.sig = dt.SigmoidFocalLoss(reduction="mean")

        def forward(self, x, t, tb, q):
            z = self.lin(x)
            return (self.ce(z, t) + self.sfl(z, t) + self.bce(z, tb) + self.sig(z, tb)
                    + dt.sigmoid_focal_loss(z, q, reduction="sum") + dt.softmax_focal_loss(z, t)
                    + dt.cross_entropy(z, t, label_smoothing=0.1) + dt.cross_entropy(z, q)
                    + dt.binary_cross_entropy_with_logits(z, q) + dt.kernels.poly1_softmax(z, t).mean())

    m = Model()
    x, t = torch.randn(8, 6), torch.randint(0, 4, (8,))
    tb, q = (torch.rand(8, 4) > 0.5).float(), torch.softmax(torch.randn(8, 4), dim=1)
    eager = m(x, t, tb, q)
    eager.backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    compiled = torch.compile(m, fullgraph=True)(x, t, tb, q)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    for p, ge in zip(m.parameters(), grads):
        torch.testing.assert_close(p.grad, ge, rtol=1e-5, atol=1e-6)


def test_training_loop_decreases_the_loss():
    """50 SGD steps of a small classifier with derive's losses: the loss falls."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(256, 10, generator=g)
    labels = (x @ torch.randn(10, 3, generator=g)).argmax(1)
    for loss_fn in (dt.SoftmaxFocalLoss(gamma=2.0), dt.CrossEntropyLoss(label_smoothing=0.05),
                    lambda z, y: dt.sigmoid_focal_loss(z, F.one_hot(y, 3).float(), reduction="mean")):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        history = []
        for _ in range(50):
            opt.zero_grad()
            loss = loss_fn(model(x), labels)
            loss.backward()
            opt.step()
            history.append(loss.item())
        assert all(np.isfinite(history))
        assert history[-1] < 0.7 * history[0] and max(history[-10:]) < min(history[:10]), history


def test_layouts_noncontiguous_and_meta_tensors():
    """(N, K, d1, d2) and (K,) logits as F.cross_entropy takes them; a non-contiguous input gives
    the contiguous one's result; meta tensors get shapes and dtypes from register_fake."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    t = torch.randint(0, 4, (2, 3, 5), generator=g)
    torch.testing.assert_close(dt.softmax_focal_loss(x, t, gamma=0.0, reduction="none"),
                               F.cross_entropy(x, t, reduction="none"), rtol=1e-14, atol=0)
    torch.testing.assert_close(dt.cross_entropy(x[0, :, 0, 0], t[0, 0, 0]), F.cross_entropy(x[0, :, 0, 0], t[0, 0, 0]))
    xt = torch.randn(5, 7, generator=g, dtype=torch.float64).t()  # not contiguous
    tt = (torch.rand(7, 5, generator=g) > 0.5).double()
    assert not xt.is_contiguous()
    assert torch.equal(dt.sigmoid_focal_loss(xt, tt), dt.sigmoid_focal_loss(xt.contiguous(), tt))
    m = dt.sigmoid_focal_loss(torch.empty(3, 2, device="meta"), torch.empty(3, 2, device="meta"))
    assert m.device.type == "meta" and m.shape == (3, 2) and m.dtype == torch.float32
    m = dt.cross_entropy(torch.empty(3, 4, 2, device="meta", dtype=torch.float64),
                         torch.empty(3, 2, device="meta", dtype=torch.int64), reduction="none")
    assert m.shape == (3, 2) and m.dtype == torch.float64


def test_errors_name_the_argument():
    x = torch.randn(4, 3)
    t = torch.tensor([0, 1, 2, 1])
    with pytest.raises(ValueError, match=r"target must hold class indices in \[0, 3\).*found 3"):
        dt.cross_entropy(x, torch.tensor([0, 1, 3, 1]))
    with pytest.raises(ValueError, match=r"targets must hold values in \[0, 1\].*1\.5"):
        dt.sigmoid_focal_loss(x, torch.full((4, 3), 1.5))
    with pytest.raises(ValueError, match="soft targets are not defined"):
        dt.kernels.focal_star(x, torch.full((4, 3), 0.5))
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        dt.sigmoid_focal_loss(x, torch.zeros(4, 3), gamma=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        dt.cross_entropy(x, t, reduction="avg")
    with pytest.raises(TypeError, match="input must be float32, float64, float16 or bfloat16"):
        dt.cross_entropy(x.long(), t)
    with pytest.raises(ValueError, match="does not differentiate with respect to targets"):
        dt.sigmoid_focal_loss(x, torch.rand(4, 3, requires_grad=True))
    with pytest.raises(ValueError, match=r"per-class weights \(alpha\) must be in \[0, 1\]"):
        dt.softmax_focal_loss(x, t, alpha=torch.tensor([0.5, 2.0, 0.5]))
    with pytest.raises(ValueError, match="cross_entropy's weight must be >= 0|must be in"):
        dt.cross_entropy(x, t, weight=torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="pos_weight is not supported"):
        dt.binary_cross_entropy_with_logits(x, torch.zeros(4, 3), pos_weight=torch.ones(3))


def test_a_users_file_gets_its_own_ops(tmp_path, monkeypatch):
    """derive.torch.load(FILE): the file verified and generated as by derive.load, its ops named by
    its source digest (no clash with the shipped module it copies), loading it again reuses them;
    the results are the shipped kernel's, double backward included."""
    monkeypatch.setenv("DERIVE_CACHE_DIR", str(tmp_path / "cache"))
    src = next(k.path for k in KERNELS if k.name == "poly1_softmax")
    path = tmp_path / "my_poly.toml"
    shutil.copy(src, path)
    path.write_text(path.read_text().replace('module = "poly1"', 'module = "my_poly"'))
    mine = dt.load(path)
    again = dt.load(path)
    ops = mine.ops("poly1_softmax")
    assert ops.qualname.startswith("derive::u") and "my_poly" in ops.qualname
    assert again.ops("poly1_softmax") is ops
    assert ops.qualname != dt.kernels.ops("poly1_softmax").qualname
    x = torch.randn(6, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 3, -100, 1])
    assert torch.equal(mine.poly1_softmax(x, t, epsilon=0.5), dt.kernels.poly1_softmax(x, t, epsilon=0.5))
    assert torch.autograd.gradgradcheck(lambda z: mine.poly1_softmax(z, t), (x.clone().requires_grad_(),))


# ------------------------------------------------------------------------------------------
# the reduced ops: the loss summed in the kernel's pass, the gradient pre-scaled

REDUCED = [k for k in KERNELS if dt.kernels.ops(k.name).red is not None]


def _modes(ops):
    return (0, 1, 2) if (ops.layout == "class_index" and ops.class_alpha) else (0, 1)


def _factor(ops, x, t, alpha_vec, params, ii, mode):
    """The reduced gradient's factor, computed here in float64 from the definition of each mode."""
    if mode == 0:
        return 1.0
    if ops.layout == "elementwise":
        return 1.0 / x.numel()
    valid = t != ii
    if mode == 1:
        den = float(valid.sum())
    else:
        w = alpha_vec.double() if alpha_vec is not None else torch.full((x.shape[1],), params[0], dtype=torch.float64)
        den = float(sum(w[int(c)] for c in t[valid]))
    return 1.0 / den if den > 0 else 0.0


def _saturated(x, ops):
    """A few saturated logits among the sample's (x_t = 20 and 40 where the layout allows it)."""
    x = x.clone()
    x.view(-1)[0] = 40.0
    x.view(-1)[-1] = -20.0
    return x


@pytest.mark.parametrize("decl", REDUCED, ids=[k.name for k in REDUCED])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reduced_op_equals_the_per_element_op(decl, dtype):
    """For every mode (sum, mean, the alpha-weighted mean): the reduced op's gradient is the
    per-element op's gradient times the mode's factor, bit for bit (the same block code, one
    rounding of the product); its loss is the float64 sum of the per-element losses times the
    factor, within one rounding to the dtype; the custom op and the eager path agree; opcheck
    passes on the reduced op (float64, its last mode)."""
    ops, x, t, alpha_vec, params, ii = _sample(decl, dtype=dtype)
    x = _saturated(x, ops)
    args = _op_args(ops, x, t, alpha_vec, params, ii)
    per_loss, per_grad = ops.op(*args)
    ref_sum = math.fsum(per_loss.double().reshape(-1).tolist())
    eps = torch.finfo(dtype).eps
    for mode in _modes(ops):
        f = _factor(ops, x, t, alpha_vec, params, ii, mode)
        loss, grad = ops.red(*args, mode)
        assert loss.shape == () and loss.dtype == dtype and grad.shape == x.shape
        assert torch.equal(grad, per_grad * torch.tensor(f, dtype=torch.float64).to(dtype))
        assert abs(loss.item() - ref_sum * f) <= eps * abs(ref_sum * f) + 1e-300
        xa = x.clone().requires_grad_()
        la = ops.reduced(*_op_args(ops, xa, t, alpha_vec, params, ii), mode)
        la.backward()
        assert torch.equal(la.detach(), loss) and torch.equal(xa.grad, grad)
        assert torch.equal(ops.reduced(*args, mode), loss)  # no grad wanted: the sum alone, the same
    if dtype == torch.float64:  # opcheck once per kernel (it runs several checks of its own), the last mode
        torch.library.opcheck(ops.red, (*_op_args(ops, x.clone().requires_grad_(), t, alpha_vec, params, ii), mode))
    with pytest.raises(ValueError, match="mode must be"):
        ops.red(*args, 7)


def test_reduced_gradcheck_and_gradgradcheck_in_float64():
    """gradcheck and gradgradcheck (finite differences) of the drop-ins with reduction sum and
    mean (the eager path) and of the reduced custom ops themselves (the registered autograd that
    torch.compile traces), at ordinary and saturated logits (x_t = 20 and 40, gamma = 0.5)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64) * 3
    x[0, 0], x[1, 1] = 20.0, -40.0
    tb = (torch.rand(3, 5, generator=g) > 0.5).double()
    tb[0, 0], tb[1, 1] = 1.0, 0.0  # x_t = 20 and 40
    tc = torch.tensor([0, -100, 3])
    w = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=torch.float64)
    a5 = torch.tensor([0.25, 0.5, 1.0, 0.75, 0.1], dtype=torch.float64)
    sig, soft, ce = (dt.kernels.ops(k) for k in ("sigmoid_focal_alpha", "softmax_focal", "softmax_ce"))
    cases = [
        lambda z: sig.red(z, tb, 0.25, 0.5, 0)[0],
        lambda z: sig.red(z, tb, -1.0, 0.5, 1)[0],
        lambda z: soft.red(z, tc, a5, 1.0, 0.5, -100, 2)[0],
        lambda z: ce.red(z, tc, -100, 1)[0],
    ]
    for red in ("sum", "mean"):
        cases += [
            lambda z, red=red: dt.sigmoid_focal_loss(z, tb, alpha=0.25, gamma=0.5, reduction=red),
            lambda z, red=red: dt.binary_cross_entropy_with_logits(z, tb, reduction=red),
            lambda z, red=red: dt.softmax_focal_loss(z, tc, alpha=a5, gamma=0.5, reduction=red),
            lambda z, red=red: dt.cross_entropy(z, tc, weight=w, reduction=red),
            lambda z, red=red: dt.cross_entropy(z, tc, reduction=red),
        ]
    for fn in cases:
        z = x.clone().requires_grad_()
        assert torch.autograd.gradcheck(fn, (z,))
        assert torch.autograd.gradgradcheck(fn, (z,))


def test_reduced_sum_independent_of_threads_and_matches_float64():
    """The reduced sum is formed in a fixed order: the same bits on 1 and 2 threads (above the
    kernels' threading threshold), and within float32's rounding of the float64 truth."""
    g = torch.Generator().manual_seed(12)
    n = 200_003
    x = torch.randn(n, generator=g) * 4
    t = (torch.rand(n, generator=g) > 0.7).float()
    before = torch.get_num_threads()
    try:
        outs = []
        for nth in (1, 2):
            torch.set_num_threads(nth)
            xa = x.clone().requires_grad_()
            loss = dt.sigmoid_focal_loss(xa, t, reduction="mean")
            loss.backward()
            outs.append((loss.detach(), xa.grad))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    ref = tv_sigmoid_focal_loss(x.double(), t.double(), reduction="mean")
    assert abs(outs[0][0].item() - ref.item()) <= (2 ** -23 + BOUND32) * abs(ref.item())


def test_reduced_backward_scales_keeps_graphs_and_never_overwrites_a_held_gradient():
    """An incoming gradient other than 1 multiplies; retain_graph=True backward twice accumulates
    2x (the saved gradient is not aliased into x.grad and then added into); a gradient still held
    (x.grad, a view of it) is never written by a later call, and a freed one is reused."""
    from derive.runtime import torch_ops

    g = torch.Generator().manual_seed(13)
    n = 1 << 20  # 4 MiB of float32: pooled
    x = torch.randn(n, generator=g) * 3
    t = (torch.rand(n, generator=g) > 0.5).float()
    base = dt.kernels.ops("sigmoid_focal_alpha").op(x, t, 0.25, 2.0)[1]  # the per-element op's gradient
    x1 = x.clone().requires_grad_()
    (2.5 * dt.sigmoid_focal_loss(x1, t, reduction="sum")).backward()
    assert torch.equal(x1.grad, base * 2.5)
    x2 = x.clone().requires_grad_()
    loss = dt.sigmoid_focal_loss(x2, t, reduction="sum")
    loss.backward(retain_graph=True)
    once = x2.grad.clone()
    loss.backward(retain_graph=True)
    loss.backward()
    assert torch.equal(x2.grad, once * 3)
    del loss
    # a held gradient: the next calls (other values) must not write into it
    xa = x.clone().requires_grad_()
    dt.sigmoid_focal_loss(xa, t, reduction="sum").backward()
    held, view, kept = xa.grad, xa.grad[10:20], xa.grad.clone()
    ptr = held.data_ptr()
    del xa
    for _ in range(3):
        xb = (x * 0.5).requires_grad_()
        dt.sigmoid_focal_loss(xb, t, reduction="sum").backward()
        assert xb.grad.data_ptr() != ptr
    assert torch.equal(held, kept) and torch.equal(view, kept[10:20])
    del held, view, xb
    xc = x.clone().requires_grad_()
    dt.sigmoid_focal_loss(xc, t, reduction="sum").backward()
    assert torch.equal(xc.grad, kept)
    pooled = {b.data_ptr() for slots in dt.kernels.ops("sigmoid_focal_alpha")._pool._slots.values() for b in slots}
    assert xc.grad.data_ptr() in pooled  # freed buffers are used again (the point of the pool)
    torch_ops.REUSE_GRAD = False
    try:
        xd = x.clone().requires_grad_()
        dt.sigmoid_focal_loss(xd, t, reduction="sum").backward()
        assert torch.equal(xd.grad, kept) and xd.grad.data_ptr() not in pooled
    finally:
        torch_ops.REUSE_GRAD = True
