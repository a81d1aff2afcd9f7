"""Sphinx configuration of the jaxrobust documentation.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``
(``pip install -e ".[docs]"`` first). Pages are MyST markdown; the API
reference is generated from the docstrings (autodoc + napoleon, one page per
module through autosummary).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # launch/ and configs/ are not installed; the pages link to them

project = "jaxrobust"
author = "the jaxrobust authors"
copyright = "the jaxrobust authors"  # noqa: A001 -- Sphinx's name

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

myst_enable_extensions = []  # plain CommonMark + tables; `$` stays a dollar sign
myst_heading_anchors = 3

autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
    # Packages re-export their modules' names in ``__all__``; documenting them
    # once, where they are defined, avoids duplicate descriptions.
    "ignore-module-all": True,
}
autodoc_member_order = "bysource"
# Only jaxrobust's own docstrings: flax's Module.setup and the like are not repeated.
autodoc_inherit_docstrings = False
# Annotations written with a module alias (``losses_lib.LossFn``), by what they name.
autodoc_type_aliases = {"losses_lib.LossFn": "jaxrobust.losses.LossFn"}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# ``Attributes:`` sections as fields of the class, not as attribute entries that
# would describe the same name a second time next to autodoc's member entry.
napoleon_use_ivar = True

html_theme = "furo"
html_title = "jaxrobust"

# Every cross-reference must resolve (a misspelt :func: in a docstring fails
# the build). The exceptions are types of third-party packages: this build
# runs offline, so there is no intersphinx inventory to resolve them against.
nitpicky = True
nitpick_ignore_regex = [
    ("py:.*", r"(jax|jaxlib|numpy|np|flax|optax|ml_collections|chex|grain|orbax|tensorflow_datasets"
              r"|tfds|matplotlib|collections\.abc|typing|types|pathlib|os)\..*"),
    # tfds' own annotation of BuilderConfig.version, shown on the embedded builders' configs.
    ("py:class", r"utils\.VersionOrStr"),
    # Private base classes and type variables of jaxrobust named in "Bases:"
    # lines and signatures; they are implementation details, not documented.
    ("py:class", r"jaxrobust\.(\w+\.)*_\w+(\.\w+)*"),
]
