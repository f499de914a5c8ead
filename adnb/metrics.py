"""Image AUROC, pixel AUROC and AUPRO, exactly as the MVTec AD reference computes them.

The three numbers every chapter reports:

- **image AUROC** — ROC-AUC of one score per test image against its label (good = 0).
- **pixel AUROC** — ROC-AUC over every pixel of every test image of the category, pooled.
- **AUPRO** — the area under the per-region-overlap curve up to a false-positive rate of 0.3,
  divided by 0.3 (Bergmann et al., IJCV 2021). Regions are the 8-connected components of the
  ground-truth masks, pooled over the category; every distinct score is a threshold::

      FPR(t) = #{normal pixels with score >= t} / #normal pixels
      PRO(t) = 1/R * sum_k #{pixels of region k with score >= t} / |region k|

  The curve runs from (0, 0) to (1, 1) and is integrated with the trapezoid rule; if 0.3 is
  not a sample point, PRO is interpolated linearly there.

How it is computed. Only the anomalous pixels need their region; the normal pixels only need
to be counted. So the normal scores are sorted once, and for each distinct anomalous score
``u`` the curve gets two vertices, ``(FPR(>u), PRO(>u))`` and ``(FPR(>=u), PRO(>=u))``. Between
two anomalous scores PRO is flat, so the vertices the reference adds there lie on a horizontal
segment and change nothing: the polyline, and hence the area, is the reference's. The same
sorted normal scores give the pixel AUROC by the Mann–Whitney count (ties count one half),
which equals scikit-learn's ``roc_auc_score``.

For categories too large to hold in memory (1,000 images at native size), ``PixelAccumulator``
streams maps into histograms keyed by the float32 bit pattern (``bits=20``: 11 mantissa bits,
scores kept to a relative precision of 2**-11 ≈ 4.9e-4), and runs the same algorithm on the
bins; memory stays at a few tens of MB whatever the number of images.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from adnb.runtime.errors import AdnbError

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def image_auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """ROC-AUC of image scores against labels (0 = good, non-zero = anomalous)."""
    labels = np.asarray(labels) != 0
    if labels.all() or not labels.any():
        raise AdnbError("image AUROC needs both good and anomalous test images; this test set has only one kind")
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def pixel_auroc(maps: Iterable[np.ndarray], masks: Iterable[np.ndarray]) -> float:
    """ROC-AUC over all pixels of all maps (masks: non-zero = anomalous)."""
    return _collect(maps, masks).pixel_auroc()


def aupro(maps: Iterable[np.ndarray], masks: Iterable[np.ndarray], limit: float = 0.3) -> float:
    """Area under the PRO curve up to FPR ``limit``, divided by ``limit`` (exact MVTec AD algorithm)."""
    return _collect(maps, masks).aupro(limit)


def pro_curve(maps: Iterable[np.ndarray], masks: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The exact PRO curve's vertices (FPR, PRO), from (0, 0) to (1, 1)."""
    return _collect(maps, masks).curve()


def pixel_metrics(maps: Iterable[np.ndarray], masks: Iterable[np.ndarray], limit: float = 0.3) -> dict[str, float]:
    """Pixel AUROC and AUPRO from one pass over the maps (what ``evaluate`` uses)."""
    stats = _collect(maps, masks)
    return {"pixel_auroc": stats.pixel_auroc(), "aupro": stats.aupro(limit)}


def trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under the polyline (x, y) from x[0] to ``x_max`` (x non-decreasing).

    Points beyond ``x_max`` are dropped; if ``x_max`` falls between two points, y is
    interpolated linearly there and the partial trapezoid is added — the reference's rule.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    inside = x <= x_max
    area = float(np.sum(np.diff(x[inside]) * (y[inside][1:] + y[inside][:-1]) / 2))
    if inside.all() or x_max in x:
        return area
    i = int(np.argmax(~inside))  # first point beyond x_max
    x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
    y_cut = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
    return float(area + (x_max - x0) * (y0 + y_cut) / 2)


def regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 8-connected anomalous regions of a mask: (labels, count)."""
    labels, count = ndimage.label(np.asarray(mask) != 0, structure=EIGHT_CONNECTED)
    return labels, int(count)


def _region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """For each anomalous pixel (in C order), 1/|its region|; and the number of regions."""
    labels, count = regions(mask)
    inside = labels[labels > 0]
    sizes = np.bincount(inside, minlength=count + 1)
    return 1.0 / sizes[inside], count


def _check_pair(amap: np.ndarray, mask: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
    amap, mask = np.asarray(amap), np.asarray(mask)
    if amap.ndim != 2 or amap.shape != mask.shape:
        raise AdnbError(f"map {index} has shape {amap.shape} but its mask has {mask.shape}; "
                        "resize the map to the mask (or both to one size) before scoring")
    return amap, mask != 0


@dataclass
class _PixelStats:
    """Sorted normal scores plus anomalous scores with their region weights."""

    normal_sorted: np.ndarray
    anomalous: np.ndarray
    weights: np.ndarray
    n_regions: int

    def _check(self) -> None:
        if self.anomalous.size == 0:
            raise AdnbError("pixel metrics need anomalous pixels; no mask of this test set marks any")
        if self.normal_sorted.size == 0:
            raise AdnbError("pixel metrics need normal pixels; every mask of this test set is all anomalous")

    def pixel_auroc(self) -> float:
        self._check()
        below = np.searchsorted(self.normal_sorted, self.anomalous, side="left")
        upto = np.searchsorted(self.normal_sorted, self.anomalous, side="right")
        wins = below.sum(dtype=np.float64) + 0.5 * (upto - below).sum(dtype=np.float64)
        return float(wins / (self.normal_sorted.size * self.anomalous.size))

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """The PRO curve's vertices (FPR, PRO), from (0, 0) to (1, 1)."""
        self._check()
        order = np.argsort(-self.anomalous, kind="stable")
        scores, weights = self.anomalous[order], self.weights[order]
        last_of_run = np.append(np.diff(scores) != 0, True)
        distinct = scores[last_of_run]
        pro_at = np.cumsum(weights)[last_of_run] / self.n_regions
        pro_above = np.concatenate([[0.0], pro_at[:-1]])
        n = self.normal_sorted.size
        fpr_at = (n - np.searchsorted(self.normal_sorted, distinct, side="left")) / n
        fpr_above = (n - np.searchsorted(self.normal_sorted, distinct, side="right")) / n
        fpr = np.stack([fpr_above, fpr_at], axis=1).ravel()
        pro = np.stack([pro_above, pro_at], axis=1).ravel()
        return close_curve(fpr, pro)

    def aupro(self, limit: float = 0.3) -> float:
        fpr, pro = self.curve()
        return trapezoid(fpr, pro, limit) / limit


def close_curve(fpr: np.ndarray, pro: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A PRO curve's points (FPR, PRO), clipped to 1 and closed by (0, 0) and (1, 1)."""
    fpr, pro = np.minimum(fpr, 1.0), np.minimum(pro, 1.0)
    return np.concatenate([[0.0], fpr, [1.0]]), np.concatenate([[0.0], pro, [1.0]])


def _collect(maps: Iterable[np.ndarray], masks: Iterable[np.ndarray]) -> _PixelStats:
    normal, anomalous, weights, n_regions = [], [], [], 0
    for i, (amap, mask) in enumerate(zip(maps, masks, strict=True)):
        amap, mask = _check_pair(amap, mask, i)
        normal.append(amap[~mask].ravel())
        if mask.any():
            anomalous.append(amap[mask].ravel())
            w, count = _region_weights(mask)
            weights.append(w)
            n_regions += count
    dtype = np.result_type(np.float32, *[a.dtype for a in normal[:1]])
    normal_sorted = np.sort(np.concatenate(normal).astype(dtype, copy=False)) if normal else np.empty(0, dtype)
    cat = (lambda parts, dt: np.concatenate(parts).astype(dt, copy=False) if parts else np.empty(0, dt))
    return _PixelStats(normal_sorted, cat(anomalous, dtype), cat(weights, np.float64), n_regions)


# --------------------------------------------------------------------------- streaming, binned


def float_keys(values: np.ndarray, bits: int) -> np.ndarray:
    """Order-preserving integer keys of float32 values, keeping the top ``bits`` of 32.

    The float32 bit pattern, with the sign bit flipped for positives and all bits flipped for
    negatives, sorts like the floats; dropping low bits bins values of equal leading digits.
    """
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    sortable = np.where(u & 0x80000000, ~u, u | 0x80000000)
    return (sortable >> np.uint32(32 - bits)).astype(np.int64)


@dataclass
class PixelAccumulator:
    """Pixel AUROC and AUPRO over maps fed one at a time.

    Exact while the pixels seen fit under ``max_exact_pixels``; beyond that it folds what it
    holds into histograms of ``2**bits`` bins (see the module docstring for the precision)
    and memory stays flat. ``exact`` tells which happened.
    """

    max_exact_pixels: int = 50_000_000
    bits: int = 20
    exact: bool = True
    n_regions: int = 0
    _normal: list[np.ndarray] = field(default_factory=list)
    _anomalous: list[np.ndarray] = field(default_factory=list)
    _weights: list[np.ndarray] = field(default_factory=list)
    _pixels: int = 0
    _hist: dict[str, np.ndarray] | None = None

    def update(self, amap: np.ndarray, mask: np.ndarray) -> None:
        amap, mask = _check_pair(amap, mask, self._pixels)
        amap = amap.astype(np.float32, copy=False)
        normal = amap[~mask].ravel()
        anomalous, w = amap[mask].ravel(), np.empty(0)
        if mask.any():
            w, count = _region_weights(mask)
            self.n_regions += count
        self._pixels += amap.size
        if self.exact and self._pixels > self.max_exact_pixels:
            self._fold()
        if self.exact:
            self._normal.append(normal)
            self._anomalous.append(anomalous)
            self._weights.append(w)
        else:
            self._add_to_hist(normal, anomalous, w)

    def _fold(self) -> None:
        self.exact = False
        size = 1 << self.bits
        self._hist = {k: np.zeros(size, np.float64) for k in ("normal", "anomalous", "weight")}
        for normal, anomalous, w in zip(self._normal, self._anomalous, self._weights):
            self._add_to_hist(normal, anomalous, w)
        self._normal, self._anomalous, self._weights = [], [], []

    def _add_to_hist(self, normal: np.ndarray, anomalous: np.ndarray, w: np.ndarray) -> None:
        assert self._hist is not None
        size = 1 << self.bits
        self._hist["normal"] += np.bincount(float_keys(normal, self.bits), minlength=size)
        keys = float_keys(anomalous, self.bits)
        self._hist["anomalous"] += np.bincount(keys, minlength=size)
        self._hist["weight"] += np.bincount(keys, weights=w, minlength=size)

    def compute(self, limit: float = 0.3) -> dict[str, float]:
        if self.exact:
            stats = _PixelStats(np.sort(np.concatenate(self._normal)) if self._normal else np.empty(0, np.float32),
                                np.concatenate(self._anomalous) if self._anomalous else np.empty(0, np.float32),
                                np.concatenate(self._weights) if self._weights else np.empty(0), self.n_regions)
            return {"pixel_auroc": stats.pixel_auroc(), "aupro": stats.aupro(limit)}
        assert self._hist is not None
        normal, anomalous, weight = self._hist["normal"], self._hist["anomalous"], self._hist["weight"]
        n_normal, n_anomalous = normal.sum(), anomalous.sum()
        if n_anomalous == 0 or n_normal == 0:
            raise AdnbError("pixel metrics need both normal and anomalous pixels in the masks")
        below = np.cumsum(normal) - normal  # normal pixels in lower bins
        auroc = float(np.sum(anomalous * (below + 0.5 * normal)) / (n_normal * n_anomalous))
        used = (normal + anomalous) > 0
        fpr = np.cumsum(normal[used][::-1]) / n_normal
        pro = np.cumsum(weight[used][::-1]) / self.n_regions
        fpr, pro = close_curve(fpr, pro)
        return {"pixel_auroc": auroc, "aupro": float(trapezoid(fpr, pro, limit) / limit)}

    @property
    def precision(self) -> str:
        return "exact" if self.exact else f"binned: 2^{self.bits} float32-key bins (relative precision 2^-{self.bits - 9})"


# --------------------------------------------------------------------------- variants the book compares


def aupro_fixed_thresholds(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], n_thresholds: int = 200,
                           limit: float = 0.3, rescale_fpr: bool = False) -> float:
    """The AUPRO many repositories compute instead of the reference (shown in the book, not used).

    Thresholds are ``n_thresholds`` equally spaced score values between the global minimum and
    maximum; PRO is averaged over regions at each one. Points with FPR < ``limit`` are kept and
    integrated without interpolation at the limit. ``rescale_fpr=False`` divides by ``limit``
    (as the reference); ``rescale_fpr=True`` stretches the kept FPRs to [0, 1] by dividing by
    their maximum (the RD4AD-style ``compute_pro``). ``limit=1`` gives the uncut curve.
    """
    maps = [np.asarray(m, dtype=np.float64) for m in maps]
    masks = [np.asarray(m) != 0 for m in masks]
    lo, hi = min(m.min() for m in maps), max(m.max() for m in maps)
    labelled = [regions(m) for m in masks]
    n_normal = sum((~m).sum() for m in masks)
    fprs, pros = [], []
    for t in np.linspace(lo, hi, n_thresholds):
        overlaps, fp = [], 0
        for amap, mask, (labels, count) in zip(maps, masks, labelled):
            pred = amap > t
            fp += np.count_nonzero(pred & ~mask)
            if count:
                hit = np.bincount(labels[pred], minlength=count + 1)[1:]
                overlaps.extend(hit / np.bincount(labels.ravel(), minlength=count + 1)[1:])
        fprs.append(fp / n_normal)
        pros.append(np.mean(overlaps))
    fpr, pro = np.array(fprs)[::-1], np.array(pros)[::-1]
    keep = fpr < limit if limit < 1 else np.ones_like(fpr, dtype=bool)
    fpr, pro = fpr[keep], pro[keep]
    if rescale_fpr:
        return float(np.trapezoid(pro, fpr / fpr.max()))
    return float(np.trapezoid(pro, fpr) / limit)
