"""Perlin-noise masks with DRAEM's law: the shapes of most synthetic anomalies in this book.

Gradient noise on a lattice of ``2**a × 2**b`` cells (``a, b ~ U{0..5}`` independently, so blobs
range from image-sized to a few pixels), the quintic fade ``6t⁵ − 15t⁴ + 10t³``, scaled by √2,
rotated by U(−90°, 90°) and thresholded at 0.5. DRAEM keeps an empty mask as a "normal" sample;
here an empty mask is drawn again (up to ``retries`` times), as anomalib does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from adnb.synthesis._random import randint, uniform


def _fade(t: torch.Tensor) -> torch.Tensor:
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def perlin_2d(shape: tuple[int, int], res: tuple[int, int], generator: torch.Generator | None = None) -> torch.Tensor:
    """One Perlin-noise image of ``shape`` on a ``res`` lattice (values in about [−1, 1])."""
    h, w = shape
    ph, pw = math.ceil(h / res[0]) * res[0], math.ceil(w / res[1]) * res[1]  # pad to whole cells, crop later
    angles = 2 * math.pi * torch.rand(res[0] + 1, res[1] + 1, generator=generator)
    grads = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    cy, cx = ph // res[0], pw // res[1]
    ys = (torch.arange(ph) / cy) % 1
    xs = (torch.arange(pw) / cx) % 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = grads[dy:dy + res[0], dx:dx + res[1]].repeat_interleave(cy, 0).repeat_interleave(cx, 1)
        return (gy - dy) * g[..., 0] + (gx - dx) * g[..., 1]

    ty, tx = _fade(gy), _fade(gx)
    top = torch.lerp(corner(0, 0), corner(0, 1), tx)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), tx)
    return (math.sqrt(2) * torch.lerp(top, bottom, ty))[:h, :w]


def perlin_noise(n: int, size: int | tuple[int, int], *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, min_scale: int = 0, max_scale: int = 6) -> torch.Tensor:
    """``n`` noise images (n, 1, H, W), each on a lattice of ``2**U{min..max-1}`` cells per axis."""
    h, w = (size, size) if isinstance(size, int) else size
    noise = [perlin_2d((h, w), (2 ** randint(generator, min_scale, max_scale), 2 ** randint(generator, min_scale, max_scale)),
                       generator) for _ in range(n)]
    return torch.stack(noise)[:, None].to(device or "cpu")


def rotate_each(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image about its centre by its own angle; corners that come in are 0."""
    a = torch.deg2rad(degrees).to(images)
    cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def perlin_mask(n: int, size: int | tuple[int, int], *, generator: torch.Generator | None = None,
                device: torch.device | str | None = None, threshold: float = 0.5, rotate: bool = True,
                retries: int = 10, within: torch.Tensor | None = None) -> torch.Tensor:
    """Binary Perlin masks (n, 1, H, W) in {0, 1}; empty ones (or empty inside ``within``) are redrawn."""
    masks = torch.zeros(n, 1, *((size, size) if isinstance(size, int) else size))
    todo = torch.arange(n)
    for _ in range(retries + 1):
        noise = perlin_noise(len(todo), masks.shape[-2:], generator=generator)
        if rotate:
            noise = rotate_each(noise, uniform(generator, -90, 90, len(todo)))
        drawn = (noise > threshold).float()
        if within is not None:
            drawn = drawn * within[todo].cpu()
        masks[todo] = drawn
        todo = todo[drawn.flatten(1).amax(1) == 0]
        if len(todo) == 0:
            break
    return masks.to(device or "cpu")
