"""Where the look of a synthetic anomaly comes from: a texture folder, the category's own images,
or procedural noise (needs no data at all)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F

from adnb.data.images import IMAGE_SUFFIXES, read_image, resize_image
from adnb.runtime.errors import AdnbError
from adnb.synthesis._random import randint, uniform
from adnb.synthesis.augment import draem_augment
from adnb.synthesis.perlin import perlin_noise


class TextureSource:
    """Anomaly-source textures; ``sample`` returns (n, 3, H, W) in [0, 1] on the requested device."""

    def __init__(self, kind: str, size: int, *, files: list[Path] | None = None, images: torch.Tensor | None = None,
                 hue_and_dropout: bool = False):
        self.kind, self.size = kind, size
        self.hue_and_dropout = hue_and_dropout  # FAIR_noDTD's two extra augmenters (``draem_augment``)
        self._files, self._images = files or [], images
        self._decoded: OrderedDict[Path, torch.Tensor] = OrderedDict()

    @classmethod
    def from_folder(cls, path: str | Path, size: int = 256) -> TextureSource:
        """Every image below ``path`` (e.g. DTD's ``images/``), decoded lazily."""
        root = Path(path).expanduser()
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not any(
            part.startswith(".") for part in p.relative_to(root).parts)) if root.is_dir() else []
        if not files:
            raise AdnbError(f"no texture images under {root}; give a folder of images (e.g. DTD's images/) or "
                            "use the category's own images / procedural textures instead")
        return cls("folder", size, files=files)

    @classmethod
    def from_images(cls, images: torch.Tensor, *, hue_and_dropout: bool = False) -> TextureSource:
        """Textures taken from ``images`` (N, 3, H, W), uint8 or float in [0, 1].

        ``hue_and_dropout=True`` adds the two augmenters of FAIR's noDTD loader, a hue rotation and a
        channel dropout, to DRAEM's ten (see ``adnb.synthesis.augment``).
        """
        if images.dtype == torch.uint8:
            images = images.float() / 255
        return cls("images", images.shape[-1], images=images.cpu(), hue_and_dropout=hue_and_dropout)

    @classmethod
    def procedural(cls, size: int = 256) -> TextureSource:
        """Two random colours mixed by Perlin noise, plus fine grain."""
        return cls("procedural", size)

    def __len__(self) -> int:
        return len(self._files) if self.kind == "folder" else len(self._images) if self._images is not None else 0

    def _folder_texture(self, index: int) -> torch.Tensor:
        path = self._files[index]
        if path not in self._decoded:
            self._decoded[path] = torch.from_numpy(resize_image(read_image(path), self.size)).permute(2, 0, 1).float() / 255
            if len(self._decoded) > 512:
                self._decoded.popitem(last=False)
        return self._decoded[path]

    def _procedural(self, n: int, size: tuple[int, int], g: torch.Generator | None) -> torch.Tensor:
        mix = (perlin_noise(n, size, generator=g) * 0.5 + 0.5).clamp(0, 1)
        a, b = uniform(g, 0, 1, n, 3, 1, 1), uniform(g, 0, 1, n, 3, 1, 1)
        grain = perlin_noise(n, size, generator=g, min_scale=4, max_scale=6) * 0.1
        return (a * mix + b * (1 - mix) + grain).clamp(0, 1)

    def sample(self, n: int, *, size: int | tuple[int, int] | None = None, generator: torch.Generator | None = None,
               device: torch.device | str | None = None, augment: bool = True) -> torch.Tensor:
        """``n`` textures at ``size`` (default: the source's), DRAEM-augmented unless ``augment=False``."""
        h, w = (self.size, self.size) if size is None else (size, size) if isinstance(size, int) else size
        if self.kind == "procedural":
            out = self._procedural(n, (h, w), generator)
        else:
            picks = [randint(generator, 0, len(self)) for _ in range(n)]
            out = torch.stack([self._folder_texture(i) if self.kind == "folder" else self._images[i] for i in picks])
            if out.shape[-2:] != (h, w):
                out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        if augment:
            out = draem_augment(out, generator=generator, hue_and_dropout=self.hue_and_dropout)
        return out.to(device or "cpu")
