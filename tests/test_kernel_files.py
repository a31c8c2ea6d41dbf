"""A loss the package does not ship, declared in one file: verify -> codegen -> compile -> call.

The file (SCALED below) is s times the sigmoid cross-entropy and s times the softmax
cross-entropy, with a scale s > 0: its chains are proved by ``derive verify``, its
``[[kernel]]`` tables declare the kernels, ``derive codegen FILE --out DIR`` writes them, and
``derive.load`` calls them through both backends.  References are the closed forms in
float64 NumPy (s*log(1 + e^-x_t) with log1p, s*(logsumexp - x_t)) and mpmath for a few
saturated points.
"""
from __future__ import annotations

import inspect
import subprocess
import sys

import numpy as np
import pytest

from derive.runtime import cbuild
from derive.runtime import kernel_files
from derive.codegen import main as codegen_main
from derive.language.loader import DerivationFileError, load_file, loads

SCALED = """[file]
title = "Scaled cross-entropies"
module = "scaled_losses"

[symbols]
x = { domain = "real" }
t = { domain = "{0, 1}" }
s = { domain = "(0, oo)" }

[definitions]
y = { expr = "2*t - 1" }
x_t = { expr = "y*x" }
p_t = { expr = "1/(1 + exp(-x_t))", domain = "(0, 1)" }

[[derivation]]
id = "scaled_sigmoid_ce"
title = "s times the sigmoid cross-entropy"

[[derivation.chain]]
id = "loss"
export = "scaled_ce_loss"
lines = [
  "-s*log(p_t)",
  { expr = "s*log(1 + exp(-x_t))", rule = "-log(1/(1 + e^(-x_t)))" },
  { expr = "s*softplus(-x_t)", rule = "softplus" },
]

[[derivation.chain]]
id = "grad"
export = "scaled_ce_grad"
lines = [
  "D(-s*log(p_t), x)",
  { expr = "-s*y*(1 - p_t)", rule = "chain rule" },
  { expr = "-s*y*sigmoid(-x_t)", rule = "1 - p_t = sigmoid(-x_t)" },
]

[[derivation]]
id = "scaled_softmax_ce"
title = "s times the softmax cross-entropy, in u = log p_t"

[derivation.symbols]
u = { domain = "(-oo, 0)" }

[derivation.definitions]
p = { expr = "exp(u)" }

[[derivation.chain]]
id = "loss"
export = "scaled_softmax_loss"
lines = ["-s*log(p)", { expr = "-s*u", rule = "log p_t = u" }]

[[derivation.chain]]
id = "coef"
export = "scaled_softmax_coef"
lines = ["(-s/p)*p*(1 - p)/(p - 1)", { expr = "s", rule = "cancel" }]

[[derivation.chain]]
id = "target_factor"
export = "scaled_pt_minus_one"
lines = ["p - 1", { expr = "expm1(u)", rule = "p_t = e^u" }]

[[kernel]]
name = "scaled_ce"
title = "s times the sigmoid cross-entropy"
layout = "elementwise"
target = "binary"
loss = "scaled_ce_loss"
grad = "scaled_ce_grad"
params = ["s"]
defaults = { s = 2.0 }

[[kernel]]
name = "scaled_softmax_ce"
title = "s times the softmax cross-entropy"
layout = "softmax"
target = "class_index"
loss = "scaled_softmax_loss"
coef = "scaled_softmax_coef"
target_factor = "scaled_pt_minus_one"
params = ["s"]
defaults = { s = 2.0 }
"""


@pytest.fixture
def loss_file(tmp_path):
    path = tmp_path / "scaled.toml"
    path.write_text(SCALED)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("DERIVE_CACHE_DIR", str(folder))
    return folder


def _has_compiler():
    try:
        cbuild.find_compiler()
        return True
    except cbuild.BuildError:
        return False


def _ref_sigmoid(x, t, s):
    xt = np.where(t == 1, x, -x)
    loss = s * (np.maximum(-xt, 0) + np.log1p(np.exp(-np.abs(xt))))  # s*log(1 + e^-x_t)
    e = np.exp(-np.abs(xt))
    one_minus_pt = np.where(xt >= 0, e / (1 + e), 1 / (1 + e))  # 1 - p_t without cancellation
    return loss, -s * np.where(t == 1, 1.0, -1.0) * one_minus_pt


def _ref_softmax(x, tgt, s, ignore=-100):
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    valid = tgt != ignore
    tt = np.where(valid, tgt, 0)
    loss = np.where(valid, s * (lse - x[np.arange(len(x)), tt]), 0)
    p = np.exp(x - lse[:, None])
    grad = s * (p - np.eye(x.shape[1])[tt])
    grad[~valid] = 0
    return loss, grad


def test_a_new_loss_file_goes_through_verify_codegen_compile_and_both_backends(loss_file, tmp_path, cache):
    # verify (the CLI, as a user runs it)
    res = subprocess.run([sys.executable, "-m", "derive", "verify", str(loss_file)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "10 proved" in res.stdout
    # codegen into a folder of the user's, the outputs named by [file] module
    out = tmp_path / "gen"
    assert codegen_main([str(loss_file), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["scaled_losses.c", "scaled_losses.cu", "scaled_losses.cuh", "scaled_losses.h", "scaled_losses.py"]
    for p in out.iterdir():
        assert "do not edit" in p.read_text().splitlines()[0]
    c_text = (out / "scaled_losses.c").read_text()
    assert '#include "scaled_losses.h"' in c_text and "derive_scaled_ce_f64" in c_text
    assert "derive_scaled_softmax_ce_f32" in (out / "scaled_losses.h").read_text()
    # the generated C compiles on its own
    if _has_compiler():
        cmd = cbuild.find_compiler()
        res = subprocess.run([*cmd, *cbuild.build_flags(cmd), "-I", str(out), str(out / "scaled_losses.c"),
                              "-o", str(tmp_path / "libscaled.so"), "-lm"], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr

    import derive

    assert derive.load is kernel_files.load
    kernels = derive.load(loss_file)
    assert kernels.kernel_names == ["scaled_ce", "scaled_softmax_ce"]
    assert kernels.generated.parent.parent == cache and kernels.generated.parent.name == "kernel-sources"
    backends = ["numpy", "c"] if _has_compiler() else ["numpy"]
    rng = np.random.default_rng(14)
    x = np.concatenate([rng.normal(0, 8, 200), [-700.0, -40.0, 0.0, 40.0, 700.0]])
    t = (rng.random(x.size) < 0.5).astype(np.float64)
    x2 = rng.normal(0, 5, (64, 7))
    tgt = rng.integers(0, 7, 64)
    tgt[::9] = -100
    for backend in backends:
        for s in (2.0, 0.3):
            loss, grad = kernels.scaled_ce(x, t, s, backend=backend, return_grad=True)
            want_l, want_g = _ref_sigmoid(x, t, s)
            np.testing.assert_allclose(loss, want_l, rtol=1e-13, atol=0)
            np.testing.assert_allclose(grad, want_g, rtol=1e-12, atol=1e-300)
            l32, g32 = kernels.scaled_ce(x.astype(np.float32), t, s, backend=backend, return_grad=True)
            assert l32.dtype == g32.dtype == np.float32
            x32 = x.astype(np.float32).astype(np.float64)
            w_l, w_g = _ref_sigmoid(x32, t, np.float64(np.float32(s)))
            np.testing.assert_allclose(l32, w_l, rtol=2e-6, atol=1e-38)
            np.testing.assert_allclose(g32, w_g, rtol=2e-6, atol=1e-38)
            loss, grad = kernels.scaled_softmax_ce(x2, tgt, s=s, backend=backend, return_grad=True)
            want_l, want_g = _ref_softmax(x2, tgt, s)
            np.testing.assert_allclose(loss, want_l, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(grad, want_g, rtol=1e-11, atol=1e-14)
        # the default s = 2 from the declaration, and the reductions of the shipped functions
        assert kernels.scaled_ce(x, t, backend=backend, reduction="sum") == pytest.approx(
            _ref_sigmoid(x, t, 2.0)[0].sum(), rel=1e-13)
        m = kernels.scaled_softmax_ce(x2, tgt, backend=backend, reduction="mean")
        assert m == pytest.approx(_ref_softmax(x2, tgt, 2.0)[0].sum() / np.count_nonzero(tgt != -100), rel=1e-12)
        # out= is filled in place
        lo, go = np.empty_like(x), np.empty_like(x)
        got = kernels.scaled_ce(x, t, 2.0, backend=backend, out=(lo, go), return_grad=True)
        assert got[0] is lo and got[1] is go
        np.testing.assert_allclose(go, _ref_sigmoid(x, t, 2.0)[1], rtol=1e-12, atol=1e-300)


def test_saturated_points_match_mpmath(loss_file, cache):
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    kernels = kernel_files.load(loss_file)
    x = np.array([-700.0, -60.0, -20.0, 0.0, 20.0, 60.0, 700.0])  # e^-700: still a normal float
    t = np.ones_like(x)
    for backend in (["numpy", "c"] if _has_compiler() else ["numpy"]):
        loss, grad = kernels.scaled_ce(x, t, 1.5, backend=backend, return_grad=True)
        for xi, li, gi in zip(x, loss, grad):
            xm = mpmath.mpf(float(xi))
            want_l = 1.5 * mpmath.log1p(mpmath.exp(-xm))
            want_g = -1.5 / (1 + mpmath.exp(xm))
            assert abs(li - want_l) <= 2e-15 * abs(want_l)
            assert abs(gi - want_g) <= 2e-15 * abs(want_g)


def test_loaded_functions_have_the_shipped_conventions(loss_file, cache):
    kernels = kernel_files.load(loss_file)
    sig = inspect.signature(kernels.scaled_ce)
    assert list(sig.parameters) == ["inputs", "targets", "s", "reduction", "backend", "return_grad", "threads", "out"]
    assert sig.parameters["s"].default == 2.0
    assert list(inspect.signature(kernels.scaled_softmax_ce).parameters)[:5] == [
        "inputs", "targets", "s", "ignore_index", "reduction"]
    assert "scaled.toml" in kernels.scaled_ce.__doc__ and "(0, oo)" in kernels.scaled_ce.__doc__
    x, t = np.array([0.5, -1.0]), np.array([1.0, 0.0])
    with pytest.raises(ValueError, match=r"s must be > 0, got 0"):
        kernels.scaled_ce(x, t, 0.0, backend="numpy")
    with pytest.raises(TypeError, match="s must be a real number"):
        kernels.scaled_ce(x, t, "2", backend="numpy")
    with pytest.raises(ValueError, match="targets must hold labels 0 or 1, found"):
        kernels.scaled_ce(x, np.array([1.0, 0.5]), backend="numpy")
    with pytest.raises(ValueError, match="reduction must be one of"):
        kernels.scaled_ce(x, t, reduction="avg", backend="numpy")
    with pytest.raises(ValueError, match="threads must be"):
        kernels.scaled_ce(x, t, threads=0, backend="numpy")
    with pytest.raises(TypeError, match="inputs must be a float32 or float64 array"):
        kernels.scaled_ce(x.astype(np.int32), t, backend="numpy")
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        kernels.scaled_softmax_ce(np.zeros((2, 3)), np.array([0, 3]), backend="numpy")
    with pytest.raises(TypeError):
        kernels.scaled_ce(x, t, 1.0, nonsense=1)


def test_load_refuses_a_file_whose_kernel_lines_are_not_proved(tmp_path, cache):
    bad = SCALED.replace('{ expr = "-s*y*sigmoid(-x_t)", rule = "1 - p_t = sigmoid(-x_t)" }',
                         '{ expr = "-s*y*sigmoid(x_t)", rule = "wrong sign" }')
    assert bad != SCALED
    path = tmp_path / "wrong.toml"
    path.write_text(bad)
    with pytest.raises(kernel_files.NotProvedError) as info:
        kernel_files.load(path)
    msg = str(info.value)
    assert "wrong.toml" in msg and "refusing to load" in msg
    assert "chain 'grad'" in msg and "kernel scaled_ce" in msg
    assert not (cache / "kernel-sources").exists()


def _swap(old, new):
    assert old in SCALED
    return SCALED.replace(old, new, 1)


BAD = [
    ("unknown key", _swap('defaults = { s = 2.0 }', 'defaults = { s = 2.0 }\nspeed = "fast"'), "scaled_ce",
     "unknown key 'speed'"),
    ("unknown export", _swap('grad = "scaled_ce_grad"', 'grad = "scaled_ce_gradient"'), "scaled_ce",
     "exports no 'scaled_ce_gradient'"),
    ("not a symbol", _swap('params = ["s"]\ndefaults = { s = 2.0 }\n\n[[kernel]]',
                           'params = ["x_t"]\n\n[[kernel]]'), "scaled_ce", "'x_t' is not a symbol"),
    ("undeclared symbol", _swap('params = ["s"]\ndefaults = { s = 2.0 }\n\n[[kernel]]',
                                'params = ["q"]\n\n[[kernel]]'), "scaled_ce", "'q' is not a symbol"),
    ("layout/target mismatch", _swap('layout = "softmax"\ntarget = "class_index"',
                                     'layout = "softmax"\ntarget = "binary"'),
     "scaled_softmax_ce", "layout 'softmax' takes target 'class_index' or 'class_probs', not 'binary'"),
    ("unsupported target", _swap('target = "binary"', 'target = "probabilities"'), "scaled_ce",
     "target 'probabilities' is not supported"),
    ("unknown layout", _swap('layout = "elementwise"', 'layout = "rows"'), "scaled_ce", "layout must be one of"),
    ("key of the other layout", _swap('grad = "scaled_ce_grad"', 'grad = "scaled_ce_grad"\ncoef = "x"'),
     "scaled_ce", "unknown key 'coef' for layout 'elementwise' (a key of layout 'softmax')"),
    ("missing export", _swap('grad = "scaled_ce_grad"\n', ''), "scaled_ce", "needs grad ="),
    ("exports of two derivations", _swap('grad = "scaled_ce_grad"', 'grad = "scaled_softmax_coef"'), "scaled_ce",
     "come from different derivations"),
    ("default out of domain", _swap('defaults = { s = 2.0 }', 'defaults = { s = -1.0 }'), "scaled_ce",
     "outside its domain"),
    ("default of no param", _swap('defaults = { s = 2.0 }', 'defaults = { r = 1.0 }'), "scaled_ce",
     "'r' is not one of the params"),
    ("duplicate name", _swap('name = "scaled_softmax_ce"', 'name = "scaled_ce"'), "scaled_ce",
     "duplicate kernel name"),
    ("weight without alpha", _swap('defaults = { s = 2.0 }', 'defaults = { s = 2.0 }\nweight = "p_t"'),
     "scaled_ce", "weight needs a parameter alpha"),
]


@pytest.mark.parametrize("what, text, kernel, message", BAD, ids=[b[0] for b in BAD])
def test_bad_declarations_name_the_file_and_kernel(tmp_path, capsys, what, text, kernel, message):
    path = tmp_path / "bad_loss.toml"
    path.write_text(text)
    with pytest.raises(DerivationFileError) as info:
        load_file(path)
    msg = str(info.value)
    assert str(path) in msg and f"kernel {kernel!r}" in msg and message in msg, msg
    assert info.value.kernel == kernel
    assert codegen_main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("derive codegen: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_template_symbol_the_params_do_not_supply_is_an_error_naming_the_kernel(tmp_path, capsys):
    # the loss uses s, but the declaration forgets it: codegen names the export and the kernel
    text = _swap('params = ["s"]\ndefaults = { s = 2.0 }\n\n[[kernel]]', '\n[[kernel]]')
    path = tmp_path / "forgot.toml"
    path.write_text(text)
    assert codegen_main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "forgot.toml" in err and "kernel 'scaled_ce'" in err and "uses s" in err


def test_a_file_without_kernels_has_nothing_to_generate(tmp_path, capsys):
    path = tmp_path / "none.toml"
    path.write_text(SCALED[:SCALED.index("[[kernel]]")])
    assert codegen_main([str(path), "--out", str(tmp_path / "out")]) == 2
    assert "declares no [[kernel]]" in capsys.readouterr().err
    with pytest.raises(DerivationFileError, match="declares no"):
        kernel_files.load(path)


def test_a_kernel_name_the_loaded_object_uses_is_refused(tmp_path, cache):
    path = tmp_path / "clash.toml"
    path.write_text(_swap('name = "scaled_ce"', 'name = "available_backends"'))
    with pytest.raises(DerivationFileError, match="kernel 'available_backends'.*rename the kernel"):
        kernel_files.load(path)


def test_outputs_are_named_after_the_file_without_a_module_key(tmp_path):
    path = tmp_path / "my-loss.toml"
    path.write_text(SCALED.replace('module = "scaled_losses"\n', ""))
    assert codegen_main([str(path), "--out", str(tmp_path / "o")]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["my_loss.c", "my_loss.cu", "my_loss.cuh", "my_loss.h", "my_loss.py"]
    with pytest.raises(DerivationFileError, match=r"\[file\] module must be an identifier"):
        loads(SCALED.replace('module = "scaled_losses"', 'module = "../evil"'), "evil.toml")


def test_the_shipped_declarations_are_the_public_functions():
    from derive.runtime import losses
    from derive.codegen.kernels import shipped_kernels
    from derive.docs import model

    decls = shipped_kernels()
    assert model.KERNEL_API == {k.name: k.functions for k in decls}
    named = {fn for k in decls for fn in k.functions}
    assert named == {n for n in losses.__all__ if inspect.isfunction(getattr(losses, n)) and n != "available_backends"}
    modules = {}
    for k in decls:
        modules.setdefault(k.module, []).append(k.name)
    assert "focal_kernels" in modules and len(modules) >= 2
    for module, names in modules.items():  # each generated module holds its file's kernels, in file order
        assert list(cbuild.load_numpy_module(cbuild.GENERATED_DIR, module).KERNELS) == names
    for k in decls:
        table = cbuild.load_numpy_module(cbuild.GENERATED_DIR, k.module).KERNELS
        assert table[k.name]["params"] == k.params
        for fn in k.functions:  # the public defaults are the declared ones (a per-class alpha defaults to None)
            sig = inspect.signature(getattr(losses, fn))
            for p, v in k.defaults.items():
                if not (k.class_alpha and p == "alpha"):
                    assert sig.parameters[p].default == v, (fn, p)
