"""Every chapter of the book, executed at the ci preset (what `make test` runs after the unit tests).

They run in reading order, so later chapters (the benchmark) find the records of earlier ones.
``ADNB_HOME`` is the one `make` sets, so `make book PRESET=ci` afterwards reuses the data and the
trained ci models instead of training them again.
"""

from __future__ import annotations

import json
import shutil

import nbformat
import pytest

from adnb.recipe import Recipe
from adnb.runtime import paths, runner
from adnb.runtime.notebook import open_categories
from adnb.runtime.records import METRIC_KEYS, REQUIRED_KEYS

CHAPTERS = [source for source, _ in runner.toc_chapters()]


@pytest.fixture(scope="module", autouse=True)
def fresh_ci_records():
    """The chapters' records of an earlier version would meet this version's in the benchmark (which
    refuses two configurations of one method): start from none, as ``make book`` does."""
    shutil.rmtree(paths.results_dir() / "ci" / "embedded", ignore_errors=True)


def assert_cli_resolves_the_same_configuration(records: list) -> None:
    """``python -m adnb train M --preset ci`` on a record's category would train the record's configuration:
    the chapter and the command line share one recipe, so their config hashes agree."""
    for path in records:
        record = json.loads(path.read_text())
        if record.get("variant") or record["dataset"] != "embedded":
            continue  # a variant is a chapter's override of the preset (its own test covers it)
        recipe = Recipe.from_preset(record["method"], "ci", device="cpu")
        category = open_categories("", record["category"])[0]
        config = recipe.config(category)
        assert recipe.config_hash(config, recipe.prepare(config, category)) == record["config_hash"], path


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
    assert_cli_resolves_the_same_configuration(result.records)
    glued = [output for cell in nbformat.read(result.output, as_version=4).cells if cell.cell_type == "code"
             for output in cell.outputs if "scrapbook" in output.get("metadata", {})]
    for output in glued:
        text = output.data.get(output.metadata.scrapbook.mime_prefix + "text/plain", "")
        assert not text.startswith("np."), f"glue {output.metadata.scrapbook.get('name')} is a numpy repr: {text}"
