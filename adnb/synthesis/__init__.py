"""Synthetic anomalies for training: Perlin masks, anomaly-source textures, blending, CutPaste.

Images are float tensors (B, 3, H, W) in [0, 1], masks (B, 1, H, W) in {0, 1}. Every random
choice comes from an optional CPU ``torch.Generator``, so a seed repeats a sample on any device.
"""

from adnb.synthesis.augment import draem_augment
from adnb.synthesis.blend import blend, perlin_anomalies
from adnb.synthesis.cutpaste import cutpaste, large_cutpaste
from adnb.synthesis.perlin import perlin_mask, perlin_noise
from adnb.synthesis.textures import TextureSource

__all__ = ["TextureSource", "blend", "cutpaste", "draem_augment", "large_cutpaste", "perlin_anomalies",
           "perlin_mask", "perlin_noise"]
