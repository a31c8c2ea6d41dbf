"""Smoke test of the kernel benchmark: tiny sizes, a table with ratios, skipped peers listed.
No timing is asserted (the figures of a tiny run mean nothing)."""
import json

from derive.measure import bench_kernels


def test_bench_smoke_prints_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench_kernels.main(out_path=str(out), sigmoid_n=3000, softmax_shape=(64, 10), gammas=(0.5,),
                       dtypes=("float32",), threads=[1], repeats=2, peers=False, memory=False)
    text = capsys.readouterr().out
    assert "bandwidth floor" in text and "generated C" in text and "closed form NumPy" in text
    assert "sympy lambdify" in text and "x floor" in text
    for peer in ("torch eager", "torch.compile", "jax jit"):
        assert f"{peer}: skipped" in text  # never silently dropped
    data = json.loads(out.read_text())
    rows = {r["row"] for r in data["results"]}
    assert {"generated C", "generated NumPy", "closed form NumPy", "sympy lambdify"} <= rows
    assert all(r["ns_per_elem"] > 0 and r["x_floor"] > 0 for r in data["results"])


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
    import pytest

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
