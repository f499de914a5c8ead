"""RealNet (Zhang, Xu & Zhou, CVPR 2024): reconstruct the *useful* features, then judge the residuals.

The method, in the order of the paper (and of the official code, cnulab/RealNet):

1. **SDAS** — a class-conditional IDDPM trained on the normal images of a dataset, sampled with its
   reverse variance inflated by an anomaly strength s (``adnb.diffusion.sdas``): s = 0 gives
   normal-looking images, s ∈ [0.1, 0.2] realistic anomalies.
2. **SIA** — a Perlin mask M (times a foreground mask for objects, ``adnb.synthesis.foreground``)
   blends an SDAS image A into a normal image I with opacity δ ~ U(0.5, 1):
   I' = (1 − M)·I + M·(δ·A + (1 − δ)·I).
3. **Features** — a frozen ImageNet backbone (``adnb.backbones``; WideResNet-50 in the paper) gives
   F_l(I) at its stages l.
4. **AFS** — once, before training, rank each stage's channels by how well the min-max-normalised
   squared difference (F_l(I') − F_l(I))² localises the synthetic mask, and keep the best k_l.
5. **Reconstruction** — one UNet per stage (architecture A) reconstructs the selected features;
   the residual is E_l = (F_l − R_l(F_l))².
6. **RRS** — residuals are upsampled to the finest stage and concatenated; a BatchNorm without
   affine puts the channels of different networks on one scale *for ranking only*; per image the
   top-k channels by spatial max and the top-k by spatial mean are gathered from the raw residual.
7. **Discriminator** — a small CNN maps the selected residuals to a 2-class map at image size.

Loss: cross-entropy of the map against M + Σ_l MSE(R_l(F_l(I')), F_l(I)) (the clean image's features).
Image score: the maximum of the anomaly map average-pooled over ``score_pool``² windows (16² at 256²).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from adnb.backbones import Backbone, with_weights_resolved
from adnb.data.layout import Category, list_categories, load_category
from adnb.diffusion.sdas import SDAS, SDASConfig, fit_sdas, sdas_images
from adnb.methods.base import Detector, Prediction, Prepared, config_from
from adnb.methods.registry import MethodSpec, register
from adnb.runtime import cache as caches
from adnb.runtime.cache import CacheEntry, GeneratorState
from adnb.runtime.errors import AdnbError
from adnb.runtime.precision import autocast, grad_scaler, optimiser_step
from adnb.runtime.seed import generator as seeded_generator, seeded
from adnb.runtime.training import Training
from adnb.synthesis import TextureSource, perlin_anomalies
from adnb.synthesis.foreground import foreground_masks, foreground_rule

# ---------------------------------------------------------------------------------------------
# 1–2. SIA: Perlin masks inside the object, filled with SDAS images (or DTD / procedural textures)
# ---------------------------------------------------------------------------------------------

SOURCES = ("sdas", "dtd", "perlin")
# (opacity range, DRAEM augmentation) per anomaly source, as in the official configs
SOURCE_BLEND = {"sdas": ((0.5, 1.0), False), "dtd": ((0.2, 1.0), True), "perlin": ((0.2, 1.0), True)}


def synthesize(images: torch.Tensor, source: TextureSource, kind: str, *, foreground: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SIA: Perlin anomalies from ``source`` (of kind ``sdas``/``dtd``/``perlin``) with that kind's
    opacity range and augmentation; returns (images, masks)."""
    opacity, augment = SOURCE_BLEND[kind]
    return perlin_anomalies(images, source, opacity=opacity, generator=generator, foreground=foreground, augment=augment)


# ---------------------------------------------------------------------------------------------
# 3–4. Features and AFS
# ---------------------------------------------------------------------------------------------


def normalised_difference(f_anomalous: torch.Tensor, f_clean: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """D_c = (F_a,c − F_n,c)², min-max normalised per channel over every pixel of the batch: (B, C, H, W)."""
    d = (f_anomalous - f_clean) ** 2
    lo = d.amin(dim=(0, 2, 3), keepdim=True)
    hi = d.amax(dim=(0, 2, 3), keepdim=True)
    return (d - lo) / (hi - lo + eps)


def afs_channel_losses(f_anomalous: torch.Tensor, f_clean: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The AFS loss of each channel: MSE between its normalised difference and the mask (nearest-
    downsampled to the feature size), over all pixels of the batch. (C,); lower localises better."""
    d = normalised_difference(f_anomalous, f_clean)
    m = F.interpolate(masks.float(), size=d.shape[-2:], mode="nearest")
    return ((d - m) ** 2).mean(dim=(0, 2, 3))


def afs_select(losses: torch.Tensor, k: int) -> torch.Tensor:
    """The k channels with the lowest AFS loss, as sorted indices (NaN losses count as the worst)."""
    losses = torch.where(torch.isnan(losses), losses[~torch.isnan(losses)].max(), losses)
    return torch.topk(losses, k, largest=False).indices.sort().values


# ---------------------------------------------------------------------------------------------
# 5. Reconstruction networks (architecture A: one timestep-free UNet per layer)
# ---------------------------------------------------------------------------------------------


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """x ↦ skip(x) + conv(SiLU(GN(x))), optionally halving (average pool) or doubling (transposed conv)."""

    def __init__(self, cin: int, cout: int, resample: str | None = None):
        super().__init__()
        self.norm, self.conv = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        if resample == "down":
            self.h_upd, self.x_upd = nn.AvgPool2d(2), nn.AvgPool2d(2)
        elif resample == "up":
            self.h_upd, self.x_upd = nn.ConvTranspose2d(cin, cin, 4, 2, 1), nn.ConvTranspose2d(cin, cin, 4, 2, 1)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.h_upd(F.silu(self.norm(x))))
        return self.skip(self.x_upd(x)) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels (64 channels per head), zero-initialised output."""

    def __init__(self, channels: int, head_channels: int = 64):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm, self.qkv = _norm(channels), nn.Conv1d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x).reshape(b, c, h * w)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h * w)).reshape(b, c, h, w)


class ReconUNet(nn.Module):
    """RealNet's reconstruction network: width ``ratio``·C, levels ``mult``, ``blocks`` ResBlocks per
    level, attention at the downsampling factors in ``attention`` (and in the middle when any)."""

    def __init__(self, channels: int, ratio: float = 0.5, mult: Sequence[int] = (1, 2, 4), blocks: int = 2,
                 attention: Sequence[int] = (2, 4)):
        super().__init__()
        base = int(ratio * channels)
        ch = base * mult[0]
        self.inp = nn.Conv2d(channels, ch, 3, padding=1)
        self.down, skips, ds = nn.ModuleList(), [ch], 1
        for level, m in enumerate(mult):
            for _ in range(blocks):
                layers: list[nn.Module] = [ResBlock(ch, base * m)]
                ch = base * m
                if ds in attention:
                    layers.append(SelfAttention(ch))
                self.down.append(nn.Sequential(*layers))
                skips.append(ch)
            if level != len(mult) - 1:
                self.down.append(ResBlock(ch, ch, "down"))
                skips.append(ch)
                ds *= 2
        self.middle = nn.Sequential(ResBlock(ch, ch), *([SelfAttention(ch)] if attention else []), ResBlock(ch, ch))
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(blocks + 1):
                layers = [ResBlock(ch + skips.pop(), base * m)]
                ch = base * m
                if ds in attention:
                    layers.append(SelfAttention(ch))
                if level and i == blocks:
                    layers.append(ResBlock(ch, ch, "up"))
                    ds //= 2
                self.up.append(nn.Sequential(*layers))
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), _zero(nn.Conv2d(ch, channels, 3, padding=1)))
        self.downsampling = 2 ** (len(mult) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, hs = self.inp(x), []
        hs.append(h)
        for module in self.down:
            h = module(h)
            hs.append(h)
        h = self.middle(h)
        for module in self.up:
            h = module(torch.cat([h, hs.pop()], dim=1))
        return self.out(h)


# ---------------------------------------------------------------------------------------------
# 6–7. RRS and the discriminator
# ---------------------------------------------------------------------------------------------


def rrs_select(residual: torch.Tensor, ranking: torch.Tensor, k_max: int, k_mean: int) -> torch.Tensor:
    """Per image, the ``k_max`` channels of largest spatial max and the ``k_mean`` of largest spatial
    mean of ``ranking`` (the BN-normalised residual), gathered from the raw ``residual``: (B, k_max + k_mean, H, W)."""
    flat = ranking.flatten(2)
    picks = [flat.amax(dim=2).topk(k_max, dim=1).indices, flat.mean(dim=2).topk(k_mean, dim=1).indices]
    idx = torch.cat(picks, dim=1)
    return torch.gather(residual, 1, idx[:, :, None, None].expand(-1, -1, *residual.shape[-2:]))


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.ReLU(),
                                   nn.Conv2d(channels, channels, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Discriminator(nn.Module):
    """Selected residuals → 2-class logits at image size (the official "MLP with upsampling" is this CNN)."""

    def __init__(self, channels: int, residual_layers: int = 2):
        super().__init__()
        self.decoder1 = nn.Sequential(*[_Residual(channels) for _ in range(residual_layers)], nn.ReLU(),
                                      nn.Conv2d(channels, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU())
        self.decoder2 = nn.Sequential(nn.Conv2d(128, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 3, padding=1), nn.ReLU())
        self.decoder3 = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))

    def forward(self, residual: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        h = self.decoder2(self.decoder1(residual))
        h = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=True)
        return F.interpolate(self.decoder3(h), size=size, mode="bilinear", align_corners=True)


# ---------------------------------------------------------------------------------------------
# The detector
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RealNetConfig:
    """Defaults are the paper's (WideResNet-50 stages 1–4, 256², architecture A with {256, 512, 512, 256})."""

    image_size: int = 256
    backbone: str = "wide_resnet50_2.racm_in1k"  # timm's, the ImageNet checkpoint the official code (timm 0.5) loads
    stages: tuple[int, ...] = (1, 2, 3, 4)  # backbone feature levels (ResNet layer1 … layer4)
    weights: str = "auto"  # auto | imagenet | random (see adnb.backbones.resolve_weights)
    planes: tuple[int, ...] = (256, 512, 512, 256)  # channels AFS keeps per stage
    afs: str = "afs"  # afs | random (ablation: as many channels, picked at random)
    afs_batches: int = 64
    afs_batch_size: int = 16
    recon_ratio: float = 0.5
    recon_mult: tuple[int, ...] = (1, 2, 4)
    recon_blocks: int = 2
    recon_attention: tuple[int, ...] = (2, 4)
    standardize: bool = False  # divide each kept channel by its std over the training images (not official; see below)
    rrs: bool = True  # False: the discriminator sees every residual channel
    rrs_numbers: tuple[int, int] = (256, 256)  # top-k by spatial max, top-k by spatial mean
    residual_layers: int = 2
    source: str = "sdas"  # sdas | dtd | perlin: where SIA's anomaly textures come from
    foreground: str = "all"  # see adnb.synthesis.foreground; resolve() takes the official rule of the category
    foreground_kernel: int = 6  # side of the morphology square at 256² (official: 3, 6, 8 or 15 by category)
    epochs: int = 1000
    batch_size: int = 16
    lr: float = 1e-4
    score_pool: int = 16  # image score = max of the score_pool×score_pool average-pooled map
    precision: str = "fp32"  # the networks' arithmetic: fp32 | bf16 | fp16 | auto (adnb.runtime.precision)
    seed: int = 0


class RealNetOutput(NamedTuple):
    features: list[torch.Tensor]  # the AFS-selected backbone features per stage
    recon: list[torch.Tensor]  # their reconstructions
    logits: torch.Tensor  # (B, 2, H, W) at image size


class RealNet(Detector):
    method = "realnet"
    config_class = RealNetConfig

    def __init__(self, config: RealNetConfig):
        super().__init__(config)
        if config.afs not in ("afs", "random"):
            raise AdnbError(f"unknown AFS mode {config.afs!r}; valid: afs, random")
        if config.source not in SOURCES:
            raise AdnbError(f"unknown anomaly source {config.source!r}; valid: {', '.join(SOURCES)}")
        if len(config.planes) != len(config.stages):
            raise AdnbError(f"give one AFS size per stage: planes={config.planes} for stages={config.stages}")
        # Random weights here; ``fit`` loads the ImageNet ones, ``load_state`` a checkpoint's.
        self.backbone = Backbone(config.backbone, config.stages)
        for i, (c, k) in enumerate(zip(self.backbone.channels, config.planes)):
            if not 0 < k <= c:
                raise AdnbError(f"planes[{i}]={k} but stage {config.stages[i]} of {config.backbone} has {c} channels")
            self.register_buffer(f"index{i}", torch.arange(k))
            self.register_buffer(f"afs_loss{i}", torch.zeros(c))
            self.register_buffer(f"scale{i}", torch.ones(1, k, 1, 1))
        self.recon = nn.ModuleList(ReconUNet(k, config.recon_ratio, config.recon_mult, config.recon_blocks,
                                             config.recon_attention) for k in config.planes)
        for stage, stride in zip(config.stages, self.backbone.strides):
            size = config.image_size / stride
            if size % self.recon[0].downsampling:
                raise AdnbError(f"image_size {config.image_size} gives stage-{stage} features of {size:g}² pixels, not "
                                f"a multiple of {self.recon[0].downsampling} as recon_mult needs; use a multiple of "
                                f"{stride * self.recon[0].downsampling}")
        total = sum(config.planes)
        if config.rrs:
            if sum(config.rrs_numbers) > 2 * total or max(config.rrs_numbers) > total:
                raise AdnbError(f"rrs_numbers {config.rrs_numbers} exceed the {total} residual channels")
            self.rank_norm = nn.BatchNorm2d(total, affine=False, momentum=0.9)
        self.discriminator = Discriminator(sum(config.rrs_numbers) if config.rrs else total, config.residual_layers)

    @property
    def indices(self) -> list[torch.Tensor]:
        return [getattr(self, f"index{i}") for i in range(len(self.config.stages))]

    @property
    def afs_losses(self) -> list[torch.Tensor]:
        return [getattr(self, f"afs_loss{i}") for i in range(len(self.config.stages))]

    @property
    def scales(self) -> list[torch.Tensor]:
        return [getattr(self, f"scale{i}") for i in range(len(self.config.stages))]

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """All channels of the backbone's stages for ``images`` (in [0, 1]), fp32 whatever the precision."""
        with autocast(self.precision, images.device):
            return [f.float() for f in self.backbone(images)]

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The AFS-selected backbone features of ``images`` (in [0, 1]), one tensor per stage, divided by
        each channel's scale (1 unless ``standardize``)."""
        return [f.index_select(1, idx) / scale for f, idx, scale in zip(self.features(images), self.indices, self.scales)]

    def residual(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Reconstructions, and the squared residuals upsampled to the finest stage and concatenated."""
        with autocast(self.precision, features[0].device):
            recon = [net(f).float() for net, f in zip(self.recon, features)]
        # fp32 from here: residuals are squared differences of nearly equal numbers
        size = features[0].shape[-2:]
        residual = torch.cat([F.interpolate((f - r) ** 2, size=size, mode="bilinear", align_corners=True)
                              for f, r in zip(features, recon)], dim=1)
        return recon, residual

    def select_residual(self, residual: torch.Tensor) -> torch.Tensor:
        """RRS: rank on the BatchNorm-normalised residual, gather the raw one (identity with ``rrs=False``)."""
        if not self.config.rrs:
            return residual
        with torch.no_grad():
            ranking = self.rank_norm(residual)
        return rrs_select(residual, ranking, *self.config.rrs_numbers)

    def head(self, features: list[torch.Tensor], size: tuple[int, int]) -> RealNetOutput:
        recon, residual = self.residual(features)
        selected = self.select_residual(residual)  # ranked in fp32
        with autocast(self.precision, selected.device):
            logits = self.discriminator(selected, size).float()
        return RealNetOutput(features, recon, logits)

    def forward(self, images: torch.Tensor) -> RealNetOutput:
        return self.head(self.extract(images), images.shape[-2:])

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        maps = torch.softmax(self(images).logits, dim=1)[:, 1]
        pool = min(self.config.score_pool, maps.shape[-1])
        scores = F.avg_pool2d(maps[:, None], pool, stride=1).flatten(1).amax(dim=1)
        return Prediction(scores, maps)


def realnet_loss(output: RealNetOutput, masks: torch.Tensor, clean: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cross-entropy of the 2-class map against the masks + Σ_l MSE(reconstruction, clean features)."""
    ce = F.cross_entropy(output.logits, masks[:, 0].long())
    mse = sum(F.mse_loss(r, c) for r, c in zip(output.recon, clean))
    return {"loss": ce + mse, "ce": ce.detach(), "mse": mse.detach()}


@torch.no_grad()
def compute_afs(detector: RealNet, images: torch.Tensor, source: TextureSource, foreground: torch.Tensor,
                batches: int, batch_size: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Σ over ``batches`` batches of synthetic anomalies of each channel's AFS loss, per stage."""
    totals = [torch.zeros(c, device=images.device) for c in detector.backbone.channels]
    for _ in range(batches):
        idx = torch.randint(0, len(images), (batch_size,), generator=generator).to(images.device)
        anomalous, masks = synthesize(images[idx], source, detector.config.source, foreground=foreground[idx],
                                      generator=generator)
        for total, fa, fn in zip(totals, detector.features(anomalous), detector.features(images[idx])):
            total += afs_channel_losses(fa, fn, masks)
    return totals


class RealNetTraining(Training):
    """RealNet's training as ``fit`` runs it and ``adnb bench`` times it (``adnb.runtime.training``).

    Set-up: the detector initialised from ``config.seed``; the backbone's ImageNet weights; the
    foreground masks; AFS (on synthetic anomalies only) or a random channel choice; the selected
    features of every clean image, computed once (the backbone is frozen and images are not
    augmented), standardised per channel when ``config.standardize``. A step makes SIA anomalies of
    half the batch inside their foreground, and updates on reconstruction + segmentation loss.
    ``source`` is SIA's anomaly source (``prepare`` makes it); without one (``adnb bench``, which does
    not time SDAS) the training images themselves stand in. Every random draw comes from one
    generator seeded with ``config.seed``.
    """

    what = ("SIA anomalies on half the batch (in the foreground), standardised selected features, reconstruction + "
            "segmentation loss; Adam. SDAS is not timed; AFS runs during set-up")

    def __init__(self, config: RealNetConfig, images: torch.Tensor, *, device: torch.device | str = "cpu",
                 source: TextureSource | None = None):
        with seeded(config.seed):
            detector = RealNet(config)
        self.detector = detector
        self.generator = generator = seeded_generator(config.seed)
        self.source = source if source is not None else TextureSource.from_images(images)
        self.images = images = images.to(device)
        self.n_images = len(images)
        detector.to(device).eval()
        backbone = detector.backbone.load_weights(config.weights, batchnorm_from=images)
        self.weights = backbone.record("backbone")
        if backbone.kind == "random":
            self.weights["backbone_batchnorm"] = "estimated on the training images"
        self.foreground = foreground_masks(images, config.foreground, config.foreground_kernel)
        if config.afs == "afs":
            losses = compute_afs(detector, images, self.source, self.foreground, config.afs_batches,
                                 config.afs_batch_size, generator)
            for i, (loss, k) in enumerate(zip(losses, config.planes)):
                getattr(detector, f"afs_loss{i}").copy_(loss)
                getattr(detector, f"index{i}").copy_(afs_select(loss, k))
        else:
            for i, (c, k) in enumerate(zip(detector.backbone.channels, config.planes)):
                getattr(detector, f"index{i}").copy_(torch.randperm(c, generator=generator)[:k].sort().values)
        clean = [torch.cat(parts) for parts in zip(*(detector.extract(b) for b in images.split(32)))]
        if config.standardize:
            # WideResNet's stage outputs follow a ReLU and sit on one modest scale; other backbones' (an
            # EfficientNet's linear bottlenecks) spread over orders of magnitude, and the squared
            # residuals the discriminator reads would be ruled by a few loud channels.
            for i, f in enumerate(clean):
                scale = f.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
                getattr(detector, f"scale{i}").copy_(scale)
                clean[i] = f / scale
        self.clean = clean
        self.trainable = [p for p in detector.parameters() if p.requires_grad]
        self.optimiser = torch.optim.Adam(self.trainable, lr=config.lr, betas=(0.9, 0.999))
        self.scaler = grad_scaler(detector.precision, device)
        detector.train()

    def batches(self, epoch: int) -> list[torch.Tensor]:
        return [idx.to(self.images.device)
                for idx in torch.randperm(self.n_images, generator=self.generator).split(self.detector.config.batch_size)]

    def step(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        config, images = self.detector.config, self.images
        k = (len(idx) + 1) // 2  # half synthetic anomalies, half normal images (a last batch of one is synthetic)
        anomalous, masks = synthesize(images[idx[:k]], self.source, config.source, foreground=self.foreground[idx[:k]],
                                      generator=self.generator)
        target = [f[idx] for f in self.clean]
        features = [torch.cat([fa, f[k:]]) for fa, f in zip(self.detector.extract(anomalous), target)]
        masks = torch.cat([masks, masks.new_zeros(len(idx) - k, *masks.shape[1:])])
        terms = realnet_loss(self.detector.head(features, images.shape[-2:]), masks, target)
        optimiser_step(terms["loss"], self.optimiser, self.scaler)
        return {name: value.detach() for name, value in terms.items()}

    def state(self) -> dict[str, Any]:
        return {"model": self.detector, "optimizer": self.optimiser, "generator": GeneratorState(self.generator)}


def fit(config: RealNetConfig, images: torch.Tensor, *, source: TextureSource, device: torch.device | str = "cpu",
        cache: CacheEntry | None = None, force_train: bool = False) -> RealNet:
    """Train RealNet on normal ``images`` (N×3×S×S in [0, 1]) with SIA anomalies from ``source``."""
    restored = RealNet.from_cache(config, cache, force_train)
    if restored is not None:
        return restored.to(device).eval()
    start = time.perf_counter()
    training = RealNetTraining(config, images, device=device, source=source)
    history = training.run(config.epochs, cache, desc="RealNet")
    detector = training.detector
    detector.store(cache, time.perf_counter() - start, weights={**training.weights, "anomaly_source": config.source},
                   history=history, precision=detector.precision)
    return detector.eval()


# ---------------------------------------------------------------------------------------------
# The recipe's hooks: a category's config, and its SIA anomaly source
# ---------------------------------------------------------------------------------------------

# chapter parameter → SDASConfig field
SDAS_PARAMS = {"sdas_size": "image_size", "sdas_channels": "channels", "sdas_attention": "attention",
               "sdas_layers": "layers_per_block", "sdas_epochs": "epochs", "sdas_batch": "batch_size",
               "sdas_lr": "lr", "sdas_ema": "ema", "sdas_steps": "sample_steps", "seed": "seed"}


def resolve(params: Mapping[str, Any], category: Category | None = None) -> RealNetConfig:
    """The config for ``category``: its official foreground rule, and the backbone weights that will run."""
    config = with_weights_resolved(config_from(RealNetConfig, params))
    if category is not None:
        config = replace(config, foreground=foreground_rule(category.dataset, category.name))
    return config


def sdas_config(params: Mapping[str, Any]) -> SDASConfig:
    return config_from(SDASConfig, {field: params[key] for key, field in SDAS_PARAMS.items() if key in params})


def dataset_categories(category: Category, mask_suffix: str | None = None) -> list[Category]:
    """Every category of ``category``'s dataset (its siblings under the same root), ``category`` included."""
    root = category.root.parent
    names = list_categories(root) if category.name in list_categories(root) else [category.name]
    return [category if name == category.name else load_category(root, name, mask_suffix=mask_suffix,
                                                                   dataset=category.dataset) for name in names]


class SDASRun(NamedTuple):
    model: SDAS
    images: torch.Tensor  # uint8, K×n×3×S×S: n samples of each of the K classes
    samples: CacheEntry  # where the samples are cached (its name identifies them)
    sample_seconds: float


def sdas_entries(params: Mapping[str, Any], categories: Sequence[Category]) -> tuple[CacheEntry, CacheEntry]:
    """The cache entries of the SDAS model over ``categories`` and of its samples (no image is read)."""
    config = sdas_config(params)
    key = "|".join(f"{cat.name}:{cat.fingerprint()}" for cat in categories)
    per_class = int(params.get("sdas_per_class", 24))
    return (caches.entry("realnet", config, key, stage="sdas"),
            caches.entry("realnet", {"sdas": config, "per_class": per_class}, key, stage="sdas-samples"))


def train_sdas(params: Mapping[str, Any], categories: Sequence[Category], *, device: torch.device | str = "cpu",
               force_train: bool = False) -> SDASRun:
    """One class-conditional SDAS model over ``categories`` (one class each, as the official code does),
    and ``sdas_per_class`` samples of every class."""
    config = sdas_config(params)
    limit = int(params.get("max_train") or 0) or None
    model, samples = sdas_entries(params, categories)
    train_sets = [cat.load("train", config.image_size, limit=limit).images for cat in categories]
    sdas = fit_sdas(config, train_sets, device=device, cache=model, force_train=force_train)
    images, seconds = sdas_images(sdas, int(params.get("sdas_per_class", 24)), cache=samples, force=force_train)
    return SDASRun(sdas, images, samples, seconds)


def prepare(config: RealNetConfig, params: Mapping[str, Any], category: Category, *, device: torch.device | str = "cpu",
            force_train: bool = False, plan: bool = False) -> Prepared:
    """SIA's anomaly source for ``category``: SDAS images of its class (the SDAS model is trained once
    for the category's whole dataset), DTD textures (``dtd_root``) or procedural Perlin textures.
    ``plan``: name the SDAS entries and the key, train and sample nothing."""
    if config.source == "perlin":
        return Prepared({} if plan else {"source": TextureSource.procedural(config.image_size)}, "perlin")
    if config.source == "dtd":
        if not params.get("dtd_root"):
            raise AdnbError("RealNet with source 'dtd' needs a texture folder: add -p dtd_root DTD/images")
        return Prepared({} if plan else {"source": TextureSource.from_folder(params["dtd_root"], config.image_size)},
                        f"dtd:{params['dtd_root']}")
    categories = dataset_categories(category, params.get("mask_suffix") or None)
    entries = list(sdas_entries(params, categories))
    if plan:
        return Prepared(key=entries[1].folder.name, entries=entries)
    run = train_sdas(params, categories, device=device, force_train=force_train)
    k = [cat.name for cat in categories].index(category.name)
    return Prepared({"source": TextureSource.from_images(run.images[k])}, run.samples.folder.name,
                    {"sdas_train_seconds": run.model.train_seconds, "sdas_sample_seconds": run.sample_seconds,
                     "sdas_images_per_class": int(run.images.shape[1])}, entries)


METHOD = register(MethodSpec("realnet", RealNet, fit, training=RealNetTraining, resolve=resolve, prepare=prepare))
