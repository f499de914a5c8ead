"""The FAIR chapter's sliders: live in JupyterLab (`make lab`), skipped in batch runs.

Batch runs (the book, the notebook suite) set ``ADNB_BATCH=1``, so the slider code never runs
there. These tests run it: the chapter executes headless with ``ADNB_BATCH=0`` (as in a reader's
JupyterLab, minus the screen) and the sliders must be built and their callback must draw without
error; and JupyterLab must have the widget extension that renders them.
"""

from __future__ import annotations

import re
import subprocess
import sys

import nbformat
import pytest

from adnb.runtime import runner
from adnb.runtime.presets import load_preset

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


@pytest.mark.notebook
def test_fair_sliders_work_headless(tmp_path, monkeypatch):
    import papermill

    source = runner.find_notebook("fair")
    parameters = load_preset("ci", source)
    monkeypatch.setenv("ADNB_BATCH", "0")  # the kernel inherits this: the interactive branch runs
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.delenv("ADNB_RECORD_LOG", raising=False)
    output = tmp_path / source.name
    papermill.execute_notebook(str(source), str(output), parameters=parameters, kernel_name="python3",
                               cwd=str(source.parent), progress_bar=False)

    nb = nbformat.read(output, as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and "widgets.interact" in c.source]
    assert len(cells) == 1, f"expected one slider cell (widgets.interact) in {source.name}, found {len(cells)}"
    assert any(WIDGET_VIEW in out.get("data", {}) for out in cells[0].outputs), \
        "the slider cell displayed no widget with ADNB_BATCH=0: its interactive branch did not run"

    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    sliders = {model["state"].get("description"): model["state"] for model in state.values()
               if model["model_name"] in ("FloatSliderModel", "IntSliderModel")}
    assert {"D0", "order n"} <= set(sliders), f"sliders found: {sorted(sliders)}"
    # A default outside the slider's range would be clamped silently: the first figure would not
    # show the chapter's own D0.
    assert sliders["D0"]["value"] == pytest.approx(parameters.get("d0", 30.0)), \
        f"the D0 slider starts at {sliders['D0']['value']}, not the chapter's d0 (outside {sliders['D0']['min']}–{sliders['D0']['max']}?)"

    # interact() shows the callback's output in an Output widget: a failing callback does not fail
    # the cell, it leaves an error there.
    shown = [out for model in state.values() if model["model_name"] == "OutputModel"
             for out in model["state"].get("outputs", [])]
    errors = [f"{out.get('ename')}: {out.get('evalue')}" for out in shown if out.get("output_type") == "error"]
    assert not errors, f"the slider callback raised: {errors}"
    assert any("image/png" in out.get("data", {}) for out in shown), "the slider callback drew no figure"


def test_jupyterlab_has_the_widget_extension():
    """`make lab` renders ipywidgets only with @jupyter-widgets/jupyterlab-manager (from jupyterlab_widgets)."""
    listing = subprocess.run([sys.executable, "-m", "jupyter", "labextension", "list"], capture_output=True,
                             text=True, timeout=120)
    text = re.sub(r"\x1b\[[0-9;]*m", "", listing.stdout + listing.stderr)  # drop the colour codes
    line = next((ln for ln in text.splitlines() if "@jupyter-widgets/jupyterlab-manager" in ln), None)
    assert line is not None, f"JupyterLab lacks the widget extension (pip install ipywidgets):\n{text}"
    assert "enabled" in line and "OK" in line, f"the widget extension is not enabled and OK: {line.strip()}"
