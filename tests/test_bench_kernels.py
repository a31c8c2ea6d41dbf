"""Smoke test of the kernel benchmark: tiny sizes, a table with ratios, skipped peers listed.
No timing is asserted (the figures of a tiny run mean nothing)."""
import json

import pytest

from derive.measure import bench_kernels


@pytest.fixture
def peers_state():
    """The peer rows set process-wide state (JAX's x64 mode, torch's thread count): put it back
    for the tests that run after these."""
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    x64, nth = jax.config.jax_enable_x64, torch.get_num_threads()
    yield
    jax.config.update("jax_enable_x64", x64)
    torch.set_num_threads(nth)


def test_bench_smoke_prints_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench_kernels.main(out_path=str(out), sigmoid_n=3000, softmax_shape=(64, 10), gammas=(0.5,),
                       dtypes=("float32",), threads=[1], repeats=2, peers=False, memory=False)
    text = capsys.readouterr().out
    assert "bandwidth floor" in text and "generated C" in text and "closed form NumPy" in text
    assert "sympy lambdify" in text and "x floor" in text
    for peer in ("torch eager", "torch.compile", "jax jit", "derive.torch op", "derive.jax op", "optax jit",
                 "overhead"):
        assert f"{peer}: skipped" in text  # never silently dropped
    data = json.loads(out.read_text())
    rows = {r["row"] for r in data["results"]}
    assert {"generated C", "generated NumPy", "closed form NumPy", "sympy lambdify"} <= rows
    assert all(r["ns_per_elem"] > 0 and r["x_floor"] > 0 for r in data["results"])


def test_bench_rows_for_derive_torch_and_derive_jax(tmp_path, capsys, peers_state):
    """With the peers installed, one tiny run has the derive.torch and derive.jax rows beside
    torch eager, torch.compile and optax in every configuration, their ratios, and the per-call
    overhead rows with the empty op, in the printed table and in the JSON (figures not asserted)."""
    out = tmp_path / "bench.json"
    bench_kernels.main(out_path=str(out), sigmoid_n=2000, softmax_shape=(32, 8), gammas=(2.0,),
                       dtypes=("float32",), threads=[1], repeats=1, memory=False, overhead_n=100)
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    rows = {(r["kernel"], r["row"], r["threads"]) for r in data["results"]}
    for kernel in ("sigmoid focal", "softmax focal", "softmax CE"):
        for row in ("derive.torch op", "derive.torch op, fresh grad", "torch eager", "torch.compile"):
            assert (kernel, row, 1) in rows, (kernel, row)
        assert (kernel, "derive.jax op", "xla") in rows, kernel
    for kernel in ("sigmoid focal", "softmax CE"):
        assert (kernel, "optax jit", "xla") in rows, kernel
    assert ("softmax focal", "jax jit", "xla") in rows
    assert not [k for k in data["skipped"] if "derive" in k or k in ("torch.compile", "optax jit")], data["skipped"]
    pairs = {(r["kernel"], r["ours"], r["peer"]) for r in data["ratios"]}
    assert ("sigmoid focal", "derive.torch op", "torch.compile") in pairs
    assert ("sigmoid focal", "derive.jax op", "optax jit") in pairs
    assert ("softmax CE", "derive.jax op", "optax jit") in pairs
    by = {(r["kernel"], r["row"], r["threads"]): r["ns_per_elem"] for r in data["results"]}
    for r in data["ratios"]:  # each ratio is the two rows' times, peer over ours
        peer = by[(r["kernel"], r["peer"], r["threads"])]
        ours = by[(r["kernel"], r["ours"], r["threads"])]
        assert r["x_faster"] == pytest.approx(peer / ours)
    over = {r["row"]: r for r in data["overhead"]}
    for lib, how in (("torch", "fwd+bwd"), ("torch", "forward"), ("jax", "jit fwd+bwd"), ("jax", "jit forward")):
        for name in (f"derive.{lib} op, {how}", f"empty {lib} op (x*1), {how}"):
            assert over[name]["n"] == 100 and over[name]["us_per_call"] > 0, name
        assert f"overhead of the derive.{lib} op, {how}" in text
        if lib == "torch":  # and the calling thread's CPU time of each
            assert over[f"derive.torch op, {how}"]["cpu_us_per_call"] > 0
    assert data["info"]["threads"]["counts"] == [1] and data["info"]["derive.jax backend"] in ("ffi", "callback")
    assert "derive.torch op vs torch.compile" in text and "per-call overhead under 20 us" in text


def test_the_timed_torch_and_jax_rows_compute_the_loss(peers_state):
    """The rows time real work: each derive op's (loss, grad) equals its peer's formula."""
    import numpy as np
    import torch
    _, fns = bench_kernels.torch_rows("float64", 1)
    _, jnp, jfns, _ = bench_kernels.jax_rows()
    rng = np.random.default_rng(3)
    x = rng.standard_normal(500) * 4
    t = (rng.random(500) < 0.4).astype(np.float64)
    xs = rng.standard_normal((40, 6)) * 3
    ts = rng.integers(0, 6, 40)
    cases = {"sigmoid": (x, t), "softmax": (xs, ts), "ce": (xs, ts)}
    for kind, (a, b) in cases.items():
        # the torch rows time the summed loss (the same reduction for every row); the JAX rows keep
        # the per-element loss as aux
        ref_loss, ref_grad = fns["torch eager"][kind](torch.from_numpy(a), torch.from_numpy(b), 2.0)
        assert ref_loss.ndim == 0, kind
        for row in ("derive.torch op", "derive.torch op, fresh grad"):
            loss, grad = fns[row][kind](torch.from_numpy(a), torch.from_numpy(b), 2.0)
            assert float(loss) == pytest.approx(float(ref_loss), rel=1e-12), (kind, row)
            assert np.allclose(grad.numpy(), ref_grad.numpy(), rtol=1e-10, atol=1e-14), (kind, row)
        jl, jg = jfns["derive.jax op"][kind](jnp.asarray(a), jnp.asarray(b), 2.0)
        assert float(np.asarray(jl).sum()) == pytest.approx(float(ref_loss), rel=1e-12), kind
        assert np.allclose(np.asarray(jg), ref_grad.numpy(), rtol=1e-10, atol=1e-14), kind
        if kind in jfns["optax jit"]:
            ol, og = jfns["optax jit"][kind](jnp.asarray(a), jnp.asarray(b), 2.0)
            assert float(np.asarray(ol).sum()) == pytest.approx(float(ref_loss), rel=1e-12), kind
            assert np.allclose(np.asarray(og), ref_grad.numpy(), rtol=1e-10, atol=1e-14), kind


def test_closed_forms_agree_with_the_kernels():
    """The benchmark's plain-NumPy and lambdify rows compute the same loss and gradient."""
    import numpy as np

    import derive

    x = np.linspace(-8, 8, 101)
    t = (np.arange(101) % 2).astype(np.float64)
    loss, grad = derive.binary_focal_loss(x, t, gamma=0.5, return_grad=True, backend="numpy")
    for fn in (bench_kernels.closed_form_numpy, bench_kernels.lambdified_closed_form()):
        cl, cg = fn(x, 2 * t - 1, 0.5)
        assert np.allclose(cl, loss, rtol=1e-9) and np.allclose(cg, grad, rtol=1e-9)
    xs = np.random.default_rng(0).standard_normal((20, 7))
    ts = np.arange(20) % 7
    sl, sg = derive.softmax_focal_loss(xs, ts, gamma=0.5, return_grad=True, backend="numpy")
    cl, cg = bench_kernels.closed_form_softmax_numpy(xs, ts, 0.5)
    assert np.allclose(cl, sl, rtol=1e-9) and np.allclose(cg, sg, rtol=1e-9, atol=1e-12)


def test_generated_c_allocates_nothing():
    """No heap allocation in the generated C: the only extra memory of the C path is the outputs."""
    from derive.codegen import GENERATED_DIR

    text = (GENERATED_DIR / "focal_kernels.c").read_text()
    for fn in ("malloc(", "calloc(", "realloc(", "alloca("):
        assert fn not in text


def test_threads_argument_gives_identical_results():
    import numpy as np

    import derive

    if "c" not in derive.available_backends():
        pytest.skip("no C compiler")
    rng = np.random.default_rng(1)
    x = rng.standard_normal(100_000).astype(np.float32) * 5
    t = (rng.random(x.size) < 0.3).astype(np.float32)
    a = derive.binary_focal_loss(x, t, gamma=0.5, return_grad=True, backend="c", threads=1)
    b = derive.binary_focal_loss(x, t, gamma=0.5, return_grad=True, backend="c", threads=2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    xs = rng.standard_normal((1000, 80))
    ts = rng.integers(0, 80, 1000)
    a = derive.softmax_focal_loss(xs, ts, gamma=2.0, return_grad=True, backend="c", threads=1)
    b = derive.softmax_focal_loss(xs, ts, gamma=2.0, return_grad=True, backend="c", threads=2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="threads"):
        derive.binary_focal_loss(x, t, threads=0)


def test_bench_rewrite_smoke(capsys):
    """The rules-vs-hand rows of make bench: one row per kernel, dtype and parameters (and the elementwise
    second derivatives), each with both figures, its ratio and whether the printed forms are the same; the
    target line and the spread line printed (figures not asserted)."""
    from derive.measure import bench_rewrite

    res = bench_rewrite.main(quick=True)
    text = capsys.readouterr().out
    if "skipped" in res:
        pytest.skip(res["skipped"])
    names = {(r["kernel"], r["dtype"]) for r in res["rows"]}
    for k in ("sigmoid_ce", "sigmoid_focal", "sigmoid_focal_alpha", "softmax_ce", "softmax_focal",
              "sigmoid_focal (hess)"):
        assert (k, "float32") in names and (k, "float64") in names, k
    assert all(r["rules_ns"] > 0 and r["hand_ns"] > 0 and r["ratio"] > 0 for r in res["rows"])
    assert "target: rules' kernels within 5% of the hand-written ones" in text and "note: where the printed" in text
    assert {r["same_code"] for r in res["rows"]} == {True, False}
