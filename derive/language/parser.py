"""A safe parser for the math expressions of derivation files.

Nothing from a file is ever evaluated as code: the text is tokenised and parsed by a small
recursive-descent parser that builds SymPy objects directly from a whitelist of operators,
functions and the names the file declared.  ``sympify``/``parse_expr`` (which call ``eval``)
are never used on file content.

Grammar (lowest precedence first)::

    expr       := conj ('or' conj)*                    conditions: only inside where(...)
    conj       := neg ('and' neg)*
    neg        := 'not' neg | rel
    rel        := additive [ ('==' | '!=' | '<' | '<=' | '>' | '>=') additive ]
    additive   := term (('+' | '-') term)*
    term       := unary (('*' | '/') unary)*          implicit products are not accepted
    unary      := ('-' | '+') unary | power
    power      := atom [ ('^' | '**') unary ]          right associative, binds tighter than unary minus
    atom       := NUMBER | NAME | NAME '[' NAME ']' | NAME '(' expr (',' expr)* ')' | '(' expr ')'

Indexed families (``x[k]`` with ``x = { domain = "real", size = "K" }``) and index symbols
(``k = { index = "K" }``, an integer in 0..K-1) are told to the parser by the names table: a family
is a SymPy ``IndexedBase`` in it, and the table's ``index_size`` attribute maps each index symbol
(and each family) to its size symbol.  ``sum(f, k)`` is ``Sum(f, (k, 0, K - 1))``, ``delta(a, b)``
is ``KroneckerDelta(a, b)``; an index of one size cannot index a family of another (out of range).

Parsing is bounded in time and memory whatever the text: the length, the nesting depth, the
digits of every literal and of every exact number SymPy computes from them are limited, a
long sum or product is built in one SymPy call instead of one per term (which is quadratic),
and a constant (a subexpression without symbols) is checked before SymPy sees it:

* it is evaluated once, bottom-up, in interval arithmetic (:func:`_enclose`), so that an
  expression that is undefined or complex as written (``1/0``, ``log(0)``, ``log(-1)``,
  ``sqrt(-2)``, ``(-8)^(1/3)``) is a clear error at its column instead of SymPy's ``zoo``,
  ``nan`` or ``I*pi``, and a constant too large to handle (``exp(exp(exp(10)))``) is refused;
* functions may be nested at most MAX_CONSTANT_NESTING deep inside a constant: SymPy's
  automatic evaluation of a function of a constant evaluates the constant numerically, at a
  cost that doubles with each level of nesting (``log(2 - log(2 - ...))``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Mapping

import sympy as sp

from derive.language.functions import D, expm1, expm1mx, log1p, sigmoid, softplus, xexpm1inv

MAX_LENGTH = 20_000
MAX_DEPTH = 32  # the shipped files nest 6 deep; SymPy's printers and algorithms recurse per level
#: digits of a number literal, and of any exact number computed from the literals
MAX_DIGITS = 1000
_MAX_BITS = int(MAX_DIGITS * 3.3219280948873626) + 1
#: functions nested inside a constant (subexpression without symbols): log(1 + log(2)) is 2
MAX_CONSTANT_NESTING = 4
#: arguments of one call (max and min take two or more)
MAX_ARGS = 16
#: |argument| of exp, sigmoid, softplus, expm1, xexpm1inv and expm1mx when the argument is a constant
MAX_EXP_ARGUMENT = 10_000
#: a constant's magnitude, as a power of ten
MAX_MAGNITUDE_DIGITS = 5000
#: sums and products with more terms than this are built in one SymPy call (linear time); the
#: first terms are combined one by one, as they always were, so that ordinary expressions
#: keep exactly their former tree (2*(x + 1)*y is (2*x + 2)*y)
_FOLD_TERMS = 32


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
  | (?P<op>\*\*|==|!=|<=|>=|[-+*/^(),<>\[\]])
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


def _max(*args):
    """max(a, b, ...) as a where(): the first argument not below any other (ties take the
    earlier one), so that the prover case-splits it like any where() and D(max(a, b), v) is
    the derivative of the branch taken."""
    return _extreme(args, sp.GreaterThan)


def _min(*args):
    return _extreme(args, sp.LessThan)


def _extreme(args, rel):
    if len(args) == 1:
        return args[0]
    branches = []
    for i, a in enumerate(args[:-1]):
        conds = [rel(a, b, evaluate=False) for b in args[i + 1:]]
        branches.append((a, sp.And(*conds) if len(conds) > 1 else conds[0]))
    branches.append((args[-1], True))
    return sp.Piecewise(*branches)


def _clamp(v, lo, hi):
    """clamp(v, lo, hi) = min(max(v, lo), hi) as a where(): lo below lo, hi above hi."""
    return sp.Piecewise((lo, sp.StrictLessThan(v, lo, evaluate=False)),
                        (hi, sp.StrictGreaterThan(v, hi, evaluate=False)), (v, True))


#: name -> (number of arguments, builder). Nothing outside this table can be called.
FUNCTIONS: dict[str, tuple[int, Callable]] = {
    "exp": (1, sp.exp),
    "log": (1, sp.log),
    "ln": (1, sp.log),
    "sqrt": (1, sp.sqrt),
    "abs": (1, sp.Abs),
    "sign": (1, sp.sign),
    "tanh": (1, sp.tanh),
    "sinh": (1, sp.sinh),
    "cosh": (1, sp.cosh),
    "max": (-2, _max),  # two or more arguments
    "min": (-2, _min),
    "clamp": (3, _clamp),
    "sigmoid": (1, sigmoid),
    "softplus": (1, softplus),
    "log1p": (1, log1p),
    "expm1": (1, expm1),
    "xexpm1inv": (1, xexpm1inv),
    "expm1mx": (1, expm1mx),
    "where": (3, _where),
    "D": (2, None),  # built specially: second argument must be a name or a family member x[j]
    "sum": (2, None),  # sum(f, k): built specially, k an index symbol ([symbols] k = { index = "K" })
    "delta": (2, None),  # delta(a, b): one-hot, 1 when the indices a and b are equal, else 0
}

_RELATIONS = {
    "==": lambda a, b: sp.Eq(a, b, evaluate=False),
    "!=": lambda a, b: sp.Ne(a, b, evaluate=False),
    "<": lambda a, b: sp.StrictLessThan(a, b, evaluate=False),
    "<=": lambda a, b: sp.LessThan(a, b, evaluate=False),
    ">": lambda a, b: sp.StrictGreaterThan(a, b, evaluate=False),
    ">=": lambda a, b: sp.GreaterThan(a, b, evaluate=False),
}

#: words of conditions (where(x > 0 and y < 1, ...))
LOGIC_WORDS = {"and", "or", "not"}

#: functions whose names a file may still declare as symbols (huber's delta): the name followed by '('
#: is the function, alone it is the symbol
SOFT_FUNCTIONS = {"sum", "delta"}

RESERVED = (set(FUNCTIONS) - SOFT_FUNCTIONS) | {"pi", "oo", "otherwise"} | LOGIC_WORDS


def _is_condition(node) -> bool:
    return isinstance(node, (sp.core.relational.Relational, sp.And, sp.Or, sp.Not))
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def check_name(name: str) -> None:
    """Raise ParseError unless ``name`` may be declared as a symbol or definition."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ParseError(
            f"invalid name {_short(str(name))!r}: names start with a letter and use letters, digits and '_'"
        )
    if name in RESERVED:
        raise ParseError(f"name {_short(name)!r} is reserved (a function or constant)")


class _Parser:
    def __init__(self, text: str, names: Mapping[str, sp.Basic]):
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0
        self.names = names
        self.depth = 0
        self._memo = {}
        self._sizes = {}

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
        node = self.conj()
        while self._word("or"):
            tok = self.take()
            rhs = self.conj()
            self._logic(node, tok)
            self._logic(rhs, tok)
            node = sp.Or(node, rhs)
        return node

    def conj(self):
        node = self.neg()
        while self._word("and"):
            tok = self.take()
            rhs = self.neg()
            self._logic(node, tok)
            self._logic(rhs, tok)
            node = sp.And(node, rhs)
        return node

    def neg(self):
        if self._word("not"):
            tok = self.take()
            self.enter()
            operand = self.neg()
            self.depth -= 1
            self._logic(operand, tok)
            return sp.Not(operand)
        return self.rel()

    def _word(self, word):
        tok = self.peek()
        return tok.kind == "name" and tok.text == word

    def _logic(self, node, tok):
        if not _is_condition(node):
            what = "negates a condition" if tok.text == "not" else "joins conditions"
            raise self.error(f"{tok.text!r} {what} (comparisons such as x > 0), not values", tok)

    def rel(self):
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
        start = self.peek().pos
        node = self.term()
        rest = []
        count = 0
        while self.peek().text in ("+", "-") and self.peek().kind == "op":
            tok = self.take()
            op = tok.text
            rhs = self.term()
            self._arith(node, op)
            self._arith(rhs, op)
            count += 1
            if count < _FOLD_TERMS:
                node = sp.Add(node, rhs) if op == "+" else sp.Add(node, -rhs)
                self._number(node, tok, start)
            else:
                rest.append(rhs if op == "+" else -rhs)
        if rest:
            node = sp.Add(node, *rest)
            self._number(node, self.peek(), start)
        return node

    def term(self):
        start = self.peek().pos
        node = self.unary()
        rest = []
        count = 0
        bits = [0]
        while self.peek().text in ("*", "/") and self.peek().kind == "op":
            tok = self.take()
            op = tok.text
            rhs = self.unary()
            self._arith(node, op)
            self._arith(rhs, op)
            if op == "/":
                self._check_divisor(rhs, tok)
            count += 1
            if count < _FOLD_TERMS:
                node = sp.Mul(node, rhs) if op == "*" else sp.Mul(node, sp.Pow(rhs, -1))
                self._number(node, tok, start)
            else:
                rest.append(rhs if op == "*" else sp.Pow(rhs, -1))
                self._bits_so_far(rhs, bits, tok)
        if rest:
            node = sp.Mul(node, *rest)
            self._number(node, self.peek(), start)
        return node

    def unary(self):
        tok = self.peek()
        if tok.kind == "op" and tok.text in ("-", "+"):
            self.take()
            self.enter()
            operand = self.unary()
            self.depth -= 1
            self._arith(operand, tok.text)
            return self._number(-operand, tok, tok.pos) if tok.text == "-" else operand
        return self.power()

    def power(self):
        start = self.peek().pos
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
            self._check_power(base, exponent, tok)
            return self._number(sp.Pow(base, exponent), tok, start)
        return base

    def atom(self):
        tok = self.take()
        if tok.kind == "num":
            digits = sum(c.isdigit() for c in tok.text.split("e")[0].split("E")[0])
            if digits > MAX_DIGITS:
                raise self.error(f"number with {digits} digits; the limit is {MAX_DIGITS}", tok)
            m = re.search(r"[eE]([+-]?\d+)$", tok.text)
            if m and (len(m.group(1)) > 6 or abs(int(m.group(1))) > 400):
                raise self.error(f"number {_short(tok.text)!r} is out of range (|exponent| <= 400)", tok)
            value = sp.Rational(tok.text) if any(c in tok.text for c in ".eE") else sp.Integer(tok.text)
            return self._number(value, tok)
        if tok.kind == "name":
            name = GREEK.get(tok.text, tok.text)
            if name.startswith("_"):
                raise self.error(f"names starting with '_' are not allowed: {tok.text!r}", tok)
            if self.peek().text == "(" and self.peek().kind == "op":
                return self.call(name, tok)
            if name in FUNCTIONS and not (name in SOFT_FUNCTIONS and name in self.names):
                raise self.error(f"function {name!r} needs arguments, e.g. {name}(x)", tok)
            if name in LOGIC_WORDS:
                raise self.error(f"{name!r} joins two conditions, as in where(x > 0 {name} y < 1, a, b)"
                                 if name != "not" else "'not' negates a condition, as in where(not x > 0, a, b)",
                                 tok)
            if name == "pi":
                return sp.pi
            if name not in self.names:
                raise self.error(f"undefined name {_short(tok.text)!r}", tok)
            obj = self.names[name]
            if isinstance(obj, sp.IndexedBase):
                return self.member(obj, name, tok)
            if self.peek().text == "[" and self.peek().kind == "op":
                raise self.error(f"{_short(name)!r} is not an indexed family (declare it with size = \"K\" to "
                                 f"write {_short(name)}[k])", self.peek())
            return obj
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

    def _index_sizes(self):
        return getattr(self.names, "index_size", None) or {}

    def _index(self, node, what, tok):
        """The size symbol of an index symbol, or a clear error."""
        size = self._index_sizes().get(node) if isinstance(node, sp.Symbol) else None
        if size is None and node in self._index_sizes().values():
            raise self.error(f"{what}: {_short(str(node))!r} is a number of classes, not an index (an index k "
                             f"runs over 0..{_short(str(node))}-1: k = {{ index = \"{_short(str(node))}\" }})", tok)
        if size is None:
            shown = _short(str(node))
            raise self.error(f"{what}: {shown!r} is not a declared index (declare it in [symbols] as "
                             f"{shown if NAME_RE.match(shown) else 'k'} = {{ index = \"K\" }}, an integer in "
                             "0..K-1)", tok)
        return size

    def member(self, base, name, tok):
        """x[i]: a member of the family x, i an index symbol of the family's size."""
        br = self.peek()
        if br.text != "[" or br.kind != "op":
            raise self.error(f"{_short(name)!r} is an indexed family: write {_short(name)}[k] with a declared "
                             "index k", tok)
        self.take()
        itok = self.peek()
        if itok.kind == "num":
            raise self.error(f"{_short(name)}[{_short(itok.text)}]: a fixed class number may be out of range; "
                             f"index families by a declared index (k = {{ index = \"K\" }})", itok)
        if itok.kind != "name":
            raise self.error(f"{_short(name)}[...]: expected an index name, found "
                             f"{'end of expression' if itok.kind == 'end' else repr(itok.text)}", itok)
        self.take()
        iname = GREEK.get(itok.text, itok.text)
        if iname not in self.names:
            raise self.error(f"{_short(name)}[{_short(iname)}]: {_short(iname)!r} is not declared (declare the "
                             f"index in [symbols] as {_short(iname)} = {{ index = \"K\" }})", itok)
        idx = self.names[iname]
        size = self._index(idx, f"{_short(name)}[{_short(iname)}]", itok)
        fsize = self._index_sizes().get(base)
        if fsize is not None and size != fsize:
            raise self.error(f"{_short(name)}[{_short(iname)}]: index out of range: {iname} runs over "
                             f"0..{size}-1 but {name} over 0..{fsize}-1", itok)
        if self.peek().text != "]":
            found = "end of expression" if self.peek().kind == "end" else repr(self.peek().text)
            raise self.error(f"{_short(name)}[{_short(iname)}...: expected ']', found {found} (an index is one "
                             "declared index name)")
        self.take()
        return base[idx]

    def call(self, name: str, tok: Token):
        if name not in FUNCTIONS:
            raise self.error(
                f"unknown function {_short(tok.text)!r}; known: {', '.join(sorted(FUNCTIONS))}", tok
            )
        self.expect("(")
        self.enter()
        args = [self.expr()]
        while self.peek().text == "," and self.peek().kind == "op":
            self.take()
            args.append(self.expr())
            if len(args) > MAX_ARGS:
                break
        self.depth -= 1
        nargs, builder = FUNCTIONS[name]
        if nargs < 0:  # at least -nargs arguments
            if len(args) < -nargs or len(args) > MAX_ARGS:
                raise self.error(f"{name} takes {-nargs} to {MAX_ARGS} arguments, got {len(args)}"
                                 + ("+" if len(args) > MAX_ARGS else ""), tok)
        elif len(args) != nargs:
            raise self.error(f"{name} takes {nargs} argument(s), got {len(args)}"
                             + ("+" if len(args) > max(3, nargs) else ""), tok)
        for a in args if name != "where" else args[1:]:
            if _is_condition(a):
                raise self.error(f"{name}(...): a condition (comparison) is not a value; only the first "
                                 "argument of where(...) is a condition", tok)
        if self.peek().text != ")":
            found = "end of expression" if self.peek().kind == "end" else repr(self.peek().text)
            raise self.error(f"unbalanced parentheses in call to {name}: expected ')', found {found}")
        self.take()
        if name == "where":
            if not _is_condition(args[0]):
                if args[0] in (sp.true, sp.false):
                    return args[1] if args[0] is sp.true else args[2]
                raise self.error("where(cond, a, b): cond must be a comparison such as y == 1, or comparisons "
                                 "joined by and, or, not", tok)
            if args[0].has(sp.Piecewise):  # SymPy folds it into ITE cases: exponential in their number
                raise self.error("where(cond, a, b): cond may not itself contain where(...); compare a "
                                 "defined symbol instead, or move the where outside", tok)
            for a in args[1:]:
                self._arith(a, "where")
            for a in args:
                self._check_nesting(a, name, tok)
            decided = self._decide(args[0], tok)
            if decided is not None:  # a constant condition: SymPy's Piecewise fails on some
                return args[1] if decided else args[2]
            node = builder(*args)
            if not isinstance(node, sp.Piecewise) and args[1] != args[2]:
                # SymPy decided the condition from the symbols' assumptions (sigmoid(-x) > 0): the
                # where() would vanish, and with it a floating-point guard the author meant to keep
                always = "true" if node == args[1] else "false"
                raise self.error(f"where({_short(str(args[0]))}, ...): the condition is always {always} for "
                                 "every value of the symbols (SymPy decides it), so this where() has no effect "
                                 "and a floating-point guard written this way would be dropped from the kernel: "
                                 "compare a quantity that can fall on either side, e.g. a parameter at its "
                                 "closed end (where(clip > 0, ...))", tok)
            return self._number(node, tok, tok.pos)
        for a in args:
            self._arith(a, name)
        if name == "D":
            f, v = args
            if not isinstance(v, (sp.Symbol, sp.Indexed)):
                raise self.error("D(f, v): v must be a declared symbol, a definition name or a family member "
                                 "x[j]", tok)
            if isinstance(v, sp.Symbol) and v in self._index_sizes():
                raise self.error(f"D(f, {v}): {v} is an index (an integer); differentiate by a family member "
                                 f"such as x[{v}]", tok)
            return D(f, v)
        if name == "sum":
            f, k = args
            size = self._index(k, "sum(f, k)", tok)
            if any(isinstance(s, sp.Sum) and k in s.variables for s in sp.preorder_traversal(f)):
                raise self.error(f"sum(f, {k}): f already sums over {k}; name the inner index differently", tok)
            return sp.Sum(f, (k, 0, size - 1))
        if name == "delta":
            a, b = args
            sa = self._index(a, "delta(a, b)", tok)
            sb = self._index(b, "delta(a, b)", tok)
            if sa != sb:
                raise self.error(f"delta({a}, {b}): the indices run over different ranges (0..{sa}-1 and "
                                 f"0..{sb}-1)", tok)
            return sp.KroneckerDelta(a, b)
        self._check_argument(name, args[0], tok)
        return self._number(builder(*args), tok, tok.pos)

    # -- constants -----------------------------------------------------------------------
    def _number(self, node, tok, start=None):
        """Refuse an exact number with more than MAX_DIGITS digits, SymPy's undefined values,
        and (given ``start``, where the text of ``node`` begins) a tree that SymPy's automatic
        evaluation made much larger than its text: where(...) distributes over a power, so a
        tower of them doubles per level; every later walk of such a tree is exponential."""
        if start is not None and not node.is_Atom:
            span = self.tokens[self.i].pos - start if self.i < len(self.tokens) else len(self.text) - start
            size = _tree_size(node, self._sizes)
            if size > _GROWTH * max(span, 1) + 64:
                raise self.error(f"the expression grows too large when SymPy evaluates it ({size} nodes from "
                                 f"{span} characters: where(...) copied into each case of a power?)", tok)
        if node.is_Number:
            if node.is_Rational:
                if abs(node.p).bit_length() > _MAX_BITS or node.q.bit_length() > _MAX_BITS:
                    raise self.error(f"number too large: it has more than {MAX_DIGITS} digits", tok)
            elif node.is_Float:
                pass
            else:  # zoo, nan, oo, -oo
                raise self.error(f"the expression is undefined as written (it evaluates to {node})", tok)
        elif node is sp.S.ImaginaryUnit:
            raise self.error("the expression is complex as written (it evaluates to I)", tok)
        return node

    def _bits_so_far(self, factor, bits, tok):
        """A long product of big numbers, refused before SymPy multiplies them out."""
        if factor.is_Rational:
            bits[0] += abs(factor.p).bit_length() + factor.q.bit_length()
            if bits[0] > 2 * _MAX_BITS:
                raise self.error(f"number too large: it has more than {MAX_DIGITS} digits", tok)

    def _value(self, node, tok):
        try:
            return _enclose(node, self._memo)
        except _NotDefined as exc:
            raise self.error(str(exc), tok) from None

    def _check_nesting(self, node, name, tok):
        v = self._value(node, tok)
        if v is not None and v[1] >= MAX_CONSTANT_NESTING:
            raise self.error(f"{name}(...) of a constant that already nests {v[1]} functions; the limit is "
                             f"{MAX_CONSTANT_NESTING} (write the constant more simply)", tok)
        return v

    def _decide(self, rel, tok):
        """True or False for a comparison of two constants (or and/or/not of such), None when
        it has symbols."""
        if isinstance(rel, (sp.And, sp.Or, sp.Not)):
            parts = [self._decide(a, tok) for a in rel.args]
            if None in parts:
                return None
            if isinstance(rel, sp.Not):
                return not parts[0]
            return all(parts) if isinstance(rel, sp.And) else any(parts)
        lhs, rhs = rel.args
        a, b = self._value(lhs, tok), self._value(rhs, tok)
        if a is None or b is None:
            return None
        if lhs.is_Rational and rhs.is_Rational:
            return bool(rel.func(lhs, rhs))
        a, b = a[0], b[0]
        op = rel.rel_op
        if a.b < b.a or b.b < a.a:  # disjoint enclosures: the sign of lhs - rhs is known
            less = a.b < b.a
            return {"==": False, "!=": True, "<": less, "<=": less, ">": not less, ">=": not less}[op]
        raise self.error(f"cannot decide the constant condition {_short(str(rel))}: its two sides "
                         "cannot be told apart numerically", tok)

    def _check_divisor(self, node, tok):
        v = self._value(node, tok)
        if v is None:
            return
        if node.is_zero is True and node.is_Number:
            raise self.error("division by zero", tok)
        iv = v[0]
        if iv.a <= 0 <= iv.b:
            raise self.error("division by a constant that cannot be told apart from 0", tok)

    def _check_power(self, base, exponent, tok):
        vb = self._value(base, tok)
        ve = self._value(exponent, tok)
        if vb is None:
            return
        b = vb[0]
        if ve is None:  # c^x: real for c > 0; (-1)^y is used with labels y in {-1, 1}
            return
        e = ve[0]
        if max(vb[1], ve[1]) >= MAX_CONSTANT_NESTING and not exponent.is_Integer:
            raise self.error(f"power of constants that nest {max(vb[1], ve[1])} functions; the limit is "
                             f"{MAX_CONSTANT_NESTING} (write the constant more simply)", tok)
        if base.is_Number and base.is_zero:
            if not (e.a > 0 or exponent.is_zero):
                raise self.error("0 to a power that is not positive is undefined", tok)
            return
        if exponent.is_Integer:
            if b.a <= 0 <= b.b and exponent < 0:
                raise self.error("division by a constant that cannot be told apart from 0", tok)
        elif not b.a > 0:
            if b.b < 0:
                raise self.error("a negative number to a non-integer power is complex", tok)
            raise self.error("a constant that cannot be told apart from 0 or a negative number, to a "
                             "non-integer power", tok)
        if base.is_Rational and exponent.is_Rational:
            digits = max(math.log10(abs(base.p)), math.log10(base.q)) * abs(exponent)
            if digits > MAX_DIGITS:
                raise self.error(f"number too large: the power has more than {MAX_DIGITS} digits", tok)

    def _check_argument(self, name, arg, tok):
        v = self._check_nesting(arg, name, tok)
        if v is None:
            return
        a = v[0]
        if name in ("log", "ln"):
            if arg.is_Number and arg.is_zero:
                raise self.error(f"{name}(0) is undefined", tok)
            if not a.a > 0:
                if a.b < 0:
                    raise self.error(f"{name} of a negative number is complex", tok)
                raise self.error(f"{name} of a constant that cannot be told apart from 0", tok)
        elif name == "sqrt":
            if not (a.a >= 0 or (arg.is_Number and arg.is_zero)):
                if a.b < 0:
                    raise self.error("sqrt of a negative number is complex", tok)
                raise self.error("sqrt of a constant that cannot be told apart from 0", tok)
        elif name == "log1p":
            if not a.a > -1:
                raise self.error("log1p of a constant that is not above -1 is undefined or complex", tok)
        elif name in _EXP_LIKE:
            if abs(a.a) > MAX_EXP_ARGUMENT or abs(a.b) > MAX_EXP_ARGUMENT:
                raise self.error(f"{name} of a constant beyond +-{MAX_EXP_ARGUMENT}: too large", tok)

    def _arith(self, node, op):
        if _is_condition(node):
            raise self.error(f"a comparison cannot be used as an operand of {op!r}")


#: nodes of a parsed tree per character of its text, at most (ordinary text: below 2)
_GROWTH = 8


def _tree_size(node, memo):
    """Number of nodes of ``node`` as a tree (shared subtrees counted each time), memoised."""
    hit = memo.get(node)
    if hit is None:
        hit = 1 + sum(_tree_size(a, memo) for a in node.args)
        memo[node] = hit
    return hit


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


_EXP_LIKE = ("exp", "sigmoid", "softplus", "expm1", "xexpm1inv", "expm1mx", "sinh", "cosh", "tanh")
_UNDEFINED = (sp.S.ComplexInfinity, sp.S.NaN, sp.S.Infinity, sp.S.NegativeInfinity, sp.S.ImaginaryUnit)


class _NotDefined(Exception):
    pass


#: errors of SymPy itself that parse_expression reports as a ParseError; the fuzz harness
#: (tests/fuzz_atheris.py) sets BACKSTOP = False to see them as findings instead
_SYMPY_FAILURES = (TypeError, ValueError, ArithmeticError, AttributeError, NotImplementedError, IndexError,
                   KeyError)
BACKSTOP = True


def _ivctx():
    from mpmath.ctx_iv import MPIntervalContext

    ctx = MPIntervalContext()
    ctx.prec = 96
    return ctx


_IV = _ivctx()
_IV_MAX = _IV.mpf(10) ** MAX_MAGNITUDE_DIGITS


def _hull(values):
    return _IV.mpf([min(v.a for v in values).a, max(v.b for v in values).b])


def _xexpm1inv_at(u):
    if u == 0:
        return _IV.mpf(1)
    return u / (_IV.exp(u) - 1)


def _enclose(node, memo):
    """An interval that contains the value of ``node`` and its function nesting depth, or None
    when ``node`` has symbols.  Raises _NotDefined when the value is undefined or complex (or
    too large).  Memoised in ``memo``: each distinct subexpression is evaluated once."""
    hit = memo.get(node)
    if hit is not None or node in memo:
        return hit
    iv = _IV
    out = None
    if node.is_Symbol or isinstance(node, D):
        out = None
    elif node.is_Rational:
        out = (iv.mpf(int(node.p)) / iv.mpf(int(node.q)), 0)
    elif node in _UNDEFINED:
        raise _NotDefined(f"the expression is undefined or complex as written (it contains {node})")
    elif node is sp.pi:
        out = (iv.pi, 0)
    elif node is sp.E:
        out = (iv.e, 0)
    elif node.is_Add or node.is_Mul:
        parts = [_enclose(a, memo) for a in node.args]
        if all(p is not None for p in parts):
            acc = parts[0][0]
            for p in parts[1:]:
                acc = acc + p[0] if node.is_Add else acc * p[0]
            out = (acc, max(p[1] for p in parts))
    elif node.is_Pow:
        b, e = _enclose(node.base, memo), _enclose(node.exp, memo)
        if b is not None and e is not None:
            if node.exp.is_Integer:
                value = b[0] ** int(node.exp)
                depth = b[1]
            elif b[0].a > 0:
                lg = e[0] * iv.log(b[0])
                if lg.b > MAX_MAGNITUDE_DIGITS * 2.31:
                    raise _NotDefined("a constant too large to handle (a power above 10^%d)" % MAX_MAGNITUDE_DIGITS)
                value = iv.exp(lg)
                depth = max(b[1], e[1]) + 1
            else:
                raise _NotDefined("the expression is complex as written (a power of a number that is not "
                                  "positive)")
            out = (value, depth)
    elif isinstance(node, sp.Piecewise):
        parts = [_enclose(a.expr, memo) for a in node.args]
        conds = [(None, 0) if isinstance(a.cond, sp.logic.boolalg.BooleanAtom) else _enclose(a.cond, memo)
                 for a in node.args]
        if all(p is not None for p in parts + conds):
            out = (_hull([p[0] for p in parts]), max(p[1] for p in parts + conds) + 1)
    elif isinstance(node, sp.core.relational.Relational):
        parts = [_enclose(a, memo) for a in node.args]
        if all(p is not None for p in parts):
            out = (None, max(p[1] for p in parts))
    elif isinstance(node, sp.Function) and len(node.args) == 1:
        a = _enclose(node.args[0], memo)
        if a is not None:
            x = a[0]
            name = _FUNCTION_NAMES.get(type(node))
            if name in _EXP_LIKE and (abs(x.a) > MAX_EXP_ARGUMENT or abs(x.b) > MAX_EXP_ARGUMENT):
                raise _NotDefined(f"{name} of a constant beyond +-{MAX_EXP_ARGUMENT}: too large")
            if name == "exp":
                value = iv.exp(x)
            elif name == "log":
                if not x.a > 0:
                    raise _NotDefined("log of a constant that is not positive: undefined or complex")
                value = iv.log(x)
            elif name == "abs":
                value = abs(x)
            elif name == "sign":
                value = iv.mpf(1) if x.a > 0 else iv.mpf(-1) if x.b < 0 else iv.mpf(0) if x.a == x.b == 0 \
                    else iv.mpf([-1, 1])
            elif name in ("sinh", "cosh"):
                value = (iv.exp(x) + (-1 if name == "sinh" else 1) * iv.exp(-x)) / 2
            elif name == "tanh":
                value = (iv.exp(2 * x) - 1) / (iv.exp(2 * x) + 1)
            elif name == "sigmoid":
                value = 1 / (1 + iv.exp(-x))
            elif name == "softplus":
                value = iv.log(1 + iv.exp(x))
            elif name == "log1p":
                if not x.a > -1:
                    raise _NotDefined("log1p of a constant that is not above -1: undefined or complex")
                value = iv.log(1 + x)
            elif name == "expm1":
                value = iv.exp(x) - 1
            elif name == "xexpm1inv":  # decreasing, positive
                value = iv.mpf([_xexpm1inv_at(iv.mpf(x.b)).a, _xexpm1inv_at(iv.mpf(x.a)).b])
            elif name == "expm1mx":  # e^u - 1 - u >= 0 (0 at u = 0)
                value = iv.exp(x) - 1 - x
                value = iv.mpf([max(value.a, 0), max(value.b, 0)])
            else:
                value = None
            if value is not None:
                out = (value, a[1] + 1)
    if out is not None and out[0] is not None:
        v = out[0]
        if abs(v.a) > _IV_MAX or abs(v.b) > _IV_MAX:
            raise _NotDefined(f"a constant too large to handle (above 10^{MAX_MAGNITUDE_DIGITS})")
    memo[node] = out
    return out


_FUNCTION_NAMES = {sp.exp: "exp", sp.log: "log", sp.Abs: "abs", sp.sign: "sign", sp.sinh: "sinh", sp.cosh: "cosh",
                   sp.tanh: "tanh", sigmoid: "sigmoid", softplus: "softplus",
                   log1p: "log1p", expm1: "expm1", xexpm1inv: "xexpm1inv", expm1mx: "expm1mx"}


def parse_expression(text: str, names: Mapping[str, sp.Basic]) -> sp.Basic:
    """Parse ``text`` using only ``names`` (str -> SymPy object) and the whitelisted functions."""
    try:
        expr = _Parser(text, names).parse()
    except RecursionError:  # pragma: no cover - guarded by MAX_DEPTH, kept as a backstop
        raise ParseError(f"expression nested deeper than {MAX_DEPTH} levels", text) from None
    except ParseError:
        raise
    except _SYMPY_FAILURES as exc:
        if not BACKSTOP:
            raise
        # a backstop: SymPy failed while building a tree the checks above let through
        raise ParseError(f"SymPy cannot build this expression ({type(exc).__name__}: "
                         f"{_short(str(exc), 80)})", text) from None
    atoms = {expr} if expr.is_Atom else expr.atoms()
    bad = [u for u in _UNDEFINED if u in atoms]
    if bad:  # a backstop: the checks above refuse these where they arise
        raise ParseError(f"the expression is undefined or complex as written (it contains {bad[0]})", text)
    return expr
