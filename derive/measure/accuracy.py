"""``make accuracy``: error of every kernel against the mpmath reference, per dtype and gamma.

For each kernel, dtype, backend and gamma the table shows the largest relative error of the
loss and of the gradient over logits on a grid over [-30, 30] (both labels; alpha in
{0.25, 1} and "off"; beta in {0, 1} for FL*; softmax rows with K in {2, 80, 1000}, random
logits in [-30, 30], targets that dominate by 60 or lose by 60, scalar and per-class alpha).
The error is |computed - exact| / max(|exact|, smallest normal), the exact value coming from
:mod:`derive.measure.reference` (the original definitions at 40+ digits).  The "beyond" column checks
logits at +-1e4 and +-(largest finite value), and softmax rows where the target dominates
(or is dominated) by 1e3: every value finite and correctly signed.

Bounds (asserted by tests/test_accuracy.py): 2e-6 (float32) and 4e-15 (float64).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import numpy as np

from derive.measure import reference as R

BOUNDS = {"float32": 2e-6, "float64": 4e-15}
GAMMAS = (0.0, 0.25, 0.5, 1.0, 2.0, 5.0)
ALPHAS = (0.25, 1.0)
BETAS = (0.0, 1.0)
SOFTMAX_K = (2, 80, 1000)
DTYPES = (np.float32, np.float64)


@dataclass
class Row:
    kernel: str
    dtype: str
    backend: str
    gamma: float
    loss_err: float
    grad_err: float
    beyond_ok: bool
    beyond_note: str = ""

    @property
    def ok(self):
        b = BOUNDS[self.dtype]
        return self.loss_err <= b and self.grad_err <= b and self.beyond_ok


def _kernel_fn(name, backend):
    from derive.runtime import losses as L

    if name == "sigmoid_ce":
        return lambda x, t, p: L.sigmoid_cross_entropy(x, t, backend=backend, return_grad=True)
    if name == "sigmoid_focal":
        return lambda x, t, p: L.binary_focal_loss(x, t, gamma=p[0], backend=backend, return_grad=True)
    if name == "sigmoid_focal_alpha":
        return lambda x, t, p: L.sigmoid_focal_loss(x, t, alpha=p[0], gamma=p[1], backend=backend, return_grad=True)
    if name == "focal_star":
        return lambda x, t, p: L.focal_loss_star(x, t, gamma=p[0], beta=p[1], backend=backend, return_grad=True)
    if name == "softmax_ce":
        return lambda x, t, a, g: L.softmax_cross_entropy(x, t, backend=backend, return_grad=True)
    if name == "softmax_focal":
        return lambda x, t, a, g: L.softmax_focal_loss(x, t, alpha=a, gamma=g, backend=backend, return_grad=True)
    raise KeyError(name)


def _param_sets(name, gamma):
    if name == "sigmoid_ce":
        return [()] if gamma == 0 else []
    if name == "sigmoid_focal":
        return [(gamma,)]
    if name == "sigmoid_focal_alpha":
        return [(a, gamma) for a in ALPHAS + (-1.0,)]
    if name == "focal_star":
        return [(gamma, b) for b in BETAS] if gamma > 0 else []
    raise KeyError(name)


def grid(points):
    """points over [-30, 30], both ends included; the inner ones are shifted by a non-dyadic
    amount so that products such as gamma*x get rounded, as they do in real use."""
    x = np.linspace(-30.0, 30.0, points)
    if points > 2:
        x[1:-1] += (x[1] - x[0]) / 3.0
    return x


BEYOND = np.array([-np.inf, -1e4, 1e4, np.inf])  # +-inf stand for +-(largest finite)


def _beyond(dtype):
    v = BEYOND.astype(np.float64).copy()
    big = float(np.finfo(dtype).max)
    v[0], v[-1] = -big, big
    return v.astype(dtype)


_REF_CACHE: dict = {}


def _elementwise_ref(name, x, t, params):
    key = (name, x.dtype.str, x.tobytes(), t.tobytes(), params)
    if key not in _REF_CACHE:
        _REF_CACHE[key] = R.elementwise(name, x, t, params)
    return _REF_CACHE[key]


def measure_elementwise(name, dtype, backend, gamma, points=1201):
    fn = _kernel_fn(name, backend)
    worst_l = worst_g = 0.0
    beyond_ok, note = True, ""
    dname = np.dtype(dtype).name
    for params in _param_sets(name, gamma):
        x = np.repeat(grid(points).astype(dtype), 2)
        t = np.tile(np.array([0.0, 1.0], dtype=dtype), points)
        p_typed = tuple(float(np.asarray(p, dtype=dtype)) for p in params)
        loss, grad = fn(x, t, p_typed)
        ref_l, ref_g = _elementwise_ref(name, x, t, p_typed)
        worst_l = max(worst_l, float(R.rel_errors(loss, ref_l, dtype).max()))
        worst_g = max(worst_g, float(R.rel_errors(grad, ref_g, dtype).max()))
        xb = np.repeat(_beyond(dtype), 2)
        tb = np.tile(np.array([0.0, 1.0], dtype=dtype), len(BEYOND))
        lb, gb = fn(xb, tb, p_typed)
        sl, sg = R.stable_sign_elementwise(name, xb, tb, p_typed)
        for what, vals, signs in (("loss", lb, sl), ("grad", gb, sg)):
            if not np.all(np.isfinite(vals)):
                beyond_ok, note = False, f"{what} not finite at {xb[~np.isfinite(vals)][0]}"
            wrong = (np.sign(vals) != signs) & (vals != 0)
            if np.any(wrong):
                beyond_ok, note = False, f"{what} wrongly signed at {xb[wrong][0]}"
    return Row(name, dname, backend, gamma, worst_l, worst_g, beyond_ok, note)


def softmax_cases(k, dtype, seed=0, rows=None):
    """(x, target, beyond rows, beyond targets) for one K."""
    rng = np.random.default_rng(seed + k)
    n = (rows or 24) if k < 1000 else min(rows or 6, 6)
    x = rng.uniform(-30, 30, size=(n, k))
    tgt = rng.integers(0, k, size=n)
    # the target dominates by 60 (p_t close to 1), or loses by 60 (p_t tiny)
    x[0, :] = -30.0
    x[0, tgt[0]] = 30.0
    x[1, :] = rng.uniform(-30, -29, size=k)
    x[1, tgt[1]] = -30.0
    x[1, (tgt[1] + 1) % k] = 30.0
    xb = rng.uniform(-30, 30, size=(6, k))
    tb = rng.integers(0, k, size=6)
    xb[0, tb[0]] = xb[0].max() + 1e3  # target dominates by 1e3
    xb[1, (tb[1] + 1) % k] = xb[1].max() + 1e3  # another class dominates by 1e3
    big = float(np.finfo(dtype).max)
    xb[2, :] = -big
    xb[2, tb[2]] = big
    xb[3, :] = big
    xb[3, tb[3]] = -big
    xb[4, :] = 1e4
    xb[4, tb[4]] = -1e4
    xb[5, :] = -1e4
    if k > 1:
        xb[5, (tb[5] + 1) % k] = 1e4
    return x.astype(dtype), tgt, xb.astype(dtype), tb


def measure_softmax(name, dtype, backend, gamma, rows=None, ks=SOFTMAX_K):
    if name == "softmax_ce" and gamma != 0:
        return None
    fn = _kernel_fn(name, backend)
    dname = np.dtype(dtype).name
    worst_l = worst_g = 0.0
    beyond_ok, note = True, ""
    alphas = [None] if name == "softmax_ce" else list(ALPHAS) + ["vector"]
    for k in ks:
        x, tgt, xb, tb = softmax_cases(k, dtype, rows=rows)
        for a in alphas:
            if a == "vector":
                a = np.linspace(0.1, 1.0, k).astype(dtype)
            elif a is not None:
                a = float(np.asarray(a, dtype=dtype))
            g = float(np.asarray(gamma, dtype=dtype))
            loss, grad = fn(x, tgt, a, g)
            key = (name, x.dtype.str, x.tobytes(), tgt.tobytes(), None if a is None else np.asarray(a).tobytes(), g)
            if key not in _REF_CACHE:
                _REF_CACHE[key] = R.rowwise(name, x, tgt, a, g if name != "softmax_ce" else 0.0)
            ref_l, ref_g = _REF_CACHE[key]
            worst_l = max(worst_l, float(R.rel_errors(loss, ref_l, dtype).max()))
            flat_ref = [v for row in ref_g for v in row]
            worst_g = max(worst_g, float(R.rel_errors(grad, flat_ref, dtype).max()))
            lb, gb = fn(xb, tb, a, g)
            if not (np.all(np.isfinite(lb)) and np.all(np.isfinite(gb))):
                beyond_ok, note = False, f"K={k}: not finite"
            rows_idx = np.arange(len(tb))
            gt = gb[rows_idx, tb]
            mask = np.ones_like(gb, dtype=bool)
            mask[rows_idx, tb] = False
            if np.any(lb < 0) or np.any(gt > 0) or np.any(gb[mask] < 0):
                beyond_ok, note = False, f"K={k}: wrongly signed"
    return Row(name, dname, backend, gamma, worst_l, worst_g, beyond_ok, note)


def measure(backends=("c", "numpy"), points=1201, softmax_rows=None, kernels=None, gammas=GAMMAS, softmax_k=SOFTMAX_K):
    from derive.codegen.kernels import shipped_kernels

    rows = []
    for spec in shipped_kernels():
        if kernels and spec.name not in kernels:
            continue
        for dtype in DTYPES:
            for backend in backends:
                for gamma in gammas:
                    if spec.kind == "elementwise":
                        if not _param_sets(spec.name, gamma):
                            continue
                        rows.append(measure_elementwise(spec.name, dtype, backend, gamma, points))
                    else:
                        r = measure_softmax(spec.name, dtype, backend, gamma, softmax_rows, softmax_k)
                        if r is not None:
                            rows.append(r)
    return rows


def format_table(rows) -> str:
    head = f"{'kernel':<20} {'dtype':<8} {'backend':<7} {'gamma':>5}  {'loss err':>9}  {'grad err':>9}  {'bound':>7}  beyond  ok"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.kernel:<20} {r.dtype:<8} {r.backend:<7} {r.gamma:>5g}  {r.loss_err:>9.2e}  {r.grad_err:>9.2e}"
                     f"  {BOUNDS[r.dtype]:>7.0e}  {'ok' if r.beyond_ok else 'FAIL':<6}  {'yes' if r.ok else 'NO'}"
                     + (f"  ({r.beyond_note})" if r.beyond_note else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="derive accuracy",
        description="Measure every kernel (loss and gradient, float32 and float64, C and NumPy) against mpmath "
                    "references of the original definitions; exit 1 when a bound is exceeded.")
    parser.add_argument("--points", type=int, default=1201, help="grid points over [-30, 30] (default 1201)")
    parser.add_argument("--backend", choices=("c", "numpy", "both"), default="both")
    parser.add_argument("--kernel", action="append", help="only this kernel (repeatable)")
    parser.add_argument("--quick", action="store_true",
                        help="a short run: 61 grid points, softmax K in (2, 80) with 4 rows each "
                             "(same bounds, fewer points)")
    args = parser.parse_args(argv)
    if args.points < 2:
        parser.error(f"--points must be at least 2, got {args.points}")
    softmax_rows, softmax_k = None, SOFTMAX_K
    if args.quick:
        args.points, softmax_rows, softmax_k = min(args.points, 61), 4, SOFTMAX_K[:2]
    if args.kernel:
        from derive.codegen.kernels import shipped_kernels

        known = [s.name for s in shipped_kernels()]
        unknown = [k for k in args.kernel if k not in known]
        if unknown:
            parser.error(f"unknown kernel {', '.join(unknown)}; known: {', '.join(known)}")
    from derive.runtime import losses

    backends = ["c", "numpy"] if args.backend == "both" else [args.backend]
    if "c" in backends and "c" not in losses.available_backends():
        print("derive accuracy: no C compiler, measuring the NumPy backend only", file=sys.stderr)
        backends.remove("c")
    t0 = time.time()
    rows = measure(backends, args.points, softmax_rows=softmax_rows, kernels=args.kernel, softmax_k=softmax_k)
    print(format_table(rows))
    bad = [r for r in rows if not r.ok]
    print(f"\n{len(rows)} rows, {len(bad)} over the bounds (float32 {BOUNDS['float32']:g}, "
          f"float64 {BOUNDS['float64']:g}), {time.time() - t0:.1f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
