"""The public API documents itself: numpydoc sections naming every parameter, type hints on every
parameter and return, and examples that run (doctest) and print what the kernels compute."""
from __future__ import annotations

import doctest
import inspect
import re

import pytest

import derive
from derive.runtime import losses

PUBLIC = [n for n in losses.__all__ if inspect.isfunction(getattr(losses, n)) and n != "available_backends"]


def test_the_public_names_are_exported_by_the_package():
    assert set(derive.__all__) >= set(losses.__all__) - {"MAX_THREADS"}
    for name in derive.__all__:
        assert getattr(derive, name) is not None
    assert set(PUBLIC) >= {"sigmoid_focal_loss", "softmax_focal_loss", "softmax_cross_entropy"}


@pytest.mark.parametrize("name", PUBLIC)
def test_every_parameter_is_documented_and_typed(name):
    fn = getattr(derive, name)
    doc = inspect.getdoc(fn)
    sig = inspect.signature(fn)
    for section in ("Parameters\n----------", "Returns\n-------", "Raises\n------", "Notes\n-----"):
        assert section in doc, f"{name}: no {section.splitlines()[0]} section"
    params = doc.split("Parameters\n----------\n", 1)[1].split("\n\nReturns", 1)[0]
    documented = re.findall(r"^(\w+) : ", params, flags=re.M)
    assert documented == list(sig.parameters), f"{name}: documented {documented}, signature {list(sig.parameters)}"
    for p in sig.parameters.values():
        assert p.annotation is not inspect.Parameter.empty, f"{name}: {p.name} has no type hint"
    assert sig.return_annotation is not inspect.Signature.empty
    assert f'default {sig.parameters["reduction"].default!r}' in doc


def test_the_examples_run_and_show_what_the_kernels_compute():
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(losses, globs={}) if t.examples]
    assert len(tests) >= 3
    for t in tests:
        runner.run(t)
    assert runner.failures == 0 and runner.tries >= 6
