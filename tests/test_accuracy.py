"""Accuracy over the whole range, asserted: the bounds of `make accuracy` on a smaller grid."""
from __future__ import annotations

import numpy as np
import pytest

from derive.measure import accuracy as A
from derive.runtime import losses

BACKENDS = losses.available_backends()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", ["sigmoid_ce", "sigmoid_focal", "sigmoid_focal_alpha", "focal_star"])
def test_elementwise_accuracy_over_the_whole_range(kernel, backend):
    rows = A.measure(backends=(backend,), points=241, kernels=[kernel])
    assert rows
    bad = [r for r in rows if not r.ok]
    assert not bad, "\n" + A.format_table(bad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", ["softmax_ce", "softmax_focal"])
def test_softmax_accuracy_over_the_whole_range(kernel, backend):
    rows = A.measure(backends=(backend,), softmax_rows=6, kernels=[kernel])
    assert rows
    bad = [r for r in rows if not r.ok]
    assert not bad, "\n" + A.format_table(bad)


def test_grid_is_not_dyadic():
    """gamma*x must be rounded on the grid, or FL*'s compensation would go untested."""
    from fractions import Fraction

    for points in (241, 1201):
        x = A.grid(points)
        assert x[0] == -30 and x[-1] == 30 and np.all(np.diff(x) > 0) and np.all(np.abs(x) <= 30)
        rounded = [Fraction(5.0 * v) != 5 * Fraction(v) for v in x]
        assert sum(rounded) > points // 2
        for dtype in (np.float32,):
            xf = x.astype(dtype)
            assert sum(Fraction(float(dtype(5) * v)) != 5 * Fraction(float(v)) for v in xf) > points // 2


def test_accuracy_command_prints_the_table(capsys):
    assert A.main(["--points", "13", "--kernel", "sigmoid_focal", "--kernel", "softmax_ce"]) == 0
    out = capsys.readouterr().out
    assert "sigmoid_focal" in out and "softmax_ce" in out and "float32" in out and "float64" in out
    for gamma in A.GAMMAS:
        assert f" {gamma:>5g}  " in out
