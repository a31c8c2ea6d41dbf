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
  (1 - p_t)^gamma) summed, with autograd (the sum inside the compiled function: the same
  reduction as the derive.torch rows, which earlier versions of this table summed outside the
  compiled function: slower, a loss array written and read; compiled once per thread count, in
  the row's warm-up);
  ``jax jit``: ``jax.jit(jax.value_and_grad)`` of the same;
* ``derive.torch op``: the drop-ins of :mod:`derive.torch` as a training step calls them,
  ``sigmoid_focal_loss(x, t, alpha=-1, gamma, reduction="sum").backward()`` (and
  ``softmax_focal_loss``, ``cross_entropy``), fwd + bwd through autograd on the same torch
  threads as the torch rows (derive.torch gives the C kernels torch's thread count): one reduced
  kernel pass (loss summed, gradient written), its gradient buffer reused from call to call
  (derive.runtime.torch_ops.REUSE_GRAD); ``derive.torch op, fresh grad``: the same with a fresh
  gradient every call, as the peers allocate theirs;
* ``derive.jax op`` beside ``optax jit``: :mod:`derive.jax`'s drop-ins and optax's functions
  (``sigmoid_focal_loss``, ``softmax_cross_entropy_with_integer_labels``; optax has no softmax
  focal loss) under the same ``jax.jit(jax.value_and_grad)``.
  Missing peers are listed as skipped.

A third configuration, ``softmax CE`` (the softmax cross-entropy, gamma = 0, on the softmax
shape), compares ``derive.kernels.softmax_ce``, ``derive.torch.cross_entropy`` and
``derive.jax.softmax_cross_entropy_with_integer_labels`` with ``F.cross_entropy`` and optax.
The ratios of each derive op to its peers are printed and kept in the JSON (``ratios``).
Per-call cost (``overhead``): the derive.torch and derive.jax ops on 1,000 elements, fwd + bwd
and forward alone, beside an empty op of the same shape (``x * 1``) used the same way; the
difference is the op's overhead per call.

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

#: the rows of each peer (listed as skipped, never dropped silently, when it is missing)
TORCH_ROWS = ("derive.torch op", "derive.torch op, fresh grad", "torch eager", "torch.compile")
JAX_ROWS = ("derive.jax op", "optax jit", "jax jit")
KIND_LABEL = {"sigmoid": "sigmoid focal", "softmax": "softmax focal", "ce": "softmax CE"}


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


def _skip(exc) -> str:
    return f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"


def torch_rows(dtype, threads):
    """``(torch, {row: {kind: fn(x, t, gamma) -> (loss, grad)} or "skipped: why"})`` for the kinds
    "sigmoid" (focal), "softmax" (focal) and "ce" (softmax cross-entropy), fwd + bwd through
    autograd on ``threads`` intra-op threads (``torch.set_num_threads``; derive.torch passes the
    same number to the C kernels).  None without torch."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)

    def sigmoid_focal(x, t, gamma):  # torchvision.ops.sigmoid_focal_loss, alpha < 0 (no weighting)
        p = torch.sigmoid(x)
        ce = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
        p_t = p * t + (1 - p) * (1 - t)
        return ce * ((1 - p_t) ** gamma)

    def softmax_focal(x, target, gamma):
        logpt = torch.log_softmax(x, dim=1).gather(1, target[:, None])[:, 0]
        return -((1 - logpt.exp()) ** gamma) * logpt

    def softmax_ce(x, target, gamma):  # gamma = 0: the focal loss is the cross-entropy
        return torch.nn.functional.cross_entropy(x, target, reduction="none")

    def step(fn, before=None):
        def run(x, t, gamma):
            undo = before() if before is not None else None  # a setting for this call, put back after it
            try:
                xr = x.detach().requires_grad_(True)
                loss = fn(xr, t, gamma)
                (loss if loss.ndim == 0 else loss.sum()).backward()
                return loss.detach(), xr.grad
            finally:
                if undo is not None:
                    undo()

        return run

    def summed(f):  # the same reduction as the derive.torch rows: the sum inside the (compiled) function
        return lambda x, t, gamma: f(x, t, gamma).sum()

    formulas = {"sigmoid": sigmoid_focal, "softmax": softmax_focal, "ce": softmax_ce}
    out = {"torch eager": {kind: step(summed(f)) for kind, f in formulas.items()}}
    try:  # compiled on the first call: the warm-up of each row, outside the timing
        torch._dynamo.reset()  # a fresh compile for this thread count (Inductor's C++ fixes its threads)
        out["torch.compile"] = {kind: step(torch.compile(summed(f))) for kind, f in formulas.items()}
    except Exception as exc:  # pragma: no cover - depends on the installation
        out["torch.compile"] = _skip(exc)
    try:
        import derive.torch as dt
        from derive.runtime import torch_ops
    except Exception as exc:  # pragma: no cover - a torch derive.torch does not support
        out["derive.torch op"] = out["derive.torch op, fresh grad"] = _skip(exc)
    else:  # the drop-ins as a user calls them: the loss summed by the op, then backward
        def reuse(on):
            def set_reuse():
                prev, torch_ops.REUSE_GRAD = torch_ops.REUSE_GRAD, on
                return lambda: setattr(torch_ops, "REUSE_GRAD", prev)
            return set_reuse

        calls = {
            "sigmoid": lambda x, t, g: dt.sigmoid_focal_loss(x, t, alpha=-1, gamma=g, reduction="sum"),
            "softmax": lambda x, t, g: dt.softmax_focal_loss(x, t, gamma=g, reduction="sum"),
            "ce": lambda x, t, g: dt.cross_entropy(x, t, reduction="sum"),
        }
        out["derive.torch op"] = {kind: step(f, reuse(True)) for kind, f in calls.items()}
        # the gradient pool off: a fresh (huge-page advised) gradient every call, as the peers allocate
        out["derive.torch op, fresh grad"] = {kind: step(f, reuse(False)) for kind, f in calls.items()}
    return torch, out


def jax_rows():
    """``(jax, jnp, {row: {kind: fn} or "skipped: why"}, derive.jax's backend)``: each fn is
    ``jax.jit(jax.value_and_grad)`` of the loss summed (the per-element loss kept as aux), on
    XLA's threads.  Rows: ``jax jit`` (the formulas written out), ``optax jit`` (optax's
    functions, where optax defines the loss: no softmax focal loss), ``derive.jax op``
    (derive.jax's drop-ins through XLA's FFI; its C kernels on OpenMP's default thread count,
    all cores unless OMP_NUM_THREADS says otherwise).  None without jax."""
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

    out = {"jax jit": {"sigmoid": vg(sigmoid_focal), "softmax": vg(softmax_focal)}}
    try:
        import optax
    except ImportError:
        out["optax jit"] = "skipped: optax not installed"
    else:
        out["optax jit"] = {
            "sigmoid": vg(lambda x, t, g: optax.sigmoid_focal_loss(x, t, gamma=g)),
            "ce": vg(lambda x, t, g: optax.softmax_cross_entropy_with_integer_labels(x, t)),
        }
    backend = None
    try:
        import derive.jax as dj

        backend = "ffi"
        try:  # the FFI path when it can be built, else say that the row is the pure_callback one
            dj.sigmoid_focal_loss(jnp.zeros(4), jnp.zeros(4), gamma=2.0, backend="ffi").block_until_ready()
        except Exception:
            backend = "callback"
        kern = dj.kernels
    except Exception as exc:  # pragma: no cover - an installation derive.jax does not support
        out["derive.jax op"] = _skip(exc)
    else:
        out["derive.jax op"] = {
            "sigmoid": vg(lambda x, t, g: dj.sigmoid_focal_loss(x, t, gamma=g, backend=backend)),
            "softmax": vg(lambda x, t, g: kern.softmax_focal(x, t, gamma=g, backend=backend)),
            "ce": vg(lambda x, t, g: dj.softmax_cross_entropy_with_integer_labels(x, t, backend=backend)),
        }
    return jax, jnp, out, backend


def _per_call(fns, budget_s=2.0, calls=200, samples=15, settle_s=0.0):
    """``[(fastest, median, calls)]``, seconds per call of each fast function of ``fns``, timed
    in batches of ``calls`` calls (a per-call timer would time itself) taken in turn, one batch
    of each function after the other, so that a change of the machine's load falls on all of
    them alike (an op and its empty op: their difference is the figure).  After a warm-up batch
    each.  The fastest batch is the figure: a fixed per-call cost is what remains when nothing
    else ran (other processes' preemptions only add), as timeit's documentation argues.  The
    fourth figure is the fastest batch's CPU time of the calling thread (time.thread_time):
    on a machine shared with other work, the time the calls themselves used, without the other
    processes' share of the cores (for torch at 1,000 elements every part of a call runs on the
    calling thread: one intra-op thread, the C kernel below its threading threshold, the CPU
    autograd engine on the caller)."""
    if settle_s:
        time.sleep(settle_s)
    for fn in fns:
        for _ in range(calls):
            fn()
    times = [[] for _ in fns]
    cpu = [[] for _ in fns]
    start = time.perf_counter()
    for i in range(samples):
        for fn, out, out_cpu in zip(fns, times, cpu):
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(calls):
                fn()
            out_cpu.append((time.thread_time() - c0) / calls)
            out.append((time.perf_counter() - t0) / calls)
        if i >= 2 and time.perf_counter() - start > budget_s * len(fns):
            break
    return [(min(t), statistics.median(t), len(t) * calls, min(c)) for t, c in zip(times, cpu)]


def _time_pairs(pairs, budget_s, threads):
    """Rows for ``pairs`` = ((name, fn), ...), each op timed in turn with the empty op after it."""
    rows = []
    for k in range(0, len(pairs), 2):
        names = [name for name, _ in pairs[k:k + 2]]
        for name, (fast, med, calls, cpu) in zip(names, _per_call([fn for _, fn in pairs[k:k + 2]], budget_s,
                                                                 settle_s=SETTLE_S)):
            rows.append({"row": name, "us_per_call": fast * 1e6, "median_us": med * 1e6, "calls": calls,
                         "threads": threads, "cpu_us_per_call": cpu * 1e6})
    return rows


OVERHEAD_N = 1000


def overhead(n=OVERHEAD_N, budget_s=2.0, with_jax=True):
    """Per-call cost of the derive.torch and derive.jax ops on ``n`` float32 logits (sigmoid
    focal loss, gamma = 2, alpha < 0), each beside an empty op of the same shape (``x * 1``),
    used the same way and timed in turn with it, so that the difference is what derive adds per call (argument checks,
    dispatch, the C call, and the kernel's own few microseconds on ``n`` elements).  torch on
    one thread (``n`` is below the kernels' threading threshold anyway).  ``(rows, skipped)``:
    rows of {"row", "us_per_call" (the fastest batch's), "median_us", "calls"}, none for a
    missing peer."""
    rows, skipped = [], {}
    rng = np.random.default_rng(0)
    xn = (rng.standard_normal(n) * 3).astype(np.float32)
    tn = (rng.random(n) < 0.5).astype(np.float32)
    try:
        import torch

        import derive.torch as dt
    except Exception as exc:
        skipped["overhead (torch)"] = _skip(exc) if not isinstance(exc, ImportError) else \
            "skipped: torch not installed"
    else:
        torch.set_num_threads(1)
        x, t = torch.from_numpy(xn), torch.from_numpy(tn)

        def fb(f):
            def run():
                xr = x.detach().requires_grad_(True)
                f(xr).backward()
                return xr.grad

            return run

        pairs = (
            ("derive.torch op, fwd+bwd", fb(lambda xr: dt.sigmoid_focal_loss(xr, t, alpha=-1, gamma=2.0,
                                                                             reduction="sum"))),
            ("empty torch op (x*1), fwd+bwd", fb(lambda xr: (xr * 1).sum())),
            ("derive.torch op, forward", lambda: dt.sigmoid_focal_loss(x, t, alpha=-1, gamma=2.0)),
            ("empty torch op (x*1), forward", lambda: x * 1),
        )
        rows += [dict(r, n=n) for r in _time_pairs(pairs, budget_s, 1)]
    try:
        if not with_jax:
            raise ImportError("not asked for")
        import jax
        import jax.numpy as jnp

        import derive.jax as dj
    except Exception as exc:
        skipped["overhead (jax)"] = _skip(exc) if not isinstance(exc, ImportError) else (
            "skipped: jax not installed" if with_jax else "skipped: --torch-only")
    else:
        jx, jt = jnp.asarray(xn), jnp.asarray(tn)
        ours = jax.jit(jax.value_and_grad(lambda a: dj.sigmoid_focal_loss(a, jt, gamma=2.0).sum()))
        empty = jax.jit(jax.value_and_grad(lambda a: (a * 1).sum()))
        ours_f = jax.jit(lambda a: dj.sigmoid_focal_loss(a, jt, gamma=2.0))
        empty_f = jax.jit(lambda a: a * 1)
        pairs = (
            ("derive.jax op, jit fwd+bwd", lambda: ours(jx)[1].block_until_ready()),
            ("empty jax op (x*1), jit fwd+bwd", lambda: empty(jx)[1].block_until_ready()),
            ("derive.jax op, jit forward", lambda: ours_f(jx).block_until_ready()),
            ("empty jax op (x*1), jit forward", lambda: empty_f(jx).block_until_ready()),
        )
        rows += [dict(r, n=n) for r in _time_pairs(pairs, budget_s, "xla")]
    return rows, skipped


def overhead_figures(rows, key="us_per_call") -> list:
    """(what, microseconds): each op's time per call minus its empty op's (``key``: "us_per_call",
    wall-clock, or "cpu_us_per_call", the calling thread's CPU time)."""
    by = {r["row"]: r.get(key) for r in rows if r.get(key) is not None}
    out = []
    for lib, how in (("torch", "fwd+bwd"), ("torch", "forward"), ("jax", "jit fwd+bwd"), ("jax", "jit forward")):
        ours, empty = by.get(f"derive.{lib} op, {how}"), by.get(f"empty {lib} op (x*1), {how}")
        if ours is not None and empty is not None:
            out.append((f"derive.{lib} op, {how}", ours - empty))
    return out


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
        peers=True, memory=True, overhead_n=OVERHEAD_N, torch_only=False):
    """Every row of every configuration; ``torch_only``: the generated C and the torch rows alone
    (no NumPy, SymPy or JAX rows, no memory figures; the torch per-call overhead kept)."""
    import derive
    from derive.runtime import cbuild
    from derive.runtime import losses

    all_threads = os.cpu_count() or 1
    thread_counts = threads or sorted({1, all_threads})
    have_c = "c" in losses.available_backends()
    lib = cbuild.load() if have_c else None
    # the C kernels' thread count where nobody sets it (derive.jax's calls from XLA's threads)
    omp_default = int(lib.derive_get_num_threads()) if lib is not None else None
    load_before = _load_average()
    rng = np.random.default_rng(0)
    lam = lambdified_closed_form()
    skipped = {}
    tor = jx = None
    jax_backend = None
    if torch_only:
        memory = False
        for name in JAX_ROWS:
            skipped[name] = "skipped: --torch-only"
    if peers and torch_only:
        pass  # the torch rows below; no JAX
    elif peers:
        jx = jax_rows()
        if jx is None:
            for name in JAX_ROWS:
                skipped[name] = "skipped: jax not installed"
        else:
            jax_backend = jx[3]
            for name, fns in jx[2].items():
                if isinstance(fns, str):
                    skipped[name] = fns
    else:
        for name in TORCH_ROWS + JAX_ROWS + ("overhead",):
            skipped[name] = "skipped: peers off (--no-peers)"
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
        floors["ce"] = floors["softmax"]
        # the focal losses at each gamma, then the softmax cross-entropy (gamma = 0) once
        configs = [(gamma, kind) for gamma in gammas for kind in ("sigmoid", "softmax")] + [(0.0, "ce")]
        for nth in thread_counts:
            if peers:
                tor = torch_rows(dtype, nth)
                if tor is None:
                    for name in TORCH_ROWS:
                        skipped[name] = "skipped: torch not installed"
            for gamma, kind in configs:
                n_el = sigmoid_n if kind == "sigmoid" else xs.size
                rows = []
                g = np.dtype(dtype).type(gamma)
                outs = (np.empty_like(x), np.empty_like(x)) if kind == "sigmoid" else \
                    (np.empty(xs.shape[0], dtype=dtype), np.empty_like(xs))
                if kind == "sigmoid":
                    def ours(backend, nth=nth, gamma=gamma, **kw):
                        return lambda: losses.binary_focal_loss(x, t, gamma, backend=backend, return_grad=True,
                                                                threads=nth, **kw)
                elif kind == "softmax":
                    def ours(backend, nth=nth, gamma=gamma, **kw):
                        return lambda: losses.softmax_focal_loss(xs, ts, gamma=gamma, backend=backend,
                                                                 return_grad=True, threads=nth, **kw)
                else:
                    def ours(backend, nth=nth, **kw):
                        return lambda: derive.kernels.softmax_ce(xs, ts, backend=backend, return_grad=True,
                                                                 threads=nth, **kw)
                if have_c:
                    rows.append(("generated C", ours("c")))
                    rows.append(("generated C, out=", ours("c", out=outs)))
                if nth == 1 and kind != "ce" and not torch_only:
                    rows.append(("generated NumPy", ours("numpy")))
                    rows.append(("generated NumPy, out=", ours("numpy", out=outs)))
                    if kind == "sigmoid":
                        rows.append(("closed form NumPy", lambda g=g: closed_form_numpy(x, y, g)))
                        rows.append(("sympy lambdify", lambda g=g: lam(x, y, g)))
                    else:
                        rows.append(("closed form NumPy", lambda g=g: closed_form_softmax_numpy(xs, ts, g)))
                if tor is not None:
                    torch, fns = tor
                    if kind == "sigmoid":
                        tx, tt = torch.from_numpy(x), torch.from_numpy(t)
                    else:
                        tx, tt = torch.from_numpy(xs), torch.from_numpy(ts)
                    for name, by_kind in fns.items():
                        if isinstance(by_kind, str):
                            skipped[name] = by_kind
                            continue
                        fn = by_kind[kind]
                        rows.append((name, lambda fn=fn, tx=tx, tt=tt, gamma=gamma: fn(tx, tt, gamma)))
                if jx is not None and nth == thread_counts[-1]:  # XLA runs on all its threads
                    jax, jnp, fns, _ = jx
                    if kind == "sigmoid":
                        jxa, jta = jnp.asarray(x), jnp.asarray(t)
                    else:
                        jxa, jta = jnp.asarray(xs), jnp.asarray(ts)
                    for name, by_kind in fns.items():
                        if not isinstance(by_kind, str) and kind in by_kind:
                            rows.append((name, lambda fn=by_kind[kind], a=jxa, b=jta, g=g: fn(a, b, g)))
                floor_s, bw = floors[kind]
                for name, fn in rows:
                    try:
                        med, reps = _timeit(fn, repeats, settle_s=SETTLE_S)
                    except Exception as exc:  # a peer that fails is reported, not fatal
                        skipped[name] = _skip(exc)
                        continue
                    ns = med / n_el * 1e9
                    results.append({"kernel": KIND_LABEL[kind], "dtype": dtype, "gamma": gamma,
                                    "threads": "xla" if name in JAX_ROWS else nth,
                                    "row": name, "ns_per_elem": ns, "repeats": reps,
                                    "floor_ns": floor_s * 1e9, "x_floor": ns / (floor_s * 1e9),
                                    "bandwidth_GBps": bw / 1e9})
    over = []
    if peers and overhead_n:
        over, why = overhead(overhead_n, with_jax=not torch_only)
        skipped.update(why)
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
        "sizes": {"sigmoid": sigmoid_n, "softmax": list(softmax_shape), "overhead": overhead_n},
        "peers": _peer_versions(),
        "threads": {"counts": list(thread_counts), "c_default": omp_default},
        "load_average": {"before": load_before, "after": _load_average()},
        "derive.jax backend": jax_backend,
        # torch's CPU allocator asks for transparent huge pages only with this set (NumPy does for
        # large arrays): unset, every fresh output of a torch row faults in 4 KiB pages
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
    }
    res = {"info": info, "results": results, "skipped": skipped, "memory": mem, "overhead": over}
    res["ratios"] = ratios(res)
    return res


def _load_average():
    """The 1, 5 and 15 minute load averages (other processes' share of the CPUs), None where
    the system does not say."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


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
    for mod in ("torch", "jax", "optax"):
        if mod in sys.modules:
            out[mod] = getattr(sys.modules[mod], "__version__", "?")
    return out


#: (ours, peer): the comparisons printed for every configuration where both rows ran
RATIOS = (("derive.torch op", "torch.compile"), ("derive.torch op, fresh grad", "torch.compile"),
          ("derive.torch op", "torch eager"),
          ("derive.jax op", "optax jit"), ("derive.jax op", "jax jit"))


def ratios(res) -> list:
    """How many times faster each derive op is than its peers, same configuration and threads:
    {"kernel", "dtype", "gamma", "threads", "ours", "peer", "x_faster"} (peer time / ours)."""
    by = {(r["kernel"], r["dtype"], r["gamma"], r["threads"], r["row"]): r["ns_per_elem"] for r in res["results"]}
    out = []
    for (kernel, dtype, gamma, thr, row), ns in by.items():
        for ours, peer in RATIOS:
            if row == ours and (kernel, dtype, gamma, thr, peer) in by:
                out.append({"kernel": kernel, "dtype": dtype, "gamma": gamma, "threads": thr, "ours": ours,
                            "peer": peer, "x_faster": by[(kernel, dtype, gamma, thr, peer)] / ns})
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
    thr = info.get("threads", {})
    lines.append("thr: torch.set_num_threads and the C kernels' threads (generated C: threads=; derive.torch passes "
                 "torch's count to the C); xla: XLA's own thread pool, with derive.jax's C kernels on the C default "
                 f"({thr.get('c_default')} threads)" + (f"; derive.jax through {info['derive.jax backend']}"
                                                        if info.get("derive.jax backend") else ""))
    if "torch" in info["peers"]:
        thp = info.get("THP_MEM_ALLOC_ENABLE")
        lines.append(f"torch allocator: THP_MEM_ALLOC_ENABLE={thp}" if thp else
                     "torch allocator: THP_MEM_ALLOC_ENABLE unset (torch's fresh outputs fault in 4 KiB pages, "
                     "NumPy's in huge pages: set it to 1 for a torch without that cost)")
    load = info.get("load_average") or {}
    if load.get("before"):
        lines.append(f"load average (1, 5, 15 min) before: {', '.join(map(str, load['before']))}; after: "
                     f"{', '.join(map(str, load['after'] or ()))} ({os.cpu_count()} CPUs)")
    if res.get("ratios"):
        lines.append("ratios (peer's time / the derive op's time, same configuration and threads):")
        for r in res["ratios"]:
            lines.append(f"  {r['kernel']:<15} {r['dtype']:<8} gamma {r['gamma']:<4g} thr {str(r['threads']):>4}: "
                         f"{r['ours'] + ' vs ' + r['peer']:<34} {r['x_faster']:6.2f}x")
    if res.get("overhead"):
        n = res["overhead"][0]["n"]
        lines.append(f"per-call cost at {n:,} float32 elements (sigmoid focal, gamma 2; fastest batch of calls, "
                     "median in brackets):")
        for r in res["overhead"]:
            cpu = r.get("cpu_us_per_call")
            lines.append(f"  {r['row']:<34} {r['us_per_call']:8.1f} us  ({r['median_us']:.1f})  thr {r['threads']}"
                         + (f"  calling thread's CPU {cpu:.1f} us" if cpu is not None and r["threads"] != "xla" else ""))
        for what, us in overhead_figures(res["overhead"]):
            lines.append(f"  overhead of the {what} (minus the empty op's): {us:.1f} us")
        for what, us in overhead_figures(res["overhead"], "cpu_us_per_call"):
            if what.startswith("derive.torch"):
                lines.append(f"  overhead of the {what} (minus the empty op's), calling thread's CPU time: {us:.1f} us")
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
    for r in res.get("ratios", ()):
        if (r["peer"], r["kernel"], r["dtype"], r["gamma"]) == ("torch.compile", "sigmoid focal", "float32", 2.0) \
                and r["ours"].startswith("derive.torch op"):
            out.append((f"{r['ours']} float32 sigmoid focal, gamma 2, {r['threads']} thread(s), fwd+bwd: 5x faster "
                        "than torch.compile of torchvision's formula (summed inside)", r["x_faster"] >= 5,
                        f"{r['x_faster']:.1f}x"))
    for what, us in overhead_figures(res.get("overhead", ())):
        if what.startswith("derive.torch"):
            out.append((f"{what} at {res['info']['sizes']['overhead']:,} elements: per-call overhead under 20 us "
                        "(wall-clock, fastest batch)", us < 20, f"{us:.1f} us"))
    for what, us in overhead_figures(res.get("overhead", ()), "cpu_us_per_call"):
        if what.startswith("derive.torch"):
            out.append((f"{what} at {res['info']['sizes']['overhead']:,} elements: per-call overhead under 20 us "
                        "(the calling thread's CPU time, fastest batch)", us < 20, f"{us:.1f} us"))
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


__all__ = ["run", "format_table", "targets", "ratios", "overhead", "main", "closed_form_numpy",
           "lambdified_closed_form"]
