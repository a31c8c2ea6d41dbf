#!/usr/bin/env python
"""Coverage-guided fuzz of the expression parser and the file loader (atheris / libFuzzer).

    python tests/fuzz_atheris.py -atheris_runs=N -max_total_time=S [-input_timeout=T] [CORPUS_DIR ...]

Needs the optional ``atheris`` package (the ``fuzz`` extra).  Each input is, by its first byte,
an expression for :func:`derive.language.parser.parse_expression`, a whole file for
:func:`derive.language.loader.loads`, or a line put into a valid file.  Acceptable outcomes are a parsed
expression that SymPy can print (str and LaTeX), or the tool's own clear error:
``ParseError`` / ``DerivationFileError``, whose message must not carry a control or bidi
character.  Anything else is a finding that libFuzzer saves as ``crash-*``: another exception
(a traceback from inside SymPy: the parser's catch-all for SymPy failures is switched off here),
an input that runs past ``-input_timeout`` seconds (default 3; SIGALRM, reported as a crash),
or memory beyond libFuzzer's ``-rss_limit_mb`` (default 2048).

Without a corpus directory the shipped derivation files and a few expressions seed a
temporary one.  Reproduce a finding with ``python tests/fuzz_atheris.py crash-...``.
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

with atheris.instrument_imports(include=["derive"]):
    from derive.language import loader
    from derive.language import parser
    from derive.language.loader import DerivationFileError, loads
    from derive.language.parser import ParseError, parse_expression

import sympy as sp  # noqa: E402

parser.BACKSTOP = False  # a SymPy exception is a finding here, not a ParseError
loader.PARSE_SECONDS = None  # the loader's own SIGALRM backstop would replace ours: an input too slow is a finding

INPUT_TIMEOUT = 3.0
NAMES = {n: sp.Symbol(n, real=True) for n in ("x", "y", "p_t", "gamma", "S", "e", "x_i", "x_j", "R")}

BASE = '''[file]
title = "fuzz base"

[symbols]
x = "real"
y = "{-1, 1}"
gamma = "[0, oo)"
R = { domain = "[0, oo)", latex = "R" }

[definitions]
p_t = { expr = "1/(1 + exp(-y*x))", domain = "(0, 1)" }
FL = "-(1 - p_t)^gamma*log(p_t)"

[[derivation]]
id = "d1"
title = "base"

[[derivation.chain]]
id = "a"
lines = ["D(p_t, x)", "y*p_t*(1 - p_t)", { expr = "@LINE@", rule = "r" }]
'''

SEED_EXPRESSIONS = [
    "-(1 - p_t)^gamma*log(p_t)", "where(y == 1, x, 1 - x)", "D(x^2, x)", "sigmoid(x) + softplus(-x)",
    "log1p(expm1(x))*xexpm1inv(x)", "sqrt(abs(x))/2.5e-3", "x + log(2 - log(2 - 3))", "9^999*9^9",
    "x + 0*(1/0)", "where(1 > 2, 1, 2)", "(-1)^y + pi", "exp(1)^(1/3)",
]


class _Slow(BaseException):
    """Raised by SIGALRM when one input runs past its time bound."""


_deadline = [None]


def _on_alarm(signum, frame):
    if _deadline[0] is not None and time.monotonic() >= _deadline[0] - 0.01:
        raise _Slow()


def _check_message(exc):
    text = str(exc)
    if loader._UNSAFE_NL.search(text):
        raise AssertionError(f"an error message carries a control or bidi character: {text!r}")


def _exercise(text: str, mode: int):
    if mode == 0:
        try:
            expr = parse_expression(text, NAMES)
        except ParseError as exc:
            _check_message(exc)
            return
        str(expr)
        sp.latex(expr)
        return
    if mode == 2:
        line = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        text = BASE.replace("@LINE@", line)
    try:
        df = loads(text, "fuzz.toml")
    except DerivationFileError as exc:
        _check_message(exc)
        if not str(exc).startswith("fuzz.toml"):
            raise AssertionError(f"an error that does not name the file: {exc}")
        return
    for d in df.derivations:
        for chain in d.chains:
            for line in chain.lines:
                str(line.expr)
                sp.latex(line.expr)


def test_one_input(data: bytes):
    if not data:
        return
    mode = data[0] % 3
    text = data[1:].decode("utf-8", "replace")
    _deadline[0] = time.monotonic() + INPUT_TIMEOUT
    signal.setitimer(signal.ITIMER_REAL, INPUT_TIMEOUT, 0.05)
    try:
        _exercise(text, mode)
    except _Slow:
        raise RuntimeError(f"input took longer than {INPUT_TIMEOUT} s (mode {mode}): {text[:300]!r}") from None
    finally:
        _deadline[0] = None
        signal.setitimer(signal.ITIMER_REAL, 0)


def _seed_corpus() -> str:
    d = tempfile.mkdtemp(prefix="derive-fuzz-corpus-")
    seeds = [bytes([1]) + p.read_bytes() for p in sorted((ROOT / "derive" / "derivations").glob("*.toml"))]
    seeds.append(bytes([1]) + BASE.replace("@LINE@", "x").encode())
    seeds += [bytes([0]) + e.encode() for e in SEED_EXPRESSIONS]
    seeds += [bytes([2]) + e.encode() for e in SEED_EXPRESSIONS]
    for i, s in enumerate(seeds):
        Path(d, f"seed{i:03d}").write_bytes(s)
    return d


def main(argv=None):
    global INPUT_TIMEOUT
    argv = list(sys.argv if argv is None else argv)
    rest = []
    for a in argv:
        if a.startswith("-input_timeout="):
            INPUT_TIMEOUT = float(a.split("=", 1)[1])
        else:
            rest.append(a)
    if not any(not a.startswith("-") and os.path.isdir(a) for a in rest[1:]) and \
            not any(not a.startswith("-") and os.path.isfile(a) for a in rest[1:]):
        rest.append(_seed_corpus())
    signal.signal(signal.SIGALRM, _on_alarm)
    atheris.Setup(rest, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
