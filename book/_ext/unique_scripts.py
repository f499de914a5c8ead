"""Write each <script> of a page once.

Jupyter Book's sphinx-thebe and sphinx-togglebutton add inline scripts after the HTML builder has
been set up, so Sphinx 7 lists each twice: once from its registry (file name ``''``) and once from
the builder (file name ``None``); its own duplicate check sees two different scripts. For
sphinx-thebe's ``const THEBE_JS_URL = ...`` the second copy is a SyntaxError in every page's
console. Scripts equal up to that spelling and their priority are written once, at the earliest.
"""

from __future__ import annotations

from typing import Any

from sphinx.application import Sphinx


def drop_repeated_scripts(app: Sphinx, pagename: str, templatename: str, context: dict[str, Any], doctree: Any) -> None:
    scripts = context.get("script_files")
    if not isinstance(scripts, list):
        return
    first: dict[tuple, Any] = {}
    for js in scripts:
        key = (str(getattr(js, "filename", js) or ""), tuple(sorted(getattr(js, "attributes", {}).items())))
        if key not in first or getattr(js, "priority", 500) < getattr(first[key], "priority", 500):
            first[key] = js
    kept = set(map(id, first.values()))
    scripts[:] = [js for js in scripts if id(js) in kept]  # in place: Sphinx restores the list after the page


def setup(app: Sphinx) -> dict:
    app.connect("html-page-context", drop_repeated_scripts, priority=900)  # after every extension added its scripts
    return {"parallel_read_safe": True, "parallel_write_safe": True}
