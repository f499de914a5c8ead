"""PyramidFlow (Lei, Hu, Wang and Liu, CVPR 2023): a normalizing flow on an invertible pyramid.

The method in five steps, in the order of this file:

1. **Lift.** A fixed random orthogonal 1×1 convolution turns the RGB image (ImageNet-normalised)
   into C = 16 channels. It is never trained. Optionally a frozen ResNet stem + layer1 replaces it
   (64 channels at a quarter of the side), the paper's "pre-trained" variant.
2. **Pyramid.** ``adnb.pyramid.build`` splits the features into L levels l_0 (finest) … l_{L−1}.
3. **Flow.** Affine couplings between neighbouring levels: one level is transformed,
   ``y = exp(s) ⊙ x + t``, with (s, t) computed from its neighbours, then mixed across channels
   by an invertible 1×1 convolution. Three kinds, stacked as the official code does (4 stacks):

   - *dual* (levels k, k+2 condition level k+1; both resized to k+1 by nearest neighbour),
   - *down* (level k conditions level k+1; (s, t) computed at k's resolution, sampled at every
     other pixel),
   - *up* (level 1, nearest-upsampled, conditions level 0).

   **Volume normalisation** subtracts a mean from every log-scale s (over channels per pixel:
   CVN; over positions per channel: SVN) and from the 1×1 convolution's log-diagonal, so each
   block has log|det J| = 0: the flow preserves volume and cannot shrink all latents to zero,
   which is the one thing the training loss below would otherwise reward.
4. **Training.** Latents of two normal images should be the same. For each pair (i, j) in a
   batch, the per-level differences |z_k^i − z_k^j|² are composed back to image resolution,
   averaged over channels to Δ, and the **Fourier loss** mean |FFT2(Δ)| is minimised. No
   likelihood term: volume normalisation makes it constant.
5. **Test.** The **latent template** T_k is the mean training latent of level k. The anomaly map
   is the **pyramid difference** compose(|z_k − T_k|) averaged over channels, at full
   resolution; the image score is its maximum.

Deviations from the official code (gasharper/PyramidFlow), all argued in the chapter:

- the *down* coupling normalises the log-scales it actually applies (at level k+1, by a
  stride-2 convolution that computes exactly the pixels nearest-neighbour sampling keeps); the
  official code normalises at level k and then subsamples, which under SVN leaves log|det J| ≠ 0;
- running means are updated once per step (the official memory-saving backward recomputes
  each block twice more and updates them three times); there is no reversible backward here;
- the last training epoch's model is reported; the official code keeps the epoch with the best
  test score.

Precision: under a bf16 (or fp16) ``autocast`` block only the (s, t) convolutions drop to 16 bits.
Everything on the invertible path stays fp32 — the pyramid, s and t themselves, volume
normalisation, exp(s) ⊙ x + t, the 1×1 convolution and its matrix, so also every log-determinant
— as does the Fourier loss: the latents are what the anomaly map subtracts the template from, and
16 blocks of 3-digit rounding on that path would add up to noise in the map.
"""

from __future__ import annotations

import math
from functools import lru_cache
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any
from itertools import combinations

import torch
import torch.nn.functional as F
from torch import nn

from adnb import pyramid
from adnb.backbones import Backbone, resolve_weights
from adnb.data.layout import Category
from adnb.methods.base import Detector, Prediction, config_from
from adnb.methods.registry import MethodSpec, register
from adnb.runtime.cache import CacheEntry
from adnb.runtime.errors import AdnbError
from adnb.runtime.precision import PRECISIONS, at_least_fp32, autocast, full_precision, grad_scaler, optimiser_step
from adnb.runtime.seed import seeded
from adnb.runtime.training import Training

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the lift's input normalisation

VOLUME_NORMS = ("cvn", "svn", "none")
TEMPLATES = ("mean", "single")
DIFFERENCES = ("pyramid", "finest")
LOSSES = ("fourier", "spatial")

# The official optimiser (shared with CS-Flow): Adam with these settings, constant learning rate.
ADAM_BETAS = (0.5, 0.9)
ADAM_EPS = 1e-4
WEIGHT_DECAY = 1e-5
GRAD_CLIP = 1.0
VN_MOMENTUM = 0.1
SOFT_CLAMP_GAIN = 0.636  # ≈ 2/π, as written in the paper's Algorithm 1
TEXTURES = ("carpet", "grid", "leather", "tile", "wood")  # MVTec AD's texture categories


@dataclass(frozen=True)
class PyramidFlowConfig:
    image_size: int = 256  # side of the square input images
    channels: int = 16  # C, the width of the lifted features (an encoder fixes its own)
    levels: int = 4  # L, pyramid levels; the side must be divisible by 2^(L−1)
    stacks: int = 4  # repetitions of the coupling pattern
    kernel_size: int = 7  # of the two convolutions that compute (s, t)
    clamp: float = 2.0  # c of the soft clamp s = c·0.636·atan(s₀/c)
    volume_norm: str = "cvn"  # cvn (per pixel, over channels) | svn (per channel, over positions) | none
    downsample: str = "max"  # max (official code) | nearest (paper) — the pyramid's D
    encoder: str = "none"  # none (from scratch, the paper's main setting) | a timm backbone (adnb.backbones)
    encoder_stage: int = 1  # the encoder's feature level the pyramid is built on (1: stride 4, ResNet layer1)
    weights: str = "none"  # the encoder's: auto | imagenet | random ("none" without an encoder)
    template: str = "mean"  # mean training latent | single (the first training image's latent: ablation)
    difference: str = "pyramid"  # pyramid (compose all levels) | finest (level 0 only: ablation)
    loss: str = "fourier"  # fourier: mean |FFT2(Δ)| | spatial: mean Δ (ablation)
    epochs: int = 15
    batch_size: int = 2
    lr: float = 2e-4
    augment: bool = False  # random flips and 90° rotations (the official recipe for textures)
    precision: str = "fp32"  # the (s, t) convolutions' arithmetic: fp32 | bf16 | fp16 | auto (adnb.runtime.precision)
    seed: int = 0  # initialisation, shuffling and augmentation


def official_choices(category: str) -> dict[str, object]:
    """The official code's per-category settings ("auto"): pyramid levels, volume normalisation, flips.

    Levels 8 for carpet, metal_nut and transistor, 2 for screw, else 4; SVN for carpet, grid,
    bottle and transistor, else CVN; flips and rotations for the five texture categories.
    """
    levels = 8 if category in ("carpet", "metal_nut", "transistor") else 2 if category == "screw" else 4
    norm = "svn" if category in ("carpet", "grid", "bottle", "transistor") else "cvn"
    return {"levels": levels, "volume_norm": norm, "augment": category in TEXTURES}


# --------------------------------------------------------------------------- coupling pieces


def soft_clamp(s: torch.Tensor, clamp: float) -> torch.Tensor:
    """s ↦ c · 0.636 · atan(s / c): about s near 0, bounded by ≈ ±c (0.636 ≈ 2/π)."""
    return (clamp * SOFT_CLAMP_GAIN) * torch.atan(s * (1.0 / clamp))


class VolumeNorm(nn.Module):
    """The paper's Algorithm 2: subtract the mean log-scale, so the coupling keeps volume.

    CVN averages over (batch, channel), one mean per pixel; SVN over (batch, height, width), one
    mean per channel. Training uses the batch mean and tracks a running mean (momentum 0.1),
    which evaluation subtracts instead, as batch normalisation does (but without dividing by a
    standard deviation). With a batch of one, training mode makes Σ s = 0 exactly.
    """

    def __init__(self, kind: str, channels: int, size: int, momentum: float = VN_MOMENTUM):
        super().__init__()
        self.kind, self.momentum = kind, momentum
        self.dims = {"cvn": (0, 1), "svn": (0, 2, 3)}.get(kind)
        if self.dims is not None:
            shape = (1, 1, size, size) if kind == "cvn" else (1, channels, 1, 1)
            self.register_buffer("running_mean", torch.zeros(shape))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        if self.dims is None:
            return s
        if self.training:
            mean = s.mean(dim=self.dims, keepdim=True)
            with torch.no_grad():
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            return s - mean
        return s - self.running_mean


@lru_cache(maxsize=32)
def _phase_folds(k: int, dtype: torch.dtype, device: torch.device) -> tuple[int, list[tuple[int, torch.Tensor]]]:
    """Padding, and per phase p: where its window starts in the padded input and the n×k matrix
    that sums the taps d landing on the same source offset ⌊(p+d)/2⌋."""
    r = k // 2
    pad = (r + 1) // 2  # the farthest source offset either way: ⌈r/2⌉ before (p = 0), ⌊(r+1)/2⌋ after (p = 1)
    folds = []
    for p in (0, 1):
        src = [(p + d) // 2 for d in range(-r, r + 1)]
        fold = torch.zeros(src[-1] - src[0] + 1, k, dtype=dtype)
        fold[torch.tensor(src) - src[0], torch.arange(k)] = 1
        folds.append((src[0] + pad, fold.to(device)))
    return pad, folds


def conv_nearest_up2(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``conv2d(upsample_nearest(x, ×2), weight, padding=k//2)``, computed at x's resolution.

    Output pixel 2i+p (p ∈ {0, 1}) sees upsampled pixels 2i+p+d, d ∈ [−r, r] (r = k//2), which
    are source pixels i + ⌊(p+d)/2⌋: the k taps of each axis fold onto about k/2 + 1 source
    offsets per phase p. So four small convolutions (one per phase pair) at the coarse resolution
    give the same numbers as one k×k convolution at the fine one, for 4·4² instead of 4·7²
    multiply-adds per coarse pixel when k = 7 — and the upsampled tensor is never built.
    """
    k = weight.shape[-1]
    h, w = x.shape[-2:]
    pad, folds = _phase_folds(k, weight.dtype, weight.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = []
    for start_y, fold_y in folds:
        row = []
        for start_x, fold_x in folds:
            with full_precision(weight.device):  # sum the folded taps exactly; the convolution rounds once
                phase_weight = torch.einsum("uk,ockl,vl->ocuv", fold_y, weight, fold_x)
            n_y, n_x = phase_weight.shape[-2:]
            phase = F.conv2d(padded[:, :, start_y:start_y + h + n_y - 1, start_x:start_x + w + n_x - 1], phase_weight)
            row.append(phase.permute(0, 2, 3, 1))  # B×h×w×O
        rows.append(torch.stack(row, dim=3))  # B×h×w×2×O (column phase)
    # Interleaved in channels-last order, B×h×2×w×2×O, so the result is NHWC: the convolution that
    # consumes it runs without a layout copy.
    out = torch.stack(rows, dim=2)
    return out.reshape(out.shape[0], 2 * h, 2 * w, out.shape[-1]).permute(0, 3, 1, 2)


class AffineParams(nn.Module):
    """(s, t) from the conditioning levels: conv k×k → LeakyReLU → conv k×k (zero-initialised).

    The second convolution starts at zero, so every coupling starts as the identity. Its
    ``stride`` is 2 for the *down* coupling, which only uses every other pixel.
    """

    def __init__(self, in_channels: int, channels: int, kernel_size: int, clamp: float, volume_norm: str,
                 size: int, stride: int = 1):
        super().__init__()
        hidden = 2 * channels
        self.clamp = clamp
        self.conv1 = nn.Conv2d(in_channels, hidden, kernel_size, padding=kernel_size // 2, bias=False)
        self.conv2 = nn.Conv2d(hidden, 2 * channels, kernel_size, padding=kernel_size // 2, stride=stride, bias=False)
        nn.init.zeros_(self.conv2.weight)
        self.norm = VolumeNorm(volume_norm, channels, size // stride)

    def forward(self, first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, t) from ``first`` = conv1(condition), which the coupling computes (see ``PyramidCoupling.first_conv``)."""
        # Not in place: the up coupling's ``first`` is a view (``conv_nearest_up2`` interleaves its phases), and
        # autograd would undo an in-place change to a view by copying its whole base in the backward pass (6 % of
        # a 256² training step, measured).
        hidden = F.leaky_relu(first, 0.01)
        raw_s, t = at_least_fp32(self.conv2(hidden)).chunk(2, dim=1)  # fp32 from here on (module docstring)
        return self.norm(soft_clamp(raw_s, self.clamp)), t


class InvConv1x1(nn.Module):
    """Invertible 1×1 convolution W = P·L·(U + diag(sign · exp(s̃))), Glow's LU parameterisation.

    P (a permutation) and the signs are fixed; L (unit lower), U (strict upper) and the
    log-diagonal s are learned. Volume normalisation uses s̃ = s − mean(s), so
    log|det W| = Σ s̃ = 0. Initialised from a random orthogonal matrix (QR), as the official code.
    """

    def __init__(self, channels: int, volume_norm: bool = True):
        super().__init__()
        self.volume_norm = volume_norm
        q = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))[0]
        p, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper)
        self.register_buffer("permutation", p.float())
        self.register_buffer("sign", torch.sign(diag).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        # Full C×C parameters under a mask, as the official code (its parameter count includes them).
        self.lower = nn.Parameter(lower.float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_diag = nn.Parameter(diag.abs().log().float())

    def log_scale(self) -> torch.Tensor:
        return self.log_diag - self.log_diag.mean() if self.volume_norm else self.log_diag

    def matrix(self) -> torch.Tensor:
        eye = torch.eye(len(self.sign), dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign * torch.exp(self.log_scale()))
        return self.permutation @ lower @ upper

    # fp32 even under autocast (W and its products would otherwise be bf16): this is the invertible path.
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with full_precision(x.device):
            return F.conv2d(at_least_fp32(x), self.matrix()[:, :, None, None])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        with full_precision(y.device):
            w_inv = torch.linalg.inv(self.matrix().double()).to(y.dtype)
            return F.conv2d(y, w_inv[:, :, None, None])

    def log_det(self, pixels: int) -> torch.Tensor:
        """log|det| of the convolution on an image of ``pixels`` positions: pixels · Σ s̃."""
        return pixels * self.log_scale().sum()  # fp32: no matrix product that autocast would lower


class PyramidCoupling(nn.Module):
    """One pyramid coupling block: level ``target`` ← exp(s) ⊙ level + t, then the 1×1 convolution.

    ``kind`` and ``start`` name it as the official code does: ``("dual", k)`` transforms level
    k+1 from levels k and k+2; ``("down", k)`` transforms level k+1 from level k; ``("up", 0)``
    transforms level 0 from level 1. The conditioning levels pass through unchanged, which is
    what makes the block invertible.
    """

    def __init__(self, kind: str, start: int, channels: int, size: int, config: PyramidFlowConfig):
        super().__init__()
        self.kind, self.start = kind, start
        self.target = start if kind == "up" else start + 1
        k, clamp, vn = config.kernel_size, config.clamp, config.volume_norm
        side = size >> (start if kind in ("up", "down") else start + 1)  # where (s, t) are computed
        in_channels = 2 * channels if kind == "dual" else channels
        self.params = AffineParams(in_channels, channels, k, clamp, vn, side, stride=2 if kind == "down" else 1)
        self.mix = InvConv1x1(channels, volume_norm=vn != "none")

    def first_conv(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """conv1 of the conditioning input, which is

        - dual: concat(nearest(l_k → size of l_{k+1}), nearest(l_{k+2} → size of l_{k+1})),
        - down: l_k,
        - up:   nearest(l_1 → size of l_0).

        Nearest-neighbour halving keeps every other pixel (a strided view) and doubling is folded
        into the convolution (``conv_nearest_up2``), so the resized inputs are never built; the
        numbers are the same.
        """
        weight, pad = self.params.conv1.weight, self.params.conv1.padding
        if self.kind == "down":
            return F.conv2d(levels[self.start], weight, padding=pad)
        if self.kind == "up":
            return conv_nearest_up2(levels[1], weight)
        c = levels[self.start].shape[1]
        finer = F.conv2d(levels[self.start][:, :, ::2, ::2], weight[:, :c], padding=pad)
        return finer + conv_nearest_up2(levels[self.start + 2], weight[:, c:])

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        s, t = self.params(self.first_conv(levels))
        out = list(levels)
        out[self.target] = self.mix(torch.addcmul(t, torch.exp(s), levels[self.target]))
        return out

    def inverse(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        s, t = self.params(self.first_conv(levels))
        out = list(levels)
        out[self.target] = (self.mix.inverse(levels[self.target]) - t) * torch.exp(-s)
        return out

    def log_det(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """log|det ∂out/∂in| per image: Σ s over the target level + the 1×1 convolution's share."""
        s, _ = self.params(self.first_conv(levels))
        pixels = levels[self.target].shape[-2] * levels[self.target].shape[-1]
        return s.flatten(1).sum(1) + self.mix.log_det(pixels)


def block_layout(levels: int, stacks: int) -> list[tuple[str, int]]:
    """The official stacking: per stack, dual/down couplings from level 0 in steps of 2, then
    the up coupling and dual/down couplings from level 1 in steps of 2 (16 blocks for L = 4)."""
    layout = []
    for _ in range(stacks):
        for first in (0, 1):
            if first == 1:
                layout.append(("up", 0))
            for k in range(first, levels, 2):
                if k + 2 < levels:
                    layout.append(("dual", k))
                elif k + 1 < levels:
                    layout.append(("down", k))
    return layout


# --------------------------------------------------------------------------- the detector


class PyramidFlow(Detector):
    method = "pyramidflow"
    config_class = PyramidFlowConfig

    def __init__(self, config: PyramidFlowConfig):
        super().__init__(config)
        _check_options(config)
        if config.encoder == "none":
            self.channels, side = config.channels, config.image_size
            self.lift = nn.Conv2d(3, self.channels, 1, bias=False)
            nn.init.orthogonal_(self.lift.weight)
            self.lift.weight.requires_grad_(False)
            self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        else:
            # Built with random weights; ``fit`` loads ImageNet's (a checkpoint brings its own).
            self.encoder = Backbone(config.encoder, (config.encoder_stage,))
            self.channels, side = self.encoder.channels[0], config.image_size // self.encoder.strides[0]
        _check_levels(config, side, "image" if config.encoder == "none" else "feature")
        self.feature_size = side
        self.blocks = nn.ModuleList(PyramidCoupling(kind, start, self.channels, side, config)
                                    for kind, start in block_layout(config.levels, config.stacks))
        for k in range(config.levels):
            self.register_buffer(f"template{k}", torch.zeros(self.channels, side >> k, side >> k))

    # ---- frozen input features and their inverse
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] → the features the pyramid is built from."""
        with torch.no_grad():
            if self.config.encoder == "none":
                x = self.lift((images - self.pixel_mean) / self.pixel_std)
            else:
                x = self.encoder(images)[0]
        return x

    def unlift(self, features: torch.Tensor) -> torch.Tensor:
        """The least-squares inverse of the lift (exact: a 16×3 orthogonal matrix has a left inverse)."""
        if self.config.encoder != "none":
            raise AdnbError("a pretrained encoder is not invertible; only the from-scratch lift can be undone")
        a = self.lift.weight[:, :, 0, 0].double()  # C×3
        b, c, h, w = features.shape
        x = torch.linalg.lstsq(a, features.double().permute(1, 0, 2, 3).reshape(c, -1)).solution
        x = x.reshape(3, b, h, w).permute(1, 0, 2, 3).to(features.dtype)
        return x * self.pixel_std + self.pixel_mean

    # ---- the flow
    def flow(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        for block in self.blocks:
            levels = block(levels)
        return levels

    def flow_inverse(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        for block in reversed(self.blocks):
            levels = block.inverse(levels)
        return levels

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images in [0, 1] → the latent pyramid [z_0 (finest), …, z_{L−1}] (fp32).

        The pyramid is built in fp32; inside the flow only the (s, t) convolutions drop to
        ``self.precision`` — the latents, scales, volume normalisation and log-determinants stay fp32.
        """
        levels = pyramid.build(self.features(images), self.config.levels, self.config.downsample)
        with autocast(self.precision, images.device):
            return self.flow(levels)

    def inverse(self, latents: list[torch.Tensor]) -> torch.Tensor:
        """Latent pyramid → images in [0, 1] (the from-scratch model only)."""
        return self.unlift(pyramid.compose(self.flow_inverse(latents)))

    # ---- template and anomaly map
    @property
    def template(self) -> list[torch.Tensor]:
        return [getattr(self, f"template{k}") for k in range(self.config.levels)]

    @torch.no_grad()
    def fit_template(self, images: torch.Tensor, batch_size: int = 8) -> None:
        """T_k = mean latent of level k over ``images`` (eval mode); ``single``: the first image's."""
        self.eval()
        if self.config.template == "single":
            images = images[:1]
        sums = [torch.zeros_like(t, dtype=torch.float64) for t in self.template]
        for start in range(0, len(images), batch_size):
            latents = self(images[start:start + batch_size].to(self.device))
            for total, z in zip(sums, latents):
                total += z.double().sum(0)
        for k, total in enumerate(sums):
            getattr(self, f"template{k}").copy_(total / len(images))

    def anomaly_map(self, latents: list[torch.Tensor]) -> torch.Tensor:
        """compose(|z_k − T_k|) averaged over channels (B×H×W at input resolution)."""
        if self.config.difference == "finest":
            amap = (latents[0] - self.template0).abs().mean(1)
        else:
            amap = pyramid.compose([(z - t).abs() for z, t in zip(latents, self.template)]).mean(1)
        if amap.shape[-1] != self.image_size:
            amap = F.interpolate(amap[:, None], size=(self.image_size,) * 2, mode="bilinear", align_corners=False)[:, 0]
        return amap

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> Prediction:
        self.eval()
        amap = self.anomaly_map(self(images))
        return Prediction(amap.flatten(1).amax(1), amap)

    def load_pretrained_encoder(self) -> dict[str, str]:
        """The encoder's weights (``config.weights``; see ``adnb.backbones``) and where they came from."""
        if self.config.encoder == "none":
            return {}
        source = self.encoder.load_weights(self.config.weights)
        return source.record("encoder")

    def log_dets(self, images: torch.Tensor) -> torch.Tensor:
        """log|det J| of every coupling block for each image (B × blocks), in the current mode."""
        levels = pyramid.build(self.features(images), self.config.levels, self.config.downsample)
        out = []
        for block in self.blocks:
            out.append(block.log_det(levels))
            levels = block(levels)
        return torch.stack(out, dim=1)


def _check_options(config: PyramidFlowConfig) -> None:
    for name, valid in (("volume_norm", VOLUME_NORMS), ("template", TEMPLATES), ("precision", PRECISIONS),
                        ("difference", DIFFERENCES), ("loss", LOSSES), ("downsample", pyramid.DOWNSAMPLING)):
        if getattr(config, name) not in valid:
            raise AdnbError(f"PyramidFlow {name}={getattr(config, name)!r} is not one of {', '.join(valid)}")
    if config.levels < 2:
        raise AdnbError(f"PyramidFlow needs at least 2 pyramid levels (got levels={config.levels}; 0 means the official "
                        "per-category choice, which resolve() makes)")


def _check_levels(config: PyramidFlowConfig, side: float, what: str) -> None:
    if side != int(side) or int(side) % 2 ** (config.levels - 1):
        raise AdnbError(f"image_size={config.image_size} does not give {config.levels} pyramid levels: the "
                        f"{what} side {side:g} must be divisible by 2^(levels−1) = {2 ** (config.levels - 1)}; "
                        "choose a multiple of it or fewer levels")


# --------------------------------------------------------------------------- training


def pair_differences(latents: list[torch.Tensor]) -> list[torch.Tensor]:
    """For every pair i < j of the batch and every level: |z_k^i − z_k^j|² (pairs × C × H_k × W_k)."""
    pairs = list(combinations(range(latents[0].shape[0]), 2))
    first, second = [i for i, _ in pairs], [j for _, j in pairs]
    return [(z[first] - z[second]).square() for z in latents]


def fourier_loss(delta: torch.Tensor) -> torch.Tensor:
    """mean |FFT2(Δ)| over the pairs and all frequencies (Δ: pairs × H × W), in fp32 (no bf16 FFTs)."""
    with full_precision(delta.device):
        return torch.fft.fft2(at_least_fp32(delta)).abs().mean()


def training_loss(latents: list[torch.Tensor], config: PyramidFlowConfig) -> torch.Tensor:
    """The latent difference of each pair, composed to image resolution (or level 0 alone for
    ``difference="finest"``), averaged over channels, scored by the Fourier (or spatial) loss."""
    diffs = pair_differences(latents)
    delta = (diffs[0] if config.difference == "finest" else pyramid.compose(diffs)).mean(1)
    return fourier_loss(delta) if config.loss == "fourier" else delta.mean()


def flips_and_rotations(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image: horizontal flip (p ½), vertical flip (p ½), a random multiple of 90° (p ½)."""
    out = []
    for x in images:
        hflip, vflip, rotate = (torch.rand(3, generator=generator) < 0.5).tolist()
        turns = int(torch.randint(4, (1,), generator=generator))
        x = x.flip(-1) if hflip else x
        x = x.flip(-2) if vflip else x
        out.append(torch.rot90(x, turns, dims=(-2, -1)) if rotate else x)
    return torch.stack(out)


class PyramidFlowTraining(Training):
    """PyramidFlow's training as ``fit`` runs it and ``adnb bench`` times it (``adnb.runtime.training``).

    Set-up: the flow initialised from ``config.seed``, the pre-trained encoder's weights loaded (the
    variant), Adam. An epoch is the shuffled images in batches of ``batch_size`` (the last partial
    batch dropped), each flipped and rotated when ``config.augment``; every epoch draws from its own
    generator, seeded from ``config.seed`` and the epoch, so a resumed run draws the same batches.
    """

    what = "flow of the batch, Fourier loss of every pair's latent difference; Adam, gradient clipping"

    def __init__(self, config: PyramidFlowConfig, images: torch.Tensor, *, device: torch.device | str = "cpu"):
        if len(images) < config.batch_size:
            raise AdnbError(f"PyramidFlow trains on pairs from batches of {config.batch_size} images; "
                            f"got only {len(images)} training images")
        with seeded(config.seed):
            self.detector = PyramidFlow(config)
        self.weights = self.detector.load_pretrained_encoder()
        self.detector.to(device).train()
        self.images = images.to(device)
        self.n_images = len(images)
        self.trainable = [p for p in self.detector.parameters() if p.requires_grad]
        # Fused: one kernel for all parameter tensors (80 at 4 levels) instead of ~10 operations each (with the
        # clipping, 3.9 against 13.6 ms a step on a CPU); the same update up to float rounding.
        self.optimiser = torch.optim.Adam(self.trainable, lr=config.lr, betas=ADAM_BETAS, eps=ADAM_EPS,
                                          weight_decay=WEIGHT_DECAY,
                                          fused=torch.device(device).type in ("cpu", "cuda") or None)
        self.scaler = grad_scaler(self.detector.precision, device)
        self.generator = self.epoch_generator(0)

    def epoch_generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.detector.config.seed * 100_003 + epoch)

    def batches(self, epoch: int) -> Iterator[torch.Tensor]:
        self.generator = self.epoch_generator(epoch)
        order = torch.randperm(self.n_images, generator=self.generator).to(self.images.device)
        size = self.detector.config.batch_size
        for i in range(0, self.n_images - size + 1, size):  # drop the last partial batch
            yield order[i:i + size]

    def step(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        config = self.detector.config
        batch = self.images[idx]
        if config.augment:
            batch = flips_and_rotations(batch, self.generator)
        loss = training_loss(self.detector(batch), config)
        optimiser_step(loss, self.optimiser, self.scaler, clip=GRAD_CLIP, parameters=self.trainable)
        return {"loss": loss.detach()}

    def epoch(self, epoch: int) -> dict[str, float]:
        logs = super().epoch(epoch)
        if not math.isfinite(logs["loss"]):
            raise AdnbError(f"PyramidFlow training diverged in epoch {epoch + 1} (mean loss {logs['loss']}); "
                            "lower lr or keep volume normalisation on")
        return logs

    def state(self) -> dict[str, Any]:
        return {"model": self.detector, "optimizer": self.optimiser}

    def finish(self) -> None:
        self.detector.fit_template(self.images)


def fit(config: PyramidFlowConfig, images: torch.Tensor, *, device: torch.device | str = "cpu",
        cache: CacheEntry | None = None, force_train: bool = False) -> PyramidFlow:
    """Train on ``images`` (N×3×S×S in [0, 1]) for ``config.epochs``, then fit the template."""
    restored = PyramidFlow.from_cache(config, cache, force_train)
    if restored is not None:
        return restored.to(device).eval()
    training = PyramidFlowTraining(config, images, device=device)
    history, seconds = training.run_and_finish(config.epochs, cache, desc=f"PyramidFlow ({config.epochs} epochs)")
    detector = training.detector
    detector.store(cache, seconds, weights=training.weights, history=history, precision=detector.precision)
    return detector.eval()


# --------------------------------------------------------------------------- the recipe's hooks


def resolve(params: Mapping[str, Any], category: Category | None = None) -> PyramidFlowConfig:
    """The config for ``category``: ``levels: 0`` and ``volume_norm: "auto"`` take the official
    per-category choices, flips and rotations go to the ``texture_categories``, and an encoder's
    weights are resolved (so the cache key names what runs)."""
    official = official_choices(category.name if category else "")
    config = config_from(PyramidFlowConfig, {**params, "levels": int(params.get("levels") or official["levels"])})
    if config.volume_norm == "auto":
        config = replace(config, volume_norm=official["volume_norm"])
    if category is not None and "texture_categories" in params:
        config = replace(config, augment=category.name in params["texture_categories"])
    weights = "none" if config.encoder == "none" else resolve_weights(config.encoder, config.weights)
    return replace(config, weights=weights)


def variant(config: PyramidFlowConfig) -> str:
    """The pre-trained variant is its own row in a comparison; the from-scratch model is the method."""
    return "" if config.encoder == "none" else "pretrained"


METHOD = register(MethodSpec("pyramidflow", PyramidFlow, fit, training=PyramidFlowTraining, resolve=resolve,
                             variant=variant))
