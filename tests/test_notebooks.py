"""Every chapter of the book, executed at the ci preset (what `make test` runs after the unit tests).

They run in reading order, so later chapters (the benchmark) find the records of earlier ones.
``ADNB_HOME`` is the one `make` sets, so `make book PRESET=ci` afterwards reuses the data and the
trained ci models instead of training them again.
"""

from __future__ import annotations

import json

import nbformat
import pytest

from adnb.runtime import runner
from adnb.runtime.records import METRIC_KEYS, REQUIRED_KEYS

CHAPTERS = [source for source, _ in runner.toc_chapters()]


@pytest.mark.notebook
@pytest.mark.parametrize("notebook", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_runs_at_ci(notebook, tmp_path):
    result = runner.run_notebook(notebook, preset="ci", output=tmp_path / notebook.name)
    for path in result.records:
        record = json.loads(path.read_text())
        assert set(REQUIRED_KEYS) <= set(record), f"{path} lacks {set(REQUIRED_KEYS) - set(record)}"
        assert record["preset"] == "ci"
        for key in METRIC_KEYS:
            value = record["metrics"][key]
            assert value is None or 0.0 <= value <= 1.0, f"{path}: {key}={value}"
    glued = [output for cell in nbformat.read(result.output, as_version=4).cells if cell.cell_type == "code"
             for output in cell.outputs if "scrapbook" in output.get("metadata", {})]
    for output in glued:
        text = output.data.get(output.metadata.scrapbook.mime_prefix + "text/plain", "")
        assert not text.startswith("np."), f"glue {output.metadata.scrapbook.get('name')} is a numpy repr: {text}"
