"""Hardening across processes: concurrent first builds, and deterministic verdicts."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LOAD_AND_RUN = (
    "import numpy as np, sys\n"
    "from derive.runtime import cbuild, losses\n"
    "lib = cbuild.load()\n"
    "x = np.linspace(-30, 30, 101).astype(np.float32); t = (np.arange(101) % 2).astype(np.float32)\n"
    "l, g = losses.sigmoid_focal_loss(x, t, backend='c', return_grad=True)\n"
    "assert np.all(np.isfinite(l)) and np.all(np.isfinite(g))\n"
    "print('ok', cbuild.library_path())\n"
)


def test_two_processes_build_the_library_at_once(tmp_path):
    """Both first loads succeed with an empty cache: the entry is written atomically."""
    env = dict(os.environ, DERIVE_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    for _ in range(2):  # twice: once on an empty cache, once racing on a fresh one
        procs = [subprocess.Popen([sys.executable, "-c", LOAD_AND_RUN], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
        outs = [p.communicate(timeout=600) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, err
            assert out.startswith("ok")
        assert len({o.split()[1] for o, _ in outs}) == 1
        env["DERIVE_CACHE_DIR"] = str(tmp_path / "cache2")
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and ".tmp" in p.name]
    assert leftovers == []


def test_verdicts_do_not_depend_on_hash_seed(tmp_path):
    """Same verdicts, methods and counterexamples under different PYTHONHASHSEED values."""
    note = ROOT / "derive" / "derivations" / "focal_loss_note.toml"
    results = []
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))
        proc = subprocess.run([sys.executable, "-m", "derive", "verify", "--json", str(note)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        results.append([(c["derivation"], c["chain"], c["kind"], c["step"], c["verdict"], c["method"],
                         json.dumps(c["counterexample"], sort_keys=True)) for c in data["checks"]])
    assert results[0] == results[1]
    assert "seed" in json.loads(proc.stdout)


# ------------------------------------------------------------------------------------------
# kernels: read-only and empty inputs, on both backends

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from derive.runtime import losses as L  # noqa: E402


def _backends():
    out = ["numpy"]
    if "c" in L.available_backends():
        out.append("c")
    return out


@pytest.mark.parametrize("backend", _backends())
def test_read_only_inputs_are_read_not_written(backend):
    x = np.linspace(-30, 30, 61).astype(np.float32)
    t = (np.arange(61) % 2).astype(np.float32)
    expected = L.sigmoid_focal_loss(x.copy(), t.copy(), backend=backend, return_grad=True)
    x.setflags(write=False)
    t.setflags(write=False)
    got = L.sigmoid_focal_loss(x, t, backend=backend, return_grad=True)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    xs = np.random.default_rng(0).normal(size=(5, 7))
    xs.setflags(write=False)
    loss, grad = L.softmax_focal_loss(xs, np.arange(5) % 7, backend=backend, return_grad=True)
    assert grad.flags.writeable and np.all(np.isfinite(grad))


@pytest.mark.parametrize("backend", _backends())
def test_empty_inputs(backend):
    loss, grad = L.sigmoid_focal_loss(np.zeros(0, np.float32), np.zeros(0), backend=backend, return_grad=True)
    assert loss.shape == (0,) and grad.shape == (0,) and loss.dtype == np.float32
    for red in ("sum", "mean"):
        assert L.sigmoid_focal_loss(np.zeros(0), np.zeros(0), backend=backend, reduction=red) == 0
    loss, grad = L.softmax_focal_loss(np.zeros((0, 5)), np.zeros(0, int), backend=backend, return_grad=True)
    assert loss.shape == (0,) and grad.shape == (0, 5)
    with pytest.raises(ValueError, match="inputs"):
        L.softmax_focal_loss(np.zeros((3, 0)), np.zeros(3, int), backend=backend)


_ELEMENTWISE = [
    ("sigmoid_cross_entropy", {}),
    ("binary_focal_loss", {"gamma": 0.5}),
    ("sigmoid_focal_loss", {"alpha": 0.25, "gamma": 2.0}),
    ("focal_loss_star", {"gamma": 2.0, "beta": 1.0}),
]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_arrays_are_filled_in_place_with_the_same_values(backend, dtype):
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(40, 3)) * 20).astype(dtype)
    t = (rng.random((40, 3)) < 0.3).astype(dtype)
    for name, kw in _ELEMENTWISE:
        fn = getattr(L, name)
        fresh = fn(x, t, **kw, backend=backend, return_grad=True)
        out = (np.full_like(x, np.nan), np.full_like(x, np.nan))
        got = fn(x, t, **kw, backend=backend, return_grad=True, out=out)
        assert got[0] is out[0] and got[1] is out[1], name
        np.testing.assert_array_equal(out[0], fresh[0])
        np.testing.assert_array_equal(out[1], fresh[1])
        # a reduction: the scalar returned, the per-element losses in out[0], the gradient scaled in place
        total, grad = fn(x, t, **kw, backend=backend, reduction="mean", return_grad=True, out=out)
        assert grad is out[1]
        np.testing.assert_array_equal(grad, fresh[1] / dtype(x.size))
        assert total == fn(x, t, **kw, backend=backend, reduction="mean")
        # the loss alone: no gradient array needed
        loss = fn(x, t, **kw, backend=backend, out=(np.empty_like(x), None))
        np.testing.assert_array_equal(loss, fresh[0])
    xs = (rng.normal(size=(30, 6)) * 10).astype(dtype)
    tg = rng.integers(0, 6, 30)
    tg[3] = -100
    for alpha in (None, 0.25, np.linspace(0.1, 1, 6)):
        fresh = L.softmax_focal_loss(xs, tg, alpha=alpha, gamma=0.5, backend=backend, return_grad=True)
        out = (np.full(30, np.nan, dtype), np.full_like(xs, np.nan))
        got = L.softmax_focal_loss(xs, tg, alpha=alpha, gamma=0.5, backend=backend, return_grad=True, out=out)
        assert got[0] is out[0] and got[1] is out[1]
        np.testing.assert_array_equal(out[0], fresh[0])
        np.testing.assert_array_equal(out[1], fresh[1])
    out = (np.empty(30, dtype), np.empty_like(xs))
    total = L.softmax_cross_entropy(xs, tg, backend=backend, reduction="sum", out=out)
    assert total == L.softmax_cross_entropy(xs, tg, backend=backend, reduction="sum")
    np.testing.assert_array_equal(out[0], L.softmax_cross_entropy(xs, tg, backend=backend))


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_bad_labels_are_named(backend, dtype):
    """A target outside [0, 1] (NaN too) raises ValueError naming it, from every elementwise
    function, with or without out=, wherever it sits (the C kernels check labels in their
    main pass, block by block and thread by thread); a soft target (strictly between 0 and 1)
    raises it only from FL*, which has no soft definition."""
    n = 70001  # above DERIVE_PARALLEL_MIN, not a multiple of the block
    x = np.linspace(-20, 20, n).astype(np.float64 if dtype == np.int64 else dtype)
    good = (np.arange(n) % 3 == 0).astype(dtype)
    bads = [2, -1] if dtype == np.int64 else [2, -1, 0.5, np.nan, 1e-30, 1.5, -1e-30]
    positions = (0, n // 2, n - 1, 1025, n - 2, 4095, 4096)  # 4096: past the C path's look at the first labels
    for name, kw in _ELEMENTWISE:
        fn = getattr(L, name)
        soft = name != "focal_loss_star"
        fn(x, good, backend=backend, **kw)  # the good labels pass
        for pos, bad in zip(positions, bads):
            t = good.copy()
            t[pos] = bad
            if soft and 0 < bad < 1:
                fn(x, t, backend=backend, **kw)  # a soft target, taken by the soft kernel
                continue
            want = ("soft targets are not defined for FL" if 0 < bad < 1 else
                    "targets must hold values in \\[0, 1\\] \\(labels 0 or 1, or soft targets\\), found" if soft else
                    "targets must hold labels 0 or 1, found")
            with pytest.raises(ValueError, match=want) as err:
                fn(x, t, backend=backend, **kw)
            assert str(err.value).endswith(repr(t[pos].item())), (err.value, pos)  # the bad one, named, as a plain number
            with pytest.raises(ValueError, match=want):
                fn(x, t, backend=backend, out=(np.empty_like(x), np.empty_like(x)), **kw)


@pytest.mark.parametrize("backend", _backends())
def test_bad_out_arrays_are_refused_naming_the_argument(backend):
    x = np.linspace(-5, 5, 12).astype(np.float32)
    t = (np.arange(12) % 2).astype(np.float32)
    ok = np.empty_like(x)
    cases = [
        ("out", TypeError, "pair", ok),
        ("out", TypeError, "pair", (ok,)),
        ("out[0]", TypeError, "None", (None, ok)),
        ("out[0]", TypeError, "NumPy array", ([0.0] * 12, None)),
        ("out[0]", TypeError, "dtype", (np.empty(12, np.float64), None)),
        ("out[0]", ValueError, "shape", (np.empty(11, np.float32), None)),
        ("out[1]", ValueError, "shape", (ok, np.empty((3, 4), np.float32))),
        ("out[0]", ValueError, "C-contiguous", (np.empty(24, np.float32)[::2], None)),
        ("out[0]", ValueError, "inputs", (x, None)),
        ("out[1]", ValueError, "targets", (ok, t)),
        ("out[1]", ValueError, "out\\[0\\]", (ok, ok)),
    ]
    ro = np.empty_like(x)
    ro.setflags(write=False)
    cases.append(("out[0]", ValueError, "read-only", (ro, None)))
    before = x.copy()
    for arg, exc, what, out in cases:
        with pytest.raises(exc, match=what) as info:
            L.binary_focal_loss(x, t, backend=backend, return_grad=True, out=out)
        assert str(info.value).startswith(arg), (arg, str(info.value))
    np.testing.assert_array_equal(x, before)  # nothing was written into the inputs
    xs = np.zeros((4, 3))
    with pytest.raises(ValueError, match="out\\[0\\] must have shape \\(4,\\)"):
        L.softmax_focal_loss(xs, np.zeros(4, int), backend=backend, out=(np.empty((4, 3)), None))
    alpha = np.ones(3)
    with pytest.raises(ValueError, match="out\\[0\\] shares memory with alpha"):
        L.softmax_focal_loss(xs[:1], np.zeros(1, int), alpha=alpha, backend=backend, out=(alpha[:1], None))


# ------------------------------------------------------------------------------------------
# derivation files: SymPy's eval path is never used


def test_verifying_never_uses_sympys_string_parsing(monkeypatch, note_path):
    """With parse_expr and sympify-of-strings made to explode, the note still verifies."""
    import sympy
    from sympy.parsing import sympy_parser

    from derive.prover.verify import verify_paths

    def boom(*args, **kwargs):
        raise AssertionError(f"string parsing/eval called with {args[:1]!r}")

    monkeypatch.setattr(sympy_parser, "parse_expr", boom)
    monkeypatch.setattr(sympy_parser, "eval_expr", boom)
    with pytest.raises(AssertionError):  # the guard is live: sympify of a string goes through it
        sympy.sympify("x + 1")
    report = verify_paths([note_path])
    assert report.exit_code() == 0


@pytest.mark.parametrize("line", [
    "__import__('os').system('touch PWNED')",
    "x.__class__.__mro__",
    "(lambda: x)()",
    "[x for x in (1,)]",
    "'\\\\x5f_import__'",
    "exp(x).func",
    "Symbol('x')",
])
def test_hostile_lines_in_a_file_are_rejected(tmp_path, capsys, line):
    from derive.cli import main

    p = tmp_path / "hostile.toml"
    body = line.replace("PWNED", str(tmp_path / "pwned")).replace("\\", "\\\\").replace('"', '\\"')
    p.write_text(f'[symbols]\nx = "real"\n[[derivation]]\nid = "h"\n[[derivation.chain]]\nid = "c"\n'
                 f'lines = ["x", "{body}"]\n')
    assert main(["verify", str(p)]) == 2
    err = capsys.readouterr().err
    assert "hostile.toml" in err and "[derivation 'h', chain 'c', line 1]" in err
    assert not (tmp_path / "pwned").exists()
