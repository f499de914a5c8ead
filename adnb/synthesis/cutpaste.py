"""CutPaste: cut a patch of the image itself and paste it elsewhere (Li et al., CVPR 2021).

- ``cutpaste(mode="normal")``: a rectangle of 2–15 % of the image area, aspect ratio in
  [0.3, 3.3], colour-jittered by 0.1, pasted at a random place.
- ``cutpaste(mode="scar")``: a thin rotated stripe, 2–16 px wide and 10–25 px long, ±45°.
- ``large_cutpaste``: FAIR's global variant — a patch of 80–90 % of the side, cut at a random
  corner (so slicing may truncate it), rotated about its top-left corner by a whole number of
  radians in {−6 … 5} (what rotates out of frame turns black), pasted where it fits; the mask is
  the whole rectangle. It corrupts most of the image, which forces global restoration.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from adnb.synthesis._random import randint, uniform


def _jitter(patch: torch.Tensor, g: torch.Generator | None, amount: float = 0.1) -> torch.Tensor:
    patch = TF.adjust_brightness(patch, float(uniform(g, 1 - amount, 1 + amount)))
    patch = TF.adjust_contrast(patch, float(uniform(g, 1 - amount, 1 + amount)))
    patch = TF.adjust_saturation(patch, float(uniform(g, 1 - amount, 1 + amount)))
    return TF.adjust_hue(patch, float(uniform(g, -amount, amount))).clamp(0, 1)


def _shape(mode: str, h: int, w: int, g: torch.Generator | None) -> torch.Tensor:
    """The patch's footprint as a boolean (ph, pw) array."""
    if mode == "normal":
        area = float(uniform(g, 0.02, 0.15)) * h * w
        aspect = math.exp(float(uniform(g, math.log(0.3), math.log(3.3))))
        ph = max(2, min(h - 1, round(math.sqrt(area * aspect))))
        pw = max(2, min(w - 1, round(math.sqrt(area / aspect))))
        return torch.ones(ph, pw, dtype=torch.bool)
    width, length = float(uniform(g, 2, 16)), float(uniform(g, 10, 25))
    a = math.radians(float(uniform(g, -45, 45)))
    side = math.ceil(math.hypot(width, length)) + 1
    y, x = torch.meshgrid(torch.arange(side) - (side - 1) / 2, torch.arange(side) - (side - 1) / 2, indexing="ij")
    u, v = x * math.cos(a) + y * math.sin(a), -x * math.sin(a) + y * math.cos(a)
    return (u.abs() <= length / 2) & (v.abs() <= width / 2)


def cutpaste(images: torch.Tensor, *, generator: torch.Generator | None = None,
             mode: str = "normal") -> tuple[torch.Tensor, torch.Tensor]:
    """Classic CutPaste (``"normal"``) or CutPaste-Scar (``"scar"``); returns (images, masks)."""
    if mode not in ("normal", "scar"):
        raise ValueError(f"unknown CutPaste mode {mode!r}; valid: 'normal', 'scar'")
    out, masks = images.clone(), torch.zeros_like(images[:, :1])
    _, _, h, w = images.shape
    for i in range(len(images)):
        footprint = _shape(mode, h, w, generator).to(images.device)
        ph, pw = footprint.shape
        sy, sx = randint(generator, 0, h - ph + 1), randint(generator, 0, w - pw + 1)
        dy, dx = randint(generator, 0, h - ph + 1), randint(generator, 0, w - pw + 1)
        patch = _jitter(images[i, :, sy:sy + ph, sx:sx + pw], generator)
        region = out[i, :, dy:dy + ph, dx:dx + pw]
        out[i, :, dy:dy + ph, dx:dx + pw] = torch.where(footprint, patch, region)
        masks[i, 0, dy:dy + ph, dx:dx + pw] = footprint.float()
    return out, masks


def rotate_about_origin(patch: torch.Tensor, radians: float) -> torch.Tensor:
    """Rotate (C, h, w) about its top-left pixel; what leaves the frame is lost, what enters is 0.

    Output pixel p takes the input at R⁻¹p, as ``cv2.warpAffine`` does with a forward matrix.
    """
    _, h, w = patch.shape
    c, s = math.cos(radians), math.sin(radians)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=patch.dtype, device=patch.device),
                            torch.arange(w, dtype=patch.dtype, device=patch.device), indexing="ij")
    src_x, src_y = c * xs + s * ys, -s * xs + c * ys
    grid = torch.stack([2 * src_x / max(w - 1, 1) - 1, 2 * src_y / max(h - 1, 1) - 1], dim=-1)
    return F.grid_sample(patch[None], grid[None], mode="bilinear", padding_mode="zeros", align_corners=True)[0]


def large_cutpaste(images: torch.Tensor, *, generator: torch.Generator | None = None,
                   side: tuple[float, float] = (0.8, 0.9)) -> tuple[torch.Tensor, torch.Tensor]:
    """FAIR's large CutPaste (see the module docstring); returns (images, masks)."""
    out, masks = images.clone(), torch.zeros_like(images[:, :1])
    _, _, h, w = images.shape
    for i in range(len(images)):
        ph, pw = (int(float(uniform(generator, *side)) * h) for _ in range(2))
        ph, pw = ph - ph % 2, pw - pw % 2
        y0, x0 = randint(generator, 0, h), randint(generator, 0, w)
        patch = images[i, :, y0:y0 + ph, x0:x0 + pw]  # slicing truncates patches near the border
        patch = rotate_about_origin(patch, float(randint(generator, -6, 6)))
        _, th, tw = patch.shape
        dy, dx = randint(generator, 0, h - th + 1), randint(generator, 0, w - tw + 1)
        out[i, :, dy:dy + th, dx:dx + tw] = patch
        masks[i, 0, dy:dy + th, dx:dx + tw] = 1
    return out, masks
