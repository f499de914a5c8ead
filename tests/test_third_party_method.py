"""A fifth method from outside adnb: one module, one notebook and its presets, installed the way a third
party's package is (an entry point in the group ``adnb.methods``), and every command run on it at ``ci``
with no file of adnb changed: ``train``, ``bench``, ``run`` (its own chapter), ``train-all`` and the
benchmark chapter."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest

from adnb.data import default_dataset
from adnb.methods import names, references, registry, spec
from adnb.runtime.errors import AdnbError
from adnb.runtime.presets import chapter_key, load_preset
from adnb.runtime.runner import find_notebook, run_notebook
from adnb.schedule import train_all
from third_party_site import install


@pytest.fixture
def site(tmp_path, monkeypatch) -> Iterator[Path]:
    """``tiny_method`` installed in a folder on this process's path and on its children's; ADNB_HOME empty
    but for the embedded dataset. What the test imports and registers is forgotten afterwards."""
    sys.modules.pop("tiny_method", None)
    site = install(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    dataset = default_dataset(root=tmp_path / "data")
    (home / "data" / dataset.name).symlink_to(dataset)
    monkeypatch.setenv("ADNB_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield site
    sys.modules.pop("tiny_method", None)


def test_an_installed_method_is_discovered_with_its_chapter_and_presets(site):
    tiny = spec("tiny")
    assert tiny.detector.__module__ == "tiny_method" and not tiny.reference
    assert "tiny" in names() and names().index("tiny") > names().index("realnet")  # after the book's chapters
    assert references() == [name for name in names() if spec(name).reference]
    assert find_notebook("tiny") == (site / "tiny_method" / "08_tiny_autoencoder.ipynb").resolve()
    assert chapter_key(find_notebook("tiny")) == "tiny"
    assert load_preset("ci", "tiny") == {"preset": "ci", "image_size": 32, "width": 4, "epochs": 1, "max_train": 16,
                                         "max_test": 12, "precision": "fp32"}


def test_a_declaration_that_disagrees_with_its_detector_is_refused():
    from adnb.methods.baseline import ZScoreBaseline, fit

    with pytest.raises(AdnbError, match="detector class ZScoreBaseline says method = 'baseline'"):
        registry.MethodSpec("zscore", ZScoreBaseline, fit)
    with pytest.raises(AdnbError, match="no '-'"):
        registry.MethodSpec("z-score", ZScoreBaseline, fit)


@pytest.mark.slow
def test_every_command_runs_a_third_party_method(site, tmp_path):
    def adnb(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "adnb", *args], capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr
        return done

    trained = adnb("train", "tiny", "--preset", "ci", "--category", "capsule")
    record = json.loads(Path(trained.stdout.split("record: ")[1].split()[0]).read_text())
    assert (record["method"], record["preset"], record["image_size"], record["train_precision"]) == ("tiny", "ci", 32, "fp32")

    timed = json.loads(adnb("bench", "tiny", "--preset", "ci", "--steps", "1", "--warmup", "0", "--infer-images", "8",
                            "--device", "cpu").stdout)
    assert timed["method"] == "tiny" and timed["config"]["width"] == 4 and timed["train_s_per_step"] > 0
    assert timed["train_step"] == "reconstruction MSE of the batch; Adam"

    chapter = adnb("run", "tiny", "--preset", "ci", "--category", "capsule", "--output", str(tmp_path / "tiny.ipynb"))
    [path] = chapter.stdout.split()
    assert json.loads(Path(path).read_text())["config_hash"] == record["config_hash"]  # the chapter loaded train's

    report = train_all(["tiny"], "ci", categories=["capsule", "stone"], out=io.StringIO())
    assert [p.job.category for p in report.skipped] == ["capsule"] and not report.failed
    assert [p.job.category for p in report.trained] == ["stone"]

    bench = run_notebook("benchmark", preset="ci", parameters={"category": "capsule"},
                         output=tmp_path / "benchmark.ipynb")
    executed = nbformat.read(bench.output, as_version=4)
    [quality] = [c for c in executed.cells if c.get("id") == "c008"]
    assert "tiny" in json.dumps(quality.outputs), "the benchmark's quality table has no row for tiny"
