"""Kernel timings beside what people would use instead: forward + backward per element.

One process run measures every row of one configuration back to back (a quarter second of
idle, so that the previous row's spin-waiting thread pools have gone to sleep, then a warm-up,
then the median of repeated runs), so the ratios hold on a noisy machine.  Configurations:
sigmoid focal loss on 10^7 logits and softmax focal loss on (131072, 80), float32 and
float64, gamma = 2 and 0.5, 1 thread and all threads.  Rows:

* ``generated C``: ``derive.binary_focal_loss`` / ``derive.softmax_focal_loss``, backend C
  (argument checks and output allocation included: two fresh arrays per call, as the peers);
* ``generated C, out=``: the same with ``out=(loss, grad)`` reused from call to call, as a
  training loop would: the kernel's own speed, comparable with the bandwidth floor (whose
  copies also write into existing arrays);
* ``generated NumPy`` (and ``, out=``): the same functions, backend NumPy (single-threaded:
  1-thread rows only);
* ``closed form NumPy``: the note's closed forms, p_t = 1/(1 + e^{-yx}),
  -(1 - p_t)^gamma log p_t and y (1 - p_t)^gamma (gamma p_t log p_t + p_t - 1), in plain NumPy;
* ``sympy lambdify``: ``sympy.lambdify(cse=True)`` of the same closed forms;
* ``torch eager`` / ``torch.compile``: torchvision's formula (BCE-with-logits times
  (1 - p_t)^gamma) with autograd; ``jax jit``: ``jax.jit(jax.value_and_grad)`` of the same.
  Missing peers are listed as skipped.

The bandwidth floor is the time to move the same bytes (read logits and targets, write loss
and gradient), measured in the same run with NumPy copies; each row shows its ratio to it.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIGMOID_N = 10**7
SOFTMAX_SHAPE = (131072, 80)
GAMMAS = (2.0, 0.5)
DTYPES = ("float32", "float64")


#: seconds of idle before each row: thread pools that spin-wait after use (OpenMP's, XLA's)
#: go to sleep, so that no row runs beside the previous row's spinning threads
SETTLE_S = 0.25


def _timeit(fn, repeats, budget_s=4.0, settle_s=0.0):
    if settle_s:
        time.sleep(settle_s)
    fn()  # warm-up (compilation, first-touch of caches)
    times = []
    start = time.perf_counter()
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
    return statistics.median(times), len(times)


# ------------------------------------------------------------------------------------------
# the rows


def closed_form_numpy(x, y, gamma):
    """The note's closed forms (y in {-1, 1}), in plain NumPy."""
    pt = 1 / (1 + np.exp(-y * x))
    w = (1 - pt) ** gamma
    logpt = np.log(pt)
    return -w * logpt, y * w * (gamma * pt * logpt + pt - 1)


def closed_form_softmax_numpy(x, target, gamma):
    n = x.shape[0]
    e = np.exp(x - x.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    rows = np.arange(n)
    pt = p[rows, target]
    w = (1 - pt) ** gamma
    logpt = np.log(pt)
    loss = -w * logpt
    coef = w * (1 - gamma * pt * logpt / (1 - pt))  # d loss / d x_j = coef (p_j - [j == t])
    grad = coef[:, None] * p
    grad[rows, target] -= coef
    return loss, grad


def lambdified_closed_form():
    import sympy as sp

    x, y, g = sp.symbols("x y gamma", real=True)
    pt = 1 / (1 + sp.exp(-y * x))
    loss = -(1 - pt) ** g * sp.log(pt)
    grad = y * (1 - pt) ** g * (g * pt * sp.log(pt) + pt - 1)
    return sp.lambdify((x, y, g), (loss, grad), "numpy", cse=True)


def torch_rows(dtype, threads):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    tdt = getattr(torch, dtype)

    def sigmoid_focal(x, t, gamma):  # torchvision.ops.sigmoid_focal_loss, alpha < 0 (no weighting)
        p = torch.sigmoid(x)
        ce = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
        p_t = p * t + (1 - p) * (1 - t)
        return ce * ((1 - p_t) ** gamma)

    def softmax_focal(x, target, gamma):
        logpt = torch.log_softmax(x, dim=1).gather(1, target[:, None])[:, 0]
        return -((1 - logpt.exp()) ** gamma) * logpt

    def step(fn):
        def run(x, t, gamma):
            xr = x.detach().requires_grad_(True)
            loss = fn(xr, t, gamma)
            loss.sum().backward()
            return loss.detach(), xr.grad

        return run

    out = {"torch eager": (step(sigmoid_focal), step(softmax_focal))}
    try:
        cs, cm = torch.compile(sigmoid_focal), torch.compile(softmax_focal)
        out["torch.compile"] = (step(cs), step(cm))
    except Exception as exc:  # pragma: no cover - depends on the installation
        out["torch.compile"] = f"skipped: {type(exc).__name__}: {exc}"
    return torch, tdt, out


def jax_rows():
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    jax.config.update("jax_enable_x64", True)

    def sigmoid_focal(x, t, gamma):
        p = jax.nn.sigmoid(x)
        ce = jnp.logaddexp(0, x) - x * t  # binary_cross_entropy_with_logits
        p_t = p * t + (1 - p) * (1 - t)
        return ce * ((1 - p_t) ** gamma)

    def softmax_focal(x, target, gamma):
        logpt = jnp.take_along_axis(jax.nn.log_softmax(x, axis=1), target[:, None], axis=1)[:, 0]
        return -((1 - jnp.exp(logpt)) ** gamma) * logpt

    def vg(fn):
        f = jax.jit(jax.value_and_grad(lambda x, t, g: (lambda l: (l.sum(), l))(fn(x, t, g)), has_aux=True))

        def run(x, t, gamma):
            (_, loss), grad = f(x, t, gamma)
            grad.block_until_ready()
            return loss, grad

        return run

    return jax, jnp, (vg(sigmoid_focal), vg(softmax_focal))


# ------------------------------------------------------------------------------------------


def bandwidth_floor(bytes_per_elem, n_elems, dtype, repeats):
    """Seconds per element to read and write ``bytes_per_elem`` bytes per element: two NumPy
    copies of arrays of the run's size (read 2, write 2), timed like the rows."""
    a = np.ones(n_elems, dtype=dtype)
    b = np.ones(n_elems, dtype=dtype)
    c = np.empty_like(a)
    d = np.empty_like(a)

    def copy():
        np.copyto(c, a)
        np.copyto(d, b)

    t, _ = _timeit(copy, repeats)
    bw = 4 * a.nbytes / t
    return bytes_per_elem / bw, bw


def peak_extra_memory(kind="sigmoid", dtype="float32"):
    """Peak resident memory of one C call beyond its inputs and outputs, in a fresh process:
    Linux's high-water mark (VmHWM) is reset just before the call (/proc/self/clear_refs),
    so the figure is the call's own peak minus the resident size before it, minus the
    outputs.  Two calls: with ``out=`` (outputs allocated and touched before the reset) and
    with fresh outputs.  (None, None, None) where the kernel cannot reset the mark."""
    code = f"""
import numpy as np, derive

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024

def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

if {kind!r} == "sigmoid":
    x = np.full({SIGMOID_N}, 0.5, dtype={dtype!r}); t = np.zeros(x.size, dtype={dtype!r}); t[::3] = 1
    call = lambda **kw: derive.binary_focal_loss(x, t, gamma=0.5, return_grad=True, backend="c", **kw)
    shapes = (x.shape, x.shape)
else:
    x = np.full({SOFTMAX_SHAPE}, 0.5, dtype={dtype!r}); t = np.arange(x.shape[0]) % x.shape[1]
    call = lambda **kw: derive.softmax_focal_loss(x, t, gamma=0.5, return_grad=True, backend="c", **kw)
    shapes = (x.shape[:1], x.shape)
out_bytes = sum(int(np.prod(s)) for s in shapes) * x.itemsize
derive.binary_focal_loss(np.zeros(8, x.dtype), np.zeros(8, x.dtype), backend="c")  # build and load first
outs = tuple(np.ones(s, dtype=x.dtype) for s in shapes)  # touched: resident before the reset
reset(); base = status("VmRSS:")
call(out=outs)
reused = status("VmHWM:") - base
del outs
reset(); base = status("VmRSS:")
res = call()
fresh = status("VmHWM:") - base - out_bytes
print(reused, fresh, out_bytes)
"""
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return None, None, None
    if res.returncode != 0:
        return None, None, None
    reused, fresh, out = res.stdout.split()
    return int(reused), int(fresh), int(out)


def run(sigmoid_n=SIGMOID_N, softmax_shape=SOFTMAX_SHAPE, gammas=GAMMAS, dtypes=DTYPES, threads=None, repeats=7,
        peers=True, memory=True):
    from derive.runtime import cbuild
    from derive.runtime import losses

    all_threads = os.cpu_count() or 1
    thread_counts = threads or sorted({1, all_threads})
    have_c = "c" in losses.available_backends()
    lib = cbuild.load() if have_c else None
    rng = np.random.default_rng(0)
    lam = lambdified_closed_form()
    skipped = {}
    tor = jx = None
    if peers:
        jx = jax_rows()
        if jx is None:
            skipped["jax jit"] = "skipped: jax not installed"
    else:
        skipped["torch eager"] = skipped["torch.compile"] = skipped["jax jit"] = "skipped: peers off (--no-peers)"
    if not have_c:
        skipped["generated C"] = "skipped: no C compiler"
    results = []
    for dtype in dtypes:
        x = (rng.standard_normal(sigmoid_n) * 3).astype(dtype)
        t = (rng.random(sigmoid_n) < 0.5).astype(dtype)
        y = (2 * t - 1).astype(dtype)
        xs = (rng.standard_normal(softmax_shape) * 3).astype(dtype)
        ts = rng.integers(0, softmax_shape[1], softmax_shape[0])
        isz = np.dtype(dtype).itemsize
        floors = {
            "sigmoid": bandwidth_floor(4 * isz, sigmoid_n, dtype, repeats),
            "softmax": bandwidth_floor(2 * isz + (8 + isz) / softmax_shape[1], sigmoid_n, dtype, repeats),
        }
        for nth in thread_counts:
            if peers:
                tor = torch_rows(dtype, nth)
                if tor is None:
                    skipped["torch eager"] = skipped["torch.compile"] = "skipped: torch not installed"
            for gamma in gammas:
                for kind in ("sigmoid", "softmax"):
                    n_el = sigmoid_n if kind == "sigmoid" else xs.size
                    rows = []
                    g = np.dtype(dtype).type(gamma)
                    outs = (np.empty_like(x), np.empty_like(x)) if kind == "sigmoid" else \
                        (np.empty(xs.shape[0], dtype=dtype), np.empty_like(xs))
                    if kind == "sigmoid":
                        def ours(backend, nth=nth, **kw):
                            return lambda: losses.binary_focal_loss(x, t, gamma, backend=backend, return_grad=True,
                                                                    threads=nth, **kw)
                    else:
                        def ours(backend, nth=nth, **kw):
                            return lambda: losses.softmax_focal_loss(xs, ts, gamma=gamma, backend=backend,
                                                                     return_grad=True, threads=nth, **kw)
                    if have_c:
                        rows.append(("generated C", ours("c")))
                        rows.append(("generated C, out=", ours("c", out=outs)))
                    if nth == 1:
                        rows.append(("generated NumPy", ours("numpy")))
                        rows.append(("generated NumPy, out=", ours("numpy", out=outs)))
                        if kind == "sigmoid":
                            rows.append(("closed form NumPy", lambda: closed_form_numpy(x, y, g)))
                            rows.append(("sympy lambdify", lambda: lam(x, y, g)))
                        else:
                            rows.append(("closed form NumPy", lambda: closed_form_softmax_numpy(xs, ts, g)))
                    if tor is not None:
                        torch, tdt, fns = tor
                        if kind == "sigmoid":
                            tx, tt = torch.from_numpy(x), torch.from_numpy(t)
                        else:
                            tx, tt = torch.from_numpy(xs), torch.from_numpy(ts)
                        for name, pair in fns.items():
                            if isinstance(pair, str):
                                skipped[name] = pair
                                continue
                            fn = pair[0] if kind == "sigmoid" else pair[1]
                            rows.append((name, lambda fn=fn, tx=tx, tt=tt: fn(tx, tt, gamma)))
                    if jx is not None and nth == thread_counts[-1]:
                        jax, jnp, (js, jm) = jx
                        if kind == "sigmoid":
                            jxa, jta, fn = jnp.asarray(x), jnp.asarray(t), js
                        else:
                            jxa, jta, fn = jnp.asarray(xs), jnp.asarray(ts), jm
                        rows.append(("jax jit", lambda fn=fn, a=jxa, b=jta: fn(a, b, g)))
                    floor_s, bw = floors[kind]
                    for name, fn in rows:
                        try:
                            med, reps = _timeit(fn, repeats, settle_s=SETTLE_S)
                        except Exception as exc:  # a peer that fails is reported, not fatal
                            skipped[name] = f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                            continue
                        ns = med / n_el * 1e9
                        results.append({"kernel": f"{kind} focal", "dtype": dtype, "gamma": gamma,
                                        "threads": nth if not name.startswith("jax") else "xla",
                                        "row": name, "ns_per_elem": ns, "repeats": reps,
                                        "floor_ns": floor_s * 1e9, "x_floor": ns / (floor_s * 1e9),
                                        "bandwidth_GBps": bw / 1e9})
    mem = {}
    if memory and have_c:
        for kind in ("sigmoid", "softmax"):
            reused, fresh, out = peak_extra_memory(kind)
            mem[kind] = {"extra_bytes_out": reused, "extra_bytes_fresh": fresh, "output_bytes": out}
    info = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {_cpu_name()}",
        "python": sys.version.split()[0], "numpy": np.__version__,
        "flags": list(cbuild.build_flags()) if have_c else None,
        "vector_math": bool(getattr(lib, f"derive_{cbuild.DEFAULT_MODULE}_vector_math")()) if lib is not None else None,
        "sizes": {"sigmoid": sigmoid_n, "softmax": list(softmax_shape)},
        "peers": _peer_versions(),
    }
    return {"info": info, "results": results, "skipped": skipped, "memory": mem}


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _peer_versions():
    out = {}
    for mod in ("torch", "jax"):
        if mod in sys.modules:
            out[mod] = getattr(sys.modules[mod], "__version__", "?")
    return out


def format_table(res) -> str:
    lines = []
    info = res["info"]
    lines.append(f"machine: {info['machine']}; Python {info['python']}, NumPy {info['numpy']}"
                 + "".join(f", {k} {v}" for k, v in info["peers"].items()))
    if info["flags"]:
        lines.append(f"C flags: {' '.join(info['flags'])}; vector math (libmvec): "
                     f"{'yes' if info['vector_math'] else 'no'}")
    head = f"{'kernel':<15} {'dtype':<8} {'gamma':>5} {'thr':>4}  {'row':<18} {'ns/elem':>8} {'x floor':>8} {'C faster':>9}"
    lines += [head, "-" * len(head)]
    groups = {}
    for r in res["results"]:
        groups.setdefault((r["kernel"], r["dtype"], r["gamma"]), []).append(r)
    for (kernel, dtype, gamma), rows in groups.items():
        floor = rows[0]["floor_ns"]
        lines.append(f"{kernel:<15} {dtype:<8} {gamma:>5g} {'':>4}  {'bandwidth floor':<18} {floor:8.2f} {1:8.1f}"
                     f"  ({rows[0]['bandwidth_GBps']:.1f} GB/s)")
        c1 = {r["threads"]: r["ns_per_elem"] for r in rows if r["row"] == "generated C"}
        for r in rows:
            ref = c1.get(r["threads"], c1.get(1)) if r["threads"] != "xla" else min(c1.values(), default=None)
            faster = f"{r['ns_per_elem'] / ref:8.1f}x" if ref and r["row"] != "generated C" else ""
            lines.append(f"{'':<15} {'':<8} {'':>5} {str(r['threads']):>4}  {r['row']:<18} {r['ns_per_elem']:8.2f}"
                         f" {r['x_floor']:8.1f} {faster:>9}")
    for name, why in sorted(res["skipped"].items()):
        lines.append(f"{name}: {why}")
    for kind, m in res["memory"].items():
        if m["extra_bytes_out"] is None:
            lines.append(f"peak extra memory ({kind}, C): not measured (no /proc/self/clear_refs)")
        else:
            lines.append(f"peak extra memory of one C call ({kind} float32, outputs {m['output_bytes'] / 2**20:.0f} MiB): "
                         f"{m['extra_bytes_out'] / 2**20:+.2f} MiB with out=, "
                         f"{m['extra_bytes_fresh'] / 2**20:+.2f} MiB beyond its fresh outputs")
    return "\n".join(lines)


def targets(res) -> list:
    """The issue's targets, each with its measured figure (printed, never asserted).  The C
    targets are given for both C rows: fresh outputs (what the peers do: every call allocates)
    and ``out=`` (outputs reused, like the floor's copies)."""
    out = []
    by = {}
    for r in res["results"]:
        by[(r["kernel"], r["dtype"], r["gamma"], r["threads"], r["row"])] = r
    c_rows = (("generated C", "fresh outputs"), ("generated C, out=", "out="))
    for gamma, bound in ((2.0, 3), (0.5, 8)):
        for row, how in c_rows:
            r = by.get(("sigmoid focal", "float32", gamma, 1, row))
            if r:
                out.append((f"C float32 sigmoid, gamma {gamma:g}, 1 thread, {how}: within {bound}x the floor",
                            r["x_floor"] <= bound, f"{r['x_floor']:.1f}x"))
    for kind in ("sigmoid focal", "softmax focal"):
        for gamma in GAMMAS:
            for row, how in c_rows:
                c = by.get((kind, "float32", gamma, 1, row))
                for peer, thr in (("torch.compile", 1), ("jax jit", "xla")):
                    p = by.get((kind, "float32", gamma, thr, peer))
                    if c and p:
                        ratio = p["ns_per_elem"] / c["ns_per_elem"]
                        out.append((f"C float32 {kind}, gamma {gamma:g}, 1 thread, {how}: 5x faster than {peer}",
                                    ratio >= 5, f"{ratio:.1f}x"))
    nmax = max((r["threads"] for r in res["results"] if isinstance(r["threads"], int)), default=1)
    if nmax > 1:
        for row, how in c_rows:
            c1 = by.get(("sigmoid focal", "float32", 0.5, 1, row))
            cn = by.get(("sigmoid focal", "float32", 0.5, nmax, row))
            if c1 and cn:
                sp = c1["ns_per_elem"] / cn["ns_per_elem"]
                out.append((f"C float32 sigmoid gamma 0.5, {how}: {nmax} threads >= 1.5x 1 thread", sp >= 1.5,
                            f"{sp:.2f}x"))
    for kind in ("sigmoid focal", "softmax focal"):
        for dtype in DTYPES:
            for gamma in GAMMAS:
                g = by.get((kind, dtype, gamma, 1, "generated NumPy"))
                cf = by.get((kind, dtype, gamma, 1, "closed form NumPy"))
                te = by.get((kind, dtype, gamma, 1, "torch eager"))
                if g and cf:
                    ratio = g["ns_per_elem"] / cf["ns_per_elem"]
                    out.append((f"generated NumPy {kind} {dtype} gamma {gamma:g} within 2.5x of the closed form",
                                ratio <= 2.5, f"{ratio:.2f}x"))
                if g and te:
                    out.append((f"generated NumPy {kind} {dtype} gamma {gamma:g} faster than torch eager",
                                g["ns_per_elem"] < te["ns_per_elem"], f"{te['ns_per_elem'] / g['ns_per_elem']:.2f}x"))
    for kind, m in res.get("memory", {}).items():
        if m.get("extra_bytes_out") is not None:
            out.append((f"C {kind}: no memory beyond the outputs (out=)", m["extra_bytes_out"] <= 2**20,
                        f"{m['extra_bytes_out'] / 2**20:+.2f} MiB"))
    return out


def main(argv=None, out_path="out/bench-kernels.json", **kw) -> int:
    res = run(**kw)
    print(format_table(res))
    for what, ok, fig in targets(res):
        print(f"target: {what}: {'met' if ok else 'NOT met'} ({fig})")
    if out_path:
        path = Path(out_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1))
        print(f"wrote {path}")
    return 0


__all__ = ["run", "format_table", "targets", "main", "closed_form_numpy", "lambdified_closed_form"]
