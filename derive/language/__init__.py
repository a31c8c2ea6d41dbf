"""The derivation language: what a file may say and what it means.

:mod:`~derive.language.parser` reads one line of mathematics (a small grammar, no ``eval``);
:mod:`~derive.language.loader` reads a derivation file (TOML or Markdown) into symbols, domains,
definitions, chains and ``[[kernel]]`` declarations; :mod:`~derive.language.domains` holds the
domain notation (``real``, ``(0, 1)``, ``{0, 1}``); :mod:`~derive.language.functions` the
functions a line may call (sigmoid, softplus, D, ...).  Next stage: :mod:`derive.prover`.
"""
