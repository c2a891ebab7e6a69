"""Sphinx configuration of the captum_sam documentation.

Build with ``make docs`` or ``sphinx-build -W -b html docs docs/_build/html``.
The tutorials in ``tutorials/`` are executed by sphinx-gallery during the build;
``sphinx-build -D plot_gallery=0 ...`` renders them without running them.
"""

from __future__ import annotations

import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root, for `import captum_sam`

import torch  # noqa: E402

import captum_sam  # noqa: E402

# The tutorials run inside this process. Their models are tiny, so one intra-op
# thread is as fast as several and does not slow down on a busy machine (several
# threads competing for a shared core can make a tutorial many times slower).
torch.set_num_threads(1)

# -- Project -----------------------------------------------------------------------

project = "captum_sam"
author = "the captum_sam developers"
copyright = "the captum_sam developers"
version = release = captum_sam.__version__

# -- General -----------------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
]

# MathJax: served from the build itself when the offline package is installed (it is
# part of the `docs` extra), so the pages render formulas without network access;
# otherwise Sphinx's default CDN copy is used.
if importlib.util.find_spec("sphinx-mathjax-offline") is not None:
    extensions.append("sphinx-mathjax-offline")

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
default_role = "py:obj"
pygments_style = "sphinx"
pygments_dark_style = "monokai"

# -- autodoc / napoleon ------------------------------------------------------------

autodoc_default_options = {
    "members": True,
    "member-order": "bysource",
}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_typehints_format = "short"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True
add_module_names = False
python_use_unqualified_type_names = True

# -- HTML --------------------------------------------------------------------------

html_theme = "furo"
html_title = f"captum_sam {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "sidebar_hide_name": False,
    "navigation_with_keys": True,
}
html_show_sourcelink = False

# -- sphinx-gallery ----------------------------------------------------------------
#
# Output goes to paths that .gitignore already lists: docs/auto_tutorials/,
# docs/gen_modules/ and docs/sg_execution_times.rst.

sphinx_gallery_conf = {
    "examples_dirs": os.path.join(os.pardir, "tutorials"),
    "gallery_dirs": "auto_tutorials",
    "filename_pattern": r"/plot_",
    "within_subsection_order": "FileNameSortKey",
    "backreferences_dir": os.path.join("gen_modules", "backreferences"),
    "doc_module": ("captum_sam",),
    "download_all_examples": True,
    "remove_config_comments": True,
    "image_scrapers": ("matplotlib",),
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
}


# -- Cross-references to re-exported names ------------------------------------------
#
# Objects are documented once, under the name users import them by (for example
# ``captum_sam.SAMTracInCP`` rather than ``captum_sam.tracincp.SAMTracInCP``).
# Docstrings sometimes spell the defining module; resolve such a reference to the
# documented object with the same final name inside the package.


def _resolve_reexport(app, env, node, contnode):  # type: ignore[no-untyped-def]
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    module = node.get("py:module") or ""
    domain = env.get_domain("py")
    if target.startswith("captum_sam."):
        short = target.rsplit(".", 1)[-1]
        matches = [
            name
            for name in domain.objects
            if name.startswith("captum_sam.") and name.rsplit(".", 1)[-1] == short
        ]
    elif module.startswith("captum_sam"):
        # a short name written inside a module whose objects are documented under the
        # package that re-exports them (``train_sam`` in captum_sam.trajectory)
        matches = [name for name in domain.objects if name.endswith("." + target)]
        matches = [name for name in matches if name.startswith("captum_sam.")]
    else:
        return None
    if not matches:
        return None
    # the documented object whose module path is closest to the one written
    best = max(matches, key=lambda name: len(os.path.commonprefix([name, module + "." + target])))
    builder, doc = app.builder, node.get("refdoc")
    for role in (node.get("reftype"), "obj"):
        found = domain.resolve_xref(env, doc, builder, role, best, node, contnode)
        if found is not None:
            return found
    return None


def _skip_namedtuple_fields(app, what, name, obj, skip, options):  # type: ignore[no-untyped-def]
    # NamedTuple fields carry Python's "Alias for field number N" docstring; their
    # meaning is already in the class's Attributes section, so don't list them twice.
    doc = getattr(obj, "__doc__", None) or ""
    if what == "class" and doc.startswith("Alias for field number"):
        return True
    return None


def _public_bases(app, name, obj, options, bases):  # type: ignore[no-untyped-def]
    # implementation mixins (captum_sam._*) say nothing to a reader of "Bases:"
    bases[:] = [b for b in bases if not b.__module__.startswith("captum_sam._")]


def setup(app):  # type: ignore[no-untyped-def]
    app.connect("missing-reference", _resolve_reexport)
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
    app.connect("autodoc-process-bases", _public_bases)
