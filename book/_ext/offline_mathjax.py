"""Serve MathJax from the built book instead of a CDN, so formulas render with no network.

Sphinx loads MathJax 3 from a CDN by default; a book opened offline (a CI artifact, a laptop on a
train) then shows raw ``\\(D(u, v)\\)``. This extension copies the browser build of MathJax 3.2.2
into ``_static/mathjax/`` of the HTML output and points ``mathjax_path`` at it (a path relative to
``_static``, so the same pages work online, offline and from any sub-folder).

The copy comes from the pinned PyPI package ``django-static-mathjax`` (requirements.txt): it is
the upstream MathJax distribution as plain static files under ``mathjax/static/mathjax/`` and
needs no Django; nothing of it is imported, only its files are read.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.errors import ExtensionError

# Sphinx's own default component: TeX and MathML input, CommonHTML output. It bundles the TeX
# packages MyST's dollarmath and amsmath need (ams, newcommand, ...); extensions it may autoload
# and the fonts are read at run time from the folders copied beside it.
BUNDLE = "tex-mml-chtml.js"
# The other single-file builds of es5/ (the SVG output, Node's entry point, the CDN's "latest"
# loader) are never requested by BUNDLE: leaving them out halves the copy.
UNUSED = {"latest.js", "node-main.js", "mml-chtml.js", "mml-svg.js", "tex-chtml.js", "tex-chtml-full.js",
          "tex-chtml-full-speech.js", "tex-mml-svg.js", "tex-svg.js", "tex-svg-full.js"}
TARGET = "mathjax"  # under _static/


def mathjax_es5() -> Path:
    """The ``es5`` folder (MathJax's browser build) of the installed django-static-mathjax."""
    spec = importlib.util.find_spec("mathjax")
    locations = list(spec.submodule_search_locations or []) if spec else []
    es5 = Path(locations[0]) / "static" / "mathjax" / "es5" if locations else None
    if es5 is None or not (es5 / BUNDLE).is_file():
        raise ExtensionError("MathJax is served from the book itself, but its files were not found: "
                             "install the pinned requirements (pip install -r requirements.txt, which "
                             "brings django-static-mathjax)")
    return es5


def use_local_mathjax(app: Sphinx, config: Config) -> None:
    mathjax_es5()  # fail at the start of the build, not after every page is written
    config.mathjax_path = f"{TARGET}/{BUNDLE}"


def copy_mathjax(app: Sphinx, exc: Exception | None) -> None:
    if exc is not None or app.builder.format != "html":
        return
    destination = Path(app.outdir) / "_static" / TARGET
    source = mathjax_es5()
    shutil.copytree(source, destination, dirs_exist_ok=True,
                    ignore=lambda folder, names: UNUSED if Path(folder) == source else set())
    shutil.copy2(source.parent / "LICENSE", destination / "LICENSE")


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", use_local_mathjax)
    app.connect("build-finished", copy_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
