"""optax's own rmsprop and scale_by_rms tests, run with ours in place of optax's.

Every optax wheel ships its tests next to its code: ``optax/_src/alias_test.py`` and
``optax/_src/transform_test.py`` (and ``optax/_src/sharding_test.py`` from 0.2.7 on). This module
loads the installed copies as files, with ``optax.rmsprop`` and ``optax.scale_by_rms`` replaced by
ours, together with the module attributes the test files reach them through
(``optax._src.alias.rmsprop``, ``optax._src.transform.scale_by_rms``), and runs the tests those
files name after rmsprop or scale_by_rms. A regression against a suite we did not write fails
here. The package itself never imports ``optax._src``; only this harness reads optax's tests.
"""

from __future__ import annotations

import collections
import functools
import importlib
import importlib.util
import io
import os
import re
import sys
import unittest
from pathlib import Path

import optax
import pytest

import rmsprop_jax

# The tests the files name after our two functions: alias_test's parameters
# opt_name='rmsprop', transform_test's test_scalers_rmsprop and test_rms_match_adam,
# sharding_test's *_rmsprop (not scale_by_param_block_rms, a different transformation).
SELECT = re.compile(r"rmsprop|scale_by_rms\b|rms_match")

# (test file, ours, the attributes of optax's modules it reaches them through). Files a wheel
# must ship: every optax release the package admits (>= 0.2.5) has these two.
REQUIRED = ("alias_test", "transform_test")
SUITES = {
  "alias_test": "rmsprop",
  "transform_test": "scale_by_rms",
  "sharding_test": "rmsprop",
}
SWAPS = (
  ("optax", "rmsprop"),
  ("optax", "scale_by_rms"),
  ("optax._src.alias", "rmsprop"),
  ("optax._src.transform", "scale_by_rms"),
)


def _version(v: str) -> tuple[int, ...]:
  return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def _test_file(name: str) -> Path:
  """The installed optax's ``_src/<name>.py``; a clear failure where the wheel has none."""
  spec = importlib.util.find_spec("optax")
  roots = list(spec.submodule_search_locations or []) if spec else []
  for root in roots:
    path = Path(root, "_src", f"{name}.py")
    if path.is_file():
      return path
  message = (
    f"the installed optax {optax.__version__} (at {', '.join(roots) or '?'}) has no _src/{name}.py;"
    " this test runs optax's own tests with rmsprop_jax swapped in and cannot run without them."
    " Install optax from its PyPI wheel (every release since 0.2.5 ships its tests)."
  )
  if name in REQUIRED or _version(optax.__version__) >= (0, 2, 7):
    pytest.fail(message)
  pytest.skip(f"optax {optax.__version__} predates {name}.py (added in optax 0.2.7)")


def _counted(calls: collections.Counter, name: str, fn):
  """``fn`` that counts its calls (``functools.wraps``: inject_hyperparams reads its signature)."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    calls[name] += 1
    return fn(*args, **kwargs)

  return wrapper


def _tests(suite: unittest.TestSuite):
  for test in suite:
    if isinstance(test, unittest.TestSuite):
      yield from _tests(test)
    else:
      yield test


def _report(result: unittest.TestResult) -> str:
  return "\n\n".join(f"{test}\n{trace}" for test, trace in result.failures + result.errors)


# sharding_test.py builds optax's other optimizers when loaded, noisy_sgd without a key.
@pytest.mark.filterwarnings("ignore:Specifying a key:UserWarning")
# alias_test runs every optax optimizer's tests: slow, run by CI.
@pytest.mark.parametrize(
  "name", [pytest.param(n, marks=pytest.mark.slow) if n == "alias_test" else n for n in SUITES]
)
def test_optax_suite_passes_with_ours(name, monkeypatch):
  path = _test_file(name)
  calls: collections.Counter = collections.Counter()
  for module, attr in SWAPS:
    monkeypatch.setattr(
      importlib.import_module(module), attr, _counted(calls, attr, getattr(rmsprop_jax, attr))
    )
  # sharding_test.py sets XLA_FLAGS when loaded (too late to matter here): restored afterwards.
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))

  # Loaded with ours in place: transform_test and sharding_test build their parameter lists
  # (transform.scale_by_rms, optax.rmsprop(1.0)) when the file is executed.
  spec = importlib.util.spec_from_file_location(f"optax_suite_{name}", path)
  module = importlib.util.module_from_spec(spec)
  monkeypatch.setitem(sys.modules, spec.name, module)
  spec.loader.exec_module(module)

  suite = unittest.defaultTestLoader.loadTestsFromModule(module)
  selected = unittest.TestSuite(t for t in _tests(suite) if SELECT.search(t.id()))
  assert selected.countTestCases() > 0, f"no test in {path} is named after rmsprop or scale_by_rms"
  result = unittest.TextTestRunner(stream=io.StringIO(), verbosity=0).run(selected)

  assert result.wasSuccessful(), f"optax's {path.name} fails with ours:\n{_report(result)}"
  ran = result.testsRun - len(result.skipped)
  assert ran > 0, f"every selected test of {path.name} was skipped: {result.skipped}"
  assert calls[SUITES[name]] > 0, f"{path.name} never called rmsprop_jax.{SUITES[name]}"


def test_an_optax_without_the_test_files_fails_rather_than_skips(monkeypatch):
  monkeypatch.setattr(sys.modules[__name__], "REQUIRED", (*REQUIRED, "no_such_test"))
  with pytest.raises(
    pytest.fail.Exception, match=r"has no _src/no_such_test\.py; this test runs optax's own"
  ):
    _test_file("no_such_test")
