"""PatchCore: the reference a feature-based method has to beat (Roth et al., "Towards Total Recall in
Industrial Anomaly Detection", CVPR 2022).

Nothing is optimised: a frozen ImageNet backbone describes every patch of the normal images, a
coreset of those descriptions is the memory bank, and a test patch is as anomalous as it is far
from the bank.

1. **Locally aware patch features.** Two middle stages (``stages``: strides 8 and 16), each
   averaged over the p×p neighbourhood of every position (``pool`` = 3, the paper's p; zero padding
   counts at the border, as in the official code), the coarser one upsampled bilinearly to the finer
   grid, concatenated: one vector per patch of the stride-8 grid. (The official code also averages
   each stage's channels down to 1,024 before concatenating; EfficientNet-Lite0's 40 + 112 channels
   have nothing to reduce, so the channels are concatenated as they are, as anomalib does.)
2. **Memory bank.** ``coreset`` (10 %) of all training patches, chosen by greedy k-center on a
   random projection to ``projection`` dimensions (``adnb.coreset``; ``sampler: greedy``), or drawn
   at random (``sampler: random``: the book's earlier feature-kNN reference; a random draw keeps each
   patch with probability ``coreset``, so a rare kind of normal patch is likely left out).
3. **Scores.** A test patch scores s(p) = min_{m ∈ M} ‖p − m‖₂. The map is the patch scores
   upsampled bilinearly to the image and smoothed by a Gaussian of σ = ``sigma`` pixels at 224² (the
   paper's σ = 4 at its 224² crops; scaled with the image size). The image score re-weights the
   largest patch score s* = ‖m_test* − m*‖ (m* its nearest bank vector) by how isolated m* is among
   its b = ``neighbours`` nearest bank vectors N_b(m*) (m* itself among them) — the paper's Eq. 7::

       s = (1 − exp ‖m_test* − m*‖ / Σ_{m ∈ N_b(m*)} exp ‖m_test* − m‖) · s*

   (``neighbours`` = 1: s = s*, no re-weighting, as in the official code).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kornia
import torch
import torch.nn.functional as F

from adnb.backbones import DEFAULT_BACKBONE, Backbone, with_weights_resolved
from adnb.coreset import PROJECTION_DIM, coreset_indices
from adnb.data.layout import Category
from adnb.methods.base import Detector, Prediction, config_from
from adnb.methods.registry import MethodSpec, register
from adnb.runtime.cache import CacheEntry
from adnb.runtime.errors import AdnbError
from adnb.runtime.precision import autocast
from adnb.runtime.seed import generator as seeded_generator, seeded

SAMPLERS = ("greedy", "random")
SIGMA_SIZE = 224  # ``sigma`` is in pixels of an image of this side (the papers' input size)


@dataclass(frozen=True)
class PatchCoreConfig:
    image_size: int = 224
    backbone: str = DEFAULT_BACKBONE
    stages: tuple[int, ...] = (2, 3)  # feature levels at strides 8 and 16 (ResNets' layer2, layer3)
    weights: str = "auto"  # auto | imagenet | random
    pool: int = 3  # side of the neighbourhood each patch vector averages (the paper's p)
    sampler: str = "greedy"  # greedy (k-center coreset) | random (a random draw of the same size)
    coreset: float = 0.1  # share of the training patches the memory bank keeps (1: all of them)
    projection: int = PROJECTION_DIM  # dimension of the random projection the greedy search runs on
    neighbours: int = 9  # b of the image score's re-weighting (1: the largest patch score as it is)
    sigma: float = 4.0  # Gaussian smoothing of the map, in pixels of a 224-pixel image
    precision: str = "fp32"  # the backbone's arithmetic: fp32 | bf16 | fp16 | auto (distances stay fp32)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise AdnbError(f"unknown PatchCore sampler {self.sampler!r}; valid: {', '.join(SAMPLERS)}")
        if not 0 < self.coreset <= 1:
            raise AdnbError(f"coreset = {self.coreset} is not a share of the training patches in (0, 1]")
        if self.neighbours < 1:
            raise AdnbError(f"neighbours = {self.neighbours}: the re-weighting needs b ≥ 1 (1 turns it off)")


def patch_features(features: list[torch.Tensor], pool: int, upsample: str = "bilinear") -> torch.Tensor:
    """Stage features averaged over their ``pool``×``pool`` neighbourhoods (zero padding counted), the
    coarser ones upsampled (``upsample``: an ``F.interpolate`` mode) to the finest stage's grid,
    concatenated: (B, ΣC, H, W)."""
    size = features[0].shape[-2:]
    pooled = [F.avg_pool2d(f, pool, stride=1, padding=pool // 2) if pool > 1 else f for f in features]
    corners = {} if upsample == "nearest" else {"align_corners": False}
    return torch.cat([p if p.shape[-2:] == size else F.interpolate(p, size=size, mode=upsample, **corners)
                      for p in pooled], dim=1)


def smooth_map(scores: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Patch scores (B, h, w) upsampled bilinearly to ``size``² and blurred by a Gaussian of ``sigma``
    pixels (kernel 2⌊4σ + ½⌋ + 1, reflected at the border): (B, size, size)."""
    maps = F.interpolate(scores[:, None], size=(size, size), mode="bilinear", align_corners=False)
    if sigma > 0:
        k = 2 * int(4 * sigma + 0.5) + 1
        maps = kornia.filters.gaussian_blur2d(maps, (k, k), (sigma, sigma))
    return maps[:, 0]


def nearest(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance to, and index of, the nearest bank row of each query row (Q×D, N×D → Q, Q)."""
    found = [torch.cdist(q, bank).min(dim=1) for q in queries.split(chunk)]
    return torch.cat([f.values for f in found]), torch.cat([f.indices for f in found])


def reweighted_score(s_star: torch.Tensor, m_test: torch.Tensor, m_star: torch.Tensor, bank: torch.Tensor,
                     neighbours: int) -> torch.Tensor:
    """The paper's image score (Eq. 7, module docstring) for B images: s* (B,), the patch vectors that
    scored it (B×D) and their nearest bank vectors (B×D).

    1 − exp‖m_test* − m*‖ / Σ exp‖m_test* − m‖ = 1 − exp(s* − logsumexp_m ‖m_test* − m‖), computed so
    no exponential overflows; m* is its own nearest neighbour, so N_b(m*) holds it.
    """
    b = min(neighbours, len(bank))
    if b <= 1:
        return s_star
    support = torch.cdist(m_star, bank).topk(b, dim=1, largest=False).indices  # (B, b): N_b(m*)
    distances = (m_test[:, None] - bank[support]).norm(dim=-1)  # (B, b)
    return (1 - torch.exp(s_star - distances.logsumexp(dim=1))) * s_star


class PatchCore(Detector):
    method = "patchcore"
    config_class = PatchCoreConfig

    def __init__(self, config: PatchCoreConfig):
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
        queries = p.permute(0, 2, 3, 1).reshape(b, h * w, d)
        distances, index = nearest(queries.flatten(0, 1), self.bank)
        distances, index = distances.view(b, h * w), index.view(b, h * w)
        s_star, where = distances.max(dim=1)
        rows = torch.arange(b, device=p.device)
        scores = reweighted_score(s_star, queries[rows, where], self.bank[index[rows, where]], self.bank,
                                  self.config.neighbours)
        maps = smooth_map(distances.view(b, h, w), images.shape[-1], self.config.sigma * self.image_size / SIGMA_SIZE)
        return Prediction(scores, maps)


def memory_bank(vectors: torch.Tensor, config: PatchCoreConfig) -> torch.Tensor:
    """The rows of ``vectors`` (every training patch) the bank keeps: coreset · N of them (rounded), by
    ``config.sampler``."""
    k = max(1, round(config.coreset * len(vectors)))
    if k >= len(vectors):
        return vectors
    if config.sampler == "greedy":
        keep = coreset_indices(vectors, k, projection=config.projection, seed=config.seed)
    else:
        keep = torch.randperm(len(vectors), generator=seeded_generator(config.seed))[:k]
    return vectors[keep.to(vectors.device)]


def fit(config: PatchCoreConfig, images: torch.Tensor, *, device: torch.device | str = "cpu",
        cache: CacheEntry | None = None, force_train: bool = False) -> PatchCore:
    """Fill the memory bank from the patches of normal ``images`` (N×3×S×S in [0, 1])."""
    with seeded(config.seed):
        detector = PatchCore(config)
    if detector.restore(cache, force_train):
        return detector.to(device).eval()
    start = time.perf_counter()
    detector.to(device)
    source = detector.backbone.load_weights(config.weights, batchnorm_from=images)
    vectors = torch.cat([detector.patches(b.to(device)).permute(0, 2, 3, 1).flatten(0, 2) for b in images.split(16)])
    seconds = {"features": time.perf_counter() - start}
    detector.bank = memory_bank(vectors, config).contiguous()
    seconds["memory_bank"] = time.perf_counter() - start - seconds["features"]
    return detector.store(cache, sum(seconds.values()), stage_seconds=seconds, weights=source.record("backbone"),
                          patches=len(vectors),
                          bank=len(detector.bank), precision=detector.precision).eval()


def resolve(params: Mapping[str, Any], category: Category | None = None) -> PatchCoreConfig:
    """The config with the backbone's weights resolved (the cache key names what runs)."""
    config = config_from(PatchCoreConfig, params)
    return with_weights_resolved(config)


def variant(config: PatchCoreConfig) -> str:
    """``random`` for the random bank: its own row in a comparison (series ``patchcore-random``)."""
    return "random" if config.sampler == "random" else ""


# A reference row: its parameters are the benchmark chapter's, which trains it.
METHOD = register(MethodSpec("patchcore", PatchCore, fit, chapter="benchmark", reference=True, resolve=resolve,
                            variant=variant))
