"""Calibrating a trained detector: what its scores look like on normal images, a threshold, a scale.

A raw anomaly score means little on its own: FAIR's are residual energies, PyramidFlow's
log-likelihoods, RealNet's reconstruction errors. At training time each checkpoint is scored on
**normal images it did not train on** (a held-out slice of ``train/good``), and, when the test set
has labels, on that too. The result, a ``Calibration`` stored in the checkpoint's sidecar under
``"calibration"``, gives ``python -m adnb score``

- the default image threshold, from the held-out normal images only: a conformal order statistic
  (``source = "normal-conformal"``, see ``conformal_threshold``), stored with the false-alarm
  bound its hold-out size guarantees (``false_alarm_bound``, see ``false_alarm_bound``);
- on request only (``--threshold f1-test``), the F1-optimal threshold on the labelled test set
  (``f1_threshold``): optimistic, since it is chosen on the images whose metrics are reported;
- a normalised score with the threshold at 0.5 (``normalise``, anomalib's min–max rule), so
  ``normalised ≥ 0.5`` ⇔ anomalous whatever the method;
- one fixed colour scale for anomaly-map overlays (``map_low``, ``map_high``), so the PNGs of two
  runs, or of two images in one run, can be compared by eye.

>>> calibration = calibrate(detector, held_out_normal_images, evaluation)   # at training time
>>> save_calibration(detector.checkpoint, calibration)
>>> load_calibration(checkpoint).threshold                                   # at scoring time
>>> load_calibration(checkpoint).describe()    # "threshold 3.2 (the largest of 10 held-out normal scores: …)"
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from adnb.runtime import atomic
from adnb.runtime.errors import AdnbError

if TYPE_CHECKING:
    from adnb.data.layout import Split
    from adnb.evaluation import Evaluation
    from adnb.methods.base import Detector

QUANTILES = (0.5, 0.9, 0.95, 0.99)
CONFORMAL_ALPHA = 0.01  # the false-alarm rate the normal-only threshold aims at; a small hold-out allows less
F1_TEST = "f1-test"  # the threshold choice that asks for the test set's F1-optimal threshold
SIDECAR_KEY = "calibration"
ArrayLike = np.ndarray | torch.Tensor | list[float]


@dataclass
class Calibration:
    """Score statistics of held-out normal images, the image threshold and the overlay colour scale.

    ``n, mean, std, min, max, quantiles`` describe the held-out normal image scores (``quantiles``
    maps ``"0.99"`` → value). ``threshold`` is the raw image-score threshold (anomalous when
    ``score ≥ threshold``) and ``source`` where it came from: ``"normal-conformal"`` (the ``k``-th
    smallest held-out normal score, the default; a new normal image reaches it with probability at
    most ``false_alarm_bound``), ``"f1-test"`` (the F1-optimal threshold of the ``n_test`` labelled
    test images, on request) or ``"user"``. ``f1_threshold``/``f1``: that test-set threshold and its
    F1, kept when the test set had labels. ``low``/``high`` are the score range of the
    normalisation; ``map_low``/``map_high`` the overlay colour scale; ``resize`` the resize mode the
    scores were measured with; ``alpha`` the conformal rule's target false-alarm rate.
    """

    n: int
    mean: float
    std: float
    min: float
    max: float
    quantiles: dict[str, float]
    threshold: float
    source: str
    low: float
    high: float
    map_low: float
    map_high: float
    f1: float | None = None
    n_test: int = 0
    resize: str = "squash"
    alpha: float = CONFORMAL_ALPHA
    k: int = 0
    false_alarm_bound: float | None = None
    f1_threshold: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING} - set(data)
        if missing:
            raise AdnbError(f"calibration record lacks {', '.join(sorted(missing))}; recalibrate the checkpoint "
                            "(retrain it, or call adnb.calibration.calibrate and save_calibration)")
        data = dict(data)
        if data["source"] == "f1":  # written before the test-set threshold became opt-in: the default is
            # the largest held-out normal score (k = n, the only order statistic such a record keeps)
            k, bound = false_alarm_bound(int(data["n"]), 0.0)
            data.update(f1_threshold=data["threshold"], threshold=data["max"], source="normal-conformal", k=k,
                        false_alarm_bound=bound)
        return cls(**{k: v for k, v in data.items() if k in names})

    def with_threshold(self, threshold: float, source: str = "user") -> Calibration:
        """The same calibration with another raw threshold (``--threshold`` on the command line)."""
        return dataclasses.replace(self, threshold=float(threshold), source=source, false_alarm_bound=None)

    def f1_test(self) -> Calibration:
        """The same calibration with the test set's F1-optimal threshold (``--threshold f1-test``)."""
        if self.f1_threshold is None:
            raise AdnbError("this checkpoint's calibration has no test-set F1 threshold (its test set had no labels, "
                            "or it predates them); use the default threshold or give one: --threshold VALUE")
        return dataclasses.replace(self, threshold=float(self.f1_threshold), source=F1_TEST, false_alarm_bound=None)

    def describe(self) -> str:
        """Where the threshold comes from and what it guarantees, in one line (``score`` prints it, the
        CSV's first line holds it)."""
        if self.source == "normal-conformal":
            n = self.n
            k, bound = (self.k, self.false_alarm_bound) if self.k else false_alarm_bound(n, self.alpha)
            which = f"the largest of {n}" if k == n else f"the {k}-th smallest of {n}"
            how = (f"{which} held-out normal scores: a new normal image is flagged with probability at most "
                   f"{n + 1 - k}/{n + 1} = {bound:.1%} (conformal)")
            if bound > self.alpha:
                how += f"; the {self.alpha:.0%} target needs {math.ceil(1 / self.alpha) - 1} held-out images"
        elif self.source in (F1_TEST, "f1"):
            how = (f"F1-optimal on the {self.n_test} labelled test images, F1 {self.f1:.3f}: optimistic, chosen on "
                   "the images whose metrics are reported")
        else:
            how = "given by --threshold"
        return f"threshold {self.threshold:.6g} ({how}); held-out normal scores {self.mean:.4g} ± {self.std:.4g}"


def _flat(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64).ravel()


def f1_optimal_threshold(scores: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """The threshold ``t`` (one of the scores) maximising F1 of ``score ≥ t``, and that F1.

    With ``TP(t), FP(t)`` the anomalous/normal images scoring ``≥ t`` and ``P`` the anomalous ones,
    ``F1(t) = 2·TP / (2·TP + FP + FN) = 2·TP(t) / (TP(t) + FP(t) + P)``. Ties go to the lowest
    threshold, as ``argmax`` over scikit-learn's ascending ``precision_recall_curve`` (and
    anomalib's F1AdaptiveThreshold) would pick.
    """
    s, y = _flat(scores), _flat(labels) > 0
    if s.shape != y.shape:
        raise AdnbError(f"{s.size} scores but {y.size} labels")
    if not y.any() or y.all():
        raise AdnbError("an F1-optimal threshold needs both normal and anomalous images")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    last = np.r_[s[1:] != s[:-1], True]  # the last of each run of equal scores: all of them are ≥ t
    tp, fp, thresholds = tp[last], fp[last], s[last]
    f1 = 2 * tp / (tp + fp + y.sum())
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))  # descending order: the lowest tied threshold is the last
    return float(thresholds[best]), float(f1[best])


def false_alarm_bound(n: int, alpha: float = CONFORMAL_ALPHA) -> tuple[int, float]:
    """The rank ``k`` the conformal rule takes among ``n`` held-out normal scores, and its false-alarm bound.

    ``k = min(⌈(n + 1)(1 − α)⌉, n)`` and the bound is ``(n + 1 − k) / (n + 1)``. Derivation: let
    ``S_1 … S_n`` be the held-out normal scores, ``S_(k)`` the ``k``-th smallest, and ``S`` a new normal
    image's score, exchangeable with them (same process, none trained on). Among the ``n + 1``
    scores ``S``'s rank is uniform on ``1 … n + 1`` (ties have probability zero for continuous
    scores), and ``S ≥ S_(k)`` exactly when ``S`` is above ``k`` of the held-out ones, i.e. its rank is
    ``k + 1 … n + 1``: ``P(S ≥ S_(k)) = (n + 1 − k) / (n + 1)``, averaged over the draw of the
    hold-out. That is ``≤ α`` when ``k = ⌈(n + 1)(1 − α)⌉ ≤ n``, i.e. ``n ≥ 1/α − 1``; with fewer
    images ``k = n`` (the largest score) and the bound is ``1/(n + 1)``, whatever ``α`` asked for.
    """
    if n < 1:
        raise AdnbError("a threshold needs at least one held-out normal score")
    k = min(math.ceil((n + 1) * (1 - alpha) - 1e-9), n)  # − 1e-9: (n + 1)(1 − α) in floats may sit just above an integer
    return k, (n + 1 - k) / (n + 1)


def conformal_threshold(normal_scores: ArrayLike, alpha: float = CONFORMAL_ALPHA) -> float:
    """The threshold from normal scores only: the ``k``-th smallest, ``k = ⌈(n + 1)(1 − α)⌉`` (capped at n).

    Why this rule: a new normal image scores at or above it with probability at most
    ``(n + 1 − k) / (n + 1)`` (``false_alarm_bound`` derives it), with no assumption on the score
    distribution (split-conformal prediction); below ``1/α − 1`` held-out images that bound is
    ``1/(n + 1)``, not α. A Gaussian rule such as mean + 3σ would assume a shape that
    max-over-pixels scores rarely have (they are right-skewed).
    """
    s = np.sort(_flat(normal_scores))
    k, _ = false_alarm_bound(s.size, alpha)
    return float(s[k - 1])


def normalise(score: ArrayLike | float, calibration: Calibration) -> np.ndarray | float:
    """``n(s) = clip((s − t) / (high − low) + 0.5, 0, 1)``: the threshold ``t`` ↦ 0.5, monotone.

    anomalib's min–max normalisation: ``low``/``high`` are the smallest and largest calibration
    scores, so a normal image lands below 0.5, a defect above it, and the spread of scores seen in
    calibration spans half the range on either side. Scores beyond clip to 0 or 1 (the raw score
    keeps their order). A float comes back for a float.
    """
    spread = max(calibration.high - calibration.low, 1e-12)
    value = np.clip((np.asarray(score, dtype=np.float64) - calibration.threshold) / spread + 0.5, 0.0, 1.0)
    return float(value) if np.ndim(score) == 0 else value


def map_scale(normal_maps: ArrayLike, anomalous_maps: ArrayLike | None = None) -> tuple[float, float]:
    """The overlay colour scale ``(low, high)`` from held-out normal maps (and anomalous ones if known).

    ``low`` = the 1st percentile of normal map values (normal background is the cool end);
    ``top`` = the largest normal map value; ``high = top + (top − low)``, so the hottest spot of a
    normal image sits at mid-scale. When anomalous maps are known, ``high`` rises to the median of
    their peaks if that is higher, so a typical defect reaches the hot end.
    """
    values = _flat(normal_maps)
    low, top = float(np.percentile(values, 1)), float(values.max())
    high = top + max(top - low, 1e-12)
    if anomalous_maps is not None and len(anomalous_maps):
        peaks = [float(_flat(m).max()) for m in anomalous_maps]
        high = max(high, float(np.median(peaks)))
    return low, high


def fit_calibration(normal_scores: ArrayLike, normal_maps: ArrayLike, test_scores: ArrayLike | None = None,
                    test_labels: ArrayLike | None = None, test_maps: ArrayLike | None = None, *,
                    alpha: float = CONFORMAL_ALPHA, resize: str = "squash") -> Calibration:
    """A ``Calibration`` from held-out normal scores and maps, and a labelled test set when there is one.

    The threshold is ``conformal_threshold(normal_scores, alpha)``, from the normal images alone,
    with its ``false_alarm_bound``. With a labelled test set (both labels) the F1-optimal test
    threshold (``f1_optimal_threshold``) is kept beside it for ``--threshold f1-test``. The
    normalisation range is the min and max of all scores given; the colour scale is ``map_scale``
    (anomalous test maps widen it).

    Beware of F1 on a test set with more defects than good images (MVTec's usual shape): flagging
    everything already reaches ``F1 = 2P / (2P + N)`` (0.86 with 30 defects and 10 good), so a weak
    model's F1-optimal threshold can sit below most normal scores; and it is chosen on the test
    images themselves, so its F1 overstates what new images get.
    """
    normal = _flat(normal_scores)
    if normal.size == 0:
        raise AdnbError("calibration needs at least one held-out normal image")
    every = normal
    k, bound = false_alarm_bound(normal.size, alpha)
    threshold = conformal_threshold(normal, alpha)
    labels = _flat(test_labels) > 0 if test_labels is not None else None
    f1_threshold, f1, n_test = None, None, 0
    if test_scores is not None and labels is not None and labels.any() and not labels.all():
        test = _flat(test_scores)
        f1_threshold, f1 = f1_optimal_threshold(test, labels)
        n_test, every = int(test.size), np.concatenate([normal, test])
    anomalous_maps = None
    if test_maps is not None and labels is not None:
        anomalous_maps = [m for m, y in zip(test_maps, labels) if y]
    map_low, map_high = map_scale(normal_maps, anomalous_maps)
    return Calibration(
        n=int(normal.size), mean=float(normal.mean()), std=float(normal.std()), min=float(normal.min()),
        max=float(normal.max()), quantiles={str(q): float(np.quantile(normal, q)) for q in QUANTILES},
        threshold=threshold, source="normal-conformal", low=float(every.min()), high=float(every.max()),
        map_low=map_low, map_high=map_high, f1=f1, n_test=n_test, resize=resize, alpha=alpha, k=k,
        false_alarm_bound=bound, f1_threshold=f1_threshold)


def calibrate(detector: Detector, normal_images: torch.Tensor | Split, evaluation: Evaluation | None = None, *,
              batch_size: int = 8, alpha: float = CONFORMAL_ALPHA, resize: str | None = None) -> Calibration:
    """Score held-out normal images with ``detector.predict`` and fit a ``Calibration``.

    ``normal_images``: uint8 ``N×3×S×S`` images the detector did not train on (resized the way
    its training images were), or a ``Split`` of them (with ``resize="tile"`` the tiles of one
    image count as one image: its score is the largest tile score — pass the ``Split``, not its
    tensor, for tiled training). ``evaluation``: the test-set evaluation of the same detector,
    whose scores and labels give the F1-optimal threshold. ``resize`` is recorded with the
    calibration (``python -m adnb score`` takes it as its default mode); a ``Split`` brings its own.
    """
    from adnb.evaluation import predict_all

    if hasattr(normal_images, "per_image"):  # a Split
        split, resize = normal_images, normal_images.resize
        scores, maps, _ = predict_all(detector, split.images, batch_size)
        scores = split.per_image(scores)
    else:
        scores, maps, _ = predict_all(detector, normal_images, batch_size)
    resize = resize or "squash"
    if evaluation is None:
        return fit_calibration(scores, maps, alpha=alpha, resize=resize)
    return fit_calibration(scores, maps, evaluation.scores, evaluation.labels, evaluation.maps, alpha=alpha,
                           resize=resize)


def holdout_indices(n: int, fraction: float = 0.1, *, at_least: int = 1, seed: int = 0) -> tuple[list[int], list[int]]:
    """Split ``range(n)`` into (training, held-out) indices: ``max(at_least, round(fraction·n))`` held out.

    At least one image always stays for training; with ``n < 2`` nothing is held out. Both lists
    are sorted; the choice is random with ``seed``.
    """
    held = min(max(at_least, round(fraction * n)), n - 1) if n >= 2 else 0
    picked = set(np.random.default_rng(seed).permutation(n)[:held].tolist())
    return [i for i in range(n) if i not in picked], sorted(picked)


def sidecar_path(checkpoint: str | Path) -> Path:
    """The JSON sidecar (``weights.json``) of a checkpoint given as ``weights.pt`` or its folder."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        path = path / "weights.pt"
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise AdnbError(f"no checkpoint sidecar at {sidecar}; the results record's 'checkpoint' field (or the "
                        "path 'python -m adnb train' prints) gives a trained model's weights.pt")
    return sidecar


def read_sidecar(checkpoint: str | Path) -> dict[str, Any]:
    """The checkpoint's sidecar as a dict."""
    sidecar = sidecar_path(checkpoint)
    try:
        return json.loads(sidecar.read_text())
    except json.JSONDecodeError as exc:
        raise AdnbError(f"{sidecar} is not valid JSON ({exc.msg} at line {exc.lineno}); retrain the checkpoint") from None


def save_calibration(checkpoint: str | Path, calibration: Calibration) -> Path:
    """Store ``calibration`` in the checkpoint's sidecar under ``"calibration"`` (atomically); returns the sidecar."""
    sidecar = sidecar_path(checkpoint)
    data = read_sidecar(checkpoint)
    data[SIDECAR_KEY] = calibration.to_dict()
    return atomic.write_text(sidecar, json.dumps(data, indent=2))  # a reader never sees half a sidecar


def load_calibration(checkpoint: str | Path) -> Calibration | None:
    """The checkpoint's calibration, or ``None`` for a checkpoint saved before calibration existed."""
    data = read_sidecar(checkpoint).get(SIDECAR_KEY)
    return None if data is None else Calibration.from_dict(data)
