"""Sphinx configuration: MyST pages, the notebooks as stored, the API from the docstrings.

Build (see the README): ``sphinx-build -W -b html docs docs/_build/html``.
"""

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # document the checkout being built, whatever is installed

import rmsprop_jax  # noqa: E402

project = "rmsprop_jax"
author = "rmsprop_jax developers"
copyright = "the rmsprop_jax developers"
release = version = rmsprop_jax.__version__

extensions = [
  "myst_nb",  # Markdown pages (MyST) and notebooks
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",  # Google-style Args / Returns / Example sections
  "sphinx.ext.mathjax",
  # MathJax 3 bundled with the site (_static/mathjax), so formulas render with no network.
  "sphinx-mathjax-offline",
]
# The bundled copy (sphinx-mathjax-offline sets the same path; said here so the build does
# not depend on the order in which extensions are set up).
mathjax_path = "mathjax/tex-chtml.js"

root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
templates_path = ["_templates"]

# Pages: Markdown with $math$ (the notebooks' cells use it) and ::: fences.
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# Notebooks: CI executes them (pytest --nbmake); the site shows the outputs stored in them.
nb_execution_mode = "off"
# notebooks/*.ipynb are mirrored here at build time (see _mirror_notebooks): a Sphinx source
# must lie under docs/, and the notebooks stay where CI runs them, in one copy under git.
NOTEBOOKS = "_collections/notebooks"

# Reference pages: one per public name, generated from the docstrings (docs/api.md lists the
# names; tests/test_docs.py fails when a public name is missing there).
autosummary_generate = True
# Signatures without annotations: optax's and jax's aliases (ScalarOrSchedule, ArrayLike) expand
# into unions of a dozen types that bury the arguments; each Args entry says what it accepts.
autodoc_typehints = "none"
autodoc_preserve_defaults = True  # defaults as written in the source, not their repr
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# A reference to a name of ours (rmsprop_jax.…) with no page (renamed, a typo) fails the build.
# Other packages' names (jax, optax, numpy, ...) have no pages here and are left as plain text
# (linking them would need intersphinx, which downloads their inventories at build time).
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"(?!rmsprop_jax\b).*")]

suppress_warnings = [
  # The only warning of this category: a heading level skipped. Pages show README sections
  # one level up (docs/porting.md's "#" title stands for the README's "## Porting ..."), so a
  # "###" subsection of such a section lands two levels under the page's title. MyST's
  # include has no negative heading-offset. A skipped level only changes a heading's font
  # size; the table of contents nests by order all the same.
  "myst.header",
]

html_theme = "sphinx_book_theme"
html_title = "rmsprop_jax"
# Code cells, long signatures and wide tables wrap to the page width instead of scrolling.
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
  "show_toc_level": 2,
  "navigation_with_keys": False,
}


def _mirror_notebooks(app) -> None:
  """Copy notebooks/*.ipynb to docs/_collections/notebooks (git-ignored), as optax does.

  ``copy2`` keeps the modification times, so an incremental build re-reads only the
  notebooks that changed; the folder is emptied first, so a removed notebook goes too.
  """
  dst = Path(app.srcdir) / NOTEBOOKS
  shutil.rmtree(dst, ignore_errors=True)
  dst.mkdir(parents=True)
  for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
    shutil.copy2(nb, dst / nb.name)


def _clear_api_stubs(app, config) -> None:
  """Start autosummary from an empty docs/_autosummary: a stub left by a name since taken off
  docs/api.md would be a page in no table of contents, a warning under -W."""
  shutil.rmtree(Path(app.srcdir) / "_autosummary", ignore_errors=True)


def setup(app):
  app.connect("config-inited", _clear_api_stubs)  # before autosummary writes the stubs
  app.connect("builder-inited", _mirror_notebooks)
