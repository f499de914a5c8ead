"""The simplest detector worth comparing against: a per-pixel z-score against the training images.

Fit the mean image μ and standard deviation σ of the normal training images, pixel by pixel and
channel by channel. A test image x is then scored per pixel by

    A(x) = box_k( max_c |x_c − μ_c| / (σ_c + ε) )

(a k×k box filter smooths single-pixel noise; k = 1 turns it off); the image score is max A.
It knows nothing of textures or poses, which is exactly what makes it a useful yardstick.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adnb.methods.base import Detector, Prediction
from adnb.methods.registry import MethodSpec, register
from adnb.runtime.cache import CacheEntry


@dataclass(frozen=True)
class BaselineConfig:
    image_size: int = 128
    box: int = 5
    eps: float = 0.02


class ZScoreBaseline(Detector):
    method = "baseline"
    config_class = BaselineConfig

    def __init__(self, config: BaselineConfig):
        super().__init__(config)
        s = config.image_size
        self.register_buffer("mean", torch.zeros(3, s, s))
        self.register_buffer("std", torch.ones(3, s, s))

    def predict(self, images: torch.Tensor) -> Prediction:
        z = ((images - self.mean) / (self.std + self.config.eps)).abs().amax(dim=1, keepdim=True)
        if self.config.box > 1:
            z = F.avg_pool2d(z, self.config.box, stride=1, padding=self.config.box // 2, count_include_pad=False)
        maps = z[:, 0]
        return Prediction(maps.flatten(1).amax(dim=1), maps)


def fit(config: BaselineConfig, images: torch.Tensor, *, device: torch.device | str = "cpu",
        cache: CacheEntry | None = None, force_train: bool = False) -> ZScoreBaseline:
    """Mean and standard deviation of ``images`` (N×3×S×S in [0, 1]); nothing to iterate."""
    detector = ZScoreBaseline(config)
    if not detector.restore(cache, force_train):
        start = time.perf_counter()
        x = images.to(torch.float64)
        detector.mean.copy_(x.mean(dim=0).float())
        detector.std.copy_(x.std(dim=0).float())
        detector.store(cache, time.perf_counter() - start)
    return detector.to(device).eval()


# A reference row: its parameters are the data chapter's, which trains it.
METHOD = register(MethodSpec("baseline", ZScoreBaseline, fit, chapter="data", reference=True))
