"""The proof cache: which strategy proved a check, keyed by a hash of everything the proof rests on.

A check that is proved once is proved again the next time by replaying the one strategy that
proved it (the failed strategies before it are skipped).  The cache never stands in for a proof:
a hit replays the strategy, after the same counterexample search as a full check, and only a
replay that proves the step again counts; a replay that does not prove it falls back to the full
search, whose result overwrites the entry.  Only proved checks are stored.

The key is the SHA-256 of

* a fingerprint of the prover: derive's version, the source of :mod:`derive.prover` and
  :mod:`derive.language` (any change to the engine, the parser or the functions invalidates
  every entry), the SymPy, mpmath and Python versions;
* the kind of check and the seed of the sample points;
* both sides of the check, as ``sympy.srepr`` (symbols with their assumptions);
* every symbol the sides use, directly or through definitions (and those of the
  assumptions): its definition, its declared domain, whether that domain is proved;
* the assumptions relating symbols (``assume = [...]``) the check runs under.

The value is the strategy's key (of :data:`derive.prover.engine.STRATEGIES`), or
``"transitivity"`` for an end-to-end check proved by its proved steps (replayed as the
counterexample search of the direct check, then the same transitivity over this run's steps).

Location: ``$DERIVE_CACHE_DIR/proofs``, else ``$XDG_CACHE_HOME/derive/proofs``, else
``~/.cache/derive/proofs`` (the folder of the kernel cache, :mod:`derive.runtime.cbuild`).
``DERIVE_NO_CACHE=1`` (or ``derive verify --no-cache``) turns it off.  One small JSON file per
entry, written to a temporary file and renamed into place, so that parallel workers and
processes never see half an entry; an entry that cannot be read or parsed, or names an unknown
strategy, is ignored (and overwritten by the next proof).  Delete the folder to empty it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import sympy as sp

#: the layout of an entry; a change of layout is a new folder
CACHE_FORMAT = 1
TRANSITIVITY = "transitivity"


def default_dir() -> Path | None:
    """The proof cache folder of this environment (None: no home folder to put it in)."""
    env = os.environ.get("DERIVE_CACHE_DIR")
    if env:
        return Path(env) / "proofs"
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "derive" / "proofs"
    try:
        return Path.home() / ".cache" / "derive" / "proofs"
    except (RuntimeError, KeyError, OSError):
        return None


def disabled_by_env() -> bool:
    return os.environ.get("DERIVE_NO_CACHE", "").strip() not in ("", "0")


@lru_cache(maxsize=1)
def fingerprint() -> str:
    """Hash of what decides a proof besides the check itself: the prover's code and versions."""
    import mpmath

    import derive

    h = hashlib.sha256()
    h.update(f"format {CACHE_FORMAT}; derive {derive.__version__}; sympy {sp.__version__}; "
             f"mpmath {mpmath.__version__}; python {sys.version_info[:2]}".encode())
    root = Path(__file__).resolve().parent.parent
    for sub in ("prover", "language"):
        for p in sorted((root / sub).glob("*.py")):
            try:
                h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
            except OSError:
                h.update(p.name.encode() + b"\0unreadable\0")
    return h.hexdigest()


def _domain_text(dom) -> str:
    if dom is None:
        return "-"
    try:
        fields = [(f.name, getattr(dom, f.name)) for f in dataclasses.fields(dom) if f.name != "text"]
    except TypeError:
        return repr(dom)
    return repr([(k, sp.srepr(v) if isinstance(v, sp.Basic) else repr(v)) for k, v in fields])


def _closure(ctx, exprs):
    """The symbols ``exprs`` use, directly or through definitions."""
    seen, frontier = set(), []
    for e in exprs:
        for s in getattr(e, "free_symbols", ()):
            if s not in seen:
                seen.add(s)
                frontier.append(s)
    while frontier:
        s = frontier.pop()
        for t in getattr(ctx.definitions.get(s), "free_symbols", ()):
            if t not in seen:
                seen.add(t)
                frontier.append(t)
    return sorted(seen, key=lambda s: (str(s), sp.srepr(s)))


def check_key(prover, kind: str, lhs, rhs) -> str:
    """The cache key of check ``lhs = rhs`` of ``kind`` ("step", "end-to-end") under ``prover``."""
    ctx = prover.ctx
    h = hashlib.sha256()

    def put(*parts):
        for part in parts:
            h.update(str(part).encode("utf-8", "surrogatepass"))
            h.update(b"\0")

    put(fingerprint(), kind, prover.seed, sp.srepr(lhs), sp.srepr(rhs))
    assumptions = list(prover.assumptions)
    put("assume", len(assumptions), *[sp.srepr(a) for a in assumptions])
    for s in _closure(ctx, [lhs, rhs] + assumptions):
        definition = ctx.definitions.get(s)
        put("symbol", sp.srepr(s), "-" if definition is None else sp.srepr(definition),
            _domain_text(ctx.domains.get(s)), s in prover.proved_domains)
    return h.hexdigest()


class ProofCache:
    """One folder of entries (see the module's docstring); counts its hits, misses and writes."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.hits = self.misses = self.stale = self.writes = self.errors = 0

    def _path(self, key: str) -> Path:
        return self.folder / f"v{CACHE_FORMAT}" / key[:2] / f"{key[2:]}.json"

    def get(self, key: str) -> str | None:
        """The strategy stored for ``key``; None when there is none or the entry is unusable."""
        from derive.prover.engine import STRATEGIES

        try:
            with open(self._path(key), "rb") as fh:
                data = json.loads(fh.read(4096).decode("utf-8"))
            strategy = data["strategy"] if isinstance(data, dict) and data.get("key") == key else None
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
            strategy = None
        if strategy not in STRATEGIES and strategy != TRANSITIVITY:
            self.misses += 1
            return None
        self.hits += 1
        return strategy

    def put(self, key: str, strategy: str, method: str = "") -> None:
        """Store ``strategy`` for ``key`` (atomically: a temporary file renamed into place);
        a folder that cannot be written turns writing off, never the run."""
        path = self._path(key)
        data = json.dumps({"key": key, "strategy": strategy, "method": method}).encode()
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
            tmp = None
            self.writes += 1
        except OSError:
            self.errors += 1
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def stats(self) -> dict:
        return {"folder": str(self.folder), "hits": self.hits, "misses": self.misses, "stale": self.stale,
                "writes": self.writes, "errors": self.errors}


def open_cache(cache=None) -> ProofCache | None:
    """The cache a run uses: ``cache`` False: none; a ProofCache: it; a path: that folder;
    None (the default): the environment's folder unless DERIVE_NO_CACHE is set."""
    if cache is False:
        return None
    if isinstance(cache, ProofCache):
        return cache
    if cache is None or cache is True:
        if disabled_by_env():
            return None
        folder = default_dir()
        return None if folder is None else ProofCache(folder)
    return ProofCache(cache)
