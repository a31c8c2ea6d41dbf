"""Command line: ``derive verify [FILE...]``, ``derive codegen``.

Exit codes of ``verify``: 0 every step proved or a recorded erratum; 1 a step refuted
without an erratum, only numerically confirmed (unless --allow-numeric), unproved, or a stale
erratum; 2 a malformed file or bad arguments.
"""
from __future__ import annotations

import argparse
import sys

from .prover import STRATEGIES


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits 2 on bad arguments, with a clear message
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _strategies(text):
    keys = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if k not in STRATEGIES]
    if bad or not keys:
        raise argparse.ArgumentTypeError(f"unknown strategy {', '.join(bad) or text!r}; known: {', '.join(STRATEGIES)}")
    return keys


def build_parser():
    p = _Parser(prog="derive", description="Verify gradient derivations and generate kernels.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    v = sub.add_parser("verify", help="check every step of derivation files (default: the shipped note)")
    v.add_argument("files", nargs="*", help="derivation files (TOML); none: the files shipped with derive")
    v.add_argument("--json", action="store_true", help="print a machine-readable report")
    v.add_argument("--allow-numeric", action="store_true",
                   help="accept steps that are only numerically confirmed (exit 0)")
    v.add_argument("--timeout", type=_positive_float, default=None, metavar="SECONDS",
                   help="time limit for the whole run; steps not reached are unproved")
    v.add_argument("--step-timeout", type=_positive_float, default=4.0, metavar="SECONDS",
                   help="time limit for each proof strategy (default 4)")
    v.add_argument("--seed", type=int, default=None, help="seed of the random sample points")
    v.add_argument("--strategies", type=_strategies, default=None, metavar="LIST",
                   help="comma-separated proof strategies to try, of: " + ", ".join(STRATEGIES))
    v.add_argument("-v", "--verbose", action="store_true", help="show strategies tried and K instances")
    sub.add_parser("codegen", help="render templates/ into generated/ (see derive codegen --help)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["codegen"]:  # the generator has its own options (--check, --out ...)
        from . import codegen

        return codegen.main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "verify":
        from .prover import DEFAULT_SEED
        from .report import render_json, render_text
        from .verify import builtin_files, verify_paths

        files = args.files or builtin_files()
        report = verify_paths(files, seed=DEFAULT_SEED if args.seed is None else args.seed,
                              step_timeout=args.step_timeout, timeout=args.timeout,
                              allow_numeric=args.allow_numeric, strategies=args.strategies)
        if args.json:
            sys.stdout.write(render_json(report))
        else:
            text = render_text(report, verbose=args.verbose)
            (sys.stderr if report.errors else sys.stdout).write(text)
        return report.exit_code()
    build_parser().print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
