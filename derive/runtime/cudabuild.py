"""Compile the generated CUDA kernels (``generated/<module>.cu``) into a shared library with ``nvcc``, cache
it, and load it with ctypes: the CUDA counterpart of :mod:`derive.runtime.cbuild`, sharing its cache folder
and its checks (an entry is loaded only when its bytes have the SHA-256 recorded beside it, owned by this
user, writable by no one else).

* ``nvcc`` is ``$DERIVE_NVCC`` if set, else ``nvcc`` on ``PATH``, else ``$CUDA_HOME/bin/nvcc``, else
  ``/usr/local/cuda/bin/nvcc``.
* Flags (:data:`NVCC_FLAGS`): ``-O3 -std=c++17 -fmad=false`` (no multiply-add contraction: the error-free
  transforms need every product and sum rounded on its own, as in the C build), all warnings as errors
  (``-Werror all-warnings`` and ``-Xcompiler -Wall,-Wextra,-Werror``), ``-Xcompiler -fPIC -shared``; no
  ``-use_fast_math``.  The CUDA runtime is linked statically (nvcc's default), so the library needs no
  libcudart beside it, only a driver that supports this nvcc's CUDA version.
* Architectures: ``$DERIVE_CUDA_ARCHS`` (e.g. ``"80;90"``), else the current device's compute capability
  (from torch, when it sees a GPU), else 80 and 90; each as SASS, the highest also as PTX (which newer GPUs
  compile when the library is loaded).
* The cache key is the SHA-256 of the .cu and .cuh, the flags, the architectures and nvcc's version text.

Failures raise :class:`CudaBuildError` (a :class:`cbuild.BuildError`) with nvcc's own message.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from derive.runtime import cbuild
from derive.runtime.cbuild import BuildError

GENERATED_DIR = cbuild.GENERATED_DIR
NVCC_FLAGS = ("-O3", "-std=c++17", "-fmad=false", "-Werror", "all-warnings",
              "-Xcompiler", "-fPIC,-Wall,-Wextra,-Werror")
DEFAULT_ARCHS = ("80", "90")


class CudaBuildError(BuildError):
    """The CUDA kernels could not be compiled or loaded."""


class NvccNotFoundError(CudaBuildError):
    """No nvcc was found."""


def find_nvcc() -> list:
    """The nvcc command as a list (``$DERIVE_NVCC`` may carry arguments)."""
    env = os.environ.get("DERIVE_NVCC")
    if env:
        try:
            cmd = shlex.split(env)
        except ValueError as exc:
            raise NvccNotFoundError(f"DERIVE_NVCC={env!r} cannot be parsed ({exc})") from None
        if cmd and (shutil.which(cmd[0]) or Path(cmd[0]).is_file()):
            return cmd
        raise NvccNotFoundError(f"DERIVE_NVCC={env!r} was not found")
    found = shutil.which("nvcc")
    if found:
        return [found]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return [str(Path(home) / "bin" / "nvcc")]
    raise NvccNotFoundError("no nvcc found (looked for $DERIVE_NVCC, nvcc on PATH, $CUDA_HOME/bin/nvcc and "
                            "/usr/local/cuda/bin/nvcc): the CUDA kernels are compiled on first use; install the "
                            "CUDA toolkit or set DERIVE_NVCC")


@functools.lru_cache(maxsize=8)
def nvcc_version(cmd: tuple) -> str:
    try:
        res = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NvccNotFoundError(f"cannot run nvcc {cmd[0]!r}: {exc}") from None
    return (res.stdout or res.stderr).strip()


def archs() -> tuple:
    """The compute capabilities to compile for, as strings such as "90" (see the module's docstring)."""
    env = os.environ.get("DERIVE_CUDA_ARCHS")
    if env:
        out = tuple(a.strip().replace(".", "") for a in env.replace(",", ";").split(";") if a.strip())
        if not out or not all(a.isdigit() for a in out):
            raise CudaBuildError(f"DERIVE_CUDA_ARCHS={env!r}: give compute capabilities such as \"80;90\"")
        return out
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return (f"{major}{minor}",)
    except Exception:  # no torch, or no usable device: the defaults
        pass
    return DEFAULT_ARCHS


def gencode_flags(arch_list) -> list:
    """``-gencode`` for each architecture (SASS), and PTX of the highest."""
    arch_list = sorted(set(arch_list), key=int)
    flags = []
    for a in arch_list:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    top = arch_list[-1]
    flags += ["-gencode", f"arch=compute_{top},code=compute_{top}"]
    return flags


def compile_command(cmd, src: Path, out: Path, arch_list, shared: bool = True) -> list:
    """The nvcc command line that compiles ``src`` (``shared``: into a shared library; else an object, -c)."""
    link = ["-shared"] if shared else ["-c"]
    return [*cmd, *NVCC_FLAGS, *gencode_flags(arch_list), *link, "-I", str(Path(src).parent), str(src), "-o", str(out)]


def run_nvcc(args, what: str, timeout: int = 900) -> None:
    try:
        res = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CudaBuildError(f"compiling {what} took more than {timeout} s: {' '.join(map(shlex.quote, args))}") from None
    except OSError as exc:
        raise NvccNotFoundError(f"cannot run nvcc {args[0]!r}: {exc.strerror or exc}") from None
    if res.returncode != 0:
        raise CudaBuildError(f"compiling {what} failed:\n$ " + " ".join(map(shlex.quote, args)) + "\n"
                             + (res.stderr or res.stdout))


def source_digest(generated: Path = GENERATED_DIR, module: str = cbuild.DEFAULT_MODULE) -> str:
    """``DERIVE_<MODULE>_CUDA_SOURCE`` of the generated .cuh (what the library must report)."""
    path = Path(generated) / f"{module}.cuh"
    try:
        text = path.read_text()
    except OSError as exc:
        raise CudaBuildError(f"cannot read {path}: {exc.strerror or exc} (run `make codegen`)") from None
    marker = f'#define DERIVE_{module.upper()}_CUDA_SOURCE "'
    if marker not in text:
        raise CudaBuildError(f"{path} defines no DERIVE_{module.upper()}_CUDA_SOURCE: regenerate it")
    i = text.index(marker) + len(marker)
    return text[i:text.index('"', i)]


def build_key(cmd, arch_list, generated: Path = GENERATED_DIR, module: str = cbuild.DEFAULT_MODULE) -> str:
    h = hashlib.sha256()
    for name in (f"{module}.cu", f"{module}.cuh"):
        try:
            h.update(hashlib.sha256((Path(generated) / name).read_bytes()).digest())
        except OSError as exc:
            raise CudaBuildError(f"cannot read the generated CUDA kernels: {exc.strerror or exc} "
                                 "(run `make codegen`)") from None
    h.update("\0".join(NVCC_FLAGS + tuple(gencode_flags(arch_list))).encode())
    h.update(nvcc_version(tuple(cmd)).encode())
    return h.hexdigest()[:24]


def compile_library(cmd, out: Path, arch_list, generated: Path = GENERATED_DIR,
                    module: str = cbuild.DEFAULT_MODULE) -> None:
    """Compile into ``out`` atomically, its SHA-256 beside it (as :func:`cbuild.compile_library`)."""
    cbuild._private_cache_dir(out.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise CudaBuildError(f"cannot write to the kernel cache folder {out.parent}: {exc.strerror or exc}; "
                             "set DERIVE_CACHE_DIR to a writable folder") from None
    os.close(fd)
    try:
        run_nvcc(compile_command(cmd, Path(generated) / f"{module}.cu", Path(tmp), arch_list), f"the CUDA kernels of {module}")
        with open(tmp, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        os.chmod(tmp, 0o755)
        cbuild._write_atomic(cbuild.digest_path(out), (digest + "\n").encode())
        os.replace(tmp, out)
    except OSError as exc:
        raise CudaBuildError(f"cannot write the compiled CUDA kernels into {out.parent}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library_path(generated: Path = GENERATED_DIR, module: str = cbuild.DEFAULT_MODULE) -> Path:
    """The verified cache entry of the module's CUDA library, built when missing or failing the check."""
    cmd = find_nvcc()
    arch_list = archs()
    key = build_key(cmd, arch_list, generated, module)
    path = cbuild._private_cache_dir(cbuild.cache_dir()) / f"libderive_{module}_cuda_{key}.so"
    if cbuild.verify_entry(path):
        return path
    for _ in range(2):  # a concurrent builder may replace the pair between our writes and our check
        compile_library(cmd, path, arch_list, generated, module)
        if cbuild.verify_entry(path):
            return path
    raise CudaBuildError(f"{path} does not match its recorded SHA-256 even after rebuilding it")


_LOCK = threading.Lock()
_LOADED: dict = {}


def load(generated: Path = GENERATED_DIR, module: str = cbuild.DEFAULT_MODULE) -> ctypes.CDLL:
    """The loaded CUDA library of ``generated/<module>.cu`` (built on first use, cached on disk and in this
    process), checked to report the digest of the generated header."""
    key = (str(generated), module)
    lib = _LOADED.get(key)
    if lib is not None:
        return lib
    with _LOCK:
        lib = _LOADED.get(key)
        if lib is not None:
            return lib
        expected = source_digest(generated, module)
        path = library_path(Path(generated), module)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise CudaBuildError(f"the CUDA kernels were compiled but cannot be loaded: {exc}") from None
        fn = getattr(lib, f"derive_{module}_cuda_source", None)
        if fn is None:
            raise CudaBuildError(f"{path} defines no derive_{module}_cuda_source")
        fn.restype, fn.argtypes = ctypes.c_char_p, []
        if fn() != expected.encode():
            raise CudaBuildError(f"{path} does not report source digest {expected}")
        err = getattr(lib, f"derive_{module}_cuda_last_error")
        err.restype, err.argtypes = ctypes.c_int, []
        text = getattr(lib, f"derive_{module}_cuda_error_string")
        text.restype, text.argtypes = ctypes.c_char_p, [ctypes.c_int]
        lib.derive_cuda_last_error = err
        lib.derive_cuda_error_string = text
        _LOADED[key] = lib
        return lib


__all__ = ["load", "library_path", "find_nvcc", "archs", "gencode_flags", "compile_command", "run_nvcc",
           "source_digest", "CudaBuildError", "NvccNotFoundError", "NVCC_FLAGS", "DEFAULT_ARCHS"]
