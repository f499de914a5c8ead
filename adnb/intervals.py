"""95 % intervals for image AUROC, pixel AUROC and AUPRO: a stratified bootstrap over test images.

Why this method. The test set is a sample of images, and an image is the unit that was drawn:
its pixels are not independent draws (a defect is one region, a map is smooth), so resampling
pixels would give intervals far too narrow. Each bootstrap replicate therefore draws images with
replacement, **stratified**: ``n_good`` from the good images and ``n_anomalous`` from the anomalous
ones, so every replicate keeps the test set's class balance (an AUROC needs both kinds). The
interval is the percentile one, ``[q_{α/2}, q_{1−α/2}]`` of the replicates' values (α = 0.05).
A bootstrap cannot show uncertainty the sample does not contain: a perfect score (every
replicate 1.0) gets the interval [1, 1], and a test set of a few images gets a wide one.

How it stays fast. Replicate ``b`` is a vector of weights ``w_i`` (how often image ``i`` was drawn),
and every metric is a function of weighted sums of per-image statistics computed once
(``TestSetStats``), so a replicate costs a matrix product, not a pass over the pixels:

- image AUROC, with ``P``/``N`` the anomalous/good images and ``c_ij = 1[s_i > s_j] + ½·1[s_i = s_j]``::

      AUROC(w) = Σ_{i∈P} Σ_{j∈N} w_i w_j c_ij / (Σ_{i∈P} w_i · Σ_{j∈N} w_j)

- pixel AUROC and AUPRO on a fixed grid of thresholds ``t_1 < … < t_B`` (quantiles of the normal
  pixels, so each bin holds about 1/B of them): per image ``i`` and bin ``k``, ``n_ik`` normal
  pixels, ``a_ik`` anomalous pixels, ``o_ik = Σ_{regions r of i} |r ∩ bin k| / |r|``, and ``R_i``
  regions. With ``N_k = Σ_i w_i n_ik`` (likewise ``A_k``, ``O_k``)::

      pixel AUROC(w) = Σ_k A_k (Σ_{k'<k} N_k' + ½ N_k) / (Σ_k A_k · Σ_k N_k)
      FPR_j(w) = Σ_{k>j} N_k / Σ_k N_k,   PRO_j(w) = Σ_{k>j} O_k / Σ_i w_i R_i   (score ≥ t_j)
      AUPRO(w) = ∫_0^0.3 PRO dFPR / 0.3   (trapezoids through the points, as ``adnb.metrics``)

  Pixels in one bin count as ties, so at ``w = 1`` the binned pixel AUROC is within ``1/(2B)`` of
  the exact one, and the PRO points lie on the exact curve, ``1/B`` apart in FPR. The reported
  metrics stay the exact ones of ``adnb.metrics``; the bins only shape the replicates.

>>> bins = PixelBins(bin_thresholds(normal_values), n_images)
>>> bins.add(i, anomaly_map, mask)                                # every map (or tile) of image i
>>> stats = bins.stats(image_scores, labels)
>>> result = bootstrap(stats)                                     # result.intervals, result.se
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from adnb.metrics import close_curve, regions, trapezoid
from adnb.runtime.errors import AdnbError

REPLICATES = 1000
LEVEL = 0.95
N_BINS = 4096
MAX_QUANTILE_SAMPLE = 2_000_000  # normal pixels the thresholds are estimated from (a stride beyond that)
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def bin_thresholds(normal_values: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """``n_bins − 1`` thresholds at evenly spaced quantiles of the normal pixel values (ties merged).

    Beyond ``MAX_QUANTILE_SAMPLE`` values an evenly strided subsample sets them: the thresholds
    only shape the bins, so an estimate of the quantiles is enough.
    """
    values = np.asarray(normal_values, dtype=np.float64).ravel()
    if values.size == 0:
        raise AdnbError("interval bins need normal pixels; no mask of this test set leaves any")
    if values.size > MAX_QUANTILE_SAMPLE:
        values = values[:: values.size // MAX_QUANTILE_SAMPLE + 1]
    return np.unique(np.quantile(values, np.linspace(0, 1, n_bins + 1)[1:-1]))


@dataclass(frozen=True)
class Estimate:
    """A metric and its 95 % interval (NaN bounds: no interval known); prints as ``0.912 [0.874, 0.951]``."""

    value: float
    low: float = float("nan")
    high: float = float("nan")

    def __str__(self) -> str:
        if not np.isfinite(self.value):
            return "—"
        if not (np.isfinite(self.low) and np.isfinite(self.high)):
            return f"{self.value:.3f}"
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass
class TestSetStats:
    """Per-image sufficient statistics of one test set (see the module docstring).

    ``scores``/``labels``: one per image (labels: True = anomalous). The pixel fields are ``None``
    without masks; else ``normal``, ``anomalous`` and ``overlap`` are ``(n_images, B + 1)`` bin
    counts (bin ``k`` holds ``t_{k−1} ≤ v < t_k``) and ``regions`` the ``(n_images,)`` region counts.
    """

    scores: np.ndarray
    labels: np.ndarray
    thresholds: np.ndarray | None = None
    normal: np.ndarray | None = None
    anomalous: np.ndarray | None = None
    overlap: np.ndarray | None = None
    regions: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        self.labels = np.asarray(self.labels) != 0  # 0 = good, anything else anomalous, as everywhere

    @property
    def has_pixels(self) -> bool:
        return self.normal is not None


class PixelBins:
    """Accumulates ``TestSetStats``' pixel fields one map at a time (tiles add to their image)."""

    def __init__(self, thresholds: np.ndarray, n_images: int):
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        size = (n_images, self.thresholds.size + 1)
        self.normal, self.anomalous, self.overlap = np.zeros(size), np.zeros(size), np.zeros(size)
        self.regions = np.zeros(n_images)

    def add(self, image: int, amap: np.ndarray, mask: np.ndarray) -> None:
        """Count ``amap``'s pixels (a map of image ``image``; ``mask`` non-zero = anomalous) into the bins."""
        amap, mask = np.asarray(amap, dtype=np.float64), np.asarray(mask) != 0
        if amap.shape != mask.shape:
            raise AdnbError(f"map of image {image} has shape {amap.shape} but its mask has {mask.shape}")
        size = self.thresholds.size + 1
        bins = np.searchsorted(self.thresholds, amap, side="right")
        self.normal[image] += np.bincount(bins[~mask], minlength=size)
        if mask.any():
            labels, count = regions(mask)
            inside = labels[mask]
            share = 1.0 / np.bincount(inside, minlength=count + 1)[inside]
            self.anomalous[image] += np.bincount(bins[mask], minlength=size)
            self.overlap[image] += np.bincount(bins[mask], weights=share, minlength=size)
            self.regions[image] += count

    def stats(self, scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> TestSetStats:
        return TestSetStats(scores, labels, self.thresholds, self.normal, self.anomalous, self.overlap, self.regions)


def replicate_weights(labels: Sequence[int] | np.ndarray, replicates: int = REPLICATES, seed: int = 0) -> np.ndarray:
    """``(replicates, n)`` draw counts: each row draws the good and the anomalous images apart, with
    replacement, as many of each as there are (multinomial counts, so each stratum's row sums to its size)."""
    labels = np.asarray(labels) != 0
    rng = np.random.default_rng(seed)
    weights = np.zeros((replicates, labels.size))
    for stratum in (~labels, labels):
        index = np.flatnonzero(stratum)
        if index.size:
            weights[:, index] = rng.multinomial(index.size, np.full(index.size, 1 / index.size), size=replicates)
    return weights


def _image_auroc(stats: TestSetStats, weights: np.ndarray) -> np.ndarray:
    pos, neg = stats.scores[stats.labels], stats.scores[~stats.labels]
    wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    wp, wn = weights[:, stats.labels], weights[:, ~stats.labels]
    return ((wp @ wins) * wn).sum(1) / (wp.sum(1) * wn.sum(1))


def _pixel_metrics(stats: TestSetStats, weights: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray]:
    normal, anomalous, overlap = weights @ stats.normal, weights @ stats.anomalous, weights @ stats.overlap
    n_regions = weights @ stats.regions
    below = np.cumsum(normal, axis=1) - normal
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = (anomalous * (below + 0.5 * normal)).sum(1) / (anomalous.sum(1) * normal.sum(1))
        # score ≥ t_j ⇔ bin > j: suffix sums over bins B … 1, i.e. thresholds from the highest down
        fpr = np.cumsum(normal[:, :0:-1], axis=1) / normal.sum(1, keepdims=True)
        pro = np.cumsum(overlap[:, :0:-1], axis=1) / n_regions[:, None]
    aupro = np.array([trapezoid(*close_curve(f, p), limit) / limit if np.isfinite(p).all() else np.nan
                      for f, p in zip(fpr, pro)])
    return auroc, aupro


def weighted_metrics(stats: TestSetStats, weights: np.ndarray, limit: float = 0.3) -> dict[str, np.ndarray | None]:
    """Each metric for every row of ``weights`` (``(R, n_images)``): NaN where a row leaves a class empty.

    ``weights`` all ones give the test set's own values (image AUROC exact, pixel metrics binned).
    """
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    out: dict[str, np.ndarray | None] = {"image_auroc": _image_auroc(stats, weights), "pixel_auroc": None,
                                         "aupro": None}
    if stats.has_pixels:
        out["pixel_auroc"], out["aupro"] = _pixel_metrics(stats, weights, limit)
    return out


@dataclass
class Bootstrap:
    """Percentile intervals and standard errors (the replicates' standard deviation) per metric."""

    intervals: dict[str, list[float] | None]
    se: dict[str, float | None]
    replicates: int
    level: float
    seed: int

    def describe(self) -> dict[str, object]:
        """What a results record says about how its intervals were made."""
        return {"method": "stratified bootstrap over test images, percentile interval", "replicates": self.replicates,
                "level": self.level, "seed": self.seed, "se": self.se}


def bootstrap(stats: TestSetStats, replicates: int = REPLICATES, level: float = LEVEL, seed: int = 0,
              limit: float = 0.3) -> Bootstrap:
    """The ``level`` percentile interval of each metric over ``replicates`` stratified image resamplings.

    ``None`` for a metric the test set does not have (no masks). Deterministic for a given ``seed``.
    """
    if stats.labels.all() or not stats.labels.any():
        raise AdnbError("intervals need both good and anomalous test images; this test set has only one kind")
    values = weighted_metrics(stats, replicate_weights(stats.labels, replicates, seed), limit)
    tail = 100 * (1 - level) / 2
    intervals: dict[str, list[float] | None] = {}
    se: dict[str, float | None] = {}
    for key in METRICS:
        v = values[key]
        v = None if v is None else v[np.isfinite(v)]
        if v is None or v.size == 0:
            intervals[key], se[key] = None, None
            continue
        low, high = np.percentile(v, [tail, 100 - tail])
        intervals[key], se[key] = [float(low), float(high)], float(v.std(ddof=1)) if v.size > 1 else 0.0
    return Bootstrap(intervals, se, replicates, level, seed)


def from_maps(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
              maps: Sequence[np.ndarray] | None = None, masks: Sequence[np.ndarray] | None = None, *,
              replicates: int = REPLICATES, seed: int = 0) -> Bootstrap:
    """``bootstrap`` of one score per image and, when given, one map and mask per image held in memory
    (``adnb.evaluation.evaluate`` streams its maps into ``PixelBins`` instead)."""
    stats = TestSetStats(scores, labels)
    if maps is not None and masks is not None:
        maps, masks = [np.asarray(m) for m in maps], [np.asarray(k) != 0 for k in masks]
        bins = PixelBins(bin_thresholds(np.concatenate([m[~k].ravel() for m, k in zip(maps, masks)])), len(maps))
        for i, (amap, mask) in enumerate(zip(maps, masks)):
            bins.add(i, amap, mask)
        stats = bins.stats(scores, labels)
    return bootstrap(stats, replicates, seed=seed)
