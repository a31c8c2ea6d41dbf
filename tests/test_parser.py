"""The expression parser: correct trees, clear errors, and no way to run code."""
import pytest
import sympy as sp

from derive.language.functions import D, sigmoid, softplus
from derive.language.parser import ParseError, parse_expression

x, y, g = sp.symbols("x y gamma", real=True)
NAMES = {"x": x, "y": y, "gamma": g}


def P(text):
    return parse_expression(text, NAMES)


@pytest.mark.parametrize("text, expected", [
    ("-(1 - x)^gamma*log(x)", -(1 - x) ** g * sp.log(x)),
    ("-x^2", -(x ** 2)),
    ("2^-1", sp.Rational(1, 2)),
    ("x**gamma**2", x ** (g ** 2)),
    ("0.25*x", x / 4),
    ("1e-3", sp.Rational(1, 1000)),
    ("ln(x) - log(x)", 0),
    ("sigmoid(x) + softplus(-x)", sigmoid(x) + softplus(-x)),
    ("γ*x", g * x),
    ("x/y/gamma", x / y / g),
])
def test_parses_math(text, expected):
    assert sp.simplify(P(text) - expected) == 0


def test_where_and_derivative():
    e = P("where(y == 1, x, 1 - x)")
    assert isinstance(e, sp.Piecewise)
    assert e.subs(y, 1) == x and e.subs(y, -1) == 1 - x
    d = P("D(x^2, x)")
    assert isinstance(d, D) and d.args == (x ** 2, x)


@pytest.mark.parametrize("text, message", [
    ("x +", "unexpected end"),
    ("(x", "unbalanced parentheses"),
    ("x)", "unbalanced parentheses"),
    ("x y", "write products with '*'"),
    ("foo", "undefined name 'foo'"),
    ("sin(x)", "unknown function 'sin'"),
    ("log(x, 2)", "takes 1 argument"),
    ("D(x, 2)", "must be a declared symbol"),
    ("where(x, 1, 2)", "cond must be a comparison"),
    ("", "empty expression"),
    ("x == y", None),  # allowed by the parser; the loader rejects comparisons as lines
    ("(x == y) + 1", "comparison cannot be used"),
    ("1e999", "out of range"),
    ("10^10^10", "too large"),
    ("(" * 150 + "x" + ")" * 150, "nested deeper"),
    ("-" * 5000 + "x", "nested deeper"),
    ("x" + "+x" * 20000, "limit"),
])
def test_errors_are_clear(text, message):
    if message is None:
        assert isinstance(P(text), sp.Eq)
        return
    with pytest.raises(ParseError) as info:
        P(text)
    assert message in str(info.value)


@pytest.mark.parametrize("hostile", [
    "__import__('os').system('touch /tmp/pwned')",
    "__import__",
    "x.__class__",
    "(lambda: 1)()",
    "lambda x: x",
    "[c for c in ()]",
    "exec('1')",
    "eval('1')",
    "'\\x41'",
    "Symbol('x')",
    "sympify('x')",
    "x; import os",
    "open('/etc/passwd')",
    "getattr(x, 'func')",
])
def test_no_code_runs(hostile, tmp_path, monkeypatch):
    import sympy

    calls = []
    monkeypatch.setattr(sympy, "sympify", lambda *a, **k: calls.append(a))
    with pytest.raises(ParseError):
        P(hostile)
    assert calls == []
    assert not (tmp_path / "pwned").exists()


def test_a_where_sympy_decides_is_refused_not_dropped():
    """where(sigmoid(-x) > 0, ...) is always true for real x: SymPy would fold it away, and a
    floating-point guard written that way silently vanished from a kernel (ASL returned NaN at
    clip = 0); the parser now says so.  An undecided condition and where(c, a, a) still parse."""
    x = sp.Symbol("x", real=True)
    clip = sp.Symbol("clip", nonnegative=True)
    with pytest.raises(ParseError, match="always true"):
        parse_expression("where(sigmoid(-x) > 0, 1/sigmoid(-x), 0)", {"x": x})
    with pytest.raises(ParseError, match="always false"):
        parse_expression("where(exp(x) <= 0, 1, x)", {"x": x})
    assert isinstance(parse_expression("where(clip > 0, 1/clip, 0)", {"clip": clip}), sp.Piecewise)
    assert parse_expression("where(x > 0, x, x)", {"x": x}) == x
