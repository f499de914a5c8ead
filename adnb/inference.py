"""Scoring new images with a trained checkpoint, at each image's own resolution.

>>> scorer = Scorer.from_checkpoint("…/weights.pt")
>>> result = scorer("part_0042.png")       # a path, or an H×W×3 / H×W array
>>> result.score, result.map.shape         # map at the image's own size
>>> scorer.batch(["a.png", "b.jpg"])        # several at once (batched through the model)

Images are resized to the model's input size the way training data is (area averaging when
shrinking); the anomaly map is upsampled bilinearly back to the image's size. The image score is
the model's own (computed at its resolution), so it matches what evaluation reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adnb.data.images import IMAGE_SUFFIXES, read_image, resize_image
from adnb.data.layout import find_images
from adnb.methods.base import Detector, load_detector
from adnb.runtime.device import get_device
from adnb.runtime.errors import AdnbError

ImageLike = str | Path | np.ndarray


@dataclass
class Scored:
    score: float
    map: np.ndarray  # H×W float32 at the input image's resolution
    source: str = ""


def _as_array(image: ImageLike) -> tuple[np.ndarray, str]:
    if isinstance(image, (str, Path)):
        return read_image(image), str(image)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise AdnbError(f"expected an H×W×3 (or grey H×W) image array, got shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.clip(array * (255 if array.max() <= 1 else 1), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array[:, :, :3]), "<array>"


class Scorer:
    """A trained detector wrapped for images of any size."""

    def __init__(self, detector: Detector):
        self.detector = detector.eval()

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, device: str = "auto") -> Scorer:
        return cls(load_detector(checkpoint, get_device(device)))

    @torch.no_grad()
    def batch(self, images: Sequence[ImageLike]) -> list[Scored]:
        arrays = [_as_array(image) for image in images]
        size = self.detector.image_size
        x = torch.from_numpy(np.stack([resize_image(a, size) for a, _ in arrays])).permute(0, 3, 1, 2)
        pred = self.detector.predict(x.to(self.detector.device).float().div_(255))
        out = []
        for (array, source), score, amap in zip(arrays, pred.scores, pred.maps):
            native = F.interpolate(amap[None, None].float(), size=array.shape[:2], mode="bilinear", align_corners=False)
            out.append(Scored(float(score), native[0, 0].cpu().numpy(), source))
        return out

    def __call__(self, image: ImageLike) -> Scored:
        return self.batch([image])[0]

    def score_paths(self, paths: Iterable[Path], batch_size: int = 8) -> Iterable[Scored]:
        paths = list(paths)
        for start in range(0, len(paths), batch_size):
            yield from self.batch(paths[start:start + batch_size])


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named directly, or found in the given folders (not recursive)."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found += find_images(path)
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            found.append(path)
        else:
            raise AdnbError(f"{path} is neither an image ({', '.join(IMAGE_SUFFIXES)}) nor a folder of images")
    if not found:
        raise AdnbError(f"no images found in {', '.join(map(str, inputs))}")
    return found
