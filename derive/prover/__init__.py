"""The prover: every step of a loaded derivation proved, refuted or left unproved.

:mod:`~derive.prover.engine` decides one step (symbolic strategies, then interval arithmetic and
sampling for counterexamples); :mod:`~derive.prover.verify` runs every check of a set of files;
:mod:`~derive.prover.report` prints the verdicts (text or JSON).  Previous stage:
:mod:`derive.language`; next: :mod:`derive.codegen`.
"""
