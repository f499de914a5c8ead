"""The chapters' interactive figures, live: what a reader gets in JupyterLab (`make lab`).

Batch runs (the book, the notebook suite) set ``ADNB_BATCH=1`` and get each interactive figure as
precomputed frames (``tests/test_browser.py`` moves those in the built book). Here every chapter runs
headless with ``ADNB_BATCH=0``, as in a reader's JupyterLab minus the screen, up to its last
interactive figure (at ci, with the models the notebook suite trained in the same ``ADNB_HOME``
loaded from the cache), and a last cell, in the
same kernel, moves every control of every interactive figure the chapter displayed to each other
value of its grid, starting each time from the figure as the chapter showed it: each move must
redraw the views that take that control, with a new picture and no error. And JupyterLab must have
the widget extension that renders them.

The chapter-by-chapter check executes every chapter a second time (about 7 minutes at ci on 2 cores), so it
is opt-in: ``make test-live`` (marker ``live``). ``make test`` covers the same callbacks without it: the book
build calls every view of every figure for every value of its grid (the frames), the browser check moves the
frames, and ``tests/test_interactive.py`` drives the live widgets' wiring headless.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

import nbformat
import pytest

from adnb.runtime import runner
from adnb.runtime.presets import load_preset

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
CHAPTERS = [source for source, _ in runner.toc_chapters()]

# Runs in the chapter's kernel after its last cell; prints one JSON line for the test to read.
DRIVE = '''
import json as _json

from adnb import interactive as _interactive

_moves = []
for _figure in _interactive.SHOWN:
    for _control in _figure.controls:
        _widget = _figure.inputs[_control.name]
        _views = [i for i, v in enumerate(_figure.views) if _control.name in _interactive.view_controls(v)]
        _start = _widget.value
        for _value in _control.values:
            if _value == _start:
                continue
            _before = {i: _figure.last.get(i) for i in _views}
            _widget.value = _value
            _moves.append({"figure": _figure.name, "control": _control.name, "value": repr(_value),
                           "changed": [i for i in _views if _figure.last.get(i) != _before[i]]})
            _widget.value = _start  # each move starts from the figure as the chapter showed it
print("DRIVEN " + _json.dumps({"figures": [f.name for f in _interactive.SHOWN], "live": [bool(f.inputs) for f in _interactive.SHOWN],
                               "errors": [e for f in _interactive.SHOWN for e in f.errors], "moves": _moves}))
'''


@pytest.mark.live
@pytest.mark.parametrize("source", CHAPTERS, ids=lambda p: p.stem)
def test_live_figures_redraw_when_moved(source, tmp_path, monkeypatch):
    import papermill

    nb = nbformat.read(source, as_version=4)
    # The chapter up to its last interactive figure: what follows (every category, ablations) cannot change
    # a figure already shown (test_views_read_no_name_a_later_cell_rebinds), and costs most of the run.
    last = max(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "explore(" in c.source)
    nb.cells = [*nb.cells[:last + 1], nbformat.v4.new_code_cell(DRIVE)]
    driven = tmp_path / source.name
    nbformat.write(nb, driven)
    monkeypatch.setenv("ADNB_BATCH", "0")  # the kernel inherits this: the interactive branch runs
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.delenv("ADNB_RECORD_LOG", raising=False)
    output = tmp_path / f"out_{source.name}"
    papermill.execute_notebook(str(driven), str(output), parameters=load_preset("ci", source), kernel_name="python3",
                               cwd=str(source.parent), progress_bar=False, execution_timeout=1200)

    executed = nbformat.read(output, as_version=4)
    printed = "".join(out.get("text", "") for out in executed.cells[-1].outputs if out.get("output_type") == "stream")
    report = json.loads(printed.split("DRIVEN ", 1)[1])
    assert report["figures"], f"{source.name} displayed no interactive figure (adnb.interactive.explore)"
    assert all(report["live"]), f"{source.name}: figures shown as frames, not widgets, with ADNB_BATCH=0: {report['figures']}"
    explore_cells = [c for c in executed.cells[:-1] if c.cell_type == "code" and "explore(" in c.source]
    for cell in explore_cells:
        assert any(WIDGET_VIEW in out.get("data", {}) for out in cell.outputs), f"no widget displayed by:\n{cell.source[:300]}"
    assert not report["errors"], f"a view raised when its control moved: {report['errors']}"
    assert report["moves"], f"{source.name}: no control has a second value to move to"
    still = [m for m in report["moves"] if not m["changed"]]
    assert not still, f"moving these controls redrew no view with a new picture: {still}"


def _stored_names(source: str) -> set[str]:
    tree = ast.parse(source)
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)} | {
        n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("source", CHAPTERS, ids=lambda p: p.stem)
def test_views_read_no_name_a_later_cell_rebinds(source):
    """A live figure redraws long after its cell ran: a view that reads a global some later cell assigns
    again (``shown = ...`` three sections on) draws from the wrong value, or fails, once the chapter
    has run; the book's frames, drawn at once, would never show it."""
    code = [c.source for c in nbformat.read(source, as_version=4).cells if c.cell_type == "code"]
    for i, cell in enumerate(code):
        if "explore(" not in cell:
            continue
        read: set[str] = set()
        for view in (n for n in ast.parse(cell).body if isinstance(n, ast.FunctionDef)):
            own = {a.arg for a in view.args.args} | {n.id for n in ast.walk(view) if isinstance(n, ast.Name)
                                                      and isinstance(n.ctx, ast.Store)}
            read |= {n.id for n in ast.walk(view) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - own
        rebound = read & set().union(*(_stored_names(later) for later in code[i + 1:]))
        assert not rebound, f"{source.name}: a view of the cell starting {cell[:60]!r} reads {sorted(rebound)}, which later cells assign again"


def test_jupyterlab_has_the_widget_extension():
    """`make lab` renders ipywidgets only with @jupyter-widgets/jupyterlab-manager (from jupyterlab_widgets)."""
    listing = subprocess.run([sys.executable, "-m", "jupyter", "labextension", "list"], capture_output=True,
                             text=True, timeout=120)
    text = re.sub(r"\x1b\[[0-9;]*m", "", listing.stdout + listing.stderr)  # drop the colour codes
    line = next((ln for ln in text.splitlines() if "@jupyter-widgets/jupyterlab-manager" in ln), None)
    assert line is not None, f"JupyterLab lacks the widget extension (pip install ipywidgets):\n{text}"
    assert "enabled" in line and "OK" in line, f"the widget extension is not enabled and OK: {line.strip()}"
