"""DRAEM's anomaly-source augmentation: three distinct operations out of ten, in random order.

DRAEM used imgaug; these are the same ten operations done with torchvision (anomalib made the
same move), on float images in [0, 1]:

 1. gamma contrast 0.5–2 per channel      6. posterize to 4 bits
 2. brightness ×0.8–1.2 and ±30/255       7. invert
 3. sharpness 0–2                          8. autocontrast
 4. hue ±50° and saturation ×0.5–1.5       9. equalize
 5. solarize (p 0.5, threshold 32–128)    10. rotate ±45°
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision.transforms.v2.functional as TF

from adnb.synthesis._random import chance, uniform


def _as_uint8(op: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def wrapped(x: torch.Tensor) -> torch.Tensor:
        return op((x * 255).round().to(torch.uint8)).float() / 255
    return wrapped


def _ops(g: torch.Generator | None) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The ten operations with their random parameters drawn now."""
    gamma = uniform(g, 0.5, 2.0, 3, 1, 1)
    mul, add = float(uniform(g, 0.8, 1.2)), float(uniform(g, -30, 30)) / 255
    sharp = float(uniform(g, 0.0, 2.0))
    hue, sat = float(uniform(g, -50, 50)) / 360, float(uniform(g, 0.5, 1.5))
    solarize, level = chance(g, 0.5), float(uniform(g, 32, 128)) / 255
    angle = float(uniform(g, -45, 45))
    return [
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


def draem_augment(textures: torch.Tensor, *, generator: torch.Generator | None = None, k: int = 3) -> torch.Tensor:
    """Apply ``k`` distinct random operations of the ten to each texture (n, 3, H, W) in [0, 1]."""
    out = []
    for texture in textures:
        ops = _ops(generator)
        x = texture.clamp(0, 1)
        for i in torch.randperm(len(ops), generator=generator)[:k].tolist():
            x = ops[i](x)
        out.append(x.clamp(0, 1))
    return torch.stack(out)
