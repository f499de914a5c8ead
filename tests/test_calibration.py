"""Calibration: the F1-optimal and conformal thresholds, normalisation, the colour scale, persistence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import precision_recall_curve

from adnb.calibration import (Calibration, calibrate, conformal_threshold, f1_optimal_threshold, false_alarm_bound,
                              fit_calibration, holdout_indices, load_calibration, map_scale, normalise,
                              save_calibration)
from adnb.evaluation import Evaluation
from adnb.methods import baseline
from adnb.methods.base import load_detector
from adnb.runtime.cache import CacheEntry
from adnb.runtime.errors import AdnbError


def sklearn_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The reference: argmax of F1 over scikit-learn's precision–recall curve (ascending thresholds)."""
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-300)
    best = int(np.argmax(f1))
    return float(thresholds[best]), float(f1[best])


def test_f1_threshold_on_a_hand_computed_case():
    # t=0.8: P 1, R ½, F1 ⅔;  t=0.4: TP1 FP1, F1 ½;  t=0.35: TP2 FP1, F1 0.8;  t=0.1: TP2 FP2, F1 ⅔
    assert f1_optimal_threshold([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx((0.35, 0.8))


def test_f1_threshold_ties_go_to_the_lowest_threshold():
    # t=1: TP2 FP2 → F1 4/6;  t=4: TP1 FP0 → F1 2/3: a tie, the lowest threshold wins (as argmax in sklearn's order)
    assert f1_optimal_threshold([1, 2, 3, 4], [1, 0, 0, 1]) == pytest.approx((1.0, 2 / 3))
    assert sklearn_f1_threshold(np.array([1, 2, 3, 4.0]), np.array([1, 0, 0, 1])) == pytest.approx((1.0, 2 / 3))


@pytest.mark.parametrize("seed", range(6))
def test_f1_threshold_matches_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    labels[:2] = [0, 1]
    scores = np.round(rng.normal(labels * 1.2, 1.0), 1)  # rounding makes ties
    assert f1_optimal_threshold(scores, labels) == pytest.approx(sklearn_f1_threshold(scores, labels))


def test_f1_threshold_needs_both_classes():
    with pytest.raises(AdnbError, match="both normal and anomalous"):
        f1_optimal_threshold([1.0, 2.0], [0, 0])


def test_conformal_threshold_order_statistics():
    scores = np.arange(1.0, 20.0)  # 19 normal scores 1…19
    assert conformal_threshold(scores, alpha=0.1) == 18.0  # k = ⌈20·0.9⌉ = 18
    assert conformal_threshold(scores[:9], alpha=0.1) == 9.0  # k = ⌈10·0.9⌉ = 9 = n: the largest
    assert conformal_threshold([3.0, 1.0, 2.0], alpha=0.01) == 3.0  # k capped at n


def test_conformal_threshold_keeps_false_alarms_at_alpha():
    # The guarantee, checked by simulation on a skewed distribution: P(new normal > t) ≤ α.
    rng = np.random.default_rng(0)
    alpha, n, trials = 0.05, 99, 20000
    held = rng.gumbel(size=(trials, n))
    fresh = rng.gumbel(size=trials)
    thresholds = np.array([conformal_threshold(h, alpha) for h in held])
    rate = float(np.mean(fresh > thresholds))
    # here (n + 1 − k)/(n + 1) = 5/100 exactly; an off-by-one k would give 4 or 6 % (±7 standard errors away)
    assert rate == pytest.approx(alpha, abs=0.005)


def test_false_alarm_bound_hand_computed():
    assert false_alarm_bound(10, 0.01) == (10, pytest.approx(1 / 11))  # too few images: the largest, 1/(n + 1)
    assert false_alarm_bound(20, 0.01) == (20, pytest.approx(1 / 21))
    assert false_alarm_bound(99, 0.01) == (99, pytest.approx(0.01))  # the first n that reaches 1 %
    assert false_alarm_bound(199, 0.01) == (198, pytest.approx(2 / 200))
    assert false_alarm_bound(19, 0.1) == (18, pytest.approx(2 / 20))  # (n + 1)(1 − α) = 18 in floats too
    with pytest.raises(AdnbError, match="at least one"):
        false_alarm_bound(0)


def test_the_largest_of_n_normal_scores_is_exceeded_by_a_new_one_with_probability_1_over_n_plus_1():
    rng = np.random.default_rng(1)
    n, trials = 10, 40000
    held, fresh = rng.gumbel(size=(trials, n)), rng.gumbel(size=trials)
    rate = float(np.mean(fresh >= np.array([conformal_threshold(h) for h in held])))
    assert rate == pytest.approx(false_alarm_bound(n)[1], abs=0.005)  # 1/11 ≈ 0.091, not α = 0.01


def calibration(**changes) -> Calibration:
    base = dict(n=3, mean=2.0, std=1.0, min=0.0, max=4.0, quantiles={}, threshold=4.0, source="normal-conformal",
                low=0.0, high=10.0, map_low=0.0, map_high=1.0)
    return Calibration(**{**base, **changes})


def test_normalise_hand_computed_values():
    cal = calibration()  # (s − 4)/10 + 0.5
    assert normalise(4.0, cal) == 0.5
    assert normalise(6.0, cal) == pytest.approx(0.7)
    assert normalise(0.0, cal) == pytest.approx(0.1)
    assert normalise(100.0, cal) == 1.0 and normalise(-100.0, cal) == 0.0
    assert isinstance(normalise(6.0, cal), float)
    assert np.allclose(normalise(np.array([4.0, 6.0]), cal), [0.5, 0.7])


def test_normalise_is_monotone_and_agrees_with_the_threshold():
    rng = np.random.default_rng(1)
    cal = calibration(threshold=1.3, low=-2.0, high=3.0)
    s = np.sort(rng.normal(0, 3, 500))
    n = normalise(s, cal)
    assert np.all(np.diff(n) >= 0)
    assert np.array_equal(n >= 0.5, s >= 1.3)


def test_map_scale_hand_computed():
    normal = np.stack([np.linspace(0, 1, 101).reshape(1, 101)] * 2)  # values 0, 0.01, …, 1
    low, high = map_scale(normal)
    assert low == pytest.approx(0.01) and high == pytest.approx(1.0 + 0.99)  # top + (top − low)
    _, higher = map_scale(normal, [np.full((3, 3), 5.0), np.full((3, 3), 3.0), np.full((3, 3), 9.0)])
    assert higher == pytest.approx(5.0)  # the median anomalous peak, above 1.99


def test_fit_calibration_statistics_and_threshold_sources():
    normal = np.array([1.0, 2.0, 3.0, 4.0])
    maps = np.zeros((4, 2, 2))
    cal = fit_calibration(normal, maps)
    assert (cal.n, cal.mean, cal.min, cal.max) == (4, 2.5, 1.0, 4.0)
    assert cal.std == pytest.approx(np.std([1, 2, 3, 4]))
    assert cal.quantiles["0.5"] == pytest.approx(2.5)
    assert cal.source == "normal-conformal" and cal.threshold == 4.0 and (cal.low, cal.high) == (1.0, 4.0)
    assert (cal.k, cal.false_alarm_bound) == (4, pytest.approx(1 / 5)) and cal.f1_threshold is None
    assert "the largest of 4 held-out normal scores" in cal.describe() and "1/5 = 20.0%" in cal.describe()
    assert "the 1% target needs 99 held-out images" in cal.describe()
    test_scores, test_labels = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    cal = fit_calibration(normal, maps, test_scores, test_labels)
    # labels never set the default threshold: the F1-optimal one is kept beside it, for --threshold f1-test
    assert cal.source == "normal-conformal" and cal.threshold == 4.0
    assert cal.f1_threshold == 0.35 and cal.f1 == pytest.approx(0.8) and cal.n_test == 4
    assert (cal.low, cal.high) == (0.1, 4.0)  # the normalisation's range covers the test scores too
    optimistic = cal.f1_test()
    assert optimistic.threshold == 0.35 and optimistic.source == "f1-test" and "optimistic" in optimistic.describe()
    assert fit_calibration(normal, maps, [1.0, 2.0], [0, 0]).f1_threshold is None
    with pytest.raises(AdnbError, match="no test-set F1 threshold"):
        fit_calibration(normal, maps).f1_test()


def test_an_older_calibration_with_the_test_threshold_reads_back_with_the_normal_one():
    old = {**calibration(n=20, max=7.0, threshold=3.0, source="f1", f1=0.9, n_test=83).to_dict()}
    for key in ("k", "false_alarm_bound", "f1_threshold"):
        old.pop(key)
    cal = Calibration.from_dict(old)
    assert (cal.threshold, cal.source, cal.f1_threshold) == (7.0, "normal-conformal", 3.0)
    assert cal.false_alarm_bound == pytest.approx(1 / 21)


def test_calibration_json_round_trip():
    cal = fit_calibration(np.array([1.0, 2.5, 3.0]), np.random.default_rng(0).random((3, 4, 4)), [0.1, 0.9], [0, 1])
    again = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert again == cal
    with pytest.raises(AdnbError, match="lacks threshold"):
        Calibration.from_dict({k: v for k, v in cal.to_dict().items() if k != "threshold"})


def test_holdout_indices():
    fit, held = holdout_indices(20, 0.2, seed=3)
    assert len(held) == 4 and sorted(fit + held) == list(range(20)) and not set(fit) & set(held)
    assert holdout_indices(3, 0.1, at_least=2) == holdout_indices(3, 0.1, at_least=2)
    assert len(holdout_indices(3, 0.1, at_least=5)[1]) == 2  # one image always stays for training
    assert holdout_indices(1, 0.5) == ([0], [])


def make_images(rng: np.random.Generator, n: int, size: int, defect: bool = False) -> torch.Tensor:
    images = rng.normal(128, 8, (n, 3, size, size)).clip(0, 255)
    if defect:
        images[:, :, 4:8, 4:8] = 250
    return torch.from_numpy(images.astype(np.uint8))


@pytest.fixture
def trained(tmp_path):
    rng = np.random.default_rng(0)
    config = baseline.BaselineConfig(image_size=16, box=1)
    cache = CacheEntry(tmp_path / "ckpt", {"method": "baseline", "config": config})
    detector = baseline.fit(config, make_images(rng, 30, 16).float() / 255, cache=cache)
    return detector, cache.weights_path, rng


def test_calibrate_a_detector_and_store_it_in_the_sidecar(trained):
    detector, checkpoint, rng = trained
    held = make_images(rng, 10, 16)
    assert load_calibration(checkpoint) is None  # a checkpoint from before calibration
    cal = calibrate(detector, held)
    expected = detector.predict(held.float() / 255).scores.numpy()
    assert cal.n == 10 and cal.max == pytest.approx(expected.max()) and cal.source == "normal-conformal"
    assert cal.threshold == pytest.approx(expected.max())  # 10 < 1/α − 1: the largest normal score
    assert cal.resize == "squash" and calibrate(detector, held, resize="letterbox").resize == "letterbox"

    test = torch.cat([make_images(rng, 6, 16), make_images(rng, 6, 16, defect=True)])
    pred = detector.predict(test.float() / 255)
    labels = np.array([0] * 6 + [1] * 6)
    evaluation = Evaluation({}, pred.scores.numpy(), labels, [], pred.maps, test, None, "model", "", 0.0)
    cal = calibrate(detector, held, evaluation)
    assert cal.source == "normal-conformal" and cal.threshold == pytest.approx(expected.max())
    assert cal.f1 == 1.0  # the bright square is easy to separate
    assert cal.f1_threshold == pytest.approx(float(pred.scores[6:].min()))  # the lowest threshold reaching F1 = 1
    assert cal.map_high >= float(np.median(pred.maps[6:].flatten(1).amax(1).numpy())) - 1e-6

    sidecar = save_calibration(checkpoint, cal)
    data = json.loads(sidecar.read_text())
    assert data["spec"]["method"] == "baseline" and data["calibration"]["threshold"] == cal.threshold
    assert load_calibration(checkpoint.parent) == cal  # a folder works too
    assert load_detector(checkpoint).method == "baseline"  # the sidecar still loads


def test_calibrate_a_tiled_split_scores_whole_images(trained, tmp_path):
    from adnb.data.layout import Split

    detector, _, rng = trained
    tiles = make_images(rng, 5, 16)
    split = Split(tiles, torch.zeros(5), None, ["a", "a", "a", "b", "b"], "tile", torch.tensor([0, 0, 0, 1, 1]))
    cal = calibrate(detector, split)
    scores = detector.predict(tiles.float() / 255).scores.numpy()
    assert cal.n == 2 and cal.resize == "tile"
    assert sorted([cal.min, cal.max]) == pytest.approx(sorted([scores[:3].max(), scores[3:].max()]))


def test_missing_sidecar_is_a_clear_error(tmp_path):
    with pytest.raises(AdnbError, match="no checkpoint sidecar"):
        load_calibration(tmp_path / "weights.pt")


def test_a_calibration_write_killed_halfway_keeps_the_sidecar_whole(trained, monkeypatch):
    import os

    detector, checkpoint, rng = trained
    sidecar = checkpoint.with_suffix(".json")
    before = sidecar.read_text()

    def killed(fd):  # the new sidecar's bytes are written, the rename has not happened
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        save_calibration(checkpoint, calibrate(detector, make_images(rng, 4, 16)))
    monkeypatch.undo()
    assert sidecar.read_text() == before and load_calibration(checkpoint) is None
    assert sorted(p.name for p in sidecar.parent.iterdir()) == ["weights.json", "weights.pt"]
