"""Sphinx configuration for the jaxopt2 documentation.

Why Sphinx: the library's docstrings are Google style with reStructuredText inside them,
``.. math::`` directives and roles such as ``:func:``. Sphinx renders those natively (autodoc
reads the docstrings, napoleon turns the Google sections into reStructuredText, mathjax shows
the equations); a Markdown-first generator such as mkdocstrings would not render the
reStructuredText directives and roles. The guide pages are Markdown, read by myst-parser.

Build (offline; the browser loads MathJax from a CDN when the pages are viewed):

    pip install -e '.[docs]'
    python -m sphinx -W --keep-going -b html docs docs/_build/html

The API pages list every public name by hand (docs/api/*.rst); autosummary writes one stub
page per name at build time into docs/api/generated/ (gitignored), and
tests/test_docs_site.py checks that every name in the public ``__all__`` lists is documented.

Offline equations: set JAXOPT2_DOCS_MATHJAX to a local MathJax 2 folder (Debian's
``libjs-mathjax`` installs one at /usr/share/javascript/mathjax) and the pages load MathJax
from there instead of the CDN.
"""

import os
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sphinx.util import logging  # noqa: E402

import jaxopt2  # noqa: E402

logger = logging.getLogger(__name__)

project = "jaxopt2"
author = "The jaxopt2 authors"
copyright = "The jaxopt2 authors"
release = jaxopt2.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "README.md"]

# Markdown: $...$ and $$...$$ math, ::: fences for directives, heading anchors for links.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

# API reference: stubs generated from the autosummary tables at build time.
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": False}
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# The docstrings' ``code`` is code; bare `text` too.
default_role = "code"

html_theme = "furo"
html_title = f"jaxopt2 {release}"
html_static_path = []

_local_mathjax = os.environ.get("JAXOPT2_DOCS_MATHJAX")
if _local_mathjax and pathlib.Path(_local_mathjax, "MathJax.js").is_file():
    # MathJax 2 (Debian's libjs-mathjax): its TeX config reads \(...\) and \[...\], the
    # delimiters Sphinx writes. myst-parser's MathJax settings are MathJax 3's (a page-wide
    # ignore class that MathJax 2 would apply to every equation), so they are off here.
    mathjax_path = (
        pathlib.Path(_local_mathjax, "MathJax.js").as_uri() + "?config=TeX-AMS-MML_HTMLorMML"
    )
    myst_update_mathjax = False
    mathjax2_config = {"tex2jax": {"processEscapes": True}}


def _docstring(app, what, name, obj, options, lines):
    """Docstrings that are not ours: optax's re-exports and the values of plain constants."""
    module = getattr(obj, "__module__", None) or ""
    if what in ("function", "class") and module.split(".")[0] == "optax":
        public = module.split("._")[0]  # optax._src.alias -> optax; optax.contrib._muon -> ...
        lines[:] = [
            f"optax's ``{public}.{obj.__name__}``, re-exported unchanged "
            f"(``{name} is {public}.{obj.__name__}``); see optax's documentation for its "
            "arguments. Its registry entry checks the hyperparameters a config passes.",
        ]
    elif what == "data" and lines and type(obj).__doc__ and obj.__doc__ == type(obj).__doc__:
        lines[:] = []  # a dict or tuple constant: the docstring would be dict's or tuple's


def _note_canonical_once():
    """One class under two public names (``jaxopt2.Solution``, ``jaxopt2.solvers.Solution``)
    gives its one canonical name twice; keep the first instead of warning."""
    from sphinx.domains.python import PythonDomain

    note_object = PythonDomain.note_object

    def note_object_once(self, name, objtype, node_id, aliased=False, location=None):
        other = self.objects.get(name)
        if aliased and other is not None and other.aliased:
            return
        note_object(self, name, objtype, node_id, aliased=aliased, location=location)

    PythonDomain.note_object = note_object_once


def _fresh_stubs(app):
    """Stubs of names no longer listed would be pages outside every toctree (a warning):
    remove the generated folder before autosummary writes it again."""
    shutil.rmtree(pathlib.Path(app.srcdir, "api", "generated"), ignore_errors=True)


def _guide_reference_missing(app, env, node, contnode):
    """A guide page's reference to a jaxopt2 name that the API reference lacks is an error.

    Sphinx reports unresolved Python references only in nitpicky mode, which would also flag
    every type hint into numpy, jax and optax; this checks the guide pages' own references."""
    target = node.get("reftarget", "")
    written_in_a_page = (node.source or "").endswith(".md")  # not in a docstring
    if node.get("refdomain") == "py" and target.startswith("jaxopt2") and written_in_a_page:
        logger.warning(f"reference target not found: {target}", location=node)


def setup(app):
    app.connect("missing-reference", _guide_reference_missing)
    app.connect("builder-inited", _fresh_stubs, priority=0)  # before autosummary's (500)
    app.connect("autodoc-process-docstring", _docstring)
    _note_canonical_once()
