"""``make bench``: figures, not assertions.

Kernel speed beside the peers (:mod:`derive.measure.bench_kernels`: forward + backward per element,
bandwidth floor; the derive.torch and derive.jax ops beside torch eager, torch.compile and optax
jit, with their ratios and per-call overhead at 1,000 elements; JSON in out/bench-kernels.json), then the verification time of the shipped derivation files, cold, in a fresh process each run (SymPy
import and parsing included), as the issue asks: under 10 s on a 2-core machine.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def bench_verify(runs: int = 3) -> dict:
    """Wall time of ``derive verify`` in a fresh process: the note and all shipped files, cold (no proof
    cache) on all cores and on one worker, and warm (a cache filled by the cold run of the same folder)."""
    import tempfile

    from derive.prover.verify import builtin_files

    files = [str(p) for p in builtin_files()]
    note = [f for f in files if f.endswith("focal_loss_note.toml")]
    out = {}
    with tempfile.TemporaryDirectory(prefix="derive-bench-cache-") as cache_dir:
        for label, args in (("note", note), ("all shipped files", files)):
            for mode, extra in (("cold", ["--no-cache"]), ("cold, --jobs 1", ["--no-cache", "--jobs", "1"]),
                                ("warm", ["--cache-dir", f"{cache_dir}/{len(args)}"])):
                times = []
                if mode == "warm":  # fill the cache once, then time replays
                    subprocess.run([sys.executable, "-m", "derive", "verify", *extra, *args], capture_output=True)
                for _ in range(runs):
                    t0 = time.perf_counter()
                    proc = subprocess.run([sys.executable, "-m", "derive", "verify", "--json", *extra, *args],
                                          capture_output=True, text=True, env=dict(os.environ))
                    times.append(time.perf_counter() - t0)
                    if proc.returncode != 0:
                        print(f"warning: verify exited {proc.returncode} for {label} ({mode})", file=sys.stderr)
                data = json.loads(proc.stdout) if proc.stdout else {}
                out[f"{label}, {mode}"] = {"median_s": statistics.median(times), "min_s": min(times), "runs": runs,
                                           "checks": len(data.get("checks", [])), "in_process_s": data.get("seconds")}
    return out


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="derive bench",
        description="Time the kernels (forward + backward per element) beside the bandwidth floor, NumPy, "
                    "PyTorch (eager, torch.compile) and JAX/optax in one run, the derive.torch and derive.jax ops "
                    "beside them (and their per-call overhead), and the verifier cold; figures, not assertions.")
    parser.add_argument("--no-peers", action="store_true", help="skip PyTorch and JAX even when installed")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run, figures meaningless)")
    parser.add_argument("--kernels-only", action="store_true", help="skip the verification timing")
    parser.add_argument("--torch-only", action="store_true",
                        help="the generated C and the PyTorch rows alone, float32 (derive.torch op, torch eager, "
                             "torch.compile), and the torch per-call overhead; implies --kernels-only")
    parser.add_argument("--json", default="out/bench-kernels.json", type=Path,
                        help="where to write the kernel results (default: out/bench-kernels.json)")
    args = parser.parse_args(argv)
    try:  # before minutes of measuring: the results must have somewhere to go
        args.json.parent.mkdir(parents=True, exist_ok=True)
        if args.json.is_dir() or not os.access(args.json.parent, os.W_OK):
            raise OSError("not a writable file path")
    except OSError as exc:
        parser.error(f"--json {args.json}: cannot write there ({exc.strerror or exc})")
    from derive.measure import bench_kernels

    kw = {"peers": not args.no_peers}
    if args.quick:
        kw.update(sigmoid_n=20000, softmax_shape=(256, 80), repeats=3, memory=False)
    if args.torch_only:
        kw.update(torch_only=True, dtypes=("float32",))
    bench_kernels.main(out_path=args.json, **kw)
    from derive.measure import gpu_check  # the CUDA rows: run on a GPU, skipped (one line) without one

    gpu_check.bench_rows(quick=args.quick)
    if not args.torch_only:  # the rules' kernels beside the hand-written forms they replaced (derive.rewrite)
        from derive.measure import bench_rewrite

        print()
        bench_rewrite.main(quick=args.quick)
    if args.kernels_only or args.torch_only:
        return 0
    print()
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    res = bench_verify(runs=1 if args.quick else 3)
    print(f"{'derive verify (fresh process)':<40} {'median s':>9} {'min s':>7} {'checks':>7} {'in-process s':>13}")
    for label, r in res.items():
        print(f"{label:<40} {r['median_s']:9.2f} {r['min_s']:7.2f} {r['checks']:7d} {r['in_process_s']:13.2f}")
    target = res["note, cold"]["median_s"]
    print(f"target: note verified in under 5 s cold on all cores ({os.cpu_count()}) -> "
          f"{'met' if target < 5 else 'NOT met'} ({target:.2f} s; one worker: {res['note, cold, --jobs 1']['median_s']:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
