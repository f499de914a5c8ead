"""Blending a texture into an image through a mask: DRAEM's synthetic anomalies (and RealNet's SIA).

    I' = (1 − M)·I + M·(α·A + (1 − α)·I)

with M the mask, A the anomaly-source texture and α its opacity. DRAEM and FAIR draw
β ~ U(0, 0.8) and use texture opacity 1 − β ∈ (0.2, 1]; RealNet blends SDAS images with
δ ~ U(0.5, 1).
"""

from __future__ import annotations

import torch

from adnb.synthesis._random import uniform
from adnb.synthesis.perlin import perlin_mask
from adnb.synthesis.textures import TextureSource


def blend(images: torch.Tensor, textures: torch.Tensor, masks: torch.Tensor, opacity: float | torch.Tensor) -> torch.Tensor:
    """``(1 − M)·I + M·(α·A + (1 − α)·I)``; ``opacity`` is a float or (n, 1, 1, 1)."""
    alpha = torch.as_tensor(opacity, dtype=images.dtype, device=images.device)
    return images + masks * alpha * (textures - images)


def perlin_anomalies(images: torch.Tensor, source: TextureSource, *, opacity: tuple[float, float] = (0.2, 1.0),
                     generator: torch.Generator | None = None, foreground: torch.Tensor | None = None,
                     augment: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """DRAEM's recipe on a batch: Perlin masks (inside ``foreground`` if given), textures, α ~ U(opacity)."""
    n, _, h, w = images.shape
    masks = perlin_mask(n, (h, w), generator=generator, within=foreground).to(images)
    textures = source.sample(n, size=(h, w), generator=generator, augment=augment).to(images)
    alpha = uniform(generator, *opacity, n, 1, 1, 1).to(images)
    return blend(images, textures, masks, alpha), masks
