"""Every docstring example in the package runs and prints what it says (the README's test command runs them)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import hf_clipneg

METRIC_SCRIPT = Path(hf_clipneg.__file__).parent / "retrieval_metric" / "retrieval_metric.py"


def _modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(hf_clipneg.__path__, "hf_clipneg.")]
    return sorted(n for n in names if not n.endswith("__main__"))


def _run(module) -> None:
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module) if t.examples]
    if not tests:
        pytest.skip("no examples")
    for test in tests:
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples of {module.__name__} failed (output above)"


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name: str) -> None:
    _run(importlib.import_module(name))


def test_the_evaluate_metric_script_examples_run() -> None:
    spec = importlib.util.spec_from_file_location("retrieval_metric", METRIC_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _run(module)
