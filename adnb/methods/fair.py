"""FAIR: Frequency-aware Image Restoration (Liu et al., 2023, arXiv 2309.07068).

A reconstruction model fails in two ways: it blurs fine normal detail (degradation errors, high
frequencies) and it copies anomalies through (generalisation errors, any frequency). FAIR gives a
UNet only the **high-frequency part** of a grey image and asks it for the full colour image.
Normal detail is in the input, so it comes back sharp; the low frequencies (most of the energy:
brightness, colour, large shapes) must be *restored* from what normal images look like, so an
anomaly's low-frequency content is not copied through.

1. **Corrupt** (training only): 30 % of the normal images are first rotated by U(−90°, 90°)
   (input and target alike, DRAEM's heritage); then 50 % stay clean, 25 % get a Perlin-shaped
   texture patch (DRAEM), 25 % a large CutPaste covering most of the image. The target is the
   clean image; the masks are not used.
2. **High-pass**: grey level → 2nd-order Butterworth high-pass, D0 = 30 (``adnb.frequency``).
3. **Restore**: the UNet of ``RestorationUNet``; loss ``L2 + (1 − SSIM)`` (11×11 Gaussian window).
4. **Score**: ``A = mean21×21( 1 − MSGMS(I, Î) + k·[(a − â)² + (b − b̂)²] )``, CIELAB a/b, k = 3e-4;
   the image score is ``max A``.

Precision (``config.precision``): the UNet runs in bf16 (or fp16) under autocast when asked, all
but its first convolution; the high-pass before it, the loss after it and the anomaly score stay
fp32 (each says why where it does).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import kornia
import torch
import torch.nn.functional as F
from torch import nn

from adnb.frequency import EXTRACTORS, high_frequency, input_channels
from adnb.methods.base import Detector, Prediction
from adnb.methods.registry import MethodSpec, register
from adnb.runtime.cache import CacheEntry, GeneratorState
from adnb.runtime.errors import AdnbError
from adnb.runtime.precision import (PRECISIONS, at_least_fp32, autocast, full_precision, grad_scaler,
                                    optimiser_step)
from adnb.runtime.seed import seeded
from adnb.runtime.training import Training
from adnb.synthesis import TextureSource, large_cutpaste, perlin_anomalies
from adnb.synthesis.perlin import rotate_each


@dataclass(frozen=True)
class FairConfig:
    image_size: int = 256  # side of the square images (the paper: 256)
    width: int = 128  # base width c of the UNet (the paper: 128; 64 and 32 in its Table 5)
    extractor: str = "bhpf"  # ihpf | ghpf | bhpf | sobel_x3 | sobel_xy3 | sobel_x5 | sobel_xy5
    d0: float = 30.0  # cutoff frequency, in cycles per image (pixels of the spectrum)
    order: int = 2  # Butterworth order n
    epochs: int = 800  # the paper: 800 (MVTec AD), 400 (VisA)
    batch_size: int = 8
    lr: float = 1e-4  # Adam; ×0.2 at 80 % and 90 % of the epochs
    texture_dir: str = ""  # folder of anomaly-source textures (DTD); "" = the category's own images (noDTD)
    rotate_prob: float = 0.3  # share of training images rotated by U(−90°, 90°) before corruption
    color_weight: float = 3e-4  # k of the CIELAB term
    smoothing: int = 21  # side of the mean filter on the anomaly map
    lab_from_bgr: bool = False  # True replicates the official code, which feeds BGR images to an RGB→Lab conversion
    recalibrate_bn: bool = False  # after training, recompute BatchNorm statistics with the final weights (not official)
    seed: int = 0
    precision: str = "fp32"  # the UNet's arithmetic: fp32 | bf16 | fp16 | auto (bf16 where the hardware has it)


# --- 1. Corruption ---------------------------------------------------------------------------

CLEAN, PERLIN, CUTPASTE = 0, 1, 2
CORRUPTIONS = ("clean", "perlin", "cutpaste")


class Corrupted(NamedTuple):
    targets: torch.Tensor  # (B, 3, H, W) the clean images (after the rotation pre-step): what to restore
    inputs: torch.Tensor  # (B, 3, H, W) the corrupted images, before the high-pass
    masks: torch.Tensor  # (B, 1, H, W) where a synthetic anomaly was put (shown, never trained on)
    kinds: torch.Tensor  # (B,) CLEAN, PERLIN or CUTPASTE


def corrupt(images: torch.Tensor, textures: TextureSource, *, rotate_prob: float = 0.3,
            generator: torch.Generator | None = None) -> Corrupted:
    """FAIR's training corruption of a batch (official ``data_loaderbhpf``), batched per kind.

    With probability ``rotate_prob`` an image is rotated first (the target too). Then a fair coin
    picks the branch (large CutPaste or Perlin texture) and a second coin leaves half of each
    branch clean: 50 % clean, 25 % Perlin, 25 % CutPaste.
    """
    n = len(images)
    targets = images
    rotate = torch.rand(n, generator=generator) < rotate_prob
    if rotate.any():
        angles = torch.rand(int(rotate.sum()), generator=generator) * 180 - 90
        targets = images.clone()
        targets[rotate.to(images.device)] = rotate_each(images[rotate.to(images.device)], angles)
    cutpaste_branch = torch.rand(n, generator=generator) < 0.5
    corrupted = torch.rand(n, generator=generator) < 0.5
    kinds = torch.where(corrupted, torch.where(cutpaste_branch, CUTPASTE, PERLIN), CLEAN)
    inputs, masks = targets.clone(), torch.zeros_like(targets[:, :1])
    for kind in (PERLIN, CUTPASTE):
        pick = (kinds == kind).to(images.device)
        if pick.any():
            if kind == PERLIN:
                inputs[pick], masks[pick] = perlin_anomalies(targets[pick], textures, generator=generator)
            else:
                inputs[pick], masks[pick] = large_cutpaste(targets[pick], generator=generator)
    return Corrupted(targets, inputs, masks, kinds)


def texture_source(config: FairConfig, images: torch.Tensor) -> TextureSource:
    """DTD-like textures from ``config.texture_dir``, else the training images themselves with the
    noDTD loader's two extra augmenters, hue rotation and channel dropout (FAIR_noDTD)."""
    if config.texture_dir:
        return TextureSource.from_folder(config.texture_dir, config.image_size)
    return TextureSource.from_images(images, hue_and_dropout=True)


# --- 3. The restoration network --------------------------------------------------------------

def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class RestorationUNet(nn.Module):
    """DRAEM's reconstructive sub-network with additive skips, as FAIR's code builds it.

    Encoder: five blocks [conv3×3 → BN → ReLU]×2 of widths c, 2c, 4c, 8c, 8c, max-pooled by 2
    between them. Decoder: four stages of bilinear ×2 upsampling → conv → BN → ReLU, **plus** the
    encoder feature of that resolution, then [conv → BN → ReLU]×2 halving the width
    (8c→4c→2c→c→c). A last 3×3 conv gives 3 channels, no activation.
    69.05 M parameters at c = 128, 4.32 M at c = 32.
    """

    def __init__(self, in_channels: int = 1, width: int = 128, out_channels: int = 3):
        super().__init__()
        c = width
        widths = (c, 2 * c, 4 * c, 8 * c, 8 * c)
        self.encoder = nn.ModuleList()
        for c_in, c_out in zip((in_channels, *widths[:-1]), widths):
            self.encoder.append(nn.Sequential(*_conv_bn_relu(c_in, c_out), *_conv_bn_relu(c_out, c_out)))
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for c_in, c_out in ((8 * c, 4 * c), (4 * c, 2 * c), (2 * c, c), (c, c)):
            self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                                         *_conv_bn_relu(c_in, c_in)))
            self.decoder.append(nn.Sequential(*_conv_bn_relu(c_in, c_in), *_conv_bn_relu(c_in, c_out)))
        self.head = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The first conv → BN → ReLU stays fp32 under autocast: the convolution's response to the
        # high-pass input is about 1 % of its bias, bf16 (3 digits) rounds much of it away, and the
        # BatchNorm after it, which removes the bias and divides by that small spread, magnifies the
        # rounding into noise (measured on bottle: 0.7 AUPRO points). It is 0.2 % of the multiply-adds.
        with full_precision(x.device):
            x = self.encoder[0][:3](at_least_fp32(x))
        skips = []
        for i, block in enumerate(self.encoder):
            x = block[3:](x) if i == 0 else block(F.max_pool2d(x, 2))
            skips.append(x)
        for up, block, skip in zip(self.up, self.decoder, reversed(skips[:-1])):
            x = block(up(x) + skip)
        return self.head(x)

    @torch.no_grad()
    def initialise(self, generator: torch.Generator | None = None) -> RestorationUNet:
        """The official initialisation: conv weights N(0, 0.02), BN weights N(1, 0.02) and biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0.0, 0.02, generator=generator)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.02, generator=generator)
                m.bias.zero_()
        return self


def restoration_loss(restored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``L = ‖Î − I‖²_mean + (1 − mean SSIM(Î, I))``, SSIM with an 11×11 Gaussian window (σ = 1.5)."""
    return F.mse_loss(restored, target) + 1 - kornia.metrics.ssim(restored, target, 11, max_val=1.0).mean()


# --- 4. The anomaly evaluation function ------------------------------------------------------

def _prewitt(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    kx = torch.tensor([[1.0, 0.0, -1.0]] * 3) / 3
    return torch.stack([kx, kx.t()])[:, None].to(device, dtype)  # (2, 1, 3, 3)


def gradient_magnitude(images: torch.Tensor) -> torch.Tensor:
    """``g = sqrt(g_x² + g_y² + 1e-12)`` per channel, Prewitt kernels / 3, zero padding (RIAD's MSGMS)."""
    b, c, h, w = images.shape
    g = F.conv2d(images.reshape(b * c, 1, h, w), _prewitt(images.device, images.dtype), padding=1)
    return torch.sqrt((g ** 2).sum(dim=1) + 1e-12).view(b, c, h, w)


def msgms(a: torch.Tensor, b: torch.Tensor, scales: int = 2, c: float = 0.0026) -> torch.Tensor:
    """Multi-scale gradient magnitude similarity, averaged over scales and channels (B, 1, H, W).

    ``GMS = (2 g_a g_b + c) / (g_a² + g_b² + c)`` at each level of a 2×2 average-pool pyramid,
    upsampled bilinearly to full size. 1 where the gradients agree, towards 0 where they differ.
    """
    h, w = a.shape[-2:]
    pair = torch.cat([a, b])  # both images through each pooling and gradient convolution at once
    total = torch.zeros_like(a)
    for scale in range(scales):
        if scale:
            pair = F.avg_pool2d(pair, 2)
        ga, gb = gradient_magnitude(pair).chunk(2)
        gms = (2 * ga * gb + c) / (ga ** 2 + gb ** 2 + c + 1e-12)
        total = total + (F.interpolate(gms, size=(h, w), mode="bilinear", align_corners=False) if scale else gms)
    return (total / scales).mean(dim=1, keepdim=True)


def color_difference(a: torch.Tensor, b: torch.Tensor, *, from_bgr: bool = False) -> torch.Tensor:
    """``(a_a − a_b)² + (b_a − b_b)²`` in CIELAB (lightness ignored), (B, 1, H, W).

    ``from_bgr`` flips the channels before the RGB→Lab conversion, which is what the official
    code computes (its tensors are OpenCV's BGR); the default converts the true colours.
    """
    if from_bgr:
        a, b = a.flip(1), b.flip(1)
    diff = kornia.color.rgb_to_lab(a)[:, 1:] - kornia.color.rgb_to_lab(b)[:, 1:]
    return (diff ** 2).sum(dim=1, keepdim=True)


def mean_filter(maps: torch.Tensor, size: int) -> torch.Tensor:
    """``size × size`` mean with zero padding (the official conv2d with a ones/size² kernel).

    The box is separable, ``mean_{size×size} = mean_{size×1} ∘ mean_{1×size}`` (zero padding
    included): 2·size additions per pixel instead of size².
    """
    if size <= 1:
        return maps
    pad = size // 2
    rows = F.avg_pool2d(maps, (1, size), stride=1, padding=(0, pad), count_include_pad=True)
    return F.avg_pool2d(rows, (size, 1), stride=1, padding=(pad, 0), count_include_pad=True)


def anomaly_map(images: torch.Tensor, restored: torch.Tensor, *, color_weight: float = 3e-4, smoothing: int = 21,
                from_bgr: bool = False) -> torch.Tensor:
    """FAIR's pixel score ``mean_filter(1 − MSGMS + k · ΔLab_ab²)``, (B, 1, H, W)."""
    score = 1 - msgms(restored, images) + color_weight * color_difference(images, restored, from_bgr=from_bgr)
    return mean_filter(score, smoothing)


# --- The detector ----------------------------------------------------------------------------

class FAIR(Detector):
    method = "fair"
    config_class = FairConfig

    def __init__(self, config: FairConfig):
        if config.extractor not in EXTRACTORS:
            raise AdnbError(f"unknown extractor {config.extractor!r}; valid: {', '.join(EXTRACTORS)}")
        if config.image_size % 16:
            raise AdnbError(f"image_size must be a multiple of 16 for the UNet's four poolings (got {config.image_size})")
        super().__init__(config)
        if config.precision not in PRECISIONS:
            raise AdnbError(f"unknown precision {config.precision!r}; valid: {', '.join(PRECISIONS)}")
        # Channels-last (NHWC) weights and activations are the layout of oneDNN's and cuDNN's fastest
        # convolutions: about 1.5× faster training in fp32 on a CPU, and what makes bf16 pay off.
        self.unet = RestorationUNet(input_channels(config.extractor), config.width).to(memory_format=torch.channels_last)

    def high_frequency(self, images: torch.Tensor) -> torch.Tensor:
        """The network input for RGB ``images`` in [0, 1]: the configured extractor on their grey level."""
        return high_frequency(images, self.config.extractor, self.config.d0, self.config.order)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The restored colour image (fp32, B×3×S×S) of each image in ``images``.

        Only the UNet runs at ``self.precision``: the high-pass stays fp32 (``adnb.frequency``), and
        the restoration comes back as fp32 for the loss and the score, whose differences of nearly
        equal numbers (SSIM's variances, MSGMS's gradient ratios) bf16's 3 digits would swamp.
        """
        x = self.high_frequency(images).contiguous(memory_format=torch.channels_last)
        with autocast(self.precision, images.device):
            restored = self.unet(x)
        return restored.to(torch.float32, memory_format=torch.contiguous_format)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> Prediction:
        maps = anomaly_map(images, self(images), color_weight=self.config.color_weight,
                           smoothing=self.config.smoothing, from_bgr=self.config.lab_from_bgr)[:, 0]
        return Prediction(maps.flatten(1).amax(dim=1), maps)


# --- Training --------------------------------------------------------------------------------

@torch.no_grad()
def recalibrate_batchnorm(detector: FAIR, data: torch.Tensor, textures: TextureSource, *, steps: int,
                          generator: torch.Generator | None = None) -> None:
    """Replace BatchNorm's running statistics by exact averages over ``steps`` training batches.

    Training keeps exponential averages (momentum 0.1) of statistics computed with weights that
    were still moving; after a short run at a high learning rate they can be far from what the
    final weights produce, and evaluation (which uses them) suffers. This pass re-estimates them
    with the final weights on batches drawn and corrupted as in training ("precise BN").
    """
    norms = [m for m in detector.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # None = cumulative average
    detector.train()
    for _ in range(steps):
        batch = data[torch.randint(len(data), (detector.config.batch_size,), generator=generator).to(data.device)]
        batch = batch.float().div_(255) if batch.dtype == torch.uint8 else batch
        detector(corrupt(batch, textures, rotate_prob=detector.config.rotate_prob, generator=generator).inputs)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    detector.eval()


def training_loss(detector: FAIR, batch: torch.Tensor, textures: TextureSource, *,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """FAIR's loss on one batch (float in [0, 1]): corrupt it, restore it, compare with the clean images."""
    sample = corrupt(batch, textures, rotate_prob=detector.config.rotate_prob, generator=generator)
    return restoration_loss(detector(sample.inputs), sample.targets)


def optimiser(detector: FAIR) -> torch.optim.Adam:
    """Adam at ``config.lr``, fused into one kernel per step where PyTorch has one (CPU, CUDA)."""
    return torch.optim.Adam(detector.parameters(), lr=detector.config.lr,
                            fused=detector.device.type in ("cpu", "cuda") or None)


def milestones(epochs: int) -> list[int]:
    """Epochs after which the learning rate is multiplied by 0.2: 80 % and 90 % of the run."""
    return [int(0.8 * epochs), int(0.9 * epochs)]


class FairTraining(Training):
    """FAIR's training as ``fit`` runs it and ``adnb bench`` times it (``adnb.runtime.training``).

    Set-up: the UNet initialised as the official code does, from one generator seeded with
    ``config.seed`` that then draws everything random of the training; the corruption's textures;
    Adam with its step decay. An epoch is ⌈N / batch⌉ steps of ``batch_size`` images drawn at random
    with replacement (the official loader ignores its index and draws too).
    """

    what = "corrupt, restore, L2 + (1 - SSIM); Adam"

    def __init__(self, config: FairConfig, images: torch.Tensor, *, device: torch.device | str = "cpu"):
        if images.shape[-1] != config.image_size or images.shape[-2] != config.image_size:
            raise AdnbError(f"training images are {tuple(images.shape[-2:])} but image_size is {config.image_size}; "
                            "load them with category.load('train', config.image_size)")
        device = torch.device(device)
        self.generator = torch.Generator().manual_seed(config.seed)
        with seeded(config.seed):  # what initialise leaves (the convolutions' biases) is drawn from the seed too
            self.detector = FAIR(config)
        self.detector.unet.initialise(self.generator)
        self.textures = texture_source(config, images)
        self.images = images.to(device)
        self.n_images = len(images)
        self.detector.to(device).train()
        self.optimiser = optimiser(self.detector)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimiser, milestones(config.epochs), gamma=0.2)
        self.scaler = grad_scaler(self.detector.precision, device)
        self.steps = math.ceil(self.n_images / config.batch_size)

    def batches(self, epoch: int) -> Iterator[torch.Tensor]:
        for _ in range(self.steps):  # drawn one at a time: the corruption of each batch draws in between
            yield torch.randint(self.n_images, (self.detector.config.batch_size,),
                                generator=self.generator).to(self.images.device)

    def step(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = self.images[idx]
        batch = batch.float().div_(255) if batch.dtype == torch.uint8 else batch
        loss = training_loss(self.detector, batch, self.textures, generator=self.generator)
        optimiser_step(loss, self.optimiser, self.scaler)
        return {"loss": loss.detach()}

    def epoch(self, epoch: int) -> dict[str, float]:
        logs = super().epoch(epoch)
        self.scheduler.step()
        return logs

    def state(self) -> dict[str, Any]:
        return {"unet": self.detector.unet, "optimiser": self.optimiser, "scheduler": self.scheduler,
                "generator": GeneratorState(self.generator)}

    def finish(self) -> None:
        if self.detector.config.recalibrate_bn:
            recalibrate_batchnorm(self.detector, self.images, self.textures, steps=self.steps,
                                  generator=self.generator)


def fit(config: FairConfig, images: torch.Tensor, *, device: torch.device | str = "cpu",
        cache: CacheEntry | None = None, force_train: bool = False) -> FAIR:
    """Train FAIR on normal ``images`` (N×3×S×S, uint8 or float in [0, 1]) — or load it from ``cache``."""
    restored = FAIR.from_cache(config, cache, force_train)
    if restored is not None:
        return restored.to(device).eval()
    training = FairTraining(config, images, device=device)
    history, seconds = training.run_and_finish(config.epochs, cache, desc=f"FAIR c={config.width}")
    steps = training.steps * config.epochs
    detector = training.detector
    detector.store(cache, seconds, weights={"all": "trained-here"}, textures=training.textures.kind,
                   precision=detector.precision, steps=steps, seconds_per_step=seconds / max(1, steps), history=history)
    return detector.eval()


METHOD = register(MethodSpec("fair", FAIR, fit, training=FairTraining))
