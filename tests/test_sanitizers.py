"""The generated C under AddressSanitizer and UndefinedBehaviorSanitizer.

tests/c/sanitize_driver.c calls every kernel of the header with edge inputs and exactly
sized heap arrays; tests/c/example.c is the plain-C usage example. Both are built together
with generated/focal_kernels.c with -fsanitize=address,undefined and
-fno-sanitize-recover=all, so any out-of-bounds access, overflow or undefined behaviour
aborts the program and fails the test."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GEN = ROOT / "generated"
SAN = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g", "-O1"]
WARN = ["-std=c99", "-Wall", "-Wextra", "-Werror"]


def _cc():
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        pytest.skip("no C compiler on PATH")
    return cc


def _probe(cc, tmp, flags):
    src = tmp / "probe.c"
    src.write_text("int main(void) { return 0; }\n")
    return subprocess.run([cc, *flags, str(src), "-o", str(tmp / "probe")], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def san_flags(tmp_path_factory):
    cc = _cc()
    tmp = tmp_path_factory.mktemp("probe")
    if not _probe(cc, tmp, SAN):
        pytest.skip(f"{cc} cannot build with -fsanitize=address,undefined here")
    extra = ["-fopenmp"] if _probe(cc, tmp, ["-fopenmp"]) else []
    return cc, extra


def _build_and_run(cc, extra, driver, tmp_path):
    exe = tmp_path / driver.stem
    res = subprocess.run([cc, *WARN, *SAN, *extra, "-I", str(GEN), str(driver), str(GEN / "focal_kernels.c"),
                          "-lm", "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:halt_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1", OMP_NUM_THREADS="2")
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "runtime error" not in run.stderr and "AddressSanitizer" not in run.stderr
    return run.stdout


def test_every_kernel_under_asan_and_ubsan(san_flags, tmp_path):
    cc, extra = san_flags
    out = _build_and_run(cc, extra, ROOT / "tests" / "c" / "sanitize_driver.c", tmp_path)
    calls = int(out.split("sanitize driver: ")[1].split(" calls")[0])
    assert calls > 1000 and ", 0 problems" in out


def test_c_example_under_asan_and_ubsan(san_flags, tmp_path):
    cc, extra = san_flags
    out = _build_and_run(cc, extra, ROOT / "tests" / "c" / "example.c", tmp_path)
    assert "all checks passed" in out


def test_sanitizers_catch_an_overflow(san_flags, tmp_path):
    """The harness can fail: a one-past-the-end write is reported."""
    cc, extra = san_flags
    bad = tmp_path / "bad.c"
    bad.write_text('#include <stdlib.h>\n#include "focal_kernels.h"\n'
                   "int main(void) { float *x = calloc(3, sizeof *x), *t = calloc(3, sizeof *t);\n"
                   "  float *l = calloc(3, sizeof *l), *g = calloc(3, sizeof *g);\n"
                   "  int rc = derive_sigmoid_focal_f32(4, x, t, 2.0f, l, g);\n"
                   "  free(x); free(t); free(l); free(g); return rc; }\n")
    exe = tmp_path / "bad"
    res = subprocess.run([cc, *WARN, *SAN, *extra, "-I", str(GEN), str(bad), str(GEN / "focal_kernels.c"), "-lm",
                          "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "heap-buffer-overflow" in run.stderr
