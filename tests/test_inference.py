"""Scoring new images with a checkpoint, and the train/score commands, on the baseline detector."""

from __future__ import annotations

import csv
import re

import cv2
import numpy as np
import pytest

from adnb import cli
from adnb.data import embedded
from adnb.inference import Scorer, collect_images
from adnb.runtime.errors import AdnbError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    spec = embedded.EmbeddedSpec(size=64, n_train=6, n_test_good=2, n_test_per_defect=1)
    return embedded.generate(tmp_path_factory.mktemp("data"), spec, workers=1)


@pytest.fixture
def checkpoint(dataset, tmp_path):
    """A baseline checkpoint (weights.pt + sidecar) trained directly, without the train command."""
    from adnb.data.layout import load_category
    from adnb.methods import baseline
    from adnb.runtime.cache import CacheEntry

    config = baseline.BaselineConfig(image_size=32)
    cache = CacheEntry(tmp_path / "ckpt", {"method": "baseline", "config": config})
    baseline.fit(config, load_category(dataset, "washer").load("train", 32).float_images(), cache=cache)
    return str(cache.weights_path)


def rows_of(path):
    """scores.csv's rows (its first line, '# threshold …', left out)."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(line for line in fh if not line.startswith("#")))


def test_train_prints_a_checkpoint_that_score_reads(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADNB_HOME", str(tmp_path / "home"))
    assert cli.main(["train", "baseline", "--preset", "ci", "--data-root", str(dataset), "--category", "washer",
                     "-p", "image_size", "32"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert lines[1].startswith("record: ") and re.search(r"washer/baseline-[0-9a-f]{12}\.json$", lines[1])
    checkpoint = lines[0].removeprefix("checkpoint: ")
    out = tmp_path / "scores"
    assert cli.main(["score", "--checkpoint", checkpoint, str(dataset / "washer" / "test" / "good"),
                     "--out", str(out)]) == 0
    assert len(rows_of(out / "scores.csv")) == 2


def test_scorer_maps_come_back_at_each_images_own_size(checkpoint, tmp_path):
    scorer = Scorer.from_checkpoint(checkpoint, device="cpu")
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (50, 70), np.uint8)
    cv2.imwrite(str(tmp_path / "wide.jpg"), rng.integers(0, 255, (40, 90, 3), np.uint8))
    results = scorer.batch([grey, tmp_path / "wide.jpg"])
    assert [r.map.shape for r in results] == [(50, 70), (40, 90)]
    assert all(np.isfinite(r.score) for r in results)
    single = scorer(grey)
    assert single.score == pytest.approx(results[0].score, rel=1e-5)


def test_score_command_writes_csv_and_overlays(checkpoint, dataset, tmp_path):
    out = tmp_path / "scores"
    good = dataset / "washer" / "test" / "good"
    assert cli.main(["score", "--checkpoint", checkpoint, str(good), str(dataset / "washer" / "test" / "stain"),
                     "--out", str(out), "--threshold", "5"]) == 0
    rows = rows_of(out / "scores.csv")
    assert len(rows) == 3 and {r["anomalous"] for r in rows} <= {"0", "1"}
    for row in rows:
        overlay = cv2.imread(str(out / row["overlay"]))
        assert overlay.shape == (64, 64, 3)


def test_train_without_a_test_set_only_trains(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADNB_HOME", str(tmp_path / "home"))
    good = tmp_path / "mine" / "train" / "good"
    good.mkdir(parents=True)
    for i in range(3):
        cv2.imwrite(str(good / f"{i}.png"), np.full((20, 30, 3), 40 * i, np.uint8))
    assert cli.main(["train", "baseline", "--data-root", str(tmp_path / "mine"), "-p", "image_size", "16"]) == 0
    captured = capsys.readouterr()
    assert "not evaluated" in captured.err and "record:" not in captured.out


def test_clear_errors_for_bad_inputs(tmp_path, capsys):
    with pytest.raises(AdnbError, match="no images found"):
        collect_images([tmp_path])
    with pytest.raises(AdnbError, match="does not exist"):
        collect_images([tmp_path / "typo.png"])
    assert cli.main(["score", "--checkpoint", str(tmp_path / "none.pt"), str(tmp_path)]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert cli.main(["train", "nosuch"]) == 2
    assert "unknown method 'nosuch'" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["fair", "pyramidflow", "d3ad", "realnet"])
def test_every_method_trains_from_the_cli_and_scores_at_native_size(method, dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADNB_HOME", str(tmp_path / "home"))
    assert cli.main(["train", method, "--preset", "ci", "--data-root", str(dataset), "--category", "washer"]) == 0
    checkpoint = capsys.readouterr().out.split("\n")[0].removeprefix("checkpoint: ")
    scorer = Scorer.from_checkpoint(checkpoint, device="cpu")
    grey = np.random.default_rng(1).integers(0, 255, (50, 70), np.uint8)
    colour = cv2.imread(str(dataset / "washer" / "test" / "good" / sorted((dataset / "washer" / "test" / "good").iterdir())[0].name))
    results = scorer.batch([grey, colour])
    assert [r.map.shape for r in results] == [(50, 70), colour.shape[:2]]
    assert all(np.isfinite(r.score) and np.isfinite(r.map).all() for r in results)
