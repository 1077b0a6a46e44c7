"""The code of the documentation pages (``docs/*.md``), as the tests run it.

A page runs like one script, top to bottom, in a fresh module that starts with
``import rmsprop_jax``:

- a `````python`` block is executed;
- a `````pycon`` block is a doctest (``>>>`` lines and the output they print,
  checked with ELLIPSIS and NORMALIZE_WHITESPACE; round printed floats);
- a README range that the page shows with ``{include}`` runs where it is shown;
- other fences (`````bash``, `````text``) are not run, and neither is a block
  right under a ``<!-- not run: REASON -->`` line (invisible on GitHub and on
  the site), for a fragment such as a port from a torch model and optimizer.

Tracebacks name the Markdown file and line of the failing code.
"""

from __future__ import annotations

import doctest
import io
import re
import sys
import types
from pathlib import Path
from typing import NamedTuple

import jax

DOCS = Path(__file__).resolve().parent.parent / "docs"

_FENCE = re.compile(r"^(`{3,}|~{3,})\s*(\S*)\s*(.*?)\s*$")
_SECTION = re.compile(r"^## +(.+?)\s*$")
_OPTION = re.compile(r"^:([\w-]+):\s*(.*?)\s*$")
_NOT_RUN = re.compile(r"^\s*<!--\s*not run\b")
RUN = ("python", "pycon")


class Block(NamedTuple):
  path: Path  # the file the code is written in (the page, or the README it includes)
  line: int  # line of the code's first line in that file, from 1
  lang: str  # "python" or "pycon"
  code: str
  section: str  # the page's "## " heading above the block ("" above the first)


def pages() -> list[Path]:
  """The pages of the site: every ``docs/*.md``."""
  return sorted(DOCS.glob("*.md"))


def blocks(page: Path) -> list[Block]:
  """The runnable blocks of ``page``, with those of the README ranges it includes."""
  return _parse(page.read_text(), page, 1, "", sections=True)


def _unquote(value: str) -> str:
  if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
    return value[1:-1]
  return value


def _closing(lines: list[str], start: int, fence: str) -> int:
  """Index of the line that closes a fence opened with ``fence`` (or len(lines))."""
  for j in range(start, len(lines)):
    s = lines[j].strip()
    if s.startswith(fence) and set(s) == {fence[0]}:
      return j
  return len(lines)


def _parse(text: str, path: Path, first_line: int, section: str, sections: bool) -> list[Block]:
  lines = text.splitlines()
  out: list[Block] = []
  i = 0
  while i < len(lines):
    fence = _FENCE.match(lines[i])
    if fence is None:
      heading = _SECTION.match(lines[i]) if sections else None
      section = heading.group(1) if heading else section
      i += 1
      continue
    mark, lang, arg = fence.groups()
    end = _closing(lines, i + 1, mark)
    body = lines[i + 1 : end]
    above = next((line for line in reversed(lines[:i]) if line.strip()), "")
    if lang in RUN and not _NOT_RUN.match(above):
      out.append(Block(path, first_line + i + 1, lang, "\n".join(body) + "\n", section))
    elif lang == "{include}":
      out += _included(path, arg, body, section)
    i = end + 1
  return out


def _included(page: Path, target: str, body: list[str], section: str) -> list[Block]:
  """Blocks of the text a MyST ``{include}`` shows (start-after / end-before)."""
  options = {m.group(1): _unquote(m.group(2)) for m in map(_OPTION.match, body) if m}
  path = (page.parent / target).resolve()
  text = path.read_text()
  start = 0
  if "start-after" in options:
    found = text.find(options["start-after"])
    if found < 0:
      raise ValueError(f"{page.name}: start-after {options['start-after']!r} is not in {path.name}")
    start = found + len(options["start-after"])
  end = len(text)
  if "end-before" in options:
    found = text.find(options["end-before"], start)
    if found < 0:
      raise ValueError(f"{page.name}: end-before {options['end-before']!r} is not in {path.name}")
    end = found
  first_line = text.count("\n", 0, start) + 1
  return _parse(text[start:end], path, first_line, section, sections=False)


def run(code: list[Block], name: str) -> dict:
  """Runs ``code`` in order in a fresh module ``name``; returns its namespace."""
  module = types.ModuleType(name)
  sys.modules[name] = module  # classes defined by the page (dataclasses, nnx.Module) look here
  ns = module.__dict__
  # Pages are user code: JAX's default rank promotion, not the suite's "raise" (conftest.py),
  # which is there to catch silent broadcasts in the package itself.
  try:
    with jax.numpy_rank_promotion("allow"):
      exec("import rmsprop_jax", ns)
      for block in code:
        if block.lang == "python":
          # Padded so that tracebacks show the Markdown file's own line numbers.
          source = "\n" * (block.line - 1) + block.code
          exec(compile(source, str(block.path), "exec"), ns)
        else:
          _doctest(block, ns)
  finally:
    del sys.modules[name]
  return ns


def _doctest(block: Block, ns: dict) -> None:
  where = f"{block.path.name}:{block.line}"
  test = doctest.DocTestParser().get_doctest(block.code, ns, where, str(block.path), block.line - 1)
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  report = io.StringIO()
  runner.run(test, out=report.write, clear_globs=False)
  ns.update(test.globs)
  if runner.failures:
    raise AssertionError(f"doctest at {where} failed:\n{report.getvalue()}")
