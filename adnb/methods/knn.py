"""Feature kNN: the line every method built on pretrained features has to beat (PatchCore's idea).

No training at all: a frozen ImageNet backbone describes every patch of the normal images, and a
test patch is as anomalous as it is far from its nearest normal patch (Roth et al., "Towards Total
Recall in Industrial Anomaly Detection", CVPR 2022, without the coreset):

1. **Patch features.** Stages at strides 8 and 16 (``stages``), each averaged over its 3×3
   neighbourhood (``pool``), the coarser one upsampled to the finer, concatenated: one vector per
   patch of the stride-8 grid.
2. **Memory bank.** The patch vectors of all training images — or ``bank_size`` of them drawn at
   random (PatchCore picks them by greedy coreset; a random draw is the cheap stand-in).
3. **Score.** d(p) = min_m ‖p − m‖₂ over the bank, per test patch; the map is upsampled to the
   image and smoothed with a Gaussian (σ = ``sigma`` pixels at 256²); the image score is its maximum.

If a method with the same features, trained for minutes, cannot beat this, its training added nothing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import kornia
import torch
import torch.nn.functional as F

from adnb.backbones import DEFAULT_BACKBONE, Backbone, resolve_weights
from adnb.data.layout import Category
from adnb.methods.base import Detector, Prediction, config_from
from adnb.runtime.cache import CacheEntry
from adnb.runtime.precision import autocast
from adnb.runtime.seed import generator as seeded_generator, seeded


@dataclass(frozen=True)
class KNNConfig:
    image_size: int = 224
    backbone: str = DEFAULT_BACKBONE
    stages: tuple[int, ...] = (2, 3)  # feature levels at strides 8 and 16 (ResNets' layer2, layer3)
    weights: str = "auto"  # auto | imagenet | random
    pool: int = 3  # side of the neighbourhood each patch vector averages
    bank_size: int = 40_000  # patches kept in the memory bank, drawn at random (0: every training patch)
    sigma: float = 4.0  # Gaussian smoothing of the map, in pixels of a 256-pixel image
    precision: str = "fp32"  # the backbone's arithmetic: fp32 | bf16 | fp16 | auto (distances stay fp32)
    seed: int = 0


def patch_features(features: list[torch.Tensor], pool: int) -> torch.Tensor:
    """Locally averaged stage features on the finest stage's grid, concatenated: (B, ΣC, H, W)."""
    size = features[0].shape[-2:]
    pooled = [F.avg_pool2d(f, pool, stride=1, padding=pool // 2, count_include_pad=False) if pool > 1 else f
              for f in features]
    return torch.cat([p if p.shape[-2:] == size else F.interpolate(p, size=size, mode="bilinear", align_corners=False)
                      for p in pooled], dim=1)


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """min over the bank's rows of the Euclidean distance to each query row (Q×D, N×D → Q)."""
    return torch.cat([torch.cdist(q, bank).amin(dim=1) for q in queries.split(chunk)])


class FeatureKNN(Detector):
    method = "knn"
    config_class = KNNConfig

    def __init__(self, config: KNNConfig):
        super().__init__(config)
        self.backbone = Backbone(config.backbone, config.stages)
        self.register_buffer("bank", torch.zeros(0, sum(self.backbone.channels)))

    @torch.no_grad()
    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) patch vectors of ``images`` in [0, 1] (fp32)."""
        with autocast(self.precision, images.device):
            features = [f.float() for f in self.backbone(images)]
        return patch_features(features, self.config.pool)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        p = self.patches(images)
        b, d, h, w = p.shape
        distances = nearest_distance(p.permute(0, 2, 3, 1).reshape(-1, d), self.bank).view(b, 1, h, w)
        maps = F.interpolate(distances, size=images.shape[-2:], mode="bilinear", align_corners=False)
        sigma = self.config.sigma * self.image_size / 256
        if sigma > 0:
            k = 2 * round(4 * sigma) + 1
            maps = kornia.filters.gaussian_blur2d(maps, (k, k), (sigma, sigma))
        maps = maps[:, 0]
        return Prediction(maps.flatten(1).amax(dim=1), maps)


def fit(config: KNNConfig, images: torch.Tensor, *, device: torch.device | str = "cpu",
        cache: CacheEntry | None = None, force_train: bool = False) -> FeatureKNN:
    """Fill the memory bank with the patch vectors of normal ``images`` (N×3×S×S in [0, 1])."""
    with seeded(config.seed):
        detector = FeatureKNN(config)
    if detector.restore(cache, force_train):
        return detector.to(device).eval()
    start = time.perf_counter()
    detector.to(device)
    source = detector.backbone.load_weights(config.weights)
    if source.kind == "random":
        detector.backbone.estimate_batchnorm(images.to(device))
    vectors = torch.cat([detector.patches(b.to(device)).permute(0, 2, 3, 1).flatten(0, 2) for b in images.split(16)])
    if 0 < config.bank_size < len(vectors):
        keep = torch.randperm(len(vectors), generator=seeded_generator(config.seed))[:config.bank_size]
        vectors = vectors[keep.to(vectors.device)]
    detector.bank = vectors.contiguous()
    return detector.store(cache, time.perf_counter() - start,
                          weights={"backbone": source.kind, "backbone_origin": source.origin or "random initialisation"},
                          bank=len(vectors), precision=detector.precision).eval()


def resolve(params: Mapping[str, Any], category: Category | None = None) -> KNNConfig:
    """The config with the backbone's weights resolved (the cache key names what runs)."""
    config = config_from(KNNConfig, params)
    return replace(config, weights=resolve_weights(config.backbone, config.weights))
