"""SDAS (RealNet's strength-controllable diffusion anomaly synthesis): the model, its training, its samples.

A class-conditional IDDPM (one class per category) is trained on the normal images of a dataset
with the hybrid loss of ``adnb.diffusion.iddpm``; sampled with its reverse variance inflated by an
anomaly strength s it draws images that are almost, but not quite, normal: s = 0 gives
normal-looking images, s ∈ [0.1, 0.2] realistic anomalies. RealNet blends them into normal images
(SIA, ``adnb.methods.realnet``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch import nn

from adnb.diffusion.iddpm import VARIANTS, hybrid_loss, sdas_sample
from adnb.diffusion.schedule import linear_schedule, q_sample
from adnb.runtime.cache import CacheEntry, GeneratorState, cached_training, train_loop
from adnb.runtime.errors import AdnbError
from adnb.runtime.seed import generator as seeded_generator, seeded


@dataclass(frozen=True)
class SDASConfig:
    """The SDAS diffusion model and its sampler. Defaults: the official ADM-sized model at 256²."""

    image_size: int = 256
    channels: tuple[int, ...] = (256, 256, 512, 512, 1024, 1024)  # ADM: 256 × (1, 1, 2, 2, 4, 4)
    attention: tuple[bool, ...] = (False, False, False, True, True, True)  # at 32², 16², 8² for 256² input
    layers_per_block: int = 2
    head_dim: int = 64
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_steps: int = 1000
    gamma: float = 0.001  # L_hybrid = L_simple + γ·L_vlb (γ·T weighs the one sampled term)
    epochs: int = 240
    batch_size: int = 16
    lr: float = 1e-4
    grad_clip: float = 1.0
    ema: float = 0.9999  # 0 = sample from the raw weights
    sample_steps: int = 20
    strength: tuple[float, float] = (0.1, 0.2)  # s ~ U(strength), once per sampling batch
    variant: str = "iddpm"  # iddpm (official code) | ddim (supplement Algorithm S1)
    sample_batch: int = 16
    seed: int = 0


class SDAS(nn.Module):
    """ε_θ and u (the variance interpolation) from a diffusers UNet with 2×3 output channels."""

    def __init__(self, config: SDASConfig, n_classes: int):
        super().__init__()
        if len(config.channels) != len(config.attention):
            raise AdnbError("SDASConfig.channels and .attention need one entry per resolution level")
        if config.variant not in VARIANTS:
            raise AdnbError(f"unknown SDAS sampler {config.variant!r}; valid: {', '.join(VARIANTS)}")
        self.config, self.n_classes = config, n_classes
        self.schedule = linear_schedule(config.beta_start, config.beta_end, config.num_steps)
        self.unet = UNet2DModel(
            sample_size=config.image_size, in_channels=3, out_channels=6, block_out_channels=config.channels,
            layers_per_block=config.layers_per_block, attention_head_dim=min(config.head_dim, *config.channels),
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in config.attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention)),
            num_class_embeds=n_classes, resnet_time_scale_shift="scale_shift",
            norm_num_groups=min(32, *config.channels))
        self.train_seconds = 0.0
        self.history: list[dict[str, float]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, class_labels=labels).sample

    @torch.no_grad()
    def sample(self, n: int, label: int, *, strength: float = 0.0, variant: str | None = None,
               steps: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images of class ``label`` in [0, 1] drawn with anomaly strength ``strength``."""
        device = next(self.parameters()).device
        labels = torch.full((n,), label, device=device, dtype=torch.long)
        x = sdas_sample(lambda x_t, t: self(x_t, t, labels), (n, 3, self.config.image_size, self.config.image_size),
                        self.schedule, steps=steps or self.config.sample_steps, strength=strength,
                        variant=variant or self.config.variant, generator=generator, device=device)
        return (x + 1) / 2


def fit_sdas(config: SDASConfig, images: Sequence[torch.Tensor], *, device: torch.device | str = "cpu",
             cache: CacheEntry | None = None, force_train: bool = False) -> SDAS:
    """Train one SDAS model on ``images[k]`` (uint8 or [0, 1] float, N_k×3×S×S), class k for each k.

    The hybrid IDDPM loss, Adam, gradient clipping and (optionally) an EMA of the weights, as in the
    official ``train_diffusion.py``; images are resized to ``config.image_size`` and mapped to [−1, 1].
    """
    with seeded(config.seed):
        model = SDAS(config, len(images))
    model.to(device)

    def train(checkpoint: CacheEntry | None) -> dict[str, object]:
        x = torch.cat([as_float(batch, config.image_size) for batch in images]).mul(2).sub(1).to(device)
        y = torch.cat([torch.full((len(batch),), k) for k, batch in enumerate(images)]).to(device)
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.999))
        generator = seeded_generator(config.seed)
        state: dict = {"model": model, "optimizer": optimizer, "generator": GeneratorState(generator)}
        ema = None
        if config.ema > 0:
            ema = torch.optim.swa_utils.AveragedModel(
                model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.ema))
            state["ema"] = ema

        def run_epoch(_: int) -> dict[str, float]:
            totals = torch.zeros(3)
            for idx in torch.randperm(len(x), generator=generator).split(config.batch_size):
                x0 = x[idx.to(device)]
                t = torch.randint(0, config.num_steps, (len(idx),), generator=generator).to(device)
                noise = torch.randn(x0.shape, generator=generator).to(device)
                x_t = q_sample(model.schedule, x0, t, noise)
                terms = hybrid_loss(model.schedule, model(x_t, t, y[idx.to(device)]), x0, x_t, t, noise, config.gamma)
                optimizer.zero_grad(set_to_none=True)
                terms["loss"].backward()
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                if ema is not None:
                    ema.update_parameters(model)
                totals += torch.tensor([float(terms[k].detach()) for k in ("loss", "simple", "vlb")]) * len(idx)
            return dict(zip(("loss", "simple", "vlb"), (totals / len(x)).tolist()))

        history = train_loop(config.epochs, run_epoch, state, checkpoint=checkpoint, desc="SDAS")
        if ema is not None:
            model.load_state_dict(ema.module.state_dict())
        return {"history": history}

    info = cached_training(cache, model, train, force_train)
    model.train_seconds, model.history = float(info["train_seconds"]), list(info.get("history", []))
    return model.eval()


def sdas_images(model: SDAS, n_per_class: int, *, cache: CacheEntry | None = None,
                force: bool = False) -> tuple[torch.Tensor, float]:
    """``n_per_class`` SDAS anomalies per class, uint8 (K, n, 3, S, S), and the seconds sampling took.

    s ~ U(config.strength) is drawn once per batch of ``config.sample_batch`` (the official sampler's
    habit); the result is cached, since it is the expensive, reusable part of SIA.
    """
    if cache is not None and force:
        cache.clear()
    if cache is not None and cache.exists():
        state, sidecar = cache.load()
        return state["images"], float(sidecar["info"]["sample_seconds"])
    cfg = model.config
    generator = seeded_generator(cfg.seed)
    start, out = time.perf_counter(), []
    for label in range(model.n_classes):
        chunks = []
        for first in range(0, n_per_class, cfg.sample_batch):
            s = float(torch.empty(()).uniform_(*cfg.strength, generator=generator))
            chunk = model.sample(min(cfg.sample_batch, n_per_class - first), label, strength=s, generator=generator)
            chunks.append(chunk.mul(255).round().to(torch.uint8).cpu())
        out.append(torch.cat(chunks))
    images, seconds = torch.stack(out), time.perf_counter() - start
    if cache is not None:
        cache.save({"images": images}, {"info": {"sample_seconds": seconds}})
    return images, seconds


def as_float(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 or [0, 1] float images as float at ``size``² (area-like antialiased resizing)."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    return x
