"""The documentation site: its pages' code runs, and every public name has a reference page.

Needs no Sphinx: the pages are read as Markdown (see ``docs_code``). The site itself is built,
warnings as errors, by ``.ci/run``.
"""

import importlib
import importlib.util
import inspect
import re

import pytest
from docs_code import DOCS, blocks, pages, run

import rmsprop_jax

# Pages whose code a dedicated test runs (with checks of its own).
RUN_ELSEWHERE = {"integrations.md": "tests/test_integrations.py"}

# Public modules that need not be in rmsprop_jax.__all__; documented once they exist.
OPTIONAL_MODULES = ("interop", "xla_stats")

_RUNNABLE = [p for p in pages() if p.name not in RUN_ELSEWHERE and blocks(p)]


@pytest.mark.parametrize("page", _RUNNABLE, ids=lambda p: p.name)
def test_the_code_of_the_page_runs(page):
  run(blocks(page), f"docs_{page.stem}")


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_the_readme_ranges_the_page_includes_exist(page):
  blocks(page)  # raises when a start-after / end-before marker is not in the README


def test_pages_run_elsewhere_have_code():
  for name in RUN_ELSEWHERE:
    assert blocks(DOCS / name), f"docs/{name} has no code for {RUN_ELSEWHERE[name]} to run"


# ----------------------------------------------------------------- API reference

_CURRENT = re.compile(r"^\s*\.\. (?:current)?module:: *([\w.]+)\s*$")
_AUTOSUMMARY = re.compile(r"^(\s*)\.\. autosummary::")
_ITEM = re.compile(r"^\s+~?([A-Za-z_][\w.]*)\s*$")


def documented_names() -> list[str]:
  """Full names of the objects with a reference page (the autosummary lists of docs/api.md)."""
  names, module, inside = [], "", False
  for line in (DOCS / "api.md").read_text().splitlines():
    if m := _CURRENT.match(line):
      module, inside = m.group(1), False
    elif _AUTOSUMMARY.match(line):
      inside = True
    elif inside and line.strip() and not line[0].isspace():
      inside = False  # the end of the indented block (the closing fence)
    elif inside and not line.strip().startswith(":") and (m := _ITEM.match(line)):
      names.append(f"{module}.{m.group(1)}" if module else m.group(1))
  return names


def _resolve(name: str):
  parts = name.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ImportError:
      continue
    for attr in parts[i:]:
      obj = getattr(obj, attr)
    return obj
  raise ImportError(name)


def _module_members(module) -> list[str]:
  if hasattr(module, "__all__"):
    return list(module.__all__)
  return [
    n
    for n, v in vars(module).items()
    if not n.startswith("_")
    and (inspect.isfunction(v) or inspect.isclass(v))
    and v.__module__ == module.__name__
  ]


def public_names() -> list[str]:
  """``rmsprop_jax.__all__``, and the public members of each public module."""
  names, modules = [], []
  for n in rmsprop_jax.__all__:
    names.append(f"rmsprop_jax.{n}")
    if inspect.ismodule(getattr(rmsprop_jax, n)):
      modules.append(getattr(rmsprop_jax, n))
  for n in OPTIONAL_MODULES:
    if n not in rmsprop_jax.__all__ and importlib.util.find_spec(f"rmsprop_jax.{n}"):
      modules.append(importlib.import_module(f"rmsprop_jax.{n}"))
      names.append(f"rmsprop_jax.{n}")
  for module in modules:
    names += [f"{module.__name__}.{n}" for n in _module_members(module)]
  return names


def test_the_reference_lists_resolve():
  names = documented_names()
  assert "rmsprop_jax.rmsprop" in names and "rmsprop_jax.presets.pytorch" in names, names
  for name in names:
    _resolve(name)  # an unknown name fails here before it fails the Sphinx build


def test_every_public_name_has_a_reference_page():
  # One page per object: rmsprop_jax.effective_learning_rate also covers
  # rmsprop_jax.diagnostics.effective_learning_rate.
  documented = {id(_resolve(n)) for n in documented_names()}
  missing = [n for n in public_names() if id(_resolve(n)) not in documented]
  assert not missing, f"no reference page for {missing}: add each to an autosummary list in docs/api.md"
