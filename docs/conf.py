"""Sphinx configuration: ``nox -s docs`` builds with warnings as errors."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The docs' examples use the test suite's small models and its toy plugin backend
# (tests.helpers, a package under the repository root).
sys.path.insert(0, str(ROOT))

project = "crosslayer-eq"
author = "the crosslayer-eq developers"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
nitpicky = False
suppress_warnings = ["autodoc.import_object"]

# Docstring examples of the public helpers (cle_core.quality) run with their names.
doctest_global_setup = "import numpy as np\nfrom cle_core.quality import *"
