"""Evaluation: every method scored on the masks' own pixels by default, every metric with its interval."""

from __future__ import annotations

import numpy as np
import pytest

from adnb import metrics
from adnb.data import embedded
from adnb.data.layout import load_category
from adnb.evaluation import evaluate, result_record
from adnb.methods import baseline
from adnb.runtime.records import METRIC_KEYS


@pytest.fixture(scope="module")
def washer(tmp_path_factory):
    spec = embedded.EmbeddedSpec(size=64, n_train=8, n_test_good=4, n_test_per_defect=2)
    return load_category(embedded.generate(tmp_path_factory.mktemp("data"), spec, workers=1), "washer")


@pytest.fixture(scope="module")
def detector(washer):
    config = baseline.BaselineConfig(image_size=32)
    return baseline.fit(config, washer.load("train", 32).float_images())


@pytest.mark.parametrize("resize", ["squash", "tile"])
def test_native_evaluation_scores_the_masks_own_pixels(washer, detector, resize):
    ev = evaluate(detector, washer, resize=resize)
    assert ev.resolution == "native"
    pairs = list(ev.pairs())
    assert len(pairs) == 12 and all(amap.shape == mask.shape == (64, 64) for amap, mask in pairs)
    maps, masks = zip(*pairs)
    assert metrics.pixel_metrics(maps, masks) == pytest.approx({k: ev.metrics[k] for k in ("pixel_auroc", "aupro")})


def test_every_metric_has_its_interval_in_the_record(washer, detector):
    ev = evaluate(detector, washer, resolution="model", seed=3)
    for key in METRIC_KEYS:
        low, high = ev.intervals[key]
        assert 0 <= low <= high <= 1 and low <= ev.metrics[key] + 1e-9 and ev.metrics[key] <= high + 1e-9
    assert evaluate(detector, washer, resolution="model", seed=3).intervals == ev.intervals  # seeded
    assert ev.table()["aupro"].count("[") == 1  # value [low, high]
    record = result_record(detector, washer, ev, preset="ci", config_hash="x")
    assert record["intervals"] == ev.intervals and record["eval_resolution"] == "model"
    assert record["intervals_method"]["replicates"] == 1000 and set(record["intervals_method"]["se"]) == set(METRIC_KEYS)
    maps, masks = zip(*ev.pairs())
    assert np.allclose(np.stack(maps), ev.maps.numpy())  # at the model's resolution the pairs are the maps
