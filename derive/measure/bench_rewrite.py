"""The rules' kernels beside the hand-written ones, in one run (``make bench``; issue: numerical rewrites).

The shipped kernels whose stable forms derive.rewrite now finds from their closed forms (``rewrite = [...]``
in derive/derivations/stable_forms.toml) are timed beside the same kernels generated from the hand-written
forms they replaced (derive/measure/hand_forms.toml, loaded with derive.load, so verified first): the
generated C, loss and gradient in one pass into reused outputs (``out=``), one thread, float32 and float64.
The two are timed in alternation (which goes first alternates), several rounds, and each keeps its fastest round: on a noisy machine the
ratio within one run is the figure, not the times.  Target: the rules' kernel within 5% of the hand-written
one (ratio rules/hand <= 1.05).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

HAND_FILE = Path(__file__).resolve().with_name("hand_forms.toml")

#: (kernel, parameters, layout)
CASES = (
    ("sigmoid_ce", {}, "sigmoid"),
    ("sigmoid_focal", {"gamma": 2.0}, "sigmoid"),
    ("sigmoid_focal", {"gamma": 0.5}, "sigmoid"),
    ("sigmoid_focal_alpha", {"alpha": 0.25, "gamma": 2.0}, "sigmoid"),
    ("softmax_ce", {}, "softmax"),
    ("softmax_focal", {"alpha": 0.25, "gamma": 2.0}, "softmax"),
    ("softmax_focal", {"alpha": 0.25, "gamma": 0.5}, "softmax"),
)
SIGMOID_N = 2_000_000
SOFTMAX_SHAPE = (32768, 80)
TARGET = 1.05


def _inputs(layout, dtype, n, shape, rng):
    if layout == "sigmoid":
        x = rng.normal(0, 4, n).astype(dtype)
        t = (rng.random(n) < 0.1).astype(dtype)
        return x, t, (np.empty_like(x), np.empty_like(x))
    x = rng.normal(0, 4, shape).astype(dtype)
    t = rng.integers(0, shape[1], shape[0]).astype(np.int64)
    return x, t, (np.empty(shape[0], dtype=dtype), np.empty_like(x))


def run(sigmoid_n=SIGMOID_N, softmax_shape=SOFTMAX_SHAPE, dtypes=("float32", "float64"), rounds=7, hand=None):
    """{"rows": [...]} with ns per element of both kernels and their ratio, or {"skipped": why}."""
    import derive
    from derive.runtime import losses

    if "c" not in losses.available_backends():
        return {"skipped": "no C compiler: the generated C is what is compared"}
    hk = hand or derive.load(HAND_FILE)
    rng = np.random.default_rng(16)
    rows = []
    for dtype in dtypes:
        for name, params, layout in CASES:
            x, t, outs = _inputs(layout, dtype, sigmoid_n, softmax_shape, rng)
            fns = {"rules": getattr(derive.kernels, name), "hand": getattr(hk, name)}
            calls = {k: (lambda f=f: f(x, t, **params, reduction="none", backend="c", return_grad=True,
                                         threads=1, out=outs)) for k, f in fns.items()}
            res = {k: c() for k, c in calls.items()}  # warm-up; and the two agree (same proved function)
            (la, ga), (lb, gb) = (np.array(a) for a in res["rules"]), (np.array(a) for a in res["hand"])
            tol = 1e-4 if dtype == "float32" else 1e-12
            if not (np.allclose(la, lb, rtol=tol, atol=0) and np.allclose(ga, gb, rtol=tol, atol=tol * np.abs(gb).max())):
                raise AssertionError(f"bench_rewrite: {name} {params} {dtype}: the rules' and the hand-written "
                                     "kernels disagree")
            best = {k: float("inf") for k in calls}
            for i in range(rounds):  # alternating, and which goes first alternates too
                for k in (("rules", "hand") if i % 2 == 0 else ("hand", "rules")):
                    c = calls[k]
                    t0 = time.perf_counter()
                    c()
                    best[k] = min(best[k], time.perf_counter() - t0)
            n_el = x.size
            rows.append({"kernel": name, "params": params, "dtype": dtype, "elements": n_el,
                         "rules_ns": best["rules"] / n_el * 1e9, "hand_ns": best["hand"] / n_el * 1e9,
                         "ratio": best["rules"] / best["hand"]})
    return {"rows": rows, "rounds": rounds}


def format_table(res) -> str:
    if "skipped" in res:
        return f"rules' kernels vs hand-written: skipped ({res['skipped']})"
    lines = ["rules' kernels (derive.rewrite) vs the hand-written forms they replaced: generated C, loss + grad, "
             f"out=, 1 thread, fastest of {res['rounds']} alternating rounds",
             f"{'kernel':<22}{'params':<26}{'dtype':<9}{'rules ns/el':>12}{'hand ns/el':>12}{'rules/hand':>12}",
             "-" * 93]
    for r in res["rows"]:
        p = ", ".join(f"{k}={v:g}" for k, v in r["params"].items()) or "-"
        lines.append(f"{r['kernel']:<22}{p:<26}{r['dtype']:<9}{r['rules_ns']:12.2f}{r['hand_ns']:12.2f}"
                     f"{r['ratio']:12.3f}")
    return "\n".join(lines)


def targets(res) -> list:
    if "skipped" in res:
        return []
    worst = max(res["rows"], key=lambda r: r["ratio"])
    p = ", ".join(f"{k}={v:g}" for k, v in worst["params"].items())
    return [(f"rules' kernels within {round((TARGET - 1) * 100)}% of the hand-written ones (worst: {worst['kernel']} "
             f"{p} {worst['dtype']})", worst["ratio"] <= TARGET, f"{worst['ratio']:.3f}x")]


def main(quick=False) -> dict:
    kw = {"sigmoid_n": 100_000, "softmax_shape": (2048, 80), "rounds": 3} if quick else {}
    res = run(**kw)
    print(format_table(res))
    for what, ok, fig in targets(res):
        print(f"target: {what}: {'met' if ok else 'NOT met'} ({fig})")
    return res


__all__ = ["run", "format_table", "targets", "main", "HAND_FILE", "CASES"]
