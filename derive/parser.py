"""A safe parser for the math expressions of derivation files.

Nothing from a file is ever evaluated as code: the text is tokenised and parsed by a small
recursive-descent parser that builds SymPy objects directly from a whitelist of operators,
functions and the names the file declared.  ``sympify``/``parse_expr`` (which call ``eval``)
are never used on file content.

Grammar (lowest precedence first)::

    expr       := additive [ ('==' | '!=' | '<' | '<=' | '>' | '>=') additive ]
    additive   := term (('+' | '-') term)*
    term       := unary (('*' | '/') unary)*          implicit products are not accepted
    unary      := ('-' | '+') unary | power
    power      := atom [ ('^' | '**') unary ]          right associative, binds tighter than unary minus
    atom       := NUMBER | NAME | NAME '(' expr (',' expr)* ')' | '(' expr ')'
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

import sympy as sp

from .functions import D, expm1, log1p, sigmoid, softplus, xexpm1inv

MAX_LENGTH = 20_000
MAX_DEPTH = 100


class ParseError(ValueError):
    """An expression could not be parsed; ``column`` is 1-based."""

    def __init__(self, message: str, text: str = "", column: int | None = None):
        self.message = message
        self.text = text
        self.column = column
        where = f" at column {column}" if column is not None else ""
        super().__init__(f"{message}{where}")


_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<num>(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_\u0370-\u03ff][A-Za-z0-9_\u0370-\u03ff]*)
  | (?P<op>\*\*|==|!=|<=|>=|[-+*/^(),<>])
    """,
    re.VERBOSE,
)

#: Greek letters people type in notes, mapped to the ASCII names used in files.
GREEK = {"γ": "gamma", "α": "alpha", "β": "beta", "σ": "sigmoid"}


@dataclass(frozen=True)
class Token:
    kind: str
    text: str
    pos: int


def tokenize(text: str) -> list[Token]:
    if not isinstance(text, str):
        raise ParseError(f"expected an expression string, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise ParseError(f"expression is {len(text)} characters long; the limit is {MAX_LENGTH}")
    tokens: list[Token] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ParseError(f"unexpected character {text[pos]!r}", text, pos + 1)
        kind = m.lastgroup
        if kind != "ws":
            tokens.append(Token(kind, m.group(), pos))
        pos = m.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


def _where(cond, a, b):
    return sp.Piecewise((a, cond), (b, True))


#: name -> (number of arguments, builder). Nothing outside this table can be called.
FUNCTIONS: dict[str, tuple[int, Callable]] = {
    "exp": (1, sp.exp),
    "log": (1, sp.log),
    "ln": (1, sp.log),
    "sqrt": (1, sp.sqrt),
    "abs": (1, sp.Abs),
    "sigmoid": (1, sigmoid),
    "softplus": (1, softplus),
    "log1p": (1, log1p),
    "expm1": (1, expm1),
    "xexpm1inv": (1, xexpm1inv),
    "where": (3, _where),
    "D": (2, None),  # built specially: second argument must be a name
}

_RELATIONS = {
    "==": lambda a, b: sp.Eq(a, b, evaluate=False),
    "!=": lambda a, b: sp.Ne(a, b, evaluate=False),
    "<": lambda a, b: sp.StrictLessThan(a, b, evaluate=False),
    "<=": lambda a, b: sp.LessThan(a, b, evaluate=False),
    ">": lambda a, b: sp.StrictGreaterThan(a, b, evaluate=False),
    ">=": lambda a, b: sp.GreaterThan(a, b, evaluate=False),
}

RESERVED = set(FUNCTIONS) | {"pi", "oo", "otherwise"}
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def check_name(name: str) -> None:
    """Raise ParseError unless ``name`` may be declared as a symbol or definition."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ParseError(
            f"invalid name {name!r}: names start with a letter and use letters, digits and '_'"
        )
    if name in RESERVED:
        raise ParseError(f"name {name!r} is reserved (a function or constant)")


class _Parser:
    def __init__(self, text: str, names: Mapping[str, sp.Basic]):
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0
        self.names = names
        self.depth = 0

    # -- helpers -----------------------------------------------------------------------
    def peek(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def error(self, message: str, tok: Token | None = None):
        tok = tok or self.peek()
        return ParseError(message, self.text, tok.pos + 1)

    def expect(self, text: str) -> Token:
        tok = self.peek()
        if tok.text != text or tok.kind == "end":
            found = "end of expression" if tok.kind == "end" else repr(tok.text)
            raise self.error(f"expected {text!r}, found {found}")
        return self.take()

    def enter(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"expression nested deeper than {MAX_DEPTH} levels")

    # -- grammar -----------------------------------------------------------------------
    def parse(self) -> sp.Basic:
        if self.peek().kind == "end":
            raise ParseError("empty expression", self.text, 1)
        node = self.expr()
        tok = self.peek()
        if tok.kind != "end":
            if tok.text == ")":
                raise self.error("unbalanced parentheses: unexpected ')'")
            if tok.kind in ("name", "num", "op") and tok.text not in _RELATIONS:
                raise self.error(
                    f"unexpected {tok.text!r} (write products with '*', e.g. 'gamma*x')"
                )
            raise self.error(f"unexpected {tok.text!r}")
        return node

    def expr(self):
        left = self.additive()
        tok = self.peek()
        if tok.kind == "op" and tok.text in _RELATIONS:
            self.take()
            right = self.additive()
            if self.peek().kind == "op" and self.peek().text in _RELATIONS:
                raise self.error("chained comparisons are not supported")
            return _RELATIONS[tok.text](left, right)
        return left

    def additive(self):
        node = self.term()
        while self.peek().text in ("+", "-") and self.peek().kind == "op":
            op = self.take().text
            rhs = self.term()
            self._arith(node, op)
            self._arith(rhs, op)
            node = sp.Add(node, rhs) if op == "+" else sp.Add(node, -rhs)
        return node

    def term(self):
        node = self.unary()
        while self.peek().text in ("*", "/") and self.peek().kind == "op":
            op = self.take().text
            rhs = self.unary()
            self._arith(node, op)
            self._arith(rhs, op)
            node = sp.Mul(node, rhs) if op == "*" else sp.Mul(node, sp.Pow(rhs, -1))
        return node

    def unary(self):
        tok = self.peek()
        if tok.kind == "op" and tok.text in ("-", "+"):
            self.take()
            self.enter()
            operand = self.unary()
            self.depth -= 1
            self._arith(operand, tok.text)
            return -operand if tok.text == "-" else operand
        return self.power()

    def power(self):
        base = self.atom()
        tok = self.peek()
        if tok.kind == "op" and tok.text in ("^", "**"):
            self.take()
            self.enter()
            exponent = self.unary()
            self.depth -= 1
            self._arith(base, "^")
            self._arith(exponent, "^")
            if base.is_number and exponent.is_number and exponent.is_Rational and abs(exponent) > 1000:
                raise self.error("numeric power too large (exponent above 1000)", tok)
            return sp.Pow(base, exponent)
        return base

    def atom(self):
        tok = self.take()
        if tok.kind == "num":
            m = re.search(r"[eE]([+-]?\d+)$", tok.text)
            if m and abs(int(m.group(1))) > 400:
                raise self.error(f"number {tok.text!r} is out of range (|exponent| <= 400)", tok)
            return sp.Rational(tok.text) if any(c in tok.text for c in ".eE") else sp.Integer(tok.text)
        if tok.kind == "name":
            name = GREEK.get(tok.text, tok.text)
            if name.startswith("_"):
                raise self.error(f"names starting with '_' are not allowed: {tok.text!r}", tok)
            if self.peek().text == "(" and self.peek().kind == "op":
                return self.call(name, tok)
            if name in FUNCTIONS:
                raise self.error(f"function {name!r} needs arguments, e.g. {name}(x)", tok)
            if name == "pi":
                return sp.pi
            if name not in self.names:
                raise self.error(f"undefined name {tok.text!r}", tok)
            return self.names[name]
        if tok.kind == "op" and tok.text == "(":
            self.enter()
            node = self.expr()
            self.depth -= 1
            if self.peek().text != ")":
                found = "end of expression" if self.peek().kind == "end" else repr(self.peek().text)
                raise self.error(f"unbalanced parentheses: expected ')', found {found}")
            self.take()
            return node
        if tok.kind == "end":
            raise self.error("unexpected end of expression", tok)
        if tok.text == ")":
            raise self.error("unbalanced parentheses: unexpected ')'", tok)
        raise self.error(f"unexpected {tok.text!r}", tok)

    def call(self, name: str, tok: Token):
        if name not in FUNCTIONS:
            raise self.error(
                f"unknown function {tok.text!r}; known: {', '.join(sorted(FUNCTIONS))}", tok
            )
        self.expect("(")
        self.enter()
        args = [self.expr()]
        while self.peek().text == "," and self.peek().kind == "op":
            self.take()
            args.append(self.expr())
        self.depth -= 1
        if self.peek().text != ")":
            found = "end of expression" if self.peek().kind == "end" else repr(self.peek().text)
            raise self.error(f"unbalanced parentheses in call to {name}: expected ')', found {found}")
        self.take()
        nargs, builder = FUNCTIONS[name]
        if len(args) != nargs:
            raise self.error(f"{name} takes {nargs} argument(s), got {len(args)}", tok)
        if name == "where":
            if not isinstance(args[0], sp.core.relational.Relational):
                raise self.error("where(cond, a, b): cond must be a comparison such as y == 1", tok)
            for a in args[1:]:
                self._arith(a, "where")
            return builder(*args)
        for a in args:
            self._arith(a, name)
        if name == "D":
            f, v = args
            if not isinstance(v, sp.Symbol):
                raise self.error("D(f, v): v must be a declared symbol or definition name", tok)
            return D(f, v)
        return builder(*args)

    def _arith(self, node, op):
        if isinstance(node, sp.core.relational.Relational):
            raise self.error(f"a comparison cannot be used as an operand of {op!r}")


def parse_expression(text: str, names: Mapping[str, sp.Basic]) -> sp.Basic:
    """Parse ``text`` using only ``names`` (str -> SymPy object) and the whitelisted functions."""
    try:
        return _Parser(text, names).parse()
    except RecursionError:  # pragma: no cover - guarded by MAX_DEPTH, kept as a backstop
        raise ParseError(f"expression nested deeper than {MAX_DEPTH} levels", text) from None
