"""Sphinx configuration of the gradclip_jax documentation.

Why Sphinx (as optax does) rather than MkDocs: the docstrings follow optax's conventions,
Google sections with reST markup (``:func:`...```, double-backtick literals, reST links),
which autodoc and napoleon render as they are and, with ``nitpicky``, cross-check;
mkdocstrings would print the roles verbatim. MyST keeps the guide pages in Markdown,
readable on GitHub as they are.

Build (warnings are errors, as in CI, where ``tests/test_docs.py`` runs it; the same
test runs every ``python`` block of the pages)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import gradclip_jax

project = "gradclip_jax"
author = "gradclip_jax developers"
copyright = "2026, gradclip_jax developers"  # noqa: A001 (Sphinx's name)
release = gradclip_jax.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Markdown pages: ``$...$`` maths, ``:::`` fences, heading anchors for ``#section`` links.
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# Docstrings are Google style with reST markup, like optax's (napoleon reads the
# Args / Returns / References / Examples sections).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = [("References", "notes_style")]
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True

# Every internal cross-reference must resolve: a renamed function breaks the build.
# Names from jax, optax, numpy and typing are not linked (the build is offline, so no
# intersphinx inventories), and are ignored.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jnp|optax|np|numpy|nnx|flax|chex|typing|collections)(\..*)?"),
    (r"py:.*", r"(Any|Callable|Sequence|Iterable|Literal|NamedTuple|Protocol|TypeVar)"),
    (r"py:.*", r"(gradclip_jax\.rules\.)?(State|Array|PyTree|ArrayTree|Params|Updates|OptState)"),
    (r"py:.*", r"(int|float|bool|str|tuple|list|dict|None|type|object)"),
]

html_theme = "furo"
html_title = f"gradclip_jax {release}"
html_static_path = ["_static"]
pygments_style = "sphinx"
