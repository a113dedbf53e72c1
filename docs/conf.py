"""Sphinx configuration for the torchqueue documentation.

Built with ``sphinx-build -W`` (``make docs``, and ``tests/test_docs.py`` in ``make test``), so
every warning fails the build: a broken cross-reference, a page missing from a toctree, or a
public object of the API reference without a docstring (see ``_warn_on_missing_docstring``).
Nothing here reaches the network: no intersphinx inventories, and the notebooks are rendered
as they are in git, without executing them (the test suite executes them).
"""

from __future__ import annotations

import dataclasses
import filecmp
import inspect
import os
import shutil
from pathlib import Path

from sphinx.util import logging

import torchqueue

DOCS = Path(__file__).resolve().parent
NOTEBOOKS = DOCS.parent / "notebooks"
# Copies of ../notebooks/*.ipynb, made on every build (Sphinx reads only files under docs/).
# Ignored by git; docs/notebooks/index.md lists them with a glob, so a new notebook needs no edit,
# but it must open with a Markdown heading (`# Title`): a page without a title fails the build.
NOTEBOOK_COPIES = DOCS / "notebooks" / "generated"

project = "torchqueue"
author = "the torchqueue developers"
copyright = "the torchqueue developers"
release = torchqueue.__version__
version = release

extensions = [
    "myst_nb",  # Markdown pages (it includes myst-parser) and notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]

html_theme = "furo"
html_title = f"torchqueue {release}"

# Markdown (myst-parser, through myst-nb)
myst_heading_anchors = 3  # `[text](#a-heading)` and `[text](page.md#a-heading)` links resolve
myst_enable_extensions = ["colon_fence"]

# Notebooks (myst-nb): rendered with the outputs they have, never executed here.
nb_execution_mode = "off"

# API reference: Google-style docstrings.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True  # show defaults as written, not as object reprs
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
# Members with a docstring are listed; an undocumented public one fails the build (see below).
autodoc_default_options = {"members": True}

# Every cross-reference to a torchqueue object must resolve. References to other libraries'
# types (torch, numpy, the standard library) cannot, without intersphinx inventories from the
# network, so those are ignored.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(?!torchqueue\b).*"),
    (r"py:.*", r"torchqueue\..*\.(T|Chunk)"),  # type variables and aliases, not documented objects
    (r"py:.*", r"torchqueue(\.\w+)*\._\w+"),  # private helpers named in signatures
]

_logger = logging.getLogger(__name__)
_DOCUMENTED_KINDS = {"module", "class", "exception", "function", "method", "property"}


def _own_doc(obj: object) -> str:
    """The docstring ``obj`` itself has (not one a class inherits, nor a dataclass's generated one)."""
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    if isinstance(obj, type) and dataclasses.is_dataclass(obj) and doc and doc.startswith(obj.__name__ + "("):
        return ""
    return doc or ""


def _warn_on_missing_docstring(app, what, name, obj, options, lines):
    """Warn (an error under ``-W``) where a public object of the API reference has no docstring.

    Checks the documented object, and for a class every public method and property it defines
    (``members`` lists only documented ones, so an undocumented one would silently be missing)
    and every dataclass field, which must be described in the class's ``Args:`` or ``Attributes:``
    section.
    """
    if not name.startswith("torchqueue") or any(part.startswith("_") for part in name.split(".")):
        return
    if what in _DOCUMENTED_KINDS and not any(line.strip() for line in lines):
        _logger.warning("%s %s has no docstring", what, name, type="autodoc", subtype="missing_docstring")
    if not isinstance(obj, type):
        return
    special = getattr(options, "special_members", None) or ()  # attribute access: Sphinx 7 to 9
    for member_name, member in vars(obj).items():
        if member_name.startswith("_") and member_name not in special:
            continue
        if isinstance(member, (classmethod, staticmethod)):
            member = member.__func__
        if (inspect.isfunction(member) or isinstance(member, property)) and not inspect.getdoc(member):
            _logger.warning(
                "%s.%s has no docstring", name, member_name, type="autodoc", subtype="missing_docstring"
            )
    if dataclasses.is_dataclass(obj):
        doc = _own_doc(obj)
        for field in dataclasses.fields(obj):
            if not field.name.startswith("_") and f"{field.name}:" not in doc:
                _logger.warning(
                    "%s: field %r is not described in the docstring's Args or Attributes section",
                    name,
                    field.name,
                    type="autodoc",
                    subtype="missing_docstring",
                )


def _copy_notebooks(app, config):
    """Mirror ``../notebooks/*.ipynb`` into ``docs/notebooks/generated/`` (copy new or changed, drop stale)."""
    NOTEBOOK_COPIES.mkdir(parents=True, exist_ok=True)
    sources = {path.name: path for path in sorted(NOTEBOOKS.glob("*.ipynb"))}
    for stale in NOTEBOOK_COPIES.glob("*.ipynb"):
        if stale.name not in sources:
            stale.unlink()
    for name, path in sources.items():
        copy = NOTEBOOK_COPIES / name
        if not copy.exists() or not filecmp.cmp(path, copy, shallow=False):
            partial = copy.with_name(f".{name}.{os.getpid()}.tmp")  # atomic: builds may run side by side
            shutil.copyfile(path, partial)
            os.replace(partial, copy)


def setup(app):
    app.connect("config-inited", _copy_notebooks)
    app.connect("autodoc-process-docstring", _warn_on_missing_docstring)
