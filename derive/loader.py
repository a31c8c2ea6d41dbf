"""Read derivation files (TOML) into checked, parsed objects.

The format is documented in README.md ("Writing your own derivation file").  Every error
names the file, the derivation, the chain and the line it is about, and carries the file's
line number where one can be found.  Expressions go through :mod:`derive.parser`; no file
content is ever evaluated as code.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import sympy as sp

from .domains import Domain, DomainError
from .functions import D
from .parser import ParseError, check_name, parse_expression

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

MAX_FILE_BYTES = 2_000_000


class DerivationFileError(Exception):
    """A derivation file is malformed.  ``str()`` is the one-line message shown to users."""

    def __init__(self, path, message, derivation=None, chain=None, line=None, lineno=None):
        self.path = str(path)
        self.derivation = derivation
        self.chain = chain
        self.line = line
        self.lineno = lineno
        self.message = message
        where = self.path + (f":{lineno}" if lineno else "")
        parts = []
        if derivation is not None:
            parts.append(f"derivation {derivation!r}")
        if chain is not None:
            parts.append(f"chain {chain!r}")
        if line is not None:
            parts.append(f"line {line}")
        ctx = (" [" + ", ".join(parts) + "]") if parts else ""
        super().__init__(f"{where}{ctx}: {message}")


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


@dataclass
class Context:
    """Symbols, their domains and definitions, as seen by one derivation."""

    names: dict  # name -> sympy Symbol (base symbols and defined symbols alike)
    domains: dict  # Symbol -> Domain (base symbols; defined symbols where declared)
    definitions: dict  # Symbol -> expression (in terms of other names), in dependency order
    latex_names: dict = field(default_factory=dict)

    @property
    def base_symbols(self):
        return [s for s in self.names.values() if s not in self.definitions]

    def expand(self, expr: sp.Basic) -> sp.Basic:
        """Substitute definitions until only base symbols remain."""
        full = self._expanded_definitions()
        return expr.xreplace(full) if full else expr

    def _expanded_definitions(self):
        cache = getattr(self, "_full_defs", None)
        if cache is None:
            cache = {}
            for sym, rhs in self.definitions.items():  # dependency order
                cache[sym] = rhs.xreplace(cache)
            self._full_defs = cache
        return cache


@dataclass
class Derivation:
    id: str
    title: str
    chains: list[Chain]
    context: Context
    note: str | None = None
    instances: dict = field(default_factory=dict)  # name -> {Symbol: expression}
    instance_symbols: dict = field(default_factory=dict)  # name -> {Symbol: Domain}


@dataclass
class DerivationFile:
    path: Path
    title: str
    source: str | None
    context: Context
    derivations: list[Derivation]
    exports: dict  # export name -> final proved expression (corrected line if an erratum)
    export_derivation: dict  # export name -> (derivation id, chain id)

    @property
    def symbols(self):
        return self.context.names

    def expand(self, expr):
        return self.context.expand(expr)


# ------------------------------------------------------------------------------------------
class _Locator:
    """Best-effort mapping from a string value back to its line number in the TOML text."""

    def __init__(self, text: str):
        self.lines = text.splitlines()

    def find(self, needle: str, after: int = 0) -> int | None:
        if not needle:
            return None
        for i in range(max(after - 1, 0), len(self.lines)):
            if needle in self.lines[i]:
                return i + 1
        return None

    def find_key(self, key: str, after: int = 0) -> int | None:
        pat = re.compile(r"^\s*" + re.escape(key) + r"\s*=")
        for i in range(max(after - 1, 0), len(self.lines)):
            if pat.search(self.lines[i]):
                return i + 1
        return None

    def find_derivation(self, ident: str) -> int | None:
        pat = re.compile(r"^\s*id\s*=\s*[\"']" + re.escape(ident) + r"[\"']")
        for i, line in enumerate(self.lines):
            if pat.search(line):
                return i + 1
        return None


def _require_table(value, what, err):
    if not isinstance(value, dict):
        raise err(f"{what} must be a table, got {type(value).__name__}")
    return value


def load_file(path) -> DerivationFile:
    """Load and check a derivation file; raise DerivationFileError on any problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DerivationFileError(path, "no such file") from None
    except IsADirectoryError:
        raise DerivationFileError(path, "is a directory, not a derivation file") from None
    except OSError as exc:
        raise DerivationFileError(path, f"cannot read: {exc.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise DerivationFileError(path, f"file is {len(raw)} bytes; the limit is {MAX_FILE_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = raw[: exc.start].count(b"\n") + 1
        raise DerivationFileError(path, f"not valid UTF-8 (byte {exc.start})", lineno=lineno) from None
    return loads(text, path)


def loads(text: str, path="<string>") -> DerivationFile:
    path = Path(path)
    loc = _Locator(text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise DerivationFileError(path, f"invalid TOML: {exc}", lineno=int(m.group(1)) if m else None) from None
    except RecursionError:
        raise DerivationFileError(path, "invalid TOML: nested too deeply") from None

    def err(message, **kw):
        return DerivationFileError(path, message, **kw)

    allowed_top = {"file", "symbols", "definitions", "derivation"}
    for key in data:
        if key not in allowed_top:
            raise err(f"unknown top-level key {key!r} (allowed: {', '.join(sorted(allowed_top))})",
                      lineno=loc.find_key(key) or loc.find("[" + key))
    meta = _require_table(data.get("file", {}), "[file]", err)
    title = meta.get("title", path.stem)
    source = meta.get("source")
    if not isinstance(title, str):
        raise err("[file] title must be a string")

    names: dict = {}
    domains: dict = {}
    definitions: dict = {}
    latex_names: dict = {}
    _add_symbols(_require_table(data.get("symbols", {}), "[symbols]", err), names, domains, latex_names, err, loc, None)
    _add_definitions(_require_table(data.get("definitions", {}), "[definitions]", err),
                     names, domains, definitions, latex_names, err, loc, None)
    file_ctx = Context(dict(names), dict(domains), dict(definitions), dict(latex_names))

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

        allowed = {"id", "title", "note", "symbols", "definitions", "chain", "instances"}
        for key in rd:
            if key not in allowed:
                raise derr(f"unknown key {key!r} (allowed: {', '.join(sorted(allowed))})",
                           lineno=loc.find_key(key, d_line))
        d_names, d_domains, d_defs, d_latex = dict(names), dict(domains), dict(definitions), dict(latex_names)
        _add_symbols(_require_table(rd.get("symbols", {}), "symbols", derr), d_names, d_domains, d_latex,
                     derr, loc, d_line, definitions=d_defs, allow_override=True)
        _add_definitions(_require_table(rd.get("definitions", {}), "definitions", derr),
                         d_names, d_domains, d_defs, d_latex, derr, loc, d_line)
        ctx = Context(d_names, d_domains, d_defs, d_latex)
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
        derivations.append(Derivation(did, rd.get("title", did), chains, ctx, rd.get("note"), instances, inst_syms))
    return DerivationFile(path, title, source, file_ctx, derivations, exports, export_from)


def _add_symbols(table, names, domains, latex_names, err, loc, after, definitions=None, allow_override=False):
    for name, spec in table.items():
        lineno = loc.find_key(name, after or 0)
        try:
            check_name(name)
        except ParseError as exc:
            raise err(str(exc), lineno=lineno) from None
        latex = None
        if isinstance(spec, dict):
            unknown = set(spec) - {"domain", "latex"}
            if unknown:
                raise err(f"symbol {name!r}: unknown key(s) {sorted(unknown)}", lineno=lineno)
            latex = spec.get("latex")
            spec = spec.get("domain", "real")
        try:
            dom = Domain.parse(spec)
        except DomainError as exc:
            raise err(f"symbol {name!r}: {exc}", lineno=lineno) from None
        if name in names:
            sym = names[name]
            if not allow_override:
                raise err(f"symbol {name!r} is declared twice", lineno=lineno)
            if definitions and sym in definitions:
                raise err(f"{name!r} is a definition; its domain cannot be redeclared", lineno=lineno)
        else:
            sym = sp.Symbol(name, real=True)
            names[name] = sym
        domains[sym] = dom
        if latex:
            latex_names[sym] = latex


def _add_definitions(table, names, domains, definitions, latex_names, err, loc, after):
    for name, spec in table.items():
        lineno = loc.find_key(name, after or 0)
        try:
            check_name(name)
        except ParseError as exc:
            raise err(str(exc), lineno=lineno) from None
        if name in names:
            raise err(f"{name!r} is already declared; a definition needs a new name", lineno=lineno)
        domain_text, latex = None, None
        if isinstance(spec, dict):
            unknown = set(spec) - {"expr", "domain", "latex"}
            if unknown:
                raise err(f"definition {name!r}: unknown key(s) {sorted(unknown)}", lineno=lineno)
            if "expr" not in spec:
                raise err(f"definition {name!r} needs expr = \"...\"", lineno=lineno)
            domain_text, latex, spec = spec.get("domain"), spec.get("latex"), spec["expr"]
        if not isinstance(spec, str):
            raise err(f"definition {name!r} must be an expression string", lineno=lineno)
        try:
            expr = parse_expression(spec, names)
        except ParseError as exc:
            hint = ""
            m = re.search(r"undefined name '([^']+)'", str(exc))
            if m and m.group(1) in table and m.group(1) != name:
                hint = f" ({m.group(1)!r} is defined later: definitions may only use names defined above them)"
            elif m and m.group(1) == name:
                hint = " (a definition cannot refer to itself)"
            raise err(f"definition {name!r}: {exc}{hint}", lineno=lineno) from None
        if isinstance(expr, sp.core.relational.Relational):
            raise err(f"definition {name!r} is a comparison, not a value", lineno=lineno)
        if expr.has(D):
            raise err(f"definition {name!r} may not contain D(...); write the derivative in a chain",
                      lineno=lineno)
        sym = sp.Symbol(name, real=True)
        names[name] = sym
        definitions[sym] = expr
        if domain_text is not None:
            try:
                domains[sym] = Domain.parse(domain_text)
            except DomainError as exc:
                raise err(f"definition {name!r}: {exc}", lineno=lineno) from None
        if latex:
            latex_names[sym] = latex


def _parse_in(text, ctx, err, what, chain=None, line=None, lineno=None):
    if not isinstance(text, str):
        raise err(f"{what} must be an expression string, got {type(text).__name__}", chain=chain, line=line,
                  lineno=lineno)
    try:
        expr = parse_expression(text, ctx.names)
    except ParseError as exc:
        raise err(f"{what}: {exc}: {text!r}", chain=chain, line=line, lineno=lineno) from None
    if isinstance(expr, sp.core.relational.Relational):
        raise err(f"{what} is a comparison; a chain line is a value (the '=' are implied)",
                  chain=chain, line=line, lineno=lineno)
    return expr


def _load_chain(rc, ci, ctx, derr, loc, d_line):
    if not isinstance(rc, dict):
        raise derr(f"chain #{ci + 1} must be a table")
    cid = rc.get("id", f"chain{ci + 1}")
    if not isinstance(cid, str):
        raise derr(f"chain #{ci + 1}: id must be a string")
    allowed = {"id", "lines", "note", "export", "source"}
    for key in rc:
        if key not in allowed:
            raise derr(f"unknown key {key!r} (allowed: {', '.join(sorted(allowed))})", chain=cid,
                       lineno=loc.find_key(key, d_line))
    raw_lines = rc.get("lines")
    if not isinstance(raw_lines, list):
        raise derr("lines must be an array of expressions", chain=cid)
    if len(raw_lines) < 2:
        raise derr(f"a chain needs at least two lines (it has {len(raw_lines)}): nothing to check", chain=cid,
                   lineno=loc.find(f'"{cid}"', d_line))
    export = rc.get("export")
    if export is not None and (not isinstance(export, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", export)):
        raise derr("export must be an identifier", chain=cid)
    lines = []
    after = loc.find(f'"{cid}"', d_line) or d_line
    for li, rl in enumerate(raw_lines):
        if isinstance(rl, str):
            rl = {"expr": rl}
        if not isinstance(rl, dict):
            raise derr("a line is an expression string or a table with expr = \"...\"", chain=cid, line=li)
        unknown = set(rl) - {"expr", "latex", "rule", "erratum"}
        if unknown:
            raise derr(f"unknown key(s) {sorted(unknown)}", chain=cid, line=li)
        text = rl.get("expr")
        lineno = loc.find(text, after) if isinstance(text, str) else None
        if lineno:
            after = lineno
        if text is None:
            raise derr("line needs expr = \"...\"", chain=cid, line=li, lineno=lineno)
        expr = _parse_in(text, ctx, derr, "expression", chain=cid, line=li, lineno=lineno)
        erratum = None
        if "erratum" in rl:
            er = rl["erratum"]
            if not isinstance(er, dict) or "corrected" not in er:
                raise derr("erratum must be a table with corrected = \"...\" and why = \"...\"", chain=cid,
                           line=li, lineno=lineno)
            unknown = set(er) - {"corrected", "why", "latex"}
            if unknown:
                raise derr(f"erratum: unknown key(s) {sorted(unknown)}", chain=cid, line=li, lineno=lineno)
            corrected = _parse_in(er["corrected"], ctx, derr, "erratum.corrected", chain=cid, line=li,
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
    return Chain(cid, lines, rc.get("note"), export, rc.get("source"))


def _load_instances(raw, ctx, derr, loc, d_line):
    """Numeric instances, e.g. K = 3 classes: values for symbols such as R = exp(x_2)."""
    if not isinstance(raw, dict):
        raise derr("instances must be a table of tables")
    out, syms = {}, {}
    for name, spec in raw.items():
        if not isinstance(spec, dict):
            raise derr(f"instance {name!r} must be a table of symbol = expression")
        local = dict(ctx.names)
        extra = {}
        new_syms = spec.get("new_symbols", {})
        if not isinstance(new_syms, dict):
            raise derr(f"instance {name!r}: new_symbols must be a table of name = domain")
        for sname, dtext in new_syms.items():
            try:
                check_name(sname)
                dom = Domain.parse(dtext)
            except (ParseError, DomainError) as exc:
                raise derr(f"instance {name!r}: {exc}") from None
            if sname in local:
                raise derr(f"instance {name!r}: new symbol {sname!r} is already declared")
            s = sp.Symbol(sname, real=True)
            local[sname] = s
            extra[s] = dom
        values = {}
        for sname, text in spec.items():
            if sname == "new_symbols":
                continue
            if sname not in ctx.names or ctx.names[sname] in ctx.definitions:
                raise derr(f"instance {name!r}: {sname!r} is not a declared base symbol")
            try:
                values[ctx.names[sname]] = parse_expression(text, local) if isinstance(text, str) else None
            except ParseError as exc:
                raise derr(f"instance {name!r}: {sname}: {exc}") from None
            if values[ctx.names[sname]] is None:
                raise derr(f"instance {name!r}: {sname} must be an expression string")
        out[name] = values
        syms[name] = extra
    return out, syms
