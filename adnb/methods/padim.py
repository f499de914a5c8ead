"""PaDiM: one Gaussian per patch position (Defard et al., "PaDiM: a Patch Distribution Modeling
Framework for Anomaly Detection and Localization", ICPR 2021).

A frozen ImageNet backbone describes every patch of the normal images; at each position (i, j)
of the patch grid the descriptions of all training images are summed up by their mean and
covariance, and a test patch is as anomalous as its Mahalanobis distance to that Gaussian. No
iteration, no memory bank: training is one pass of the backbone and a closed form.

1. **Embeddings.** Stages at strides 8 and 16 (``stages``; the paper takes ResNets' first three
   layers), the coarser one upsampled (nearest) to the finer grid, concatenated; a random subset of
   ``n_features`` of the channels (the paper's random dimensionality reduction: 100 of ResNet-18's
   448), drawn once with ``seed``.
2. **Gaussians.** With x_k (k = 1 … N) the training embeddings at one position::

       μ = 1/N Σ_k x_k,   S = 1/(N − 1) Σ_k (x_k − μ)(x_k − μ)ᵀ,   Σ = S + εI

   ``shrinkage: identity`` is the paper's regulariser, ε = ``epsilon`` = 0.01, which keeps Σ
   invertible when N is below the dimension (a category with 60 training images and 100
   features). ``shrinkage: ledoit_wolf`` shrinks instead towards a multiple of the identity by the
   Ledoit–Wolf coefficient ρ (``ledoit_wolf``), Σ = (1 − ρ) S₁ + ρ tr(S₁)/d · I with S₁ the biased
   covariance: the amount is estimated from the data instead of fixed.
3. **Scores.** M(x) = √((x − μ)ᵀ Σ⁻¹ (x − μ)) per position; the map is upsampled bilinearly to the
   image and smoothed by a Gaussian of σ = ``sigma`` pixels at 224² (σ = 4, as PatchCore's); the image
   score is its maximum.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from adnb.backbones import DEFAULT_BACKBONE, Backbone, with_weights_resolved
from adnb.data.layout import Category
from adnb.methods.base import Detector, Prediction, config_from
from adnb.methods.patchcore import SIGMA_SIZE, patch_features, smooth_map
from adnb.methods.registry import MethodSpec, register
from adnb.runtime.cache import CacheEntry
from adnb.runtime.errors import AdnbError
from adnb.runtime.precision import autocast
from adnb.runtime.seed import generator as seeded_generator

SHRINKAGES = ("identity", "ledoit_wolf")


@dataclass(frozen=True)
class PaDiMConfig:
    image_size: int = 224
    backbone: str = DEFAULT_BACKBONE
    stages: tuple[int, ...] = (2, 3)  # feature levels at strides 8 and 16
    weights: str = "auto"  # auto | imagenet | random
    n_features: int = 100  # channels kept, drawn at random (0: all of them)
    shrinkage: str = "identity"  # identity: Σ = S + εI, the paper's | ledoit_wolf: shrinkage estimated from the data
    epsilon: float = 0.01  # ε of shrinkage "identity"
    sigma: float = 4.0  # Gaussian smoothing of the map, in pixels of a 224-pixel image
    precision: str = "fp32"  # the backbone's arithmetic: fp32 | bf16 | fp16 | auto (Gaussians and distances stay fp32)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.shrinkage not in SHRINKAGES:
            raise AdnbError(f"unknown PaDiM shrinkage {self.shrinkage!r}; valid: {', '.join(SHRINKAGES)}")
        if self.n_features < 0:
            raise AdnbError(f"n_features = {self.n_features}: a number of channels (0: all of them)")


def gaussian_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position, the mean and the unbiased covariance of N samples: x (P, N, D) → μ (P, D), S (P, D, D)."""
    mu = x.mean(dim=1)
    centred = x - mu[:, None]
    return mu, centred.transpose(1, 2) @ centred / max(x.shape[1] - 1, 1)


def ledoit_wolf(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ledoit–Wolf shrunk covariance per position (Ledoit and Wolf, J. Multivariate Anal. 2004), and ρ.

    x (P, N, D) → Σ (P, D, D), ρ (P,). With X the centred samples, S₁ = XᵀX/N and m = tr(S₁)/D::

        δ = ‖S₁ − mI‖²_F / D,   β = min(δ, (Σ_k ‖x_k x_kᵀ − S₁‖²_F / N²) / D),   ρ = β/δ
        Σ = (1 − ρ) S₁ + ρ m I

    (scikit-learn's ``ledoit_wolf``, which the tests compare with).
    """
    p, n, d = x.shape
    centred = x - x.mean(dim=1, keepdim=True)
    s1 = centred.transpose(1, 2) @ centred / n
    m = s1.diagonal(dim1=1, dim2=2).sum(dim=1) / d
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    delta = (s1 - m[:, None, None] * eye).square().sum(dim=(1, 2)) / d
    # Σ_k ‖x_k x_kᵀ − S₁‖² = Σ_k ‖x_k‖⁴ − N ‖S₁‖²
    spread = (centred.square().sum(dim=2).square().sum(dim=1) - n * s1.square().sum(dim=(1, 2))) / n ** 2
    beta = torch.minimum(delta, spread / d)
    rho = torch.where(delta > 0, beta / delta.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(delta))
    return (1 - rho)[:, None, None] * s1 + (rho * m)[:, None, None] * eye, rho


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """√((x − μ)ᵀ Σ⁻¹ (x − μ)) per image and position: x (B, P, D), μ (P, D), Σ⁻¹ (P, D, D) → (B, P)."""
    delta = x - mean
    return torch.einsum("bpd,pde,bpe->bp", delta, precision, delta).clamp_min(0).sqrt()


class PaDiM(Detector):
    method = "padim"
    config_class = PaDiMConfig

    def __init__(self, config: PaDiMConfig):
        super().__init__(config)
        self.backbone = Backbone(config.backbone, config.stages)
        channels = sum(self.backbone.channels)
        if config.n_features > channels:
            raise AdnbError(f"n_features = {config.n_features} but stages {list(config.stages)} of {config.backbone} "
                            f"have {channels} channels; choose at most {channels} (0: all)")
        d = config.n_features or channels
        kept = torch.randperm(channels, generator=seeded_generator(config.seed))[:d].sort().values
        self.register_buffer("index", kept)
        self.register_buffer("mean", torch.zeros(0, d))
        self.register_buffer("inverse", torch.zeros(0, d, d))

    @torch.no_grad()
    def embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(B, d, H, W): the kept channels of the embedding at every position of the stride-8 grid (fp32)."""
        with autocast(self.precision, images.device):
            features = [f.float() for f in self.backbone(images)]
        return patch_features(features, pool=1, upsample="nearest")[:, self.index]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        e = self.embeddings(images)
        b, _, h, w = e.shape
        distances = mahalanobis(e.flatten(2).transpose(1, 2), self.mean, self.inverse).view(b, h, w)
        maps = smooth_map(distances, images.shape[-1], self.config.sigma * self.image_size / SIGMA_SIZE)
        return Prediction(maps.flatten(1).amax(dim=1), maps)

def gaussians(x: torch.Tensor, config: PaDiMConfig) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Mean and inverse covariance per position of the training embeddings x (P, N, d), in float64, and
    facts for the record."""
    x = x.double().contiguous()  # the per-position products run 4× slower on fit's permuted view
    if config.shrinkage == "ledoit_wolf":
        mu = x.mean(dim=1)
        cov, rho = ledoit_wolf(x)
        facts = {"ledoit_wolf_rho_mean": float(rho.mean())}
    else:
        mu, cov = gaussian_moments(x)
        cov = cov + config.epsilon * torch.eye(x.shape[2], dtype=x.dtype, device=x.device)
        facts = {}
    return mu, torch.linalg.inv(cov), facts


def fit(config: PaDiMConfig, images: torch.Tensor, *, device: torch.device | str = "cpu",
        cache: CacheEntry | None = None, force_train: bool = False) -> PaDiM:
    """Fit one Gaussian per position to the embeddings of normal ``images`` (N×3×S×S in [0, 1])."""
    detector = PaDiM(config)
    if detector.restore(cache, force_train):
        return detector.to(device).eval()
    if len(images) < 2:
        raise AdnbError(f"PaDiM needs at least 2 training images for a covariance; got {len(images)}")
    start = time.perf_counter()
    detector.to(device)
    source = detector.backbone.load_weights(config.weights, batchnorm_from=images)
    x = torch.cat([detector.embeddings(b.to(device)).flatten(2) for b in images.split(16)])
    x = x.permute(2, 0, 1)  # (P, N, d): the training images' embeddings at each position
    seconds = {"features": time.perf_counter() - start}
    mean, inverse, facts = gaussians(x, config)
    detector.mean, detector.inverse = mean.float().contiguous(), inverse.float().contiguous()
    seconds["gaussians"] = time.perf_counter() - start - seconds["features"]
    return detector.store(cache, sum(seconds.values()), stage_seconds=seconds, weights=source.record("backbone"),
                          features=len(detector.index), precision=detector.precision, **facts).eval()


def resolve(params: Mapping[str, Any], category: Category | None = None) -> PaDiMConfig:
    """The config with the backbone's weights resolved (the cache key names what runs)."""
    config = config_from(PaDiMConfig, params)
    return with_weights_resolved(config)


# A reference row: its parameters are the benchmark chapter's, which trains it.
METHOD = register(MethodSpec("padim", PaDiM, fit, chapter="benchmark", reference=True, resolve=resolve))
