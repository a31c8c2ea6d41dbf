"""``derive accuracy [FILE...]``: every kernel of the named files against the mpmath reference.

Nothing here knows a kernel by name: the kernels are the ``[[kernel]]`` tables of the files
(default: every shipped file, :func:`derive.codegen.kernels.shipped_files`), the references come
from their original definitions (:mod:`derive.measure.reference`), and the cases from the
declaration:

* **parameters** (:func:`param_grid`): each parameter takes its default, the closed endpoints
  of its domain, 0 where the domain allows it, interior points (a bounded domain: its quarter
  and middle; unbounded above, exponent-like values lo + 0.25, 0.5, 1, 2, 5 and 20), -1 for the
  alpha of a kernel with a ``weight`` (no weighting) and a per-class vector for a
  ``class_alpha`` alpha.  The grid is the defaults, each parameter varied alone over its values
  (the others at their defaults), and the two corners (every parameter at its smallest, then
  at its largest value): 1 + sum(values - 1) + 2 combinations at most, so that a kernel with
  three parameters costs a few dozen combinations, not their product.  ``--quick`` keeps each
  parameter's default, smallest and largest value.
* **elementwise points**: a grid over [-30, 30] (inner points shifted off the dyadic grid, so
  that products such as gamma*x get rounded), random points in [-40, 40] and of random
  magnitude in [1e-8, 200]; binary targets take both labels, soft targets the values 0, 1,
  0.5, 1e-3, 1 - 1e-3 and random ones, in turn: two per x (``--quick``: one).
* **softmax rows**: K in (2, 80, 1000) (``--quick``: 2, 80), random logits in [-30, 30], rows
  whose target dominates by 60 or loses by 60; class-index targets random (and an ignored
  row), class-probability targets random rows, one-hot and smoothed one-hot rows.
* **beyond**: logits +-1e4 and +-(largest finite), softmax rows dominated by 1e3 or by
  +-(largest finite): every loss and gradient finite and of the exact sign (a computed 0 where
  the exact value underflows is accepted).

The error of a value is |computed - exact| / max(|exact|, smallest normal); a kernel passes
when it is at most the bound, 2e-6 (float32) or 4e-15 (float64); a kernel that declares
``conditioned`` passes when the error is at most bound * max(1, kappa), kappa the condition
number of the exact function at that point (reference.Reference.kappa), and the table shows the
error divided by max(1, kappa) and kappa at the worst such point.  Exit 1 when a kernel fails, naming
kernel, dtype, backend, parameters and the point.

Python API: :func:`measure` (rows), :func:`format_table`, :func:`param_grid`, :func:`grid`,
:data:`BOUNDS`, :func:`main`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from derive.measure import reference as R

BOUNDS = {"float32": 2e-6, "float64": 4e-15}
DTYPES = (np.float32, np.float64)
GRID_RANGE = 30.0
#: interior values of a parameter unbounded above, added to its lower bound (exponent-like: up to 20)
UNBOUNDED_STEPS = (0.25, 0.5, 1.0, 2.0, 5.0, 20.0)
SOFT_TARGETS = (0.0, 1.0, 0.5, 1e-3, 1.0 - 1e-3)
SOFTMAX_K = (2, 80, 1000)
FULL = {"points": 601, "random": 60, "rows": 12, "ks": SOFTMAX_K, "soft_random": 3, "soft_per_x": 2}
QUICK = {"points": 43, "random": 16, "rows": 4, "ks": SOFTMAX_K[:2], "soft_random": 1, "soft_per_x": 1}


@dataclass
class Row:
    kernel: str
    dtype: str
    backend: str
    params: str
    loss_err: float  # the largest error (conditioned: divided by max(1, kappa))
    grad_err: float
    beyond_ok: bool
    kappa: float | None = None  # conditioned kernels: the condition number at the worst (scaled) point
    note: str = ""  # the worst point, or why beyond failed
    file: str = ""
    failures: list = field(default_factory=list)
    no_reference: str = ""  # why the reference could not be computed at some point (a failure)

    @property
    def ok(self):
        b = BOUNDS[self.dtype]
        return self.loss_err <= b and self.grad_err <= b and self.beyond_ok and not self.no_reference


# ------------------------------------------------------------------------------------------
# the cases, from the declaration


def _domain_values(dom, default, quick):
    if dom.is_finite:
        vals = [float(v) for v in dom.values]
    else:
        lo = None if dom.lo is None else float(dom.lo)
        hi = None if dom.hi is None else float(dom.hi)
        vals = []
        if lo is not None and not dom.lo_open:
            vals.append(lo)
        if hi is not None and not dom.hi_open:
            vals.append(hi)
        if dom.contains(0):
            vals.append(0.0)
        if lo is not None and hi is not None:
            vals += [lo + (hi - lo) / 4, lo + (hi - lo) / 2]
        elif hi is None:
            base = 0.0 if lo is None else lo
            vals += [base + s for s in UNBOUNDED_STEPS] + ([] if lo is not None else [-1.0, -5.0])
        else:
            vals += [hi - s for s in UNBOUNDED_STEPS] + [1.0, 5.0]
        vals = [v for v in vals if dom.contains(_exact(v))]
    if default is not None:
        vals.append(float(default))
    vals = sorted(set(vals))
    if quick and len(vals) > 2:
        keep = {vals[0], vals[-1]} | ({float(default)} if default is not None else set())
        vals = sorted(keep)
    return vals


def _exact(v):
    from fractions import Fraction

    return Fraction(v)


def param_values(spec, quick=False):
    """Each parameter's values (see the module docstring): {name: [values]} in declared order;
    "vector" stands for one weight per class (class_alpha)."""
    out = {}
    for p in spec.params:
        dom = spec.domains[p]
        vals = _domain_values(dom, spec.defaults.get(p), quick)
        if getattr(spec, "weight", None) and p == "alpha":
            vals = [-1.0] + vals
        if getattr(spec, "class_alpha", False) and p == "alpha":
            vals = vals + ["vector"]
        out[p] = vals
    return out


def param_grid(spec, quick=False):
    """The parameter combinations measured: tuples in the kernel's declared order."""
    values = param_values(spec, quick)
    if not values:
        return [()]
    base = {}
    for p, vals in values.items():
        d = spec.defaults.get(p)
        nums = [v for v in vals if v != "vector"]
        base[p] = float(d) if d is not None else nums[len(nums) // 2]
    combos = [dict(base)]
    for p, vals in values.items():
        for v in vals:
            combos.append({**base, p: v})
    for pick in (0, -1):
        corner = {}
        for p, vals in values.items():
            nums = [v for v in vals if v != "vector" and not (getattr(spec, "weight", None) and p == "alpha" and v < 0)]
            corner[p] = nums[pick]
        combos.append(corner)
    out, seen = [], set()
    for c in combos:
        key = tuple(c[p] for p in spec.params)
        if key not in seen:
            seen.add(key)
            out.append(key)
    return out


def grid(points):
    """points over [-30, 30], both ends included; the inner ones are shifted by a non-dyadic
    amount so that products such as gamma*x get rounded, as they do in real use."""
    x = np.linspace(-GRID_RANGE, GRID_RANGE, points)
    if points > 2:
        x[1:-1] += (x[1] - x[0]) / 3.0
    return x


def _targets(spec, rng, soft_random):
    if spec.target == "soft":
        return np.array(list(SOFT_TARGETS) + rng.uniform(0, 1, soft_random).tolist())
    return np.array([0.0, 1.0])


def elementwise_points(spec, dtype, cfg, seed=0):
    """(x, t) of the measured points, in dtype: every x with both labels; soft targets in turn,
    ``soft_per_x`` of them per x (every value met about len(x)*soft_per_x/len(values) times)."""
    rng = np.random.default_rng(seed)
    xs = np.concatenate([grid(cfg["points"]), rng.uniform(-40, 40, cfg["random"]),
                         rng.choice([-1.0, 1.0], cfg["random"]) * 10.0 ** rng.uniform(-8, np.log10(200), cfg["random"])])
    ts = _targets(spec, rng, cfg["soft_random"])
    if spec.target == "soft":
        per = cfg.get("soft_per_x", len(ts))
        idx = (np.arange(len(xs))[:, None] * per + np.arange(per)[None, :]) % len(ts)
        return np.repeat(xs, per).astype(dtype), ts[idx.ravel()].astype(dtype)
    x = np.repeat(xs, len(ts)).astype(dtype)
    t = np.tile(ts, len(xs)).astype(dtype)
    return x, t


def beyond_points(spec, dtype, seed=0):
    big = float(np.finfo(dtype).max)
    xs = np.array([-big, -1e4, 1e4, big])
    ts = _targets(spec, np.random.default_rng(seed), 1)
    return np.repeat(xs, len(ts)).astype(dtype), np.tile(ts, len(xs)).astype(dtype)


def _probs_targets(rng, n, k):
    q = rng.dirichlet(np.ones(k), size=n)
    for r in range(0, n, 3):  # one-hot rows
        q[r] = 0.0
        q[r, rng.integers(0, k)] = 1.0
    for r in range(1, n, 3):  # smoothed one-hot rows (label smoothing 0.1)
        q[r] = 0.1 / k
        q[r, rng.integers(0, k)] += 0.9
    return q


def softmax_cases(spec, k, dtype, rows, seed=0):
    """(x, targets, beyond x, beyond targets) for one K; targets class indices or probability rows."""
    rng = np.random.default_rng(seed + k)
    n = rows if k < 1000 else min(rows, 4)
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
    xb[0, tb[0]] = xb[0].max() + 1e3  # the target dominates by 1e3
    xb[1, (tb[1] + 1) % k] = xb[1].max() + 1e3  # another class dominates by 1e3
    big = float(np.finfo(dtype).max)
    xb[2, :] = -big
    xb[2, tb[2]] = big
    xb[3, :] = big
    xb[3, tb[3]] = -big
    xb[4, :] = 1e4
    xb[4, tb[4]] = -1e4
    xb[5, :] = -1e4
    xb[5, (tb[5] + 1) % k] = 1e4
    if spec.target == "class_probs":
        q, qb = _probs_targets(rng, n, k), _probs_targets(rng, 6, k)
        for r, c in enumerate(tgt[:2]):  # the dominating / losing rows aim at their target class
            q[r] = 0.0
            q[r, c] = 1.0
        for r in range(6):
            qb[r] = 0.0
            qb[r, tb[r]] = 1.0
        return x.astype(dtype), q.astype(dtype), xb.astype(dtype), qb.astype(dtype)
    if n > 3:
        tgt[3] = -100  # an ignored row
    return x.astype(dtype), tgt, xb.astype(dtype), tb


# ------------------------------------------------------------------------------------------
# calling the kernels


def _call(fn, spec, backend, x, t, params):
    kwargs = dict(zip(spec.params, params))
    if spec.layout == "softmax" and spec.target != "class_probs":
        kwargs["ignore_index"] = -100
    with np.errstate(all="ignore"):
        return fn(x, t, reduction="none", return_grad=True, backend=backend, **kwargs)


def _shipped_function(spec):
    """The runtime's function for a shipped kernel: ``derive.shipped(module)``, built from the
    committed generated/ sources (the same machinery as ``derive.load``, no verification)."""
    import derive

    return getattr(derive.shipped(spec.module), spec.name)


_LOADED: dict = {}


def _load(path):
    if path not in _LOADED:
        import derive

        _LOADED[path] = derive.load(path)
    return _LOADED[path]


# ------------------------------------------------------------------------------------------
# measuring


def _fmt_params(spec, params):
    if not spec.params:
        return "-"
    return ", ".join(f"{p}={'per-class' if isinstance(v, str) else f'{v:g}'}" for p, v in zip(spec.params, params))


def _typed_params(params, dtype, k=None, spec=None):
    out = []
    for v in params:
        if isinstance(v, str):  # "vector": one weight per class, inside the alpha domain
            dom = spec.domains["alpha"]
            lo = 0.1 if dom.lo is None else max(float(dom.lo), 0.1)
            hi = 1.0 if dom.hi is None else float(dom.hi)
            out.append(np.linspace(lo, hi, k).astype(dtype))
        else:
            out.append(float(np.asarray(v, dtype=dtype)))
    return tuple(out)


def _point_text(spec, x, t, i):
    if spec.layout == "elementwise":
        return f"x = {float(x[i])!r}, t = {float(t[i])!r}"
    row = np.asarray(x)[i]
    tt = np.asarray(t)[i]
    target = f"target {int(tt)}" if np.ndim(tt) == 0 else f"q = {np.array2string(tt, precision=3, threshold=6)}"
    return f"row {i} (K = {row.size}, logits {np.array2string(row, precision=3, threshold=6)}, {target})"


class _Worst:
    """The largest (scaled) error of one output and the point where it occurs."""

    def __init__(self):
        self.err, self.where, self.kappa = 0.0, "", None

    def update(self, errs, kappa, describe):
        scaled = errs if kappa is None else errs / np.maximum(1.0, kappa)
        if scaled.size:
            i = int(np.argmax(scaled))
            if not scaled[i] <= self.err or (self.kappa is None and kappa is not None):
                self.err = float(scaled[i])
                self.kappa = None if kappa is None else float(kappa.ravel()[i])
                self.where = describe(i) + (f" (kappa {self.kappa:.3g})" if kappa is not None else "")


def _measure_combo(spec, ref, fns, dtype, params, cfg, beyond=True):
    """Rows (one per backend) for one kernel, dtype and parameter combination."""
    dname = np.dtype(dtype).name
    cond = bool(getattr(spec, "conditioned", None))
    worst = {b: (_Worst(), _Worst()) for b in fns}
    notes = {b: [] for b in fns}
    if spec.layout == "elementwise":
        x, t = elementwise_points(spec, dtype, cfg)
        cases = [(x, t, _typed_params(params, dtype))]
    else:
        cases = []
        for k in cfg["ks"]:
            xr, tr, xb, tb = softmax_cases(spec, k, dtype, cfg["rows"])
            cases.append((xr, tr, _typed_params(params, dtype, k, spec), xb, tb))
    missing = ""
    for case in cases:
        x, t, typed = case[:3]
        try:
            ref_l, ref_g = ref.values(x, t, typed)
            kl = kg = None
            if cond:
                kl, kg = ref.kappa(x, t, typed, dtype)
                kg = np.asarray(kg).ravel()
        except R.ReferenceUnavailable as exc:
            missing = missing or f"no reference: {exc}"
            continue
        if spec.layout != "elementwise":
            ref_g = [v for row in ref_g for v in row]
        k = None if spec.layout == "elementwise" else x.shape[1]
        for backend, fn in fns.items():
            loss, grad = _call(fn, spec, backend, x, t, typed)
            el = R.rel_errors(loss, ref_l, dtype)
            eg = R.rel_errors(grad, ref_g, dtype)
            worst[backend][0].update(el, kl, lambda i: _point_text(spec, x, t, i))
            worst[backend][1].update(eg, kg, lambda i: _point_text(spec, x, t, i // (k or 1))
                                     + (f", class {i % k}" if k else ""))
        if beyond:
            if spec.layout == "elementwise":
                xb, tb = beyond_points(spec, dtype)
            else:
                xb, tb = case[3], case[4]
            sl, sg = ref.signs(xb, tb, typed)
            for backend, fn in fns.items():
                lb, gb = _call(fn, spec, backend, xb, tb, typed)
                for what, vals, signs in (("loss", np.asarray(lb), sl), ("grad", np.asarray(gb), sg)):
                    vals, signs = vals.reshape(signs.shape), np.asarray(signs)
                    bad = ~np.isfinite(vals.astype(np.float64))
                    wrong = ~bad & (vals != 0) & ~np.isnan(signs) & (np.sign(vals) != signs)
                    for mask, why in ((bad, "not finite"), (wrong, "wrongly signed")):
                        if np.any(mask):
                            i = np.argwhere(mask)[0]
                            notes[backend].append(f"{what} {why} at {_point_text(spec, xb, tb, int(i[0]))}"
                                                  + (f", class {int(i[1])}" if len(i) > 1 else ""))
    rows = []
    for backend in fns:
        wl, wg = worst[backend]
        row = Row(spec.name, dname, backend, _fmt_params(spec, params), wl.err, wg.err, not notes[backend],
                  (wl.kappa if wl.err >= wg.err else wg.kappa) if cond else None, "; ".join(notes[backend][:2]),
                  str(getattr(spec, "path", "") or ""), no_reference=missing)
        b = BOUNDS[dname]
        if missing:
            row.failures.append(missing)
        if wl.err > b:
            row.failures.append(f"loss error {wl.err:.3g} at {wl.where}")
        if wg.err > b:
            row.failures.append(f"grad error {wg.err:.3g} at {wg.where}")
        row.failures += notes[backend]
        rows.append(row)
    return rows


def kernels_of(files=None):
    """[(KernelDecl, function factory)] of the files (paths), or of every shipped file."""
    out = []
    if files:
        from derive.language.loader import DerivationFileError

        for path in files:
            loaded = _load(str(path))
            f = R._loaded(str(path))
            if not f.kernels:
                raise DerivationFileError(f.path, "declares no [[kernel]]: nothing to measure")
            for spec in f.kernels:
                out.append((spec, f, (lambda spec=spec, loaded=loaded: getattr(loaded, spec.name)),
                            loaded.available_backends))
        return out
    from derive.codegen import kernels as K
    from derive.runtime import losses

    for spec in K.shipped_kernels():
        _, f = R.find_kernel(spec.name)
        out.append((spec, f, (lambda spec=spec: _shipped_function(spec)), losses.available_backends))
    return out


def measure(backends=("c", "numpy"), quick=False, kernels=None, files=None, cfg=None, progress=None):
    """The rows of the table: every kernel (of ``files``, else shipped; only ``kernels`` if named),
    dtype, parameter combination and backend."""
    cfg = dict(cfg or (QUICK if quick else FULL))
    rows = []
    for spec, f, make, available in kernels_of(files):
        if kernels and spec.name not in kernels:
            continue
        fn = make()
        have = available() if "c" in backends else ["numpy"]
        fns = {b: fn for b in backends if b in have}
        ref = R.reference_for(spec, f.path)
        for dtype in DTYPES:
            for params in param_grid(spec, quick):
                if progress:
                    progress(spec.name, np.dtype(dtype).name, _fmt_params(spec, params))
                rows += _measure_combo(spec, ref, fns, dtype, params, cfg)
    return rows


def format_table(rows) -> str:
    head = (f"{'kernel':<24} {'dtype':<8} {'backend':<7} {'params':<28} {'loss err':>9}  {'grad err':>9}  "
            f"{'kappa':>8}  {'bound':>7}  beyond  ok")
    lines = [head, "-" * len(head)]
    for r in rows:
        kappa = "-" if r.kappa is None else f"{r.kappa:.2g}"
        lines.append(f"{r.kernel:<24} {r.dtype:<8} {r.backend:<7} {r.params:<28} {r.loss_err:>9.2e}  "
                     f"{r.grad_err:>9.2e}  {kappa:>8}  {BOUNDS[r.dtype]:>7.0e}  {'ok' if r.beyond_ok else 'FAIL':<6}  "
                     f"{'yes' if r.ok else 'NO'}" + ("  (no reference at some point)" if r.no_reference else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="derive accuracy",
        description="Measure every kernel of the derivation files (default: the shipped ones) against mpmath "
                    "references of their original definitions: loss and gradient, float32 and float64, C and "
                    "NumPy, over a parameter grid from the declarations; exit 1 when a bound is exceeded.")
    parser.add_argument("files", nargs="*", metavar="FILE", help="derivation files with [[kernel]] tables "
                        "(their kernels come from derive.load(FILE), which verifies the file first)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a short run: {QUICK['points']} grid points, each parameter at its default and "
                             f"extremes, softmax K in {QUICK['ks']} with {QUICK['rows']} rows (same bounds)")
    parser.add_argument("--points", type=int, help=f"grid points over [-30, 30] (default {FULL['points']}, "
                        f"--quick {QUICK['points']})")
    parser.add_argument("--backend", choices=("c", "numpy", "both"), default="both")
    parser.add_argument("--kernel", action="append", help="only this kernel (repeatable)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH ('-': standard output)")
    args = parser.parse_args(argv)
    if args.points is not None and args.points < 2:
        parser.error(f"--points must be at least 2, got {args.points}")
    from derive.language.loader import DerivationFileError

    for path in args.files:
        if not os.path.isfile(path):
            parser.error(f"{path}: no such file")
    try:
        known = [spec.name for spec, *_ in kernels_of(args.files)]
    except DerivationFileError as exc:
        print(f"derive accuracy: {exc}", file=sys.stderr)
        return 2
    if args.kernel:
        unknown = [k for k in args.kernel if k not in known]
        if unknown:
            parser.error(f"unknown kernel {', '.join(unknown)}; known: {', '.join(known)}")
    from derive.runtime import losses

    backends = ["c", "numpy"] if args.backend == "both" else [args.backend]
    if "c" in backends and "c" not in losses.available_backends():
        print("derive accuracy: no C compiler, measuring the NumPy backend only", file=sys.stderr)
        backends.remove("c")
    cfg = dict(QUICK if args.quick else FULL)
    if args.points is not None:
        cfg["points"] = args.points
    t0 = time.time()
    progress = None
    if sys.stderr.isatty():  # a progress line on a terminal, as derive verify shows one
        def progress(kernel, dtype, params):
            sys.stderr.write(f"\r\x1b[Kmeasuring {kernel} {dtype} {params}"[:200])
            sys.stderr.flush()
    rows = measure(backends, args.quick, args.kernel, args.files, cfg, progress)
    if progress:
        sys.stderr.write("\r\x1b[K")
    table = format_table(rows)
    bad = [r for r in rows if not r.ok]
    summary = (f"{len(rows)} rows, {len(bad)} over the bounds (float32 {BOUNDS['float32']:g}, float64 "
               f"{BOUNDS['float64']:g}; conditioned kernels: bound*max(1, kappa)), {time.time() - t0:.1f} s")
    if args.json:
        def plain(v):  # strict JSON: a non-finite error (a NaN or inf computed) as the string "inf"/"nan"
            return v if not isinstance(v, float) or np.isfinite(v) else str(v)
        data = {"bounds": BOUNDS, "rows": [{k: plain(v) for k, v in dict(asdict(r), ok=r.ok).items()} for r in rows]}
        text = json.dumps(data, indent=1, allow_nan=False)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
    if args.json != "-":
        print(table)
    for r in bad:
        for why in r.failures or ["over the bound"]:
            print(f"FAIL {r.kernel} {r.dtype} {r.backend} params {r.params}: {why}", file=sys.stderr)
    print(("\n" if args.json != "-" else "") + summary, file=sys.stdout if args.json != "-" else sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
