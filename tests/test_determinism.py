"""Issue 13: verdicts that do not depend on the machine's load, the proof cache, the memory cap.

Limits count CPU time (not wall time), so a busy machine does not turn a proof into "unproved";
a cached proof is replayed (the one strategy that proved it must prove it again); a corrupt cache
entry is ignored; a check that outgrows the memory cap gets a "memory limit" verdict while the
other checks of the run are verified as usual."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from derive.prover.engine import PROVED
from derive.prover.verify import verify_paths

ROOT = Path(__file__).resolve().parent.parent
#: the hardest literature file (sums over classes, several strategies near a second each) and a
#: shipped kernel file with end-to-end checks proved through their steps
HARD = [ROOT / "tests" / "literature" / "distillation_kl.toml", ROOT / "derive" / "derivations" / "poly1.toml"]


def _verdicts(report):
    return [(c.file, c.derivation, c.chain, c.kind, c.index, c.verdict.status, c.verdict.method, c.limit)
            for c in report.checks]


def _spinners(n=2):
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def test_same_verdicts_on_a_busy_machine():
    quiet = verify_paths([str(p) for p in HARD], cache=False, jobs=1)
    assert quiet.checks and all(c.verdict.status == PROVED for c in quiet.checks), _verdicts(quiet)
    procs = _spinners(2)  # both cores kept busy while the same files are verified again, on two workers
    try:
        busy = verify_paths([str(p) for p in HARD], cache=False, jobs=2)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert _verdicts(busy) == _verdicts(quiet)
    assert not any(c.limit for c in busy.checks)


def test_cache_replay_and_corrupt_entries(tmp_path):
    path = [str(HARD[1])]  # ordinary steps (the steps of a sum are proved case by case, not cached)
    cold = verify_paths(path, cache=tmp_path, jobs=1)
    entries = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert entries, "a proved check is remembered"
    warm = verify_paths(path, cache=tmp_path, jobs=1)
    assert _verdicts(warm) == _verdicts(cold)
    assert any(c.cache == "replayed" for c in warm.checks), [c.cache for c in warm.checks]
    for p in entries:  # garbage in every entry: ignored, the full search runs again
        p.write_bytes(b"\x00not json")
    again = verify_paths(path, cache=tmp_path, jobs=1)
    assert _verdicts(again) == _verdicts(cold)
    assert not any(c.cache == "replayed" for c in again.checks)


def test_memory_cap_gives_a_limit_verdict(tmp_path):
    f = tmp_path / "big.toml"
    f.write_text('[symbols]\n' + "".join(f'{s} = "real"\n' for s in "abcdef") +
                 '[[derivation]]\nid = "d"\n'
                 '[[derivation.chain]]\nid = "big"\n'
                 'lines = ["(a+b+c+d+e+f)^40", "(2*a+2*b+2*c+2*d+2*e+2*f)^40/2^40"]\n'
                 '[[derivation.chain]]\nid = "fast"\nlines = ["2*a", "a + a"]\n')
    report = verify_paths([str(f)], cache=False, jobs=2, memory_mb=200)
    by_chain = {c.chain: c for c in report.checks}
    assert by_chain["fast"].verdict.status == PROVED
    assert by_chain["big"].verdict.status != PROVED
    assert by_chain["big"].limit == "memory", (by_chain["big"].verdict.method, by_chain["big"].verdict.detail)


def test_jobs_report_in_file_order():
    paths = [str(ROOT / "tests" / "literature" / n) for n in ("hinge.toml", "huber_smooth_l1.toml")]
    one = verify_paths(paths, cache=False, jobs=1)
    two = verify_paths(paths, cache=False, jobs=2)
    assert _verdicts(one) == _verdicts(two)
    assert [c.file for c in two.checks] == sorted((c.file for c in two.checks), key=["hinge.toml", "huber_smooth_l1.toml"].index)
