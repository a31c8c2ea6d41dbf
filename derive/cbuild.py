"""Compile the generated C kernels into a shared library, cache it, and load it with ctypes.

* The compiler is ``$CC`` if set, else the first of ``cc``, ``gcc``, ``clang`` on ``PATH``.
* Flags: ``-std=c99 -O3 -fno-math-errno -fno-trapping-math -Wall -Wextra -Werror -fPIC
  -shared``, plus ``-fopenmp`` (threads and ``omp simd``) and ``-march=native`` (the
  machine's vector width) when a one-time probe shows the compiler takes them; linked with
  ``-lm``.  No ``-ffast-math``: the kernels' error-free transforms need IEEE rounding and
  NaN must propagate.  ``-fno-math-errno`` and ``-fno-trapping-math`` change no value
  (libm stops setting errno; the compiler may assume no FP trap is enabled); they let the
  loops vectorize and call glibc's vector math.  ``DERIVE_OPENMP=0`` and ``DERIVE_NATIVE=0``
  turn the optional flags off.  With ``-march=native`` the cache key includes the CPU.
* The cache lives in ``$DERIVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/derive``, else
  ``~/.cache/derive``; an entry is keyed by the SHA-256 of the source, the header, the
  flags and the compiler's version text, so any change rebuilds.  An entry is written to a
  temporary file and renamed into place (atomic), and an entry that fails to load or does
  not carry the expected source digest is rebuilt.
* Without a compiler, :class:`CompilerNotFoundError` says so; the NumPy backend still works.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .resources import generated_dir

#: The generated kernels: the checkout's ``generated/``, or the copy a wheel carries (derive.resources).
GENERATED_DIR = generated_dir()

CFLAGS = ("-std=c99", "-O3", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wextra", "-Werror", "-fPIC",
          "-shared")
OPTIONAL_FLAGS = (("DERIVE_OPENMP", "-fopenmp"), ("DERIVE_NATIVE", "-march=native"))
LDLIBS = ("-lm",)
SOURCE = "focal_kernels.c"
HEADER = "focal_kernels.h"


class BuildError(RuntimeError):
    """The C kernels could not be compiled or loaded."""


class CompilerNotFoundError(BuildError):
    """No C compiler was found."""


def cache_dir() -> Path:
    env = os.environ.get("DERIVE_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "derive"


def find_compiler() -> list:
    """The compiler command as a list (``$CC`` may carry arguments)."""
    env = os.environ.get("CC")
    if env:
        cmd = shlex.split(env)
        if cmd and (shutil.which(cmd[0]) or Path(cmd[0]).is_file()):
            return cmd
        raise CompilerNotFoundError(
            f"the C compiler CC={env!r} was not found; install one or unset CC "
            "(the NumPy backend works without a compiler: backend='numpy')")
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    raise CompilerNotFoundError(
        "no C compiler found (looked for $CC, cc, gcc, clang); install one to use backend='c', "
        "or use backend='numpy', which needs none")


def compiler_version(cmd) -> str:
    return _compiler_version(tuple(cmd))


@functools.lru_cache(maxsize=8)
def _compiler_version(cmd) -> str:
    try:
        res = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise CompilerNotFoundError(f"cannot run the C compiler {cmd[0]!r}: {exc}") from None
    return (res.stdout or res.stderr).strip()


@functools.lru_cache(maxsize=8)
def _probe(cmd, flag) -> bool:
    """Whether the compiler builds and links a small shared library with ``flag``."""
    with tempfile.TemporaryDirectory(prefix="derive-probe-") as tmp:
        src = Path(tmp) / "probe.c"
        src.write_text("int derive_probe(int a) { return a + 1; }\n")
        try:
            res = subprocess.run([*cmd, *CFLAGS, flag, str(src), "-o", str(Path(tmp) / "probe.so")],
                                 capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
        return res.returncode == 0


def build_flags(cmd=None) -> tuple:
    """CFLAGS plus the optional flags this compiler takes (probed once per process)."""
    cmd = tuple(cmd or find_compiler())
    extra = tuple(flag for env, flag in OPTIONAL_FLAGS
                  if os.environ.get(env, "1") != "0" and _probe(cmd, flag))
    return CFLAGS + extra


@functools.lru_cache(maxsize=1)
def cpu_id() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        import platform

        return platform.machine() + " " + platform.processor()


def source_digest(generated: Path = GENERATED_DIR) -> str:
    """The digest written into the generated header (what a loaded library must report)."""
    text = (Path(generated) / HEADER).read_text()
    marker = '#define DERIVE_FOCAL_KERNELS_SOURCE "'
    i = text.index(marker) + len(marker)
    return text[i:text.index('"', i)]


_FILE_HASHES: dict = {}


def _file_hash(path: Path) -> bytes:
    """SHA-256 of a file, remembered while its size and mtime stay the same."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = hashlib.sha256(path.read_bytes()).digest()
    return _FILE_HASHES[key]


def build_key(cmd, generated: Path = GENERATED_DIR) -> str:
    h = hashlib.sha256()
    for name in (SOURCE, HEADER):
        h.update(_file_hash(Path(generated) / name))
    flags = build_flags(cmd)
    h.update("\0".join(flags + LDLIBS).encode())
    if "-march=native" in flags:
        h.update(cpu_id().encode())
    h.update(compiler_version(cmd).encode())
    h.update(sys.platform.encode())
    return h.hexdigest()[:24]


def _lib_suffix() -> str:
    return ".dylib" if sys.platform == "darwin" else (".dll" if os.name == "nt" else ".so")


def compile_library(cmd, out: Path, generated: Path = GENERATED_DIR) -> None:
    """Compile into ``out`` atomically (a temporary file in the same folder, then rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        args = [*cmd, *build_flags(cmd), "-I", str(generated), str(Path(generated) / SOURCE), "-o", tmp, *LDLIBS]
        res = subprocess.run(args, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise BuildError("compiling the C kernels failed:\n$ " + " ".join(shlex.quote(a) for a in args)
                             + "\n" + (res.stderr or res.stdout))
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _check_loaded(lib, expected: str) -> bool:
    try:
        fn = lib.derive_focal_kernels_source
    except AttributeError:
        return False
    fn.restype = ctypes.c_char_p
    fn.argtypes = []
    return fn() == expected.encode()


_NUMPY_MODULES: dict = {}


def load_numpy_module(generated: Path = GENERATED_DIR):
    """The generated NumPy module (generated/focal_kernels.py), imported by path."""
    import importlib.util

    mod = _NUMPY_MODULES.get(generated)  # by the argument first: no path resolution per call
    if mod is not None:
        return mod
    path = (Path(generated) / "focal_kernels.py").resolve()
    mod = _NUMPY_MODULES.get(path)
    if mod is None:
        if not path.exists():
            raise BuildError(f"{path} is missing: run `make codegen`")
        spec = importlib.util.spec_from_file_location(f"derive_generated_focal_kernels_{len(_NUMPY_MODULES)}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _NUMPY_MODULES[path] = mod
    _NUMPY_MODULES[generated] = mod
    return mod


_LOCK = threading.Lock()
_LOADED: dict = {}


def library_path(generated: Path = GENERATED_DIR) -> Path:
    """Build (if needed) and return the cached shared library's path."""
    cmd = find_compiler()
    key = build_key(cmd, generated)
    path = cache_dir() / f"libderive_focal_{key}{_lib_suffix()}"
    if not path.exists():
        compile_library(cmd, path, generated)
    return path


_RECHECK_S = 0.5  # a loaded library is looked up again (files, environment) at most this often
_RECENT: dict = {}  # generated folder -> (monotonic time of the last lookup, library)


def load(generated: Path = GENERATED_DIR) -> ctypes.CDLL:
    """The loaded library (built on first use, cached on disk and in this process).  Within
    half a second of the last lookup for the same folder the same library is returned without
    looking at the files (a training loop's calls cost no stat calls)."""
    recent = _RECENT.get(generated)
    if recent is not None and time.monotonic() - recent[0] < _RECHECK_S:
        return recent[1]
    lib = _load(Path(generated))
    _RECENT[generated] = (time.monotonic(), lib)  # after a build, its end
    return lib


def _load(generated: Path) -> ctypes.CDLL:
    with _LOCK:
        cmd = find_compiler()
        key = build_key(cmd, generated)
        if key in _LOADED:
            return _LOADED[key]
        path = cache_dir() / f"libderive_focal_{key}{_lib_suffix()}"
        expected = source_digest(generated)
        lib = None
        if path.exists():
            try:
                lib = ctypes.CDLL(str(path))
                if not _check_loaded(lib, expected):
                    lib = None
            except OSError:
                lib = None
            if lib is None:  # corrupt or foreign entry: rebuild it
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
        if lib is None:
            compile_library(cmd, path, generated)
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as exc:
                raise BuildError(f"the C kernels were compiled but cannot be loaded: {exc}") from None
            if not _check_loaded(lib, expected):
                raise BuildError(f"{path} does not report source digest {expected}")
        _declare(lib, generated)
        _LOADED[key] = lib
        return lib


def _declare(lib, generated):
    """Set argtypes/restype from the kernel table of the generated NumPy module."""
    table = load_numpy_module(generated).KERNELS
    c_int64_p = ctypes.POINTER(ctypes.c_int64)
    for dt, ct in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        ptr = ctypes.POINTER(ct)
        for name, info in table.items():
            fn = getattr(lib, f"derive_{name}_{dt}")
            fn.restype = ctypes.c_int
            if info["kind"] == "elementwise":
                args = [ctypes.c_size_t, ptr, ptr] + [ct for _ in info["params"]]
            else:
                args = [ctypes.c_size_t, ctypes.c_size_t, ptr, c_int64_p]
                for p in info["params"]:
                    args += [ptr, ct] if (p == "alpha" and info["class_alpha"]) else [ct]
                args.append(ctypes.c_int64)
            fn.argtypes = args + [ptr, ptr]
    lib.derive_set_num_threads.argtypes = [ctypes.c_int]
    lib.derive_set_num_threads.restype = ctypes.c_int
    lib.derive_get_num_threads.argtypes = []
    lib.derive_get_num_threads.restype = ctypes.c_int
    for dt, ct in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        fn = getattr(lib, f"derive_first_bad_label_{dt}")
        fn.argtypes = [ctypes.c_size_t, ctypes.POINTER(ct)]
        fn.restype = ctypes.c_size_t
    lib.derive_vector_math.argtypes = []
    lib.derive_vector_math.restype = ctypes.c_int


__all__ = ["load", "library_path", "cache_dir", "find_compiler", "BuildError", "CompilerNotFoundError", "CFLAGS",
           "build_flags", "cpu_id",
           "LDLIBS", "load_numpy_module", "GENERATED_DIR"]
