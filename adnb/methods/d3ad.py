"""D3AD: dynamic addition of noise in a latent diffusion model (Tebbe & Tayyub, CVPR-W VAND 2024).

A reconstruction method: turn the image into something a model of normal images can repair,
repair it, and call "anomalous" whatever had to change. Its steps, in the order of the paper:

1. **Latent space.** An autoencoder E/D maps an image x to a latent z_0 = E(x): Stable
   Diffusion's KL-f8 VAE in the paper, or here, offline, a small autoencoder trained on the
   category (same ``encode``/``decode`` interface; the results record says which ran).
2. **Denoiser.** A UNet ε_θ(z_t, t) learns to predict the noise of z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε
   on normal latents (ε-prediction MSE; linear β from 0.0015 to 0.0195, T = 1000).
3. **Dynamic noise level.** How far a test image lies from the normal ones decides how hard to
   perturb it: the mean L1 distance d(x) of its ResNet-34 layer-2 features to its k = 20 nearest
   training images falls into one of 10 equal-width bins b of the training distances, and

       T̂ = round_10( max(b, b_min) / 10 · T_max ),      T_max = 80, b_min = 2.

4. **Noiseless scaling.** Instead of noising, z_T̂ = √ᾱ_T̂ · z_0 (+ ω · √(1−ᾱ_T̂) · ε in the
   supplement's ablation, Eq. 12; ω = 0 is the method).
5. **Guided reconstruction.** 10 DDIM steps (η = 0) from T̂ to 0, each with DDAD's guidance
   toward the input latent: ε̂ = ε − w · √(1−ᾱ_t) · (√ᾱ_t z_0 + √(1−ᾱ_t) ε − z_t); ẑ_0 is decoded
   to x̂ = D(ẑ_0).
6. **Domain adaptation.** The ResNet-34 is fine-tuned for γ epochs so that x and its
   reconstruction x̂ look alike to it (loss Σ_j 1 − cos(φ_j(x), φ_j(x̂)), layers 1–3).
7. **Anomaly map.** A = λ · norm(mean_c |ẑ_0 − z_0|) + (1 − λ) · norm(Σ_{j=2,3} 1 − cos_c(φ_j(x),
   φ_j(x̂))), λ = 0.85, each map upsampled to the image and normalised by a min/max; Gaussian
   blur σ = 4 (at 256 px); image score = max A. The official code takes min/max over the whole
   test set; here they come from held-out normal training images, so no test image influences
   another's score.

Deviations from the official code (JustinTebbe/Dynamic-noise-AD), each a config switch or named
in the chapter: training images are not their own nearest neighbour (``knn_include_self``); the
latent is the posterior mean, not a sample; the first DDIM step is taken at T̂ (the code starts
one stride lower); domain adaptation draws its noise levels from the same rounded T̂ it scales
with; ``sd-vae-ft-mse`` serves both training and testing.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

import kornia
import torch
import torch.nn.functional as F
from torch import nn

from adnb.backbones import Backbone, with_weights_resolved
from adnb.data.layout import Category, split_holdout
from adnb.diffusion import Schedule, ddim_step, epsilon_loss, linear_schedule, model_eps, q_sample
from adnb.diffusion.training import DenoiserTraining
from adnb.methods.base import Detector, Prediction, config_from
from adnb.methods.registry import MethodSpec, register
from adnb.runtime.cache import CacheEntry, GeneratorState, cached_training, train_loop
from adnb.runtime.errors import AdnbError
from adnb.runtime.precision import autocast, grad_scaler, optimiser_step
from adnb.runtime.seed import generator as seeded_generator, seeded
from adnb.weights import hub_pretrained

LATENTS = ("small", "sd")
SD_VAE_REPO = "stabilityai/sd-vae-ft-mse"
SD_LATENT_SCALE = 0.18215  # Rombach et al.: makes the SD VAE's latents roughly unit-variance
SD_VAE_CONFIG = dict(  # the architecture of SD's KL-f8 VAE, so a checkpoint loads without the hub
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, act_fn="silu",
    block_out_channels=(128, 256, 512, 512), sample_size=256,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


@dataclass(frozen=True)
class D3ADConfig:
    image_size: int = 128
    # latent space
    latent: str = "small"  # "sd" (Stable Diffusion's VAE) or "small" (trained here); see resolve_latent
    ae_channels: tuple[int, ...] = (32, 64)  # small autoencoder widths; downsampling factor 2**len
    ae_epochs: int = 10
    ae_lr: float = 1e-3
    ae_crop: int = 0  # train the small autoencoder on random crops of this side (0 = whole images)
    # denoiser
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_layers: int = 1  # ResNet blocks per UNet level
    unet_attention: tuple[bool, ...] = (False, False, True)  # self-attention at each level
    unet_head_dim: int = 32
    unet_crop: int = 0  # train the denoiser on random latent crops of this side (0 = whole latents)
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.01
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    num_steps: int = 1000
    train_t_max: int = 1000  # draw training t below this (the sampler never starts above t_max)
    # reconstruction
    t_max: int = 80
    static_t: int = 0  # a fixed T̂ for every image (0 = dynamic, the method)
    ddim_steps: int = 10
    guidance: float = 4.0  # w; official config 4, paper 7–10, 0 = no guidance
    omega: float = 0.0  # fraction of the noise added to the scaled latent (supplement Eq. 12)
    # feature extractor (adnb.backbones): the kNN noise level, domain adaptation and the feature map
    backbone: str = "resnet34.tv_in1k"  # the paper's: torchvision's ImageNet ResNet-34 (V1 weights)
    stages: tuple[int, ...] = (1, 2, 3)  # the levels domain adaptation aligns (ResNet layer1–3)
    map_stages: tuple[int, ...] = (2, 3)  # the levels whose cosine distance enters the anomaly map
    knn_stage: int = 2  # the level whose pooled features place an image among the training images
    weights: str = "auto"  # auto | imagenet | random
    # dynamic noise level
    knn_k: int = 20
    knn_pool: int = 16  # layer-2 features are average-pooled to knn_pool² positions
    knn_include_self: bool = False  # the official code counts a training image as its own neighbour
    n_bins: int = 10
    min_bin: int = 2
    # domain adaptation
    da_epochs: int = 1  # γ
    da_lr: float = 1e-4
    # anomaly map
    reference: str = "input"  # input (paper) | autoencoded: the feature term compares the reconstruction with D(E(x))
    lam: float = 0.85  # λ, weight of the latent term
    blur_sigma: float = 4.0  # Gaussian blur, in pixels of a 256-px image (scaled with image_size)
    holdout: int = 10  # normal training images kept out of training for the map normalisation (0 = use training)
    precision: str = "fp32"  # the networks' arithmetic: fp32 | bf16 | fp16 | auto (adnb.runtime.precision)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.reference not in ("input", "autoencoded"):
            raise AdnbError(f"unknown feature reference {self.reference!r}; valid: input, autoencoded")
        if self.latent not in LATENTS:
            raise AdnbError(f"unknown latent space {self.latent!r}; valid: {', '.join(LATENTS)}")
        if max(self.t_max, self.static_t) > self.train_t_max:
            raise AdnbError(f"the sampler would start at t = {max(self.t_max, self.static_t)} but the denoiser is trained "
                            f"only on t < train_t_max = {self.train_t_max}; raise train_t_max")
        if len(self.unet_attention) != len(self.unet_channels):
            raise AdnbError("unet_attention needs one flag per entry of unet_channels")
        if self.image_size % self.downsampling:
            raise AdnbError(f"image_size {self.image_size} must be a multiple of the autoencoder's factor {self.downsampling}")
        if self.knn_stage not in self.stages or not set(self.map_stages) <= set(self.stages):
            raise AdnbError(f"knn_stage {self.knn_stage} and map_stages {self.map_stages} must be among the "
                            f"extracted stages {self.stages}")

    @property
    def downsampling(self) -> int:
        return 8 if self.latent == "sd" else 2 ** len(self.ae_channels)


# --- 1. latent space ------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                  nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SmallAutoencoder(nn.Module):
    """A deterministic convolutional autoencoder: each level halves the side (strided conv + ResBlock).

    ``encode`` returns latents multiplied by ``latent_scale`` = 1 / std of the training latents,
    the role SD's 0.18215 plays (Rombach et al. chose that constant the same way).
    """

    def __init__(self, channels: Sequence[int] = (32, 64), latent_channels: int = 4):
        super().__init__()
        enc: list[nn.Module] = []
        c_in = 3
        for c in channels:
            enc += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), ResBlock(c)]
            c_in = c
        self.encoder = nn.Sequential(*enc, nn.GroupNorm(8, c_in), nn.SiLU(), nn.Conv2d(c_in, latent_channels, 1))
        dec: list[nn.Module] = [nn.Conv2d(latent_channels, c_in, 3, padding=1), ResBlock(c_in)]
        for c in list(channels[::-1][1:]) + [channels[0]]:
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c, 3, padding=1), ResBlock(c)]
            c_in = c
        self.decoder = nn.Sequential(*dec, nn.GroupNorm(8, c_in), nn.SiLU(), nn.Conv2d(c_in, 3, 3, padding=1))
        self.register_buffer("latent_scale", torch.ones(()))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] → latents."""
        return self.encoder(images * 2 - 1) * self.latent_scale

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Latents → images in [0, 1] (unclamped while training)."""
        x = (self.decoder(latents / self.latent_scale) + 1) / 2
        return x.clamp(0, 1) if clamp else x


class StableDiffusionVAE(nn.Module):
    """Stable Diffusion's KL-f8 VAE (diffusers ``AutoencoderKL``) behind the same interface; frozen."""

    def __init__(self):
        super().__init__()
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL(**SD_VAE_CONFIG).requires_grad_(False)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        # The posterior mean: the official code samples, but the posterior's std is tiny and a
        # sample would make every score slightly random.
        return self.vae.encode(images * 2 - 1).latent_dist.mean * SD_LATENT_SCALE

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        x = (self.vae.decode(latents / SD_LATENT_SCALE).sample + 1) / 2
        return x.clamp(0, 1) if clamp else x


@lru_cache(maxsize=1)
def pretrained_sd_vae() -> nn.Module | None:
    """SD's VAE weights from the local Hugging Face cache (or the hub when reachable); None offline."""
    from diffusers import AutoencoderKL

    return hub_pretrained(AutoencoderKL.from_pretrained, SD_VAE_REPO, what=f"Stable Diffusion's VAE ({SD_VAE_REPO})",
                          fallback="a small autoencoder trained on the category (latent='small')")


def resolve_latent(choice: str) -> str:
    """``"auto"`` → ``"sd"`` when SD's VAE weights can be had, else ``"small"`` (saying so).

    Resolve before building the config: the cache key and the checkpoint must name the latent
    space that actually ran.
    """
    if choice == "auto":
        return "sd" if pretrained_sd_vae() is not None else "small"
    if choice not in LATENTS:
        raise AdnbError(f"unknown latent space {choice!r}; valid: {', '.join(LATENTS)}, auto")
    return choice


def build_autoencoder(config: D3ADConfig) -> nn.Module:
    return StableDiffusionVAE() if config.latent == "sd" else SmallAutoencoder(config.ae_channels)


def random_crop(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random ``size``² window of the batch (the same for every sample)."""
    h, w = x.shape[-2:]
    if size <= 0 or size >= min(h, w):
        return x
    i = int(torch.randint(0, h - size + 1, (1,), generator=generator))
    j = int(torch.randint(0, w - size + 1, (1,), generator=generator))
    return x[..., i:i + size, j:j + size]


def train_autoencoder(ae: SmallAutoencoder, images: torch.Tensor, *, epochs: int, lr: float, batch_size: int,
                      crop: int = 0, checkpoint: CacheEntry | None = None, generator: torch.Generator | None = None,
                      precision: str = "fp32") -> list[dict[str, float]]:
    """L1 reconstruction training of the small autoencoder (its convolutions at ``precision``, the loss in
    fp32); then fix its latent scale."""
    ae.train()
    opt = torch.optim.AdamW(ae.parameters(), lr=lr)
    scaler = grad_scaler(precision, images.device)
    generator = generator or torch.Generator()

    def run_epoch(_: int) -> dict[str, float]:
        total = 0.0
        for idx in torch.randperm(len(images), generator=generator).split(batch_size):
            x = random_crop(images[idx.to(images.device)], crop, generator)
            with autocast(precision, x.device):
                restored = ae.decode(ae.encode(x), clamp=False)
            loss = (restored.float() - x).abs().mean()
            optimiser_step(loss, opt, scaler)
            total += float(loss.detach()) * len(idx)
        return {"l1": total / len(images)}

    history = train_loop(epochs, run_epoch, {"autoencoder": ae, "optimizer": opt, "generator": GeneratorState(generator)},
                         checkpoint, desc="autoencoder")
    ae.eval()
    with torch.no_grad():
        ae.latent_scale.fill_(1.0)
        z = torch.cat([ae.encode(b) for b in images.split(batch_size)])
        ae.latent_scale.fill_(1.0 / float(z.std()))
    return history


# --- 2. denoiser ------------------------------------------------------------------------------------------------


def build_unet(config: D3ADConfig, latent_size: int) -> nn.Module:
    """diffusers' ``UNet2DModel`` on 4-channel latents (GroupNorm groups: a quarter of the narrowest width, ≤ 32)."""
    from diffusers import UNet2DModel

    attn = config.unet_attention
    return UNet2DModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=tuple(config.unet_channels),
        layers_per_block=config.unet_layers, attention_head_dim=config.unet_head_dim,
        norm_num_groups=min(32, min(config.unet_channels) // 4),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]))


# --- 3. dynamic noise level -------------------------------------------------------------------------------------


def knn_distances(queries: torch.Tensor, bank: torch.Tensor, k: int, exclude_self: bool = False) -> torch.Tensor:
    """Mean L1 distance of each query (Q×D) to its k nearest rows of ``bank`` (N×D).

    ``exclude_self`` (queries are the bank, in order) drops each row's zero distance to itself.
    """
    d = torch.cdist(queries.double(), bank.double(), p=1)
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    k = min(k, bank.shape[0] - int(exclude_self))
    return d.topk(k, dim=1, largest=False).values.mean(dim=1).float()


def round_to_tens(t: torch.Tensor) -> torch.Tensor:
    """Nearest multiple of 10, ties up (the official ``roundup``)."""
    return (torch.floor(t / 10 + 0.5) * 10).long()


def noise_level(distances: torch.Tensor, edges: torch.Tensor, t_max: int, min_bin: int = 2) -> torch.Tensor:
    """T̂ = round_10(max(b, b_min) / B · T_max), b ∈ {0 … B} the bin of each distance.

    ``edges`` are the B + 1 equal-width bin edges of the training distances (``np.histogram``).
    b = i where edges[i−1] < d ≤ edges[i]: distances at or below the lowest edge get 0 (then
    b_min), those above the highest get B (= T_max).
    """
    n_bins = edges.numel() - 1
    b = (torch.bucketize(distances, edges.to(distances), right=False) - 1).clamp(max=n_bins - 1) + 1
    return round_to_tens(b.clamp(min=min_bin).double() / n_bins * t_max)


def bin_edges(distances: torch.Tensor, n_bins: int) -> torch.Tensor:
    """B + 1 equal-width edges over [min, max] of the training distances."""
    lo, hi = float(distances.min()), float(distances.max())
    return torch.linspace(lo, hi if hi > lo else lo + 1e-6, n_bins + 1, dtype=torch.float64)


# --- 4.–5. noiseless scaling and guided DDIM --------------------------------------------------------------------


def guided_eps(schedule: Schedule, z_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, z0: torch.Tensor,
               w: float) -> torch.Tensor:
    """DDAD's guidance: ε̂ = ε − w · √(1−ᾱ_t) · (ỹ_t − z_t), with ỹ_t = √ᾱ_t · z_0 + √(1−ᾱ_t) · ε.

    ỹ_t is where the input latent would be at step t with the predicted noise; pulling ε toward
    it keeps the reconstruction close to the input wherever the input is already normal.
    """
    a = schedule.alphas_cumprod.to(z_t.device)[t].to(z_t.dtype).view(-1, *([1] * (z_t.dim() - 1)))
    target = a.sqrt() * z0 + (1 - a).sqrt() * eps
    return eps - w * (1 - a).sqrt() * (target - z_t)


def step_sequence(t_hat: torch.Tensor, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(t, t_prev) pairs per step: t_i = ⌊T̂ · (S − i) / S⌋ for i = 0 … S − 1, ending at −1 (ᾱ = 1)."""
    ts = [t_hat * (steps - i) // steps for i in range(steps)] + [torch.full_like(t_hat, -1)]
    return list(zip(ts[:-1], ts[1:]))


@torch.no_grad()
def reconstruct_latent(denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: Schedule,
                       z0: torch.Tensor, t_hat: torch.Tensor, *, steps: int = 10, guidance: float = 4.0,
                       omega: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """ẑ_0 from z_0: scale to T̂ (z_T̂ = √ᾱ_T̂ z_0 + ω √(1−ᾱ_T̂) ε), then ``steps`` guided DDIM steps.

    ``t_hat`` holds one T̂ per sample, so one batch mixes noise levels; every sample takes the
    same number of steps with its own stride T̂ / steps.
    """
    noise = torch.zeros_like(z0) if noise is None else noise
    z = q_sample(schedule, z0, t_hat, noise, omega=omega)
    for t, t_prev in step_sequence(t_hat, steps):
        eps = guided_eps(schedule, z, t, denoiser(z, t), z0, guidance)
        z = ddim_step(schedule, z, t, t_prev, eps).prev
    return z


# --- 6.–7. features, domain adaptation, anomaly map -------------------------------------------------------------


def cosine_distance_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 − cos over channels at every position: (B, C, H, W) × 2 → (B, 1, H, W)."""
    return 1 - F.cosine_similarity(a, b, dim=1).unsqueeze(1)


def adaptation_loss(feats: Sequence[torch.Tensor], recon_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_j mean_batch(1 − cos(flatten φ_j(x), flatten φ_j(x̂))): the official code's whole-map cosine."""
    return sum((1 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)).mean() for a, b in zip(feats, recon_feats))


def normalise(maps: torch.Tensor, lo: torch.Tensor | float, hi: torch.Tensor | float) -> torch.Tensor:
    return (maps - lo) / max(float(hi) - float(lo), 1e-12)


def normalisation_range(terms: Sequence[AnomalyTerms]) -> torch.Tensor:
    """(min, max) of the latent maps and of the feature maps over ``terms``: the normalisation."""
    lat = torch.cat([t.latent.flatten() for t in terms])
    feat = torch.cat([t.feature.flatten() for t in terms])
    return torch.stack([lat.min(), lat.max(), feat.min(), feat.max()]).float()


class AnomalyTerms(NamedTuple):
    """The two raw maps (B, S, S) before normalisation, with what produced them."""

    latent: torch.Tensor
    feature: torch.Tensor
    t_hat: torch.Tensor
    reconstruction: torch.Tensor


class D3AD(Detector):
    method = "d3ad"
    config_class = D3ADConfig

    def __init__(self, config: D3ADConfig):
        super().__init__(config)
        self.autoencoder = build_autoencoder(config)
        self.latent_size = config.image_size // config.downsampling
        self.denoiser = build_unet(config, self.latent_size)
        self.schedule = linear_schedule(config.beta_start, config.beta_end, config.num_steps)
        # Random weights here; ``fit`` loads ImageNet's when they exist, ``load_state`` the trained ones.
        self.extractor = Backbone(config.backbone, config.stages)
        dim = self.extractor.channels[config.stages.index(config.knn_stage)] * config.knn_pool ** 2
        self.register_buffer("knn_bank", torch.zeros(0, dim))
        self.register_buffer("train_distances", torch.zeros(0))
        self.register_buffer("bin_edges", torch.zeros(config.n_bins + 1, dtype=torch.float64))
        self.register_buffer("map_range", torch.tensor([0.0, 1.0, 0.0, 1.0]))

    # the pieces, each usable on its own (the chapter shows them one by one)

    # The networks run at ``self.precision``; what comes out of them is fp32, and so is everything the
    # method computes from it (latent differences, DDIM and guidance steps, cosines, kNN distances).

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        with autocast(self.precision, images.device):
            return self.autoencoder.encode(images).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with autocast(self.precision, latents.device):
            return self.autoencoder.decode(latents).float()

    def eps(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε_θ(z_t, t), the denoiser's noise prediction."""
        with autocast(self.precision, z.device):
            return model_eps(self.denoiser, z, t).float()

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The extractor's stages for ``images``."""
        with autocast(self.precision, images.device):
            return [f.float() for f in self.extractor(images)]

    def knn_features(self, images: torch.Tensor) -> torch.Tensor:
        """The ``knn_stage`` features pooled to knn_pool² positions and flattened (one row per image)."""
        features = self.features(images)[self.config.stages.index(self.config.knn_stage)]
        return F.adaptive_avg_pool2d(features, self.config.knn_pool).flatten(1)

    def knn_distances(self, images: torch.Tensor) -> torch.Tensor:
        """Mean L1 distance of each image's features to its k nearest training images."""
        return knn_distances(self.knn_features(images), self.knn_bank, self.config.knn_k)

    def noise_levels(self, images: torch.Tensor) -> torch.Tensor:
        """T̂ per image: dynamic from the kNN bin, or ``static_t`` for all."""
        if self.config.static_t:
            return torch.full((images.shape[0],), self.config.static_t, dtype=torch.long, device=images.device)
        return noise_level(self.knn_distances(images), self.bin_edges, self.config.t_max, self.config.min_bin)

    def _noise(self, z0: torch.Tensor) -> torch.Tensor | None:
        if not self.config.omega:
            return None
        g = torch.Generator().manual_seed(self.config.seed)  # the same ε for every call: scores stay repeatable
        return torch.randn(z0.shape, generator=g).to(z0)

    def reconstruct_latents(self, z0: torch.Tensor, t_hat: torch.Tensor) -> torch.Tensor:
        c = self.config
        return reconstruct_latent(self.eps, self.schedule, z0, t_hat,
                                  steps=c.ddim_steps, guidance=c.guidance, omega=c.omega, noise=self._noise(z0))

    def reference(self, images: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        """What the reconstruction is compared with in feature space: the input (the paper), or its
        autoencoded copy D(E(x)) (``reference="autoencoded"``), which is the input for a perfect
        autoencoder and otherwise carries the autoencoder's own blur, so that only what the
        diffusion model changed stands out."""
        return self.decode(z0) if self.config.reference == "autoencoded" else images

    @torch.no_grad()
    def terms(self, images: torch.Tensor, t_hat: torch.Tensor | None = None) -> AnomalyTerms:
        """The raw latent and feature maps of ``images`` (T̂ from ``noise_levels`` unless given)."""
        t_hat = self.noise_levels(images) if t_hat is None else t_hat.to(images.device)
        z0 = self.encode(images)
        z_hat = self.reconstruct_latents(z0, t_hat)
        recon = self.decode(z_hat)
        size = images.shape[-2:]
        latent = F.interpolate((z_hat - z0).abs().mean(dim=1, keepdim=True), size=size, mode="bilinear", align_corners=True)
        feature = torch.zeros_like(latent)
        for stage, a, b in zip(self.config.stages, self.features(self.reference(images, z0)), self.features(recon)):
            if stage in self.config.map_stages:
                feature += F.interpolate(cosine_distance_map(a, b), size=size, mode="bilinear", align_corners=True)
        return AnomalyTerms(latent[:, 0], feature[:, 0], t_hat, recon)

    def combine(self, terms: AnomalyTerms, ranges: torch.Tensor | None = None) -> Prediction:
        """A = λ · norm(latent) + (1 − λ) · norm(feature), blurred; score = max A."""
        r = self.map_range if ranges is None else ranges
        lam = self.config.lam
        maps = lam * normalise(terms.latent, r[0], r[1]) + (1 - lam) * normalise(terms.feature, r[2], r[3])
        sigma = self.config.blur_sigma * self.image_size / 256
        if sigma > 0:
            k = 2 * round(4 * sigma) + 1
            maps = kornia.filters.gaussian_blur2d(maps[:, None], (k, k), (sigma, sigma))[:, 0]
        return Prediction(maps.flatten(1).amax(dim=1), maps)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        return self.combine(self.terms(images))

    # what depends on the training images, recomputed without retraining

    @torch.no_grad()
    def fit_knn(self, images: torch.Tensor | None = None, batch_size: int = 16) -> D3AD:
        """The feature bank (from ``images``, or the stored one) and the bin edges of its distances."""
        if images is not None:
            self.knn_bank = torch.cat([self.knn_features(b) for b in images.split(batch_size)])
        d = knn_distances(self.knn_bank, self.knn_bank, self.config.knn_k, exclude_self=not self.config.knn_include_self)
        self.train_distances = d
        self.bin_edges = bin_edges(d, self.config.n_bins).to(d.device)
        return self

    @torch.no_grad()
    def calibrate(self, normal_images: torch.Tensor, batch_size: int = 8) -> D3AD:
        """Min/max of both raw maps over normal images the model did not train on."""
        self.map_range = normalisation_range([self.terms(b) for b in normal_images.split(batch_size)]).to(self.map_range.device)
        return self

    def variant(self, calibration_images: torch.Tensor | None = None, **changes: object) -> D3AD:
        """The same trained detector with inference options changed (``static_t``, ``omega``, ``knn_k`` …).

        Bins are refitted when a kNN option changed; give normal ``calibration_images`` to refresh
        the normalisation, which depends on every reconstruction option.
        """
        config = dataclasses.replace(self.config, **changes)
        other = D3AD(config).to(self.device)
        other.load_state(self.state_dict()).eval()
        other.train_seconds, other.checkpoint = self.train_seconds, self.checkpoint
        other.fit_info = dict(getattr(self, "fit_info", {}))
        if {"knn_k", "knn_include_self", "n_bins"} & set(changes):
            other.fit_knn()
        if calibration_images is not None:
            other.calibrate(calibration_images.to(other.device))
        return other


# --- training ---------------------------------------------------------------------------------------------------

AE_FIELDS = ("image_size", "latent", "ae_channels", "ae_epochs", "ae_lr", "ae_crop", "batch_size", "holdout", "precision",
             "seed")
UNET_FIELDS = AE_FIELDS + ("unet_channels", "unet_layers", "unet_attention", "unet_head_dim", "unet_crop", "epochs",
                           "lr", "weight_decay", "beta_start", "beta_end", "num_steps", "train_t_max")
DA_FIELDS = UNET_FIELDS + ("backbone", "stages", "weights", "da_epochs", "da_lr", "t_max", "ddim_steps", "guidance",
                           "omega")


def adapt_extractor(detector: D3AD, images: torch.Tensor, *, epochs: int, lr: float, batch_size: int,
                    checkpoint: CacheEntry | None = None,
                    generator: torch.Generator | None = None) -> list[dict[str, float]]:
    """Domain adaptation: fine-tune the extractor so x and its reconstruction x̂ give alike features.

    Each batch is reconstructed at one random level T̂ = round_10(k / 10 · T_max), k ~ U{1 … 10},
    without gradients; then one AdamW step on ``adaptation_loss`` over every extracted stage.
    BatchNorm adapts its statistics to the category too (the extractor trains in training mode).
    """
    extractor = detector.extractor
    generator = generator or torch.Generator()
    with extractor.unfrozen():
        opt = torch.optim.AdamW(extractor.parameters(), lr=lr)
        scaler = grad_scaler(detector.precision, images.device)

        def run_epoch(_: int) -> dict[str, float]:
            total = 0.0
            for idx in torch.randperm(len(images), generator=generator).split(batch_size):
                x = images[idx.to(images.device)]
                k = int(torch.randint(1, detector.config.n_bins + 1, (1,), generator=generator))
                t_hat = round_to_tens(torch.full((len(x),), k / detector.config.n_bins * detector.config.t_max,
                                                 device=x.device))
                with torch.no_grad():
                    recon = detector.decode(detector.reconstruct_latents(detector.encode(x), t_hat))
                loss = adaptation_loss(detector.features(x), detector.features(recon))
                optimiser_step(loss, opt, scaler)
                total += float(loss.detach()) * len(x)
            return {"cosine": total / len(images)}

        history = train_loop(epochs, run_epoch, {"extractor": extractor, "optimizer": opt,
                                                 "generator": GeneratorState(generator)},
                             checkpoint, desc="domain adaptation")
    return history


def _stage(cache: CacheEntry | None, name: str, config: D3ADConfig, fields: Sequence[str]) -> CacheEntry | None:
    """The cache entry of one training stage, keyed by the options it (and the stages before it) depend on."""
    return None if cache is None else cache.stage(name, {f: getattr(config, f) for f in fields})


class D3ADTraining(DenoiserTraining):
    """D3AD's training as ``fit`` runs it, up to its main stage, the denoiser, whose step ``adnb bench``
    times (``adnb.runtime.training``).

    Set-up: the detector initialised from ``config.seed``; the hold-out split (normal images kept for
    the map normalisation); the latent space (Stable Diffusion's VAE, or the small autoencoder trained
    here, in its own cache stage); the latents of the training images, computed once. A step is one
    ε-prediction update on a random crop of a batch's latents; every random draw of all of it comes
    from one generator seeded with ``config.seed``.
    """

    what = ("denoiser: epsilon-prediction MSE on a random crop of the batch's latents (encoded once, before the "
            "loop); AdamW. The autoencoder (trained during set-up) and the domain adaptation are not timed")

    def __init__(self, config: D3ADConfig, images: torch.Tensor, *, device: torch.device | str = "cpu",
                 cache: CacheEntry | None = None, force_train: bool = False):
        if len(images) < 3:
            raise AdnbError(f"D3AD needs at least 3 training images (its kNN noise level compares each with the "
                            f"others); got {len(images)}")
        with seeded(config.seed):
            detector = D3AD(config).to(device)
        generator = seeded_generator(config.seed)
        holdout = min(config.holdout, len(images) // 3)  # a small training set keeps two thirds for training
        if holdout < config.holdout:
            print(f"[adnb] D3AD holds out {holdout} of {len(images)} training images for the map normalisation "
                  f"(holdout={config.holdout} would leave too few to train on)")
        if holdout:
            train_idx, hold_idx = split_holdout(len(images), holdout, config.seed)
        else:
            train_idx = hold_idx = torch.arange(len(images))
        self.x_train, self.x_hold = images[train_idx].to(device), images[hold_idx].to(device)
        self.n_holdout = len(hold_idx) if holdout else 0
        self.weights: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        ae = detector.autoencoder
        if config.latent == "sd":
            pretrained = pretrained_sd_vae()
            if pretrained is None:
                raise AdnbError(f"latent='sd' needs Stable Diffusion's VAE ({SD_VAE_REPO}) and it is not on this "
                                "machine; use latent='small' (or latent='auto'), or download it as the message above says")
            ae.vae.load_state_dict(pretrained.state_dict())
            self.seconds["autoencoder"] = 0.0
            self.weights["latent"] = SD_VAE_REPO
        else:
            self.seconds["autoencoder"] = cached_training(
                _stage(cache, "autoencoder", config, AE_FIELDS), ae,
                lambda ck: {"history": train_autoencoder(ae, self.x_train, epochs=config.ae_epochs, lr=config.ae_lr,
                                                         batch_size=config.batch_size, crop=config.ae_crop,
                                                         checkpoint=ck, generator=generator,
                                                         precision=detector.precision)},
                force_train)["train_seconds"]
            self.weights["latent"] = "trained-here"
        ae.requires_grad_(False).eval()
        with torch.no_grad():
            latents = torch.cat([detector.encode(b) for b in self.x_train.split(config.batch_size)])
        unet = detector.denoiser
        super().__init__(unet, latents, detector.schedule, batch_size=config.batch_size,
                         optimizer=torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=config.weight_decay),
                         loss=self.crop_loss, generator=generator, precision=detector.precision)
        self.detector = detector

    def crop_loss(self, model: nn.Module, schedule: Schedule, z0: torch.Tensor) -> torch.Tensor:
        config = self.detector.config
        return epsilon_loss(model, schedule, random_crop(z0, config.unet_crop, self.generator),
                            t_max=config.train_t_max, generator=self.generator)

    def finish(self) -> None:
        """The kNN bank of the training images and its distance bins: each test image's noise level."""
        self.detector.fit_knn(self.x_train)


def fit(config: D3ADConfig, images: torch.Tensor, *, device: torch.device | str = "cpu",
        cache: CacheEntry | None = None, force_train: bool = False) -> D3AD:
    """Train D3AD on normal ``images`` (N×3×S×S in [0, 1]): autoencoder, denoiser, adaptation, kNN, normalisation.

    Every stage is cached on its own, so changing e.g. only ``da_epochs`` keeps the trained
    autoencoder and denoiser. Every random draw comes from one generator seeded with ``config.seed``.
    """
    restored = D3AD.from_cache(config, cache, force_train)
    if restored is not None:
        return restored.to(device).eval()
    training = D3ADTraining(config, images, device=device, cache=cache, force_train=force_train)
    detector, x_train, seconds, weights = training.detector, training.x_train, training.seconds, training.weights
    unet = detector.denoiser
    denoiser = cached_training(_stage(cache, "denoiser", config, UNET_FIELDS), unet,
                               lambda ck: {"history": training.run(config.epochs, ck, desc="denoiser")}, force_train)
    seconds["denoiser"] = denoiser["train_seconds"]
    unet.requires_grad_(False).eval()

    backbone = detector.extractor.load_weights(config.weights, batchnorm_from=x_train)
    weights.update(backbone.record("backbone"))
    weights["backbone"] += f"+adapted-{config.da_epochs}-epochs" if config.da_epochs else ""
    if config.da_epochs:
        seconds["adaptation"] = cached_training(
            _stage(cache, "adaptation", config, DA_FIELDS), detector.extractor,
            lambda ck: {"history": adapt_extractor(detector, x_train, epochs=config.da_epochs, lr=config.da_lr,
                                                   batch_size=config.batch_size, checkpoint=ck,
                                                   generator=training.generator)},
            force_train)["train_seconds"]

    start = time.perf_counter()
    training.finish()
    detector.calibrate(training.x_hold)
    seconds["knn_and_normalisation"] = time.perf_counter() - start
    return detector.store(cache, sum(seconds.values()), weights=weights, stage_seconds=seconds,
                          precision=detector.precision, history=denoiser.get("history", []), n_train=len(x_train),
                          n_holdout=training.n_holdout).eval()


def resolve(params: Mapping[str, Any], category: Category | None = None) -> D3ADConfig:
    """The config as it will run: the latent space (``"auto"``: SD's VAE when its weights are here) and
    the extractor's weights resolved, so the cache key names what actually runs."""
    latent = resolve_latent(str(params.get("latent") or "small"))
    config = config_from(D3ADConfig, {**params, "latent": latent})
    return with_weights_resolved(config)


METHOD = register(MethodSpec("d3ad", D3AD, fit, training=D3ADTraining, resolve=resolve))
