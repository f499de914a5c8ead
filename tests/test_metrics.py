"""The metrics against brute-force definitions, scikit-learn, and the MVTec toy case."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from adnb import metrics
from adnb.runtime.errors import AdnbError


def brute_force_aupro(maps, masks, limit=0.3):
    """The reference written the slow, obvious way: every distinct score is a threshold."""
    labels = [ndimage.label(m != 0, structure=np.ones((3, 3)))[0] for m in masks]
    n_regions = sum(lab.max() for lab in labels)
    n_ok = sum((m == 0).sum() for m in masks)
    points = [(0.0, 0.0)]
    for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        fp, overlap = 0, 0.0
        for amap, mask, lab in zip(maps, masks, labels):
            pred = amap >= t
            fp += np.count_nonzero(pred & (mask == 0))
            for k in range(1, lab.max() + 1):
                region = lab == k
                overlap += np.count_nonzero(pred & region) / region.sum()
        points.append((fp / n_ok, overlap / n_regions))
    points.append((1.0, 1.0))
    x, y = np.array(points).T
    area, prev = 0.0, (x[0], y[0])
    for xi, yi in zip(x[1:], y[1:]):
        if xi > limit:
            y_cut = prev[1] + (yi - prev[1]) * (limit - prev[0]) / (xi - prev[0]) if xi != prev[0] else prev[1]
            area += (limit - prev[0]) * (prev[1] + y_cut) / 2
            break
        area += (xi - prev[0]) * (yi + prev[1]) / 2
        prev = (xi, yi)
    return area / limit


def random_case(rng, n_images=3, size=12, levels=6):
    """Small maps with many ties (few score levels) and masks with several regions."""
    maps = [rng.integers(0, levels, (size, size)).astype(np.float64) for _ in range(n_images)]
    masks = []
    for i in range(n_images):
        m = np.zeros((size, size), np.uint8)
        if i > 0:
            for _ in range(rng.integers(1, 4)):
                r, c = rng.integers(0, size - 3, 2)
                m[r:r + rng.integers(1, 4), c:c + rng.integers(1, 4)] = 255
        masks.append(m)
    masks[1][0, 0] = 255  # make sure at least one image has an anomaly
    return maps, masks


@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_brute_force_with_ties(seed, limit):
    rng = np.random.default_rng(seed)
    maps, masks = random_case(rng, levels=int(rng.integers(2, 12)))
    assert metrics.aupro(maps, masks, limit) == pytest.approx(brute_force_aupro(maps, masks, limit), abs=1e-9)


@pytest.mark.parametrize("seed", range(10))
def test_aupro_matches_brute_force_continuous_scores(seed):
    rng = np.random.default_rng(100 + seed)
    maps, masks = random_case(rng)
    maps = [m + rng.random(m.shape) for m in maps]
    assert metrics.aupro(maps, masks) == pytest.approx(brute_force_aupro(maps, masks), abs=1e-9)


@pytest.mark.parametrize("seed", range(10))
def test_pixel_auroc_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    maps, masks = random_case(rng, levels=4)
    expected = roc_auc_score(np.concatenate([m.ravel() != 0 for m in masks]), np.concatenate([m.ravel() for m in maps]))
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)


def test_perfect_and_inverted_maps():
    masks = [np.zeros((8, 8)), np.zeros((8, 8))]
    masks[1][2:5, 2:5] = 1
    assert metrics.aupro([m.astype(float) for m in masks], masks) == pytest.approx(1.0)
    assert metrics.pixel_auroc([m.astype(float) for m in masks], masks) == 1.0
    assert metrics.pixel_auroc([1 - m for m in masks], masks) == 0.0
    assert metrics.aupro([1 - m for m in masks], masks) == 0.0


def test_random_scores_on_the_mvtec_toy_case_give_about_015():
    """The MVTec toy set: random maps, a 10×10 square per image; expected PRO(x) = x, area 0.045/0.3."""
    rng = np.random.default_rng(0)
    maps = [rng.random((300, 500)) for _ in range(200)]
    mask = np.zeros((300, 500), np.uint8)
    mask[100:110, 200:210] = 1
    assert metrics.aupro(maps, [mask] * 200) == pytest.approx(0.15, abs=0.005)


def test_eight_connectivity_joins_diagonal_pixels():
    mask = np.zeros((6, 6), np.uint8)
    mask[1, 1] = mask[2, 2] = 1
    assert metrics.regions(mask)[1] == 1


def test_accumulator_exact_and_binned_agree_with_batch_functions():
    rng = np.random.default_rng(3)
    maps, masks = random_case(rng, n_images=6, size=32, levels=1000)
    maps = [m / 1000 + 0.01 for m in maps]
    exact = metrics.pixel_metrics(maps, masks)
    streamed = metrics.PixelAccumulator()
    binned = metrics.PixelAccumulator(max_exact_pixels=1000)
    for amap, mask in zip(maps, masks):
        streamed.update(amap, mask)
        binned.update(amap, mask)
    assert streamed.exact and not binned.exact
    assert streamed.compute() == pytest.approx(exact, abs=1e-12)
    # 1000 score levels are far coarser than the 2^-11 relative bins: binning loses nothing
    assert binned.compute() == pytest.approx(exact, abs=1e-9)


def test_binned_precision_is_bounded_for_continuous_scores():
    rng = np.random.default_rng(4)
    maps, masks = random_case(rng, n_images=8, size=48)
    maps = [m + rng.random(m.shape) for m in maps]
    binned = metrics.PixelAccumulator(max_exact_pixels=0)
    for amap, mask in zip(maps, masks):
        binned.update(amap, mask)
    exact = metrics.pixel_metrics(maps, masks)
    got = binned.compute()
    assert got["pixel_auroc"] == pytest.approx(exact["pixel_auroc"], abs=2e-3)
    assert got["aupro"] == pytest.approx(exact["aupro"], abs=2e-3)


def test_float_keys_preserve_order():
    values = np.array([-3.5, -1e-3, 0.0, 1e-8, 0.25, 0.2501, 7.0], np.float32)
    keys = metrics.float_keys(values, 32)
    assert np.all(np.diff(keys) > 0)


def test_fixed_threshold_variant_close_to_exact_on_smooth_maps_and_rescaling_inflates():
    rng = np.random.default_rng(5)
    maps, masks = random_case(rng, n_images=10, size=40)
    maps = [ndimage.gaussian_filter(m + 3 * (k != 0), 2) + rng.random(m.shape) for m, k in zip(maps, masks)]
    exact = metrics.aupro(maps, masks)
    fixed = metrics.aupro_fixed_thresholds(maps, masks, 200)
    rescaled = metrics.aupro_fixed_thresholds(maps, masks, 200, rescale_fpr=True)
    assert abs(fixed - exact) < 0.05
    assert rescaled > fixed


def test_errors_are_clear():
    with pytest.raises(AdnbError, match="both good and anomalous"):
        metrics.image_auroc([0.1, 0.2], [0, 0])
    with pytest.raises(AdnbError, match="shape"):
        metrics.aupro([np.zeros((4, 4))], [np.zeros((4, 5))])
    with pytest.raises(AdnbError, match="anomalous pixels"):
        metrics.pixel_auroc([np.zeros((4, 4))], [np.zeros((4, 4))])


def test_metrics_are_python_floats():
    rng = np.random.default_rng(0)
    maps, masks = rng.random((2, 16, 16)), np.zeros((2, 16, 16), bool)
    masks[0, 4:9, 4:9] = True
    assert type(metrics.trapezoid([0.0, 0.5, 1.0], [0.0, 1.0, 1.0], 0.3)) is float
    assert all(type(v) is float for v in metrics.pixel_metrics(maps, masks).values())
