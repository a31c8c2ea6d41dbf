"""``derive.load(FILE)``: the kernels a derivation file declares, verified, generated and callable.

A loss is one file: its derivation chains (proved by ``derive verify``) and ``[[kernel]]``
tables naming which exported lines are the loss and the gradient (README.md, "Kernels from
your own file").  :func:`load` reads the file (never running any of it), verifies it, refuses
it when a line a kernel uses is not proved, renders the kernels with the same templates as
the shipped ones into a private cache folder keyed by the generated sources' hash
(``$DERIVE_CACHE_DIR/kernel-sources/<hash>``, not the package), and returns an object with one
function per kernel, named by the kernel.  Each function has the conventions of the shipped
losses (:mod:`derive.runtime.losses`): ``reduction``, ``return_grad``, ``out=``, ``backend``,
``threads``, the same argument checks and errors, the C library built and cached by
:mod:`derive.runtime.cbuild` on first use.

:func:`shipped` (``derive.kernels``, ``derive.shipped(MODULE)``) gives the same functions for the
kernels of the shipped files (derive/derivations/*.toml), from the committed generated/ sources,
without verifying anything at call time (``make verify`` proves those files).
"""
from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

from derive.runtime import cbuild
from derive.runtime import losses
from derive.language.loader import DerivationFileError, load_file

#: the sub-folder of the kernel cache that holds the generated sources of loaded files
SOURCES_DIR = "kernel-sources"


class NotProvedError(DerivationFileError):
    """A kernel of the file evaluates an exported line whose derivation is not proved."""


def _label(c) -> str:
    if c.kind == "domain":
        return f"derivation {c.derivation!r}: domain {c.lhs}"
    return f"derivation {c.derivation!r}, chain {c.chain!r}: {c.kind}" + (f" {c.index}" if c.index is not None else "")


def _check_proved(f, step_timeout, timeout):
    """Verify the file; NotProvedError listing every failing check a kernel depends on."""
    from derive.prover.verify import FAIL, Report, Verifier

    report = Report()
    Verifier(step_timeout=step_timeout, timeout=timeout).verify_file(f, report)
    used = {}  # (derivation, chain) -> kernels
    for k in f.kernels:
        for export in k.exports.values():
            used.setdefault(f.export_derivation[export], set()).add(k.name)
    dids = {did for did, _ in used}
    bad = []
    for c in report.checks:
        if c.status != FAIL:  # proved, or a refuted step an erratum explains (its corrected line is checked too)
            continue
        if (c.derivation, c.chain) in used or (c.kind == "domain" and c.derivation in dids):
            who = sorted(used.get((c.derivation, c.chain), ())) or sorted(
                k.name for k in f.kernels if k.derivation == c.derivation)
            bad.append(f"{_label(c)} is {c.verdict.status}" + (f" ({c.message})" if c.message else "")
                       + f" [kernel {', '.join(who)}]")
    if bad:
        raise NotProvedError(f.path, f"refusing to load: {len(bad)} check(s) that its kernels use are not proved "
                             f"(run `derive verify {f.path}`): " + "; ".join(bad))


def _write_sources(texts: dict) -> Path:
    """The private cache folder holding ``texts`` (named by their hash), written when missing."""
    h = hashlib.sha256()
    for name in sorted(texts):
        h.update(name.encode() + b"\0" + texts[name].encode("utf-8") + b"\0")
    base = cbuild._private_cache_dir(cbuild._private_cache_dir(cbuild.cache_dir()) / SOURCES_DIR)
    folder = cbuild._private_cache_dir(base / h.hexdigest()[:24])
    for name, text in texts.items():
        path, data = folder / name, text.encode("utf-8")
        try:
            same = path.read_bytes() == data
        except OSError:
            same = False
        if not same:
            try:
                cbuild._write_atomic(path, data)
            except OSError as exc:
                raise cbuild.BuildError(f"cannot write the generated kernels into {folder}: "
                                        f"{exc.strerror or exc}") from None
    return folder


def _signature(decl) -> inspect.Signature:
    P = inspect.Parameter
    params = [P("inputs", P.POSITIONAL_OR_KEYWORD), P("targets", P.POSITIONAL_OR_KEYWORD)]
    declared = []
    for name in decl.params:
        default = decl.defaults.get(name, P.empty)
        if decl.class_alpha and name == "alpha" and default is P.empty:
            default = None  # no weighting
        declared.append((name, default))
    # a parameter without a default after one with a default: all of them keyword-only
    seen_default = False
    keyword_only = False
    for _, default in declared:
        if default is not P.empty:
            seen_default = True
        elif seen_default:
            keyword_only = True
    kind = P.KEYWORD_ONLY if keyword_only else P.POSITIONAL_OR_KEYWORD
    tail = [P("reduction", kind, default="none")]
    if decl.layout == "softmax" and decl.target == "class_index":
        tail.insert(0, P("ignore_index", kind, default=-100))
    if keyword_only:
        params += tail + [P(n, kind, default=d) for n, d in declared]
    else:
        params += [P(n, kind, default=d) for n, d in declared] + tail
    params += [P("backend", P.KEYWORD_ONLY, default="auto"), P("return_grad", P.KEYWORD_ONLY, default=False),
               P("threads", P.KEYWORD_ONLY, default=None), P("out", P.KEYWORD_ONLY, default=None)]
    return inspect.Signature(params)


def _describe_domain(dom) -> str:
    return str(getattr(dom, "text", dom))


def _doc(decl, path) -> str:
    unit = "row" if decl.layout == "softmax" else "element"
    mean = (' ("mean": over the rows whose target is not ignore_index)' if decl.target == "class_index" else
            ' ("mean": over all rows)' if decl.target == "class_probs" else "")
    lines = [f"{decl.title}.", "",
             f"Kernel {decl.name!r} of {path} (derivation {decl.derivation!r}: loss {decl.loss}), "
             f"layout {decl.layout!r}, target {decl.target!r}.", "", "Parameters", "----------"]
    if decl.layout == "softmax":
        lines.append("inputs : array_like of float32 or float64, shape (N, K), (N, K, d1, ...) or (K,): classes on axis 1")
        if decl.target == "class_probs":
            lines.append("targets : array_like of floats, the shape of inputs: class probabilities in [0, 1]")
        else:
            lines.append("targets : array_like of integers, shape (N,), (N, d1, ...) or (): class indices in [0, K), "
                         "or ignore_index")
    elif decl.target == "soft":
        lines += ["inputs : array_like of float32 or float64, any shape (0-d included)",
                  "targets : array_like, the shape of inputs: values in [0, 1] (labels or soft targets)"]
    else:
        soft = getattr(decl, "soft", None)
        lines += ["inputs : array_like of float32 or float64, any shape (0-d included)",
                  "targets : array_like, the shape of inputs: labels 0 or 1"
                  + (f", or soft targets in [0, 1] (then kernel {soft!r})" if soft else "")]
    for p in decl.params:
        d = decl.defaults.get(p)
        extra = " (or negative for no weighting)" if decl.weight and p == "alpha" else ""
        extra += " (or None, or one weight per class)" if decl.class_alpha and p == "alpha" else ""
        lines.append(f"{p} : float in {_describe_domain(decl.domains[p])}{extra}"
                     + (f", default {d!r}" if d is not None else ""))
    lines += [f'reduction : "none" (one loss per {unit}), "sum" or "mean"{mean}',
              'backend : "auto", "c" or "numpy"; return_grad, threads, out: as for derive.runtime.losses']
    return "\n".join(lines)


def _function(decl, src, path):
    """The Python function of one kernel of the generated module ``src`` = (folder, module)."""
    sig = _signature(decl)
    name = decl.name

    if decl.layout == "elementwise":
        run = losses._elementwise
    else:
        run = losses._probs if decl.target == "class_probs" else losses._rowwise

    def kernel(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        rows = (a["ignore_index"],) if "ignore_index" in a else ()  # class indices: the ignore label
        return run(name, a["inputs"], a["targets"], {p: a[p] for p in decl.params}, *rows, a["reduction"],
                   a["backend"], a["return_grad"], a["threads"], a["out"], src)
    kernel.__name__ = kernel.__qualname__ = name
    kernel.__signature__ = sig
    kernel.__doc__ = _doc(decl, path)
    return kernel


class LoadedKernels:
    """Kernels of derivation files: one function per ``[[kernel]]``, named by the kernel.

    ``derive.load(FILE)`` gives those of one file; ``derive.kernels`` those of every shipped
    file, and ``derive.shipped(MODULE)`` those of one shipped file."""

    def __init__(self, what, kernels, generated: Path):
        """``kernels``: [(KernelDecl, module, path)], each a kernel of ``generated/<module>.*``
        declared in the file ``path``; ``what`` says where they come from (in the repr)."""
        self._what = str(what)
        self._generated = Path(generated)
        self._names = [k.name for k, _, _ in kernels]
        self._modules = {}
        for k, module, path in kernels:
            self._modules.setdefault(module, []).append(k.name)
            setattr(self, k.name, _function(k, (generated, module), path))

    @property
    def kernel_names(self) -> list:
        return list(self._names)

    @property
    def modules(self) -> dict:
        """module -> the names of its kernels (the generated files ``<module>.{py,c,h}``)."""
        return {m: list(names) for m, names in self._modules.items()}

    @property
    def generated(self) -> Path:
        """The folder of the generated NumPy modules, C sources and headers."""
        return self._generated

    def available_backends(self) -> list:
        """["c", "numpy"] when the C library of every module here builds and loads, else ["numpy"]
        (and one warning per module that does not)."""
        ok = [losses._c_works(stacklevel=2, src=(self._generated, m)) for m in self._modules]
        return ["c", "numpy"] if all(ok) else ["numpy"]

    def __repr__(self):
        return f"<derive kernels from {self._what}: {', '.join(self._names)}>"

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._names))


def load(path, *, step_timeout: float = 4.0, timeout: float | None = None) -> LoadedKernels:
    """The kernels declared by the ``[[kernel]]`` tables of the derivation file ``path``.

    The file is loaded (DerivationFileError for a malformed file or declaration, naming the
    file and kernel), verified (``step_timeout`` and ``timeout`` as for ``derive verify``;
    :class:`NotProvedError` listing the failing checks when a line a kernel uses is not
    proved), generated into a private cache folder, and returned as an object with one function
    per kernel.  The C library is compiled on the first call with ``backend="c"`` or "auto"."""
    from derive.codegen import render_all

    f = load_file(path)
    if not f.kernels:
        raise DerivationFileError(f.path, "declares no [[kernel]]: nothing to load")
    for k in f.kernels:
        if hasattr(LoadedKernels, k.name) or k.name.startswith("_"):
            raise DerivationFileError(f.path, f"the name {k.name!r} is taken by the loaded object's own attributes "
                                      "(or starts with '_'): rename the kernel", kernel=k.name, lineno=k.lineno)
    _check_proved(f, step_timeout, timeout)
    from derive.codegen import module_name

    module = module_name(f)
    texts = render_all(path, file=f, module=module)
    return LoadedKernels(path, [(k, module, path) for k in f.kernels], _write_sources(texts))


_SHIPPED: dict = {}  # module (None: all) -> LoadedKernels


def _shipped_decls() -> list:
    """[(KernelDecl, module, path)] of every shipped derivation file with [[kernel]] tables, in
    the order of derive.codegen.kernels.shipped_kernels(), each checked against its committed
    generated/<module>.py (a file changed without ``make codegen`` is an error, not a silent
    mismatch between the arguments and the kernel)."""
    from derive.codegen.kernels import shipped_kernels

    decls = [(k, k.module, k.path) for k in shipped_kernels()]
    seen = {}
    for k, module, path in decls:
        if k.name in seen:
            raise DerivationFileError(path, f"the kernel name {k.name!r} is also a kernel of module {seen[k.name]!r}: "
                                      "derive.kernels needs unique names", kernel=k.name, lineno=k.lineno)
        seen[k.name] = module
        table = cbuild.load_numpy_module(cbuild.GENERATED_DIR, module).KERNELS
        if k.name not in table or tuple(table[k.name]["params"]) != tuple(k.params):
            raise cbuild.BuildError(f"{cbuild.GENERATED_DIR / (module + '.py')} does not hold kernel {k.name!r} as "
                                    f"{path} declares it: regenerate it (make codegen, or derive codegen)")
    return decls


def shipped(module: str | None = None) -> LoadedKernels:
    """The kernels of the shipped derivation files (derive/derivations/*.toml), from the committed
    generated/ sources: every kernel (``module=None``; also ``derive.kernels``) or those of one
    module (``"asl"``, ``"focal_kernels"``, ...).  Nothing is verified at call time (``make
    verify`` proves the shipped files); the functions are those of :func:`load`."""
    if module in _SHIPPED:
        return _SHIPPED[module]
    decls = _shipped_decls()
    if module is not None:
        modules = list(dict.fromkeys(m for _, m, _ in decls))
        if module not in modules:
            raise ValueError(f"no shipped module {module!r}; the shipped modules are {', '.join(map(repr, modules))}")
        decls = [d for d in decls if d[1] == module]
    what = "the shipped files" if module is None else f"shipped module {module!r} ({decls[0][2]})"
    _SHIPPED[module] = LoadedKernels(what, decls, cbuild.GENERATED_DIR)
    return _SHIPPED[module]


__all__ = ["load", "shipped", "LoadedKernels", "NotProvedError", "SOURCES_DIR"]
