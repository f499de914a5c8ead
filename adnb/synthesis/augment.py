"""DRAEM's anomaly-source augmentation: three distinct operations out of ten, in random order.

DRAEM used imgaug; these are the same ten operations done with torchvision (anomalib made the
same move), on float images in [0, 1]:

 1. gamma contrast 0.5–2 per channel      6. posterize to 4 bits
 2. brightness ×0.8–1.2 and ±30/255       7. invert
 3. sharpness 0–2                          8. autocontrast
 4. hue ±50° and saturation ×0.5–1.5       9. equalize
 5. solarize (p 0.5, threshold 32–128)    10. rotate ±45°

FAIR's noDTD loader (``data_loaderbhpfnoDTD.py``), whose anomaly sources are the category's own
images, adds two more to the list and still picks three (``hue_and_dropout=True``):

11. a hue rotation of 0–180° (``hue_rotate``): imgaug's ``WithColorspace("HSV", WithChannels(0,
    Add((0, 90))))`` adds U(0, 90) to OpenCV's 8-bit hue, 2° per unit. The loader reads BGR images
    and converts them as RGB; with red and blue swapped, hue h reads as 240° − h, so adding δ there
    turns the true hue *back* by δ. ``_ops`` does that: −U(0°, 180°). (8-bit hue past 255 is clipped
    by imgaug before wrapping; here it wraps exactly.)
12. ``Dropout2d(p=0.5)`` (``drop_channels``): each colour channel zeroed with probability 0.5,
    at least one kept (imgaug's ``nb_keep_channels=1``).
"""

from __future__ import annotations

from collections.abc import Callable

import math

import kornia
import torch
import torchvision.transforms.v2.functional as TF

from adnb.synthesis._random import chance, uniform


def _as_uint8(op: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def wrapped(x: torch.Tensor) -> torch.Tensor:
        return op((x * 255).round().to(torch.uint8)).float() / 255
    return wrapped


def hue_rotate(images: torch.Tensor, degrees: float | torch.Tensor) -> torch.Tensor:
    """RGB ``images`` (*, 3, H, W) in [0, 1] with their HSV hue turned by ``degrees`` (a float, or one
    angle per image: shape (*)), modulo 360°; saturation and value unchanged."""
    hsv = kornia.color.rgb_to_hsv(images)
    turn = torch.deg2rad(torch.as_tensor(degrees, dtype=hsv.dtype, device=hsv.device))[..., None, None]
    hue = torch.remainder(hsv[..., 0, :, :] + turn, 2 * math.pi)
    return kornia.color.hsv_to_rgb(torch.stack([hue, hsv[..., 1, :, :], hsv[..., 2, :, :]], dim=-3)).clamp(0, 1)


def drop_channels(images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``images`` (*, C, H, W) with the channels where ``keep`` (*, C) is False set to zero."""
    return images * keep.to(images.dtype)[..., None, None]


def dropout2d_keep(n: int, p: float = 0.5, channels: int = 3, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Which channels Dropout2d keeps, (n, channels) bool: each dropped with probability ``p``; where
    all would go, one drawn at random stays (imgaug's ``nb_keep_channels=1``)."""
    keep = torch.rand(n, channels, generator=generator) >= p
    rescue = torch.randint(0, channels, (n,), generator=generator)
    none = ~keep.any(dim=1)
    keep[none, rescue[none]] = True
    return keep


def _ops(g: torch.Generator | None, hue_and_dropout: bool = False) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The ten operations (twelve with FAIR_noDTD's two) with their random parameters drawn now."""
    gamma = uniform(g, 0.5, 2.0, 3, 1, 1)
    mul, add = float(uniform(g, 0.8, 1.2)), float(uniform(g, -30, 30)) / 255
    sharp = float(uniform(g, 0.0, 2.0))
    hue, sat = float(uniform(g, -50, 50)) / 360, float(uniform(g, 0.5, 1.5))
    solarize, level = chance(g, 0.5), float(uniform(g, 32, 128)) / 255
    angle = float(uniform(g, -45, 45))
    ops = [
        lambda x: x.clamp(0, 1) ** gamma.to(x),
        lambda x: (x * mul + add).clamp(0, 1),
        lambda x: TF.adjust_sharpness(x, sharp),
        lambda x: TF.adjust_saturation(TF.adjust_hue(x, hue), sat),
        lambda x: TF.solarize(x, level) if solarize else x,
        _as_uint8(lambda x: TF.posterize(x, 4)),
        TF.invert,
        TF.autocontrast,
        _as_uint8(TF.equalize),
        lambda x: TF.rotate(x, angle, interpolation=TF.InterpolationMode.BILINEAR),
    ]
    if hue_and_dropout:  # drawn after the ten, so DRAEM's own draws stay what they were
        turn, keep = -float(uniform(g, 0, 180)), dropout2d_keep(1, 0.5, generator=g)[0]
        # the official list's order: gamma, hue, Dropout2d, then the other nine
        ops[1:1] = [lambda x: hue_rotate(x, turn), lambda x: drop_channels(x, keep)]
    return ops


def draem_augment(textures: torch.Tensor, *, generator: torch.Generator | None = None, k: int = 3,
                  hue_and_dropout: bool = False) -> torch.Tensor:
    """Apply ``k`` distinct random operations of the ten (twelve with ``hue_and_dropout``, FAIR_noDTD's
    list) to each texture (n, 3, H, W) in [0, 1]."""
    out = []
    for texture in textures:
        ops = _ops(generator, hue_and_dropout)
        x = texture.clamp(0, 1)
        for i in torch.randperm(len(ops), generator=generator)[:k].tolist():
            x = ops[i](x)
        out.append(x.clamp(0, 1))
    return torch.stack(out)
