"""Issue 12, the runtime part: "never lie, never fall over".

Hostile but ordinary conditions around the C kernels: absurd thread counts, a fork after the
kernels used threads, a truncated or planted library in the cache, a cache folder others can
write, an unusable cache folder or HOME, an unparsable ``$CC``.  Anything that could crash or
hang runs in a subprocess with a timeout, so that a regression fails the test instead of
killing or blocking pytest.  The tests run as root here: where a read-only folder matters the
child runs as ``nobody`` (for whom the folder really is read-only), and ownership is tested
with a folder chowned to another user (as root) or ``/`` (otherwise).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from derive.runtime import cbuild
from derive.runtime import losses as L

ROOT = Path(__file__).resolve().parent.parent
HAVE_CC = bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"))
needs_c = pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
NOBODY = 65534


def _env(cache, **extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), DERIVE_CACHE_DIR=str(cache))
    env.pop("OMP_NUM_THREADS", None)
    env.update(extra)
    return env


def _run(script, env, timeout=240, **kw):
    """Run ``script`` in a fresh interpreter; a crash shows as a negative return code."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


@pytest.fixture(scope="module")
def seed_cache(tmp_path_factory):
    """One build of the library for this module (about 10 s), copied where a test needs one."""
    if not HAVE_CC:
        pytest.skip("no C compiler")
    cache = tmp_path_factory.mktemp("seed") / "cache"
    res = _run("from derive.runtime import cbuild; print(cbuild.library_path())", _env(cache))
    assert res.returncode == 0, res.stderr
    return cache


def _copy_cache(seed, dest):
    shutil.copytree(seed, dest)
    os.chmod(dest, 0o700)
    return dest


@pytest.fixture
def isolated(monkeypatch):
    """No library loaded and no remembered fallback: each test sees cbuild's checks again."""
    saved = dict(cbuild._LOADED), dict(cbuild._RECENT), dict(L._C_UNAVAILABLE)
    for d in (cbuild._LOADED, cbuild._RECENT, L._C_UNAVAILABLE):
        d.clear()
    yield monkeypatch
    for d, old in zip((cbuild._LOADED, cbuild._RECENT, L._C_UNAVAILABLE), saved):
        d.clear()
        d.update(old)


def _data(n=1 << 16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-20, 20, n)
    t = (rng.random(n) < 0.3).astype(np.float64)
    return x, t


# ------------------------------------------------------------------------------------------
# 1. thread counts


BAD_THREADS = [0, -1, -(2 ** 31), L.MAX_THREADS + 1, 100000, 2 ** 31 - 1, 2 ** 31, 2 ** 32 + 2, 2 ** 64,
               np.int64(2 ** 40), np.int32(-3), 2.0, "2", True, 1.5]


@pytest.mark.parametrize("backend", ["numpy", "c"])
@pytest.mark.parametrize("threads", BAD_THREADS, ids=repr)
def test_absurd_thread_counts_are_a_clear_error_before_any_call(threads, backend):
    if backend == "c" and not HAVE_CC:
        pytest.skip("no C compiler")
    x, t = _data(40000)
    with pytest.raises(ValueError, match=rf"threads must be None .* from 1 to {L.MAX_THREADS}, got"):
        L.binary_focal_loss(x, t, backend=backend, threads=threads)
    with pytest.raises(ValueError, match="^threads must"):
        L.softmax_focal_loss(x.reshape(-1, 8), np.zeros(5000, np.int64), backend=backend, threads=threads)


def test_max_threads_is_the_headers_limit():
    text = (cbuild.GENERATED_DIR / "focal_kernels.h").read_text()
    assert f"#define DERIVE_MAX_THREADS {L.MAX_THREADS}\n" in text
    assert L.MAX_THREADS == 256


@needs_c
def test_the_largest_thread_count_and_a_huge_omp_num_threads_work(seed_cache, tmp_path):
    """threads=MAX_THREADS runs (and gives the serial bytes); with OMP_NUM_THREADS=100000
    (libgomp segfaulted at 100000 threads) the default is clamped; the C API clamps too.  In a
    subprocess: a crash is a failure, and the 256-thread pool does not stay in pytest."""
    script = f"""
        import numpy as np
        from derive.runtime import cbuild
        from derive.runtime import losses as L
        rng = np.random.default_rng(1)
        x = rng.uniform(-20, 20, 1 << 17); t = (rng.random(1 << 17) < 0.3).astype(float)
        ref = L.sigmoid_focal_loss(x, t, gamma=0.5, backend="c", threads=1, return_grad=True)
        for threads in (None, {L.MAX_THREADS}):
            got = L.sigmoid_focal_loss(x, t, gamma=0.5, backend="c", threads=threads, return_grad=True)
            assert all(np.array_equal(a, b) for a, b in zip(ref, got)), threads
        lib = cbuild.load()
        lib.derive_set_num_threads(0)
        print("default", lib.derive_get_num_threads())
        for req in (100000, 2 ** 31 - 1, {L.MAX_THREADS + 1}):
            lib.derive_set_num_threads(req)
            print("clamped", req, lib.derive_get_num_threads())
        print("OK")
    """
    res = _run(script, _env(_copy_cache(seed_cache, tmp_path / "c"), OMP_NUM_THREADS="100000"), timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, (res.returncode, res.stdout, res.stderr[-3000:])
    lines = res.stdout.split("\n")
    assert f"default {L.MAX_THREADS}" in lines, res.stdout
    assert sum(ln.startswith("clamped") and ln.endswith(f" {L.MAX_THREADS}") for ln in lines) == 3, res.stdout


# ------------------------------------------------------------------------------------------
# 2. fork after threads

_FORK_SCRIPT = """
import multiprocessing as mp, os, signal, sys, time
import numpy as np
from derive.runtime import cbuild
from derive.runtime import losses as L

rng = np.random.default_rng(2)
n = 1 << 17
x = rng.uniform(-20, 20, n); t = (rng.random(n) < 0.3).astype(float)
xs = x.reshape(-1, 16); ts = rng.integers(0, 16, xs.shape[0])

def calls(threads):
    return (L.binary_focal_loss(x, t, gamma=0.5, backend="c", threads=threads, return_grad=True)
            + L.softmax_focal_loss(xs, ts, gamma=2.0, backend="c", threads=threads, return_grad=True))

def same(a, b):
    return all(np.array_equal(u, v) for u, v in zip(a, b))

ref = calls(1)
assert same(calls(2), ref)  # the parent's OpenMP pool now exists
lib = cbuild.load()
lib.derive_set_num_threads(2)
print("parent threads", lib.derive_get_num_threads(), flush=True)

def child():
    got = calls(2)  # asks for 2 threads: the kernels' own fork check makes it 1
    lib.derive_set_num_threads(2)
    return same(got, ref), lib.derive_get_num_threads()

r, w = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        ok, nt = child()
        os.write(w, f"{ok} {nt}".encode())
    finally:
        os._exit(0)
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    time.sleep(0.02)
else:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    print("os.fork child HUNG", flush=True)
    sys.exit(3)
print("os.fork child", os.read(r, 100).decode(), "status", status, flush=True)

with mp.get_context("fork").Pool(1) as pool:
    try:
        ok, nt = pool.apply_async(child).get(timeout=20)
    except mp.TimeoutError:
        print("multiprocessing child HUNG", flush=True)
        pool.terminate()
        sys.exit(3)
print("multiprocessing child", ok, nt, flush=True)
lib.derive_set_num_threads(2)
print("parent threads after", lib.derive_get_num_threads(), same(calls(2), ref), flush=True)
"""


@needs_c
def test_a_child_forked_after_threads_runs_serially_instead_of_hanging(seed_cache, tmp_path):
    """libgomp's pool does not survive fork: before the fix the child waited forever at its
    next parallel region.  Now it runs on one thread and gives the same bytes; the parent
    keeps its threads.  Bounded: the child is killed after 20 s, the script after 120 s."""
    res = _run(_FORK_SCRIPT, _env(_copy_cache(seed_cache, tmp_path / "c"), OMP_NUM_THREADS="2"), timeout=120)
    out = res.stdout
    assert res.returncode == 0, (res.returncode, out, res.stderr[-3000:])
    assert "parent threads 2" in out
    assert "os.fork child True 1 status 0" in out, out
    assert "multiprocessing child True 1" in out, out
    assert "parent threads after 2 True" in out, out


# ------------------------------------------------------------------------------------------
# 3. the cache: checked before loading, private

_LOAD_SCRIPT = """
import numpy as np
from derive.runtime import cbuild
from derive.runtime import losses as L
real = cbuild.compile_library
def counting(*a, **kw):
    print("COMPILED", flush=True)
    return real(*a, **kw)
cbuild.compile_library = counting
x = np.linspace(-5, 5, 11); t = (x > 0).astype(float)
a = L.binary_focal_loss(x, t, backend="c"); b = L.binary_focal_loss(x, t, backend="numpy")
assert np.allclose(a, b, rtol=1e-14), (a, b)
print("OK", flush=True)
"""


def _entry_in(cache):
    (lib,) = cache.glob(f"libderive_focal_*{cbuild._lib_suffix()}")
    return lib


@needs_c
def test_a_truncated_library_is_rebuilt_not_loaded(seed_cache, tmp_path):
    """A half-written entry (a disk full, a killed copy) made dlopen fault with SIGBUS."""
    cache = _copy_cache(seed_cache, tmp_path / "cache")
    lib = _entry_in(cache)
    data = lib.read_bytes()
    lib.write_bytes(data[: len(data) // 3])
    res = _run(_LOAD_SCRIPT, _env(cache))
    assert res.returncode == 0 and "OK" in res.stdout, (res.returncode, res.stdout, res.stderr[-3000:])
    assert "COMPILED" in res.stdout
    assert lib.read_bytes() == data  # the same compiler on the same source: the same bytes
    assert cbuild.verify_entry(lib)
    res = _run(_LOAD_SCRIPT, _env(cache))
    assert res.returncode == 0 and "OK" in res.stdout and "COMPILED" not in res.stdout, res.stdout + res.stderr


_PLANTED_C = """
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void)
{
    FILE *f = fopen(getenv("DERIVE_TEST_MARKER"), "w");
    if (f) { fputs("the planted library ran\\n", f); fclose(f); }
}
const char *derive_focal_kernels_source(void) { return getenv("DERIVE_TEST_DIGEST"); }
"""


@needs_c
@pytest.mark.parametrize("how", ["replaced", "no digest file", "symlink with its digest",
                                 "writable by others with its digest"])
def test_a_planted_library_is_never_loaded(seed_cache, tmp_path, how):
    """A library put in the cache in place of ours (its constructor would run at dlopen, and
    it even reports the right source digest) is rebuilt without being loaded: its digest is
    checked first.  The marker file its constructor writes must never appear."""
    cache = _copy_cache(seed_cache, tmp_path / "cache")
    lib = _entry_in(cache)
    planted = tmp_path / "planted.so"
    src = tmp_path / "planted.c"
    src.write_text(_PLANTED_C)
    res = subprocess.run([*cbuild.find_compiler(), "-shared", "-fPIC", str(src), "-o", str(planted)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    marker = tmp_path / "marker"
    env = _env(cache, DERIVE_TEST_MARKER=str(marker), DERIVE_TEST_DIGEST=cbuild.source_digest())
    # the harness can fail: loading the planted library does write the marker
    probe = _run("import ctypes, os; ctypes.CDLL(os.environ['P'])", dict(env, P=str(planted)), timeout=60)
    assert probe.returncode == 0 and marker.exists(), probe.stderr
    marker.unlink()
    lib.unlink()
    if how.startswith("symlink"):
        lib.symlink_to(planted)
    else:
        shutil.copy(planted, lib)
    if how == "no digest file":
        cbuild.digest_path(lib).unlink()
    elif how.endswith("with its digest"):  # only the link / the file's mode gives it away
        cbuild.digest_path(lib).write_text(hashlib.sha256(planted.read_bytes()).hexdigest() + "\n")
        if how.startswith("writable"):
            os.chmod(lib, 0o666)
    res = _run(_LOAD_SCRIPT, env)
    assert res.returncode == 0 and "OK" in res.stdout, (res.returncode, res.stdout, res.stderr[-3000:])
    assert not marker.exists(), "the planted library was loaded"
    assert "COMPILED" in res.stdout
    assert not lib.is_symlink() and cbuild.verify_entry(lib)


@needs_c
def test_a_new_cache_folder_is_private(tmp_path, isolated, seed_cache):
    cache = tmp_path / "deep" / "cache"
    isolated.setenv("DERIVE_CACHE_DIR", str(cache))
    isolated.setattr(cbuild, "compile_library",
                     lambda cmd, out, generated=cbuild.GENERATED_DIR, module=cbuild.DEFAULT_MODULE: _install_seed(seed_cache, out))
    cbuild.load()
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700


def _install_seed(seed, out):
    cbuild._private_cache_dir(out.parent)
    src = _entry_in(seed)
    shutil.copy(src, out)
    shutil.copy(cbuild.digest_path(src), cbuild.digest_path(out))


def _refused(cache, monkeypatch, match):
    """backend="c" raises naming the cause; "auto" warns once and gives NumPy's result."""
    monkeypatch.setenv("DERIVE_CACHE_DIR", str(cache))
    x, t = _data(100)
    with pytest.raises(cbuild.BuildError, match=match):
        L.binary_focal_loss(x, t, backend="c")
    want = L.binary_focal_loss(x, t, backend="numpy")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = [L.binary_focal_loss(x, t) for _ in range(3)]
        backends = L.available_backends()
    ours = [w for w in seen if issubclass(w.category, L.CBackendUnavailableWarning)]
    assert len(ours) == 1, [str(w.message) for w in seen]
    assert ours[0].filename == __file__  # points at the caller
    message = str(ours[0].message)
    assert "using the NumPy backend" in message and re.search(match, message), message
    assert backends == ["numpy"]
    for g in got:
        np.testing.assert_array_equal(g, want)
    return message


@needs_c
@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_cache_folder_others_can_write_is_refused(tmp_path, isolated, seed_cache, mode):
    cache = _copy_cache(seed_cache, tmp_path / "cache")  # a valid entry inside: still not loaded
    os.chmod(cache, mode)
    who = {0o777: "group and others", 0o770: "group", 0o702: "others"}[mode]
    message = _refused(cache, isolated, rf"refusing the kernel cache folder .*writable by {who} \(mode {mode:04o}\)")
    assert str(cache) in message and "chmod 700" in message


@needs_c
def test_a_cache_folder_owned_by_someone_else_is_refused(tmp_path, isolated, seed_cache):
    if IS_ROOT:
        cache = _copy_cache(seed_cache, tmp_path / "cache")
        os.chown(cache, NOBODY, NOBODY)
        owner = NOBODY
    else:
        cache, owner = Path("/"), 0  # an existing folder of another user's, not writable by others
        if os.stat(cache).st_uid == os.geteuid():
            pytest.skip("no folder of another user's to try")
    _refused(cache, isolated, rf"refusing the kernel cache folder .*owned by uid {owner}, not by this user")


# ------------------------------------------------------------------------------------------
# 4. unusable cache folders and HOME, a bad $CC: "auto" falls back once, "c" says why


def test_a_cache_path_that_is_a_file(tmp_path, isolated):
    path = tmp_path / "cache"
    path.write_text("not a folder")
    message = _refused(path, isolated, "is not a folder")
    assert str(path) in message


def test_a_home_under_a_file(tmp_path, isolated):
    (tmp_path / "file").write_text("")
    isolated.delenv("XDG_CACHE_HOME", raising=False)
    isolated.setenv("HOME", str(tmp_path / "file" / "home"))
    isolated.delenv("DERIVE_CACHE_DIR", raising=False)
    x, t = _data(100)
    with pytest.raises(cbuild.BuildError, match=r"file/home/\.cache/derive cannot be created: Not a directory"):
        L.binary_focal_loss(x, t, backend="c")
    with pytest.warns(L.CBackendUnavailableWarning, match="cannot be created"):
        np.testing.assert_array_equal(L.binary_focal_loss(x, t), L.binary_focal_loss(x, t, backend="numpy"))


@pytest.mark.parametrize("cc, match", [('gcc "-O2', "cannot be parsed .*No closing quotation"),
                                       ("'unbalanced", "cannot be parsed"),
                                       (None, "cannot run the C compiler")])
def test_a_bad_cc(tmp_path, isolated, cc, match):
    if cc is None:  # an existing file that is not a program
        cc = str(tmp_path / "not-a-compiler")
        Path(cc).write_text("hello\n")
    isolated.setenv("CC", cc)
    isolated.setenv("DERIVE_CACHE_DIR", str(tmp_path / "cache"))
    x, t = _data(100)
    with pytest.raises(cbuild.CompilerNotFoundError, match=match):
        L.binary_focal_loss(x, t, backend="c")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert L.available_backends() == ["numpy"]
        np.testing.assert_array_equal(L.binary_focal_loss(x, t), L.binary_focal_loss(x, t, backend="numpy"))
    assert [w.category for w in seen] == [L.CBackendUnavailableWarning], [str(w.message) for w in seen]
    assert re.search(match, str(seen[0].message))


def test_a_changed_configuration_is_tried_again(tmp_path, isolated, seed_cache):
    """The fallback is remembered per configuration: fixing the cache folder brings C back."""
    bad = tmp_path / "file"
    bad.write_text("")
    isolated.setenv("DERIVE_CACHE_DIR", str(bad))
    with pytest.warns(L.CBackendUnavailableWarning):
        assert L.available_backends() == ["numpy"]
    if not HAVE_CC:
        return
    isolated.setenv("DERIVE_CACHE_DIR", str(_copy_cache(seed_cache, tmp_path / "good")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert L.available_backends() == ["c", "numpy"]


_READONLY_SCRIPT = """
import warnings
import numpy as np
from derive.runtime import cbuild
from derive.runtime import losses as L
x = np.linspace(-5, 5, 11); t = (x > 0).astype(float)
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    same = all(np.array_equal(L.binary_focal_loss(x, t), L.binary_focal_loss(x, t, backend="numpy"))
               for _ in range(3))
    backends = L.available_backends()
print("warnings", len(seen), backends, same)
for w in seen:
    print("WARNING", w.category.__name__, w.message)
try:
    L.binary_focal_loss(x, t, backend="c")
except cbuild.BuildError as exc:
    print("ERROR", exc)
"""


_DROP_DAC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH: root then obeys the mode bits
    if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP; takes effect at the exec below
        sys.exit(f"SKIP: cannot drop capability {cap}: {os.strerror(ctypes.get_errno())}")
os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
"""


def _run_read_only(script, env):
    """Run ``script`` where folders without write permission really are read-only: as root,
    without the capabilities that let root write anywhere (dropped before exec)."""
    if not IS_ROOT:
        return _run(script, env, timeout=120)
    res = subprocess.run([sys.executable, "-c", _DROP_DAC, textwrap.dedent(script)], env=env, capture_output=True,
                         text=True, timeout=120)
    if res.returncode == 1 and res.stderr.startswith("SKIP:"):
        pytest.skip(res.stderr.strip())
    return res


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
@pytest.mark.parametrize("where", ["read-only HOME", "read-only cache folder"])
def test_read_only_folders(tmp_path, where):
    """A real read-only folder: HOME (nothing under it can be created), or an empty cache
    folder of the user's own that it cannot write."""
    env = _env(tmp_path)
    for var in ("DERIVE_CACHE_DIR", "XDG_CACHE_HOME"):
        env.pop(var, None)
    home = tmp_path / "home"
    home.mkdir()
    env["HOME"] = str(home)
    if where == "read-only HOME":
        os.chmod(home, 0o555)
        cause = r"home/\.cache/derive cannot be created: Permission denied"
    else:
        cache = tmp_path / "cache"
        cache.mkdir(mode=0o500)
        os.chmod(cache, 0o500)
        env["DERIVE_CACHE_DIR"] = str(cache)
        cause = "cannot write to the kernel cache folder .*cache: Permission denied"
    try:
        res = _run_read_only(_READONLY_SCRIPT, env)
    finally:
        os.chmod(home, 0o755)
    out = res.stdout
    assert res.returncode == 0, (out, res.stderr[-3000:])
    assert "warnings 1 ['numpy'] True" in out, out
    if HAVE_CC:
        assert re.search("WARNING CBackendUnavailableWarning .*" + cause, out), out
        assert re.search("ERROR .*" + cause, out), out
    else:
        assert "WARNING CBackendUnavailableWarning" in out and "ERROR " in out, out


@needs_c
def test_an_entry_that_never_matches_its_digest_is_an_error_not_a_load(tmp_path, isolated):
    """If every rebuild is replaced by something else (another program writing into the
    cache), the build gives up with a BuildError after two tries; nothing is loaded."""
    cache = tmp_path / "cache"
    isolated.setenv("DERIVE_CACHE_DIR", str(cache))
    builds = []

    def hostile(cmd, out, generated=cbuild.GENERATED_DIR, module=cbuild.DEFAULT_MODULE):
        builds.append(out)
        cbuild._private_cache_dir(out.parent)
        out.write_bytes(b"\x7fELF then nothing")
        cbuild.digest_path(out).write_text("0" * 64 + "\n")

    isolated.setattr(cbuild, "compile_library", hostile)
    loaded = []
    real_cdll = cbuild.ctypes.CDLL
    isolated.setattr(cbuild.ctypes, "CDLL", lambda *a, **k: loaded.append(a) or real_cdll(*a, **k))
    with pytest.raises(cbuild.BuildError, match="does not match its recorded SHA-256 .* even after rebuilding"):
        cbuild.load()
    assert len(builds) == 2 and not loaded
