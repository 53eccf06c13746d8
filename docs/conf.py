"""Sphinx configuration of fbackprop's documentation (``make docs``)."""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "src")))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import fbackprop  # noqa: E402

project = "fbackprop"
author = "The fbackprop authors"
copyright = "The fbackprop authors"
release = fbackprop.__version__
version = release

extensions = [
    "myst_parser",            # pages in Markdown (MyST), as in JAX's and optax's docs
    "sphinx.ext.autodoc",     # the API reference from the docstrings
    "sphinx.ext.napoleon",    # Google-style docstrings (Args:, Returns:, Example:)
    "sphinx.ext.viewcode",    # links to the highlighted source
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "README.md"]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
add_module_names = False

html_theme = "sphinx_book_theme"
html_title = f"fbackprop {release}"
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
}
html_static_path = []
