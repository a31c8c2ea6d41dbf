"""A loss the package does not ship goes through the whole pipeline with no other change (issue 14).

tests/data/poly1_sigmoid.toml, copied into a temporary folder, is verified, generated, compiled,
measured by ``derive accuracy`` and called from Python, and its kernel's values are checked against
mpmath evaluations of the file's first lines.  Also: no Python module of the package lists the
shipped kernels by name (only the public API functions name the kernel they call).
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import mpmath
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
LOSS_FILE = ROOT / "tests" / "data" / "poly1_sigmoid.toml"
CLI = [sys.executable, "-m", "derive"]


@pytest.fixture(scope="module")
def loss_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("newloss")
    dst = d / "my_loss.toml"
    shutil.copyfile(LOSS_FILE, dst)
    return dst


def _run(args, cwd, env=None, timeout=600):
    return subprocess.run(CLI + args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_verify_codegen_compile_accuracy_call(loss_file, tmp_path, monkeypatch):
    monkeypatch.setenv("DERIVE_CACHE_DIR", str(tmp_path / "cache"))
    # verify: every check proved, exit 0
    res = _run(["verify", "--json", str(loss_file)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr + res.stdout
    import json

    checks = json.loads(res.stdout)["checks"]
    assert checks and all(c["verdict"] == "proved" for c in checks), [c["verdict"] for c in checks]

    # codegen: the module's three files, each with the do-not-edit header
    out = tmp_path / "gen"
    res = _run(["codegen", str(loss_file), "--out", str(out)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["poly1_sigmoid.c", "poly1_sigmoid.cu", "poly1_sigmoid.cuh", "poly1_sigmoid.h", "poly1_sigmoid.py"]
    for p in out.iterdir():
        assert "do not edit" in p.read_text().splitlines()[0] + p.read_text().splitlines()[1]

    # accuracy: the kernel within the bounds on both dtypes and backends (exit 0), and named in the table
    res = _run(["accuracy", "--quick", str(loss_file)], cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "poly1_sigmoid" in res.stdout

    # a call from Python: compiled C and NumPy, against mpmath of the file's first lines
    import derive

    k = derive.load(loss_file)
    x = np.array([-1e4, -30.0, -2.5, 0.0, 0.7, 17.0, 40.0, 1e4, np.finfo(np.float64).max])
    t = np.array([1, 0, 1, 0, 1, 1, 0, 0, 1])
    eps = 0.75
    with mpmath.workdps(60):
        ref_loss, ref_grad = [], []
        for xi, ti in zip(x.tolist(), t.tolist()):
            y = 2 * ti - 1
            xt = mpmath.mpf(y) * mpmath.mpf(xi)
            pt = 1 / (1 + mpmath.exp(-xt))
            ref_loss.append(-mpmath.log(pt) + eps * (1 - pt))
            # d/dx of -log p_t + eps (1 - p_t), with dp_t/dx = y p_t (1 - p_t)
            ref_grad.append(y * (pt - 1) - eps * y * pt * (1 - pt))
    for backend in ("c", "numpy"):
        for dtype, bound in ((np.float64, 4e-15), (np.float32, 2e-6)):
            xs = x.astype(dtype) if dtype is np.float64 else np.clip(x, -1e38, 1e38).astype(dtype)
            loss, grad = k.poly1_sigmoid(xs, t, epsilon=eps, backend=backend, return_grad=True)
            assert loss.dtype == dtype and np.isfinite(loss).all() and np.isfinite(grad).all()
            for i, xi in enumerate(xs.tolist()):
                with mpmath.workdps(60):
                    y = 2 * int(t[i]) - 1
                    pt = 1 / (1 + mpmath.exp(-mpmath.mpf(y) * mpmath.mpf(xi)))
                    rl = -mpmath.log(pt) + eps * (1 - pt)
                    rg = y * (pt - 1) - eps * y * pt * (1 - pt)
                    tiny = mpmath.mpf(float(np.finfo(dtype).tiny))
                    assert abs(mpmath.mpf(float(loss[i])) - rl) / max(abs(rl), tiny) <= bound, (backend, dtype, xi)
                    assert abs(mpmath.mpf(float(grad[i])) - rg) / max(abs(rg), tiny) <= bound, (backend, dtype, xi)
    # the same conventions as the shipped losses: reductions and argument errors
    s = k.poly1_sigmoid(x, t, epsilon=eps, reduction="sum", backend="numpy")
    assert float(s) == pytest.approx(float(np.sum(k.poly1_sigmoid(x, t, epsilon=eps, backend="numpy"))), rel=1e-12)
    with pytest.raises(ValueError, match="epsilon"):
        k.poly1_sigmoid(x, t, epsilon=-2.0)


def _shipped_kernel_names():
    from derive.codegen.kernels import shipped_kernels

    return {k.name for k in shipped_kernels()}


#: the modules of public functions with fixed names and signatures (derive.sigmoid_focal_loss, the
#: torchvision/F.cross_entropy/optax drop-ins): each names the kernel it calls, and nothing else may
PUBLIC_API = {"derive/runtime/losses.py", "derive/torch.py", "derive/jax.py"}


def test_no_python_module_lists_the_shipped_kernels():
    """Adding a loss touches only its derivation file: no module outside the public losses names the
    shipped kernels (a string literal equal to a kernel name), so none has a per-kernel branch."""
    names = _shipped_kernel_names()
    assert len(names) >= 6
    offenders = {}
    for path in sorted((ROOT / "derive").rglob("*.py")):
        if path.relative_to(ROOT).as_posix() in PUBLIC_API:
            continue  # the public functions (and the torch/JAX drop-ins) each name the kernel they call
        found = {node.value for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names}
        if found:
            offenders[path.relative_to(ROOT).as_posix()] = sorted(found)
    assert not offenders, offenders
