"""The runner, the presets and the rules every source notebook follows."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
import yaml

from adnb import cli
from adnb.runtime import presets, runner
from adnb.runtime.errors import AdnbError
from adnb.runtime.paths import REPO_ROOT

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_chapter.ipynb"
NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ADNB_HOME", str(tmp_path / "home"))


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(AdnbError, match="valid presets: ci, cpu, full"):
        runner.run_notebook(FIXTURE, preset="nope")


def test_unknown_parameter_lists_the_valid_ones():
    with pytest.raises(AdnbError, match="unknown parameter.*stepz.*valid: fail, preset, steps"):
        runner.run_notebook(FIXTURE, preset="ci", parameters={"stepz": 1})


def test_wrong_type_names_the_parameter_and_its_type():
    with pytest.raises(AdnbError, match="steps='many'.*should be int"):
        runner.run_notebook(FIXTURE, preset="ci", parameters={"steps": "many"})


def test_a_run_returns_its_records_and_hides_the_injected_cell(tmp_path):
    result = runner.run_notebook(FIXTURE, preset="ci", parameters={"steps": 4}, output=tmp_path / "out.ipynb")
    assert [p.name for p in result.records] == ["tiny-fixture.json"]  # method, then its config hash ("fixture")
    assert json.loads(result.records[0].read_text())["preset"] == "ci"
    nb = nbformat.read(result.output, as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "hide-cell" in injected[0].metadata.tags
    assert "steps = 4" in injected[0].source


def test_a_failing_cell_names_the_notebook_and_the_cell(tmp_path, capsys):
    code = cli.main(["run", str(FIXTURE), "--preset", "ci", "-p", "fail", "true", "--output", str(tmp_path / "o.ipynb")])
    err = capsys.readouterr().err
    assert code == 2
    assert "tiny_chapter.ipynb failed in cell" in err and "ValueError: asked to fail" in err and "if fail:" in err
    assert (tmp_path / "o.ipynb").is_file()  # papermill keeps the notebook with the traceback


def test_finalize_removes_widget_debris(tmp_path):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("w")
    cell.outputs = [nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "x"}, "text/plain": "HBox(children=...)"})]
    nb.cells = [cell]
    nb.metadata["widgets"] = {"state": {}}
    path = tmp_path / "w.ipynb"
    nbformat.write(nb, path)
    runner.finalize(path)
    cleaned = nbformat.read(path, as_version=4)
    assert cleaned.cells[0].outputs == [] and "widgets" not in cleaned.metadata


def test_find_notebook_by_chapter_name_and_clear_error():
    assert runner.find_notebook("data").name == "01_data_and_evaluation.ipynb"
    with pytest.raises(AdnbError, match="chapters:"):
        runner.find_notebook("no_such_chapter")


def test_toc_lists_every_source_notebook_once():
    sources = [src for src, _ in runner.toc_chapters()]
    assert sorted(sources) == NOTEBOOKS and len(set(sources)) == len(sources)


def test_cli_help_works_for_every_command(capsys):
    for command in (["--help"], ["run", "--help"], ["book", "--help"], ["data", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(command)
        assert exit_.value.code == 0
    assert "python -m adnb" in capsys.readouterr().out


# --------------------------------------------------------------------------- rules for the source notebooks


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_source_notebook_is_clean_and_parameterised(notebook):
    nb = nbformat.read(notebook, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "store notebooks without outputs"
    assert nb.metadata.kernelspec.name == "python3"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[0], "one parameters cell, the first code cell"
    lines = [line for line in tagged[0].source.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    declared = runner.notebook_parameters(notebook)
    for line in lines:
        assert line.count("=") == 1, f"papermill drops parameter lines with two '=': {line!r}"
        assert "#" in line, f"every parameter has a help comment: {line!r}"
    assert len(declared) == len(lines) and "preset" in declared


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
@pytest.mark.parametrize("preset", ["ci", "cpu", "full"])
def test_every_preset_file_names_real_parameters(notebook, preset):
    key = presets.chapter_key(notebook)
    path = presets.PRESETS_DIR / preset / f"{key}.yaml"
    assert path.is_file(), f"missing preset file {path}"
    runner.check_parameters(notebook, presets.load_preset(preset, notebook))
    assert (yaml.safe_load(path.read_text()) or {}).get("preset", preset) == preset


def test_relative_folders_mean_the_callers_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    given = runner._callers_paths({"data_root": "../data/mvtec_ad", "texture_dir": "~/dtd", "category": "bottle",
                                   "dtd_root": ""})
    assert given["data_root"] == str(tmp_path.parent / "data" / "mvtec_ad")  # the name (mvtec_ad) kept as typed
    assert given["texture_dir"] == str(Path.home() / "dtd")
    assert given["category"] == "bottle" and given["dtd_root"] == ""  # not folders, or not given


def test_a_book_build_keeps_every_record_it_did_not_write(tmp_path, monkeypatch):
    from adnb.runtime import paths
    from adnb.runtime.records import make_record, write_record

    mine = write_record(make_record(method="fair", dataset="embedded", category="weave", preset="ci", device="cpu",
                                    image_size=8, metrics={"image_auroc": 0.5, "pixel_auroc": None, "aupro": None},
                                    intervals={"image_auroc": [0.4, 0.6], "pixel_auroc": None, "aupro": None},
                                    train_seconds=0, infer_images_per_s=0, n_params=0, weights={}, checkpoint=None,
                                    config_hash="written-by-train"))
    assert mine.parent.parent.parent.parent == paths.results_dir()  # what `train` and `run` write
    previous = paths.book_results_dir() / "ci" / "fixture" / "none" / "stale.json"
    previous.parent.mkdir(parents=True)
    previous.write_text("{}")
    monkeypatch.setattr(runner, "toc_chapters", lambda: [(FIXTURE, tmp_path / "chapters" / FIXTURE.name)])
    [result] = runner.build("ci")
    assert mine.is_file()  # the user's record is untouched
    assert result.records == [paths.book_results_dir() / "ci" / "fixture" / "none" / "tiny-fixture.json"]
    assert not previous.exists()  # the previous build's record of this preset is replaced
    assert "ADNB_RESULTS" not in __import__("os").environ


def _chapter(path: Path, code: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell('preset: str = "cpu"', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(code)]
    nbformat.write(nb, path)
    return path


WRITER = '''import os, time
from pathlib import Path
from adnb.runtime.records import make_record, write_record
meet = Path(os.environ["MEET"])
(meet / "{me}").touch()
deadline = time.monotonic() + 60
while not (meet / "{other}").exists():  # only a build that runs both chapters at once gets past this
    assert time.monotonic() < deadline, "the other chapter never started while this one ran"
    time.sleep(0.1)
write_record(make_record(method="{me}", dataset="fixture", category="none", preset=preset, device="cpu", image_size=1,
                         metrics={{"image_auroc": 0.5, "pixel_auroc": None, "aupro": None}},
                         intervals={{"image_auroc": [0.4, 0.6], "pixel_auroc": None, "aupro": None}},
                         train_seconds=0, infer_images_per_s=0, n_params=0, weights={{}}, checkpoint=None,
                         config_hash="fixture"))
'''


def test_a_book_build_runs_chapters_at_once_and_a_reader_of_records_after_them(tmp_path, monkeypatch):
    monkeypatch.setenv("MEET", str(tmp_path))
    sources = [_chapter(tmp_path / "a.ipynb", WRITER.format(me="a", other="b")),
               _chapter(tmp_path / "b.ipynb", WRITER.format(me="b", other="a")),
               _chapter(tmp_path / "reader.ipynb", "from adnb.runtime.records import load_records\n"
                                                   "assert sorted(r['method'] for r in load_records()) == ['a', 'b']")]
    monkeypatch.setattr(runner, "toc_chapters", lambda: [(s, tmp_path / "out" / s.name) for s in sources])
    assert [runner.reads_records(s) for s in sources] == [False, False, True]
    built = runner.build("ci", jobs=2)
    assert [r.notebook for r in built] == sources  # in the book's order, whichever finished first
    assert [len(r.records) for r in built] == [1, 1, 0]


def test_the_chapters_that_read_records_are_the_benchmark_and_the_own_dataset():
    assert [source.name for source, _ in runner.toc_chapters() if runner.reads_records(source)] == [
        "06_benchmark.ipynb", "07_own_dataset.ipynb"]
