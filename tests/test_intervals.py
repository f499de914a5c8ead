"""The bootstrap intervals: a replicate's weights are a resampled test set, the binned pixel metrics
agree with the exact ones, the intervals cover, and a seed fixes them."""

import numpy as np
import pytest
from scipy.stats import norm

from adnb import intervals, metrics
from adnb.runtime.errors import AdnbError


def make_test_set(rng, n_good=6, n_bad=8, size=24):
    """Smooth-ish maps: good images noise, anomalous ones with one or two brighter square regions."""
    maps, masks, scores, labels = [], [], [], []
    for i in range(n_good + n_bad):
        amap = rng.normal(0, 1, (size, size))
        mask = np.zeros((size, size), bool)
        if i >= n_good:
            for _ in range(rng.integers(1, 3)):
                r, c = rng.integers(0, size - 6, 2)
                h, w = rng.integers(2, 6, 2)
                mask[r:r + h, c:c + w] = True
            amap[mask] += rng.uniform(0.5, 2.5)
        maps.append(amap)
        masks.append(mask)
        scores.append(amap.max())
        labels.append(int(i >= n_good))
    return maps, masks, np.array(scores), np.array(labels)


def stats_of(maps, masks, scores, labels, n_bins=intervals.N_BINS):
    normal = np.concatenate([m[~k] for m, k in zip(maps, masks)])
    bins = intervals.PixelBins(intervals.bin_thresholds(normal, n_bins), len(maps))
    for i, (amap, mask) in enumerate(zip(maps, masks)):
        bins.add(i, amap, mask)
    return bins.stats(scores, labels)


@pytest.mark.parametrize("seed", range(4))
def test_unit_weights_give_the_exact_metrics(seed):
    maps, masks, scores, labels = make_test_set(np.random.default_rng(seed))
    values = intervals.weighted_metrics(stats_of(maps, masks, scores, labels), np.ones(len(maps)))
    assert values["image_auroc"][0] == pytest.approx(metrics.image_auroc(scores, labels), abs=1e-12)
    # pixels sharing a bin count as ties: within 1/(2B) of the exact pixel AUROC
    assert values["pixel_auroc"][0] == pytest.approx(metrics.pixel_auroc(maps, masks), abs=1 / (2 * intervals.N_BINS))
    assert values["aupro"][0] == pytest.approx(metrics.aupro(maps, masks), abs=2e-3)


def test_a_replicate_is_the_test_set_with_images_repeated():
    rng = np.random.default_rng(7)
    maps, masks, scores, labels = make_test_set(rng)
    stats = stats_of(maps, masks, scores, labels)
    w = intervals.replicate_weights(labels, replicates=3, seed=1)
    for row in w:
        take = np.repeat(np.arange(len(maps)), row.astype(int))
        values = intervals.weighted_metrics(stats, row)
        assert values["image_auroc"][0] == pytest.approx(metrics.image_auroc(scores[take], labels[take]), abs=1e-12)
        drawn_maps, drawn_masks = [maps[i] for i in take], [masks[i] for i in take]
        assert values["pixel_auroc"][0] == pytest.approx(metrics.pixel_auroc(drawn_maps, drawn_masks), abs=1e-3)
        assert values["aupro"][0] == pytest.approx(metrics.aupro(drawn_maps, drawn_masks), abs=3e-3)


def test_replicates_keep_each_class_size():
    labels = np.array([0] * 5 + [1] * 9)
    w = intervals.replicate_weights(labels, replicates=200, seed=0)
    assert w.shape == (200, 14)
    assert (w[:, :5].sum(1) == 5).all() and (w[:, 5:].sum(1) == 9).all()
    assert w[:, :5].std() > 0  # the draws differ


def test_a_seed_fixes_the_intervals_and_the_point_lies_inside():
    maps, masks, scores, labels = make_test_set(np.random.default_rng(3))
    stats = stats_of(maps, masks, scores, labels)
    a, b = intervals.bootstrap(stats, replicates=300, seed=5), intervals.bootstrap(stats, replicates=300, seed=5)
    assert a.intervals == b.intervals and a.se == b.se
    assert intervals.bootstrap(stats, replicates=300, seed=6).intervals != a.intervals
    exact = {"image_auroc": metrics.image_auroc(scores, labels), "pixel_auroc": metrics.pixel_auroc(maps, masks),
             "aupro": metrics.aupro(maps, masks)}
    for key, (low, high) in a.intervals.items():
        assert 0 <= low <= exact[key] <= high <= 1, key
        assert a.se[key] > 0


def test_image_auroc_intervals_cover_the_population_value():
    # scores N(0, 1) for good and N(1, 1) for anomalous images: AUROC = Φ(1/√2) ≈ 0.760
    rng = np.random.default_rng(0)
    truth = norm.cdf(1 / np.sqrt(2))
    labels = np.array([0] * 20 + [1] * 30)
    hits, trials = 0, 300
    for t in range(trials):
        scores = rng.normal(labels.astype(float), 1.0)
        low, high = intervals.bootstrap(intervals.TestSetStats(scores, labels), replicates=400, seed=t).intervals[
            "image_auroc"]
        hits += low <= truth <= high
    # percentile intervals of 50 images undercover a little; 95 % ± 3 standard errors of 300 trials
    assert 0.88 <= hits / trials <= 0.99


def test_without_masks_only_image_auroc_has_an_interval():
    scores, labels = np.array([0.1, 0.4, 0.35, 0.8, 0.7]), np.array([0, 0, 1, 1, 1])
    result = intervals.bootstrap(intervals.TestSetStats(scores, labels), replicates=100)
    assert result.intervals["pixel_auroc"] is None and result.intervals["aupro"] is None
    assert result.intervals["image_auroc"] is not None and result.describe()["replicates"] == 100


def test_tiles_of_one_image_add_to_that_image():
    rng = np.random.default_rng(1)
    thresholds = intervals.bin_thresholds(rng.normal(size=1000), 64)
    whole, tiled = intervals.PixelBins(thresholds, 1), intervals.PixelBins(thresholds, 1)
    amap, mask = rng.normal(size=(8, 8)), np.zeros((8, 8), bool)
    mask[1:3, 1:3] = True
    whole.add(0, amap, mask)
    tiled.add(0, amap[:, :4], mask[:, :4])
    tiled.add(0, amap[:, 4:], mask[:, 4:])
    assert np.array_equal(whole.normal, tiled.normal) and np.array_equal(whole.anomalous, tiled.anomalous)


def test_from_maps_is_the_streamed_computation():
    maps, masks, scores, labels = make_test_set(np.random.default_rng(2))
    streamed = intervals.bootstrap(stats_of(maps, masks, scores, labels), replicates=200, seed=1)
    assert intervals.from_maps(scores, labels, maps, masks, replicates=200, seed=1).intervals == streamed.intervals
    assert intervals.from_maps(scores, labels, replicates=200).intervals["aupro"] is None


def test_clear_errors():
    with pytest.raises(AdnbError, match="both good and anomalous"):
        intervals.bootstrap(intervals.TestSetStats(np.array([1.0, 2.0]), np.array([0, 0])))
    with pytest.raises(AdnbError, match="normal pixels"):
        intervals.bin_thresholds(np.empty(0))
    with pytest.raises(AdnbError, match="shape"):
        intervals.PixelBins(np.array([0.0]), 1).add(0, np.zeros((2, 2)), np.zeros((3, 3)))
