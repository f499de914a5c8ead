"""Fitting an image of any shape into a model's square input, and its anomaly map back out.

Every model sees ``S×S`` images. An image of another shape is *framed* one of three ways:

- ``squash`` — resize to ``S×S``, ignoring the aspect ratio (what the book does by default). A
  500×1250 strip is compressed 2.5× more along its length than across it, so a thin defect that
  runs across the strip shrinks to a fraction of a pixel and fades out of the map.
- ``letterbox`` — resize so the *long* side is ``S``, centre it on an ``S×S`` black canvas. The
  aspect ratio is kept; the map is cropped back to the content box. Small defects shrink with the
  long side, and the model must have seen the black bars in training (train with ``letterbox`` too).
- ``tile`` — resize so the *short* side is ``S``, cut the result along its long side into
  ``S×S`` tiles overlapping by at least ``overlap`` of a tile, score each tile and stitch the
  tile maps back (the average where tiles overlap) into one map of the whole image. Nothing is
  compressed more than the short side is; a square image gives one tile, the same as ``squash``.

All three are described by one ``Framing``: the image is resized to a *work* size and the model
inputs are ``S×S`` windows on it (for ``letterbox`` one window that reaches past the image, the
overhang padded black). Stitching places each window's map back on the work canvas, averages
overlaps, and resizes bilinearly to the image's own ``H×W``.

The image score of a framed image is the largest of its windows' scores,
``score = max_k score_k`` (one window for ``squash``/``letterbox``: the model's own score). The
maximum keeps a defect that lies in one tile as visible as it would be in a single crop; an
average would dilute it by the number of tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from adnb.data.images import resize_mask_to, resize_to
from adnb.runtime.errors import AdnbError

RESIZE_MODES = ("squash", "letterbox", "tile")
TILE_OVERLAP = 0.25  # the least share of a tile its neighbour also covers: a defect on a seam is seen whole once


def check_mode(mode: str) -> str:
    """``mode`` if it is a known resize mode; a clear error otherwise."""
    if mode not in RESIZE_MODES:
        raise AdnbError(f"unknown resize mode {mode!r}; valid: {', '.join(RESIZE_MODES)}")
    return mode


@dataclass(frozen=True)
class Framing:
    """How one ``height×width`` image becomes ``len(windows)`` model inputs of ``size×size``.

    ``work`` is the (height, width) the image is resized to; each window is the (top, left)
    corner of an ``size×size`` crop of that work image (pixels outside it are padding).
    """

    mode: str
    size: int
    height: int
    width: int
    work: tuple[int, int]
    windows: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return len(self.windows)


def tile_offsets(length: int, size: int, overlap: float = TILE_OVERLAP) -> list[int]:
    """Start offsets of ``size``-long tiles covering ``[0, length)`` with at least ``overlap`` shared.

    ``n = ⌈(length − size) / (size·(1 − overlap))⌉ + 1`` tiles, spread evenly from 0 to
    ``length − size`` (so the first and last tiles touch the ends; the stride is at most
    ``size·(1 − overlap)``).
    """
    if length <= size:
        return [0]
    if not 0 <= overlap < 1:
        raise AdnbError(f"tile overlap must be in [0, 1), got {overlap}")
    n = math.ceil((length - size) / (size * (1 - overlap))) + 1
    return [int(round(x)) for x in np.linspace(0, length - size, n)]


def plan(height: int, width: int, size: int, mode: str = "squash", overlap: float = TILE_OVERLAP) -> Framing:
    """The ``Framing`` of a ``height×width`` image for a model of input ``size`` (see the module)."""
    check_mode(mode)
    if mode == "squash":
        return Framing(mode, size, height, width, (size, size), ((0, 0),))
    if mode == "letterbox":
        scale = size / max(height, width)
        h, w = max(1, round(height * scale)), max(1, round(width * scale))
        # one window, shifted so the content sits in the middle: negative corner = padding before it
        return Framing(mode, size, height, width, (h, w), ((-((size - h) // 2), -((size - w) // 2)),))
    scale = size / min(height, width)
    h, w = max(size, round(height * scale)), max(size, round(width * scale))
    if h >= w:
        windows = tuple((top, 0) for top in tile_offsets(h, size, overlap))
    else:
        windows = tuple((0, left) for left in tile_offsets(w, size, overlap))
    return Framing(mode, size, height, width, (h, w), windows)


def _crop(work: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    """The ``size×size`` window at (top, left) of ``work``, zero outside it."""
    out = np.zeros((size, size, *work.shape[2:]), work.dtype)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + size, work.shape[0]), min(left + size, work.shape[1])
    out[y0 - top:y1 - top, x0 - left:x1 - left] = work[y0:y1, x0:x1]
    return out


def frame_image(image: np.ndarray, size: int, mode: str = "squash",
                overlap: float = TILE_OVERLAP) -> tuple[np.ndarray, Framing]:
    """An ``H×W×C`` image as ``K×size×size×C`` model inputs, and the framing to stitch their maps."""
    framing = plan(image.shape[0], image.shape[1], size, mode, overlap)
    work = resize_to(image, *framing.work)
    return np.stack([_crop(work, top, left, size) for top, left in framing.windows]), framing


def frame_mask(mask: np.ndarray, framing: Framing) -> np.ndarray:
    """A boolean ``H×W`` mask cut the way its image was: ``K×size×size`` (padding is normal)."""
    work = resize_mask_to(mask, *framing.work)
    return np.stack([_crop(work, top, left, framing.size) for top, left in framing.windows])


def stitch(maps: torch.Tensor | np.ndarray, framing: Framing) -> torch.Tensor:
    """One ``H×W`` map from the ``K×size×size`` window maps: average over overlaps, then bilinear.

    On the work canvas, ``A(p) = Σ_k m_k(p) / #{k : p ∈ window k}``; padding is dropped. The canvas
    is then resized to the image's ``H×W`` (bilinear, half-pixel centres, as evaluation does).
    """
    maps = torch.as_tensor(maps).float()
    if len(maps) != len(framing):
        raise AdnbError(f"{len(maps)} maps for a framing of {len(framing)} windows")
    h, w, s = *framing.work, framing.size
    if framing.mode == "squash":
        canvas = maps[0]
    else:
        total = maps.new_zeros(h, w)
        count = maps.new_zeros(h, w)
        for amap, (top, left) in zip(maps, framing.windows):
            y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + s, h), min(left + s, w)
            total[y0:y1, x0:x1] += amap[y0 - top:y1 - top, x0 - left:x1 - left]
            count[y0:y1, x0:x1] += 1
        canvas = total / count
    if canvas.shape == (framing.height, framing.width):
        return canvas
    return F.interpolate(canvas[None, None], size=(framing.height, framing.width), mode="bilinear",
                         align_corners=False)[0, 0]


def framed_score(scores: torch.Tensor | np.ndarray) -> float:
    """The image score of a framed image: ``max_k score_k`` over its windows (see the module)."""
    return float(torch.as_tensor(scores).float().max())
