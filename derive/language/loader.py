"""Read derivation files (TOML) into checked, parsed objects.

The format is documented in README.md ("Writing your own derivation file").  Every error
names the file, the derivation, the chain and the line it is about, and carries the file's
line number where one can be found.  Expressions go through :mod:`derive.language.parser`; no file
content is ever evaluated as code.

Reading is bounded: only regular files are opened (a FIFO or a device is refused before it is
opened, so nothing blocks), at most MAX_FILE_BYTES + 1 bytes are ever read, line numbers are
found through an index built once (loading is near-linear in the file's size: 20,000 symbols
load in well under a second), and every expression is parsed in bounded time (see
:mod:`derive.language.parser`).  ``loads(..., deadline=)`` also stops at a time.monotonic() deadline,
which ``derive verify --timeout`` sets.  Error messages escape control and bidi characters.
"""
from __future__ import annotations

import bisect
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import sympy as sp

from derive.language.domains import Domain, DomainError
from derive.language.functions import D
from derive.language.parser import ParseError, _is_condition, check_name, parse_expression

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

MAX_FILE_BYTES = 2_000_000
#: a domain is a short text such as "(0, 1)" or "{-1, 1}"
MAX_DOMAIN_CHARS = 1000

# Characters a terminal may act on: C0 controls but newline, DEL, C1 controls (0x80-0x9f:
# CSI is 0x9b), bidi embeddings, overrides and isolates, line and paragraph separators.
_UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_UNSAFE_NL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _escape_char(m):
    c = m.group()
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def safe_text(text, keep_newlines: bool = False) -> str:
    """``text`` with every character a terminal could act on written as an escape (``\\x1b``,
    ``\\u202e``): what a file says is printed, never executed by the terminal.  Newlines are
    escaped too unless ``keep_newlines``; a report adds its own line structure."""
    text = str(text)
    return (_UNSAFE if keep_newlines else _UNSAFE_NL).sub(_escape_char, text)


def _q(text, width: int = 60) -> str:
    """A file's string quoted for a message, shortened."""
    text = str(text)
    if len(text) > width:
        text = text[: width - 3] + "..."
    return repr(text)


class DerivationFileError(Exception):
    """A derivation file is malformed.  ``str()`` is the one-line message shown to users (its
    control and bidi characters escaped)."""

    def __init__(self, path, message, derivation=None, chain=None, line=None, lineno=None, kernel=None):
        self.path = str(path)
        self.kernel = kernel
        self.derivation = derivation
        self.chain = chain
        self.line = line
        self.lineno = lineno
        self.message = message
        where = self.path + (f":{lineno}" if lineno else "")
        parts = []
        if kernel is not None:
            parts.append(f"kernel {_q(kernel)}")
        if derivation is not None:
            parts.append(f"derivation {_q(derivation)}")
        if chain is not None:
            parts.append(f"chain {_q(chain)}")
        if line is not None:
            parts.append(f"line {line}")
        ctx = (" [" + ", ".join(parts) + "]") if parts else ""
        super().__init__(safe_text(f"{where}{ctx}: {message}"))


@dataclass(frozen=True)
class TextSource:
    """A derivation given as text instead of a path (standard input: name "<stdin>");
    ``data`` is its bytes or text.  verify_paths accepts these beside paths."""

    name: str
    data: bytes | str


@dataclass
class Erratum:
    corrected: sp.Basic
    corrected_text: str
    why: str
    latex: str | None = None


@dataclass
class Line:
    index: int
    expr: sp.Basic
    text: str
    latex: str | None = None  # the note's own LaTeX for this line, when given
    rule: str | None = None  # justification of the step that arrives at this line
    erratum: Erratum | None = None
    lineno: int | None = None


@dataclass
class Chain:
    id: str
    lines: list[Line]
    note: str | None = None
    export: str | None = None
    source: str | None = None  # the note's text/LaTeX for the whole chain, when given
    assume: list = field(default_factory=list)  # conditions (SymPy) the chain's steps may assume
    assume_text: list = field(default_factory=list)


@dataclass
class Context:
    """Symbols, their domains and definitions, as seen by one derivation."""

    names: dict  # name -> sympy Symbol (base symbols and defined symbols alike); IndexedBase for a family
    domains: dict  # Symbol -> Domain (base symbols; defined symbols where declared)
    definitions: dict  # Symbol -> expression (in terms of other names), in dependency order
    latex_names: dict = field(default_factory=dict)
    #: indexed families: IndexedBase -> Domain of every member (x = { domain = "real", size = "K" })
    families: dict = field(default_factory=dict)
    #: indexed definitions: the label Symbol (a key of ``definitions``) -> (its index symbol, IndexedBase):
    #: p = { expr = "exp(x[k])/S", index = "k" } defines p[i] as the expression with k := i
    indexed_defs: dict = field(default_factory=dict)

    @property
    def index_size(self) -> dict:
        """Index symbols and families -> their size symbol (t = { index = "K" }: t in 0..K-1)."""
        return getattr(self.names, "index_size", None) or {}

    @property
    def indexed(self) -> bool:
        """Whether the context declares indices, families or sums (checked by derive.prover.sums)."""
        return bool(self.index_size)

    @property
    def base_symbols(self):
        return [s for s in self.names.values() if isinstance(s, sp.Symbol) and s not in self.definitions]

    def expand(self, expr: sp.Basic) -> sp.Basic:
        """Substitute definitions until only base symbols remain (members p[i] of an indexed definition
        too: its expression with its index replaced by i)."""
        full = self._expanded_definitions()
        out = expr.xreplace(full) if full else expr
        if self.indexed_defs:
            for _ in range(len(self.indexed_defs) + 1):
                if not any(isinstance(a, sp.Indexed) and a.base.label in self.indexed_defs
                           for a in out.atoms(sp.Indexed)):
                    break
                out = out.replace(lambda a: isinstance(a, sp.Indexed) and a.base.label in self.indexed_defs,
                                  lambda a: self._member(a))
        return out

    def _member(self, a):
        k, _ = self.indexed_defs[a.base.label]
        rhs = subs_free(self.definitions[a.base.label], k, a.indices[0])
        full = self._expanded_definitions()
        return rhs.xreplace(full) if full else rhs

    def _expanded_definitions(self):
        cache = getattr(self, "_full_defs", None)
        if cache is None:
            cache = {}
            for sym, rhs in self.definitions.items():  # dependency order
                if sym in self.indexed_defs:
                    continue
                cache[sym] = rhs.xreplace(cache)
            self._full_defs = cache
        return cache


def subs_free(expr, old, new):
    """``expr`` with the free occurrences of the index ``old`` replaced by ``new``: a sum over ``old`` binds
    it (sum(x[k], k) is left as it is)."""
    if not isinstance(expr, sp.Basic) or old not in expr.free_symbols and not expr.has(old):
        return expr
    if isinstance(expr, sp.Sum):
        if old in expr.variables:
            return expr
        return sp.Sum(subs_free(expr.function, old, new), *expr.limits)
    if expr == old:
        return new
    if not expr.args:
        return expr
    return expr.func(*[subs_free(a, old, new) for a in expr.args])


class Names(dict):
    """name -> SymPy object, with ``index_size``: index symbols and families -> their size symbol (what
    the parser needs to read x[k], sum(f, k) and delta(a, b))."""

    def __init__(self, *args, index_size=None, **kw):
        super().__init__(*args, **kw)
        self.index_size = dict(index_size or getattr(args[0] if args else None, "index_size", None) or {})

    def copy(self):
        return Names(self, index_size=self.index_size)


@dataclass
class Derivation:
    id: str
    title: str
    chains: list[Chain]
    context: Context
    note: str | None = None
    instances: dict = field(default_factory=dict)  # name -> {Symbol: expression}
    instance_symbols: dict = field(default_factory=dict)  # name -> {Symbol: Domain}
    assume: list = field(default_factory=list)  # conditions relating symbols ("sigma > s"), SymPy
    assume_text: list = field(default_factory=list)


@dataclass
class DerivationFile:
    path: Path
    title: str
    source: str | None
    context: Context
    derivations: list[Derivation]
    exports: dict  # export name -> final proved expression (corrected line if an erratum)
    export_derivation: dict  # export name -> (derivation id, chain id)
    kernels: list = field(default_factory=list)  # [[kernel]] declarations (KernelDecl), in file order
    module: str | None = None  # [file] module: the name of the generated files (default: the file's stem)

    @property
    def symbols(self):
        return self.context.names

    def expand(self, expr):
        return self.context.expand(expr)


# ------------------------------------------------------------------------------------------
class _Locator:
    """Best-effort mapping from a string value back to its line number in the TOML text.

    Built once per file (keys and ``id = "..."`` lines indexed in one pass); each query is a
    bisection or a bounded substring search, so locating every line of a large file stays
    near-linear instead of rescanning the file per symbol."""

    WINDOW = 64_000  # characters searched for a value after the place it is expected

    _KEY = re.compile(r"""^[ \t]*(?:"([^"\n]*)"|'([^'\n]*)'|([A-Za-z0-9_.-]+))[ \t]*=[ \t]*(.*)$""", re.M)
    _ID = re.compile(r"""^(["'])(.*?)\1""")

    def __init__(self, text: str):
        self.text = text
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.keys: dict = {}
        self.ids: dict = {}
        for m in self._KEY.finditer(text):
            key = next(g for g in m.groups()[:3] if g is not None)
            n = bisect.bisect_right(self.starts, m.start())
            self.keys.setdefault(key, []).append(n)
            if key == "id":
                v = self._ID.match(m.group(4))
                if v:
                    self.ids.setdefault(v.group(2), []).append(n)

    @staticmethod
    def _first(lines, after):
        if not lines:
            return None
        i = bisect.bisect_left(lines, max(after, 1))
        return lines[i] if i < len(lines) else None

    def find(self, needle: str, after: int = 0) -> int | None:
        if not needle or not isinstance(needle, str):
            return None
        start = self.starts[min(max(after - 1, 0), len(self.starts) - 1)]
        i = self.text.find(needle, start, start + self.WINDOW + len(needle))
        return None if i < 0 else bisect.bisect_right(self.starts, i)

    def find_key(self, key: str, after: int = 0) -> int | None:
        return self._first(self.keys.get(key), after)

    def find_derivation(self, ident: str) -> int | None:
        return self._first(self.ids.get(ident), 0)

    def find_id(self, ident: str, after: int = 0) -> int | None:
        return self._first(self.ids.get(ident), after)


def _require_table(value, what, err):
    if not isinstance(value, dict):
        raise err(f"{what} must be a table, got {type(value).__name__}")
    return value


_KINDS = [(stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]


def _not_regular(mode) -> str:
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return f"is {kind}, not a regular file: derive reads derivation files only"


def read_file(path) -> bytes:
    """The bytes of a derivation file, refusing anything but a regular file of at most
    MAX_FILE_BYTES: a FIFO, a device or a socket is refused before it is opened (opening a
    FIFO blocks), and at most MAX_FILE_BYTES + 1 bytes are read whatever the file claims."""
    path = Path(path)

    def err(message):
        return DerivationFileError(path, message)

    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise err("no such file") from None
    except OSError as exc:
        raise err(f"cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:  # an embedded NUL in the name
        raise err(f"cannot read: {exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise err("is a directory, not a derivation file")
    if not stat.S_ISREG(st.st_mode):
        raise err(_not_regular(st.st_mode))
    if st.st_size > MAX_FILE_BYTES:
        raise err(f"file is {st.st_size} bytes; the limit is {MAX_FILE_BYTES}")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise err(f"cannot read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced between the two looks
            raise err(_not_regular(st.st_mode))
        chunks, size = [], 0
        while size <= MAX_FILE_BYTES:
            chunk = os.read(fd, min(MAX_FILE_BYTES + 1 - size, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise err(f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if size > MAX_FILE_BYTES:
        raise err(f"file is larger than the limit of {MAX_FILE_BYTES} bytes")
    return b"".join(chunks)


def read_stream(stream, name="<stdin>") -> bytes:
    """At most MAX_FILE_BYTES bytes of a binary stream (e.g. ``sys.stdin.buffer``); a text
    stream is read as text and encoded.  More than the limit is an error, read no further."""
    try:
        data = stream.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise DerivationFileError(name, f"cannot read: {exc.strerror or exc}") from None
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    if len(data) > MAX_FILE_BYTES:
        raise DerivationFileError(name, f"input is larger than the limit of {MAX_FILE_BYTES} bytes")
    return data


def load_file(path, deadline=None) -> DerivationFile:
    """Load and check a derivation file; raise DerivationFileError on any problem."""
    return load_bytes(read_file(path), path, deadline=deadline)


def load_bytes(raw: bytes, name, deadline=None) -> DerivationFile:
    """Load a derivation from its bytes (UTF-8), e.g. read from standard input."""
    if len(raw) > MAX_FILE_BYTES:
        raise DerivationFileError(name, f"input is {len(raw)} bytes; the limit is {MAX_FILE_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = raw[: exc.start].count(b"\n") + 1
        raise DerivationFileError(name, f"not valid UTF-8 (byte {exc.start})", lineno=lineno) from None
    return loads(text, name, deadline=deadline)


def load_text(text, name="<stdin>", deadline=None) -> DerivationFile:
    """Load a derivation from its text (``str`` or ``bytes``), shown as ``name`` in messages
    (the CLI passes the text of standard input and "<stdin>"); the file size limit applies."""
    if isinstance(text, (bytes, bytearray)):
        return load_bytes(bytes(text), name, deadline=deadline)
    if not isinstance(text, str):
        raise TypeError(f"load_text needs str or bytes, not {type(text).__name__}")
    if len(text) > MAX_FILE_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise DerivationFileError(name, f"input is larger than the limit of {MAX_FILE_BYTES} bytes")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        lineno = text[: exc.start].count("\n") + 1
        raise DerivationFileError(name, f"not valid text (character {exc.start} is a lone surrogate)",
                                  lineno=lineno) from None
    return loads(text, name, deadline=deadline)


def loads(text: str, path="<string>", deadline=None) -> DerivationFile:
    """Load a derivation from TOML text; ``deadline`` (time.monotonic()) bounds the time."""
    path = Path(path)
    if not isinstance(text, str):
        raise DerivationFileError(path, f"expected text, got {type(text).__name__}")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise DerivationFileError(path, f"invalid TOML: {exc}", lineno=int(m.group(1)) if m else None) from None
    except RecursionError:
        raise DerivationFileError(path, "invalid TOML: nested too deeply") from None
    except (ValueError, OverflowError) as exc:  # e.g. an integer of more than 4300 digits
        raise DerivationFileError(path, f"invalid TOML: {_q(str(exc), 120)[1:-1]}") from None
    if deadline is not None and time.monotonic() > deadline:
        raise DerivationFileError(path, "loading the file ran past the time limit (--timeout)")
    loc = _Locator(text)
    loc.deadline = deadline
    loc.path = path

    def err(message, **kw):
        return DerivationFileError(path, message, **kw)

    allowed_top = {"file", "symbols", "definitions", "derivation", "kernel"}
    for key in data:
        if key not in allowed_top:
            raise err(f"unknown top-level key {_q(key)} (allowed: {', '.join(sorted(allowed_top))})",
                      lineno=loc.find_key(key) or loc.find("[" + key))
    meta = _require_table(data.get("file", {}), "[file]", err)
    title = meta.get("title", path.stem)
    source = meta.get("source")
    if not isinstance(title, str):
        raise err("[file] title must be a string")
    if source is not None and not isinstance(source, str):
        raise err("[file] source must be a string")
    unknown = set(meta) - {"title", "source", "module"}
    if unknown:
        raise err(f"[file]: unknown key(s) {_keys(unknown)} (allowed: module, source, title)",
                  lineno=loc.find_key(sorted(unknown)[0]))
    module = meta.get("module")
    if module is not None and (not isinstance(module, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", module)):
        raise err("[file] module must be an identifier of at most 64 characters (it names the generated files)",
                  lineno=loc.find_key("module"))

    names: dict = Names()
    domains: dict = {}
    definitions: dict = {}
    latex_names: dict = {}
    families: dict = {}
    indexed_defs: dict = {}
    _add_symbols(_require_table(data.get("symbols", {}), "[symbols]", err), names, domains, latex_names, err, loc, None,
                 families=families)
    _add_definitions(_require_table(data.get("definitions", {}), "[definitions]", err),
                     names, domains, definitions, latex_names, err, loc, None, indexed_defs=indexed_defs)
    file_ctx = Context(names.copy(), dict(domains), dict(definitions), dict(latex_names), dict(families),
                       dict(indexed_defs))

    raw_derivs = data.get("derivation", [])
    if not isinstance(raw_derivs, list):
        raise err("derivation must be an array of tables: write [[derivation]]")
    if not raw_derivs:
        raise err("the file has no [[derivation]]")
    derivations = []
    seen_ids = set()
    exports, export_from = {}, {}
    for k, rd in enumerate(raw_derivs):
        if not isinstance(rd, dict):
            raise err(f"derivation #{k + 1} must be a table")
        did = rd.get("id")
        if not isinstance(did, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", did or ""):
            raise err(f"derivation #{k + 1} needs an id made of letters, digits, '_', '-', '.'",
                      lineno=loc.find("[[derivation]]"))
        if did in seen_ids:
            raise err("duplicate derivation id", derivation=did, lineno=loc.find_derivation(did))
        seen_ids.add(did)
        d_line = loc.find_derivation(did) or 0

        def derr(message, chain=None, line=None, lineno=None, _did=did):
            return DerivationFileError(path, message, derivation=_did, chain=chain, line=line, lineno=lineno)

        allowed = {"id", "title", "note", "symbols", "definitions", "chain", "instances", "assume"}
        for key in rd:
            if key not in allowed:
                raise derr(f"unknown key {key!r} (allowed: {', '.join(sorted(allowed))})",
                           lineno=loc.find_key(key, d_line))
        for key in ("title", "note"):
            if key in rd and not isinstance(rd[key], str):
                raise derr(f"{key} must be a string", lineno=loc.find_key(key, d_line))
        d_syms = _require_table(rd.get("symbols", {}), "symbols", derr)
        d_deftable = _require_table(rd.get("definitions", {}), "definitions", derr)
        if d_syms or d_deftable:
            d_names, d_domains, d_defs, d_latex = names.copy(), dict(domains), dict(definitions), dict(latex_names)
            d_fam, d_idefs = dict(families), dict(indexed_defs)
            _add_symbols(d_syms, d_names, d_domains, d_latex, derr, loc, d_line, definitions=d_defs,
                         allow_override=True, families=d_fam)
            _add_definitions(d_deftable, d_names, d_domains, d_defs, d_latex, derr, loc, d_line, indexed_defs=d_idefs)
            ctx = Context(d_names, d_domains, d_defs, d_latex, d_fam, d_idefs)
        else:  # nothing of its own: share the file's tables (read-only), no copy per derivation
            ctx = Context(file_ctx.names, file_ctx.domains, file_ctx.definitions, file_ctx.latex_names,
                          file_ctx.families, file_ctx.indexed_defs)
        d_assume = _load_assume(rd, ctx, derr, loc, d_line)
        chains_raw = rd.get("chain")
        if not isinstance(chains_raw, list) or not chains_raw:
            raise derr("needs at least one [[derivation.chain]]", lineno=d_line or None)
        chains = []
        chain_ids = set()
        for ci, rc in enumerate(chains_raw):
            chain = _load_chain(rc, ci, ctx, derr, loc, d_line)
            if chain.id in chain_ids:
                raise derr("duplicate chain id", chain=chain.id)
            chain_ids.add(chain.id)
            if chain.export:
                if chain.export in exports:
                    raise derr(f"export name {chain.export!r} is used twice", chain=chain.id)
                last = chain.lines[-1]
                exports[chain.export] = last.erratum.corrected if last.erratum else last.expr
                export_from[chain.export] = (did, chain.id)
            chains.append(chain)
        instances, inst_syms = _load_instances(rd.get("instances", {}), ctx, derr, loc, d_line)
        derivations.append(Derivation(did, rd.get("title", did), chains, ctx, rd.get("note"), instances, inst_syms,
                                      [a for a, _ in d_assume], [t for _, t in d_assume]))
    kernels = _load_kernels(data.get("kernel", []), derivations, exports, export_from, path, loc, module)
    return DerivationFile(path, title, source, file_ctx, derivations, exports, export_from, kernels, module)


def _domain(text, what, err, lineno=None):
    """Domain.parse, with a length limit and any failure as a clear error."""
    if isinstance(text, str) and len(text) > MAX_DOMAIN_CHARS:
        raise err(f"{what}: domain is {len(text)} characters long; the limit is {MAX_DOMAIN_CHARS}", lineno=lineno)
    try:
        return Domain.parse(text)
    except (DomainError, ValueError, ArithmeticError, TypeError) as exc:
        raise err(f"{what}: {_q(str(exc), 160)[1:-1]}", lineno=lineno) from None


#: A backstop on the time one expression may take to parse.  Parsing is polynomial (see
#: derive.language.parser), but SymPy's automatic evaluation of some shapes (abs(x - abs(x - ...)) nested
#: 30 deep) takes a good part of a second, and a 20,000-character expression holds many of
#: them.  None: no limit.  ``--timeout`` (the loader's deadline) also bounds each expression.
PARSE_SECONDS = 20.0


def _parse(text, names, loc):
    """parse_expression under the loader's time limits (main thread only: SIGALRM)."""
    if loc is not None:
        _tick(loc)
    deadline = getattr(loc, "deadline", None)
    limit = PARSE_SECONDS
    if deadline is not None:
        left = max(deadline - time.monotonic(), 0.001)
        limit = left if limit is None else min(limit, left)
    if limit is None:
        return parse_expression(text, names)
    from derive.prover.engine import StrategyTimeout, time_limit

    try:
        with time_limit(limit):
            return parse_expression(text, names)
    except StrategyTimeout:
        if deadline is not None and time.monotonic() >= deadline - 0.01:
            raise ParseError("loading the file ran past the time limit (--timeout)") from None
        raise ParseError(f"the expression took more than {PARSE_SECONDS:g} s to parse (SymPy's automatic "
                         "evaluation); write it more simply") from None


def _tick(loc):
    """Stop at the deadline of ``derive verify --timeout`` (checked before each expression)."""
    deadline = getattr(loc, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise DerivationFileError(loc.path, "loading the file ran past the time limit (--timeout)")


def _size_symbol(name, key, text, names, domains, definitions, err, lineno):
    """The size K of an index or a family: a declared base symbol with an integer domain of at least 1."""
    what = f"symbol {_q(name)}: {key} = {_q(text)}"
    if not isinstance(text, str):
        raise err(f"symbol {_q(name)}: {key} must name a declared integer symbol, e.g. {key} = \"K\"", lineno=lineno)
    size = names.get(text)
    if size is None or isinstance(size, sp.IndexedBase):
        raise err(f"{what}: {_q(text)} is not a declared symbol (declare the number of classes first, e.g. "
                  f"K = \"integer [2, oo)\", above {name})", lineno=lineno)
    dom = domains.get(size)
    if (definitions and size in definitions) or dom is None or not dom.integer or dom.lo is None or dom.lo < 1 \
            or size in names.index_size:
        got = f"has domain {dom.text!r}" if dom is not None else "is a definition"
        raise err(f"{what}: the size must be a base symbol with an integer domain of at least 1, such as "
                  f"\"integer [2, oo)\" ({text} {got})", lineno=lineno)
    return size


def _family_base(name, dom):
    """The IndexedBase of a family, with the SymPy assumptions of its members' domain."""
    kw = {"real": True}
    if dom.integer:
        kw["integer"] = True
    if dom.lo is not None and (dom.lo > 0 or (dom.lo == 0 and dom.lo_open)):
        kw["positive"] = True
    elif dom.lo is not None and dom.lo >= 0:
        kw["nonnegative"] = True
    return sp.IndexedBase(name, **kw)


def _add_symbols(table, names, domains, latex_names, err, loc, after, definitions=None, allow_override=False,
                 families=None):
    for name, spec in table.items():
        lineno = loc.find_key(name, after or 0)
        try:
            check_name(name)
        except ParseError as exc:
            raise err(str(exc), lineno=lineno) from None
        latex = None
        if isinstance(spec, dict):
            unknown = set(spec) - {"domain", "latex", "index", "size"}
            if unknown:
                raise err(f"symbol {_q(name)}: unknown key(s) {_keys(unknown)} (allowed: domain, index, latex, "
                          "size)", lineno=lineno)
            latex = spec.get("latex")
            if latex is not None and not isinstance(latex, str):
                raise err(f"symbol {_q(name)}: latex must be a string", lineno=lineno)
            if "index" in spec or "size" in spec:
                if "index" in spec and ("size" in spec or "domain" in spec):
                    raise err(f"symbol {_q(name)}: an index (index = \"K\": an integer in 0..K-1) takes no domain "
                              "or size", lineno=lineno)
                if name in names:
                    raise err(f"symbol {_q(name)} is declared twice (an index or a family cannot be redeclared)",
                              lineno=lineno)
                if not isinstance(names, Names):
                    raise err(f"symbol {_q(name)}: indices and families are declared in [symbols]", lineno=lineno)
                key = "index" if "index" in spec else "size"
                size = _size_symbol(name, key, spec[key], names, domains, definitions, err, lineno)
                if key == "index":
                    sym = sp.Symbol(name, integer=True, nonnegative=True)
                    names[name] = sym
                    domains[sym] = Domain.parse("integer [0, oo)")
                    names.index_size[sym] = size
                else:
                    dom = _domain(spec.get("domain", "real"), f"symbol {_q(name)}", err, lineno)
                    base = _family_base(name, dom)
                    names[name] = base
                    if families is not None:
                        families[base] = dom
                    names.index_size[base] = size
                if latex:
                    latex_names[names[name]] = latex
                continue
            spec = spec.get("domain", "real")
        dom = _domain(spec, f"symbol {_q(name)}", err, lineno)
        if name in names:
            sym = names[name]
            if not allow_override:
                raise err(f"symbol {_q(name)} is declared twice", lineno=lineno)
            if isinstance(sym, sp.IndexedBase) or sym in getattr(names, "index_size", {}):
                raise err(f"{_q(name)} is an index or a family; its domain cannot be redeclared", lineno=lineno)
            if definitions and sym in definitions:
                raise err(f"{_q(name)} is a definition; its domain cannot be redeclared", lineno=lineno)
        else:
            # an integer or nonzero domain is also a SymPy assumption ((-1)^(2k) = 1, x/x = 1)
            sym = sp.Symbol(name, integer=True) if dom.integer and not dom.nonzero else \
                sp.Symbol(name, real=True, nonzero=True) if dom.nonzero else sp.Symbol(name, real=True)
            names[name] = sym
        domains[sym] = dom
        if latex:
            latex_names[sym] = latex


def _keys(keys):
    return "[" + ", ".join(_q(k, 30) for k in sorted(keys)[:5]) + (", ..." if len(keys) > 5 else "") + "]"


def _add_definitions(table, names, domains, definitions, latex_names, err, loc, after, indexed_defs=None):
    for name, spec in table.items():
        _tick(loc)
        lineno = loc.find_key(name, after or 0)
        try:
            check_name(name)
        except ParseError as exc:
            raise err(str(exc), lineno=lineno) from None
        if name in names:
            raise err(f"{_q(name)} is already declared; a definition needs a new name", lineno=lineno)
        domain_text, latex, index = None, None, None
        if isinstance(spec, dict):
            unknown = set(spec) - {"expr", "domain", "latex", "index"}
            if unknown:
                raise err(f"definition {_q(name)}: unknown key(s) {_keys(unknown)}", lineno=lineno)
            if "expr" not in spec:
                raise err(f"definition {_q(name)} needs expr = \"...\"", lineno=lineno)
            domain_text, latex, index, spec = spec.get("domain"), spec.get("latex"), spec.get("index"), spec["expr"]
            if index is not None:
                isym = names.get(index) if isinstance(index, str) else None
                if isym is None or isym not in getattr(names, "index_size", {}) or isinstance(isym, sp.IndexedBase):
                    raise err(f"definition {_q(name)}: index = {_q(index)} must name a declared index (k = "
                              "{ index = \"K\" } in [symbols])", lineno=lineno)
                index = isym
            if latex is not None and not isinstance(latex, str):
                raise err(f"definition {_q(name)}: latex must be a string", lineno=lineno)
        if not isinstance(spec, str):
            raise err(f"definition {_q(name)} must be an expression string", lineno=lineno)
        try:
            expr = _parse(spec, names, loc)
        except ParseError as exc:
            hint = ""
            m = re.search(r"undefined name '([^']+)'", str(exc))
            if m and m.group(1) in table and m.group(1) != name:
                hint = f" ({m.group(1)!r} is defined later: definitions may only use names defined above them)"
            elif m and m.group(1) == name:
                hint = " (a definition cannot refer to itself)"
            raise err(f"definition {_q(name)}: {exc}{hint}", lineno=lineno) from None
        if _is_condition(expr):
            raise err(f"definition {_q(name)} is a comparison, not a value", lineno=lineno)
        if expr.has(D):
            raise err(f"definition {_q(name)} may not contain D(...); write the derivative in a chain",
                      lineno=lineno)
        if index is not None:  # p[i] = expr with index := i; its members are what the lines use
            if any(isinstance(sm, sp.Sum) and index in sm.variables for sm in sp.preorder_traversal(expr)):
                raise err(f"definition {_q(name)}: its index {index} is also summed over inside it", lineno=lineno)
            base = sp.IndexedBase(name, real=True)
            sym = base.label
            names[name] = base
            names.index_size[base] = names.index_size[index]
            if indexed_defs is not None:
                indexed_defs[sym] = (index, base)
        else:
            sym = sp.Symbol(name, real=True)
            names[name] = sym
        definitions[sym] = expr
        if domain_text is not None:
            domains[sym] = _domain(domain_text, f"definition {_q(name)}", err, lineno)
        if latex:
            latex_names[sym] = latex


def _parse_in(text, ctx, err, what, chain=None, line=None, lineno=None, loc=None):
    if not isinstance(text, str):
        raise err(f"{what} must be an expression string, got {type(text).__name__}", chain=chain, line=line,
                  lineno=lineno)
    try:
        expr = _parse(text, ctx.names, loc)
    except ParseError as exc:
        raise err(f"{what}: {exc}: {_q(text, 80)}", chain=chain, line=line, lineno=lineno) from None
    if _is_condition(expr):
        raise err(f"{what} is a comparison; a chain line is a value (the '=' are implied)",
                  chain=chain, line=line, lineno=lineno)
    return expr


def _load_chain(rc, ci, ctx, derr, loc, d_line):
    if not isinstance(rc, dict):
        raise derr(f"chain #{ci + 1} must be a table")
    cid = rc.get("id", f"chain{ci + 1}")
    if not isinstance(cid, str):
        raise derr(f"chain #{ci + 1}: id must be a string")
    c_line = (loc.find_id(cid, d_line) if "id" in rc else None)
    for key in ("note", "source"):
        if key in rc and not isinstance(rc[key], str):
            raise derr(f"{key} must be a string", chain=cid, lineno=c_line)
    allowed = {"id", "lines", "note", "export", "source", "assume"}
    for key in rc:
        if key not in allowed:
            raise derr(f"unknown key {_q(key)} (allowed: {', '.join(sorted(allowed))})", chain=cid,
                       lineno=loc.find_key(key, d_line))
    raw_lines = rc.get("lines")
    if not isinstance(raw_lines, list):
        raise derr("lines must be an array of expressions", chain=cid)
    if len(raw_lines) < 2:
        raise derr(f"a chain needs at least two lines (it has {len(raw_lines)}): nothing to check", chain=cid,
                   lineno=c_line)
    export = rc.get("export")
    if export is not None and (not isinstance(export, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", export)):
        raise derr("export must be an identifier", chain=cid)
    lines = []
    after = c_line or d_line
    for li, rl in enumerate(raw_lines):
        if isinstance(rl, str):
            rl = {"expr": rl}
        if not isinstance(rl, dict):
            raise derr("a line is an expression string or a table with expr = \"...\"", chain=cid, line=li)
        unknown = set(rl) - {"expr", "latex", "rule", "erratum"}
        if unknown:
            raise derr(f"unknown key(s) {_keys(unknown)}", chain=cid, line=li)
        _tick(loc)
        text = rl.get("expr")
        lineno = loc.find(text, after) if isinstance(text, str) else None
        if lineno:
            after = lineno
        if text is None:
            raise derr("line needs expr = \"...\"", chain=cid, line=li, lineno=lineno)
        expr = _parse_in(text, ctx, derr, "expression", chain=cid, line=li, lineno=lineno, loc=loc)
        erratum = None
        if "erratum" in rl:
            er = rl["erratum"]
            if not isinstance(er, dict) or "corrected" not in er:
                raise derr("erratum must be a table with corrected = \"...\" and why = \"...\"", chain=cid,
                           line=li, lineno=lineno)
            unknown = set(er) - {"corrected", "why", "latex"}
            if unknown:
                raise derr(f"erratum: unknown key(s) {_keys(unknown)}", chain=cid, line=li, lineno=lineno)
            if "latex" in er and not isinstance(er["latex"], str):
                raise derr("erratum latex must be a string", chain=cid, line=li, lineno=lineno)
            corrected = _parse_in(er["corrected"], ctx, derr, "erratum.corrected", chain=cid, line=li, loc=loc,
                                  lineno=lineno)
            why = er.get("why", "")
            if not isinstance(why, str) or not why.strip():
                raise derr("erratum needs why = \"...\" (what is wrong with the line)", chain=cid, line=li,
                           lineno=lineno)
            erratum = Erratum(corrected, er["corrected"], why, er.get("latex"))
        for key in ("latex", "rule"):
            if key in rl and not isinstance(rl[key], str):
                raise derr(f"{key} must be a string", chain=cid, line=li, lineno=lineno)
        lines.append(Line(li, expr, text, rl.get("latex"), rl.get("rule"), erratum, lineno))
    if lines[0].erratum is not None:
        raise derr("the first line of a chain is what is being computed; put the erratum on a later line",
                   chain=cid, line=0)
    c_assume = _load_assume(rc, ctx, lambda m, **kw: derr(m, chain=cid, **kw), loc, c_line or d_line)
    return Chain(cid, lines, rc.get("note"), export, rc.get("source"), [a for a, _ in c_assume],
                 [t for _, t in c_assume])


#: the most assumptions a derivation or chain states
MAX_ASSUME = 16


def _load_assume(table, ctx, err, loc, after):
    """assume = ["sigma > s", ...]: conditions relating the symbols, [(SymPy condition, text)]."""
    raw = table.get("assume", [])
    lineno = loc.find_key("assume", after or 0) if "assume" in table else None
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
        raise err('assume must be a list of conditions, e.g. assume = ["sigma > s"]', lineno=lineno)
    if len(raw) > MAX_ASSUME:
        raise err(f"assume: {len(raw)} conditions; the limit is {MAX_ASSUME}", lineno=lineno)
    out = []
    for text in raw:
        _tick(loc)
        try:
            cond = _parse(text, ctx.names, loc)
        except ParseError as exc:
            raise err(f"assume: {exc}: {_q(text, 80)}", lineno=lineno) from None
        if cond is sp.true:
            continue
        if cond is sp.false or not _is_condition(cond):
            raise err(f"assume: {_q(text, 80)} is not a condition on the symbols (write a comparison such as "
                      "sigma > s)" if cond is not sp.false else f"assume: {_q(text, 80)} is always false",
                      lineno=lineno)
        if cond.has(D):
            raise err("assume: a condition may not contain D(...)", lineno=lineno)
        out.append((cond, text))
    return out


def _load_instances(raw, ctx, derr, loc, d_line):
    """Numeric instances, e.g. K = 3 classes: values for symbols such as R = exp(x_2)."""
    if not isinstance(raw, dict):
        raise derr("instances must be a table of tables")
    out, syms = {}, {}
    for name, spec in raw.items():
        if not isinstance(spec, dict):
            raise derr(f"instance {_q(name)} must be a table of symbol = expression")
        local = Names(ctx.names)
        extra = {}
        new_syms = spec.get("new_symbols", {})
        if not isinstance(new_syms, dict):
            raise derr(f"instance {_q(name)}: new_symbols must be a table of name = domain")
        for sname, dtext in new_syms.items():
            try:
                check_name(sname)
            except ParseError as exc:
                raise derr(f"instance {_q(name)}: {exc}") from None
            dom = _domain(dtext, f"instance {_q(name)}: {sname}", lambda m, lineno=None: derr(m, lineno=lineno))
            if sname in local:
                raise derr(f"instance {_q(name)}: new symbol {_q(sname)} is already declared")
            s = sp.Symbol(sname, real=True)
            local[sname] = s
            extra[s] = dom
        values = {}
        for sname, text in spec.items():
            if sname == "new_symbols":
                continue
            if sname not in ctx.names or ctx.names[sname] in ctx.definitions:
                raise derr(f"instance {_q(name)}: {_q(sname)} is not a declared base symbol")
            _tick(loc)
            try:
                values[ctx.names[sname]] = _parse(text, local, loc) if isinstance(text, str) else None
            except ParseError as exc:
                raise derr(f"instance {_q(name)}: {_q(sname)}: {exc}") from None
            if values[ctx.names[sname]] is None:
                raise derr(f"instance {_q(name)}: {_q(sname)} must be an expression string")
        out[name] = values
        syms[name] = extra
    return out, syms


# ------------------------------------------------------------------------------------------
# [[kernel]]: which proved exports a generated kernel evaluates, and how it is called

#: at most this many [[kernel]] tables per file (each is printed into three generated files)
MAX_KERNELS = 64
#: what each target kind means, the layout that takes it, the export roles it needs and its own options
TARGET_SPECS = {
    "binary": {"layout": "elementwise", "exports": ("loss", "grad"), "second": "hess",
               "options": ("weight", "compensated", "soft", "hess"),
               "what": "labels t in {0, 1}, elementwise over any shape"},
    "soft": {"layout": "elementwise", "exports": ("loss", "grad"), "second": "hess",
             "options": ("weight", "compensated", "hess"),
             "what": "targets t in [0, 1] (t declared with domain [0, 1]), elementwise over any shape"},
    "class_index": {"layout": "softmax", "exports": ("loss", "coef", "target_factor"), "second": "dcoef",
                    "options": ("class_alpha", "dcoef"),
                    "what": "integer class indices over the last axis of (N, K) logits, with an ignore label"},
    "class_probs": {"layout": "softmax", "exports": ("term", "dterm"), "second": "d2term", "options": ("d2term",),
                    "what": "an (N, K) array of class probabilities q (q declared with domain [0, 1]); "
                            "term = l(u, q, K) per class, dterm = D(term, u)"},
}
#: the optional export of the second derivative each target takes (double backward): hess = d grad/dx
#: (elementwise), dcoef = (1 - p_t) dC/du for the gradient C(u)(p_k - [k == t]) (class_index), d2term =
#: d dterm/du (class_probs); each chain must start from the derivative of what the kernel evaluates
SECOND_ROLES = {t: s["second"] for t, s in TARGET_SPECS.items()}
#: what each target kind means (TARGET_SPECS[target]["what"])
TARGETS = {t: s["what"] for t, s in TARGET_SPECS.items()}
#: the layouts the templates know: their targets (the first is the usual one), and the export roles and options
#: of any of them
LAYOUTS = {
    lay: {"target": next(t for t, s in TARGET_SPECS.items() if s["layout"] == lay),
          "targets": tuple(t for t, s in TARGET_SPECS.items() if s["layout"] == lay),
          "exports": tuple(dict.fromkeys(r for s in TARGET_SPECS.values() if s["layout"] == lay for r in s["exports"])),
          "options": tuple(dict.fromkeys(o for s in TARGET_SPECS.values() if s["layout"] == lay for o in s["options"]))}
    for lay in ("elementwise", "softmax")
}
#: the symbols each target's template supplies (not parameters), and the domain a target symbol must declare
TEMPLATE_SYMBOLS = {"binary": ("x", "t"), "soft": ("x", "t"), "class_index": ("u",), "class_probs": ("u", "q", "K")}
_UNIT_INTERVAL = {"soft": "t", "class_probs": "q"}
_KERNEL_COMMON = ("name", "title", "layout", "target", "params", "defaults", "functions", "conditioned", "rewrite")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def module_name(path, module=None) -> str:
    """The name of a derivation file's generated files: its ``[file] module``, else its stem made an identifier."""
    if module:
        return module
    name = re.sub(r"[^A-Za-z0-9_]", "_", Path(str(path)).stem)
    return name if re.fullmatch(r"[A-Za-z_]\w*", name) else "k_" + name


@dataclass(frozen=True)
class KernelDecl:
    """One ``[[kernel]]`` table: a generated kernel over proved exports of one derivation."""

    name: str
    title: str
    layout: str  # "elementwise" or "softmax"
    target: str  # "binary", "soft" (elementwise), "class_index" or "class_probs" (softmax)
    exports: dict  # role (loss, grad / loss, coef, target_factor / term, dterm) -> export name
    params: tuple  # symbol names, in argument order
    defaults: dict  # param -> float
    domains: dict  # param -> Domain (in the derivation of the exports)
    derivation: str  # the derivation the exports come from
    functions: tuple = ()  # public Python functions that call this kernel (derive.runtime.losses)
    weight: str | None = None  # a definition evaluated only when alpha >= 0 (else 1)
    compensated: tuple | None = None  # (definition, factor): formed as factor*b + c, error-free
    class_alpha: bool = False  # softmax: alpha is a scalar or a per-class vector
    lineno: int | None = None
    soft: str | None = None  # binary: the soft-target kernel of the same file for targets not all 0 or 1
    conditioned: str | None = None  # why the loss is ill-conditioned: accuracy is relative to its condition number
    module: str = ""  # the file's [file] module, else its stem: the generated files are <module>.{py,c,h}
    path: Path | None = None  # the derivation file
    #: the roles whose export is a plain closed form: codegen applies derive.rewrite's proved rules to it and
    #: proves the result equal to it (rewrite = ["loss", "grad"], or true for every role)
    rewrite: tuple = ()

    # the names codegen and the generated module use
    @property
    def kind(self) -> str:
        """elementwise (binary or soft t), rowwise (class indices) or rowprobs (class probabilities)."""
        return {"elementwise": "elementwise", "softmax": "rowwise"}[self.layout] if self.target != "class_probs" \
            else "rowprobs"

    @property
    def loss(self):
        return self.exports.get("loss")

    @property
    def grad(self):
        return self.exports.get("grad")

    @property
    def coef(self):
        return self.exports.get("coef")

    @property
    def target_factor(self):
        return self.exports.get("target_factor")

    @property
    def term(self):
        return self.exports.get("term")

    @property
    def dterm(self):
        return self.exports.get("dterm")

    # the second derivatives (optional; None when the file declares none): double backward
    @property
    def hess(self):
        """elementwise: the export of d grad / d x (the kernel derive_<name>_hess_<dt>)."""
        return self.exports.get("hess")

    @property
    def dcoef(self):
        """class_index: the export of (1 - p_t) dC/du, C the gradient coefficient (derive_<name>_hvp_<dt>)."""
        return self.exports.get("dcoef")

    @property
    def d2term(self):
        """class_probs: the export of d dterm / du (derive_<name>_hvp_<dt>)."""
        return self.exports.get("d2term")

    @property
    def second(self):
        """The export of the kernel's second derivative (hess, dcoef or d2term), or None."""
        return self.exports.get(SECOND_ROLES.get(self.target))


def _load_kernels(raw, derivations, exports, export_from, path, loc, module=None):
    if not isinstance(raw, list):
        raise DerivationFileError(path, "kernel must be an array of tables: write [[kernel]]",
                                  lineno=loc.find("[kernel]"))
    if len(raw) > MAX_KERNELS:
        raise DerivationFileError(path, f"{len(raw)} [[kernel]] tables; the limit is {MAX_KERNELS}")
    by_id = {d.id: d for d in derivations}
    kernels, seen = [], set()
    after = 0
    for k, rk in enumerate(raw):
        k_line = loc.find("[[kernel]]", after)
        after = (k_line or after) + 1
        if not isinstance(rk, dict):
            raise DerivationFileError(path, f"kernel #{k + 1} must be a table", lineno=k_line)
        name = rk.get("name")
        if not isinstance(name, str) or not _IDENT.fullmatch(name):
            raise DerivationFileError(path, f"kernel #{k + 1} needs a name: an identifier of at most 64 characters "
                                      "(it names the C and Python functions)", lineno=k_line)
        if name in seen:
            raise DerivationFileError(path, "duplicate kernel name", kernel=name, lineno=k_line)
        seen.add(name)
        kernels.append(_load_kernel(rk, name, by_id, exports, export_from, path, loc, k_line,
                                    module_name(path, module)))
    _check_soft(kernels, path, loc)
    _check_second_names(kernels, path)
    return kernels


def second_name(k) -> str | None:
    """The name of a kernel's second-derivative function (derive_<it>_<dt>): <kernel>_hess (elementwise) or
    <kernel>_hvp (softmax), None when it declares no second derivative."""
    if not k.second:
        return None
    return f"{k.name}_{'hess' if k.layout == 'elementwise' else 'hvp'}"


def _check_second_names(kernels, path):
    """derive_<kernel>_hess_<dt> / _hvp_<dt> must not be another kernel's derive_<name>_<dt>."""
    names = {k.name: k for k in kernels}
    for k in kernels:
        other = names.get(second_name(k))
        if other is not None:
            raise DerivationFileError(path, f"its second derivative's functions derive_{second_name(k)}_f32/_f64 "
                                      f"would be those of kernel {other.name!r}: rename one", kernel=k.name,
                                      lineno=other.lineno)


def _check_soft(kernels, path, loc):
    """A binary kernel's ``soft`` names a soft-target kernel of the file with the same params (the runtime calls
    it with the binary kernel's arguments when the targets are not all 0 or 1)."""
    by_name = {k.name: k for k in kernels}
    for k in kernels:
        if k.soft is None:
            continue

        def kerr(message, _k=k):
            return DerivationFileError(path, message, kernel=_k.name,
                                       lineno=loc.find_key("soft", _k.lineno or 0) or _k.lineno)

        other = by_name.get(k.soft)
        if other is None:
            raise kerr(f"soft: the file declares no kernel {_q(k.soft)} (its kernels: "
                       f"{', '.join(sorted(by_name))})")
        if other.target != "soft":
            raise kerr(f"soft: kernel {k.soft!r} has target {other.target!r}; it must have target 'soft'")
        if other.params != k.params:
            raise kerr(f"soft: kernel {k.soft!r} takes params ({', '.join(other.params)}), this kernel "
                       f"({', '.join(k.params)}): they must be the same, in the same order")
        for p in k.params:
            a, b = other.domains[p], k.domains[p]
            if (a.lo, a.lo_open, a.hi, a.hi_open, a.values) != (b.lo, b.lo_open, b.hi, b.hi_open, b.values):
                raise kerr(f"soft: kernel {k.soft!r} declares {p} in {a.text}, this kernel in {b.text}: "
                           "the domains must be the same")
        if bool(other.weight) != bool(k.weight):
            raise kerr(f"soft: kernel {k.soft!r} {'has' if other.weight else 'has no'} weight, this kernel "
                       f"{'has' if k.weight else 'has none'}: a negative alpha must mean the same in both")


def _load_kernel(rk, name, by_id, exports, export_from, path, loc, k_line, module):
    def kerr(message, key=None):
        line = (loc.find_key(key, k_line or 0) if key else None) or k_line
        return DerivationFileError(path, message, kernel=name, lineno=line)

    layout = rk.get("layout")
    if layout not in LAYOUTS:
        raise kerr(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {_q(layout)}", "layout")
    lspec = LAYOUTS[layout]
    allowed = set(_KERNEL_COMMON) | set(lspec["exports"]) | set(lspec["options"])
    for key in rk:
        if key not in allowed:
            other = next((lay for lay, s in LAYOUTS.items() if key in s["exports"] or key in s["options"]), None)
            why = f" (a key of layout {other!r})" if other else ""
            raise kerr(f"unknown key {_q(key)} for layout {layout!r}{why} (allowed: {', '.join(sorted(allowed))})",
                       key)
    title = rk.get("title", name)
    if not isinstance(title, str) or len(title) > 500:
        raise kerr("title must be a string of at most 500 characters", "title")
    target = rk.get("target")
    if target not in TARGETS:
        raise kerr(f"target {_q(target)} is not supported: the supported targets are "
                   + "; ".join(f"{t!r} ({what})" for t, what in TARGETS.items()), "target")
    if target not in lspec["targets"]:
        raise kerr(f"layout {layout!r} takes target {' or '.join(map(repr, lspec['targets']))}, not {target!r}",
                   "target")
    spec = TARGET_SPECS[target]
    for key in rk:
        if key in lspec["exports"] + lspec["options"] and key not in spec["exports"] + spec["options"]:
            owner = next(t for t, s in TARGET_SPECS.items() if key in s["exports"] + s["options"])
            raise kerr(f"key {key!r} is for target {owner!r}, not {target!r} (target {target!r} takes: "
                       f"{', '.join(spec['exports'] + spec['options'])})", key)
    roles = {}
    for role in spec["exports"]:
        export = rk.get(role)
        if export is None:
            raise kerr(f"layout {layout!r} with target {target!r} needs {role} = \"<export name>\" "
                       f"(exports: {', '.join(spec['exports'])})")
        if not isinstance(export, str):
            raise kerr(f"{role} must be the name of an export", role)
        if export not in exports:
            raise kerr(f"{role}: the file exports no {_q(export)} (give a chain export = \"{safe_text(export)[:64]}\")",
                       role)
        roles[role] = export
    second = spec["second"]
    if rk.get(second) is not None:
        export = rk[second]
        if not isinstance(export, str):
            raise kerr(f"{second} must be the name of an export", second)
        if export not in exports:
            raise kerr(f"{second}: the file exports no {_q(export)} (give a chain export = "
                       f"\"{safe_text(export)[:64]}\")", second)
        roles[second] = export
    dids = {export_from[e][0] for e in roles.values()}
    if len(dids) != 1:
        raise kerr(f"the exports {', '.join(map(repr, roles.values()))} come from different derivations "
                   f"({', '.join(sorted(dids))}); a kernel evaluates the exports of one derivation")
    did = dids.pop()
    ctx = by_id[did].context
    params = rk.get("params", [])
    if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
        raise kerr("params must be an array of symbol names", "params")
    if len(set(params)) != len(params):
        raise kerr("params names a symbol twice", "params")
    fixed = TEMPLATE_SYMBOLS[target]
    domains = {}
    for p in params:
        sym = ctx.names.get(p)
        if sym is None or sym in ctx.definitions:
            raise kerr(f"params: {_q(p)} is not a symbol of derivation {did!r} (its symbols: "
                       f"{', '.join(sorted(s.name for s in ctx.base_symbols))})", "params")
        if p in fixed:
            raise kerr(f"params: {p!r} is supplied by the {layout} template, not a parameter", "params")
        domains[p] = ctx.domains[sym]
    unit = _UNIT_INTERVAL.get(target)
    if unit is not None:
        sym = ctx.names.get(unit)
        dom = ctx.domains.get(sym) if sym is not None and sym not in ctx.definitions else None
        if dom is None or dom.values is not None or (dom.lo, dom.lo_open, dom.hi, dom.hi_open) != (0, False, 1, False):
            got = "is not a symbol" if dom is None else f"has domain {dom.text!r}"
            raise kerr(f"target {target!r}: the template supplies {unit} in [0, 1], so derivation {did!r} must "
                       f"declare {unit} = \"[0, 1]\" ({unit} {got})", "target")
    if target == "class_probs":
        _check_dterm(by_id[did], roles, ctx, kerr, export_from)
    if second in roles:
        _check_second(by_id[did], target, roles, ctx, kerr, export_from)
    defaults = rk.get("defaults", {})
    if not isinstance(defaults, dict):
        raise kerr("defaults must be a table { param = number }", "defaults")
    for p, v in defaults.items():
        if p not in params:
            raise kerr(f"defaults: {_q(p)} is not one of the params ({', '.join(params) or 'none'})", "defaults")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (-1e300 < float(v) < 1e300):
            raise kerr(f"defaults: {p} must be a finite number", "defaults")
        if not domains[p].contains(float(v)):
            raise kerr(f"defaults: {p} = {v!r} is outside its domain {domains[p]}", "defaults")
    functions = rk.get("functions", [])
    if (not isinstance(functions, list) or len(functions) > 16
            or not all(isinstance(f, str) and _IDENT.fullmatch(f) for f in functions)):
        raise kerr("functions must be an array of at most 16 Python identifiers", "functions")
    weight = rk.get("weight")
    if weight is not None:
        if not isinstance(weight, str) or ctx.names.get(weight) not in ctx.definitions:
            raise kerr(f"weight must name a definition of derivation {did!r}", "weight")
        if "alpha" not in params:
            raise kerr("weight needs a parameter alpha (a negative alpha turns the weight off)", "weight")
    comp = rk.get("compensated")
    if comp is not None:
        if not isinstance(comp, dict) or set(comp) != {"definition", "factor"}:
            raise kerr('compensated must be { definition = "<definition>", factor = "<param>" }', "compensated")
        if not isinstance(comp["definition"], str) or ctx.names.get(comp["definition"]) not in ctx.definitions:
            raise kerr(f"compensated: definition must name a definition of derivation {did!r}", "compensated")
        if comp["factor"] not in params:
            raise kerr("compensated: factor must be one of the params", "compensated")
        comp = (comp["definition"], comp["factor"])
    class_alpha = rk.get("class_alpha", False)
    if not isinstance(class_alpha, bool):
        raise kerr("class_alpha must be true or false", "class_alpha")
    if class_alpha and "alpha" not in params:
        raise kerr("class_alpha needs a parameter alpha", "class_alpha")
    soft = rk.get("soft")
    if soft is not None and (not isinstance(soft, str) or not _IDENT.fullmatch(soft)):
        raise kerr("soft must be the name of a kernel of this file (one with target 'soft')", "soft")
    if soft == name:
        raise kerr("soft names this kernel itself; it must name another kernel, with target 'soft'", "soft")
    conditioned = rk.get("conditioned")
    if conditioned is not None and (not isinstance(conditioned, str) or not conditioned.strip()
                                    or len(conditioned) > 500):
        raise kerr("conditioned must be a non-empty string of at most 500 characters: why the loss is "
                   "ill-conditioned somewhere", "conditioned")
    rewrite = rk.get("rewrite", [])
    if rewrite is True:
        rewrite = list(roles)
    elif rewrite is False:
        rewrite = []
    if not isinstance(rewrite, list) or not all(isinstance(r, str) for r in rewrite):
        raise kerr("rewrite must be true or an array of the kernel's roles whose export is a plain closed form "
                   f"(its roles: {', '.join(roles)})", "rewrite")
    for r in rewrite:
        if r not in roles:
            raise kerr(f"rewrite: {_q(r)} is not one of the kernel's roles ({', '.join(roles)})", "rewrite")
    return KernelDecl(name, title, layout, target, roles, tuple(params), {p: float(v) for p, v in defaults.items()},
                      domains, did, tuple(functions), weight, comp, class_alpha, k_line, soft, conditioned,
                      module, Path(path) if not isinstance(path, Path) else path, tuple(dict.fromkeys(rewrite)))


def _check_dterm(derivation, roles, ctx, kerr, export_from):
    """class_probs: dterm's chain starts from D(<term's first line>, u), so that what the template sums as the
    derivative in u is proved to be the derivative of what it sums as the loss."""
    chains = {c.id: c for c in derivation.chains}
    term_first = chains[export_from[roles["term"]][1]].lines[0].expr
    dchain = chains[export_from[roles["dterm"]][1]]
    first = dchain.lines[0].expr
    u = ctx.names.get("u")
    if u is None or u in ctx.definitions:
        raise kerr(f"target 'class_probs': derivation {derivation.id!r} must declare the symbol u (= log p_k, "
                   "which the template supplies)", "term")
    if not (isinstance(first, D) and first.args[1] == u and first.args[0] == term_first):
        raise kerr(f"dterm: chain {dchain.id!r} must start from D(<the first line of chain "
                   f"{export_from[roles['term']][1]!r}>, u), the derivative of the term in u; it starts from "
                   f"{_q(str(first), 80)}", "dterm")




def _chain_lines(chain):
    """The expressions of a chain's lines (an erratum's corrected line too)."""
    out = []
    for line in chain.lines:
        out.append(line.expr)
        if line.erratum is not None:
            out.append(line.erratum.corrected)
    return out


def _linked(derivation, chain_id):
    """The chain and those it continues, back to the first: a chain whose first line is another chain's last
    line continues it (as sigmoid_focal_soft's grad_stable continues grad).  Earliest first."""
    chains = {c.id: c for c in derivation.chains}
    out = [chains[chain_id]]
    while True:
        first = out[0].lines[0].expr
        prev = next((c for c in derivation.chains if c not in out and c.lines[-1].expr == first), None)
        if prev is None:
            return out
        out.insert(0, prev)


def _check_second(derivation, target, roles, ctx, kerr, export_from):
    """The second derivative's chain (or the chain it continues) starts from the derivative of what the kernel
    evaluates as its first derivative, so that the proved chain ties it to the kernel's own gradient:
    hess: D(<a line of the grad chain>, x); d2term: D(<a line of the dterm chain>, u); dcoef: (1 - p_t)*D(<a line
    of the coef chain>, u), or -(1 - p_t)*D(D(<a line of the loss chain>, u), u) (the coefficient is C = -dL/du)."""
    role = SECOND_ROLES[target]
    first_of = {r: roles[r] for r in roles}
    chain = _linked(derivation, export_from[roles[role]][1])
    first = chain[0].lines[0].expr

    def lines_of(r):
        return [e for c in _linked(derivation, export_from[first_of[r]][1]) for e in _chain_lines(c)]

    var = "x" if target in ("binary", "soft") else "u"
    v = ctx.names.get(var)
    if v is None or v in ctx.definitions:
        raise kerr(f"{role}: derivation {derivation.id!r} must declare the symbol {var}", role)
    if role in ("hess", "d2term"):
        of = "grad" if role == "hess" else "dterm"
        if isinstance(first, D) and first.args[1] == v and first.args[0] in lines_of(of):
            return
        raise kerr(f"{role}: chain {chain[0].id!r} must start from D(<a line of the {of} chain "
                   f"{export_from[roles[of]][1]!r}>, {var}), the derivative of the kernel's {of} in {var}; it "
                   f"starts from {_q(str(first), 80)}", role)
    # dcoef: a product F*D(...) with F = 1 - e^u (or its negative for the loss form)
    ds = [a for a in sp.Mul.make_args(first) if isinstance(a, D)]
    if len(ds) == 1 and ds[0].args[1] == v:
        rest = first / ds[0]
        inner = ds[0].args[0]
        if rest.has(D):
            ok = None
        elif inner in lines_of("coef"):
            ok = 1
        elif isinstance(inner, D) and inner.args[1] == v and inner.args[0] in lines_of("loss"):
            ok = -1
        else:
            ok = None
        if ok is not None and sp.simplify(ctx.expand(rest) - ok * (1 - sp.exp(v))) == 0:
            return
    raise kerr(f"dcoef: chain {chain[0].id!r} must start from (1 - p_t)*D(<a line of the coef chain "
               f"{export_from[roles['coef']][1]!r}>, u) or -(1 - p_t)*D(D(<a line of the loss chain>, u), u) "
               f"(p_t = e^u): the derivative of the gradient coefficient, times 1 - p_t; it starts from "
               f"{_q(str(first), 80)}", role)
