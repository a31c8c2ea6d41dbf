"""``derive codegen``: render ``templates/`` into ``generated/`` from the proved derivation files.

The kernels are the ``[[kernel]]`` tables of derivation files: by default every shipped one
(:func:`derive.codegen.kernels.shipped_files`: ``stable_forms.toml`` written to
``generated/focal_kernels.*``, ``poly1.toml`` to ``generated/poly1.*``, ...), or the
files named on the command line (``derive codegen my_loss.toml --out DIR`` writes
``DIR/<module>.py``, ``.c`` and ``.h``, and the CUDA ``.cu`` and ``.cuh``, ``<module>`` being the file's ``[file] module`` or
its stem).  Their expressions (loaded and resolved by :mod:`derive.language.loader`) are reduced
by one common-subexpression elimination per kernel and
printed by SymPy's C99 and NumPy printers and the CUDA printer (:mod:`derive.codegen.printers`).  The templates
only supply the loops, the helpers (sigmoid, softplus, xexpm1inv, error-free transforms)
and the row reduction of the softmax kernels.

Output is deterministic: the same inputs give the same bytes (checked by the tests).
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from derive.resources import generated_dir, logical_path, templates_dir

TEMPLATES_DIR = templates_dir()
#: The generated kernels the runtime loads (the checkout's ``generated/``, or the installed copy).
GENERATED_DIR = generated_dir()
#: Where ``derive codegen`` writes by default: ``./generated`` in the current folder (in a
#: checkout, ``make codegen`` runs from its root, so that is the committed ``generated/``).
DEFAULT_OUT = Path("generated")

#: generated file suffix -> template (the files are <module>.h, .c, .py, and the CUDA .cuh, .cu)
TEMPLATES = {
    ".h": "kernels.h.j2",
    ".c": "kernels.c.j2",
    ".py": "kernels.py.j2",
    ".cuh": "kernels.cuh.j2",
    ".cu": "kernels.cu.j2",
}
#: the CUDA outputs: their digest covers every template (they share the C kernels' expressions and
#: the NumPy module's KERNELS table); the C and NumPy outputs' digest covers the other templates only,
#: so adding the CUDA backend left their bytes as they were
CUDA_SUFFIXES = (".cuh", ".cu")
#: the shipped file's module (its [file] module key)
SHIPPED_MODULE = "focal_kernels"
#: generated file -> template, for the shipped kernels
OUTPUTS = {SHIPPED_MODULE + suffix: tmpl for suffix, tmpl in TEMPLATES.items()}


def module_name(file) -> str:
    """The name of a loaded derivation file's generated files: ``[file] module``, else its stem."""
    from derive.language.loader import module_name as _name

    return _name(file.path, file.module)


def output_names(file) -> list:
    return [module_name(file) + suffix for suffix in TEMPLATES]

#: Whether the NumPy module's float32 kernels would evaluate in float64 and round once (the
#: module then says so).  Off: NumPy's own float32 exp/log1p/power keep every kernel within
#: 1.2e-6 of the exact values (`make accuracy`), inside the 2e-6 bound, so nothing is promoted
#: (the float32 softmax forms e^(x_j - max) in float64, where the difference is exact, and
#: rounds it once, as FL*'s z = gamma*x_t + beta is formed exactly in float64).
#: The C float32 kernels never promote either (expf, log1pf, powf, ...), except FL*'s
#: z = gamma*x_t + beta, whose float product is formed exactly in double.
NUMPY_F32_PROMOTED = False


def _relpath(p: Path) -> str:
    """The path a file has in the repository (the same from a wheel or a checkout)."""
    return logical_path(p)


def _shown(p: Path) -> str:
    """An output path as the user gave it (relative to the current folder when under it)."""
    p = Path(p)
    try:
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(p)


def _digest(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(_relpath(p).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _c_cond(var: str, dom, weight: bool = False) -> str:
    """C condition that is true when ``var`` is *outside* the domain (or NaN/inf)."""
    parts = [f"isfinite({var})"]
    if dom.lo is not None:
        parts.append(f"{var} {'>' if dom.lo_open else '>='} {float(dom.lo)!r}")
    if dom.hi is not None:
        parts.append(f"{var} {'<' if dom.hi_open else '<='} {float(dom.hi)!r}")
    inside = " && ".join(parts)
    if weight:
        inside = f"isfinite({var}) && ({var} < 0 || ({' && '.join(parts[1:]) or '1'}))"
    return f"!({inside})"


def _kernel_model(prep, file):
    from derive.codegen import kernels as _k

    spec = prep.spec
    ctx = None
    for d in file.derivations:
        if d.id == prep.derivation:
            ctx = d.context
    domains = {}
    for p in spec.params:
        dom = ctx.domains[ctx.names[p]]
        domains[p] = (None if dom.lo is None else float(dom.lo), dom.lo_open,
                      None if dom.hi is None else float(dom.hi), dom.hi_open)
    weight = getattr(spec, "weight", None)
    model = {
        "name": spec.name,
        "kind": spec.kind,
        "target": spec.target,
        "soft": getattr(spec, "soft", None),
        "conditioned": getattr(spec, "conditioned", None),
        "title": spec.title,
        "params": list(spec.params),
        "params_py": repr(tuple(spec.params)),
        "domains_py": repr(domains),
        "class_alpha": getattr(spec, "class_alpha", False),
        "weight": weight,
        "weight_py": repr(["alpha"] if weight else []),
        "compensated": getattr(spec, "compensated", None),
        "derivation": prep.derivation,
        "exports": ", ".join(prep.export_names.values()),
        "rewrites": _k.rewrites_text(prep),
        "code": {"numpy": _k.print_numpy(prep)},
        "c_proto": {},
        "c_checks": [],
        "c_row_checks": [],
    }
    for p in spec.params:
        dom = ctx.domains[ctx.names[p]]
        if getattr(spec, "class_alpha", False) and p == "alpha":
            model["c_checks"].append(f"alpha_vec == NULL && {_c_cond('alpha', dom)}")
            model["c_row_checks"].append(_c_cond("alpha_t", dom))
        else:
            model["c_checks"].append(_c_cond(p, dom, weight=(p == "alpha" and bool(weight))))
    for dt, cfg in _k.C_CONFIGS.items():
        model["code"][dt] = _k.print_c(prep, dt)
        T = cfg.ctype
        fname = f"derive_{spec.name}_{dt}"
        if spec.kind == "elementwise":
            args = [f"size_t n", f"const {T} *x", f"const {T} *t"] + [f"{T} {p}" for p in spec.params]
        elif spec.kind == "rowprobs":
            args = ["size_t n", "size_t k", f"const {T} *x", f"const {T} *q"] + [f"{T} {p}" for p in spec.params]
        else:
            args = ["size_t n", "size_t k", f"const {T} *x", "const int64_t *target"]
            for p in spec.params:
                if p == "alpha" and spec.class_alpha:
                    args += [f"const {T} *alpha_vec", f"{T} alpha"]
                else:
                    args.append(f"{T} {p}")
            args.append("int64_t ignore_index")
        args += [f"{T} *loss", f"{T} *grad"]
        model["c_proto"][dt] = f"int {fname}({', '.join(args)})"
    model["cuda"] = {dt: _print_cuda(prep, dt) for dt in ("f32", "f64")}
    model["cuda_proto"] = _cuda_protos(spec, None)
    model["uses_t"] = any(sym.name == "ti" for e in prep.exprs.values() for sym in e.free_symbols) or any(
        sym.name == "ti" for e in prep.extra_exprs.values() for sym in e.free_symbols)
    # gamma appears as an exponent: the C driver passes integer gammas as constants (pow(v, 2) -> v*v)
    printed = model["code"]["f64"]
    c_text = " ".join([e for _, e in printed.temps] + list(printed.outputs.values()))
    model["pow_gamma"] = "gamma" in spec.params and "pow(" in c_text
    model["second"] = _second_model(spec, file)
    return model


def _second_model(spec, file):
    """The second-derivative kernel of one [[kernel]] (hess, or a Hessian-vector product), or None."""
    from derive.codegen import kernels as _k

    prep = _k.prepare_second(spec, file)
    if prep is None:
        return None
    suffix = _k.SECOND_SUFFIX[spec.kind]
    model = {"name": f"{spec.name}_{suffix}", "suffix": suffix, "code": {"numpy": _k.print_numpy(prep)},
             "c_proto": {}, "exports": ", ".join(prep.export_names.values()), "export": spec.second,
             "rewrites": _k.rewrites_text(prep)}
    model["cuda"] = {dt: _print_cuda(prep, dt) for dt in ("f32", "f64")}
    model["cuda_proto"] = _cuda_protos(spec, suffix)
    for dt, cfg in _k.C_CONFIGS.items():
        model["code"][dt] = _k.print_c(prep, dt)
        T = cfg.ctype
        if spec.kind == "elementwise":
            args = ["size_t n", f"const {T} *x", f"const {T} *t"] + [f"{T} {p}" for p in spec.params] + [f"{T} *hess"]
        elif spec.kind == "rowprobs":
            args = ["size_t n", "size_t k", f"const {T} *x", f"const {T} *q"] + [f"{T} {p}" for p in spec.params]
            args += [f"const {T} *v", f"{T} *out"]
        else:
            args = ["size_t n", "size_t k", f"const {T} *x", "const int64_t *target"]
            for p in spec.params:
                if p == "alpha" and spec.class_alpha:
                    args += [f"const {T} *alpha_vec", f"{T} alpha"]
                else:
                    args.append(f"{T} {p}")
            args += ["int64_t ignore_index", f"const {T} *v", f"{T} *out"]
        model["c_proto"][dt] = f"int derive_{spec.name}_{suffix}_{dt}({', '.join(args)})"
    model["uses_t"] = any(sym.name == "ti" for e in list(prep.exprs.values()) + list(prep.extra_exprs.values())
                          for sym in e.free_symbols)
    return model


def _print_cuda(prep, dtype):
    """One kernel's CUDA device code for one compute type: the C kernels' CSE, the CUDA printer."""
    from derive.codegen import kernels as _k
    from derive.codegen.printers import cuda_printer, with_sigmoid_pow

    temps, reduced = _k._cse({k: with_sigmoid_pow(v) for k, v in prep.exprs.items()})
    pr = cuda_printer(dtype, _k._ranks(temps))
    return _k.Printed([(str(s), pr.doprint(e)) for s, e in temps], {k: pr.doprint(v) for k, v in reduced.items()},
                      {k: pr.doprint(v) for k, v in prep.extra_exprs.items()})


def _cuda_protos(spec, second):
    """{storage dtype: the extern "C" launcher's prototype} of a kernel (``second``: None, or the
    second-derivative kernel's suffix, hess / hvp).  Tensors in the storage type S, scalars and a
    per-class alpha in the compute type T, ``flags`` two device ints the kernel sets to 1 (flags[0]: a
    label or target outside its set, flags[1]: a class index or its alpha invalid), then the stream."""
    from derive.codegen.printers import CUDA_CONFIGS as _CUDA_CONFIGS

    out = {}
    for cfg in _CUDA_CONFIGS.values():
        T = cfg.ctype
        for sd, S in cfg.storage:
            if spec.kind == "elementwise":
                args = ["size_t n", f"const {S} *x", f"const {S} *t"] + [f"{T} {p}" for p in spec.params]
            elif spec.kind == "rowprobs":
                args = ["size_t n", "size_t k", f"const {S} *x", f"const {S} *q"] + [f"{T} {p}" for p in spec.params]
            else:
                args = ["size_t n", "size_t k", f"const {S} *x", "const int64_t *target"]
                for p in spec.params:
                    args += [f"const {T} *alpha_vec", f"{T} alpha"] if (p == "alpha" and spec.class_alpha) else [f"{T} {p}"]
                args.append("int64_t ignore_index")
            if second is None:
                args += [f"{S} *loss", f"{S} *grad"]
            elif spec.kind == "elementwise":
                args += [f"{S} *hess"]
            else:
                args += [f"const {S} *v", f"{S} *out"]
            args += ["int *flags", "cudaStream_t stream"]
            name = spec.name + (f"_{second}" if second else "")
            out[sd] = f"int derive_{name}_{sd}_cuda({', '.join(args)})"
    return out


def _cuda_dtypes():
    from derive.codegen.printers import CUDA_CONFIGS as _CUDA_CONFIGS

    return [{"dtype": dt, "ctype": cfg.ctype, "suffix": cfg.suffix, "max_name": cfg.max_name,
             "exp_zero": cfg.exp_zero, "expm1mx_terms": 16 if dt == "f64" else 10,
             "storage": [{"dtype": sd, "ctype": st} for sd, st in cfg.storage]}
            for dt, cfg in _CUDA_CONFIGS.items()]


def render_all(derivations: Path | None = None, templates: Path = TEMPLATES_DIR, file=None, module=None) -> dict:
    """Render every output of one derivation file's kernels; returns {file name: text}.
    ``file``: the file already loaded (from ``derivations``); ``module``: the name of the
    outputs instead of the file's (``derive.load`` uses the names :mod:`derive.runtime.cbuild` loads)."""
    import jinja2
    import sympy

    from derive.codegen import kernels as _k

    derivations = Path(derivations) if derivations is not None else _k.STABLE_FORMS
    file, preps = _k.load_kernels(derivations, file=file)
    module = module or module_name(file)
    template_paths = [templates / t for s, t in TEMPLATES.items() if s not in CUDA_SUFFIXES]
    rules = []  # a kernel with rewrite = [...] depends on derive.rewrite's rules too
    if any(getattr(p.spec, "rewrite", ()) for p in preps):
        from derive.rewrite import PHASES_FILE, RULES_FILE

        rules = [RULES_FILE, PHASES_FILE]
    digest = _digest([derivations, *template_paths, *rules])
    cuda_digest = _digest([derivations, *(templates / t for t in TEMPLATES.values()), *rules])
    models = [_kernel_model(p, file) for p in preps]
    dtypes = [
        {"dtype": dt, "ctype": cfg.ctype, "suffix": cfg.suffix, "max_name": cfg.max_name,
         "exp_zero": cfg.exp_zero, "expm1mx_terms": 16 if dt == "f64" else 10,
         "name": "float32" if dt == "f32" else "float64", "promote": dt == "f32" and NUMPY_F32_PROMOTED}
        for dt, cfg in _k.C_CONFIGS.items()
    ]
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    out = {}
    for suffix, tmpl in TEMPLATES.items():
        name = module + suffix
        dig = cuda_digest if suffix in CUDA_SUFFIXES else digest
        header = (f"generated by derive from {_relpath(derivations)} and templates/{tmpl} "
                  f"(SymPy {sympy.__version__}, source digest {dig}), do not edit")
        text = env.get_template(tmpl).render(
            header=header, kernels=models, dtypes=dtypes, source_digest=dig, cuda_dtypes=_cuda_dtypes(),
            derivations_path=_relpath(derivations), f32_promoted=NUMPY_F32_PROMOTED, module=module,
        )
        out[name] = text
    return out


def render_shipped(templates: Path = TEMPLATES_DIR) -> dict:
    """Every shipped file's outputs (:func:`derive.codegen.kernels.shipped_files`): {file name: text}."""
    from derive.codegen import kernels as _k

    out = {}
    for path in _k.shipped_files():
        texts = render_all(path, templates)
        clash = set(texts) & set(out)
        if clash:
            raise ValueError(f"{path}: its outputs {', '.join(sorted(clash))} clash with another shipped file's; "
                             "give one a different [file] module")
        out.update(texts)
    return out


def write_all(out_dir: Path = GENERATED_DIR, **kw) -> list:
    return _write(out_dir, render_all(**kw))


def _write(out_dir: Path, texts: dict) -> list:
    """Write the rendered files that differ (atomically); their names."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    changed = []
    for name, text in texts.items():
        path = out_dir / name
        data = text.encode("utf-8")
        if not path.exists() or path.read_bytes() != data:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
            changed.append(name)
    return changed


def check_all(out_dir: Path = GENERATED_DIR, **kw) -> list:
    """Names of generated files that differ from a fresh rendering (empty: up to date)."""
    stale = []
    for name, text in render_all(**kw).items():
        path = Path(out_dir) / name
        if not path.exists() or path.read_bytes() != text.encode("utf-8"):
            stale.append(name)
    return stale


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="derive codegen",
        description="Render the kernel templates into a folder: for each derivation file with [[kernel]] tables "
                    "(default: every shipped one), the NumPy module, the C source and its header, the CUDA "
                    "source and its header.")
    parser.add_argument("files", nargs="*", type=Path, metavar="FILE",
                        help="derivation files whose [[kernel]] tables to generate (default: every shipped "
                             "file of derive/derivations/ with [[kernel]] tables); each gives <module>.py, .c, .h, .cu and .cuh")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output folder (default: ./generated in the current folder)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the output folder differs from a fresh rendering")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        print(f"derive codegen: --out {args.out} is a file, not a folder", file=sys.stderr)
        return 2
    again = " ".join(["derive codegen", *map(str, args.files)] + ([] if args.out == DEFAULT_OUT else [f"--out {args.out}"]))
    if not args.files:
        from derive.codegen.kernels import shipped_files

    sources = args.files or list(shipped_files())
    written = []
    try:
        rendered = []
        for src in sources:
            texts = render_all(src)
            clash = [n for n in texts if any(n in r for r in rendered)]
            if clash:
                raise ValueError(f"{src}: its outputs {', '.join(clash)} clash with another file's; "
                                 "give one a different [file] module")
            rendered.append(texts)
        if args.check:
            stale = [name for texts in rendered for name, text in texts.items()
                     if not (args.out / name).exists() or (args.out / name).read_bytes() != text.encode("utf-8")]
            for name in stale:
                why = "is out of date" if (args.out / name).exists() else "is missing"
                print(f"{_shown(args.out / name)} {why}: run `{again}` (in a checkout: `make codegen`)",
                      file=sys.stderr)
            if not stale:
                print(f"{_shown(args.out)}: up to date")
            return 1 if stale else 0
        for texts in rendered:
            written.append((list(texts), _write(args.out, texts)))
    except Exception as exc:  # the loader's and SymPy's errors, shown as one line
        print(f"derive codegen: {exc}", file=sys.stderr)
        return 2
    for names, changed in written:
        for name in names:
            print(f"{'wrote' if name in changed else 'unchanged'} {_shown(Path(args.out) / name)}")
    return 0


__all__ = ["main", "render_all", "render_shipped", "write_all", "check_all", "module_name", "output_names", "OUTPUTS", "TEMPLATES",
           "SHIPPED_MODULE", "GENERATED_DIR", "TEMPLATES_DIR", "DEFAULT_OUT"]
