"""Load the interactive figures' script and style on the pages that hold one.

``adnb.interactive`` writes each interactive figure of a chapter as HTML: controls and precomputed
frames. ``_static/adnb-explore.js`` (from ``book/_static``, 2 KB) switches the frames and
``_static/adnb-explore.css`` lays them out. Sphinx adds a file to one page when it is registered
during that page's ``html-page-context``, so pages without such a figure load neither; the pages
that do share the same two files, which a browser fetches once and caches.
"""

from __future__ import annotations

from typing import Any

from docutils import nodes
from sphinx.application import Sphinx

MARKER = 'class="adnb-explore"'  # the <figure> adnb.interactive.Explorer.html writes


def has_explorer(doctree: nodes.document | None) -> bool:
    return doctree is not None and any(MARKER in node.astext() for node in doctree.findall(nodes.raw))


def add_assets(app: Sphinx, pagename: str, templatename: str, context: dict[str, Any], doctree: Any) -> None:
    if has_explorer(doctree):
        app.add_js_file("adnb-explore.js", defer="defer")
        app.add_css_file("adnb-explore.css")


def setup(app: Sphinx) -> dict:
    app.connect("html-page-context", add_assets)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
