"""The figures of ``docs/``: computed from the generated kernels, drawn the same way everywhere.

Two figures per kernel, for every kernel of every derivation file the docs cover: its loss and
gradient beside the literal closed form (the declared defaults and one or two more values of each
parameter), and the relative error of both against mpmath.  Every curve is an output of the
generated NumPy module of the kernel's file (see :mod:`derive.docs.numerics` for why its
transcendental functions are the correctly rounded ones here); the references are
:mod:`derive.measure.reference` (mpmath at 40+ digits, from the original definitions) and the
"literal closed form" is the file's closed form lambdified.  No formula is typed in this module,
and no kernel is named: what a kernel is fed comes from its layout and target kind.

Byte-identical output: matplotlib's Agg renderer, default rcParams reset and then fixed
(DejaVu Sans, which matplotlib ships; fixed dpi; fixed SVG hash salt), no date or software
metadata, and logarithms of the error axes taken here (with mpmath) rather than by a log-scaled
axis, so that no CPU-dependent ``log10`` enters the drawing.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import mpmath
import numpy as np

from derive.docs import numerics as N

DPI = 100

ACCURACY_RANGE = 40.0
ACCURACY_POINTS = 401
VALUE_POINTS = 321
FLOOR = {"float32": -9, "float64": -18}  # log10 of the lowest error shown; 0 is drawn there
TOP = 1  # log10 of the highest: errors of 10 and more, and inf/NaN, are drawn at 10^1
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive")

RC = {
    "font.family": "DejaVu Sans",
    "mathtext.fontset": "dejavusans",
    "font.size": 9.0,
    "axes.titlesize": 10.0,
    "axes.grid": True,
    "grid.alpha": 0.35,
    "grid.linewidth": 0.6,
    "legend.fontsize": 8.0,
    "legend.framealpha": 0.9,
    "lines.linewidth": 1.4,
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "savefig.bbox": None,
    "svg.fonttype": "path",
    "svg.hashsalt": "derive-docs",
    "svg.image_inline": True,
    "path.simplify": False,
    "axes.formatter.use_mathtext": True,
}


@dataclass
class Figure:
    stem: str  # docs/img/<stem>.png and .svg
    title: str
    caption: str
    kernel: object  # the KernelDecl it draws
    kind: str  # "values" or "accuracy"
    page: str  # the kernel's page key


# ------------------------------------------------------------------------------------------
# drawing


def _render(fig) -> dict:
    """PNG and SVG bytes of a matplotlib figure, without date or software metadata."""
    out = {}
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    out["png"] = buf.getvalue()
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    out["svg"] = buf.getvalue()
    return out


def _new_figure(w, h, rows=1, cols=1, **kw):
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(w, h), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    return fig, axes


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def _log10_abs(values):
    """log10 |v| (mpmath: no CPU-dependent log10), None where v is 0 or not finite."""
    out = []
    with mpmath.workdps(30):
        for v in np.asarray(values, dtype=np.float64).tolist():
            out.append(float(mpmath.log10(abs(mpmath.mpf(v)))) if math.isfinite(v) and v != 0.0 else None)
    return out


def _xlabel(k):
    return "logit $x$ (" + N.target_input(k)[0] + ")"


def value_grid():
    x = np.linspace(-ACCURACY_RANGE, ACCURACY_RANGE, VALUE_POINTS)
    x[1:-1] += (x[1] - x[0]) / 3.0
    return x


def fig_values(k):
    """Loss and gradient of kernel ``k`` (solid) and of its literal closed form (dashed), float64,
    for each of :func:`numerics.parameter_sets`: on a linear axis (top) and as log10 of the
    magnitude (bottom), where a closed form that rounds to 0, inf or NaN leaves the curve
    (drawn as markers at the bottom or top edge)."""
    x = value_grid()
    fig, axes = _new_figure(9.0, 6.6, 2, 2, sharex=True)
    logs = {0: [], 1: []}
    curves = []
    for i, params in enumerate(N.parameter_sets(k)):
        with np.errstate(all="ignore"):
            kern = N.run(k, x, params)
            lit = N.literal(k, x, params)
        label = N.describe_params(k, params) or "no parameters"
        curves.append((COLOURS[i % len(COLOURS)], label, kern, lit))
        for col in (0, 1):
            logs[col] += [v for v in _log10_abs(kern[col]) + _log10_abs(lit[col]) if v is not None]
    for col, what in enumerate(("loss", "gradient d/dx")):
        lo = math.floor(min(logs[col], default=-1.0)) - 1
        hi = math.ceil(max(logs[col], default=1.0)) + 1
        for colour, label, kern, lit in curves:
            top = axes[0, col]
            top.plot(x, _f64(kern[col]), color=colour, linewidth=1.3, label=f"kernel, {label}")
            top.plot(x, _f64(lit[col]), color=colour, linewidth=1.0, linestyle="--",
                     label=f"literal closed form, {label}")
            bottom = axes[1, col]
            for values, style in ((kern[col], "-"), (lit[col], "--")):
                y = _log10_abs(values)
                drawn = np.array([lo if v is None else v for v in y])
                missing = np.array([v is None for v in y])
                bottom.plot(x[~missing], drawn[~missing], color=colour, linestyle=style,
                            linewidth=1.3 if style == "-" else 1.0)
                if missing.any():
                    vals = _f64(values)[missing]
                    edge = np.where(np.isfinite(vals), lo, hi)  # 0 at the bottom, inf and NaN at the top
                    bottom.plot(x[missing], edge, linestyle="none", marker="v" if style == "-" else "x",
                                markersize=3.0, color=colour)
        axes[0, col].set_title(f"{what} of {k.name}")
        axes[1, col].set_ylim(lo - 0.5, hi + 0.5)
        axes[1, col].set_title(f"$\\log_{{10}}$ |{what}| (markers: 0 at the bottom, inf or NaN at the top)",
                               fontsize=8.5)
        axes[1, col].set_xlabel(_xlabel(k))
        for ax in axes[:, col]:
            ax.set_xlim(-ACCURACY_RANGE, ACCURACY_RANGE)
        axes[0, col].axhline(0.0, color="0.3", linewidth=0.6)
    axes[0, 0].legend(loc="best", fontsize=6.5)
    fig.suptitle(f"{k.name}: generated kernel (solid) and literal closed form (dashed), float64", fontsize=10)
    return _render(fig)


# ------------------------------------------------------------------------------------------
# accuracy


def accuracy_grid(dtype):
    """The logits of the accuracy figures: [-40, 40], inner points shifted off the dyadic grid."""
    x = np.linspace(-ACCURACY_RANGE, ACCURACY_RANGE, ACCURACY_POINTS)
    x[1:-1] += (x[1] - x[0]) / 3.0
    return x.astype(dtype)


def _typed(params, dtype):
    return tuple(float(np.asarray(p, dtype=dtype)) for p in params)


def reference(k, x, params):
    """(loss, gradient with respect to x) of kernel ``k`` by mpmath at the inputs of
    :func:`numerics.run`: lists of mpf (derive.measure.reference, from the original definitions)."""
    from derive.measure import reference as R

    loss, grad = R.reference_for(k).values(*N.inputs(k, np.asarray(x, dtype=np.float64)), params)
    return loss, (grad if k.layout == "elementwise" else [row[0] for row in grad])


def condition(k, x, params, dtype):
    """max(1, kappa) per value (loss, gradient) for a kernel that declares ``conditioned``, else
    None: its errors are measured relative to the condition number of the exact function."""
    from derive.measure import reference as R

    if not getattr(k, "conditioned", None):
        return None
    kl, kg = R.reference_for(k).kappa(*N.inputs(k, np.asarray(x, dtype=np.float64)), params, dtype=dtype)
    kg = np.asarray(kg) if k.layout == "elementwise" else np.asarray(kg)[:, 0]
    return tuple(np.maximum(1.0, np.asarray(v, dtype=np.float64).ravel()) for v in (kl, kg))


def accuracy_data(k, dtype):
    """(x, {"kernel"|"literal": (loss, grad)}, (reference loss, reference grad), max(1, kappa) or
    None (see :func:`condition`)) at the declared defaults, for the inputs :data:`numerics.TARGET_INPUTS` gives the kernel's target kind."""
    x = accuracy_grid(dtype)
    params = _typed(N.defaults(k), dtype)
    with np.errstate(all="ignore"):
        kern = N.run(k, x, params)
        lit = N.literal(k, x, params)
        ref = reference(k, x, params)
        cond = condition(k, x, params, dtype)
    return x, {"kernel": kern, "literal": lit}, ref, cond


def _log_errors(computed, reference, dtype, cond=None):
    """log10 of the relative error (divided by ``cond``, max(1, kappa), when given), clipped to
    [FLOOR, TOP]; and the mask of non-finite values."""
    from derive.measure import reference as R

    comp = np.asarray(computed)
    bad = ~np.isfinite(comp.astype(np.float64))
    rel = R.rel_errors(comp, reference, dtype)
    if cond is not None:
        rel = rel / cond
    floor = FLOOR[np.dtype(dtype).name]
    out = np.empty(len(rel))
    with mpmath.workdps(30):
        for i, e in enumerate(rel.tolist()):
            if bad[i] or e >= 10.0 ** TOP:
                out[i] = TOP
            elif e <= 0.0:
                out[i] = floor
            else:
                out[i] = max(float(mpmath.log10(mpmath.mpf(e))), floor)
    return out, bad


def fig_accuracy(k):
    from derive.measure.accuracy import BOUNDS

    fig, axes = _new_figure(9.0, 6.2, 2, 2, sharex=True)
    for col, dtype in enumerate((np.float32, np.float64)):
        dname = np.dtype(dtype).name
        x, computed, ref, cond = accuracy_data(k, dtype)
        floor = FLOOR[dname]
        for row, what in enumerate(("loss", "gradient")):
            ax = axes[row, col]
            for key, colour, label in (("literal", "tab:red", "literal closed form"),
                                       ("kernel", "tab:blue", "generated kernel (stable form)")):
                y, bad = _log_errors(computed[key][row], ref[row], dtype, None if cond is None else cond[row])
                ax.plot(_f64(x), y, color=colour, linewidth=0.9, label=label)
                if np.any(bad):
                    ax.plot(_f64(x)[bad], y[bad], linestyle="none", marker="x", markersize=3.5, color=colour,
                            label=f"{label.split(' (')[0]}: inf or NaN")
            bound = float(mpmath.log10(mpmath.mpf(BOUNDS[dname])))
            ax.axhline(bound, color="0.25", linestyle="--", linewidth=0.8,
                       label=f"bound of make accuracy ({BOUNDS[dname]:g})")
            ax.set_ylim(floor - 0.5, TOP + 0.5)
            ticks = list(range(floor, TOP + 1, 3 if dname == "float64" else 2))
            ax.set_yticks(ticks)
            ax.set_yticklabels([f"$10^{{{t}}}$" for t in ticks])
            ax.set_xlim(-ACCURACY_RANGE, ACCURACY_RANGE)
            ax.set_title(f"{what}, {dname}")
            if col == 0:
                ax.set_ylabel("relative error" if cond is None else "relative error / max(1, $\\kappa$)")
            if row == 1:
                ax.set_xlabel(_xlabel(k))
    axes[0, 0].legend(loc="upper left")
    extra = N.describe_params(k, N.defaults(k))
    fig.suptitle(f"{k.name}" + (f" ({extra})" if extra else "") + ": relative error against mpmath (40+ digits)",
                 fontsize=10)
    return _render(fig)


# ------------------------------------------------------------------------------------------


def figure_list(kernels=None, keys=None):
    """The figures of ``kernels`` (KernelDecls; default: every shipped kernel), two per kernel.
    ``keys``: (file name, kernel name) -> page key (derive.docs.model.kernel_keys)."""
    from pathlib import Path

    from derive.docs.model import kernel_keys

    kernels = N.shipped() if kernels is None else list(kernels)
    keys = kernel_keys(kernels) if keys is None else keys
    figs = []
    for k in kernels:
        page = keys[(Path(str(k.path)).name, k.name)]
        tail = page.split("/", 1)[1]
        what, _ = N.target_input(k)
        sets = "; ".join(N.describe_params(k, ps) for ps in N.parameter_sets(k))
        figs.append(Figure(
            f"values_{tail}", f"Loss and gradient of {k.name}",
            f"The {k.name} kernel's loss (left) and gradient with respect to the logit (right), float64, solid, "
            f"beside its literal closed form evaluated in the same precision, dashed, over logits in "
            f"[-{ACCURACY_RANGE:g}, {ACCURACY_RANGE:g}], {what}"
            + (f"; parameters {sets} (the declared defaults first)" if k.params else "")
            + ". Top: the values; bottom: log10 of their magnitude, where a closed form that rounds to 0 (markers at "
            f"the bottom) or to inf or NaN (markers at the top) leaves the kernel's curve. "
            f"The literal closed form: {N.describe_literal(k)}.", k, "values", page))
        figs.append(Figure(
            f"accuracy_{tail}", f"Accuracy of {k.name}",
            f"Relative error of the {k.name} kernel's loss and gradient (blue) and of its literal closed form "
            f"evaluated in the same precision (red), against the mpmath reference at 40+ digits, over logits in "
            f"[-{ACCURACY_RANGE:g}, {ACCURACY_RANGE:g}], {what}"
            + (f", {N.describe_params(k, N.defaults(k))}" if k.params else "")
            + ", float32 (left) and float64 (right); the dashed line is the bound that `make accuracy` and the "
            "tests enforce."
            + (f" The kernel is conditioned ({k.conditioned}): each error is divided by max(1, kappa), kappa the "
               "condition number of the exact function (sum over its continuous inputs v of |v df/dv / f|), "
               "as `make accuracy` measures it." if getattr(k, "conditioned", None) else "")
            + " Errors of 10 and more, inf and NaN are drawn at the top; exact values at the bottom. "
            f"The literal closed form: {N.describe_literal(k)}.", k, "accuracy", page))
    return figs


def render_figures(figs=None) -> dict:
    """{"img/<stem>.png": bytes, "img/<stem>.svg": bytes} for every figure."""
    import matplotlib

    figs = figure_list() if figs is None else figs
    out = {}
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        matplotlib.rcParams.update(RC)
        for f in figs:
            data = fig_values(f.kernel) if f.kind == "values" else fig_accuracy(f.kernel)
            for ext, blob in data.items():
                out[f"img/{f.stem}.{ext}"] = blob
    return out
