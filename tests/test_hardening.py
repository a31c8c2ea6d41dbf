"""Hardening across processes: concurrent first builds, and deterministic verdicts."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LOAD_AND_RUN = (
    "import numpy as np, sys\n"
    "from derive import cbuild, losses\n"
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
