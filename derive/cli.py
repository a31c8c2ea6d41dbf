"""The ``derive`` command: one console script, one subcommand per job.

``derive verify [FILE...|-]`` checks derivation files (none: the shipped ones; ``-``: one file
read from standard input); ``derive codegen``, ``derive docs``, ``derive accuracy`` and
``derive bench`` generate the kernels, write the documentation, measure the kernels' accuracy and
time them (each takes ``--help``; ``python -m derive.codegen`` and the like still work).

Exit codes of ``verify``: 0 every step proved or a recorded erratum; 1 a step refuted
without an erratum, only numerically confirmed (unless --allow-numeric), unproved, or a stale
erratum; 2 a malformed file or bad arguments.  ``derive`` with no arguments prints the usage on
standard error and exits 2.
"""
from __future__ import annotations

import argparse
import math
import sys

from derive import __version__

DIST_NAME = "derive-gradients"

#: Subcommands whose modules parse their own options: ``derive NAME ...`` forwards the rest.
FORWARDED = {
    "codegen": ("derive.codegen", "generate the [[kernel]]s of stable_forms.toml or FILE... into ./generated or --out DIR"),
    "docs": ("derive.docs", "write the documentation of every step into ./docs (or --out DIR)"),
    "accuracy": ("derive.measure.accuracy", "measure every kernel (of FILE..., else the shipped files) against mpmath "
                 "references of its original definitions (--quick: a short run)"),
    "bench": ("derive.measure.bench", "time the kernels beside NumPy, PyTorch and JAX, and the verifier"),
}

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits 2 on bad arguments, with a clear message
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if math.isnan(value) or not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def _jobs(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of worker processes") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: at least one worker process")
    return value


def _megabytes(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of MiB") from None
    if value < 64:
        raise argparse.ArgumentTypeError(f"{text!r}: a worker needs at least 64 MiB")
    return value


def _strategies(text):
    from derive.prover.engine import STRATEGIES

    keys = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if k not in STRATEGIES]
    if bad or not keys:
        raise argparse.ArgumentTypeError(f"unknown strategy {', '.join(bad) or text!r}; known: {', '.join(STRATEGIES)}")
    return keys


VERIFY_HELP = "check every step of derivation files (default: the shipped ones)"
VERSION = f"derive {__version__} ({DIST_NAME})"


def build_parser():
    """The top-level parser: the commands (each parses its own options) and --version."""
    p = _Parser(prog="derive", description="Verify gradient derivations step by step and generate kernels from them.",
                epilog="Run `derive COMMAND --help` for a command's options.")
    p.add_argument("--version", action="version", version=VERSION)
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    sub.add_parser("verify", help=VERIFY_HELP, add_help=False)
    for name, (_, text) in FORWARDED.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


def build_verify_parser():
    from derive.prover.engine import STRATEGIES
    from derive.prover.verify import DEFAULT_STEP_SECONDS

    v = _Parser(prog="derive verify",
                description="Check every step of derivation files: proved, or refuted with a counterexample. "
                            "Exit 0: all proved (or recorded errata); 1: a failure; 2: a malformed file or bad arguments.")
    v.add_argument("files", nargs="*", metavar="FILE",
                   help="derivation files (TOML); '-' reads one from standard input; none: the files shipped with derive")
    v.add_argument("--json", action="store_true", help="print a machine-readable report")
    v.add_argument("-q", "--quiet", action="store_true",
                   help="print only the failures and the summary (no progress line)")
    v.add_argument("--allow-numeric", action="store_true",
                   help="accept steps that are only numerically confirmed (exit 0)")
    v.add_argument("--timeout", type=_positive_float, default=None, metavar="SECONDS",
                   help="wall-clock time limit for the whole run; steps not reached are unproved")
    v.add_argument("--step-timeout", type=_positive_float, default=DEFAULT_STEP_SECONDS, metavar="SECONDS",
                   help=f"CPU-time limit for each proof strategy (default {DEFAULT_STEP_SECONDS:g}; 'inf': no limit); "
                        "CPU time, so that a busy machine gives the same verdicts")
    v.add_argument("-j", "--jobs", type=_jobs, default=None, metavar="N",
                   help="worker processes to spread the checks over (default: the usable cores; 1: this process)")
    v.add_argument("--no-cache", action="store_true",
                   help="do not use the proof cache (also: DERIVE_NO_CACHE=1)")
    v.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="folder of the proof cache (default: $DERIVE_CACHE_DIR/proofs, $XDG_CACHE_HOME/derive/proofs "
                        "or ~/.cache/derive/proofs)")
    v.add_argument("--memory-limit", type=_megabytes, default=None, metavar="MIB",
                   help="memory cap of each worker process in MiB (default: a share of the machine's memory, "
                        "at most 4096; also DERIVE_WORKER_MEMORY_MB)")
    v.add_argument("--seed", type=int, default=None, help="seed of the random sample points")
    v.add_argument("--strategies", type=_strategies, default=None, metavar="LIST",
                   help="comma-separated proof strategies to try, of: " + ", ".join(STRATEGIES))
    v.add_argument("-v", "--verbose", action="store_true", help="show strategies tried and K instances")
    return v


class _Progress:
    """One self-erasing line on standard error while the checks run (only on a terminal)."""

    def __init__(self, stream):
        self.stream = stream
        self.width = 0

    def __call__(self, file, derivation, n, total):
        from derive.prover.report import sanitize

        text = f"derive verify: {sanitize(str(file))}: {sanitize(str(derivation))} ({n} of {total})"
        text = text[:150]
        pad = max(0, self.width - len(text))
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self.width = len(text)

    def clear(self):
        if self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


def _read_stdin(limit):
    data = sys.stdin.buffer.read(limit + 1)
    return data


def _verify(args) -> int:
    from derive.language import loader
    from derive.prover.engine import DEFAULT_SEED
    from derive.prover.report import render_json, render_text
    from derive.prover.verify import builtin_files, verify_paths

    sources = []
    if not args.files:
        sources = list(builtin_files())
    elif args.files.count("-") > 1:
        print("derive verify: error: '-' (standard input) may be given only once", file=sys.stderr)
        return 2
    for f in args.files:
        if f == "-":
            limit = loader.MAX_FILE_BYTES
            data = _read_stdin(limit)
            if len(data) > limit:
                print(f"derive verify: error: <stdin>: more than {limit} bytes; not a derivation file", file=sys.stderr)
                return 2
            sources.append(loader.TextSource("<stdin>", data))
        else:
            sources.append(f)
    progress = None
    if not (args.json or args.quiet) and sys.stderr.isatty():
        progress = _Progress(sys.stderr)
    try:
        cache = False if args.no_cache else args.cache_dir  # None: the default folder, unless DERIVE_NO_CACHE
        report = verify_paths(sources, seed=DEFAULT_SEED if args.seed is None else args.seed,
                              step_timeout=args.step_timeout, timeout=args.timeout,
                              allow_numeric=args.allow_numeric, strategies=args.strategies, progress=progress,
                              jobs=args.jobs, cache=cache, memory_mb=args.memory_limit)
    finally:
        if progress is not None:
            progress.clear()
    if args.json:
        sys.stdout.write(render_json(report))
    else:
        text = render_text(report, verbose=args.verbose, quiet=args.quiet)
        (sys.stderr if report.errors else sys.stdout).write(text)
    return report.exit_code()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        build_parser().print_usage(sys.stderr)
        print("derive: error: a command is required (verify, codegen, docs, accuracy, bench); "
              "`derive --help` lists them", file=sys.stderr)
        return 2
    if argv == ["--version"]:  # without importing SymPy
        print(VERSION)
        return 0
    if argv[0] in FORWARDED:  # these parse their own options (--out, --check, --quick ...)
        import importlib

        module = importlib.import_module(FORWARDED[argv[0]][0])
        return module.main(argv[1:])
    if argv[0] == "verify":
        return _verify(build_verify_parser().parse_args(argv[1:]))
    build_parser().parse_args(argv)  # --help, or an error naming the unknown command (exit 2)
    build_parser().print_usage(sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
