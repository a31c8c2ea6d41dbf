"""LaTeX for the two renderings: ``$...$`` for Markdown, MathML (latex2mathml) for HTML.

The note's LaTeX is shown as written, with one repair that TeX itself would need:
a double superscript such as ``\\sum e^{x_k}^2`` (TeX: "Double superscript") gets braces,
``{e^{x_k}}^2``, the reading under which the note's quotient-rule lines hold (README, "How the
note is read").  Every repair is recorded and shown beside the formula.  A formula that still
cannot be converted is shown as its LaTeX source in a code block and recorded as a fallback:
rendering never fails a build, and the tests list the accepted repairs and fallbacks.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

_DOUBLE_SUP = re.compile(r"(?P<base>\\[A-Za-z]+|[A-Za-z0-9])\^\{(?P<sup>[^{}]*)\}\^(?P<exp>\{[^{}]*\}|\\[A-Za-z]+|[^\s{}])")


def repair(tex: str, fragments: set | None = None) -> str:
    """Brace the base of double superscripts: ``e^{a}^2`` -> ``{e^{a}}^2``.  The repaired
    pieces are added to ``fragments`` as (before, after) pairs."""

    def fix(m):
        new = "{" + m["base"] + "^{" + m["sup"] + "}}^" + m["exp"]
        if fragments is not None:
            fragments.add((m[0], new))
        return new

    prev = None
    while prev != tex:
        prev, tex = tex, _DOUBLE_SUP.sub(fix, tex, count=1)
    return tex


@dataclass
class Math:
    """One formula, ready for both renderings."""

    source: str  # LaTeX as written
    tex: str  # LaTeX as rendered (source, or repaired)
    mathml_inline: str | None  # None: conversion failed, shown as code
    mathml_block: str | None
    fixes: tuple = ()  # (before, after) pieces of a repair

    @property
    def repaired(self) -> bool:
        return self.tex != self.source


@dataclass
class MathLog:
    repairs: dict = field(default_factory=dict)  # source -> repaired tex
    fragments: set = field(default_factory=set)  # (before, after) pieces of the repairs
    fallbacks: dict = field(default_factory=dict)  # source -> error message


def latex_of(expr, latex_names=None) -> str:
    """SymPy's LaTeX of a parsed expression, as the verifier prints it (``symbol_names``), and
    robust to functions whose ``_latex`` takes no ``exp`` (a power of sigmoid(x) makes SymPy's
    printer call ``sigmoid._latex(printer, exp=...)``, a TypeError: the verifier's report then
    falls back to ``str``).  Powers of such functions print as ``f(x)^{e}``."""
    return _printer(latex_names or {}).doprint(expr)


def _printer(latex_names):
    from sympy.printing.latex import LatexPrinter

    class _Printer(LatexPrinter):
        def _print_Pow(self, expr):
            try:
                return super()._print_Pow(expr)
            except TypeError:
                base = self._print(expr.base)
                if not base.endswith(r"\right)"):
                    base = r"\left(%s\right)" % base
                return r"%s^{%s}" % (base, self._print(expr.exp))

    return _Printer({"symbol_names": latex_names} if latex_names else {})


_XMLNS = re.compile(r'\s+xmlns="[^"]*"')


def _to_mathml(tex: str, display: str) -> str:
    from latex2mathml.converter import convert

    out = convert(tex, display=display)
    return _XMLNS.sub("", out)  # HTML5 knows <math>; and no URL in the page, not even a namespace


class MathRenderer:
    def __init__(self):
        self.log = MathLog()
        self._cache: dict = {}

    def __call__(self, source: str) -> Math:
        if source in self._cache:
            return self._cache[source]
        tex, fixes = source, set()
        try:
            inline, block = _to_mathml(tex, "inline"), _to_mathml(tex, "block")
        except Exception:  # latex2mathml raises its own exception types, and sometimes others
            fixes = set()
            tex = repair(source, fixes)
            self.log.fragments |= fixes
            try:
                inline, block = _to_mathml(tex, "inline"), _to_mathml(tex, "block")
            except Exception as exc:  # shown as LaTeX source; recorded, never fatal
                tex, inline, block = source, None, None
                self.log.fallbacks[source] = f"{type(exc).__name__}: {exc}"
        if tex != source:
            self.log.repairs[source] = tex
        m = Math(source, tex, inline, block, tuple(sorted(fixes)) if tex != source else ())
        self._cache[source] = m
        return m


def md_inline(m: Math) -> str:
    if m.mathml_inline is None:
        return md_code(m.source)
    return "$" + m.tex + "$"


def md_block(m: Math) -> str:
    if m.mathml_block is None:
        return "```latex\n" + m.source + "\n```"
    return "```math\n" + m.tex + "\n```"


def md_code(text: str) -> str:
    """An inline code span that survives any backticks in ``text``."""
    run = max((len(r) for r in re.findall(r"`+", text)), default=0)
    fence = "`" * (run + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def html_inline(m: Math) -> str:
    if m.mathml_inline is None:
        return f'<code class="tex">{html.escape(m.source)}</code>'
    return m.mathml_inline


def html_block(m: Math) -> str:
    if m.mathml_block is None:
        return f'<pre class="tex">{html.escape(m.source)}</pre>'
    return f'<div class="math">{m.mathml_block}</div>'
