"""The README: short, its code run by the docs tests, its links to existing files.

The README's code runs where a docs page shows it (``{include}`` ranges, see ``docs_code``);
these checks make sure no README block falls outside every range, where nothing would run it.
"""

import re
from pathlib import Path

from docs_code import Block, blocks, pages

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_BYTES = 15_000

_FENCE = re.compile(r"^(`{3,})(\S*)")
_NOT_RUN = re.compile(r"^\s*<!--\s*not run\b")
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def readme_code() -> list[int]:
  """First lines (from 1) of the README's python and pycon blocks not marked ``not run``."""
  lines = README.read_text().splitlines()
  out, i = [], 0
  while i < len(lines):
    m = _FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    above = next((line for line in reversed(lines[:i]) if line.strip()), "")
    if m.group(2) in ("python", "pycon") and not _NOT_RUN.match(above):
      out.append(i + 2)
    j = i + 1
    while not lines[j].startswith(m.group(1)):
      j += 1
    i = j + 1
  return out


def test_the_readme_is_short():
  size = len(README.read_bytes())
  assert size <= MAX_BYTES, f"README.md is {size} bytes; move detail to a docs page (at most {MAX_BYTES})"


def test_every_readme_code_block_runs_on_a_docs_page():
  shown: list[Block] = [b for page in pages() for b in blocks(page) if b.path == README]
  run_lines = {b.line for b in shown}
  missing = [line for line in readme_code() if line not in run_lines]
  assert readme_code(), "the README has no code to check"
  assert not missing, f"README.md code at lines {missing} lies in no range a docs page includes"


def test_the_readme_links_to_files_that_exist():
  targets = [t for t in _LINK.findall(README.read_text()) if "://" not in t]
  assert any(t.startswith("docs/") for t in targets)
  missing = [t for t in targets if not (ROOT / t).exists()]
  assert not missing, f"README.md links to missing files: {missing}"
