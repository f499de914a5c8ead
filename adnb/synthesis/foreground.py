"""Foreground masks: where on an object a synthetic anomaly may go (RealNet's SIA).

A Perlin mask placed on the background of an object category teaches a detector nothing about
the object. RealNet's official code multiplies it by a per-category foreground mask: the grey
image thresholded (Otsu's or the triangle method, OpenCV's threshold value 100), the object on the
dark or the bright side of it, then a morphological closing and opening with a square kernel.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from adnb.runtime.errors import AdnbError

FOREGROUND_RULES = ("all", "otsu_dark", "otsu_bright", "triangle_bright")
# The official per-category rules for MVTec AD; any other category uses the whole image (the
# maintainers' advice for custom data, cnulab/RealNet issue #8). Of the embedded objects, the washer
# is bright on dark; the capsule's cream half is as bright as its background, so it keeps "all".
MVTEC_FOREGROUND = {
    "pill": "otsu_bright", "hazelnut": "triangle_bright", "metal_nut": "triangle_bright",
    "toothbrush": "triangle_bright", "bottle": "otsu_dark", "capsule": "otsu_dark", "grid": "otsu_dark",
    "screw": "otsu_dark", "zipper": "otsu_dark",
}
EMBEDDED_FOREGROUND = {"washer": "otsu_bright"}


def foreground_rule(dataset: str, category: str) -> str:
    """The foreground rule for ``category`` of ``dataset`` (``"all"`` when there is none)."""
    table = EMBEDDED_FOREGROUND if dataset == "embedded" else MVTEC_FOREGROUND
    return table.get(category, "all")


def foreground_masks(images: torch.Tensor, rule: str, kernel: int = 6) -> torch.Tensor:
    """(B, 1, H, W) float masks of the object in ``images`` (B×3×H×W in [0, 1]).

    Threshold the grey image with ``rule``, then close and open with a square of side ≈
    ``kernel``·H/256, made odd: the official configs use sides of 3, 6, 8 or 15 pixels at 256²
    depending on the category; an odd side keeps OpenCV's morphology from shifting the mask by a pixel.
    """
    if rule not in FOREGROUND_RULES:
        raise AdnbError(f"unknown foreground rule {rule!r}; valid: {', '.join(FOREGROUND_RULES)}")
    b, _, h, w = images.shape
    if rule == "all":
        return torch.ones(b, 1, h, w, device=images.device)
    method = cv2.THRESH_TRIANGLE if rule.startswith("triangle") else cv2.THRESH_OTSU
    side = 2 * round(kernel * h / 512) + 1
    element = np.ones((side, side), np.uint8)
    grey = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for image in grey:
        _, above = cv2.threshold(cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY), 100, 1,
                                 cv2.THRESH_BINARY | method)
        mask = above if rule.endswith("bright") else 1 - above
        mask = cv2.morphologyEx(cv2.morphologyEx(mask, cv2.MORPH_CLOSE, element), cv2.MORPH_OPEN, element)
        out.append(torch.from_numpy(mask.astype(np.float32)))
    return torch.stack(out)[:, None].to(images.device)
