"""``python -m derive.measure.gpu_check``: the CUDA kernels' checks and benchmark, on a machine with a GPU.

One prepared run (it installs nothing; torchvision is optional):

1. **accuracy**: every shipped kernel, float32 and float64, over the accuracy harness's own points,
   parameter grid and "beyond" cases (:mod:`derive.measure.accuracy`, its quick configuration unless
   ``--full``) against the mpmath references, on the CUDA op and the C library side by side; the same
   bounds (2e-6 float32, 4e-15 float64, no NaN/inf for finite input, saturated logits included).
2. **cpu**: the CUDA results against the CPU (C) kernels' on the same points: relative difference at most
   twice the bound (each is within the bound of the exact value), times max(1, kappa) for a kernel declared
   conditioned; where the CPU value is not finite, the CUDA value must be the same.
3. **half**: float16 and bfloat16 tensors (computed in float32) against the float32 CUDA kernel on the
   same rounded inputs, rounded to that type: within one unit in the last place of that type.
4. **autograd**: ``torch.library.opcheck`` of each op, ``gradcheck`` and ``gradgradcheck`` (float64 CUDA
   tensors), ``torch.compile(fullgraph=True)`` of a loss and its backward, equal to eager.
5. **errors**: a bad label, a class index out of range and a bad parameter raise one-line errors.
6. **bench** (``--no-bench`` skips): forward + backward (loss.sum().backward()) of the alpha-balanced
   sigmoid focal loss (gamma = 2, alpha = 0.25) on 10^8 float32 logits, and of the softmax focal loss and
   cross-entropy on (131072, 80) and (1048576, 80) rows, beside torchvision's formula (or the same formula
   written in torch when torchvision is absent) eager and under torch.compile, and torch's cross_entropy;
   the HBM floor of the same run: the bytes the step must move (read x and the targets, write dx) over the
   peak bandwidth, measured as a large device-to-device copy; ratios against the targets (derive within
   1.5x of the floor, at least 3x faster than torch.compile).

Prints a table per part and writes JSON (``--json``, default out/gpu-check.json); exit 1 when a check fails.
Without a GPU it says so and exits 2.  The functions are also what tests/test_cuda.py runs on a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _torch():
    import torch

    return torch


def kernel_ops(spec):
    """The KernelOps of a shipped kernel (derive.torch's shipped module)."""
    import derive.torch as dtorch

    return dtorch.shipped(spec.module).ops(spec.name)


def op_args(ko, x, t, params, ignore_index=-100):
    """The op's positional arguments: params maps each declared parameter to a number (or, for a
    per-class alpha, a tensor)."""
    alpha_vec = None
    values = []
    for p in ko.params:
        v = params[p]
        if ko.class_alpha and p == "alpha" and not isinstance(v, (int, float)):
            alpha_vec, v = v, 1.0  # the scalar is not read when the vector is given
        values.append(float(v))
    if ko.layout == "class_index":
        return (x, t) + ((alpha_vec,) if ko.class_alpha else ()) + tuple(values) + (int(ignore_index),)
    return (x, t) + tuple(values)


def cuda_function(spec, device="cuda", dtype=None):
    """A function with the signature the accuracy harness calls (``fn(x, t, reduction, return_grad,
    backend, **params)``, NumPy in and out) that runs the kernel's op on CUDA tensors (``dtype``: the
    tensors' dtype when not the inputs', e.g. torch.float16)."""
    torch = _torch()
    ko = kernel_ops(spec)

    def fn(x, t, reduction="none", return_grad=True, backend=None, ignore_index=-100, **params):
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(device)
        if dtype is not None:
            xt = xt.to(dtype)
        if ko.layout == "class_index":
            tt = torch.from_numpy(np.asarray(t, dtype=np.int64)).to(device)
        else:
            tt = torch.from_numpy(np.ascontiguousarray(t)).to(device).to(xt.dtype)
        ps = {p: (torch.from_numpy(np.asarray(v)).to(device) if np.ndim(v) else float(v)) for p, v in params.items()}
        with torch.no_grad():
            loss, grad = ko.op(*op_args(ko, xt, tt, ps, ignore_index))
        return loss.float().cpu().numpy() if dtype is not None else loss.cpu().numpy(), \
            grad.float().cpu().numpy() if dtype is not None else grad.cpu().numpy()

    return fn


def _specs(names=None):
    from derive.codegen import kernels as K

    return [s for s in K.shipped_kernels() if not names or s.name in names]


# ------------------------------------------------------------------------------------------
# 1-3: accuracy, the CPU kernels, half types


def check_accuracy(quick=True, names=None, device="cuda"):
    """Rows of the accuracy harness for the CUDA op and the C library (derive.measure.accuracy.Row)."""
    from derive.measure import accuracy as A
    from derive.measure import reference as R

    cfg = dict(A.QUICK if quick else A.FULL)
    rows = []
    for spec in _specs(names):
        _, f = R.find_kernel(spec.name)
        ref = R.reference_for(spec, f.path)
        fns = {"c": A._shipped_function(spec), "cuda": cuda_function(spec, device)}
        for dtype in A.DTYPES:
            for params in A.param_grid(spec, quick):
                rows += A._measure_combo(spec, ref, fns, dtype, params, cfg)
    return rows


def _cases(spec, dtype, cfg):
    from derive.measure import accuracy as A

    out = []
    for params in A.param_grid(spec, True):
        if spec.layout == "elementwise":
            x, t = A.elementwise_points(spec, dtype, cfg)
            xb, tb = A.beyond_points(spec, dtype)
            out += [(x, t, A._typed_params(params, dtype)), (xb, tb, A._typed_params(params, dtype))]
        else:
            for k in cfg["ks"]:
                x, t, xb, tb = A.softmax_cases(spec, k, dtype, cfg["rows"])
                typed = A._typed_params(params, dtype, k, spec)
                out += [(x, t, typed), (xb, tb, typed)]
    return out


def _rel_diff(a, b, tiny, scale=None):
    """The largest |a - b| / max(|b|, tiny) (divided by ``scale``, e.g. max(1, kappa)) where b is finite,
    and whether a has b's non-finite values elsewhere."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    fin = np.isfinite(b)
    same_nonfinite = bool(np.all((a[~fin] == b[~fin]) | (np.isnan(a[~fin]) & np.isnan(b[~fin]))))
    d = np.abs(a[fin] - b[fin]) / np.maximum(np.abs(b[fin]), tiny)
    if scale is not None:
        d = d / np.asarray(scale, np.float64).ravel()[fin]
    return (float(d.max()) if d.size else 0.0), same_nonfinite


def check_cpu_equal(names=None, device="cuda"):
    """[(kernel, dtype, largest relative difference of loss and grad, allowed, ok)]: CUDA against C on the
    harness's points.  Allowed: twice the accuracy bound (each value is within the bound of the exact one),
    times max(1, kappa) for a kernel declared conditioned (as the accuracy harness scales its bound)."""
    from derive.measure import accuracy as A
    from derive.measure import reference as R

    out = []
    for spec in _specs(names):
        c_fn, cu_fn = A._shipped_function(spec), cuda_function(spec, device)
        ref = None
        if getattr(spec, "conditioned", None):
            _, f = R.find_kernel(spec.name)
            ref = R.reference_for(spec, f.path)
        for dtype in A.DTYPES:
            bound = 2 * A.BOUNDS[np.dtype(dtype).name]
            tiny = float(np.finfo(dtype).tiny)
            worst, ok = 0.0, True
            for x, t, typed in _cases(spec, dtype, A.QUICK):
                c = A._call(c_fn, spec, "c", x, t, typed)
                g = A._call(cu_fn, spec, "cuda", x, t, typed)
                scales = (None, None)
                if ref is not None:
                    try:
                        kl, kg = ref.kappa(x, t, typed, dtype)
                        scales = (np.maximum(1.0, np.asarray(kl, np.float64)), np.maximum(1.0, np.asarray(kg, np.float64)))
                    except R.ReferenceUnavailable:  # (the beyond points) unscaled
                        pass
                for a, b, sc in zip(g, c, scales):
                    d, same = _rel_diff(a, b, tiny, sc)
                    worst, ok = max(worst, d), ok and same
            out.append((spec.name, np.dtype(dtype).name, worst, bound, ok and worst <= bound))
    return out


def check_half(names=None):
    """[(kernel, dtype, largest error in units of the type's epsilon, ok)]: float16/bfloat16 tensors
    against the float32 CUDA kernel on the same rounded inputs, rounded to that type (ok: within 1 ulp,
    where the float32 value is a normal number of that type)."""
    torch = _torch()
    from derive.measure import accuracy as A

    out = []
    for spec in _specs(names):
        f32 = cuda_function(spec)
        for hdt, name in ((torch.float16, "float16"), (torch.bfloat16, "bfloat16")):
            half = cuda_function(spec, dtype=hdt)
            fi = torch.finfo(hdt)
            worst = 0.0
            for x, t, typed in _cases(spec, np.float32, A.QUICK)[:2]:
                # the inputs as the half type holds them (finite), computed in float32 by both
                xh = torch.from_numpy(x).to(hdt).clamp(-fi.max, fi.max).float().numpy()
                th = t if np.asarray(t).dtype.kind in "iu" else \
                    torch.from_numpy(np.asarray(t, np.float32)).to(hdt).float().numpy()  # labels, q as the type holds them
                ref = A._call(f32, spec, "cuda", xh, th, typed)
                got = A._call(half, spec, "cuda", xh, th, typed)
                for a, b in zip(got, ref):
                    b_h = torch.from_numpy(np.asarray(b, np.float32)).to(hdt).float().numpy().ravel()
                    a = np.asarray(a, np.float32).ravel()
                    normal = np.isfinite(b_h) & (np.abs(b_h) >= fi.tiny)
                    if normal.any():
                        e = np.abs(a[normal] - b_h[normal]) / (np.abs(b_h[normal]) * fi.eps)
                        worst = max(worst, float(e.max()))
            out.append((spec.name, name, worst, worst <= 1.0))
    return out


# ------------------------------------------------------------------------------------------
# 4-5: autograd, torch.compile, errors


def _small_case(spec, ko, dtype, device="cuda", seed=0):
    torch = _torch()
    from derive.measure import accuracy as A

    g = torch.Generator(device="cpu").manual_seed(seed)
    params = dict(zip(spec.params, A.param_grid(spec, True)[0]))
    if ko.layout == "elementwise":
        x = (torch.randn(12, generator=g, dtype=dtype) * 3)
        t = (torch.rand(12, generator=g) > 0.5).to(dtype) if spec.target != "soft" else torch.rand(12, generator=g, dtype=dtype)
    elif ko.layout == "class_probs":
        x = torch.randn(4, 5, generator=g, dtype=dtype) * 3
        t = torch.softmax(torch.randn(4, 5, generator=g, dtype=dtype), dim=1)
    else:
        x = torch.randn(4, 5, generator=g, dtype=dtype) * 3
        t = torch.randint(0, 5, (4,), generator=g)
        t[2] = -100
        if ko.class_alpha:
            params["alpha"] = torch.linspace(0.2, 0.9, 5, dtype=dtype).to(device)
    return x.to(device), t.to(device), params


def check_autograd(names=None, device="cuda", compile=True):
    """[(kernel, check, ok, detail)]: opcheck, gradcheck, gradgradcheck, torch.compile (fullgraph) on CUDA."""
    torch = _torch()
    out = []
    for spec in _specs(names):
        ko = kernel_ops(spec)
        x, t, params = _small_case(spec, ko, torch.float64, device)
        args = op_args(ko, x, t, params)

        def loss_of(xx, ko=ko, args=args):
            return ko.apply(xx, *args[1:])[0]

        for what, run in (
            ("opcheck", lambda: torch.library.opcheck(ko.op, (x.clone().requires_grad_(),) + args[1:])),
            ("gradcheck", lambda: torch.autograd.gradcheck(loss_of, (x.clone().requires_grad_(),))),
            ("gradgradcheck", lambda: (ko.op2 is None) or torch.autograd.gradgradcheck(
                loss_of, (x.clone().requires_grad_(),))),
        ):
            try:
                run()  # raises on a failure (gradcheck's and opcheck's own errors)
                out.append((spec.name, what, True, ""))
            except Exception as exc:  # a failed check, reported by name
                out.append((spec.name, what, False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
        if not compile:
            continue
        try:
            torch._dynamo.reset()

            def step(xx, ko=ko, args=args):
                return ko.apply(xx, *args[1:])[0].sum()

            xe = x.clone().requires_grad_()
            le = step(xe)
            le.backward()
            xc = x.clone().requires_grad_()
            lc = torch.compile(step, fullgraph=True)(xc)
            lc.backward()
            # the sum may be reduced in another order under inductor: equal up to float64 rounding
            ok = bool(torch.allclose(le.detach(), lc.detach(), rtol=1e-12, atol=0)
                      and torch.allclose(xe.grad, xc.grad, rtol=1e-12, atol=0))
            out.append((spec.name, "torch.compile", ok, "" if ok else
                        f"differs from eager: loss {le.item()!r} vs {lc.item()!r}"))
        except Exception as exc:
            out.append((spec.name, "torch.compile", False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
    return out


def check_errors():
    """[(case, ok, message)]: one-line errors on CUDA tensors."""
    torch = _torch()
    import derive.torch as dtorch

    out = []
    x = torch.randn(8, device="cuda")
    cases = [
        ("bad label", lambda: dtorch.sigmoid_focal_loss(x, torch.full((8,), 2.0, device="cuda"))),
        ("class index out of range", lambda: dtorch.softmax_focal_loss(
            torch.randn(3, 4, device="cuda"), torch.tensor([0, 7, 1], device="cuda"))),
        ("gamma < 0", lambda: dtorch.sigmoid_focal_loss(x, torch.ones(8, device="cuda"), gamma=-1.0)),
    ]
    for name, run in cases:
        try:
            run()
            torch.cuda.synchronize()
            out.append((name, False, "no error raised"))
        except (ValueError, TypeError) as exc:
            msg = str(exc)
            out.append((name, "\n" not in msg, msg))
        except Exception as exc:
            out.append((name, False, f"{type(exc).__name__}: {exc}"))
    return out


# ------------------------------------------------------------------------------------------
# 6: the benchmark


def _time_ms(fn, warmup=3, iters=10):
    torch = _torch()
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def peak_bandwidth():
    """(measured bytes/s of a 4 GiB device-to-device copy, counting reads and writes; the spec figure from
    the device properties, or None)."""
    torch = _torch()
    src = torch.empty(1 << 30, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), warmup=2, iters=10)
    measured = 2 * src.numel() * 4 / (ms * 1e-3)
    del src, dst
    props = torch.cuda.get_device_properties(0)
    clock = getattr(props, "memory_clock_rate", None)  # kHz
    width = getattr(props, "memory_bus_width", None)  # bits
    spec = 2 * clock * 1e3 * width / 8 if clock and width else None
    return measured, spec


def torchvision_focal():
    """torchvision.ops.sigmoid_focal_loss, or the same formula written in torch when torchvision is absent."""
    try:
        from torchvision.ops import sigmoid_focal_loss

        return sigmoid_focal_loss, "torchvision.ops.sigmoid_focal_loss"
    except Exception:
        torch = _torch()
        F = torch.nn.functional

        def sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
            p = torch.sigmoid(inputs)
            ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
            p_t = p * targets + (1 - p) * (1 - targets)
            loss = ce * ((1 - p_t) ** gamma)
            if alpha >= 0:
                loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
            return loss.sum() if reduction == "sum" else (loss.mean() if reduction == "mean" else loss)

        return sigmoid_focal_loss, "torchvision's formula in torch (torchvision absent)"


def softmax_focal_torch(x, target, alpha=0.25, gamma=2.0):
    """The usual softmax focal loss in torch: ce = cross_entropy, p_t = e^-ce, alpha (1 - p_t)^gamma ce."""
    torch = _torch()
    ce = torch.nn.functional.cross_entropy(x, target, reduction="none")
    p_t = torch.exp(-ce)
    return (alpha * (1 - p_t) ** gamma * ce).sum()


def bench(n=10 ** 8, rows=((131072, 80), (1048576, 80)), iters=10):
    """Rows {case, impl, ms, floor_ms, ratios}: forward + backward of each case, the HBM floor of the same run."""
    torch = _torch()
    import derive.torch as dtorch

    measured, spec_bw = peak_bandwidth()
    results = {"peak_copy_bytes_per_s": measured, "spec_bytes_per_s": spec_bw, "device": torch.cuda.get_device_name(),
               "cases": []}
    tv, tv_name = torchvision_focal()

    def step_fn(loss_fn, x, *rest):
        def step():
            x.grad = None
            loss_fn(x, *rest).backward()
        return step

    # elementwise: alpha-balanced sigmoid focal loss, gamma = 2, alpha = 0.25
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(n, device="cuda", generator=g) * 4).requires_grad_()
    t = (torch.rand(n, device="cuda", generator=g) < 0.1).float()
    # the drop-ins (derive.torch), which name their kernels: the CUDA op of each, summed
    impls = {
        "derive (CUDA op)": lambda xx, tt: dtorch.sigmoid_focal_loss(xx, tt, alpha=0.25, gamma=2.0, reduction="sum"),
        f"{tv_name}, eager": lambda xx, tt: tv(xx, tt, alpha=0.25, gamma=2.0, reduction="sum"),
        f"{tv_name}, torch.compile": torch.compile(lambda xx, tt: tv(xx, tt, alpha=0.25, gamma=2.0, reduction="sum")),
    }
    floor_bytes = n * (4 + 4 + 4)  # read x and t, write dx (float32)
    autograd_bytes = n * (8 + 12)  # through autograd: the forward reads x and t, the backward again, and writes dx
    results["cases"].append(_bench_case(f"sigmoid focal (alpha 0.25, gamma 2), {n:.0e} float32 logits", impls,
                                        step_fn, (x, t), floor_bytes, measured, iters, autograd_bytes))
    del x, t
    torch.cuda.empty_cache()
    for m, k in rows:
        x = (torch.randn(m, k, device="cuda", generator=g) * 4).requires_grad_()
        tgt = torch.randint(0, k, (m,), device="cuda", generator=g)
        floor_bytes = m * k * 4 * 2 + m * 8  # read x, write dx, read the targets
        autograd_bytes = m * k * 4 * 3 + m * 16  # through autograd: x and the targets read twice, dx written
        impls = {
            "derive softmax_focal (CUDA op)": lambda xx, tt: dtorch.softmax_focal_loss(xx, tt, alpha=0.25, gamma=2.0,
                                                                                      reduction="sum"),
            "torch softmax focal formula, eager": softmax_focal_torch,
            "torch softmax focal formula, torch.compile": torch.compile(softmax_focal_torch),
        }
        results["cases"].append(_bench_case(f"softmax focal (alpha 0.25, gamma 2), ({m}, {k}) float32", impls,
                                            step_fn, (x, tgt), floor_bytes, measured, iters, autograd_bytes))
        impls = {
            "derive softmax_ce (CUDA op)": lambda xx, tt: dtorch.cross_entropy(xx, tt, reduction="sum"),
            "torch cross_entropy, eager": lambda xx, tt: torch.nn.functional.cross_entropy(xx, tt, reduction="sum"),
            "torch cross_entropy, torch.compile": torch.compile(
                lambda xx, tt: torch.nn.functional.cross_entropy(xx, tt, reduction="sum")),
        }
        results["cases"].append(_bench_case(f"softmax cross-entropy, ({m}, {k}) float32", impls,
                                            step_fn, (x, tgt), floor_bytes, measured, iters, autograd_bytes))
        del x, tgt
        torch.cuda.empty_cache()
    return results


def _bench_case(name, impls, step_fn, args, floor_bytes, peak, iters, autograd_bytes=None):
    times = {}
    for label, fn in impls.items():
        try:
            times[label] = _time_ms(step_fn(fn, *args), iters=iters)
        except Exception as exc:
            times[label] = None
            print(f"  {name}: {label} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
    floor_ms = floor_bytes / peak * 1e3
    derive_ms = next((v for k, v in times.items() if k.startswith("derive")), None)
    compiled = next((v for k, v in times.items() if "torch.compile" in k), None)
    return {"case": name, "ms": times, "floor_ms": floor_ms, "floor_bytes": floor_bytes,
            "autograd_floor_ms": autograd_bytes / peak * 1e3 if autograd_bytes else None,
            "derive_over_floor": derive_ms / floor_ms if derive_ms else None,
            "compile_over_derive": compiled / derive_ms if (derive_ms and compiled) else None}


def format_bench(res) -> str:
    lines = [f"device {res['device']}: device-to-device copy {res['peak_copy_bytes_per_s'] / 1e12:.2f} TB/s "
             f"(reads + writes; spec from the device properties: "
             + (f"{res['spec_bytes_per_s'] / 1e12:.2f} TB/s" if res["spec_bytes_per_s"] else "not reported") + ")"]
    for c in res["cases"]:
        lines.append(f"\n{c['case']}: forward + backward; HBM floor {c['floor_ms']:.3f} ms "
                     f"({c['floor_bytes'] / 1e9:.2f} GB at the measured copy bandwidth: x and targets in, dx out)"
                     + (f"; through autograd (forward and backward each read x and the targets) "
                        f"{c['autograd_floor_ms']:.3f} ms" if c.get("autograd_floor_ms") else ""))
        for label, ms in c["ms"].items():
            lines.append(f"  {label:<62} " + ("failed" if ms is None else f"{ms:9.3f} ms  {ms / c['floor_ms']:6.2f}x floor"))
        r1, r2 = c["derive_over_floor"], c["compile_over_derive"]
        lines.append(f"  target: derive within 1.5x of the floor: "
                     + ("n/a" if r1 is None else f"{r1:.2f}x ({'met' if r1 <= 1.5 else 'MISSED'})")
                     + "; derive at least 3x faster than torch.compile: "
                     + ("n/a" if r2 is None else f"{r2:.2f}x ({'met' if r2 >= 3 else 'MISSED'})"))
    return "\n".join(lines)


def bench_rows(quick=False):
    """``make bench``'s CUDA rows: the benchmark above where torch sees a GPU, else one line saying they are
    skipped.  Returns the results (None when skipped)."""
    try:
        torch = _torch()
        available = torch.cuda.is_available()
    except ImportError:
        available = False
    if not available:
        print("\nCUDA kernels: skipped (no CUDA device visible to torch; on a GPU: python -m derive.measure.gpu_check)")
        return None
    res = bench(n=10 ** 6 if quick else 10 ** 8, rows=((4096, 80),) if quick else ((131072, 80), (1048576, 80)))
    print("\n== CUDA kernels, forward + backward ==")
    print(format_bench(res))
    return res


# ------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m derive.measure.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the accuracy harness's full configuration (slower)")
    parser.add_argument("--no-bench", action="store_true", help="skip the benchmark")
    parser.add_argument("--bench-only", action="store_true", help="only the benchmark")
    parser.add_argument("--kernels", nargs="*", help="only these kernels (the checks)")
    parser.add_argument("--json", type=Path, default=Path("out/gpu-check.json"))
    args = parser.parse_args(argv)
    try:  # each line as it comes: a run cut short by a time limit keeps what it printed
        sys.stdout.reconfigure(line_buffering=True)
    except (AttributeError, ValueError):
        pass
    torch = _torch()
    if not torch.cuda.is_available():
        print(f"derive gpu_check: torch {torch.__version__} sees no CUDA device: nothing to check", file=sys.stderr)
        return 2
    from derive.runtime import cudabuild

    try:
        nvcc = cudabuild.nvcc_version(tuple(cudabuild.find_nvcc())).splitlines()[-1]
    except cudabuild.CudaBuildError as exc:
        nvcc = f"not usable ({exc})"
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.get_device_name()}, "
          f"capability {torch.cuda.get_device_capability()}; nvcc: {nvcc}")
    t0 = time.perf_counter()
    import derive.torch  # noqa: F401  (registers the ops)
    for m in sorted({s.module for s in _specs()}):
        t1 = time.perf_counter()
        try:
            cudabuild.load(module=m)
        except cudabuild.CudaBuildError as exc:
            print(f"derive gpu_check: the CUDA library of {m} cannot be built or loaded: {exc}", file=sys.stderr)
            return 2
        print(f"built/loaded the CUDA library of {m} in {time.perf_counter() - t1:.1f} s", flush=True)
    report, failed = {}, []
    if not args.bench_only:
        from derive.measure import accuracy as A

        rows = check_accuracy(quick=not args.full, names=args.kernels)
        print("\n== accuracy against mpmath (the harness's bounds), CUDA and C side by side ==")
        print(A.format_table(rows))
        failed += [f"accuracy {r.kernel} {r.dtype} {r.backend} {r.params}: {'; '.join(r.failures)}" for r in rows if not r.ok]
        report["accuracy"] = [{"kernel": r.kernel, "dtype": r.dtype, "backend": r.backend, "params": r.params,
                               "loss_err": r.loss_err, "grad_err": r.grad_err, "ok": r.ok} for r in rows]
        for title, key, fn, fmt in (
            ("CUDA against the C kernels (relative difference)", "cpu", check_cpu_equal,
             lambda r: f"{r[0]:<24} {r[1]:<8} {r[2]:9.2e}  allowed {r[3]:.0e}  {'ok' if r[4] else 'FAIL'}"),
            ("float16 / bfloat16 against float32 (ulps of the type)", "half", check_half,
             lambda r: f"{r[0]:<24} {r[1]:<8} {r[2]:6.2f} ulp  {'ok' if r[3] else 'FAIL'}"),
            ("opcheck, gradcheck, gradgradcheck, torch.compile on CUDA", "autograd", check_autograd,
             lambda r: f"{r[0]:<24} {r[1]:<14} {'ok' if r[2] else 'FAIL ' + r[3]}"),
        ):
            res = fn(names=args.kernels)
            print(f"\n== {title} ==")
            print("\n".join(fmt(r) for r in res))
            report[key] = res
            failed += [f"{key} {r[:2]}" for r in res if not r[-1 if key != "autograd" else 2]]
        errs = check_errors()
        print("\n== one-line errors on CUDA tensors ==")
        print("\n".join(f"{n:<26} {'ok' if ok else 'FAIL'}  {msg}" for n, ok, msg in errs))
        report["errors"] = errs
        failed += [f"errors {n}" for n, ok, _ in errs if not ok]
    if not args.no_bench:
        res = bench()
        print("\n== benchmark ==")
        print(format_bench(res))
        report["bench"] = res
    report["failed"] = failed
    report["seconds"] = time.perf_counter() - t0
    try:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))
    except OSError as exc:
        print(f"cannot write {args.json}: {exc}", file=sys.stderr)
    print(f"\n{len(failed)} failed check(s) in {report['seconds']:.0f} s" + ("" if not failed else ":\n  " + "\n  ".join(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
