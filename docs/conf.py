"""Sphinx configuration of the rmsprop-jax documentation.

Build with `bash docs/build.sh`, which runs
`sphinx-build -W -n --keep-going -b html docs docs/_build/html`.
The build is offline: no intersphinx inventory is fetched. References to names of other
packages (JAX, optax, NumPy, orbax, the standard library) that appear in signatures and
docstrings are listed in `nitpick_ignore` below, so that nitpicky mode still fails on every
reference to this package's own names that does not resolve.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the package from this checkout, installed or not
os.environ.setdefault("KERAS_BACKEND", "jax")

import rmsprop_jax  # noqa: E402

project = "rmsprop-jax"
author = "The rmsprop-jax authors"
copyright = "The rmsprop-jax authors"
release = rmsprop_jax.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Markdown: $...$ math, ```{directive} blocks, and anchors for the headings the guides link to.
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# Docstrings are Google style (Args / Returns / Raises / Examples).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": False}
autosummary_generate = False

nitpicky = True
# Names from other packages that appear in signatures and docstrings. Without intersphinx
# (the build must work offline: CI reaches package registries only) Sphinx cannot link them,
# so they are ignored here, package by package; any other unresolved reference, in
# particular to a name of this package, is still an error.
EXTERNAL_PACKAGES = ("jax", "jaxlib", "numpy", "np", "optax", "chex", "orbax", "ocp", "flax")
nitpick_ignore_regex = [
    (r"py:.*", rf"({'|'.join(EXTERNAL_PACKAGES)})(\..*)?"),
    # Python's standard library, as type hints name it.
    (r"py:.*", r"(typing|collections\.abc|os|pathlib)\..*"),
    (r"py:class", r"Any|Callable|Mapping|Sequence|Iterable|NamedTuple|Path|PyTree"),
    (r"py:.*", r"int|float|bool|str|bytes|tuple|dict|list|None|ValueError|TypeError"),
    # Private type aliases named in signatures.
    (r"py:class", r"(_torch_mapping\.)?MatchBy|LeafSlot"),
]
# Single backticks in the docstrings mean code, as in Markdown.
default_role = "literal"
# Attributes sections become fields of the class, not entries that duplicate the NamedTuple
# fields autodoc already lists.
napoleon_use_ivar = True
# Type aliases of the package keep their name in signatures and link to their entry.
autodoc_type_aliases = {"WeightDecayMask": "rmsprop_jax.alias.WeightDecayMask"}

html_theme = "furo"
html_title = f"rmsprop-jax {release}"
html_static_path: list[str] = []

# Docstring markup that does not render yet, keyed by the object's full name: (text, fix).
# Each fix applies to the rendered page only; once the docstring itself is fixed the text is
# gone and the build stops with a reminder to delete the entry here.
DOCSTRING_FIXES: dict[str, tuple[str, str]] = {}


def _fix_docstring(app, what, name, obj, options, lines: list[str]) -> None:
    if name not in DOCSTRING_FIXES:
        return
    text, fix = DOCSTRING_FIXES[name]
    if not any(text in line for line in lines):
        raise RuntimeError(
            f"the docstring of {name} no longer contains {text!r}: delete its entry from "
            "DOCSTRING_FIXES in docs/conf.py"
        )
    lines[:] = [line.replace(text, fix) for line in lines]


def _link_type_aliases(app, env, node, contnode):
    """Links a type alias of this package named in a signature (a `py:class` reference) to
    its `py:data` entry, as Sphinx 8.2 and later do by themselves."""
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or node.get("reftype") != "class":
        return None
    if not target.startswith("rmsprop_jax."):
        return None
    entry = env.get_domain("py").objects.get(target)
    if entry is None or entry.objtype != "data":
        return None
    from sphinx.util.nodes import make_refnode

    return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode)


def setup(app):
    app.connect("missing-reference", _link_type_aliases)
    app.connect("autodoc-process-docstring", _fix_docstring)
