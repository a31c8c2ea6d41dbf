"""The figures of ``docs/``: computed from the generated kernels, drawn the same way everywhere.

Every curve is an output of ``generated/focal_kernels.py`` (see :mod:`derive.docs.numerics`
for why its transcendental functions are the correctly rounded ones here); the references are
:mod:`derive.measure.reference` (mpmath at 40+ digits, from the original definitions) and the "literal
closed form" is the note's expression lambdified from the parsed derivation files.  No formula
is typed in this module.

Byte-identical output: matplotlib's Agg renderer, default rcParams reset and then fixed
(DejaVu Sans, which matplotlib ships; fixed dpi; fixed SVG hash salt), no date or software
metadata, and logarithms of the error axes taken here (with mpmath) rather than by a log-scaled
axis, so that no CPU-dependent ``log10`` enters the drawing.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import mpmath
import numpy as np

from derive.docs import numerics as N

GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)
STAR_PAIRS = ((1.0, 0.0), (2.0, 1.0), (4.0, 0.0))  # (gamma, beta); FL* with (1, 0) is cross-entropy
FL_GAMMAS = (0.0, 1.0, 2.0)
DPI = 100

#: kernel -> (parameters of the accuracy figure, in the kernel's order; their legend text)
ACCURACY_CASES = {
    "sigmoid_ce": ((), ""),
    "sigmoid_focal": ((2.0,), "gamma = 2"),
    "sigmoid_focal_alpha": ((0.25, 2.0), "alpha = 0.25, gamma = 2"),
    "focal_star": ((2.0, 1.0), "gamma = 2, beta = 1"),
    "softmax_ce": ((), "K = 3"),
    "softmax_focal": ((0.25, 2.0), "K = 3, alpha = 0.25, gamma = 2"),
}
ACCURACY_RANGE = 40.0
ACCURACY_POINTS = 401
FLOOR = {"float32": -9, "float64": -18}  # log10 of the lowest error shown; 0 is drawn there
TOP = 1  # log10 of the highest: errors of 10 and more, and inf/NaN, are drawn at 10^1

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
    kernel: str | None = None  # accuracy figures: the kernel they measure


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


def _gamma_label(g):
    return f"$\\gamma = {g:g}$" + (" (cross-entropy)" if g == 0 else "")


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def _logit_grid(n=400):
    """p_t in (0, 1] and the logit x with sigmoid(x) = p_t (correctly rounded log and log1p)."""
    p = np.linspace(0.0, 1.0, n + 1)[1:]
    cr = N.CR_NUMPY
    with np.errstate(divide="ignore"):
        x = cr.log(p) - cr.log1p(-p)
    return p, x


def fig_focal_loss_vs_pt():
    p, x = _logit_grid()
    t = np.ones_like(x)
    fig, ax = _new_figure(6.4, 4.2)
    ax = ax[0, 0]
    for g in GAMMAS:
        loss, _ = N.kernel("sigmoid_focal", np.float64)(x, t, g)
        ax.plot(p, loss, label=_gamma_label(g))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 5)
    ax.set_xlabel("probability of the ground-truth class, $p_t$")
    ax.set_ylabel("loss $FL(p_t) = -(1 - p_t)^\\gamma \\log p_t$")
    ax.set_title("Focal loss: well-classified examples ($p_t > 0.5$) are down-weighted")
    ax.legend(loc="upper right")
    return _render(fig)


def fig_focal_gradient():
    x = np.linspace(-8.0, 8.0, 401)
    t = np.ones_like(x)
    fig, axes = _new_figure(9.0, 4.0, 1, 2, sharey=True)
    sig, soft = axes[0]
    rows = np.stack([x, np.zeros_like(x), np.zeros_like(x)], axis=1)
    target = np.zeros(len(x), dtype=np.int64)
    for g in GAMMAS:
        _, grad = N.kernel("sigmoid_focal", np.float64)(x, t, g)
        sig.plot(x, grad, label=_gamma_label(g))
        _, grad_rows = N.kernel("softmax_focal", np.float64)(rows, target, 1.0, g, -100)
        soft.plot(x, grad_rows[:, 0], label=_gamma_label(g))
    sig.set_title("sigmoid: $\\partial FL / \\partial x$, label $t = 1$ ($x_t = x$)")
    sig.set_xlabel("logit $x_t$")
    sig.set_ylabel("gradient")
    soft.set_title("softmax, $K = 3$, logits $(x_t, 0, 0)$: $\\partial FL / \\partial x_t$")
    soft.set_xlabel("target logit $x_t$")
    for ax in (sig, soft):
        ax.set_xlim(-8, 8)
        ax.axhline(0.0, color="0.3", linewidth=0.6)
    sig.legend(loc="center right")
    return _render(fig)


def fig_fl_vs_flstar():
    x = np.linspace(-6.0, 6.0, 401)
    t = np.ones_like(x)
    fig, axes = _new_figure(9.0, 6.4, 2, 2, sharex=True, sharey="row")
    for g in FL_GAMMAS:
        loss, grad = N.kernel("sigmoid_focal", np.float64)(x, t, g)
        axes[0, 0].plot(x, loss, label=_gamma_label(g))
        axes[1, 0].plot(x, grad, label=_gamma_label(g))
    for g, b in STAR_PAIRS:
        loss, grad = N.kernel("focal_star", np.float64)(x, t, g, b)
        lab = f"$\\gamma = {g:g}, \\beta = {b:g}$" + (" (cross-entropy)" if (g, b) == (1.0, 0.0) else "")
        axes[0, 1].plot(x, loss, label=lab)
        axes[1, 1].plot(x, grad, label=lab)
    axes[0, 0].set_title("FL $= -(1 - p_t)^\\gamma \\log p_t$")
    axes[0, 1].set_title("FL* $= -\\log \\sigma(\\gamma x_t + \\beta) / \\gamma$")
    axes[0, 0].set_ylabel("loss")
    axes[1, 0].set_ylabel("gradient $\\partial / \\partial x_t$")
    for ax in axes[1]:
        ax.set_xlabel("logit $x_t$ (label $t = 1$)")
    for ax in axes.ravel():
        ax.set_xlim(-6, 6)
    axes[0, 0].set_ylim(0, 6)
    for ax in axes[1]:
        ax.axhline(0.0, color="0.3", linewidth=0.6)
    axes[0, 0].legend(loc="upper right")
    axes[0, 1].legend(loc="upper right")
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


def accuracy_data(name, dtype):
    """(x, {"kernel"|"literal": (loss, grad)}, (reference loss, reference grad)) for label t = 1;
    softmax rows are (x, 0, 0) with target 0 and the gradient is the target's."""
    from derive.measure import reference as R
    from derive.codegen.kernels import shipped_kernels

    spec = next(k for k in shipped_kernels() if k.name == name)
    x = accuracy_grid(dtype)
    params = _typed(ACCURACY_CASES[name][0], dtype)
    with np.errstate(all="ignore"):
        if spec.kind == "elementwise":
            t = np.ones_like(x)
            kern = N.kernel(name, dtype)(x, t, *params)
            fl, fg = N.literal_elementwise(name)
            lit = (fl(x, t, *params), fg(x, t, *params))
            ref = R.elementwise(name, x, t, params)
        else:
            zeros = np.zeros_like(x)
            rows = np.stack([x, zeros, zeros], axis=1)
            target = np.zeros(len(x), dtype=np.int64)
            alpha, gamma = params if params else (None, 0.0)
            if params:
                loss, grad = N.kernel(name, dtype)(rows, target, alpha, gamma, -100)
            else:
                loss, grad = N.kernel(name, dtype)(rows, target, -100)
            kern = (loss, grad[:, 0])
            fl, fg = N.literal_softmax(name)
            a, g = (alpha, gamma) if params else (1.0, 0.0)
            lit = (fl(x, zeros, zeros, a, g), fg(x, zeros, zeros, a, g))
            rl, rg = R.rowwise(name, rows, target, alpha, gamma)
            ref = (rl, [row[0] for row in rg])
    lit = tuple(np.broadcast_to(np.asarray(v, dtype=dtype), x.shape) for v in lit)
    return x, {"kernel": kern, "literal": lit}, ref


def _log_errors(computed, reference, dtype):
    """log10 of the relative error, clipped to [FLOOR, TOP]; and the mask of non-finite values."""
    from derive.measure import reference as R

    comp = np.asarray(computed)
    bad = ~np.isfinite(comp.astype(np.float64))
    rel = R.rel_errors(comp, reference, dtype)
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


def fig_accuracy(name):
    from derive.measure.accuracy import BOUNDS
    from derive.codegen.kernels import shipped_kernels

    spec = next(k for k in shipped_kernels() if k.name == name)
    fig, axes = _new_figure(9.0, 6.2, 2, 2, sharex=True)
    for col, dtype in enumerate((np.float32, np.float64)):
        dname = np.dtype(dtype).name
        x, computed, ref = accuracy_data(name, dtype)
        floor = FLOOR[dname]
        for row, what in enumerate(("loss", "gradient")):
            ax = axes[row, col]
            for key, colour, label in (("literal", "tab:red", "literal closed form (the note's)"),
                                       ("kernel", "tab:blue", "generated kernel (stable form)")):
                y, bad = _log_errors(computed[key][row], ref[row], dtype)
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
            ax.set_yticklabels([f"$10^{{{k}}}$" for k in ticks])
            ax.set_xlim(-ACCURACY_RANGE, ACCURACY_RANGE)
            ax.set_title(f"{what}, {dname}")
            if col == 0:
                ax.set_ylabel("relative error")
            if row == 1:
                ax.set_xlabel("logit $x_t$ (label $t = 1$)" if spec.kind == "elementwise"
                              else "target logit $x_t$ (row $(x_t, 0, 0)$)")
    axes[0, 0].legend(loc="upper left")
    extra = ACCURACY_CASES[name][1]
    fig.suptitle(f"{name}" + (f" ({extra})" if extra else "") + ": relative error against mpmath (40+ digits)",
                 fontsize=10)
    return _render(fig)


# ------------------------------------------------------------------------------------------


def figure_list():
    from derive.codegen.kernels import shipped_kernels

    figs = [
        Figure("focal_loss_vs_pt", "Focal loss against p_t",
               "FL(p_t) = -(1 - p_t)^gamma log p_t for gamma in {0, 0.5, 1, 2, 5} (gamma = 0 is cross-entropy): "
               "the curve family that motivates focal loss. Each curve is the loss output of the generated kernel "
               "sigmoid_focal_f64 at the logit x with sigmoid(x) = p_t, label t = 1."),
        Figure("focal_gradient", "dFL/dx against x_t, sigmoid and softmax",
               "The gradient of the focal loss with respect to the target logit, for the same gammas: left the "
               "sigmoid kernel (sigmoid_focal_f64, label 1), right the softmax kernel (softmax_focal_f64, alpha = 1) "
               "on rows (x_t, 0, 0) with target 0. Larger gamma flattens the gradient of well-classified examples "
               "(large x_t)."),
        Figure("fl_vs_flstar", "FL and FL* side by side, with their gradients",
               "Left: FL for gamma in {0, 1, 2} (sigmoid_focal_f64). Right: FL* = -log sigmoid(gamma x_t + beta)/gamma "
               "for (gamma, beta) in {(1, 0), (2, 1), (4, 0)} (focal_star_f64; (1, 0) is cross-entropy). "
               "Top: the losses; bottom: their gradients with respect to x_t."),
    ]
    for spec in shipped_kernels():
        figs.append(Figure(
            f"accuracy_{spec.name}", f"Accuracy of {spec.name}",
            f"Relative error of the {spec.name} kernel's loss and gradient (blue) and of the note's literal closed "
            f"form evaluated in the same precision (red), against the mpmath reference at 40+ digits, over logits "
            f"in [-40, 40], float32 (left) and float64 (right); the dashed line is the bound that `make accuracy` "
            f"and the tests enforce. Errors of 10 and more, inf and NaN are drawn at the top; exact values at the "
            f"bottom. " + ("Label t = 1 (for t = 0, x_t = -x mirrors the picture)" if spec.kind == "elementwise"
                           else "Rows (x_t, 0, 0) with target 0")
            + f". The literal closed form: {N.describe_literal(spec.name)}.", kernel=spec.name))
    return figs


def render_figures(figs=None) -> dict:
    """{"img/<stem>.png": bytes, "img/<stem>.svg": bytes} for every figure."""
    import matplotlib

    figs = figure_list() if figs is None else figs
    makers = {"focal_loss_vs_pt": fig_focal_loss_vs_pt, "focal_gradient": fig_focal_gradient,
              "fl_vs_flstar": fig_fl_vs_flstar}
    out = {}
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        matplotlib.rcParams.update(RC)
        for f in figs:
            data = fig_accuracy(f.kernel) if f.kernel else makers[f.stem]()
            for ext, blob in data.items():
                out[f"img/{f.stem}.{ext}"] = blob
    return out
