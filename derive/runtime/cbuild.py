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
  temporary file and renamed into place (atomic), beside a side file ``<entry>.sha256``
  holding the SHA-256 of its bytes (written first, also atomically).
* Nothing is loaded before it is checked: an entry is ``dlopen``-ed (which runs its
  constructors) only when its bytes have the recorded SHA-256 and it is a regular file owned
  by this user and writable by no one else; a truncated, corrupt, foreign or planted entry is
  rebuilt in its place, never loaded.  The cache folder is created owner-only (0o700); an
  existing one that is owned by another user or writable by group or others is refused
  (:class:`BuildError` saying so), since a library planted there would run in this process.
  This protects against other users, not against this user's own programs.
* Every failure (no compiler, a ``$CC`` that cannot be parsed or run, a cache folder that
  cannot be created or written, is a file, or is refused, a failed compile) raises
  :class:`BuildError` (:class:`CompilerNotFoundError` without a compiler) naming its cause;
  ``backend="auto"`` then uses the NumPy backend with one warning, which needs none of this.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from derive.resources import generated_dir

#: The generated kernels: the checkout's ``generated/``, or the copy a wheel carries (derive.resources).
GENERATED_DIR = generated_dir()

CFLAGS = ("-std=c99", "-O3", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wextra", "-Werror", "-fPIC",
          "-shared")
OPTIONAL_FLAGS = (("DERIVE_OPENMP", "-fopenmp"), ("DERIVE_NATIVE", "-march=native"))
LDLIBS = ("-lm",)
#: The module of the shipped focal kernels; every generated module is ``<module>.{c,h,py}`` in its folder.
DEFAULT_MODULE = "focal_kernels"
SOURCE = DEFAULT_MODULE + ".c"
HEADER = DEFAULT_MODULE + ".h"


class BuildError(RuntimeError):
    """The C kernels could not be compiled or loaded."""


class CompilerNotFoundError(BuildError):
    """No C compiler was found."""


def cache_dir() -> Path:
    env = os.environ.get("DERIVE_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "derive"
    try:
        home = Path.home()
    except (RuntimeError, KeyError, OSError) as exc:  # no $HOME and no password entry
        raise BuildError(f"no folder for the kernel cache: the home folder is unknown ({exc}); "
                         "set DERIVE_CACHE_DIR") from None
    return home / ".cache" / "derive"


def _private_cache_dir(path: Path) -> Path:
    """``path``, created owner-only (0o700) when missing; :class:`BuildError` when it cannot be
    created or is refused (owned by another user, writable by group or others)."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        raise BuildError(f"the kernel cache folder {path} is not a folder (a file is in the way); "
                         "remove it or set DERIVE_CACHE_DIR") from None
    except OSError as exc:
        raise BuildError(f"the kernel cache folder {path} cannot be created: {exc.strerror or exc}"
                         f"{_where(exc)}; set DERIVE_CACHE_DIR to a writable folder") from None
    try:
        st = os.stat(path)
    except OSError as exc:
        raise BuildError(f"the kernel cache folder {path} cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise BuildError(f"the kernel cache folder {path} is not a folder; remove it or set DERIVE_CACHE_DIR")
    if hasattr(os, "geteuid"):
        if st.st_uid != os.geteuid():
            raise BuildError(f"refusing the kernel cache folder {path}: it is owned by uid {st.st_uid}, not by this "
                             f"user (uid {os.geteuid()}), and a library planted there would run in this process; "
                             "set DERIVE_CACHE_DIR to a folder of your own")
        if st.st_mode & 0o022:
            who = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if st.st_mode & bit)
            raise BuildError(f"refusing the kernel cache folder {path}: it is writable by {who} "
                             f"(mode {stat.S_IMODE(st.st_mode):04o}), and a library planted there would run in this "
                             f"process; make it private (chmod 700 {path}) or set DERIVE_CACHE_DIR")
    return path


def _where(exc) -> str:
    return f" ({exc.filename})" if getattr(exc, "filename", None) else ""


def find_compiler() -> list:
    """The compiler command as a list (``$CC`` may carry arguments)."""
    env = os.environ.get("CC")
    if env:
        try:
            cmd = shlex.split(env)
        except ValueError as exc:  # an unbalanced quote
            raise CompilerNotFoundError(f"the C compiler CC={env!r} cannot be parsed ({exc}); fix its quoting or "
                                        "unset CC (the NumPy backend works without a compiler: "
                                        "backend='numpy')") from None
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
    """Whether the compiler builds and links a small shared library with ``flag`` (False too
    when no temporary folder can be written: the flag is then left out)."""
    try:
        with tempfile.TemporaryDirectory(prefix="derive-probe-") as tmp:
            src = Path(tmp) / "probe.c"
            src.write_text("int derive_probe(int a) { return a + 1; }\n")
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


def source_digest(generated: Path = GENERATED_DIR, module: str = DEFAULT_MODULE) -> str:
    """The digest written into the generated header, ``DERIVE_<MODULE>_SOURCE`` (what the
    library's ``derive_<module>_source()`` must report)."""
    text = (Path(generated) / f"{module}.h").read_text()
    marker = f'#define DERIVE_{module.upper()}_SOURCE "'
    if marker not in text:
        raise ValueError(f"{module}.h defines no DERIVE_{module.upper()}_SOURCE")
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


def build_key(cmd, generated: Path = GENERATED_DIR, module: str = DEFAULT_MODULE) -> str:
    h = hashlib.sha256()
    for name in (f"{module}.c", f"{module}.h"):
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


def digest_path(lib: Path) -> Path:
    """The side file that holds the SHA-256 of a cached library's bytes."""
    return lib.with_name(lib.name + ".sha256")


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def compile_library(cmd, out: Path, generated: Path = GENERATED_DIR, module: str = DEFAULT_MODULE) -> None:
    """Compile into ``out`` atomically (a temporary file in the same folder, then rename), its
    SHA-256 into :func:`digest_path` (renamed into place just before the library)."""
    _private_cache_dir(out.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise BuildError(f"cannot write to the kernel cache folder {out.parent}: {exc.strerror or exc}; "
                         "set DERIVE_CACHE_DIR to a writable folder") from None
    os.close(fd)
    try:
        args = [*cmd, *build_flags(cmd), "-I", str(generated), str(Path(generated) / f"{module}.c"), "-o", tmp, *LDLIBS]
        try:
            res = subprocess.run(args, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise BuildError(f"compiling the C kernels took more than 600 s: {' '.join(map(shlex.quote, args))}") from None
        except OSError as exc:
            raise BuildError(f"cannot run the C compiler {cmd[0]!r}: {exc.strerror or exc}") from None
        if res.returncode != 0:
            raise BuildError("compiling the C kernels failed:\n$ " + " ".join(shlex.quote(a) for a in args)
                             + "\n" + (res.stderr or res.stdout))
        try:
            with open(tmp, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            os.chmod(tmp, 0o755)
            _write_atomic(digest_path(out), (digest + "\n").encode())
            os.replace(tmp, out)
        except OSError as exc:
            raise BuildError(f"cannot write the compiled kernels into {out.parent}: {exc.strerror or exc}"
                             f"{_where(exc)}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def verify_entry(path: Path) -> bool:
    """Whether the cached library at ``path`` may be loaded: a regular file (not a link) owned
    by this user, writable by no one else, whose bytes have the SHA-256 recorded beside it when
    it was built.  Read without loading it: a truncated or planted file is never ``dlopen``-ed."""
    try:
        want = digest_path(path).read_text().strip()
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
    except (OSError, UnicodeDecodeError):
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o022:
            return False
        if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
            return False
        h = hashlib.sha256()
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            h.update(chunk)
    except OSError:
        return False
    finally:
        os.close(fd)
    return h.hexdigest() == want


def _entry(cmd, key: str, generated: Path, module: str = DEFAULT_MODULE) -> Path:
    """The verified cache entry for ``key``, built (again) when missing or failing the check;
    named by the module (``libderive_<module>_<key>.so``), so a cache folder says what it holds."""
    path = _private_cache_dir(cache_dir()) / f"libderive_{module}_{key}{_lib_suffix()}"
    if verify_entry(path):
        return path
    for _ in range(2):  # a concurrent builder may replace the pair between our writes and our check
        compile_library(cmd, path, generated, module)
        if verify_entry(path):
            return path
    raise BuildError(f"{path} does not match its recorded SHA-256 ({digest_path(path)}) even after "
                     "rebuilding it; is another program writing into the cache folder?")


def _check_loaded(lib, expected: str, module: str = DEFAULT_MODULE) -> bool:
    fn = _helper(lib, module, "source")
    if fn is None:
        return False
    fn.restype = ctypes.c_char_p
    fn.argtypes = []
    return fn() == expected.encode()


_NUMPY_MODULES: dict = {}


def load_numpy_module(generated: Path = GENERATED_DIR, module: str = DEFAULT_MODULE):
    """The generated NumPy module (``generated/<module>.py``), imported by path."""
    import importlib.util

    mod = _NUMPY_MODULES.get((generated, module))  # by the arguments first: no path resolution per call
    if mod is not None:
        return mod
    path = (Path(generated) / f"{module}.py").resolve()
    mod = _NUMPY_MODULES.get(path)
    if mod is None:
        if not path.exists():
            raise BuildError(f"{path} is missing: run `make codegen`")
        spec = importlib.util.spec_from_file_location(f"derive_generated_{module}_{len(_NUMPY_MODULES)}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _NUMPY_MODULES[path] = mod
    _NUMPY_MODULES[(generated, module)] = mod
    return mod


_LOCK = threading.Lock()
_LOADED: dict = {}


def library_path(generated: Path = GENERATED_DIR, module: str = DEFAULT_MODULE) -> Path:
    """Build (if needed) and return the cached shared library's path (checked as
    :func:`verify_entry` says)."""
    cmd = find_compiler()
    return _entry(cmd, _key(cmd, generated, module), generated, module)


def _key(cmd, generated, module=DEFAULT_MODULE) -> str:
    try:
        return build_key(cmd, generated, module)
    except OSError as exc:
        raise BuildError(f"cannot read the generated kernels: {exc.strerror or exc}{_where(exc)}") from None


_RECHECK_S = 0.5  # a loaded library is looked up again (files, environment) at most this often
_RECENT: dict = {}  # (generated folder, module) -> (monotonic time of the last lookup, library)


def load(generated: Path = GENERATED_DIR, module: str = DEFAULT_MODULE) -> ctypes.CDLL:
    """The loaded library of ``generated/<module>.c`` (built on first use, cached on disk and in
    this process).  Within half a second of the last lookup for the same module the same
    library is returned without looking at the files (a training loop's calls cost no stat calls)."""
    recent = _RECENT.get((generated, module))
    if recent is not None and time.monotonic() - recent[0] < _RECHECK_S:
        return recent[1]
    lib = _load(Path(generated), module)
    _RECENT[(generated, module)] = (time.monotonic(), lib)  # after a build, its end
    return lib


def _load(generated: Path, module: str = DEFAULT_MODULE) -> ctypes.CDLL:
    with _LOCK:
        cmd = find_compiler()
        key = _key(cmd, generated, module)
        if (module, key) in _LOADED:
            return _LOADED[(module, key)]
        try:
            expected = source_digest(generated, module)
        except (OSError, ValueError) as exc:
            raise BuildError(f"cannot read the source digest of the generated header in {generated}: {exc}") from None
        path = _entry(cmd, key, generated, module)  # checked before it is loaded
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise BuildError(f"the C kernels were compiled but cannot be loaded: {exc}") from None
        if not _check_loaded(lib, expected, module):
            raise BuildError(f"{path} does not report source digest {expected}")
        _declare(lib, generated, module)
        _LOADED[(module, key)] = lib
        return lib


def _helper(lib, module, helper):
    """The library's ``derive_<module>_<helper>`` (each module's own name, so that two modules
    link into one program), or None.  :func:`load` also makes it ``lib.derive_<helper>``, one
    name for the callers whatever the module."""
    try:
        return getattr(lib, f"derive_{module}_{helper}")
    except AttributeError:
        return None


def _declare(lib, generated, module=DEFAULT_MODULE):
    """Set argtypes/restype from the kernel table of the generated NumPy module."""
    table = load_numpy_module(generated, module).KERNELS
    c_int64_p = ctypes.POINTER(ctypes.c_int64)
    for dt, ct in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        ptr = ctypes.POINTER(ct)
        for name, info in table.items():
            fn = getattr(lib, f"derive_{name}_{dt}")
            fn.restype = ctypes.c_int
            if info["kind"] == "elementwise":
                args = [ctypes.c_size_t, ptr, ptr] + [ct for _ in info["params"]]
            elif info.get("target") == "class_probs":  # x and q, both n-by-k
                args = [ctypes.c_size_t, ctypes.c_size_t, ptr, ptr] + [ct for _ in info["params"]]
            else:
                args = [ctypes.c_size_t, ctypes.c_size_t, ptr, c_int64_p]
                for p in info["params"]:
                    args += [ptr, ct] if (p == "alpha" and info["class_alpha"]) else [ct]
                args.append(ctypes.c_int64)
            fn.argtypes = args + [ptr, ptr]
            second = info.get("second")
            if second is not None:  # the proved second derivative: hess (elementwise) or hvp (softmax)
                sfn = getattr(lib, f"derive_{name}_{second}_{dt}")
                sfn.restype = ctypes.c_int
                if second == "hess":  # (n, x, t, params..., hess)
                    sfn.argtypes = [ctypes.c_size_t, ptr, ptr] + [ct for _ in info["params"]] + [ptr]
                else:  # (n, k, x, target or q, params... [, ignore_index], v, out): the forward's inputs, then v
                    sfn.argtypes = args + [ptr, ptr]
    helpers = [("set_num_threads", [ctypes.c_int], ctypes.c_int), ("get_num_threads", [], ctypes.c_int),
               ("vector_math", [], ctypes.c_int)]
    for dt, ct in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        helpers += [(f"{h}_{dt}", [ctypes.c_size_t, ctypes.POINTER(ct)], ctypes.c_size_t)
                    for h in ("first_bad_label", "first_bad_target")]
    for helper, argtypes, restype in helpers:
        fn = _helper(lib, module, helper)
        if fn is None:
            if helper.startswith("first_bad_target"):  # only modules with soft kernels have it
                continue
            raise BuildError(f"the C kernels of {module} define no derive_{module}_{helper}: regenerate them")
        fn.argtypes, fn.restype = argtypes, restype
        # one name for the callers whatever the module: lib.derive_<helper>
        setattr(lib, f"derive_{helper}", fn)


__all__ = ["load", "library_path", "cache_dir", "find_compiler", "BuildError", "CompilerNotFoundError", "CFLAGS",
           "build_flags", "cpu_id", "verify_entry", "digest_path",
           "LDLIBS", "load_numpy_module", "GENERATED_DIR"]
