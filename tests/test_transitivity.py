"""The end-to-end check of a chain is proved by transitivity when every step is proved and the direct
check finds neither a proof nor a counterexample; in no other case."""
from __future__ import annotations

from derive.prover.engine import CONFIRMED, PROVED, REFUTED, UNPROVED, Verdict
from derive.prover.verify import Check, _by_transitivity


def _check(kind, status, index=None):
    return Check("f.toml", "d", "c", kind, index, "a", "b", "a", "b", Verdict(status, method="m", seconds=0.5))


def test_all_steps_proved_upgrades_an_unproved_or_confirmed_end_to_end():
    for direct in (UNPROVED, CONFIRMED):
        steps = [_check("step", PROVED, k) for k in (1, 2, 3)]
        e2e = _check("end-to-end", direct)
        _by_transitivity(e2e, steps)
        assert e2e.verdict.status == PROVED
        assert e2e.verdict.method == "transitivity: each of the chain's 3 steps proved"
        assert direct in e2e.verdict.detail


def test_a_step_not_proved_leaves_the_end_to_end_alone():
    for weak in (UNPROVED, CONFIRMED, REFUTED):
        steps = [_check("step", PROVED, 1), _check("step", weak, 2)]
        e2e = _check("end-to-end", UNPROVED)
        _by_transitivity(e2e, steps)
        assert e2e.verdict.status == UNPROVED


def test_a_refuted_end_to_end_stays_refuted_and_a_direct_proof_stays_direct():
    steps = [_check("step", PROVED, 1), _check("step", PROVED, 2)]
    e2e = _check("end-to-end", REFUTED)
    _by_transitivity(e2e, steps)
    assert e2e.verdict.status == REFUTED
    e2e = _check("end-to-end", PROVED)
    _by_transitivity(e2e, steps)
    assert e2e.verdict.method == "m"
    _by_transitivity(None, steps)  # two-line chains have no end-to-end check


def test_no_steps_no_proof():
    e2e = _check("end-to-end", UNPROVED)
    _by_transitivity(e2e, [])
    assert e2e.verdict.status == UNPROVED
