"""Sphinx configuration for the sortpool_ref documentation.

Build locally with warnings as errors, as CI does::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Pages are Markdown (MyST) with ``$...$`` / ``$$...$$`` math; the API page
pulls the numpydoc docstrings in with autodoc. Importing ``sortpool_ref``
needs NumPy only (no CuPy, no compilation), so the site builds anywhere.
"""

from __future__ import annotations

import os
import sys

# Document the source tree this file lives in, even without an install.
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

import sortpool_ref  # noqa: E402

project = "sortpool_ref"
author = "the sortpool_ref authors"
copyright = "the sortpool_ref authors"
version = sortpool_ref.__version__
release = sortpool_ref.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "numpydoc",
]

root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list = []

# MyST: $inline$ and $$display$$ math, \begin{aligned} blocks, ::: fences,
# and (label)= targets usable as {ref}`label` across pages.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

# numpydoc renders the Parameters/Returns/Notes sections. The API page lists
# class members itself, so numpydoc must not add autosummary tables (they
# would need stub pages and warn under -W).
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the numpydoc sections already give the types

html_theme = "alabaster"
html_static_path = ["_static"]
html_title = f"sortpool_ref {release}"
html_css_files = ["custom.css"]
