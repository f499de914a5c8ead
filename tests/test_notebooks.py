"""Every chapter of the book, executed at the ci preset and checked: records written, glue as plain
values, no error output, the command line's configuration.

Each chapter is executed once per check: when ``make book PRESET=ci`` has just built the book from the
notebooks and package as they are (``runner.current_book``; ``.ci/run`` builds the book first), these
tests read its executed chapters; otherwise (a fresh clone, an edited notebook) they execute every
chapter as the book build does (``runner.build``, into a folder of their own: the book's pages are left
alone), in reading order, so later chapters (the benchmark) find the records of earlier ones.
``ADNB_HOME`` is the one `make` sets, so a later `make book PRESET=ci` reuses the data and the trained
ci models instead of training them again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pytest

from adnb.recipe import Recipe
from adnb.runtime import runner
from adnb.runtime.notebook import open_categories
from adnb.runtime.records import METRIC_KEYS, REQUIRED_KEYS

CHAPTERS = [source for source, _ in runner.toc_chapters()]
FIXTURE = Path(__file__).parent / "fixtures" / "tiny_chapter.ipynb"


@pytest.fixture(scope="session")
def ci_book(tmp_path_factory) -> dict[str, runner.RunResult]:
    """Every chapter's run at ci, by notebook stem: the current book's, or executed now."""
    results = runner.current_book("ci") or runner.build("ci", into=tmp_path_factory.mktemp("chapters"))
    return {result.notebook.stem: result for result in results}


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
def test_chapter_runs_at_ci(notebook, ci_book):
    result = ci_book[notebook.stem]
    for path in result.records:
        record = json.loads(path.read_text())
        assert set(REQUIRED_KEYS) <= set(record), f"{path} lacks {set(REQUIRED_KEYS) - set(record)}"
        assert record["preset"] == "ci"
        for key in METRIC_KEYS:
            value = record["metrics"][key]
            assert value is None or 0.0 <= value <= 1.0, f"{path}: {key}={value}"
    assert_cli_resolves_the_same_configuration(result.records)
    cells = [cell for cell in nbformat.read(result.output, as_version=4).cells if cell.cell_type == "code"]
    errors = [output for cell in cells for output in cell.outputs if output.output_type == "error"]
    assert not errors, f"{result.output}: {errors[0].ename}: {errors[0].evalue}"
    glued = [output for cell in cells for output in cell.outputs if "scrapbook" in output.get("metadata", {})]
    for output in glued:
        text = output.data.get(output.metadata.scrapbook.mime_prefix + "text/plain", "")
        assert not text.startswith("np."), f"glue {output.metadata.scrapbook.get('name')} is a numpy repr: {text}"


def test_a_built_chapter_is_current_only_while_its_inputs_and_records_are(tmp_path, monkeypatch):
    """What lets these tests read the book instead of executing it again: a chapter built at a preset is
    current until its notebook (or one before it, or the package) changes or a record it wrote is gone."""
    monkeypatch.setenv("ADNB_HOME", str(tmp_path / "home"))
    source = tmp_path / "notebooks" / FIXTURE.name
    source.parent.mkdir()
    shutil.copy(FIXTURE, source)
    monkeypatch.setattr(runner, "toc_chapters", lambda: [(source, tmp_path / "chapters" / FIXTURE.name)])
    [built] = runner.build("ci")
    [current] = runner.current_book("ci")
    assert (current.output, current.records) == (built.output, built.records) and built.records
    assert runner.current_book("cpu") is None
    built.records[0].unlink()
    assert runner.current_book("ci") is None
    runner.build("ci")
    source.write_text(source.read_text().replace("steps", "steps ", 1))
    assert runner.current_book("ci") is None
