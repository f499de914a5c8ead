"""Scoring a trained detector on a category's test set, the same way for every method.

Maps are scored at each image's native resolution (the maps stitched and upsampled bilinearly to
the original mask: the MVTec protocol and the book's default, so methods of different input sizes
are scored on the same pixels) or at the model's resolution (the masks resized, coverage ≥ 0.5).
Every metric comes with its 95 % interval, a stratified bootstrap over the test images
(``adnb.intervals``). Inference speed is timed on the model's forward passes alone, images already
in memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from adnb.data.framing import plan, stitch
from adnb.data.images import image_size, read_mask
from adnb.data.layout import Category, Sample
from adnb.intervals import Bootstrap, Estimate, PixelBins, TestSetStats, bin_thresholds, bootstrap
from adnb.metrics import PixelAccumulator, image_auroc
from adnb.methods.base import Detector
from adnb.runtime.device import describe
from adnb.runtime.errors import AdnbError
from adnb.runtime.progress import progress
from adnb.runtime.records import make_record

RESOLUTIONS = ("model", "native")


@dataclass
class Evaluation:
    """Metrics and what they were computed from."""

    metrics: dict[str, float | None]
    scores: np.ndarray
    labels: np.ndarray
    samples: list[Sample]
    maps: torch.Tensor  # (N, S, S) at the model's resolution, on the CPU
    images: torch.Tensor  # (N, 3, S, S) uint8, the test images as the model saw them
    masks: torch.Tensor | None  # (N, S, S) bool at the model's resolution
    resolution: str
    precision: str
    infer_images_per_s: float
    extra: dict[str, Any] = field(default_factory=dict)
    bootstrap: Bootstrap | None = None  # the metrics' intervals and how they were made
    origin: torch.Tensor | None = None  # row → image index (tiles), as ``Split.origin``; None: one row per image
    resize: str = "squash"

    def pairs(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The (map, mask) pairs the pixel metrics were computed from, at ``resolution`` (nothing without masks)."""
        if self.masks is None:
            return
        if self.resolution == "model":
            yield from zip(self.maps.numpy(), self.masks.numpy())
            return
        origin = self.origin if self.origin is not None else torch.arange(len(self.maps))
        for _, amap, mask in native_maps(self.samples, origin, self.resize, self.maps):
            yield amap, mask

    @property
    def defects(self) -> list[str]:
        return [s.defect for s in self.samples]

    @property
    def intervals(self) -> dict[str, list[float] | None]:
        """Each metric's 95 % interval ``[low, high]`` (``None`` where the metric is)."""
        return self.bootstrap.intervals if self.bootstrap else {k: None for k in self.metrics}

    def table(self) -> dict[str, str]:
        """Each metric as ``0.912 [0.874, 0.951]`` (value and 95 % interval), ``—`` where there is none."""
        return {k: str(Estimate(np.nan) if v is None else Estimate(v, *(self.intervals.get(k) or (np.nan, np.nan))))
                for k, v in self.metrics.items()}


def native_mask(sample: Sample) -> np.ndarray:
    """The sample's ground truth at its image's own size (all normal for a good image)."""
    return read_mask(sample.mask) if sample.mask is not None else np.zeros(image_size(sample.image), bool)


def native_maps(samples: Sequence[Sample], origin: torch.Tensor, resize: str,
                maps: torch.Tensor) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(image index, map, mask) per test image at the image's own size: its windows' maps (rows of ``maps``
    whose ``origin`` is the image) stitched back (``adnb.data.framing.stitch``, bilinear; what
    ``python -m adnb score`` writes), and its original mask."""
    for j, sample in enumerate(samples):
        mask = native_mask(sample)
        rows = (origin == j).nonzero().flatten()
        yield j, stitch(maps[rows], plan(*mask.shape, maps.shape[-1], resize)).numpy(), mask


@torch.no_grad()
def predict_all(detector: Detector, images: torch.Tensor, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Scores and maps for uint8 ``images`` (N×3×S×S), and the seconds spent in ``predict``."""
    device, seconds = detector.device, 0.0
    scores, maps = [], []
    for start in progress(range(0, len(images), batch_size), desc="scoring"):
        batch = images[start:start + batch_size].to(device).float().div_(255)
        t = time.perf_counter()
        pred = detector.predict(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t
        scores.append(pred.scores.float().cpu())
        maps.append(pred.maps.float().cpu())
    return torch.cat(scores), torch.cat(maps), seconds


def evaluate(detector: Detector, category: Category, *, resolution: str = "native", batch_size: int = 8,
             limit: int | None = None, seed: int = 0, resize: str = "squash") -> Evaluation:
    """Image AUROC, pixel AUROC and AUPRO of ``detector`` on ``category``'s test set, with intervals.

    ``resize`` frames the test images as the detector was trained (``adnb.data.framing``); with
    tiles, an image's score is the largest of its tiles'. At ``resolution="native"`` each image's
    windows are stitched into one map at the mask's size; at ``"model"`` every window's pixels count
    against the mask resized with it. The intervals resample images (an image's tiles go together),
    with ``seed``.
    """
    if resolution not in RESOLUTIONS:
        raise AdnbError(f"unknown evaluation resolution {resolution!r}; valid: {', '.join(RESOLUTIONS)}")
    detector.eval()
    split = category.load("test", detector.image_size, limit=limit, seed=seed, resize=resize)
    scores, maps, seconds = predict_all(detector, split.images, batch_size)
    labels = np.array([s.label for s in split.image_samples])
    image_scores = split.per_image(scores)
    metrics: dict[str, float | None] = {"image_auroc": image_auroc(image_scores, labels),
                                        "pixel_auroc": None, "aupro": None}
    acc = PixelAccumulator()
    stats = TestSetStats(image_scores, labels)
    if split.masks is not None:
        # the bins' edges from the model-resolution maps: upsampling keeps their range and shape
        bins = PixelBins(bin_thresholds(maps[~split.masks.bool()].numpy()), split.n_images)
        pairs = (native_maps(split.image_samples, split.origin, split.resize, maps) if resolution == "native" else
                 ((int(split.origin[i]), maps[i].numpy(), split.masks[i].numpy()) for i in range(len(split))))
        for image, amap, mask in pairs:
            acc.update(amap, mask)
            bins.add(image, amap, mask)
        metrics.update(acc.compute())
        stats = bins.stats(image_scores, labels)
    return Evaluation(metrics, image_scores, labels, split.image_samples, maps, split.images,
                      split.masks, resolution, acc.precision if split.masks is not None else "no masks",
                      len(split) / max(seconds, 1e-9), bootstrap=bootstrap(stats, seed=seed), origin=split.origin,
                      resize=split.resize)


@torch.no_grad()
def throughput(detector: Detector, batch_size: int, n_images: int = 16, warmup: int = 1) -> float:
    """Images per second of ``detector.predict`` at ``batch_size`` on random input (a benchmark)."""
    detector.eval()
    s = detector.image_size
    x = torch.rand(batch_size, 3, s, s, device=detector.device)
    for _ in range(warmup):
        detector.predict(x)
    n_batches = max(1, n_images // batch_size)
    t = time.perf_counter()
    for _ in range(n_batches):
        detector.predict(x)
    if detector.device.type == "cuda":
        torch.cuda.synchronize(detector.device)
    return n_batches * batch_size / (time.perf_counter() - t)


def result_record(detector: Detector, category: Category, evaluation: Evaluation, *, preset: str, config_hash: str,
                  **extra: Any) -> dict[str, Any]:
    """The results record of one trained detector on one category (see the contract).

    Training time (per stage, for methods trained in stages), weight sources and the checkpoint come
    from the detector itself (set by ``Detector.store``/``restore``), so a chapter's record and the
    CLI's are the same; ``extra`` adds fields such as ``peak_memory_mb`` or ``variant``.
    """
    stages = getattr(detector, "fit_info", {}).get("stage_seconds")
    return make_record(
        method=detector.method, dataset=category.dataset, category=category.name, preset=preset,
        device=describe(detector.device), image_size=detector.image_size, metrics=evaluation.metrics,
        train_seconds=detector.train_seconds, infer_images_per_s=evaluation.infer_images_per_s,
        n_params=detector.n_params(), weights=detector.weights or {"all": "trained-here"},
        checkpoint=detector.checkpoint, config_hash=config_hash, intervals=evaluation.intervals,
        precision=detector.precision, eval_resolution=evaluation.resolution,
        intervals_method=evaluation.bootstrap.describe() if evaluation.bootstrap else None,
        metrics_precision=evaluation.precision, n_test=len(evaluation.labels),
        **({"stage_seconds": stages} if stages else {}), **extra)
