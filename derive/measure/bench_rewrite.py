"""The rules' kernels beside the hand-written ones, in one run (``make bench``; issue: numerical rewrites).

The shipped kernels whose stable forms derive.rewrite now finds from their closed forms (``rewrite = [...]``
in derive/derivations/stable_forms.toml) are timed beside the same kernels generated from the hand-written
forms they replaced (derive/measure/hand_forms.toml, loaded with derive.load, so verified first): the
generated C, loss and gradient in one pass into reused outputs (``out=``), one thread, float32 and float64.
The elementwise kernels' second derivatives (derive_<kernel>_hess_<dt>, through ctypes) are
timed the same way.  The two are timed in alternation (which goes first alternates), several rounds, and each keeps its fastest round: on a noisy machine the
ratio within one run is the figure, not the times.  Target: the rules' kernel within 5% of the hand-written
one (ratio rules/hand <= 1.05).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

HAND_FILE = Path(__file__).resolve().with_name("hand_forms.toml")

#: beside each kernel's declared defaults, these parameter values (where the kernel has the parameter)
EXTRA_PARAMS = ({"gamma": 0.5},)


def cases(hand_file=HAND_FILE) -> list:
    """(kernel, parameters, layout) for every kernel of the hand-written file, read from its [[kernel]]
    tables (no kernel is named here): the declared defaults, then each EXTRA_PARAMS value it takes."""
    from derive.language.loader import load_file

    out = []
    for spec in load_file(hand_file).kernels:
        layout = "sigmoid" if spec.layout == "elementwise" else "softmax"
        base = {p: float(spec.defaults[p]) for p in spec.params}
        out.append((spec.name, base, layout))
        for extra in EXTRA_PARAMS:
            if set(extra) <= set(spec.params) and any(base[k] != v for k, v in extra.items()):
                out.append((spec.name, {**base, **extra}, layout))
    return out


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


def same_forms() -> dict:
    """kernel -> whether its printed expressions (what the C prints, loss and gradient) are the same in the
    rules' kernel and the hand-written one: then the two loops are the same code and their timing ratio is
    the measurement's own spread (code placement, page state), not a difference of the forms."""
    from derive.codegen import kernels as K
    from derive.language.loader import load_file

    hand_f = load_file(HAND_FILE)
    out = {}
    for spec in hand_f.kernels:
        ship = next(k for k in K.shipped_kernels() if k.name == spec.name)
        ship_f = load_file(ship.path)
        out[spec.name] = K.prepare(ship, ship_f).exprs == K.prepare(spec, hand_f).exprs
        a, b = K.prepare_second(ship, ship_f), K.prepare_second(spec, hand_f)
        out[spec.name + ":second"] = a is not None and b is not None and a.exprs == b.exprs
    return out


def _check_agree(what, rules, hand, dtype):
    """The two kernels compute the same proved function: their outputs agree to a few rounding errors."""
    tol = 1e-4 if dtype == "float32" else 1e-12
    for a, b in zip(rules, hand):
        a, b = np.asarray(a), np.asarray(b)
        if not np.allclose(a, b, rtol=tol, atol=tol * np.abs(b).max()):
            raise AssertionError(f"bench_rewrite: {what} {dtype}: the rules' and the hand-written kernels disagree")


def _race(calls, rounds) -> dict:
    """The fastest of ``rounds`` calls of calls["rules"] and calls["hand"], in alternation (which goes
    first alternates too), in seconds."""
    best = {k: float("inf") for k in calls}
    for i in range(rounds):
        for k in (("rules", "hand") if i % 2 == 0 else ("hand", "rules")):
            t0 = time.perf_counter()
            calls[k]()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def run(sigmoid_n=SIGMOID_N, softmax_shape=SOFTMAX_SHAPE, dtypes=("float32", "float64"), rounds=41, hand=None):
    """{"rows": [...]} with ns per element of both kernels and their ratio, or {"skipped": why}."""
    import derive
    from derive.runtime import losses

    if "c" not in losses.available_backends():
        return {"skipped": "no C compiler: the generated C is what is compared"}
    hk = hand or derive.load(HAND_FILE)
    rng = np.random.default_rng(16)
    same = same_forms()
    todo = cases()
    rows = []
    for dtype in dtypes:
        for name, params, layout in todo:
            x, t, outs = _inputs(layout, dtype, sigmoid_n, softmax_shape, rng)
            fns = {"rules": getattr(derive.kernels, name), "hand": getattr(hk, name)}
            calls = {k: (lambda f=f: f(x, t, **params, reduction="none", backend="c", return_grad=True,
                                         threads=1, out=outs)) for k, f in fns.items()}
            res = {k: c() for k, c in calls.items()}  # warm-up
            _check_agree(f"{name} {params}", res["rules"], res["hand"], dtype)
            best = _race(calls, rounds)
            n_el = x.size
            rows.append({"kernel": name, "params": params, "dtype": dtype, "elements": n_el,
                         "rules_ns": best["rules"] / n_el * 1e9, "hand_ns": best["hand"] / n_el * 1e9,
                         "ratio": best["rules"] / best["hand"], "same_code": same[name]})
    rows += _second_rows(hk, same, todo, sigmoid_n, dtypes, rounds, rng)
    return {"rows": rows, "rounds": rounds}


def _second_rows(hk, same, todo, n, dtypes, rounds, rng):
    """The elementwise second-derivative kernels (derive_<kernel>_hess_<dt>, double backward), called through
    ctypes on both libraries: the forms the rules reorganise (distribute_bounded)."""
    import ctypes

    from derive.runtime import cbuild

    from derive.codegen import kernels as K

    shipped = {k.name: k.module for k in K.shipped_kernels()}
    (hand_module,) = hk.modules  # the one module of hand_forms.toml
    ptr = ctypes.c_void_p
    rows = []
    for dtype in dtypes:
        sfx, ct = ("f32", ctypes.c_float) if dtype == "float32" else ("f64", ctypes.c_double)
        x = rng.normal(0, 4, n).astype(dtype)
        t = (rng.random(n) < 0.1).astype(dtype)
        out = np.empty_like(x)
        for name, params, layout in todo:
            if layout != "sigmoid":
                continue
            libs = {"rules": cbuild.load(cbuild.GENERATED_DIR, shipped[name]),
                    "hand": cbuild.load(hk.generated, hand_module)}
            calls = {}
            for k, lib in libs.items():
                fn = getattr(lib, f"derive_{name}_hess_{sfx}")
                fn.argtypes = [ctypes.c_size_t, ptr, ptr] + [ct] * len(params) + [ptr]
                fn.restype = ctypes.c_int
                args = (n, x.ctypes.data, t.ctypes.data, *params.values(), out.ctypes.data)
                calls[k] = (lambda fn=fn, args=args: fn(*args))
            got = {}
            for k, c in calls.items():
                if c() != 0:
                    raise AssertionError(f"bench_rewrite: derive_{name}_hess_{sfx} failed ({k})")
                got[k] = out.copy()
            _check_agree(f"{name} hess {params}", [got["rules"]], [got["hand"]], dtype)
            best = _race(calls, rounds)
            rows.append({"kernel": name + " (hess)", "params": params, "dtype": dtype, "elements": n,
                         "rules_ns": best["rules"] / n * 1e9, "hand_ns": best["hand"] / n * 1e9,
                         "ratio": best["rules"] / best["hand"], "same_code": same[name + ":second"]})
    return rows


def format_table(res) -> str:
    if "skipped" in res:
        return f"rules' kernels vs hand-written: skipped ({res['skipped']})"
    lines = ["rules' kernels (derive.rewrite) vs the hand-written forms they replaced: generated C, loss + grad, "
             f"out=, 1 thread, fastest of {res['rounds']} alternating rounds",
             f"{'kernel':<28}{'params':<26}{'dtype':<9}{'rules ns/el':>12}{'hand ns/el':>12}{'rules/hand':>12}  forms",
             "-" * 111]
    for r in res["rows"]:
        p = ", ".join(f"{k}={v:g}" for k, v in r["params"].items()) or "-"
        lines.append(f"{r['kernel']:<28}{p:<26}{r['dtype']:<9}{r['rules_ns']:12.2f}{r['hand_ns']:12.2f}"
                     f"{r['ratio']:12.3f}  {'same' if r['same_code'] else 'differ'}")
    return "\n".join(lines)


def targets(res) -> list:
    """The 5% target over the kernels whose forms differ; the spread between identical loops is printed
    beside it, as what the figure can resolve."""
    if "skipped" in res:
        return []
    out = []
    differ = [r for r in res["rows"] if not r["same_code"]]
    if differ:
        worst = max(differ, key=lambda r: r["ratio"])
        p = ", ".join(f"{k}={v:g}" for k, v in worst["params"].items())
        out.append((f"rules' kernels within {round((TARGET - 1) * 100)}% of the hand-written ones, where the printed "
                    f"forms differ (worst: {worst['kernel']} {p} {worst['dtype']})", worst["ratio"] <= TARGET,
                    f"{worst['ratio']:.3f}x"))
    return out


def spread(res) -> str | None:
    """The ratio's range over the rows whose forms are the same (identical loops): what this measure resolves."""
    same = [r["ratio"] for r in res.get("rows", []) if r["same_code"]]
    if not same:
        return None
    return (f"note: where the printed forms are the same ({len(same)} rows, identical loops) rules/hand ranges "
            f"{min(same):.3f}x to {max(same):.3f}x: the spread of this measure (code placement, page state), not "
            "a difference of the forms")
    return out


def main(quick=False) -> dict:
    kw = {"sigmoid_n": 100_000, "softmax_shape": (2048, 80), "rounds": 5} if quick else {}
    res = run(**kw)
    print(format_table(res))
    for what, ok, fig in targets(res):
        print(f"target: {what}: {'met' if ok else 'NOT met'} ({fig})")
    if spread(res):
        print(spread(res))
    return res


__all__ = ["run", "format_table", "targets", "spread", "same_forms", "main", "HAND_FILE", "cases"]
