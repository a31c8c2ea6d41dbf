"""The package as a pip user gets it: build the sdist, build the wheel *from the sdist*, install it
into a fresh virtualenv outside the checkout, and run every command and every loss function from a
temporary folder, comparing with the checkout.

Network-free: the build runs with ``--no-isolation`` (setuptools and build come from the test
environment) and the wheel is installed with ``--no-deps``; the fresh venv sees the test
environment's packages (SymPy, NumPy, ...) through a ``.pth`` line, but not the checkout: a plain
path line does not run the editable install's finder, and every command runs outside the tree.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("git") is None and not (ROOT / ".git").exists(),
                                reason="needs the checkout's file list")

# what every loss function is called with: (function, args, kwargs); labels 0/1 and class indices
_X = np.linspace(-40.0, 40.0, 33)
_T = (np.arange(33) % 2).astype(np.float64)
_XS = np.linspace(-30.0, 30.0, 5 * 7).reshape(5, 7)
_TS = np.array([0, 3, -100, 6, 2], dtype=np.int64)
CALLS = {
    "sigmoid_cross_entropy": ((_X, _T), {}),
    "binary_cross_entropy_with_logits": ((_X, _T), {"reduction": "none"}),
    "binary_focal_loss": ((_X, _T), {"gamma": 0.5}),
    "sigmoid_focal_loss": ((_X, _T), {"alpha": 0.25, "gamma": 2.0}),
    "focal_loss_star": ((_X, _T), {"gamma": 2.0, "beta": 1.0}),
    "softmax_cross_entropy": ((_XS, _TS), {}),
    "softmax_focal_loss": ((_XS, _TS), {"gamma": 2.0}),
}

_CALL_SCRIPT = r"""
import json, sys
import numpy as np
import derive
spec = json.load(open(sys.argv[1]))
out = {"derive_file": derive.__file__, "backends": derive.available_backends()}
for name, (args, kwargs) in spec.items():
    args = [np.asarray(a, dtype=np.int64 if name.startswith("softmax") and i == 1 else np.float64)
            for i, a in enumerate(args)]
    for backend in ("c", "numpy"):
        loss, grad = getattr(derive, name)(*args, backend=backend, return_grad=True, **kwargs)
        out[f"{name}/{backend}"] = [np.asarray(loss).tolist(), np.asarray(grad).tolist()]
json.dump(out, open(sys.argv[2], "w"))
"""


def _tracked_files():
    """The files a clean clone has (plus new, not yet committed ones): what an sdist build sees."""
    proc = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          cwd=ROOT, capture_output=True)
    if proc.returncode != 0:
        pytest.skip("not a git checkout")
    return [f for f in proc.stdout.decode().split("\0") if f and (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """sdist and wheel built from a copy of the checkout; the wheel is built from the sdist."""
    base = tmp_path_factory.mktemp("pkg")
    src = base / "src"
    for rel in _tracked_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    out = base / "dist"
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sdists, wheels = list(out.glob("*.tar.gz")), list(out.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, list(out.iterdir())
    return sdists[0], wheels[0]


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory):
    """A fresh virtualenv, outside the checkout, with the wheel installed (no deps, no network)."""
    base = tmp_path_factory.mktemp("venv")
    env_dir = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "_derive_test_env.pth").write_text("\n".join(sorted(ours)) + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
                           "--no-build-isolation", "--no-index", "--quiet", str(dist[1])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    work = base / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(DERIVE_CACHE_DIR=str(base / "cache"), PYTHONHASHSEED="0")
    return {"dir": env_dir, "python": py, "derive": env_dir / "bin" / "derive", "purelib": Path(purelib),
            "work": work, "env": env}


def _run(venv, *args, timeout=600, **kw):
    return subprocess.run([str(venv["derive"]), *args], cwd=venv["work"], env=venv["env"], capture_output=True,
                          text=True, timeout=timeout, **kw)


def test_the_sdist_holds_what_a_rebuild_needs(dist):
    with tarfile.open(dist[0]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for rel in ("pyproject.toml", "setup.py", "LICENSE", "README.md", "Makefile",
                "templates/kernels.c.j2", "templates/kernels.h.j2", "templates/kernels.py.j2",
                "templates/docs/md/index.md.j2", "generated/focal_kernels.c", "generated/focal_kernels.h",
                "generated/focal_kernels.py", "derive/derivations/focal_loss_note.toml",
                "derive/derivations/stable_forms.toml", "derive/derivations/focal_loss_gradients.md",
                "derive/resources.py", "derive/py.typed", "tests/test_package.py", "docs/README.md"):
        assert rel in names, f"{rel} missing from the sdist"


def test_the_wheel_carries_templates_generated_sources_and_the_note(dist):
    with zipfile.ZipFile(dist[1]) as whl:
        names = set(whl.namelist())
        for rel in ("templates/kernels.c.j2", "templates/docs/html/base.html.j2", "generated/focal_kernels.c",
                    "generated/focal_kernels.h", "generated/focal_kernels.py"):
            assert f"derive/_data/{rel}" in names, rel
            assert whl.read(f"derive/_data/{rel}") == (ROOT / rel).read_bytes(), f"{rel} differs from the checkout"
        for rel in ("derive/derivations/focal_loss_note.toml", "derive/derivations/focal_loss_gradients.md",
                    "derive/py.typed"):
            assert rel in names, rel
        assert any(n.endswith("licenses/LICENSE") for n in names)
        meta = next(whl.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert "Name: derive-gradients" in meta and "License-Expression: MIT" in meta
    assert not any(n.startswith(("templates/", "generated/", "tests/")) for n in names), "top-level data in the wheel"


def test_the_installed_package_is_the_wheel_not_the_checkout(venv):
    proc = subprocess.run([str(venv["python"]), "-c", "import derive, derive.resources as r; "
                           "print(derive.__file__); print(r.data_root())"],
                          cwd=venv["work"], env=venv["env"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    file, data = proc.stdout.split()
    assert Path(file).is_relative_to(venv["purelib"]) and Path(data) == venv["purelib"] / "derive" / "_data"


def test_version_and_usage(venv):
    from derive import __version__

    proc = _run(venv, "--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"derive {__version__} (derive-gradients)"
    proc = _run(venv)
    assert proc.returncode == 2 and proc.stdout == "" and "usage: derive" in proc.stderr


#: the shipped files verified from the wheel and from the checkout: the note and a kernel file (every
#: shipped file takes over two minutes per run; make verify and the docs tests verify them all)
WHEEL_VERIFIED = ("focal_loss_note.toml", "poly1.toml")


def test_verify_from_the_wheel_gives_the_checkouts_verdicts(venv, tmp_path):
    proc = _run(venv, "verify", "--json", *[str(venv["purelib"] / "derive" / "derivations" / n) for n in WHEEL_VERIFIED])
    assert proc.returncode == 0, proc.stderr[-2000:]
    installed = json.loads(proc.stdout)
    here = subprocess.run([sys.executable, "-m", "derive", "verify", "--json",
                           *[str(ROOT / "derive" / "derivations" / n) for n in WHEEL_VERIFIED]], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONHASHSEED="0"))
    checkout = json.loads(here.stdout)

    def verdicts(rep):
        return [(Path(c["file"]).name, c["derivation"], c.get("chain"), c["kind"], c.get("index"), c["verdict"],
                 c["status"]) for c in rep["checks"]]

    assert verdicts(installed) == verdicts(checkout) and len(verdicts(installed)) > 80


def test_codegen_from_the_wheel_writes_the_committed_bytes_into_the_current_folder(venv):
    proc = _run(venv, "codegen", "--out", "gen")
    assert proc.returncode == 0, proc.stderr
    for name in ("focal_kernels.c", "focal_kernels.h", "focal_kernels.py"):
        assert (venv["work"] / "gen" / name).read_bytes() == (ROOT / "generated" / name).read_bytes(), name
    before = sorted(p.relative_to(venv["purelib"]) for p in (venv["purelib"] / "derive").rglob("*"))
    proc = _run(venv, "codegen")  # default: ./generated in the current folder, never site-packages
    assert proc.returncode == 0, proc.stderr
    assert (venv["work"] / "generated" / "focal_kernels.c").read_bytes() == (ROOT / "generated" / "focal_kernels.c").read_bytes()
    after = sorted(p.relative_to(venv["purelib"]) for p in (venv["purelib"] / "derive").rglob("*"))
    assert [p for p in after if "__pycache__" not in str(p)] == [p for p in before if "__pycache__" not in str(p)]
    assert _run(venv, "codegen", "--check", "--out", "gen").returncode == 0


def test_every_loss_function_from_the_wheel_matches_the_checkout(venv, tmp_path):
    import derive
    from derive.runtime import losses

    spec = {name: ([a.tolist() for a in args], kw) for name, (args, kw) in CALLS.items()}
    public = {n for n in losses.__all__ if callable(getattr(losses, n)) and not isinstance(getattr(losses, n), type)}
    assert set(spec) == public - {"available_backends"}, "a public loss is not exercised"
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    script = tmp_path / "call.py"
    script.write_text(_CALL_SCRIPT)
    proc = subprocess.run([str(venv["python"]), str(script), str(tmp_path / "spec.json"), str(tmp_path / "out.json")],
                          cwd=venv["work"], env=venv["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    assert Path(got["derive_file"]).is_relative_to(venv["purelib"])
    assert got["backends"] == ["c", "numpy"]
    assert list((Path(venv["env"]["DERIVE_CACHE_DIR"])).rglob("*.so")), "the C library was not built from the wheel"
    for name, (args, kw) in CALLS.items():
        for backend in ("c", "numpy"):
            loss, grad = getattr(derive, name)(*args, backend=backend, return_grad=True, **kw)
            want = [np.asarray(loss).tolist(), np.asarray(grad).tolist()]
            assert got[f"{name}/{backend}"] == want, f"{name} ({backend}) differs from the checkout"


def test_accuracy_from_the_wheel(venv):
    proc = _run(venv, "accuracy", "--quick", "--kernel", "sigmoid_focal", "--kernel", "softmax_ce")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "0 over the bounds" in proc.stdout and "sigmoid_focal" in proc.stdout and "softmax_ce" in proc.stdout


def test_docs_from_the_wheel_match_the_committed_pages(venv):
    pytest.importorskip("matplotlib")
    pytest.importorskip("latex2mathml")
    proc = _run(venv, "docs", "--out", "site", "--no-plots")
    assert proc.returncode == 0, proc.stderr[-3000:]
    site = venv["work"] / "site"
    pages = sorted(p.relative_to(site).as_posix() for p in site.rglob("*.md"))
    assert "README.md" in pages and len(pages) > 3
    for rel in pages:
        assert (site / rel).read_bytes() == (ROOT / "docs" / rel).read_bytes(), f"docs/{rel} differs from the committed page"
    assert not (venv["purelib"] / "docs").exists()
